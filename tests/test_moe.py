import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, Qwen3MoeConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, load_balancing_loss_func

from sparsevl.model.moe import (
    GatedMLPExperts,
    MLPExperts,
    MoELayer,
    RouterOutput,
    TopKRouter,
    capacity_mask,
    dispatch,
    dispatch_reference,
    expert_load,
    kl_to_uniform_loss,
    load_balancing_loss,
    router_z_loss,
)

DIM, HIDDEN = 16, 24


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


@pytest.mark.parametrize("experts_cls", [MLPExperts, GatedMLPExperts])
@pytest.mark.parametrize("top_k,normalize", [(1, False), (2, True), (2, False)])
def test_dispatch_matches_reference_values_and_grads(experts_cls, top_k, normalize):
    num_tokens, num_experts = 6, 8  # 6 tokens * top_k < 8 * 2: some experts get no token
    router = TopKRouter(dim=DIM, num_experts=num_experts, top_k=top_k, normalize_top_k=normalize)
    experts = experts_cls(num_experts=num_experts, dim=DIM, hidden_dim=HIDDEN)
    x = torch.randn(num_tokens, DIM, requires_grad=True)
    routing = router(x)
    out, tokens_per_expert = dispatch(x, routing, experts)
    expected = dispatch_reference(x, routing, experts)
    assert (tokens_per_expert == 0).any() and tokens_per_expert.sum() == num_tokens * top_k
    torch.testing.assert_close(out, expected)

    weights = [x, router.gate.weight, *experts.parameters()]
    grad_out = torch.randn_like(out)
    for got, want in zip(_grads((out * grad_out).sum(), weights), _grads((expected * grad_out).sum(), weights)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("experts_cls", [MLPExperts, GatedMLPExperts])
def test_grouped_experts_match_per_expert_loop_and_accept_sum_backward(experts_cls):
    experts = experts_cls(num_experts=3, dim=DIM, hidden_dim=HIDDEN)
    tokens_per_expert = torch.tensor([2, 0, 3])
    x = torch.randn(5, DIM, requires_grad=True)
    out = experts(x, tokens_per_expert)
    expected = torch.cat([experts.expert_forward(0, x[:2]), experts.expert_forward(2, x[2:])])
    torch.testing.assert_close(out, expected)
    out.sum().backward()  # a stride-0 incoming grad, which grouped_mm's CPU backward rejects unaided
    assert x.grad.shape == x.shape


def test_one_expert_top1_moe_equals_dense_mlp():
    dense = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 12))
    moe = MoELayer(router=TopKRouter(dim=DIM, num_experts=1, top_k=1), experts=MLPExperts.from_dense(dense, 1))
    x = torch.randn(2, 5, DIM, requires_grad=True)
    out = moe(x).hidden_states
    expected = dense(x)
    assert out.shape == (2, 5, 12)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(_grads(out.sum(), [x])[0], _grads(expected.sum(), [x])[0])


def _tiny_llama_mlp():
    config = LlamaConfig(hidden_size=DIM, intermediate_size=HIDDEN, num_attention_heads=2, hidden_act="silu")
    return LlamaMLP(config)


def test_from_dense_experts_reproduce_dense_mlps():
    x = torch.randn(7, DIM)
    llama_mlp = _tiny_llama_mlp()
    gated = GatedMLPExperts.from_dense(llama_mlp, 4)
    projector = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 32))
    plain = MLPExperts.from_dense(projector, 3)
    for e in range(4):
        torch.testing.assert_close(gated.expert_forward(e, x), llama_mlp(x), rtol=0, atol=1e-6)
    for e in range(3):
        torch.testing.assert_close(plain.expert_forward(e, x), projector(x), rtol=0, atol=1e-6)


def test_upcycled_moe_layer_equals_dense_llama_mlp():
    llama_mlp = _tiny_llama_mlp()
    moe = MoELayer(router=TopKRouter(dim=DIM, num_experts=4, top_k=2, normalize_top_k=True),
                   experts=GatedMLPExperts.from_dense(llama_mlp, 4))
    x = torch.randn(3, 5, DIM)
    torch.testing.assert_close(moe(x).hidden_states, llama_mlp(x))


