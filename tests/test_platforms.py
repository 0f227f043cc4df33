"""The CLI names the host's JAX platforms when JAX_PLATFORMS is unset: no libtpu errors without a TPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO_TRAIN, ROOT
from jaxsft.platforms import host_platforms

LIBTPU_LINES = ("host bounds", "TPU_WORKER_HOSTNAMES", "Source Location Trace")


def fake_host(environ=(), devices=(), which=(), installed=("libtpu",)):
    """`host_platforms` on a made-up host: these variables, device nodes, commands, packages."""
    return host_platforms(dict(environ), devices=lambda pattern: [d for d in devices if Path(d).match(pattern)],
                          which=lambda cmd: f"/usr/bin/{cmd}" if cmd in which else None,
                          installed=lambda module: module in installed)


@pytest.mark.parametrize("host, expected", [
    (dict(), "cpu"),
    (dict(environ={"JAX_PLATFORMS": ""}), "cpu"),  # empty is unset, as JAX reads it
    (dict(environ={"JAX_PLATFORMS": "cpu"}), None),  # the user's choice stands
    (dict(installed=()), None),  # no libtpu: nothing would complain
    (dict(devices=["/dev/accel0"]), None),  # a TPU v4 host
    (dict(devices=["/dev/vfio/0", "/dev/vfio/vfio"]), None),  # a TPU v5e/v6e host
    (dict(devices=["/dev/vfio/vfio"]), "cpu"),  # the VFIO control node alone is no TPU
    (dict(environ={"TPU_ACCELERATOR_TYPE": "v5litepod-8"}), None),  # a TPU VM
    (dict(environ={"TPU_WORKER_HOSTNAMES": "localhost"}), None),
    (dict(environ={"TPU_SKIP_MDS_QUERY": "1"}), None),
    (dict(devices=["/dev/nvidia0"], installed=("libtpu", "jax_cuda12_plugin")), "cuda,cpu"),
    (dict(which=["nvidia-smi"], installed=("libtpu", "jax_cuda13_plugin")), "cuda,cpu"),
    (dict(devices=["/dev/nvidia0"]), "cpu"),  # a GPU but no CUDA plugin: JAX could not use it
])
def test_host_platforms(host, expected):
    assert fake_host(**host) == expected


def jaxsft_command() -> list[str]:
    script = Path(sys.executable).parent / "jaxsft"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "jaxsft.cli"]


@pytest.mark.skipif(host_platforms({}) != "cpu", reason="a TPU or GPU host, or libtpu is not installed")
def test_train_without_jax_platforms_prints_no_libtpu_errors(tmp_path, tiny_llama):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(DEMO_TRAIN.read_text().splitlines(keepends=True)[:16]))
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS") and not k.startswith("TPU_")}
    r = subprocess.run([*jaxsft_command(), "train", str(ROOT / "configs" / "demo.yaml"), f"model.path={tiny_llama}",
                        f"data.train={data}", "data.eval=[]", "data.seq_len=128", "train.steps=1", "train.batch_size=8",
                        "mesh.data=1", "mesh.fsdp=-1", f"run.dir={tmp_path / 'run'}", "run.export=", "run.plot=false",
                        "run.tensorboard=false"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [line for line in r.stderr.splitlines() if any(s in line for s in LIBTPU_LINES)], r.stderr[:3000]
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
