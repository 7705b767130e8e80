"""The `sparsevl` command: one entry point, one subcommand per job.

Each subcommand is a `main(argv) -> int` function in its own module, imported only when chosen
so that `sparsevl data ...` does not pay for importing the model code.
"""

import importlib
import sys

# name -> ("module", "function", one-line help). Adding a subcommand is one line here.
SUBCOMMANDS = {
    "data": ("sparsevl.data.cli", "main", "generate the built-in shapes benchmark"),
    "train": ("sparsevl.train.cli", "main", "train a model (pretrain / finetune stages)"),
    "eval": ("sparsevl.eval.cli", "main", "generate answers on a test split and score them"),
    "demo": ("sparsevl.demo", "main", "end-to-end demo: data, tokenizer, train, eval, plot"),
    "export": ("sparsevl.export", "main", "convert to/from transformers' Llava layout (llava-hf)"),
    "chat": ("sparsevl.serve.chat", "main", "talk about an image in the terminal (streaming answers)"),
    "serve": ("sparsevl.serve.web", "main", "web demo (Gradio) on 127.0.0.1: ask about an uploaded image"),
    "analyze-layers": ("sparsevl.analysis.layers", "main", "which vision layer an adaptive model picks, per question type"),
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
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"sparsevl: unknown command {name!r}; choose from: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module_name, function_name, _ = SUBCOMMANDS[name]
    command = getattr(importlib.import_module(module_name), function_name)
    return int(command(rest) or 0)
