"""Mixture-of-Experts: top-k router, stacked experts, sorted-token dispatch, balance losses, upcycling.

One MoE library for the projector, the MoE-upcycled LLM FFNs and the Diff-MoE classifier.
Router, dispatch and expert weights are separate pieces; losses are pure functions;
per-expert statistics live as buffers on the `MoELayer` that counts them.
"""

import contextlib
import copy
import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN, SiLUActivation

from sparsevl.model.one_token_routing import FLOAT32_TINY, UNIFORM_SPAN, float32, route_one_token


@dataclass
class RouterOutput:
    """What the router decided for each token; rows of `indices` are sorted by descending probability."""

    weights: Tensor  # (tokens, top_k) combine weights, renormalised over the top-k if normalize_top_k
    indices: Tensor  # (tokens, top_k) int64 expert ids
    logits: Tensor  # (tokens, num_experts) router logits, after noise if any
    probs: Tensor  # (tokens, num_experts) softmax(logits) in fp32


@dataclass
class MoEOutput:
    """Output of `MoELayer.forward`: hidden states, the routing behind them and the auxiliary losses."""

    hidden_states: Tensor  # (..., out_dim), same leading shape as the input
    router: RouterOutput
    dropped_tokens: int  # token-expert assignments dropped by the capacity limit in this call
    balance_count: str  # how the balance loss counts assignments (see load_balancing_loss)

    @functools.cached_property
    def losses(self) -> dict[str, Tensor]:
        """{"balance": load_balancing_loss, "z": router_z_loss}, computed on first access (decoding never asks)."""
        return router_losses(self.router, self.balance_count)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _silu_(x: Tensor) -> Tensor:
    return F.silu(x, inplace=True)


# Activation modules whose forward this function computes in place: a decode step saves the module call and an
# allocation.
_IN_PLACE_FORM = {nn.SiLU: _silu_, SiLUActivation: _silu_}


def _activation(name: str) -> nn.Module:
    if name not in ACT2FN:
        raise ValueError(f"activation {name!r} is unknown; valid names: {sorted(ACT2FN)}")
    return ACT2FN[name]


SECOND_EXPERT_POLICIES = ("argmax", "sampling")


