"""Flags of LLaVA's and MoE-LLaVA's train scripts: translated with the upstream meaning, or refused naming ours."""

import pytest
import torch
from tiny import make_model

from sparsevl.config import parse_train_args
from sparsevl.model.build import count_activated_parameters
from sparsevl.train.run import describe_parameters
from sparsevl.upstream_flags import UPSTREAM_FLAGS


def _value(args, path: str):
    model_args, data_args, training_args = args
    kind, name = path.split(".")
    return getattr({"model": model_args, "data": data_args, "training": training_args}[kind], name)


# (upstream flags, our argument "model|data|training.name", expected value); None: the flag changes nothing.
ACCEPTED = [
    (["--version", "plain"], "data.conversation_template", "plain"),
    (["--warmup_ratio", "0.03"], "training.warmup_steps", 0.03),
    (["--evaluation_strategy", "no"], "training.eval_strategy", "no"),
    (["--image_tower", "tiny-siglip"], "model.vision_tower", "tiny-siglip"),
    (["--image_projector_type", "linear"], "model.mm_projector_type", "linear"),
    (["--moe_layers_idx", "0", "2"], "model.moe_layers", [0, 2]),
    (["--mm_use_im_start_end", "False"], None, None),
    (["--mm_use_im_patch_token", "False"], None, None),
    (["--mm_patch_merge_type", "flat"], None, None),
    (["--lazy_preprocess", "True"], None, None),
    (["--is_multimodal", "True"], None, None),
    (["--freeze_mm_mlp_adapter", "False"], None, None),
    (["--bits", "16"], None, None),
    (["--lora_bias", "none"], None, None),
    (["--ep_size", "1"], None, None),
]
# MoE-LLaVA's names that are our own flags too (same meaning), so UPSTREAM_FLAGS needs no row for them.
NATIVE = [
    (["--moe_mode", "first_half"], "model.moe_mode", "first_half"),
    (["--capacity_factor", "1.25"], "model.capacity_factor", 1.25),
    (["--eval_capacity_factor", "1.0"], "model.eval_capacity_factor", 1.0),
    (["--min_capacity", "4"], "model.min_capacity", 4),
    (["--use_residual", "True"], "model.use_residual", True),
    (["--router_aux_loss_coef", "0.02"], "training.moe_aux_loss_coef", 0.02),
    (["--train_modules", "gate_proj", "wg"], "model.train_modules", ["gate_proj", "wg"]),
    (["--num_experts", "8"], "model.num_experts", 8),
    (["--top_k_experts", "1"], "model.top_k_experts", 1),
]
# (upstream flags, words the refusal must contain: what to use instead)
REFUSED = [
    (["--version", "v1"], "--conversation_template chat"),
    (["--warmup_ratio", "1.5"], "--warmup_steps"),
    (["--mm_use_im_start_end", "True"], "no start/end tokens"),
    (["--mm_use_im_patch_token", "True"], "no <im_patch> token"),
    (["--mm_patch_merge_type", "spatial_unpad"], "flat"),
    (["--freeze_mm_mlp_adapter", "True"], "--tune_mm_mlp_adapter"),
    (["--mm_projector_lr", "2e-5"], "--learning_rate"),
    (["--bits", "4"], "--torch_dtype"),
    (["--double_quant", "True"], "--torch_dtype"),
    (["--quant_type", "nf4"], "--torch_dtype"),
    (["--lora_bias", "all"], "--lora_r"),
    (["--lora_weight_path", "x"], "--model_name_or_path"),
    (["--mpt_attn_impl", "triton"], "--attn_implementation"),
    (["--cache_dir", "x"], "--model_name_or_path"),
    (["--video_tower", "x"], "--vision_tower"),
    (["--video_projector_type", "linear"], "--mm_projector_type"),
    (["--video_folder", "x"], "--image_folder"),
    (["--num_frames", "8"], "images only"),
    (["--only_lora_ffn", "True"], "--lora_enable"),
    (["--ep_size", "2"], "expert parallelism"),
]


@pytest.mark.parametrize("flags, field, expected", ACCEPTED + NATIVE,
                         ids=lambda v: v[0] if isinstance(v, list) else None)
