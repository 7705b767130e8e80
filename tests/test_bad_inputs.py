"""The bad-input battery: each broken input gives its documented error naming the input, or is skipped and named.

Record-level problems raise BadSampleError naming the record (or, with --skip_bad_samples, are skipped and
listed); file-level problems (not JSON, not UTF-8, not a list) raise ValueError naming the file.
"""

import json
import re
import struct
import zlib

import pytest
import torch
from PIL import Image
from test_dataset import dataset, record, write_data
from tiny import train_flags

from sparsevl.cli import main
from sparsevl.data.conversation import IGNORE_INDEX, BadSampleError

MAX_LENGTH = 128  # 64 visual tokens + up to 65 text tokens


def png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (1-bit grey) but holds no pixel rows: tiny on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def write_bad_images(folder) -> None:
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "whole.png")
    (folder / "truncated.png").write_bytes((folder / "whole.png").read_bytes()[:60])
    png_header_only(folder / "bomb.png", 20000, 20000)  # 400 M pixels: PIL's own bomb error
    png_header_only(folder / "huge.png", 12000, 12000)  # 144 M pixels: PIL only warns; our limit refuses it


def turns(*pairs) -> list[dict]:
    return [{"from": role, "value": value} for role, value in pairs]


# name -> (a bad record with id `name`, what its error message must contain)
BAD_RECORDS = {
    "not-an-object": (["id", "not-an-object"], "is a list, not an object"),
    "no-conversations": ({"id": "no-conversations", "image": "ok.png"}, "has no `conversations`"),
    "empty-conversations": ({"id": "empty-conversations", "conversations": []}, "must be a non-empty list"),
    "empty-answer": (record("empty-answer", answer="  "), "empty assistant answer"),
    "missing-image": (record("missing-image", image="nope.png"), "nope.png does not exist"),
    "truncated-png": (record("truncated-png", image="truncated.png"), "truncated.png cannot be read"),
    "bomb-20000x20000": (record("bomb-20000x20000", image="bomb.png"), "bomb.png is too large"),
    "huge-12000x12000": (record("huge-12000x12000", image="huge.png"), "12000x12000 pixels is more than"),
    "image-not-a-path": (record("image-not-a-path", image=7), "`image` must be a path"),
    "too-few-placeholders": (record("too-few-placeholders", question="What colour?"),
                             "0 <image> placeholders but the record has 1"),
    "too-many-placeholders": (record("too-many-placeholders", question="<image><image>\nWhat colour?"),
                              "2 <image> placeholders but the record has 1"),
    "unknown-role": ({"id": "unknown-role", "image": "ok.png",
                      "conversations": turns(("human", "<image>\nq"), ("bot", "a"))}, "unknown role 'bot'"),
    "turns-out-of-order": ({"id": "turns-out-of-order", "image": "ok.png",
                            "conversations": turns(("human", "<image>\nq"), ("human", "a"))}, "turns must alternate"),
    "value-not-text": ({"id": "value-not-text", "conversations": turns(("human", "q"), ("gpt", 3))},
                       "value must be a string"),
    "lone-surrogate": (record("lone-surrogate", answer="r\ud800d"), "not valid Unicode text"),
    "answer-beyond-max-length": (record("answer-beyond-max-length", question="<image>\n" + "blue " * 200),
                                 f"no assistant tokens remain within --model_max_length {MAX_LENGTH}"),
    "image-beyond-max-length": (record("image-beyond-max-length", question="blue " * 200 + "<image>"),
                                f"<image> lies beyond --model_max_length {MAX_LENGTH}"),
}


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_each_bad_record_is_an_error_naming_the_record_and_the_problem(tmp_path, shapes_tokenizer, name):
    write_bad_images(tmp_path)
    bad, message = BAD_RECORDS[name]
    path = write_data(tmp_path, [record("good"), bad])
    record_name = rf"(#1 \(id '{name}'\)|#1|{name})"  # images are checked when first loaded, by record id
    with pytest.raises(BadSampleError, match=rf"record {record_name}: .*{re.escape(message)}"):
        data = dataset(path, shapes_tokenizer, max_length=MAX_LENGTH)
        [data[i] for i in range(len(data))]


def test_skip_bad_samples_skips_and_names_every_bad_record(tmp_path, shapes_tokenizer):
    write_bad_images(tmp_path)
    bad = BAD_RECORDS
    records = [record("good-1"), *[rec for rec, _ in bad.values()], record("good-2")]
    data = dataset(write_data(tmp_path, records), shapes_tokenizer, max_length=MAX_LENGTH, skip_bad_samples=True)
    assert [data.record_id(i) for i in range(len(data))] == ["good-1", "good-2"]
    assert len(data.skipped) == len(bad) == 17
    for index, ((skipped_name, reason), (name, (rec, message))) in enumerate(zip(data.skipped, bad.items()), 1):
        assert skipped_name == (f"#{index} (id {name!r})" if isinstance(rec, dict) else f"#{index}")
        assert message in reason, (skipped_name, reason)