class TopKRouter(nn.Module):
    """Linear gate in fp32 -> softmax -> top-k experts per token (Switch/Mixtral/Qwen3-MoE/GShard routing).

    The first expert is the most probable one. The others are the next most probable ("argmax") or, as in
    GShard / DeepSpeed's top2gating that MoE-LLaVA runs, the argmax of logits + Gumbel(0, 1) noise with the first
    expert masked ("sampling", in training and eval alike); either way each weight is the noise-free probability.
    """

    def __init__(self, *, dim: int, num_experts: int, top_k: int, noise_std: float = 0.0,
                 normalize_top_k: bool = True, bias: bool = False, second_expert_policy: str = "argmax"):
        super().__init__()
        _check_positive(dim=dim, num_experts=num_experts, top_k=top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise ValueError(f"second_expert_policy must be one of {SECOND_EXPERT_POLICIES}, "
                             f"got {second_expert_policy!r}")
        self.num_experts, self.top_k = num_experts, top_k
        self.noise_std, self.normalize_top_k = noise_std, normalize_top_k
        self.second_expert_policy = second_expert_policy
        self.gate = nn.Linear(dim, num_experts, bias=bias)

    def gate_logits(self, x: Tensor) -> Tensor:
        """Router logits (tokens, num_experts) in fp32: a Linear gate runs on fp32 input and weight, autocast off."""
        if not isinstance(self.gate, nn.Linear):
            return self.gate(x).float()
        bias = None if self.gate.bias is None else _as_dtype(self.gate.bias, torch.float32)
        x, weight = _as_dtype(x, torch.float32), _as_dtype(self.gate.weight, torch.float32)
        if torch.is_autocast_enabled(x.device.type):  # turning it off costs more than the gate when it is off
            with torch.autocast(device_type=x.device.type, enabled=False):
                return F.linear(x, weight, bias)
        return F.linear(x, weight, bias)

    def forward(self, x: Tensor) -> RouterOutput:
        """Route x (tokens, dim); N(0, noise_std) logit noise is added only in training."""
        logits = self.gate_logits(x)  # (tokens, num_experts) fp32
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs = logits.softmax(dim=-1)
        sampling = self.second_expert_policy == "sampling" and self.top_k > 1
        uniform = torch.rand(logits.shape, device=logits.device) if sampling else None  # for the Gumbel noise
        if x.shape[0] == 1 and self.top_k <= 2 and not torch.is_grad_enabled():  # a decode step
            picked = route_one_token(probs.tolist()[0], logits.tolist()[0] if sampling else None,
                                     uniform.tolist()[0] if sampling else None, top_k=self.top_k,
                                     normalize=self.normalize_top_k)
            if picked is not None:
                chosen, weights = picked
                return RouterOutput(weights=torch.tensor([weights], dtype=x.dtype, device=x.device),
                                    indices=torch.tensor([chosen], device=x.device), logits=logits, probs=probs)
        if sampling:  # GShard: the second choice is the argmax of logits + Gumbel(0, 1) noise, the first masked
            noise_free = logits.detach() if logits.requires_grad else logits
            noisy = noise_free - _log_neg_log_(uniform)
            indices = _gumbel_choices(noisy, probs.argmax(dim=-1), self.top_k)
        else:
            indices = probs.topk(self.top_k, dim=-1).indices  # (tokens, top_k), descending
        weights = probs.gather(1, indices)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(weights=weights.to(x.dtype), indices=indices, logits=logits, probs=probs)


def _as_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """tensor.to(dtype) without the call when it already is (at decode sizes each call costs microseconds)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def gumbel_noise(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Gumbel(0, 1) samples from torch's global generator, the values torch.distributions.Gumbel(0, 1).sample draws
    (DeepSpeed's gumbel_rsample): -log(-log(u)), u = tiny + U(0, 1) x (1 - eps - tiny). Written out because
    building the distribution object costs about a millisecond per call."""
    return _log_neg_log_(torch.rand(shape, device=device)).neg_()


def _log_neg_log_(uniform: Tensor) -> Tensor:
    """log(-log(u)), u = tiny + uniform x (1 - eps - tiny), in place on `uniform` (U(0, 1) draws): minus the
    Gumbel noise, so that logits - this is logits + Gumbel noise to the last bit."""
    return uniform.mul_(UNIFORM_SPAN).add_(FLOAT32_TINY).log_().neg_().log_()


def _gumbel_choices(noisy: Tensor, first: Tensor, top_k: int) -> Tensor:
    """(tokens, top_k) experts: `first`, then the top_k - 1 largest of `noisy` (logits + Gumbel noise, changed
    in place) with `first` masked."""
    first = first.unsqueeze(1)
    noisy = noisy.scatter_(1, first, float("-inf"))
    return torch.cat([first, noisy.topk(top_k - 1, dim=-1).indices], dim=1)


def _uniform_init_(weight: Tensor, bias: Tensor | None, fan_in: int) -> None:
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for every expert."""
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


def grouped_linear(x_sorted: Tensor, weight: Tensor, tokens_per_expert: Tensor, bias: Tensor | None = None) -> Tensor:
    """Row slice e of x_sorted times weight[e].T (+ bias[e]); weight (num_experts, out, in), bias (num_experts, out)."""
    offsets = tokens_per_expert.cumsum(0).to(torch.int32)  # end row of each expert's slice
    y = F.grouped_mm(x_sorted, weight.transpose(1, 2), offs=offsets)  # (tokens_sorted, out)
    if y.requires_grad:
        y.register_hook(Tensor.contiguous)  # the CPU backward rejects stride-0 grads, e.g. from y.sum()
    if bias is not None:
        y = y + bias.repeat_interleave(tokens_per_expert, dim=0, output_size=x_sorted.shape[0])
    return y


class MLPExperts(nn.Module):
    """num_experts plain 2-layer MLPs (Linear -> act -> Linear) with stacked (num_experts, out, in) weights."""

    def __init__(self, *, num_experts: int, dim: int, hidden_dim: int, out_dim: int | None = None,
                 activation: str = "gelu", bias: bool = True):
        super().__init__()
        _check_positive(num_experts=num_experts, dim=dim, hidden_dim=hidden_dim)
        out_dim = dim if out_dim is None else out_dim
        self.num_experts, self.out_dim = num_experts, out_dim
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, out_dim, hidden_dim))
        self.up_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_dim)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, out_dim)) if bias else None
        self.act_fn = _activation(activation)
        _uniform_init_(self.up_proj, self.up_proj_bias, dim)
        _uniform_init_(self.down_proj, self.down_proj_bias, hidden_dim)

    def forward(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """x_sorted (tokens_sorted, dim) grouped by expert -> (tokens_sorted, out_dim)."""
        h = self.act_fn(grouped_linear(x_sorted, self.up_proj, tokens_per_expert, self.up_proj_bias))
        return grouped_linear(h, self.down_proj, tokens_per_expert, self.down_proj_bias)

    def forward_each(self, x: Tensor, experts: list[int]) -> list[Tensor]:
        """Each of `experts` on the same rows x: `expert_forward` in turn."""
        return [self.expert_forward(e, x) for e in experts]

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """Expert e on x (tokens, dim) with plain F.linear: the reference path."""
        has_bias = self.up_proj_bias is not None
        up_bias, down_bias = (self.up_proj_bias[e], self.down_proj_bias[e]) if has_bias else (None, None)
        return F.linear(self.act_fn(F.linear(x, self.up_proj[e], up_bias)), self.down_proj[e], down_bias)

    @classmethod
    def from_dense(cls, mlp: nn.Sequential, num_experts: int) -> "MLPExperts":
        """Upcycle nn.Sequential(Linear, act, Linear): every expert a copy of it, activation module included."""
        if not (isinstance(mlp, nn.Sequential) and len(mlp) == 3
                and isinstance(mlp[0], nn.Linear) and isinstance(mlp[2], nn.Linear)):
            raise ValueError(f"mlp must be nn.Sequential(Linear, act, Linear), got {mlp}")
        fc1, fc2 = mlp[0], mlp[2]
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError("mlp's two Linear layers must both have a bias or both have none")
        experts = cls(num_experts=num_experts, dim=fc1.in_features, hidden_dim=fc1.out_features,
                      out_dim=fc2.out_features, bias=fc1.bias is not None)
        experts.act_fn = copy.deepcopy(mlp[1])
        experts.to(fc1.weight)
        _copy_into_experts(experts.up_proj, fc1.weight)
        _copy_into_experts(experts.down_proj, fc2.weight)
        if fc1.bias is not None:
            _copy_into_experts(experts.up_proj_bias, fc1.bias)
            _copy_into_experts(experts.down_proj_bias, fc2.bias)
        return experts


class GatedMLPExperts(nn.Module):
    """num_experts SiLU-gated MLPs, down(act(gate(x)) * up(x)), no bias: LlamaMLP / Qwen3MLP stacked per expert."""

    def __init__(self, *, num_experts: int, dim: int, hidden_dim: int, activation: str = "silu"):
        super().__init__()
        _check_positive(num_experts=num_experts, dim=dim, hidden_dim=hidden_dim)
        self.num_experts, self.out_dim = num_experts, dim
        # separate gate and up weights: a fused [gate; up] matmul costs a (tokens, 2 * hidden) cat in backward
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.act_fn = _activation(activation)
        for weight in self.parameters():
            _uniform_init_(weight, None, weight.shape[-1])

    def forward(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """x_sorted (tokens_sorted, dim) grouped by expert -> (tokens_sorted, dim)."""
        gate = grouped_linear(x_sorted, self.gate_proj, tokens_per_expert)  # (tokens_sorted, hidden)
        up = grouped_linear(x_sorted, self.up_proj, tokens_per_expert)
        return grouped_linear(self.act_fn(gate) * up, self.down_proj, tokens_per_expert)

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """Expert e on x (tokens, dim) with plain F.linear: the reference path."""
        gate, up = F.linear(x, self.gate_proj[e]), F.linear(x, self.up_proj[e])
        return F.linear(self.act_fn(gate) * up, self.down_proj[e])

    def forward_each(self, x: Tensor, experts: list[int]) -> list[Tensor]:
        """Each of `experts` on the same rows x without grad (a decode step), `expert_forward`'s values: the
        gate and up matmuls of all first, then the small elementwise ops together, then the down matmuls (each
        small op after a matmul that cycled the caches costs microseconds)."""
        act_fn = _IN_PLACE_FORM.get(type(self.act_fn), self.act_fn)  # the module call costs more than silu
        views = self._expert_weights()
        weights = [views[e] for e in experts]
        gates_ups = [(F.linear(x, gate), F.linear(x, up)) for gate, up, _ in weights]
        hidden = [act_fn(gate).mul_(up) for gate, up in gates_ups]
        return [F.linear(h, down) for h, (_, _, down) in zip(hidden, weights)]

    def _expert_weights(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(gate, up, down) weight views per expert, without autograd, made once while the three parameters keep
        their storage (three views cost a decode step microseconds); `_apply` (.to, .float, ...) drops them."""
        params = (self.gate_proj, self.up_proj, self.down_proj)
        key = tuple((id(p), p.data_ptr(), p.shape) for p in params)
        cached = self.__dict__.get("_weight_views")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_weight_views"] = (key, list(zip(*(p.detach().unbind(0) for p in params))))
        return cached[1]

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_weight_views", None)  # views of the old storage would keep it alive
        return super()._apply(fn, recurse)

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int) -> "GatedMLPExperts":
        """Upcycle a module with gate_proj/up_proj/down_proj Linear and act_fn (LlamaMLP, Qwen3MLP)."""
        names = ("gate_proj", "up_proj", "down_proj")
        projections = [getattr(mlp, name, None) for name in names]
        if not all(isinstance(p, nn.Linear) and p.bias is None for p in projections):
            raise ValueError(f"mlp must have bias-free Linear gate_proj, up_proj and down_proj, got {mlp}")
        experts = cls(num_experts=num_experts, dim=mlp.gate_proj.in_features, hidden_dim=mlp.gate_proj.out_features)
        experts.act_fn = copy.deepcopy(mlp.act_fn)
        experts.to(mlp.gate_proj.weight)
        for name, dense in zip(names, projections):
            _copy_into_experts(getattr(experts, name), dense.weight)
        return experts


