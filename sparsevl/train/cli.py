"""`sparsevl train [--config FILE.yaml] [--stage pretrain|finetune] [flags...]`."""

import os
import sys

from sparsevl.config import parse_train_args


def use_cpu_processes_without_gpu(environ) -> None:
    """Started as several processes (accelerate launch / torchrun) on a machine without CUDA: make
    Trainer's Accelerator run CPU data parallel over gloo instead of N unrelated single-process runs."""
    import torch

    if int(environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        environ.setdefault("ACCELERATE_USE_CPU", "true")


def main(argv: list[str]) -> int:
    if any(flag in argv for flag in ("-h", "--help")):
        from transformers import HfArgumentParser

        from sparsevl.config import ARGUMENT_CLASSES

        HfArgumentParser(ARGUMENT_CLASSES).print_help()
        return 0
    use_cpu_processes_without_gpu(os.environ)
    from sparsevl.train.sharding import fsdp_flags_from_launcher

    launcher_flags = fsdp_flags_from_launcher(os.environ)
    if "--fsdp" not in argv:  # flags given by hand win over the launcher's config
        argv = [*argv, *launcher_flags]
    model_args, data_args, training_args = parse_train_args(argv)
    from sparsevl.train.guard import TooManyBadSteps
    from sparsevl.train.run import train

    try:
        out_dir = train(model_args, data_args, training_args)
    except (ValueError, FileNotFoundError, TooManyBadSteps) as error:
        print(f"sparsevl train: error: {error}", file=sys.stderr)
        return 2
    print(f"saved model to {out_dir}")
    return 0
