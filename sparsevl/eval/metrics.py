"""Scores for generated answers: exact match per question type; POPE yes/no metrics per negative kind."""

from collections import defaultdict


def normalize_answer(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def yes_or_no(text: str) -> str:
    """POPE's reading of a free-form answer (its eval_pope.py): 'no' when a space-separated word of the first
    sentence, commas removed, is 'No', 'no' or 'not'; anything else is 'yes'."""
    words = text.strip().split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def exact_match_by_type(rows: list[dict]) -> dict[str, dict]:
    """rows: {question_type, prediction, answer} -> {type: {accuracy, count}} plus 'overall'."""
    groups = defaultdict(list)
    for row in rows:
        correct = normalize_answer(row["prediction"]) == normalize_answer(row["answer"])
        groups[row.get("question_type", "unknown")].append(correct)
        groups["overall"].append(correct)
    return {name: {"accuracy": sum(hits) / len(hits), "count": len(hits)} for name, hits in groups.items()}


def binary_metrics(predictions: list[str], answers: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = yes) and the share of yes predictions."""
    pred = [yes_or_no(p) == "yes" for p in predictions]
    gold = [normalize_answer(a) == "yes" for a in answers]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / max(len(pred), 1), "count": len(gold)}


def pope_metrics(rows: list[dict]) -> dict[str, dict]:
    """rows: {pope_kind, prediction, answer} -> metrics per kind plus 'overall'."""
    groups = defaultdict(list)
    for row in rows:
        groups[row.get("pope_kind", "unknown")].append(row)
        groups["overall"].append(row)
    return {kind: binary_metrics([r["prediction"] for r in group], [r["answer"] for r in group])
            for kind, group in groups.items()}
