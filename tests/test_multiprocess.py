"""Several processes, as on a multi-host job, on this machine through launch/local_multi.sh.

The demo's training as 2 processes x 4 CPU devices gives the losses of 1 process x 8 devices at
the same global batch, each process reading its own half of the records; a checkpoint written by
2 processes resumes on 1 and one written by 1 resumes on 2, continuing the same losses.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import DEMO_TRAIN, ROOT

STEPS = 4
RECORDS = sum(1 for _ in DEMO_TRAIN.open())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def overrides(model_dir, run_dir) -> list[str]:
    # data.shards=2 on every process count (2 processes default to it): the same global batches.
    return [f"model.path={model_dir}", "data.seq_len=128", "data.shards=2", f"train.steps={STEPS}",
            "train.batch_size=8", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
            "train.eval_generate_every=0", "checkpoint.every=2", "checkpoint.keep=2", f"run.dir={run_dir}", "run.export=", "mesh.fsdp=-1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def run(model_dir, run_dir, env, processes: int, log_dir=None) -> str:
    """Trains (or resumes) `run_dir` on `processes` processes with 8 CPU devices in all; the output
    of process 0."""
    if processes == 1:
        cmd = [sys.executable, "-m", "jaxsft.cli", "train", str(ROOT / "configs" / "demo.yaml")]
        env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    else:
        cmd = ["bash", str(ROOT / "launch" / "local_multi.sh"), "-n", str(processes), "--devices-per-process",
               str(8 // processes), "--port", str(free_port()), "--log-dir", str(log_dir or run_dir.parent / "logs"),
               str(ROOT / "configs" / "demo.yaml")]
    done = subprocess.run(cmd + overrides(model_dir, run_dir), env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def losses(run_dir) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 * abs(b[k]) for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_llama, env):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    run(tiny_llama, run_dir, env, 1)
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    return run_dir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_llama, env):
    base = tmp_path_factory.mktemp("two")
    log_dir = base / "logs"
    run(tiny_llama, base / "run", env, 2, log_dir)
    return base / "run", log_dir


def test_two_processes_match_one_and_read_disjoint_halves(one_process, two_processes):
    run_dir, log_dir = two_processes
    assert close(losses(run_dir), losses(one_process))
    # Each process reports the shard it read: shard p of 2, half of the records.
    for p in (0, 1):
        log = (log_dir / f"process_{p}.log").read_text()
        counts = re.findall(rf"\[process {p}\] data \(shard (\d) of 2\): ([\d,]+) records", log)
        assert counts == [(str(p), f"{RECORDS // 2:,}")], log[-2000:]
    # Shard p holds every other record from record p (tests/test_data.py checks that these are
    # disjoint and together cover the file); each process wrote its shard's iterator state.
    data = run_dir / "checkpoints" / str(STEPS) / "data"
    assert sorted(p.name for p in data.glob("shard_*")) == ["shard_0-of-2.json", "shard_1-of-2.json"]


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)])
def test_checkpoint_of_n_processes_resumes_on_m(tmp_path, tiny_llama, env, one_process, two_processes,
                                                saved_on, resumed_on):
    source = two_processes[0] if saved_on == 2 else one_process
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / str(STEPS))  # as if the job had stopped after step 2
    assert "resumed from" in run(tiny_llama, run_dir, env, resumed_on, tmp_path / "logs")
    assert close(losses(run_dir), losses(one_process))
