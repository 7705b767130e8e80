"""No flag is dropped: flags over a checkpoint apply or stop with both values named; --config files merge in order;
a run that would train nothing is refused."""

import json

import pytest
import torch
from tiny import random_pixels, save_tiny_checkpoint, train_flags

from sparsevl.classify.config import parse_args as parse_classify_args
from sparsevl.cli import main as cli_main
from sparsevl.config import parse_train_args
from sparsevl.model.build import load_checkpoint
from sparsevl.model.projectors import MoEProjector
from sparsevl.train.run import load_model_and_processors


def _load_with(checkpoint, tokenizer, *flags):
    model_args, _, _ = parse_train_args(["--model_name_or_path", str(checkpoint), "--tokenizer_name_or_path",
                                         tokenizer.name_or_path, *flags])
    model, _, _, resolved = load_model_and_processors(model_args)
    return model.eval(), resolved


def _logits(model, tokenizer):
    image = tokenizer.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[5, image, 7, 9, 11]])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), random_pixels(1)).logits


@pytest.mark.parametrize("name", ["moe", "adaptive_moe"])
def test_moe_projector_over_a_dense_checkpoint_upcycles_it(name, tiny_checkpoint, shapes_tokenizer, capsys):
    dense, _ = load_checkpoint(tiny_checkpoint)
    model, resolved = _load_with(tiny_checkpoint, shapes_tokenizer, "--mm_projector_type", name,
                                 "--mm_moe_num_experts", "3", "--mm_moe_top_k", "2")
    assert isinstance(model.projector, MoEProjector) and model.projector.moe.router.num_experts == 3
    assert (resolved.mm_projector_type, resolved.mm_moe_num_experts) == (name, 3)
    assert "mlp2x_gelu projector upcycled into 3 experts" in capsys.readouterr().out
    # every expert copies the dense projector and the top-k weights sum to one: the dense model's logits
    torch.testing.assert_close(_logits(model, shapes_tokenizer), _logits(dense.eval(), shapes_tokenizer))


def test_projector_that_cannot_be_upcycled_is_an_error_naming_both(tiny_checkpoint, shapes_tokenizer):
    with pytest.raises(ValueError, match="--mm_projector_type qformer contradicts checkpoint .* mm_projector_type "
                                         "mlp2x_gelu"):
        _load_with(tiny_checkpoint, shapes_tokenizer, "--mm_projector_type", "qformer")
    with pytest.raises(ValueError, match="--vision_tower tiny-siglip contradicts .* vision_tower tiny-clip"):
        _load_with(tiny_checkpoint, shapes_tokenizer, "--vision_tower", "tiny-siglip")
    with pytest.raises(ValueError, match="--mm_moe_num_experts 4 contradicts .* with --mm_projector_type moe"):
        _load_with(tiny_checkpoint, shapes_tokenizer, "--mm_moe_num_experts", "4")


def test_moe_checkpoint_refuses_another_expert_count(shapes_tokenizer, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "moe", shapes_tokenizer, mm_projector_type="moe",
                                      mm_moe_num_experts=4)
    model, _ = _load_with(checkpoint, shapes_tokenizer, "--mm_projector_type", "adaptive_moe")  # the same projector
    assert model.projector.moe.router.num_experts == 4
    with pytest.raises(ValueError, match="--mm_moe_num_experts 2 contradicts .* mm_moe_num_experts 4"):
        _load_with(checkpoint, shapes_tokenizer, "--mm_moe_num_experts", "2")


@pytest.mark.parametrize("layer", ["-3", "-2"])  # -2 is the flag's default: given explicitly, it still applies
def test_vision_select_layer_over_a_checkpoint_applies(layer, shapes_tokenizer, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "last", shapes_tokenizer, mm_vision_select_layer=-1)
    model, resolved = _load_with(checkpoint, shapes_tokenizer, "--mm_vision_select_layer", layer)
    assert resolved.mm_vision_select_layer == int(layer)
    pixels = random_pixels(2)
    with torch.no_grad():
        expected = model.vision_tower.encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
        torch.testing.assert_close(model.vision_tower(pixels), expected[int(layer)][:, 1:])
    unchanged, resolved = _load_with(checkpoint, shapes_tokenizer)  # no flag: the checkpoint's layer
    assert unchanged.vision_tower.select_layer == resolved.mm_vision_select_layer == -1


def test_select_layer_is_saved_after_training(shapes_dir, shapes_tokenizer, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "last", shapes_tokenizer, mm_vision_select_layer=-1)
    out = tmp_path / "run"
    flags = train_flags(shapes_dir, shapes_tokenizer, out, model_name_or_path=checkpoint, max_steps=1,
                        per_device_train_batch_size=2, mm_vision_select_layer=-3, mm_projector_type="moe",
                        mm_moe_num_experts=2)
    assert cli_main(["train", *flags]) == 0
    saved = json.loads((out / "sparsevl_config.json").read_text())["model_args"]
    assert (saved["mm_vision_select_layer"], saved["mm_projector_type"], saved["mm_moe_num_experts"]) == (-3, "moe", 2)


def test_config_files_merge_in_order_and_flags_win(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("stage: pretrain\nlearning_rate: 1e-4\nmodel_max_length: 256\nlora_r: 8\n")
    second.write_text("stage: finetune\nlearning_rate: 3e-4\nlora_alpha: 4\n")
    for argv in (["--config", str(first), "--config", str(second)], ["--config", str(first), str(second)],
                 [f"--config={first}", f"--config={second}"]):
        model_args, data_args, training_args = parse_train_args([*argv, "--lora_alpha", "2"])
        assert training_args.learning_rate == pytest.approx(3e-4) and training_args.stage == "finetune"
        assert (data_args.model_max_length, model_args.lora_r, model_args.lora_alpha) == (256, 8, 2)
        assert not model_args.tune_mm_mlp_adapter  # the last file's stage recipe, not the first's


def test_classifier_config_files_merge_in_order(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("dataset: digits\nepochs: 3\nbatch_size: 16\n")
    second.write_text("epochs: 5\nlr: 0.002\n")
    model, data, train = parse_classify_args(["--config", str(first), "--config", str(second), "--lr", "0.001"])
    assert (data.dataset, train.epochs, train.batch_size, train.lr) == ("digits", 5, 16, 0.001)
    _, _, train = parse_classify_args(["--config", str(first), str(second)])
    assert (train.epochs, train.lr) == (5, 0.002)


def test_classifier_test_mode_refuses_a_model_flag_the_checkpoint_contradicts():
    from sparsevl.classify.config import ModelConfig, check_model_flags

    saved = ModelConfig(embed_dim=64)
    check_model_flags(ModelConfig(embed_dim=64, gradient_checkpointing=True), saved, "ckpt")
    with pytest.raises(ValueError, match="--embed_dim 32 contradicts checkpoint ckpt, trained with embed_dim 64"):
        check_model_flags(ModelConfig(embed_dim=32), saved, "ckpt")


@pytest.mark.parametrize("steps, epochs", [("-3", "0"), ("0", "3"), ("-1", "0"), ("-5", "2")])
def test_a_run_that_trains_nothing_is_refused(steps, epochs, capsys):
    with pytest.raises(SystemExit) as error:
        cli_main(["train", "--max_steps", steps, "--num_train_epochs", epochs, "--data_path", "x.json"])
    assert f"--max_steps {steps} with --num_train_epochs {float(epochs)} trains nothing" in str(error.value)