def test_moe_layer_matches_transformers_qwen3_moe_block():
    config = Qwen3MoeConfig(hidden_size=DIM, moe_intermediate_size=HIDDEN, num_experts=4, num_experts_per_tok=2,
                            norm_topk_prob=True)
    block = Qwen3MoeSparseMoeBlock(config)
    moe = MoELayer(router=TopKRouter(dim=DIM, num_experts=4, top_k=2),
                   experts=GatedMLPExperts(num_experts=4, dim=DIM, hidden_dim=HIDDEN))
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([moe.experts.gate_proj, moe.experts.up_proj], dim=1))
        block.experts.down_proj.copy_(moe.experts.down_proj)
    x = torch.randn(2, 5, DIM)
    torch.testing.assert_close(moe(x).hidden_states, block(x))


def test_from_dense_rejects_other_modules():
    with pytest.raises(ValueError, match="gate_proj"):
        GatedMLPExperts.from_dense(nn.Linear(DIM, DIM), 2)
    with pytest.raises(ValueError, match="Sequential"):
        MLPExperts.from_dense(nn.Sequential(nn.Linear(DIM, DIM)), 2)


def test_load_balancing_loss_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    indices = torch.tensor([[0, 1], [1, 2]])
    # mean probs P = [0.3, 0.45, 0.25]
    # top_k: assignments per expert [1, 2, 1] / 2 tokens -> f = [0.5, 1.0, 0.5]; 3 * (0.15 + 0.45 + 0.125) = 2.175
    # top1: first choices [0, 1] -> f = [0.5, 0.5, 0.0]; 3 * (0.15 + 0.225) = 1.125
    torch.testing.assert_close(load_balancing_loss(probs, indices, 3), torch.tensor(2.175))
    torch.testing.assert_close(load_balancing_loss(probs, indices, 3, count="top1"), torch.tensor(1.125))


def test_load_balancing_loss_of_balanced_router_is_top_k_or_one():
    probs = torch.full((4, 4), 0.25)
    indices = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    torch.testing.assert_close(load_balancing_loss(probs, indices, 4), torch.tensor(2.0))
    torch.testing.assert_close(load_balancing_loss(probs, indices, 4, count="top1"), torch.tensor(1.0))
    with pytest.raises(ValueError, match="count"):
        load_balancing_loss(probs, indices, 4, count="top2")


def test_load_balancing_loss_matches_transformers():
    logits = torch.randn(32, 8)
    probs = logits.softmax(dim=-1)
    indices = probs.topk(2, dim=-1).indices
    expected = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(load_balancing_loss(probs, indices, 8), expected)


def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp rows: log 2 and log 4 = 2 log 2 -> mean of squares = 2.5 (log 2)^2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(2.5 * math.log(2.0) ** 2))


def test_kl_to_uniform_loss_hand_computed():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # utilisation [0.75, 0.25]: 0.75 log 1.5 + 0.25 log 0.5
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    torch.testing.assert_close(kl_to_uniform_loss(probs), torch.tensor(expected))
    torch.testing.assert_close(kl_to_uniform_loss(torch.full((3, 4), 0.25)), torch.tensor(0.0))


def _biased_router(bias, top_k=1):
    router = TopKRouter(dim=DIM, num_experts=len(bias), top_k=top_k, bias=True)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.bias.copy_(torch.tensor(bias))
    return router


def test_capacity_drops_are_zero_and_counted():
    experts = MLPExperts(num_experts=2, dim=DIM, hidden_dim=HIDDEN)
    moe = MoELayer(router=_biased_router([10.0, 0.0]), experts=experts, capacity_factor=0.5)
    x = torch.randn(4, DIM)  # all 4 tokens pick expert 0; capacity = ceil(0.5 * 4 * 1 / 2) = 1
    output = moe(x)
    assert moe.capacity(4) == 1 and output.dropped_tokens == 3
    weight = output.router.weights[0, 0]
    torch.testing.assert_close(output.hidden_states[0], weight * experts.expert_forward(0, x[:1])[0])
    assert torch.equal(output.hidden_states[1:], torch.zeros(3, DIM))
    moe(x)
    assert moe.dropped_token_count.item() == 6
    assert moe.expert_token_counts.tolist() == [8, 0]


