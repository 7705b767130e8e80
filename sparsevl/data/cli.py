"""`sparsevl data ...`: dataset commands (for now `shapes`, the built-in benchmark generator)."""

import argparse
import inspect
import time

from sparsevl.data.shapes import generate_shapes_dataset

SHAPES_FLAGS = {
    "num_train": "train images (captions.json and finetune.json)",
    "num_test": "test images (test_qa.json and test_pope.json)",
    "image_size": "image side in pixels; must be divisible by --grid",
    "grid": "cells per board side (even, so every cell has a quadrant)",
    "min_objects": "fewest objects per image",
    "max_objects": "most objects per image (at most grid*grid and 24 colour-shape pairs)",
    "qa_per_image": "one-question finetune records per training image",
    "seed": "random seed; the same seed gives byte-identical files",
    "small_objects": "percent of objects drawn small (a quarter of their cell; cells >= 16 px); adds 'small' "
                     "questions (What colour is the small circle?)",
}


def build_parser() -> argparse.ArgumentParser:
    """Parser for `sparsevl data`; flag defaults come from generate_shapes_dataset's signature."""
    parser = argparse.ArgumentParser(prog="sparsevl data", description="Dataset commands.")
    commands = parser.add_subparsers(dest="command", required=True)
    shapes = commands.add_parser("shapes", help="generate the built-in shapes benchmark",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    shapes.add_argument("--out", required=True, help="output folder (created if missing)")
    defaults = inspect.signature(generate_shapes_dataset).parameters
    for name, help_text in SHAPES_FLAGS.items():
        shapes.add_argument(f"--{name}", type=int, default=defaults[name].default, help=help_text)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        counts = generate_shapes_dataset(args.out, **{name: getattr(args, name) for name in SHAPES_FLAGS})
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    for name, value in counts.items():
        print(f"  {name}: {value}")
    return 0
