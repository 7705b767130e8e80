"""MoE-Tuning as MoE-LLaVA runs it (DeepSpeed 0.9.5 TopKGate), against slow per-token references written from
the rules: capacity, drop order, renormalisation over survivors, first-choice balance loss, Gumbel second
choice, top-1 weighted by its raw probability; and the stage-3 trainable set against the upstream rule."""

import math
import re

import pytest
import torch
from tiny import make_model, prompt_with_image, random_pixels, right_padded
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

import sparsevl.model.moe as moe_module
from sparsevl.config import ModelArguments, parse_train_args
from sparsevl.model.build import configure_trainable
from sparsevl.model.moe import GatedMLPExperts, MoELayer, TopKRouter, load_balancing_loss
from sparsevl.model.upcycle import apply_moe_arguments, moe_feed_forwards, moe_layer_indices, moe_layout

DIM, HIDDEN = 16, 24


# --- the slow reference ------------------------------------------------------------------------------------------

def reference_moe(x, gate_weight, experts, *, top_k, capacity, noise=None, uniform=None):
    """MoE-LLaVA's MoE layer token by token, from the rules: returns (output, dropped assignments, balance loss).

    capacity = max(min_capacity, ceil(tokens / E x factor x top_k)). First expert: most probable. Second: argmax
    of logits + noise over the others (noise None: the next most probable). An expert takes first choices in
    token order (top-1: in descending `uniform` order), then second choices, until full. Top-2 weights: the
    probabilities of the kept experts over their sum; top-1: the raw probability. Balance: E x sum_e
    mean_t(prob[t, e]) x (tokens whose first choice is e) / tokens.
    """
    num_tokens, num_experts = x.shape[0], gate_weight.shape[0]
    probs = [torch.softmax(x[t].float() @ gate_weight.float().T, dim=0) for t in range(num_tokens)]
    logits = [x[t].float() @ gate_weight.float().T for t in range(num_tokens)]
    choices = []
    for t in range(num_tokens):
        first = max(range(num_experts), key=lambda e: probs[t][e].item())
        scores = [(logits[t][e] + noise[t][e]).item() if noise is not None else probs[t][e].item()
                  for e in range(num_experts)]
        second = max((e for e in range(num_experts) if e != first), key=lambda e: scores[e])
        choices.append([first, second][:top_k])
    filled, kept = [0] * num_experts, {}
    first_order = sorted(range(num_tokens), key=lambda t: -uniform[t][choices[t][0]]) if uniform is not None \
        else range(num_tokens)
    for rank, order in ((0, first_order), (1, range(num_tokens))):
        for t in order:
            if rank < top_k:
                e = choices[t][rank]
                kept[t, rank] = filled[e] < capacity
                filled[e] += kept[t, rank]
    outputs, dropped = [], 0
    for t in range(num_tokens):
        gates = [probs[t][choices[t][j]] * kept[t, j] for j in range(top_k)]
        if top_k == 2:
            total = torch.clamp(gates[0] + gates[1], min=torch.finfo(torch.float32).eps)
            gates = [g / total for g in gates]
        outputs.append(sum(gates[j] * experts.expert_forward(choices[t][j], x[t:t + 1])[0] for j in range(top_k)))
        dropped += sum(not kept[t, j] for j in range(top_k))
    mean_prob = torch.stack(probs).mean(dim=0)
    first_share = torch.tensor([sum(c[0] == e for c in choices) / num_tokens for e in range(num_experts)])
    return torch.stack(outputs), dropped, num_experts * (mean_prob * first_share).sum()


def ds_capacity(num_tokens, num_experts, factor, top_k, min_capacity=0):
    return max(min_capacity, math.ceil(num_tokens / num_experts * factor * top_k))


def mixtral_like_layer(num_experts, top_k, *, capacity_factor, eval_capacity_factor=2.0, policy="sampling"):
    """An MoE layer routed as the upcycled LLM's (MoE-LLaVA's defaults), experts made to differ."""
    router = TopKRouter(dim=DIM, num_experts=num_experts, top_k=top_k, normalize_top_k=top_k > 1,
                        second_expert_policy=policy)
    experts = GatedMLPExperts(num_experts=num_experts, dim=DIM, hidden_dim=HIDDEN)
    return MoELayer(router=router, experts=experts, capacity_factor=capacity_factor,
                    eval_capacity_factor=eval_capacity_factor, random_token_selection=top_k == 1,
                    balance_count="top1")


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


