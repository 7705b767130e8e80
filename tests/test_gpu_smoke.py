"""benchmarks/gpu_smoke.sh on CPU: --dry_run prints commands whose flags parse; the report reads a run's logs."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_smoke_report import summary
from sparsevl.config import parse_train_args
from sparsevl.data.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_dry_run_prints_1_and_n_device_bf16_runs_whose_flags_parse(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "--dry_run", "--devices", "4",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    trains = [c[c.index("train") + 1:] for c in commands if "sparsevl" in c and "train" in c]
    assert len(trains) == 2 and not (tmp_path / "data").exists()  # printed, not run
    for flags in trains:  # bf16 is refused on a machine without a GPU: checked as text, the rest parsed
        position = flags.index("--bf16")
        assert flags[position + 1] == "True"
        del flags[position:position + 2]
    one, four = (parse_train_args(flags) for flags in trains)
    assert one[0].model_name_or_path == "mid-qwen3" and one[0].vision_tower == "mid-clip"
    assert not one[2].fsdp and four[2].fsdp and four[2].output_dir.endswith("train_4")
    assert ["torchrun", "--nproc_per_node", "4"] == commands[3][:3]
    data = next(c for c in commands if "data" in c)
    build_parser().parse_args(data[data.index("data") + 1:])
    prefill = next(c for c in commands if c[:3] == ["python", "-m", "benchmarks.pruning_prefill"])
    assert prefill[3:] == ["--visual", "576", "--kept", "64", "--layer", "2", "--device", "cuda", "--dtype", "bfloat16"]


def test_pruning_prefill_runs_with_the_device_and_dtype_flags_it_is_given():
    result = subprocess.run([sys.executable, "-m", "benchmarks.pruning_prefill", "--visual", "16", "--text", "8",
                             "--kept", "4", "--repeats", "1", "--decode_steps", "2", "--device", "cpu", "--dtype",
                             "float32"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "16 visual + 8 text tokens; keep 4 before layer 2" in result.stdout


def test_gpu_smoke_dry_run_refuses_unknown_arguments():
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "--dry_run", "--gpus", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown argument --gpus" in result.stderr


def test_gpu_smoke_report_counts_visual_tokens_and_memory(tmp_path):
    (tmp_path / "log_history.json").write_text(json.dumps([
        {"loss": 1.0, "step": 10, "num_input_tokens_seen": 4000},
        {"train_runtime": 10.0, "train_samples_per_second": 8.0, "train_mem_gpu_alloc_delta": 2**30,
         "train_mem_gpu_peaked_delta": 2**30, "step": 10}]))
    (tmp_path / "train_config.json").write_text(json.dumps({"SparseVLTrainingArguments": {"bf16": True, "fsdp": True}}))
    line = summary(tmp_path, visual_tokens=576)
    # 80 samples: 4000 text tokens + 80 x 575 more visual positions = 50000 tokens in 10 s
    assert line == f"{tmp_path.name}: 8.0 samples/s, 5000 LLM tokens/s, peak GPU memory (rank 0) 2.00 GiB, bf16 True, fsdp True"
