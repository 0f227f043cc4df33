"""The decoder's hot blocks with hand-written backward passes: gated MLP, q/k/v + RoPE, CPU attention.

Plain autodiff of these blocks is correct but slow and memory-hungry under XLA: it keeps the
`[B, K, G, T, S]` attention probabilities (and the masked scores) of every layer for the backward
pass, and on the CPU it fuses the gated activation's derivative into transposing copies that run
several times slower than the matmuls around them. The custom VJPs here keep only what the
backward pass needs (for attention: q, k, v, the output and the row log-sum-exp, as
FlashAttention does) and recompute the rest, so memory is linear in T per layer and every
backward matmul reads operands in the layout they were produced in.

They take and return plain arrays (the module code casts parameters to the compute
dtype first), and are checked against autodiff of the straightforward code in tests/test_fused.py.

Dimension legend: B batch, T query length, S key length, D model width, F mlp width,
K kv heads, G query heads per kv head, H head dim.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # masked score: exp() underflows to exactly 0


# --------------------------------------------------------------------------- gated MLP


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def gated_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
              act: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """`down(act(x @ w_gate) * (x @ w_up))`: SwiGLU with `act=silu`, GeGLU with a GELU.

    x: [B, T, D]; w_gate, w_up: [D, F]; w_down: [F, D].
    """
    g = jnp.einsum("BTD,DF->BTF", x, w_gate)
    u = jnp.einsum("BTD,DF->BTF", x, w_up)
    return jnp.einsum("BTF,FD->BTD", act(g) * u, w_down)


def _gated_mlp_fwd(x, w_gate, w_up, w_down, act):
    g = jnp.einsum("BTD,DF->BTF", x, w_gate)
    u = jnp.einsum("BTD,DF->BTF", x, w_up)
    return jnp.einsum("BTF,FD->BTD", act(g) * u, w_down), (x, g, u, w_gate, w_up, w_down)


def _gated_mlp_grads(act, x, g, u, w_gate, w_up, w_down, dy, dh_extra=None):
    """`(dx, dw_gate, dw_up, dw_down, dg, du)` of the gated MLP, given the output's cotangent `dy`
    (and, with LoRA on down_proj, `dh_extra`: the cotangent reaching `h = act(g) * u` directly)."""
    a, act_vjp = jax.vjp(act, g)  # elementwise: recomputing act(g) is cheaper than keeping it
    h = a * u
    dh = jnp.einsum("BTD,FD->BTF", dy, w_down)
    if dh_extra is not None:
        dh = dh + dh_extra.astype(dh.dtype)
    du = dh * a
    (dg,) = act_vjp(dh * u)
    dx = jnp.einsum("BTF,DF->BTD", dg, w_gate) + jnp.einsum("BTF,DF->BTD", du, w_up)
    # Each weight gradient contracts over B*T; the narrow operand (x or dy, width D) comes first,
    # since XLA's CPU backend transposes the first operand of such a product into a copy, and a
    # copy of the wide `[B, T, F]` one cost more than the matmul itself. (Where the weights are
    # frozen, LoRA's case, nothing reads these three and XLA drops them.)
    return (dx, jnp.einsum("BTD,BTF->DF", x, dg), jnp.einsum("BTD,BTF->DF", x, du),
            jnp.einsum("BTD,BTF->DF", dy, h).T, dg, du)


def _gated_mlp_bwd(act, residuals, dy):
    return _gated_mlp_grads(act, *residuals, dy)[:4]


gated_mlp.defvjp(_gated_mlp_fwd, _gated_mlp_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def gated_mlp_lora(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, extras: dict,
                   act: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
    """`(down(h), h)` with `h = act(x @ w_gate + lg) * (x @ w_up + lu)`: the gated MLP with LoRA
    adapters' outputs `extras["lg"]`, `extras["lu"]` `[B, T, F]` (each optional) added to the gate
    and up projections, and `h` returned for the down projection's adapter."""
    return _gated_mlp_lora_fwd(x, w_gate, w_up, w_down, extras, act)[0]


