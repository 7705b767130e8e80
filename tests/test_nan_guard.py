"""Non-finite steps are skipped, counted and named by their samples; too many in a row stop training cleanly."""

import json
import math

import pytest
import torch
from tiny import train_flags
from transformers import TrainerControl, TrainerState

from sparsevl.config import parse_train_args
from sparsevl.data.dataset import LlavaJsonDataset
from sparsevl.model.build import load_checkpoint
from sparsevl.train.checkpointing import missing_files
from sparsevl.train.guard import NonFiniteGuard, TooManyBadSteps
from sparsevl.train.run import train


def poison(monkeypatch, is_bad) -> None:
    """Make the data set return NaN pixels for samples where is_bad(call_number, index) holds."""
    original = LlavaJsonDataset.__getitem__
    calls = []

    def getitem(self, index):
        item = original(self, index)
        calls.append(index)
        if is_bad(len(calls), index):
            item = {**item, "pixel_values": [torch.full_like(p, math.nan) for p in item["pixel_values"]]}
        return item

    monkeypatch.setattr(LlavaJsonDataset, "__getitem__", getitem)


def test_a_nan_gradient_leaves_weights_and_optimizer_state_untouched():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    model(torch.full((3, 4), math.nan)).sum().backward()
    guard, control = NonFiniteGuard(max_bad_steps=2), TrainerControl()
    guard.observe(torch.tensor(1.0), ["7 (id 'x')"])  # a finite loss; the gradient is what is bad
    guard.on_pre_optimizer_step(None, TrainerState(global_step=5), control, model=model)
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert guard.bad_steps == [{"step": 6, "reason": "non-finite gradient", "samples": ["7 (id 'x')"]}]
    assert not control.should_training_stop
    guard.on_step_end(None, None, control)
    assert control.should_save is False


def test_a_nan_batch_is_skipped_counted_and_named(shapes_dir, shapes_tokenizer, tmp_path, monkeypatch):
    drawn = {}  # the sample drawn 10th (third batch) turns bad: chosen by draw order so it is surely drawn

    def is_bad(call, index):
        if call == 10:
            drawn["index"] = index
        return index == drawn.get("index")

    poison(monkeypatch, is_bad)
    out = train(*parse_train_args(train_flags(shapes_dir, shapes_tokenizer, tmp_path / "run", max_steps=16,
                                              per_device_train_batch_size=4, logging_steps=1, save_steps=100,
                                              report_to="none", max_bad_steps=2)))
    config = json.loads((out / "train_config.json").read_text())
    bad_index = drawn["index"]
    record_id = json.loads((shapes_dir / "finetune.json").read_text())[bad_index]["id"]
    [bad] = config["bad_steps"]
    assert bad["reason"] == "non-finite loss" and len(bad["samples"]) == 4
    assert f"{bad_index} (id {record_id!r})" in bad["samples"]
    history = [e for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]
    assert len(history) == 16
    assert [e["bad_steps"] for e in history] == [0] * (bad["step"] - 1) + [1] * (17 - bad["step"])
    good = [e["loss"] for e in history if e["step"] != bad["step"]]
    assert all(math.isfinite(loss) for loss in good) and good[-1] < good[0]
    assert all(math.isfinite(float(t.abs().max())) for t in load_checkpoint(out)[0].state_dict().values())


def test_too_many_bad_steps_stop_with_the_last_good_checkpoint_intact(shapes_dir, shapes_tokenizer, tmp_path,
                                                                      monkeypatch):
    poison(monkeypatch, lambda call, index: call > 16)  # batches 5, 6, ... (batch size 4) are all NaN
    out = tmp_path / "run"
    args = parse_train_args(train_flags(shapes_dir, shapes_tokenizer, out, max_steps=20, per_device_train_batch_size=4,
                                        logging_steps=1, save_steps=2, report_to="none", max_bad_steps=3))
    with pytest.raises(TooManyBadSteps, match=r"stopped at step 7: 3 consecutive steps had a non-finite loss .*"
                                              r"--max_bad_steps 3.*last good checkpoint is .*checkpoint-4"):
        train(*args)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # step 6 not saved
    assert not missing_files(out / "checkpoint-4")
    model, _ = load_checkpoint(out / "checkpoint-4")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert not (out / "model.safetensors").exists()  # no final model from a run that diverged
