"""Every attention backend equals the reference (plain einsum + softmax over the spec's mask).

Forward outputs and q/k/v gradients in float32 (relative difference <= 1e-5) on packed rows of
several segments, grouped-query heads, sliding windows, soft-caps and a lookback bound. The
TPU (splash) and GPU (Pallas) kernels run in Pallas interpret mode on the CPU; on their own
platforms `tools/gpu_check.sh` and the TPU compile run them for real.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.errors import ConfigError
from jaxsft.models import attention, fused
from jaxsft.models.attention import AttentionSpec

B, K, G, H = 2, 2, 3, 16
N = K * G


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def packed(t, cuts):
    """Segment ids and positions of rows cut into examples at `cuts` (one list per row); the
    rest of a row after its last cut is padding (segment 0)."""
    seg, pos = np.zeros((B, t), np.int32), np.zeros((B, t), np.int32)
    for b, row in enumerate(cuts):
        for i, (a, e) in enumerate(zip(row[:-1], row[1:])):
            seg[b, a:e], pos[b, a:e] = i + 1, np.arange(e - a)
    return jnp.asarray(seg), jnp.asarray(pos)


def grads(fn, t, seed, mask):
    """`(value, (dq, dk, dv))` of `sum(fn(q, k, v) * probe)` at random q, k, v and probe; the
    probe is zero on padding queries (whose outputs no loss reads)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = 2 * jax.random.normal(ks[0], (B, t, N, H))
    k = 2 * jax.random.normal(ks[1], (B, t, K, H))
    v = jax.random.normal(ks[2], (B, t, K, H))
    probe = jax.random.normal(ks[3], (B, t, N, H)) * mask[:, :, None, None]
    return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * probe), argnums=(0, 1, 2))(q, k, v)


def assert_same(ours, ref):
    assert abs(ours[0] - ref[0]) <= 1e-5 * abs(ref[0])
    for a, b in zip(ours[1], ref[1]):
        assert rel(a, b) <= 1e-5


BACKENDS = {
    "blocked": attention.blocked,
    "splash": functools.partial(attention.splash, interpret=True),
    "gpu": functools.partial(attention.gpu, interpret=True),
}
# Rows of 128: three and two examples, the second row ending in padding; the longest example is 61.
CUTS_128 = [[0, 40, 101, 128], [0, 57, 100]]


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("window", [0, 24], ids=["full", "window"])
@pytest.mark.parametrize("lookback", [0, 61], ids=["unbounded", "lookback"])
@pytest.mark.parametrize("backend", ["blocked", "splash", "gpu"])
def test_backend_matches_reference(backend, softcap, window, lookback):
    if backend == "gpu" and (softcap or window):
        assert attention._gpu_cannot(jnp.zeros((B, 128, N, H)), None, AttentionSpec.packed(
            *packed(128, CUTS_128), softcap=softcap, window=window)) is not None  # attend() falls back: blocked
        pytest.skip("the GPU kernel has no soft-cap or window; attend() runs blocked for those (tested above)")
    seg, pos = packed(128, CUTS_128)
    spec = AttentionSpec.packed(seg, pos, softcap=softcap, window=window, lookback=lookback, scale=H**-0.5)
    mask = (seg > 0).astype(jnp.float32)
    ours = grads(lambda q, k, v: BACKENDS[backend](q, k, v, spec), 128, 1, mask)
    ref = grads(lambda q, k, v: attention.reference(q, k, v, spec), 128, 1, mask)
    assert_same(ours, ref)


@pytest.mark.parametrize("backend", ["blocked", "splash"])
def test_a_lookback_shorter_than_an_example_is_caught(backend):
    """The lookback is a promise the kernels act on: one shorter than the longest example (61)
    drops keys it needs, so this comparison can fail."""
    seg, pos = packed(128, CUTS_128)
    mask = (seg > 0).astype(jnp.float32)
    ref = grads(lambda q, k, v: attention.reference(q, k, v, AttentionSpec.packed(seg, pos, scale=H**-0.5)), 128, 2,
                mask)
    short = AttentionSpec.packed(seg, pos, lookback=30, scale=H**-0.5)
    ours = grads(lambda q, k, v: BACKENDS[backend](q, k, v, short), 128, 2, mask)
    assert rel(ours[1][0], ref[1][0]) > 1e-3


