"""Expert usage during training: at each logging step, a per-layer table of the share of routed tokens each
expert took since the previous log, printed and logged (`expert_load/<layer>/e<i>` and `.../max_over_min`).

Reads the `expert_token_counts` buffers the MoE layers keep, then resets them; no global state.
"""

import torch
from torch import nn

from sparsevl.model.moe import MoELayer
from sparsevl.train.trainer import LogValuesCallback


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """(short name, layer) for every MoELayer of the model: `projector`, `llm.layer3`, ..."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            short = name.removesuffix(".moe").removesuffix(".mlp").replace("llm.model.layers.", "llm.layer")
            found.append((short, module))
    return found


def expert_shares(counts: torch.Tensor) -> list[float]:
    """Share of routed assignments per expert (zeros when nothing was routed)."""
    total = float(counts.sum())
    return [float(c) / total if total else 0.0 for c in counts.tolist()]


def max_over_min(shares: list[float]) -> float:
    """Load imbalance: largest over smallest expert share (inf when an expert got nothing)."""
    return max(shares) / min(shares) if min(shares) > 0 else float("inf")


def format_usage_table(rows: dict[str, list[float]], step: int) -> str:
    """A fixed-width table: one row per MoE layer, one column per expert, then max/min."""
    width = max(len(name) for name in rows)
    num_experts = max(len(shares) for shares in rows.values())
    header = f"{'layer':<{width}}  " + "  ".join(f"{f'e{i}':>6}" for i in range(num_experts)) + "  max/min"
    lines = [f"expert load at step {step} (share of routed tokens since the last log):", header]
    for name, shares in rows.items():
        cells = "  ".join(f"{share:6.3f}" for share in shares)
        lines.append(f"{name:<{width}}  {cells}  {max_over_min(shares):7.2f}")
    return "\n".join(lines)


class ExpertUsageCallback(LogValuesCallback):
    """Logs expert load per MoE layer at each logging step (the trainer calls `log_values`), prints the table
    on the main process (`on_log`) and resets the counters for the next window."""

    def __init__(self):
        self._rows: dict[str, list[float]] = {}

    def log_values(self, model: nn.Module) -> dict[str, float]:
        values, self._rows = {}, {}
        for name, layer in moe_layers(model):
            counts = layer.expert_token_counts.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts)  # every process logs together, as for the losses
            shares = expert_shares(counts)
            self._rows[name] = shares
            values.update({f"expert_load/{name}/e{i}": round(share, 5) for i, share in enumerate(shares)})
            values[f"expert_load/{name}/max_over_min"] = round(max_over_min(shares), 4)
        return values

    def on_log(self, args, state, control, model=None, **kwargs):
        if self._rows and state.is_world_process_zero:
            print(format_usage_table(self._rows, state.global_step), flush=True)
        self._rows = {}
        if model is not None:
            for _, layer in moe_layers(model):
                layer.reset_stats()
