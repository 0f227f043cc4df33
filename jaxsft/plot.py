"""Plots as PNG files: a run's curves, and the learning curve of `jaxsft curve`.

    jaxsft plot RUN_DIR        # writes RUN_DIR/metrics.png (also written at the end of `train`)

`plot_run` draws train and eval loss, learning rate, tokens/s and the generation metrics logged
during training (`train.eval_generate_every`: eval_exact_match, ...) over steps from
`RUN_DIR/metrics.jsonl`; `plot_curve` draws a metric against the number of training examples, with
the prompting baselines as horizontal lines. Drawn with matplotlib's Agg backend (no display
needed), and written through a temporary file renamed over the old plot, so it is never half-written.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxsft.errors import JaxsftError, disk_full, is_disk_full
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
    # Generation metrics logged during training (`train.eval_generate_every`), in a fourth panel.
    generated = list(dict.fromkeys(k for r in records for k in r if k.startswith("eval_") and k != "eval_loss"))
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4 if generated else 3, figsize=(20 if generated else 15, 4.2), constrained_layout=True)
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
    if generated:
        from matplotlib.ticker import PercentFormatter

        ax = axes[3]
        for key in generated:
            steps, values = _series(records, key)
            ax.plot(steps, values, "o-", label=key.removeprefix("eval_"), markersize=4)
        if all(0 <= v <= 1 for key in generated for v in _series(records, key)[1]):
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.set_ylim(-0.03, 1.03)
        ax.set_title("held-out generations")
        ax.legend()
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    fig.suptitle(str(run_dir))
    return _save(fig, out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    """Writes `fig` to `out` through a temporary file renamed over it; closes the figure."""
    plt = _pyplot()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    except OSError as e:  # name the file meant, not the temporary one (a full disk: `DiskFullError`)
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(out, "plot") from None
        raise OSError(e.errno, e.strerror, str(out)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out


def plot_curve(examples: list[int], values: list[float], baselines: dict[str, float], metric: str,
               out: str | Path, title: str = "") -> Path:
    """Draws `metric` of the fine-tuned runs against their training examples (log x axis), each
    baseline (label -> value) as a horizontal line; writes `out`, returns its path. Metrics other
    than loss are fractions, shown as percentages."""
    from matplotlib.ticker import NullFormatter, PercentFormatter

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ax.plot(examples, values, "o-", label="fine-tuned", zorder=3)
    for (label, value), style in zip(baselines.items(), ("--", ":", "-.", (0, (5, 1)))):
        if value == value:  # NaN: the metric applied to no prompt, nothing to draw
            ax.axhline(value, linestyle=style, color="gray" if "zero" in label else "tab:orange", label=label)
    ax.set_xscale("log")
    ax.set_xticks(examples, [f"{n:,}" for n in examples])
    ax.xaxis.set_minor_formatter(NullFormatter())
    if metric not in ("loss", "perplexity"):
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if all(0 <= v <= 1 for v in [*values, *baselines.values()] if v == v):
            ax.set_ylim(-0.03, 1.03)  # the whole 0-100% scale, so small gains do not look large
    ax.set_xlabel("training examples")
    ax.set_ylabel({"loss": "held-out completion loss"}.get(metric, metric))
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or f"{metric} against training examples")
    return _save(fig, Path(out))
