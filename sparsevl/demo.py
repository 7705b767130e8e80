"""`sparsevl demo`: the end-to-end run on the built-in shapes benchmark, from nothing to a scored model.

Generates data, builds a tokenizer, trains a tiny model from scratch (stage 1 on one-object scenes,
stage 2 on scenes of 1-6 objects), evaluates on held-out images and saves a training-curve figure.

Why this recipe (measured, see the notes of issue 2): from random weights, visual tokens start with a
large image-independent component; at lr 1e-3 the LLM settles on the text prior and never reads them,
at 3e-4 it does. One-object scenes first teach it to read colour and shape (there is nothing to
choose between), which then transfers to finding the object a question names.
"""

import argparse
import json
import time
from pathlib import Path

from sparsevl.config import parse_train_args
from sparsevl.data.shapes import generate_shapes_dataset
from sparsevl.data.tokenizer import build_tokenizer, save_tokenizer, texts_from_llava_json

# The demo's recipe. Both stages train everything: a from-scratch model has no pretrained backbone to keep.
MODEL_FLAGS = {"model_name_or_path": "tiny-qwen3", "vision_tower": "tiny-clip16", "unfreeze_mm_vision_tower": True,
               "mm_vision_select_layer": -1}
PRETRAIN_FLAGS = {"stage": "pretrain", "tune_mm_mlp_adapter": False, "conversation_template": "chat",
                  "warmup_steps": 0.05, "weight_decay": 0.0}
FINETUNE_FLAGS = {"stage": "finetune", "warmup_steps": 0.05, "weight_decay": 0.0}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevl demo", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="folder for data, checkpoints, metrics and figures")
    p.add_argument("--num_train", type=int, default=4000, help="training images")
    p.add_argument("--num_test", type=int, default=500, help="held-out test images")
    p.add_argument("--num_simple", type=int, default=2000, help="one-object training images for stage 1")
    p.add_argument("--max_objects", type=int, default=6, help="most objects per stage-2 scene (4x4 grid: <= 16)")
    p.add_argument("--small_objects", type=int, default=0, help="percent of stage-2 objects drawn small (adds "
                   "'small' questions)")
    p.add_argument("--qa_per_image", type=int, default=4, help="one-question records per training image")
    p.add_argument("--pretrain_steps", type=int, default=400, help="optimizer steps on one-object scenes")
    p.add_argument("--finetune_steps", type=int, default=1200, help="optimizer steps on 1-6 object scenes")
    p.add_argument("--batch_size", type=int, default=64, help="samples per step")
    p.add_argument("--learning_rate", type=float, default=3e-4, help="peak learning rate of both stages")
    p.add_argument("--vision_tower", default=MODEL_FLAGS["vision_tower"], help="vision preset")
    p.add_argument("--model_name_or_path", default=MODEL_FLAGS["model_name_or_path"], help="LLM preset")
    p.add_argument("--seed", type=int, default=0, help="seed for data and training")
    return p


def _flags(values: dict) -> list[str]:
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


def make_demo_data(out: Path, *, num_train: int, num_test: int, num_simple: int, qa_per_image: int,
                   seed: int, max_objects: int = 6, small_objects: int = 0) -> tuple[Path, Path, dict]:
    """The demo's data under `out`: data/ (scenes of 1-6 objects), data_simple/ (one object, for stage 1) and
    tokenizer/ (built on data/'s captions and questions). Returns (data dir, simple dir, data/'s counts)."""
    data_dir, simple_dir = out / "data", out / "data_simple"
    counts = generate_shapes_dataset(data_dir, num_train=num_train, num_test=num_test, image_size=64, grid=4,
                                     min_objects=1, max_objects=max_objects, qa_per_image=qa_per_image, seed=seed,
                                     small_objects=small_objects)
    generate_shapes_dataset(simple_dir, num_train=num_simple, num_test=0, image_size=64, grid=4, min_objects=1,
                            max_objects=1, qa_per_image=qa_per_image, seed=seed + 1)
    tokenizer = build_tokenizer(texts_from_llava_json([data_dir / "captions.json", data_dir / "finetune.json"]))
    save_tokenizer(tokenizer, out / "tokenizer")
    return data_dir, simple_dir, counts


def run_stage(name: str, flags: dict, out: Path) -> Path:
    print(f"\n=== {name} ===", flush=True)
    from sparsevl.train.run import train

    return train(*parse_train_args(_flags(flags)))


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    timings, started = {}, time.perf_counter()
    data_dir, simple_dir, counts = make_demo_data(out, num_train=args.num_train, num_test=args.num_test,
                                                  num_simple=args.num_simple, qa_per_image=args.qa_per_image,
                                                  seed=args.seed, max_objects=args.max_objects,
                                                  small_objects=args.small_objects)
    print(f"data: {counts}")
    timings["data_and_tokenizer_s"] = time.perf_counter() - started

    common = {**MODEL_FLAGS, "vision_tower": args.vision_tower, "model_name_or_path": args.model_name_or_path,
              "learning_rate": args.learning_rate, "tokenizer_name_or_path": out / "tokenizer", "per_device_train_batch_size":
              args.batch_size, "seed": args.seed, "logging_steps": 25, "save_steps": 100000, "report_to": "tensorboard"}
    stage_start = time.perf_counter()
    pretrained = run_stage("stage 1 (one-object scenes)", {**common, **PRETRAIN_FLAGS,
                           "data_path": simple_dir / "finetune.json",
                           "max_steps": args.pretrain_steps, "output_dir": out / "pretrain"}, out)
    timings["pretrain_s"] = time.perf_counter() - stage_start
    stage_start = time.perf_counter()
    finetuned = run_stage("stage 2 (scenes of 1-6 objects)", {**common, **FINETUNE_FLAGS, "model_name_or_path": pretrained,
                          "data_path": data_dir / "finetune.json", "max_steps": args.finetune_steps,
                          "output_dir": out / "finetune"}, out)
    timings["finetune_s"] = time.perf_counter() - stage_start

    print("\n=== evaluation (held-out images) ===", flush=True)
    from sparsevl.eval.run import evaluate, format_metrics, load_for_inference
    from sparsevl.viz.curves import plot_training_curves

    stage_start = time.perf_counter()
    metrics = evaluate(*load_for_inference(finetuned), [data_dir / "test_qa.json", data_dir / "test_pope.json"],
                       out_dir=out / "eval")
    timings["eval_s"] = time.perf_counter() - stage_start
    histories = {name: json.loads((out / name / "log_history.json").read_text()) for name in ("pretrain", "finetune")}
    figure = plot_training_curves(histories, out / "training_curve.png")
    timings["total_s"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps({"metrics": metrics, "timings": timings}, indent=2))
    print(format_metrics(metrics))
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"figure: {figure}\nmodel: {finetuned}\nmetrics: {out / 'eval' / 'metrics.json'}")
    return 0
