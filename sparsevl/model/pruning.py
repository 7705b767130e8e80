"""Visual-token pruners: which visual tokens survive, and when.

A `PruningPlan` names a pruner and a schedule of `PruningStep`s. A step at layer L drops visual tokens
*before* decoder layer L runs, ranked by scores computed from layer L's own input: for the attention
pruners, layer L's q/k projections applied to the few query rows they need (so the layers themselves
keep running SDPA). `cls_attention` prunes before the LLM instead, from the vision tower.

Pruners (exact names, `--token_pruner`):
  sparsevlm      text-guided: raters are the instruction tokens (after the image, not answer tokens); a visual
                 token's score is their (head-averaged) attention to it, each rater weighted by its own total
                 attention to vision, so the tokens that look at the image decide. Optionally recycles the best
                 pruned tokens into `--num_recycled_tokens` aggregated tokens per image (inside the budget).
  fastv          attention from the last instruction token (FastV), at layer `--fastv_k`, keeping `--fastv_ratio`.
  random         a seeded random ranking of positions (the baseline).
  cls_attention  before the LLM: the vision tower's [CLS] attention to patches in the layer whose output is
                 projected (`--mm_vision_select_layer`), from that layer's q/k.
A prompt with an image but no instruction token after it cannot be rated: sparsevlm and fastv raise an
error naming `--token_pruner` (use `random` or `cls_attention` for such prompts).
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule

PRUNERS = ("none", "sparsevlm", "fastv", "random", "cls_attention")
FASTV_DEFAULT_K, FASTV_DEFAULT_RATIO = 2, 0.5
RANDOM_TABLE_SIZE = 4096  # random scores are a fixed table indexed by position, so reruns rank alike


@dataclass(frozen=True)
class PruningStep:
    layer: int  # decoder layer before which tokens are dropped (0 = before the first layer)
    num_kept: int  # visual tokens kept per image from this layer on


@dataclass(frozen=True)
class PruningPlan:
    pruner: str
    steps: tuple[PruningStep, ...] = ()  # in-LLM steps, layers increasing, counts decreasing
    num_kept_patches: int | None = None  # cls_attention: patches kept per image before the LLM
    num_recycled: int = 0  # sparsevlm: aggregated tokens per image made from pruned ones
    seed: int = 0  # random pruner


@dataclass
class PruningContext:
    """Per-token facts the scorers need, aligned with the current (possibly already pruned) sequence."""

    image_mask: torch.Tensor  # (batch, seq) True at visual tokens
    rater_mask: torch.Tensor  # (batch, seq) True at instruction tokens allowed to rate visual tokens
    images_per_row: torch.Tensor  # (batch,) images in each sample

    def gather(self, index: torch.Tensor) -> "PruningContext":
        return PruningContext(self.image_mask.gather(1, index), self.rater_mask.gather(1, index), self.images_per_row)

    def padded_to(self, seq: int) -> "PruningContext":
        """Extend on the right with tokens that are neither visual nor raters (generated tokens)."""
        extra = seq - self.image_mask.shape[1]
        pad = self.image_mask.new_zeros(len(self.image_mask), extra)
        return PruningContext(torch.cat([self.image_mask, pad], 1), torch.cat([self.rater_mask, pad], 1),
                              self.images_per_row)


@dataclass
class KeptTokens:
    hidden: torch.Tensor  # (batch, seq, dim): the input, with recycled tokens aggregated in place
    mask: torch.Tensor  # (batch, seq) True where the token stays


# ---------------------------------------------------------------------------------------------- plans
def parse_schedule(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers") from None


def resolve_count(value: float, tokens_per_image: int, flag: str) -> int:
    """A count (>= 1) or a ratio (0 < r < 1) of the visual tokens per image -> a count, checked."""
    count = round(value * tokens_per_image) if 0 < value < 1 else int(value)
    if value != int(value) and not 0 < value < 1:
        raise ValueError(f"{flag}: {value} is neither a whole count nor a ratio in (0, 1)")
    if not 1 <= count <= tokens_per_image:
        raise ValueError(f"{flag}: keeping {count} visual tokens per image is impossible: "
                         f"there are {tokens_per_image} per image (and at least 1 must stay)")
    return count


def build_pruning_plan(args, model) -> PruningPlan | None:
    """The plan named by the model arguments' pruning flags, validated against `model`; None for `none`."""
    pruner = args.token_pruner
    if pruner not in PRUNERS:
        raise ValueError(f"--token_pruner {pruner!r} is unknown; choose from: {', '.join(PRUNERS)}")
    layers = [int(v) for v in parse_schedule(args.pruning_layers, "--pruning_layers")]
    counts = parse_schedule(args.retained_tokens, "--retained_tokens")
    fastv_set = args.fastv_k is not None or args.fastv_ratio is not None
    _reject_unused(pruner, layers, counts, fastv_set, args.num_recycled_tokens)
    if pruner == "none":
        return None
    tokens = model.num_projected_tokens  # not num_image_tokens: a plan already set must not shrink the budget
    if pruner == "cls_attention":
        return _cls_attention_plan(model, counts, tokens)
    if pruner == "fastv" and not layers:
        layers = [FASTV_DEFAULT_K if args.fastv_k is None else args.fastv_k]
        ratio = FASTV_DEFAULT_RATIO if args.fastv_ratio is None else args.fastv_ratio
        if not 0 < ratio <= 1:
            raise ValueError(f"--fastv_ratio {ratio} must be in (0, 1] (the fraction of visual tokens kept)")
        num_kept = [max(1, round(ratio * tokens))]
    else:
        num_kept = [resolve_count(c, tokens, "--retained_tokens") for c in counts]
    steps = _checked_steps(layers, num_kept, num_layers=_num_llm_layers(model))
    if args.num_recycled_tokens >= steps[-1].num_kept:
        raise ValueError(f"--num_recycled_tokens {args.num_recycled_tokens} must be fewer than the smallest "
                         f"--retained_tokens count ({steps[-1].num_kept})")
    return PruningPlan(pruner=pruner, steps=tuple(steps), num_recycled=args.num_recycled_tokens)