def test_file_level_problems_name_the_file(tmp_path, shapes_tokenizer):
    cases = {"malformed.json": (b'[{"id": 1,', "is not valid JSON"),
             "latin1.json": ('[{"id": "caf\xe9"}]'.encode("latin-1"), "is not UTF-8 text"),
             "object.json": (b'{"id": 1}', "must hold a JSON list of records, found dict")}
    for file_name, (content, message) in cases.items():
        (tmp_path / file_name).write_bytes(content)
        for skip in (False, True):  # not skippable: without the list there are no records to skip
            with pytest.raises(ValueError, match=rf"{file_name} {message}"):
                dataset(tmp_path / file_name, shapes_tokenizer, skip_bad_samples=skip)
    with pytest.raises(FileNotFoundError, match="nowhere.json does not exist"):
        dataset(tmp_path / "nowhere.json", shapes_tokenizer)
    only_bad = write_data(tmp_path, [record("x", image="nope.png")])
    with pytest.raises(ValueError, match="has no usable records"):
        dataset(only_bad, shapes_tokenizer, skip_bad_samples=True)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK"])
def test_grey_alpha_palette_16bit_and_cmyk_images_become_rgb(tmp_path, shapes_tokenizer, mode):
    rgb = Image.new("RGB", (64, 64), (90, 90, 90))
    suffix = "jpg" if mode == "CMYK" else "png"
    image = {"I;16": Image.new("I;16", (64, 64), 90), "P": rgb.convert("P", palette=Image.Palette.ADAPTIVE)
             }.get(mode) or rgb.convert(mode)
    image.save(tmp_path / f"image.{suffix}")
    rgb.save(tmp_path / "rgb.png")
    data = dataset(write_data(tmp_path, [record("converted", image=f"image.{suffix}"), record("rgb", image="rgb.png")]),
                   shapes_tokenizer)
    converted, reference = data[0]["pixel_values"][0], data[1]["pixel_values"][0]
    assert converted.shape == (3, 64, 64)
    tolerance = 0.05 if mode == "CMYK" else 0  # JPEG is lossy; the rest must convert exactly
    assert torch.allclose(converted, reference, atol=tolerance, rtol=0), (converted - reference).abs().max()


def test_text_longer_than_max_length_is_truncated_keeping_the_image(tmp_path, shapes_tokenizer):
    data = dataset(write_data(tmp_path, [record("long", answer="red " * 200)]), shapes_tokenizer,
                   max_length=MAX_LENGTH)
    sample = data[0]
    assert len(sample["input_ids"]) + 63 == MAX_LENGTH  # the <image> placeholder expands to 64 tokens
    assert shapes_tokenizer.convert_tokens_to_ids("<image>") in sample["input_ids"]
    assert sample["labels"][-1] != IGNORE_INDEX  # the kept part of the answer is still trained on


def test_a_run_over_data_with_ten_percent_bad_records_finishes_and_names_them(shapes_dir, shapes_tokenizer,
                                                                              tmp_path, capsys):
    records = json.loads((shapes_dir / "finetune.json").read_text())[:18]
    records.insert(3, {**records[0], "id": "bad-missing-image", "image": "no/such.png"})
    records.insert(11, {**records[0], "id": "bad-role", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "robot", "value": "a"}]})
    data_path = tmp_path / "mixed.json"
    data_path.write_text(json.dumps(records))
    flags = train_flags(shapes_dir, shapes_tokenizer, tmp_path / "run", data_path=data_path, image_folder=shapes_dir,
                        max_steps=2, per_device_train_batch_size=4, report_to="none")
    assert main(["train", *flags]) == 2
    assert "record #3 (id 'bad-missing-image')" in capsys.readouterr().err  # without the flag: a clear error
    assert main(["train", *flags, "--skip_bad_samples", "True"]) == 0
    out = capsys.readouterr().out
    expected = [["#3 (id 'bad-missing-image')", f"image {shapes_dir}/no/such.png does not exist"],
                ["#11 (id 'bad-role')", "turn 1 has unknown role 'robot' (expected one of ('human', 'user', 'gpt', "
                                        "'assistant'))"]]
    assert f"skipped 2 bad record(s) of {data_path}:" in out
    assert all(f"  {name}: {reason}" in out for name, reason in expected), out
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["skipped_records"] == expected
