"""Training-curve figure from Trainer log histories."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(stages: dict[str, list[dict]], out_file: str | Path) -> Path:
    """One line per stage: training loss against the global step counted across stages."""
    figure, axis = plt.subplots(figsize=(7, 4))
    offset = 0
    for name, history in stages.items():
        points = [(e["step"] + offset, e["loss"]) for e in history if "loss" in e and "step" in e]
        if points:
            axis.plot(*zip(*points), label=name)
            offset = points[-1][0]
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_file, dpi=120)
    plt.close(figure)
    return Path(out_file)
