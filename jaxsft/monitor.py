"""Run output people read: `metrics.jsonl` (one JSON object per logged step) and console lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax


class MetricsLog:
    """Appends metrics to `RUN_DIR/metrics.jsonl` (process 0 only) and prints a console line.

    On resume from step `resume_step`, lines of later steps (written after that checkpoint by the
    run that died) are dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        self.main = jax.process_index() == 0
        if self.main and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(format_line(record), file=sys.stderr, flush=True)


def format_line(record: dict) -> str:
    """`step 12/300 | loss 1.2345 | eval_loss ... | 2,345 tok/s`: the console view of one record."""
    parts = [f"step {record['step']}" + (f"/{record['total_steps']}" if "total_steps" in record else "")]
    for key in ("loss", "eval_loss", "accuracy", "grad_norm", "lr"):
        if key in record:
            parts.append(f"{key} {record[key]:.4g}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    return " | ".join(parts)


def info(message: str) -> None:
    """A console message from process 0."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
