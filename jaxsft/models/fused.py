"""The decoder's two hot blocks with hand-written backward passes: gated MLP and attention.

Plain autodiff of these blocks is correct but slow and memory-hungry under XLA: it keeps the
`[B, K, G, T, S]` attention probabilities (and the masked scores) of every layer for the backward
pass, and on the CPU it fuses the gated activation's derivative into transposing copies that run
several times slower than the matmuls around them. The custom VJPs here keep only what the
backward pass needs (for attention: q, k, v, the output and the row log-sum-exp, as
FlashAttention does) and recompute the rest, so memory is linear in T per layer and every
backward matmul reads operands in the layout they were produced in.

Both functions take and return plain arrays (the module code casts parameters to the compute
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


def _gated_mlp_bwd(act, residuals, dy):
    x, g, u, w_gate, w_up, w_down = residuals
    a, act_vjp = jax.vjp(act, g)  # elementwise: recomputing act(g) is cheaper than keeping it
    h = a * u
    dh = jnp.einsum("BTD,FD->BTF", dy, w_down)
    du = dh * a
    (dg,) = act_vjp(dh * u)
    dx = jnp.einsum("BTF,DF->BTD", dg, w_gate) + jnp.einsum("BTF,DF->BTD", du, w_up)
    return (dx, jnp.einsum("BTD,BTF->DF", x, dg), jnp.einsum("BTD,BTF->DF", x, du),
            jnp.einsum("BTF,BTD->FD", h, dy))


gated_mlp.defvjp(_gated_mlp_fwd, _gated_mlp_bwd)


# --------------------------------------------------------------------------- attention


def _scores(q, k, scale, softcap):
    """Scaled (and soft-capped) scores `[B, K, G, T, S]` in float32; also the capped value for the backward."""
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    return s


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
              softcap: float | None = None) -> jax.Array:
    """Grouped-query softmax attention: `softmax(where(mask, cap(q k^T * scale)), -inf) v`.

    q: [B, T, K, G, H]; k, v: [B, S, K, H]; mask: bool, broadcastable to [B, 1, 1, T, S] (every
    query row must see at least one key, as causal masks do). Returns [B, T, K, G, H].
    """
    return _attention_fwd(q, k, v, mask, scale, softcap)[0]


def _attention_fwd(q, k, v, mask, scale, softcap):
    s = jnp.where(mask, _scores(q, k, scale, softcap), _NEG)
    lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)  # [B, K, G, T, 1]
    p = jnp.exp(s - lse).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p, v)
    return out, (q, k, v, mask, out, lse)


def _attention_bwd(scale, softcap, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    capped = _scores(q, k, scale, softcap)
    p = jnp.where(mask, jnp.exp(capped - lse), 0.0)  # float32 probabilities, recomputed
    dv = jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(v.dtype), d_out)
    dp = jnp.einsum("BTKGH,BSKH->BKGTS", d_out, v, preferred_element_type=jnp.float32)
    # d softmax: p * (dp - sum_s p dp), and sum_s p dp = sum_h out * d_out.
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", out.astype(jnp.float32), d_out.astype(jnp.float32))[..., None]
    ds = p * (dp - delta)
    if softcap is not None:
        ds = ds * (1.0 - jnp.square(capped / softcap))  # d/dx c tanh(x/c) = 1 - tanh^2
    ds = (ds * scale).astype(q.dtype)
    dq = jnp.einsum("BKGTS,BSKH->BTKGH", ds, k)
    dk = jnp.einsum("BKGTS,BTKGH->BSKH", ds, q)
    return dq, dk, dv, None


attention.defvjp(_attention_fwd, _attention_bwd)
