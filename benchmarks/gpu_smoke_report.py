"""Summarise `sparsevl train` runs of benchmarks/gpu_smoke.sh: samples/s, tokens/s and peak memory per run."""

import argparse
import json
from pathlib import Path


def summary(run: Path, visual_tokens: int) -> str:
    """One line from a run's log_history.json and train_config.json."""
    history = json.loads((run / "log_history.json").read_text())
    final = history[-1]
    config = json.loads((run / "train_config.json").read_text())["SparseVLTrainingArguments"]
    samples = final["train_samples_per_second"] * final["train_runtime"]
    text_tokens = max(e.get("num_input_tokens_seen", 0) for e in history)
    # each <image> placeholder of the text stands for visual_tokens LLM positions
    tokens = text_tokens + samples * (visual_tokens - 1)
    peak = final.get("train_mem_gpu_peaked_delta", 0) + final.get("train_mem_gpu_alloc_delta", 0)
    return (f"{run.name}: {final['train_samples_per_second']:.1f} samples/s, {tokens / final['train_runtime']:.0f} "
            f"LLM tokens/s, peak GPU memory (rank 0) {peak / 2**30:.2f} GiB, bf16 {config['bf16']}, "
            f"fsdp {bool(config['fsdp'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--visual_tokens", type=int, default=576)
    args = parser.parse_args()
    for run in args.runs:
        print(summary(run, args.visual_tokens))


if __name__ == "__main__":
    main()
