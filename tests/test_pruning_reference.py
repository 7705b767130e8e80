"""Reference tests: each published pruner against a slow, obvious re-implementation of its paper's rule.

The references run one sample at a time, unpadded, through the LLM's own decoder layers with transformers'
eager attention, read the attention weights that layer returns (what `output_attentions=True` gives), apply
the published formula to the full weight matrix, and drop / merge tokens with plain Python lists. The fast
path (batched, padded, SDPA layers, only the needed score rows) must give the same kept tokens, recycled /
contextual tokens and logits, with and without the KV cache.
"""

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, make_model, prompt_with_image, random_pixels, right_padded

from sparsevl.model.decoder import causal_lm_parts, decoder_forward
from sparsevl.model.merging import dpc_knn_merge, visionzip_merge
from sparsevl.model.pruning import PruningPlan, PruningStep
from sparsevl.model.vision_pruning import visionzip_features

ROWS = [prompt_with_image(12, 1), prompt_with_image(5, 2), prompt_with_image(8, 0)]  # unequal lengths, batch 3
NEW_TOKENS = [[4, 9, 30], [8, 2, 7]]  # two decoding steps for the three rows


# ------------------------------------------------------------------------------------------ slow references
def eager_layer(layer, hidden, positions, rotary):
    """One decoder layer on (1, n, dim), eager attention: (output, head-averaged attention probabilities (n, n))."""
    captured = {}
    hook = layer.self_attn.register_forward_hook(lambda module, args, output: captured.update(weights=output[1]))
    n = hidden.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    try:
        out = layer(hidden, attention_mask=mask, position_embeddings=rotary(hidden, position_ids=positions),
                    position_ids=positions)
    finally:
        hook.remove()
    return out, captured["weights"][0].mean(0)


def reference_dpc_knn(x, k):
    """DPC-kNN written out: distances, densities, peak distances, centres, nearest-centre means."""
    x = x.detach()
    n, dim = x.shape
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1).sqrt() / dim ** 0.5
    density = [float(torch.exp(-(dist[i].sort().values[:k] ** 2).mean())) for i in range(n)]
    largest = float(dist.max())
    denser = [[density[j] > density[i] + 1e-6 or (abs(density[j] - density[i]) <= 1e-6 and j < i) for j in range(n)]
              for i in range(n)]  # near-equal densities: the earlier token is denser
    peak = [min([float(dist[i, j]) for j in range(n) if denser[i][j]] or [largest]) for i in range(n)]
    centres = sorted(range(n), key=lambda i: -peak[i] * density[i])[:k]
    groups = {c: [] for c in centres}
    for i in range(n):
        groups[i if i in groups else min(centres, key=lambda c: float(dist[i, c]))].append(i)
    return torch.stack([x[groups[c]].mean(0) for c in centres])


