"""Evaluation: the held-out completion loss against Hugging Face PyTorch, the metrics, the report.

The loss is checked over exactly the trained tokens of the held-out records (rendered with the chat
template, packed several to a row, sharded over 8 fake devices) against a plain PyTorch forward of
each record alone. The side-by-side report is checked with two copies of one model, loaded two
ways (a run directory with an Orbax checkpoint, and the Hugging Face directory): every number must
agree, so any difference in how either is loaded, prompted or decoded shows.
"""

from __future__ import annotations

import json
import math
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from flax import nnx
from transformers import AutoModelForCausalLM

from conftest import DEMO_EVAL
from jaxsft.checkpoint import Checkpointer
from jaxsft.cli import main
from jaxsft.config import dump_config, load_config
from jaxsft.data.render import Renderer, fit
from jaxsft.errors import ConfigError
from jaxsft.evaluate import completion_loss, json_fields, json_valid, metric_functions, score
from jaxsft.generate import load_model
from jaxsft.models import from_pretrained
from jaxsft.parallel import make_mesh
from jaxsft.rundir import HF_SIDE_FILES


def length_ratio(prediction: str, reference: str) -> float:
    """A user metric for the test (`eval.user_metric: test_evaluate:length_ratio`)."""
    return len(prediction) / max(len(reference), 1)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    """The first 12 held-out demo records."""
    path = tmp_path_factory.mktemp("eval_data") / "eval.jsonl"
    path.write_text("\n".join(DEMO_EVAL.read_text().splitlines()[:12]) + "\n")
    return path


def test_completion_loss_matches_hugging_face(tiny_llama, eval_file):
    cfg = load_config(None, [f"model.path={tiny_llama}", f"data.eval={eval_file}", "data.seq_len=256",
                             "train.batch_size=8", "train.loss_chunk=32",
                             "train.loss_whole_mib=0"])
    mesh = make_mesh(cfg.mesh)  # 8 fake devices: fsdp=8
    loaded = load_model(tiny_llama, mesh)
    ours = completion_loss(loaded, cfg, mesh)

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    renderer = Renderer(loaded.tokenizer, cfg.data)
    total, count, correct = 0.0, 0, 0
    for line in eval_file.read_text().splitlines():
        ids, mask = fit(*renderer.render(json.loads(line)), cfg.data.seq_len, "truncate")[:2]
        with torch.no_grad():
            logits = hf(torch.tensor(ids[None, :-1], dtype=torch.long)).logits[0].double()
        targets, trained = torch.tensor(ids[1:], dtype=torch.long), torch.tensor(mask[1:]).bool()
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        total += nll[trained].sum().item()
        count += int(trained.sum())
        correct += int((logits.argmax(-1) == targets)[trained].sum())
    assert ours["trained_tokens"] == count
    assert abs(ours["loss"] - total / count) <= 1e-5 * (total / count)
    assert ours["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert ours["token_accuracy"] == correct / count


def test_metrics():
    ref = '{"name": "Ana", "quantity": 3, "total": 4.5}'
    assert json_valid('{"a": 1}', ref) == 1.0 and json_valid('{"a": ', ref) == 0.0
    assert json_fields('{"name": "Ana", "quantity": 4}', ref) == pytest.approx(1 / 3)
    assert json_fields("[1]", ref) == 0.0 and json_fields("x", "not json") is None
    cfg = load_config(None, ["eval.metrics=[exact_match,json_fields,label_in_set]", "eval.labels=[positive,negative]",
                             "eval.user_metric=test_evaluate:length_ratio"])
    fns = metric_functions(cfg.eval)
    assert list(fns) == ["exact_match", "json_fields", "label_in_set", "length_ratio"]
    got = score([" positive ", "maybe"], ["positive", "negative"], fns)
    assert got["exact_match"] == 0.5 and got["label_in_set"] == 0.5 and math.isnan(got["json_fields"])
    assert got["length_ratio"] == pytest.approx((10 / 8 + 5 / 8) / 2)
    with pytest.raises(ConfigError, match="eval.user_metric"):
        metric_functions(load_config(None, ["eval.user_metric=no_such_module:f"]).eval)
    for bad, key in [("eval.user_metric=nocolon", "eval.user_metric"), ("eval.top_p=0", "eval.top_p"),
                     ("eval.max_new_tokens=0", "eval.max_new_tokens"), ("eval.metrics=[bleu]", "eval.metrics"),
                     ("eval.num_generations=-1", "eval.num_generations")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


def fake_run(hf_dir, run_dir, cfg) -> None:
    """A run directory holding `hf_dir`'s weights as its step-3 checkpoint, as `train` would leave it."""
    (run_dir / "hf").mkdir(parents=True)
    dump_config(cfg, run_dir / "config.yaml")
    for name in HF_SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, run_dir / "hf" / name)
    params = nnx.to_pure_dict(nnx.state(from_pretrained(hf_dir)))
    ckpt = Checkpointer(run_dir / "checkpoints")
    ckpt.save(3, {"params": params, "step": jnp.asarray(3)})  # no data iterator: eval never reads it
    ckpt.close()


def test_eval_cli_side_by_side(tiny_llama, eval_file, tmp_path, capsys):
    overrides = {"model": {"path": str(tiny_llama)}, "data": {"eval": [str(eval_file)], "seq_len": 256},
                 "train": {"batch_size": 8},
                 "eval": {"metrics": ["exact_match", "json_valid", "json_fields", "label_in_set"],
                          "labels": ["a", "b"], "user_metric": "test_evaluate:length_ratio",
                          "num_generations": 5, "max_new_tokens": 6, "batch_size": 4, "examples": 2}}
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(overrides))
    run_dir = tmp_path / "run"
    fake_run(tiny_llama, run_dir, load_config(config))
    assert main(["eval", str(config), "--model", str(run_dir), "--baseline", str(tiny_llama)]) == 0
    printed = capsys.readouterr().out

    report = json.loads((run_dir / "eval_report.json").read_text())  # the model's run directory by default
    base, tuned = report["models"]["baseline"], report["models"]["fine-tuned"]
    assert base["source"] == str(tiny_llama) and tuned["source"] == str(run_dir)
    assert report["num_prompts"] == 5 and len(report["examples"]) == 2
    for key in ("loss", "token_accuracy", "trained_tokens"):
        assert base[key] == pytest.approx(tuned[key], rel=1e-6)
    assert base["metrics"] == tuned["metrics"]
    assert set(base["metrics"]) == {"exact_match", "json_valid", "json_fields", "label_in_set", "length_ratio"}
    rows = [json.loads(x) for x in (run_dir / "eval_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["baseline"] == r["fine-tuned"] for r in rows)
    assert rows[0]["reference"] == json.loads(eval_file.read_text().splitlines()[0])["completion"]
    md = (run_dir / "eval_report.md").read_text()
    assert md in printed and f"| metric | baseline (`{tiny_llama}`) | fine-tuned (`{run_dir}`) |" in md
    assert "| exact_match |" in md and "## Examples" in md

    out = tmp_path / "elsewhere"
    assert main(["eval", str(config), "--model", str(tiny_llama), "--out", str(out), "eval.metrics=[]"]) == 0
    alone = json.loads((out / "eval_report.json").read_text())
    assert list(alone["models"]) == ["model"] and alone["models"]["model"]["loss"] == pytest.approx(base["loss"])
    assert np.isfinite(alone["models"]["model"]["perplexity"])
