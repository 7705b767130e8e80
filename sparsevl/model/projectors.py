"""Projector registry: vision features (images, tokens, vision_dim) -> LLM embeddings (images, tokens', llm_dim).

Every projector returns `(embeddings, losses)`, where `losses` is a dict of named auxiliary losses
(empty for dense projectors), so the model can hand them to the trainer unchanged.
"""

from collections.abc import Callable

import torch
from torch import nn

from sparsevl.model.moe import MLPExperts, MoELayer, TopKRouter


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


class MoEProjector(nn.Module):
    """Each visual token goes to its top-k of several mlp2x_gelu experts (MoE-LLaVA's adaptive_moe projector).

    Returns the router's balance and z losses; keeps each token's experts (`last_expert_indices`,
    (images, tokens, top_k)) for routing analysis, and per-expert counts on `moe`.
    """

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe
        self.last_expert_indices: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.moe(features)  # hidden_states (images, tokens, llm_dim)
        self.last_expert_indices = out.router.indices.view(*features.shape[:-1], -1)
        return out.hidden_states, out.losses


def moe_projector(*, vision_dim: int, llm_dim: int, num_experts: int = 8, top_k: int = 2, **_) -> nn.Module:
    experts = MLPExperts(num_experts=num_experts, dim=vision_dim, hidden_dim=llm_dim, out_dim=llm_dim,
                         activation="gelu")
    return MoEProjector(MoELayer(router=TopKRouter(dim=vision_dim, num_experts=num_experts, top_k=top_k),
                                 experts=experts))


PROJECTORS: dict[str, Callable[..., nn.Module]] = {
    "linear": linear_projector,
    "mlp2x_gelu": mlp2x_gelu_projector,
    "moe": moe_projector,
    "adaptive_moe": moe_projector,  # MoE-LLaVA's name
}


def build_projector(name: str, *, vision_dim: int, llm_dim: int, **options) -> nn.Module:
    """Build the projector registered under `name` (exact match)."""
    if name not in PROJECTORS:
        raise ValueError(f"--mm_projector_type {name!r} is unknown; choose from: {', '.join(sorted(PROJECTORS))}")
    return PROJECTORS[name](vision_dim=vision_dim, llm_dim=llm_dim, **options)
