"""The one Trainer of the project: sums the model's named losses with their weights and logs each."""

import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from sparsevl.model.build import save_checkpoint
from sparsevl.train.distill import alignment_loss

BEST_DIR = "best-checkpoint"


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ weight[name] · loss[name]; every loss must have a weight, so none is silently ignored."""
    unknown = sorted(set(losses) - set(weights))
    if unknown:
        raise KeyError(f"no weight configured for loss(es) {unknown}; known weights: {sorted(weights)}")
    return sum(weights[name] * value for name, value in losses.items())


class SparseVLTrainer(Trainer):
    """transformers.Trainer over SparseVLM: named losses in, weighted total out, each logged as loss_<name>."""

    def __init__(self, *args, loss_weights: dict[str, float], model_args, image_processor=None, teacher=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_weights = loss_weights
        self.teacher = teacher.to(self.args.device) if teacher is not None else None  # sparse_distill only
        self.model_args = model_args
        self.image_processor = image_processor
        self._loss_sums: dict[str, float] = defaultdict(float)
        self._loss_steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "sample_index"}
        if self.teacher is None:
            outputs = model(**inputs)
        else:
            outputs = model(**inputs, return_hidden_states=True)
            with torch.no_grad():
                target = self.teacher(**inputs, return_hidden_states=True).last_hidden_state
            outputs.losses["align"] = alignment_loss(outputs.last_hidden_state, outputs.kept_index,
                                                     outputs.kept_mask, target)
        total = weighted_total(outputs.losses, self.loss_weights)
        for name, value in outputs.losses.items():
            self._loss_sums[name] += float(value.detach())
        self._loss_steps += 1
        return (total, outputs) if return_outputs else total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_steps:
            for name, total in self._loss_sums.items():
                logs[f"loss_{name}"] = round(total / self._loss_steps, 5)
            self._loss_sums.clear()
            self._loss_steps = 0
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        save_checkpoint(self.model, output_dir or self.args.output_dir, model_args=self.model_args,
                        tokenizer=self.processing_class, image_processor=self.image_processor)


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
