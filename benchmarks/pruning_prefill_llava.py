"""Prefill speed-up of SparseVLM's budgets at LLaVA's shape, measured against the FLOPs-predicted one; whole-answer
latency.

LLaVA's shape: 576 visual tokens per image (`mid-clip`: 336 px, 14 px patches, 8 layers d=512, random weights)
and a Qwen3-0.6B-shaped LLM (`qwen3-0.6b-shape`: 28 layers, d=1024, random weights, vocabulary 151936), fp32,
one sample: 5 text tokens, the image, 64 instruction tokens. Settings: no pruning, and `--token_pruner sparsevlm
--sparsevlm_budget B` (the paper's stage table scaled to 28 layers, recycling on) for each budget.

Prefill = merged embeddings in, next-token logits out, through our decoder loop (scores, raters and recycling
included); predicted speed-up = prefill FLOPs of the unpruned over the pruned token counts per layer. Whole
answer = `model.generate` (vision tower + projector + prefill + 16 greedy tokens with the KV cache). Times are
medians of rounds that run every setting in turn, so load changes hit all alike: read the ratios.
Target: measured / predicted >= 0.85 at every budget.

    OMP_NUM_THREADS=1 python -m benchmarks.pruning_prefill_llava [--repeats 3] [--budgets 192,128,64]
"""

import argparse

import torch

from benchmarks.pruning_prefill import interleaved_medians
from sparsevl.config import ModelArguments
from sparsevl.model.build import build_model
from sparsevl.model.decoder import decoder_forward
from sparsevl.model.pruning import build_pruning_plan, pruning_arguments
from sparsevl.model.pruning_cost import equivalent_tokens, prefill_flops

VOCAB = 151936


def budget_plan(model, budget: int):
    return build_pruning_plan(pruning_arguments("sparsevlm", sparsevlm_budget=budget), model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--text", type=int, default=64, help="instruction tokens after the image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode_tokens", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    model_args = ModelArguments(model_name_or_path="qwen3-0.6b-shape", vision_tower="mid-clip")
    model = build_model(model_args, vocab_size=VOCAB, image_token_id=VOCAB - 1).eval()
    ids = torch.randint(2, VOCAB - 1, (1, 5 + 1 + args.text))
    ids[0, 5] = VOCAB - 1
    mask, pixels = torch.ones_like(ids), torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        inputs, _ = model.prepare_inputs(ids, mask, pixels, padding_side="left")
    context = model.pruning_context(ids, mask, inputs)
    plans = [None] + [budget_plan(model, int(b)) for b in args.budgets.split(",")]

    def prefill(plan):
        def run():
            with torch.no_grad():
                return decoder_forward(model.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids,
                                       plan=plan, context=context, use_cache=True, logits_to_keep=1,
                                       padding_side="left")
        return run

    def answer(plan):
        def run():
            model.pruning = plan
            model.generate(ids, mask, pixels, max_new_tokens=args.decode_tokens, eos_token_id=-1)
        return run

    config, visual = model.llm.config, model.num_projected_tokens
    print(f"LLM qwen3-0.6b-shape {sum(p.numel() for p in model.llm.parameters()) / 1e6:.0f}M params, vision mid-clip, "
          f"threads {torch.get_num_threads()}; {visual} visual + {ids.shape[1] - 1} text tokens")
    prefill_seconds = interleaved_medians([prefill(p) for p in plans], repeats=args.repeats)
    answer_seconds = interleaved_medians([answer(p) for p in plans], repeats=args.repeats)
    full_tokens = prefill(None)().tokens_per_layer
    full_flops = prefill_flops(config, full_tokens)
    print("| setting | stages (pruned layer: kept) | avg visual tokens/layer | prefill GFLOPs | prefill ms | "
          "predicted speed-up | measured speed-up | measured / predicted | whole answer ms | answer speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for plan, seconds, answer_s in zip(plans, prefill_seconds, answer_seconds):
        tokens = prefill(plan)().tokens_per_layer
        flops = prefill_flops(config, tokens)
        predicted, measured = full_flops / flops, prefill_seconds[0] / seconds
        name = "none" if plan is None else f"sparsevlm budget {args.budgets.split(',')[plans.index(plan) - 1]}"
        stages = "-" if plan is None else ", ".join(f"{s.layer - 1}: {s.num_kept}" for s in plan.steps)
        average = equivalent_tokens(plan, num_layers=config.num_hidden_layers, num_visual=visual)
        print(f"| {name} | {stages} | {average['avg_visual_tokens_per_layer']:.1f} | {flops / 1e9:.0f} | "
              f"{seconds * 1e3:.0f} | {predicted:.2f} | {measured:.2f} | {measured / predicted:.2f} | "
              f"{answer_s * 1e3:.0f} | {answer_seconds[0] / answer_s:.2f} |")


if __name__ == "__main__":
    main()