def test_capacity_keeps_first_choices_before_second_choices():
    experts = MLPExperts(num_experts=2, dim=DIM, hidden_dim=HIDDEN)
    x = torch.randn(2, DIM)
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    routing = RouterOutput(weights=weights, indices=torch.tensor([[0, 1], [1, 0]]),
                           logits=torch.zeros(2, 2), probs=torch.full((2, 2), 0.5))
    kept = capacity_mask(routing.indices, 2, capacity=1)
    # each expert gets one first and one second choice; capacity 1 keeps only the first choices
    assert kept.tolist() == [[True, False], [True, False]]
    out, tokens_per_expert = dispatch(x, routing, experts, kept)
    assert tokens_per_expert.tolist() == [2, 2]
    torch.testing.assert_close(out[0], 0.7 * experts.expert_forward(0, x[:1])[0])
    torch.testing.assert_close(out[1], 0.6 * experts.expert_forward(1, x[1:])[0])


def test_expert_token_counts_accumulate_and_reset():
    moe = MoELayer(router=TopKRouter(dim=DIM, num_experts=4, top_k=2),
                   experts=GatedMLPExperts(num_experts=4, dim=DIM, hidden_dim=HIDDEN))
    x = torch.randn(2, 5, DIM)
    output = moe(x)
    assert output.dropped_tokens == 0 and set(output.losses) == {"balance", "z"}
    moe(x)
    assert moe.expert_token_counts.sum().item() == 2 * 10 * 2
    torch.testing.assert_close(expert_load(moe).sum(), torch.tensor(1.0, dtype=torch.float64))
    moe.reset_stats()
    assert moe.expert_token_counts.sum().item() == 0 and moe.dropped_token_count.item() == 0
    moe.track_stats = False
    moe(x)
    assert moe.expert_token_counts.sum().item() == 0


def test_router_noise_only_in_training():
    router = TopKRouter(dim=DIM, num_experts=4, top_k=2, noise_std=1.0)
    x = torch.randn(5, DIM)
    router.eval()
    torch.testing.assert_close(router(x).logits, router.gate(x))
    router.train()
    assert not torch.allclose(router(x).logits, router.gate(x))


def test_shared_experts_are_added():
    shared = nn.Linear(DIM, DIM)
    routed = MoELayer(router=TopKRouter(dim=DIM, num_experts=2, top_k=1),
                      experts=MLPExperts(num_experts=2, dim=DIM, hidden_dim=HIDDEN))
    both = MoELayer(router=routed.router, experts=routed.experts, shared_experts=shared)
    x = torch.randn(3, DIM)
    torch.testing.assert_close(both(x).hidden_states, routed(x).hidden_states + shared(x))


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_experts=2, top_k=3), "top_k"),
    (dict(num_experts=0, top_k=1), "num_experts"),
    (dict(num_experts=2, top_k=0), "top_k"),
    (dict(num_experts=2, top_k=1, noise_std=-1.0), "noise_std"),
])
def test_router_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TopKRouter(dim=DIM, **kwargs)


def test_layer_and_experts_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="num_experts"):
        MLPExperts(num_experts=0, dim=DIM, hidden_dim=HIDDEN)
    with pytest.raises(ValueError, match="activation"):
        GatedMLPExperts(num_experts=2, dim=DIM, hidden_dim=HIDDEN, activation="nope")
    experts = MLPExperts(num_experts=3, dim=DIM, hidden_dim=HIDDEN)
    with pytest.raises(ValueError, match="num_experts"):
        MoELayer(router=TopKRouter(dim=DIM, num_experts=2, top_k=1), experts=experts)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoELayer(router=TopKRouter(dim=DIM, num_experts=3, top_k=1), experts=experts, capacity_factor=0.0)


def test_empty_input_keeps_shape():
    moe = MoELayer(router=TopKRouter(dim=DIM, num_experts=4, top_k=2), capacity_factor=1.0,
                   experts=MLPExperts(num_experts=4, dim=DIM, hidden_dim=HIDDEN, out_dim=5))
    assert moe(torch.randn(2, 0, DIM)).hidden_states.shape == (2, 0, 5)


# --- Tests added from mutation testing (each kills mutants that survived the tests above) -----------------------

def test_router_z_loss_hand_computed_on_more_tokens_than_experts():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [math.log(7.0), 0.0]])
    # logsumexp over each token's experts: log 2, log 4, log 8 -> mean of squares (1 + 4 + 9) / 3 (log 2)^2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(14 / 3 * math.log(2.0) ** 2))


