"""Training recipes end to end on tiny models: loss goes down, stages hand over, files are written."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tiny import train_flags as flags

from sparsevl.config import parse_train_args
from sparsevl.train.run import train


@pytest.mark.slow
def test_smoke_train_drives_the_loss_down_and_writes_checkpoints(shapes_dir, shapes_tokenizer, tmp_path):
    out = train(*parse_train_args(flags(shapes_dir, shapes_tokenizer, tmp_path / "run", max_steps=60,
                                        unfreeze_mm_vision_tower=True)))
    history = json.loads((out / "log_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[0] > 4.0  # about ln(vocabulary) at the start
    assert losses[-1] < losses[0] / 4, losses
    assert all(f"loss_lm" in entry for entry in history if "loss" in entry)
    for name in ("model.safetensors", "sparsevl_config.json", "train_config.json", "tokenizer.json",
                 "preprocessor_config.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-60" / "model.safetensors").is_file()
    assert (out / "best-checkpoint" / "best.json").is_file()
    assert list((out / "runs").rglob("events.out.tfevents*")), "no TensorBoard log"


def test_pretrain_stage_trains_only_the_projector(shapes_dir, shapes_tokenizer, tmp_path):
    init = train(*parse_train_args(flags(shapes_dir, shapes_tokenizer, tmp_path / "init", max_steps=1,
                                         learning_rate=0.0)))
    before = load_file(init / "model.safetensors")
    out = train(*parse_train_args(flags(shapes_dir, shapes_tokenizer, tmp_path / "pre", max_steps=3, stage="pretrain",
                                        model_name_or_path=init, data_path=shapes_dir / "captions.json")))
    after = load_file(out / "model.safetensors")
    changed = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"projector"}
    config = json.loads((out / "train_config.json").read_text())
    assert config["DataArguments"]["conversation_template"] == "plain"
    assert config["ModelArguments"]["tune_mm_mlp_adapter"] is True


def test_yaml_gives_defaults_and_flags_override(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("stage: pretrain\nlearning_rate: 1e-4\nmodel_max_length: 256\nreport_to: none\n"
                      "mm_vision_select_layer: -1\n")
    model_args, data_args, training_args = parse_train_args(["--config", str(config), "--model_max_length", "128"])
    assert training_args.learning_rate == pytest.approx(1e-4)  # a float, though YAML reads 1e-4 as a string
    assert data_args.model_max_length == 128
    assert model_args.mm_vision_select_layer == -1
    assert model_args.tune_mm_mlp_adapter and data_args.conversation_template == "plain"  # the stage's recipe
    assert training_args.report_to == []


def test_unknown_stage_and_bad_paths_are_clear_errors(tmp_path, shapes_tokenizer):
    with pytest.raises(SystemExit, match="--stage 'warmup' is unknown"):
        parse_train_args(["--stage", "warmup"])
    args = parse_train_args(["--model_name_or_path", str(tmp_path / "nowhere"), "--tokenizer_name_or_path",
                             shapes_tokenizer.name_or_path, "--data_path", "x.json"])
    with pytest.raises(ValueError, match="neither a preset .* nor a local directory"):
        train(*args)
