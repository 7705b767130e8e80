"""Visual-token pruning: the decoder loop against transformers, pruners against eager-attention references,
pruned generation with and without cache, Q-Former, the alignment loss, and bad schedules."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from tiny import EOS_ID, IMAGE_TOKEN_ID, liven, make_model, prompt_with_image, random_pixels, right_padded
from transformers import DynamicCache

from sparsevl.model.cache_kwarg import cache_kwarg
from sparsevl.model.decoder import decoder_forward
from sparsevl.model.projectors import build_projector
from sparsevl.model.pruning import (PruningPlan, PruningStep, build_pruning_plan, pack_kept, pruning_arguments,
                                    recycle)
from sparsevl.model.pruning_cost import prefill_flops, tokens_per_layer
from sparsevl.train.distill import alignment_loss

ROWS = [prompt_with_image(12, 1), prompt_with_image(5, 2), prompt_with_image(8, 0)]  # unequal lengths


def merged(model, padding_side="right", rows=ROWS):
    ids, mask = right_padded(rows)
    pixels = random_pixels(len(rows))
    inputs, _ = model.prepare_inputs(ids, mask, pixels, padding_side=padding_side)
    return ids, mask, pixels, inputs


@pytest.mark.parametrize("llm", ["tiny-qwen3", "tiny-llama"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_decoder_loop_without_pruning_equals_transformers_forward(llm, padding_side):
    model, _ = make_model(llm)
    _, _, _, inputs = merged(model, padding_side)
    theirs = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                       position_ids=inputs.position_ids).logits
    ours = decoder_forward(model.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
    real = inputs.attention_mask.bool()
    torch.testing.assert_close(ours.logits[real], theirs[real], atol=1e-5, rtol=1e-5)
    assert ours.tokens_per_layer == [inputs.inputs_embeds.shape[1]] * 4


@pytest.mark.parametrize("llm", ["tiny-qwen3", "tiny-llama"])
def test_decoder_loop_with_cache_equals_transformers_cached_decoding(llm):
    model, _ = make_model(llm)
    _, _, _, inputs = merged(model, "left")
    cache = DynamicCache()
    mask, positions, embeds = inputs.attention_mask, inputs.position_ids, inputs.inputs_embeds
    theirs = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                       **cache_kwarg(model.llm, cache)).logits[:, -1]
    ours = decoder_forward(model.llm, embeds, mask, positions, use_cache=True, padding_side="left")
    torch.testing.assert_close(ours.logits[:, -1], theirs, atol=1e-5, rtol=1e-5)
    past = ours.past
    for token in ([5, 9, 30], [7, 7, 2]):
        step = model.llm.get_input_embeddings()(torch.tensor(token)[:, None])
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions[:, -1:] + 1
        theirs = model.llm(inputs_embeds=step, attention_mask=mask, position_ids=positions, use_cache=True,
                           **cache_kwarg(model.llm, cache)).logits[:, -1]
        ours = decoder_forward(model.llm, step, mask, positions, past=past, use_cache=True)
        past = ours.past
        torch.testing.assert_close(ours.logits[:, -1], theirs, atol=1e-5, rtol=1e-5)


def eager_attention(model, inputs, layer):
    """Attention probabilities (batch, heads, seq, seq) of decoder `layer` from transformers' eager attention."""
    model.llm.set_attn_implementation("eager")
    try:
        out = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                        position_ids=inputs.position_ids, output_attentions=True)
    finally:
        model.llm.set_attn_implementation("sdpa")
    return out.attentions[layer]


def reference_top_k(attention, context, row, num_kept):
    """sparsevlm_weighted's kept visual positions of one row, from its definition in sparsevl.model.pruning."""
    probs = attention[row].mean(0)  # (seq, seq), head-averaged
    visual = context.image_mask[row].nonzero().flatten()
    candidates = context.rater_mask[row].nonzero().flatten()
    to_vision = probs[candidates][:, visual]  # (raters, visual)
    scores = (to_vision.sum(-1, keepdim=True) * to_vision).sum(0)  # raters weighted by attention to vision
    return set(visual[scores.topk(num_kept).indices].tolist())


@pytest.mark.parametrize("pruner", ["sparsevlm_weighted"])
@pytest.mark.parametrize("llm", ["tiny-qwen3", "tiny-llama"])
def test_kept_tokens_are_the_top_k_of_eager_attention(pruner, llm):
    model, _ = make_model(llm)
    ids, mask, _, inputs = merged(model)
    context = model.pruning_context(ids, mask, inputs)
    layer, num_kept = 2, 10
    attention = eager_attention(model, inputs, layer)
    plan = PruningPlan(pruner, (PruningStep(layer, num_kept),))
    out = decoder_forward(model.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, plan=plan,
                          context=context)
    assert out.tokens_per_layer[:layer] == [inputs.inputs_embeds.shape[1]] * layer
    for row in range(len(ROWS)):
        kept = out.kept_index[row][out.kept_mask[row]]
        kept_visual = set(kept[inputs.image_mask[row, kept]].tolist())
        assert kept_visual == reference_top_k(attention, context, row, num_kept)
        text = (inputs.attention_mask[row].bool() & ~inputs.image_mask[row]).nonzero().flatten()
        assert set(text.tolist()) <= set(kept.tolist())  # text is never dropped