@torch.no_grad()
def _copy_into_experts(stacked: nn.Parameter, dense: Tensor) -> None:
    stacked.copy_(dense.unsqueeze(0).expand_as(stacked))


def capacity_mask(indices: Tensor, num_experts: int, capacity: int, priority: Tensor | None = None) -> Tensor:
    """(tokens, top_k) bool: which assignments fit in their expert's `capacity` slots.

    Without `priority` an expert fills its slots with first choices in token order, then second choices in
    token order, ... (GShard / DeepSpeed top2gating). With `priority` (tokens, top_k) the highest go first
    (DeepSpeed's random token selection passes uniform noise).
    """
    num_tokens, top_k = indices.shape
    expert_ids = indices.t().reshape(-1)  # (top_k * tokens,) choice-major
    order = torch.arange(expert_ids.numel(), device=indices.device)
    if priority is not None:
        order = priority.t().reshape(-1).argsort(descending=True, stable=True)
    expert_ids_sorted, within = expert_ids[order].sort(stable=True)
    order = order[within]
    tokens_per_expert = torch.bincount(expert_ids, minlength=num_experts)
    group_starts = tokens_per_expert.cumsum(0) - tokens_per_expert
    rank = torch.arange(order.numel(), device=indices.device) - group_starts[expert_ids_sorted]
    kept = torch.empty_like(expert_ids, dtype=torch.bool)
    kept[order] = rank < capacity
    return kept.view(top_k, num_tokens).t()


