"""The one Trainer of the project: sums the model's named losses with their weights and logs each."""

import contextlib
import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from sparsevl.model.build import save_checkpoint
from sparsevl.model.vlm import IGNORE_INDEX

BEST_DIR = "best-checkpoint"


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ weight[name] · loss[name]; every loss must have a weight, so none is silently ignored."""
    unknown = sorted(set(losses) - set(weights))
    if unknown:
        raise KeyError(f"no weight configured for loss(es) {unknown}; known weights: {sorted(weights)}")
    return sum(weights[name] * value for name, value in losses.items())


def labelled_tokens(labels: torch.Tensor | None) -> int:
    """Positions the causal LM loss is taken over (labels shifted by one)."""
    return 0 if labels is None else int((labels[:, 1:] != IGNORE_INDEX).sum())


def global_batch_share(losses: dict[str, torch.Tensor], num_tokens: int, num_items_in_batch, *,
                       num_processes: int, accumulation_steps: int) -> dict[str, torch.Tensor]:
    """This micro-batch's share of the global-batch losses, so that gradients summed over accumulation
    steps and averaged over processes equal one big batch's: lm is weighted by its labelled tokens,
    the other (per-batch mean) losses by 1 / accumulation steps."""
    shares = {name: value / accumulation_steps for name, value in losses.items()}
    if "lm" in losses:
        shares["lm"] = losses["lm"] * (num_tokens * num_processes / num_items_in_batch)
    return shares


class SparseVLTrainer(Trainer):
    """transformers.Trainer over SparseVLM: named losses in, weighted total out, each logged as loss_<name>."""

    def __init__(self, *args, loss_weights: dict[str, float], model_args, image_processor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_weights = loss_weights
        self.model_args = model_args
        self.image_processor = image_processor
        # Ask Trainer for the labelled-token count of the whole global batch (all micro-batches, all
        # processes), so the lm loss is the same token mean whatever the processes x accumulation split.
        self.model_accepts_loss_kwargs = True
        self._loss_sums: dict[str, float] = defaultdict(float)  # Σ value × weight since the last log
        self._loss_counts: dict[str, float] = defaultdict(float)  # Σ weight (labelled tokens for lm, else 1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "sample_index"}
        outputs = model(**inputs)
        losses = outputs.losses
        if model.training:
            self._record(losses, labelled_tokens(outputs.inputs.labels))
        if num_items_in_batch is not None:
            losses = global_batch_share(losses, labelled_tokens(outputs.inputs.labels), num_items_in_batch,
                                        num_processes=self.accelerator.num_processes,
                                        accumulation_steps=self.current_gradient_accumulation_steps)
        total = weighted_total(losses, self.loss_weights)
        return (total, outputs) if return_outputs else total

    def _record(self, losses: dict[str, torch.Tensor], num_tokens: int) -> None:
        for name, value in losses.items():
            weight = num_tokens if name == "lm" else 1
            self._loss_sums[name] += float(value.detach()) * weight
            self._loss_counts[name] += weight

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_counts:  # every process logs here together: the reduce is safe
            names = sorted(self._loss_counts)
            stats = torch.tensor([[self._loss_sums[n], self._loss_counts[n]] for n in names], dtype=torch.float64,
                                 device=self.args.device)
            if self.accelerator.num_processes > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            for name, (total, count) in zip(names, stats.tolist()):
                logs[f"loss_{name}"] = round(total / max(count, 1), 5)
            self._loss_sums.clear()
            self._loss_counts.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write a sparsevl checkpoint from the writer process only. Trainer calls this on every process
        under DeepSpeed (and on every process in plain data parallel runs too): under ZeRO-3 all of them
        first join the gather of the partitioned weights."""
        with whole_parameters(self.model):
            if self.args.should_save:
                save_checkpoint(self.model, output_dir or self.args.output_dir, model_args=self.model_args,
                                tokenizer=self.processing_class, image_processor=self.image_processor)


def whole_parameters(model: torch.nn.Module):
    """Context in which DeepSpeed ZeRO-3 partitioned parameters are whole (a no-op otherwise)."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


class BestCheckpointCallback(TrainerCallback):
    """After each save, keep a copy of the checkpoint with the lowest mean training loss since the last save."""

    def __init__(self):
        self.best_loss = float("inf")
        self._last_save_step = 0

    def on_save(self, args, state, control, **kwargs):
        window = [e["loss"] for e in state.log_history if "loss" in e and e["step"] > self._last_save_step]
        self._last_save_step = state.global_step
        if not window or not state.is_world_process_zero:
            return
        mean_loss = sum(window) / len(window)
        source = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if mean_loss < self.best_loss and source.is_dir():
            self.best_loss = mean_loss
            target = Path(args.output_dir) / BEST_DIR
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
            (target / "best.json").write_text(json.dumps({"step": state.global_step, "mean_loss": mean_loss}))
