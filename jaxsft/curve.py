"""The learning curve: does fine-tuning beat prompting, and from how many examples?

    jaxsft curve CONFIG --sizes 100,300,1000 [--metric NAME] [--few-shot K] [--epochs E] [--out DIR]

Each size N trains on the first N records of one shuffle of `data.train` (`fewshot.train_order`,
seeded by `train.seed`), so the 100 are inside the 300; the few-shot examples are the first usable
records of the same order. The subsets are written as JSONL (`DIR/data/train-N.jsonl`, the records'
own fields), each trained as a normal run by `train` (`DIR/size-N/`: config.yaml, checkpoints,
metrics.jsonl; no export) and evaluated by `run_eval` on the same held-out set (`data.eval`). The
base model's prompting baselines (zero-shot, and k-shot with `eval.few_shot`) are evaluated once
(`DIR/baselines/`). Every size trains `train.steps` steps, or with `--epochs E`
ceil(E x rows / train.batch_size), where rows are the packed rows of one epoch of the subset as the
run packs it (the "~N steps" of its data log line); warmup and decay follow each run's own steps.

Writes `DIR/curve.json`, `DIR/curve.md` (a row per size: examples, steps, held-out loss, every metric;
the baselines; the smallest size that beats them) and `DIR/curve.png` (the chosen metric against the
examples, log x axis, the baselines as horizontal lines). Run again, it skips the sizes whose run
finished and was evaluated with the same config (`DIR/size-N/curve_point.json`); a size cut short
resumes from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax

from jaxsft.config import Config, to_dict
from jaxsft.data.pipeline import prepare_train
from jaxsft.data.render import load_tokenizer
from jaxsft.data.sources import open_source
from jaxsft.errors import ConfigError, JaxsftError
from jaxsft.evaluate import fmt, metric_functions, run_eval
from jaxsft.fewshot import train_order
from jaxsft.monitor import atomic_write_text, info
from jaxsft.train import train

POINT = "curve_point.json"  # in each size's run directory once it is trained and evaluated
NUMBERS = ("loss", "perplexity", "token_accuracy", "trained_tokens")


def parse_sizes(text: str) -> list[int]:
    """`"100,300,1000"` as sorted distinct positive sizes; errors name `--sizes`."""
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] <= 0:
        raise JaxsftError(f"--sizes {text!r}: give positive numbers of training examples separated by commas, "
                          f"e.g. --sizes 100,300,1000")
    return sizes


def write_subsets(cfg: Config, sizes: list[int], out: Path) -> dict[int, Path]:
    """Writes the first N records of `train_order` to `out/data/train-N.jsonl` for each size N."""
    source = open_source(cfg.data.train, "data.train")
    if sizes[-1] > len(source):
        raise JaxsftError(f"--sizes {sizes[-1]} is more than the {len(source):,} records of data.train ({source})")
    order = train_order(len(source), cfg.train.seed)[:sizes[-1]]
    # default=str: a Parquet or Arrow value without a JSON form (a date) is kept as its text.
    lines = [json.dumps({k: v for k, v in source[int(i)].items() if k != "_where"}, ensure_ascii=False, default=str)
             + "\n" for i in order]
    (out / "data").mkdir(parents=True, exist_ok=True)
    paths = {n: out / "data" / f"train-{n}.jsonl" for n in sizes}
    for n, path in paths.items():
        atomic_write_text(path, "".join(lines[:n]))
    return paths


def steps_for(cfg: Config, epochs: float | None, tokenizer) -> int:
    """`train.steps`, or the steps of `epochs` passes over `data.train` as the run packs it."""
    if epochs is None:
        return cfg.train.steps
    rows = prepare_train(cfg.data, tokenizer, seed=cfg.train.seed).stats.rows
    return max(1, math.ceil(epochs * rows / cfg.train.batch_size))


def _saved(path: Path, config: dict) -> dict | None:
    """The result saved in `path` when it was made with `config`, else None."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("config") == config:
            return saved
    return None


def _numbers(result: dict) -> dict:
    return {**{k: result[k] for k in NUMBERS}, "metrics": result.get("metrics", {})}


def _baselines(cfg: Config, out: Path, devices) -> tuple[dict, int]:
    """The base model's zero-shot (and k-shot) results, `(label -> numbers, held-out prompts)`,
    evaluated once into `out/baselines/`."""
    base_dir = out / "baselines"
    config = to_dict(cfg)
    saved = _saved(base_dir / POINT, config)
    if saved is None:
        info(f"curve: prompting baselines of {cfg.model.path}")
        report = run_eval(cfg, cfg.model.path, out=str(base_dir), devices=devices)
        models = {("base zero-shot" if label in ("model", "zero-shot") else f"base {label}"): _numbers(r)
                  for label, r in report["models"].items()}
        saved = {"config": config, "models": models, "num_prompts": report["num_prompts"]}
        if jax.process_index() == 0:
            atomic_write_text(base_dir / POINT, json.dumps(saved, indent=2) + "\n")
    return saved["models"], saved["num_prompts"]