def weights_over_kept(weights: Tensor, kept: Tensor, *, renormalize: bool) -> Tensor:
    """Combine weights with dropped assignments zeroed; renormalised over the kept ones when `renormalize`
    (a token that lost every choice gets all-zero weights, i.e. only the layer's residual)."""
    weights = weights * kept
    if not renormalize:
        return weights
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).eps)


def _unsort_rows(rows: Tensor, order: Tensor, total: int) -> Tensor:
    """Put rows[j] back at position order[j] of a (total, ...) tensor, zeros where absent; a gather, not a scatter."""
    if order.numel() < total:
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # row `kept` is the zero row for drops
    inverse = order.new_full((total,), order.numel())
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return rows[inverse]


# At or below this many routed assignments (tokens x top_k), dispatch runs the experts it touches one by one with no
# sort (decode sizes): an E-way grouped matmul over mostly empty groups, and the sort around it, cost more than the
# touched experts themselves.
LOOP_DISPATCH_MAX_ASSIGNMENTS = 16


def dispatch(x: Tensor, router_output: RouterOutput, experts: nn.Module, kept: Tensor | None = None, *,
             loop_max_assignments: int | None = None) -> tuple[Tensor, Tensor]:
    """Group token copies by expert, run each expert on its own slice, sum weighted outputs back per token.

    `kept` (tokens, top_k) bool leaves out dropped assignments (see `capacity_mask`). Returns (output
    (tokens, out_dim), routed tokens_per_expert before drops). At most `loop_max_assignments` routed assignments
    (default LOOP_DISPATCH_MAX_ASSIGNMENTS) run expert by expert, more in one grouped matmul. The outputs come
    back by a gather, not a scatter (CPU index_add costs ~100 ms for one row in torch 2.13).
    """
    if loop_max_assignments is None:
        loop_max_assignments = LOOP_DISPATCH_MAX_ASSIGNMENTS
    num_tokens, top_k = router_output.indices.shape
    if 0 < top_k * num_tokens <= loop_max_assignments:
        y, tokens_per_expert = _touched_experts(x, router_output.indices, experts, kept)
    else:
        y, tokens_per_expert = _grouped_experts(x, router_output.indices, experts, kept)
    weights = router_output.weights.t().reshape(-1, 1).to(y.dtype)  # (top_k * tokens, 1)
    return (y * weights).view(top_k, num_tokens, y.shape[-1]).sum(dim=0), tokens_per_expert


