"""`jaxsft curve` end to end on the tiny model: nested subsets, a normal run per size, the table,
the plot, the baselines, a rerun that skips what is done, and the mistakes it names."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from PIL import Image

from conftest import DEMO_EVAL, DEMO_TRAIN
from jaxsft.cli import main
from jaxsft.config import load_config
from jaxsft.curve import parse_sizes, steps_for, write_subsets
from jaxsft.data.render import load_tokenizer
from jaxsft.errors import JaxsftError
from jaxsft.fewshot import train_order


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    """`(config path, train file)`: 24 training records, 3 held-out ones, 2 steps a size."""
    root = tmp_path_factory.mktemp("curve")
    train, held = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:24]) + "\n")
    held.write_text("\n".join(DEMO_EVAL.read_text().splitlines()[:3]) + "\n")
    settings = {"model": {"path": str(tiny_llama)}, "data": {"train": str(train), "eval": str(held), "seq_len": 128,
                         "overlong": "truncate_prompt"},  # the demo records run past 128 tokens
                "train": {"steps": 2, "batch_size": 8, "seed": 3, "log_every": 1, "eval_batches": 1},
                "optimizer": {"lr": 1e-3, "warmup_steps": 1}, "checkpoint": {"every": 100},
                "run": {"dir": str(root / "run"), "tensorboard": False, "plot": False},
                "eval": {"metrics": ["json_valid", "exact_match"], "num_generations": 2, "max_new_tokens": 4,
                         "batch_size": 2}}
    config = root / "curve.yaml"
    config.write_text(yaml.safe_dump(settings))
    return config, train


def test_curve_command(setup, capsys):
    config, train = setup
    assert main(["curve", str(config), "--sizes", "16,8", "--few-shot", "1"]) == 0
    out = config.parent / "run-curve"  # run.dir followed by -curve
    printed = capsys.readouterr().out
    curve = json.loads((out / "curve.json").read_text())
    assert [(p["examples"], p["steps"]) for p in curve["points"]] == [(8, 2), (16, 2)]
    assert curve["metric"] == "json_valid" and list(curve["baselines"]) == ["base zero-shot", "base 1-shot"]
    for result in curve["points"] + list(curve["baselines"].values()):
        assert set(result["metrics"]) == {"json_valid", "exact_match"} and result["loss"] > 0
    md = (out / "curve.md").read_text()
    assert md in printed
    assert "| examples | steps | held-out loss | json_valid | exact_match |" in md
    assert [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()] == \
        ["| 8", "| 16"]
    assert "| base zero-shot |" in md and "| base 1-shot |" in md
    assert md.rstrip().endswith(f"Verdict: {curve['summary']}.")
    with Image.open(out / "curve.png") as image:
        assert image.format == "PNG" and image.size[0] > 300

    # Nested subsets of the one shuffle of the training file; each size a normal run directory.
    lines = train.read_text().splitlines()
    small, big = ((out / "data" / f"train-{n}.jsonl").read_text().splitlines() for n in (8, 16))
    assert big[:8] == small and big == [lines[int(i)] for i in train_order(24, 3)[:16]]
    for n in (8, 16):
        run = out / f"size-{n}"
        assert load_config(run / "config.yaml").data.train == (str(out / "data" / f"train-{n}.jsonl"),)
        assert (run / "checkpoints" / "2").is_dir() and (run / "eval_report.md").is_file()
        assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][-1] == 2

    # Run again: every size (and the baselines) is done with the same config, so nothing trains.
    before = (out / "size-8" / "metrics.jsonl").stat().st_mtime_ns
    assert main(["curve", str(config), "--sizes", "8,16", "--few-shot", "1"]) == 0
    assert "skipped" in capsys.readouterr().err
    assert (out / "size-8" / "metrics.jsonl").stat().st_mtime_ns == before
    assert json.loads((out / "curve.json").read_text())["points"] == curve["points"]


def test_curve_mistakes(setup, capsys):
    config, _ = setup
    assert main(["curve", str(config), "--sizes", "8,25", "--out", str(config.parent / "x")]) == 2
    err = capsys.readouterr().err
    assert "--sizes 25 is more than the 24 records of data.train" in err and len(err.strip().splitlines()) == 1
    for args, named in ((["--sizes", "8,abc"], "--sizes"), (["--sizes", "0"], "--sizes"),
                        (["--sizes", "8", "--metric", "bleu"], "--metric bleu"),
                        (["--sizes", "8", "--epochs", "0"], "--epochs")):
        assert main(["curve", str(config), *args]) == 2
        assert named in capsys.readouterr().err
    with pytest.raises(JaxsftError, match="--sizes"):
        parse_sizes("")


def test_epochs_scale_steps_to_the_subset(setup, tmp_path):
    config, _ = setup
    cfg = load_config(config)
    paths = write_subsets(cfg, [8, 16], tmp_path)
    tokenizer = load_tokenizer(cfg.model.path)
    # Demo examples are ~118 tokens: one per 128-token row, so an epoch of N examples is N rows.
    for n, epochs, steps in ((8, 1.0, 1), (16, 1.0, 2), (16, 2.5, 5)):
        subset = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=(str(paths[n]),)))
        assert steps_for(subset, epochs, tokenizer) == steps
    assert steps_for(cfg, None, tokenizer) == cfg.train.steps
