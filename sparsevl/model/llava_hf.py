"""Conversion between SparseVLM and transformers' `LlavaForConditionalGeneration` (dense projectors only).

Used as the numerical oracle in tests and by `sparsevl export`. Llava expresses exactly: a CLIP/SigLIP
vision encoder read at one layer, a Linear-GELU-Linear projector with biases, and a causal LM whose
input holds the image tokens already repeated. Anything else (linear or MoE projector, pruning
between layers) is refused here or caught by the parity probe in `sparsevl.export`.
"""

import torch
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from sparsevl.config import ModelArguments
from sparsevl.model.build import _from_pretrained_safetensors, assemble_model, plain_state_dict
from sparsevl.model.projectors import DenseProjector
from sparsevl.model.upcycle import moe_layout
from sparsevl.model.vlm import SparseVLM

# (our prefix, transformers 5's in-memory prefix), first match wins
_PREFIXES = [
    ("vision_tower.encoder.", "model.vision_tower."),
    ("projector.net.0.", "model.multi_modal_projector.linear_1."),
    ("projector.net.2.", "model.multi_modal_projector.linear_2."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
]
# (our prefix, the hub layout's prefix): the names published llava-hf checkpoints use, which vLLM, SGLang and
# transformers 4 read, and transformers 5 maps onto its in-memory names when loading.
_HUB_PREFIXES = [
    ("vision_tower.encoder.", "vision_tower.vision_model."),
    ("projector.net.0.", "multi_modal_projector.linear_1."),
    ("projector.net.2.", "multi_modal_projector.linear_2."),
    ("llm.model.", "language_model.model."),
    ("llm.lm_head.", "language_model.lm_head."),
]
_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")

# LLaVA-1.5's prompt layout, the same text `sparsevl.data.conversation` builds for the chat template:
# "USER: <image>\n{question}\nASSISTANT: {answer}{eos}\n".
PROCESSOR_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] in ['user', 'human'] -%}{{ 'USER: ' + ns.text | trim + '\\n' }}"
    "{%- elif message['role'] in ['assistant', 'gpt'] -%}{{ 'ASSISTANT: ' + ns.text | trim + eos_token + '\\n' }}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
)


def _base_llm(model: SparseVLM):
    return model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm


def _select_strategy(model: SparseVLM) -> str:
    """Llava's "default" drops the first token (CLIP's [CLS]); "full" keeps all (SigLIP has no [CLS])."""
    drops_cls = model.vision_tower.has_cls_token and model.vision_tower.select_feature == "patch"
    return "default" if drops_cls else "full"


def llava_hf_config(model: SparseVLM) -> LlavaConfig:
    """The LlavaConfig describing our model; refuses what Llava cannot express."""
    if model.layer_selector is not None:
        raise ValueError("a model trained with --use_adaptive_layer_selection has no Llava layout: Llava reads one "
                         "fixed vision layer (vision_feature_layer), not a per-image choice")
    projector = model.projector
    if not isinstance(projector, DenseProjector) or len(projector.net) not in (1, 3):
        raise ValueError(f"projector {type(projector).__name__} has no Llava layout: only the mlp2x_gelu "
                         "projector maps onto LlavaForConditionalGeneration (MoE and other projectors do not)")
    if len(projector.net) == 1:
        raise ValueError("Llava's projector is Linear-GELU-Linear; a linear projector has no Llava layout")
    if model.vision_tower.config.model_type not in _VISION_TYPES:
        raise ValueError(f"vision tower {model.vision_tower.config.model_type!r} has no Llava layout; "
                         f"supported: {_VISION_TYPES}")
    llm = _base_llm(model)
    if moe_layout(llm) is not None:
        raise ValueError("the LLM has upcycled MoE layers, which Llava's dense text model does not express; "
                         "export the LLM with --to qwen3-moe instead")
    return LlavaConfig(vision_config=model.vision_tower.config.to_dict(), text_config=llm.config.to_dict(),
                       image_token_id=model.image_token_id, projector_hidden_act="gelu",
                       vision_feature_layer=model.vision_tower.select_layer,
                       vision_feature_select_strategy=_select_strategy(model),
                       image_seq_length=model.num_image_tokens, tie_word_embeddings=llm.config.tie_word_embeddings)