def _reject_unused(pruner, layers, counts, fastv_set, num_recycled) -> None:
    """Flags that would silently do nothing are errors."""
    if pruner == "none" and (layers or counts or fastv_set or num_recycled):
        raise ValueError("pruning flags (--pruning_layers/--retained_tokens/--fastv_*/--num_recycled_tokens) "
                         "were given but --token_pruner is none")
    if fastv_set and pruner != "fastv":
        raise ValueError(f"--fastv_k/--fastv_ratio apply to --token_pruner fastv, not {pruner}")
    if fastv_set and layers:
        raise ValueError("give either --fastv_k/--fastv_ratio or --pruning_layers/--retained_tokens, not both")
    if num_recycled and pruner != "sparsevlm":
        raise ValueError(f"--num_recycled_tokens applies to --token_pruner sparsevlm, not {pruner}")
    if pruner in ("sparsevlm", "random") and (not layers or not counts):
        raise ValueError(f"--token_pruner {pruner} needs --pruning_layers and --retained_tokens")
    if pruner in ("sparsevlm", "random", "fastv") and len(layers) != len(counts):
        raise ValueError(f"--pruning_layers has {len(layers)} values but --retained_tokens has {len(counts)}")


def _checked_steps(layers: list[int], counts: list[int], *, num_layers: int) -> list[PruningStep]:
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise ValueError(f"--pruning_layers: layer {layer} is beyond the LLM's {num_layers} layers "
                             f"(valid: 0..{num_layers - 1})")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"--pruning_layers {layers} must be strictly increasing")
    if any(b >= a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"--retained_tokens {counts} must be strictly decreasing (each step keeps fewer tokens)")
    return [PruningStep(layer, count) for layer, count in zip(layers, counts)]


def _cls_attention_plan(model, counts: list[float], tokens: int) -> PruningPlan:
    tower = model.vision_tower
    if len(counts) != 1:
        raise ValueError("--token_pruner cls_attention prunes once, before the LLM: give one --retained_tokens value")
    if not tower.has_cls_token or tower.select_feature != "patch":
        raise ValueError("--token_pruner cls_attention needs a CLIP vision tower (it has a [CLS] token) read with "
                         "--mm_vision_select_feature patch")
    if getattr(model.projector, "num_output_tokens", None):
        raise ValueError("--token_pruner cls_attention needs a token-wise projector (not qformer)")
    return PruningPlan(pruner="cls_attention", num_kept_patches=resolve_count(counts[0], tokens, "--retained_tokens"))


def _num_llm_layers(model) -> int:
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    return llm.config.num_hidden_layers