def test_kept_tokens_keep_their_original_position_ids():
    """Pruning before layer 0 must equal the plain LLM on the kept tokens at their original positions."""
    model, _ = make_model("tiny-qwen3")
    ids, mask, _, inputs = merged(model)
    plan = PruningPlan("sparsevlm_weighted", (PruningStep(0, 7),))
    out = decoder_forward(model.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, plan=plan,
                          context=model.pruning_context(ids, mask, inputs))
    for row in range(len(ROWS)):
        kept = out.kept_index[row][out.kept_mask[row]]
        assert int(inputs.image_mask[row, kept].sum()) == 7
        original_positions = inputs.position_ids[row, kept]
        assert not torch.equal(original_positions, torch.arange(len(kept)))  # a gap where tokens were dropped
        theirs = model.llm(inputs_embeds=inputs.inputs_embeds[row:row + 1, kept],
                           position_ids=original_positions[None]).logits[0]
        torch.testing.assert_close(out.logits[row][out.kept_mask[row]], theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pruner", ["sparsevlm", "fastv", "random"])
def test_pruned_generation_with_cache_equals_without(pruner):
    model, _ = make_model("tiny-qwen3")
    model.pruning = PruningPlan(pruner, (PruningStep(1, 24), PruningStep(3, 6)), seed=3)
    ids, mask = right_padded(ROWS)
    pixels = random_pixels(len(ROWS))
    runs = []
    for use_cache in (True, False):  # sampling makes the tokens vary, so equal tokens mean equal logits
        runs.append(model.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=EOS_ID, use_cache=use_cache,
                                   temperature=1.0, generator=torch.Generator().manual_seed(0)))
    assert runs[0] == runs[1]
    assert len({t for row in runs[0] for t in row}) > 3


def test_pruned_decoding_logits_with_cache_equal_a_full_rerun():
    model, _ = make_model("tiny-llama")
    ids, mask, _, inputs = merged(model, "left")
    plan = PruningPlan("sparsevlm", (PruningStep(1, 16), PruningStep(2, 4)))
    context = model.pruning_context(ids, mask, inputs)
    embeds, attn, positions = inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids
    prefill = decoder_forward(model.llm, embeds, attn, positions, plan=plan, context=context, use_cache=True,
                              padding_side="left")
    assert prefill.past.cache.get_seq_length(0) == embeds.shape[1]
    assert prefill.past.cache.get_seq_length(3) < prefill.past.cache.get_seq_length(1) < embeds.shape[1]
    step = model.llm.get_input_embeddings()(torch.tensor([[4], [8], [15]]))
    attn2 = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
    positions2 = torch.cat([positions, positions[:, -1:] + 1], 1)
    cached = decoder_forward(model.llm, step, attn2, positions2[:, -1:], past=prefill.past, use_cache=True)
    rerun = decoder_forward(model.llm, torch.cat([embeds, step], 1), attn2, positions2, plan=plan,
                            context=context.padded_to(embeds.shape[1] + 1), padding_side="left")
    torch.testing.assert_close(cached.logits[:, -1], rerun.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_keeping_every_visual_token_generates_like_the_unpruned_model():
    model, _ = make_model("tiny-qwen3")
    ids, mask = right_padded(ROWS)
    pixels = random_pixels(len(ROWS))
    kwargs = dict(max_new_tokens=5, eos_token_id=EOS_ID, temperature=1.0)
    plain = model.generate(ids, mask, pixels, generator=torch.Generator().manual_seed(1), **kwargs)
    model.pruning = PruningPlan("sparsevlm", (PruningStep(1, model.num_image_tokens),))
    assert model.generate(ids, mask, pixels, generator=torch.Generator().manual_seed(1), **kwargs) == plain


@pytest.mark.parametrize("pruner", ["sparsevlm", "sparsevlm_weighted", "fastv"])
def test_a_text_only_row_needs_no_raters_and_generates_as_unpruned(pruner):
    model, _ = make_model("tiny-qwen3")
    liven(model)
    ids, mask = right_padded([prompt_with_image(9, 1), [5, 6, 7, 8, 9, 10]])
    pixels = random_pixels(1)
    plain = model.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=EOS_ID)
    model.pruning = PruningPlan(pruner, (PruningStep(1, 8),))
    pruned = model.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=EOS_ID)
    assert pruned[1] == plain[1]


