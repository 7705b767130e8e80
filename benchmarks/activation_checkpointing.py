"""Activation checkpointing: bytes of activations kept for backward with / without `--gradient_checkpointing`.

A mid-size VLM (LLaMA d=512 x 8 layers, CLIP d=512 x 8 layers trained along, 64 visual + 128 text tokens),
one forward-backward each way on the same batch; also the step-time ratio. Target: ratio <= 0.5.

    python -m benchmarks.activation_checkpointing [--batch_size 8] [--text_tokens 128]
"""

import argparse
import time

import torch

from benchmarks.common import SavedActivations
from sparsevl.config import ModelArguments
from sparsevl.model.build import build_model

VOCAB, IMAGE_TOKEN = 4096, 4095


def measure(model, batch) -> tuple[int, float, float]:
    """(saved activation bytes, loss, seconds) of one forward-backward."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with SavedActivations(model) as saved:
        loss = model(*batch).losses["lm"]
    loss.backward()
    return saved.bytes, loss.item(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--text_tokens", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    model_args = ModelArguments(model_name_or_path="mid-llama", vision_tower="mid-clip64")
    model = build_model(model_args, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN).train()
    ids = torch.randint(0, IMAGE_TOKEN, (args.batch_size, args.text_tokens))
    ids[:, 1] = IMAGE_TOKEN
    batch = (ids, torch.ones_like(ids), torch.randn(args.batch_size, 3, 64, 64),
             ids.masked_fill(ids == IMAGE_TOKEN, -100))
    measure(model, batch)  # warm-up
    plain_bytes, plain_loss, plain_s = measure(model, batch)
    model.gradient_checkpointing_enable()
    ckpt_bytes, ckpt_loss, ckpt_s = measure(model, batch)
    print(f"loss without / with checkpointing: {plain_loss:.6f} / {ckpt_loss:.6f}")
    print(f"step time with / without: {ckpt_s / plain_s:.2f}x")
    print(f"saved activations without checkpointing: {plain_bytes / 2**20:.1f} MiB")
    print(f"saved activations with checkpointing: {ckpt_bytes / 2**20:.1f} MiB")
    print(f"saved-activation ratio with / without: {ckpt_bytes / plain_bytes:.3f}")


if __name__ == "__main__":
    main()
