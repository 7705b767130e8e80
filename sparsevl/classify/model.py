"""Diff-MoE: image and text streams through shared blocks with cross-attention and a modality-aware MoE.

Each block: unified self-attention (one set of weights for both streams), cross-attention both ways
(image queries text, text queries image), then an MoE feed-forward whose experts are a pool of
shared experts plus experts specific to each modality, chosen by an attentive router.
The dispatch, experts and losses come from `sparsevl.model.moe`; this file only wires them.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsevl.classify.config import ModelConfig
from sparsevl.model.moe import MLPExperts, MoELayer, RouterOutput, TopKRouter, kl_to_uniform_loss

MODALITIES = ("image", "text")
MASKED_LOGIT = -1e4  # softmax gives exactly 0 in fp32; finite so noise and z-loss stay finite


class ExpertAttentionGate(nn.Module):
    """Router logits as attention scores: a token's query against one learned key per expert.

    Query weights and keys start orthogonal, so experts start distinguishable; the keys are
    orthonormal rows, which keeps the logits O(1) without a 1/sqrt(d) factor. Experts outside
    `allowed` (the other modality's) get MASKED_LOGIT.
    """

    def __init__(self, *, dim: int, num_experts: int, router_dim: int, allowed: list[int]):
        super().__init__()
        self.query = nn.Linear(dim, router_dim, bias=False)
        self.expert_keys = nn.Parameter(torch.empty(num_experts, router_dim))
        nn.init.orthogonal_(self.query.weight)
        nn.init.orthogonal_(self.expert_keys)
        mask = torch.full((num_experts,), MASKED_LOGIT)
        mask[allowed] = 0.0
        self.register_buffer("logit_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.query(x) @ self.expert_keys.T + self.logit_mask  # (tokens, num_experts)


class AttentiveRouter(TopKRouter):
    """The project's noisy top-k router with attention-style, modality-masked logits."""

    def __init__(self, *, dim: int, num_experts: int, top_k: int, router_dim: int, allowed: list[int], noise_std: float):
        super().__init__(dim=dim, num_experts=num_experts, top_k=top_k, noise_std=noise_std)
        self.gate = ExpertAttentionGate(dim=dim, num_experts=num_experts, router_dim=router_dim, allowed=allowed)
        self.allowed = allowed


def modality_experts(num_shared: int, num_specific: int, modality_index: int) -> list[int]:
    """Expert ids open to one modality: the shared ones, then its own block of specific ones."""
    start = num_shared + modality_index * num_specific
    return list(range(num_shared)) + list(range(start, start + num_specific))


class ModalityMoE(nn.Module):
    """One MoELayer per modality over a single expert pool (shared experts first, then image-, then text-specific)."""

    def __init__(self, *, dim: int, hidden_dim: int, num_shared: int, num_specific: int, top_k: int,
                 router_dim: int, noise_std: float, activation: str):
        super().__init__()
        num_experts = num_shared + len(MODALITIES) * num_specific
        experts = MLPExperts(num_experts=num_experts, dim=dim, hidden_dim=hidden_dim, activation=activation)
        self.layers = nn.ModuleDict({
            modality: MoELayer(router=AttentiveRouter(dim=dim, num_experts=num_experts, top_k=top_k, router_dim=router_dim,
                                                      allowed=modality_experts(num_shared, num_specific, i), noise_std=noise_std),
                               experts=experts)
            for i, modality in enumerate(MODALITIES)
        })

    def forward(self, x: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """x (batch, seq, dim) -> (output (batch, seq, dim), KL(utilisation || uniform) over the allowed experts)."""
        layer = self.layers[modality]
        out = layer(x)
        return out.hidden_states, routing_loss(out.router, layer.router.allowed)


def routing_loss(router: RouterOutput, allowed: list[int]) -> torch.Tensor:
    """KL between the mean router probability over the allowed experts and the uniform distribution."""
    return kl_to_uniform_loss(router.probs[:, allowed])


class EncoderBlock(nn.Module):
    """Self-attention, two-way cross-attention, modality-aware MoE; pre-norm residuals."""

    def __init__(self, *, dim: int, num_heads: int, dropout: float, moe: ModalityMoE):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.ModuleDict({m: nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True) for m in MODALITIES})
        self.norms = nn.ModuleDict({f"{m}_{part}": nn.LayerNorm(dim) for m in MODALITIES for part in ("self", "cross", "context", "moe")})
        self.moe = moe
        self.dropout = nn.Dropout(dropout)

    def _attend(self, attn, x, query, context, padding, need_weights):
        out, weights = attn(query, context, context, key_padding_mask=padding, need_weights=need_weights)
        return x + self.dropout(out), weights

    def forward(self, image, text, text_padding, need_weights: bool = False):
        """image (batch, patches, dim) or None; text (batch, text_len, dim) or None; text_padding (batch, text_len) True at pads."""
        streams, paddings = {"image": image, "text": text}, {"image": None, "text": text_padding}
        present = [m for m in MODALITIES if streams[m] is not None]
        weights, loss = {}, 0.0
        for m in present:
            h = self.norms[f"{m}_self"](streams[m])
            streams[m], weights[f"{m}_self"] = self._attend(self.self_attn, streams[m], h, h, paddings[m], need_weights)
        if len(present) == 2:  # image queries text and text queries image, both from the same inputs
            queries = {m: self.norms[f"{m}_cross"](streams[m]) for m in MODALITIES}
            contexts = {m: self.norms[f"{m}_context"](streams[m]) for m in MODALITIES}
            for m, other in zip(MODALITIES, reversed(MODALITIES)):
                streams[m], weights[f"{m}_cross"] = self._attend(self.cross_attn[m], streams[m], queries[m], contexts[other],
                                                                 paddings[other], need_weights)
        for m in present:
            out, modality_loss = self.moe(self.norms[f"{m}_moe"](streams[m]), m)
            streams[m], loss = streams[m] + self.dropout(out), loss + modality_loss
        return streams["image"], streams["text"], loss, weights


@dataclass
class EncoderOutput:
    image: torch.Tensor | None  # (batch, patches, dim)
    text: torch.Tensor | None  # (batch, text_len, dim)
    routing_loss: torch.Tensor  # summed over modalities, averaged over blocks
    attentions: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per block, when asked


class UnifiedModalEncoder(nn.Module):
    """A stack of EncoderBlocks; either stream may be absent (then no cross-attention)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            EncoderBlock(dim=config.embed_dim, num_heads=config.num_heads, dropout=config.dropout,
                         moe=ModalityMoE(dim=config.embed_dim, hidden_dim=config.expert_hidden_dim,
                                         num_shared=config.num_shared_experts, num_specific=config.num_modality_specific_experts,
                                         top_k=config.top_k, router_dim=config.router_dim, noise_std=config.router_noise_std,
                                         activation=config.activation))
            for _ in range(config.num_layers))
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, image=None, text=None, text_padding=None, need_weights: bool = False) -> EncoderOutput:
        loss, attentions = 0.0, []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                image, text, block_loss, weights = checkpoint(block, image, text, text_padding, need_weights, use_reentrant=False)
            else:
                image, text, block_loss, weights = block(image, text, text_padding, need_weights)
            loss = loss + block_loss
            if need_weights:
                attentions.append(weights)
        return EncoderOutput(image, text, loss / len(self.blocks), attentions)


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # (batch, num_classes)
    routing_loss: torch.Tensor
    attentions: list[dict[str, torch.Tensor]]


class MultiModalMoE(nn.Module):
    """Patch + label-description embeddings -> UnifiedModalEncoder -> class logits (or retrieval embeddings).

    With `num_classes > 0` the text stream is the tokenised label descriptions (stored as buffers,
    so a checkpoint is self-contained) and a linear head reads the mean image token (which trained
    faster than a [CLS] token on digits). With
    `num_classes == 0` the model embeds images and captions separately for image-caption matching.
    """

    def __init__(self, config: ModelConfig, *, num_classes: int, label_token_ids: list[list[int]] | None = None):
        super().__init__()
        if config.img_size % config.patch_size:
            raise ValueError(f"img_size {config.img_size} is not a multiple of patch_size {config.patch_size}")
        self.config, dim = config, config.embed_dim
        num_patches = (config.img_size // config.patch_size) ** 2
        # per-channel pixel statistics of the training set (set by the builder, saved with the weights)
        self.register_buffer("pixel_mean", torch.zeros(config.in_channels))
        self.register_buffer("pixel_std", torch.ones(config.in_channels))
        # kernel patch + 2 * overlap, stride patch: the token grid stays (img_size / patch_size)^2
        self.patch_embed = nn.Conv2d(config.in_channels, dim, config.patch_size + 2 * config.patch_overlap,
                                     stride=config.patch_size, padding=config.patch_overlap)
        self.image_pos = nn.Parameter(torch.randn(1, num_patches, dim) * 0.02)
        self.token_embed = nn.Embedding(config.vocab_size, dim)
        self.text_pos = nn.Parameter(torch.randn(config.max_text_len, dim) * 0.02)
        self.encoder = UnifiedModalEncoder(config)
        self.norm = nn.ModuleDict({m: nn.LayerNorm(dim) for m in MODALITIES})
        if num_classes > 0:
            ids = [seq[: config.max_text_len] for seq in label_token_ids]
            self.register_buffer("label_ids", torch.tensor([t for seq in ids for t in seq], dtype=torch.long))
            self.register_buffer("label_positions", torch.tensor([p for seq in ids for p in range(len(seq))], dtype=torch.long))
            self.head = nn.Linear(dim, num_classes)
        else:
            self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as CLIP

    def check_images(self, images: torch.Tensor) -> None:
        c, s = self.config.in_channels, self.config.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(f"images of shape {tuple(images.shape)} do not match the model config: expected (batch, {c}, {s}, {s})")

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        images = (images - self.pixel_mean[:, None, None]) / self.pixel_std[:, None, None]
        return self.patch_embed(images).flatten(2).transpose(1, 2) + self.image_pos  # (batch, patches, dim)

    def embed_text(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.token_embed(token_ids) + self.text_pos[positions]

    def forward(self, images: torch.Tensor, *, need_weights: bool = False) -> ClassifierOutput:
        """images (batch, C, H, W) -> class logits, attending to the label descriptions."""
        image = self.embed_images(images)
        text = self.embed_text(self.label_ids, self.label_positions).expand(len(images), -1, -1)  # (batch, text_len, dim)
        out = self.encoder(image, text, need_weights=need_weights)
        return ClassifierOutput(self.head(self.norm["image"](out.image.mean(1))), out.routing_loss, out.attentions)

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (unit embeddings (batch, dim), routing loss), image stream alone."""
        out = self.encoder(image=self.embed_images(images))
        return F.normalize(self.norm["image"](out.image.mean(1)), dim=-1), out.routing_loss

    def encode_texts(self, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """token_ids, attention_mask (batch, len) -> (unit embeddings (batch, dim), routing loss), text stream alone."""
        token_ids, attention_mask = token_ids[:, : self.config.max_text_len], attention_mask[:, : self.config.max_text_len]
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        out = self.encoder(text=self.embed_text(token_ids, positions), text_padding=attention_mask == 0)
        keep = attention_mask[..., None].to(out.text.dtype)
        pooled = (self.norm["text"](out.text) * keep).sum(1) / keep.sum(1).clamp_min(1)
        return F.normalize(pooled, dim=-1), out.routing_loss

    def expert_counts(self) -> torch.Tensor:
        """Tokens sent to each expert since the last reset: (layers, modalities, experts)."""
        return torch.stack([torch.stack([block.moe.layers[m].expert_token_counts for m in MODALITIES]) for block in self.encoder.blocks])

    def reset_expert_counts(self) -> None:
        for block in self.encoder.blocks:
            for m in MODALITIES:
                block.moe.layers[m].reset_stats()