def test_training_forward_prunes_and_never_rates_with_answer_tokens():
    model, _ = make_model("tiny-qwen3")
    ids, mask = right_padded(ROWS)
    labels = torch.full_like(ids, -100)
    labels[0, 9:12], labels[1, 4] = ids[0, 9:12], ids[1, 4]  # answers at the end of two samples
    model.pruning = PruningPlan("sparsevlm", (PruningStep(2, 8),))
    out = model(ids, mask, random_pixels(3), labels=labels)
    context = model.pruning_context(ids, mask, out.inputs)
    assert not (context.rater_mask & (out.inputs.labels != -100)).any()
    assert (out.kept_mask.sum(1) == out.inputs.attention_mask.sum(1) - (model.num_image_tokens - 8)).all()
    assert out.logits.shape[1] == out.kept_index.shape[1] and torch.isfinite(out.losses["lm"])


def test_recycling_averages_each_group_into_its_center():
    hidden = torch.tensor([[[1.0, 0], [0, 1.0], [3.0, 0.1], [0.2, 5.0], [5.0, 0.2], [9.0, 9.0], [7.0, 0]]])
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6, 0.1, 0.5]])
    dropped = torch.tensor([[False, True, True, True, True, True, False]])  # 6 is kept, 0 is text
    out, centers = recycle(hidden, scores, dropped, torch.tensor([2]), pool_factor=2)
    assert centers[0].tolist() == [False, True, True, False, False, False, False]  # the two best dropped tokens
    torch.testing.assert_close(out[0, 1], (hidden[0, 1] + hidden[0, 3]) / 2)  # 3 points like 1
    torch.testing.assert_close(out[0, 2], (hidden[0, 2] + hidden[0, 4]) / 2)  # 4 points like 2
    assert torch.equal(out[0, [0, 3, 4, 5, 6]], hidden[0, [0, 3, 4, 5, 6]])  # 5 is outside the pool (2 x 2 best)


def test_recycling_pools_four_times_the_centers_by_default_and_each_row_alone():
    row = torch.tensor([[1.0, 0], [2.0, 0], [3.0, 0], [4.0, 0], [5.0, 0], [6.0, 0], [7.0, 0]])
    hidden = torch.stack([row, row])
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]]).expand(2, -1)
    dropped = torch.tensor([[False] + [True] * 6]).expand(2, -1)
    out, centers = recycle(hidden, scores, dropped, torch.tensor([0, 1]))
    assert not centers[0].any() and torch.equal(out[0], row)  # a row without centers is left as it was
    assert centers[1].tolist() == [False, True] + [False] * 5
    expected = row.clone()
    expected[1] = torch.tensor([(2.0 + 3 + 4 + 5) / 4, 0])  # the pool is the 4 x 1 best dropped tokens
    assert torch.equal(out[1], expected)


def test_recycling_joins_members_to_the_most_cosine_similar_center():
    # the member [30, 10] points like [1, 0] (cosine 0.95) though its dot product with [0, 10] is larger
    hidden = torch.tensor([[[1.0, 0], [0, 10.0], [30.0, 10.0]]])
    out, centers = recycle(hidden, torch.tensor([[0.9, 0.8, 0.1]]), torch.ones(1, 3, dtype=torch.bool),
                           torch.tensor([2]), pool_factor=2)
    assert centers[0].tolist() == [True, True, False]
    assert torch.equal(out[0], torch.tensor([[15.5, 5.0], [0, 10.0], [30.0, 10.0]]))
    out, _ = recycle(hidden[:, :2], torch.tensor([[0.9, 0.8]]), torch.ones(1, 2, dtype=torch.bool),
                     torch.tensor([2]))
    assert torch.equal(out, hidden[:, :2])  # every pooled token is a center: nothing joins them


def test_recycling_keeps_the_budget_and_changes_only_what_recycled_tokens_carry():
    model, _ = make_model("tiny-qwen3")
    ids, mask, _, inputs = merged(model)
    context = model.pruning_context(ids, mask, inputs)
    plans = [PruningPlan("sparsevlm_weighted", (PruningStep(1, 12),), num_recycled=n) for n in (0, 3)]
    outs = [decoder_forward(model.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, plan=plan,
                            context=context) for plan in plans]
    assert torch.equal(outs[0].kept_index, outs[1].kept_index)  # centers are the next-best tokens: same budget
    assert not torch.allclose(outs[0].logits, outs[1].logits)  # but they now carry their groups' mean