@pytest.mark.parametrize("block", [8, 7], ids=["blocks-8", "blocks-7"])
@pytest.mark.parametrize("lookback", [0, 12], ids=["causal-blocks", "lookback-blocks"])
def test_blocked_at_block_sizes_that_do_and_do_not_divide_the_row(block, lookback, monkeypatch):
    """The CPU kernel's causal blocks (and lookback blocks) with a short last block."""
    monkeypatch.setattr(fused, "CAUSAL_BLOCK", block)
    monkeypatch.setattr(fused, "LOOKBACK_BLOCK", block)
    t = 24
    blocks = fused._blocks(t, t, True, lookback)
    assert [(a, e) for a, e, _, _ in blocks] == [(a, min(t, a + block)) for a in range(0, t, block)]
    if lookback:
        assert any(k0 > 0 for _, _, k0, _ in blocks)  # keys really are skipped
    seg, pos = packed(t, [[0, 8, 16, 24], [0, 5, 17, 24]])  # the longest example: 12 tokens
    mask = jnp.ones((B, t))
    for softcap, window in ((None, 0), (5.0, 4)):
        spec = AttentionSpec.packed(seg, pos, softcap=softcap, window=window, lookback=lookback, scale=H**-0.5)
        assert_same(grads(lambda q, k, v: attention.blocked(q, k, v, spec), t, 3, mask),
                    grads(lambda q, k, v: attention.reference(q, k, v, spec), t, 3, mask))


def test_blocked_does_not_keep_scores_for_the_backward_pass():
    """Residuals saved for the backward pass: no [.., T, S] array among them."""
    t = 24
    seg, pos = packed(t, [[0, 10, 24], [0, 17, 24]])
    spec = AttentionSpec.packed(seg, pos)
    q, k = jnp.ones((B, t, N, H)), jnp.ones((B, t, K, H))
    _, residuals = jax.vjp(lambda q, k, v: attention.blocked(q, k, v, spec), q, k, k)
    shapes = [x.shape for x in jax.tree.leaves(residuals) if hasattr(x, "shape")]
    assert not any(len(s) >= 2 and s[-2:] == (t, t) for s in shapes), shapes


def test_cached_spec_hides_empty_slots_and_later_positions():
    """Decoding: a query sees filled cache slots at positions up to its own, nothing else."""
    q_pos = jnp.array([[3], [1]])
    kv_pos = jnp.array([[0, 1, 2, 3, 4, -1], [-1, -1, 0, 1, 2, -1]])
    mask = np.asarray(AttentionSpec.cached(q_pos, kv_pos).mask())
    np.testing.assert_array_equal(mask[:, 0], [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]])


def test_gpu_falls_back_to_blocked_where_the_kernel_cannot(capsys):
    seg, pos = packed(128, CUTS_128)
    spec = AttentionSpec.packed(seg, pos, softcap=5.0, scale=H**-0.5, backend="gpu")
    q, k = jnp.ones((B, 128, N, H)), jnp.ones((B, 128, K, H))
    out = attention.attend(q, k, k, spec)
    np.testing.assert_allclose(out, attention.blocked(q, k, k, spec), rtol=1e-6)
    assert "attention: the GPU kernel has no soft-cap; those layers run the blocked backend" in capsys.readouterr().err


def test_resolve_picks_the_platform_backend_and_refuses_what_cannot_run():
    assert [attention.resolve("auto", p) for p in ("tpu", "gpu", "cpu")] == ["splash", "gpu", "blocked"]
    assert attention.resolve("reference", "tpu") == "reference"
    with pytest.raises(ConfigError, match="config key 'model.attention' is 'splash', which runs on TPU only"):
        attention.resolve("splash", "cpu")
    with pytest.raises(ConfigError, match="model.attention"):
        attention.resolve("flash", "gpu")


def test_splash_on_a_mesh_matches_reference():
    """Under `shard_map` on a data=2 x tensor=2 mesh (batch and heads split), as training runs it."""
    from jaxsft import parallel
    from jaxsft.config import MeshConfig

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    seg, pos = packed(128, CUTS_128)
    spec = AttentionSpec.packed(seg, pos, lookback=61, scale=H**-0.5)
    mask = (seg > 0).astype(jnp.float32)

    def sharded(q, k, v):
        with parallel.activation_sharding(mesh):
            return attention.splash(q, k, v, spec, interpret=True)

    assert_same(grads(jax.jit(sharded), 128, 5, mask),
                grads(lambda q, k, v: attention.reference(q, k, v, spec), 128, 5, mask))
