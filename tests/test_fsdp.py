"""FSDP2 on 2 CPU processes (gloo): every stage's loss curve equals one process at the same global batch, a
sharded checkpoint resumes after SIGKILL to the same curve and consolidates into the checkpoint `sparsevl eval`
loads, and MoE expert counts and losses are reduced over both ranks."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import train_flags

from sparsevl.cli import main as cli_main
from sparsevl.config import parse_train_args
from sparsevl.train.checkpointing import SHARD_INDEX_NAME, latest_checkpoint
from sparsevl.train.run import train
from sparsevl.train.sharding import check_fsdp_config, fsdp_flags_from_launcher

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-4  # measured: see the README section "More than one machine"
STEPS = 4


def flags(shapes_dir, tokenizer, out, **extra) -> list[str]:
    values = {"max_steps": 2, "learning_rate": 1e-3, "warmup_steps": 0, "logging_steps": 1, "save_steps": 100,
              "report_to": "none", **extra}
    return [str(token) for token in train_flags(shapes_dir, tokenizer, out, **values)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: str, *args: str, log: Path, pause: str = "", accelerate_config: str = "") -> subprocess.Popen:
    """Two CPU processes of `script` in a new session (so a test can SIGKILL the whole group), started by
    torchrun or, given `accelerate_config`, by `accelerate launch --config_file`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "PAUSE": pause, "MARKER": str(log) + ".paused"}
    launcher = (["accelerate.commands.launch", "--config_file", str(ROOT / accelerate_config)] if accelerate_config
                else ["torch.distributed.run", "--nproc_per_node", "2"])
    command = [sys.executable, "-m", *launcher, "--main_process_port" if accelerate_config else "--master_port",
               str(free_port()), str(ROOT / "tests" / script), *args]
    return subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(process: subprocess.Popen, log: Path) -> str:
    assert process.wait(timeout=600) == 0, log.read_text()[-4000:]
    return log.read_text()


def history(out: Path) -> list[dict]:
    return [e for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]


def assert_same_curve(sharded: Path, single: Path, keys=("loss", "loss_lm", "grad_norm")) -> None:
    a, b = history(sharded), history(single)
    assert [e["step"] for e in a] == [e["step"] for e in b] and len(a) > 0
    for entry_a, entry_b in zip(a, b):
        for key in keys:
            assert entry_a[key] == pytest.approx(entry_b[key], rel=LOSS_RTOL), (entry_a["step"], key)


def assert_same_weights(a: Path, b: Path) -> None:
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], atol=WEIGHT_ATOL, rtol=WEIGHT_ATOL, msg=name)


# name -> (sharded run's flags, the 1-process run's changes for the same global batch)
def stage_runs(shapes_dir, tokenizer, checkpoint) -> dict[str, tuple[dict, dict]]:
    one_batch = {"per_device_train_batch_size": 8}
    return {
        "full": ({"max_steps": STEPS, "save_steps": 2}, one_batch),
        "pretrain": ({"stage": "pretrain", "data_path": shapes_dir / "captions.json"}, one_batch),
        "frozen_cls": ({"freeze_backbone": True, "token_pruner": "cls_attention", "retained_tokens": 0.5}, one_batch),
        "lora": ({"lora_enable": True, "lora_r": 4, "lora_dropout": 0.0}, one_batch),
        "adaptive": ({"use_adaptive_layer_selection": True, "top_k_layers": 2}, one_batch),
        # The align and balance losses are means over each micro-batch (as under DDP and DeepSpeed): one
        # process matches only with the same micro-batches, 4 samples x 2 accumulated.
        "distill": ({"stage": "sparse_distill", "model_name_or_path": checkpoint, "pruning_layers": 1,
                     "retained_tokens": 8}, {"gradient_accumulation_steps": 2}),
        # MoE-LLaVA's sampled second expert draws its noise from each process's own generator, so 1 process and
        # 2 ranks route differently; parity is checked with the argmax policy (capacity stays on, per micro-batch).
        "moe": ({"stage": "moe", "model_name_or_path": checkpoint, "num_experts": 4, "top_k_experts": 2,
                 "second_expert_policy": "argmax"}, {"gradient_accumulation_steps": 2}),
    }


