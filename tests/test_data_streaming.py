"""Data that streams: per-item tokenization, a bounded image cache, LLaVA's pad and modality-grouped batches."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_dataset import PROCESSOR, dataset, record, write_data
from tiny import train_flags

import sparsevl.data.dataset as dataset_module
from sparsevl.cli import main as cli_main
from sparsevl.data.dataset import ImageCache, LlavaJsonDataset, with_aspect_ratio
from sparsevl.data.sampler import length_grouped_indices, modality_grouped_indices


def test_records_are_tokenized_when_read_not_up_front(tmp_path, shapes_tokenizer, monkeypatch):
    calls = []
    tokenize = dataset_module.tokenize_conversation
    monkeypatch.setattr(dataset_module, "tokenize_conversation", lambda *a, **k: calls.append(1) or tokenize(*a, **k))
    data = dataset(write_data(tmp_path, [record(f"r{i}") for i in range(5)]), shapes_tokenizer)
    assert calls == [] and len(data) == 5
    item = data[3]
    assert len(calls) == 1 and data.record_id(3) == "r3"
    expected = tokenize(record("r3")["conversations"], shapes_tokenizer, template="chat", max_length=512,
                        num_image_tokens=64, num_images=1)
    assert (item["input_ids"], item["labels"]) == (expected.input_ids, expected.labels)


def test_image_cache_keeps_the_most_recent_within_its_budget():
    image = torch.zeros(3, 64, 64)  # 48 KiB
    cache = ImageCache(max_mb=0.1)  # room for two
    for name in "abc":
        cache.put(name, image.clone())
    assert cache.get("a") is None and cache.get("b") is not None and cache.bytes == 2 * image.numel() * 4
    cache.put("d", image.clone())  # b was used last: c goes
    assert cache.get("c") is None and cache.get("b") is not None and cache.get("d") is not None
    off = ImageCache(max_mb=0)
    off.put("a", image)
    assert off.get("a") is None and off.bytes == 0
    with pytest.raises(ValueError, match="--image_cache_mb must be >= 0"):
        ImageCache(-1)


def test_pad_expands_to_a_square_of_the_processor_mean_colour(tmp_path, shapes_tokenizer):
    Image.new("RGB", (64, 32), (200, 30, 30)).save(tmp_path / "wide.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record("wide", image="wide.png")]))
    pad = with_aspect_ratio(copy.deepcopy(PROCESSOR), "pad")
    padded = LlavaJsonDataset(path, tokenizer=shapes_tokenizer, image_processor=pad,
                              num_image_tokens=64)[0]["pixel_values"][0]
    # by hand (LLaVA's expand2square): 16 rows of int(255 x mean), 32 rows of red, 16 rows of int(255 x mean)
    mean, std = np.array(PROCESSOR.image_mean), np.array(PROCESSOR.image_std)
    square = np.empty((64, 64, 3))
    square[:] = np.floor(mean * 255)
    square[16:48] = (200, 30, 30)
    expected = torch.tensor(((square / 255 - mean) / std).transpose(2, 0, 1), dtype=torch.float32)
    torch.testing.assert_close(padded, expected, atol=1e-4, rtol=0)
    cropped = dataset(path, shapes_tokenizer)[0]["pixel_values"][0]  # square: resize + centre crop, all red
    assert cropped[:, :16].abs().min() > 0.3
    assert with_aspect_ratio(pad, "square").do_pad is False  # square switches a padding processor off
    with pytest.raises(ValueError, match="--image_aspect_ratio 'anyres' is unknown"):
        with_aspect_ratio(PROCESSOR, "anyres")


def _batches(order, batch_size):
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def test_modality_grouped_batches_hold_one_modality_sorted_by_length():
    generator = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(1, 50, (103,), generator=generator)]
    lengths = [n if i % 3 else -n for i, n in enumerate(lengths)]  # every third record is text-only
    order = modality_grouped_indices(lengths, batch_size=4, world_size=2, generator=torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(103))
    megabatches = _batches(order, 8)
    for megabatch in megabatches[:-1]:
        signs = {length > 0 for length in (lengths[i] for i in megabatch)}
        assert len(signs) == 1  # images only or text only
        totals = [sum(abs(lengths[i]) for i in chunk) for chunk in _batches(megabatch, 4)]
        longest = max(abs(lengths[i]) for i in megabatch)
        assert longest in [abs(lengths[i]) for i in megabatch[:1] + megabatch[4:5]]  # sorted, spread evenly
        assert abs(totals[0] - totals[1]) <= longest
    assert megabatches[-1] == sorted(megabatches[-1])  # the remainders of both modalities, together
    again = modality_grouped_indices(lengths, batch_size=4, world_size=2, generator=torch.Generator().manual_seed(1))
    assert again == order


def test_length_grouping_sorts_each_megabatch_longest_first():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    order = length_grouped_indices(lengths, batch_size=4, world_size=1, generator=torch.Generator().manual_seed(0))
    for batch in _batches(order, 4):
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    with pytest.raises(ValueError, match="length 0"):
        modality_grouped_indices([3, 0, -2], 2, 1, None)


def test_trainer_batches_follow_modality_groups(shapes_dir, shapes_tokenizer, tmp_path):
    from sparsevl.config import parse_train_args
    from sparsevl.train.run import build_trainer

    records = json.loads((shapes_dir / "finetune.json").read_text())[:24]
    for rec in records[::2]:  # half of them text-only
        del rec["image"]
        rec["conversations"][0]["value"] = rec["conversations"][0]["value"].replace("<image>", "").strip()
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    args = parse_train_args(train_flags(shapes_dir, shapes_tokenizer, tmp_path / "run", data_path=data,
                                        image_folder=shapes_dir, per_device_train_batch_size=4,
                                        group_by_modality_length="True", dataloader_num_workers=2, max_steps=2))
    trainer, _ = build_trainer(*args)
    kinds = [batch["pixel_values"] is None or len(batch["pixel_values"]) == 4
             for batch in trainer.get_train_dataloader()]
    # 12 + 12 records in batches of 4: LLaVA keeps each modality's last megabatch for the one mixed end (8 records)
    assert kinds == [True] * 4 + [False] * 2


@pytest.mark.slow
def test_training_streams_with_workers_pad_cache_and_grouping(shapes_dir, shapes_tokenizer, tmp_path):
    out = tmp_path / "run"
    flags = train_flags(shapes_dir, shapes_tokenizer, out, max_steps=3, per_device_train_batch_size=4,
                        dataloader_num_workers=2, image_aspect_ratio="pad", image_cache_mb=4,
                        group_by_modality_length="True", lazy_preprocess="True")
    assert cli_main(["train", *flags]) == 0
    data_args = json.loads((out / "train_config.json").read_text())["DataArguments"]
    assert (data_args["image_aspect_ratio"], data_args["image_cache_mb"]) == ("pad", 4)
    from sparsevl.eval.run import load_for_inference

    _, _, processor = load_for_inference(out)  # evaluation and serving pad as training did
    wide = Image.new("RGB", (64, 32), (200, 30, 30))
    expected = with_aspect_ratio(copy.deepcopy(PROCESSOR), "pad")(images=wide, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processor(images=wide, return_tensors="pt")["pixel_values"], expected)
