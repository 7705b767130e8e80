"""Conversion between SparseVLM and transformers' `LlavaForConditionalGeneration` (dense projectors only).

Used as the numerical oracle in tests and by `sparsevl export --to llava-hf`.
"""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from sparsevl.model.build import plain_state_dict
from sparsevl.model.projectors import DenseProjector
from sparsevl.model.vlm import SparseVLM

# (our prefix, transformers' prefix), first match wins
_PREFIXES = [
    ("vision_tower.encoder.", "model.vision_tower."),
    ("projector.net.0.", "model.multi_modal_projector.linear_1."),
    ("projector.net.2.", "model.multi_modal_projector.linear_2."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
]


def llava_hf_config(model: SparseVLM) -> LlavaConfig:
    """The LlavaConfig describing our model; refuses what Llava cannot express."""
    if not isinstance(model.projector, DenseProjector) or len(model.projector.net) not in (1, 3):
        raise ValueError("only the mlp2x_gelu projector maps onto LlavaForConditionalGeneration")
    if len(model.projector.net) == 1:
        raise ValueError("Llava's projector is Linear-GELU-Linear; a linear projector has no Llava layout")
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    strategy = "default" if model.vision_tower.select_feature == "patch" else "full"
    return LlavaConfig(vision_config=model.vision_tower.config.to_dict(), text_config=llm.config.to_dict(),
                       image_token_id=model.image_token_id, projector_hidden_act="gelu",
                       vision_feature_layer=model.vision_tower.select_layer,
                       vision_feature_select_strategy=strategy, image_seq_length=model.num_image_tokens,
                       tie_word_embeddings=llm.config.tie_word_embeddings)


def to_llava_hf_state_dict(model: SparseVLM) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in plain_state_dict(model).items():
        for ours, theirs in _PREFIXES:
            if name.startswith(ours):
                state[theirs + name[len(ours):]] = tensor
                break
        else:
            raise ValueError(f"weight {name} has no place in the Llava layout")
    return state


def from_llava_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers Llava weight names -> SparseVLM weight names."""
    ours = {}
    for name, tensor in state.items():
        for our_prefix, their_prefix in _PREFIXES:
            if name.startswith(their_prefix):
                ours[our_prefix + name[len(their_prefix):]] = tensor
                break
        else:
            raise ValueError(f"Llava weight {name} has no place in a SparseVLM")
    return ours


def to_llava_hf(model: SparseVLM) -> LlavaForConditionalGeneration:
    """A transformers Llava model holding copies of our weights."""
    hf_model = LlavaForConditionalGeneration(llava_hf_config(model)).eval()
    missing, unexpected = hf_model.load_state_dict(to_llava_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf_model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"Llava layout mismatch: missing {missing}, unexpected {unexpected}")
    return hf_model
