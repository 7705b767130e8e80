"""The `sparsevl` command: one entry point, one subcommand per job.

Each subcommand is a `main(argv) -> int` function in its own module, imported only when chosen
so that `sparsevl data ...` does not pay for importing the model code.
"""

import importlib
import sys

from sparsevl.runtime import tune_cpu_allocator

# name -> ("module", "function", one-line help). Adding a subcommand is one line here.
SUBCOMMANDS = {
    "data": ("sparsevl.data.cli", "main", "generate the built-in shapes benchmark"),
    "train": ("sparsevl.train.cli", "main", "train a model (pretrain / finetune stages)"),
    "eval": ("sparsevl.eval.cli", "main", "generate answers on a test split and score them"),
    "demo": ("sparsevl.demo", "main", "end-to-end demo: data, tokenizer, train, eval, plot"),
    "classify": ("sparsevl.classify.cli", "main", "Diff-MoE image classifier (digits, CIFAR-10, Fashion-MNIST, Flickr8k)"),
    "export": ("sparsevl.export", "main", "convert to/from transformers' Llava layout (llava-hf)"),
    "chat": ("sparsevl.serve.chat", "main", "talk about an image in the terminal (streaming answers)"),
    "serve": ("sparsevl.serve.web", "main", "web demo (Gradio) on 127.0.0.1: ask about an uploaded image"),
    "api": ("sparsevl.serve.api", "main", "OpenAI-compatible HTTP API on 127.0.0.1, with dynamic batching"),
    "analyze": ("sparsevl.analyze.cli", "main", "study a trained model (pruning: accuracy vs kept tokens)"),
}


def usage() -> str:
    lines = ["usage: sparsevl <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, _, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run `sparsevl <command> --help` for the command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    tune_cpu_allocator()
    return run_registered(SUBCOMMANDS, argv, prog="sparsevl", kind="command")


def run_registered(table: dict[str, tuple[str, str, str]], argv: list[str], *, prog: str, kind: str) -> int:
    """Import and run `table[argv[0]]` (module, function, help) on the remaining arguments."""
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"{prog}: unknown {kind} {name!r}; choose from: {', '.join(table)}", file=sys.stderr)
        return 2
    module_name, function_name, _ = table[name]
    command = getattr(importlib.import_module(module_name), function_name)
    return int(command(rest) or 0)
