"""Theoretical cost of a pruning plan: visual tokens per layer (recycled included) and prefill FLOPs."""

from sparsevl.model.merging import RECYCLE_SHARE, TOKENS_PER_CLUSTER
from sparsevl.model.pruning import PruningPlan


def layer_flops(config, num_tokens: int) -> float:
    """Theoretical forward FLOPs of one decoder layer on `num_tokens` (matmuls + causal attention)."""
    dim, ffn = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or dim // heads
    linear = dim * heads * head_dim * 2 + 2 * dim * kv_heads * head_dim + 3 * dim * ffn  # q, o, k, v, gated MLP
    attention = 2 * heads * head_dim * num_tokens * (num_tokens + 1) / 2  # QK^T and PV over the causal half
    return 2 * num_tokens * linear + 2 * attention


def prefill_flops(config, tokens_per_layer: list[int]) -> float:
    """Theoretical prefill FLOPs: every layer on its own token count, plus the head for the next-token logits."""
    return sum(layer_flops(config, n) for n in tokens_per_layer) + 2 * config.hidden_size * config.vocab_size


def recycled_count(num_dropped: int) -> int:
    """Clusters SparseVLM v1.5 appends when a stage drops `num_dropped` tokens of one image."""
    if num_dropped == 0:
        return 0
    return (int(num_dropped * RECYCLE_SHARE) + 1) // TOKENS_PER_CLUSTER + 1


def visual_tokens_per_layer(plan: PruningPlan | None, *, num_layers: int, num_visual: int) -> list[int]:
    """Visual tokens every decoder layer runs on, for one sample with one image under `plan` (recycled included)."""
    if plan is not None and plan.before_llm:
        num_visual = plan.tokens_entering_llm
    counts, steps = [], {s.layer: s.num_kept for s in (plan.steps if plan else ())}
    for layer in range(num_layers):
        if layer in steps:
            dropped = num_visual - steps[layer]
            num_visual = steps[layer] + (recycled_count(dropped) if plan.recycle else 0)
        counts.append(num_visual)
    return counts


def tokens_per_layer(plan: PruningPlan | None, *, num_layers: int, num_text: int, num_visual: int) -> list[int]:
    """Sequence length at every decoder layer for one sample with one image under `plan`."""
    return [num_text + v for v in visual_tokens_per_layer(plan, num_layers=num_layers, num_visual=num_visual)]


def equivalent_tokens(plan: PruningPlan | None, *, num_layers: int, num_visual: int) -> dict[str, float]:
    """A setting's visual-token cost: the average over layers (SparseVLM's "budget") and what enters the LLM."""
    counts = visual_tokens_per_layer(plan, num_layers=num_layers, num_visual=num_visual)
    return {"avg_visual_tokens_per_layer": sum(counts) / len(counts), "visual_tokens_into_llm": counts[0]}
