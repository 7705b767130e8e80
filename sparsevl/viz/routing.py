"""Routing heatmaps (MoE-LLaVA's figures): layers x experts, for text tokens, image tokens, and image share."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PANELS = (("text", "share of text tokens per expert"), ("image", "share of image tokens per expert"),
          ("image_fraction", "image tokens' share of each expert's load"))


def plot_routing_heatmaps(shares: dict[str, dict[str, list[float]]], out_file: str | Path) -> Path:
    """Three heatmaps side by side, one row per MoE layer, one column per expert, values written in the cells."""
    layers = list(shares)
    num_experts = max(len(s["text"]) for s in shares.values())
    figure, axes = plt.subplots(1, len(PANELS), figsize=(4 + 1.6 * num_experts, 1.2 + 0.5 * len(layers)),
                                squeeze=False)
    for axis, (key, title) in zip(axes[0], PANELS):
        grid = np.full((len(layers), num_experts), np.nan)
        for row, name in enumerate(layers):
            grid[row, : len(shares[name][key])] = shares[name][key]
        axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (row, col), value in np.ndenumerate(grid):
            if not np.isnan(value):
                axis.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="white" if value < 0.6 else "black")
        axis.set_xticks(range(num_experts), [f"e{i}" for i in range(num_experts)])
        axis.set_yticks(range(len(layers)), layers)
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(out_file, dpi=120)
    plt.close(figure)
    return Path(out_file)