# ---------------------------------------------------------------------------------------------- mechanics
def pack_kept(keep: torch.Tensor, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq) bool -> (index, valid), each (batch, most kept): kept positions in order, fill at `padding_side`."""
    counts = keep.sum(1)
    width = int(counts.max())
    if padding_side == "left":  # fill first, then the kept tokens in order
        index = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, keep.shape[1] - width:]
        slot = torch.arange(width, device=keep.device)
        return index, slot >= (width - counts)[:, None]
    index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    return index, torch.arange(width, device=keep.device) < counts[:, None]


def attention_rows(layer, hidden: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                   key_valid: torch.Tensor, rotary) -> torch.Tensor:
    """Causal attention probabilities of the query `rows` (batch, R) over all keys at decoder `layer`.

    Computed from the layer's own input norm, q/k projections (with q/k norms where the model has them) and
    rotary embedding: the same numbers its eager attention would produce. Returns (batch, heads, R, seq).
    """
    attn, (batch, seq, dim) = unsharded(layer).self_attn, hidden.shape
    normed = layer.input_layernorm(hidden)  # (batch, seq, dim)
    cos, sin = rotary(hidden, position_ids=positions)  # (batch, seq, head_dim)
    row_cos, row_sin = (t.gather(1, rows[..., None].expand(-1, -1, t.shape[-1])) for t in (cos, sin))
    query = _heads(attn.q_proj(normed.gather(1, rows[..., None].expand(-1, -1, dim))), attn, "q_norm")
    key = _heads(attn.k_proj(normed), attn, "k_norm")  # (batch, kv_heads, seq, head_dim)
    apply_rotary = _rotary_function(attn)
    query = apply_rotary(query, query, row_cos, row_sin)[0]  # (batch, heads, R, head_dim)
    key = apply_rotary(key, key, cos, sin)[0]
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = query @ key.transpose(-1, -2) * attn.scaling  # (batch, heads, R, seq)
    allowed = key_valid[:, None, :] & (torch.arange(seq, device=rows.device) <= rows[..., None])  # (batch, R, seq)
    return logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)


def unsharded(layer: torch.nn.Module) -> torch.nn.Module:
    """The layer with whole weights: an FSDP2-sharded layer all-gathers them (its next forward or backward
    reshards them); any other layer is returned as is."""
    if isinstance(layer, FSDPModule):
        layer.unshard()
    return layer


def _heads(x: torch.Tensor, attn, norm_name: str) -> torch.Tensor:
    x = x.view(*x.shape[:2], -1, attn.head_dim)  # (batch, tokens, heads, head_dim)
    norm = getattr(attn, norm_name, None)
    return (norm(x) if norm is not None else x).transpose(1, 2)


def _rotary_function(attn) -> Callable:
    function = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if function is None:
        raise ValueError(f"{type(attn).__name__}: no apply_rotary_pos_emb in its module; cannot score attention")
    return function


def top_visual(scores: torch.Tensor, visual: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(batch, seq) True at each row's `counts[row]` highest-scoring visual tokens (ties: earlier first)."""
    ranked = torch.argsort(scores.masked_fill(~visual, float("-inf")), dim=1, descending=True, stable=True)
    rank = torch.argsort(ranked, dim=1)  # rank of every position
    return visual & (rank < counts[:, None])


# ---------------------------------------------------------------------------------------------- scorers
def _rows_or_error(mask: torch.Tensor, visual: torch.Tensor, pruner: str) -> None:
    lacking = (visual.any(1) & ~mask.any(1)).nonzero().flatten().tolist()
    if lacking:
        raise ValueError(f"--token_pruner {pruner}: sample(s) {lacking} have an image but no instruction text after "
                         "it to rate visual tokens; use --token_pruner random or cls_attention for such prompts")


def text_guided_scores(attention, context: PruningContext, valid: torch.Tensor, positions, plan) -> torch.Tensor:
    """SparseVLM: attention to each visual token from the instruction tokens (raters), each rater weighted by
    its own total attention to vision, so the tokens that look at the image decide (a soft rater selection:
    the hard above-the-mean cut lost the shape word of colour questions on the shapes benchmark)."""
    visual, candidates = context.image_mask & valid, context.rater_mask & valid
    _rows_or_error(candidates, visual, "sparsevlm")
    rows, rows_valid = pack_kept(candidates, "right")
    probs = attention(rows).mean(1) * visual[:, None, :]  # (batch, R, seq): head-averaged, visual keys only
    weights = probs.sum(-1) * rows_valid  # (batch, R) each rater's total attention to vision
    return (probs * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-12)


def last_token_scores(attention, context: PruningContext, valid: torch.Tensor, positions, plan) -> torch.Tensor:
    """FastV: attention (head-averaged) from the last instruction token."""
    candidates = context.rater_mask & valid
    _rows_or_error(candidates, context.image_mask & valid, "fastv")
    order = torch.arange(candidates.shape[1], device=valid.device)
    last = (candidates * order).argmax(1, keepdim=True)  # (batch, 1)
    return attention(last).mean(1)[:, 0]


def random_scores(attention, context: PruningContext, valid: torch.Tensor, positions, plan) -> torch.Tensor:
    """A seeded random score per (row, original position): the same whatever the sequence length."""
    generator = torch.Generator().manual_seed(plan.seed)
    size = max(RANDOM_TABLE_SIZE, int(positions.max()) + 1)
    table = torch.rand(len(positions), size, generator=generator).to(positions.device)
    return table.gather(1, positions)


SCORERS: dict[str, Callable[..., torch.Tensor]] = {
    "sparsevlm": text_guided_scores,
    "fastv": last_token_scores,
    "random": random_scores,
}


