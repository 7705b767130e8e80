"""Prefill speed-up from visual-token pruning, measured against the FLOPs-predicted speed-up; decode speed.

A mid-size LLM (`mid-qwen3`: d=1024, 8 layers, random weights, fp32), one sample of 576 visual + 64 text
tokens, text-guided pruning to 64 visual tokens before layer 2. Prefill = embeddings in, next-token logits
out (the vision tower and projector cost the same either way and are left out). Times are medians of
repeated runs on a shared CPU: read the ratios, not the absolute numbers. Target: measured / predicted >= 0.85.

    python -m benchmarks.pruning_prefill [--repeats 7] [--decode_steps 32]

At LLaVA's own shape (a whole SparseVLM model: vision tower, 576 visual tokens, a 28-layer Qwen3-0.6B-shaped LLM,
SparseVLM's 192 / 128 / 64 budgets, whole-answer latency) see `benchmarks/pruning_prefill_llava.py`.
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from sparsevl.model.decoder import decoder_forward
from sparsevl.model.presets import llm_preset_config
from sparsevl.model.pruning import PruningContext, PruningPlan, PruningStep
from sparsevl.model.pruning_cost import prefill_flops

VOCAB = 4096


def build_inputs(llm, *, num_visual: int, num_text: int, text_before: int = 5, device: str = "cpu"):
    """(embeds, mask, positions, context) of one sample: a few text tokens, the image, then the instruction."""
    seq = num_visual + num_text
    embeds = (torch.randn(1, seq, llm.config.hidden_size) * 0.02).to(device, llm.dtype)
    image = torch.zeros(1, seq, dtype=torch.bool)
    image[0, text_before:text_before + num_visual] = True
    raters = ~image
    raters[0, :text_before] = False
    context = PruningContext(image.to(device), raters.to(device), torch.ones(1, dtype=torch.long, device=device))
    return embeds, torch.ones(1, seq, dtype=torch.long, device=device), torch.arange(seq, device=device)[None], context


def synchronize() -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(functions, *, repeats: int) -> list[float]:
    """Median seconds of each function, timed in turn within every round so that load changes hit all alike."""
    for function in functions:
        function()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, bucket in zip(functions, times):
            synchronize()
            start = time.perf_counter()
            function()
            synchronize()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def decode_tokens_per_second(llm, prefill, mask, positions, steps: int) -> float:
    """Greedy-decode `steps` tokens after a cached prefill; tokens per second (median of 3 runs)."""
    def run():
        out = prefill()
        past, position, step_mask = out.past, positions[:, -1:], mask
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], 1)
            position = position + 1
            step = decoder_forward(llm, llm.get_input_embeddings()(token), step_mask, position, past=past,
                                   use_cache=True)
            past, token = step.past, step.logits[:, -1].argmax(-1, keepdim=True)
        synchronize()
        return steps / (time.perf_counter() - start)
    return sorted(run() for _ in range(3))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--visual", type=int, default=576)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--kept", type=int, default=64, help="visual tokens kept")
    parser.add_argument("--layer", type=int, default=2, help="prune before this layer")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--decode_steps", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(llm_preset_config("mid-qwen3", vocab_size=VOCAB)).eval()
    llm = llm.to(args.device, getattr(torch, args.dtype))
    embeds, mask, positions, context = build_inputs(llm, num_visual=args.visual, num_text=args.text,
                                                    device=args.device)
    plan = PruningPlan("sparsevlm", (PruningStep(args.layer, args.kept),))

    def prefill(with_plan):
        def run():
            with torch.no_grad():
                return decoder_forward(llm, embeds, mask, positions, plan=with_plan, context=context, use_cache=True,
                                       logits_to_keep=1)
        return run

    def transformers_forward():
        with torch.no_grad():
            llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)

    hf_seconds, full_seconds, pruned_seconds = interleaved_medians(
        [transformers_forward, prefill(None), prefill(plan)], repeats=args.repeats)
    full_tokens, pruned_tokens = prefill(None)().tokens_per_layer, prefill(plan)().tokens_per_layer
    predicted = prefill_flops(llm.config, full_tokens) / prefill_flops(llm.config, pruned_tokens)
    measured = full_seconds / pruned_seconds
    print(f"LLM mid-qwen3: {sum(p.numel() for p in llm.parameters()) / 1e6:.0f}M params, "
          f"threads {torch.get_num_threads()}; {args.visual} visual + {args.text} text tokens; "
          f"keep {args.kept} before layer {args.layer}")
    print(f"tokens per layer: full {full_tokens}, pruned {pruned_tokens}")
    print(f"prefill median: transformers forward {hf_seconds * 1e3:.0f} ms, our loop {full_seconds * 1e3:.0f} ms, "
          f"pruned {pruned_seconds * 1e3:.0f} ms")
    print(f"prefill FLOPs: full {prefill_flops(llm.config, full_tokens) / 1e9:.1f} G, "
          f"pruned {prefill_flops(llm.config, pruned_tokens) / 1e9:.1f} G")
    print(f"speed-up: measured {measured:.2f}x, FLOPs-predicted {predicted:.2f}x, "
          f"ratio {measured / predicted:.2f} (target >= 0.85)")
    with torch.no_grad():
        full_decode = decode_tokens_per_second(llm, prefill(None), mask, positions, args.decode_steps)
        pruned_decode = decode_tokens_per_second(llm, prefill(plan), mask, positions, args.decode_steps)
    print(f"decode ({args.decode_steps} tokens after prefill): unpruned cache {full_decode:.1f} tok/s, "
          f"pruned cache {pruned_decode:.1f} tok/s ({pruned_decode / full_decode:.2f}x)")


if __name__ == "__main__":
    main()
