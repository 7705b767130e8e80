"""Training callbacks for adaptive layer selection: uniform exploration at first, and selection statistics.

Counters live on the model's `AdaptiveLayerSelector`; these callbacks only read, reset and switch them.
The counters cover one epoch: they are reset when an epoch begins and tallied when it ends, so each epoch's
counts sum to the number of images (one per sample on the built-in data) trained on in that epoch.
"""

import json
from pathlib import Path

from transformers import TrainerCallback

from sparsevl.model.adaptive import format_layer_stats
from sparsevl.train.trainer import LogValuesCallback
from sparsevl.viz.layer_stats import plot_layer_selection

STATS_FILE = "layer_selection_stats.json"
STATS_FIGURE = "layer_selection_stats.png"


class LayerExplorationCallback(TrainerCallback):
    """For the first `warmup_steps` optimizer steps every image tries uniformly random layers; after that a
    `rate` share of images does (an exploration floor) and the rest try the classifier's top-k."""

    def __init__(self, selector, warmup_steps: int, rate: float = 0.0):
        self.selector = selector
        self.warmup_steps = warmup_steps
        self.rate = rate

    def on_step_begin(self, args, state, control, **kwargs):
        self.selector.exploration_rate = 1.0 if state.global_step < self.warmup_steps else self.rate

    def on_train_end(self, args, state, control, **kwargs):
        self.selector.exploration_rate = 0.0


class LayerSelectionStatsCallback(LogValuesCallback):
    """Logs each layer's share of the current epoch; prints the table and writes JSON + PNG when training ends."""

    def __init__(self, selector):
        self.selector = selector
        self.epochs: list[dict[str, int]] = []  # counts of each finished epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.selector.reset_counts()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epochs.append(self.selector.counts())

    def log_values(self, model) -> dict[str, float]:
        counts = self.selector.selection_counts.tolist()
        total = max(sum(counts), 1)
        return {f"layer_share_{layer}": round(count / total, 4)
                for layer, count in zip(self.selector.candidate_layers, counts)}

    def totals(self) -> dict[str, int]:
        """Counts summed over the finished epochs of this run."""
        names = self.selector.layer_names()
        return {name: sum(epoch[name] for epoch in self.epochs) for name in names}

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        totals = self.totals()
        print(format_layer_stats(totals), flush=True)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / STATS_FILE).write_text(json.dumps({"total": totals, "per_epoch": self.epochs}, indent=2))
        plot_layer_selection({"training": totals}, out / STATS_FIGURE, title="Vision layer selected in training")


def layer_selection_callbacks(model, exploration_warmup_steps: int,
                              exploration_rate: float = 0.0) -> list[TrainerCallback]:
    """The callbacks an adaptive model needs (none for a fixed-layer model)."""
    if model.layer_selector is None:
        return []
    return [LayerExplorationCallback(model.layer_selector, exploration_warmup_steps, exploration_rate),
            LayerSelectionStatsCallback(model.layer_selector)]
