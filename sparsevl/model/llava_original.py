"""Checkpoints of the original LLaVA code base (haotian-liu/LLaVA): a stage-1 projector file for
`--pretrain_mm_mlp_adapter`, and whole `LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM` directories; and
MoE-LLaVA's (PKU-YuanGroup/MoE-LLaVA) `MoELLaVALlamaForCausalLM` / `MoELLaVAMistralForCausalLM` directories.

LLaVA's layout: `config.json` is the LLM's config with `model_type` `llava_llama` (or `llava_mistral`) plus
`mm_vision_tower` (a CLIP name or directory), `mm_projector_type`, `mm_vision_select_layer`,
`mm_vision_select_feature`, `mm_use_im_start_end`; the weights keep the LLM's names (`model.layers.*`, `lm_head.*`)
beside `model.mm_projector.{0,2}.*` and, when the tower was trained, `model.vision_tower.vision_tower.*`. The
weights come as safetensors or as pickled `.bin` files, read here with `torch.load(weights_only=True)` only.

MoE-LLaVA's layout: `model_type` `moe_llava_llama` (or `moe_llava_mistral`), `mm_image_tower`,
`image_projector_type`, a `moe` dict (`moe_layers_idx`, `num_experts` per MoE layer, `top_k_experts`,
`use_residual`, capacity factors); the projector under `model.mm_projector.image_spatial_proj.*`, the tower under
`model.image_tower.image_tower.*`, and each MoE layer as DeepSpeed's: router `mlp.deepspeed_moe.gate.wg.weight`,
experts `mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{gate,up,down}_proj.weight`. Imported, it routes as
DeepSpeed's top-2 gate without its capacity limit (MoE-LLaVA's eval_capacity_factor may drop tokens of a crowded
expert; here none is dropped) and with the deterministic second expert; `--second_expert_policy sampling` (eval, chat,
api) switches on DeepSpeed's Gumbel-sampled one.
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
MOE_LLM_TYPES = {"moe_llava_llama": "llama", "moe_llava_mistral": "mistral"}  # MoE-LLaVA's
PROJECTOR_KEY = re.compile(r"(?:^|\.)mm_projector\.(?:image_spatial_proj\.)?(.+)$")
TOWER_PREFIXES = ("model.vision_tower.vision_tower.", "model.image_tower.image_tower.")
MOE_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.deepspeed_moe\.(?:gate\.wg\.weight|"
                     r"experts\.deepspeed_experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight)$")


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
        if PROJECTOR_KEY.search(name) is None:
            raise ValueError(f"--pretrain_mm_mlp_adapter {path}: key {name} is not an mm_projector weight")
        state[projector_name(name)] = tensor
    try:
        model.projector.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"--pretrain_mm_mlp_adapter {path} does not fit the {type(model.projector).__name__}: "
                         f"{error}") from None


def projector_name(name: str) -> str:
    """LLaVA's projector key -> ours: `mm_projector.0.weight` -> `net.0.weight`; a bare Linear's
    `mm_projector.weight` (the linear projector) -> `net.0.weight`."""
    rest = PROJECTOR_KEY.search(name).group(1)
    return f"net.{rest}" if rest[0].isdigit() else f"net.0.{rest}"


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
        prefix = next((p for p in TOWER_PREFIXES if name.startswith(p)), None)
        if PROJECTOR_KEY.search(name) is not None:
            projector[projector_name(name)] = tensor
        elif prefix is not None:
            tower[name[len(prefix):]] = tensor
        else:
            llm[name] = tensor
    return llm, projector, tower


def moe_state(llm_state: dict[str, torch.Tensor], layers: list[int], num_experts: int) -> dict[str, torch.Tensor]:
    """DeepSpeed MoE weights of the LLM state (removed from it) -> our upcycled layers' names, experts stacked."""
    ours, experts = {}, {}
    for name in [n for n in llm_state if MOE_KEY.match(n)]:
        layer, expert, projection = MOE_KEY.match(name).groups()
        tensor = llm_state.pop(name)
        if expert is None:
            ours[f"model.layers.{layer}.mlp.moe.router.gate.weight"] = tensor
        else:
            experts.setdefault((int(layer), projection), {})[int(expert)] = tensor
    for (layer, projection), by_expert in experts.items():
        if sorted(by_expert) != list(range(num_experts)):
            raise ValueError(f"MoE layer {layer} {projection}: experts {sorted(by_expert)}, expected "
                             f"0..{num_experts - 1}")
        ours[f"model.layers.{layer}.mlp.moe.experts.{projection}"] = torch.stack([by_expert[e] for e in
                                                                                  range(num_experts)])
    found = sorted({int(n.split(".")[2]) for n in ours})
    if found != sorted(layers):
        raise ValueError(f"MoE weights sit in layers {found}, but config moe_layers_idx is {sorted(layers)}")
    return ours


