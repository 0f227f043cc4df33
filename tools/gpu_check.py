#!/usr/bin/env python3
"""The GPU path, checked on a machine with a GPU (run through tools/gpu_check.sh).

1. Every GPU backend of `jaxsft.models.attention` against `reference`: forward outputs and q/k/v
   gradients (relative difference) on packed rows of several segments with padding, GQA, head dims
   64 and 128, rows of 512 and 2048, in float32 (matmuls at "highest" precision: no TF32) and
   bfloat16; a sliding-window and a soft-cap case go through `attend` and fall back to `blocked`.
2. Forward + backward time of `gpu`, `blocked` and `reference` at B=8, T=2048, N=32, K=8, H=128
   in bfloat16 (median of 10 after a warm-up).
3. The demo config trained 30 steps in bfloat16 compute: its log lines (tokens/s, MFU).
Exits 1 when a float32 check is off by more than 1e-4.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from jaxsft.models import attention  # noqa: E402
from jaxsft.models.attention import AttentionSpec  # noqa: E402


def packed(b: int, t: int, seed: int):
    """Rows cut into 2-5 examples, each row ending in some padding."""
    rng = np.random.RandomState(seed)
    seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for r in range(b):
        used = t - rng.randint(1, t // 8)
        cuts = np.sort(rng.choice(np.arange(1, used), rng.randint(1, 5), replace=False))
        for i, (a, e) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, used])):
            seg[r, a:e], pos[r, a:e] = i + 1, np.arange(e - a)
    return jnp.asarray(seg), jnp.asarray(pos)


def inputs(shape, dtype, seg):
    """Random q, k, v of `shape` = (B, T, N, K, H) and a float32 probe that is zero on padding."""
    b, t, n, k, h = shape
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    kk = jax.random.normal(ks[1], (b, t, k, h), dtype)
    v = jax.random.normal(ks[2], (b, t, k, h), dtype)
    probe = jax.random.normal(ks[3], (b, t, n, h), jnp.float32) * (seg > 0)[:, :, None, None]
    return (q, kk, v), probe


def value_and_grads(fn, probe):
    """Jitted `(q, k, v) -> (sum(fn(q, k, v) * probe), (dq, dk, dv))`: forward + backward."""
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * probe),
                                      argnums=(0, 1, 2)))


def grads(fn, shape, dtype, seg):
    qkv, probe = inputs(shape, dtype, seg)
    return value_and_grads(fn, probe)(*qkv)


def rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def check() -> bool:
    ok = True
    for (t, h), dtype in [((512, 64), jnp.float32), ((512, 128), jnp.float32), ((2048, 128), jnp.float32),
                          ((2048, 128), jnp.bfloat16)]:
        shape = (2, t, 8, 2, h)
        seg, pos = packed(2, t, t + h)
        for softcap, window in ((None, 0), (None, 128), (30.0, 0)):
            spec = AttentionSpec.packed(seg, pos, scale=h**-0.5, softcap=softcap, window=window,
                                        lookback=int(jnp.max(pos)) + 1, backend="gpu")
            with jax.default_matmul_precision("highest"):
                ref = grads(lambda q, k, v: attention.reference(q, k, v, spec), shape, dtype, seg)
                ours = grads(lambda q, k, v: attention.attend(q, k, v, spec), shape, dtype, seg)
            errs = [abs(float(ours[0] - ref[0])) / abs(float(ref[0]))] + [rel(a, b) for a, b in zip(ours[1], ref[1])]
            limit = 1e-4 if dtype == jnp.float32 else 3e-2
            verdict = "ok" if max(errs) <= limit else "FAIL"
            ok &= verdict == "ok"
            print(f"gpu vs reference T={t} H={h} {jnp.dtype(dtype).name} softcap={softcap} window={window}: "
                  f"value {errs[0]:.2e}, dq {errs[1]:.2e}, dk {errs[2]:.2e}, dv {errs[3]:.2e} (limit {limit:g}) {verdict}")
    return ok


def timing() -> None:
    b, t, n, k, h = 8, 2048, 32, 8, 128
    seg, pos = packed(b, t, 1)
    for backend in ("gpu", "blocked", "reference"):
        spec = AttentionSpec.packed(seg, pos, scale=h**-0.5, lookback=int(jnp.max(pos)) + 1, backend=backend)
        try:  # one jitted function and one set of inputs: the loop times the compiled program only
            qkv, probe = inputs((b, t, n, k, h), jnp.bfloat16, seg)
            step = value_and_grads(lambda q, k, v: attention.attend(q, k, v, spec), probe)
            jax.block_until_ready(step(*qkv))
            times = []
            for _ in range(10):
                start = time.perf_counter()
                jax.block_until_ready(step(*qkv))
                times.append(time.perf_counter() - start)
            print(f"attention fwd+bwd {backend}: {1000 * statistics.median(times):.1f} ms "
                  f"(B={b} T={t} N={n} K={k} H={h} bfloat16)")
        except Exception as e:  # noqa: BLE001 - e.g. reference running out of memory: say so, go on
            print(f"attention fwd+bwd {backend}: failed ({e.__class__.__name__}: {str(e).splitlines()[0][:160]})")


def train() -> None:
    py = str(ROOT / ".venv" / "bin" / "python")
    subprocess.run([py, "tools/make_tiny_model.py", "runs/tiny-llama", "--data", "configs/demo_data/train.jsonl",
                    "--split-digits"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["rm", "-rf", "runs/gpu-check"], cwd=ROOT, check=True)
    subprocess.run([str(ROOT / ".venv" / "bin" / "jaxsft"), "train", "configs/demo.yaml", "model.path=runs/tiny-llama",
                    "train.steps=30", "train.log_every=10", "train.eval_every=0", "train.eval_generate_every=0",
                    "run.dir=runs/gpu-check", "run.progress=lines",
                    "run.export=", "model.compute_dtype=bfloat16"],  # no export: runs/demo-export is the demo's
                   cwd=ROOT, check=True)


def main() -> int:
    device = jax.devices()[0]
    if device.platform != "gpu":
        print(f"gpu_check: no GPU here (jax sees {device.platform}); run it on a machine with an NVIDIA GPU")
        return 2
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    print(f"machine: {smi or device.device_kind}; jax {jax.__version__}; {len(jax.devices())} GPU(s)")
    ok = check()
    timing()
    train()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