def _gated_mlp_lora_fwd(x, w_gate, w_up, w_down, extras, act):
    g = jnp.einsum("BTD,DF->BTF", x, w_gate)
    u = jnp.einsum("BTD,DF->BTF", x, w_up)
    g = g + extras["lg"] if "lg" in extras else g
    u = u + extras["lu"] if "lu" in extras else u
    h = act(g) * u
    # The adapters' outputs are not kept: only their names (None leaves), for the cotangents' structure.
    return (jnp.einsum("BTF,FD->BTD", h, w_down), h), (x, g, u, w_gate, w_up, w_down, dict.fromkeys(extras))


def _gated_mlp_lora_bwd(act, residuals, cts):
    *rest, names = residuals
    x_dtype = rest[0].dtype
    dx, dwg, dwu, dwd, dg, du = _gated_mlp_grads(act, *rest, *cts)
    return dx, dwg, dwu, dwd, {name: {"lg": dg, "lu": du}[name].astype(x_dtype) for name in names}


gated_mlp_lora.defvjp(_gated_mlp_lora_fwd, _gated_mlp_lora_bwd)


# --------------------------------------------------------------------------- attention
#
# Inside, queries are laid out `[B, K, T*G, H]` (row t*G + g) and keys and values `[B, K, S, H]`:
# each score and value product is then one batched matmul over B*K with the rows and keys as its
# matrix dimensions, which XLA's CPU backend runs 2-3x faster than the same einsum in the
# `[B, T, K, G, H]` layout. With `causal=True` the query rows are taken in blocks and each block
# multiplies only the keys up to its own end: the keys after it are masked anyway, so the blocks
# skip nearly half of the score and value products (and their exponentials) at no cost in exactness.
# With a `lookback` (packed rows whose longest example has that many tokens, or a sliding window)
# each block also starts its keys `lookback - 1` before its first query: a block of 32 queries in
# rows of ~130-token examples multiplies ~165 keys instead of up to all 512. Where the score
# passes, not the matmuls, dominate (the CPU), this is where attention's time goes.

CAUSAL_BLOCK = 128  # query positions per block: blocks this size still run the matmuls near full speed
LOOKBACK_BLOCK = 32  # with a lookback, smaller blocks skip more keys
MAX_BLOCKS = 16  # longer sequences use larger blocks, so the unrolled blocks stay few


