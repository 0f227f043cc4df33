"""End to end through the CLI: train -> SIGKILL -> resume -> export -> load in transformers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import jax.numpy as jnp
from flax import nnx

from conftest import DEMO_EVAL, DEMO_TRAIN, ROOT
from jaxsft.export import load_checkpoint
from jaxsft.models import abstract_model

STEPS = 12


def command(model_dir: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "jaxsft.cli", "train", str(ROOT / "configs" / "demo.yaml"),
            f"model.path={model_dir}", f"data.train={DEMO_TRAIN}", f"data.eval={DEMO_EVAL}", "data.seq_len=128",
            f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
            "checkpoint.every=3", "checkpoint.keep=2", f"run.dir={run_dir}", "run.export=", "mesh.fsdp=1",
            "optimizer.warmup_steps=2"]


def env() -> dict:
    # One CPU device in the child processes, whatever the test process uses.
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"]) for x in lines if "loss" in x]


def test_kill_resume_export_load(tmp_path, tiny_llama):
    # The uninterrupted reference run.
    ref_dir = tmp_path / "ref"
    subprocess.run(command(tiny_llama, ref_dir), env=env(), check=True, capture_output=True, timeout=300)
    reference = losses(ref_dir)
    assert [s for s, _ in reference] == list(range(1, STEPS + 1))

    # The same run, killed with SIGKILL once its first checkpoint is on disk, then the same command again.
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(tiny_llama, run_dir), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "3").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(s for s, _ in losses(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
    assert killed_at < STEPS, "the run finished before it could be killed"
    resumed = subprocess.run(command(tiny_llama, run_dir), env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert losses(run_dir) == reference  # bitwise: same data order, same updates

    # Export the newest checkpoint and load it in transformers.
    out = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "jaxsft.cli", "export", str(run_dir), str(out)], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = np.random.RandomState(0).randint(0, 512, size=(2, 24))
    with torch.no_grad():
        hf_logits = hf(torch.tensor(tokens)).logits.numpy()

    # jaxsft's logits from the checkpoint itself (not from the export).
    _, _, args, params = load_checkpoint(run_dir / "checkpoints" / str(STEPS))
    ours = np.asarray(nnx.merge(nnx.graphdef(abstract_model(args)), params)(jnp.asarray(tokens)))
    assert np.abs(ours - hf_logits).max() <= 1e-4
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(base(torch.tensor(tokens)).logits.numpy() - hf_logits).max() > 1e-3  # it did train

    # Exporting into a directory that already holds files is refused and changes nothing.
    again = subprocess.run([sys.executable, "-m", "jaxsft.cli", "export", str(run_dir), str(out)], env=env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "not empty" in again.stderr
    assert "Traceback" not in again.stderr
