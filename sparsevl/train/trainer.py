"""The one Trainer of the project: sums the model's named losses with their weights and logs each."""

import contextlib
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import rotate_checkpoints

from sparsevl.data.sampler import ModalityLengthGroupedSampler
from sparsevl.model.build import save_checkpoint
from sparsevl.model.vlm import IGNORE_INDEX
from sparsevl.train.checkpointing import STAGING_PREFIX, load_resume_weights, publish, save_resume_weights
from sparsevl.train.distill import alignment_loss
from sparsevl.train.guard import NonFiniteGuard
from sparsevl.train.sharding import (consolidated_state_dict, is_sharded, load_model_shard, load_optimizer_shard,
                                     save_shard)

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


class LogValuesCallback(TrainerCallback):
    """A callback whose values (read from counters kept on the model) join every training log entry."""

    def log_values(self, model) -> dict[str, float]:
        raise NotImplementedError


class SparseVLTrainer(Trainer):
    """transformers.Trainer over SparseVLM: named losses in, weighted total out, each logged as loss_<name>."""

    def __init__(self, *, loss_weights: dict[str, float], model_args, image_processor=None,
                 guard: NonFiniteGuard | None = None, teacher=None, **kwargs):
        super().__init__(**kwargs)
        self.loss_weights = loss_weights
        self.sharded = is_sharded(self.model)
        # A model sharded by sparsevl (FSDP2) owns its placement and gradient reduction: Trainer's path for models
        # sharded before it (no DDP wrap, no second sharding, unsharded trainable parameters kept in sync).
        self.is_distributed_loading_by_transformers = self.sharded
        if teacher is not None and not is_sharded(teacher):
            teacher = teacher.to(self.args.device)
        self.teacher = teacher  # sparse_distill only
        self.model_args = model_args
        self.image_processor = image_processor
        self.guard = guard
        if guard is not None:
            self.add_callback(guard)
        # Ask Trainer for the labelled-token count of the whole global batch (all micro-batches, all
        # processes), so the lm loss is the same token mean whatever the processes x accumulation split.
        self.model_accepts_loss_kwargs = True
        # ... counted as our causal loss counts them (labels shifted by one, see `labelled_tokens`); Trainer shifts
        # only for models it knows, and would otherwise count a sample's first label too.
        self._loss_shifts_labels = True
        self._loss_sums: dict[str, float] = defaultdict(float)  # Σ value × weight since the last log
        self._loss_counts: dict[str, float] = defaultdict(float)  # Σ weight (labelled tokens for lm, else 1)
        self._staging_dir: Path | None = None

    def _get_train_sampler(self, train_dataset=None):
        """--group_by_modality_length: LLaVA's modality- and length-grouped order; else Trainer's own."""
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        return ModalityLengthGroupedSampler(dataset.modality_lengths, batch_size=self.args.train_batch_size,
                                            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
                                            seed=self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "sample_index"}
        if self.teacher is None:
            outputs = model(**inputs)
        else:
            outputs = model(**inputs, return_hidden_states=True)
            with torch.no_grad():
                target = self.teacher(**inputs, return_hidden_states=True).last_hidden_state
            if is_sharded(self.teacher):  # no backward will reshard the frozen teacher's root
                self.teacher.reshard()
            outputs.losses["align"] = alignment_loss(outputs.last_hidden_state, outputs.kept_index,
                                                     outputs.kept_mask, target)
        losses = outputs.losses
        # Adaptive "all" runs k copies of each sample; its lm loss is already their mean.
        num_tokens = labelled_tokens(outputs.inputs.labels) // outputs.inputs.copies
        if num_items_in_batch is not None:
            losses = global_batch_share(losses, num_tokens, num_items_in_batch,
                                        num_processes=self.accelerator.num_processes,
                                        accumulation_steps=self.current_gradient_accumulation_steps)
        total = weighted_total(losses, self.loss_weights)
        if model.training and math.isfinite(float(total.detach())):  # a skipped step does not count in the logs
            self._record(outputs.losses, num_tokens)
        return (total, outputs) if return_outputs else total

    def _record(self, losses: dict[str, torch.Tensor], num_tokens: int) -> None:
        for name, value in losses.items():
            weight = num_tokens if name == "lm" else 1
            self._loss_sums[name] += float(value.detach()) * weight
            self._loss_counts[name] += weight

    def training_step(self, model, inputs, num_items_in_batch=None):
        sample_index = inputs.get("sample_index")
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None:
            indices = [] if sample_index is None else sample_index.tolist()
            self.guard.observe(loss, [self._sample_name(i) for i in indices])
        return loss

    def _sample_name(self, index: int) -> str:
        record_id = getattr(self.train_dataset, "record_id", lambda _: "")(index)
        return f"{index} (id {record_id!r})" if record_id else str(index)

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
        if "loss" in logs and self.guard is not None:
            logs["bad_steps"] = len(self.guard.bad_steps)
        if "loss" in logs:  # callbacks with values to log (expert load, layer shares) add them before the loggers run
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, LogValuesCallback):
                    logs.update(callback.log_values(self.model))
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write a sparsevl checkpoint from the writer process only. Trainer calls this on every process
        (in plain data parallel runs and under DeepSpeed): under ZeRO-3 all of them first join the gather
        of the partitioned weights."""
        output_dir = output_dir or self.args.output_dir
        state = consolidated_state_dict(self.model) if self.sharded else None  # FSDP: every process gathers
        with whole_parameters(self.model):
            if self.args.should_save:
                save_checkpoint(self.model, output_dir, model_args=self.model_args, tokenizer=self.processing_class,
                                image_processor=self.image_processor, state_dict=state)
                if not self.sharded:  # a sharded run resumes from its shard files
                    save_resume_weights(self.model, output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the step checkpoint under a staging folder, rename it into place, then rotate old ones."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        self._staging_dir = run_dir / f"{STAGING_PREFIX}{name}"
        if self.args.should_save:
            shutil.rmtree(self._staging_dir, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)  # writes into _get_output_dir(), i.e. the staging folder
        finally:
            staging, self._staging_dir = self._staging_dir, None
        self.accelerator.wait_for_everyone()  # every process has written its RNG state
        if not self.args.should_save:
            return
        publish(staging / name, run_dir / name)
        shutil.rmtree(staging)
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == staging:
            self.state.best_model_checkpoint = str(run_dir / name)
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    def _get_output_dir(self, trial) -> str:
        return str(self._staging_dir) if self._staging_dir is not None else super()._get_output_dir(trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Trainer calls this only when it resumes, so the log line below says that resuming really happens."""
        print(f"resuming from {resume_from_checkpoint}", flush=True)
        model = model if model is not None else self.model
        if self.sharded:
            load_model_shard(model, resume_from_checkpoint)
        else:
            load_resume_weights(model, resume_from_checkpoint)

    def _build_accelerator_args(self, **kwargs) -> dict:
        if is_sharded(self.model):  # sharded already: Accelerate's own FSDP plugin must not shard it again
            kwargs["fsdp_plugin"] = None
        return super()._build_accelerator_args(**kwargs)

    def _move_model_to_device(self, model, device) -> None:
        if not is_sharded(model):  # FSDP placed the shards on the mesh's device
            super()._move_model_to_device(model, device)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """A sharded run: each process writes its shard of the weights and optimizer state; rank 0 the scheduler."""
        if not self.sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        save_shard(self.model, self.optimizer, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.sharded or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_optimizer_shard(self.model, self.optimizer, checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))


