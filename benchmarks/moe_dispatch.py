"""MoE dispatch cost on CPU: ratios against a dense FFN, the naive oracle, a per-expert loop and transformers.

Setup: 4096 tokens, d=512, ffn 2048, 8 experts, top-2, fp32, 2 threads, GatedMLPExperts (SiLU-gated,
the Qwen3-MoE / upcycled-LLaMA expert) against one dense LlamaMLP of the same size. Our layer routes with
MoE-Tuning's defaults (MoE-LLaVA's: Gumbel-sampled second expert, capacity factor 1.5 in training and 2.0 in
eval, kept weights renormalised). Prompt-sized cases time forward+backward in training mode (grads of input
and all weights); decode-sized cases (1, 16, 64 and 4096 tokens) time forward under no_grad in eval mode,
against (distinct experts touched x dense), with two meanings of that denominator: one dense FFN timed alone
and multiplied (on a machine with a 32 MiB L3 its 12 MiB of weights stay in cache between calls), and that many
distinct dense FFNs run back to back (each reads its own weights, as the touched experts do: what a dense model
with that many FFNs costs). The summary also prints those distinct FFNs alone against the first denominator:
work every MoE layer must do at least, whatever its dispatch. One token without grad takes the layer's one-token
path (routing decided in Python, `dispatch_one_token`) whatever the dispatch threshold, so at one token the
library, loop and grouped_mm rows time the same code: their spread is the harness's. Prompt-sized variants are
timed in interleaved rounds so that load from other processes hits all alike.

    PYTHONPATH=. python benchmarks/moe_dispatch.py [--repeats 5] [--threads 2] [--default-malloc] [--decode-only]
"""

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, Qwen3MoeConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import sparsevl.model.moe as moe_module
from sparsevl.model.moe import GatedMLPExperts, MoELayer, TopKRouter, dispatch_reference
from sparsevl.runtime import tune_cpu_allocator

TOKENS, DIM, FFN, EXPERTS, TOP_K = 4096, 512, 2048, 8, 2
# untimed calls before each block of decode-sized calls: with one, a variant timed right after the distinct dense
# FFNs ran up to 8 % slower than the same code timed after another MoE variant
WARMUP_CALLS = 3


class LoopGatedExperts(GatedMLPExperts):
    """Dispatch variant: a Python loop of plain F.linear matmuls over each expert's sorted slice."""

    def forward(self, x_sorted, tokens_per_expert):
        slices = x_sorted.split(tokens_per_expert.tolist())
        return torch.cat([self.expert_forward(e, x) for e, x in enumerate(slices)])


def build():
    """Our MoE layer (MoE-Tuning's routing), a loop-dispatch twin, a transformers Qwen3-MoE block and a dense
    MLP, sharing weights."""
    router = TopKRouter(dim=DIM, num_experts=EXPERTS, top_k=TOP_K, second_expert_policy="sampling")
    moe = MoELayer(router=router, experts=GatedMLPExperts(num_experts=EXPERTS, dim=DIM, hidden_dim=FFN),
                   capacity_factor=1.5, eval_capacity_factor=2.0, balance_count="top1")
    loop_experts = LoopGatedExperts(num_experts=EXPERTS, dim=DIM, hidden_dim=FFN)
    loop_experts.load_state_dict(moe.experts.state_dict())
    loop_moe = MoELayer(router=moe.router, experts=loop_experts, capacity_factor=1.5, eval_capacity_factor=2.0)
    config = Qwen3MoeConfig(hidden_size=DIM, moe_intermediate_size=FFN, num_experts=EXPERTS,
                            num_experts_per_tok=TOP_K, norm_topk_prob=True)
    hf_block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        hf_block.gate.weight.copy_(moe.router.gate.weight)
        hf_block.experts.gate_up_proj.copy_(torch.cat([moe.experts.gate_proj, moe.experts.up_proj], dim=1))
        hf_block.experts.down_proj.copy_(moe.experts.down_proj)
    dense = LlamaMLP(LlamaConfig(hidden_size=DIM, intermediate_size=FFN, num_attention_heads=8, hidden_act="silu"))
    return moe, loop_moe, hf_block, config, dense


def hf_forward(block, config, implementation):
    """transformers' block with the given experts_implementation; input (tokens, dim) as batch 1."""
    def forward(x):
        config._experts_implementation = implementation
        return block(x.unsqueeze(0)).squeeze(0)  # (1, tokens, dim) -> (tokens, dim)
    return forward


def train_step(forward, module, x, grad_out):
    """One forward+backward returning grads of the input and every weight (no .grad accumulation)."""
    def step():
        x_ = x.detach().requires_grad_()
        torch.autograd.grad(forward(x_), [x_, *module.parameters()], grad_out)
    return step


