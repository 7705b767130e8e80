"""Build, train and evaluate the classifier: a flat loop, cross-entropy (or contrastive) + routing loss."""

import math
import time

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast, get_scheduler

from sparsevl.classify.config import ModelConfig, TrainConfig
from sparsevl.classify.data import Dataset, ImageSplit
from sparsevl.classify.model import MultiModalMoE
from sparsevl.data.tokenizer import build_tokenizer


def build_model(config: ModelConfig, data: Dataset) -> tuple[MultiModalMoE, PreTrainedTokenizerFast, list[list[int]] | None]:
    """Tokenizer on the label descriptions (or training captions), then the model; returns (model, tokenizer, label ids)."""
    if data.task == "classify":
        tokenizer = build_tokenizer(data.descriptions, vocab_size=config.vocab_size)
        label_ids = tokenizer(data.descriptions)["input_ids"]
        model = MultiModalMoE(config, num_classes=len(data.class_names), label_token_ids=label_ids)
    else:
        tokenizer = build_tokenizer([c for caps in data.train.captions for c in caps], vocab_size=config.vocab_size)
        label_ids, model = None, MultiModalMoE(config, num_classes=0)
    model.pixel_mean.copy_(data.train.images.mean((0, 2, 3)))
    model.pixel_std.copy_(data.train.images.std((0, 2, 3)).clamp_min(1e-6))
    return model, tokenizer, label_ids


def random_affine(images: torch.Tensor, max_shift: int, max_rotation: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by up to +-max_rotation degrees and translate it by whole pixels up to +-max_shift; zeros fill in."""
    if max_shift == 0 and max_rotation == 0:
        return images
    batch, _, height, width = images.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (batch, 2), generator=generator).float()
    angles = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(max_rotation)
    cos, sin = angles.cos(), angles.sin()
    theta = torch.stack([torch.stack([cos, -sin, 2 * shifts[:, 0] / width], 1),
                         torch.stack([sin, cos, 2 * shifts[:, 1] / height], 1)], 1)  # (batch, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear" if max_rotation else "nearest", padding_mode="zeros", align_corners=False)


def tokenize(tokenizer: PreTrainedTokenizerFast, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: the i-th image matches the i-th caption."""
    logits = logit_scale.clamp(max=math.log(100)).exp() * image_emb @ text_emb.T  # (batch, batch)
    targets = torch.arange(len(logits))
    return (F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, targets, label_smoothing=label_smoothing)) / 2


def batch_loss(model, split: ImageSplit, idx: torch.Tensor, images: torch.Tensor, tokenizer, generator,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> (task loss, routing loss, correct predictions) for one micro-batch."""
    if split.captions is None:
        out = model(images)
        labels = split.labels[idx]
        loss = F.cross_entropy(out.logits, labels, label_smoothing=label_smoothing)
        return loss, out.routing_loss, int((out.logits.argmax(-1) == labels).sum())
    captions = [caps[int(torch.randint(len(caps), (1,), generator=generator))] for caps in (split.captions[i] for i in idx.tolist())]
    image_emb, image_routing = model.encode_images(images)
    text_emb, text_routing = model.encode_texts(*tokenize(tokenizer, captions, model.config.max_text_len))
    loss = contrastive_loss(image_emb, text_emb, model.logit_scale, label_smoothing)
    correct = int(((image_emb @ text_emb.T).argmax(-1) == torch.arange(len(idx))).sum())
    return loss, image_routing + text_routing, correct


def train(model: MultiModalMoE, data: Dataset, config: TrainConfig, *, tokenizer=None, augment_shift: int = 0,
          augment_rotation: float = 0.0, log=print) -> list[dict]:
    """AdamW + warmup/decay schedule + gradient accumulation; returns one dict of metrics per epoch."""
    generator = torch.Generator().manual_seed(config.seed)
    split = data.train
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    micro_batches = math.ceil(len(split.labels) / config.batch_size)
    total_steps = config.epochs * math.ceil(micro_batches / config.grad_accum_steps)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=int(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    history, start = [], time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        sums = {"loss": 0.0, "routing_loss": 0.0, "correct": 0}
        for i, idx in enumerate(torch.randperm(len(split.labels), generator=generator).split(config.batch_size)):
            images = random_affine(split.images[idx], augment_shift, augment_rotation, generator)
            task_loss, routing, correct = batch_loss(model, split, idx, images, tokenizer, generator, config.label_smoothing)
            ((task_loss + config.routing_loss_weight * routing) / config.grad_accum_steps).backward()
            if (i + 1) % config.grad_accum_steps == 0 or i + 1 == micro_batches:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            sums["loss"] += task_loss.item() * len(idx)
            sums["routing_loss"] += routing.item() * len(idx)
            sums["correct"] += correct
        n = len(split.labels)
        record = {"epoch": epoch, "train_loss": sums["loss"] / n, "train_routing_loss": sums["routing_loss"] / n,
                  "train_accuracy": sums["correct"] / n, "lr": scheduler.get_last_lr()[0]}
        record.update({f"test_{k}": v for k, v in evaluate(model, data.test, tokenizer, config.batch_size).items()
                       if k in ("loss", "accuracy", "i2t_recall@1")})
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    return history


@torch.no_grad()
def evaluate(model: MultiModalMoE, split: ImageSplit, tokenizer=None, batch_size: int = 256) -> dict:
    """Classification: loss, accuracy, predictions. Captions: recall@1/5/10 both ways."""
    model.eval()
    if split.captions is not None:
        return retrieval_metrics(model, split, tokenizer, batch_size)
    logits = torch.cat([model(split.images[i : i + batch_size]).logits for i in range(0, len(split.labels), batch_size)])
    predictions = logits.argmax(-1)
    return {"loss": float(F.cross_entropy(logits, split.labels)), "accuracy": float((predictions == split.labels).float().mean()),
            "predictions": predictions.tolist()}


@torch.no_grad()
def retrieval_metrics(model: MultiModalMoE, split: ImageSplit, tokenizer, batch_size: int) -> dict:
    """Image-to-text: an image is a hit if any of its captions ranks in the top K; text-to-image: its image does."""
    image_emb = torch.cat([model.encode_images(split.images[i : i + batch_size])[0] for i in range(0, len(split.images), batch_size)])
    captions = [c for caps in split.captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(split.captions) for _ in caps])
    text_emb = torch.cat([model.encode_texts(*tokenize(tokenizer, captions[i : i + batch_size], model.config.max_text_len))[0]
                          for i in range(0, len(captions), batch_size)])
    sims = image_emb @ text_emb.T  # (images, captions)
    metrics = {}
    for k in (1, 5, 10):
        top_texts = sims.topk(min(k, sims.shape[1]), dim=1).indices  # (images, k)
        metrics[f"i2t_recall@{k}"] = float((owner[top_texts] == torch.arange(len(image_emb))[:, None]).any(1).float().mean())
        top_images = sims.T.topk(min(k, sims.shape[0]), dim=1).indices  # (captions, k)
        metrics[f"t2i_recall@{k}"] = float((top_images == owner[:, None]).any(1).float().mean())
    return metrics
