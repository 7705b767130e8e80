"""LLaVA JSON data set and collator: padding, image handling, and bad records named or skipped."""

import json

import pytest
import torch
from PIL import Image

from sparsevl.data.conversation import IGNORE_INDEX, BadSampleError
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


def test_grey_rgba_and_cmyk_images_become_rgb(tmp_path, shapes_tokenizer):
    for mode in ("L", "RGBA", "CMYK", "P"):
        Image.new(mode, (64, 64)).save(tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
    records = [record(m, image=f"{m}.{'jpg' if m == 'CMYK' else 'png'}") for m in ("L", "RGBA", "CMYK", "P")]
    data = dataset(write_data(tmp_path, records), shapes_tokenizer)
    assert all(data[i]["pixel_values"][0].shape == (3, 64, 64) for i in range(4))


BAD_RECORDS = {
    "no-conversations": ({"id": "no-conversations", "image": "ok.png"}, "has no `conversations`"),
    "missing-image": (record("missing-image", image="nope.png"), "does not exist"),
    "count-mismatch": (record("count-mismatch", question="What colour?"), "0 <image> placeholders"),
    "bad-role": ({"id": "bad-role", "image": "ok.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "bot", "value": "a"}]}, "unknown role 'bot'"),
}


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_bad_record_error_names_the_record_and_the_problem(tmp_path, shapes_tokenizer, name):
    bad, message = BAD_RECORDS[name]
    path = write_data(tmp_path, [record("good"), bad])
    with pytest.raises(BadSampleError, match=rf"record #1 \(id '{name}'\): .*{message}"):
        dataset(path, shapes_tokenizer)


def test_skip_bad_samples_counts_every_skipped_record(tmp_path, shapes_tokenizer):
    (tmp_path / "broken.png").write_bytes(Image.new("RGB", (8, 8)).tobytes()[:10])
    records = [record("good-1"), *[bad for bad, _ in BAD_RECORDS.values()], record("broken", image="broken.png"),
               record("good-2")]
    data = dataset(write_data(tmp_path, records), shapes_tokenizer, skip_bad_samples=True)
    assert len(data) == 2
    assert [name for name, _ in data.skipped] == [
        "#1 (id 'no-conversations')", "#2 (id 'missing-image')", "#3 (id 'count-mismatch')", "#4 (id 'bad-role')",
        "#5 (id 'broken')"]


def test_malformed_json_names_the_file(tmp_path, shapes_tokenizer):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": 1,')
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        dataset(path, shapes_tokenizer)


def test_unreadable_image_at_load_time_names_the_record(tmp_path, shapes_tokenizer):
    path = write_data(tmp_path, [record("later-broken")])
    data = dataset(path, shapes_tokenizer, cache_images=False)
    (tmp_path / "ok.png").write_bytes(b"not a png")
    with pytest.raises(BadSampleError, match="record later-broken: image .*ok.png cannot be read"):
        data[0]


def test_images_are_cached_as_tensors(shapes_dir, shapes_tokenizer):
    data = dataset(shapes_dir / "finetune.json", shapes_tokenizer)
    first = data[0]["pixel_values"][0]
    assert data[0]["pixel_values"][0] is first
    assert torch.isfinite(first).all()
