"""The name under which transformers takes a KV cache: `cache` from 5.24 on, `past_key_values` before."""

import functools
import inspect
from typing import Callable

from torch import nn


@functools.cache
def _cache_name(function: Callable) -> str:
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def cache_kwarg(target: nn.Module | Callable, cache) -> dict:
    """{name: cache} for a module's forward or a function, so one call works across transformers 5.x."""
    return {_cache_name(type(target).forward if isinstance(target, nn.Module) else target): cache}
