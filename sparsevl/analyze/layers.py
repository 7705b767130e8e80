"""`sparsevl analyze layers --model DIR --data FILE [FILE...]`: the vision layers an adaptive model picks.

Answers every question with the model's argmax layer choice, reads the selector's counters once per question
type, and prints the selection table overall plus a per-type breakdown with exact-match accuracy. Then answers
every question once more per candidate layer, forced for every image: the accuracy of each layer under this
model, and the oracle (some layer right), i.e. how much a better selector could gain. Writes
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
                   max_new_tokens: int = 16, limit: int | None = None, forced_layers: bool = True) -> dict:
    """{"overall": {...}, "by_type": {type: {...}}}, each {"count", "accuracy", "layers": {layer: count}}; with
    `forced_layers` also "forced" ({layer: accuracy when every image uses that layer}) and "oracle" (the share of
    questions at least one layer answers right: what a perfect selector would score with this model)."""
    selector = model.layer_selector
    if selector is None:
        raise ValueError("--model was not trained with --use_adaptive_layer_selection: it has no layer classifier")
    layer_names = selector.layer_names()
    groups: dict[str, dict] = defaultdict(lambda: {"hits": 0, "count": 0, "layers": defaultdict(int),
                                                   "forced": defaultdict(int), "oracle": 0})

    def answered_right(records: list[dict], image_folder: Path) -> list[bool]:
        predictions = generate_answers(model, tokenizer, image_processor, records, image_folder=image_folder,
                                       batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False)
        return [normalize_answer(p) == normalize_answer(gold_answer(r) or "") for p, r in zip(predictions, records)]

    for data_path in map(Path, data_paths):
        by_type = defaultdict(list)
        for record in read_records(data_path)[:limit]:
            by_type[record.get("question_type", "unknown")].append(record)
        for question_type, records in by_type.items():
            selector.reset_counts()
            hits = sum(answered_right(records, data_path.parent))
            chosen_counts = selector.counts()
            forced_hits = {}
            if forced_layers:
                for position, name in enumerate(layer_names):
                    with selector.forced(position):
                        forced_hits[name] = answered_right(records, data_path.parent)
            oracle = sum(map(any, zip(*forced_hits.values()))) if forced_hits else 0
            for group_name in (question_type, "overall"):
                group = groups[group_name]
                group["hits"] += hits
                group["count"] += len(records)
                group["oracle"] += oracle
                for layer, count in chosen_counts.items():
                    group["layers"][layer] += count
                for layer, layer_hits in forced_hits.items():
                    group["forced"][layer] += sum(layer_hits)
    summary = {}
    for name, g in groups.items():
        count = max(g["count"], 1)
        summary[name] = {"count": g["count"], "accuracy": g["hits"] / count, "layers": dict(g["layers"])}
        if forced_layers:
            summary[name]["forced"] = {layer: hits / count for layer, hits in g["forced"].items()}
            summary[name]["oracle"] = g["oracle"] / count
    return {"overall": summary.pop("overall"), "by_type": summary}


def format_breakdown(analysis: dict) -> str:
    """The overall selection table, then one line per question type: count, accuracy, each layer's share; and,
    when the analysis forced each layer, the accuracy with each layer and with a perfect selector (oracle)."""
    overall = analysis["overall"]
    layers = list(overall["layers"])
    rows = [*analysis["by_type"].items(), ("overall", overall)]
    lines = [format_layer_stats(overall["layers"]), "", "=== Layer selection by question type ===",
             f"{'type':<10} {'n':>5} {'acc':>6}  " + "  ".join(f"{name:>12}" for name in layers)]
    for name, group in rows:
        total = max(sum(group["layers"].values()), 1)
        shares = "  ".join(f"{100 * group['layers'][layer] / total:11.1f}%" for layer in layers)
        lines.append(f"{name:<10} {group['count']:>5} {group['accuracy']:6.3f}  {shares}")
    if "forced" in overall:
        lines += ["", "=== Accuracy with every image on one layer (this model) ===",
                  f"{'type':<10} {'chosen':>6}  " + "  ".join(f"{name:>12}" for name in layers) + f"  {'oracle':>8}"]
        for name, group in rows:
            forced = "  ".join(f"{group['forced'][layer]:12.3f}" for layer in layers)
            lines.append(f"{name:<10} {group['accuracy']:6.3f}  {forced}  {group['oracle']:8.3f}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevl analyze layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="sparsevl checkpoint trained with --use_adaptive_layer_selection")
    p.add_argument("--data", nargs="+", required=True, help="LLaVA-format question file(s), e.g. test_qa.json")
    p.add_argument("--out", default=None, help="output folder (default: MODEL/layer_analysis)")
    p.add_argument("--no_forced_layers", action="store_true",
                   help="skip answering every question once per candidate layer (accuracy per layer and oracle)")
    return add_generation_flags(p)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from sparsevl.eval.run import load_for_inference
    from sparsevl.model.inference_flags import apply_inference_flags
    from sparsevl.viz.layer_stats import plot_layer_selection

    out = Path(args.out or Path(args.model) / "layer_analysis")
    try:
        model, tokenizer, image_processor = load_for_inference(args.model)
        apply_inference_flags(args, model)
        analysis = analyze_layers(model, tokenizer, image_processor, args.data, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens, limit=args.limit,
                                  forced_layers=not args.no_forced_layers)
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
