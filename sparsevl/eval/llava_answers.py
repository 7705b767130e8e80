"""LLaVA-format question files in, LLaVA-format answer files out, for scoring with LLaVA's own scripts.

Question file (JSONL): one `{"question_id", "image", "text", "category"?}` object per line; `image` is
relative to the image folder. Answer file (JSONL, in question order): one
`{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}` object per line, the layout
LLaVA's `model_vqa_loader` writes and its VQAv2 / GQA / TextVQA / MME / POPE converters read.
"""

import hashlib
import json
from pathlib import Path

from tqdm import tqdm

from sparsevl.eval.generate import generate_answers

ANSWER_FIELDS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


def read_question_jsonl(path: str | Path) -> list[dict]:
    """The question records of a JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                hint = " (a JSON list? llava_jsonl wants one object per line)" if line.lstrip()[:1] == "[" else ""
                raise ValueError(f"{path} line {number}: not a JSON object{hint}: {error}") from None
            _check_question(record, path, number)
            records.append(record)
    if not records:
        raise ValueError(f"question file {path} holds no questions")
    return records


def _check_question(record, path: Path, number: int) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{path} line {number}: expected an object, found {type(record).__name__}")
    missing = [key for key in ("question_id", "text") if key not in record]
    if missing:
        raise ValueError(f"{path} line {number}: missing {', '.join(missing)}")
    if not isinstance(record["text"], str) or not isinstance(record.get("image", ""), str):
        raise ValueError(f"{path} line {number}: `text` and `image` must be strings")


def answer_id(model_id: str, question_id, text: str) -> str:
    """A stable 22-character id (LLaVA draws a random one; a hash keeps reruns byte-identical)."""
    return hashlib.sha256(json.dumps([model_id, question_id, text]).encode()).hexdigest()[:22]


def answer_row(record: dict, prediction: str, model_id: str) -> dict:
    return {"question_id": record["question_id"], "prompt": record["text"], "text": prediction,
            "answer_id": answer_id(model_id, record["question_id"], prediction), "model_id": model_id,
            "metadata": {}}


def write_llava_answers(model, tokenizer, image_processor, question_file: str | Path, answers_file: str | Path, *,
                        image_folder: str | Path, model_id: str, batch_size: int = 64, max_new_tokens: int = 16,
                        limit: int | None = None) -> int:
    """Answer every question in order, appending each batch to `answers_file` as it finishes; returns the count."""
    records = read_question_jsonl(question_file)[:limit]
    answers_file = Path(answers_file)
    if answers_file.resolve() == Path(question_file).resolve():
        raise ValueError(f"the answer file would overwrite the question file {question_file}")
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    with open(answers_file, "w", encoding="utf-8") as handle:
        for start in tqdm(range(0, len(records), batch_size), desc=Path(question_file).name):
            batch = records[start:start + batch_size]
            predictions = generate_answers(model, tokenizer, image_processor, batch, image_folder=image_folder,
                                           batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False)
            handle.writelines(json.dumps(answer_row(r, p, model_id)) + "\n" for r, p in zip(batch, predictions))
            handle.flush()
    return len(records)
