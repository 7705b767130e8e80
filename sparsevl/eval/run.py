"""Evaluate a checkpoint on LLaVA-format question files: answers JSONL + metrics JSON."""

import json
from pathlib import Path

from transformers import AutoImageProcessor

from sparsevl.data.dataset import read_records
from sparsevl.data.tokenizer import load_tokenizer
from sparsevl.eval.generate import generate_answers, gold_answer, question_of
from sparsevl.eval.metrics import exact_match_by_type, pope_metrics
from sparsevl.model.build import load_checkpoint


def load_for_inference(model_dir: str | Path):
    """(model, tokenizer, image_processor) of a sparsevl checkpoint, in eval mode."""
    model, _ = load_checkpoint(model_dir)
    return (model.eval(), load_tokenizer(model_dir),
            AutoImageProcessor.from_pretrained(model_dir, local_files_only=True))


def evaluate(model, tokenizer, image_processor, data_paths: list[str | Path], *, out_dir: str | Path,
             batch_size: int = 64, max_new_tokens: int = 16, limit: int | None = None,
             image_folder: str | Path | None = None, pope_only: bool = False) -> dict:
    """Answer every question of every file, write `answers.jsonl` and `metrics.json`, return the metrics.

    Images are relative to `image_folder` (default: each file's folder); `pope_only` refuses non-POPE records."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, cost = [], None
    for data_path in map(Path, data_paths):
        records = read_records(data_path)[:limit]
        if pope_only:
            _check_pope(records, data_path)
        predictions = generate_answers(model, tokenizer, image_processor, records,
                                       image_folder=image_folder or data_path.parent,
                                       batch_size=batch_size, max_new_tokens=max_new_tokens)
        if model.pruning is not None and cost is None and records:
            cost = _pruning_cost(model, tokenizer, image_processor, records, image_folder or data_path.parent)
        for record, prediction in zip(records, predictions):
            rows.append({"id": record.get("id"), "question": question_of(record), "prediction": prediction,
                         "answer": gold_answer(record), "question_type": record.get("question_type", "unknown"),
                         **({"pope_kind": record["pope_kind"]} if "pope_kind" in record else {})})
    with open(out_dir / "answers.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    scored = [r for r in rows if r["answer"] is not None]
    metrics = {"qa": exact_match_by_type([r for r in scored if "pope_kind" not in r]),
               "pope": pope_metrics([r for r in scored if "pope_kind" in r])}
    metrics = {name: values for name, values in metrics.items() if values}
    if cost is not None:
        metrics["cost"] = cost
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _pruning_cost(model, tokenizer, image_processor, records: list[dict], image_folder) -> dict:
    """The pruning setting's cost on this file's mean prompt, timed on its first question."""
    from sparsevl.eval.cost import mean_prompt_text_tokens, pruning_cost
    from sparsevl.eval.generate import prepare_batch

    batch = prepare_batch(records[:1], tokenizer, image_processor, Path(image_folder), "chat")
    return pruning_cost(model, num_text=mean_prompt_text_tokens(records, tokenizer), batch=batch)


def _check_pope(records: list[dict], data_path: Path) -> None:
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "pope_kind" not in record:
            raise ValueError(f"{data_path} record #{index}: not a POPE question (no `pope_kind`); "
                             "use --benchmark shapes for mixed files")


def format_metrics(metrics: dict) -> str:
    """A short plain-text table of the metrics."""
    lines = []
    for name, values in metrics.get("qa", {}).items():
        lines.append(f"QA  {name:<12} accuracy {values['accuracy']:.3f}  (n={values['count']})")
    for kind, values in metrics.get("pope", {}).items():
        lines.append(f"POPE {kind:<11} acc {values['accuracy']:.3f}  P {values['precision']:.3f}  "
                     f"R {values['recall']:.3f}  F1 {values['f1']:.3f}  yes {values['yes_ratio']:.3f}  "
                     f"(n={values['count']})")
    if "cost" in metrics:
        c = metrics["cost"]
        lines.append(f"cost: {c['avg_visual_tokens_per_layer']:.1f} visual tokens per layer (avg), "
                     f"{c['visual_tokens_into_llm']} into the LLM, prefill {c['prefill_gflops']:.4f} GFLOPs "
                     f"({c['relative_flops']:.2f}x), {c['prefill_ms']:.1f} ms ({c['measured_speedup']:.2f}x faster)")
    return "\n".join(lines)
