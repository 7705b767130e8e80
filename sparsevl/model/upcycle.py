"""MoE-Tuning's upcycling (MoE-LLaVA stage 3): a trained LLM's gated FFNs become MoE layers of identical experts.

The MoE FFN is composed into the decoder layer (`layer.mlp = MoEFeedForward(...)`); transformers' classes are
never patched. Routing follows MoE-LLaVA's code (DeepSpeed 0.9.5's TopKGate): top-2 weights renormalised over
the experts that kept the token, top-1 weighted by its raw probability, capacity per expert, Gumbel-sampled
second expert, balance loss over first choices. Right after upcycling a top-2 model computes what the dense one
did wherever no token is dropped: every expert is a copy of the FFN and the kept weights sum to one.
"""

import re
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from sparsevl.model.moe import GatedMLPExperts, MoELayer, RouterOutput, TopKRouter, expert_stats_paused, router_losses

MOE_MODES = ("sparse", "first_half", "second_half", "dense")  # --moe_mode, MoE-LLaVA's names
PAPER_TRAIN_RULE = "moe_layers"  # --train_modules value for the paper's text: only the MoE layers train


@dataclass
class MoELayout:
    """Which decoder layers are MoE and how they route; saved beside an upcycled checkpoint.

    Field defaults are the routing of checkpoints written before the routing fields existed (deterministic
    top-k renormalised, no capacity, balance over all top-k), so such checkpoints load unchanged.
    """

    layers: list[int]  # decoder-layer indices, increasing
    num_experts: int
    top_k: int
    use_residual: bool = False  # Residual MoE: softmax(coefficient(x)) mixes MoE output and the dense FFN
    capacity_factor: float | None = None  # training; None: no capacity limit
    eval_capacity_factor: float | None = None
    min_capacity: int = 0
    second_expert_policy: str = "argmax"
    normalize_top_k: bool = True  # False: top-1 weighted by its raw probability (MoE-LLaVA)
    random_token_selection: bool = False  # top-1 capacity slots filled in random order (DeepSpeed use_rts)
    balance_count: str = "top_k"

    ARCHITECTURE = ("layers", "num_experts", "top_k", "use_residual")  # what a trained checkpoint fixes

    def to_dict(self) -> dict:
        return asdict(self)

    def architecture(self) -> dict:
        return {name: getattr(self, name) for name in self.ARCHITECTURE}


