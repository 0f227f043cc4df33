"""Model FLOPs per trained position and device peak FLOP/s: the two halves of MFU.

MFU (model FLOPs utilization) = FLOPs the model needs per step / step time / peak FLOP/s of the
devices. The model's FLOPs are counted the standard way (PaLM, appendix B): `6 N` per position for
the matmul parameters N (forward 2N, backward 4N) plus `12 L H T` for attention scores and values
(L layers, H = heads x head dim, T sequence length); recomputation under remat is not counted.
Peaks come from datasheets for accelerators and from a measured matmul on the CPU.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

# Dense peak TFLOP/s per chip (TPU) or per GPU, from the vendors' datasheets: (bfloat16, float32).
# TPUs run float32 matmuls as several bfloat16 passes; the bfloat16 peak is the honest ceiling there.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "tpu v4": (275.0, 275.0),
    "tpu v5 lite": (197.0, 197.0),  # v5e
    "tpu v5e": (197.0, 197.0),
    "tpu v5p": (459.0, 459.0),
    "tpu v5": (459.0, 459.0),
    "tpu v6 lite": (918.0, 918.0),  # v6e (Trillium)
    "tpu v6e": (918.0, 918.0),
    "a100": (312.0, 19.5),
    "h100": (989.0, 67.0),  # SXM
    "h200": (989.0, 67.0),
}


def device_peak_flops(device: jax.Device, compute_dtype: str) -> float | None:
    """Datasheet peak FLOP/s of one accelerator, or None when the table does not know it."""
    kind = device.device_kind.lower()
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "tpu v5 lite" before "tpu v5"
        if name in kind:
            bf16, f32 = PEAK_TFLOPS[name]
            return (bf16 if compute_dtype == "bfloat16" else f32) * 1e12
    return None


def measured_cpu_peak_flops(n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of the best float32 `n x n` matmul on the host CPU (all its cores), repeated for
    `seconds` (at least 5 times): on a shared or virtual machine single runs are often slowed by
    neighbours, and a peak measured in such a moment makes every MFU too high."""
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best, start, runs = float("inf"), time.perf_counter(), 0
    while runs < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
        runs += 1
    return 2 * n**3 / best


def peak_flops(devices: list[jax.Device], compute_dtype: str, per_device_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of the whole set of devices this process computes with.

    CPU devices (real or the fake ones of `--xla_force_host_platform_device_count`) share the
    host's cores, so their peak is one measured matmul, not one per device.
    """
    if per_device_tflops:
        return per_device_tflops * 1e12 * len(devices)
    if devices[0].platform == "cpu":
        return measured_cpu_peak_flops()
    one = device_peak_flops(devices[0], compute_dtype)
    return None if one is None else one * len(devices)


def _matmul_params(params: Any, names: tuple[str, ...]) -> int:
    """Elements of the leaves named `names` (QArrays, QLoRA's frozen kernels, count their values)."""
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: hasattr(x, "qvalue"))
    return sum(math.prod(leaf.shape) for path, leaf in leaves if getattr(path[-1], "key", None) in names)


def train_flops_per_position(params: Any, args: Any, seq_len: int, frozen: Any = None) -> float:
    """Training FLOPs per sequence position: `6 N_matmul + 12 L H T` (see the module docstring).

    `params` is the model's pure-dict parameter tree; N_matmul counts every projection kernel
    (stacked layers included) and the output head (the embedding table when tied). With LoRA,
    `params` are the adapters and `frozen` the base: the base's kernels cost `4 N` (the forward
    pass and the input gradients; no weight gradients), the adapters `6 N`.
    """
    base = params if frozen is None else frozen
    matmul = _matmul_params(base, ("kernel",))
    if args.tie_word_embeddings:
        matmul += args.vocab_size * args.hidden_size
    attention = 12 * args.num_layers * args.num_heads * args.head_dim * seq_len
    if frozen is None:
        return 6.0 * matmul + attention
    return 4.0 * matmul + 6.0 * _matmul_params(params, ("lora_a", "lora_b")) + attention
