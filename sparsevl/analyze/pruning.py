"""`sparsevl analyze pruning --model DIR --data test_qa.json --out DIR`.

For every pruning setting (pruner x kept tokens x one or three stages x recycling on/off): accuracy on the
question file, the visual tokens it really costs (average per LLM layer, SparseVLM's "equivalent tokens",
recycled tokens included; and how many enter the LLM), theoretical prefill FLOPs of one sample (mean prompt
length), measured prefill time on the first question; a table (`pruning_table.md`, `pruning_results.json`),
the curve (`pruning_curve.png`) and the patches each one-stage pruner kept for one sample (`kept_patches.png`).

Settings at K kept visual tokens per image (`--retained_tokens`), `--pruning_layer L`:
  one stage     every in-LLM pruner runs layers L.. on K tokens (sparsevlm prunes layer L-1's output; fastv has
                K = L; sparsevlm_weighted and random drop before L).
  three stages  SparseVLM's locations scaled to the model (`--sparsevlm_budget`'s rule), counts in the shape of
                its 192 table (300:200:110), scaled so the average visual tokens per layer equal the one-stage
                setting's (same FLOPs).
  cls_attention keeps K patches before the LLM; visionzip keeps [CLS] + dominant + contextual = K tokens in the
                paper's 54:10 ratio.
"""

import argparse
import json
import sys
from pathlib import Path

PRUNERS = ("sparsevlm", "sparsevlm_weighted", "fastv", "random", "cls_attention", "visionzip")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevl analyze pruning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="sparsevl checkpoint directory")
    p.add_argument("--data", required=True, help="LLaVA-format question file (e.g. test_qa.json)")
    p.add_argument("--out", required=True, help="folder for the table, JSON results and figures")
    p.add_argument("--pruners", default=",".join(PRUNERS), help=f"comma-separated, from: {', '.join(PRUNERS)}")
    p.add_argument("--retained_tokens", default="32,16,7,4", help="visual tokens kept per image, one run each")
    p.add_argument("--pruning_layer", type=int, default=1, help="first LLM layer on the kept tokens (one stage)")
    p.add_argument("--stages", default="1", help="comma-separated from 1 (one stage) and 3 (three stages)")
    p.add_argument("--recycling", default="on", help="sparsevlm: comma-separated from on, off")
    p.add_argument("--batch_size", type=int, default=64, help="questions per generation batch")
    p.add_argument("--max_new_tokens", type=int, default=8, help="longest answer in tokens")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--sample", type=int, default=0, help="question whose kept patches are drawn")
    return p


def three_stage_schedule(count: int, *, layer: int, num_layers: int, num_visual: int) -> tuple[list[int], list[int]]:
    """(first layers on kept tokens, counts) of three stages with the one-stage setting's average visual tokens."""
    from sparsevl.model.pruning import sparsevlm_schedule

    first = [ell + 1 for ell in sparsevlm_schedule(192, num_layers=num_layers, num_visual=num_visual)[0]]
    target = (layer * num_visual + (num_layers - layer) * count) / num_layers
    best = None
    for step in range(1, 4000):
        counts = [max(1, min(num_visual - 1, round(step / 1000 * c * num_visual / 576))) for c in (300, 200, 110)]
        if counts[0] > counts[1] > counts[2]:
            spans = [b - a for a, b in zip(first, first[1:] + [num_layers])]
            average = (first[0] * num_visual + sum(c * s for c, s in zip(counts, spans))) / num_layers
            if best is None or abs(average - target) < best[0]:
                best = (abs(average - target), counts)
    if best is None:
        raise ValueError(f"--stages 3: no three decreasing counts fit {num_visual} visual tokens")
    return first, best[1]


def settings(args, model) -> list[tuple[str, str, int, object]]:
    """(setting name, pruner, kept tokens, pruning flags or None) of every run, the unpruned model first."""
    from sparsevl.model.pruning import pruning_arguments as plan_arguments

    config, visual = model.llm.config, model.num_projected_tokens
    runs = [("none", "none", visual, None)]
    for count in (int(c) for c in args.retained_tokens.split(",") if c):
        for pruner in (p for p in args.pruners.split(",") if p):
            if pruner == "cls_attention":
                runs.append((pruner, pruner, count, plan_arguments(pruner, retained_tokens=str(count))))
                continue
            if pruner == "visionzip":
                contextual = max(1, round(count * 10 / 64))
                runs.append((pruner, pruner, count, plan_arguments(pruner, dominant=count - 1 - contextual,
                                                                   contextual=contextual)))
                continue
            for stages in (int(s) for s in args.stages.split(",") if s):
                layers, counts = [args.pruning_layer], [count]
                if stages == 3:
                    layers, counts = three_stage_schedule(count, layer=args.pruning_layer, num_visual=visual,
                                                          num_layers=config.num_hidden_layers)
                elif stages != 1:
                    raise ValueError(f"--stages {args.stages}: use 1 and/or 3")
                named = [layer - 1 for layer in layers] if pruner == "sparsevlm" else layers
                flags = dict(pruning_layers=",".join(map(str, named)), retained_tokens=",".join(map(str, counts)))
                for recycling in (args.recycling.split(",") if pruner == "sparsevlm" else [""]):
                    name = f"{pruner} {stages}-stage" + (f" recycling {recycling}" if recycling else "")
                    runs.append((name, pruner, count, plan_arguments(pruner, sparsevlm_recycling=recycling, **flags)))
    return runs


