"""Cost of one adaptive-layer training step (top-k layers tried per image) relative to a fixed-layer step.

Both steps are forward + backward + AdamW on the same mid-size VLM (LLaMA d=512 x 8 layers, CLIP d=512 x 8
layers, 64 visual + 64 text tokens, the last `--answer_tokens` labelled). The adaptive step runs the vision tower
once, scores k layers in one no-grad projector + LLM call of k x batch rows, then trains on one layer per image
(`--layer_lm_loss_from all`: trains on all k layers in one call of k x batch rows, no scoring call).
Target: adaptive / fixed <= 2.5 for k = 3. Also prints the batched scoring call against k separate calls.

    python -m benchmarks.adaptive_step [--batch_size 8] [--top_k 3] [--frozen_vision] [--layer_lm_loss_from all]
                                       [--llm tiny-llama --vision tiny-clip]
"""

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from sparsevl.config import LM_LOSS_SOURCES, ModelArguments
from sparsevl.model.adaptive import score_layers
from sparsevl.model.build import build_model, configure_trainable
from sparsevl.model.vlm import IGNORE_INDEX

VOCAB, IMAGE_TOKEN = 4096, 4095


def make_step(model, batch: dict):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step():
        losses = model(**batch).losses
        (losses["lm"] + 0.1 * losses.get("layer_cls", 0.0)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--text_tokens", type=int, default=64)
    parser.add_argument("--answer_tokens", type=int, default=16, help="labelled tokens at the end of each sample")
    parser.add_argument("--top_k", type=int, default=3)
    parser.add_argument("--frozen_vision", action="store_true", help="keep the vision tower frozen (LLaVA finetune)")
    parser.add_argument("--layer_lm_loss_from", default="classifier", choices=LM_LOSS_SOURCES,
                        help="see `sparsevl train`")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--llm", default="mid-llama", help="LLM preset")
    parser.add_argument("--vision", default="mid-clip64", help="vision preset (64 px images)")
    args = parser.parse_args()

    ids = torch.randint(2, IMAGE_TOKEN, (args.batch_size, args.text_tokens), generator=torch.Generator().manual_seed(0))
    ids[:, 1] = IMAGE_TOKEN
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -args.answer_tokens:] = ids[:, -args.answer_tokens:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randn(args.batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(1))}
    common = dict(model_name_or_path=args.llm, vision_tower=args.vision, unfreeze_mm_vision_tower=not args.frozen_vision)
    steps = {}
    for name, extra in (("fixed", {"mm_vision_select_layer": -2}),
                        ("adaptive", {"use_adaptive_layer_selection": True, "top_k_layers": args.top_k,
                                      "layer_lm_loss_from": args.layer_lm_loss_from})):
        torch.manual_seed(0)
        model_args = ModelArguments(**common, **extra)
        model = build_model(model_args, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN).train()
        configure_trainable(model, model_args)
        steps[name] = make_step(model, batch)
    flops = {name: counted_flops(step) for name, step in steps.items()}  # noise-free, unlike the timings
    # The machine is shared: time the two steps in alternation and take the median of the per-pair ratios.
    times = paired_seconds(steps, repeats=args.repeats)
    selector = model.layer_selector
    with torch.no_grad():
        features = selector.candidate_features(model.vision_tower, batch["pixel_values"])[: args.top_k]
        text = model.llm.get_input_embeddings()(ids)
    score_args = (batch["input_ids"], batch["attention_mask"], text, labels)
    scoring = paired_seconds({
        "batched": lambda: score_layers(model, features, *score_args),
        "separate": lambda: [score_layers(model, features[j:j + 1], *score_args) for j in range(args.top_k)]},
        repeats=args.repeats)
    print(f"batch {args.batch_size}, {args.text_tokens - 1 + model.num_image_tokens} tokens per sample, "
          f"{args.answer_tokens} labelled; vision tower {'frozen' if args.frozen_vision else 'trained'}; "
          f"{len(selector.candidate_layers)} candidate layers, top_k {args.top_k}, LM loss from "
          f"{args.layer_lm_loss_from}")
    print(f"fixed-layer step: median {statistics.median(times['fixed']) * 1e3:.0f} ms; "
          f"adaptive step: median {statistics.median(times['adaptive']) * 1e3:.0f} ms")
    print(f"ratio adaptive/fixed (median of {args.repeats} paired runs): {median_ratio(times, 'adaptive', 'fixed'):.2f} "
          f"(target <= 2.5)")
    print(f"counted FLOPs: fixed {flops['fixed'] / 1e9:.1f} G, adaptive {flops['adaptive'] / 1e9:.1f} G, "
          f"ratio {flops['adaptive'] / flops['fixed']:.2f}")
    print(f"scoring {args.top_k} layers (best, classifier): one batched call / {args.top_k} separate calls = "
          f"{median_ratio(scoring, 'batched', 'separate'):.2f}")


def counted_flops(step) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def paired_seconds(functions: dict, *, repeats: int) -> dict[str, list[float]]:
    """Run each function once as warm-up, then `repeats` rounds of all of them in turn; seconds per run."""
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))

if __name__ == "__main__":
    main()
