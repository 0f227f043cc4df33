"""Checkpoints: restore onto another mesh, what a checkpoint holds, interrupted saves, the SIGTERM
flag, and the non-finite guard (stop, or skip leaving the state untouched)."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DEMO_TRAIN
from jaxsft import parallel
from jaxsft.checkpoint import Checkpointer, Preemption, SavedArrays
from jaxsft.config import load_config, to_dict
from jaxsft.errors import JaxsftError, NonFiniteError
from jaxsft.train import train

VOCAB = 512  # tiny_llama's


def config(model_dir, run_dir, *overrides):
    return load_config(None, [
        f"model.path={model_dir}", f"data.train={DEMO_TRAIN}", "data.seq_len=128", "train.steps=4",
        "train.batch_size=8", "train.log_every=1", "optimizer.lr=1e-3", "optimizer.warmup_steps=1",
        "checkpoint.every=2", "checkpoint.keep=5", f"run.dir={run_dir}", "mesh.fsdp=1", *overrides])


def metrics(run_dir) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x for x in lines if "loss" in x}


def test_saved_on_eight_devices_resumes_on_one_and_two(tmp_path, tiny_llama):
    """fsdp=8 -> 1 and 2 devices: the arrays are resharded as they are read, the data resumes in place."""
    assert len(jax.devices()) == 8
    eight = tmp_path / "eight"
    cfg = config(tiny_llama, eight, "mesh.fsdp=8")
    train(cfg, devices=jax.devices())
    reference = metrics(eight)
    assert sorted(reference) == [1, 2, 3, 4]

    ckpt = Checkpointer(eight / "checkpoints", read_only=True)
    resolved = to_dict(cfg)
    resolved["data"]["shards"] = 1  # data.shards=0 resolved: one shard per process
    assert ckpt.read_config(2) == resolved  # the resolved config travels with the checkpoint
    q = SavedArrays(ckpt.step_dir(2)).tree["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape[0] == 2 and q.storage.chunk_shape[0] == 1  # one layer per chunk, for export

    for n in (1, 2):
        run_dir = tmp_path / f"on_{n}"
        shutil.copytree(eight, run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "4")  # as if the 8-device run had stopped after step 2
        train(config(tiny_llama, run_dir, "mesh.fsdp=-1"), devices=jax.devices()[:n])
        resumed = metrics(run_dir)
        assert sorted(resumed) == [1, 2, 3, 4]
        for step in (3, 4):
            a, b = resumed[step]["loss"], reference[step]["loss"]
            assert abs(a - b) <= 1e-6 * abs(b), (n, step, a, b)


def test_interrupted_save_is_ignored_and_cleaned_up(tmp_path):
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.ones((), jnp.int32)}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state)
    assert not ckpt.save(1, state)  # a step already saved is not saved again (SIGTERM right after a save)
    ckpt.close()
    # What a save killed half-way leaves: Orbax's temporary directory, never renamed.
    partial = tmp_path / "2.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "1", partial)
    (partial / "commit_success.txt").unlink(missing_ok=True)
    assert Checkpointer(tmp_path, read_only=True).latest_step() == 1
    resumed = Checkpointer(tmp_path)  # the rerun: resumes from step 1, then saves step 2 again
    assert resumed.latest_step() == 1
    resumed.save(2, state)
    resumed.close()
    assert not partial.exists() and resumed.latest_step() == 2


def test_sigterm_sets_the_preemption_flag_and_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with Preemption(Checkpointer(tmp_path)) as preemption:
        assert not preemption.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.reached(2)
    assert signal.getsignal(signal.SIGTERM) is before


def poison_step(monkeypatch, step: int) -> None:
    """Makes the batch of `step` hold token ids past the vocabulary: NaN embeddings, NaN loss."""
    real, calls = parallel.global_batch, []

    def global_batch(local, mesh):
        calls.append(1)
        if len(calls) == step:
            local = dict(local, tokens=np.full_like(local["tokens"], VOCAB))
        return real(local, mesh)

    monkeypatch.setattr(parallel, "global_batch", global_batch)


def test_nonfinite_loss_stops_the_run_without_saving_it(tmp_path, tiny_llama, monkeypatch):
    poison_step(monkeypatch, 2)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="step 2: loss nan") as e:
        train(config(tiny_llama, run_dir, "checkpoint.every=1", "train.steps=3"), devices=jax.devices()[:1])
    assert isinstance(e.value, JaxsftError)  # the CLI prints the message and exits 2
    assert Checkpointer(run_dir / "checkpoints", read_only=True).manager.all_steps() == [1]
    assert sorted(metrics(run_dir)) == [1]


def test_nonfinite_loss_skips_the_update_when_configured(tmp_path, tiny_llama, monkeypatch):
    poison_step(monkeypatch, 2)
    run_dir = tmp_path / "run"
    train(config(tiny_llama, run_dir, "checkpoint.every=1", "train.steps=3", "train.nonfinite=skip",
                 "optimizer.warmup_steps=0"), devices=jax.devices()[:1])
    logged = metrics(run_dir)
    assert np.isnan(logged[2]["loss"]) and logged[2]["skipped_steps"] == 1
    assert np.isfinite(logged[3]["loss"]) and logged[3]["skipped_steps"] == 1

    def arrays(step):
        saved = SavedArrays(run_dir / "checkpoints" / str(step))
        tree = {k: saved.tree[k] for k in ("params", "opt_state")}
        return [saved.read(leaf) for leaf in jax.tree.leaves(tree)]

    one, two, three = arrays(1), arrays(2), arrays(3)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))  # step 2 changed nothing, moments included
    assert not all(np.array_equal(a, b) for a, b in zip(two, three))


def test_keep_best_keeps_the_lowest_eval_loss_besides_the_newest(tmp_path, tiny_llama):
    """checkpoint.keep_best: every evaluated step is saved with its eval_loss; the newest `keep` and
    the lowest eval_loss survive. A learning rate far too high makes the held-out loss go up again."""
    run_dir = tmp_path / "run"
    train(config(tiny_llama, run_dir, f"data.eval={DEMO_TRAIN}", "train.eval_every=1", "train.eval_batches=1",
                 "train.steps=6", "optimizer.lr=0.5", "checkpoint.every=100", "checkpoint.keep=1",
                 "checkpoint.keep_best=true"), devices=jax.devices()[:1])
    evals = {x["step"]: x["eval_loss"] for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in x and x["step"] > 0}
    best = min(evals, key=evals.get)
    assert best < 6, evals  # the loss did go up again, so keeping the best is not keeping the newest
    kept = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [best, 6]