@pytest.mark.parametrize("loop_max", [0, 10_000])  # the sorted grouped matmul and the decode-size loop
@pytest.mark.parametrize("num_experts", [4, 8])
@pytest.mark.parametrize("capacity_factor, expect_drops", [(0.5, True), (8.0, False)])
def test_reference_top2_gating_equals_fast_dispatch(num_experts, capacity_factor, expect_drops, loop_max,
                                                    monkeypatch):
    monkeypatch.setattr(moe_module, "LOOP_DISPATCH_MAX_ASSIGNMENTS", loop_max)
    torch.manual_seed(num_experts)
    layer = mixtral_like_layer(num_experts, 2, capacity_factor=capacity_factor).train()
    num_tokens = 24
    x = torch.randn(num_tokens, DIM, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)  # the router draws its Gumbel(0, 1) noise from the global generator, (tokens, E)
    noise = torch.distributions.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).sample((num_tokens, num_experts))
    capacity = ds_capacity(num_tokens, num_experts, capacity_factor, 2)
    assert layer.capacity(num_tokens) == capacity
    expected, dropped, balance = reference_moe(x, layer.router.gate.weight, layer.experts, top_k=2,
                                               capacity=capacity, noise=noise)
    second_is_not_runner_up = (out.router.indices[:, 1] != out.router.probs.topk(2).indices[:, 1]).any()
    assert second_is_not_runner_up  # the sampled second choice really differs from argmax somewhere
    assert (dropped > 0) == expect_drops and out.dropped_tokens == dropped
    torch.testing.assert_close(out.hidden_states, expected)
    torch.testing.assert_close(out.losses["balance"], balance)
    weights = [x, layer.router.gate.weight, *layer.experts.parameters()]
    grad_out = torch.randn_like(expected)
    ours = _grads((out.hidden_states * grad_out).sum() + out.losses["balance"], weights)
    theirs = _grads((expected * grad_out).sum() + balance, weights)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("num_experts", [4, 8])
def test_reference_eval_uses_eval_capacity_and_still_samples(num_experts):
    torch.manual_seed(3)
    layer = mixtral_like_layer(num_experts, 2, capacity_factor=8.0, eval_capacity_factor=0.75).eval()
    x = torch.randn(20, DIM)
    torch.manual_seed(11)
    out = layer(x)
    torch.manual_seed(11)
    noise = torch.distributions.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).sample((20, num_experts))
    capacity = ds_capacity(20, num_experts, 0.75, 2)
    expected, dropped, _ = reference_moe(x, layer.router.gate.weight, layer.experts, top_k=2, capacity=capacity,
                                         noise=noise)
    assert layer.capacity(20) == capacity and dropped > 0 and out.dropped_tokens == dropped
    torch.testing.assert_close(out.hidden_states, expected)


@pytest.mark.parametrize("capacity_factor, expect_drops", [(0.5, True), (8.0, False)])
def test_reference_top1_weighted_by_raw_probability_with_random_token_selection(capacity_factor, expect_drops):
    torch.manual_seed(5)
    layer = mixtral_like_layer(4, 1, capacity_factor=capacity_factor).train()
    x = torch.randn(24, DIM, requires_grad=True)
    torch.manual_seed(9)
    out = layer(x)
    torch.manual_seed(9)
    uniform = torch.rand(24, 4)  # DeepSpeed's random token selection: U(0, 1) per (token, expert)
    expected, dropped, balance = reference_moe(x, layer.router.gate.weight, layer.experts, top_k=1,
                                               capacity=ds_capacity(24, 4, capacity_factor, 1), uniform=uniform)
    assert (dropped > 0) == expect_drops and out.dropped_tokens == dropped
    torch.testing.assert_close(out.hidden_states, expected)
    torch.testing.assert_close(out.losses["balance"], balance)
    kept = out.router.weights[:, 0] > 0
    torch.testing.assert_close(out.router.weights[kept, 0], out.router.probs.max(dim=-1).values[kept])
    weights = [x, layer.router.gate.weight, *layer.experts.parameters()]
    ours = _grads(out.hidden_states.sum(), weights)
    for got, want in zip(ours, _grads(expected.sum(), weights)):
        torch.testing.assert_close(got, want)
    assert ours[1].abs().sum() > 0  # the router learns from the output, not only from the balance loss


def test_reference_top1_router_gets_gradient_from_the_lm_loss():
    model, args = make_model("tiny-qwen3", moe_enable=True, top_k_experts=1)
    configure_trainable(model, args)
    ids, mask = right_padded([prompt_with_image(9), prompt_with_image(6, seed=3)])
    model.train()(ids, mask, random_pixels(2), labels=ids).losses["lm"].backward()
    for index, ffn in moe_feed_forwards(model.llm):
        assert ffn.moe.router.gate.weight.grad.abs().sum() > 0, f"layer {index}'s router got no LM gradient"


