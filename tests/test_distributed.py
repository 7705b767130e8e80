"""Multi-process training: 2 CPU processes (gloo) equal 1 process at the same global batch; rank 0 writes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import train_flags

from sparsevl.config import parse_train_args
from sparsevl.train.run import train

ROOT = Path(__file__).resolve().parents[1]

# Keys transformers' DeepSpeed integration fills when they say "auto" (transformers/integrations/deepspeed.py).
TRAINER_FILLED_KEYS = {
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping",
    "fp16.enabled", "bf16.enabled", "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps",
    "optimizer.params.weight_decay", "scheduler.params.warmup_min_lr", "scheduler.params.warmup_max_lr",
    "scheduler.params.total_num_steps", "scheduler.params.warmup_num_steps",
}


def flags(shapes_dir, tokenizer, out, **extra) -> list[str]:
    return train_flags(shapes_dir, tokenizer, out, **{"max_steps": 3, "learning_rate": 1e-3, "warmup_steps": 0,
                                                      "logging_steps": 1, "save_steps": 2, "report_to": "none",
                                                      **extra})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logged_losses(out: Path) -> list[float]:
    """Trainer's total loss and our token-weighted loss_lm of every logged step."""
    history = json.loads((out / "log_history.json").read_text())
    return [value for entry in history if "loss" in entry for value in (entry["loss"], entry["loss_lm"])]


def assert_same_run(a: Path, b: Path) -> None:
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], atol=1e-4, rtol=1e-4, msg=name)  # Adam magnifies rounding
    assert logged_losses(a) == pytest.approx(logged_losses(b), rel=1e-5)


@pytest.mark.slow
def test_two_processes_and_accumulation_equal_one_process_at_the_same_global_batch(shapes_dir, shapes_tokenizer,
                                                                                   tmp_path):
    one = train(*parse_train_args(flags(shapes_dir, shapes_tokenizer, tmp_path / "one",
                                        per_device_train_batch_size=8)))
    accumulated = train(*parse_train_args(flags(shapes_dir, shapes_tokenizer, tmp_path / "accum",
                                                per_device_train_batch_size=4, gradient_accumulation_steps=2)))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
              "-m", "sparsevl", "train",
              *flags(shapes_dir, shapes_tokenizer, tmp_path / "two", per_device_train_batch_size=4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved model to") == 2  # two processes ran and both returned after the save
    two = tmp_path / "two"
    config = json.loads((two / "train_config.json").read_text())["SparseVLTrainingArguments"]
    assert config["per_device_train_batch_size"] == 4
    epochs = [json.loads((out / "log_history.json").read_text())[-1]["epoch"] for out in (one, two)]
    assert epochs[0] == epochs[1] > 0  # 2 x 4 samples per step: two single runs of 4 would log half
    assert (two / "checkpoint-2" / "model.safetensors").is_file()
    assert_same_run(one, accumulated)
    assert_same_run(one, two)


def test_only_the_writer_process_saves(shapes_dir, shapes_tokenizer, tmp_path, monkeypatch):
    """Trainer calls _save on every process (DeepSpeed, and plain data parallel in transformers 5)."""
    from sparsevl.config import SparseVLTrainingArguments
    from sparsevl.train.run import load_model_and_processors
    from sparsevl.train.trainer import SparseVLTrainer

    model_args, _, training_args = parse_train_args(flags(shapes_dir, shapes_tokenizer, tmp_path / "run"))
    model, tokenizer, image_processor, model_args = load_model_and_processors(model_args)
    trainer = SparseVLTrainer(model=model, args=training_args, processing_class=tokenizer, loss_weights={"lm": 1.0},
                              model_args=model_args, image_processor=image_processor)
    monkeypatch.setattr(SparseVLTrainingArguments, "should_save", property(lambda self: False))
    trainer.save_model(str(tmp_path / "not_writer"))
    assert not (tmp_path / "not_writer" / "model.safetensors").exists()
    monkeypatch.setattr(SparseVLTrainingArguments, "should_save", property(lambda self: True))
    trainer.save_model(str(tmp_path / "writer"))
    assert (tmp_path / "writer" / "model.safetensors").is_file()


def _auto_keys(config: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in config.items():
        if isinstance(value, dict):
            keys |= _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            keys.add(prefix + key)
    return keys


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_leave_to_trainer_only_what_it_fills(name, stage):
    config = json.loads((ROOT / "configs" / "deepspeed" / f"{name}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    auto = _auto_keys(config)
    assert {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"} <= auto
    assert auto <= TRAINER_FILLED_KEYS, auto - TRAINER_FILLED_KEYS  # SparseVLM has no .config for the rest
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_accelerate_configs_load_and_the_cpu_one_starts_two_processes():
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        assert config.num_machines == 1 and config.num_processes >= 2, path
    cpu = yaml.safe_load((ROOT / "configs" / "accelerate" / "cpu_2proc.yaml").read_text())
    assert cpu["distributed_type"] == "MULTI_GPU" and cpu["num_processes"] == 2  # torchrun launcher: 2 processes
