"""Activation (gradient) checkpointing: same loss and gradients as without, fewer saved activations, every stage."""

import json

import pytest
import torch
from benchmarks.common import SavedActivations
from tiny import IMAGE_TOKEN_ID, make_model, prompt_with_image, random_pixels, right_padded, train_flags

from sparsevl.cli import main as cli_main
from sparsevl.model.build import configure_trainable
from sparsevl.model.moe import MoELayer
from sparsevl.model.pruning import build_pruning_plan
from sparsevl.model.vlm import IGNORE_INDEX
from sparsevl.train.distill import alignment_loss, make_teacher

STAGES = {  # name -> model flags; every stage's model, built as `sparsevl train` builds it
    "full": {"unfreeze_mm_vision_tower": True},
    "lora": {"lora_enable": True, "lora_r": 8, "lora_dropout": 0.1},
    "moe_llm": {"moe_enable": True, "num_experts": 4, "top_k_experts": 2},
    "moe_projector": {"projector": "moe", "mm_moe_num_experts": 4},
    "pruning": {"token_pruner": "sparsevlm", "pruning_layers": "1,2", "retained_tokens": "32,16"},
    "adaptive": {"use_adaptive_layer_selection": True, "top_k_layers": 3, "layer_classifier_use_text": True},
}


def _batch():
    rows = [prompt_with_image(8 + 3 * i, image_at=1) for i in range(3)]
    ids, mask = right_padded(rows)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    labels[:, :5] = IGNORE_INDEX  # instruction text after the image rates visual tokens
    return ids, mask, random_pixels(3), labels  # SparseVLM.forward order


def _model(flags: dict):
    model, args = make_model("tiny-llama", "tiny-clip", **flags)
    model.pruning = build_pruning_plan(args, model)
    configure_trainable(model, args)
    return model.train(), args


def _step(model, batch, teacher=None) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(total loss, gradients by name, bytes of activations autograd kept outside checkpointed layers)."""
    model.zero_grad()
    torch.manual_seed(7)  # LoRA dropout, router noise, exploration draw the same numbers in both runs
    with SavedActivations(model) as saved:
        out = model(*batch, return_hidden_states=teacher is not None)
        total = sum(out.losses.values())
        if teacher is not None:
            with torch.no_grad():
                target = teacher(*batch, return_hidden_states=True).last_hidden_state
            total = total + alignment_loss(out.last_hidden_state, out.kept_index, out.kept_mask, target)
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return total.detach(), grads, saved.bytes


def _expert_counts(model) -> list[list[int]]:
    return [layer.expert_token_counts.tolist() for layer in model.modules() if isinstance(layer, MoELayer)]


def _compare(model, teacher=None):
    batch = _batch()
    loss, grads, saved = _step(model, batch, teacher)
    counts = _expert_counts(model)
    model.gradient_checkpointing_enable(every_n_layers=1)  # the keywords transformers' Trainer passes
    loss_ckpt, grads_ckpt, saved_ckpt = _step(model, batch, teacher)
    assert _expert_counts(model) == [[2 * n for n in layer] for layer in counts]  # a recompute is not counted
    assert grads and grads.keys() == grads_ckpt.keys()
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert saved_ckpt < 0.8 * saved, (saved_ckpt, saved)  # the layers really recompute


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_checkpointing_keeps_loss_and_gradients_and_saves_fewer_activations(stage, single_thread):
    model, _ = _model(STAGES[stage])
    _compare(model)


def test_checkpointing_in_distillation_keeps_loss_and_gradients(single_thread):
    model, _ = _model(STAGES["pruning"])
    _compare(model, teacher=make_teacher(model))


def test_every_n_layers_checkpoints_only_some_layers():
    model, _ = _model({})
    model.gradient_checkpointing_enable(every_n_layers=2)
    flags = [layer.gradient_checkpointing for layer in model.llm.model.layers]
    assert flags == [True, False, True, False]


STAGE_RUNS = {  # `sparsevl train` flags of each stage, all with --gradient_checkpointing True
    "pretrain": {"stage": "pretrain", "data_path": "captions.json"},
    "finetune_vision": {"unfreeze_mm_vision_tower": "True"},
    "lora": {"lora_enable": "True", "lora_r": "8"},
    "moe": {"stage": "moe", "num_experts": "2"},
    "moe_projector": {"mm_projector_type": "moe", "mm_moe_num_experts": "2"},
    "sparse_distill": {"stage": "sparse_distill", "pruning_layers": "1", "retained_tokens": "0.5"},
    "adaptive": {"use_adaptive_layer_selection": "True", "top_k_layers": "2"},
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGE_RUNS))
def test_every_stage_trains_with_gradient_checkpointing(stage, shapes_dir, shapes_tokenizer, tmp_path):
    extra = dict(STAGE_RUNS[stage])
    if "data_path" in extra:
        extra["data_path"] = shapes_dir / extra["data_path"]
    out = tmp_path / stage
    flags = train_flags(shapes_dir, shapes_tokenizer, out, max_steps=2, save_steps=100, logging_steps=1,
                        per_device_train_batch_size=4, gradient_checkpointing="True", **extra)
    assert cli_main(["train", *flags]) == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["SparseVLTrainingArguments"]["gradient_checkpointing"] is True
    losses = [entry["loss"] for entry in json.loads((out / "log_history.json").read_text()) if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

