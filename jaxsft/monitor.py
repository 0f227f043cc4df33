"""Run output people read: the console, `metrics.jsonl`, TensorBoard events and an optional W&B run.

Only process 0 writes or prints. The console shows a tqdm progress bar (step, loss, tokens/s,
ETA) when stderr is a terminal, and one plain line per logged step otherwise (CI, launchers, log
files): `step 12/300 | loss 1.2345 | ... | 2,345 tok/s | ETA 4m10s`.

Files are written so that an error or a kill never leaves one half-written: whole files go
through a temporary file renamed over the old one (`atomic_write_text`), and `metrics.jsonl`
is only appended to, a torn last line being dropped on the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax

from jaxsft.errors import ConfigError, disk_full, is_disk_full

TENSORBOARD_DIR = "tensorboard"


def atomic_write_text(path: Path, text: str) -> None:
    """Writes `path` via a temporary file in the same directory renamed over it: readers (and a
    crash, or a full disk) see the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:  # name the file meant, not the temporary one
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_metrics(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl`; a line that is not a JSON object (the torn last line of
    a killed run) is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def format_duration(seconds: float) -> str:
    """`42s`, `4m10s`, `3h05m`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_line(record: dict) -> str:
    """`step 12/300 | loss 1.2345 | eval_loss ... | 2,345 tok/s | ETA 4m10s`: the console view of one record."""
    parts = [f"step {record['step']}" + (f"/{record['total_steps']}" if "total_steps" in record else "")]
    for key in ("loss", "eval_loss", "accuracy", "grad_norm", "lr"):
        if key in record:
            parts.append(f"{key} {record[key]:.4g}")
    # Generation metrics (`train.eval_generate_every`): eval_exact_match, eval_json_valid, ...
    parts += [f"{k} {v:.3g}" for k, v in record.items() if k.startswith("eval_") and k != "eval_loss"]
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if record.get("eta_s") is not None:
        parts.append(f"ETA {format_duration(record['eta_s'])}")
    return " | ".join(parts)


def wandb_run(project: str, run_dir: Path, config: dict, resume_step: int) -> Any:
    """A Weights & Biases run for `project` (the `wandb` package imported only here)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"config key 'run.wandb_project' is {project!r}, but the wandb package is not "
                          f"installed (pip install 'jaxsft[wandb]'), or unset the key") from None
    # One W&B run per run directory: a resumed run continues it.
    run_id = "jaxsft-" + hashlib.sha1(str(run_dir.absolute()).encode()).hexdigest()[:10]
    return wandb.init(project=project, dir=str(run_dir), config=config, name=run_dir.name, id=run_id,
                      resume="allow" if resume_step > 0 else None)


@contextlib.contextmanager
def _named(path: Path, what: str):
    """Turns a write error without a file name (a buffered write, a flush) into one naming `path`;
    a full disk into `DiskFullError`."""
    try:
        yield
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, what) from None
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


class MetricsLog:
    """Appends metrics to `RUN_DIR/metrics.jsonl`, TensorBoard and W&B, and shows them on the console.

    On resume from step `resume_step`, lines of later steps (written after that checkpoint by the
    run that died) are dropped first, so the file reads as one uninterrupted run; TensorBoard is
    told to discard its events past that step too. Only process 0 writes or prints.
    """

    def __init__(self, path: Path, resume_step: int = 0, *, total_steps: int | None = None,
                 tensorboard: bool = False, wandb_project: str = "", config: dict | None = None,
                 progress: str = "auto"):
        self.path = path
        self.main = jax.process_index() == 0
        self.total_steps = total_steps
        self._tb = self._wandb = self._bar = None
        self._post: dict[str, str] = {}  # the bar's latest loss, eval loss and tokens/s
        self._start_step = max(resume_step, 0)
        self._t0 = time.perf_counter()
        if not self.main:
            return
        if path.exists():
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard hides the events an earlier, killed run wrote past the step resumed
            # from (all of them when starting over).
            tb_dir = path.parent / TENSORBOARD_DIR
            earlier = tb_dir.is_dir() and any(tb_dir.glob("events.out.tfevents.*"))
            self._tb = SummaryWriter(str(tb_dir), purge_step=max(resume_step + 1, 0) if earlier else None)
        if wandb_project:
            self._wandb = wandb_run(wandb_project, path.parent, config or {}, resume_step)
        use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        if use_bar and total_steps:
            from tqdm import tqdm

            try:  # a terminal that reports no width (some ptys) would get an empty bar: use a fixed one
                sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
            except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
                sized = False
            self._bar = tqdm(total=total_steps, initial=self._start_step, file=sys.stderr, unit="step", desc="step",
                             dynamic_ncols=sized, ncols=None if sized else shutil.get_terminal_size((100, 20)).columns,
                             nrows=None if sized else 20,
                             bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}<{remaining}{postfix}]")

    def eta(self, step: int) -> float | None:
        """Seconds left at the mean pace since this log started (None before the first step)."""
        done = step - self._start_step
        if not self.total_steps or done <= 0:
            return None
        return (time.perf_counter() - self._t0) / done * (self.total_steps - step)

    def write(self, record: dict) -> None:
        """Logs one record to every sink, and the console."""
        if not self.main:
            return
        with _named(self.path, "metrics log"), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items()
                   if k not in ("step", "total_steps") and isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            with _named(self.path.parent / TENSORBOARD_DIR, "TensorBoard log"):
                for k, v in scalars.items():
                    self._tb.add_scalar(f"{'eval' if k.startswith('eval_') else 'train'}/{k}", v, step)
                self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._post.update({k: f"{record[k]:.4g}" for k in ("loss", "eval_loss") if k in record})
            if "tokens_per_s" in record:
                self._post["tok/s"] = f"{record['tokens_per_s']:,.0f}"
            self._bar.set_postfix(self._post, refresh=True)
            if any(k.startswith("eval_") for k in record):  # evaluations stay on screen above the bar
                self._bar.write(format_line(record), file=sys.stderr)
        else:
            eta = None
            if "total_steps" in record:  # the pace of the last interval, else the mean since the start
                eta = (record["step_s"] * (record["total_steps"] - step) if record.get("step_s")
                       else self.eta(step))
            print(format_line(record | {"eta_s": eta}), file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flushes and closes every sink."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._tb = self._wandb = None


def info(message: str) -> None:
    """A console message from process 0."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- start-up summary

def _bytes(n: float) -> str:
    """`1.23 GiB`, `4.00 MiB`, ...: a byte count in the largest unit it reaches."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def shard_bytes(x: Any) -> int:
    """Bytes of the largest shard of a sharded array (or ShapeDtypeStruct with a sharding) on one device."""
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    return math.prod(shape) * x.dtype.itemsize


def memory_estimate(params: Any, opt_state: Any, args: Any, rows_per_device: int, seq_len: int,
                    compute_bytes: int, remat: str) -> dict[str, int]:
    """Per-device bytes of a train step, from the shardings (no compilation).

    parameters, Adam moments (the optimizer state as sharded) and gradients (one more copy of the
    parameters) are exact; activations are a rough term: what the backward pass keeps per layer
    for `rows_per_device` rows of `seq_len` (one micro-batch), in the compute dtype:
      remat none   ~ (10 D + 2 N H + 3 F) values per token per layer (inputs of each matmul,
                     attention output, MLP gate/up), plus the attention scores T N per token
      remat dots   ~ (2 N H + 2 K H + 3 F + D) (the matmul outputs only)
      remat full   ~ D per token per layer (each layer's input)
    It is an order of magnitude, not a bound; `jaxsft train
    --dry-run` also compiles the step for the compiler's own number.
    """
    p = sum(shard_bytes(x) for x in jax.tree.leaves(params))
    o = sum(shard_bytes(x) for x in jax.tree.leaves(opt_state))
    d, f = args.hidden_size, args.intermediate_size
    n, k, h = args.num_heads, args.num_kv_heads, args.head_dim
    per_token = {"none": 10 * d + 2 * n * h + 3 * f + seq_len * n, "dots": 2 * n * h + 2 * k * h + 3 * f + d,
                 "full": d}[remat]
    acts = rows_per_device * seq_len * args.num_layers * per_token * compute_bytes
    return {"params": p, "optimizer": o, "gradients": p, "activations": int(acts)}


def memory_line(mem: dict[str, int]) -> str:
    """`1.23 GiB per device (params ..., Adam ..., gradients ..., activations ~...)`."""
    return (f"~{_bytes(sum(mem.values()))} per device (params {_bytes(mem['params'])}, Adam moments "
            f"{_bytes(mem['optimizer'])}, gradients {_bytes(mem['gradients'])}, activations ~{_bytes(mem['activations'])})")


def summary_lines(*, model_path: str, model_type: str, n_params: int, mesh: dict, global_batch: int,
                  seq_len: int, grad_accum: int, steps: tuple[int, int], memory: dict[str, int],
                  run_dir: Path, param_dtype: str) -> list[str]:
    """The start-up summary (the data lines come from the data stage, printed as it prepares)."""
    return [
        f"model: {model_type}, {n_params:,} parameters ({param_dtype}) from {model_path}",
        f"mesh: {mesh} | global batch {global_batch} x {seq_len}"
        + (f" in {grad_accum} micro-batches" if grad_accum > 1 else "") + f" | steps {steps[0]}->{steps[1]}",
        f"memory: {memory_line(memory)}",
        f"run dir: {run_dir}",
    ]
