"""The GPU attention kernel on a real GPU (skipped on the CPU, where test_attention.py runs it in
Pallas interpret mode); tools/gpu_check.sh is the fuller check. conftest.py makes JAX_PLATFORMS
default to cpu, so on a GPU machine name the platform:
`JAX_PLATFORMS=cuda .venv/bin/python -m pytest -m gpu tests/test_gpu.py`."""

import jax
import jax.numpy as jnp
import pytest

from jaxsft.models import attention
from jaxsft.models.attention import AttentionSpec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs a GPU (tools/gpu_check.sh)")]


def test_gpu_kernel_matches_reference_on_packed_rows():
    seg = jnp.asarray([[1] * 100 + [2] * 156, [1] * 200 + [0] * 56], jnp.int32)
    pos = jnp.asarray([list(range(100)) + list(range(156)), list(range(200)) + [0] * 56], jnp.int32)
    spec = AttentionSpec.packed(seg, pos, scale=0.125)
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (2, 256, 8, 64))
    k, v = (jax.random.normal(x, (2, 256, 2, 64)) for x in ks[1:])
    keep = (seg > 0)[:, :, None, None]
    with jax.default_matmul_precision("highest"):
        ours, ref = attention.gpu(q, k, v, spec) * keep, attention.reference(q, k, v, spec) * keep
    assert float(jnp.linalg.norm(ours - ref) / jnp.linalg.norm(ref)) <= 1e-4
