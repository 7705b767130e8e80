"""Resume after SIGKILL equals an unbroken run; checkpoints are atomic, rotated, and the best one is kept."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import train_flags
from transformers import TrainerControl, TrainerState, TrainingArguments

from sparsevl.config import parse_train_args
from sparsevl.model.build import load_checkpoint
from sparsevl.train.checkpointing import (STAGING_PREFIX, TRAINER_FILES, latest_checkpoint, missing_files, publish,
                                          remove_staging_dirs, resolve_resume)
from sparsevl.train.run import train
from sparsevl.train.trainer import BEST_DIR, BestCheckpointCallback

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, SAVE_STEPS = 12, 4


def start(shapes_dir, shapes_tokenizer, out: Path, pause: str | None = None, steps: Path | None = None,
          **extra) -> subprocess.Popen:
    """`sparsevl train` in a child process (one thread, so runs are bitwise comparable); the numbers of the
    steps it trains are appended to `steps`."""
    flags = train_flags(shapes_dir, shapes_tokenizer, out, max_steps=MAX_STEPS, save_steps=SAVE_STEPS,
                        logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-3, report_to="none",
                        **extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "PAUSE": pause or "", "MARKER": str(out) + ".paused", "STEPS": str(steps or "")}
    log = open(str(out) + ".log", "a")
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_driver.py"), *flags], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, out: Path) -> None:
    assert process.wait(timeout=300) == 0, Path(str(out) + ".log").read_text()[-3000:]


def kill_when_paused(process: subprocess.Popen, out: Path) -> None:
    marker = Path(str(out) + ".paused")
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, Path(str(out) + ".log").read_text()[-3000:]
        assert time.monotonic() < deadline, "training never reached the kill point"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def curve(out: Path) -> list[tuple]:
    """(step, loss, grad_norm, learning_rate) of every logged step."""
    history = json.loads((out / "log_history.json").read_text())
    return [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"]) for e in history if "loss" in e]


@pytest.fixture(scope="module")
def unbroken(shapes_dir, shapes_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unbroken") / "run"
    finish(start(shapes_dir, shapes_tokenizer, out), out)
    return out


def assert_same_run(resumed: Path, reference: Path) -> None:
    assert len(curve(reference)) == MAX_STEPS
    assert curve(resumed) == curve(reference)  # exact: every step's loss, gradient norm and learning rate
    final, expected = load_file(resumed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    best = [json.loads((run / "best-checkpoint" / "best.json").read_text()) for run in (resumed, reference)]
    assert best[0] == best[1]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_latest_equals_an_unbroken_run(shapes_dir, shapes_tokenizer, tmp_path, unbroken):
    out = tmp_path / "run"
    first, second = tmp_path / "first.steps", tmp_path / "second.steps"
    kill_when_paused(start(shapes_dir, shapes_tokenizer, out, pause="step:6", steps=first), out)
    assert first.read_text().split() == [str(step) for step in range(1, 7)]
    assert latest_checkpoint(out) == out / "checkpoint-4"
    assert not (out / "model.safetensors").exists()  # the run really died before its end
    log = Path(str(out) + ".log")
    assert "resuming from" not in log.read_text()  # a fresh run does not claim to resume
    finish(start(shapes_dir, shapes_tokenizer, out, steps=second, resume_from_checkpoint="latest"), out)
    # the resumed process trains steps 5..12 only (a restart from step 1 would end bit-identical too)
    assert second.read_text().split() == [str(step) for step in range(5, MAX_STEPS + 1)]
    assert f"resuming from {out / 'checkpoint-4'}" in log.read_text()
    assert_same_run(out, unbroken)


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint(shapes_dir, shapes_tokenizer, tmp_path, unbroken):
    out = tmp_path / "run"
    kill_when_paused(start(shapes_dir, shapes_tokenizer, out, pause="save:8"), out)
    staged = out / f"{STAGING_PREFIX}checkpoint-8" / "checkpoint-8"
    assert (staged / "model.safetensors").is_file() and not (staged / "trainer_state.json").exists()  # half-written
    assert not (out / "checkpoint-8").exists()
    assert latest_checkpoint(out) == out / "checkpoint-4" and not missing_files(out / "checkpoint-4")
    model, _ = load_checkpoint(out / "checkpoint-4")  # the previous checkpoint still loads
    assert model.num_image_tokens == 64
    steps = tmp_path / "resumed.steps"
    finish(start(shapes_dir, shapes_tokenizer, out, steps=steps, resume_from_checkpoint="latest"), out)
    assert steps.read_text().split() == [str(step) for step in range(5, MAX_STEPS + 1)]
    assert not list(out.glob(STAGING_PREFIX + "*"))
    assert_same_run(out, unbroken)


@pytest.mark.slow
def test_save_total_limit_is_honoured_and_the_best_checkpoint_kept(unbroken):
    steps = sorted(int(p.name.split("-")[1]) for p in unbroken.glob("checkpoint-*"))
    assert steps == [8, 12]  # save_total_limit 2 of checkpoints 4, 8, 12
    losses = {step: loss for step, loss, _, _ in curve(unbroken)}
    windows = {end: sum(losses[s] for s in range(end - SAVE_STEPS + 1, end + 1)) / SAVE_STEPS for end in (4, 8, 12)}
    best = json.loads((unbroken / "best-checkpoint" / "best.json").read_text())
    assert best["step"] == min(windows, key=windows.get)
    assert best["mean_loss"] == pytest.approx(windows[best["step"]])
    assert not missing_files(unbroken / "best-checkpoint")


def make_checkpoint(folder: Path, complete: bool = True) -> Path:
    folder.mkdir(parents=True)
    for name in ("sparsevl_config.json", "model.safetensors", *(TRAINER_FILES if complete else TRAINER_FILES[1:])):
        (folder / name).write_text("{}")
    return folder


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    make_checkpoint(tmp_path / "checkpoint-10")
    make_checkpoint(tmp_path / "checkpoint-9")
    make_checkpoint(tmp_path / "checkpoint-30", complete=False)  # no trainer_state.json
    make_checkpoint(tmp_path / f"{STAGING_PREFIX}checkpoint-40" / "checkpoint-40")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_resume("latest", tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(ValueError, match=r"checkpoint-30: not a complete step checkpoint .*trainer_state\.json"):
        resolve_resume(str(tmp_path / "checkpoint-30"), tmp_path)
    assert resolve_resume("latest", tmp_path / "empty") is None  # nothing saved yet: a fresh start
    assert resolve_resume("true", tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_resume("False", tmp_path) is None and resolve_resume("", tmp_path) is None
    assert resolve_resume("None", tmp_path) is None


def test_resume_latest_says_when_there_is_nothing_to_resume(tmp_path, capsys):
    assert resolve_resume("latest", tmp_path / "empty") is None
    assert capsys.readouterr().out == f"no complete checkpoint in {tmp_path / 'empty'} yet: starting fresh\n"
    make_checkpoint(tmp_path / "checkpoint-3")
    assert resolve_resume("latest", tmp_path) == str(tmp_path / "checkpoint-3")
    assert capsys.readouterr().out == ""


def test_publish_replaces_only_when_complete_and_cleanup_restores_an_interrupted_swap(tmp_path, caplog):
    final = make_checkpoint(tmp_path / "best-checkpoint")
    (final / "best.json").write_text('{"step": 4}')
    staged = make_checkpoint(tmp_path / f"{STAGING_PREFIX}best-checkpoint")
    (staged / "best.json").write_text('{"step": 8}')
    make_checkpoint(tmp_path / f"{STAGING_PREFIX}old-best-checkpoint")  # left by an earlier swap
    publish(staged, final)
    assert json.loads((final / "best.json").read_text()) == {"step": 8} and not staged.exists()
    assert not (tmp_path / f"{STAGING_PREFIX}old-best-checkpoint").exists()
    # a kill between the two renames of a swap: the old copy is moved aside, the new one not yet in place
    os.replace(final, tmp_path / f"{STAGING_PREFIX}old-best-checkpoint")
    make_checkpoint(tmp_path / f"{STAGING_PREFIX}checkpoint-12")
    with caplog.at_level("WARNING", logger="sparsevl.train.checkpointing"):
        removed = remove_staging_dirs(tmp_path)
    assert [p.name for p in removed] == [f"{STAGING_PREFIX}checkpoint-12"] and not removed[0].exists()
    assert caplog.messages == [f"removing {removed[0]}: a save that did not finish"]
    assert json.loads((final / "best.json").read_text()) == {"step": 8}
    assert remove_staging_dirs(tmp_path / "not-yet-created") == []


def test_a_resumed_run_remembers_the_best_loss_so_far(tmp_path):
    make_checkpoint(tmp_path / BEST_DIR)
    (tmp_path / BEST_DIR / "best.json").write_text(json.dumps({"step": 4, "mean_loss": 1.5}))
    make_checkpoint(tmp_path / "checkpoint-8")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    callback = BestCheckpointCallback()
    state = TrainerState(global_step=4, log_history=[{"step": s, "loss": 2.0} for s in range(5, 9)])
    callback.on_train_begin(args, state, TrainerControl())
    assert callback.best_loss == 1.5
    state.global_step = 8
    callback.on_save(args, state, TrainerControl())  # mean loss 2.0 is worse than 1.5: the best copy stays
    assert json.loads((tmp_path / BEST_DIR / "best.json").read_text())["step"] == 4
    state.log_history += [{"step": s, "loss": 1.0} for s in range(9, 13)]
    state.global_step = 12
    make_checkpoint(tmp_path / "checkpoint-12")
    make_checkpoint(tmp_path / f"{STAGING_PREFIX}{BEST_DIR}" / "leftover")  # a copy killed half-way
    callback.on_save(args, state, TrainerControl())
    assert json.loads((tmp_path / BEST_DIR / "best.json").read_text()) == {"step": 12, "mean_loss": 1.0}
    assert not list(tmp_path.glob(STAGING_PREFIX + "*")) and not (tmp_path / BEST_DIR / "leftover").exists()
    state.log_history += [{"step": s, "loss": 1.0} for s in range(13, 17)]
    state.global_step = 16
    make_checkpoint(tmp_path / "checkpoint-16")
    callback.on_save(args, state, TrainerControl())  # as good, not better: the earlier best stays
    assert json.loads((tmp_path / BEST_DIR / "best.json").read_text()) == {"step": 12, "mean_loss": 1.0}


def test_a_lora_run_resumes_from_its_unmerged_weights(shapes_dir, shapes_tokenizer, tmp_path, capsys):
    def run(out, **extra):
        return train(*parse_train_args(train_flags(
            shapes_dir, shapes_tokenizer, out, max_steps=8, save_steps=4, logging_steps=1, per_device_train_batch_size=4,
            learning_rate=1e-3, report_to="none", lora_enable=True, lora_r=4, **extra)))

    reference = run(tmp_path / "unbroken")
    shutil.copytree(reference / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    assert (tmp_path / "resumed" / "checkpoint-4" / "resume_weights.safetensors").is_file()
    capsys.readouterr()
    resumed = run(tmp_path / "resumed", resume_from_checkpoint="latest")
    assert f"resuming from {tmp_path / 'resumed' / 'checkpoint-4'}" in capsys.readouterr().out
    assert curve(resumed) == curve(reference) and len(curve(reference)) == 8
