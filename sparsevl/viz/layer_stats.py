"""Bar chart of how often each vision layer was selected (one bar group per layer, one bar per group)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_layer_selection(groups: dict[str, dict[str, int]], out_file: str | Path, *,
                         title: str = "Vision layer selection") -> Path:
    """groups: name (e.g. 'all' or a question type) -> {layer name: count}; bars show each group's percent."""
    layers = list(next(iter(groups.values())))
    figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(layers) * max(1, len(groups)) ** 0.5), 4))
    width = 0.8 / len(groups)
    positions = np.arange(len(layers))
    for g, (name, counts) in enumerate(groups.items()):
        total = max(sum(counts.values()), 1)
        shares = [100 * counts.get(layer, 0) / total for layer in layers]
        axis.bar(positions + (g - (len(groups) - 1) / 2) * width, shares, width, label=f"{name} (n={total})")
    axis.set_xticks(positions, layers)
    axis.set_ylabel("selected (%)")
    axis.set_ylim(0, 100)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_file, dpi=120)
    plt.close(figure)
    return Path(out_file)
