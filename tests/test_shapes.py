import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparsevl.data import cli
from sparsevl.data.shapes import (
    COLOURS,
    POPE_KINDS,
    QUESTION_TYPES,
    SHAPES,
    PairStats,
    Scene,
    SceneObject,
    answer_query,
    caption,
    generate_shapes_dataset,
    negative_candidates,
    quadrant,
    question_text,
    render,
)

SMALL = dict(num_train=40, num_test=12, image_size=64, grid=4, min_objects=1, max_objects=6, qa_per_image=4)
OUTPUT_FILES = ("captions.json", "finetune.json", "test_qa.json", "test_pope.json")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(out, **SMALL, seed=0)
    return out


def load(out: Path, name: str):
    return json.loads((out / name).read_text())


def scenes_of(out: Path) -> dict[str, Scene]:
    return {path: Scene.from_dict(scene) for path, scene in load(out, "scenes.json").items()}


def file_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(dataset, tmp_path):
    generate_shapes_dataset(tmp_path / "again", **SMALL, seed=0)
    generate_shapes_dataset(tmp_path / "other", **SMALL, seed=1)
    first = file_bytes(dataset)
    assert len(first) == 40 + 12 + 6
    assert file_bytes(tmp_path / "again") == first
    other = file_bytes(tmp_path / "other")
    assert other.keys() == first.keys()
    assert other["scenes.json"] != first["scenes.json"]
    assert other["images/train/000000.png"] != first["images/train/000000.png"]


def test_train_split_does_not_depend_on_num_test(dataset, tmp_path):
    generate_shapes_dataset(tmp_path, **{**SMALL, "num_test": 3}, seed=0)
    train_scenes = {p: s for p, s in load(dataset, "scenes.json").items() if "train" in p}
    assert {p: s for p, s in load(tmp_path, "scenes.json").items() if "train" in p} == train_scenes
    assert (tmp_path / "finetune.json").read_bytes() == (dataset / "finetune.json").read_bytes()


def test_every_answer_equals_answer_query_on_scenes(dataset):
    scenes = scenes_of(dataset)
    for record in load(dataset, "captions.json"):
        assert record["conversations"][1]["value"] == caption(scenes[record["image"]])
    finetune = load(dataset, "finetune.json")
    assert len(finetune) == SMALL["num_train"] * SMALL["qa_per_image"]
    for record in finetune:
        question, answer = record["conversations"]  # one question per record: no answer leaks into another
        assert question["value"] == "<image>\n" + question_text(record["query"])
        assert answer["value"] == answer_query(scenes[record["image"]], record["query"])
    for name in ("test_qa.json", "test_pope.json"):
        for record in load(dataset, name):
            expected = answer_query(scenes[record["image"]], record["query"])
            assert record["answer"] == record["conversations"][1]["value"] == expected
            assert record["question_type"] == record["query"]["type"]


def test_pixel_at_each_cell_centre_is_its_object_colour(dataset):
    for path, scene in scenes_of(dataset).items():
        pixels = np.asarray(Image.open(dataset / path))
        assert pixels.shape == (64, 64, 3)
        occupied = {(o.row, o.col): COLOURS[o.colour] for o in scene.objects}
        for row in range(4):
            for col in range(4):
                centre = tuple(pixels[row * 16 + 8, col * 16 + 8])
                assert centre == occupied.get((row, col), (0, 0, 0)), (path, row, col)


def test_the_four_shapes_render_as_four_different_masks_inside_the_square():
    masks = {s: np.asarray(render(Scene((SceneObject("red", s, 0, 0),), 2), 32)).any(axis=2) for s in SHAPES}
    assert len({m.tobytes() for m in masks.values()}) == 4
    assert masks["square"].sum() == 12 * 12 and masks["square"][2:14, 2:14].all()  # 16 px cell, 2 px margin
    assert all((m <= masks["square"]).all() for m in masks.values())


