"""Sparse distillation: a frozen, unpruned teacher guides the pruned student (SparseVLM's alignment loss)."""

import copy

import torch
from torch import nn


def alignment_loss(student_hidden: torch.Tensor, kept_index: torch.Tensor, kept_mask: torch.Tensor,
                   teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared error between student and teacher last hidden states on the tokens the student kept.

    student_hidden (batch, kept, dim) sits at `kept_index` (batch, kept) of the teacher's (batch, seq, dim);
    fill positions (`kept_mask` False) do not count. Mean over kept tokens and hidden dimensions.
    """
    target = teacher_hidden.gather(1, kept_index[..., None].expand(-1, -1, teacher_hidden.shape[-1]))
    squared = (student_hidden - target.detach()).pow(2).mean(-1)  # (batch, kept)
    return (squared * kept_mask).sum() / kept_mask.sum().clamp(min=1)


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the student's weights that runs without pruning."""
    teacher = copy.deepcopy(student)
    teacher.pruning = None
    return teacher.requires_grad_(False).eval()


def load_teacher(path: str, student: nn.Module) -> nn.Module:
    """A frozen, unpruned teacher from sparsevl checkpoint `path`; refused unless its hidden states line up with
    the student's (same LLM width, visual tokens per image and <image> token)."""
    from sparsevl.model.build import load_checkpoint

    teacher, _ = load_checkpoint(path)
    pairs = {"LLM hidden size": (teacher.llm.config.hidden_size, student.llm.config.hidden_size),
             "visual tokens per image": (teacher.num_projected_tokens, student.num_projected_tokens),
             "<image> token id": (teacher.image_token_id, student.image_token_id)}
    for what, (theirs, ours) in pairs.items():
        if theirs != ours:
            raise ValueError(f"--teacher_model_name_or_path {path}: its {what} is {theirs}, the student's {ours}")
    return teacher.requires_grad_(False).eval()
