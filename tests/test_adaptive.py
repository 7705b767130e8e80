"""Adaptive vision-layer selection: min-loss targets, gradient isolation, equivalence with a fixed layer, stats."""

import json
from types import SimpleNamespace

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, make_model, prompt_with_image, random_pixels, right_padded, train_flags

from sparsevl.config import ModelArguments, parse_train_args
from sparsevl.model.adaptive import SELECTION_STATS_HEADER, build_layer_selector, format_layer_stats, score_layers
from sparsevl.cli import main as cli_main
from sparsevl.model.build import build_image_processor, load_checkpoint, save_checkpoint
from sparsevl.model.vision import VisionTower
from sparsevl.model.vlm import IGNORE_INDEX, SparseVLM, causal_lm_loss
from sparsevl.train.layer_stats import LayerExplorationCallback, LayerSelectionStatsCallback


def _batch(num_samples: int = 4):
    rows = [prompt_with_image(6 + 2 * i, image_at=i % 3) for i in range(num_samples)]
    ids, mask = right_padded(rows)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    labels[:, :4] = IGNORE_INDEX  # the instruction part carries no labels
    labels[ids == IMAGE_TOKEN_ID] = IGNORE_INDEX
    return ids, mask, labels, random_pixels(num_samples)


def _adaptive(**overrides):
    values = {"use_adaptive_layer_selection": True, "top_k_layers": 4, "layer_classifier_use_text": True, **overrides}
    return make_model("tiny-llama", "tiny-clip", **values)[0]


def _fixed_view(model: SparseVLM, layer: int) -> SparseVLM:
    """The same weights read at one fixed vision layer (no selector)."""
    tower = VisionTower(encoder=model.vision_tower.encoder, select_layer=layer)
    return SparseVLM(vision_tower=tower, projector=model.projector, llm=model.llm, image_token_id=IMAGE_TOKEN_ID)


def _per_sample_losses(model, layers, ids, mask, labels, pixels) -> torch.Tensor:
    """Brute force: (samples, layers) LM loss of each sample alone at each fixed layer."""
    losses = torch.zeros(len(ids), len(layers))
    for j, layer in enumerate(layers):
        fixed = _fixed_view(model, layer)
        for i in range(len(ids)):
            keep = mask[i].bool()
            out = fixed(ids[i:i + 1, keep], mask[i:i + 1, keep], pixels[i:i + 1], labels[i:i + 1, keep])
            losses[i, j] = out.losses["lm"]
    return losses


def _classifier_logits(model: SparseVLM, ids, mask, labels, pixels) -> torch.Tensor:
    """(images, candidates) the layer classifier's logits, as the model computes them for this batch."""
    selector = model.layer_selector
    instruction = selector.instruction_per_image(model.llm.get_input_embeddings()(ids), ids, mask, labels,
                                                 image_token_id=IMAGE_TOKEN_ID)
    return selector.layer_logits(selector.candidate_features(model.vision_tower, pixels), instruction)


