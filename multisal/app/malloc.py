"""glibc malloc settings for frameworks that allocate large, short-lived CPU tensors.

glibc serves a block above its mmap threshold (raised on the fly, but never past 32 MiB) with fresh
pages from mmap and unmaps it on free. Autograd allocates and frees activations of tens of MiB in
every call, so every call page-faults and zeroes all of them again, and at large batches the kernel
takes a good part of SmoothGrad's time (README, "Use", says how much).
With both thresholds raised, freed blocks stay in the heap and the next call reuses them. This is
what the jemalloc or tcmalloc preloads that PyTorch's CPU tuning guide recommends achieve.

Peak memory is unchanged (blocks are reused, not added); memory freed at the end of a job stays
with the process until it exits. The `multisal` command, batch jobs and Ray actors call
tune_malloc(); a script calls it itself. onnxruntime keeps its own arena and gains nothing.
"""
from __future__ import annotations

import ctypes
import platform

from ..allocator import record_tuned

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2 << 30

_tuned = None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once). True where applied; False
    where the C library is not glibc (macOS, Windows, musl), which is left as it is."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
                    bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            except (OSError, AttributeError):   # no libc.so.6 or no mallopt: stays untuned
                pass
            if _tuned:
                record_tuned()
    return _tuned
