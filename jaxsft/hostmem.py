"""Keep the CPU backend's freed memory in the process instead of returning it to the kernel.

XLA's CPU backend allocates each execution's temporaries as one block (1.7 GB for the benchmark
step: activations saved for the backward pass, gradients). glibc serves blocks that large with a
fresh `mmap` and gives them back with `munmap` when the step ends, so every step page-faults the
whole block in again: ~415,000 faults and ~1 s of kernel time per step on the benchmark, on the
critical path of the first write into each buffer. Told to serve all allocations from one heap
that it never trims, glibc reuses the same pages from the second step on (0 faults per step).

The cost is that the process keeps its peak heap: right for a training process that reaches its
peak on the first step and stays there. Only the CPU backend is worth it (an accelerator's
temporaries live in device memory), and it must run before any thread allocates (glibc fixes the
number of arenas at the first allocation in a second thread), so the CLI calls it first.
`JAXSFT_HOST_MALLOC=default` leaves glibc as it is.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

# mallopt() parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def cpu_backend_expected() -> bool:
    """Whether JAX will run on the CPU: `JAX_PLATFORMS` names cpu first, or it is unset and no
    accelerator plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(m) is not None
                   for m in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin"))


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (one arena, no per-allocation mmap, no trimming:
    `mallopt(M_TRIM_THRESHOLD, -1)`); True when applied. A no-op off glibc or with
    `JAXSFT_HOST_MALLOC=default`."""
    if os.environ.get("JAXSFT_HOST_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