def test_cls_attention_keeps_the_top_k_of_clip_eager_attention():
    model, args = make_model("tiny-qwen3", "tiny-clip", mm_vision_select_layer=-2)
    args.token_pruner, args.retained_tokens = "cls_attention", "0.25"
    model.pruning = build_pruning_plan(args, model)
    assert model.num_image_tokens == 16
    assert build_pruning_plan(args, model) == model.pruning  # a plan already set does not change the next one
    pixels = random_pixels(2)
    encoder = model.vision_tower.encoder
    encoder.set_attn_implementation("eager")
    attentions = encoder(pixel_values=pixels, output_attentions=True).attentions
    encoder.set_attn_implementation("sdpa")
    reference = attentions[-2].mean(1)[:, 0, 1:].topk(16).indices.sort().values  # layer producing hidden_states[-2]
    features = model.vision_tower(pixels)
    embeds, _ = model.encode_images(pixels)
    expected = model.projector(features)[0].gather(1, reference[..., None].expand(-1, -1, embeds.shape[-1]))
    torch.testing.assert_close(embeds, expected)
    ids, mask = right_padded(ROWS[:2])
    assert int(model(ids, mask, pixels).inputs.image_mask.sum()) == 2 * 16


def test_qformer_output_shape_and_gradients_reach_queries_and_features():
    projector = build_projector("qformer", vision_dim=128, llm_dim=96, num_query_tokens=12)
    features = torch.randn(3, 64, 128, requires_grad=True)
    embeds, losses = projector(features)
    assert embeds.shape == (3, 12, 96) and losses == {} and projector.num_output_tokens == 12
    embeds.pow(2).mean().backward()
    assert projector.queries.grad.abs().sum() > 0 and features.grad.abs().sum() > 0
    model, _ = make_model("tiny-qwen3", projector="qformer", num_query_tokens=8)
    ids, mask = right_padded(ROWS)
    out = model(ids, mask, random_pixels(3))
    assert model.num_image_tokens == 8 and int(out.inputs.image_mask.sum()) == 3 * 8


def test_alignment_loss_equals_the_formula_on_kept_tokens():
    torch.manual_seed(0)
    teacher = torch.randn(2, 7, 4)
    kept_index = torch.tensor([[0, 2, 5, 6], [3, 4, 6, 0]])
    kept_mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    student = torch.randn(2, 4, 4)
    pairs = [(student[0, j], teacher[0, kept_index[0, j]]) for j in range(4)]
    pairs += [(student[1, j], teacher[1, kept_index[1, j]]) for j in range(3)]
    expected = sum(((s - t) ** 2).mean() for s, t in pairs) / len(pairs)
    torch.testing.assert_close(alignment_loss(student, kept_index, kept_mask, teacher), expected)


def test_pack_kept_orders_tokens_and_puts_fill_on_the_padding_side():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    index, valid = pack_kept(keep, "right")
    assert index[0].tolist() == [0, 2, 3] and valid.tolist() == [[True] * 3, [True, False, False]]
    assert index[1, 0] == 1
    index, valid = pack_kept(keep, "left")
    assert index[0].tolist() == [0, 2, 3] and index[1, -1] == 1 and valid[1].tolist() == [False, False, True]
    order = torch.tensor([[4, 3, 2, 1, 0], [4, 3, 2, 1, 0]])  # kept tokens listed by this order instead
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 1, 0]], dtype=torch.bool)
    index, valid = pack_kept(keep, "right", order)
    assert index[0].tolist() == [3, 2, 0] and index[1, :2].tolist() == [3, 1] and valid[1].tolist() == [1, 1, 0]
    index, valid = pack_kept(keep, "left", order)
    assert index[0].tolist() == [3, 2, 0] and index[1, 1:].tolist() == [3, 1] and valid[1].tolist() == [0, 1, 1]


def test_prefill_flops_follow_the_schedule():
    config = SimpleNamespace(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, vocab_size=100)
    plan = PruningPlan("sparsevlm", (PruningStep(1, 32), PruningStep(3, 8)))
    counts = tokens_per_layer(plan, num_layers=4, num_text=10, num_visual=64)
    assert counts == [74, 42, 42, 18]
    linear = 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128
    expected = sum(2 * n * linear + 2 * 2 * 64 * n * (n + 1) / 2 for n in counts) + 2 * 64 * 100
    assert prefill_flops(config, counts) == pytest.approx(expected)


def plan_args(token_pruner="sparsevlm", **values):
    return pruning_arguments(token_pruner, **values)


def test_schedules_resolve_counts_and_ratios():
    model, _ = make_model("tiny-qwen3")
    plan = build_pruning_plan(plan_args(pruning_layers="0,2", retained_tokens="0.5,8"), model)
    assert plan.steps == (PruningStep(1, 32), PruningStep(3, 8)) and plan.recycle  # outputs of layers 0 and 2
    plan = build_pruning_plan(plan_args(token_pruner="sparsevlm_weighted", pruning_layers="1,3",
                                        retained_tokens="0.5,8"), model)
    assert plan.steps == (PruningStep(1, 32), PruningStep(3, 8)) and not plan.recycle  # before layers 1 and 3
    assert build_pruning_plan(plan_args(token_pruner="fastv"), model).steps == (PruningStep(2, 32),)
    assert build_pruning_plan(plan_args(token_pruner="fastv", fastv_k=1, fastv_ratio=0.25), model).steps == (
        PruningStep(1, 48),)  # R is the fraction pruned: round(64 x 0.75) kept
    assert build_pruning_plan(plan_args(token_pruner="none"), model) is None