def test_pope_is_balanced_and_negatives_are_absent(dataset):
    scenes = scenes_of(dataset)
    train_scenes = [s for p, s in scenes.items() if "train" in p]
    stats = PairStats.from_scenes(train_scenes)
    records = load(dataset, "test_pope.json")
    assert Counter((r["pope_kind"], r["answer"]) for r in records) == {
        (kind, answer): 12 for kind in POPE_KINDS for answer in ("yes", "no")
    }
    for record in records:
        scene, query = scenes[record["image"]], record["query"]
        present = {o.pair for o in scene.objects}
        pair = (query["colour"], query["shape"])
        assert (pair in present) == (record["answer"] == "yes")
        if record["answer"] == "no":
            assert pair in negative_candidates(scene, record["pope_kind"], stats)
        if record["answer"] == "no" and record["pope_kind"] == "adversarial":
            assert any(pair[0] == c or pair[1] == s for c, s in present)


def test_finetune_mixes_all_types_with_balanced_exists(dataset):
    records = load(dataset, "finetune.json")
    assert set(Counter(r["query"]["type"] for r in records)) == set(QUESTION_TYPES)
    scenes = scenes_of(dataset)
    answers = Counter(answer_query(scenes[r["image"]], r["query"]) for r in records if r["query"]["type"] == "exists")
    assert abs(answers["yes"] - answers["no"]) <= 1
    per_image = {}
    for r in records:
        per_image.setdefault(r["image"], []).append(json.dumps(r["query"]))
    assert all(len(set(qs)) == len(qs) == SMALL["qa_per_image"] for qs in per_image.values())


def test_test_qa_covers_types_evenly(dataset):
    assert Counter(r["question_type"] for r in load(dataset, "test_qa.json")) == {
        "colour": 3, "shape": 3, "count": 3, "position": 3
    }


def test_image_token_once_in_first_human_turn(dataset):
    for name in OUTPUT_FILES:
        for record in load(dataset, name):
            turns = record["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in turns) == 1
            assert (dataset / record["image"]).is_file()


def test_caption_quadrant_and_queries_on_a_fixed_scene():
    scene = Scene((SceneObject("red", "circle", 0, 1), SceneObject("blue", "square", 3, 2),
                   SceneObject("red", "cross", 2, 0)), grid=4)
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert [quadrant(o, 4) for o in scene.objects] == ["top left", "bottom right", "bottom left"]
    assert caption(scene) == "3 objects: red circle top left, blue square bottom right, red cross bottom left."
    assert answer_query(scene, {"type": "colour", "shape": "cross"}) == "red"
    assert answer_query(scene, {"type": "shape", "colour": "blue"}) == "square"
    assert answer_query(scene, {"type": "count"}) == "3"
    assert answer_query(scene, {"type": "exists", "colour": "blue", "shape": "cross"}) == "no"
    assert question_text({"type": "position", "colour": "red", "shape": "cross"}) == "Where is the red cross?"
    with pytest.raises(ValueError, match="matches 2 objects"):
        answer_query(scene, {"type": "shape", "colour": "red"})


def test_cli_writes_dataset_and_prints_counts(tmp_path, capsys):
    assert cli.main(["shapes", "--out", str(tmp_path), "--num_train", "6", "--num_test", "2", "--seed", "3"]) == 0
    assert "test_pope: 12" in capsys.readouterr().out
    meta = load(tmp_path, "meta.json")
    assert meta["args"] == {**SMALL, "num_train": 6, "num_test": 2, "seed": 3}
    assert meta["counts"]["finetune_records"] == 6 * SMALL["qa_per_image"]


@pytest.mark.parametrize(
    "flags, flag_named",
    [
        (["--grid", "3", "--image_size", "63"], "--grid"),
        (["--image_size", "62"], "--image_size"),
        (["--max_objects", "17"], "--max_objects"),
        (["--grid", "2", "--image_size", "64", "--max_objects", "5"], "--max_objects"),
        (["--min_objects", "4", "--max_objects", "3"], "--max_objects"),
        (["--min_objects", "0"], "--min_objects"),
        (["--num_train", "0"], "--num_train"),
        (["--qa_per_image", "0"], "--qa_per_image"),
        (["--image_size", "16", "--grid", "4"], "--image_size"),
    ],
)
def test_bad_flags_fail_naming_the_flag(flags, flag_named, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["shapes", "--out", str(tmp_path / "never"), *flags])
    assert exit_info.value.code == 2
    assert flag_named in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
