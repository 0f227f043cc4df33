"""Who may use a run directory, and what a resume may change in it.

  RUN_DIR/.lock                  held by the one `jaxsft train` writing the directory: its pid, host and
                                 start time (JSON). Created atomically; a second run is refused, naming
                                 the holder. A lock left by a process that died on this host is taken over.
  RUN_DIR/config.yaml            the config of the latest start; a resume compares against it
  RUN_DIR/config_history.yaml    one entry per resume that changed a guarded key (`--force-resume`)
  RUN_DIR/hf/                    copies of the model directory's `HF_SIDE_FILES` (config, tokenizer)

Resuming with other data, another model, sequence length or global batch would silently mix two
runs in one: `check_resume` refuses it, naming each changed key, unless forced.

Only the standard library and yaml here: a process can take a lock without importing JAX.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

from jaxsft.config import Config, to_dict
from jaxsft.errors import ConfigError, JaxsftError

LOCK, HISTORY = ".lock", "config_history.yaml"

# Small files of a Hugging Face directory that the run keeps a copy of in RUN_DIR/hf/, so export
# never needs the source.
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "added_tokens.json")

# Keys a resume must not change silently: the data set, the model, and the shape of each step's batch.
GUARDED = ("model.path", "data.train", "data.eval", "data.weights", "data.fields", "data.seq_len",
           "train.batch_size")


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc; None where there is no /proc).
    A pid reused by a later process has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": the command may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has finished


def _alive(pid: int, started: str | None) -> bool:
    """Whether process `pid` of this host still runs and is the one that started at `started`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    if not Path("/proc/self/stat").exists():  # no /proc: the pid is all there is to go by
        return True
    now = _process_start(pid)
    return now is not None and started in (None, now)


class RunLock:
    """Holds `RUN_DIR/.lock` while a run writes the directory (a context manager).

    `acquire` creates the file atomically (a hard link of a complete temporary file, else O_CREAT |
    O_EXCL), so of two runs starting together exactly one gets it; the other raises `JaxsftError`
    naming the holder's pid and host. A lock whose process is gone (same host, pid not running or
    reused) is taken over with a one-line notice. `release` removes the file only while it is
    still this run's.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._mine: bytes | None = None

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            holder = None
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
            raise JaxsftError(f"run.dir {self.run_dir} is locked, but {self.path} does not say by whom (another run "
                              f"may be taking it this instant); if no jaxsft train uses the directory, remove it")
        return holder

    def _create(self, tmp: Path) -> None:
        """Creates the lock file with `tmp`'s content in one step, or raises FileExistsError."""
        try:
            os.link(tmp, self.path)  # complete the moment it exists: never seen half-written
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())

    def acquire(self) -> None:
        """Takes the lock, or raises `JaxsftError` naming the run that holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        content = json.dumps({"pid": pid, "host": socket.gethostname(), "started": _process_start(pid),
                              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
        tmp = self.run_dir / f"{LOCK}.{pid}.tmp"
        self._mine = content.encode()  # before the lock exists: a signal any time after leaves it releasable
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(content)
            except OSError as e:  # a full disk: name the lock, not its temporary file
                raise OSError(e.errno, e.strerror, str(self.path)) from None
            for _ in range(3):  # a stale lock is removed, then the race for a fresh one starts again
                try:
                    self._create(tmp)
                    return
                except FileExistsError:
                    pass
                holder = self._read()
                if holder is None:  # released meanwhile
                    continue
                host = holder.get("host", "?")
                if host != socket.gethostname() or _alive(holder["pid"], holder.get("started")):
                    raise JaxsftError(
                        f"run.dir {self.run_dir} is in use by another jaxsft train (pid {holder['pid']} on {host}, "
                        f"since {holder.get('since', '?')}): wait for it, stop it, or use another run.dir; if no "
                        f"such process runs, remove {self.path}")
                if self._read() == holder:  # still the dead one's (not a fresh lock another run just took)
                    self.path.unlink(missing_ok=True)
                    print(f"run.dir {self.run_dir}: taking over the lock of pid {holder['pid']} on {host}, which "
                          f"no longer runs", file=sys.stderr, flush=True)
            raise JaxsftError(f"run.dir {self.run_dir}: could not take {self.path} (other runs keep taking it)")
        except BaseException:
            self.release()
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        """Removes the lock file if it is still this run's."""
        if self._mine is None:
            return
        try:
            if self.path.read_bytes() == self._mine:
                self.path.unlink()
        except OSError:
            pass
        self._mine = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out |= _flat(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return repr(value) if value == "" else str(value)


def changed_keys(saved: dict, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """`{key: (old, new)}` for each guarded key whose value in `cfg` differs from the saved config
    (a key the saved config lacks counts as its default)."""
    old = _flat(to_dict(Config())) | _flat(saved)
    new = _flat(to_dict(cfg))
    guarded = [k for k in new if any(k == g or k.startswith(g + ".") for g in GUARDED)]
    return {k: (old.get(k), new[k]) for k in guarded if old.get(k) != new[k]}


def saved_config(run_dir: Path) -> dict | None:
    """The config of the run directory's latest start (`config.yaml`), or None."""
    path = run_dir / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config this run was trained with ({e}); fix or remove it to "
                          f"resume") from None
    return saved if isinstance(saved, dict) else None


def check_resume(run_dir: Path, saved: dict | None, cfg: Config, step: int, force: bool) -> dict:
    """Refuses (`ConfigError`) to resume the run at `step` with changed guarded keys, naming each
    (old -> new), unless `force`; returns the changes (empty when none)."""
    changes = changed_keys(saved, cfg) if saved else {}
    if changes and not force:
        listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())
        raise ConfigError(f"run.dir {run_dir} (at step {step}) was trained with other settings: {listed}. Resuming "
                          f"would mix two runs in one: use a new run.dir, or pass --force-resume to go on with the "
                          f"new settings (recorded in {run_dir / HISTORY})")
    return changes