def _token_counts(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


@torch.no_grad()
def test_min_loss_target_equals_brute_force_over_all_layers():
    model = _adaptive(layer_lm_loss_from="best").train()
    ids, mask, labels, pixels = _batch()
    out = model(ids, mask, pixels, labels)
    layers = model.layer_selector.candidate_layers
    brute = _per_sample_losses(model, layers, ids, mask, labels, pixels)
    best = brute.argmin(dim=1)
    assert len(set(best.tolist())) > 1, "test data should make different layers win"
    features = model.layer_selector.candidate_features(model.vision_tower, pixels)  # (layers, images, ...)
    text_embeds = model.llm.get_input_embeddings()(ids)
    scored = score_layers(model, features, ids, mask, text_embeds, labels)  # one call of layers x batch rows
    torch.testing.assert_close(scored, brute.T, atol=1e-5, rtol=1e-5)
    assert out.selected_layers.tolist() == [layers[j] for j in best.tolist()]
    counts = _token_counts(labels).float()
    expected_lm = (brute.min(dim=1).values * counts).sum() / counts.sum()  # token mean over the winning rows
    torch.testing.assert_close(out.losses["lm"], expected_lm, atol=1e-5, rtol=1e-5)
    winner = _fixed_view(model, layers[best[0]])(ids[:1], mask[:1], pixels[:1], labels[:1]).logits[0]
    torch.testing.assert_close(out.logits[0, : len(winner)], winner, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_top_k_tries_the_classifier_top_k_and_picks_the_best_of_them():
    model = _adaptive(top_k_layers=2, layer_lm_loss_from="best").train()
    ids, mask, labels, pixels = _batch()
    selector = model.layer_selector
    logits = _classifier_logits(model, ids, mask, labels, pixels)
    top2 = logits.topk(2, dim=-1).indices  # (images, 2) candidate positions
    out = model(ids, mask, pixels, labels)
    brute = _per_sample_losses(model, selector.candidate_layers, ids, mask, labels, pixels)
    for i in range(len(ids)):
        tried = top2[i].tolist()
        expected = tried[int(brute[i, tried].argmin())]
        assert out.selected_layers[i] == selector.candidate_layers[expected]
    target = torch.tensor([selector.candidate_layers.index(int(layer)) for layer in out.selected_layers])
    torch.testing.assert_close(out.losses["layer_cls"], torch.nn.functional.cross_entropy(logits, target))


@pytest.mark.parametrize("lm_loss_from", ["classifier", "best", "all"])
def test_classifier_gets_gradients_only_from_its_own_loss(lm_loss_from):
    model = _adaptive(top_k_layers=3, layer_lm_loss_from=lm_loss_from).train()
    ids, mask, labels, pixels = _batch()
    out = model(ids, mask, pixels, labels)
    classifier = dict(model.layer_selector.named_parameters())
    others = {name: p for name, p in model.named_parameters() if not name.startswith("layer_selector.")}

    def grads(loss, params):
        found = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
        return {name: g for name, g in zip(params, found) if g is not None and g.abs().sum() > 0}

    assert not grads(out.losses["lm"], classifier)
    assert len(grads(out.losses["lm"], others)) > 0.9 * len(others)  # the LM loss trains the rest
    assert set(grads(out.losses["layer_cls"], classifier)) == set(classifier)
    assert not grads(out.losses["layer_cls"], others)


def _same_weights_pair():
    adaptive = _adaptive(candidate_layers=[-2], top_k_layers=1)
    fixed, _ = make_model("tiny-llama", "tiny-clip", mm_vision_select_layer=-2, seed=5)
    missing, unexpected = adaptive.load_state_dict(fixed.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("layer_selector.") for name in missing)
    return adaptive, fixed


def test_k1_with_one_fixed_layer_equals_the_non_adaptive_model():
    adaptive, fixed = _same_weights_pair()
    ids, mask, labels, pixels = _batch(3)
    with torch.no_grad():
        for mode in (True, False):  # training forward (k x batch path) and inference path
            adaptive.train(mode), fixed.train(mode)
            ours, theirs = adaptive(ids, mask, pixels, labels), fixed(ids, mask, pixels, labels)
            torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ours.losses["lm"], theirs.losses["lm"], atol=1e-6, rtol=1e-6)
            assert torch.equal(ours.inputs.labels, theirs.inputs.labels)
    adaptive.eval(), fixed.eval()
    generated = [m.generate(ids, mask, pixels, eos_token_id=1, max_new_tokens=4) for m in (adaptive, fixed)]
    assert generated[0] == generated[1]


@torch.no_grad()
def test_inference_reads_each_image_at_its_argmax_layer_and_counts_it():
    model = _adaptive().eval()
    last = model.layer_selector.classifier.mlp[-1]
    last.weight.mul_(50.0)  # let the image, not the bias, decide, so that samples differ
    ids, mask, labels, pixels = _batch()
    selector = model.layer_selector
    choice = _classifier_logits(model, ids, mask, None, pixels).argmax(-1)  # inference: no labels
    assert len(set(choice.tolist())) > 1
    selector.reset_counts()
    logits = model(ids, mask, pixels).logits
    for i, position in enumerate(choice.tolist()):
        keep = mask[i].bool()
        single = _fixed_view(model, selector.candidate_layers[position])(ids[i:i + 1, keep], mask[i:i + 1, keep],
                                                                         pixels[i:i + 1]).logits[0]
        torch.testing.assert_close(logits[i, : len(single)], single, atol=1e-5, rtol=1e-5)
    assert selector.selection_counts.tolist() == torch.bincount(choice, minlength=4).tolist()


def test_forcing_a_layer_equals_the_fixed_layer_model_and_ends_with_the_block():
    model = _adaptive().eval()
    ids, mask, _, pixels = _batch()
    selector = model.layer_selector
    chosen = model(ids, mask, pixels).logits
    with selector.forced(2):
        forced = model(ids, mask, pixels).logits
    torch.testing.assert_close(forced, _fixed_view(model, selector.candidate_layers[2])(ids, mask, pixels).logits)
    torch.testing.assert_close(model(ids, mask, pixels).logits, chosen)
    with pytest.raises(ValueError, match="candidate position 4 is not in 0..3"):
        with selector.forced(4):
            pass


def test_exploration_tries_every_layer_and_the_callback_switches_it_off():
    selector = _adaptive(top_k_layers=1).layer_selector
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(400, 1)
    assert set(selector.layers_to_try(logits).flatten().tolist()) == {1}
    callback = LayerExplorationCallback(selector, warmup_steps=2)
    callback.on_step_begin(None, SimpleNamespace(global_step=1), None)
    assert set(selector.layers_to_try(logits).flatten().tolist()) == {0, 1, 2, 3}
    callback.on_step_begin(None, SimpleNamespace(global_step=2), None)
    assert set(selector.layers_to_try(logits).flatten().tolist()) == {1}


def test_exploration_floor_keeps_a_share_of_images_on_random_layers_after_the_warmup():
    selector = _adaptive(top_k_layers=2).layer_selector
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(4000, 1)  # the classifier's order: 1, 3, 2, 0
    callback = LayerExplorationCallback(selector, warmup_steps=1, rate=0.4)
    callback.on_step_begin(None, SimpleNamespace(global_step=5), None)
    torch.manual_seed(0)
    tried = selector.layers_to_try(logits)  # (2, images)
    assert (tried[0] != tried[1]).all()
    off_top_k = (tried != torch.tensor([[1], [3]])).any(dim=0).float().mean().item()
    # An exploring image leaves the classifier's (1, 3) unless its random order starts 1, 3: 11 of 12 orders do.
    assert off_top_k == pytest.approx(0.4 * 11 / 12, abs=0.03)
    assert set(tried[0].tolist()) == {0, 1, 2, 3}
    callback.on_train_end(None, None, None)
    assert set(selector.layers_to_try(logits)[0].tolist()) == {1}


def test_exploration_rate_outside_0_1_is_an_argument_error():
    with pytest.raises(SystemExit, match="--layer_exploration_rate must be between 0 and 1, got 1.5"):
        parse_train_args(["--layer_exploration_rate", "1.5", "--output_dir", "unused"])


def test_stats_callback_tallies_epochs_and_resets():
    selector = _adaptive().layer_selector
    callback = LayerSelectionStatsCallback(selector)
    for epoch_choices in ([0, 3, 3], [1, 1]):
        callback.on_epoch_begin(None, None, None)
        selector._record(torch.tensor(epoch_choices))
        assert sum(callback.log_values(None).values()) == pytest.approx(1.0, abs=1e-3)
        callback.on_epoch_end(None, None, None)
    assert [sum(epoch.values()) for epoch in callback.epochs] == [3, 2]
    assert list(callback.totals().values()) == [1, 2, 0, 2]
    table = format_layer_stats(callback.totals())
    assert table.splitlines()[0] == SELECTION_STATS_HEADER
    assert "layer 2 (-3):  40.00% (2)" in table


@pytest.mark.slow
def test_adaptive_training_run_counts_every_sample_per_epoch(shapes_dir, shapes_tokenizer, tmp_path, capsys):
    num_samples = len(json.loads((shapes_dir / "finetune.json").read_text()))
    steps_per_epoch = -(-num_samples // 16)
    out = tmp_path / "run"
    from sparsevl.train.run import train

    train(*parse_train_args(train_flags(shapes_dir, shapes_tokenizer, out, max_steps=steps_per_epoch + 1,
                                        use_adaptive_layer_selection=True, top_k_layers=3,
                                        layer_classifier_loss_weight=0.1, layer_exploration_warmup_steps=2,
                                        logging_steps=2, save_steps=1000)))
    stats = json.loads((out / "layer_selection_stats.json").read_text())
    assert [sum(epoch.values()) for epoch in stats["per_epoch"]] == [num_samples, 16]  # reset per epoch
    assert sum(stats["total"].values()) == num_samples + 16
    assert (out / "layer_selection_stats.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert SELECTION_STATS_HEADER in printed and "layer 4 (-1):" in printed
    logs = [e for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]
    assert all("loss_layer_cls" in e and sum(v for k, v in e.items() if k.startswith("layer_share_")) ==
               pytest.approx(1.0, abs=1e-3) for e in logs)
    reloaded, args = load_checkpoint(out)  # the classifier is saved and rebuilt from the checkpoint
    assert args.use_adaptive_layer_selection and reloaded.layer_selector.candidate_layers == [1, 2, 3, 4]

    assert cli_main(["analyze", "layers", "--model", str(out), "--data", str(shapes_dir / "test_qa.json"),
                     "--out", str(tmp_path / "analysis"), "--limit", "12"]) == 0
    analysis = json.loads((tmp_path / "analysis" / "layer_analysis.json").read_text())
    questions = json.loads((shapes_dir / "test_qa.json").read_text())[:12]
    assert analysis["overall"]["count"] == 12 and sum(analysis["overall"]["layers"].values()) == 12
    for question_type, group in analysis["by_type"].items():
        expected = sum(q["question_type"] == question_type for q in questions)
        assert group["count"] == expected and sum(group["layers"].values()) == expected
    for group in [analysis["overall"], *analysis["by_type"].values()]:  # a perfect selector bounds every layer
        assert set(group["forced"]) == set(group["layers"])
        assert max(group["accuracy"], *group["forced"].values()) <= group["oracle"] <= 1.0
    assert (tmp_path / "analysis" / "layer_selection.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "=== Layer selection by question type ===" in printed
    assert "=== Accuracy with every image on one layer (this model) ===" in printed


def test_analyze_layers_refuses_a_fixed_layer_model(shapes_tokenizer, tmp_path, capsys):
    model, args = make_model("tiny-qwen3", "tiny-clip")
    save_checkpoint(model, tmp_path / "fixed", model_args=args, tokenizer=shapes_tokenizer,
                    image_processor=build_image_processor("tiny-clip", model.vision_tower.config))
    assert cli_main(["analyze", "layers", "--model", str(tmp_path / "fixed"), "--data", "unused.json"]) == 2
    assert "--model was not trained with --use_adaptive_layer_selection" in capsys.readouterr().err


def test_bad_adaptive_arguments_are_errors_naming_the_flag():
    with pytest.raises(ValueError, match="--top_k_layers 5 must be between 1 and the number of candidate layers"):
        _adaptive(top_k_layers=5)  # 4 layers by default
    with pytest.raises(ValueError, match="--top_k_layers 3 is larger than the 2 --candidate_layers"):
        ModelArguments(use_adaptive_layer_selection=True, candidate_layers=[-1, -2], top_k_layers=3)
    with pytest.raises(SystemExit, match="--top_k_layers 3 is larger than the 2 --candidate_layers"):
        parse_train_args(["--use_adaptive_layer_selection", "True", "--candidate_layers", "-1", "-2"])
    with pytest.raises(ValueError, match="--candidate_layers 7 is out of range .* 4 layers"):
        _adaptive(candidate_layers=[1, 7], top_k_layers=1)
    with pytest.raises(ValueError, match="--candidate_layers .* names the same layer twice"):
        _adaptive(candidate_layers=[-1, 4], top_k_layers=1)
    with pytest.raises(ValueError, match="--top_k_layers must be at least 1"):
        ModelArguments(top_k_layers=0)
    with pytest.raises(ValueError, match="--layer_lm_loss_from .worst. must be one of"):
        ModelArguments(layer_lm_loss_from="worst")
    with pytest.raises(SystemExit, match="--stage sparse_distill .* --layer_lm_loss_from all trains k copies"):
        parse_train_args(["--stage", "sparse_distill", "--use_adaptive_layer_selection", "True",
                          "--layer_lm_loss_from", "all", "--output_dir", "unused"])
    tower_without_states = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="--use_adaptive_layer_selection needs a vision tower that returns every "
                                         "layer's hidden states; Linear"):
        build_layer_selector(ModelArguments(use_adaptive_layer_selection=True), vision_tower=tower_without_states,
                             text_dim=8)


@pytest.mark.parametrize("lm_loss_from", ["classifier", "best", "all"])
def test_adaptive_composes_with_in_llm_pruning_and_refuses_cls_attention(lm_loss_from):
    from sparsevl.model.pruning import build_pruning_plan

    model = _adaptive(top_k_layers=2, layer_lm_loss_from=lm_loss_from).train()
    ids, mask, labels, pixels = _batch(2)
    model.pruning = build_pruning_plan(ModelArguments(token_pruner="fastv", fastv_k=1, fastv_ratio=0.5), model)
    out = model(ids, mask, pixels, labels)  # the trained inputs go through the pruning decoder loop
    assert set(out.losses) == {"lm", "layer_cls"} and out.kept_index is not None
    assert len(out.selected_layers) == 2 and len(out.logits) == (4 if lm_loss_from == "all" else 2)
    assert out.kept_mask.sum(1).max() < mask.sum(1).max() + model.num_projected_tokens  # visual tokens dropped
    model.pruning = build_pruning_plan(ModelArguments(token_pruner="cls_attention", retained_tokens="8"), model)
    with pytest.raises(ValueError, match="--token_pruner cls_attention .* --use_adaptive_layer_selection"):
        model.eval()(ids, mask, pixels)


@torch.no_grad()
def test_by_default_the_lm_trains_on_the_classifier_top_choice_and_the_classifier_on_the_best():
    model = _adaptive().train()
    model.layer_selector.classifier.mlp[-1].weight.mul_(50.0)  # let images pick different layers
    ids, mask, labels, pixels = _batch()
    selector = model.layer_selector
    logits = _classifier_logits(model, ids, mask, labels, pixels)
    top1 = logits.argmax(dim=-1)
    out = model(ids, mask, pixels, labels)
    assert out.selected_layers.tolist() == [selector.candidate_layers[j] for j in top1.tolist()]
    brute = _per_sample_losses(model, selector.candidate_layers, ids, mask, labels, pixels)
    counts = _token_counts(labels).float()
    expected_lm = (brute[torch.arange(len(ids)), top1] * counts).sum() / counts.sum()
    torch.testing.assert_close(out.losses["lm"], expected_lm, atol=1e-5, rtol=1e-5)
    best = brute.argmin(dim=1)
    assert not torch.equal(best, top1), "test data should make the classifier's choice differ from the best"
    torch.testing.assert_close(out.losses["layer_cls"], torch.nn.functional.cross_entropy(logits, best))


@torch.no_grad()
def test_lm_loss_from_all_trains_every_tried_layer_and_targets_the_best_of_them():
    model = _adaptive(top_k_layers=2, layer_lm_loss_from="all").train()
    model.layer_selector.classifier.mlp[-1].weight.mul_(50.0)  # let images try different layers
    ids, mask, labels, pixels = _batch()
    selector = model.layer_selector
    logits = _classifier_logits(model, ids, mask, labels, pixels)
    top2 = logits.topk(2, dim=-1).indices  # (images, 2) candidate positions
    selector.reset_counts()
    out = model(ids, mask, pixels, labels)
    brute = _per_sample_losses(model, selector.candidate_layers, ids, mask, labels, pixels)
    tried_losses = brute.gather(1, top2)  # (samples, 2)
    counts = _token_counts(labels).float()
    expected_lm = (tried_losses * counts[:, None]).sum() / (2 * counts.sum())  # token mean over both copies
    torch.testing.assert_close(out.losses["lm"], expected_lm, atol=1e-5, rtol=1e-5)
    best = top2.gather(1, tried_losses.argmin(dim=1, keepdim=True)).squeeze(1)
    assert len(set(best.tolist())) > 1 and len(set(top2[:, 0].tolist())) > 1
    assert out.selected_layers.tolist() == [selector.candidate_layers[j] for j in best.tolist()]
    torch.testing.assert_close(out.losses["layer_cls"], torch.nn.functional.cross_entropy(logits, best))
    assert selector.selection_counts.tolist() == torch.bincount(best, minlength=4).tolist()
    assert len(out.logits) == 2 * len(ids)


def test_trainer_weighs_the_lm_loss_over_k_copies_as_the_loss_of_one_batch(tmp_path):
    """With lm_loss_from="all" the LLM sees k copies of each sample; the global token count Trainer passes
    (num_items_in_batch) counts the batch once, so the lm term must not grow k-fold."""
    from sparsevl.train.trainer import SparseVLTrainer, labelled_tokens

    model = _adaptive(top_k_layers=3, layer_lm_loss_from="all").train()
    ids, mask, labels, pixels = _batch()
    training_args = parse_train_args(["--output_dir", str(tmp_path), "--report_to", "none"])[2]
    trainer = SparseVLTrainer(model=model, args=training_args, loss_weights={"lm": 1.0, "layer_cls": 0.1},
                              model_args=None)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this test does not run
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}
    with torch.no_grad():
        total = trainer.compute_loss(model, batch, num_items_in_batch=labelled_tokens(labels))
        out = model(**batch)
    assert len(out.inputs.labels) == 3 * len(ids)
    torch.testing.assert_close(total, out.losses["lm"] + 0.1 * out.losses["layer_cls"])


def test_adaptive_with_the_moe_projector_counts_experts_of_the_trained_pass_only():
    """The seed's combination: total loss terms lm, layer_cls and the projector's balance; scoring k layers
    routes k x the tokens through the experts, but expert usage counts only the pass that trains."""
    model = make_model("tiny-llama", "tiny-clip", "moe", use_adaptive_layer_selection=True, top_k_layers=3,
                       layer_classifier_use_text=True, mm_moe_num_experts=4, mm_moe_top_k=2)[0]
    model.train()
    ids, mask, labels, pixels = _batch(4)
    out = model(ids, mask, pixels, labels)
    assert {"lm", "layer_cls", "balance", "z"} <= set(out.losses)
    counts = model.projector.moe.expert_token_counts
    assert int(counts.sum()) == len(pixels) * model.num_image_tokens * 2  # images x tokens x top_k, once
    (out.losses["lm"] + 0.1 * out.losses["layer_cls"] + 0.01 * out.losses["balance"]).backward()
    assert model.projector.moe.router.gate.weight.grad.abs().sum() > 0
    assert all(m.track_stats for m in model.modules() if hasattr(m, "track_stats"))


def test_expert_stats_paused_restores_tracking():
    from sparsevl.model.moe import MoELayer, MLPExperts, TopKRouter, expert_stats_paused

    layer = MoELayer(router=TopKRouter(dim=8, num_experts=4, top_k=2),
                     experts=MLPExperts(num_experts=4, dim=8, hidden_dim=16))
    x = torch.randn(5, 8)
    with expert_stats_paused(layer):
        layer(x)
    assert int(layer.expert_token_counts.sum()) == 0 and layer.track_stats
    layer(x)
    assert int(layer.expert_token_counts.sum()) == 10


@pytest.mark.slow
def test_selection_learns_to_send_each_image_to_the_layer_that_holds_its_answer():
    """benchmarks/adaptive_specialised.py's made-up tower shows the answer at layer 1 for kind-0 images and at
    layer 2 for kind-1 images only. Adaptive training must learn that routing and answer both kinds, while the same
    model forced to one layer answers only that layer's kind."""
    from benchmarks.adaptive_specialised import build_variant, evaluate_variant, train_variant

    model = build_variant("classifier", seed=0)
    train_variant(model, steps=100, seed=0)
    adaptive = evaluate_variant(model, num_questions=400)
    assert adaptive["kind 0 layers"][1] > 0.9 and adaptive["kind 1 layers"][2] > 0.9, adaptive
    assert adaptive["overall"] > 0.95, adaptive
    selector = model.layer_selector
    with selector.forced(selector.candidate_layers.index(1)):
        layer_1 = evaluate_variant(model, num_questions=400)
    assert layer_1["kind 0"] > 0.95 and layer_1["kind 1"] < 0.7, layer_1
