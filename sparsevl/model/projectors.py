"""Projector registry: vision features (images, tokens, vision_dim) -> LLM embeddings (images, tokens', llm_dim).

Every projector returns `(embeddings, losses)`, where `losses` is a dict of named auxiliary losses
(empty for dense projectors), so the model can hand them to the trainer unchanged.
"""

from collections.abc import Callable

import torch
from torch import nn


class DenseProjector(nn.Module):
    """A stack of layers (Linear, or LLaVA's Linear-GELU-Linear) with no auxiliary loss."""

    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.net(features), {}


def linear_projector(*, vision_dim: int, llm_dim: int, **_) -> nn.Module:
    return DenseProjector(nn.Sequential(nn.Linear(vision_dim, llm_dim)))


def mlp2x_gelu_projector(*, vision_dim: int, llm_dim: int, **_) -> nn.Module:
    return DenseProjector(nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim)))


PROJECTORS: dict[str, Callable[..., nn.Module]] = {
    "linear": linear_projector,
    "mlp2x_gelu": mlp2x_gelu_projector,
}


def build_projector(name: str, *, vision_dim: int, llm_dim: int, **options) -> nn.Module:
    """Build the projector registered under `name` (exact match)."""
    if name not in PROJECTORS:
        raise ValueError(f"--mm_projector_type {name!r} is unknown; choose from: {', '.join(sorted(PROJECTORS))}")
    return PROJECTORS[name](vision_dim=vision_dim, llm_dim=llm_dim, **options)
