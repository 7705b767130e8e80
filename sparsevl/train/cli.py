"""`sparsevl train [--config FILE.yaml] [--stage pretrain|finetune] [flags...]`."""

import sys

from sparsevl.config import parse_train_args


def main(argv: list[str]) -> int:
    if any(flag in argv for flag in ("-h", "--help")):
        from transformers import HfArgumentParser

        from sparsevl.config import ARGUMENT_CLASSES

        HfArgumentParser(ARGUMENT_CLASSES).print_help()
        return 0
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
