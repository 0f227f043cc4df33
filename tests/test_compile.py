"""`jaxsft compile`: the real train step compiled for a Cloud TPU slice from this CPU host (libtpu)."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT
from jaxsft.aot import parse_topology

pytest.importorskip("libtpu", reason="the TPU compiler (jax[tpu]) is part of the test extra")


def jaxsft_compile(*args):
    return subprocess.run([sys.executable, "-m", "jaxsft.cli", "compile", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": "/tmp"})


@pytest.mark.parametrize("name, expected", [
    ("v5p-8", ("v5p", "2x2x1", 4)), ("v4-16", ("v4", "2x2x2", 8)), ("v5e-16", ("v5e", "4x4", 16)),
    ("v6e-8", ("v6e", "2x4", 8)), ("v5e:2x2", ("v5e", "2x2", 4)),
])
def test_topology_names(name, expected):
    assert parse_topology(name) == expected


def test_tiny_model_on_a_v5e_slice(tiny_llama):
    r = jaxsft_compile(ROOT / "configs" / "demo.yaml", "--topology", "v5e-4", f"model.path={tiny_llama}",
                       "data.seq_len=256")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "TPU v5 lite" in out and "fits" in out and "DOES NOT FIT" not in out
    need, avail = map(float, re.search(r"HBM per chip: ([\d.,]+) GiB needed of ([\d.,]+) GiB", out).groups())
    assert 0 < need < avail == 16.0
    assert float(re.search(r"compile time: ([\d.]+) s", out).group(1)) > 0
    assert float(re.search(r"model 6N\+12LHT ([\d.e+]+)", out).group(1)) > 0
    assert float(re.search(r"step time >= ([\d.e+-]+) s", out).group(1)) > 0
    assert 0 < float(re.search(r"MFU <= ([\d.]+)%", out).group(1)) <= 100


def test_a_model_that_does_not_fit_names_the_problem():
    """Llama 3.1 8B with float32 Adam (128 GB) on four 16 GiB v5e chips: refused with the compiler's numbers."""
    r = jaxsft_compile(ROOT / "configs" / "llama3.1-8b-v5p-8.yaml", "--topology", "v5e-4")
    assert r.returncode != 0
    assert "does not fit on v5e-4" in r.stderr and "HBM" in r.stderr and "Traceback" not in r.stderr