def record_history(run_dir: Path, step: int, changes: dict) -> Path:
    """Appends a forced resume's changes (time, step, old and new values) to `config_history.yaml`."""
    from jaxsft.monitor import atomic_write_text

    path = run_dir / HISTORY
    entry = {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "resumed_at_step": step,
             "changed": {k: {"old": a, "new": b} for k, (a, b) in changes.items()}}
    before = path.read_text() if path.exists() else ""
    atomic_write_text(path, before + yaml.safe_dump([entry], sort_keys=False))
    return path


def done_step(run_dir: Path) -> int:
    """The step of the run directory's newest complete checkpoint (0 when none), read without
    writing anything."""
    if not (run_dir / "checkpoints").is_dir():
        return 0
    from jaxsft.checkpoint import Checkpointer  # here: taking a lock needs no JAX

    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        return ckpt.latest_step() or 0
    finally:
        ckpt.close()


def run_source(source: str | Path) -> tuple[Path, int | None] | None:
    """What `source` is, as the commands that take a trained model (`export`, `generate`, `eval`)
    read it: `(run_dir, None)` for a run directory (it holds `config.yaml`), `(run_dir, step)` for
    one of its checkpoints (`RUN_DIR/checkpoints/STEP`), None for anything else (a Hugging Face
    directory)."""
    source = Path(source)
    if (source / "config.yaml").is_file():
        return source, None
    if source.name.isdigit() and (source.parent.parent / "config.yaml").is_file():
        return source.parent.parent, int(source.name)
    return None


def checkpoint_source(source: str | Path) -> tuple[Path, int]:
    """`(run_dir, step)` of a run directory (its newest complete checkpoint) or a checkpoint
    directory; an error naming `source` for anything else."""
    found = run_source(source)
    if found is None or (found[1] is None and not (found[0] / "checkpoints").is_dir()):
        raise JaxsftError(f"{source}: neither a run directory (config.yaml + checkpoints/), a checkpoint "
                          f"directory (RUN_DIR/checkpoints/STEP) nor a Hugging Face directory (config.json)")
    run_dir, step = found
    if step is None:
        step = done_step(run_dir)
        if not step:
            raise JaxsftError(f"{source}: the run directory holds no complete checkpoint yet")
    return run_dir, step
