"""Helpers shared by the benchmarks: a measured fp32 matmul peak and a robust timer (the library's own)."""

import torch

from sparsevl.eval.cost import median_seconds


def matmul_peak_flops(size: int = 2048) -> float:
    """Achieved fp32 FLOP/s of one square matmul on this machine (the ceiling a training step is held to)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = median_seconds(lambda: torch.mm(a, b), repeats=7)
    return 2 * size**3 / seconds


class SavedActivations:
    """Context manager: bytes of the tensors autograd keeps for backward (parameters excluded, each storage
    once). Inside checkpointed layers torch keeps its own hooks, so only what checkpointing keeps is counted."""

    def __init__(self, model: torch.nn.Module):
        self._parameters = {id(p) for p in model.parameters()}
        self._storages: dict[tuple[int, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in self._parameters and tensor.numel():
            storage = tensor.untyped_storage()
            self._storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