def test_upstream_flag_is_accepted_with_its_meaning(flags, field, expected):
    args = parse_train_args(flags)
    if field is None:
        default = parse_train_args([])
        assert [vars(a) | {"given_flags": None} for a in (args[0], args[1])] == \
               [vars(a) | {"given_flags": None} for a in (default[0], default[1])]
    elif isinstance(expected, float):
        assert _value(args, field) == pytest.approx(expected)
    else:
        assert _value(args, field) == expected


@pytest.mark.parametrize("flags, hint", REFUSED, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_upstream_flag_is_refused_naming_ours(flags, hint):
    with pytest.raises(SystemExit) as error:
        parse_train_args(flags)
    assert flags[0] in str(error.value) and hint in str(error.value)


def test_every_upstream_row_is_walked():
    walked = {flags[0][2:] for flags, *_ in ACCEPTED + REFUSED}
    assert walked == set(UPSTREAM_FLAGS)


def test_upstream_flags_in_yaml_and_with_equals_are_translated(tmp_path):
    recipe = tmp_path / "llava.yaml"
    recipe.write_text("version: plain\nwarmup_ratio: 0.1\n")
    _, data_args, training_args = parse_train_args(["--config", str(recipe), "--image_tower=tiny-siglip"])
    assert data_args.conversation_template == "plain" and training_args.warmup_steps == pytest.approx(0.1)


def test_activated_parameters_of_moe_models():
    dense, _ = make_model(projector="mlp2x_gelu")
    total = sum(p.numel() for p in dense.parameters())
    assert count_activated_parameters(dense) == total
    assert "activated" not in describe_parameters(dense, "full")
    moe, _ = make_model(projector="moe", mm_moe_num_experts=4, mm_moe_top_k=1)
    per_expert = (128 * 128 + 128) * 2  # mlp2x_gelu from CLIP width 128 to LLaMA width 128, biases included
    moe_total = sum(p.numel() for p in moe.parameters())
    assert count_activated_parameters(moe) == moe_total - 3 * per_expert
    assert f"activated params: {moe_total - 3 * per_expert:,}" in describe_parameters(moe, "full")


def test_teacher_from_another_checkpoint(shapes_tokenizer, tiny_checkpoint, tmp_path):
    from tiny import save_tiny_checkpoint

    from sparsevl.model.build import load_checkpoint
    from sparsevl.train.distill import load_teacher

    student, _ = load_checkpoint(tiny_checkpoint)
    other = save_tiny_checkpoint(tmp_path / "teacher", shapes_tokenizer, seed=5)
    teacher = load_teacher(str(other), student)
    reference, _ = load_checkpoint(other)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.pruning is None
    for (name, mine), theirs in zip(teacher.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(mine, theirs), name
    qformer = save_tiny_checkpoint(tmp_path / "qformer", shapes_tokenizer, mm_projector_type="qformer",
                                   num_query_tokens=8)
    with pytest.raises(ValueError, match="its visual tokens per image is 8, the student's 64"):
        load_teacher(str(qformer), student)


def test_teacher_flag_needs_the_distillation_stage():
    with pytest.raises(SystemExit, match="--teacher_model_name_or_path is used by --stage sparse_distill only"):
        parse_train_args(["--teacher_model_name_or_path", "x"])
    _, _, training_args = parse_train_args(["--stage", "sparse_distill", "--teacher_model_name_or_path", "x"])
    assert training_args.teacher_model_name_or_path == "x"


def test_distillation_run_uses_the_named_teacher(shapes_dir, shapes_tokenizer, tiny_checkpoint, tmp_path, capsys):
    from tiny import save_tiny_checkpoint, train_flags

    from sparsevl.cli import main as cli_main

    teacher = save_tiny_checkpoint(tmp_path / "teacher", shapes_tokenizer, seed=5)
    flags = train_flags(shapes_dir, shapes_tokenizer, tmp_path / "run", model_name_or_path=tiny_checkpoint,
                        stage="sparse_distill", pruning_layers="1", retained_tokens="0.5", max_steps=1,
                        per_device_train_batch_size=2, teacher_model_name_or_path=teacher)
    assert cli_main(["train", *flags]) == 0
    assert f"teacher (frozen, no pruning) from {teacher}:" in capsys.readouterr().out
