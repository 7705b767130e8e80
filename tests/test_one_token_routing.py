"""One decode token through an MoE layer: the Python-decided routing and the in-place combine against the torch
ops every other call runs (the oracle: the same modules with grad enabled), to the last bit."""

import math

import pytest
import torch

import sparsevl.model.moe as moe_module
import sparsevl.model.one_token_routing as one_token
from sparsevl.model.moe import GatedMLPExperts, MLPExperts, MoELayer, TopKRouter, dispatch, dispatch_one_token
from sparsevl.model.one_token_routing import gumbel_argmax, route_one_token

DIM, HIDDEN = 16, 24


@pytest.fixture
def python_decisions(monkeypatch):
    """Counts route_one_token's answers: decided in Python, or None (left to torch)."""
    counts = {"decided": 0, "left to torch": 0}
    route = moe_module.route_one_token

    def counted(*args, **kwargs):
        picked = route(*args, **kwargs)
        counts["left to torch" if picked is None else "decided"] += 1
        return picked

    monkeypatch.setattr(moe_module, "route_one_token", counted)
    return counts


@pytest.mark.parametrize("policy, top_k", [("sampling", 2), ("argmax", 2), ("argmax", 1)])
@pytest.mark.parametrize("num_experts", [2, 4, 8])
@pytest.mark.parametrize("normalize", [True, False])
def test_one_token_routing_equals_the_torch_ops_to_the_last_bit(policy, top_k, num_experts, normalize,
                                                                python_decisions):
    torch.manual_seed(num_experts)
    router = TopKRouter(dim=DIM, num_experts=num_experts, top_k=top_k, normalize_top_k=normalize,
                        second_expert_policy=policy).eval()
    for scale in (0.1, 1.0, 30.0):  # flat to peaked probabilities
        for seed in range(60):
            x = torch.randn(1, DIM) * scale
            torch.manual_seed(seed)
            with torch.no_grad():
                fast = router(x)
            torch.manual_seed(seed)  # the same Gumbel draws
            oracle = router(x)  # grad enabled: the torch ops
            assert torch.equal(fast.indices, oracle.indices)
            assert torch.equal(fast.weights, oracle.weights.detach())
            assert fast.weights.dtype == oracle.weights.dtype and fast.indices.dtype == oracle.indices.dtype
            assert torch.equal(fast.probs, oracle.probs.detach()) and torch.equal(fast.logits, oracle.logits.detach())
    assert python_decisions["decided"] >= 0.98 * 180  # the fast path really ran


def test_one_token_routing_draws_the_generator_as_the_torch_ops_do():
    router = TopKRouter(dim=DIM, num_experts=8, top_k=2, second_expert_policy="sampling").eval()
    x = torch.randn(1, DIM)
    torch.manual_seed(3)
    with torch.no_grad():
        router(x)
    after_fast = torch.rand(4)
    torch.manual_seed(3)
    router(x)
    assert torch.equal(torch.rand(4), after_fast)


def test_python_uniform_rounding_equals_torch_fp32_ops():
    """u = tiny + U x span as torch's fp32 mul_/add_ give it: all later noise depends on these bits."""
    torch.manual_seed(0)
    draws = torch.rand(20000)
    draws[:4] = torch.tensor([0.0, 2.0**-24, 0.5, 1 - 2.0**-24])
    expected = draws.clone().mul_(one_token.UNIFORM_SPAN).add_(one_token.FLOAT32_TINY)
    assert one_token.gumbel_uniform(draws.tolist()).tolist() == expected.tolist()


