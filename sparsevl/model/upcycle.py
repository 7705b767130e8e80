"""MoE-Tuning's upcycling (MoE-LLaVA stage 3): a trained LLM's gated FFNs become MoE layers of identical experts.

The MoE FFN is composed into the decoder layer (`layer.mlp = MoEFeedForward(...)`); transformers' classes are
never patched. Right after upcycling the model computes what the dense one did: every expert is a copy of the
FFN and the top-k weights are renormalised to sum to one.
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn

from sparsevl.model.moe import GatedMLPExperts, MoELayer, TopKRouter, expert_stats_paused


@dataclass
class MoELayout:
    """Which decoder layers are MoE and how they route; saved beside an upcycled checkpoint."""

    layers: list[int]  # decoder-layer indices, increasing
    num_experts: int
    top_k: int

    def to_dict(self) -> dict:
        return asdict(self)


class MoEFeedForward(nn.Module):
    """A decoder layer's FFN as a Mixture of Experts: hidden (batch, seq, dim) -> (batch, seq, dim).

    Keeps what its last forward produced: the losses, which the model collects with `pop_losses()`,
    and each token's experts (`last_expert_indices`, (batch, seq, top_k)) for routing analysis.
    """

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe
        self._losses: dict[str, torch.Tensor] = {}
        self.last_expert_indices: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch._C._current_graph_task_id() != -1:  # activation checkpointing recomputes in backward: same
            with expert_stats_paused(self.moe):     # routing, already counted, its losses already handed over
                return self.moe(hidden_states).hidden_states
        out = self.moe(hidden_states)
        self._losses = out.losses
        self.last_expert_indices = out.router.indices.view(*hidden_states.shape[:-1], -1)
        return out.hidden_states

    def pop_losses(self) -> dict[str, torch.Tensor]:
        """The losses of the last forward, handed over once (a later call returns {} until the next forward)."""
        losses, self._losses = self._losses, {}
        return losses


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (`llm.model.layers`)."""
    layers = getattr(getattr(llm, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"--moe_enable: cannot find the decoder layers of {type(llm).__name__} "
                         "(expected llm.model.layers)")
    return layers


def moe_layer_indices(num_layers: int, *, every: int, explicit: list[int] | None = None) -> list[int]:
    """Layers to upcycle: `explicit`, or every `every`-th layer counted Qwen3-MoE's way ((i + 1) % every == 0)."""
    if explicit is not None:
        beyond = sorted(i for i in set(explicit) if i >= num_layers)
        if beyond:
            raise ValueError(f"--moe_layers {beyond} beyond the LLM's {num_layers} decoder layers "
                             f"(valid: 0..{num_layers - 1})")
        return sorted(set(explicit))
    indices = [i for i in range(num_layers) if (i + 1) % every == 0]
    if not indices:
        raise ValueError(f"--moe_layers_every {every} selects none of the LLM's {num_layers} decoder layers")
    return indices


def requested_layout(args, llm: nn.Module) -> MoELayout:
    """The layout the MoE flags of ModelArguments ask for, checked against this LLM."""
    layers = moe_layer_indices(len(decoder_layers(llm)), every=args.moe_layers_every, explicit=args.moe_layers)
    return MoELayout(layers=layers, num_experts=args.num_experts, top_k=args.top_k_experts)


def upcycle_llm(llm: nn.Module, layout: MoELayout) -> None:
    """Replace the FFN of each layout layer by an MoE whose experts copy it (in place; a fresh router each)."""
    layers = decoder_layers(llm)
    for index in moe_layer_indices(len(layers), every=1, explicit=layout.layers):
        mlp = layers[index].mlp
        try:
            experts = GatedMLPExperts.from_dense(mlp, layout.num_experts)
        except ValueError:
            raise ValueError(f"--moe_enable: cannot upcycle decoder layer {index}'s MLP ({type(mlp).__name__}): "
                             "only gated MLPs with bias-free gate_proj/up_proj/down_proj Linear layers and an "
                             "act_fn (LLaMA, Qwen3) are supported") from None
        router = TopKRouter(dim=experts.gate_proj.shape[-1], num_experts=layout.num_experts, top_k=layout.top_k,
                            normalize_top_k=True).to(mlp.gate_proj.weight)
        layers[index].mlp = MoEFeedForward(MoELayer(router=router, experts=experts))


def moe_feed_forwards(module: nn.Module) -> list[tuple[int, MoEFeedForward]]:
    """(decoder-layer index, MoE FFN) for every upcycled layer of an LLM, in layer order."""
    return [(i, layer.mlp) for i, layer in enumerate(decoder_layers(module)) if isinstance(layer.mlp, MoEFeedForward)]


def moe_layout(llm: nn.Module) -> MoELayout | None:
    """The layout of an upcycled LLM (None when it has no MoE layer)."""
    found = moe_feed_forwards(llm)
    if not found:
        return None
    shapes = {(ffn.moe.router.num_experts, ffn.moe.router.top_k) for _, ffn in found}
    if len(shapes) > 1:
        raise ValueError(f"MoE layers differ in (num_experts, top_k): {sorted(shapes)}")
    (num_experts, top_k), = shapes
    return MoELayout(layers=[i for i, _ in found], num_experts=num_experts, top_k=top_k)


def apply_moe_arguments(llm: nn.Module, args) -> None:
    """--moe_enable: upcycle the LLM as the flags ask, unless it is that MoE already (a stage-3 run continued)."""
    if not args.moe_enable:
        return
    wanted, existing = requested_layout(args, llm), moe_layout(llm)
    if existing is None:
        upcycle_llm(llm, wanted)
    elif existing != wanted:
        raise ValueError(f"the LLM is already upcycled as {existing.to_dict()}, but --num_experts/--top_k_experts/"
                         f"--moe_layers(_every) ask for {wanted.to_dict()}")


def train_only_moe_layers(llm: nn.Module) -> None:
    """requires_grad on the routers and experts of the MoE layers only (call after freezing everything)."""
    found = moe_feed_forwards(llm)
    if not found:
        raise ValueError("--moe_enable: the LLM has no MoE layers to train")
    for _, ffn in found:
        ffn.requires_grad_(True)
