"""`python -m sparsevl.classify [download] ...`: train and/or test the Diff-MoE classifier, or fetch a dataset."""

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sparsevl.classify import download
from sparsevl.classify.checkpoint import load_checkpoint, save_checkpoint
from sparsevl.classify.config import check_model_flags, parse_args
from sparsevl.classify.data import load_dataset
from sparsevl.classify.figures import write_figures
from sparsevl.classify.train import build_model, evaluate, train


def run(argv: list[str]) -> dict:
    """Train and/or test as the flags say; returns the metrics also written to <save_dir>/metrics.json."""
    model_cfg, data_cfg, train_cfg = parse_args(argv)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    torch.manual_seed(train_cfg.seed)
    save_dir = Path(train_cfg.save_dir)
    checkpoint = Path(train_cfg.checkpoint or save_dir / "checkpoint")
    metrics = {"dataset": data_cfg.dataset, "mode": train_cfg.mode, "checkpoint": str(checkpoint)}
    history = []
    if train_cfg.mode == "test":  # the model comes from the checkpoint; a contradicting model flag is an error
        model, tokenizer, meta = load_checkpoint(checkpoint)
        check_model_flags(model_cfg, model.config, checkpoint)
        model_cfg = model.config
    data = load_dataset(data_cfg.dataset, data_cfg.data_root, img_size=model_cfg.img_size,
                        in_channels=model_cfg.in_channels, max_train_samples=data_cfg.max_train_samples)
    if train_cfg.mode == "test" and meta["num_classes"] != len(data.class_names):
        raise ValueError(f"{checkpoint}: trained for {meta['num_classes']} classes ({meta['dataset']}), "
                         f"but {data_cfg.dataset} has {len(data.class_names)}")
    if train_cfg.mode != "test":
        model, tokenizer, label_ids = build_model(model_cfg, data)
        start = time.perf_counter()
        history = train(model, data, train_cfg, tokenizer=tokenizer, augment_shift=data_cfg.augment_shift,
                        augment_rotation=data_cfg.augment_rotation)
        metrics["train_seconds"] = time.perf_counter() - start
        metrics["history"] = history
        args = {"model": asdict(model_cfg), "data": asdict(data_cfg), "train": asdict(train_cfg)}
        save_checkpoint(checkpoint, model, class_names=data.class_names, dataset=data_cfg.dataset,
                        label_token_ids=label_ids, tokenizer=tokenizer, args=args)
    metrics["num_parameters"] = sum(p.numel() for p in model.parameters())
    if train_cfg.mode != "train":
        model.reset_expert_counts()
        start = time.perf_counter()
        result = evaluate(model, data.test, tokenizer, train_cfg.batch_size)
        metrics["test_seconds"] = time.perf_counter() - start
        metrics["test"] = {k: v for k, v in result.items() if k != "predictions"}
        counts = model.expert_counts().cpu()
        metrics["expert_token_counts"] = counts.tolist()  # (layers, [image, text], experts) on the test set
        if train_cfg.figures:
            metrics["figures"] = [str(p) for p in write_figures(save_dir, model, data, history, result.get("predictions"), counts)]
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["download"]:
        return download.main(argv[1:])
    try:
        metrics = run(argv)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = {k: metrics[k] for k in ("dataset", "mode", "train_seconds", "test") if k in metrics}
    print(json.dumps(summary, indent=2))
    return 0
