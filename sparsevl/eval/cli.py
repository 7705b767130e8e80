"""`sparsevl eval --model DIR --data FILE [FILE ...] --out DIR`."""

import argparse
import sys

from sparsevl.model.pruning import add_pruning_flags


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevl eval", description=__doc__)
    p.add_argument("--model", required=True, help="sparsevl checkpoint directory")
    p.add_argument("--data", nargs="+", required=True, help="LLaVA-format question JSON file(s)")
    p.add_argument("--out", required=True, help="folder for answers.jsonl and metrics.json")
    p.add_argument("--batch_size", type=int, default=64, help="questions per generation batch")
    p.add_argument("--max_new_tokens", type=int, default=16, help="longest answer in tokens")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each file")
    add_pruning_flags(p)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from sparsevl.eval.run import evaluate, format_metrics, load_for_inference
    from sparsevl.model.pruning import build_pruning_plan

    try:
        model, tokenizer, image_processor = load_for_inference(args.model)
        model.pruning = build_pruning_plan(args, model)
        metrics = evaluate(model, tokenizer, image_processor, args.data, out_dir=args.out,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit)
    except (ValueError, FileNotFoundError) as error:
        print(f"sparsevl eval: error: {error}", file=sys.stderr)
        return 2
    print(format_metrics(metrics))
    print(f"wrote {args.out}/answers.jsonl and {args.out}/metrics.json")
    return 0
