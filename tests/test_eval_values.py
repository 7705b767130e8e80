"""`sparsevl eval` checked by its values: metrics equal the scores of the answers it wrote, pruning flags change
the answers exactly as the same plan does in process, and `--model_id` names the model in LLaVA answer files."""

import json

import pytest

from sparsevl.cli import main as sparsevl
from sparsevl.eval.cli import parser as eval_parser
from sparsevl.eval.generate import generate_answers
from sparsevl.eval.metrics import normalize_answer
from sparsevl.eval.run import load_for_inference
from sparsevl.model.pruning import build_pruning_plan

LIMIT = 8
PRUNING = ["--token_pruner", "sparsevlm", "--pruning_layers", "1", "--retained_tokens", "2"]


def run_eval(checkpoint, data, out, *extra) -> tuple[list[str], dict]:
    code = sparsevl(["eval", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--limit",
                     str(LIMIT), "--max_new_tokens", "3", "--batch_size", "4", *extra])
    assert code == 0
    answers = [json.loads(line)["prediction"] for line in (out / "answers.jsonl").read_text().splitlines()]
    return answers, json.loads((out / "metrics.json").read_text())


def test_eval_metrics_score_the_written_answers_and_pruning_changes_them(lively_checkpoint, shapes_dir, tmp_path):
    records = json.loads((shapes_dir / "test_qa.json").read_text())[:LIMIT]
    unpruned, _ = run_eval(lively_checkpoint, shapes_dir / "test_qa.json", tmp_path / "plain")
    # a question file whose gold answers are the unpruned model's own answers: it scores 1.0 there
    for record, answer in zip(records, unpruned):
        record["conversations"][1]["value"] = record["answer"] = answer
    gold = shapes_dir / f"own_answers_{tmp_path.name}.json"
    gold.write_text(json.dumps(records))
    _, metrics = run_eval(lively_checkpoint, gold, tmp_path / "gold")
    assert metrics["qa"]["overall"] == {"accuracy": 1.0, "count": LIMIT}
    pruned, metrics = run_eval(lively_checkpoint, gold, tmp_path / "pruned", *PRUNING)
    same = [normalize_answer(a) == normalize_answer(b) for a, b in zip(pruned, unpruned)]
    assert not all(same), "keeping 2 of 64 visual tokens should change some answers of this model"
    assert metrics["qa"]["overall"] == {"accuracy": pytest.approx(sum(same) / LIMIT), "count": LIMIT}
    for kind in {r["question_type"] for r in records}:
        hits = [s for s, r in zip(same, records) if r["question_type"] == kind]
        assert metrics["qa"][kind] == {"accuracy": pytest.approx(sum(hits) / len(hits)), "count": len(hits)}
    # the same plan built in process gives the same answers: the flags reached the model
    model, tokenizer, image_processor = load_for_inference(lively_checkpoint)
    model.pruning = build_pruning_plan(eval_parser().parse_args(["--model", "m", "--data", "d", "--out", "o",
                                                                 *PRUNING]), model)
    assert generate_answers(model, tokenizer, image_processor, records, image_folder=shapes_dir, batch_size=4,
                            max_new_tokens=3, progress=False) == pruned


def test_model_id_names_the_model_in_llava_answer_files(lively_checkpoint, shapes_dir, tmp_path):
    record = json.loads((shapes_dir / "test_qa.json").read_text())[0]
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 7, "image": record["image"], "text": "what colour?"}) + "\n")
    common = ["eval", "--benchmark", "llava_jsonl", "--model", str(lively_checkpoint), "--data", str(questions),
              "--image_folder", str(shapes_dir), "--max_new_tokens", "2"]
    assert sparsevl(common + ["--out", str(tmp_path / "named"), "--model_id", "llava-v1.5-shapes"]) == 0
    assert sparsevl(common + ["--out", str(tmp_path / "default")]) == 0
    named = json.loads((tmp_path / "named" / "q_answers.jsonl").read_text())
    default = json.loads((tmp_path / "default" / "q_answers.jsonl").read_text())
    assert named["model_id"] == "llava-v1.5-shapes" and default["model_id"] == "lively-model"
    assert named["text"] == default["text"]