def kept_patches(model, batch: dict) -> list[int]:
    """Indices of the image patches that reach the last decoder layer for a one-sample batch."""
    import torch

    from sparsevl.model.vision_pruning import cls_attention_patches, visionzip_features

    plan = model.pruning
    with torch.no_grad():
        if plan is not None and plan.before_llm:
            hidden_states = model.vision_tower.all_hidden_states(batch["pixel_values"])
            if plan.pruner == "visionzip":
                return visionzip_features(model.vision_tower, hidden_states, plan)[1][0].tolist()
            return cls_attention_patches(model.vision_tower, hidden_states, plan.num_kept_patches)[0].tolist()
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], return_hidden_states=True)
    image = out.inputs.image_mask[0]
    kept = out.kept_index[0][out.kept_mask[0]]
    return (kept[image[kept]] - image.nonzero()[0, 0]).tolist()


def run(args) -> list[dict]:
    from sparsevl.data.dataset import load_image, read_records
    from sparsevl.eval.cost import mean_prompt_text_tokens, pruning_cost
    from sparsevl.eval.generate import generate_answers, gold_answer, prepare_batch, question_of
    from sparsevl.eval.metrics import exact_match_by_type
    from sparsevl.eval.run import load_for_inference
    from sparsevl.model.pruning import build_pruning_plan
    from sparsevl.viz.pruning import plot_accuracy_vs_tokens, plot_kept_patches

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, processor = load_for_inference(args.model)
    data = Path(args.data)
    records = read_records(data)[: args.limit]
    text = mean_prompt_text_tokens(records, tokenizer)
    sample = prepare_batch(records[args.sample:args.sample + 1], tokenizer, processor, data.parent, "chat")
    rows, kept_by_name, runs = [], {}, settings(args, model)
    smallest = min((run[2] for run in runs[1:]), default=None)
    for name, pruner, count, flags in runs:
        model.pruning = None if flags is None else build_pruning_plan(flags, model)
        answers = generate_answers(model, tokenizer, processor, records, image_folder=data.parent,
                                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False)
        scored = [{"prediction": a, "answer": gold_answer(r), "question_type": r.get("question_type", "unknown")}
                  for a, r in zip(answers, records)]
        metrics = exact_match_by_type(scored)
        cost = pruning_cost(model, num_text=text, batch=sample) if flags is not None else None
        rows.append({"setting": name, "pruner": pruner, "kept_tokens": count,
                     "accuracy": metrics["overall"]["accuracy"], **(cost or _full_cost(model, text, sample)),
                     "flags": {} if flags is None else {k: v for k, v in vars(flags).items() if v not in ("", None, 0)},
                     "by_type": {k: v["accuracy"] for k, v in metrics.items() if k != "overall"}})
        print(format_row(rows[-1], rows[0]["accuracy"]), flush=True)
        one_stage = " 3-stage" not in name and "recycling off" not in name
        if flags is not None and count == smallest and one_stage and not getattr(model.projector, "num_output_tokens",
                                                                                 None):
            kept_by_name[name] = kept_patches(model, sample)
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


def _full_cost(model, text: float, sample: dict) -> dict:
    from sparsevl.eval.cost import measure_prefill_seconds, pruning_cost

    cost = pruning_cost(model, num_text=text)
    cost["prefill_ms"] = cost["full_prefill_ms"] = 1e3 * measure_prefill_seconds(model, sample)
    cost["measured_speedup"] = 1.0
    return cost


def format_row(row: dict, full_accuracy: float) -> str:
    return (f"{row['setting']:<34} kept {row['kept_tokens']:>4}  accuracy {row['accuracy']:.3f} "
            f"({100 * row['accuracy'] / max(full_accuracy, 1e-9):.1f}% of full)  "
            f"avg visual/layer {row['avg_visual_tokens_per_layer']:.1f}, into LLM {row['visual_tokens_into_llm']}  "
            f"prefill {row['prefill_gflops']:.4f} GFLOPs ({row['relative_flops']:.2f}x), "
            f"{row['prefill_ms']:.1f} ms ({row['measured_speedup']:.2f}x faster)")


def markdown_table(rows: list[dict]) -> str:
    full = rows[0]["accuracy"]
    types = sorted({t for r in rows for t in r["by_type"]})
    lines = ["| setting | kept tokens | avg visual tokens/layer | visual into LLM | accuracy | % of full | "
             "prefill GFLOPs | rel. FLOPs | prefill ms | measured speed-up | " + " | ".join(types) + " |",
             "|" + "---|" * (10 + len(types))]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['kept_tokens']} | {r['avg_visual_tokens_per_layer']:.1f} | "
                     f"{r['visual_tokens_into_llm']} | {r['accuracy']:.3f} | "
                     f"{100 * r['accuracy'] / max(full, 1e-9):.1f} | {r['prefill_gflops']:.4f} | "
                     f"{r['relative_flops']:.2f} | {r['prefill_ms']:.1f} | {r['measured_speedup']:.2f} | "
                     + " | ".join(f"{r['by_type'].get(t, 0):.3f}" for t in types) + " |")
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