def _blocks(t: int, s: int, causal: bool, lookback: int = 0) -> list[tuple[int, int, int, int]]:
    """`(first query, end query, first key, end key)` per block: queries `[a, e)` see keys `[k0, k1)`."""
    lookback = lookback if 0 < lookback < t else 0
    size = max(LOOKBACK_BLOCK if lookback else CAUSAL_BLOCK, -(-t // MAX_BLOCKS))
    if not causal or t <= size:
        return [(0, t, 0, s)]
    return [(a, min(t, a + size), max(0, a - lookback + 1) if lookback else 0, min(t, a + size))
            for a in range(0, t, size)]


def _block_scores(qt, kt, structure, a, e, k0, k1, g, scale, softcap, window):
    """Block scores `[B, K, e-a, G, k1-k0]` (float32, capped) and the block's mask, broadcastable to
    them, from the segment ids and positions (`structure`) of the block's queries and keys."""
    b, kh = qt.shape[:2]
    s = jnp.einsum("BKMH,BKSH->BKMS", qt[:, :, a * g:e * g], kt[:, :, k0:k1],
                   preferred_element_type=jnp.float32).reshape(b, kh, e - a, g, k1 - k0) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    seg_q, pos_q, seg_k, pos_k = structure
    dist = pos_q[:, a:e, None] - pos_k[:, None, k0:k1]
    m = (seg_q[:, a:e, None] == seg_k[:, None, k0:k1]) & (dist >= 0)
    if window:
        m &= dist < window
    return s, m.reshape(m.shape[0], 1, e - a, 1, k1 - k0)


def to_inner(q: jax.Array) -> jax.Array:
    """Queries `[B, T, K, G, H]` in the inner layout `[B, K, T*G, H]` (row t*G + g)."""
    b, t, kh, g, h = q.shape
    return q.transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, h)


def from_inner(ot: jax.Array, groups: int) -> jax.Array:
    """The inner layout `[B, K, T*G, H]` back to `[B, T, K, G, H]`."""
    b, kh, tg, h = ot.shape
    return ot.reshape(b, kh, tg // groups, groups, h).transpose(0, 2, 1, 3, 4)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def attention_t(qt: jax.Array, kt: jax.Array, vt: jax.Array, structure: tuple, scale: float,
                softcap: float | None, causal: bool, groups: int, lookback: int, window: int = 0) -> jax.Array:
    """Grouped-query softmax attention `softmax(where(mask, cap(q k^T * scale)), -inf) v` on the
    inner layout: qt [B, K, T*G, H] (row t*G + g), kt, vt [B, K, S, H]; returns [B, K, T*G, H].

    `structure` is `(q_segment_ids [B, T], q_positions, kv_segment_ids [B, S], kv_positions)`: a
    query sees a key of its own segment at a position not after its own (and, with a `window`,
    fewer than `window` positions back); every query must see at least one key. `causal` (S == T,
    packed rows): no key after the query's index is visible, so blocks of queries skip them;
    `lookback` (with `causal`; 0: none): nor any key `lookback` or more positions back, so the
    blocks skip those too. `groups` is G, the query heads per key/value head.
    """
    return _attention_fwd(qt, kt, vt, structure, scale, softcap, causal, groups, lookback, window)[0]


def _attention_fwd(qt, kt, vt, structure, scale, softcap, causal, g, lookback, window=0):
    b, kh, tg, h = qt.shape
    t = tg // g
    outs, lses = [], []
    for a, e, k0, k1 in _blocks(t, kt.shape[2], causal, lookback):
        s, m = _block_scores(qt, kt, structure, a, e, k0, k1, g, scale, softcap, window)
        s = jnp.where(m, s, _NEG)
        top = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - top)
        total = jnp.sum(p, axis=-1, keepdims=True)  # [B, K, e-a, G, 1]
        o = jnp.einsum("BKMS,BKSH->BKMH", p.reshape(b, kh, (e - a) * g, k1 - k0).astype(vt.dtype),
                       vt[:, :, k0:k1], preferred_element_type=jnp.float32)
        outs.append((o / total.reshape(b, kh, (e - a) * g, 1)).astype(vt.dtype))
        lses.append(top + jnp.log(total))
    ot = jnp.concatenate(outs, axis=2)  # [B, K, T*G, H]
    return ot, (qt, kt, vt, structure, ot, jnp.concatenate(lses, axis=2))


def _attention_bwd(scale, softcap, causal, g, lookback, window, residuals, dot):
    qt, kt, vt, structure, ot, lse = residuals  # lse: [B, K, T, G, 1]
    b, kh, tg, h = dot.shape
    t = tg // g
    # d softmax: p * (dp - sum_s p dp), and sum_s p dp = sum_h out * d_out.
    delta = jnp.sum(ot.astype(jnp.float32) * dot.astype(jnp.float32), axis=-1).reshape(b, kh, t, g, 1)
    dk = jnp.zeros(kt.shape, jnp.float32)
    dv = jnp.zeros(vt.shape, jnp.float32)
    dqs = []
    for a, e, k0, k1 in _blocks(t, kt.shape[2], causal, lookback):
        capped, m = _block_scores(qt, kt, structure, a, e, k0, k1, g, scale, softcap, window)
        p = jnp.where(m, jnp.exp(capped - lse[:, :, a:e]), 0.0)  # float32 probabilities, recomputed
        do = dot[:, :, a * g:e * g]
        dv = dv.at[:, :, k0:k1].add(jnp.einsum("BKMS,BKMH->BKSH", p.reshape(b, kh, (e - a) * g, k1 - k0).astype(
            vt.dtype), do, preferred_element_type=jnp.float32))
        dp = jnp.einsum("BKMH,BKSH->BKMS", do, vt[:, :, k0:k1], preferred_element_type=jnp.float32)
        ds = p * (dp.reshape(b, kh, e - a, g, k1 - k0) - delta[:, :, a:e])
        if softcap is not None:
            ds = ds * (1.0 - jnp.square(capped / softcap))  # d/dx c tanh(x/c) = 1 - tanh^2
        ds = (ds * scale).reshape(b, kh, (e - a) * g, k1 - k0).astype(qt.dtype)
        dqs.append(jnp.einsum("BKMS,BKSH->BKMH", ds, kt[:, :, k0:k1]))
        dk = dk.at[:, :, k0:k1].add(jnp.einsum("BKMS,BKMH->BKSH", ds, qt[:, :, a * g:e * g],
                                               preferred_element_type=jnp.float32))
    return jnp.concatenate(dqs, axis=2), dk.astype(kt.dtype), dv.astype(vt.dtype), None