def _grouped_experts(x: Tensor, indices: Tensor, experts: nn.Module, kept: Tensor | None) -> tuple[Tensor, Tensor]:
    """Every expert's rows in one grouped matmul over the assignments sorted by expert: (outputs (top_k * tokens,
    out_dim) choice-major, zero where dropped; routed tokens_per_expert)."""
    num_tokens, top_k = indices.shape
    expert_ids = indices.t().reshape(-1)  # (top_k * tokens,) choice-major
    tokens_per_expert = torch.bincount(expert_ids, minlength=experts.num_experts)
    assignments = None if kept is None else kept.t().reshape(-1).nonzero().squeeze(1)  # kept, choice-major
    if assignments is not None:
        expert_ids = expert_ids[assignments]
    expert_ids_sorted, order = expert_ids.sort(stable=True)
    if assignments is not None:
        order = assignments[order]
    kept_per_expert = torch.bincount(expert_ids_sorted, minlength=experts.num_experts)
    y = experts(x[order % num_tokens], kept_per_expert)  # (kept, out_dim) grouped by expert
    return _unsort_rows(y, order, top_k * num_tokens), tokens_per_expert


def _touched_experts(x: Tensor, indices: Tensor, experts: nn.Module, kept: Tensor | None) -> tuple[Tensor, Tensor]:
    """Decode sizes: each touched expert on its kept tokens with plain F.linear, grouped in Python instead of
    sorted; returns what `_grouped_experts` returns."""
    num_tokens, top_k = indices.shape
    keep = None if kept is None else kept.t().reshape(-1).tolist()
    tokens_per_expert = [0] * experts.num_experts
    assignments_of: dict[int, list[int]] = {}  # expert -> its kept assignments (slot * tokens + token), in order
    for assignment, expert in enumerate(indices.t().reshape(-1).tolist()):  # choice-major
        tokens_per_expert[expert] += 1
        if keep is None or keep[assignment]:
            assignments_of.setdefault(expert, []).append(assignment)
    order = [assignment for group in assignments_of.values() for assignment in group]  # row r: assignment order[r]
    if num_tokens == 1:
        inputs = [x] * len(assignments_of)
    else:
        rows = x.index_select(0, torch.tensor([a % num_tokens for a in order], dtype=torch.long, device=x.device))
        inputs = rows.split([len(group) for group in assignments_of.values()])
    outputs = [experts.expert_forward(expert, rows) for expert, rows in zip(assignments_of, inputs)]
    counts = torch.tensor(tokens_per_expert, device=indices.device)
    total = top_k * num_tokens
    if order == list(range(total)):  # one token on distinct experts: rows already in assignment order
        return torch.cat(outputs), counts
    row_of = [len(order)] * total  # dropped assignments read the zero row appended last
    for row, assignment in enumerate(order):
        row_of[assignment] = row
    zero_row = (outputs[0] if outputs else x).new_zeros(1, experts.out_dim)
    y = torch.cat([*outputs, zero_row]).index_select(0, torch.tensor(row_of, dtype=torch.long, device=x.device))
    return y, counts


