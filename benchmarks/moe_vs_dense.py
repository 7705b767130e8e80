"""MoE-Tuning on the built-in benchmark: a dense stage-2 model vs its stage-3 MoE (top-k of E experts).

From one dense checkpoint, runs with the same data, steps, batch, learning rate and seed:
  dense: `--stage finetune` continued (LLM + projector train),
  moe:   `--stage moe` with MoE-LLaVA's defaults (FFNs of layers 0, 2, ... upcycled into top-2 of E experts,
         Gumbel-sampled second expert, capacity 1.5 / 2.0; experts, routers, the other layers' FFNs and the
         projector train),
  moe_top1 (with --top1): the same at top-1 (equal active parameters; weighted by the raw probability).
Both (and the starting checkpoint) are scored on the held-out QA and POPE files; the MoE's expert load is
counted on the QA test conversations (max/min share over experts, per layer). Prints one table; writes
OUT/summary.json.

    PYTHONPATH=. python benchmarks/moe_vs_dense.py --base runs/demo/finetune --data runs/demo/data \
        --out /tmp/moe_vs_dense [--steps 150 --learning_rate 5e-4 --num_experts 4 --top_k_experts 2 --top1]
"""

import argparse
import json
from pathlib import Path

from torch.utils.data import DataLoader

from sparsevl.analyze.routing import routing_counts
from sparsevl.config import parse_train_args
from sparsevl.data.dataset import LlavaJsonDataset, PaddingCollator
from sparsevl.eval.run import evaluate, load_for_inference
from sparsevl.model.upcycle import moe_feed_forwards
from sparsevl.train.run import train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="dense stage-2 sparsevl checkpoint (e.g. runs/demo/finetune)")
    p.add_argument("--data", required=True, help="shapes data folder (finetune.json, test_qa.json, test_pope.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_experts", type=int, default=4)
    p.add_argument("--top_k_experts", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top1", action="store_true", help="also a top-1 MoE run (row moe_top1)")
    return p


def run(stage: str, args, out: Path, extra: dict) -> Path:
    flags = {"stage": stage, "model_name_or_path": args.base, "data_path": Path(args.data) / "finetune.json",
             "output_dir": out, "max_steps": args.steps, "learning_rate": args.learning_rate,
             "per_device_train_batch_size": args.batch_size, "warmup_steps": 0.05, "weight_decay": 0.0,
             "logging_steps": 25, "save_steps": 100000, "report_to": "none", "seed": args.seed, **extra}
    return train(*parse_train_args([t for k, v in flags.items() for t in (f"--{k}", str(v))]))


def score(model_dir: Path, data: Path, out: Path) -> dict:
    model, tokenizer, image_processor = load_for_inference(model_dir)
    metrics = evaluate(model, tokenizer, image_processor, [data / "test_qa.json", data / "test_pope.json"],
                       out_dir=out)
    active, total = active_parameters(model)
    result = {"qa_accuracy": metrics["qa"]["overall"]["accuracy"],
              "qa_by_type": {k: v["accuracy"] for k, v in metrics["qa"].items()},
              "pope_accuracy": metrics["pope"]["overall"]["accuracy"],
              "llm_active_params": active, "llm_total_params": total}
    if moe_feed_forwards(model.llm):
        dataset = LlavaJsonDataset(data / "test_qa.json", tokenizer=tokenizer, image_processor=image_processor,
                                   num_image_tokens=model.num_image_tokens)
        loader = DataLoader(dataset, batch_size=32, collate_fn=PaddingCollator(tokenizer.pad_token_id))
        counts = routing_counts(model, loader)
        result["max_over_min_load"] = {name: max(t + i for t, i in zip(c["text"], c["image"]))
                                       / max(min(t + i for t, i in zip(c["text"], c["image"])), 1)
                                       for name, c in counts.items()}
    return result


def active_parameters(model) -> tuple[int, int]:
    """(parameters a token uses, all parameters) of the LLM: per MoE layer only top_k of its experts."""
    total = sum(p.numel() for p in model.llm.parameters())
    idle = 0
    for _, ffn in moe_feed_forwards(model.llm):
        per_expert = sum(p.numel() for p in ffn.moe.experts.parameters()) // ffn.moe.router.num_experts
        idle += per_expert * (ffn.moe.router.num_experts - ffn.moe.router.top_k)
    return total - idle, total


def main() -> None:
    args = parser().parse_args()
    out = Path(args.out)
    data = Path(args.data)
    results = {"base": score(Path(args.base), data, out / "eval_base")}
    dense = run("finetune", args, out / "dense", {})
    results["dense"] = score(dense, data, out / "eval_dense")
    variants = {"moe": args.top_k_experts, **({"moe_top1": 1} if args.top1 else {})}
    for name, top_k in variants.items():
        moe = run("moe", args, out / name, {"num_experts": args.num_experts, "top_k_experts": top_k})
        results[name] = score(moe, data, out / f"eval_{name}")
    results["settings"] = vars(args)
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    for name in ("base", "dense", *variants):
        r = results[name]
        loads = r.get("max_over_min_load")
        load_text = "" if loads is None else "  max/min load " + ", ".join(f"{k} {v:.2f}" for k, v in loads.items())
        print(f"{name:<8} QA {r['qa_accuracy']:.3f}  POPE {r['pope_accuracy']:.3f}  LLM active params "
              f"{r['llm_active_params']:,} of {r['llm_total_params']:,}{load_text}")


if __name__ == "__main__":
    main()
