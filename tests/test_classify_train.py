"""Training, checkpoints, the CLI and the YAML configs of the classifier."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsevl.classify.checkpoint import load_checkpoint, save_checkpoint
from sparsevl.classify.cli import main
from sparsevl.classify.config import ModelConfig, TrainConfig, parse_args
from sparsevl.classify.data import load_dataset
from sparsevl.classify.model import MultiModalMoE
from sparsevl.classify.train import batch_loss, build_model, contrastive_loss, evaluate, random_affine, train

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "classify").rglob("*.yaml"))
TINY = dict(img_size=8, patch_size=2, patch_overlap=1, in_channels=1, embed_dim=32, num_layers=1, num_heads=2,
            expert_hidden_dim=64, router_dim=8, dropout=0.0)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "unused", img_size=8, in_channels=1)


def test_short_train_on_digits_beats_80_percent(digits):
    torch.manual_seed(0)
    model, tokenizer, _ = build_model(ModelConfig(**TINY), digits)
    history = train(model, digits, TrainConfig(epochs=3, batch_size=64, lr=3e-3), tokenizer=tokenizer, log=lambda s: None)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert evaluate(model, digits.test)["accuracy"] >= 0.80


def test_label_smoothing_in_the_classification_loss(digits):
    model, _, _ = build_model(ModelConfig(**TINY), digits)
    model.eval()  # no router noise: the same logits on every call
    idx = torch.arange(8)
    images, labels = digits.train.images[idx], digits.train.labels[idx]
    with torch.no_grad():
        logits = model(images).logits
        smoothed, _, correct = batch_loss(model, digits.train, idx, images, None, None, label_smoothing=0.2)
        plain, _, _ = batch_loss(model, digits.train, idx, images, None, None)
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, labels, label_smoothing=0.2))
    torch.testing.assert_close(plain, F.cross_entropy(logits, labels))
    assert correct == int((logits.argmax(-1) == labels).sum()) and abs(float(smoothed - plain)) > 1e-3
    # by hand: 2 classes, eps 0.2 -> targets (0.9, 0.1) for label 0
    hand = torch.tensor([[2.0, 0.0]])
    log_p = hand.log_softmax(-1)[0]
    torch.testing.assert_close(F.cross_entropy(hand, torch.tensor([0]), label_smoothing=0.2), -(0.9 * log_p[0] + 0.1 * log_p[1]))


def test_contrastive_label_smoothing():
    image_emb, text_emb = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    scale, shuffled = torch.tensor(2.0), text_emb[[1, 2, 3, 0]]
    logits = scale.exp() * image_emb @ text_emb.T  # (images, captions)
    uniform = -(logits.log_softmax(1).mean() + logits.log_softmax(0).mean()) / 2  # every target 1/4
    torch.testing.assert_close(contrastive_loss(image_emb, text_emb, scale, label_smoothing=1.0), uniform)
    torch.testing.assert_close(contrastive_loss(image_emb, shuffled, scale, label_smoothing=1.0), uniform)  # pairs no longer matter
    assert contrastive_loss(image_emb, shuffled, scale) != pytest.approx(float(contrastive_loss(image_emb, text_emb, scale)))


def test_checkpoint_round_trip_gives_identical_predictions(digits, tmp_path):
    torch.manual_seed(0)
    model, tokenizer, label_ids = build_model(ModelConfig(**TINY), digits)
    model.eval()
    save_checkpoint(tmp_path / "ckpt", model, class_names=digits.class_names, dataset="digits", label_token_ids=label_ids, tokenizer=tokenizer)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    loaded, _, meta = load_checkpoint(tmp_path / "ckpt")
    images = digits.test.images[:50]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, model(images).logits, rtol=0, atol=0)
    torch.testing.assert_close(loaded.pixel_mean, model.pixel_mean)
    assert meta["class_names"][3] == "three" and loaded.config == model.config
    with pytest.raises(FileNotFoundError, match="nowhere/model.safetensors"):
        load_checkpoint(tmp_path / "nowhere")


def test_random_affine_shifts_whole_pixels_and_rotates():
    images = torch.zeros(64, 1, 5, 5)
    images[:, :, 2, 2] = 1.0
    shifted = random_affine(images, 1, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(shifted.sum((1, 2, 3)), torch.ones(64))  # one lit pixel, still whole
    rows, cols = shifted[:, 0].nonzero()[:, 1], shifted[:, 0].nonzero()[:, 2]
    assert set(rows.tolist()) == {1, 2, 3} and set(cols.tolist()) == {1, 2, 3}
    bar = torch.zeros(1, 1, 9, 9)
    bar[..., 4, 1:8] = 1.0  # a horizontal bar through the centre
    turned = random_affine(bar.expand(32, -1, -1, -1), 0, 30.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(turned[:, 0, 4, 4], torch.ones(32))  # the centre stays put
    assert (turned[:, 0, 4, 1] < 1).sum() > 16  # the bar's ends move off their row


def test_cli_train_test_then_test_from_checkpoint(tmp_path, capsys):
    flags = [f"--{k}={v}" for k, v in TINY.items()] + ["--epochs=1", "--batch_size=128", "--max_train_samples=256",
                                                       f"--save_dir={tmp_path / 'run'}", "--num_threads=1"]
    assert main(["--config", str(CONFIGS[[c.name for c in CONFIGS].index("digits.yaml")])] + flags) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == "digits" and len(metrics["history"]) == 1
    accuracy = metrics["test"]["accuracy"]  # the final test pass scores the model the last epoch ended with
    assert accuracy == pytest.approx(metrics["history"][-1]["test_accuracy"])
    assert accuracy * 360 == pytest.approx(round(accuracy * 360), abs=1e-6)  # a share of the 360 test digits
    counts = torch.tensor(metrics["expert_token_counts"])  # (layers, modalities, experts)
    assert counts.shape == (1, 2, 8) and counts[0, 0].sum() == 360 * 16 * 2
    for name in ("training_curves", "predictions", "confusion_matrix", "expert_assignment", "attention_maps"):
        assert (tmp_path / "run" / f"{name}.png").stat().st_size > 1000
    config = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert config["args"]["train"]["epochs"] == 1 and config["args"]["model"]["embed_dim"] == 32
    capsys.readouterr()
    assert main(["--mode=test", f"--save_dir={tmp_path / 'run'}", "--figures=false", "--num_threads=1"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["accuracy"] == metrics["test"]["accuracy"]


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["--dataset=fashion_mnist", f"--data_root={tmp_path}", "--img_size=28", "--in_channels=1"]) == 1
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err
    assert main(["--dataset=digits", "--img_size=32", "--in_channels=1", f"--save_dir={tmp_path}"]) == 1
    assert "expects 1x32x32" in capsys.readouterr().err


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nepochs: 3\ngradient_checkpointing: true\ndataset: cifar10\n")
    model_cfg, data_cfg, train_cfg = parse_args(["--config", str(path), "--epochs", "5"])
    assert train_cfg.lr == 1e-4 and isinstance(train_cfg.lr, float)
    assert train_cfg.epochs == 5 and model_cfg.gradient_checkpointing is True and data_cfg.dataset == "cifar10"


@pytest.mark.parametrize("path", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_yaml_config_parses_and_builds(path):
    model_cfg, data_cfg, _ = parse_args(["--config", str(path)])
    assert path.stem == data_cfg.dataset
    with torch.device("meta"):  # shapes only: the seed-sized models take seconds to initialise
        model = MultiModalMoE(model_cfg, num_classes=10 if data_cfg.dataset != "flickr8k" else 0, label_token_ids=[[1, 2]] * 10)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_cli_flickr8k_matching_reports_recall(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "Images").mkdir()
    lines = []
    for i in range(6):
        Image.new("RGB", (20, 16), (40 * i, 100, 200)).save(tmp_path / "Images" / f"{i}.jpg")
        lines += [f"{i}.jpg#{j}\ta {['red', 'blue', 'green'][i % 3]} picture number {i}" for j in range(5)]
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines))
    (tmp_path / "Flickr_8k.testImages.txt").write_text("4.jpg\n5.jpg\n")
    flags = {**TINY, "img_size": 16, "patch_size": 8, "patch_overlap": 0, "in_channels": 3}
    argv = [f"--{k}={v}" for k, v in flags.items()] + ["--dataset=flickr8k", f"--data_root={tmp_path}", "--epochs=2",
                                                       "--batch_size=4", f"--save_dir={tmp_path / 'run'}"]
    assert main(argv) == 0
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    assert set(test) == {f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    # 2 test images x 5 captions: i2t recalls are shares of 2 images, t2i of 10 captions (values: test_metrics.py)
    assert all(test[f"i2t_recall@{k}"] * 2 == round(test[f"i2t_recall@{k}"] * 2) for k in (1, 5, 10))
    assert all(abs(test[f"t2i_recall@{k}"] * 10 - round(test[f"t2i_recall@{k}"] * 10)) < 1e-6 for k in (1, 5, 10))
    assert test["t2i_recall@1"] <= test["t2i_recall@5"] <= test["t2i_recall@10"]
    assert (tmp_path / "run" / "expert_assignment.png").is_file() and (tmp_path / "run" / "training_curves.png").is_file()