attention_t.defvjp(_attention_fwd, _attention_bwd)


# --------------------------------------------------------------------------- q/k/v projections and RoPE
#
# Autodiff of `rope(x @ wq)` computes the weight gradient as `dq^T x`, and XLA's CPU backend fuses
# the RoPE backward and the attention's layout changes into one copy of dq into `[N*H, B*T]` that
# runs several times slower than a plain transpose. Here the backward undoes RoPE (and the q/k
# norms, where the family has them), puts dq, dk, dv side by side as rows of tokens
# (`[B*T, (N+2K)*H]`), and computes the input gradient and all three weight gradients as one
# matmul each, with x as the first operand of the weight product. Biases and q/k norms (Qwen2,
# Qwen3, Gemma 3) go through the same block, so every family takes this one path.


_LORA_EXTRAS = ("lq", "lk", "lv")


def rope(x, cos, sin):
    """`x cos + rotate_half(x) sin` (Hugging Face's half-split RoPE), cos and sin broadcast to x."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _rope_transposed(dy, cos, sin):
    """The transpose of `rope` (rotating by -angle): the gradient of its input."""
    z1, z2 = jnp.split(dy * sin, 2, axis=-1)
    return dy * cos + jnp.concatenate([z2, -z1], axis=-1)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float) -> jax.Array:
    """`x / rms(x) * (offset + weight)` over the last axis, in float32 (Hugging Face's RMSNorm)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * (offset + weight.astype(jnp.float32))


def _pre_rope(raw, bias, norm, eps, offset):
    """A projection's output before RoPE, in float32: plus its bias, then its RMSNorm (each optional)."""
    y = raw.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(raw.dtype).astype(jnp.float32)
    return rms_norm(y, norm, eps, offset) if norm is not None else y


@partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def qkv_rope(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array, cos: jax.Array, sin: jax.Array,
             extras: dict, eps: float = 1e-6, offset: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys and values of x, with RoPE applied to q and k in x's dtype (as Hugging Face
    does: its cos and sin are cast to the activations' dtype; biases and norms in float32 first).

    x: [B, T, D]; wq: [D, N, H]; wk, wv: [D, K, H]; cos, sin: [B, T, H] (float32). `extras` holds
    what a family adds (each optional): biases `bq` [N, H], `bk`, `bv` [K, H], and the RMSNorm
    weights `q_norm`, `k_norm` [H] applied over H before RoPE (with `eps` and `offset`, 1 for
    Gemma's `1 + weight`), and LoRA adapters' outputs `lq` [B, T, N, H], `lk`, `lv` [B, T, K, H]
    added to the raw projections. Returns q [B, T, N, H], k, v [B, T, K, H] in x's dtype.
    """
    return _qkv_rope_fwd(x, wq, wk, wv, cos, sin, extras, eps, offset)[0]


def _qkv_rope_fwd(x, wq, wk, wv, cos, sin, extras, eps, offset):
    c, s = (a[:, :, None, :].astype(x.dtype) for a in (cos, sin))
    raw_q = jnp.einsum("BTD,DNH->BTNH", x, wq)
    raw_k = jnp.einsum("BTD,DKH->BTKH", x, wk)
    if "lq" in extras:  # LoRA adapters' outputs join the projections before biases, norms and RoPE
        raw_q = raw_q + extras["lq"]
    if "lk" in extras:
        raw_k = raw_k + extras["lk"]
    q = rope(_pre_rope(raw_q, extras.get("bq"), extras.get("q_norm"), eps, offset).astype(x.dtype), c, s)
    k = rope(_pre_rope(raw_k, extras.get("bk"), extras.get("k_norm"), eps, offset).astype(x.dtype), c, s)
    v = jnp.einsum("BTD,DKH->BTKH", x, wv)
    if "lv" in extras:
        v = v + extras["lv"]
    if "bv" in extras:
        v = v + extras["bv"].astype(x.dtype)
    # The raw projections are kept only where a norm's backward needs them (RoPE and biases are affine).
    raws = (raw_q if "q_norm" in extras else None, raw_k if "k_norm" in extras else None)
    # LoRA outputs are not kept (None leaves keep their names): their cotangents need no residual.
    kept = {key: (None if key in _LORA_EXTRAS else value) for key, value in extras.items()}
    return (q, k, v), (x, wq, wk, wv, cos, sin, kept, raws)


def _pre_rope_bwd(d, raw, bias, norm, eps, offset):
    """`(d raw, d bias, d norm)` of `_pre_rope` for the cotangent `d` of its output."""
    if norm is None:
        return d, (None if bias is None else d.astype(jnp.float32).sum(axis=(0, 1)).astype(bias.dtype)), None
    _, vjp = jax.vjp(lambda r, b, w: _pre_rope(r, b, w, eps, offset), raw, bias, norm)
    d_raw, d_bias, d_norm = vjp(d.astype(jnp.float32))
    return d_raw, d_bias, d_norm


def _qkv_rope_bwd(eps, offset, residuals, cts):
    x, wq, wk, wv, cos, sin, extras, (raw_q, raw_k) = residuals
    dq, dk, dv = cts
    b, t, d = x.shape
    c, s = (a[:, :, None, :].astype(x.dtype) for a in (cos, sin))
    dq, d_bq, d_qn = _pre_rope_bwd(_rope_transposed(dq.astype(x.dtype), c, s), raw_q, extras.get("bq"),
                                   extras.get("q_norm"), eps, offset)
    dk, d_bk, d_kn = _pre_rope_bwd(_rope_transposed(dk.astype(x.dtype), c, s), raw_k, extras.get("bk"),
                                   extras.get("k_norm"), eps, offset)
    rows = jnp.concatenate([dq.astype(x.dtype).reshape(b * t, -1), dk.astype(x.dtype).reshape(b * t, -1),
                            dv.astype(x.dtype).reshape(b * t, -1)], axis=1)  # [B*T, (N+2K)*H]
    w = jnp.concatenate([wq.reshape(d, -1), wk.reshape(d, -1), wv.reshape(d, -1)], axis=1)  # [D, (N+2K)*H]
    dx = jnp.einsum("MC,DC->MD", rows, w).reshape(b, t, d)
    dw = jnp.einsum("MD,MC->DC", x.reshape(b * t, d), rows)
    nq, nk = wq.size // d, wk.size // d
    found = {"bq": d_bq, "bk": d_bk, "q_norm": d_qn, "k_norm": d_kn, "lq": dq, "lk": dk, "lv": dv,
             "bv": dv.astype(jnp.float32).sum(axis=(0, 1)) if "bv" in extras else None}
    d_extras = {key: found[key].astype(x.dtype if value is None else value.dtype) for key, value in extras.items()}
    return (dx, dw[:, :nq].reshape(wq.shape), dw[:, nq:nq + nk].reshape(wk.shape), dw[:, nq + nk:].reshape(wv.shape),
            None, None, d_extras)


qkv_rope.defvjp(_qkv_rope_fwd, _qkv_rope_bwd)
