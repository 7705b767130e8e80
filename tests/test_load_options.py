"""--torch_dtype and --attn_implementation: passed to transformers when loading, applied to loaded checkpoints."""

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, VOCAB_SIZE, prompt_with_image, random_pixels, right_padded
from transformers import AutoModelForCausalLM

from sparsevl.config import ModelArguments, parse_train_args
from sparsevl.model import presets
from sparsevl.model.build import apply_load_options, build_model, build_vision_encoder


@pytest.fixture(scope="module")
def local_dirs(tmp_path_factory):
    """A tiny LLaMA and a tiny CLIP saved as transformers directories (safetensors)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(presets.llm_preset_config("tiny-llama", vocab_size=VOCAB_SIZE)).save_pretrained(
        root / "llm")
    build_vision_encoder("tiny-clip").save_pretrained(root / "clip")
    return root / "llm", root / "clip"


def _model(local_dirs, **flags):
    llm, clip = local_dirs
    torch.manual_seed(0)  # the projector's random weights
    args = ModelArguments(model_name_or_path=str(llm), vision_tower=str(clip), **flags)
    return build_model(args, vocab_size=VOCAB_SIZE, image_token_id=IMAGE_TOKEN_ID).eval()


def _logits(model):
    ids, mask = right_padded([prompt_with_image(9), prompt_with_image(6)])
    with torch.no_grad():
        return model(ids, mask, random_pixels(2)).logits.float()


def test_bfloat16_loads_every_part_in_bfloat16_and_runs(local_dirs):
    reference = _model(local_dirs)
    half = _model(local_dirs, torch_dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in reference.parameters()} == {torch.float32}  # fp32 stays the default
    assert torch.equal(half.llm.lm_head.weight, reference.llm.lm_head.weight.to(torch.bfloat16))
    torch.testing.assert_close(_logits(half), _logits(reference), atol=0.1, rtol=0.05)


def test_auto_takes_the_checkpoint_dtype(local_dirs, tmp_path):
    llm, clip = local_dirs
    AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float16).save_pretrained(tmp_path / "llm16")
    model = _model((tmp_path / "llm16", clip), torch_dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_eager_attention_is_passed_through_and_matches_sdpa(local_dirs):
    eager = _model(local_dirs, attn_implementation="eager")
    sdpa = _model(local_dirs, attn_implementation="sdpa")
    assert eager.llm.config._attn_implementation == "eager"
    assert eager.vision_tower.encoder.config._attn_implementation == "eager"
    assert sdpa.llm.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(eager), _logits(sdpa), atol=1e-5, rtol=1e-5)


def test_flash_attention_without_its_package_is_an_error_naming_the_flag(local_dirs):
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="--attn_implementation flash_attention_2"):
        _model(local_dirs, attn_implementation="flash_attention_2")


def test_load_options_apply_to_a_loaded_checkpoint(tiny_checkpoint):
    from sparsevl.model.build import load_checkpoint

    model, _ = load_checkpoint(tiny_checkpoint)
    apply_load_options(model, ModelArguments(torch_dtype="bfloat16", attn_implementation="eager"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.llm.config._attn_implementation == "eager"


def test_bad_values_are_errors_naming_the_flag():
    with pytest.raises(SystemExit, match="--torch_dtype 'fp8' must be one of"):
        parse_train_args(["--torch_dtype", "fp8"])
    with pytest.raises(SystemExit, match="--attn_implementation 'flash' must be one of"):
        parse_train_args(["--attn_implementation", "flash"])
