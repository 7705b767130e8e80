"""`sparsevl analyze layers --model DIR --data FILE [FILE...]`: the vision layers an adaptive model picks.

Answers every question with the model's argmax layer choice, reads the selector's counters once per question
type, and prints the selection table overall plus a per-type breakdown with exact-match accuracy; writes
`layer_analysis.json` and a bar chart `layer_selection.png` to `--out`.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from sparsevl.data.dataset import read_records
from sparsevl.eval.cli import add_generation_flags
from sparsevl.eval.generate import generate_answers, gold_answer
from sparsevl.eval.metrics import normalize_answer
from sparsevl.model.adaptive import format_layer_stats


def analyze_layers(model, tokenizer, image_processor, data_paths: list[str | Path], *, batch_size: int = 64,
                   max_new_tokens: int = 16, limit: int | None = None) -> dict:
    """{"overall": {...}, "by_type": {type: {...}}}, each {"count", "accuracy", "layers": {layer: count}}."""
    selector = model.layer_selector
    if selector is None:
        raise ValueError("--model was not trained with --use_adaptive_layer_selection: it has no layer classifier")
    groups: dict[str, dict] = defaultdict(lambda: {"hits": 0, "count": 0, "layers": defaultdict(int)})
    for data_path in map(Path, data_paths):
        by_type = defaultdict(list)
        for record in read_records(data_path)[:limit]:
            by_type[record.get("question_type", "unknown")].append(record)
        for question_type, records in by_type.items():
            selector.reset_counts()
            predictions = generate_answers(model, tokenizer, image_processor, records, image_folder=data_path.parent,
                                           batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False)
            hits = sum(normalize_answer(p) == normalize_answer(gold_answer(r) or "") for p, r in zip(predictions, records))
            for name in (question_type, "overall"):
                groups[name]["hits"] += hits
                groups[name]["count"] += len(records)
                for layer, count in selector.counts().items():
                    groups[name]["layers"][layer] += count
    summary = {name: {"count": g["count"], "accuracy": g["hits"] / max(g["count"], 1), "layers": dict(g["layers"])}
               for name, g in groups.items()}
    return {"overall": summary.pop("overall"), "by_type": summary}


def format_breakdown(analysis: dict) -> str:
    """The overall selection table, then one line per question type: count, accuracy, each layer's share."""
    overall = analysis["overall"]
    layers = list(overall["layers"])
    lines = [format_layer_stats(overall["layers"]), "", "=== Layer selection by question type ===",
             f"{'type':<10} {'n':>5} {'acc':>6}  " + "  ".join(f"{name:>12}" for name in layers)]
    for name, group in [*analysis["by_type"].items(), ("overall", overall)]:
        total = max(sum(group["layers"].values()), 1)
        shares = "  ".join(f"{100 * group['layers'][layer] / total:11.1f}%" for layer in layers)
        lines.append(f"{name:<10} {group['count']:>5} {group['accuracy']:6.3f}  {shares}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevl analyze layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="sparsevl checkpoint trained with --use_adaptive_layer_selection")
    p.add_argument("--data", nargs="+", required=True, help="LLaVA-format question file(s), e.g. test_qa.json")
    p.add_argument("--out", default=None, help="output folder (default: MODEL/layer_analysis)")
    return add_generation_flags(p)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from sparsevl.eval.run import load_for_inference
    from sparsevl.viz.layer_stats import plot_layer_selection

    out = Path(args.out or Path(args.model) / "layer_analysis")
    try:
        model, tokenizer, image_processor = load_for_inference(args.model)
        analysis = analyze_layers(model, tokenizer, image_processor, args.data, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens, limit=args.limit)
    except (ValueError, FileNotFoundError) as error:
        print(f"sparsevl analyze layers: error: {error}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_analysis.json").write_text(json.dumps(analysis, indent=2))
    groups = {"all": analysis["overall"]["layers"], **{t: g["layers"] for t, g in analysis["by_type"].items()}}
    figure = plot_layer_selection(groups, out / "layer_selection.png", title="Vision layer chosen, by question type")
    print(format_breakdown(analysis))
    print(f"analysis: {out / 'layer_analysis.json'}\nfigure: {figure}")
    return 0