def whole_parameters(model: torch.nn.Module):
    """Context in which DeepSpeed ZeRO-3 partitioned parameters are whole (a no-op otherwise)."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


class BestCheckpointCallback(TrainerCallback):
    """After each save, keep a copy of the checkpoint with the lowest mean training loss since the last save.

    The copy is staged and renamed like step checkpoints; a resumed run reads the best loss back from best.json.
    """

    def __init__(self):
        self.best_loss = float("inf")
        self._last_save_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_save_step = state.global_step
        record = Path(args.output_dir) / BEST_DIR / "best.json"
        if state.global_step and record.is_file():
            best = json.loads(record.read_text())
            if best["step"] <= state.global_step:
                self.best_loss = best["mean_loss"]

    def on_save(self, args, state, control, **kwargs):
        window = [e["loss"] for e in state.log_history if "loss" in e and e["step"] > self._last_save_step]
        self._last_save_step = state.global_step
        if not window or not state.is_world_process_zero:
            return
        mean_loss = sum(window) / len(window)
        source = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if mean_loss < self.best_loss and source.is_dir():
            self.best_loss = mean_loss
            staged = Path(args.output_dir) / f"{STAGING_PREFIX}{BEST_DIR}"
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(source, staged)
            (staged / "best.json").write_text(json.dumps({"step": state.global_step, "mean_loss": mean_loss}))
            publish(staged, Path(args.output_dir) / BEST_DIR)
