"""DeepSpeed ZeRO-2 / ZeRO-3 configs as DeepSpeed parses them, and the runs sparsevl refuses."""

from pathlib import Path

import pytest
import torch
from tiny import make_model
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

from sparsevl.config import parse_train_args
from sparsevl.train.zero import check_deepspeed, parsed_deepspeed_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _forget_zero3():
    """Training arguments with a ZeRO-3 config make transformers build every later model under zero.Init."""
    yield
    unset_hf_deepspeed_config()
    assert not is_deepspeed_zero3_enabled()


def arguments(name: str, *extra: str):
    return parse_train_args(["--deepspeed", str(ROOT / "configs" / "deepspeed" / f"{name}.json"), "--output_dir",
                             "unused", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                             "--max_grad_norm", "0.5", *extra])[2]


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_parses_each_config_with_the_flags_filled_in(name, stage):
    config = parsed_deepspeed_config(arguments(name))
    assert config.zero_optimization_stage == stage
    assert (config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (4, 2)
    assert config.train_batch_size == 8 and config.gradient_clipping == 0.5  # one process here
    assert not config.bfloat16_config.enabled and not config.float16_config.enabled  # fp32 unless --bf16/--fp16
    if stage == 3:
        assert config.zero_config.gather_16bit_weights_on_model_save  # the final save gathers whole weights


def test_deepspeed_without_cuda_is_an_error_not_a_silent_cpu_run():
    model, _ = make_model("tiny-llama")
    with pytest.raises(ValueError, match="--deepspeed needs CUDA devices"):
        check_deepspeed(arguments("zero2"), model)


def test_moe_layers_train_on_zero2_and_zero3_refuses_them(monkeypatch):
    moe, _ = make_model("tiny-llama", moe_enable=True, num_experts=4)
    dense, _ = make_model("tiny-llama")
    projector_moe, _ = make_model("tiny-llama", projector="moe")
    zero2, zero3 = arguments("zero2"), arguments("zero3")  # after the models: see _forget_zero3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the checks a GPU machine runs
    check_deepspeed(zero2, moe)
    check_deepspeed(zero2, projector_moe)
    check_deepspeed(zero3, dense)
    with pytest.raises(ValueError, match=r"ZeRO-3 partitions the experts of the MoE layers \['llm.layer0', 'llm.layer2'\]"):
        check_deepspeed(zero3, moe)
    with pytest.raises(ValueError, match=r"\['projector'\]; train MoE models with ZeRO-2"):
        check_deepspeed(zero3, projector_moe)
