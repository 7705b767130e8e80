"""`sparsevl analyze <target> ...`: studies of a trained model, one module per target.

Adding a target is one line in TARGETS; each target is a `main(argv) -> int` imported only when chosen.
"""

from sparsevl.cli import run_registered

# target -> ("module", "function", one-line help)
TARGETS = {
    "pruning": ("sparsevl.analyze.pruning", "main", "accuracy and prefill FLOPs vs kept visual tokens per pruner"),
    "routing": ("sparsevl.analyze.routing", "main", "text vs image tokens per expert of each MoE layer (heatmaps)"),
    "layers": ("sparsevl.analyze.layers", "main", "vision layers an adaptive model picks, per question type"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sparsevl analyze <target> [args...]\n\ntargets:")
        print("\n".join(f"  {name:<10} {help_text}" for name, (_, _, help_text) in TARGETS.items()))
        return 0
    return run_registered(TARGETS, argv, prog="sparsevl analyze", kind="target")
