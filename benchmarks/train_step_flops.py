"""Training-step efficiency: achieved FLOP/s of one optimizer step / measured fp32 matmul peak.

A mid-size VLM (LLaMA d=512 x 8 layers, CLIP d=512 x 8 layers, 64 visual + ~64 text tokens). FLOPs are
counted by torch's FlopCounterMode on one step (forward + backward), not estimated. Target >= 0.4.

    python -m benchmarks.train_step_flops [--batch_size 16]
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import matmul_peak_flops, median_seconds
from sparsevl.model.build import build_model
from sparsevl.config import ModelArguments

VOCAB, IMAGE_TOKEN = 4096, 4095


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--text_tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model_args = ModelArguments(model_name_or_path="mid-llama", vision_tower="mid-clip64", unfreeze_mm_vision_tower=True)
    model = build_model(model_args, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN).train()
    ids = torch.randint(0, IMAGE_TOKEN, (args.batch_size, args.text_tokens))
    ids[:, 1] = IMAGE_TOKEN
    mask = torch.ones_like(ids)
    pixels = torch.randn(args.batch_size, 3, 64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(ids, mask, pixels, labels=ids.masked_fill(ids == IMAGE_TOKEN, -100)).losses["lm"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    seconds = median_seconds(step, repeats=5, warmup=1)
    peak = matmul_peak_flops()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, batch {args.batch_size}, "
          f"{args.text_tokens - 1 + model.num_image_tokens} tokens per sample")
    print(f"step: {seconds * 1e3:.0f} ms, {flops / 1e9:.1f} GFLOP counted -> {flops / seconds / 1e9:.1f} GFLOP/s")
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"ratio achieved/peak: {flops / seconds / peak:.2f} (target >= 0.4)")


if __name__ == "__main__":
    main()
