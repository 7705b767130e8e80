"""DeepSpeed ZeRO checks before training: the config as DeepSpeed itself parses it, and the limits sparsevl
knows of (ZeRO-3 partitions each expert's weights, so MoE layers train on ZeRO-2 as in MoE-LLaVA)."""

import torch
from torch import nn

from sparsevl.train.expert_usage import moe_layers


def parsed_deepspeed_config(training_args):
    """DeepSpeed's own `DeepSpeedConfig` of `--deepspeed`, its "auto" values filled from the flags as Trainer does."""
    from deepspeed.runtime.config import DeepSpeedConfig

    hf_config = training_args.hf_deepspeed_config
    hf_config.trainer_config_process(training_args)
    return DeepSpeedConfig(hf_config.config)


def check_deepspeed(training_args, model: nn.Module) -> None:
    """Refuse a DeepSpeed run sparsevl cannot honour, saying why."""
    if not training_args.deepspeed:
        return
    if not torch.cuda.is_available():
        raise ValueError("--deepspeed needs CUDA devices: without them Accelerate runs the processes as plain CPU data "
                         "parallel and would ignore the DeepSpeed config; on CPU use --fsdp (FSDP2) instead")
    stage = training_args.hf_deepspeed_config.config.get("zero_optimization", {}).get("stage", 0)
    layers = [name for name, _ in moe_layers(model)]
    if stage == 3 and layers:
        raise ValueError(f"--deepspeed {training_args.deepspeed}: ZeRO-3 partitions the experts of the MoE layers "
                         f"{layers}; train MoE models with ZeRO-2 (configs/deepspeed/zero2.json), as MoE-LLaVA does")
