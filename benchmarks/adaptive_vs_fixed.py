"""Adaptive layer selection against each fixed vision layer on the built-in shapes benchmark.

Every variant trains the same tiny model from scratch with the demo's two-stage recipe (`sparsevl demo`:
stage 1 on one-object scenes, stage 2 on scenes of 1-6 objects, lr 3e-4, vision tower trained too) and the
same data order, then answers the held-out test questions. Prints accuracy per question type for each
variant and the adaptive models' layer-selection distribution (overall and per question type). `adaptive`
trains the LM on each sample's lowest-loss layer (the seed's rule), `adaptive-cls` on the classifier's choice.

    python -m benchmarks.adaptive_vs_fixed --out runs/adaptive_vs_fixed [--only "fixed -1" adaptive]

`--pretrained_tower CHECKPOINT` is the LLaVA setting instead: every variant reads the vision tower of a trained
sparsevl checkpoint (e.g. the demo's), frozen, and trains a fresh projector + LLM on it.
"""

import argparse
import json
from pathlib import Path

from sparsevl.config import parse_train_args
from sparsevl.demo import FINETUNE_FLAGS, MODEL_FLAGS, PRETRAIN_FLAGS, make_demo_data

ADAPTIVE_FLAGS = {"use_adaptive_layer_selection": True, "top_k_layers": 3, "layer_classifier_loss_weight": 0.1}


def variants(middle_layer: int, warmup_steps: int, exploration_rate: float) -> dict[str, dict]:
    exploration = {"layer_exploration_warmup_steps": warmup_steps, "layer_exploration_rate": exploration_rate}
    return {"fixed -1": {"mm_vision_select_layer": -1}, "fixed -2": {"mm_vision_select_layer": -2},
            f"fixed {middle_layer}": {"mm_vision_select_layer": middle_layer},
            "adaptive": {**ADAPTIVE_FLAGS, **exploration},
            "adaptive-cls": {**ADAPTIVE_FLAGS, **exploration, "layer_lm_loss_from": "classifier"}}


def export_vision_tower(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's vision encoder as a transformers model folder (safetensors + config + processor)."""
    import shutil

    from sparsevl.model.build import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    model.vision_tower.encoder.save_pretrained(out, safe_serialization=True)
    shutil.copy(checkpoint / "preprocessor_config.json", out / "preprocessor_config.json")
    return out


def _flags(values: dict) -> list[str]:
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/adaptive_vs_fixed")
    parser.add_argument("--pretrain_steps", type=int, default=400, help="stage-1 optimizer steps per variant")
    parser.add_argument("--finetune_steps", type=int, default=1200, help="stage-2 optimizer steps per variant")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--num_simple", type=int, default=2000)
    parser.add_argument("--num_test", type=int, default=500)
    parser.add_argument("--vision_tower", default="tiny-clip16", help="vision preset (tiny-clip16: 16 visual tokens)")
    parser.add_argument("--middle_layer", type=int, default=2, help="the middle fixed layer compared")
    parser.add_argument("--exploration_warmup_steps", type=int, default=20, help="per stage")
    parser.add_argument("--exploration_rate", type=float, default=0.0, help="share of images exploring after it")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the data always use seed 0)")
    parser.add_argument("--pretrained_tower", type=Path, default=None,
                        help="a sparsevl checkpoint whose vision tower every variant reads, frozen")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (names as printed)")
    args = parser.parse_args()
    out = Path(args.out)
    data, simple = out / "data", out / "data_simple"
    if not (data / "test_qa.json").is_file():
        make_demo_data(out, num_train=args.num_train, num_test=args.num_test, num_simple=args.num_simple,
                       qa_per_image=4, seed=0)
    from sparsevl.analyze.layers import analyze_layers, format_breakdown
    from sparsevl.eval.run import evaluate, load_for_inference
    from sparsevl.train.run import train

    common = {**MODEL_FLAGS, "vision_tower": args.vision_tower, "tokenizer_name_or_path": out / "tokenizer",
              "per_device_train_batch_size": args.batch_size, "learning_rate": args.learning_rate,
              "logging_steps": 100, "save_steps": 100000, "report_to": "none", "disable_tqdm": True, "seed": args.seed}
    if args.pretrained_tower:
        tower = export_vision_tower(args.pretrained_tower, out / "pretrained_tower")
        common.update(vision_tower=tower, unfreeze_mm_vision_tower=False)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name, extra in variants(args.middle_layer, args.exploration_warmup_steps, args.exploration_rate).items():
        if args.only and name not in args.only:
            continue
        run_dir = out / name.replace(" ", "_")
        print(f"\n=== {name}: {extra} ===", flush=True)
        stage1 = train(*parse_train_args(_flags({**common, **PRETRAIN_FLAGS, **extra, "data_path": simple / "finetune.json",
                                                  "max_steps": args.pretrain_steps, "output_dir": run_dir / "pretrain"})))
        stage2 = train(*parse_train_args(_flags({**common, **FINETUNE_FLAGS, **extra, "model_name_or_path": stage1,
                                                  "data_path": data / "finetune.json", "max_steps": args.finetune_steps,
                                                  "output_dir": run_dir / "finetune"})))
        model, tokenizer, processor = load_for_inference(stage2)
        metrics = evaluate(model, tokenizer, processor, [data / "test_qa.json"], out_dir=run_dir / "eval")
        results[name] = {"qa": metrics["qa"]}
        if model.layer_selector is not None:
            analysis = analyze_layers(model, tokenizer, processor, [data / "test_qa.json"])
            results[name]["layers"] = analysis
            print(format_breakdown(analysis), flush=True)
        results_path.write_text(json.dumps(results, indent=2))
    types = list(next(iter(results.values()))["qa"])
    print(f"\nstage 1 {args.pretrain_steps} + stage 2 {args.finetune_steps} steps x batch {args.batch_size}, "
          f"test questions: {args.num_test}")
    print(f"{'variant':<12}" + "".join(f"{t:>10}" for t in types))
    for name, result in results.items():
        print(f"{name:<12}" + "".join(f"{result['qa'][t]['accuracy']:10.3f}" for t in types))


if __name__ == "__main__":
    main()