@pytest.mark.parametrize("experts_cls, kwargs", [
    (MLPExperts, dict(out_dim=8)),
    (GatedMLPExperts, {}),
], ids=["mlp", "gated"])
def test_expert_init_is_nn_linear_default_per_matrix(experts_cls, kwargs):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every weight and bias, fan_in = the matrix's input size."""
    torch.manual_seed(0)
    experts = experts_cls(num_experts=3, dim=DIM, hidden_dim=HIDDEN, **kwargs)
    for name, param in experts.named_parameters():
        fan_in = getattr(experts, name.removesuffix("_bias")).shape[-1]
        bound = 1 / math.sqrt(fan_in)
        assert param.abs().max() <= bound, name
        assert param.max() > 0.5 * bound and param.min() < -0.5 * bound, name  # spans the range, both signs


def test_experts_without_bias_have_no_bias_parameters_and_run():
    experts = MLPExperts(num_experts=2, dim=DIM, hidden_dim=HIDDEN, bias=False)
    assert sorted(name for name, _ in experts.named_parameters()) == ["down_proj", "up_proj"]
    x = torch.randn(3, DIM)
    expected = torch.nn.functional.linear(experts.act_fn(x @ experts.up_proj[1].T), experts.down_proj[1])
    torch.testing.assert_close(experts.expert_forward(1, x), expected)


@pytest.mark.parametrize("bias", [False, True])
def test_mlp_experts_from_dense_copy_bias_and_dtype(bias):
    dense = nn.Sequential(nn.Linear(DIM, HIDDEN, bias=bias), nn.GELU(), nn.Linear(HIDDEN, 8, bias=bias)).double()
    experts = MLPExperts.from_dense(dense, num_experts=2)
    assert all(p.dtype == torch.float64 for p in experts.parameters())
    x = torch.randn(4, DIM, dtype=torch.float64)
    torch.testing.assert_close(experts.expert_forward(1, x), dense(x))


def test_gated_experts_from_dense_keep_the_dense_dtype():
    mlp = LlamaMLP(LlamaConfig(hidden_size=DIM, intermediate_size=HIDDEN, num_attention_heads=4,
                                hidden_act="silu")).double()
    experts = GatedMLPExperts.from_dense(mlp, num_experts=2)
    assert all(p.dtype == torch.float64 for p in experts.parameters())
    x = torch.randn(4, DIM, dtype=torch.float64)
    torch.testing.assert_close(experts.expert_forward(0, x), mlp(x))


def test_from_dense_bias_mismatch_message():
    dense = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 8, bias=False))
    with pytest.raises(ValueError, match="^mlp's two Linear layers must both have a bias or both have none$"):
        MLPExperts.from_dense(dense, num_experts=2)


