"""Pruning through the commands: `sparsevl analyze pruning`, `sparsevl eval --token_pruner`, `--stage sparse_distill`."""

import json

import pytest

from sparsevl.cli import main as sparsevl
from sparsevl.config import parse_train_args
from sparsevl.train.run import train


def train_flags(shapes_dir, shapes_tokenizer, out, **extra) -> list[str]:
    values = {"model_name_or_path": "tiny-qwen3", "vision_tower": "tiny-clip", "tokenizer_name_or_path":
              shapes_tokenizer.name_or_path, "data_path": shapes_dir / "finetune.json", "output_dir": out,
              "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 1000, "report_to": "none",
              "seed": 0, **extra}
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def checkpoint(shapes_dir, shapes_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    return train(*parse_train_args(train_flags(shapes_dir, shapes_tokenizer, out, max_steps=1, learning_rate=0.0)))


def test_analyze_pruning_writes_table_curve_and_patch_picture(checkpoint, shapes_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    code = sparsevl(["analyze", "pruning", "--model", str(checkpoint), "--data", str(shapes_dir / "test_qa.json"),
                     "--out", str(out), "--retained_tokens", "16,8", "--limit", "6", "--max_new_tokens", "2",
                     "--stages", "1,3", "--recycling", "on,off", "--pruning_layer", "2"])
    assert code == 0
    results = json.loads((out / "pruning_results.json").read_text())
    rows = {(r["setting"], r["kept_tokens"]): r for r in results["rows"]}
    in_llm = [f"{p} {s}-stage" for p in ("sparsevlm", "sparsevlm_weighted", "fastv", "random") for s in (1, 3)]
    names = [n + r for n in in_llm for r in ((" recycling on", " recycling off") if n.startswith("sparsevlm ")
                                                else ("",))] + ["cls_attention", "visionzip"]
    assert sorted(rows) == sorted([("none", 64)] + [(n, c) for n in names for c in (16, 8)])
    assert rows[("none", 64)]["relative_flops"] == 1.0 and rows[("none", 64)]["avg_visual_tokens_per_layer"] == 64
    one = rows[("fastv 1-stage", 8)]  # 4 layers: layers 0-1 on 64 visual tokens, 2-3 on 8
    assert one["avg_visual_tokens_per_layer"] == (2 * 64 + 2 * 8) / 4 and one["visual_tokens_into_llm"] == 64
    three = rows[("fastv 3-stage", 8)]  # the same average over three stages
    assert abs(three["avg_visual_tokens_per_layer"] - one["avg_visual_tokens_per_layer"]) <= 2
    recycled, plain = rows[("sparsevlm 1-stage recycling on", 8)], rows[("sparsevlm 1-stage recycling off", 8)]
    assert recycled["avg_visual_tokens_per_layer"] == (2 * 64 + 2 * (8 + 2)) / 4  # 56 dropped: 17 pooled, 2 clusters
    assert plain["avg_visual_tokens_per_layer"] == one["avg_visual_tokens_per_layer"]
    assert rows[("visionzip", 8)]["visual_tokens_into_llm"] == 8 == rows[("cls_attention", 8)]["visual_tokens_into_llm"]
    assert rows[("cls_attention", 8)]["relative_flops"] < plain["relative_flops"] < 1.0
    assert all(r["prefill_ms"] > 0 and 0.0 <= r["accuracy"] <= 1.0 for r in results["rows"])
    for name in ("pruning_table.md", "pruning_curve.png", "kept_patches.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "pruning_table.md").read_text().count("\n") == 2 + len(rows)
    assert "visionzip" in capsys.readouterr().out


def test_analyze_dispatcher_lists_and_rejects_targets(capsys):
    assert sparsevl(["analyze"]) == 0 and "pruning" in capsys.readouterr().out
    assert sparsevl(["analyze", "routing-nope"]) == 2


def test_eval_accepts_pruning_flags_and_names_bad_ones(checkpoint, shapes_dir, tmp_path, capsys):
    common = ["eval", "--model", str(checkpoint), "--data", str(shapes_dir / "test_qa.json"), "--limit", "4",
              "--max_new_tokens", "2", "--out", str(tmp_path / "eval")]
    assert sparsevl(common + ["--token_pruner", "sparsevlm", "--pruning_layers", "1", "--retained_tokens", "0.25"]) == 0
    cost = json.loads((tmp_path / "eval" / "metrics.json").read_text())["cost"]
    assert cost["avg_visual_tokens_per_layer"] == (2 * 64 + 2 * (16 + 2)) / 4  # layer 1's output pruned, 2 clusters
    assert cost["visual_tokens_into_llm"] == 64 and 0 < cost["relative_flops"] < 1 and cost["prefill_ms"] > 0
    assert sparsevl(common + ["--token_pruner", "sparsevlm", "--sparsevlm_budget", "64"]) == 0
    assert sparsevl(common + ["--token_pruner", "visionzip", "--dominant", "6", "--contextual", "2"]) == 0
    cost = json.loads((tmp_path / "eval" / "metrics.json").read_text())["cost"]
    assert cost["visual_tokens_into_llm"] == cost["avg_visual_tokens_per_layer"] == 9
    assert sparsevl(common + ["--token_pruner", "fastv", "--fastv_k", "2", "--fastv_ratio", "0.75"]) == 0
    assert sparsevl(common + ["--token_pruner", "sparsevlm", "--pruning_layers", "9", "--retained_tokens", "8"]) == 2
    assert "--pruning_layers: layer 9 is outside" in capsys.readouterr().err


def test_sparse_distill_trains_the_pruned_student_with_the_alignment_loss(checkpoint, shapes_dir, shapes_tokenizer,
                                                                          tmp_path, capsys):
    out = train(*parse_train_args(train_flags(shapes_dir, shapes_tokenizer, tmp_path / "distill", max_steps=2,
                                              stage="sparse_distill", model_name_or_path=checkpoint,
                                              pruning_layers=1, retained_tokens=0.125, learning_rate=1e-3,
                                              align_loss_weight=0.5)))
    printed = capsys.readouterr().out
    assert ("teacher (frozen, no pruning) from the student checkpoint: training mode frozen: trainable params: 0 ||"
            in printed)
    assert "student (pruned): training mode full: trainable params:" in printed
    history = [e for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]
    assert len(history) == 2
    for entry in history:
        assert entry["loss_align"] > 0
        assert entry["loss"] == pytest.approx(entry["loss_lm"] + 0.5 * entry["loss_align"], rel=1e-3)
    config = json.loads((out / "train_config.json").read_text())["ModelArguments"]
    assert config["token_pruner"] == "sparsevlm" and config["retained_tokens"] == "0.125"


def test_sparse_distill_without_an_in_llm_pruner_is_a_clear_error(checkpoint, shapes_dir, shapes_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="--stage sparse_distill needs an in-LLM --token_pruner"):
        train(*parse_train_args(train_flags(shapes_dir, shapes_tokenizer, tmp_path / "d", max_steps=1,
                                            stage="sparse_distill", model_name_or_path=checkpoint,
                                            token_pruner="cls_attention", retained_tokens=8)))


def test_help_states_what_pruning_layers_mean_per_pruner(capsys):
    for command in (["eval", "--help"], ["analyze", "pruning", "--help"]):
        with pytest.raises(SystemExit) as exit_info:  # argparse %-formats help: a stray % would raise here
            sparsevl(command)
        assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--sparsevlm_budget", "--sparsevlm_recycling", "--dominant", "--contextual",
                   "sparsevlm: layers whose *output* is pruned", "fastv: K, the first layer on the kept tokens",
                   "three stages"):
        assert phrase in text, phrase
