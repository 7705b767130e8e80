"""Batched answer generation for LLaVA-format question records."""

from pathlib import Path

import torch
from tqdm import tqdm

from sparsevl.data.conversation import HUMAN_ROLES, prompt_ids
from sparsevl.data.dataset import load_image


def question_of(record: dict) -> str:
    """The first human turn of a conversation record, or the `text` of a LLaVA question-file record."""
    if "conversations" in record:
        turn = record["conversations"][0]
        if turn.get("from") not in HUMAN_ROLES:
            raise ValueError(f"record {record.get('id')}: first turn is not a question")
        return turn["value"]
    return record["text"]


def gold_answer(record: dict) -> str | None:
    if "answer" in record:
        return record["answer"]
    turns = record.get("conversations", [])
    return turns[1]["value"] if len(turns) > 1 else None


def prepare_batch(records: list[dict], tokenizer, image_processor, image_folder: Path, template: str) -> dict:
    """Prompts (right padded; the model re-pads left) and their images, in record order."""
    rows, images = [], []
    for record in records:
        question = question_of(record)
        if record.get("image") and "<image>" not in question:
            question = "<image>\n" + question  # LLaVA question files carry the image beside the text
        rows.append(prompt_ids(question, tokenizer, template=template))
        if record.get("image"):
            images.append(load_image(image_folder / record["image"]))
    longest = max(map(len, rows))
    input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"] if images else None
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def generate_answers(model, tokenizer, image_processor, records: list[dict], *, image_folder: str | Path,
                     batch_size: int = 64, max_new_tokens: int = 16, template: str = "chat",
                     progress: bool = True) -> list[str]:
    """Greedy answers for every record, batched."""
    model.eval()
    answers = []
    batches = range(0, len(records), batch_size)
    for start in tqdm(batches, desc="generating", disable=not progress):
        batch = prepare_batch(records[start:start + batch_size], tokenizer, image_processor, Path(image_folder),
                              template)
        tokens = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    return answers
