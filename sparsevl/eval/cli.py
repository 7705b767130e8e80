"""`sparsevl eval --model DIR [--benchmark shapes|pope|llava_jsonl] --data FILE [FILE ...] --out DIR`.

shapes: our LLaVA JSON test files -> answers.jsonl + metrics.json (exact match per type, POPE metrics).
pope: the same, for POPE files only (every record has `pope_kind`).
llava_jsonl: LLaVA question files (JSONL: question_id, image, text) -> OUT/<file stem>_answers.jsonl in the
layout LLaVA's eval scripts read, to score VQAv2 / GQA / TextVQA / MME / POPE with your own data copies.
"""

import argparse
import sys
from functools import partial
from pathlib import Path


def run_metrics(model, tokenizer, image_processor, args, *, pope_only: bool) -> str:
    from sparsevl.eval.run import evaluate, format_metrics

    metrics = evaluate(model, tokenizer, image_processor, args.data, out_dir=args.out, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, limit=args.limit, image_folder=args.image_folder,
                       pope_only=pope_only)
    return f"{format_metrics(metrics)}\nwrote {args.out}/answers.jsonl and {args.out}/metrics.json"


def run_llava_jsonl(model, tokenizer, image_processor, args) -> str:
    from sparsevl.eval.llava_answers import write_llava_answers

    lines = []
    for question_file in map(Path, args.data):
        answers_file = Path(args.out) / f"{question_file.stem}_answers.jsonl"
        count = write_llava_answers(model, tokenizer, image_processor, question_file, answers_file,
                                    image_folder=args.image_folder or question_file.parent,
                                    model_id=args.model_id or Path(args.model).resolve().name,
                                    batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit)
        lines.append(f"wrote {count} answers to {answers_file}")
    return "\n".join(lines)


# --benchmark name -> runner(model, tokenizer, image_processor, args) -> summary text
BENCHMARKS = {
    "shapes": partial(run_metrics, pope_only=False),
    "pope": partial(run_metrics, pope_only=True),
    "llava_jsonl": run_llava_jsonl,
}

from sparsevl.model.inference_flags import add_inference_flags


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevl eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="sparsevl checkpoint directory")
    p.add_argument("--benchmark", choices=list(BENCHMARKS), default="shapes", help="input format and output kind")
    p.add_argument("--data", nargs="+", required=True, help="question file(s): LLaVA JSON, or JSONL for llava_jsonl")
    p.add_argument("--image_folder", default=None, help="folder image paths are relative to (default: the file's)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model_id", default=None, help="llava_jsonl: `model_id` in answers (default: model folder name)")
    return add_generation_flags(p)


def add_generation_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--batch_size, --max_new_tokens, --limit and the inference flags (pruning, MoE second expert): how questions
    are answered (shared by commands that generate)."""
    p.add_argument("--batch_size", type=int, default=64, help="questions per generation batch")
    p.add_argument("--max_new_tokens", type=int, default=16, help="longest answer in tokens")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each file")
    add_inference_flags(p)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from sparsevl.eval.run import load_for_inference
    from sparsevl.model.inference_flags import apply_inference_flags

    try:
        model, tokenizer, image_processor = load_for_inference(args.model)
        apply_inference_flags(args, model)
        print(BENCHMARKS[args.benchmark](model, tokenizer, image_processor, args))
    except (ValueError, FileNotFoundError) as error:
        print(f"sparsevl eval: error: {error}", file=sys.stderr)
        return 2
    return 0
