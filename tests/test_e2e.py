"""End to end through the CLI, in subprocesses: a reference run; the same run killed with SIGKILL at
three random steps and rerun each time (its metrics equal the reference bit for bit); SIGTERM saves
the current step and exits 0; export of the run loads in transformers with jaxsft's logits."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import jax.numpy as jnp
from flax import nnx

from conftest import DEMO_EVAL, DEMO_TRAIN, ROOT
from jaxsft import cli
from jaxsft.checkpoint import Checkpointer
from jaxsft.runmodel import load_checkpoint
from jaxsft.models import abstract_model

STEPS, EVERY = 12, 2


def command(model_dir: Path, run_dir: Path, every: int = EVERY) -> list[str]:
    return [sys.executable, "-m", "jaxsft.cli", "train", str(ROOT / "configs" / "demo.yaml"),
            f"model.path={model_dir}", f"data.train={DEMO_TRAIN}", f"data.eval={DEMO_EVAL}", "data.seq_len=128",
            f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
            "train.eval_generate_every=0", f"checkpoint.every={every}", "checkpoint.keep=2", f"run.dir={run_dir}",
            "run.export=", "mesh.fsdp=1",
            "optimizer.warmup_steps=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """One CPU device in the child processes, whatever the test process uses, and a compilation
    cache they share (each run compiles the same step: only the first pays for it)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"]) for x in lines if "loss" in x]


def interrupt(cmd: list[str], env: dict, at_step: int, sig: int, delay: float = 0.0) -> tuple[int, str]:
    """Runs `cmd`, sends `sig` `delay` seconds after it logs step `at_step`; `(returncode, stderr)`."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        match = re.match(r"step (\d+)/", line)
        if match and int(match.group(1)) >= at_step:
            time.sleep(delay)
            proc.send_signal(sig)
            break
    seen += proc.stderr.readlines()
    return proc.wait(timeout=120), "".join(seen)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama, env) -> Path:
    """The uninterrupted run's directory."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(command(tiny_llama, run_dir), env=env, check=True, capture_output=True, timeout=300)
    assert [s for s, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    return run_dir


def test_sigkill_at_random_steps_then_rerun_is_bitwise_identical(tmp_path, tiny_llama, env, reference):
    rng = random.Random(0)
    # Steps after the first checkpoint; each kill lands up to 0.1 s after the step is logged, so
    # inside a later step, a save, or a deletion of an old checkpoint.
    kill_at = sorted(rng.sample(range(EVERY + 1, STEPS), 3))
    run_dir = tmp_path / "run"
    for step in kill_at:
        code, stderr = interrupt(command(tiny_llama, run_dir), env, step, signal.SIGKILL, rng.uniform(0, 0.1))
        assert code == -signal.SIGKILL, stderr
    final = subprocess.run(command(tiny_llama, run_dir), env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert "resumed from" in final.stderr
    assert losses(run_dir) == losses(reference)  # bitwise: same data order, same updates
    evals = [x for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in x]
    assert [x["step"] for x in evals] == [0, STEPS]  # each line once: what a killed run wrote past its checkpoint is dropped


def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path, tiny_llama, env):
    run_dir = tmp_path / "run"
    # No regular saves before the end: the checkpoint can only come from the SIGTERM.
    code, stderr = interrupt(command(tiny_llama, run_dir, every=100), env, 4, signal.SIGTERM)
    assert code == 0, stderr
    assert "preempted" in stderr and "Traceback" not in stderr
    logged = max(s for s, _ in losses(run_dir))
    saved = Checkpointer(run_dir / "checkpoints", read_only=True).latest_step()
    assert 4 <= saved == logged < STEPS
    assert {p.name for p in (run_dir / "checkpoints" / str(saved)).iterdir()} >= {"state", "data", "config"}


def test_export_loads_in_transformers_with_jaxsft_logits(tmp_path, tiny_llama, env, reference, capsys):
    out = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "jaxsft.cli", "export", str(reference), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    original = json.loads((tiny_llama / "config.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in exported.items() if k != "dtype"} == {k: v for k, v in original.items() if k != "dtype"}
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = np.random.RandomState(0).randint(0, 512, size=(2, 24))
    with torch.no_grad():
        hf_logits = hf(torch.tensor(tokens)).logits.numpy()

    # jaxsft's logits from the checkpoint itself (not from the export).
    _, _, args, params = load_checkpoint(reference / "checkpoints" / str(STEPS))
    ours = np.asarray(nnx.merge(nnx.graphdef(abstract_model(args)), params)(jnp.asarray(tokens)))
    assert np.abs(ours - hf_logits).max() <= 1e-4
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(base(torch.tensor(tokens)).logits.numpy() - hf_logits).max() > 1e-3  # it did train

    # Exporting into a directory that already holds files is refused and changes nothing.
    capsys.readouterr()
    assert cli.main(["export", str(reference), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