def test_gumbel_close_calls_and_bad_numbers_are_left_to_torch():
    logits = [0.5, 0.25, 0.5, -1.0]
    uniform = [0.3, 0.9, 0.3, 0.1]  # experts 0 and 2 score exactly alike
    assert gumbel_argmax(logits, uniform, masked=1) is None
    nudged = [0.5, 0.25, 0.5 + 1e-7, -1.0]  # a lead far inside fp32 log error
    assert gumbel_argmax(nudged, uniform, masked=1) is None
    clear = [0.5, 0.25, 0.6, -1.0]
    for masked, expected in ((1, 2), (2, 1), (0, 1)):  # expert 1 draws the largest noise
        noisy = torch.tensor(clear) - moe_module._log_neg_log_(torch.tensor(uniform))  # the router's torch ops
        noisy[masked] = -math.inf
        assert gumbel_argmax(clear, uniform, masked=masked) == noisy.argmax().item() == expected
    assert gumbel_argmax([math.inf, 0.0, 0.0, 0.0], uniform, masked=1) is None
    assert gumbel_argmax([-math.inf, 0.0, 1.0, 0.0], uniform, masked=1) is None
    for probs in ([0.5, math.nan, 0.2], [math.nan, 0.5, 0.2]):  # torch.argmax takes NaN as the largest
        assert route_one_token(probs, None, None, top_k=1, normalize=True) is None
        assert route_one_token(probs, [0.0] * 3, [0.5] * 3, top_k=2, normalize=True) is None


def test_equal_probabilities_are_left_to_topk():
    """topk orders equal values as it likes: the Python path declines, the layer still returns torch's choice."""
    assert route_one_token([0.25] * 4, None, None, top_k=1, normalize=True) is None
    assert route_one_token([0.4, 0.2, 0.2, 0.2], None, None, top_k=2, normalize=True) is None
    assert route_one_token([0.4, 0.3, 0.2, 0.1], None, None, top_k=2, normalize=False) == ([0, 1], [0.4, 0.3])
    router = TopKRouter(dim=DIM, num_experts=4, top_k=2).eval()
    torch.nn.init.zeros_(router.gate.weight)
    x = torch.randn(1, DIM)
    with torch.no_grad():
        fast = router(x)
    assert torch.equal(fast.indices, router(x).indices)
    sampling = TopKRouter(dim=DIM, num_experts=4, top_k=2, second_expert_policy="sampling").eval()
    torch.nn.init.zeros_(sampling.gate.weight)  # equal first choices: argmax takes the first, as Python does
    torch.manual_seed(1)
    with torch.no_grad():
        fast = sampling(x)
    torch.manual_seed(1)
    assert torch.equal(fast.indices, sampling(x).indices) and fast.indices[0, 0] == 0


@pytest.mark.parametrize("experts_cls", [MLPExperts, GatedMLPExperts])
@pytest.mark.parametrize("top_k", [1, 2])
def test_one_token_dispatch_equals_dispatch_to_the_last_bit(experts_cls, top_k):
    torch.manual_seed(top_k)
    router = TopKRouter(dim=DIM, num_experts=4, top_k=top_k)
    experts = experts_cls(num_experts=4, dim=DIM, hidden_dim=HIDDEN)
    for _ in range(20):
        x = torch.randn(1, DIM)
        with torch.no_grad():
            routing = router(x)
            assert torch.equal(dispatch_one_token(x, routing, experts),
                               dispatch(x, routing, experts, loop_max_assignments=10**6)[0])
            torch.testing.assert_close(dispatch_one_token(x, routing, experts),
                                       dispatch(x, routing, experts, loop_max_assignments=0)[0], rtol=0, atol=1e-6)


def test_one_token_dispatch_under_autocast_rounds_the_weights_as_dispatch_does():
    router = TopKRouter(dim=DIM, num_experts=4, top_k=2)
    experts = GatedMLPExperts(num_experts=4, dim=DIM, hidden_dim=HIDDEN)
    x = torch.randn(1, DIM)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x)
        ours = dispatch_one_token(x, routing, experts)
        theirs, _ = dispatch(x, routing, experts, loop_max_assignments=10**6)
    assert routing.weights.dtype == torch.float32 and ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("policy", ["sampling", "argmax"])
