"""Attention: one entry point, `attend(q, k, v, spec)`, with one backend per platform.

The model says *what* to attend to with a small `AttentionSpec` (segment ids and positions of the
queries and keys, causal, a sliding window, a soft-cap, the scale, and how far back any key can be
visible); this module decides *how*:

- `reference`: plain einsum + softmax over the mask the spec describes. The oracle of the tests,
  and the decoding path (queries against a KV cache) on every platform.
- `blocked`: the CPU kernels of `jaxsft.models.fused`: causal query blocks that skip the keys
  after them and further back than the lookback, with a backward pass that recomputes the
  probabilities (memory linear in T).
- `splash`: TPU, Pallas splash attention (segment ids, causal or local masks, GQA, soft-cap),
  applied per batch row under `shard_map` (batch over the data-parallel axes, heads over
  `tensor`): Mosaic kernels are not partitioned automatically.
- `gpu`: Pallas' GPU flash attention (`jax.experimental.pallas.ops.gpu.attention.mha`), which
  keeps packed examples apart by segment ids. It has no soft-cap and no window: such layers run
  `blocked` instead, with a one-line notice.

`resolve(name, platform)` turns `model.attention` (`auto` by default: splash on TPU, gpu on GPU,
blocked on CPU) into a backend name, refusing a backend the platform cannot run.

Semantics. A query sees a key when both carry the same segment id, the key's position is not
after the query's (`0 <= q_pos - k_pos`), and, with a window `w`, `q_pos - k_pos < w`. With
`causal=True` the keys are the queries' own tokens (training on packed rows): each segment is one
run whose positions count up by one, so these rules are also index-causal, which the kernels rely
on. `lookback` (0: unknown) promises that no segment is longer, so no key that many tokens back is
visible; kernels may skip those keys. Layout: q `[B, T, N, H]`, k and v `[B, S, K, H]` (N = K * G
query heads share each of the K key/value heads), output `[B, T, N, H]`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.errors import ConfigError
from jaxsft.models import fused

BACKENDS = ("reference", "blocked", "splash", "gpu")
AUTO = {"tpu": "splash", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "cpu": "blocked"}
_RUNS_ON = {"reference": None, "blocked": None, "splash": ("tpu",), "gpu": ("gpu", "cuda")}
_NEG = -0.7 * float(np.finfo(np.float32).max)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["q_segment_ids", "q_positions", "kv_segment_ids", "kv_positions"],
                   meta_fields=["causal", "window", "lookback", "softcap", "scale", "backend"])
@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What attention computes, as structure instead of a dense mask (see the module docstring)."""

    q_segment_ids: jax.Array  # [B, T] int32; 0 = padding (padding sees padding)
    q_positions: jax.Array  # [B, T] int32
    kv_segment_ids: jax.Array  # [B, S]
    kv_positions: jax.Array  # [B, S]
    causal: bool = True  # keys are the queries' own tokens (S == T), in packed-row order
    window: int = 0  # a query sees itself and the window-1 tokens before it; 0 = all
    lookback: int = 0  # no segment is longer than this (0: unknown)
    softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    scale: float = 1.0
    backend: str = "reference"

    @classmethod
    def packed(cls, segment_ids: jax.Array, positions: jax.Array, **static) -> "AttentionSpec":
        """Self-attention over packed rows (training, eval, prefill without a cache)."""
        return cls(segment_ids, positions, segment_ids, positions, causal=True, **static)

    @classmethod
    def cached(cls, q_positions: jax.Array, kv_positions: jax.Array, **static) -> "AttentionSpec":
        """Queries against KV-cache slots: slot positions -1 are empty (never seen)."""
        return cls(jnp.ones_like(q_positions), q_positions, (kv_positions >= 0).astype(jnp.int32), kv_positions,
                   causal=False, **static)

    def replace(self, **changes) -> "AttentionSpec":
        return dataclasses.replace(self, **changes)

    @property
    def skip(self) -> int:
        """How far back a kernel may stop reading keys: the shorter of the lookback and the window (0: none)."""
        bounds = [b for b in (self.lookback, self.window) if b]
        return min(bounds) if bounds and self.causal else 0

    def mask(self) -> jax.Array:
        """The dense boolean mask `[B, T, S]` this spec describes (the reference backend's)."""
        dist = self.q_positions[:, :, None] - self.kv_positions[:, None, :]
        visible = (self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]) & (dist >= 0)
        if self.causal:  # index order too: what the kernels assume of packed rows, and padding stays causal
            t, s = self.q_positions.shape[1], self.kv_positions.shape[1]
            visible &= jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
        if self.window:
            visible &= dist < self.window
        return visible