class MoEFeedForward(nn.Module):
    """A decoder layer's FFN as a Mixture of Experts: hidden (batch, seq, dim) -> (batch, seq, dim).

    With `residual` (DeepSpeed's use_residual, Residual MoE), the output is c0 * MoE(x) + c1 * residual(x) with
    (c0, c1) = softmax(coefficient(x)). Keeps what its last forward produced: the losses, which the model
    collects with `pop_losses()`, and each token's experts (`last_expert_indices`, (batch, seq, top_k)).
    """

    def __init__(self, moe: MoELayer, residual: nn.Module | None = None):
        super().__init__()
        self.moe, self.residual = moe, residual
        if residual is not None:
            dim = moe.router.gate.in_features
            self.coefficient = nn.Linear(dim, 2).to(moe.router.gate.weight)
        self._routing: tuple[RouterOutput, str] | None = None  # the last forward's, until its losses are popped
        self.last_expert_indices: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch._C._current_graph_task_id() != -1:  # activation checkpointing recomputes in backward: same
            with expert_stats_paused(self.moe):     # routing, already counted, its losses already handed over
                return self.moe(hidden_states).hidden_states
        out = self.moe(hidden_states)
        self._routing = out.router, out.balance_count  # losses computed only if popped (decoding never asks)
        self.last_expert_indices = out.router.indices.view(*hidden_states.shape[:-1], -1)
        if self.residual is None:
            return out.hidden_states
        coefficient = self.coefficient(hidden_states).softmax(dim=-1)  # (batch, seq, 2)
        return out.hidden_states * coefficient[..., :1] + self.residual(hidden_states) * coefficient[..., 1:]

    def pop_losses(self) -> dict[str, torch.Tensor]:
        """The losses of the last forward, handed over once (a later call returns {} until the next forward)."""
        routing, self._routing = self._routing, None
        return {} if routing is None else router_losses(*routing)


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (`llm.model.layers`)."""
    layers = getattr(getattr(llm, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"--moe_enable: cannot find the decoder layers of {type(llm).__name__} "
                         "(expected llm.model.layers)")
    return layers


def moe_layer_indices(num_layers: int, *, mode: str = "sparse", every: int | None = None,
                      explicit: list[int] | None = None) -> list[int]:
    """Layers to upcycle: `explicit`; else every `every`-th layer counted Qwen3-MoE's way ((i + 1) % every == 0);
    else MoE-LLaVA's `mode`: sparse 0, 2, 4...; first_half 0..L/2-1; second_half L/2..L-1; dense all."""
    if explicit is not None:
        beyond = sorted(i for i in set(explicit) if i >= num_layers)
        if beyond:
            raise ValueError(f"--moe_layers {beyond} beyond the LLM's {num_layers} decoder layers "
                             f"(valid: 0..{num_layers - 1})")
        return sorted(set(explicit))
    if every is not None:
        indices = [i for i in range(num_layers) if (i + 1) % every == 0]
        if not indices:
            raise ValueError(f"--moe_layers_every {every} selects none of the LLM's {num_layers} decoder layers")
        return indices
    by_mode = {"sparse": range(0, num_layers, 2), "first_half": range(num_layers // 2),
               "second_half": range(num_layers // 2, num_layers), "dense": range(num_layers)}
    if mode not in by_mode:
        raise ValueError(f"--moe_mode {mode!r} is unknown; valid: {', '.join(MOE_MODES)}")
    if not by_mode[mode]:
        raise ValueError(f"--moe_mode {mode} selects none of the LLM's {num_layers} decoder layers")
    return list(by_mode[mode])


def requested_layout(args, llm: nn.Module) -> MoELayout:
    """The layout the MoE flags of ModelArguments ask for, checked against this LLM; routing as MoE-LLaVA's."""
    layers = moe_layer_indices(len(decoder_layers(llm)), mode=args.moe_mode, every=args.moe_layers_every,
                               explicit=args.moe_layers)
    return MoELayout(layers=layers, num_experts=args.num_experts, top_k=args.top_k_experts,
                     use_residual=args.use_residual, capacity_factor=args.capacity_factor or None,
                     eval_capacity_factor=args.eval_capacity_factor or None, min_capacity=args.min_capacity,
                     second_expert_policy=args.second_expert_policy, normalize_top_k=args.top_k_experts > 1,
                     random_token_selection=args.top_k_experts == 1, balance_count=args.balance_loss_count)


def upcycle_llm(llm: nn.Module, layout: MoELayout) -> None:
    """Replace the FFN of each layout layer by an MoE whose experts copy it (in place; a fresh router each)."""
    layers = decoder_layers(llm)
    for index in moe_layer_indices(len(layers), explicit=layout.layers):
        mlp = layers[index].mlp
        try:
            experts = GatedMLPExperts.from_dense(mlp, layout.num_experts)
        except ValueError:
            raise ValueError(f"--moe_enable: cannot upcycle decoder layer {index}'s MLP ({type(mlp).__name__}): "
                             "only gated MLPs with bias-free gate_proj/up_proj/down_proj Linear layers and an "
                             "act_fn (LLaMA, Qwen3) are supported") from None
        router = TopKRouter(dim=experts.gate_proj.shape[-1], num_experts=layout.num_experts, top_k=layout.top_k,
                            normalize_top_k=layout.normalize_top_k,
                            second_expert_policy=layout.second_expert_policy).to(mlp.gate_proj.weight)
        moe = MoELayer(router=router, experts=experts, **_layer_routing(layout))
        layers[index].mlp = MoEFeedForward(moe, residual=mlp if layout.use_residual else None)


def _layer_routing(layout: MoELayout) -> dict:
    return {"capacity_factor": layout.capacity_factor, "eval_capacity_factor": layout.eval_capacity_factor,
            "min_capacity": layout.min_capacity, "random_token_selection": layout.random_token_selection,
            "balance_count": layout.balance_count}


def set_routing(llm: nn.Module, layout: MoELayout) -> None:
    """Give the MoE layers of an upcycled LLM the routing settings of `layout` (its architecture must match)."""
    for _, ffn in moe_feed_forwards(llm):
        ffn.moe.router.second_expert_policy = layout.second_expert_policy
        ffn.moe.router.normalize_top_k = layout.normalize_top_k
        for name, value in _layer_routing(layout).items():
            setattr(ffn.moe, name, value)


def moe_feed_forwards(module: nn.Module) -> list[tuple[int, MoEFeedForward]]:
    """(decoder-layer index, MoE FFN) for every upcycled layer of an LLM, in layer order."""
    return [(i, layer.mlp) for i, layer in enumerate(decoder_layers(module)) if isinstance(layer.mlp, MoEFeedForward)]


def moe_layout(llm: nn.Module) -> MoELayout | None:
    """The layout of an upcycled LLM (None when it has no MoE layer)."""
    found = moe_feed_forwards(llm)
    if not found:
        return None
    layouts = {_layer_layout(ffn) for _, ffn in found}
    if len(layouts) > 1:
        raise ValueError(f"MoE layers differ in their settings: {[list(layout) for layout in layouts]}")
    values = dict(zip([f.name for f in fields(MoELayout) if f.name != "layers"], layouts.pop()))
    return MoELayout(layers=[i for i, _ in found], **values)


def _layer_layout(ffn: MoEFeedForward) -> tuple:
    """One MoE FFN's MoELayout fields except `layers`, in field order."""
    moe = ffn.moe
    return (moe.router.num_experts, moe.router.top_k, ffn.residual is not None, moe.capacity_factor,
            moe.eval_capacity_factor, moe.min_capacity, moe.router.second_expert_policy,
            moe.router.normalize_top_k, moe.random_token_selection, moe.balance_count)


def apply_moe_arguments(llm: nn.Module, args) -> None:
    """--moe_enable: upcycle the LLM as the flags ask; an LLM upcycled already (a stage-3 run continued) must
    have the architecture the flags ask for, and takes their routing settings."""
    if not args.moe_enable:
        return
    wanted, existing = requested_layout(args, llm), moe_layout(llm)
    if existing is None:
        upcycle_llm(llm, wanted)
    elif existing.architecture() != wanted.architecture():
        raise ValueError(f"the LLM is already upcycled as {existing.architecture()}, but --num_experts/"
                         f"--top_k_experts/--moe_mode/--moe_layers(_every)/--use_residual ask for "
                         f"{wanted.architecture()}")
    else:
        set_routing(llm, wanted)


def parameter_names(name: str) -> tuple[list[str], bool]:
    """(names --train_modules strings are matched against, whether upcycling created the parameter).

    An expert or residual weight also answers to the dense FFN weight it was copied from (what MoE-LLaVA matches,
    before upcycling), a router weight to DeepSpeed's `wg`; routers and residual coefficients are new.
    """
    expert = re.fullmatch(r"(.*\.mlp\.)moe\.experts\.(\w+)", name)
    if expert:
        return [name, f"{expert[1]}{expert[2]}.weight"], False
    residual = re.fullmatch(r"(.*\.mlp\.)residual\.(.*)", name)
    if residual:
        return [name, residual[1] + residual[2]], False
    if re.fullmatch(r".*\.mlp\.moe\.router\.gate\.\w+", name):
        return [name, name.replace(".router.gate.", ".router.wg.")], True
    return [name], bool(re.fullmatch(r".*\.mlp\.coefficient\.\w+", name))


def set_stage3_trainable(llm: nn.Module, train_modules: list[str]) -> None:
    """requires_grad on the LLM's stage-3 parameters (call after freezing everything).

    MoE-LLaVA's rule: a parameter trains when its name holds one of `train_modules` (default gate_proj up_proj
    down_proj wg: the experts and the dense FFNs of the other layers), and the parameters upcycling creates
    (routers, residual coefficients) always train. `[PAPER_TRAIN_RULE]`: only the MoE layers, as the paper says.
    """
    found = moe_feed_forwards(llm)
    if not found:
        raise ValueError("--moe_enable: the LLM has no MoE layers to train")
    if train_modules == [PAPER_TRAIN_RULE]:
        for _, ffn in found:
            ffn.requires_grad_(True)
        return
    matched = set()
    for name, parameter in llm.named_parameters():
        names, created = parameter_names(name)
        hits = {s for s in train_modules if any(s in n for n in names)}
        matched |= hits
        parameter.requires_grad_(created or bool(hits))
    unmatched = [s for s in train_modules if s not in matched]
    if unmatched:
        raise ValueError(f"--train_modules {unmatched} match no parameter name of the LLM "
                         f"(e.g. {next(iter(dict(llm.named_parameters())))})")
