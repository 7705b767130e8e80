"""`sparsevl export --to llava-hf|sparsevl --model DIR --out DIR`: move dense models between formats.

--to llava-hf: a sparsevl checkpoint -> transformers' `LlavaForConditionalGeneration` layout (config.json,
model.safetensors, a `LlavaProcessor` with our tokenizer and image processor), then reloaded with plain
transformers and checked against our logits on a probe input.
--to sparsevl: a llava-hf directory -> a sparsevl checkpoint (e.g. to fine-tune or prune it here); with
`--from llava` / `--from moe-llava`, a directory of the original LLaVA / MoE-LLaVA code base
(sparsevl.model.llava_original).
--to qwen3-moe: the LLM of an upcycled (--stage moe) Qwen3 checkpoint -> transformers' `Qwen3MoeForCausalLM`
(config.json, model.safetensors, tokenizer), reloaded with plain transformers and checked against our logits.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = ("llava-hf", "sparsevl", "qwen3-moe")
DEFAULT_MAX_NEW_TOKENS = 16  # `sparsevl eval --max_new_tokens`'s default, so that both answer alike
SOURCES = ("llava-hf", "llava", "moe-llava")  # --to sparsevl --from


def export_llava_hf(model_dir: str | Path, out_dir: str | Path, *, verify: bool = True, atol: float = 1e-5,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Path:
    """Write `model_dir` (a sparsevl checkpoint) as a llava-hf package in the hub layout that vLLM, SGLang and
    transformers 4 and 5 read: config.json (with `architectures` and the special token ids), model.safetensors,
    generation_config.json and a `LlavaProcessor` with the chat template. With `verify`, reload and compare logits."""
    from sparsevl.eval.run import load_for_inference
    from sparsevl.model.llava_hf import llava_hf_config, llava_hf_processor, to_llava_hf_state_dict

    model, tokenizer, image_processor = load_for_inference(model_dir)
    config = llava_hf_config(model)  # refuses projectors Llava cannot express before anything is written
    state = to_llava_hf_state_dict(model, layout="hub")
    if config.tie_word_embeddings:
        state.pop("language_model.lm_head.weight", None)  # transformers re-ties it to the input embeddings on load
    config.architectures = ["LlavaForConditionalGeneration"]
    config.text_config.update(special_token_ids(tokenizer))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.dtype = "float32"
    config.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors", metadata={"format": "pt"})
    generation_config(tokenizer, max_new_tokens).save_pretrained(out_dir)
    llava_hf_processor(model, tokenizer, image_processor).save_pretrained(out_dir)
    if verify:
        check_parity(llava_hf_parity(model, out_dir), atol, out_dir, model_dir,
                     why="; this model has parts the Llava layout does not express")
    return out_dir


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """The tokenizer's bos / eos / pad ids, which an exported config carries so that plain clients stop and pad."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token: exported models would never stop")
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}


def generation_config(tokenizer, max_new_tokens: int):
    """Greedy decoding up to `max_new_tokens`, stopping at eos: what `sparsevl eval` does with its defaults."""
    from transformers import GenerationConfig

    return GenerationConfig(**special_token_ids(tokenizer), max_new_tokens=max_new_tokens, do_sample=False)


def check_parity(difference: float, atol: float, out_dir: Path, model_dir, *, why: str = "") -> None:
    """Refuse an export whose reloaded logits differ from ours by more than atol; else say how close they are."""
    if difference > atol:
        raise ValueError(f"exported model in {out_dir} differs from {model_dir} by {difference:.3g} in logits "
                         f"(tolerance {atol}){why}")
    print(f"verified: plain transformers logits match within {difference:.2g}")


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


