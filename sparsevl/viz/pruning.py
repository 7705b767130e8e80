"""Pruning figures: accuracy against kept visual tokens (and prefill FLOPs), and which patches were kept."""

from pathlib import Path

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_accuracy_vs_tokens(rows: list[dict], out_file: str | Path) -> Path:
    """rows: {pruner, setting (line label; default: pruner), kept_tokens, accuracy, relative_flops}; the 'none'
    row is the full model's reference line."""
    figure, (by_tokens, by_flops) = plt.subplots(1, 2, figsize=(11, 4))
    full = next((r for r in rows if r["pruner"] == "none"), None)
    for name in dict.fromkeys(r.get("setting", r["pruner"]) for r in rows if r["pruner"] != "none"):
        points = sorted((r["kept_tokens"], r["relative_flops"], r["accuracy"]) for r in rows
                        if r.get("setting", r["pruner"]) == name)
        by_tokens.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=name)
        by_flops.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=name)
    if full is not None:
        for axis in (by_tokens, by_flops):
            axis.axhline(full["accuracy"], color="black", linestyle="--", linewidth=1, label="no pruning")
    by_tokens.set_xscale("log", base=2)
    by_tokens.set_xlabel("visual tokens kept per image")
    by_flops.set_xlabel("prefill FLOPs relative to no pruning")
    for axis in (by_tokens, by_flops):
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_file, dpi=120)
    plt.close(figure)
    return Path(out_file)


def plot_kept_patches(image, kept_by_name: dict[str, list[int]], grid: int, out_file: str | Path,
                      title: str = "") -> Path:
    """The image once per pruner, patches that were dropped darkened (patch i is row i // grid, column i % grid)."""
    pixels = np.asarray(image.convert("RGB"), dtype=float) / 255.0
    cell_h, cell_w = pixels.shape[0] / grid, pixels.shape[1] / grid
    figure, axes = plt.subplots(1, len(kept_by_name) + 1, figsize=(2.4 * (len(kept_by_name) + 1), 2.8))
    axes[0].imshow(pixels)
    axes[0].set_title("image", fontsize=9)
    for axis, (name, kept) in zip(axes[1:], kept_by_name.items()):
        shade = np.full((grid, grid), 0.2)
        shade.flat[list(kept)] = 1.0
        mask = np.kron(shade, np.ones((int(round(cell_h)), int(round(cell_w)))))[: pixels.shape[0], : pixels.shape[1]]
        axis.imshow(pixels * mask[..., None])
        for index in kept:  # outline kept patches: on a dark background the shading alone hides them
            row, column = divmod(index, grid)
            axis.add_patch(matplotlib.patches.Rectangle((column * cell_w - 0.5, row * cell_h - 0.5), cell_w, cell_h,
                                                        fill=False, edgecolor="yellow", linewidth=1.2))
        axis.set_title(f"{name} ({len(kept)})", fontsize=9)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(out_file, dpi=120)
    plt.close(figure)
    return Path(out_file)
