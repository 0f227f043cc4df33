"""Evaluation on the held-out data (`data.eval`): did fine-tuning help?

For each model (a Hugging Face directory, a run directory or a checkpoint), and side by side for
a fine-tuned model and its baseline:
  - completion loss, perplexity and token accuracy over every trained token of the held-out set,
    computed as training computes its held-out loss (the same rendering, packing and loss code);
  - generation metrics (`eval.metrics`) on the first `eval.num_generations` held-out prompts:
    exact_match, json_valid, json_fields (share of the reference object's fields reproduced),
    label_in_set (`eval.labels`), and an optional user function (`eval.user_metric`).

Each prompt is the example's tokens before its (last) trained turn, exactly what the model saw in
training before it answered; the reference is that turn's text. Both models are evaluated on the
same records. The report goes to `eval_report.json` and `eval_report.md` (a Markdown table and a
handful of example generations), all generations to `eval_generations.jsonl`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx

from jaxsft import parallel
from jaxsft.config import Config, EvalConfig
from jaxsft.data.pipeline import eval_batches
from jaxsft.data.render import Renderer
from jaxsft.data.sources import open_source
from jaxsft.errors import ConfigError
from jaxsft.generate import LoadedModel, is_run_source, load_model
from jaxsft.monitor import info
from jaxsft.train import loss_sums


# --------------------------------------------------------------------------- metrics


def exact_match(prediction: str, reference: str) -> float:
    """1 when the texts are equal, leading and trailing whitespace aside."""
    return float(prediction.strip() == reference.strip())


def _json(text: str):
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return False, None


def json_valid(prediction: str, reference: str) -> float:
    """1 when the prediction parses as JSON."""
    return float(_json(prediction)[0])


def json_fields(prediction: str, reference: str) -> float | None:
    """Share of the reference object's fields that the prediction (a JSON object) has with equal
    values; None (not counted) when the reference is not a JSON object."""
    ok, ref = _json(reference)
    if not ok or not isinstance(ref, dict) or not ref:
        return None
    ok, pred = _json(prediction)
    if not isinstance(pred, dict):
        return 0.0
    return sum(k in pred and pred[k] == v for k, v in ref.items()) / len(ref)


METRICS: dict[str, Callable[[str, str], float | None]] = {
    "exact_match": exact_match, "json_valid": json_valid, "json_fields": json_fields}


def user_metric(spec: str) -> tuple[str, Callable]:
    """`(name, function)` of `eval.user_metric` ("pkg.module:function")."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config key 'eval.user_metric': cannot import {spec!r} ({e})") from None
    if not callable(fn):
        raise ConfigError(f"config key 'eval.user_metric': {spec!r} is not a function")
    return name, fn


def metric_functions(cfg: EvalConfig) -> dict[str, Callable[[str, str], float | None]]:
    """The configured metrics by name, each `(prediction, reference) -> value or None`."""
    fns = {}
    for name in cfg.metrics:
        if name == "label_in_set":
            labels = set(cfg.labels)
            fns[name] = lambda p, r, labels=labels: float(p.strip() in labels)
        else:
            fns[name] = METRICS[name]
    if cfg.user_metric:
        name, fn = user_metric(cfg.user_metric)
        fns[name] = lambda p, r, fn=fn: None if (v := fn(p, r)) is None else float(v)
    return fns


def score(predictions: list[str], references: list[str], fns: dict) -> dict[str, float]:
    """Each metric's mean over the prompts it applies to (a metric giving None skips a prompt)."""
    out = {}
    for name, fn in fns.items():
        values = [v for v in (fn(p, r) for p, r in zip(predictions, references)) if v is not None]
        out[name] = float(np.mean(values)) if values else float("nan")
    return out


# --------------------------------------------------------------------------- held-out data


@dataclasses.dataclass
class HeldOut:
    """One held-out prompt: where it came from, its text (for people), its tokens, the answer."""

    where: str
    text: str
    prompt_ids: list[int]
    reference: str


def _prompt_text(record: dict, fields) -> str:
    prompt = record.get(fields.prompt)
    if isinstance(prompt, str):
        return prompt
    messages = prompt if isinstance(prompt, list) else record.get(fields.messages) or []
    users = [m.get(fields.content) for m in messages if isinstance(m, dict) and m.get(fields.role) in ("user", "human")]
    return str(users[-1]) if users else ""


def held_out(cfg: Config, tokenizer, limit: int = 0) -> list[HeldOut]:
    """The first `limit` (0: all) held-out records with something trained, split into the prompt
    (the tokens before the last trained turn, rendered as in training) and its reference answer."""
    data = dataclasses.replace(cfg.data, train_on_prompt=False)
    renderer = Renderer(tokenizer, data)
    source = open_source(data.eval, "data.eval")
    items = []
    for i in range(len(source)):
        if limit and len(items) == limit:
            break
        record = source[i]
        ids, mask = renderer.render(record)
        trained = np.flatnonzero(mask)
        if not len(trained):
            continue
        end = trained[-1] + 1
        untrained = np.flatnonzero(mask[:end] == 0)
        start = untrained[-1] + 1 if len(untrained) else 0  # where the last trained run begins
        if start == 0:
            continue  # nothing before the answer to prompt with
        reference = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=True).strip()
        items.append(HeldOut(record["_where"], _prompt_text(record, data.fields), ids[:start].tolist(), reference))
    return items


# --------------------------------------------------------------------------- one model


