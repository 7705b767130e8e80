"""LLaVA JSON data set and collator: padding, images, caching (bad inputs: tests/test_bad_inputs.py)."""

import json

import torch
from PIL import Image

from sparsevl.data.conversation import IGNORE_INDEX
from sparsevl.data.dataset import LlavaJsonDataset, PaddingCollator
from sparsevl.model.build import build_image_processor
from sparsevl.model.presets import vision_preset_config

PROCESSOR = build_image_processor("tiny-clip", vision_preset_config("tiny-clip"))


def write_data(folder, records):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "ok.png")
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def record(rid, image="ok.png", question="<image>\nWhat colour?", answer="red"):
    rec = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image:
        rec["image"] = image
    return rec


def dataset(path, tokenizer, **kwargs):
    return LlavaJsonDataset(path, tokenizer=tokenizer, image_processor=PROCESSOR, num_image_tokens=64, **kwargs)


def test_collator_pads_to_the_longest_and_stacks_images(shapes_dir, shapes_tokenizer):
    data = dataset(shapes_dir / "finetune.json", shapes_tokenizer)
    batch = PaddingCollator(shapes_tokenizer.pad_token_id)([data[0], data[1], data[2]])
    lengths = [len(data[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == shapes_tokenizer.pad_token_id).all()
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["sample_index"].tolist() == [0, 1, 2]


def test_text_only_records_need_no_image(tmp_path, shapes_tokenizer):
    path = write_data(tmp_path, [record("t", image=None, question="How many?")])
    batch = PaddingCollator(0)([dataset(path, shapes_tokenizer)[0]])
    assert batch["pixel_values"] is None


def test_images_are_decoded_each_time_unless_a_cache_is_asked_for(shapes_dir, shapes_tokenizer):
    data = dataset(shapes_dir / "finetune.json", shapes_tokenizer)
    first = data[0]["pixel_values"][0]
    assert data[0]["pixel_values"][0] is not first and torch.equal(data[0]["pixel_values"][0], first)
    cached = dataset(shapes_dir / "finetune.json", shapes_tokenizer, image_cache_mb=1)
    first = cached[0]["pixel_values"][0]
    assert cached[0]["pixel_values"][0] is first
    assert torch.isfinite(first).all()