def _point(cfg: Config, n: int, subset: Path, out: Path, epochs: float | None, tokenizer, devices) -> dict:
    """Trains and evaluates one size (or reads what an earlier run of the command left)."""
    run_dir = out / f"size-{n}"
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=(str(subset),)),
                              run=dataclasses.replace(cfg.run, dir=str(run_dir), export=""),
                              eval=dataclasses.replace(cfg.eval, few_shot=0))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps_for(cfg, epochs, tokenizer)))
    config = to_dict(cfg)
    saved = _saved(run_dir / POINT, config)
    if saved is not None:
        info(f"curve: {n:,} examples: trained and evaluated before ({run_dir / POINT}), skipped")
        return saved
    if (run_dir / POINT).is_file():
        raise JaxsftError(f"{run_dir} holds a point trained with another config than this one; remove it or give "
                          f"another --out")
    info(f"curve: {n:,} examples, {cfg.train.steps:,} steps -> {run_dir}")
    train(cfg, devices)
    report = run_eval(cfg, str(run_dir), out=str(run_dir), devices=devices)
    point = {"examples": n, "steps": cfg.train.steps, "run_dir": str(run_dir), **_numbers(report["models"]["model"]),
             "num_prompts": report["num_prompts"], "config": config}
    if jax.process_index() == 0:
        atomic_write_text(run_dir / POINT, json.dumps(point, indent=2) + "\n")
    return point


def value(result: dict, metric: str) -> float:
    """`metric` (a generation metric, or loss) of a point's or baseline's numbers; NaN when absent."""
    return result["loss"] if metric == "loss" else result["metrics"].get(metric, float("nan"))


def summary(curve: dict) -> str:
    """One line: the smallest size whose fine-tuned run beats every prompting baseline on the metric."""
    metric, baselines = curve["metric"], curve["baselines"]
    sign = -1 if metric == "loss" else 1  # loss: lower is better
    known = {k: value(b, metric) for k, b in baselines.items() if not math.isnan(value(b, metric))}
    if not known:
        return f"no baseline has a {metric} to compare with"
    best = max(reversed(known), key=lambda k: sign * known[k])  # a tie goes to k-shot, as in eval's verdict
    than = f"the best prompting baseline ({best}, {fmt(metric, known[best])} {metric})"
    wins = [p["examples"] for p in curve["points"] if sign * value(p, metric) > sign * known[best]]
    return f"fine-tuning beats {than} from {wins[0]:,} examples" if wins else \
        f"fine-tuning does not beat {than} at any size tried"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(curve: dict) -> str:
    """The curve as Markdown: a row per size, the baselines, the summary line."""
    names = list(curve["points"][0]["metrics"]) if curve["points"] else []
    prompts = f" ({curve['num_prompts']} prompts for the generation metrics)" if names else ""
    lines = [f"# Learning curve on {', '.join(curve['data'])}", "",
             f"Each size trains `{curve['model']}` on the first N records of data.train (one shuffle by train.seed) "
             f"for {curve['steps']}, then is evaluated on the same held-out set{prompts}.", "",
             _row(["examples", "steps", "held-out loss"] + names), "|" + " ---: |" * (3 + len(names))]
    for p in curve["points"]:
        lines.append(_row([f"{p['examples']:,}", f"{p['steps']:,}", fmt("loss", p["loss"])]
                          + [fmt(m, value(p, m)) for m in names]))
    lines += ["", "Prompting baselines (the base model, not trained):", "",
              _row(["baseline", "held-out loss"] + names), "| --- |" + " ---: |" * (1 + len(names))]
    for label, b in curve["baselines"].items():
        lines.append(_row([label, fmt("loss", b["loss"])] + [fmt(m, value(b, m)) for m in names]))
    lines += ["", f"![{curve['metric']} against training examples](curve.png)", "", f"Verdict: {curve['summary']}."]
    return "\n".join(lines) + "\n"


def run_curve(cfg: Config, sizes: list[int], out: str | None = None, metric: str | None = None,
              epochs: float | None = None, devices: list | None = None) -> dict:
    """`jaxsft curve` (see the module docstring); returns what curve.json holds."""
    from jaxsft.plot import plot_curve

    if not cfg.data.eval:
        raise ConfigError("config key 'data.eval' is not set: the curve evaluates every size on held-out data")
    if cfg.data.weights:
        raise ConfigError("config key 'data.weights': the curve takes its subsets from data.train read as one set; "
                          "unset the weights")
    if epochs is not None and not epochs > 0:
        raise JaxsftError(f"--epochs {epochs}: must be positive")
    names = list(metric_functions(cfg.eval)) + ["loss"]
    metric = metric or names[0]
    if metric not in names:
        raise JaxsftError(f"--metric {metric}: not one of this config's metrics ({', '.join(names)}); see eval.metrics")
    out_dir = Path(out or f"{cfg.run.dir.rstrip('/')}-curve")
    subsets = write_subsets(cfg, sizes, out_dir)
    baselines, num_prompts = _baselines(cfg, out_dir, devices)
    tokenizer = load_tokenizer(cfg.model.path) if epochs is not None else None
    points = [_point(cfg, n, subsets[n], out_dir, epochs, tokenizer, devices) for n in sizes]
    curve = {"data": list(cfg.data.eval), "model": cfg.model.path, "metric": metric,
             "steps": f"{epochs:g} epochs" if epochs is not None else f"train.steps ({cfg.train.steps:,} steps)",
             "num_prompts": num_prompts, "points": [{k: v for k, v in p.items() if k != "config"} for p in points],
             "baselines": baselines}
    curve["summary"] = summary(curve)
    if jax.process_index() == 0:
        atomic_write_text(out_dir / "curve.json", json.dumps(curve, indent=2) + "\n")
        atomic_write_text(out_dir / "curve.md", markdown(curve))
        plot_curve(sizes, [value(p, metric) for p in points], {k: value(b, metric) for k, b in baselines.items()},
                   metric, out_dir / "curve.png", title=f"{metric} on {num_prompts} held-out prompts")
        info(f"curve: {out_dir / 'curve.md'}, .json and .png")
    curve["out_dir"] = str(out_dir)
    return curve
