"""Visual-token pruners: which visual tokens survive, and when.

A `PruningPlan` names a pruner and a schedule of `PruningStep`s; a step's `layer` is the first decoder layer
that runs on the kept tokens. Each pruner is a `PrunerRule` (scorer, which layer's attention decides, merge
rule). Attention scores come from a layer's own q/k projections applied to the few query rows a scorer needs
(so the layers themselves keep running SDPA). Kept tokens keep their original position ids.

Pruners (exact names, `--token_pruner`), and what `--pruning_layers` means for each:
  sparsevlm           SparseVLM (v1.5 code). Raters are chosen once, before layer 0, from the merged input
                      embeddings: for the visual embeddings V and the instruction embeddings T after the image,
                      r = mean over V of softmax over T of V·Tᵀ; raters = text tokens with r above the mean of r.
                      At a pruning layer l (`--pruning_layers l`), layer l runs on all tokens; a visual token's
                      score is its attention probability from the raters (head- and rater-averaged) in layer l;
                      layer l's output is pruned. `--sparsevlm_recycling on` (default): of a stage's dropped
                      tokens the top 30% (+1) by score are clustered (DPC-kNN) into floor(n/10)+1 averaged tokens,
                      appended after the kept visual tokens (so a stage holds keep + clusters visual tokens).
  sparsevlm_weighted  this project's variant: tokens drop *before* layer L (`--pruning_layers L`), ranked with
                      layer L's own attention on its input, every instruction token rating, each weighted by its
                      total attention to vision; `--num_recycled_tokens` pools inside the budget.
  fastv               FastV (K, R): `--pruning_layers K` (or `--fastv_k`): layer K-1's attention, head-averaged,
                      from the last prompt token decides; layers K.. run on the kept round(N(1-R)) tokens.
  random              a seeded random ranking; tokens drop before layer L (`--pruning_layers L`).
  cls_attention       before the LLM: the vision tower's [CLS] attention (head-averaged) to patches in the
                      projected layer; VisionZip's dominant half without the [CLS] token itself.
  visionzip           VisionZip before the LLM: [CLS] + `--dominant` patches by [CLS] attention (summed over
                      heads) in the projected vision layer (-2 in the paper), plus `--contextual` merged tokens.
A prompt with an image but no instruction token after it cannot be rated: sparsevlm, sparsevlm_weighted and
fastv raise an error naming `--token_pruner` (use `random`, `cls_attention` or `visionzip` for such prompts).
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
from torch.distributed.fsdp import FSDPModule

from sparsevl.model.merging import recycled_tokens

PRUNERS = ("none", "sparsevlm", "sparsevlm_weighted", "fastv", "random", "cls_attention", "visionzip")
BEFORE_LLM = ("cls_attention", "visionzip")
FASTV_DEFAULT_K, FASTV_DEFAULT_R = 2, 0.5
RANDOM_TABLE_SIZE = 4096  # random scores are a fixed table indexed by position, so reruns rank alike
# SparseVLM's budgets: average visual tokens over LLaVA-1.5-7B's 32 layers, from 576, by a stage table
SPARSEVLM_PAPER_LAYERS, SPARSEVLM_PAPER_TOKENS = 32, 576
SPARSEVLM_LOCATIONS = (2, 6, 15)  # layers whose outputs are pruned
SPARSEVLM_STAGES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}


@dataclass(frozen=True)
class PruningStep:
    layer: int  # first decoder layer that runs on the kept tokens
    num_kept: int  # visual tokens kept per image from this layer on (recycled ones come on top)


@dataclass(frozen=True)
class PruningPlan:
    pruner: str
    steps: tuple[PruningStep, ...] = ()  # in-LLM steps, layers increasing, counts decreasing
    num_kept_patches: int | None = None  # cls_attention: patches kept per image before the LLM
    num_recycled: int = 0  # sparsevlm_weighted: pooled tokens per image made from pruned ones (inside the budget)
    recycle: bool = False  # sparsevlm: v1.5 recycling (clusters appended after the kept visual tokens)
    dominant: int = 0  # visionzip: dominant patches (plus the [CLS] token)
    contextual: int = 0  # visionzip: contextual (merged) tokens
    seed: int = 0  # random pruner

    @property
    def before_llm(self) -> bool:
        return self.pruner in BEFORE_LLM

    @property
    def tokens_entering_llm(self) -> int | None:
        """Visual tokens per image out of a before-LLM pruner; None for in-LLM pruners."""
        if self.pruner == "visionzip":
            return 1 + self.dominant + self.contextual
        return self.num_kept_patches


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

    def appended(self, count: int) -> "PruningContext":
        """Extend on the right with `count` visual tokens that do not rate (recycled clusters)."""
        ones = self.image_mask.new_ones(len(self.image_mask), count)
        return PruningContext(torch.cat([self.image_mask, ones], 1), torch.cat([self.rater_mask, ~ones], 1),
                              self.images_per_row)


@dataclass
class KeptTokens:
    hidden: torch.Tensor  # (batch, seq, dim): the layer's tokens (sparsevlm_weighted pools in place)
    mask: torch.Tensor  # (batch, seq) True where the token stays
    appended: torch.Tensor | None = None  # (batch, clusters, dim): recycled tokens, after the kept visual tokens
    appended_valid: torch.Tensor | None = None  # (batch, clusters)


# ---------------------------------------------------------------------------------------------- plans
def parse_schedule(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers") from None


def resolve_count(value: float, tokens_per_image: int, flag: str) -> int:
    """A count (>= 1) or a ratio (0 < r < 1) of the visual tokens per image -> a count, checked."""
    if value != int(value) and not 0 < value < 1:
        raise ValueError(f"{flag}: {value} is neither a whole count nor a ratio in (0, 1)")
    count = round(value * tokens_per_image) if value < 1 else int(value)
    if not 1 <= count <= tokens_per_image:
        raise ValueError(f"{flag}: keeping {count} visual tokens per image is impossible: "
                         f"there are {tokens_per_image} per image (and at least 1 must stay)")
    return count


def sparsevlm_schedule(budget: int, *, num_layers: int, num_visual: int) -> tuple[list[int], list[int]]:
    """SparseVLM's stage table for `budget` scaled to a model: (pruned layers l, visual tokens kept per image).

    The paper prunes the outputs of layers 2, 6, 15 of 32 (3, 7 and 16 layers run before each stage); here stage i
    prunes the output of layer round((l_i + 1) * num_layers / 32) - 1 (kept increasing), and keeps
    round(count * num_visual / 576) tokens (these must stay >= 1 and decrease from stage to stage, else the
    model is too small for the budget). At 32 layers and 576 tokens this is the paper's table exactly.
    """
    if budget not in SPARSEVLM_STAGES:
        raise ValueError(f"--sparsevlm_budget {budget}: choose from {sorted(SPARSEVLM_STAGES)} (the paper's budgets)")
    layers, previous_layer = [], -1
    for location in SPARSEVLM_LOCATIONS:
        previous_layer = max(previous_layer + 1, round((location + 1) * num_layers / SPARSEVLM_PAPER_LAYERS) - 1)
        layers.append(previous_layer)
    counts = [round(count * num_visual / SPARSEVLM_PAPER_TOKENS) for count in SPARSEVLM_STAGES[budget]]
    if layers[-1] > num_layers - 2 or not counts[0] > counts[1] > counts[2] >= 1:
        raise ValueError(f"--sparsevlm_budget {budget}: a model with {num_layers} LLM layers and {num_visual} visual "
                         f"tokens is too small for three stages (layers {layers} must end before the last one, "
                         f"kept tokens {counts} must decrease)")
    return layers, counts


def build_pruning_plan(args, model) -> PruningPlan | None:
    """The plan named by the model arguments' pruning flags, validated against `model`; None for `none`."""
    pruner = args.token_pruner
    if pruner not in PRUNERS:
        raise ValueError(f"--token_pruner {pruner!r} is unknown; choose from: {', '.join(PRUNERS)}")
    _reject_unused(args)
    if pruner == "none":
        return None
    tokens = model.num_projected_tokens  # not num_image_tokens: a plan already set must not shrink the budget
    if pruner in BEFORE_LLM:
        return _before_llm_plan(args, model, tokens)
    num_layers = _num_llm_layers(model)
    if args.sparsevlm_budget is not None:
        layers, num_kept = sparsevlm_schedule(args.sparsevlm_budget, num_layers=num_layers, num_visual=tokens)
    elif pruner == "fastv" and not args.pruning_layers:
        layers = [FASTV_DEFAULT_K if args.fastv_k is None else args.fastv_k]
        ratio = FASTV_DEFAULT_R if args.fastv_ratio is None else args.fastv_ratio
        if not 0 <= ratio < 1:
            raise ValueError(f"--fastv_ratio {ratio} must be in [0, 1) (R: the fraction of visual tokens pruned)")
        num_kept = [max(1, round(tokens * (1 - ratio)))]
    else:
        layers = [int(v) for v in parse_schedule(args.pruning_layers, "--pruning_layers")]
        counts = parse_schedule(args.retained_tokens, "--retained_tokens")
        if len(layers) != len(counts):
            raise ValueError(f"--pruning_layers has {len(layers)} values but --retained_tokens has {len(counts)}")
        num_kept = [resolve_count(c, tokens, "--retained_tokens") for c in counts]
    first_layers = [layer + 1 for layer in layers] if pruner == "sparsevlm" else layers
    steps = _checked_steps(pruner, first_layers, num_kept, num_layers=num_layers)
    if args.num_recycled_tokens >= steps[-1].num_kept:
        raise ValueError(f"--num_recycled_tokens {args.num_recycled_tokens} must be fewer than the smallest "
                         f"--retained_tokens count ({steps[-1].num_kept})")
    return PruningPlan(pruner=pruner, steps=tuple(steps), num_recycled=args.num_recycled_tokens,
                       recycle=pruner == "sparsevlm" and args.sparsevlm_recycling != "off")


