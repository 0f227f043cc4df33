"""What a run shows and leaves: console lines or a progress bar, metrics.jsonl, TensorBoard events,
the metrics plot, and `train --dry-run`."""

import io
import json
import struct
import sys
from pathlib import Path

import jax
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from conftest import DEMO_EVAL, DEMO_TRAIN
from jaxsft import cli
from jaxsft.config import load_config
from jaxsft.monitor import MetricsLog, format_line
from jaxsft.train import train


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """`{tag: [(step, value)]}` of the run's event files (TFRecord framing: length, crc, data, crc)."""
    out: dict[str, list] = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_llama) -> Path:
    """A real run of 4 steps with two evaluations, as `train` leaves it."""
    root = tmp_path_factory.mktemp("short")
    data = root / "train.jsonl"
    data.write_text("".join(DEMO_TRAIN.read_text().splitlines(keepends=True)[:64]))
    run_dir = root / "run"
    cfg = load_config(None, [
        f"model.path={tiny_llama}", f"data.train={data}", f"data.eval={DEMO_EVAL}", "data.seq_len=128",
        "train.steps=4", "train.batch_size=4", "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
        "optimizer.lr=1e-3", "checkpoint.every=100", "mesh.fsdp=1", f"run.dir={run_dir}"])
    train(cfg, devices=jax.devices()[:1])
    return run_dir


def test_run_dir_holds_metrics_tensorboard_and_plot(short_run):
    records = [json.loads(x) for x in (short_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    scalars = tensorboard_scalars(short_run)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in records if "loss" in r])
    assert [s for s, _ in scalars["eval/eval_loss"]] == [0, 2, 4]
    assert {"train/lr", "train/tokens_per_s", "train/grad_norm"} <= set(scalars)
    with Image.open(short_run / "metrics.png") as png:
        assert png.format == "PNG" and png.size == (1500, 420)


def test_plot_command_redraws(short_run, tmp_path, capsys):
    (short_run / "metrics.png").unlink()
    assert cli.main(["plot", str(short_run)]) == 0
    assert str(short_run / "metrics.png") in capsys.readouterr().out
    with Image.open(short_run / "metrics.png") as png:
        assert png.size == (1500, 420)
    assert not list(short_run.glob(".metrics.png.tmp*"))


def test_plain_lines_and_resume_drops_later_and_torn_lines(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    log = MetricsLog(path, resume_step=2, total_steps=10, tensorboard=True, progress="lines")
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    log.write({"step": 3, "total_steps": 10, "loss": 0.5, "tokens_per_s": 1234.0, "step_s": 2.0})
    log.close()
    err = capsys.readouterr().err
    assert err == "step 3/10 | loss 0.5 | 1,234 tok/s | ETA 14s\n"  # ETA: 7 steps left at 2 s each
    assert tensorboard_scalars(tmp_path)["train/loss"] == [(3, 0.5)]


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    stream = io.StringIO()
    stream.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", stream)
    log = MetricsLog(tmp_path / "metrics.jsonl", total_steps=4)
    for step in (1, 2):
        log.write({"step": step, "total_steps": 4, "loss": 2.0 / step, "tokens_per_s": 5000.0, "step_s": 0.1})
    log.write({"step": 2, "eval_loss": 0.75})
    log.close()
    out = stream.getvalue()
    assert "2/4" in out and "loss=1" in out and "tok/s=5,000" in out and "<" in out  # elapsed<remaining (ETA)
    assert "step 2 | eval_loss 0.75" in out  # evaluations stay above the bar
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_format_line():
    assert format_line({"step": 12, "total_steps": 300, "loss": 1.23456, "tokens_per_s": 2345.4, "eta_s": 250}) == (
        "step 12/300 | loss 1.235 | 2,345 tok/s | ETA 4m10s")


def test_dry_run_prints_and_creates_nothing(tmp_path, capsys, tiny_llama):
    run_dir = tmp_path / "run"
    code = cli.main(["train", "--dry-run", str(Path(__file__).parents[1] / "configs" / "demo.yaml"),
                     f"model.path={tiny_llama}", "mesh.fsdp=-1", "data.seq_len=64", "train.batch_size=8",
                     f"run.dir={run_dir}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "config (resolved):" in out and f"path: {tiny_llama}" in out
    assert "model: llama, " in out and " parameters (float32)" in out
    assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
    assert "'fsdp'" in out.split("largest parameters")[1]  # the biggest kernels are split over fsdp
    assert "memory estimate: ~" in out and "step: attention blocked" in out and " GiB per device (arguments " in out
    assert not run_dir.exists()