GIVE_EITHER = ("give either --fastv_k/--fastv_ratio, or --sparsevlm_budget, or --pruning_layers/--retained_tokens, "
               "not both")
VISIONZIP_NEEDS_BOTH = "--token_pruner visionzip needs --dominant and --contextual (the paper: 54+10, 108+20, 162+30)"
# each message in full, as the user reads it (a regex fragment would miss a garbled start or end)
BAD_SCHEDULES = [
    (dict(pruning_layers="0,2", retained_tokens="8,16"),
     "--retained_tokens [8, 16] must be strictly decreasing (each step keeps fewer tokens)"),
    (dict(pruning_layers="2,0", retained_tokens="16,8"), "--pruning_layers [2, 0] must be strictly increasing"),
    (dict(pruning_layers="0,2", retained_tokens="8,8"),
     "--retained_tokens [8, 8] must be strictly decreasing (each step keeps fewer tokens)"),
    (dict(token_pruner="random", pruning_layers="1,1", retained_tokens="16,8"),
     "--pruning_layers [1, 1] must be strictly increasing"),
    (dict(pruning_layers="1,3", retained_tokens="16,8"),
     "--pruning_layers: layer 3 is outside the LLM's 4 layers for --token_pruner sparsevlm (valid: 0..2)"),
    (dict(token_pruner="fastv", pruning_layers="0", retained_tokens="8"),
     "--pruning_layers: layer 0 is outside the LLM's 4 layers for --token_pruner fastv (valid: 1..3)"),
    (dict(token_pruner="random", pruning_layers="4", retained_tokens="8"),
     "--pruning_layers: layer 4 is outside the LLM's 4 layers for --token_pruner random (valid: 0..3)"),
    (dict(pruning_layers="1", retained_tokens="65"),
     "--retained_tokens: keeping 65 visual tokens per image is impossible: there are 64 per image "
     "(and at least 1 must stay)"),
    (dict(pruning_layers="1", retained_tokens="0"),
     "--retained_tokens: keeping 0 visual tokens per image is impossible: there are 64 per image "
     "(and at least 1 must stay)"),
    (dict(pruning_layers="1", retained_tokens="1.5"),
     "--retained_tokens: 1.5 is neither a whole count nor a ratio in (0, 1)"),
    (dict(pruning_layers="1,2", retained_tokens="16"), "--pruning_layers has 2 values but --retained_tokens has 1"),
    (dict(pruning_layers="1"),
     "--token_pruner sparsevlm needs --pruning_layers and --retained_tokens (or --sparsevlm_budget)"),
    (dict(token_pruner="sparsevlm_weighted", retained_tokens="4"),
     "--token_pruner sparsevlm_weighted needs --pruning_layers and --retained_tokens"),
    (dict(token_pruner="random"), "--token_pruner random needs --pruning_layers and --retained_tokens"),
    (dict(token_pruner="fastv", pruning_layers="2"),
     "--token_pruner fastv needs --pruning_layers and --retained_tokens"),
    (dict(pruning_layers="1,x", retained_tokens="4"), "--pruning_layers '1,x': expected comma-separated numbers"),
    (dict(pruning_layers="1", retained_tokens="x"), "--retained_tokens 'x': expected comma-separated numbers"),
    (dict(token_pruner="magic"), "--token_pruner 'magic' is unknown; choose from: none, sparsevlm, "
                                 "sparsevlm_weighted, fastv, random, cls_attention, visionzip"),
    (dict(token_pruner="none", retained_tokens="8"),
     "--retained_tokens applies to --token_pruner sparsevlm or sparsevlm_weighted or fastv or random or cls_attention, "
     "not none"),
    (dict(token_pruner="cls_attention", pruning_layers="1", retained_tokens="8"),
     "--pruning_layers applies to --token_pruner sparsevlm or sparsevlm_weighted or fastv or random, "
     "not cls_attention"),
    (dict(fastv_k=2), "--fastv_k applies to --token_pruner fastv, not sparsevlm"),
    (dict(fastv_ratio=0.5), "--fastv_ratio applies to --token_pruner fastv, not sparsevlm"),
    (dict(num_recycled_tokens=2, pruning_layers="1", retained_tokens="4"),
     "--num_recycled_tokens applies to --token_pruner sparsevlm_weighted, not sparsevlm"),
    (dict(token_pruner="sparsevlm_weighted", pruning_layers="1", retained_tokens="4", num_recycled_tokens=4),
     "--num_recycled_tokens 4 must be fewer than the smallest --retained_tokens count (4)"),
    (dict(sparsevlm_budget=100), "--sparsevlm_budget 100: choose from [64, 128, 192] (the paper's budgets)"),
    (dict(token_pruner="fastv", sparsevlm_budget=64), "--sparsevlm_budget applies to --token_pruner sparsevlm, "
                                                      "not fastv"),
    (dict(sparsevlm_budget=64, pruning_layers="1", retained_tokens="4"),
     GIVE_EITHER),
    (dict(token_pruner="fastv", fastv_k=2, retained_tokens="4"),
     GIVE_EITHER),
    (dict(token_pruner="fastv", fastv_ratio=0.5, pruning_layers="2"),
     GIVE_EITHER),
    (dict(sparsevlm_recycling="yes", pruning_layers="1", retained_tokens="4"),
     "--sparsevlm_recycling 'yes': choose on or off"),
    (dict(token_pruner="fastv", sparsevlm_recycling="off"),
     "--sparsevlm_recycling applies to --token_pruner sparsevlm, not fastv"),
    (dict(token_pruner="fastv", fastv_ratio=1.0), "--fastv_ratio 1.0 must be in [0, 1) (R: the fraction of visual "
                                                  "tokens pruned)"),
    (dict(token_pruner="fastv", fastv_ratio=-0.1), "--fastv_ratio -0.1 must be in [0, 1) (R: the fraction of visual "
                                                   "tokens pruned)"),
    (dict(token_pruner="visionzip", dominant=8),
     VISIONZIP_NEEDS_BOTH),
    (dict(token_pruner="visionzip", contextual=8),
     VISIONZIP_NEEDS_BOTH),
    (dict(token_pruner="visionzip", dominant=60, contextual=4),
     "--dominant 60 --contextual 4: need both >= 1 and dominant + contextual < the tower's 64 patches"),
    (dict(token_pruner="visionzip", dominant=0, contextual=4),
     "--dominant 0 --contextual 4: need both >= 1 and dominant + contextual < the tower's 64 patches"),
    (dict(token_pruner="visionzip", dominant=4, contextual=0),
     "--dominant 4 --contextual 0: need both >= 1 and dominant + contextual < the tower's 64 patches"),
    (dict(token_pruner="random", dominant=6), "--dominant applies to --token_pruner visionzip, not random"),
    (dict(token_pruner="random", contextual=6), "--contextual applies to --token_pruner visionzip, not random"),
    (dict(token_pruner="cls_attention", retained_tokens="8,4"),
     "--token_pruner cls_attention prunes once, before the LLM: give one --retained_tokens value"),
    (dict(token_pruner="cls_attention", retained_tokens="a"),
     "--retained_tokens 'a': expected comma-separated numbers"),
    (dict(token_pruner="cls_attention", retained_tokens="65"),
     "--retained_tokens: keeping 65 visual tokens per image is impossible: there are 64 per image "
     "(and at least 1 must stay)"),
]


