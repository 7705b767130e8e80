"""Build a SparseVLM from arguments (presets or local checkpoints), set what trains, save and load.

Checkpoint layout (a directory): `sparsevl_config.json` (model arguments + LLM and vision configs),
`model.safetensors` (all weights; LoRA merged), tokenizer files and `preprocessor_config.json`.
"""

import json
import pickle
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, CLIPImageProcessorPil, \
    SiglipImageProcessorPil

from sparsevl.config import ModelArguments
from sparsevl.model import presets
from sparsevl.model.adaptive import build_layer_selector
from sparsevl.model.moe import MoELayer
from sparsevl.model.projectors import build_projector
from sparsevl.model.upcycle import (PAPER_TRAIN_RULE, MoELayout, apply_moe_arguments, moe_layout, set_stage3_trainable,
                                   upcycle_llm)
from sparsevl.model.vision import VisionTower, vision_encoder_class
from sparsevl.model.vlm import SparseVLM

CONFIG_NAME = "sparsevl_config.json"
WEIGHTS_NAME = "model.safetensors"
LOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def _check_local_dir(path: str, flag: str, preset_names: list[str]) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"{flag} {path!r} is neither a preset ({', '.join(preset_names)}) nor a local directory")
    return directory


def build_llm(name_or_path: str, *, vocab_size: int, dtype: str = "float32",
              attn_implementation: str | None = None) -> nn.Module:
    """A causal LM from a preset (random weights, fp32 unless `dtype` says otherwise) or a local transformers
    checkpoint, loaded in `dtype` (`auto`: the checkpoint's own)."""
    if name_or_path in presets.llm_preset_names():
        config = presets.llm_preset_config(name_or_path, vocab_size=vocab_size)
        llm = AutoModelForCausalLM.from_config(config, **_attention(attn_implementation))
        return llm if dtype in ("float32", "auto") else llm.to(LOAD_DTYPES[dtype])
    directory = _check_local_dir(name_or_path, "--model_name_or_path", presets.llm_preset_names())
    llm = load_pretrained(AutoModelForCausalLM, directory, dtype=dtype, attn_implementation=attn_implementation)
    if llm.get_input_embeddings().num_embeddings < vocab_size:
        llm.resize_token_embeddings(vocab_size)
    return llm


def build_vision_encoder(name_or_path: str, *, dtype: str = "float32", attn_implementation: str | None = None
                         ) -> nn.Module:
    """A CLIP/SigLIP vision encoder from a preset or a local directory (full CLIP models are accepted)."""
    if name_or_path in presets.vision_preset_names():
        config = presets.vision_preset_config(name_or_path)
        encoder = vision_encoder_class(config.model_type)._from_config(config, **_attention(attn_implementation))
        return encoder if dtype in ("float32", "auto") else encoder.to(LOAD_DTYPES[dtype])
    directory = _check_local_dir(name_or_path, "--vision_tower", presets.vision_preset_names())
    model_type = AutoConfig.from_pretrained(directory, local_files_only=True).model_type
    return load_pretrained(vision_encoder_class(model_type), directory, dtype=dtype,
                           attn_implementation=attn_implementation)


def _attention(attn_implementation: str | None) -> dict:
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


def _from_pretrained_safetensors(model_class, directory: Path, *, dtype: str = "float32",
                                 attn_implementation: str | None = None) -> nn.Module:
    """`from_pretrained` (fp32 unless `dtype` says otherwise) from safetensors only: a pickled `.bin` is refused,
    never unpickled."""
    try:
        return model_class.from_pretrained(directory, local_files_only=True, dtype=LOAD_DTYPES[dtype],
                                           use_safetensors=True, **_attention(attn_implementation))
    except OSError as error:
        raise ValueError(f"{directory}: cannot load safetensors weights (pickled .bin weights are refused): "
                         f"{error}") from None
    except ImportError as error:  # e.g. flash_attention_2 without the flash-attn package
        raise ValueError(f"--attn_implementation {attn_implementation}: {error}") from None


def load_pretrained(model_class, directory: Path, *, dtype: str = "float32",
                    attn_implementation: str | None = None) -> nn.Module:
    """`from_pretrained` of a local directory: safetensors when it has them, else pickled `.bin` weights read with
    torch.load(weights_only=True) (a pickle that needs more than tensors is refused, never run)."""
    if any(directory.glob("*.safetensors")) or not any(directory.glob("*.bin")):
        return _from_pretrained_safetensors(model_class, directory, dtype=dtype,
                                            attn_implementation=attn_implementation)
    try:
        return model_class.from_pretrained(directory, local_files_only=True, dtype=LOAD_DTYPES[dtype],
                                           use_safetensors=False, weights_only=True, **_attention(attn_implementation))
    except (pickle.UnpicklingError, OSError, RuntimeError) as error:
        raise ValueError(f"{directory}: refused to unpickle its .bin weights (only tensors are read, "
                         f"weights_only=True): {str(error).splitlines()[0]}") from None


