"""Adaptive layer selection against each fixed vision layer on the built-in shapes benchmark.

Every variant trains the same tiny model from scratch with the same recipe and data order (finetune questions,
vision tower trained too), then answers the held-out test questions. Prints accuracy per question type for each
variant and the adaptive models' layer-selection distribution (overall and per question type). `adaptive` trains
the LM on each sample's lowest-loss layer (the seed's rule), `adaptive-cls` on the classifier's own choice.

    python -m benchmarks.adaptive_vs_fixed --out runs/adaptive_vs_fixed [--steps 200]
"""

import argparse
import json
from pathlib import Path

from sparsevl.config import parse_train_args
from sparsevl.data.shapes import generate_shapes_dataset
from sparsevl.data.tokenizer import build_tokenizer, save_tokenizer, texts_from_llava_json

ADAPTIVE_FLAGS = {"use_adaptive_layer_selection": True, "top_k_layers": 3, "layer_classifier_loss_weight": 0.1}


def variants(middle_layer: int, warmup_steps: int) -> dict[str, dict]:
    return {"fixed -1": {"mm_vision_select_layer": -1}, "fixed -2": {"mm_vision_select_layer": -2},
            f"fixed {middle_layer}": {"mm_vision_select_layer": middle_layer},
            "adaptive": {**ADAPTIVE_FLAGS, "layer_exploration_warmup_steps": warmup_steps},
            "adaptive-cls": {**ADAPTIVE_FLAGS, "layer_exploration_warmup_steps": warmup_steps,
                             "layer_lm_loss_from": "classifier"}}


def _flags(values: dict) -> list[str]:
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/adaptive_vs_fixed")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per variant")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--num_test", type=int, default=200)
    parser.add_argument("--vision_tower", default="tiny-clip16", help="vision preset (tiny-clip16: 16 visual tokens)")
    parser.add_argument("--middle_layer", type=int, default=2, help="the middle fixed layer compared")
    parser.add_argument("--exploration_warmup_steps", type=int, default=20)
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (names as printed)")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "test_qa.json").is_file():
        generate_shapes_dataset(data, num_train=args.num_train, num_test=args.num_test, image_size=64, grid=4,
                                min_objects=1, max_objects=6, qa_per_image=3, seed=0)
        save_tokenizer(build_tokenizer(texts_from_llava_json([data / "captions.json", data / "finetune.json"])),
                       out / "tokenizer")
    from sparsevl.analyze.layers import analyze_layers, format_breakdown
    from sparsevl.eval.run import evaluate, load_for_inference
    from sparsevl.train.run import train

    common = {"model_name_or_path": "tiny-qwen3", "vision_tower": args.vision_tower, "unfreeze_mm_vision_tower": True,
              "tokenizer_name_or_path": out / "tokenizer", "data_path": data / "finetune.json",
              "per_device_train_batch_size": args.batch_size, "learning_rate": args.learning_rate,
              "max_steps": args.steps, "warmup_steps": 0.05, "weight_decay": 0.0, "logging_steps": 25,
              "save_steps": 100000, "report_to": "none", "disable_tqdm": True, "seed": 0}
    results = {}
    for name, extra in variants(args.middle_layer, args.exploration_warmup_steps).items():
        if args.only and name not in args.only:
            continue
        run_dir = out / name.replace(" ", "_")
        print(f"\n=== {name}: {extra} ===", flush=True)
        train(*parse_train_args(_flags({**common, **extra, "output_dir": run_dir})))
        model, tokenizer, processor = load_for_inference(run_dir)
        metrics = evaluate(model, tokenizer, processor, [data / "test_qa.json"], out_dir=run_dir / "eval")
        results[name] = {"qa": metrics["qa"]}
        if model.layer_selector is not None:
            analysis = analyze_layers(model, tokenizer, processor, [data / "test_qa.json"])
            results[name]["layers"] = analysis
            print(format_breakdown(analysis), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    types = list(next(iter(results.values()))["qa"])
    print(f"\n{args.steps} steps x batch {args.batch_size}, test questions: {args.num_test}")
    print(f"{'variant':<12}" + "".join(f"{t:>10}" for t in types))
    for name, result in results.items():
        print(f"{name:<12}" + "".join(f"{result['qa'][t]['accuracy']:10.3f}" for t in types))


if __name__ == "__main__":
    main()
