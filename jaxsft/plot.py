"""The run's curves as one PNG: train and eval loss, learning rate and tokens/s over steps.

    jaxsft plot RUN_DIR        # writes RUN_DIR/metrics.png (also written at the end of `train`)

Drawn with matplotlib's Agg backend (no display needed) from `RUN_DIR/metrics.jsonl`, and
written through a temporary file renamed over the old plot, so it is never half-written.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxsft.errors import JaxsftError
from jaxsft.monitor import read_metrics

PLOT_NAME = "metrics.png"


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draws `RUN_DIR/metrics.jsonl` into `out` (default `RUN_DIR/metrics.png`); returns its path."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise JaxsftError(f"{run_dir}: no metrics.jsonl (is this a jaxsft run directory?)")
    records = read_metrics(metrics)
    if not records:
        raise JaxsftError(f"{metrics}: holds no metrics yet")
    out = Path(out) if out is not None else run_dir / PLOT_NAME

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    ax = axes[0]
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, style, label=label, markersize=4)
    ax.set_yscale("log")
    ax.set_title("completion loss")
    ax.legend()
    for ax, key, title in ((axes[1], "lr", "learning rate"), (axes[2], "tokens_per_s", "tokens/s")):
        steps, values = _series(records, key)
        ax.plot(steps, values, "-")
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    fig.suptitle(str(run_dir))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out
