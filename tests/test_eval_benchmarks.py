"""`sparsevl eval --benchmark`: LLaVA answer files for LLaVA question files; shapes/pope keep their metrics."""

import json

import pytest
from tiny import save_tiny_checkpoint

from sparsevl.cli import main as cli_main
from sparsevl.eval.generate import generate_answers
from sparsevl.eval.llava_answers import ANSWER_FIELDS, read_question_jsonl
from sparsevl.eval.run import load_for_inference


@pytest.fixture(scope="module")
def checkpoint(shapes_tokenizer, tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-model", shapes_tokenizer)


def llava_questions(shapes_dir, count: int) -> list[dict]:
    """Our QA test split rewritten as a LLaVA question file (no `<image>` in the text, as in LLaVA's files)."""
    records = json.loads((shapes_dir / "test_qa.json").read_text())[:count]
    return [{"question_id": 1000 + i, "image": r["image"], "category": r["question_type"],
             "text": r["conversations"][0]["value"].replace("<image>\n", "")} for i, r in enumerate(records)]


def test_llava_jsonl_writes_llava_answer_files_in_question_order(shapes_dir, checkpoint, tmp_path):
    questions = llava_questions(shapes_dir, 6)
    question_file = tmp_path / "questions" / "llava_shapes_val.jsonl"
    question_file.parent.mkdir()
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    code = cli_main(["eval", "--benchmark", "llava_jsonl", "--model", str(checkpoint), "--data", str(question_file),
                     "--image_folder", str(shapes_dir), "--out", str(tmp_path / "out"), "--batch_size", "4",
                     "--max_new_tokens", "3"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "llava_shapes_val_answers.jsonl").read_text().splitlines()]
    assert [tuple(row) for row in rows] == [ANSWER_FIELDS] * len(questions)
    assert [row["question_id"] for row in rows] == [q["question_id"] for q in questions]
    assert [row["prompt"] for row in rows] == [q["text"] for q in questions]
    assert {row["model_id"] for row in rows} == {"tiny-model"} and all(row["metadata"] == {} for row in rows)
    assert len({row["answer_id"] for row in rows}) == len(rows)
    model, tokenizer, image_processor = load_for_inference(checkpoint)
    one_by_one = generate_answers(model, tokenizer, image_processor, questions, image_folder=shapes_dir,
                                  batch_size=1, max_new_tokens=3, progress=False)
    assert [row["text"] for row in rows] == one_by_one
    assert all(isinstance(text, str) and text for text in one_by_one)


def test_question_file_errors_name_the_file_and_line(tmp_path, checkpoint, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "image": "a.png", "text": "hi"}\n{"question_id": 2, "image": "a.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: missing text"):
        read_question_jsonl(bad)
    listed = tmp_path / "list.jsonl"
    listed.write_text('[{"question_id": 1, "text": "hi"},\n{"question_id": 2, "text": "ho"}]\n')
    with pytest.raises(ValueError, match="a JSON list"):
        read_question_jsonl(listed)
    missing_image = tmp_path / "q.jsonl"
    missing_image.write_text('{"question_id": 7, "image": "nowhere.png", "text": "What?"}\n')
    assert cli_main(["eval", "--benchmark", "llava_jsonl", "--model", str(checkpoint), "--data", str(missing_image),
                     "--out", str(tmp_path)]) == 2
    assert "nowhere.png does not exist" in capsys.readouterr().err


def test_pope_benchmark_scores_pope_files_and_refuses_others(shapes_dir, checkpoint, tmp_path, capsys):
    assert cli_main(["eval", "--benchmark", "pope", "--model", str(checkpoint), "--data",
                     str(shapes_dir / "test_pope.json"), "--out", str(tmp_path / "pope"), "--limit", "8",
                     "--max_new_tokens", "2"]) == 0
    metrics = json.loads((tmp_path / "pope" / "metrics.json").read_text())
    assert set(metrics) == {"pope"} and metrics["pope"]["overall"]["count"] == 8
    assert cli_main(["eval", "--benchmark", "pope", "--model", str(checkpoint), "--data",
                     str(shapes_dir / "test_qa.json"), "--out", str(tmp_path / "qa")]) == 2
    assert "not a POPE question" in capsys.readouterr().err