def _renamed(state: dict[str, torch.Tensor], prefixes: list[tuple[str, str]], what: str) -> dict[str, torch.Tensor]:
    """`state` with each name's first matching prefix replaced; a name no prefix matches is an error."""
    renamed = {}
    for name, tensor in state.items():
        for old, new in prefixes:
            if name.startswith(old):
                renamed[new + name[len(old):]] = tensor
                break
        else:
            raise ValueError(f"weight {name} has no place in {what}")
    return renamed


def to_llava_hf_state_dict(model: SparseVLM, *, layout: str = "transformers") -> dict[str, torch.Tensor]:
    """Our weights under Llava's names: `transformers` (transformers 5's in-memory names) or `hub` (the layout
    of published llava-hf checkpoints, which `sparsevl export` writes)."""
    prefixes = {"transformers": _PREFIXES, "hub": _HUB_PREFIXES}[layout]
    return _renamed(plain_state_dict(model), prefixes, f"the Llava {layout} layout")


def from_llava_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's in-memory Llava weight names -> SparseVLM weight names."""
    return _renamed(state, [(theirs, ours) for ours, theirs in _PREFIXES], "a SparseVLM")


def to_llava_hf(model: SparseVLM) -> LlavaForConditionalGeneration:
    """A transformers Llava model holding copies of our weights."""
    hf_model = LlavaForConditionalGeneration(llava_hf_config(model)).eval()
    missing, unexpected = hf_model.load_state_dict(to_llava_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf_model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"Llava layout mismatch: missing {missing}, unexpected {unexpected}")
    return hf_model


def llava_hf_processor(model: SparseVLM, tokenizer, image_processor) -> LlavaProcessor:
    """A LlavaProcessor that repeats `<image>` exactly `model.num_image_tokens` times per image."""
    config = model.vision_tower.config
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=config.patch_size,
                          vision_feature_select_strategy=_select_strategy(model),
                          num_additional_image_tokens=int(model.vision_tower.has_cls_token),
                          chat_template=PROCESSOR_CHAT_TEMPLATE)


def model_args_from_llava_config(config: LlavaConfig, source: str) -> ModelArguments:
    """Our architecture arguments for a Llava config; refuses what SparseVLM cannot express."""
    vision_type = config.vision_config.model_type
    if vision_type not in _VISION_TYPES:
        raise ValueError(f"{source}: vision tower {vision_type!r} is not supported; supported: {_VISION_TYPES}")
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"{source}: vision_feature_layer {config.vision_feature_layer} concatenates several "
                         "layers; sparsevl reads one layer")
    if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
        raise ValueError(f"{source}: projector with act {config.projector_hidden_act!r} and bias "
                         f"{config.multimodal_projector_bias} is not mlp2x_gelu (GELU with biases)")
    strategy, has_cls = config.vision_feature_select_strategy, vision_type == "clip_vision_model"
    if strategy == "default" and not has_cls:
        raise ValueError(f"{source}: strategy 'default' drops the first SigLIP patch token; sparsevl keeps all")
    if strategy not in ("default", "full"):
        raise ValueError(f"{source}: unknown vision_feature_select_strategy {strategy!r}")
    return ModelArguments(model_name_or_path=source, vision_tower=source, mm_projector_type="mlp2x_gelu",
                          mm_vision_select_layer=config.vision_feature_layer,
                          mm_vision_select_feature="patch" if strategy == "default" or not has_cls else "cls_patch")


def from_llava_hf(directory: str) -> tuple[SparseVLM, ModelArguments]:
    """Load a llava-hf directory (any layout transformers reads) as a SparseVLM in fp32."""
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if not isinstance(config, LlavaConfig):
        raise ValueError(f"{directory} is not a llava-hf model (config model_type {config.model_type!r})")
    model_args = model_args_from_llava_config(config, str(directory))
    hf_model = _from_pretrained_safetensors(LlavaForConditionalGeneration, directory)  # never unpickles
    text_config = config.get_text_config()
    text_config.tie_word_embeddings = config.tie_word_embeddings
    model = assemble_model(model_args, llm_config=text_config, vision_config=config.vision_config,
                           image_token_id=config.image_token_id)
    state = from_llava_hf_state_dict(hf_model.state_dict())
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.llm.tie_weights()
    return model.eval(), model_args