def export_qwen3_moe(model_dir: str | Path, out_dir: str | Path, *, verify: bool = True,
                     atol: float = 1e-4, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     second_expert_policy: str | None = None) -> Path:
    """Write the upcycled LLM of `model_dir` as a Qwen3MoeForCausalLM directory; with `verify`, reload it with
    plain transformers and compare logits. Refuses (NotExportable, a ValueError) what Qwen3-MoE cannot express.
    `second_expert_policy="argmax"` first switches a Gumbel-sampled second expert to the deterministic one."""
    from transformers import Qwen3MoeForCausalLM

    from sparsevl.eval.run import load_for_inference
    from sparsevl.model.qwen3_moe import qwen3_moe_config, to_qwen3_moe_state_dict
    from sparsevl.model.upcycle import moe_feed_forwards

    model, tokenizer, _ = load_for_inference(model_dir)
    if second_expert_policy is not None:
        for _, ffn in moe_feed_forwards(model.llm):
            ffn.moe.router.second_expert_policy = second_expert_policy
    config = qwen3_moe_config(model.llm)  # refuses before anything is written
    config.dtype = "float32"
    config.update(special_token_ids(tokenizer))
    hf_model = Qwen3MoeForCausalLM(config)
    hf_model.load_state_dict(to_qwen3_moe_state_dict(model.llm), strict=True)
    out_dir = Path(out_dir)
    hf_model.generation_config = generation_config(tokenizer, max_new_tokens)
    hf_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if verify:
        check_parity(qwen3_moe_parity(model.llm, out_dir), atol, out_dir, model_dir)
    return out_dir


def qwen3_moe_parity(llm, hf_dir: str | Path, *, length: int = 12) -> float:
    """Largest |logit difference| between our LLM and the Qwen3-MoE directory on seeded random token ids."""
    from transformers import Qwen3MoeForCausalLM

    from sparsevl.model.build import _from_pretrained_safetensors

    hf_model = _from_pretrained_safetensors(Qwen3MoeForCausalLM, Path(hf_dir)).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, llm.config.vocab_size, (2, length), generator=generator)
    with torch.no_grad():
        ours, theirs = llm(input_ids=ids).logits, hf_model(input_ids=ids).logits
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
    p.add_argument("--model", required=True, help="source: a sparsevl checkpoint (--to llava-hf, qwen3-moe) or a "
                                                  "llava-hf directory (--to sparsevl)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="llava-hf, qwen3-moe: the longest answer plain clients generate by default, written to "
                        "generation_config.json (default %(default)s, as `sparsevl eval`; raise it for chat)")
    p.add_argument("--from", dest="source", default="llava-hf", choices=SOURCES,
                   help="--to sparsevl: the source layout, transformers' llava-hf (default) or the original LLaVA "
                        "code base's (LlavaLlamaForCausalLM: config with mm_vision_tower, model.mm_projector.* keys) "
                        "or MoE-LLaVA's (MoELLaVALlamaForCausalLM: a moe config, DeepSpeed MoE layers)")
    p.add_argument("--vision_tower", default=None, help="--from llava|moe-llava: local CLIP directory when the "
                                                        "checkpoint's mm_vision_tower / mm_image_tower is a hub name")
    p.add_argument("--verify", type=_bool, default=True, help="llava-hf, qwen3-moe: reload with plain "
                                                              "transformers and compare logits on a probe (default true)")
    p.add_argument("--second_expert_policy", choices=["argmax"], default=None,
                   help="qwen3-moe: export a model trained with a Gumbel-sampled second expert (MoE-LLaVA's "
                        "default) with the deterministic next most probable expert, which Qwen3-MoE uses")
    return p


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.to != "sparsevl" and args.source != "llava-hf" or args.vision_tower and args.source == "llava-hf":
        print("sparsevl export: error: --from applies to --to sparsevl, --vision_tower to --from llava|moe-llava",
              file=sys.stderr)
        return 2
    try:
        if args.second_expert_policy is not None and args.to != "qwen3-moe":
            raise ValueError("--second_expert_policy applies to --to qwen3-moe only")
        if args.to == "llava-hf":
            out = export_llava_hf(args.model, args.out, verify=args.verify, max_new_tokens=args.max_new_tokens)
        elif args.to == "qwen3-moe":
            out = export_qwen3_moe(args.model, args.out, verify=args.verify, max_new_tokens=args.max_new_tokens,
                                   second_expert_policy=args.second_expert_policy)
        elif args.source in ("llava", "moe-llava"):
            from sparsevl.model.llava_original import import_llava_original

            out = import_llava_original(args.model, args.out, source=args.source, vision_tower=args.vision_tower)
        else:
            out = import_llava_hf(args.model, args.out)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"sparsevl export: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"format": args.to, "out": str(out)}))
    return 0
