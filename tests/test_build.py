"""Training modes: exactly which parameters train; LoRA merging; parameter counts."""

import pytest
import torch
from tiny import make_model, prompt_with_image, random_pixels, right_padded

from sparsevl.config import ModelArguments
from sparsevl.model.build import configure_trainable, count_parameters, load_checkpoint, save_checkpoint


def trainable_groups(model) -> set[str]:
    """Which top-level parts have trainable parameters, and whether that holds for all of their parameters."""
    groups = set()
    for part in ("vision_tower", "projector", "llm"):
        flags = [p.requires_grad for p in getattr(model, part).parameters()]
        if all(flags):
            groups.add(part)
        elif any(flags):
            groups.add(part + "(partly)")
    return groups


@pytest.mark.parametrize("flags, mode, groups", [
    ({}, "full", {"projector", "llm"}),
    ({"tune_mm_mlp_adapter": True}, "projector", {"projector"}),
    ({"tune_mm_mlp_adapter": True, "unfreeze_mm_vision_tower": True}, "projector", {"projector"}),
    ({"freeze_backbone": True}, "frozen_backbone", {"projector"}),
    ({"freeze_backbone": True, "unfreeze_mm_vision_tower": True}, "frozen_backbone+vision",
     {"projector", "vision_tower"}),
    ({"unfreeze_mm_vision_tower": True}, "full+vision", {"projector", "llm", "vision_tower"}),
    ({"lora_enable": True, "lora_r": 4}, "lora", {"projector", "llm(partly)"}),
])
def test_trainable_parameters_per_mode(flags, mode, groups):
    model, _ = make_model()
    args = ModelArguments(model_name_or_path="tiny-llama", vision_tower="tiny-clip", **flags)
    assert configure_trainable(model, args) == mode
    assert trainable_groups(model) == groups
    if flags.get("lora_enable"):
        trainable_names = [n for n, p in model.llm.named_parameters() if p.requires_grad]
        assert trainable_names and all("lora_" in n for n in trainable_names)
        # 4 layers x 7 target projections x (A + B)
        assert len(trainable_names) == 4 * 7 * 2


def test_parameter_counts_match_the_modules():
    model, _ = make_model()
    configure_trainable(model, ModelArguments(tune_mm_mlp_adapter=True))
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.projector.parameters())
    assert total == sum(p.numel() for p in model.parameters())


def test_lora_merge_gives_the_same_logits_as_the_unmerged_model(tmp_path):
    model, args = make_model("tiny-qwen3")
    args.lora_enable, args.lora_r, args.lora_alpha = True, 4, 8
    configure_trainable(model, args)
    with torch.no_grad():  # LoRA's B starts at zero; give the adapters something to merge
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    ids, mask = right_padded([prompt_with_image(7, 1)])
    pixels = random_pixels(1)
    model.eval()
    unmerged = model(ids, mask, pixels).logits
    save_checkpoint(model, tmp_path, model_args=args)
    merged_model, merged_args = load_checkpoint(tmp_path)
    assert not merged_args.lora_enable
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    torch.testing.assert_close(merged_model.eval()(ids, mask, pixels).logits, unmerged, atol=1e-5, rtol=1e-5)
    # saving must not have left the adapters merged into the live model
    torch.testing.assert_close(model(ids, mask, pixels).logits, unmerged)