def _reject_unused(args) -> None:
    """Flags that would silently do nothing are errors."""
    pruner, given = args.token_pruner, _given_flags(args)
    owners = {"fastv_k": ("fastv",), "fastv_ratio": ("fastv",), "num_recycled_tokens": ("sparsevlm_weighted",),
              "sparsevlm_budget": ("sparsevlm",), "sparsevlm_recycling": ("sparsevlm",), "dominant": ("visionzip",),
              "contextual": ("visionzip",), "pruning_layers": tuple(PRUNER_RULES),
              "retained_tokens": tuple(PRUNER_RULES) + ("cls_attention",)}
    for flag, pruners in owners.items():
        if flag in given and pruner not in pruners:
            raise ValueError(f"--{flag} applies to --token_pruner {' or '.join(pruners)}, not {pruner}")
    if args.sparsevlm_recycling not in ("", "on", "off"):
        raise ValueError(f"--sparsevlm_recycling {args.sparsevlm_recycling!r}: choose on or off")
    if given & {"fastv_k", "fastv_ratio", "sparsevlm_budget"} and given & {"pruning_layers", "retained_tokens"}:
        raise ValueError("give either --fastv_k/--fastv_ratio, or --sparsevlm_budget, or --pruning_layers/"
                         "--retained_tokens, not both")
    schedule = {"pruning_layers", "retained_tokens"}
    needs_schedule = pruner in ("sparsevlm_weighted", "random") or (pruner == "sparsevlm" and
                                                                     "sparsevlm_budget" not in given)
    if needs_schedule or (pruner == "fastv" and given & schedule):
        if not schedule <= given:
            raise ValueError(f"--token_pruner {pruner} needs --pruning_layers and --retained_tokens"
                             + (" (or --sparsevlm_budget)" if pruner == "sparsevlm" else ""))
    if pruner == "visionzip" and not {"dominant", "contextual"} <= given:
        raise ValueError("--token_pruner visionzip needs --dominant and --contextual (the paper: 54+10, 108+20, "
                         "162+30)")