def resolve(name: str, platform: str) -> str:
    """The backend `model.attention` = `name` means on devices of `platform`; refuses one that
    cannot run there, naming the key."""
    if name == "auto":
        return AUTO.get(platform, "blocked")
    if name not in BACKENDS:
        raise ConfigError(f"config key 'model.attention' is {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    runs_on = _RUNS_ON[name]
    if runs_on is not None and platform not in runs_on:
        raise ConfigError(f"config key 'model.attention' is {name!r}, which runs on {runs_on[0].upper()} only; this "
                          f"run's devices are {platform} (use auto, blocked or reference)")
    return name


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> jax.Array:
    """Grouped-query softmax attention of q `[B, T, N, H]` over k, v `[B, S, K, H]` as `spec`
    describes, by `spec.backend`; returns `[B, T, N, H]` in v's dtype."""
    backend = spec.backend
    if not spec.causal:  # queries against a cache: the kernels' block structure does not apply
        backend = "reference"
    if backend == "gpu" and (reason := _gpu_cannot(q, k, spec)):
        _notice(f"attention: the GPU kernel has no {reason}; those layers run the blocked backend")
        backend = "blocked"
    return {"reference": reference, "blocked": blocked, "splash": splash, "gpu": gpu}[backend](q, k, v, spec)


def attend_layer(q: jax.Array, k: jax.Array, v: jax.Array, specs: Sequence[AttentionSpec],
                 kind: jax.Array | int = 0) -> jax.Array:
    """`attend` with the spec of this layer's kind: `specs` holds one spec per distinct window of
    the model; inside a scan over layers `kind` is traced and picks one with `lax.switch` (each
    branch has static masks, as the kernels need)."""
    if len(specs) == 1:
        return attend(q, k, v, specs[0])
    if isinstance(kind, int):
        return attend(q, k, v, specs[kind])
    return jax.lax.switch(kind, [functools.partial(attend, spec=s) for s in specs], q, k, v)


_SAID: set[str] = set()


def _notice(text: str) -> None:
    """Prints `text` once per process (at trace time)."""
    if text not in _SAID:
        _SAID.add(text)
        print(text, file=sys.stderr, flush=True)


def _capped(s: jax.Array, cap: float | None) -> jax.Array:
    return s if cap is None else cap * jnp.tanh(s / cap)


# --------------------------------------------------------------------------- reference


def reference(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> jax.Array:
    """Plain attention: `[B, K, G, T, S]` float32 scores, masked, softmax, times v."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * spec.scale
    s = jnp.where(spec.mask()[:, None, None], _capped(s, spec.softcap), _NEG)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(v.dtype)


# --------------------------------------------------------------------------- blocked (CPU)


def blocked(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> jax.Array:
    """`fused.attention_t` in its inner layout; masks per block from the spec's segment ids and positions."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    qt = fused.to_inner(q.reshape(b, t, kh, g, h))
    structure = (spec.q_segment_ids, spec.q_positions, spec.kv_segment_ids, spec.kv_positions)
    ot = fused.attention_t(qt, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), structure, spec.scale,
                           spec.softcap, spec.causal, g, spec.skip, spec.window)
    return fused.from_inner(ot, g).reshape(b, t, n, h)


# --------------------------------------------------------------------------- splash (TPU)

SPLASH_BLOCK = 512  # query/key block of the splash kernels (smaller for shorter rows)


def _splash_block(t: int) -> int:
    block = min(SPLASH_BLOCK, t)
    while t % block:
        block //= 2
    return block


def _splash_kernel(heads: int, t: int, spec: AttentionSpec, interpret: bool):
    """The splash kernel for one batch row of `heads` query heads (built at trace time: static masks)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if spec.skip and spec.skip < t:  # nothing `skip` or more tokens back is visible: the kernel skips those blocks
        mask = sm.LocalMask((t, t), window_size=(spec.skip - 1, 0), offset=0)
    else:
        mask = sm.CausalMask((t, t))
    block = _splash_block(t)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(sm.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              attn_logits_soft_cap=spec.softcap, interpret=interpret)


def _splash_rows(q, k, v, segment_ids, spec: AttentionSpec, interpret: bool):
    """Splash on local rows: q `[B, T, N, H]`, k, v `[B, T, K, H]`, segment ids `[B, T]`."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, h = q.shape
    kernel = _splash_kernel(n, t, spec, interpret)
    # The kernel has no scale argument: scale q (in float32, then back to the compute dtype).
    qs = (q.astype(jnp.float32) * spec.scale).astype(q.dtype).transpose(0, 2, 1, 3)
    out = jax.vmap(kernel)(qs, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                           sk.SegmentIds(q=segment_ids, kv=segment_ids))
    return out.transpose(0, 2, 1, 3).astype(v.dtype)


def splash(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, *, interpret: bool = False) -> jax.Array:
    """Splash attention, per batch row, under `shard_map` on the active mesh (batch over the
    data-parallel axes, heads over `tensor` where they divide), or directly without one."""
    return _per_shard(functools.partial(_splash_rows, spec=spec, interpret=interpret), q, k, v, spec.q_segment_ids)


def _per_shard(rows, q, k, v, segment_ids):
    """`rows(q, k, v, segment_ids)` on each device's rows and heads under `shard_map` on the active
    mesh (batch over the data-parallel axes, heads over `tensor` where they divide): Pallas kernels
    are not partitioned automatically. Without a mesh (or on one device), `rows` on the whole arrays."""
    from jaxsft import parallel

    mesh = parallel.active_mesh()
    if mesh is None or mesh.size == 1:
        return rows(q, k, v, segment_ids)
    from jax.sharding import PartitionSpec as P

    batch = parallel.mesh_axes("batch", q.shape[0], mesh)
    heads = parallel.mesh_axes("heads", min(q.shape[2], k.shape[2]), mesh)
    qkv = P(batch, None, heads, None)
    return jax.shard_map(rows, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=qkv,
                         check_vma=False)(q, k, v, segment_ids)


# --------------------------------------------------------------------------- gpu (Pallas, Triton)


def _gpu_cannot(q: jax.Array, k: jax.Array, spec: AttentionSpec) -> str | None:
    """What the GPU kernel lacks for this call (None: it can run it)."""
    if spec.softcap is not None:
        return "soft-cap"
    if spec.window and spec.window < q.shape[1]:
        return "sliding window"
    if q.shape[1] % min(128, q.shape[1]):
        return f"support for rows of {q.shape[1]} tokens (not a multiple of 128)"
    return None


def gpu(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, *, interpret: bool = False) -> jax.Array:
    """Pallas GPU flash attention with segment ids (causal); k/v heads repeated to the query heads
    (the kernel takes equal head counts)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    g = q.shape[2] // k.shape[2]
    block = min(128, q.shape[1])
    sizes = pallas_gpu.BlockSizes(block_q=block, block_k=block, block_q_dkv=block, block_kv_dkv=block,
                                  block_q_dq=block, block_kv_dq=block)

    def rows(q, k, v, seg):
        k, v = (jnp.repeat(x, g, axis=2) if g > 1 else x for x in (k, v))
        return pallas_gpu.mha(q, k, v, seg, sm_scale=spec.scale, causal=True, block_sizes=sizes, interpret=interpret)

    return _per_shard(rows, q, k, v, spec.q_segment_ids)
