"""Generation metrics during training (`train.eval_generate_every`): logged at step 0, every N steps
and at the last step, as fractions, and equal to what `jaxsft eval` reports for the base model and
for the run's last checkpoint on the same prompts (so they come from the real generations)."""

from __future__ import annotations

import json

import pytest

from conftest import DEMO_EVAL, DEMO_TRAIN
from jaxsft.config import load_config
from jaxsft.evaluate import run_eval
from jaxsft.generate import _decoder
from jaxsft.plot import plot_run
from jaxsft.train import train

PROMPTS = 6
METRICS = ("eval_json_valid", "eval_exact_match", "eval_json_fields", "eval_char_overlap")


def char_overlap(prediction: str, reference: str) -> float:
    """A user metric that moves with any change of the text: the share of the reference's distinct
    characters that the prediction holds (a random model's exact match is 0 whatever it says)."""
    return len(set(prediction) & set(reference)) / max(len(set(reference)), 1)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama):
    """`(config, run_dir, decoders)` of a 4-step run with generation metrics every 2 steps; `decoders`:
    how many decoding functions its three evaluations built."""
    tmp = tmp_path_factory.mktemp("evalgen")
    eval_file = tmp / "eval.jsonl"
    eval_file.write_text("\n".join(DEMO_EVAL.read_text().splitlines()[:12]) + "\n")
    cfg = load_config(None, [
        f"model.path={tiny_llama}", f"data.train={DEMO_TRAIN}", f"data.eval={eval_file}", "data.seq_len=256",
        "train.steps=4", "train.batch_size=8", "train.log_every=1", "train.eval_every=0",
        "train.eval_generate_every=2", f"train.eval_generate_prompts={PROMPTS}", "optimizer.lr=3e-3",
        "optimizer.warmup_steps=0", "eval.metrics=[json_valid,exact_match,json_fields]",
        "eval.user_metric=test_evalgen:char_overlap", "eval.max_new_tokens=24", "eval.batch_size=4",
        f"eval.num_generations={PROMPTS}", f"run.dir={tmp / 'run'}", "run.tensorboard=false"])
    before = _decoder.cache_info().misses
    train(cfg)
    return cfg, tmp / "run", _decoder.cache_info().misses - before


def records(run_dir) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "eval_exact_match" in r}


def test_logged_at_step_0_every_n_and_last(run):
    _, run_dir, decoders = run
    assert decoders == 1  # built (and compiled) at the first evaluation, reused by the next two
    logged = records(run_dir)
    assert sorted(logged) == [0, 2, 4]
    for record in logged.values():
        assert all(0.0 <= record[k] <= 1.0 for k in METRICS), record
    assert "eval_loss" in logged[0] and "eval_loss" in logged[4] and "eval_loss" not in logged[2]
    assert plot_run(run_dir).is_file()


def test_equal_to_jaxsft_eval_on_the_same_prompts(run, tiny_llama):
    cfg, run_dir, _ = run
    report = run_eval(cfg, str(run_dir), baseline=str(tiny_llama), out=str(run_dir / "eval"))
    assert report["num_prompts"] == PROMPTS
    logged = records(run_dir)
    for step, label in ((0, "baseline"), (4, "fine-tuned")):
        ours = {k: logged[step][k] for k in METRICS}
        theirs = {f"eval_{k}": v for k, v in report["models"][label]["metrics"].items()}
        assert ours == theirs, (step, label)
