"""Checkpoints of the original LLaVA code base (haotian-liu/LLaVA): a stage-1 projector file for
`--pretrain_mm_mlp_adapter`, and whole `LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM` directories.

LLaVA's layout: `config.json` is the LLM's config with `model_type` `llava_llama` (or `llava_mistral`) plus
`mm_vision_tower` (a CLIP name or directory), `mm_projector_type`, `mm_vision_select_layer`,
`mm_vision_select_feature`, `mm_use_im_start_end`; the weights keep the LLM's names (`model.layers.*`, `lm_head.*`)
beside `model.mm_projector.{0,2}.*` and, when the tower was trained, `model.vision_tower.vision_tower.*`. The
weights come as safetensors or as pickled `.bin` files, read here with `torch.load(weights_only=True)` only.
"""

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from sparsevl.config import ModelArguments
from sparsevl.model.build import assemble_model, build_vision_encoder
from sparsevl.model.vlm import SparseVLM

LLM_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral"}  # LLaVA's model_type -> transformers'
PROJECTOR_KEY = re.compile(r"(?:^|\.)mm_projector\.(.+)$")
TOWER_PREFIX = "model.vision_tower.vision_tower."


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a pickled `.bin`/`.pt` file read with weights_only=True (a
    pickle that needs anything but tensors and containers is refused, never run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: refused to unpickle (only tensors are read, weights_only=True): "
                         f"{str(error).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a mapping of names to tensors")
    return state


def load_projector_adapter(model: SparseVLM, path: str | Path) -> None:
    """--pretrain_mm_mlp_adapter: LLaVA's stage-1 `mm_projector.bin` (keys `model.mm_projector.0.weight`, ...)
    into our projector, strictly: every key must fit and every projector weight must be given."""
    state = {}
    for name, tensor in read_weights(path).items():
        match = PROJECTOR_KEY.search(name)
        if match is None:
            raise ValueError(f"--pretrain_mm_mlp_adapter {path}: key {name} is not an mm_projector weight")
        state[f"net.{match.group(1)}"] = tensor
    try:
        model.projector.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"--pretrain_mm_mlp_adapter {path} does not fit the {type(model.projector).__name__}: "
                         f"{error}") from None


def read_checkpoint_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every weight of a directory: safetensors files if there are any, else `.bin` files (weights_only)."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not files:
        raise ValueError(f"{directory} holds no *.safetensors or *.bin weights")
    state = {}
    for file in files:
        state.update(read_weights(file))
    return state


def model_args_from_llava_config(config: dict, source: str, vision_tower: str | None) -> ModelArguments:
    """Our arguments for LLaVA's mm_* config fields; refuses what sparsevl cannot express."""
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise ValueError(f"{source}: mm_use_im_start_end / mm_use_im_patch_token add tokens around images; "
                         "sparsevl places none")
    projector = config.get("mm_projector_type", "linear")
    if projector not in ("linear", "mlp2x_gelu"):
        raise ValueError(f"{source}: mm_projector_type {projector!r} is not supported (linear, mlp2x_gelu)")
    feature = config.get("mm_vision_select_feature", "patch")
    return ModelArguments(model_name_or_path=source, vision_tower=vision_tower or config["mm_vision_tower"],
                          mm_projector_type=projector, mm_vision_select_layer=config.get("mm_vision_select_layer", -1),
                          mm_vision_select_feature={"patch": "patch", "cls_patch": "cls_patch"}[feature])


def split_llava_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(LLM, projector, vision encoder) weights of a LLaVA state dict, under their own modules' names."""
    llm, projector, tower = {}, {}, {}
    for name, tensor in state.items():
        match = PROJECTOR_KEY.search(name)
        if match is not None:
            projector[f"net.{match.group(1)}"] = tensor
        elif name.startswith(TOWER_PREFIX):
            tower[name[len(TOWER_PREFIX):]] = tensor
        else:
            llm[name] = tensor
    return llm, projector, tower


def from_llava_original(directory: str | Path, *, image_token_id: int, vision_tower: str | None = None
                        ) -> tuple[SparseVLM, ModelArguments]:
    """An original-LLaVA directory as a SparseVLM in fp32. The vision tower comes from the checkpoint's own
    weights when it has them, else from `vision_tower` (or `mm_vision_tower`) as a local CLIP directory. The
    LLM's embeddings grow to hold `image_token_id` (LLaVA marks images with -200, outside the vocabulary)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    llm_type = LLM_TYPES.get(config.get("model_type"))
    if llm_type is None:
        raise ValueError(f"{directory}: model_type {config.get('model_type')!r} is not an original LLaVA model "
                         f"({', '.join(LLM_TYPES)})")
    model_args = model_args_from_llava_config(config, str(directory), vision_tower)
    llm_state, projector_state, tower_state = split_llava_state(read_checkpoint_weights(directory))
    llm_config = AutoConfig.for_model(llm_type, **{k: v for k, v in config.items()
                                                   if not k.startswith("mm_") and k not in ("model_type",
                                                                                            "architectures")})
    encoder = _vision_encoder(model_args.vision_tower, tower_state, directory)
    model = assemble_model(model_args, llm_config=llm_config, vision_config=encoder.config,
                           image_token_id=image_token_id)
    model.vision_tower.encoder.load_state_dict(encoder.state_dict(), strict=True)
    missing, unexpected = model.llm.load_state_dict(llm_state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and llm_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{directory}: LLM weights do not fit {llm_type}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    model.projector.load_state_dict(projector_state, strict=True)
    if image_token_id >= model.llm.get_input_embeddings().num_embeddings:
        model.llm.resize_token_embeddings(image_token_id + 1)
    return model.eval(), model_args


def _vision_encoder(name: str, tower_state: dict, directory: Path):
    """The CLIP/SigLIP encoder of local directory `name`, with the checkpoint's own tower weights if it has them."""
    if not Path(name).is_dir():
        raise ValueError(f"{directory}: mm_vision_tower {name!r} is not a local directory; give the CLIP "
                         "directory with --vision_tower")
    encoder = build_vision_encoder(name)
    if tower_state:
        encoder.load_state_dict(tower_state, strict=True)
    return encoder


def import_llava_original(directory: str | Path, out_dir: str | Path, *, vision_tower: str | None = None) -> Path:
    """`sparsevl export --to sparsevl --from llava`: an original-LLaVA directory (with its tokenizer) written as a
    sparsevl checkpoint; `<image>` joins the tokenizer and the LLM's embeddings."""
    from sparsevl.data.tokenizer import add_image_token, load_tokenizer
    from sparsevl.model.build import build_image_processor, save_checkpoint

    tokenizer = load_tokenizer(directory)
    image_token_id = add_image_token(tokenizer)
    model, model_args = from_llava_original(directory, image_token_id=image_token_id, vision_tower=vision_tower)
    image_processor = build_image_processor(model_args.vision_tower, model.vision_tower.config)
    model_args.model_name_or_path = str(out_dir)
    save_checkpoint(model, out_dir, model_args=model_args, tokenizer=tokenizer, image_processor=image_processor)
    return Path(out_dir)
