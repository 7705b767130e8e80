"""sparsevl: sparse vision-language models (MoE, token pruning, adaptive vision layers)."""

__version__ = "0.1.0"
