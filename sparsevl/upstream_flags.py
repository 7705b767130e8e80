"""Flags of LLaVA's and MoE-LLaVA's train scripts that are not ours: each is translated into our flag with the
upstream meaning, accepted where its value is what sparsevl always does, or refused with a message naming our flag.

`UPSTREAM_FLAGS` is the table, one row per upstream name; a row is a function `values -> our flags` (raising
`UpstreamFlagError` to refuse). Flags whose names LLaVA and sparsevl share (`--vision_tower`, `--lora_r`, ...) need
no row.
"""

from collections.abc import Callable


class UpstreamFlagError(ValueError):
    """An upstream flag (or value) sparsevl does not support; the message names what to use instead."""


Row = Callable[[str, list[str]], list[str]]


def alias(ours: str, *, check: Callable[[str], str | None] = lambda value: None) -> Row:
    """The same meaning under our name; `check(value)` returns a reason to refuse the value, or None."""
    def translate(name: str, values: list[str]) -> list[str]:
        for value in values:
            reason = check(value)
            if reason:
                raise UpstreamFlagError(f"--{name} {value}: {reason} (our flag: --{ours})")
        return [f"--{ours}", *values]
    return translate


def only(accepted: tuple[str, ...], why: str) -> Row:
    """Accept the values that mean what sparsevl always does (nothing to pass on); refuse the others with `why`."""
    def translate(name: str, values: list[str]) -> list[str]:
        value = " ".join(values) or "True"
        if value.lower() not in accepted:
            raise UpstreamFlagError(f"--{name} {value}: {why}")
        return []
    return translate


def refuse(why: str) -> Row:
    def translate(name: str, values: list[str]) -> list[str]:
        raise UpstreamFlagError(f"--{name} is not supported: {why}")
    return translate


def _ratio(value: str) -> str | None:
    try:
        ok = 0 <= float(value) < 1
    except ValueError:
        ok = False
    return None if ok else "a warmup ratio must be a number in [0, 1)"


def _plain_version(value: str) -> str | None:
    if value == "plain":
        return None
    return ("sparsevl's templates are plain (LLaVA's `plain`) and chat (USER:/ASSISTANT: turns without LLaVA's "
            "system prompt, not LLaVA's v1 byte for byte): use --conversation_template chat")


FALSE, TRUE = ("false", "0"), ("true", "1")
UPSTREAM_FLAGS: dict[str, Row] = {
    # LLaVA (haotian-liu/LLaVA llava/train/train.py and scripts/v1_5/*.sh)
    "version": alias("conversation_template", check=_plain_version),
    "warmup_ratio": alias("warmup_steps", check=_ratio),  # our --warmup_steps below 1 is a ratio of all steps
    "evaluation_strategy": alias("eval_strategy"),  # transformers' older name
    "mm_use_im_start_end": only(FALSE, "sparsevl wraps images in no start/end tokens; drop the flag"),
    "mm_use_im_patch_token": only(FALSE, "sparsevl adds no <im_patch> token; drop the flag"),
    "mm_patch_merge_type": only(("flat",), "only LLaVA's flat patch sequence is supported; drop the flag"),
    "lazy_preprocess": only(TRUE + FALSE, "expects True or False"),  # sparsevl always tokenizes per item, as LLaVA's lazy mode
    "is_multimodal": only(TRUE + FALSE, "expects True or False"),  # LLaVA sets it itself from --vision_tower
    "freeze_mm_mlp_adapter": only(FALSE, "use --freeze_backbone / --tune_mm_mlp_adapter to choose what trains"),
    "mm_projector_lr": refuse("one --learning_rate applies to every trained part"),
    "bits": only(("16", "32"), "no 4/8-bit quantization; load half precision with --torch_dtype bfloat16"),
    "double_quant": refuse("no quantization (--bits 4/8); use --torch_dtype"),
    "quant_type": refuse("no quantization (--bits 4/8); use --torch_dtype"),
    "lora_bias": only(("none",), "LoRA adapters here have no bias (--lora_r, --lora_alpha, --lora_dropout)"),
    "lora_weight_path": refuse("LoRA is merged into a saved checkpoint: continue with --model_name_or_path DIR"),
    "mpt_attn_impl": refuse("no MPT models; use --attn_implementation"),
    "cache_dir": refuse("models load from local directories: pass the directory to --model_name_or_path"),
    # MoE-LLaVA (PKU-YuanGroup/MoE-LLaVA moellava/train/train.py and scripts/v1/*)
    "image_tower": alias("vision_tower"),
    "image_projector_type": alias("mm_projector_type"),
    "moe_layers_idx": alias("moe_layers"),
    "video_tower": refuse("no video input; images only (--vision_tower)"),
    "video_projector_type": refuse("no video input; images only (--mm_projector_type)"),
    "video_folder": refuse("no video input; images only (--image_folder)"),
    "num_frames": refuse("no video input; images only"),
    "only_lora_ffn": refuse("--lora_enable puts LoRA on every attention and FFN projection"),
    "ep_size": only(("1",), "no expert parallelism: every process holds every expert"),
}


def translate_upstream_flags(argv: list[str]) -> list[str]:
    """argv with every upstream flag translated into ours (or dropped when it asks for what we always do);
    raises UpstreamFlagError naming our flag for one we refuse."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        name, _, inline = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if name not in UPSTREAM_FLAGS:
            out.append(token)
            i += 1
            continue
        values = [inline] if inline else []
        while not inline and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values.append(argv[i + 1])
            i += 1
        out += UPSTREAM_FLAGS[name](name, values)
        i += 1
    return out