def from_llava_original(directory: str | Path, *, image_token_id: int, vision_tower: str | None = None
                        ) -> tuple[SparseVLM, ModelArguments]:
    """An original-LLaVA directory as a SparseVLM in fp32. The vision tower comes from the checkpoint's own
    weights when it has them, else from `vision_tower` (or `mm_vision_tower`) as a local CLIP directory. The
    LLM's embeddings grow to hold `image_token_id` (LLaVA marks images with -200, outside the vocabulary)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    llm_type = _llm_type(config, LLM_TYPES, directory)
    model_args = model_args_from_llava_config(config, str(directory), vision_tower)
    return _assemble(directory, config, model_args, llm_type, image_token_id=image_token_id), model_args


def from_moe_llava(directory: str | Path, *, image_token_id: int, vision_tower: str | None = None
                   ) -> tuple[SparseVLM, ModelArguments]:
    """A MoE-LLaVA directory as a SparseVLM in fp32 with its MoE layers upcycled in place (see the module doc)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    llm_type = _llm_type(config, MOE_LLM_TYPES, directory)
    moe = config.get("moe") or {}
    if moe.get("use_residual"):
        raise ValueError(f"{directory}: use_residual (residual MoE) checkpoints are not supported")
    counts = moe.get("num_experts")
    counts = counts if isinstance(counts, list) else [counts] * len(moe.get("moe_layers_idx") or [])
    if not counts or len(set(counts)) != 1:
        raise ValueError(f"{directory}: moe.num_experts {counts} must give one expert count for every MoE layer")
    layout = {"layers": list(moe["moe_layers_idx"]), "num_experts": counts[0], "top_k": moe["top_k_experts"]}
    mm = {**config, "mm_vision_tower": config.get("mm_image_tower"),
          "mm_projector_type": config.get("image_projector_type", "linear")}
    model_args = model_args_from_llava_config(mm, str(directory), vision_tower)
    model = _assemble(directory, config, model_args, llm_type, image_token_id=image_token_id, llm_moe=layout)
    return model, model_args


def _llm_type(config: dict, types: dict[str, str], directory: Path) -> str:
    if config.get("model_type") not in types:
        raise ValueError(f"{directory}: model_type {config.get('model_type')!r} is not one of {', '.join(types)}")
    return types[config["model_type"]]


def _assemble(directory: Path, config: dict, model_args: ModelArguments, llm_type: str, *, image_token_id: int,
              llm_moe: dict | None = None) -> SparseVLM:
    """The SparseVLM of a LLaVA-family directory: LLM config from the non-mm fields, weights split by module."""
    skip = ("model_type", "architectures", "moe", "mm_image_tower", "image_projector_type")
    llm_config = AutoConfig.for_model(llm_type, **{k: v for k, v in config.items()
                                                   if not k.startswith("mm_") and k not in skip})
    llm_state, projector_state, tower_state = split_llava_state(read_checkpoint_weights(directory))
    if llm_moe is not None:
        llm_state.update(moe_state(llm_state, llm_moe["layers"], llm_moe["num_experts"]))
    encoder = _vision_encoder(model_args.vision_tower, tower_state, directory)
    model = assemble_model(model_args, llm_config=llm_config, vision_config=encoder.config,
                           image_token_id=image_token_id, llm_moe=llm_moe)
    model.vision_tower.encoder.load_state_dict(encoder.state_dict(), strict=True)
    missing, unexpected = model.llm.load_state_dict(llm_state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and llm_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{directory}: LLM weights do not fit {llm_type}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    model.projector.load_state_dict(projector_state, strict=True)
    if image_token_id >= model.llm.get_input_embeddings().num_embeddings:
        model.llm.resize_token_embeddings(image_token_id + 1)
    return model.eval()


def _vision_encoder(name: str, tower_state: dict, directory: Path):
    """The CLIP/SigLIP encoder of local directory `name`, with the checkpoint's own tower weights if it has them."""
    if not Path(name).is_dir():
        raise ValueError(f"{directory}: mm_vision_tower {name!r} is not a local directory; give the CLIP "
                         "directory with --vision_tower")
    encoder = build_vision_encoder(name)
    if tower_state:
        encoder.load_state_dict(tower_state, strict=True)
    return encoder


IMPORTERS = {"llava": from_llava_original, "moe-llava": from_moe_llava}  # sparsevl export --from


def import_llava_original(directory: str | Path, out_dir: str | Path, *, source: str = "llava",
                          vision_tower: str | None = None) -> Path:
    """`sparsevl export --to sparsevl --from llava|moe-llava`: a directory of those code bases (with its tokenizer)
    written as a sparsevl checkpoint; `<image>` joins the tokenizer and the LLM's embeddings."""
    from sparsevl.data.tokenizer import add_image_token, load_tokenizer
    from sparsevl.model.build import build_image_processor, save_checkpoint

    tokenizer = load_tokenizer(directory)
    image_token_id = add_image_token(tokenizer)
    model, model_args = IMPORTERS[source](directory, image_token_id=image_token_id, vision_tower=vision_tower)
    image_processor = build_image_processor(model_args.vision_tower, model.vision_tower.config)
    model_args.model_name_or_path = str(out_dir)
    save_checkpoint(model, out_dir, model_args=model_args, tokenizer=tokenizer, image_processor=image_processor)
    return Path(out_dir)
