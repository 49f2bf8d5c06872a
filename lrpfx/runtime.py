"""Process settings that make explainers faster on the CPU.

:func:`keep_freed_memory` lets glibc's ``malloc`` keep the memory a freed tensor held, so the
next tensor of that size reuses it. By default glibc serves a block above its mmap threshold
(128 KiB at first, raised as such blocks are freed, to at most 32 MiB) with its own ``mmap``
and returns it to the system on ``free``, and it trims the free top of its heap; the next tensor
then starts on fresh pages, and the kernel zeroes each 4 KiB page on first touch: 6,272 page
faults for a 25 MB activation. At ResNet-50's batch 8 (activations up to 25.7 MB, under the
raised threshold) this made no measurable difference on the development machine; at batch 16
(51 MB) it measured the floor (forward + Input x Gradient backward) at 0.87-0.92x its time and
``epsilon_gamma_box`` at 0.82-0.91x (``benchmarks/keep_freed_memory_b16.txt``).

It is the glibc counterpart of running PyTorch on the CPU with jemalloc or tcmalloc preloaded
(``LD_PRELOAD``), as ``torch.backends.xeon.run_cpu`` does, without another library. It changes
the whole process, not one explainer: the resident set stays at its peak instead of shrinking
after a batch. The ``lrpfx explain`` and ``lrpfx demo`` commands turn it on for their own process;
``import lrpfx`` never does.
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# glibc's defaults, restored by keep_freed_memory(False)
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536


def _glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl, e.g. Alpine, does not)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory(enable: bool = True) -> bool:
    """Have glibc's ``malloc`` keep freed memory for reuse in this process (``enable=False`` undoes it).

    Turns off ``mmap`` for large blocks and the trimming of the heap's top (``mallopt``'s
    ``M_MMAP_MAX = 0`` and ``M_TRIM_THRESHOLD = -1``), so tensors freed by one layer or one batch
    serve the next ones without page faults. Numbers are unchanged; only speed and the resident
    set move (it stays at its peak). ``enable=False`` restores glibc's defaults (128 KiB mmap and
    trim thresholds; the dynamic threshold does not come back) and hands the free top of the heap
    back to the system (``malloc_trim``).

    Returns whether the setting was applied: ``False`` where the C library is not glibc (macOS,
    Windows, musl), which this leaves as it is.
    """
    libc = _glibc()
    if libc is None:
        return False
    if enable:
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
    ok = (bool(libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX))
          and bool(libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD))
          and bool(libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)))
    libc.malloc_trim(0)
    return ok