def kill_at_step_3(root: Path, run_flags: list[str]) -> Path | None:
    """A run sharded by the accelerate FSDP config (no --fsdp flag), SIGKILLed (launcher and both processes)
    after step 3; returns its latest checkpoint."""
    log = root / "killed.log"
    process = torchrun("kill_driver.py", *[f for f in run_flags if f != "--fsdp"], log=log, pause="step:3",
                       accelerate_config="configs/accelerate/fsdp_cpu_2proc.yaml")
    marker, deadline = Path(str(log) + ".paused"), time.monotonic() + 600
    while not marker.exists():
        assert process.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "training never reached the kill point"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    return latest_checkpoint(root / "resumed")


@pytest.fixture(scope="module")
def fsdp_runs(shapes_dir, shapes_tokenizer, tiny_checkpoint, tmp_path_factory) -> dict:
    """Every stage trained by 2 FSDP processes (per-device batch 4), and the resumption of a killed run, in one
    torchrun launch (plus the launch that gets killed)."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = stage_runs(shapes_dir, shapes_tokenizer, tiny_checkpoint)
    commands = [[*flags(shapes_dir, shapes_tokenizer, root / name, per_device_train_batch_size=4, **extra), "--fsdp"]
                for name, (extra, _) in runs.items()]
    resumed = commands[0][:]
    resumed[resumed.index("--output_dir") + 1] = str(root / "resumed")
    latest_after_kill = kill_at_step_3(root, resumed)
    commands.append([*resumed, "--resume_from_checkpoint", "latest"])
    (root / "runs.json").write_text(json.dumps(commands))
    log = root / "fsdp.log"
    text = finish(torchrun("fsdp_driver.py", str(root / "runs.json"), log=log), log)
    return {"log": text, "latest_after_kill": latest_after_kill, "resumed": root / "resumed",
            **{name: root / name for name in runs}}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "pretrain", "frozen_cls", "lora", "distill", "adaptive", "moe"])
def test_fsdp_stage_equals_one_process_at_the_same_global_batch(name, fsdp_runs, shapes_dir, shapes_tokenizer,
                                                                  tiny_checkpoint, tmp_path):
    extra, single_changes = stage_runs(shapes_dir, shapes_tokenizer, tiny_checkpoint)[name]
    single = train(*parse_train_args(flags(shapes_dir, shapes_tokenizer, tmp_path / "one",
                                           **{"per_device_train_batch_size": 4, **extra, **single_changes})))
    sharded = fsdp_runs[name]
    config = json.loads((sharded / "train_config.json").read_text())["SparseVLTrainingArguments"]
    assert config["fsdp"] and config["per_device_train_batch_size"] == 4
    keys = ("loss", "loss_lm", "grad_norm", *(("loss_align",) if name == "distill" else ()),
            *(("loss_layer_cls",) if name == "adaptive" else ()), *(("loss_llm_balance",) if name == "moe" else ()))
    assert_same_curve(sharded, single, keys)
    assert_same_weights(sharded, single)


def test_fsdp_shards_hold_half_of_each_weight_and_consolidate_to_the_checkpoint(fsdp_runs):
    checkpoint = fsdp_runs["full"] / "checkpoint-4"
    index = json.loads((checkpoint / SHARD_INDEX_NAME).read_text())
    assert index["world_size"] == 2
    shards = [load_file(checkpoint / name) for name in index["files"]]
    whole = load_file(checkpoint / "model.safetensors")
    for name in ("llm.model.layers.0.self_attn.q_proj.weight", "vision_tower.encoder.encoder.layers.1.mlp.fc1.weight",
                 "projector.net.0.weight"):
        halves = [shard[f"model/{name}"] for shard in shards]
        assert halves[0].shape[0] == halves[1].shape[0] == whole[name].shape[0] // 2  # each rank holds half
        assert torch.equal(torch.cat(halves), whole[name])  # the consolidated weight is the two shards
        if not name.startswith("vision_tower"):  # the (frozen) tower has no optimizer state
            optimizer_halves = [shard[f"optim/{name}/exp_avg"] for shard in shards]
            assert optimizer_halves[0].shape == halves[0].shape and optimizer_halves[0].abs().sum() > 0
    assert torch.equal(load_file(fsdp_runs["full"] / "model.safetensors")["projector.net.0.weight"],
                       load_file(checkpoint / "model.safetensors")["projector.net.0.weight"])


def test_fsdp_consolidated_checkpoint_runs_in_sparsevl_eval(fsdp_runs, shapes_dir, tmp_path):
    out = tmp_path / "eval"
    assert cli_main(["eval", "--model", str(fsdp_runs["full"] / "checkpoint-2"), "--data",
                     str(shapes_dir / "test_qa.json"), "--out", str(out), "--max_new_tokens", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics  # scored every question of the file
    assert len((out / "answers.jsonl").read_text().splitlines()) == len(json.loads((shapes_dir / "test_qa.json").read_text()))


def test_fsdp_moe_load_table_on_rank_0_counts_both_ranks_tokens(fsdp_runs, shapes_dir, shapes_tokenizer,
                                                                 tiny_checkpoint, tmp_path):
    """Rank 0's shares equal those of one process that saw both ranks' micro-batches; rank 0 alone would not."""
    extra, single_changes = stage_runs(shapes_dir, shapes_tokenizer, tiny_checkpoint)["moe"]
    single = train(*parse_train_args(flags(shapes_dir, shapes_tokenizer, tmp_path / "one",
                                           **{"per_device_train_batch_size": 4, **extra, **single_changes})))
    rank0_only = train(*parse_train_args(flags(shapes_dir, shapes_tokenizer, tmp_path / "rank0", max_steps=1,
                                               **{"per_device_train_batch_size": 4, **extra})))
    sharded = history(fsdp_runs["moe"])
    loads = [{k: v for k, v in e.items() if k.startswith("expert_load/")} for e in sharded]
    expected = [{k: v for k, v in e.items() if k.startswith("expert_load/")} for e in history(single)]
    assert len(loads) == len(expected) == 2 and len(loads[0]) == 10  # 2 layers x (4 experts + max/min)
    for load, reference in zip(loads, expected):
        assert load == pytest.approx(reference, rel=1e-3)
    first_rank_only = {k: v for k, v in history(rank0_only)[0].items() if k.startswith("expert_load/")}
    assert first_rank_only != pytest.approx(loads[0], rel=1e-3)  # the oracle tells the two apart
    assert fsdp_runs["log"].count("expert load at step 1 ") == 1  # printed once, by rank 0


@pytest.mark.slow
def test_fsdp_resume_after_sigkill_follows_the_unbroken_curve(fsdp_runs):
    out = fsdp_runs["resumed"]
    assert fsdp_runs["latest_after_kill"] == out / "checkpoint-2"  # killed after step 3: checkpoint-4 never came
    assert (out / "checkpoint-2" / SHARD_INDEX_NAME).is_file()  # the accelerate config sharded the killed run
    assert "resuming from" in fsdp_runs["log"]
    resumed, unbroken = history(out), history(fsdp_runs["full"])
    assert [e["step"] for e in resumed] == [1, 2, 3, 4]  # 1-2 come back with the trainer state, 3-4 are new
    for key in ("loss", "grad_norm", "learning_rate", "loss_lm"):
        assert [e[key] for e in resumed] == [e[key] for e in unbroken], key  # exact
    final, expected = load_file(out / "model.safetensors"), load_file(fsdp_runs["full"] / "model.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)


def test_accelerate_fsdp_config_becomes_fsdp_flags_and_unsupported_settings_are_refused():
    environ = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
               "FSDP_OFFLOAD_PARAMS": "false", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}
    flags_out = fsdp_flags_from_launcher(environ)
    assert "ACCELERATE_USE_FSDP" not in environ  # Accelerate must not shard a second time
    assert flags_out[:2] == ["--fsdp", "--fsdp_config"]
    config = json.loads(flags_out[2])
    assert config == {"version": "2", "reshard_after_forward": "false", "state_dict_type": "SHARDED_STATE_DICT"}
    assert check_fsdp_config(config) is False  # reshard_after_forward false: SHARD_GRAD_OP
    assert fsdp_flags_from_launcher({"FSDP_VERSION": "2"}) == []  # not an FSDP launch
    for key, value in [("version", 1), ("cpu_offload", True), ("transformer_layer_cls_to_wrap", ["LlamaDecoderLayer"]),
                       ("state_dict_type", "FULL_STATE_DICT"), ("activation_checkpointing", True)]:
        with pytest.raises(ValueError, match=f"--fsdp_config {key}="):
            check_fsdp_config({"version": 2, key: value})


def test_fsdp_in_one_process_is_an_error_naming_the_launchers(shapes_dir, shapes_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="--fsdp needs several processes: launch with `torchrun"):
        train(*parse_train_args([*flags(shapes_dir, shapes_tokenizer, tmp_path / "run"), "--fsdp"]))
