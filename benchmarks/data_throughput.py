"""Data loading + collation throughput against the demo training step's consumption (target >= 10x).

    python -m benchmarks.data_throughput --data runs/demo/data --tokenizer runs/demo/tokenizer
"""

import argparse
import time

import torch
from torch.utils.data import DataLoader

from sparsevl.config import ModelArguments
from sparsevl.data.dataset import LlavaJsonDataset, PaddingCollator
from sparsevl.data.tokenizer import add_image_token, load_tokenizer
from sparsevl.model.build import build_image_processor, build_model
from sparsevl.model.presets import vision_preset_config

BATCH = 32


def samples_per_second(loader, batches: int) -> float:
    start, seen = time.perf_counter(), 0
    for index, batch in enumerate(loader):
        seen += len(batch["input_ids"])
        if index + 1 == batches:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="shapes data folder (sparsevl data shapes --out)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder")
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    image_token_id = add_image_token(tokenizer)
    processor = build_image_processor("tiny-clip", vision_preset_config("tiny-clip"))
    dataset = LlavaJsonDataset(f"{args.data}/finetune.json", tokenizer=tokenizer, image_processor=processor,
                               num_image_tokens=64)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, collate_fn=PaddingCollator(tokenizer.pad_token_id))
    cold = samples_per_second(loader, args.batches)  # first pass: PNG decode + image processor
    warm = samples_per_second(loader, args.batches)  # later epochs: cached pixels
    torch.manual_seed(0)
    model = build_model(ModelArguments(model_name_or_path="tiny-qwen3", vision_tower="tiny-clip"),
                        vocab_size=len(tokenizer), image_token_id=image_token_id).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = next(iter(loader))
    batch.pop("sample_index")

    def step():
        model(**batch).losses["lm"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(5):
        step()
    train_rate = 5 * BATCH / (time.perf_counter() - start)
    print(f"data: {cold:.0f} samples/s first epoch (decode), {warm:.0f} samples/s cached")
    print(f"training step consumes {train_rate:.0f} samples/s")
    print(f"ratio data/train: first epoch {cold / train_rate:.1f}x, cached {warm / train_rate:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
