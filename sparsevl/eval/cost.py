"""What a pruning setting costs: equivalent visual tokens, prefill FLOPs and measured prefill time.

Shared by `sparsevl eval` (a `cost` entry in metrics.json when a pruner is set) and `sparsevl analyze pruning`.
"""

import statistics
import time

import torch

from sparsevl.model.pruning_cost import equivalent_tokens, prefill_flops, tokens_per_layer


def mean_prompt_text_tokens(records: list[dict], tokenizer) -> float:
    """Mean text tokens of the questions' prompts (the `<image>` placeholder not counted)."""
    from sparsevl.data.conversation import prompt_ids
    from sparsevl.eval.generate import question_of

    return sum(len(prompt_ids(question_of(r), tokenizer)) - 1 for r in records) / max(len(records), 1)


@torch.no_grad()
def measure_prefill_seconds(model, batch: dict, *, repeats: int = 5) -> float:
    """Median seconds of one prompt forward (vision tower, projector, LLM prefill to next-token logits)."""
    def run():
        inputs, _ = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                         padding_side="left")
        if model.prunes_in_llm:
            context = model.pruning_context(batch["input_ids"], batch["attention_mask"], inputs)
            model._pruned_step(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, context, None, True)
        else:
            model.lm_logits(inputs, logits_to_keep=1)

    return median_seconds(run, repeats=repeats, warmup=1)


def median_seconds(fn, *, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def pruning_cost(model, *, num_text: float, batch: dict | None = None, repeats: int = 5) -> dict:
    """The current plan's cost per sample with one image: average visual tokens per LLM layer (SparseVLM's
    "equivalent tokens", recycled tokens included), visual tokens entering the LLM, prefill FLOPs (theory) and,
    with a `batch`, the measured prefill time; each also relative to the unpruned model."""
    config, plan = model.llm.config, model.pruning
    shape = dict(num_layers=config.num_hidden_layers, num_visual=model.num_projected_tokens)
    flops = prefill_flops(config, tokens_per_layer(plan, num_text=round(num_text), **shape))
    full_flops = prefill_flops(config, tokens_per_layer(None, num_text=round(num_text), **shape))
    cost = {**equivalent_tokens(plan, **shape), "prefill_gflops": flops / 1e9, "relative_flops": flops / full_flops}
    if batch is not None:
        cost["prefill_ms"] = 1e3 * measure_prefill_seconds(model, batch, repeats=repeats)
        model.pruning = None
        try:
            cost["full_prefill_ms"] = 1e3 * measure_prefill_seconds(model, batch, repeats=repeats)
        finally:
            model.pruning = plan
        cost["measured_speedup"] = cost["full_prefill_ms"] / cost["prefill_ms"]
    return cost