def medians_ms(steps, repeats, block=1):
    """Median (wall, process CPU) milliseconds per step after one warm-up each, timed in `repeats` rounds that
    run every variant `block` times back to back.

    Rounds spread load from other jobs over all variants. Decode-sized steps use blocks of several calls after
    WARMUP_CALLS untimed ones, so that each variant runs with its own weights in cache (single calls in turn
    would favour variants that share weights). Process CPU time counts the work of all threads and is less
    disturbed than wall time by other jobs.
    """
    times = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            for _ in range(WARMUP_CALLS if block > 1 else 0):
                step()  # brings this variant's weights back into cache
            for _ in range(block):
                wall, cpu = time.perf_counter(), time.process_time()
                step()
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: tuple(1e3 * statistics.median(column) for column in zip(*ts)) for name, ts in times.items()}


def saved_activation_bytes(forward, module, x):
    """Bytes of distinct non-parameter storages autograd saves for backward during one forward."""
    param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x.detach().requires_grad_())
    return sum(storages.values())


def prompt_case(moe, loop_moe, hf_block, config, dense, repeats):
    x = torch.randn(TOKENS, DIM)
    grad_out = torch.randn(TOKENS, DIM)
    ours = lambda x: moe(x).hidden_states  # noqa: E731
    reference = lambda x: dispatch_reference(x, moe.router(x), moe.experts)  # noqa: E731
    steps = {
        "dense": train_step(dense, dense, x, grad_out),
        "sparsevl MoELayer, grouped_mm (library)": train_step(ours, moe, x, grad_out),
        "sparsevl MoELayer, per-expert loop": train_step(lambda x: loop_moe(x).hidden_states, loop_moe, x, grad_out),
        "dispatch_reference (all experts, mask)": train_step(reference, moe, x, grad_out),
        **{f"transformers Qwen3Moe {impl}": train_step(hf_forward(hf_block, config, impl), hf_block, x, grad_out)
           for impl in ("eager", "grouped_mm")},
    }
    print(f"== {TOKENS} tokens, d={DIM}, ffn={FFN}, {EXPERTS} experts, top-{TOP_K}, fp32, forward+backward, "
          f"training mode (capacity {moe.capacity(TOKENS)} per expert) ==")
    gap = qwen3_routing_gap(moe, hf_block, config, x)
    print(f"max |ours - transformers Qwen3Moe| with Qwen3-MoE's routing = {gap:.2e}"
          f"  (transformers batched_mm skipped: it gathers one weight matrix per assignment, "
          f"{TOKENS * TOP_K * 3 * FFN * DIM * 4 / 2**30:.0f} GiB here)")
    torch.manual_seed(0)
    print(f"assignments dropped by the capacity in one call: {moe(x).dropped_tokens} of {TOKENS * TOP_K}")
    ms = medians_ms(steps, repeats)
    dense_wall, dense_cpu = ms.pop("dense")
    print(f"{'':40s} {'wall ms':>9s} {'/(2 dense)':>10s} {'cpu ms':>9s} {'/(2 dense)':>10s}")
    print(f"{'dense LlamaMLP (1 expert, all tokens)':40s} {dense_wall:9.1f} {'':10s} {dense_cpu:9.1f}")
    for name, (wall, cpu) in ms.items():
        print(f"{name:40s} {wall:9.1f} {wall / (2 * dense_wall):10.2f} {cpu:9.1f} {cpu / (2 * dense_cpu):10.2f}")
    wall, cpu = ms["sparsevl MoELayer, grouped_mm (library)"]
    ref_wall, ref_cpu = ms["dispatch_reference (all experts, mask)"]
    print(f"time(MoE) / (2 x time(dense)): wall {wall / (2 * dense_wall):.2f}, cpu {cpu / (2 * dense_cpu):.2f}"
          "  (target <= 1.1)")
    print(f"speedup vs dispatch_reference: wall {ref_wall / wall:.2f}x, cpu {ref_cpu / cpu:.2f}x  (target >= 3.5x)")
    moe_bytes, dense_bytes = saved_activation_bytes(ours, moe, x), saved_activation_bytes(dense, dense, x)
    print(f"saved activations: MoE {moe_bytes / 2**20:.0f} MiB, dense {dense_bytes / 2**20:.0f} MiB, "
          f"ratio {moe_bytes / dense_bytes:.2f}  (target <= 3)")


@torch.no_grad()
def qwen3_routing_gap(moe, hf_block, config, x):
    """Largest |difference| to transformers' block with our layer routed as Qwen3-MoE (argmax, no capacity)."""
    saved = moe.router.second_expert_policy, moe.capacity_factor
    moe.router.second_expert_policy, moe.capacity_factor = "argmax", None
    try:
        return (moe(x).hidden_states - hf_forward(hf_block, config, "grouped_mm")(x)).abs().max().item()
    finally:
        moe.router.second_expert_policy, moe.capacity_factor = saved


