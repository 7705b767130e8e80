"""`sparsevl analyze pruning --model DIR --data test_qa.json --out DIR`.

For every pruner and every kept-token count: accuracy on the question file, the theoretical prefill FLOPs
of one sample (mean prompt length), a table (`pruning_table.md`, `pruning_results.json`), the curve
(`pruning_curve.png`) and a picture of the patches each pruner kept for one sample (`kept_patches.png`).
"""

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

PRUNERS = ("sparsevlm", "fastv", "random", "cls_attention")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevl analyze pruning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="sparsevl checkpoint directory")
    p.add_argument("--data", required=True, help="LLaVA-format question file (e.g. test_qa.json)")
    p.add_argument("--out", required=True, help="folder for the table, JSON results and figures")
    p.add_argument("--pruners", default=",".join(PRUNERS), help=f"comma-separated, from: {', '.join(PRUNERS)}")
    p.add_argument("--retained_tokens", default="32,16,7,4", help="visual tokens kept per image, one run each")
    p.add_argument("--pruning_layer", type=int, default=1, help="LLM layer before which in-LLM pruners prune")
    p.add_argument("--num_recycled_tokens", type=int, default=0, help="sparsevlm: recycled tokens per image")
    p.add_argument("--batch_size", type=int, default=64, help="questions per generation batch")
    p.add_argument("--max_new_tokens", type=int, default=8, help="longest answer in tokens")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--sample", type=int, default=0, help="question whose kept patches are drawn")
    return p


def plan_arguments(pruner: str, count: int, layer: int, num_recycled: int) -> SimpleNamespace:
    """The pruning flags of one setting, as `build_pruning_plan` reads them."""
    in_llm = pruner != "cls_attention"
    return SimpleNamespace(token_pruner=pruner, pruning_layers=str(layer) if in_llm else "",
                           retained_tokens=str(count), fastv_k=None, fastv_ratio=None,
                           num_recycled_tokens=num_recycled if pruner == "sparsevlm" else 0)


def kept_patches(model, batch: dict) -> list[int]:
    """Indices of the image patches that reach the last decoder layer for a one-sample batch."""
    import torch

    from sparsevl.model.pruning import cls_attention_patches

    plan = model.pruning
    with torch.no_grad():
        if plan is not None and plan.num_kept_patches is not None:
            hidden_states = model.vision_tower.all_hidden_states(batch["pixel_values"])
            return cls_attention_patches(model.vision_tower, hidden_states, plan.num_kept_patches)[0].tolist()
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], return_hidden_states=True)
    image = out.inputs.image_mask[0]
    kept = out.kept_index[0][out.kept_mask[0]]
    return (kept[image[kept]] - image.nonzero()[0, 0]).tolist()


def run(args) -> list[dict]:
    from sparsevl.data.conversation import prompt_ids
    from sparsevl.data.dataset import load_image, read_records
    from sparsevl.eval.generate import generate_answers, gold_answer, prepare_batch, question_of
    from sparsevl.eval.metrics import exact_match_by_type
    from sparsevl.eval.run import load_for_inference
    from sparsevl.model.pruning import build_pruning_plan, prefill_flops, tokens_per_layer
    from sparsevl.viz.pruning import plot_accuracy_vs_tokens, plot_kept_patches

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, processor = load_for_inference(args.model)
    data = Path(args.data)
    records = read_records(data)[: args.limit]
    visual = model.num_projected_tokens
    config = model.llm.config
    text = sum(len(prompt_ids(question_of(r), tokenizer)) - 1 for r in records) / len(records)
    counts = [int(c) for c in args.retained_tokens.split(",") if c]
    settings = [("none", visual)] + [(p, c) for p in args.pruners.split(",") if p for c in counts]
    full_flops = prefill_flops(config, tokens_per_layer(None, num_layers=config.num_hidden_layers,
                                                        num_text=round(text), num_visual=visual))
    sample = prepare_batch(records[args.sample:args.sample + 1], tokenizer, processor, data.parent, "chat")
    rows, kept_by_name = [], {}
    for pruner, count in settings:
        model.pruning = None if pruner == "none" else build_pruning_plan(
            plan_arguments(pruner, count, args.pruning_layer, args.num_recycled_tokens), model)
        answers = generate_answers(model, tokenizer, processor, records, image_folder=data.parent,
                                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False)
        scored = [{"prediction": a, "answer": gold_answer(r), "question_type": r.get("question_type", "unknown")}
                  for a, r in zip(answers, records)]
        metrics = exact_match_by_type(scored)
        flops = prefill_flops(config, tokens_per_layer(model.pruning, num_layers=config.num_hidden_layers,
                                                       num_text=round(text), num_visual=visual))
        rows.append({"pruner": pruner, "kept_tokens": count, "accuracy": metrics["overall"]["accuracy"],
                     "prefill_gflops": flops / 1e9, "relative_flops": flops / full_flops,
                     "by_type": {k: v["accuracy"] for k, v in metrics.items() if k != "overall"}})
        print(format_row(rows[-1], rows[0]["accuracy"]), flush=True)
        if pruner != "none" and count == min(counts) and not getattr(model.projector, "num_output_tokens", None):
            kept_by_name[pruner] = kept_patches(model, sample)
    model.pruning = None
    (out / "pruning_results.json").write_text(json.dumps({"model": str(args.model), "data": str(data),
                                                          "questions": len(records), "mean_text_tokens": text,
                                                          "pruning_layer": args.pruning_layer, "rows": rows},
                                                         indent=2))
    (out / "pruning_table.md").write_text(markdown_table(rows))
    plot_accuracy_vs_tokens(rows, out / "pruning_curve.png")
    if getattr(model.projector, "num_output_tokens", None):  # visual tokens are learned queries, not patches
        print("no kept-patch picture: this model's projector does not map tokens to patches")
        return rows
    record = records[args.sample]
    grid = int(round(model.vision_tower.num_patches ** 0.5))
    plot_kept_patches(load_image(data.parent / record["image"]), kept_by_name, grid, out / "kept_patches.png",
                      title=question_of(record).replace("<image>", "").strip())
    return rows


def format_row(row: dict, full_accuracy: float) -> str:
    return (f"{row['pruner']:<14} kept {row['kept_tokens']:>4}  accuracy {row['accuracy']:.3f} "
            f"({100 * row['accuracy'] / max(full_accuracy, 1e-9):.1f}% of full)  "
            f"prefill {row['prefill_gflops']:.4f} GFLOPs ({row['relative_flops']:.2f}x)")


def markdown_table(rows: list[dict]) -> str:
    full = rows[0]["accuracy"]
    types = sorted({t for r in rows for t in r["by_type"]})
    lines = ["| pruner | kept tokens | accuracy | % of full | prefill GFLOPs | rel. FLOPs | "
             + " | ".join(types) + " |", "|" + "---|" * (6 + len(types))]
    for r in rows:
        lines.append(f"| {r['pruner']} | {r['kept_tokens']} | {r['accuracy']:.3f} | "
                     f"{100 * r['accuracy'] / max(full, 1e-9):.1f} | {r['prefill_gflops']:.4f} | "
                     f"{r['relative_flops']:.2f} | " + " | ".join(f"{r['by_type'].get(t, 0):.3f}" for t in types)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"sparsevl analyze pruning: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/pruning_table.md, pruning_results.json, pruning_curve.png, kept_patches.png")
    return 0