def _given_flags(args) -> set[str]:
    """Pruning flags set away from their defaults (--token_pruner among them when it is not `none`)."""
    return {name for name, value in vars(pruning_arguments("none")).items() if getattr(args, name) != value}


def _checked_steps(pruner: str, layers: list[int], counts: list[int], *, num_layers: int) -> list[PruningStep]:
    """Steps whose `layers` are the first layers on kept tokens; errors speak in the pruner's own layer numbers."""
    lowest = 1 if PRUNER_RULES[pruner].scores_at == "previous" else 0
    shift = 1 if pruner == "sparsevlm" else 0  # sparsevlm's flag names the layer whose output is pruned
    for layer in layers:
        if not lowest <= layer < num_layers:
            raise ValueError(f"--pruning_layers: layer {layer - shift} is outside the LLM's {num_layers} layers for "
                             f"--token_pruner {pruner} (valid: {lowest - shift}..{num_layers - 1 - shift})")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"--pruning_layers {[v - shift for v in layers]} must be strictly increasing")
    if any(b >= a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"--retained_tokens {counts} must be strictly decreasing (each step keeps fewer tokens)")
    return [PruningStep(layer, count) for layer, count in zip(layers, counts)]


def _before_llm_plan(args, model, tokens: int) -> PruningPlan:
    tower, pruner = model.vision_tower, args.token_pruner
    if not tower.has_cls_token:
        raise ValueError(f"--token_pruner {pruner} needs a CLIP vision tower (it has a [CLS] token)")
    if getattr(model.projector, "num_output_tokens", None):
        raise ValueError(f"--token_pruner {pruner} needs a token-wise projector (not qformer)")
    if tower.select_layer % (tower.config.num_hidden_layers + 1) == 0:
        raise ValueError(f"--token_pruner {pruner} needs --mm_vision_select_layer after at least one layer")
    if pruner == "visionzip":
        if not (args.dominant >= 1 and args.contextual >= 1 and args.dominant + args.contextual <= tower.num_patches
                - 1):
            raise ValueError(f"--dominant {args.dominant} --contextual {args.contextual}: need both >= 1 and "
                             f"dominant + contextual < the tower's {tower.num_patches} patches")
        return PruningPlan(pruner="visionzip", dominant=args.dominant, contextual=args.contextual)
    counts = parse_schedule(args.retained_tokens, "--retained_tokens")
    if len(counts) != 1:
        raise ValueError("--token_pruner cls_attention prunes once, before the LLM: give one --retained_tokens value")
    if tower.select_feature != "patch":
        raise ValueError("--token_pruner cls_attention needs --mm_vision_select_feature patch")
    return PruningPlan(pruner="cls_attention", num_kept_patches=resolve_count(counts[0], tokens, "--retained_tokens"))


