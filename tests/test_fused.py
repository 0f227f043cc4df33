"""The hand-written backward passes of jaxsft.models.fused equal autodiff of the plain code (the
attention kernel is checked against the reference in test_attention.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.models import fused
from jaxsft.models.fused import gated_mlp

B, T, D, F, K, G, H = 2, 24, 16, 40, 2, 3, 8


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def plain_mlp(x, wg, wu, wd, act):
    return jnp.einsum("BTF,FD->BTD", act(x @ wg) * (x @ wu), wd)


@pytest.mark.parametrize("act", [jax.nn.silu, functools.partial(jax.nn.gelu, approximate=True)], ids=["silu", "gelu"])
def test_gated_mlp_matches_autodiff(act):
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    args = (jax.random.normal(ks[0], (B, T, D)), 0.3 * jax.random.normal(ks[1], (D, F)),
            0.3 * jax.random.normal(ks[2], (D, F)), 0.3 * jax.random.normal(ks[3], (F, D)))
    probe = jax.random.normal(ks[4], (B, T, D))
    ours = jax.value_and_grad(lambda *a: jnp.sum(gated_mlp(*a, act) * probe), argnums=(0, 1, 2, 3))(*args)
    ref = jax.value_and_grad(lambda *a: jnp.sum(plain_mlp(*a, act) * probe), argnums=(0, 1, 2, 3))(*args)
    assert abs(ours[0] - ref[0]) <= 1e-5 * abs(ref[0])
    for a, b in zip(ours[1], ref[1]):
        assert rel(a, b) <= 1e-5


def plain_qkv_rope(x, wq, wk, wv, cos, sin, extras, eps=1e-6, offset=0.0):
    """Projections, biases, q/k RMSNorm and Hugging Face RoPE, each as the plain code computes it."""
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    q, k, v = (jnp.einsum("BTD,DNH->BTNH", x, w) for w in (wq, wk, wv))
    q, k, v = (y + extras[b] if b in extras else y for y, b in ((q, "bq"), (k, "bk"), (v, "bv")))
    if "q_norm" in extras:
        q, k = (y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + eps) * (offset + extras[n])
                for y, n in ((q, "q_norm"), (k, "k_norm")))
    return fused.rope(q, c, s), fused.rope(k, c, s), v


@pytest.mark.parametrize("extras", ["none", "bias", "norm", "both"])
def test_qkv_rope_matches_autodiff(extras):
    """Values and gradients (x, the three kernels, the biases and q/k norm weights) of the
    hand-written q/k/v + RoPE block, for Llama (none), Qwen2 (bias), Qwen3 (norm) and both."""
    ks = jax.random.split(jax.random.PRNGKey(2), 14)
    x = jax.random.normal(ks[0], (B, T, D))
    ws = (0.3 * jax.random.normal(ks[1], (D, K * G, H)), 0.3 * jax.random.normal(ks[2], (D, K, H)),
          0.3 * jax.random.normal(ks[3], (D, K, H)))
    ex = {}
    if extras in ("bias", "both"):
        ex.update(bq=jax.random.normal(ks[8], (K * G, H)), bk=jax.random.normal(ks[9], (K, H)),
                  bv=jax.random.normal(ks[10], (K, H)))
    if extras in ("norm", "both"):
        ex.update(q_norm=1 + 0.2 * jax.random.normal(ks[11], (H,)), k_norm=1 + 0.2 * jax.random.normal(ks[12], (H,)))
    positions = jax.random.randint(ks[4], (B, T), 0, 100)
    angles = positions[..., None] * (1.0 / 10000 ** (jnp.arange(0, H, 2) / H))
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    probes = [jax.random.normal(k, s.shape) for k, s in zip(ks[5:8], plain_qkv_rope(x, *ws, cos, sin, ex))]

    def loss(fn):
        return lambda x, wq, wk, wv, ex: sum(jnp.sum(o * p) for o, p in zip(fn(x, wq, wk, wv, cos, sin, ex), probes))

    for a, b in zip(fused.qkv_rope(x, *ws, cos, sin, ex), plain_qkv_rope(x, *ws, cos, sin, ex)):
        assert a.shape == b.shape and rel(a, b) <= 1e-6
    ours = jax.grad(loss(fused.qkv_rope), argnums=(0, 1, 2, 3, 4))(x, *ws, ex)
    ref = jax.grad(loss(plain_qkv_rope), argnums=(0, 1, 2, 3, 4))(x, *ws, ex)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert rel(a, b) <= 1e-5
    assert jax.tree.structure(ours[4]) == jax.tree.structure(ex)