def test_one_token_layer_equals_the_layer_with_grad_outputs_and_counts(policy, python_decisions):
    torch.manual_seed(0)
    router = TopKRouter(dim=DIM, num_experts=8, top_k=2, second_expert_policy=policy)
    shared = torch.nn.Linear(DIM, DIM)
    layer = MoELayer(router=router, experts=GatedMLPExperts(num_experts=8, dim=DIM, hidden_dim=HIDDEN),
                     shared_experts=shared, capacity_factor=1.5, eval_capacity_factor=0.5).eval()
    for seed in range(30):
        x = torch.randn(1, 1, DIM)  # (batch, tokens, dim) as the LLM's MLP gets it
        before = layer.expert_token_counts.clone()
        torch.manual_seed(seed)
        with torch.no_grad():
            fast = layer(x)
        after_fast = layer.expert_token_counts.clone()
        torch.manual_seed(seed)
        oracle = layer(x)
        assert torch.equal(fast.hidden_states, oracle.hidden_states.detach()) and fast.hidden_states.shape == x.shape
        assert torch.equal(fast.router.indices, oracle.router.indices) and fast.dropped_tokens == 0
        torch.testing.assert_close(fast.losses["balance"], oracle.losses["balance"].detach())
        step = torch.bincount(oracle.router.indices.flatten(), minlength=8)
        assert torch.equal(after_fast - before, step) and torch.equal(layer.expert_token_counts - after_fast, step)
    assert python_decisions["decided"] >= 28
    layer.track_stats = False
    before = layer.expert_token_counts.clone()
    with torch.no_grad():
        layer(torch.randn(1, DIM))
    assert torch.equal(layer.expert_token_counts, before)


def _layer_outputs_agree(layer, x, seed=0):
    """The one-token path (no grad) and the torch path (grad) give the same output for x (1, dim)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        fast = layer(x).hidden_states
    torch.manual_seed(seed)
    return torch.equal(fast, layer(x).hidden_states.detach())


def test_one_token_path_follows_changed_expert_weights():
    """Decode steps keep per-expert weight views; changed, replaced or converted weights must be the ones used."""
    import copy

    torch.manual_seed(0)
    layer = MoELayer(router=TopKRouter(dim=DIM, num_experts=4, top_k=2),
                     experts=GatedMLPExperts(num_experts=4, dim=DIM, hidden_dim=HIDDEN)).eval()
    x = torch.randn(1, DIM)
    assert _layer_outputs_agree(layer, x)
    with torch.no_grad():
        before = layer(x).hidden_states
        layer.experts.load_state_dict({name: 2 * w for name, w in layer.experts.state_dict().items()})  # in place
        assert not torch.equal(layer(x).hidden_states, before)
    assert _layer_outputs_agree(layer, x)
    layer.experts.up_proj = torch.nn.Parameter(torch.randn(4, HIDDEN, DIM))  # a new parameter
    assert _layer_outputs_agree(layer, x)
    copied = copy.deepcopy(layer)
    with torch.no_grad():
        copied.experts.down_proj.zero_()
        assert torch.equal(copied(x).hidden_states, torch.zeros(1, DIM))
    layer.double()
    assert "_weight_views" not in layer.experts.__dict__  # .to/.double drop the views of the old storage
    assert _layer_outputs_agree(layer, x.double())
    with torch.no_grad():
        assert layer(x.double()).hidden_states.dtype == torch.float64


def test_one_token_counts_are_read_through_the_attribute_and_reset():
    layer = MoELayer(router=TopKRouter(dim=DIM, num_experts=4, top_k=2),
                     experts=GatedMLPExperts(num_experts=4, dim=DIM, hidden_dim=HIDDEN)).eval()
    with torch.no_grad():
        routed = torch.cat([layer(torch.randn(1, DIM)).router.indices for _ in range(5)]).flatten()
        assert torch.equal(layer.expert_token_counts, torch.bincount(routed, minlength=4))
        layer(torch.randn(1, DIM))
        layer(torch.randn(3, DIM))  # a call of several tokens adds to the same counts
    assert layer.expert_token_counts.sum().item() == 5 * 2 + 2 + 3 * 2
    assert torch.equal(layer.routed_token_counts, layer.expert_token_counts)  # read: nothing left aside
    with torch.no_grad():
        layer(torch.randn(1, DIM))
    layer.reset_stats()  # also forgets one-token choices not yet read
    assert layer.expert_token_counts.sum().item() == 0