@pytest.mark.parametrize("build, name", [
    (lambda: MLPExperts(num_experts=2, dim=0, hidden_dim=HIDDEN), "dim"),
    (lambda: MLPExperts(num_experts=2, dim=DIM, hidden_dim=0), "hidden_dim"),
    (lambda: GatedMLPExperts(num_experts=0, dim=DIM, hidden_dim=HIDDEN), "num_experts"),
    (lambda: GatedMLPExperts(num_experts=2, dim=0, hidden_dim=HIDDEN), "dim"),
    (lambda: GatedMLPExperts(num_experts=2, dim=DIM, hidden_dim=0), "hidden_dim"),
    (lambda: TopKRouter(dim=0, num_experts=2, top_k=1), "dim"),
    (lambda: TopKRouter(dim=DIM, num_experts=0, top_k=1), "num_experts"),
    (lambda: TopKRouter(dim=DIM, num_experts=2, top_k=1, second_expert_policy="nope"), "second_expert_policy"),
])
def test_zero_sizes_and_bad_policies_name_the_argument(build, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        build()


def test_moe_layer_bad_settings_name_the_setting():
    experts = MLPExperts(num_experts=2, dim=DIM, hidden_dim=HIDDEN)
    router = lambda top_k=1: TopKRouter(dim=DIM, num_experts=2, top_k=top_k)  # noqa: E731
    cases = [(dict(capacity_factor=-1.0), "^capacity_factor must be > 0"),
             (dict(eval_capacity_factor=0.0), "^eval_capacity_factor must be > 0"),
             (dict(min_capacity=-1), "^min_capacity must be >= 0"),
             (dict(balance_count="all"), "^balance_count must be one of"),
             (dict(random_token_selection=True), "^random_token_selection is DeepSpeed's top-1 rule")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            MoELayer(router=router(top_k=2 if "random_token_selection" in kwargs else 1), experts=experts, **kwargs)


def test_expert_counts_are_integers_and_not_saved_in_the_state_dict():
    moe = MoELayer(router=TopKRouter(dim=DIM, num_experts=2, top_k=1),
                   experts=MLPExperts(num_experts=2, dim=DIM, hidden_dim=HIDDEN), capacity_factor=0.5)
    moe(torch.randn(6, DIM))
    assert moe.expert_token_counts.dtype == torch.long and moe.dropped_token_count.dtype == torch.long
    assert set(moe.state_dict()) == {"router.gate.weight", *(f"experts.{n}" for n, _ in moe.experts.named_parameters())}


def test_expert_load_of_a_single_assignment_is_one_hot():
    moe = MoELayer(router=TopKRouter(dim=DIM, num_experts=3, top_k=1),
                   experts=MLPExperts(num_experts=3, dim=DIM, hidden_dim=HIDDEN))
    out = moe(torch.randn(1, DIM))
    expected = torch.zeros(3, dtype=torch.float64)
    expected[out.router.indices[0, 0]] = 1.0
    torch.testing.assert_close(expert_load(moe), expected)


def test_router_weights_come_in_the_input_dtype():
    router = TopKRouter(dim=DIM, num_experts=4, top_k=2)
    out = router(torch.randn(3, DIM, dtype=torch.float64))
    assert out.weights.dtype == torch.float64 and out.logits.dtype == torch.float32


def test_router_noise_is_added_gaussian_times_std():
    router = TopKRouter(dim=DIM, num_experts=4, top_k=2, noise_std=0.5).train()
    x = torch.randn(5, DIM)
    torch.manual_seed(3)
    noisy = router(x).logits
    torch.manual_seed(3)
    torch.testing.assert_close(noisy, router.gate(x) + torch.randn(5, 4) * 0.5)


def test_router_gate_bias_and_custom_gate_modules_are_used():
    router = TopKRouter(dim=DIM, num_experts=4, top_k=2, bias=True)
    nn.init.normal_(router.gate.bias)
    x = torch.randn(5, DIM)
    torch.testing.assert_close(router(x).logits, router.gate(x))
    custom = TopKRouter(dim=DIM, num_experts=4, top_k=2)
    custom.gate = nn.Sequential(nn.Linear(DIM, 4), nn.Tanh())
    torch.testing.assert_close(custom(x).logits, custom.gate(x))


def test_gumbel_noise_equals_torch_distributions_gumbel_draws():
    from sparsevl.model.moe import gumbel_noise

    torch.manual_seed(5)
    ours = gumbel_noise((64, 8), torch.device("cpu"))
    torch.manual_seed(5)
    theirs = torch.distributions.Gumbel(0.0, 1.0).sample((64, 8))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("experts_cls", [MLPExperts, GatedMLPExperts])
@pytest.mark.parametrize("num_tokens, dropped", [(1, []), (1, [(0, 1)]), (1, [(0, 0), (0, 1)]), (2, []),
                                                 (5, [(0, 1), (3, 0), (4, 1)]), (5, "all")])
def test_decode_size_dispatch_equals_the_grouped_matmul(experts_cls, num_tokens, dropped):
    """The per-expert path of small calls (no sort) against the sorted grouped matmul, with and without drops."""
    torch.manual_seed(num_tokens)
    router = TopKRouter(dim=DIM, num_experts=4, top_k=2)
    experts = experts_cls(num_experts=4, dim=DIM, hidden_dim=HIDDEN)
    x = torch.randn(num_tokens, DIM, requires_grad=True)
    routing = router(x)
    kept = None if not dropped else torch.ones(num_tokens, 2, dtype=torch.bool)
    if dropped == "all":
        kept[:] = False
    for token, slot in dropped if dropped != "all" else []:
        kept[token, slot] = False
    small, small_counts = dispatch(x, routing, experts, kept, loop_max_assignments=10**6)
    grouped, grouped_counts = dispatch(x, routing, experts, kept, loop_max_assignments=0)
    torch.testing.assert_close(small, grouped, rtol=0, atol=1e-6)
    assert small_counts.tolist() == grouped_counts.tolist() == torch.bincount(
        routing.indices.flatten(), minlength=4).tolist()  # routed, drops included
    if kept is None:
        torch.testing.assert_close(small, dispatch_reference(x, routing, experts))
    weights = [x, router.gate.weight, *experts.parameters()]
    grad_out = torch.randn_like(small)

    def grads(out):  # no expert runs when all is dropped: its weights get no gradient, i.e. zero
        found = torch.autograd.grad((out * grad_out).sum(), weights, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for g, w in zip(found, weights)]

    for got, want in zip(grads(small), grads(grouped)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_dispatch_sorts_only_above_decode_sizes(monkeypatch):
    import sparsevl.model.moe as moe_module

    grouped_calls = []
    grouped = moe_module._grouped_experts
    monkeypatch.setattr(moe_module, "_grouped_experts", lambda *args: grouped_calls.append(1) or grouped(*args))
    router = TopKRouter(dim=DIM, num_experts=4, top_k=2)
    experts = GatedMLPExperts(num_experts=4, dim=DIM, hidden_dim=HIDDEN)
    for num_tokens in (1, 8):  # 2 and 16 routed assignments: LOOP_DISPATCH_MAX_ASSIGNMENTS is 16
        x = torch.randn(num_tokens, DIM)
        dispatch(x, router(x), experts)
    assert grouped_calls == []
    top1 = TopKRouter(dim=DIM, num_experts=4, top_k=1)
    dispatch(x[:1], top1(x[:1]), experts)  # a single assignment
    assert grouped_calls == []
    x = torch.randn(9, DIM)
    dispatch(x, router(x), experts)
    assert grouped_calls == [1]
    dispatch(x[:0], router(x[:0]), experts)  # no token: the grouped path, which handles empty groups
    assert grouped_calls == [1, 1]


@pytest.mark.parametrize("num_tokens, drop", [(1, False), (1, True), (5, True)])
def test_dispatch_keeps_the_experts_dtype_under_autocast(num_tokens, drop):
    """Under bf16 autocast the decode-size path's experts (F.linear) compute in bf16, and the layer returns bf16,
    dropped rows included (CPU autocast leaves grouped_mm in fp32: that path returns fp32)."""
    router = TopKRouter(dim=DIM, num_experts=4, top_k=2)
    experts = GatedMLPExperts(num_experts=4, dim=DIM, hidden_dim=HIDDEN)
    x = torch.randn(num_tokens, DIM)
    kept = torch.ones(num_tokens, 2, dtype=torch.bool)
    kept[0, 1] = not drop
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x)
        small, _ = dispatch(x, routing, experts, kept, loop_max_assignments=10**6)
        grouped, _ = dispatch(x, routing, experts, kept, loop_max_assignments=0)
    assert small.dtype == torch.bfloat16 and grouped.dtype == torch.float32
    torch.testing.assert_close(small, grouped.bfloat16(), rtol=0.05, atol=0.01)


def test_moe_losses_are_computed_once_and_only_when_asked(monkeypatch):
    import sparsevl.model.moe as moe_module

    calls = []
    losses = moe_module.router_losses
    monkeypatch.setattr(moe_module, "router_losses", lambda *args: calls.append(args) or losses(*args))
    router = TopKRouter(dim=DIM, num_experts=4, top_k=2)
    moe = MoELayer(router=router, experts=GatedMLPExperts(num_experts=4, dim=DIM, hidden_dim=HIDDEN),
                   balance_count="top1")
    out = moe(torch.randn(3, DIM))
    assert calls == []  # decoding never reads them
    first = out.losses
    assert out.losses is first and len(calls) == 1 and calls[0][1] == "top1"
    torch.testing.assert_close(first["balance"], load_balancing_loss(out.router.probs, out.router.indices, 4,
                                                                     count="top1"))
    torch.testing.assert_close(first["z"], router_z_loss(out.router.logits))


def test_expert_counts_stay_outside_autograd_in_training():
    moe = MoELayer(router=TopKRouter(dim=DIM, num_experts=4, top_k=2),
                   experts=GatedMLPExperts(num_experts=4, dim=DIM, hidden_dim=HIDDEN), capacity_factor=0.5).train()
    moe(torch.randn(8, DIM, requires_grad=True)).hidden_states.sum().backward()
    assert moe.expert_token_counts.grad_fn is None and not moe.expert_token_counts.requires_grad
    assert moe.expert_token_counts.sum().item() == 16 and moe.dropped_token_count.item() > 0
