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


class QFormerBlock(nn.Module):
    """Pre-norm block: queries self-attend, cross-attend to the patch features, then an MLP."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.self_norm, self.cross_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = self.self_norm(queries)
        queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        queries = queries + self.cross_attn(self.cross_norm(queries), features, features, need_weights=False)[0]
        return queries + self.mlp(self.mlp_norm(queries))


class QFormerProjector(nn.Module):
    """Learned queries cross-attending to patch features (BLIP-2's Q-Former, small): a fixed token count per image."""

    def __init__(self, *, vision_dim: int, llm_dim: int, num_query_tokens: int, num_layers: int = 2):
        super().__init__()
        if num_query_tokens < 1:
            raise ValueError(f"--num_query_tokens must be at least 1, got {num_query_tokens}")
        num_heads = next(h for h in (8, 4, 2, 1) if vision_dim % h == 0)
        self.queries = nn.Parameter(torch.randn(num_query_tokens, vision_dim) * 0.02)
        self.blocks = nn.ModuleList(QFormerBlock(vision_dim, num_heads) for _ in range(num_layers))
        self.out = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, llm_dim))

    @property
    def num_output_tokens(self) -> int:
        return self.queries.shape[0]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        queries = self.queries.expand(features.shape[0], -1, -1)  # (images, queries, vision_dim)
        for block in self.blocks:
            queries = block(queries, features)
        return self.out(queries), {}  # (images, queries, llm_dim)


def qformer_projector(*, vision_dim: int, llm_dim: int, num_query_tokens: int = 32, **_) -> nn.Module:
    return QFormerProjector(vision_dim=vision_dim, llm_dim=llm_dim, num_query_tokens=num_query_tokens)


PROJECTORS: dict[str, Callable[..., nn.Module]] = {
    "linear": linear_projector,
    "mlp2x_gelu": mlp2x_gelu_projector,
    "qformer": qformer_projector,
}


def build_projector(name: str, *, vision_dim: int, llm_dim: int, **options) -> nn.Module:
    """Build the projector registered under `name` (exact match)."""
    if name not in PROJECTORS:
        raise ValueError(f"--mm_projector_type {name!r} is unknown; choose from: {', '.join(sorted(PROJECTORS))}")
    return PROJECTORS[name](vision_dim=vision_dim, llm_dim=llm_dim, **options)