def test_reference_balance_loss_gradient_reaches_the_router():
    """Against transformers' load_balancing_loss_func at top_k=1, where both count first choices only."""
    logits = torch.randn(32, 8, requires_grad=True)
    probs = logits.softmax(dim=-1)
    first = probs.argmax(dim=-1, keepdim=True)
    ours = load_balancing_loss(probs, torch.cat([first, (first + 1) % 8], 1), 8, count="top1")
    theirs = load_balancing_loss_func((logits,), num_experts=8, top_k=1)
    torch.testing.assert_close(ours, theirs)
    ours_grad, = _grads(ours, [logits])
    theirs_grad, = _grads(theirs, [logits])
    assert ours_grad.abs().sum() > 0
    torch.testing.assert_close(ours_grad, theirs_grad)
    balanced = torch.zeros(8, 8).fill_diagonal_(20.0).softmax(dim=-1)  # each expert first for one token
    torch.testing.assert_close(load_balancing_loss(balanced, balanced.topk(2).indices, 8, count="top1"),
                               torch.tensor(1.0), atol=1e-6, rtol=0)


def test_router_runs_in_fp32_under_bf16_autocast():
    router = TopKRouter(dim=DIM, num_experts=4, top_k=2, bias=True)
    torch.nn.init.normal_(router.gate.bias)
    x = torch.randn(6, DIM)
    expected = x @ router.gate.weight.T + router.gate.bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router(x.bfloat16()).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.bfloat16().float() @ router.gate.weight.T + router.gate.bias)
    assert (logits - expected).abs().max() > 0  # only the input's own bf16 rounding remains


def test_capacity_hand_computed():
    layer = mixtral_like_layer(4, 2, capacity_factor=1.5)
    assert [layer.capacity(s) for s in (1, 10, 33)] == [1, 8, 25]  # ceil(S / 4 x 3)
    layer.eval()
    assert [layer.capacity(s) for s in (1, 10, 33)] == [1, 10, 33]  # ceil(S / 4 x 4)
    layer.min_capacity = 12
    assert layer.capacity(10) == 12
    top1 = mixtral_like_layer(4, 1, capacity_factor=1.5)
    assert top1.capacity(10) == 4  # ceil(10 / 4 x 1.5)


# --- layouts, flags and the stage-3 trainable set ----------------------------------------------------------------

def test_moe_mode_layouts_hand_written():
    assert moe_layer_indices(6, mode="sparse") == [0, 2, 4]
    assert moe_layer_indices(6, mode="first_half") == [0, 1, 2]
    assert moe_layer_indices(6, mode="second_half") == [3, 4, 5]
    assert moe_layer_indices(6, mode="dense") == [0, 1, 2, 3, 4, 5]
    assert moe_layer_indices(6, every=2) == [1, 3, 5]
    assert moe_layer_indices(6, mode="dense", explicit=[4, 1]) == [1, 4]
    model, _ = make_model("tiny-qwen3", moe_enable=True, moe_mode="second_half")
    assert moe_layout(model.llm).layers == [2, 3]


def upstream_stage3_set(model, train_modules, moe_layers, use_residual=False):
    """MoE-LLaVA's rule, literally: on the dense model's names, freeze what holds none of train_modules; then
    upcycling copies each MoE layer's FFN (frozen or not) into its experts and adds routers (and coefficients),
    which are trainable; then the projector is switched back on."""
    trainable = set()
    for name, _ in model.llm.named_parameters():
        if not any(s in name for s in train_modules):
            continue
        match = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", name)
        if match and int(match[1]) in moe_layers:
            trainable.add(f"llm.model.layers.{match[1]}.mlp.moe.experts.{match[2]}")
            if use_residual:
                trainable.add(f"llm.model.layers.{match[1]}.mlp.residual.{match[2]}.weight")
        else:
            trainable.add(f"llm.{name}")
    for i in moe_layers:
        trainable.add(f"llm.model.layers.{i}.mlp.moe.router.gate.weight")
        if use_residual:
            trainable |= {f"llm.model.layers.{i}.mlp.coefficient.weight", f"llm.model.layers.{i}.mlp.coefficient.bias"}
    return trainable | {f"projector.{name}" for name, _ in model.projector.named_parameters()}