def dispatch_one_token(x: Tensor, router_output: RouterOutput, experts: nn.Module) -> Tensor:
    """`dispatch`'s output for one token (1, dim) without grad, as decoding calls it, to the last bit: each chosen
    expert's output (a new tensor) weighted and summed in place, no grouping (at this size each torch op costs
    more than its arithmetic)."""
    chosen, weights = router_output.indices.tolist()[0], router_output.weights.tolist()[0]
    outputs = experts.forward_each(x, chosen)
    if outputs[0].dtype != router_output.weights.dtype:  # autocast: the weights rounded as dispatch rounds them
        weights = router_output.weights.to(outputs[0].dtype).tolist()[0]
    out = outputs[0].mul_(weights[0])
    for y, weight in zip(outputs[1:], weights[1:]):
        out.add_(y.mul_(weight))
    return out


def dispatch_reference(x: Tensor, router_output: RouterOutput, experts: nn.Module) -> Tensor:
    """Naive oracle (tests only): every expert on every token, weighted by a dense combine matrix."""
    combine = torch.zeros_like(router_output.probs, dtype=x.dtype)  # (tokens, num_experts)
    combine = combine.scatter(1, router_output.indices, router_output.weights.to(x.dtype))
    outputs = torch.stack([experts.expert_forward(e, x) for e in range(experts.num_experts)], dim=1)  # (tokens, E, out)
    return (combine.unsqueeze(-1) * outputs).sum(dim=1)


BALANCE_COUNTS = ("top_k", "top1")


class MoELayer(nn.Module):
    """Router + experts (+ optional always-on shared experts), with per-expert counts kept as buffers.

    Capacity (GShard / DeepSpeed): each expert takes at most max(min_capacity, ceil(tokens / E * factor * top_k))
    assignments per call, factor = capacity_factor in training and eval_capacity_factor in eval (None: no
    limit); overflow is dropped and the kept weights are renormalised when the router normalises its top-k.
    random_token_selection (top-1 only) fills the slots in random order instead of token order.
    """

    def __init__(self, *, router: TopKRouter, experts: nn.Module, shared_experts: nn.Module | None = None,
                 capacity_factor: float | None = None, eval_capacity_factor: float | None = None,
                 min_capacity: int = 0, random_token_selection: bool = False, balance_count: str = "top_k"):
        super().__init__()
        if router.num_experts != experts.num_experts:
            raise ValueError(f"num_experts differ: router has {router.num_experts}, experts have {experts.num_experts}")
        for name, factor in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if factor is not None and factor <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {factor}")
        if min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {min_capacity}")
        if random_token_selection and router.top_k != 1:
            raise ValueError(f"random_token_selection is DeepSpeed's top-1 rule; top_k is {router.top_k}")
        if balance_count not in BALANCE_COUNTS:
            raise ValueError(f"balance_count must be one of {BALANCE_COUNTS}, got {balance_count!r}")
        self.router, self.experts, self.shared_experts = router, experts, shared_experts
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.random_token_selection = min_capacity, random_token_selection
        self.balance_count = balance_count
        self.track_stats = True
        counts = torch.zeros(router.num_experts, dtype=torch.long)
        self.register_buffer("routed_token_counts", counts, persistent=False)  # read expert_token_counts
        self._decode_choices: list[int] = []  # experts of one-token calls not yet added to the counts
        self.register_buffer("dropped_token_count", torch.zeros((), dtype=torch.long), persistent=False)

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert may take now: max(min_capacity, ceil(tokens / E * factor * top_k)), computed in
        fp32 as DeepSpeed does; None when the factor of the current mode (training / eval) is None."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        scaled = float32(float32(factor * self.router.top_k) * float32(num_tokens / self.router.num_experts))
        return max(self.min_capacity, math.ceil(scaled))

    def forward(self, x: Tensor) -> MoEOutput:
        """x (..., dim) -> MoEOutput with hidden_states (..., out_dim)."""
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (tokens, dim)
        routing = self.router(flat)
        if flat.shape[0] == 1 and not torch.is_grad_enabled():  # one decode token: a capacity (>= 1) keeps it
            dropped = 0
            if self.track_stats:
                self._decode_choices += routing.indices.tolist()[0]
            out = dispatch_one_token(flat, routing, self.experts)
        else:
            kept = self._kept(routing)
            if kept is not None:
                renormalize = self.router.normalize_top_k
                routing = dataclasses.replace(routing, weights=weights_over_kept(routing.weights, kept,
                                                                                 renormalize=renormalize))
            out, tokens_per_expert = dispatch(flat, routing, self.experts, kept)
            dropped = 0 if kept is None else int(kept.numel() - kept.sum())
            if self.track_stats:
                self._count(tokens_per_expert, dropped)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        out = out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])
        return MoEOutput(out, routing, dropped, self.balance_count)

    def _kept(self, routing: RouterOutput) -> Tensor | None:
        """Capacity mask of this call's assignments (None without a capacity limit)."""
        num_tokens = routing.indices.shape[0]
        capacity = self.capacity(num_tokens)
        if capacity is None or capacity >= num_tokens:  # a token takes an expert once: nothing can overflow
            return None
        priority = None
        if self.random_token_selection:  # DeepSpeed draws one U(0, 1) per (token, expert)
            uniform = torch.rand(num_tokens, self.router.num_experts, device=routing.indices.device)
            priority = uniform.gather(1, routing.indices)
        return capacity_mask(routing.indices, self.router.num_experts, capacity, priority)

    @property
    def expert_token_counts(self) -> Tensor:
        """Tokens routed to each expert since the last reset_stats, drops included: (num_experts,) int64, the
        `routed_token_counts` buffer with the one-token calls' choices added on reading (a decode step keeps
        them in a Python list: two small torch ops cost it more than the list)."""
        if self._decode_choices:
            choices = torch.tensor(self._decode_choices, device=self.routed_token_counts.device)
            self.routed_token_counts += torch.bincount(choices, minlength=self.router.num_experts)
            self._decode_choices.clear()
        return self.routed_token_counts

    def _count(self, tokens_per_expert: Tensor, dropped: int) -> None:
        """Add a call's counts (integer tensors: no autograd to turn off, and a no_grad context costs more)."""
        self.routed_token_counts += tokens_per_expert
        if dropped:
            self.dropped_token_count += dropped

    def reset_stats(self) -> None:
        """Zero the accumulated expert_token_counts and dropped_token_count."""
        self._decode_choices.clear()
        self.routed_token_counts.zero_()
        self.dropped_token_count.zero_()


