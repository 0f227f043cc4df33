"""A full disk, through the CLI in-process: a checkpoint save that fails in the background, or is
refused up front for lack of space, and an export that does not fit, each give exit code 2 and one
line naming the path, no traceback, no temporary directory left, and (training) no step after the
failed save; the last complete checkpoint resumes as if nothing had happened."""

import collections
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import DEMO_TRAIN
from jaxsft import checkpoint, cli, export

STEPS = 3
Usage = collections.namedtuple("Usage", "total used free")


def overrides(model: Path, data: Path, run_dir: Path) -> list[str]:
    return [f"model.path={model}", f"data.train={data}", "data.seq_len=128", f"train.steps={STEPS}",
            "train.batch_size=8", "train.log_every=1", "checkpoint.every=1", "mesh.data=1", "mesh.fsdp=-1",
            f"run.dir={run_dir}", "run.export=", "run.plot=false"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"]) for x in lines if "loss" in x]


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if "-tmp" in p.name or ".partial-" in p.name]


def one_error(capsys, argv: list[str], *expected: str) -> str:
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"jaxsft {argv[0]}: error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama) -> tuple[Path, Path, Path]:
    """`(empty config, data, reference run)`: an uninterrupted run of STEPS steps on 32 demo records."""
    root = tmp_path_factory.mktemp("diskfull")
    (root / "empty.yaml").write_text("{}\n")
    data = root / "train.jsonl"
    data.write_text("".join(DEMO_TRAIN.read_text().splitlines(keepends=True)[:32]))
    reference = root / "reference"
    assert cli.main(["train", str(root / "empty.yaml"), *overrides(tiny_llama, data, reference)]) == 0
    return root / "empty.yaml", data, reference


def _check_stopped_at_2(run: Path, message: str) -> None:
    assert str(run / "checkpoints" / "2") in message and str(run / "checkpoints" / "1") in message
    assert max(s for s, _ in losses(run)) == 2  # nothing trained or logged after the failed save
    assert not leftovers(run / "checkpoints")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]


def test_background_save_fails_then_resume_is_exact(tmp_path, capsys, monkeypatch, tiny_llama, setup):
    config, data, reference = setup
    run = tmp_path / "run"
    argv = ["train", str(config), *overrides(tiny_llama, data, run)]
    save = checkpoint.DataStateHandler.save

    def full(self, directory, args):
        if "2.orbax-checkpoint-tmp" in str(directory):
            (Path(directory) / "partial").write_bytes(b"x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a buffered write: no file name
        return save(self, directory, args)

    monkeypatch.setattr(checkpoint.DataStateHandler, "save", full)
    _check_stopped_at_2(run, one_error(capsys, argv, "no space left on device"))
    monkeypatch.undo()
    assert cli.main(argv) == 0
    assert "resumed from" in capsys.readouterr().err
    assert losses(run) == losses(reference)  # bitwise, as if the disk had never filled


def test_too_little_free_space_refuses_the_save(tmp_path, capsys, monkeypatch, tiny_llama, setup):
    config, data, _ = setup
    run = tmp_path / "run"
    disk_usage = shutil.disk_usage

    def usage(path):  # room for the first checkpoint, then 1000 bytes
        if (run / "checkpoints" / "1").is_dir():
            return Usage(10**9, 10**9 - 1000, 1000)
        return disk_usage(path)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    message = one_error(capsys, ["train", str(config), *overrides(tiny_llama, data, run)],
                        "no space left on device (0.0 MiB free,", "MiB needed")
    _check_stopped_at_2(run, message)


def test_export_with_too_little_free_space(tmp_path, capsys, monkeypatch, setup):
    _, _, reference = setup
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    one_error(capsys, ["export", str(reference), str(out)], f"export {out}: no space left", "MiB needed")
    assert not out.exists() and not leftovers(tmp_path)


@pytest.fixture
def tmpfs(tmp_path) -> Path:
    """A 3 MiB tmpfs (root only, where mounting is allowed): a real full disk."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root in a container that allows it")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_real_full_disk_export_and_checkpoint(tmpfs, capsys, monkeypatch, tiny_llama, setup):
    """Past the free-space checks (patched away), the writes themselves meet ENOSPC."""
    config, data, reference = setup
    monkeypatch.setattr(export, "check_free_space", lambda *a, **k: None)
    monkeypatch.setattr(checkpoint, "check_free_space", lambda *a, **k: None)
    (tmpfs / "filler").write_bytes(b"\0" * (2 * 2**20 + 2**19))
    out = tmpfs / "out"
    one_error(capsys, ["export", str(reference), str(out)], f"export {out}: no space left")
    assert not out.exists() and not leftovers(tmpfs)
    (tmpfs / "filler").unlink()
    run = tmpfs / "run"  # one checkpoint (1.7 MiB) fits, the second does not
    _check_stopped_at_2(run, one_error(capsys, ["train", str(config), *overrides(tiny_llama, data, run)],
                                       "no space left on device"))