def test_bad_schedules_are_clear_errors():
    model, _ = make_model("tiny-qwen3")
    for values, message in BAD_SCHEDULES:
        with pytest.raises(ValueError) as error:
            build_pruning_plan(plan_args(**values), model)
        assert str(error.value) == message, values


def test_schedule_limits_are_accepted():
    """The edges of each range are valid (an off-by-one in a check would refuse them)."""
    model, _ = make_model("tiny-qwen3")
    assert build_pruning_plan(plan_args(token_pruner="visionzip", dominant=62, contextual=1), model) == PruningPlan(
        pruner="visionzip", dominant=62, contextual=1)
    assert build_pruning_plan(plan_args(token_pruner="visionzip", dominant=1, contextual=1), model) == PruningPlan(
        pruner="visionzip", dominant=1, contextual=1)
    assert build_pruning_plan(plan_args(token_pruner="fastv", fastv_ratio=0.0), model).steps == (PruningStep(2, 64),)
    assert build_pruning_plan(plan_args(token_pruner="fastv", fastv_ratio=0.99), model).steps == (PruningStep(2, 1),)
    assert build_pruning_plan(plan_args(pruning_layers="0, 2", retained_tokens="64, 1"), model).steps == (
        PruningStep(1, 64), PruningStep(3, 1))
    assert build_pruning_plan(plan_args(token_pruner="fastv", pruning_layers="1,3", retained_tokens="2,1"),
                              model).steps == (PruningStep(1, 2), PruningStep(3, 1))
    assert build_pruning_plan(plan_args(token_pruner="random", pruning_layers="0", retained_tokens="0.25"),
                              model).steps == (PruningStep(0, 16),)
    plan = build_pruning_plan(plan_args(token_pruner="sparsevlm_weighted", pruning_layers="1", retained_tokens="4",
                                        num_recycled_tokens=3), model)
    assert plan.num_recycled == 3 and not plan.recycle
    assert not build_pruning_plan(plan_args(pruning_layers="1", retained_tokens="4", sparsevlm_recycling="off"),
                                  model).recycle
    assert build_pruning_plan(plan_args(pruning_layers="1", retained_tokens="4", sparsevlm_recycling="on"),
                              model).recycle
    assert build_pruning_plan(plan_args(token_pruner="cls_attention", retained_tokens="8"), model) == PruningPlan(
        pruner="cls_attention", num_kept_patches=8)