@pytest.mark.parametrize("llm", ["tiny-qwen3", "tiny-llama"])
@pytest.mark.parametrize("train_modules, use_residual", [
    (["gate_proj", "up_proj", "down_proj", "wg"], False),  # the default, MoE-LLaVA's scripts
    (["up_proj", "q_proj"], False),
    (["gate_proj", "up_proj", "down_proj", "wg"], True),
])
def test_reference_stage3_trainable_set_equals_the_upstream_rule(llm, train_modules, use_residual):
    dense, _ = make_model(llm)
    model, args = make_model(llm, moe_enable=True, train_modules=train_modules, use_residual=use_residual)
    configure_trainable(model, args)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == upstream_stage3_set(dense, train_modules, [0, 2], use_residual)
    assert not any(name.startswith("vision_tower.") or "embed_tokens" in name or "norm" in name for name in trainable)


def test_train_modules_matching_nothing_fails_naming_the_flag():
    model, args = make_model("tiny-qwen3", moe_enable=True, train_modules=["up_proj", "no_such_weight"])
    with pytest.raises(ValueError, match=r"--train_modules \['no_such_weight'\] match no parameter"):
        configure_trainable(model, args)


def test_residual_moe_mixes_moe_and_dense_ffn():
    dense, _ = make_model("tiny-qwen3")
    model, _ = make_model("tiny-qwen3", moe_enable=True, use_residual=True)
    ffn = moe_feed_forwards(model.llm)[0][1]
    with torch.no_grad():
        ffn.moe.experts.down_proj.mul_(3.0)  # the experts now give 3 x the dense FFN
    hidden = torch.randn(2, 5, model.llm.config.hidden_size)
    coefficient = ffn.coefficient(hidden).softmax(dim=-1)
    expected = dense.llm.model.layers[0].mlp(hidden) * (3 * coefficient[..., :1] + coefficient[..., 1:])
    torch.testing.assert_close(ffn(hidden), expected)


def test_continuing_an_upcycled_model_takes_the_routing_flags():
    model, _ = make_model("tiny-qwen3", moe_enable=True)
    apply_moe_arguments(model.llm, ModelArguments(moe_enable=True, capacity_factor=0.0, eval_capacity_factor=3.0,
                                                  second_expert_policy="argmax", balance_loss_count="top_k"))
    layout = moe_layout(model.llm)
    assert (layout.capacity_factor, layout.eval_capacity_factor, layout.second_expert_policy,
            layout.balance_count) == (None, 3.0, "argmax", "top_k")
    with pytest.raises(ValueError, match="already upcycled"):
        apply_moe_arguments(model.llm, ModelArguments(moe_enable=True, use_residual=True))


def test_upstream_flag_names_parse_to_their_meaning():
    model_args, _, training_args = parse_train_args([
        "--stage", "moe", "--report_to", "none", "--moe_mode", "dense", "--capacity_factor", "1.25",
        "--eval_capacity_factor", "3", "--min_capacity", "4", "--use_residual", "True", "--router_aux_loss_coef",
        "0.05", "--train_modules", "up_proj", "wg", "--second_expert_policy", "argmax"])
    assert (model_args.moe_mode, model_args.capacity_factor, model_args.eval_capacity_factor,
            model_args.min_capacity, model_args.use_residual, model_args.train_modules,
            model_args.second_expert_policy) == ("dense", 1.25, 3.0, 4, True, ["up_proj", "wg"], "argmax")
    assert training_args.moe_aux_loss_coef == 0.05
    defaults, _, _ = parse_train_args(["--stage", "moe", "--report_to", "none"])
    assert (defaults.moe_mode, defaults.capacity_factor, defaults.eval_capacity_factor, defaults.min_capacity,
            defaults.second_expert_policy, defaults.balance_loss_count, defaults.train_modules) == (
        "sparse", 1.5, 2.0, 0, "sampling", "top1", ["gate_proj", "up_proj", "down_proj", "wg"])


@pytest.mark.parametrize("flags, flag", [
    (["--moe_mode", "half"], "--moe_mode"),
    (["--second_expert_policy", "random"], "--second_expert_policy"),
    (["--balance_loss_count", "top2"], "--balance_loss_count"),
    (["--capacity_factor", "-1"], "--capacity_factor"),
    (["--eval_capacity_factor", "-0.5"], "--eval_capacity_factor"),
    (["--min_capacity", "-2"], "--min_capacity"),
    (["--moe_layers", "0", "--moe_layers_every", "2"], "--moe_layers and --moe_layers_every"),
])
def test_bad_upstream_moe_flags_fail_at_parsing_naming_the_flag(flags, flag):
    with pytest.raises(SystemExit, match=flag):
        parse_train_args(["--stage", "moe", "--report_to", "none", *flags])