def completion_loss(loaded: LoadedModel, cfg: Config, mesh) -> dict[str, float]:
    """Loss, perplexity and token accuracy over every trained token of the held-out set."""
    graphdef, params = nnx.split(loaded.model)

    def step(params, batch):
        with parallel.activation_sharding(mesh):
            loss_sum, (n, correct) = loss_sums(graphdef, params, batch, cfg.train.loss_chunk)
            return loss_sum, n, correct

    step = jax.jit(step)
    batches = eval_batches(cfg.data, loaded.tokenizer, local_batch=cfg.train.batch_size // jax.process_count(),
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           max_batches=cfg.train.eval_batches)
    total = np.zeros(3)
    for batch in batches:
        total += [float(x) for x in step(params, parallel.global_batch(batch, mesh))]
    loss = total[0] / max(total[1], 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": total[2] / max(total[1], 1.0),
            "trained_tokens": int(total[1])}


def evaluate_model(loaded: LoadedModel, cfg: Config, mesh) -> dict:
    """One model's numbers and generations on the held-out set (see the module docstring)."""
    info(f"eval {loaded.source}: completion loss over the held-out set")
    result = {"source": loaded.source, **completion_loss(loaded, cfg, mesh)}
    items = held_out(cfg, loaded.tokenizer, cfg.eval.num_generations)
    if cfg.eval.metrics or cfg.eval.user_metric:
        info(f"eval {loaded.source}: generating for {len(items)} held-out prompts")
        predictions = loaded.generate([it.prompt_ids for it in items], cfg.eval)
        result["metrics"] = score(predictions, [it.reference for it in items], metric_functions(cfg.eval))
        result["generations"] = [{"where": it.where, "prompt": it.text, "reference": it.reference, "generation": p}
                                 for it, p in zip(items, predictions)]
    return result


# --------------------------------------------------------------------------- the report


def _fmt(name: str, value: float) -> str:
    if value != value:  # NaN: the metric applied to no prompt
        return "n/a"
    if name in ("loss", "perplexity"):
        return f"{value:.4g}"
    if name == "trained_tokens":
        return f"{int(value):,}"
    return f"{100 * value:.1f}%"


def markdown(report: dict) -> str:
    """The report as Markdown: one row per number, one column per model, then example generations."""
    models = report["models"]  # label -> result, the baseline first
    labels = list(models)
    rows = ["loss", "perplexity", "token_accuracy"] + list(next(iter(models.values())).get("metrics", {}))
    head = "| metric | " + " | ".join(f"{k} (`{models[k]['source']}`)" for k in labels) + " |"
    lines = [f"# Evaluation on {', '.join(report['data'])}", "",
             f"Completion loss over {models[labels[-1]]['trained_tokens']:,} trained held-out tokens; generation "
             f"metrics on {report['num_prompts']} held-out prompts ({report['decoding']}).", "",
             head, "|" + " --- |" + " ---: |" * len(labels)]
    for row in rows:
        values = [models[k].get(row, models[k].get("metrics", {}).get(row, float("nan"))) for k in labels]
        name = {"loss": "completion loss", "token_accuracy": "token accuracy"}.get(row, row)
        lines.append(f"| {name} | " + " | ".join(_fmt(row, v) for v in values) + " |")
    if report["examples"]:
        lines += ["", "## Examples", ""]
        for ex in report["examples"]:
            lines += [f"**{ex['where']}**: {ex['prompt']!r}", "", f"- reference: `{ex['reference']}`"]
            lines += [f"- {k}: `{ex[k]}`" for k in labels]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def run_eval(cfg: Config, model: str, baseline: str | None = None, out: str | None = None,
             devices: list | None = None) -> dict:
    """`jaxsft eval`: evaluates `model` (and `baseline`) on `data.eval`, writes the report, returns it.

    The report goes to `out` (a directory), else the run directory of `model` when it is a run or
    checkpoint, else `run.dir`.
    """
    if not cfg.data.eval:
        raise ConfigError("config key 'data.eval' is not set: evaluation needs held-out data")
    mesh = parallel.make_mesh(cfg.mesh, devices)
    sources = {"baseline": baseline, "fine-tuned": model} if baseline else {"model": model}
    models = {}
    for label, source in sources.items():
        loaded = load_model(source, mesh, cfg.model.param_dtype, cfg.model.compute_dtype)
        models[label] = evaluate_model(loaded, cfg, mesh)
        del loaded  # one model in memory at a time
    g = cfg.eval
    decoding = ("greedy" if g.temperature == 0 else f"temperature {g.temperature}, top-k {g.top_k}, "
                f"top-p {g.top_p}") + f", at most {g.max_new_tokens} new tokens"
    # One row per prompt: the record (as the last model rendered it) and every model's generation.
    generations = {k: r.pop("generations", []) for k, r in models.items()}
    n = min((len(v) for v in generations.values()), default=0)
    last = generations[list(models)[-1]]
    rows = [{**{f: last[i][f] for f in ("where", "prompt", "reference")},
             **{k: generations[k][i]["generation"] for k in models}} for i in range(n)]
    report = {"data": list(cfg.data.eval), "num_prompts": n, "decoding": decoding, "models": models,
              "examples": rows[:g.examples]}
    out_dir = Path(out) if out else (_run_dir(model) or Path(cfg.run.dir))
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "eval_report.md").write_text(markdown(report))
        with open(out_dir / "eval_generations.jsonl", "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        info(f"eval report: {out_dir / 'eval_report.md'} and .json, generations in {out_dir / 'eval_generations.jsonl'}")
    report["out_dir"] = str(out_dir)
    return report


def _run_dir(source: str) -> Path | None:
    """The run directory of a run or checkpoint source; None for a Hugging Face directory."""
    if not is_run_source(source):
        return None
    path = Path(source)
    return path if (path / "config.yaml").is_file() else path.parent.parent