def test_before_llm_pruners_name_what_the_model_lacks():
    model, _ = make_model("tiny-qwen3", "tiny-siglip")
    with pytest.raises(ValueError) as error:
        build_pruning_plan(plan_args(token_pruner="cls_attention", retained_tokens="8"), model)
    assert str(error.value) == "--token_pruner cls_attention needs a CLIP vision tower (it has a [CLS] token)"
    model, _ = make_model("tiny-qwen3", projector="qformer")
    with pytest.raises(ValueError) as error:
        build_pruning_plan(plan_args(token_pruner="visionzip", dominant=4, contextual=2), model)
    assert str(error.value) == "--token_pruner visionzip needs a token-wise projector (not qformer)"
    model, _ = make_model("tiny-qwen3", mm_vision_select_layer=0)
    with pytest.raises(ValueError) as error:
        build_pruning_plan(plan_args(token_pruner="cls_attention", retained_tokens="8"), model)
    assert str(error.value) == "--token_pruner cls_attention needs --mm_vision_select_layer after at least one layer"
    for embeddings in (0, -5):  # the 4-layer tower's input embeddings, counted from either end
        model, _ = make_model("tiny-qwen3", mm_vision_select_layer=embeddings)
        with pytest.raises(ValueError, match="needs --mm_vision_select_layer after at least one layer"):
            build_pruning_plan(plan_args(token_pruner="visionzip", dominant=4, contextual=2), model)
    for after_one in (1, -4):
        model, _ = make_model("tiny-qwen3", mm_vision_select_layer=after_one)
        assert build_pruning_plan(plan_args(token_pruner="visionzip", dominant=4, contextual=2), model) == (
            PruningPlan(pruner="visionzip", dominant=4, contextual=2))
    model, _ = make_model("tiny-qwen3", mm_vision_select_feature="cls_patch")
    with pytest.raises(ValueError) as error:
        build_pruning_plan(plan_args(token_pruner="cls_attention", retained_tokens="8"), model)
    assert str(error.value) == "--token_pruner cls_attention needs --mm_vision_select_feature patch"


@pytest.mark.parametrize("pruner", ["sparsevlm", "sparsevlm_weighted", "fastv"])
def test_prompt_without_text_after_the_image_is_a_clear_error(pruner):
    model, _ = make_model("tiny-qwen3")
    model.pruning = PruningPlan(pruner, (PruningStep(1, 8),))
    ids, mask = right_padded([[5, 6, IMAGE_TOKEN_ID], prompt_with_image(6, 1)])
    with pytest.raises(ValueError) as error:
        model.generate(ids, mask, random_pixels(2), max_new_tokens=2, eos_token_id=EOS_ID)
    assert str(error.value) == (f"--token_pruner {pruner}: sample(s) [0] have an image but no instruction text after "
                                "it to rate visual tokens; use --token_pruner random or cls_attention for such prompts")
    model.pruning = PruningPlan("random", (PruningStep(1, 8),))  # the documented way out
    assert len(model.generate(ids, mask, random_pixels(2), max_new_tokens=2, eos_token_id=EOS_ID)) == 2


def test_sparsevlm_budget_is_the_paper_table_at_its_shape_and_scales_to_others():
    from sparsevl.model.pruning import sparsevlm_schedule

    paper = {192: [300, 200, 110], 128: [303, 110, 36], 64: [66, 30, 17]}
    for budget, counts in paper.items():
        assert sparsevlm_schedule(budget, num_layers=32, num_visual=576) == ([2, 6, 15], counts)
    assert sparsevlm_schedule(192, num_layers=28, num_visual=576) == ([2, 5, 13], [300, 200, 110])
    assert sparsevlm_schedule(64, num_layers=4, num_visual=64) == ([0, 1, 2], [7, 3, 2])
    assert sparsevlm_schedule(192, num_layers=4, num_visual=5) == ([0, 1, 2], [3, 2, 1])
    with pytest.raises(ValueError) as error:
        sparsevlm_schedule(64, num_layers=3, num_visual=64)
    assert str(error.value) == ("--sparsevlm_budget 64: a model with 3 LLM layers and 64 visual tokens is too small "
                                "for three stages (layers [0, 1, 2] must end before the last one, kept tokens "
                                "[7, 3, 2] must decrease)")
    with pytest.raises(ValueError, match=r"kept tokens \[2, 1, 1\] must decrease"):  # 110 x 4 / 576 rounds to 1
        sparsevlm_schedule(192, num_layers=4, num_visual=4)
    with pytest.raises(ValueError, match=r"kept tokens \[2, 1, 0\] must decrease"):  # 17 x 16 / 576 rounds to 0
        sparsevlm_schedule(64, num_layers=4, num_visual=16)


