"""`sparsevl export --to llava-hf|sparsevl --model DIR --out DIR`: move dense models between formats.

--to llava-hf: a sparsevl checkpoint -> transformers' `LlavaForConditionalGeneration` layout (config.json,
model.safetensors, a `LlavaProcessor` with our tokenizer and image processor), then reloaded with plain
transformers and checked against our logits on a probe input.
--to sparsevl: a llava-hf directory -> a sparsevl checkpoint (e.g. to fine-tune or prune it here).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = ("llava-hf", "sparsevl")


def export_llava_hf(model_dir: str | Path, out_dir: str | Path, *, verify: bool = True, atol: float = 1e-5) -> Path:
    """Write `model_dir` (a sparsevl checkpoint) in the llava-hf layout; with `verify`, reload and compare logits."""
    from sparsevl.eval.run import load_for_inference
    from sparsevl.model.llava_hf import llava_hf_config, llava_hf_processor, to_llava_hf_state_dict

    model, tokenizer, image_processor = load_for_inference(model_dir)
    config = llava_hf_config(model)  # refuses projectors Llava cannot express before anything is written
    state = to_llava_hf_state_dict(model)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it to the input embeddings on load
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.dtype = "float32"
    config.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors", metadata={"format": "pt"})
    llava_hf_processor(model, tokenizer, image_processor).save_pretrained(out_dir)
    if verify:
        difference = llava_hf_parity(model, out_dir)
        if difference > atol:
            raise ValueError(f"exported model in {out_dir} differs from {model_dir} by {difference:.3g} in logits "
                             f"(tolerance {atol}); this model has parts the Llava layout does not express")
        print(f"verified: plain transformers logits match within {difference:.2g}")
    return out_dir


def llava_hf_parity(model, hf_dir: str | Path, *, text_length: int = 6) -> float:
    """Largest |logit difference| between our model and the llava-hf directory on a seeded probe prompt."""
    from transformers import LlavaForConditionalGeneration

    from sparsevl.model.build import _from_pretrained_safetensors

    hf_model = _from_pretrained_safetensors(LlavaForConditionalGeneration, Path(hf_dir)).eval()
    vision = model.vision_tower.config
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=generator)
    vocab = model.llm.get_input_embeddings().num_embeddings
    text = torch.randint(0, vocab, (text_length,), generator=generator)
    text = torch.where(text == model.image_token_id, torch.zeros_like(text), text)
    image = torch.tensor([model.image_token_id])
    ours_ids = torch.cat([text[:1], image, text[1:]])[None]
    their_ids = torch.cat([text[:1], image.repeat(model.num_image_tokens), text[1:]])[None]
    with torch.no_grad():
        ours = model(ours_ids, torch.ones_like(ours_ids), pixels).logits
        theirs = hf_model(input_ids=their_ids, pixel_values=pixels).logits
    if ours.shape != theirs.shape:
        raise ValueError(f"exported model gives logits of shape {tuple(theirs.shape)}, ours {tuple(ours.shape)}")
    return float((ours - theirs).abs().max())


def import_llava_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a llava-hf directory as a sparsevl checkpoint (weights, config, tokenizer, image processor)."""
    from transformers import AutoImageProcessor

    from sparsevl.data.tokenizer import add_image_token, load_tokenizer
    from sparsevl.model.build import save_checkpoint
    from sparsevl.model.llava_hf import from_llava_hf

    model, model_args = from_llava_hf(str(hf_dir))
    tokenizer = load_tokenizer(hf_dir)
    image_token_id = add_image_token(tokenizer)
    if image_token_id != model.image_token_id:
        raise ValueError(f"{hf_dir}: tokenizer maps <image> to {image_token_id} but config.image_token_id is "
                         f"{model.image_token_id}")
    image_processor = AutoImageProcessor.from_pretrained(hf_dir, local_files_only=True)
    save_checkpoint(model, out_dir, model_args=model_args, tokenizer=tokenizer, image_processor=image_processor)
    return Path(out_dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevl export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, choices=FORMATS, help="target format")
    p.add_argument("--model", required=True, help="source: a sparsevl checkpoint (--to llava-hf) or a llava-hf "
                                                  "directory (--to sparsevl)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--verify", type=_bool, default=True, help="llava-hf: reload with plain transformers and "
                                                              "compare logits on a probe (default true)")
    return p


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        if args.to == "llava-hf":
            out = export_llava_hf(args.model, args.out, verify=args.verify)
        else:
            out = import_llava_hf(args.model, args.out)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"sparsevl export: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"format": args.to, "out": str(out)}))
    return 0
