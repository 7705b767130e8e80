"""Figures of a classifier run (matplotlib Agg, PNG files under the save dir)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparsevl.classify.data import Dataset  # noqa: E402
from sparsevl.classify.model import MODALITIES, MultiModalMoE  # noqa: E402


def _show(ax, image: torch.Tensor) -> None:
    """image (C, H, W) in [0, 1]."""
    pixels = image.numpy()
    ax.imshow(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0), cmap="gray" if len(pixels) == 1 else None, vmin=0, vmax=1)
    ax.axis("off")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(history: list[dict], path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("train_loss", "test_loss", "train_routing_loss"):
        if key in history[0]:
            axes[0].plot(epochs, [h[key] for h in history], label=key)
    for key in ("train_accuracy", "test_accuracy", "test_i2t_recall@1"):
        if key in history[0]:
            axes[1].plot(epochs, [h[key] for h in history], label=key)
    for ax, title in zip(axes, ("loss", "accuracy")):
        ax.set(xlabel="epoch", title=title)
        ax.legend()
    return _save(fig, path)


def prediction_examples(images: torch.Tensor, labels, predictions, class_names: list[str], path: Path, count: int = 16) -> Path:
    fig, axes = plt.subplots(2, count // 2, figsize=(count * 0.9, 2.6))
    for ax, image, label, pred in zip(axes.flat, images[:count], labels[:count], predictions[:count]):
        _show(ax, image)
        ax.set_title(f"{class_names[pred]}", color="green" if pred == label else "red", fontsize=8)
    return _save(fig, path)


def confusion_matrix(labels, predictions, class_names: list[str], path: Path) -> Path:
    n = len(class_names)
    matrix = np.zeros((n, n), int)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, value, ha="center", va="center", fontsize=7, color="white" if value > matrix.max() / 2 else "black")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="confusion matrix")
    ax.set_xticklabels(class_names, rotation=90, fontsize=7)
    ax.set_yticklabels(class_names, fontsize=7)
    return _save(fig, path)


def expert_assignment(counts: torch.Tensor, num_shared: int, path: Path) -> Path:
    """counts (layers, modalities, experts): share of each layer's and modality's tokens per expert."""
    layers, _, num_experts = counts.shape
    shares = (counts / counts.sum(-1, keepdim=True).clamp_min(1)).reshape(layers * len(MODALITIES), num_experts).numpy()
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * num_experts, 0.8 + 0.45 * len(shares)))
    ax.imshow(shares, cmap="viridis", vmin=0)
    for (i, j), value in np.ndenumerate(shares):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < shares.max() / 2 else "black")
    ax.set_yticks(range(len(shares)), [f"layer {layer + 1} {m}" for layer in range(layers) for m in MODALITIES], fontsize=8)
    ax.set_xticks(range(num_experts), [f"S{e}" if e < num_shared else f"M{e}" for e in range(num_experts)], fontsize=8)
    ax.set_title("share of tokens per expert (S shared, M modality-specific)", fontsize=9)
    return _save(fig, path)


def attention_maps(model: MultiModalMoE, images: torch.Tensor, class_names: list[str], path: Path) -> Path:
    """Per example (last block): the image, the self-attention each patch receives, and the image tokens' cross-attention per label description."""
    with torch.no_grad():
        attentions = model.eval()(images, need_weights=True).attentions[-1]
    grid = model.config.img_size // model.config.patch_size
    segment = torch.cumsum(model.label_positions == 0, 0) - 1  # which description each text token belongs to
    fig, axes = plt.subplots(len(images), 3, figsize=(9, 2.3 * len(images)), squeeze=False)
    for row, image in enumerate(images):
        _show(axes[row, 0], image)
        axes[row, 1].imshow(attentions["image_self"][row].mean(0).reshape(grid, grid).numpy(), cmap="magma")
        axes[row, 1].set_title("attention received per patch", fontsize=8)
        axes[row, 1].axis("off")
        per_class = torch.zeros(len(class_names)).index_add_(0, segment, attentions["image_cross"][row].mean(0))
        axes[row, 2].bar(range(len(class_names)), per_class.numpy())
        axes[row, 2].set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
        axes[row, 2].set_title("image -> label descriptions", fontsize=8)
    return _save(fig, path)


def write_figures(save_dir: str | Path, model: MultiModalMoE, data: Dataset, history: list[dict], predictions: list[int] | None,
                  expert_counts: torch.Tensor) -> list[Path]:
    """Every figure that applies to the run's task; returns the paths written."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    paths = [expert_assignment(expert_counts, model.config.num_shared_experts, save_dir / "expert_assignment.png")]
    if history:
        paths.append(training_curves(history, save_dir / "training_curves.png"))
    if data.task == "classify":
        test = data.test
        paths += [prediction_examples(test.images, test.labels.tolist(), predictions, data.class_names, save_dir / "predictions.png"),
                  confusion_matrix(test.labels.tolist(), predictions, data.class_names, save_dir / "confusion_matrix.png"),
                  attention_maps(model, test.images[:4], data.class_names, save_dir / "attention_maps.png")]
    return paths