def _num_llm_layers(model) -> int:
    return model.llm.config.num_hidden_layers  # a PEFT wrapper forwards `config` to its base model


# ---------------------------------------------------------------------------------------------- mechanics
def pack_kept(keep: torch.Tensor, padding_side: str, order: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq) bool -> (index, valid), each (batch, most kept): kept positions sorted by `order` (default:
    position), fill at `padding_side`."""
    counts, seq = keep.sum(1), keep.shape[1]
    width = int(counts.max())
    if order is None:
        order = torch.arange(seq, device=keep.device).expand_as(keep)
    slot = torch.arange(width, device=keep.device)
    if padding_side == "left":  # fill first, then the kept tokens in order
        index = torch.argsort(torch.where(keep, order, -1), dim=1, stable=True)[:, seq - width:]
        return index, slot >= (width - counts)[:, None]
    index = torch.argsort(torch.where(keep, order, int(order.max()) + 1), dim=1, stable=True)[:, :width]
    return index, slot < counts[:, None]


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


def choose_raters(embeds: torch.Tensor, context: PruningContext, valid: torch.Tensor) -> PruningContext:
    """SparseVLM's raters, once before layer 0: instruction tokens whose relevance to the image is above the mean.

    Relevance r = mean over the row's visual embeddings V of softmax over its instruction embeddings T of V·Tᵀ.
    (When all r are equal, e.g. one instruction token, none is above the mean: then all of them rate.)
    """
    chosen = torch.zeros_like(context.rater_mask)
    for row in range(len(embeds)):
        visual = (context.image_mask[row] & valid[row]).nonzero().flatten()
        text = (context.rater_mask[row] & valid[row]).nonzero().flatten()
        if len(visual) == 0 or len(text) == 0:
            continue  # the scorer names such rows
        relevance = (embeds[row, visual] @ embeds[row, text].T).softmax(-1).mean(0)  # (text,)
        above = relevance > relevance.mean()
        chosen[row, text[above if above.any() else torch.ones_like(above)]] = True
    return replace(context, rater_mask=chosen)


def rater_scores(attention, context: PruningContext, valid: torch.Tensor, positions, plan) -> torch.Tensor:
    """SparseVLM: each visual token's attention probability from the chosen raters, averaged over heads and summed
    over raters (the paper's mean over raters divided by a per-row count, which ranks a row's tokens alike)."""
    raters = context.rater_mask & valid
    _rows_or_error(raters, context.image_mask & valid, "sparsevlm")
    rows, rows_valid = pack_kept(raters, "right")
    return (attention(rows).mean(1) * rows_valid[..., None]).sum(1)  # (batch, R, seq) -> (batch, seq)


def weighted_scores(attention, context: PruningContext, valid: torch.Tensor, positions, plan) -> torch.Tensor:
    """sparsevlm_weighted: attention to each visual token from every instruction token, each rater weighted by
    its own total attention to vision, so the tokens that look at the image decide (a soft rater selection:
    the hard above-the-mean cut lost the shape word of colour questions on the shapes benchmark). The scores rank
    a row's tokens only, so they are left unnormalised."""
    visual, candidates = context.image_mask & valid, context.rater_mask & valid
    _rows_or_error(candidates, visual, "sparsevlm_weighted")
    rows, rows_valid = pack_kept(candidates, "right")
    probs = attention(rows).mean(1) * visual[:, None, :]  # (batch, R, seq): head-averaged, visual keys only
    weights = probs.sum(-1) * rows_valid  # (batch, R) each rater's total attention to vision
    return (probs * weights[..., None]).sum(1)