def reference_prune(llm, embeds, image, candidates, *, method, stages, recycle, num_prompt):
    """One unpadded sample (n, dim) through the LLM with the published rule; stages: {layer whose output is
    pruned: visual tokens kept}. Returns (the final tokens: original index or "c" for a cluster, clusters per
    stage, logits)."""
    decoder, head = causal_lm_parts(llm)
    tokens = [("t", i) for i in range(len(embeds))]  # ("t", original index) or ("c", stage, number)
    positions, hidden = list(range(len(embeds))), embeds[None]
    visual_ids = [i for i in range(len(embeds)) if image[i]]
    prompt_text = [i for i in candidates if i < num_prompt]
    if method == "sparsevlm":  # raters: relevance above the mean, from the input embeddings
        relevance = (embeds[visual_ids] @ embeds[prompt_text].T).softmax(1).mean(0)
        raters = [t for t, r in zip(prompt_text, relevance) if r > relevance.mean()]
    clusters_per_stage = []
    for i, layer in enumerate(decoder.layers):
        hidden, probs = eager_layer(layer, hidden, torch.tensor([positions]), decoder.rotary_emb)
        if i not in stages:
            continue
        is_visual = [t[0] == "c" or image[t[1]] for t in tokens]
        visual = [j for j, v in enumerate(is_visual) if v]
        rows = [tokens.index(("t", r)) for r in (raters if method == "sparsevlm" else prompt_text[-1:])]
        scores = probs[rows][:, visual].mean(0)  # averaged over raters (fastv: one row)
        keep = sorted(visual[j] for j in scores.topk(stages[i]).indices.tolist())
        dropped = [j for j in visual if j not in keep]
        clusters = None
        if recycle and dropped:
            drop_scores = torch.stack([scores[visual.index(j)] for j in dropped])
            pool = [dropped[j] for j in drop_scores.topk(int(len(dropped) * 0.3) + 1).indices.tolist()]
            clusters = reference_dpc_knn(hidden[0, pool], len(pool) // 10 + 1)
        clusters_per_stage.append(clusters)
        first, last = visual[0], visual[-1]
        order = list(range(first)) + keep + [None] * (0 if clusters is None else len(clusters)) + list(
            range(last + 1, len(tokens)))
        cluster_rows = iter(range(0 if clusters is None else len(clusters)))
        new_hidden, new_tokens, new_positions = [], [], []
        for j in order:
            if j is None:
                c = next(cluster_rows)
                new_hidden.append(clusters[c]), new_tokens.append(("c", i, c)), new_positions.append(positions[last])
            else:
                new_hidden.append(hidden[0, j]), new_tokens.append(tokens[j]), new_positions.append(positions[j])
        hidden, tokens, positions = torch.stack(new_hidden)[None], new_tokens, new_positions
    final = [t[1] if t[0] == "t" else "c" for t in tokens]
    return final, clusters_per_stage, head(decoder.norm(hidden))[0]


# ------------------------------------------------------------------------------------------ the tests
def merged_inputs(model, padding_side):
    ids, mask = right_padded(ROWS)
    inputs, _ = model.prepare_inputs(ids, mask, random_pixels(len(ROWS)), padding_side=padding_side)
    return ids, mask, inputs


def eager(model):
    model.llm.set_attn_implementation("eager")


PLANS = {  # name -> (plan, reference stages {layer whose output is pruned: kept}, recycle)
    "fastv": (PruningPlan("fastv", (PruningStep(2, 20),)), {1: 20}, False),
    "sparsevlm": (PruningPlan("sparsevlm", (PruningStep(1, 10), PruningStep(2, 6), PruningStep(3, 3)), recycle=True),
                  {0: 10, 1: 6, 2: 3}, True),
    "sparsevlm_no_recycling": (PruningPlan("sparsevlm", (PruningStep(1, 24), PruningStep(3, 8))), {0: 24, 2: 8},
                               False),
}


def fast_and_reference(llm, name, padding_side, new_tokens=()):
    """Fast path on the padded batch (+ cached decoding of `new_tokens`) and the reference per row."""
    model, _ = make_model(llm)
    plan, stages, recycle = PLANS[name]
    ids, mask, inputs = merged_inputs(model, padding_side)
    context = model.pruning_context(ids, mask, inputs)
    embeds, attention_mask, positions = inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids
    fast = decoder_forward(model.llm, embeds, attention_mask, positions, plan=plan, context=context,
                           use_cache=True, padding_side=padding_side)
    steps = []
    past = fast.past
    for token in new_tokens:
        step = model.llm.get_input_embeddings()(torch.tensor(token)[:, None])
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        embeds = torch.cat([embeds, step], 1)
        out = decoder_forward(model.llm, step, attention_mask, positions[:, -1:], past=past, use_cache=True)
        rerun = decoder_forward(model.llm, embeds, attention_mask, positions, plan=plan,
                                context=context.padded_to(embeds.shape[1]), padding_side=padding_side)
        past = out.past
        steps.append((out.logits[:, -1], rerun.logits[:, -1]))
    eager(model)
    references = []
    for row in range(len(ROWS)):
        real = inputs.attention_mask[row].bool()
        row_embeds = embeds[row][attention_mask[row].bool()]
        num_prompt = int(real.sum())
        image = inputs.image_mask[row][real].tolist() + [False] * (len(row_embeds) - num_prompt)
        candidates = context.rater_mask[row][real].nonzero().flatten().tolist()
        with torch.no_grad():
            references.append(reference_prune(model.llm, row_embeds, image, candidates, method=plan.pruner,
                                              stages=stages, recycle=recycle, num_prompt=num_prompt))
    offsets = [int((~inputs.attention_mask[row].bool()).sum()) if padding_side == "left" else 0
               for row in range(len(ROWS))]
    return model, inputs, fast, steps, references, offsets


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("llm", ["tiny-qwen3", "tiny-llama"])
def test_reference_in_llm_pruners_keep_recycle_and_predict_alike(llm, name, padding_side):
    model, inputs, fast, _, references, offsets = fast_and_reference(llm, name, padding_side)
    for row, (final, clusters, logits) in enumerate(references):
        real = fast.kept_mask[row] | fast.merged_mask[row]
        ours = ["c" if merged else int(i) - offsets[row]
                for i, merged in zip(fast.kept_index[row][real], fast.merged_mask[row][real])]
        assert ours == final  # the same survivors and recycled tokens, in the same order
        assert (final.count("c") > 0) == PLANS[name][2]
        torch.testing.assert_close(fast.logits[row][real], logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("llm", ["tiny-qwen3", "tiny-llama"])
def test_reference_decoding_with_and_without_cache_equals_the_reference_rerun(llm, name):
    _, _, _, steps, references, _ = fast_and_reference(llm, name, "left", NEW_TOKENS)
    final = torch.stack([logits[-1] for _, _, logits in references])  # prompt + both new tokens, per row
    cached, rerun = steps[-1]
    torch.testing.assert_close(cached, final, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rerun, final, atol=1e-5, rtol=1e-5)


def test_reference_recycled_tokens_are_the_dpc_knn_clusters():
    generator = torch.Generator().manual_seed(0)
    for n, k in ((45, 5), (17, 2), (120, 13)):
        points = torch.randn(n, 16, generator=generator) + torch.randint(0, 4, (n, 1), generator=generator) * 3.0
        torch.testing.assert_close(dpc_knn_merge(points, k), reference_dpc_knn(points, k), atol=1e-5, rtol=1e-5)


def test_reference_recycled_tokens_match_inside_the_model():
    """The clusters the fast path appends equal the reference's, computed from layer outputs (1e-5)."""
    model, inputs, fast, _, references, _ = fast_and_reference("tiny-qwen3", "sparsevlm", "right")
    captured = []
    from sparsevl.model import merging

    original = merging.dpc_knn_merge

    def spy(tokens, k):
        captured.append(original(tokens, k))
        return captured[-1]
    merging.dpc_knn_merge = spy
    try:
        plan = PLANS["sparsevlm"][0]
        ids, mask, inputs = merged_inputs(model, "right")
        model.llm.set_attn_implementation("sdpa")
        decoder_forward(model.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, plan=plan,
                        context=model.pruning_context(ids, mask, inputs))
    finally:
        merging.dpc_knn_merge = original
    expected = [c for stage in range(3) for _, clusters, _ in references for c in [clusters[stage]]]
    assert len(captured) == len(expected)
    for got, want in zip(captured, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ visionzip
def reference_visionzip(encoder, pixels, layer_index, dominant, contextual):
    """VisionZip from eager CLIP attention (output_attentions=True) and the layer's keys (a hook on k_proj)."""
    layers = getattr(encoder, "vision_model", encoder).encoder.layers
    keys = {}
    hook = layers[layer_index].self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.update(k=out))
    encoder.set_attn_implementation("eager")
    try:
        out = encoder(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
        encoder.set_attn_implementation("sdpa")
    hidden = out.hidden_states[layer_index + 1 if layer_index >= 0 else layer_index]  # that layer's output
    heads = encoder.config.num_attention_heads
    metric = keys["k"].view(*keys["k"].shape[:2], heads, -1).mean(2)  # keys averaged over heads
    cls_sum = out.attentions[layer_index][:, :, 0, 1:].sum(1)  # [CLS] row summed over heads
    results = []
    for image in range(len(pixels)):
        top = sorted((cls_sum[image].topk(dominant).indices + 1).tolist())
        dominant_ids = [0] + top
        rest = [t for t in range(hidden.shape[1]) if t not in dominant_ids]
        step = max(1, len(rest) // contextual)
        targets = rest[::step][:contextual]
        members = {t: [] for t in targets}
        for t in rest:
            if t in members:
                continue
            similarity = [float(torch.nn.functional.cosine_similarity(metric[image, t], metric[image, g], dim=0))
                          for g in targets]
            members[targets[similarity.index(max(similarity))]].append(t)
        merged = [hidden[image, g] + (hidden[image, members[g]].mean(0) if members[g] else 0) for g in targets]
        results.append(torch.cat([hidden[image, dominant_ids], torch.stack(merged)]))
    return torch.stack(results)


@pytest.mark.parametrize("llm", ["tiny-qwen3", "tiny-llama"])
def test_reference_visionzip_tokens_logits_and_decoding(llm):
    from sparsevl.model.pruning import build_pruning_plan, pruning_arguments

    model, _ = make_model(llm, "tiny-clip", mm_vision_select_layer=-2)
    model.pruning = build_pruning_plan(pruning_arguments("visionzip", dominant=10, contextual=6), model)
    assert model.num_image_tokens == 17
    pixels = random_pixels(len(ROWS))
    encoder = model.vision_tower.encoder
    with torch.no_grad():
        expected = reference_visionzip(encoder, pixels, -2, 10, 6)
        tokens, _ = visionzip_features(model.vision_tower, model.vision_tower.all_hidden_states(pixels), model.pruning)
        torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
        ids, mask = right_padded(ROWS)
        ours = model(ids, mask, pixels)
        text_embeds = model.llm.get_input_embeddings()(ids)
        reference_inputs = model.merge_inputs(ids, mask, text_embeds, model.projector(expected)[0])
        theirs = model.llm(inputs_embeds=reference_inputs.inputs_embeds, attention_mask=reference_inputs.attention_mask,
                           position_ids=reference_inputs.position_ids).logits
        real = reference_inputs.attention_mask.bool()
        torch.testing.assert_close(ours.logits[real], theirs[real], atol=1e-5, rtol=1e-5)
        cached = model.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=-1, use_cache=True)
        uncached = model.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=-1, use_cache=False)
    assert cached == uncached


def test_reference_visionzip_merge_by_hand():
    """Two images of 1 + 6 tokens, 2 dominant, 2 contextual: every number worked out on paper."""
    hidden = torch.arange(2 * 7 * 2, dtype=torch.float).view(2, 7, 2)
    cls_attention = torch.tensor([[0.1, 0.5, 0.0, 0.3, 0.05, 0.05], [0.4, 0.0, 0.0, 0.0, 0.0, 0.6]])
    keys = torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 0.1], [0, 1], [0, 0.9], [0.1, 1]]).expand(2, 7, 2)
    tokens, top = visionzip_merge(hidden, cls_attention, keys, dominant=2, contextual=2)
    assert top.tolist() == [[1, 3], [0, 5]]
    # image 0: dominant = [CLS], patches 1, 3 = tokens 0, 2, 4; rest = tokens 1, 3, 5, 6; targets 1, 5 (step 2)
    # token 3 (key [1, .1]) joins 1 (key [1, 0]); token 6 (key [.1, 1]) joins 5 (key [0, .9])
    h = hidden[0]
    assert torch.equal(tokens[0], torch.stack([h[0], h[2], h[4], h[1] + h[3], h[5] + h[6]]))