def seeded_moe(moe, loop_max=None):
    """Our layer with the generator state restored before each call (the same Gumbel noise, so the same routing,
    every call; torch.manual_seed would cost ~1 ms) and, when given, the dispatch's loop threshold forced
    (0: always the grouped matmul; large: always the loop)."""
    state = torch.get_rng_state()

    def step(x):
        torch.set_rng_state(state)
        saved = moe_module.LOOP_DISPATCH_MAX_ASSIGNMENTS
        if loop_max is not None:
            moe_module.LOOP_DISPATCH_MAX_ASSIGNMENTS = loop_max
        try:
            return moe(x)
        finally:
            moe_module.LOOP_DISPATCH_MAX_ASSIGNMENTS = saved
    return step


@torch.no_grad()
def decode_case(num_tokens, moe, loop_moe, hf_block, config, dense, repeats):
    x = torch.randn(num_tokens, DIM)
    ours, loop, grouped = seeded_moe(moe), seeded_moe(moe, 10**9), seeded_moe(moe, 0)
    touched = ours(x).router.indices.unique().numel()
    denses = [copy.deepcopy(dense) for _ in range(touched)]  # distinct weights, one FFN per touched expert
    steps = {
        "dense": lambda: dense(x),
        "distinct dense": lambda: [mlp(x) for mlp in denses],
        "sparsevl MoELayer (library)": lambda: ours(x),
        "sparsevl, loop dispatch": lambda: loop(x),
        "sparsevl, grouped_mm dispatch": lambda: grouped(x),
        "hf eager": lambda: hf_forward(hf_block, config, "eager")(x),
        "hf grouped_mm": lambda: hf_forward(hf_block, config, "grouped_mm")(x),
    }
    if num_tokens <= 16:  # batched_mm gathers 3 * FFN * DIM floats per assignment
        steps["hf batched_mm"] = lambda: hf_forward(hf_block, config, "batched_mm")(x)
    ms = medians_ms(steps, repeats, block=10 if num_tokens <= 64 else 1)
    dense_wall, dense_cpu = ms.pop("dense")
    distinct_wall, distinct_cpu = ms.pop("distinct dense")
    print(f"{num_tokens:4d} tokens, {touched} distinct experts touched; dense {dense_wall:.2f} ms wall, "
          f"{dense_cpu:.2f} ms cpu; {touched} distinct dense {distinct_wall:.2f} ms wall, {distinct_cpu:.2f} ms cpu; "
          f"time / dense, / ({touched} x dense) and / ({touched} distinct dense), wall and cpu:")
    for name, (wall, cpu) in ms.items():
        print(f"      {name:30s} {wall / dense_wall:6.2f} {cpu / dense_cpu:6.2f}   "
              f"{wall / (touched * dense_wall):6.2f} {cpu / (touched * dense_cpu):6.2f}   "
              f"{wall / distinct_wall:6.2f} {cpu / distinct_cpu:6.2f}")
    wall, cpu = ms["sparsevl MoELayer (library)"]
    return (num_tokens, touched, wall / (touched * dense_wall), cpu / (touched * dense_cpu), wall / distinct_wall,
            cpu / distinct_cpu, distinct_wall / (touched * dense_wall))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per prompt-sized variant")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's allocator defaults instead of the `sparsevl` command's tuning")
    parser.add_argument("--decode-only", action="store_true", help="skip the 4096-token forward+backward case")
    args = parser.parse_args()
    tuned = not args.default_malloc and tune_cpu_allocator()
    print(f"allocator: {'tuned as by the sparsevl command (sparsevl/runtime.py)' if tuned else 'glibc defaults'}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = build()
    if not args.decode_only:
        prompt_case(*models, args.repeats)
    print("== decode sizes, forward only (no_grad), eval mode ==")
    models[0].eval()
    models[1].eval()
    results = [decode_case(num_tokens, *models, repeats=(4 if num_tokens <= 64 else 1) * args.repeats)
               for num_tokens in (1, 16, 64, 4096)]
    for num_tokens, touched, wall, cpu, distinct_wall, distinct_cpu, floor in results:
        target = "  (target <= 1.3)" if num_tokens <= 16 else ""
        print(f"decode {num_tokens} tokens: time(MoE) / ({touched} experts touched x time(dense)): "
              f"wall {wall:.2f}, cpu {cpu:.2f}; / ({touched} distinct dense FFNs): wall {distinct_wall:.2f}, "
              f"cpu {distinct_cpu:.2f}{target}; {touched} distinct dense FFNs alone, no routing: "
              f"{floor:.2f} x ({touched} x time(dense))")


if __name__ == "__main__":
    main()
