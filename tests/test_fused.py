"""The hand-written backward passes of jaxsft.models.fused equal autodiff of the plain code."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.models import fused
from jaxsft.models.fused import attention, gated_mlp

B, T, D, F, K, G, H = 2, 24, 16, 40, 2, 3, 8


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def plain_mlp(x, wg, wu, wd, act):
    return jnp.einsum("BTF,FD->BTD", act(x @ wg) * (x @ wu), wd)


def packed_mask(window=None):
    """Two segments per row (lengths 10 and 14 / 17 and 7), causal within each, optional window."""
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b, cut in enumerate((10, 17)):
        seg[b, :cut], seg[b, cut:] = 1, 2
        pos[b, :cut], pos[b, cut:] = np.arange(cut), np.arange(T - cut)
    m = (pos[:, :, None] >= pos[:, None, :]) & (seg[:, :, None] == seg[:, None, :])
    if window is not None:
        m &= pos[:, :, None] - pos[:, None, :] < window
    return jnp.asarray(m[:, None, None])


def plain_attention(q, k, v, mask, scale, softcap):
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask, s, -1e30)
    return jnp.einsum("BKGTS,BSKH->BTKGH", jax.nn.softmax(s, axis=-1), v)


def attention_grads(fn, seed):
    """`(value, (dq, dk, dv))` of `sum(fn(q, k, v) * probe)` at random q, k, v and probe."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = 2 * jax.random.normal(ks[0], (B, T, K, G, H))
    k = 2 * jax.random.normal(ks[1], (B, T, K, H))
    v = jax.random.normal(ks[2], (B, T, K, H))
    probe = jax.random.normal(ks[3], (B, T, K, G, H))
    return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * probe), argnums=(0, 1, 2))(q, k, v)


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


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("block", [None, 8, 7], ids=["one-block", "causal-blocks-8", "causal-blocks-7"])
def test_attention_matches_autodiff(softcap, window, block, monkeypatch):
    """Also with the causal blocks (queries of each block see only the keys up to its end), at
    block sizes that divide T and that leave a short last block."""
    if block is not None:
        monkeypatch.setattr(fused, "CAUSAL_BLOCK", block)
        assert len(fused._blocks(T, T, True)) == -(-T // block)
    mask = packed_mask(window)
    ours = attention_grads(lambda q, k, v: attention(q, k, v, mask, H**-0.5, softcap, block is not None), seed=1)
    ref = attention_grads(lambda q, k, v: plain_attention(q, k, v, mask, H**-0.5, softcap), seed=1)
    assert abs(ours[0] - ref[0]) <= 1e-5 * abs(ref[0])
    for a, b in zip(ours[1], ref[1]):
        assert rel(a, b) <= 1e-5


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("window,lookback", [(None, 17), (4, 4), (None, 20)], ids=["longest", "window", "longer"])
@pytest.mark.parametrize("block", [4, 7])
def test_attention_lookback_matches_autodiff(softcap, window, lookback, block, monkeypatch):
    """With `lookback` (the longest packed example, 17 tokens here, or the window) the blocks skip
    the keys further back, and values and gradients stay those of the whole masked attention."""
    monkeypatch.setattr(fused, "LOOKBACK_BLOCK", block)
    blocks = fused._blocks(T, T, True, lookback)
    assert [(a, e) for a, e, _, _ in blocks] == [(a, min(T, a + block)) for a in range(0, T, block)]
    assert all(k0 == max(0, a - lookback + 1) and k1 == e for a, e, k0, k1 in blocks)
    assert any(k0 > 0 for _, _, k0, _ in blocks)  # keys really are skipped
    mask = packed_mask(window)
    ours = attention_grads(lambda q, k, v: attention(q, k, v, mask, H**-0.5, softcap, True, lookback), seed=4)
    ref = attention_grads(lambda q, k, v: plain_attention(q, k, v, mask, H**-0.5, softcap), seed=4)
    assert abs(ours[0] - ref[0]) <= 1e-5 * abs(ref[0])
    for a, b in zip(ours[1], ref[1]):
        assert rel(a, b) <= 1e-5
    if window is None:  # a lookback shorter than the longest example drops keys it needs: the test can fail
        short = attention_grads(lambda q, k, v: attention(q, k, v, mask, H**-0.5, softcap, True, 12), seed=4)
        assert rel(short[1][0], ref[1][0]) > 1e-3


def test_attention_does_not_keep_scores_for_the_backward_pass():
    """Residuals saved for the backward pass: no [.., T, S] array among them."""
    q = jnp.ones((B, T, K, G, H))
    k = v = jnp.ones((B, T, K, H))
    mask = packed_mask()
    _, residuals = jax.vjp(lambda q, k, v: attention(q, k, v, mask, 1.0), q, k, v)
    shapes = [x.shape for x in jax.tree.leaves(residuals) if hasattr(x, "shape")]
    assert not any(s[-2:] == (T, T) and len(s) == 5 and s[1:3] == (K, G) for s in shapes), shapes


def plain_qkv_rope(x, wq, wk, wv, cos, sin):
    """Projections and Hugging Face RoPE, then the inner layout, as the decoder's plain path computes them."""
    from jaxsft.models.decoder import apply_rope

    q = apply_rope(jnp.einsum("BTD,DNH->BTNH", x, wq), cos, sin)
    k = apply_rope(jnp.einsum("BTD,DKH->BTKH", x, wk), cos, sin)
    v = jnp.einsum("BTD,DKH->BTKH", x, wv)
    b, t, n, h = q.shape
    kh = k.shape[2]
    return (q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * (n // kh), h),
            k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))


def test_qkv_rope_matches_autodiff():
    """Values and gradients (x and the three kernels) of the hand-written q/k/v + RoPE block."""
    ks = jax.random.split(jax.random.PRNGKey(2), 8)
    x = jax.random.normal(ks[0], (B, T, D))
    ws = (0.3 * jax.random.normal(ks[1], (D, K * G, H)), 0.3 * jax.random.normal(ks[2], (D, K, H)),
          0.3 * jax.random.normal(ks[3], (D, K, H)))
    positions = jax.random.randint(ks[4], (B, T), 0, 100)
    angles = positions[..., None] * (1.0 / 10000 ** (jnp.arange(0, H, 2) / H))
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    probes = [jax.random.normal(k, s.shape) for k, s in zip(ks[5:], plain_qkv_rope(x, *ws, cos, sin))]

    def loss(fn):
        return lambda x, wq, wk, wv: sum(jnp.sum(o * p) for o, p in zip(fn(x, wq, wk, wv, cos, sin), probes))

    for a, b in zip(fused.qkv_rope(x, *ws, cos, sin), plain_qkv_rope(x, *ws, cos, sin)):
        assert a.shape == b.shape and rel(a, b) <= 1e-6
    ours = jax.grad(loss(fused.qkv_rope), argnums=(0, 1, 2, 3))(x, *ws)
    ref = jax.grad(loss(plain_qkv_rope), argnums=(0, 1, 2, 3))(x, *ws)
    for a, b in zip(ours, ref):
        assert rel(a, b) <= 1e-5