def last_token_scores(attention, context: PruningContext, valid: torch.Tensor, positions, plan) -> torch.Tensor:
    """FastV: attention (head-averaged) from the last prompt token (the last instruction token)."""
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


@dataclass(frozen=True)
class PrunerRule:
    scorer: Callable[..., torch.Tensor]
    scores_at: str  # "previous": layer L-1 (the last layer on all tokens) decides; "input": layer L, before it runs


PRUNER_RULES: dict[str, PrunerRule] = {
    "sparsevlm": PrunerRule(rater_scores, "previous"),
    "sparsevlm_weighted": PrunerRule(weighted_scores, "input"),
    "fastv": PrunerRule(last_token_scores, "previous"),
    "random": PrunerRule(random_scores, "input"),
}


def prepare_context(plan: PruningPlan, embeds: torch.Tensor, context: PruningContext,
                    valid: torch.Tensor) -> PruningContext:
    """What a plan needs before layer 0 (sparsevlm: its raters)."""
    return choose_raters(embeds, context, valid) if plan.pruner == "sparsevlm" else context


def score_visual(plan: PruningPlan, *, layer, hidden: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                 rotary, context: PruningContext) -> torch.Tensor:
    """(batch, seq) scores of the plan's scorer from decoder `layer`'s attention on its input `hidden`."""
    def attention(rows):
        return attention_rows(layer, hidden, positions, rows, valid, rotary)

    return PRUNER_RULES[plan.pruner].scorer(attention, context, valid, positions, plan)


def select_kept(step: PruningStep, plan: PruningPlan, scores: torch.Tensor, *, hidden: torch.Tensor,
                valid: torch.Tensor, context: PruningContext) -> KeptTokens:
    """Keep each row's best `step.num_kept` visual tokens per image (+ the plan's merged tokens)."""
    visual = context.image_mask & valid
    budget = context.images_per_row * step.num_kept  # (batch,)
    if plan.recycle:
        kept = top_visual(scores, visual, budget)
        clusters, clusters_valid = recycled_tokens(hidden, scores, visual & ~kept)
        return KeptTokens(hidden, valid & (~visual | kept), clusters, clusters_valid)
    if not plan.num_recycled:
        return KeptTokens(hidden, valid & (~visual | top_visual(scores, visual, budget)))
    kept = top_visual(scores, visual, budget - context.images_per_row * plan.num_recycled)
    hidden, recycled = recycle(hidden, scores, visual & ~kept, context.images_per_row * plan.num_recycled)
    return KeptTokens(hidden, valid & (~visual | kept | recycled))


def recycle(hidden: torch.Tensor, scores: torch.Tensor, dropped: torch.Tensor,
            num_centers: torch.Tensor, pool_factor: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsevlm_weighted's pooling: aggregate the best-scored dropped tokens into `num_centers[row]` tokens.

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
        nearest = (unit[member_idx] @ unit[center_idx].T).argmax(-1)  # (members,), empty when none
        sums = hidden[row, center_idx].index_add(0, nearest, hidden[row, member_idx])
        sizes = torch.ones(len(center_idx), device=hidden.device).index_add(
            0, nearest, torch.ones(len(member_idx), device=hidden.device))
        hidden[row, center_idx] = sums / sizes[:, None]
    return hidden, centers


# ---------------------------------------------------------------------------------------------- flags
PRUNING_FLAG_TYPES = {"token_pruner": str, "pruning_layers": str, "retained_tokens": str, "fastv_k": int,
                      "fastv_ratio": float, "num_recycled_tokens": int, "sparsevlm_budget": int,
                      "sparsevlm_recycling": str, "dominant": int, "contextual": int}


def pruning_arguments(token_pruner: str, **values) -> SimpleNamespace:
    """All pruning flags as `build_pruning_plan` reads them: `ModelArguments`' defaults, overridden by `values`."""
    from dataclasses import fields

    from sparsevl.config import ModelArguments

    defaults = {item.name: item.default for item in fields(ModelArguments) if item.name in PRUNING_FLAG_TYPES}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"unknown pruning flag(s) {unknown}; known: {sorted(defaults)}")
    return SimpleNamespace(**{**defaults, "token_pruner": token_pruner, **values})


def add_pruning_flags(parser) -> None:
    """Add the pruning flags of `ModelArguments` (same names, defaults and help) to an argparse parser."""
    from dataclasses import fields

    from sparsevl.config import ModelArguments

    for item in fields(ModelArguments):
        if item.name in PRUNING_FLAG_TYPES:
            parser.add_argument(f"--{item.name}", type=PRUNING_FLAG_TYPES[item.name], default=item.default,
                                help=item.metadata["help"])
