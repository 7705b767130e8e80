"""Skip optimizer steps whose loss or gradient is not finite; stop after too many in a row."""

import logging

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class TooManyBadSteps(RuntimeError):
    """Training stopped because `--max_bad_steps` consecutive steps had a non-finite loss or gradient."""


def gradients_are_finite(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


class NonFiniteGuard(TrainerCallback):
    """Drops the gradients of a bad step (so the optimizer leaves weights and moments alone) and counts it.

    The trainer reports each micro-batch's loss and sample names through `observe`; the check runs just
    before the optimizer step. A bad step is not saved. `bad_steps` lists every skipped step with its samples.
    The learning-rate schedule still advances on a skipped step, so later steps keep their planned rates.
    """

    def __init__(self, max_bad_steps: int):
        if max_bad_steps < 1:
            raise ValueError(f"--max_bad_steps must be at least 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.bad_steps: list[dict] = []  # {"step", "reason", "samples"}
        self.consecutive = 0
        self.stopped = False
        self._samples: list[str] = []
        self._loss_is_finite = True
        self._step_was_bad = False

    def observe(self, loss: torch.Tensor, samples: list[str]) -> None:
        self._samples += samples
        self._loss_is_finite &= bool(torch.isfinite(loss).all())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        reason = None
        if not self._loss_is_finite:
            reason = "non-finite loss"
        elif not gradients_are_finite(model):
            reason = "non-finite gradient"
        self._step_was_bad = reason is not None
        if reason:
            for param in model.parameters():
                param.grad = None  # torch optimizers skip parameters without a gradient
            self._record(state.global_step + 1, reason, control)
        else:
            self.consecutive = 0
        self._samples, self._loss_is_finite = [], True

    def _record(self, step: int, reason: str, control) -> None:
        self.bad_steps.append({"step": step, "reason": reason, "samples": self._samples})
        self.consecutive += 1
        logger.warning("step %d skipped (%s); samples: %s", step, reason, ", ".join(self._samples))
        print(f"step {step} skipped ({reason}); samples: {', '.join(self._samples)}", flush=True)
        if self.consecutive >= self.max_bad_steps:
            self.stopped = True
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_was_bad:
            control.should_save = False  # the last checkpoint stays the last good one
