"""A LLaVA-sized data set: time until training starts and resident memory of the data pipeline.

Writes a 200,000-record LLaVA JSON (1-3 question/answer turns, ~10% text-only records; image records share
--num_images 336x336 JPEGs), then times `sparsevl train`'s own path (build_trainer + Trainer.train, tiny
presets, --dataloader_num_workers 2) from the start until the first optimizer step ends. Memory: the main
process's resident set at the end of --steps steps minus its resident set once the model alone was built, plus
the private memory (USS) of every DataLoader worker. Targets: start within 60 s, <= 1024 MB.

    python -m benchmarks.data_scale [--records 200000] [--steps 20] [--out runs/data_scale]
"""

import argparse
import json
import os
import random
import time
from pathlib import Path

from PIL import Image
from transformers import TrainerCallback

WORDS = ("red blue green yellow circle square triangle left right top bottom middle small large how many what "
         "colour shape is the a of in image picture there are which object next to above below near").split()


def rss_mb(pid: int | str = "self", field: str = "Rss") -> float:
    """Resident (Rss) or private (Private_Clean + Private_Dirty) memory of a process in MiB, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        values[key] = int(value.split()[0])
    kib = values["Rss"] if field == "Rss" else values["Private_Clean"] + values["Private_Dirty"]
    return kib / 1024


def worker_pids() -> list[int]:
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return [int(pid) for pid in children]


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_data(out: Path, *, records: int, num_images: int, seed: int = 0) -> Path:
    """The LLaVA JSON and its images (kept when already there)."""
    rng = random.Random(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        path = images / f"{i:05d}.jpg"
        if not path.exists():
            Image.new("RGB", (336, 336), tuple(rng.randrange(256) for _ in range(3))).save(path, quality=90)
    data = []
    for i in range(records):
        turns = []
        for t in range(rng.randint(1, 3)):
            turns += [{"from": "human", "value": sentence(rng, 5, 15) + "?"},
                      {"from": "gpt", "value": sentence(rng, 3, 30) + "."}]
        record = {"id": f"r{i}", "conversations": turns}
        if rng.random() < 0.9:
            record["image"] = f"images/{rng.randrange(num_images):05d}.jpg"
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        data.append(record)
    path = out / "llava.json"
    path.write_text(json.dumps(data))
    return path


class StepClock(TrainerCallback):
    """Seconds from `start` until the first optimizer step ends; memory after the last."""

    def __init__(self, start: float):
        self.start, self.first_step_s, self.main_mb, self.workers_mb = start, None, 0.0, 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.start
        self.main_mb = rss_mb()
        self.workers_mb = sum(rss_mb(pid, "Private") for pid in worker_pids())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="runs/data_scale")
    args = parser.parse_args()
    from sparsevl.config import parse_train_args
    from sparsevl.data.tokenizer import build_tokenizer, save_tokenizer
    from sparsevl.train.run import build_trainer, load_model_and_processors

    out = Path(args.out)
    data_path = write_data(out, records=args.records, num_images=args.num_images)
    save_tokenizer(build_tokenizer([" ".join(WORDS)] * 4), out / "tokenizer")
    flags = ["--model_name_or_path", "tiny-qwen3", "--vision_tower", "tiny-clip", "--tokenizer_name_or_path",
             str(out / "tokenizer"), "--data_path", str(data_path), "--output_dir", str(out / "run"),
             "--max_steps", str(args.steps), "--per_device_train_batch_size", "16", "--dataloader_num_workers", "2",
             "--report_to", "none", "--save_steps", "100000", "--logging_steps", "100000"]
    load_model_and_processors(parse_train_args(flags)[0])  # what the model alone costs: imports, weights
    model_mb = rss_mb()
    start = time.perf_counter()
    trainer, _ = build_trainer(*parse_train_args(flags))
    built_s = time.perf_counter() - start
    clock = StepClock(start)
    trainer.add_callback(clock)
    trainer.train()
    print(f"records: {len(trainer.train_dataset)}; model, data set and trainer built in {built_s:.1f} s")
    print(f"first optimizer step ended {clock.first_step_s:.1f} s after the start (target <= 60 s)")
    print(f"main process resident memory: {model_mb:.0f} MB with the model alone, {clock.main_mb:.0f} MB after "
          f"{args.steps} steps; DataLoader workers' private memory: {clock.workers_mb:.0f} MB")
    total = clock.main_mb - model_mb + clock.workers_mb
    print(f"data pipeline memory for {args.records} records: {total:.0f} MB")


if __name__ == "__main__":
    main()