def apply_load_options(model: SparseVLM, args: ModelArguments) -> None:
    """--torch_dtype / --attn_implementation on an assembled model (a loaded sparsevl checkpoint): cast it, and
    set the attention kernel of the LLM and the vision encoder."""
    if args.torch_dtype not in ("float32", "auto"):
        model.to(LOAD_DTYPES[args.torch_dtype])
    if args.attn_implementation is not None:
        for module in (model.llm, model.vision_tower.encoder):
            try:
                module.set_attn_implementation(args.attn_implementation)
            except (ImportError, ValueError) as error:
                raise ValueError(f"--attn_implementation {args.attn_implementation}: {error}") from None


def build_image_processor(name_or_path: str, vision_config):
    """transformers' PIL image processor: the checkpoint's own, or CLIP/SigLIP defaults sized for a preset."""
    if not presets.is_preset(name_or_path) and (Path(name_or_path) / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(name_or_path, local_files_only=True)
    size = vision_config.image_size
    if vision_config.model_type.startswith("siglip"):
        return SiglipImageProcessorPil(size={"height": size, "width": size})
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_mean=_CLIP_MEAN, image_std=_CLIP_STD)


def build_model(args: ModelArguments, *, vocab_size: int, image_token_id: int) -> SparseVLM:
    """Fresh model from arguments (presets get random weights)."""
    options = {"dtype": args.torch_dtype, "attn_implementation": args.attn_implementation}
    encoder = build_vision_encoder(args.vision_tower, **options)
    vision_tower = VisionTower(encoder=encoder, select_layer=args.mm_vision_select_layer,
                               select_feature=args.mm_vision_select_feature)
    llm = build_llm(args.model_name_or_path, vocab_size=vocab_size, **options)
    projector = build_projector(args.mm_projector_type, vision_dim=vision_tower.hidden_size,
                                llm_dim=llm.config.hidden_size, **projector_options(args))
    apply_moe_arguments(llm, args)
    selector = build_layer_selector(args, vision_tower=vision_tower, text_dim=llm.get_input_embeddings().embedding_dim)
    model = SparseVLM(vision_tower=vision_tower, projector=projector, llm=llm, image_token_id=image_token_id,
                      layer_selector=selector)
    return model.to(llm.dtype)  # `auto`: tower, projector and classifier follow the LLM checkpoint's dtype


def projector_options(args: ModelArguments) -> dict:
    """Projector settings beyond the two sizes (read by the projectors that use them)."""
    return {"num_query_tokens": args.num_query_tokens, "num_experts": args.mm_moe_num_experts,
            "top_k": args.mm_moe_top_k}


def configure_trainable(model: SparseVLM, args: ModelArguments) -> str:
    """Set requires_grad per training mode (wrapping the LLM with LoRA if asked); return the mode's name."""
    model.requires_grad_(False)
    if args.moe_enable:  # MoE-Tuning stage 3: --train_modules of the LLM, the projector (MoE-LLaVA's code)
        set_stage3_trainable(model.llm, args.train_modules)
        paper = args.train_modules == [PAPER_TRAIN_RULE]
        mode = "moe_layers" if paper else "moe_train_modules+projector"
        if not paper:
            model.projector.requires_grad_(True)
    elif args.tune_mm_mlp_adapter:
        mode = "projector"
    elif args.lora_enable:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=LORA_TARGETS)
        model.llm = get_peft_model(model.llm, lora)  # marks only lora_* parameters trainable
        mode = "lora"
    elif args.freeze_backbone:
        mode = "frozen_backbone"
    else:
        model.llm.requires_grad_(True)
        mode = "full"
    if not args.moe_enable:
        model.projector.requires_grad_(True)
    if model.layer_selector is not None and not args.moe_enable:
        model.layer_selector.requires_grad_(True)
    if args.unfreeze_mm_vision_tower and mode != "projector":
        model.vision_tower.requires_grad_(True)
        mode += "+vision"
    return mode


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def count_activated_parameters(model: nn.Module) -> int:
    """Parameters one token runs through: all of them less, in each MoE layer, the experts its top-k router
    leaves out ((num_experts - top_k) / num_experts of the expert weights)."""
    activated = sum(p.numel() for p in model.parameters())
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            unused = layer.router.num_experts - layer.router.top_k
            activated -= expert_params * unused // layer.router.num_experts
    return activated


