"""Which JAX platforms this host has, decided before JAX is imported.

libtpu is installed with jaxsft (the `compile` command needs it to describe TPU topologies), and
when `JAX_PLATFORMS` is unset JAX initializes every installed plugin: on a host without a TPU,
libtpu then prints a block of errors (no host bounds, no worker hostnames, a source location
trace) before JAX falls back to the CPU. The CLI names the platforms the host does have instead,
so the first lines a user sees are jaxsft's. A TPU VM, or a `JAX_PLATFORMS` the user set, is left
as it is.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
from typing import Callable, Mapping

# Set on TPU VMs (or by people emulating one): libtpu is meant to look for its TPU.
TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_SKIP_MDS_QUERY", "TPU_NAME")
# Device nodes of an attached TPU: /dev/accel0.. (v2-v4), /dev/vfio/0.. (v5e, v6e; /dev/vfio/vfio
# alone is the VFIO control node that any host with the module loaded has).
TPU_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def host_platforms(environ: Mapping[str, str] = os.environ, devices: Callable[[str], list] = glob.glob,
                   which: Callable[[str], str | None] = shutil.which,
                   installed: Callable[[str], bool] = _installed) -> str | None:
    """The `JAX_PLATFORMS` to set on this host, or None to leave JAX to choose.

    None when `JAX_PLATFORMS` is already set (non-empty), when libtpu is not installed (nothing
    would complain), or when a TPU may be attached (a TPU device node or a TPU VM variable).
    Otherwise "cuda,cpu" with an NVIDIA GPU (`/dev/nvidia0` or `nvidia-smi` on PATH) and a CUDA
    plugin, "rocm,cpu" with an AMD GPU (`/dev/kfd`) and the ROCm plugin, else "cpu".
    """
    if environ.get("JAX_PLATFORMS", "").strip() or not installed("libtpu"):
        return None
    if any(environ.get(k) for k in TPU_ENV) or any(devices(pattern) for pattern in TPU_DEVICES):
        return None
    if (devices("/dev/nvidia0") or which("nvidia-smi")) and (
            installed("jax_cuda12_plugin") or installed("jax_cuda13_plugin")):
        return "cuda,cpu"
    if devices("/dev/kfd") and (installed("jax_rocm60_plugin") or installed("jax_rocm7_plugin")):
        return "rocm,cpu"
    return "cpu"


def name_host_platforms() -> str | None:
    """Sets `JAX_PLATFORMS` to `host_platforms()` when that is not None; returns what it set.
    Must run before JAX is imported."""
    platforms = host_platforms()
    if platforms:
        os.environ["JAX_PLATFORMS"] = platforms
    return platforms
