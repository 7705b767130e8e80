"""The redundancy option of the shapes benchmark: objects over 2x2 patches, small objects, 'small' questions."""

import json

import numpy as np
import pytest
from PIL import Image

from sparsevl.data import cli
from sparsevl.data.shapes import Scene, SceneObject, answer_query, generate_shapes_dataset, render

ARGS = dict(num_train=60, num_test=40, image_size=64, grid=4, min_objects=4, max_objects=10, qa_per_image=6, seed=3)


def test_small_objects_fill_the_top_left_quarter_of_their_cell_and_large_ones_the_cell():
    scene = Scene((SceneObject("red", "square", 0, 0, "small"), SceneObject("blue", "square", 1, 1)), 4)
    pixels = np.asarray(render(scene, 64)).sum(-1) > 0  # 16 px cells, 8 px patches: a cell is 2x2 patches
    assert pixels[:8, :8].any() and not pixels[:16, 8:16].any() and not pixels[8:16, :16].any()  # one patch
    for patch_row in (2, 3):
        for patch_col in (2, 3):  # the large square covers all 4 patches of its cell
            assert pixels[8 * patch_row:8 * patch_row + 8, 8 * patch_col:8 * patch_col + 8].any()


def test_small_questions_are_asked_and_answered_from_the_scene(tmp_path):
    counts = generate_shapes_dataset(tmp_path, small_objects=50, **ARGS)
    assert counts["finetune_questions"]["small"] > 0 and counts["test_qa_by_type"]["small"] > 0
    scenes = json.loads((tmp_path / "scenes.json").read_text())
    records = json.loads((tmp_path / "finetune.json").read_text()) + json.loads((tmp_path / "test_qa.json").read_text())
    small = [r for r in records if r["query"]["type"] == "small"]
    for record in small:
        scene = Scene.from_dict(scenes[record["image"]])
        answer = record["conversations"][1]["value"]
        assert answer == answer_query(scene, record["query"])
        [target] = [o for o in scene.objects if o.size == "small" and o.shape == record["query"]["shape"]]
        assert target.colour == answer
    assert any(o.get("size") == "small" for s in scenes.values() for o in s["objects"])
    captions = json.loads((tmp_path / "captions.json").read_text())
    assert any("small " in c["conversations"][1]["value"] for c in captions)
    image = Image.open(tmp_path / small[0]["image"])
    assert image.size == (64, 64)


def test_without_small_objects_the_files_are_unchanged(tmp_path):
    generate_shapes_dataset(tmp_path / "a", **ARGS)
    generate_shapes_dataset(tmp_path / "b", small_objects=0, **ARGS)
    for name in ("finetune.json", "test_qa.json", "scenes.json", "meta.json"):
        a, b = (tmp_path / "a" / name).read_text(), (tmp_path / "b" / name).read_text()
        assert a == b and '"small"' not in a and '"size"' not in a


@pytest.mark.parametrize("flags, message", [
    (["--small_objects", "101"], "--small_objects must be a percentage"),
    (["--small_objects", "20", "--grid", "8"], "--small_objects needs cells of >= 16 px"),
])
def test_small_objects_flag_errors_name_it(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        cli.main(["shapes", "--out", str(tmp_path), "--num_train", "4", "--num_test", "2", *flags])
    assert message in capsys.readouterr().err
