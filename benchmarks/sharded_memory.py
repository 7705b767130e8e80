"""Per-rank training memory of FSDP2: parameter + gradient + optimizer bytes each process holds, one process
(unsharded) against 2 FSDP ranks (sparsevl's per-layer fully_shard over gloo), and the step time ratio.

A mid-size VLM (LLaMA d=512 x 8 layers + CLIP d=512 x 8 layers, all trained, AdamW), the same global batch in
both runs. The 2-rank run starts itself with torchrun; one process gets 2 threads, each rank 1 (same cores).

    python -m benchmarks.sharded_memory [--batch_size 8] [--steps 4]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sparsevl.config import ModelArguments
from sparsevl.model.build import build_model, configure_trainable
from sparsevl.runtime import tune_cpu_allocator

VOCAB, IMAGE_TOKEN, TEXT_TOKENS = 4096, 4095, 64


def local_bytes(tensor: torch.Tensor) -> int:
    tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return tensor.numel() * tensor.element_size()


def training_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this process holds for parameters, gradients and optimizer state (its shards when sharded)."""
    params = list(model.parameters())
    return {"params": sum(local_bytes(p) for p in params),
            "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                             if isinstance(v, torch.Tensor))}


def measure(batch_size: int, steps: int, *, sharded: bool) -> dict:
    """Train `steps` AdamW steps on random data; returns bytes per category and the median step seconds."""
    torch.manual_seed(0)
    args = ModelArguments(model_name_or_path="mid-llama", vision_tower="mid-clip64", unfreeze_mm_vision_tower=True)
    model = build_model(args, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN).train()
    configure_trainable(model, args)
    if sharded:
        from sparsevl.train.sharding import shard_model

        shard_model(model, device_type="cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(dist.get_rank() if sharded else 0)
    ids = torch.randint(0, IMAGE_TOKEN, (batch_size, TEXT_TOKENS), generator=generator)
    ids[:, 1] = IMAGE_TOKEN
    pixels = torch.randn(batch_size, 3, 64, 64, generator=generator)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, labels=ids).losses["lm"].backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        if _ < steps - 1:
            optimizer.zero_grad(set_to_none=False)  # the last step's gradients stay, to be counted
    return {**training_bytes(model, optimizer), "step_seconds": sorted(seconds[1:])[len(seconds[1:]) // 2]}


def worker(batch_size: int, steps: int) -> None:
    """One FSDP rank (under torchrun): rank 0 prints its measurement as JSON."""
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = measure(batch_size // dist.get_world_size(), steps, sharded=True)
    all_results = [None] * dist.get_world_size()
    dist.all_gather_object(all_results, result)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(all_results), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch_size", type=int, default=8, help="global batch (each of 2 ranks gets half)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tune_cpu_allocator()  # as the sparsevl command does
    if args.worker:
        return worker(args.batch_size, args.steps)
    torch.set_num_threads(2)
    single = measure(args.batch_size, args.steps, sharded=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
               "benchmarks.sharded_memory", "--worker", "--batch_size", str(args.batch_size), "--steps", str(args.steps)]
    output = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            check=True).stdout
    ranks = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    total = sum(single[k] for k in ("params", "grads", "optimizer"))
    for name, result in [("1 process", single), *[(f"FSDP rank {r} of 2", res) for r, res in enumerate(ranks)]]:
        print(f"{name:>16}: params {result['params'] / 2**20:7.1f} MiB, grads {result['grads'] / 2**20:7.1f} MiB, "
              f"optimizer {result['optimizer'] / 2**20:7.1f} MiB, step {result['step_seconds']:.2f} s")
    share = max(sum(r[k] for k in ("params", "grads", "optimizer")) for r in ranks) / total
    print(f"step time 2 FSDP ranks / 1 process (global batch {args.batch_size}): "
          f"{ranks[0]['step_seconds'] / single['step_seconds']:.2f}x")
    print(f"sharded bytes per rank: {share:.2f} of unsharded")


if __name__ == "__main__":
    main()
