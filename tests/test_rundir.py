"""One run per run directory, resumes that cannot silently change the run, and interrupts.

In-process through the CLI, in the style of test_errors.py (exit 2, one message, every file
byte-identical): a second training on a locked run.dir, and resumes with changed data, model,
seq_len or batch. --force-resume records the change; train.steps already reached does nothing.
In subprocesses: Ctrl-C saves the step and the run resumes from it; SIGTERM before the first step
and an error at the data stage each end with one line and no traceback (Orbax's included).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
import yaml

from conftest import ROOT
from jaxsft import cli
from jaxsft.checkpoint import Preemption
from jaxsft.config import load_config, to_dict
from jaxsft.errors import Interrupted, JaxsftError
from jaxsft.rundir import HISTORY, LOCK, RunLock, changed_keys
from jaxsft.train import train
from test_errors import base_overrides, copy_model, lines_file, run_case, snapshot, trained  # noqa: F401

# Holds RUN_DIR's lock until its stdin closes (jaxsft.rundir imports no JAX: this starts at once).
HOLD = ("import sys; from jaxsft.rundir import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()")


@pytest.fixture()
def run(tmp_path, trained) -> Path:
    """A copy of the trained run (at step 1) in this test's directory."""
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def env() -> dict:
    """One CPU device in child processes."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def argv(case_dir: Path, model: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    (case_dir / "empty.yaml").write_text("{}\n")
    return ["train", str(case_dir / "empty.yaml"), *base_overrides(model, data, run_dir), *extra]


def test_a_second_run_on_a_locked_run_dir_is_refused(tmp_path, capsys, tiny_llama, trained, run):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        run_case(capsys, ["train", "-", *base_overrides(tiny_llama, trained[1], run)], tmp_path,
                 ["in use by another jaxsft train", f"pid {holder.pid} on {socket.gethostname()}"])
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (run / LOCK).exists()  # the holder released it on exit


def test_a_dead_runs_lock_is_taken_over_and_released(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "earlier"}))
    with RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert f"taking over the lock of pid {dead.pid}" in capsys.readouterr().err
        with pytest.raises(JaxsftError, match=f"pid {os.getpid()} on"):  # and it holds: a second taker is refused
            RunLock(tmp_path).acquire()
    assert not lock.exists()
    # Another host's lock cannot be checked from here: refused, even with a pid that is dead here.
    lock.write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "since": "earlier"}))
    with pytest.raises(JaxsftError, match=f"pid {dead.pid} on elsewhere"):
        RunLock(tmp_path).acquire()


def test_changed_keys_cover_the_field_maps_and_nothing_unguarded():
    cfg = load_config(None, ["data.train=a.jsonl", "data.fields.prompt=instruction", "train.steps=9", "optimizer.lr=1"])
    saved = to_dict(load_config(None, ["data.train=a.jsonl"]))
    del saved["data"]["fields"]["text"]  # a key an older config lacks counts as its default
    assert changed_keys(saved, cfg) == {"data.fields.prompt": ("prompt", "instruction")}


def _other_data(d, model, data):
    return [f"data.train={lines_file(d / 'other.jsonl', *data.read_text().splitlines()[:16])}"]


def _other_model(d, model, data):
    return [f"model.path={copy_model(model, d / 'same-weights-elsewhere')}"]


CHANGES = [
    ("data", _other_data, ["data.train: [", "other.jsonl]"]),
    ("model", _other_model, ["model.path: ", "same-weights-elsewhere"]),
    ("seq_len", lambda d, m, data: ["data.seq_len=256"], ["data.seq_len: 128 -> 256"]),
    ("batch", lambda d, m, data: ["train.batch_size=16"], ["train.batch_size: 8 -> 16"]),
]


@pytest.mark.parametrize("name,change,expected", CHANGES, ids=[c[0] for c in CHANGES])
def test_resume_with_changed_settings_is_refused(tmp_path, capsys, tiny_llama, trained, run, name, change, expected):
    extra = change(tmp_path, tiny_llama, trained[1])
    message = run_case(capsys, ["train", "-", *base_overrides(tiny_llama, trained[1], run), *extra], tmp_path,
                       [str(run), "at step 1", *expected, "--force-resume"])
    assert message.count(" -> ") == 1  # only the key that changed


def test_force_resume_goes_on_and_records_the_change(tmp_path, capsys, tiny_llama, trained, run):
    capsys.readouterr()
    assert cli.main(argv(tmp_path, tiny_llama, trained[1], run, "train.batch_size=16", "--force-resume")) == 0
    err = capsys.readouterr().err
    assert f"resuming with changed train.batch_size (--force-resume); recorded in {run / HISTORY}" in err
    assert "Traceback" not in err and "resumed from" in err
    (entry,) = yaml.safe_load((run / HISTORY).read_text())
    assert entry["resumed_at_step"] == 1 and entry["changed"] == {"train.batch_size": {"old": 8, "new": 16}}
    assert "time" in entry
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"] == 16
    assert (run / "checkpoints" / "2").is_dir() and not (run / LOCK).exists()


@pytest.mark.parametrize("steps", [1, 0])
def test_steps_already_done_is_nothing_to_do(tmp_path, capsys, tiny_llama, trained, run, steps):
    args = argv(tmp_path, tiny_llama, trained[1], run, f"train.steps={steps}")
    before, times = snapshot(tmp_path), {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    capsys.readouterr()
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert err == f"run.dir {run} is at step 1; train.steps={steps} asks for no more: nothing to do\n"
    assert snapshot(tmp_path) == before
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == times  # not even touched


def test_signals_before_the_loop_stop_at_once_and_in_it_save_first():
    before = signal.getsignal(signal.SIGINT)
    with Preemption() as preemption:
        with pytest.raises(Interrupted, match=r"^interrupted \(SIGTERM\) before the first step: nothing was") as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.exit_code == 143
        with preemption.armed(checkpointer=None):  # only multi-process runs ask the checkpointer
            os.kill(os.getpid(), signal.SIGINT)
            assert preemption.reached(1)  # save this step, then stop
            with pytest.raises(Interrupted, match=r"^interrupted \(SIGINT\) again: stopped at once") as e:
                os.kill(os.getpid(), signal.SIGINT)
            assert e.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before


def child(model: Path, data: Path, run_dir: Path, env: dict, *extra: str) -> subprocess.Popen:
    """`jaxsft train` in a subprocess on one CPU device, its stderr piped."""
    cmd = [sys.executable, "-m", "jaxsft.cli", *argv(run_dir.parent, model, data, run_dir, "run.progress=lines",
                                                      "run.tensorboard=false", *extra)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def one_last_line(stderr: str, text: str) -> None:
    """No traceback, and `text` is the only jaxsft line and the last thing said."""
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    said = [line for line in stderr.splitlines() if line.startswith("jaxsft train:")]
    assert said == [stderr.rstrip().splitlines()[-1]] and text in said[0], stderr


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # a line being written is not one yet
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def test_ctrl_c_saves_the_step_and_the_run_resumes_from_it(tmp_path, tiny_llama, trained, env):
    run_dir = tmp_path / "run"
    proc = child(tiny_llama, trained[1], run_dir, env, "train.steps=1000", "checkpoint.every=1000")
    wait_for(lambda: logged_steps(run_dir), proc)
    proc.send_signal(signal.SIGINT)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, stderr
    saved = max(logged_steps(run_dir))
    one_last_line(stderr, f"interrupted (SIGINT): saved step {saved} in {run_dir / 'checkpoints' / str(saved)}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [str(saved)]
    assert not (run_dir / LOCK).exists()

    overrides = base_overrides(tiny_llama, trained[1], run_dir)[:-4] + [
        f"train.steps={saved + 1}", "mesh.fsdp=1", f"run.dir={run_dir}", "run.plot=false", "run.tensorboard=false"]
    train(load_config(None, overrides), devices=jax.devices()[:1])
    assert logged_steps(run_dir) == list(range(1, saved + 2))


def test_sigterm_before_the_first_step_says_so_in_one_line(tmp_path, tiny_llama, trained, env):
    run_dir = tmp_path / "run"
    proc = child(tiny_llama, trained[1], run_dir, env)
    # The lock is taken first thing: loading the model, preparing the data and compiling come after.
    wait_for((run_dir / LOCK).exists, proc)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 143, stderr
    one_last_line(stderr, "interrupted (SIGTERM) before the first step: nothing was trained or saved")
    assert not logged_steps(run_dir) and not list((run_dir / "checkpoints").glob("*"))
    assert not (run_dir / LOCK).exists()


def test_an_error_at_the_data_stage_leaves_no_traceback(tmp_path, tiny_llama, env):
    proc = child(tiny_llama, lines_file(tmp_path / "empty.jsonl"), tmp_path / "run", env)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 2, stderr
    one_last_line(stderr, "empty.jsonl")
    assert "cannot schedule new futures" not in stderr
