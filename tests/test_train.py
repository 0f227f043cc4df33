"""The train step under different meshes and batch splits gives the same losses."""

import json

import jax
import pytest

from conftest import DEMO_EVAL, DEMO_TRAIN
from jaxsft.config import load_config
from jaxsft.errors import ConfigError, DataError
from jaxsft.train import check_batch_bounds, train


def run(tmp_path, model_dir, name, devices, *overrides):
    cfg = load_config(None, [
        f"model.path={model_dir}", f"data.train={DEMO_TRAIN}", "data.seq_len=128", "train.steps=3",
        "train.batch_size=8", "train.log_every=1", "optimizer.lr=1e-3", "optimizer.warmup_steps=1",
        "checkpoint.every=100", f"run.dir={tmp_path / name}", *overrides])
    train(cfg, devices=devices)
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory, tiny_llama):
    losses = run(tmp_path_factory.mktemp("one"), tiny_llama, "one", jax.devices()[:1], "mesh.fsdp=1")
    assert len(losses) == 3 and losses[2] < losses[0]
    return losses


@pytest.mark.parametrize("mesh", [
    ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"],
    ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
])
def test_eight_devices_match_one(tmp_path, tiny_llama, single_device_losses, mesh):
    assert len(jax.devices()) == 8
    losses = run(tmp_path, tiny_llama, "eight", jax.devices(), *mesh)
    for a, b in zip(losses, single_device_losses):
        assert abs(a - b) <= 1e-5 * abs(b)


def test_grad_accumulation_matches_one_batch(tmp_path, tiny_llama, single_device_losses):
    losses = run(tmp_path, tiny_llama, "accum", jax.devices()[:1], "mesh.fsdp=1", "train.grad_accum=4")
    for a, b in zip(losses, single_device_losses):
        assert abs(a - b) <= 1e-5 * abs(b)


def test_eval_loss_logged_at_start_and_end(tmp_path, tiny_llama):
    run(tmp_path, tiny_llama, "eval", jax.devices()[:1], "mesh.fsdp=1", f"data.eval={DEMO_EVAL}",
        "train.eval_batches=2")
    lines = [json.loads(x) for x in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    evals = [(x["step"], x["eval_loss"]) for x in lines if "eval_loss" in x]
    assert [s for s, _ in evals] == [0, 3]
    assert evals[1][1] < evals[0][1]
    for x in lines:
        if "loss" in x:
            assert {"step", "loss", "accuracy", "grad_norm", "lr", "trained_tokens", "tokens_per_s", "step_s",
                    "mfu"} <= set(x)
            assert x["trained_tokens"] > 0 and x["tokens_per_s"] > 0 and 0 < x["mfu"] < 1


def test_batch_not_divisible_by_data_parallel_size(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="train.batch_size"):
        run(tmp_path, tiny_llama, "bad", jax.devices(), "mesh.data=8", "mesh.fsdp=1", "train.batch_size=4")


def test_a_batch_beyond_the_compiled_bounds_stops_the_run():
    """The step is compiled for the prepared data's longest example and most trained targets of a
    row; a batch beyond either is refused before its step, naming the step."""
    import numpy as np

    batch = {"segment_ids": np.array([[1, 1, 1, 2, 0]]), "loss_mask": np.array([[0, 1, 1, 1, 0]])}
    check_batch_bounds(1, batch, 3, 3)
    with pytest.raises(DataError, match="step 7: a packed row holds an example of 3 tokens"):
        check_batch_bounds(7, batch, 2, 3)
    with pytest.raises(DataError, match="step 7: a packed row holds 3 trained targets"):
        check_batch_bounds(7, batch, 3, 2)


@pytest.mark.parametrize("mesh", [["mesh.fsdp=1"], ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]],
                         ids=["one-device", "data2-fsdp2-tensor2"])
def test_dry_run_compiles_the_program_training_runs(tmp_path, tiny_llama, capsys, mesh):
    """`train --dry-run` (and `jaxsft compile`, which shares `aot.compile_train_step`) compiles the
    step `train` runs: the same step spec (the data's bounds), the same program fingerprint (a
    hash of the lowered StableHLO) and the same memory statistics."""
    import re

    from jaxsft.aot import dry_run

    devices = jax.devices()[:1] if mesh == ["mesh.fsdp=1"] else jax.devices()
    overrides = [f"model.path={tiny_llama}", f"data.train={DEMO_TRAIN}", "data.seq_len=128", "train.steps=1",
                 "train.batch_size=8", "checkpoint.every=100", f"run.dir={tmp_path / 'run'}", "run.plot=false", *mesh]
    planned = [x for x in dry_run(load_config(None, overrides), devices=devices) if x.startswith("step")]
    capsys.readouterr()
    train(load_config(None, overrides), devices=devices)
    ran = [x for x in capsys.readouterr().err.splitlines() if x.startswith("step: ")]
    assert planned[0] == "step bounds: from data.train" and len(ran) == 1
    strip = lambda line: re.sub(r"compiled in [\d.]+ s", "", line)  # noqa: E731
    assert strip(planned[1]) == strip(ran[0])
    assert "attention blocked" in ran[0] and re.search(r"longest example \d+,", ran[0]) and "program " in ran[0]
    # A different spec is a different program: the fingerprint can fail.
    other = [x for x in dry_run(load_config(None, overrides + ["train.loss_whole_mib=0"]), devices=devices)
             if x.startswith("step: ")]
    assert other[0].split("program ")[1][:16] != ran[0].split("program ")[1][:16]