def test_equivalent_tokens_count_recycled_tokens_like_the_paper():
    from sparsevl.model.pruning_cost import equivalent_tokens, recycled_count

    plan = PruningPlan("sparsevlm", (PruningStep(3, 300), PruningStep(7, 200), PruningStep(16, 110)), recycle=True)
    # 276 dropped -> 83 pooled -> 9 clusters; then 109 of 309 -> 33 -> 4; then 94 of 204 -> 29 -> 3
    assert [recycled_count(n) for n in (276, 109, 94)] == [9, 4, 3]
    cost = equivalent_tokens(plan, num_layers=32, num_visual=576)
    assert cost["avg_visual_tokens_per_layer"] == (3 * 576 + 4 * 309 + 9 * 204 + 16 * 113) / 32
    assert cost["visual_tokens_into_llm"] == 576


def test_random_scores_reach_positions_beyond_the_table():
    from sparsevl.model.pruning import RANDOM_TABLE_SIZE, random_scores

    plan = PruningPlan("random", (PruningStep(1, 8),))
    positions = torch.tensor([[0, 5, RANDOM_TABLE_SIZE + 900], [1, 2, 3]])
    scores = random_scores(None, None, None, positions, plan)
    assert scores.shape == (2, 3) and ((scores >= 0) & (scores < 1)).all()
    assert torch.equal(random_scores(None, None, None, positions, plan), scores)  # seeded: reruns rank alike
    assert not torch.equal(random_scores(None, None, None, positions, replace(plan, seed=plan.seed + 1)), scores)


def test_pruning_arguments_name_unknown_flags():
    with pytest.raises(ValueError) as error:
        pruning_arguments("fastv", fastv_x=1, budget=2)
    assert str(error.value) == ("unknown pruning flag(s) ['budget', 'fastv_x']; known: ['contextual', 'dominant', "
                                "'fastv_k', 'fastv_ratio', 'num_recycled_tokens', 'pruning_layers', 'retained_tokens', "
                                "'sparsevlm_budget', 'sparsevlm_recycling', 'token_pruner']")


def test_attention_scoring_names_a_layer_without_rotary_embeddings():
    from sparsevl.model.pruning import _rotary_function

    with pytest.raises(ValueError) as error:
        _rotary_function(torch.nn.Linear(1, 1))
    assert str(error.value) == "Linear: no apply_rotary_pos_emb in its module; cannot score attention"


def test_sparsevlm_rates_an_image_of_a_single_token():
    model, _ = make_model("tiny-qwen3", projector="qformer", num_query_tokens=1)
    model.pruning = PruningPlan("sparsevlm", (PruningStep(1, 1),))
    ids, mask = right_padded([prompt_with_image(7, 1)])
    assert len(model.generate(ids, mask, random_pixels(1), max_new_tokens=2, eos_token_id=EOS_ID)[0]) == 2


def test_sparsevlm_raters_are_the_instruction_tokens_most_relevant_to_the_image():
    from sparsevl.model.pruning import PruningContext, choose_raters

    # columns: a token before the image, the image token, two instruction tokens
    embeds = torch.tensor([[[0.0, 10], [1, 0], [1, 0], [0, 1]],  # relevance softmax([1, 0]): the first rates
                           [[0.0, 10], [9, 9], [1, 0], [0, 1]],  # no image in this row: nobody rates
                           [[0.0, 10], [1, 0], [0, 1], [0, 1]]])  # equal relevance: all of them rate
    image = torch.tensor([[False, True, False, False], [False, False, False, False], [False, True, False, False]])
    text = torch.tensor([[False, False, True, True]] * 3)
    context = PruningContext(image, text, image.sum(1))
    chosen = choose_raters(embeds, context, torch.ones(3, 4, dtype=torch.bool)).rater_mask
    assert chosen.tolist() == [[False, False, True, False], [False] * 4, [False, False, True, True]]


def test_top_visual_breaks_ties_by_position():
    from sparsevl.model.pruning import top_visual

    visual = torch.ones(1, 40, dtype=torch.bool)
    visual[0, 0] = False
    kept = top_visual(torch.zeros(1, 40), visual, torch.tensor([2]))
    assert kept[0].nonzero().flatten().tolist() == [1, 2]
