"""Process-level settings for CPU runs, applied by the command-line entry point (never on import).

glibc serves every allocation above its mmap threshold (at most 32 MiB by default) with a fresh mmap,
so each large activation is page-faulted and zeroed again on every training step. PyTorch's CPU
allocator does not cache, which makes that a measurable cost: an 8-expert top-2 MoE layer on 4096
tokens spends ~15% of a forward+backward step there (benchmarks/moe_dispatch.py). Raising the
threshold lets freed blocks be reused, as jemalloc and tcmalloc do by default.
"""

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from glibc's <malloc.h>
OPT_OUT_VARIABLE = "SPARSEVL_DEFAULT_MALLOC"


def tune_cpu_allocator(mmap_threshold_bytes: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds so large freed blocks are reused; True if applied.

    A no-op (False) off glibc Linux, or when SPARSEVL_DEFAULT_MALLOC=1 is set. The cost is that the
    process keeps freed memory for reuse instead of returning it to the system at once.
    """
    if os.environ.get(OPT_OUT_VARIABLE) == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl has no mallopt)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold_bytes)
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes)) and bool(trimmed)
