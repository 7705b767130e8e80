"""Adaptive layer selection against each fixed vision layer on the built-in shapes benchmark.

Every variant trains the same tiny model from scratch with the demo's two-stage recipe (`sparsevl demo`:
stage 1 on one-object scenes, stage 2 on scenes of 1-6 objects, lr 3e-4, vision tower trained too) and the
same data order, then answers the held-out test questions. Prints accuracy per question type for each
variant and the adaptive models' layer-selection distribution (overall and per question type). `adaptive-cls`
trains the LM on the classifier's choice (the default), `adaptive-best` on each sample's lowest-loss layer,
`adaptive-all` on all three tried layers.

    python -m benchmarks.adaptive_vs_fixed --out runs/adaptive_vs_fixed [--only "fixed -1" adaptive-cls] [--seeds 0 1 2]

One training seed moves accuracy by a point or more here, so compare means over `--seeds`. A variant whose
final checkpoint exists is evaluated, not retrained; results.json is merged on write, so two processes with
different `--only` or `--seeds` may share one `--out` (start the second once data/ exists). `--eval_data FILE`
scores a larger held-out set instead of the 500 built-in test questions.

`--pretrained_tower CHECKPOINT` is the LLaVA setting instead: every variant reads the vision tower of a trained
sparsevl checkpoint (e.g. the demo's), frozen, and trains a fresh projector + LLM on it.
"""

import argparse
import json
import shutil
import statistics
from pathlib import Path

from sparsevl.config import parse_train_args
from sparsevl.demo import FINETUNE_FLAGS, MODEL_FLAGS, PRETRAIN_FLAGS, make_demo_data

ADAPTIVE_FLAGS = {"use_adaptive_layer_selection": True, "top_k_layers": 3, "layer_classifier_loss_weight": 0.1}


def variants(middle_layer: int, warmup_steps: int, exploration_rate: float) -> dict[str, dict]:
    exploration = {"layer_exploration_warmup_steps": warmup_steps, "layer_exploration_rate": exploration_rate}
    return {"fixed -1": {"mm_vision_select_layer": -1}, "fixed -2": {"mm_vision_select_layer": -2},
            f"fixed {middle_layer}": {"mm_vision_select_layer": middle_layer},
            "adaptive-best": {**ADAPTIVE_FLAGS, **exploration, "layer_lm_loss_from": "best"},
            "adaptive-cls": {**ADAPTIVE_FLAGS, **exploration, "layer_lm_loss_from": "classifier"},
            "adaptive-all": {**ADAPTIVE_FLAGS, **exploration, "layer_lm_loss_from": "all"}}


def export_vision_tower(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's vision encoder as a transformers model folder (safetensors + config + processor)."""
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds, one run per variant each (the data always use seed 0)")
    parser.add_argument("--eval_data", type=Path, default=None,
                        help="held-out QA file to score (default: the 500 built-in test questions), e.g. from "
                             "`sparsevl data shapes --out DIR --num_train 1 --num_test 3000 --seed 11`")
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
    from sparsevl.model.build import WEIGHTS_NAME
    from sparsevl.train.run import train

    common = {**MODEL_FLAGS, "vision_tower": args.vision_tower, "tokenizer_name_or_path": out / "tokenizer",
              "per_device_train_batch_size": args.batch_size, "learning_rate": args.learning_rate,
              "logging_steps": 100, "save_steps": 100000, "report_to": "none", "disable_tqdm": True}
    if args.pretrained_tower:
        tower = export_vision_tower(args.pretrained_tower, out / "pretrained_tower")
        common.update(vision_tower=tower, unfreeze_mm_vision_tower=False)
    test_data = args.eval_data or data / "test_qa.json"
    results_path = out / "results.json"
    for name, extra in variants(args.middle_layer, args.exploration_warmup_steps, args.exploration_rate).items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            run_dir = out / f"{name}_seed{seed}".replace(" ", "_")
            stage2 = run_dir / "finetune"
            print(f"\n=== {name}, seed {seed}: {extra} ===", flush=True)
            if not (stage2 / WEIGHTS_NAME).is_file():
                flags = {**common, **extra, "seed": seed}
                stage1 = train(*parse_train_args(_flags({**flags, **PRETRAIN_FLAGS, "data_path": simple / "finetune.json",
                                                          "max_steps": args.pretrain_steps,
                                                          "output_dir": run_dir / "pretrain"})))
                stage2 = train(*parse_train_args(_flags({**flags, **FINETUNE_FLAGS, "model_name_or_path": stage1,
                                                          "data_path": data / "finetune.json",
                                                          "max_steps": args.finetune_steps, "output_dir": stage2})))
            model, tokenizer, processor = load_for_inference(stage2)
            result = {"qa": evaluate(model, tokenizer, processor, [test_data], out_dir=run_dir / "eval")["qa"]}
            if model.layer_selector is not None:
                result["layers"] = analyze_layers(model, tokenizer, processor, [test_data])
                print(format_breakdown(result["layers"]), flush=True)
            _merge_result(results_path, name, seed, result)
    print(f"\nstage 1 {args.pretrain_steps} + stage 2 {args.finetune_steps} steps x batch {args.batch_size}, "
          f"test questions: {test_data}")
    results = json.loads(results_path.read_text())
    print(format_summary(results))
    print(format_paired(results))


def _merge_result(results_path: Path, name: str, seed: int, result: dict) -> None:
    """Add one run to results.json, re-reading it first so that concurrent invocations keep each other's runs."""
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault(name, {})[str(seed)] = result
    results_path.write_text(json.dumps(results, indent=2))


def format_summary(results: dict) -> str:
    """Accuracy per question type, mean over seeds, with the overall spread (sample std) and each seed's value."""
    types = list(next(iter(next(iter(results.values())).values()))["qa"])
    lines = [f"{'variant':<14}{'seeds':>6}" + "".join(f"{t:>10}" for t in types) + "     std  per seed (overall)"]
    for name, runs in results.items():
        runs = dict(sorted(runs.items(), key=lambda item: int(item[0])))
        overall = [run["qa"]["overall"]["accuracy"] for run in runs.values()]
        means = [statistics.mean(run["qa"][t]["accuracy"] for run in runs.values()) for t in types]
        spread = statistics.stdev(overall) if len(overall) > 1 else float("nan")
        lines.append(f"{name:<14}{len(runs):>6}" + "".join(f"{m:10.3f}" for m in means) + f"{spread:8.3f}  "
                     + " ".join(f"{seed}:{value:.3f}" for seed, value in zip(runs, overall)))
    return "\n".join(lines)


def format_paired(results: dict) -> str:
    """Each adaptive variant minus the fixed layer with the best mean, seed by seed (the same seed shares the
    data order and initialisation), with the standard error of the mean difference."""
    overall = {name: {seed: run["qa"]["overall"]["accuracy"] for seed, run in runs.items()}
               for name, runs in results.items()}
    fixed = [name for name in results if name.startswith("fixed")]
    if not fixed:
        return ""
    best = max(fixed, key=lambda name: statistics.mean(overall[name].values()))
    lines = []
    for name in results:
        shared = sorted(overall[name].keys() & overall[best].keys(), key=int)
        diffs = [overall[name][seed] - overall[best][seed] for seed in shared]
        if name in fixed or not diffs:
            continue
        error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        lines.append(f"{name} - {best} (best fixed mean), {len(diffs)} paired seeds: mean {statistics.mean(diffs):+.4f}"
                     f" +- {error:.4f} (standard error); per seed "
                     + " ".join(f"{seed}:{diff:+.3f}" for seed, diff in zip(shared, diffs)))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
