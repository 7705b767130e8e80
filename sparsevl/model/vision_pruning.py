"""Pruners that run before the LLM, in the vision tower's projected layer: cls_attention and VisionZip."""

import torch

from sparsevl.model.merging import visionzip_merge
from sparsevl.model.pruning import PruningPlan, unsharded


def _vision_layer(vision_tower, hidden_states: tuple[torch.Tensor, ...]):
    """(layer, its input) of the vision layer whose output is the projected hidden state."""
    layers = getattr(vision_tower.encoder, "vision_model", vision_tower.encoder).encoder.layers
    produced_by = vision_tower.select_layer % (len(layers) + 1)  # hidden_states[j] is layer j-1's output
    return unsharded(layers[produced_by - 1]), hidden_states[produced_by - 1]


def cls_attention_heads(vision_tower, hidden_states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The projected vision layer's [CLS] attention row per head (images, heads, 1 + patches) and its keys
    (images, heads, 1 + patches, head_dim), from the layer's pre-norm and q/k projections."""
    layer, layer_input = _vision_layer(vision_tower, hidden_states)
    attn, normed = layer.self_attn, layer.layer_norm1(layer_input)  # (images, 1 + patches, dim)
    images, tokens, _ = normed.shape
    query = attn.q_proj(normed[:, :1]).view(images, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(images, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    return (query @ key.transpose(-1, -2) * attn.scale).softmax(-1)[:, :, 0], key


def cls_attention_patches(vision_tower, hidden_states: tuple[torch.Tensor, ...], num_kept: int) -> torch.Tensor:
    """(images, num_kept) indices of the patches the [CLS] token attends to most (head-averaged), in order."""
    probs = cls_attention_heads(vision_tower, hidden_states)[0].mean(1)  # (images, 1 + patches)
    return probs[:, 1:].topk(num_kept, dim=-1).indices.sort(dim=-1).values


def visionzip_features(vision_tower, hidden_states: tuple[torch.Tensor, ...], plan: PruningPlan
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's (images, 1 + dominant + contextual, vision_dim) tokens of the projected layer, and the
    dominant patch indices."""
    probs, key = cls_attention_heads(vision_tower, hidden_states)
    features = hidden_states[vision_tower.select_layer]
    return visionzip_merge(features, probs.sum(1)[:, 1:], key.mean(1), dominant=plan.dominant,
                           contextual=plan.contextual)