@contextlib.contextmanager
def expert_stats_paused(module: nn.Module):
    """Within the block, MoE layers under `module` route as usual but add nothing to their token counts
    (for passes that are not the model's own, e.g. adaptive selection scoring k candidate layers)."""
    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
    previous = [layer.track_stats for layer in layers]
    for layer in layers:
        layer.track_stats = False
    try:
        yield
    finally:
        for layer, tracked in zip(layers, previous):
            layer.track_stats = tracked


def expert_load(layer: MoELayer) -> Tensor:
    """Fraction of routed assignments each expert received since the last reset_stats (zeros if none)."""
    counts = layer.expert_token_counts.double()
    return counts / counts.sum().clamp(min=1)


def load_balancing_loss(probs: Tensor, indices: Tensor, num_experts: int, *, count: str = "top_k") -> Tensor:
    """E * sum_i f_i * P_i with P_i = mean over tokens of probs[:, i] and f_i counted as `count` says.

    count="top_k": f_i = (top-k assignments to expert i) / tokens, so sum_i f_i = top_k and a balanced
    router scores top_k (transformers' load_balancing_loss_func). count="top1": f_i = (tokens whose first
    choice indices[:, 0] is i) / tokens, sum 1, balanced scores 1 (Switch Transformer). Gradient flows via P.
    """
    if count not in ("top_k", "top1"):
        raise ValueError(f"count must be 'top_k' or 'top1', got {count!r}")
    chosen = indices if count == "top_k" else indices[:, :1]  # (tokens, k or 1)
    num_tokens = probs.shape[0]
    fraction = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(probs.dtype) / num_tokens
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def router_losses(routing: RouterOutput, balance_count: str) -> dict[str, Tensor]:
    """The auxiliary losses of one routing: {"balance": load_balancing_loss, "z": router_z_loss}."""
    return {"balance": load_balancing_loss(routing.probs, routing.indices, routing.probs.shape[-1],
                                           count=balance_count),
            "z": router_z_loss(routing.logits)}


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, in fp32."""
    return logits.float().logsumexp(dim=-1).square().mean()


def kl_to_uniform_loss(probs: Tensor) -> Tensor:
    """KL(mean expert utilisation || uniform) = sum_i u_i log(u_i * E), u = probs.mean(0); 0 when balanced."""
    utilisation = probs.float().mean(dim=0)  # (num_experts,)
    return torch.xlogy(utilisation, utilisation * probs.shape[-1]).sum()