def prune_step(step: PruningStep, *, layer, hidden: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
               rotary, context: PruningContext, plan: PruningPlan) -> KeptTokens:
    """Score the visual tokens at `layer` and keep each row's best `step.num_kept` per image."""
    def attention(rows):
        return attention_rows(layer, hidden, positions, rows, valid, rotary)

    scores = SCORERS[plan.pruner](attention, context, valid, positions, plan)  # (batch, seq)
    visual = context.image_mask & valid
    budget = context.images_per_row * step.num_kept  # (batch,)
    if not plan.num_recycled:
        return KeptTokens(hidden, valid & (~visual | top_visual(scores, visual, budget)))
    kept = top_visual(scores, visual, budget - context.images_per_row * plan.num_recycled)
    hidden, recycled = recycle(hidden, scores, visual & ~kept, context.images_per_row * plan.num_recycled)
    return KeptTokens(hidden, valid & (~visual | kept | recycled))


def recycle(hidden: torch.Tensor, scores: torch.Tensor, dropped: torch.Tensor,
            num_centers: torch.Tensor, pool_factor: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregate the best-scored dropped tokens into `num_centers[row]` tokens (SparseVLM's recycling, simplified).

    The top `pool_factor x centers` dropped tokens form the pool; its best-scored ones are the centers; every
    other pool token joins its most cosine-similar center; a center's hidden state becomes its group's mean and
    it keeps its own position. Returns (hidden with centers replaced, centers mask).
    """
    pool = top_visual(scores, dropped, num_centers * pool_factor)
    centers = top_visual(scores, dropped, num_centers)
    hidden = hidden.clone()
    for row in range(len(hidden)):
        center_idx, member_idx = centers[row].nonzero().flatten(), (pool[row] & ~centers[row]).nonzero().flatten()
        if len(center_idx) == 0:
            continue
        unit = torch.nn.functional.normalize(hidden[row], dim=-1)
        nearest = (unit[member_idx] @ unit[center_idx].T).argmax(-1) if len(member_idx) else member_idx
        sums = hidden[row, center_idx].index_add(0, nearest, hidden[row, member_idx])
        sizes = torch.ones(len(center_idx), device=hidden.device).index_add(
            0, nearest, torch.ones(len(member_idx), device=hidden.device))
        hidden[row, center_idx] = sums / sizes[:, None]
    return hidden, centers


def cls_attention_patches(vision_tower, hidden_states: tuple[torch.Tensor, ...], num_kept: int) -> torch.Tensor:
    """(images, num_kept) indices of the patches the [CLS] token attends to most (head-averaged), in order.

    Uses the vision layer that produced the selected features: its pre-norm, q/k projections and scale.
    """
    layers = getattr(vision_tower.encoder, "vision_model", vision_tower.encoder).encoder.layers
    produced_by = vision_tower.select_layer % (len(layers) + 1)  # hidden_states[j] is layer j-1's output
    if produced_by == 0:
        raise ValueError("--token_pruner cls_attention needs --mm_vision_select_layer after at least one layer")
    layer = unsharded(layers[produced_by - 1])
    attn, normed = layer.self_attn, layer.layer_norm1(hidden_states[produced_by - 1])  # (images, 1 + patches, dim)
    images, tokens, _ = normed.shape
    query = attn.q_proj(normed[:, :1]).view(images, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(images, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = (query @ key.transpose(-1, -2) * attn.scale).softmax(-1).mean(1)[:, 0]  # (images, 1 + patches)
    return probs[:, 1:].topk(num_kept, dim=-1).indices.sort(dim=-1).values


# ---------------------------------------------------------------------------------------------- cost
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


def tokens_per_layer(plan: PruningPlan | None, *, num_layers: int, num_text: int, num_visual: int) -> list[int]:
    """Sequence length at every decoder layer for one sample with one image under `plan`."""
    if plan is not None and plan.num_kept_patches is not None:
        num_visual = plan.num_kept_patches
    counts, steps = [], {s.layer: s.num_kept for s in (plan.steps if plan else ())}
    for layer in range(num_layers):
        num_visual = steps.get(layer, num_visual)
        counts.append(num_text + num_visual)
    return counts


# ---------------------------------------------------------------------------------------------- flags
PRUNING_FLAG_TYPES = {"token_pruner": str, "pruning_layers": str, "retained_tokens": str, "fastv_k": int,
                      "fastv_ratio": float, "num_recycled_tokens": int}


def add_pruning_flags(parser) -> None:
    """Add the pruning flags of `ModelArguments` (same names, defaults and help) to an argparse parser."""
    from dataclasses import fields

    from sparsevl.config import ModelArguments

    for item in fields(ModelArguments):
        if item.name in PRUNING_FLAG_TYPES:
            parser.add_argument(f"--{item.name}", type=PRUNING_FLAG_TYPES[item.name], default=item.default,
                                help=item.metadata["help"])