def plain_state_dict(model: SparseVLM) -> dict[str, torch.Tensor]:
    """State dict with LoRA folded into the base weights and PEFT's name wrapping removed."""
    is_peft = hasattr(model.llm, "merge_adapter")
    if is_peft:
        model.llm.merge_adapter()
    try:
        state = {}
        for name, tensor in model.state_dict().items():
            if "lora_" in name:
                continue
            plain_name = name.replace("llm.base_model.model.", "llm.").replace(".base_layer.", ".")
            state[plain_name] = tensor.detach().clone() if is_peft else tensor.detach()  # unmerge would alter it
    finally:
        if is_peft:
            model.llm.unmerge_adapter()
    return state


def save_checkpoint(model: SparseVLM, out_dir: str | Path, *, model_args: ModelArguments,
                    tokenizer=None, image_processor=None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config JSON + safetensors (+ tokenizer and image processor) into `out_dir`; `state_dict`, when
    given, is the model's plain state dict already gathered (FSDP)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    arch_args = {**asdict(model_args), "lora_enable": False}  # LoRA is merged: reload as a plain model
    config = {"model_args": arch_args, "llm_config": llm.config.to_dict(),
              "vision_config": model.vision_tower.config.to_dict(), "image_token_id": model.image_token_id}
    layout = moe_layout(llm)
    if layout is not None:
        config["llm_moe"] = layout.to_dict()
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
    save_weights(plain_state_dict(model) if state_dict is None else state_dict, out_dir / WEIGHTS_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if image_processor is not None:
        image_processor.save_pretrained(out_dir)
    return out_dir


def load_checkpoint(path: str | Path) -> tuple[SparseVLM, ModelArguments]:
    """Rebuild the model from `sparsevl_config.json` and load `model.safetensors` (strict)."""
    path = Path(path)
    if not is_checkpoint(path):
        raise ValueError(f"{path} is not a sparsevl checkpoint (no {CONFIG_NAME})")
    config = json.loads((path / CONFIG_NAME).read_text())
    known = {f.name for f in fields(ModelArguments)}
    model_args = ModelArguments(**{k: v for k, v in config["model_args"].items() if k in known})
    model = assemble_model(model_args, llm_config=_config_from_dict(config["llm_config"]),
                           vision_config=_config_from_dict(config["vision_config"]),
                           image_token_id=config["image_token_id"], llm_moe=config.get("llm_moe"))
    model.load_state_dict(load_weights(path / WEIGHTS_NAME), strict=True)
    return model, model_args


def assemble_model(model_args: ModelArguments, *, llm_config, vision_config, image_token_id: int,
                   llm_moe: dict | None = None) -> SparseVLM:
    """A SparseVLM with random weights shaped by saved configs (weights are loaded by the caller);
    `llm_moe` is the saved MoELayout of an upcycled LLM."""
    encoder = vision_encoder_class(vision_config.model_type)(vision_config)
    vision_tower = VisionTower(encoder=encoder, select_layer=model_args.mm_vision_select_layer,
                               select_feature=model_args.mm_vision_select_feature)
    llm = AutoModelForCausalLM.from_config(llm_config)
    if llm_moe is not None:
        upcycle_llm(llm, MoELayout(**llm_moe))
    projector = build_projector(model_args.mm_projector_type, vision_dim=vision_tower.hidden_size,
                                llm_dim=llm_config.hidden_size, **projector_options(model_args))
    selector = build_layer_selector(model_args, vision_tower=vision_tower,
                                    text_dim=llm.get_input_embeddings().embedding_dim)
    return SparseVLM(vision_tower=vision_tower, projector=projector, llm=llm, image_token_id=image_token_id,
                     layer_selector=selector)


def save_weights(state: dict[str, torch.Tensor], file: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors; tied (shared) tensors are stored once and recorded as aliases."""
    unique, aliases = _split_shared(state)
    save_file({k: v.contiguous() for k, v in unique.items()}, str(file),
              metadata={**(metadata or {}), "aliases": json.dumps(aliases)})


def load_weights(file: str | Path, *, with_metadata: bool = False):
    """Read a safetensors file written by save_weights, restoring tied (aliased) tensors
    (with `with_metadata`: also its string metadata)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(file))
    except SafetensorError as error:
        raise ValueError(f"{file} is not a readable safetensors file: {error}") from None
    for alias, original in json.loads(metadata.get("aliases", "{}")).items():
        state[alias] = state[original]
    return (state, metadata) if with_metadata else state


def _split_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage: keep one name per storage, record the others as aliases."""
    first_by_pointer, unique, aliases = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in first_by_pointer:
            aliases[name] = first_by_pointer[key]
        else:
            first_by_pointer[key] = name
            unique[name] = tensor
    return unique, aliases


def _config_from_dict(values: dict):
    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)
