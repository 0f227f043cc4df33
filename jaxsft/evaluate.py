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
same records. The report goes to `eval_report.json` and `eval_report.md` (a Markdown table, a
handful of example generations and a one-line verdict), all generations to `eval_generations.jsonl`.

Prompting baselines (`eval.few_shot: K`, `jaxsft eval --few-shot K`): the base model (the baseline,
else the model) is also evaluated with K examples of `data.train` before each held-out prompt
(`jaxsft.fewshot`); its completion loss is over the same held-out answers, each with the shots
before it.
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
from jaxsft.data.pipeline import eval_batches, process_batch
from jaxsft.data.render import Renderer
from jaxsft.data.sources import open_source
from jaxsft.errors import ConfigError
from jaxsft.fewshot import FewShot, answer_span, choose_shots, max_prompt_tokens
from jaxsft.generate import LoadedModel, load_model
from jaxsft.loss import make_eval_step
from jaxsft.monitor import info
from jaxsft.rundir import run_source
from jaxsft.stepspec import eval_spec


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
    """One held-out prompt: where it came from, its text (for people), its tokens, the answer; with
    few-shot prompting, how many shots its tokens hold and the record as rewritten with them."""

    where: str
    text: str
    prompt_ids: list[int]
    reference: str
    shots: int = 0
    record: dict | None = None


def _prompt_text(record: dict, fields) -> str:
    prompt = record.get(fields.prompt)
    if isinstance(prompt, str):
        return prompt
    messages = prompt if isinstance(prompt, list) else record.get(fields.messages) or []
    users = [m.get(fields.content) for m in messages if isinstance(m, dict) and m.get(fields.role) in ("user", "human")]
    return str(users[-1]) if users else ""


def held_out(cfg: Config, tokenizer, limit: int = 0, fewshot: FewShot | None = None) -> list[HeldOut]:
    """The first `limit` (0: all) held-out records with something trained, split into the prompt
    (the tokens before the last trained turn, rendered as in training) and its reference answer.
    With `fewshot`, the same records, each prompt with the shots before it."""
    data = dataclasses.replace(cfg.data, train_on_prompt=False)
    renderer = Renderer(tokenizer, data)
    source = open_source(data.eval, "data.eval")
    items = []
    for i in range(len(source)):
        if limit and len(items) == limit:
            break
        record = source[i]
        ids, mask = renderer.render(record)
        span = answer_span(mask)
        if span is None:
            continue
        start, end = span
        reference = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=True).strip()
        item = HeldOut(record["_where"], _prompt_text(record, data.fields), ids[:start].tolist(), reference)
        if fewshot is not None:  # decided on the record as it is: every arm gets the same records
            item.prompt_ids, item.record, item.shots = fewshot.prompt(record)
        items.append(item)
    return items


# --------------------------------------------------------------------------- one model


def completion_loss(loaded: LoadedModel, cfg: Config, mesh, records: list[dict] | None = None) -> dict[str, float]:
    """Loss, perplexity and token accuracy over every trained token of the held-out set (or of
    `records`, rendered as `cfg.data` says)."""
    graphdef, params = nnx.split(loaded.model)
    params = nnx.to_pure_dict(params)
    local_batch = process_batch(cfg.train.batch_size, jax.process_count())
    batches = eval_batches(cfg.data, loaded.tokenizer, local_batch=local_batch,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           max_batches=cfg.train.eval_batches, records=records)
    # Attention skips keys further back than the longest example of these rows, and the loss reads
    # only as many positions per row as the most trained targets of one: training's eval step.
    step = make_eval_step(graphdef, mesh, jax.tree.map(lambda x: x.sharding, params),
                          eval_spec(cfg, mesh, batches))
    total = np.zeros(3)
    for batch in batches:
        total += [float(x) for x in step(params, parallel.global_batch(batch, mesh))]
    loss = total[0] / max(total[1], 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": total[2] / max(total[1], 1.0),
            "trained_tokens": int(total[1])}


def fewshot_loss(loaded: LoadedModel, cfg: Config, mesh, items: list[HeldOut], fewshot: FewShot) -> dict[str, float]:
    """`completion_loss` over the rewritten held-out records: each answer with its shots before it."""
    # Longer rows than training's where the shots need them: an answer is never cut off.
    data = dataclasses.replace(fewshot.rewritten_data, seq_len=max(cfg.data.seq_len, fewshot.longest - 1))
    return completion_loss(loaded, dataclasses.replace(cfg, data=data), mesh, [it.record for it in items])


def evaluate_model(loaded: LoadedModel, cfg: Config, mesh, fewshot: FewShot | None = None) -> dict:
    """One model's numbers and generations on the held-out set (see the module docstring), with
    `fewshot`'s shots before each prompt when given."""
    limit = cfg.eval.num_generations
    if fewshot is None:
        info(f"eval {loaded.source}: completion loss over the held-out set")
        result = {"source": loaded.source, **completion_loss(loaded, cfg, mesh)}
        items = held_out(cfg, loaded.tokenizer, limit)
    else:
        k = len(fewshot.shots)
        info(f"eval {loaded.source} {k}-shot: completion loss over the held-out set, shots before each answer")
        items = held_out(cfg, loaded.tokenizer, 0, fewshot)  # all of them: the loss is over the whole set
        result = {"source": loaded.source, **fewshot_loss(loaded, cfg, mesh, items, fewshot)}
        items = items[:limit or None]
        fewer = sum(it.shots < k for it in items)
        if fewer:
            info(f"eval {loaded.source} {k}-shot: {fewer} of {len(items)} prompts hold fewer shots, to leave "
                 f"eval.max_new_tokens positions within max_position_embeddings ({fewshot.max_prompt} prompt tokens)")
        result["few_shot"] = {"k": k, "shots": [s.where for s in fewshot.shots], "seed": cfg.train.seed,
                              "chat": fewshot.renderer.has_template, "max_prompt_tokens": fewshot.max_prompt,
                              "fewer_shots": fewer,
                              "first_prompt": loaded.tokenizer.decode(items[0].prompt_ids) if items else ""}
    if cfg.eval.metrics or cfg.eval.user_metric:
        info(f"eval {loaded.source}: generating for {len(items)} held-out prompts")
        predictions = loaded.generate([it.prompt_ids for it in items], cfg.eval)
        result["metrics"] = score(predictions, [it.reference for it in items], metric_functions(cfg.eval))
        result["generations"] = [{"where": it.where, "prompt": it.text, "reference": it.reference, "generation": p}
                                 for it, p in zip(items, predictions)]
    return result


# --------------------------------------------------------------------------- the report


def fmt(name: str, value: float) -> str:
    """A number of the report as people read it: n/a, loss to 4 digits, counts, else a percentage."""
    if value != value:  # NaN: the metric applied to no prompt
        return "n/a"
    if name in ("loss", "perplexity"):
        return f"{value:.4g}"
    if name == "trained_tokens":
        return f"{int(value):,}"
    return f"{100 * value:.1f}%"


def _arm(label: str) -> str:
    """How the verdict names a model's column."""
    if label == "baseline":
        return "the baseline"
    return label.removeprefix("base ") + " prompting" if label.endswith("-shot") else label


def verdict(report: dict) -> str:
    """One line: the last model (the fine-tuned one) against the best of the others, on the first
    metric, else on the completion loss; empty with one model."""
    models = report["models"]
    *others, last = models
    if not others:
        return ""
    metric = next(iter(models[last].get("metrics", {})), None)
    if metric:
        def value(k): return 100 * models[k]["metrics"][metric]
        unit, where = f"points of {metric}", f"on {report['num_prompts']} held-out prompts"
    else:
        def value(k): return -models[k]["loss"]  # lower is better
        unit, where = "in completion loss", "on the held-out set"
    candidates = [k for k in others if not math.isnan(value(k))]
    if math.isnan(value(last)) or not candidates:
        return f"no verdict: {metric} applies to none of the {report['num_prompts']} held-out prompts"
    best = max(reversed(candidates), key=value)  # a tie goes to the later column (k-shot over zero-shot)
    diff, digits = value(last) - value(best), 1 if metric else 4
    if round(diff, digits) == 0:
        at = f"at {fmt(metric, value(last) / 100)} {metric}" if metric else f"at {-value(last):.4g} completion loss"
        return f"{_arm(last)} ties with {_arm(best)} {at} {where}"
    amount = f"{abs(diff):.1f}" if metric else f"{abs(diff):.4g}"
    return f"{_arm(last)} {'beats' if diff > 0 else 'loses to'} {_arm(best)} by {amount} {unit} {where}"


def markdown(report: dict) -> str:
    """The report as Markdown: one row per number, one column per model, how the k-shot prompts
    were made, example generations, then the verdict."""
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
        lines.append(f"| {name} | " + " | ".join(fmt(row, v) for v in values) + " |")
    for label in labels:
        shots = models[label].get("few_shot")
        if not shots:
            continue
        how = "earlier user/assistant turns of the chat template" if shots["chat"] else \
            "plain text (each prompt and completion, then a blank line)"
        fewer = (f"; {shots['fewer_shots']} prompts hold fewer, to fit {shots['max_prompt_tokens']:,} prompt tokens "
                 f"(max_position_embeddings - eval.max_new_tokens)" if shots["fewer_shots"] else "")
        lines += ["", f"{label}: {shots['k']} records of data.train before each prompt, as {how}: the first of "
                      f"data.train shuffled by train.seed {shots['seed']} ({', '.join(shots['shots'])}){fewer}. Its "
                      f"completion loss is computed over the same answers with the shots before each "
                      f"({models[label]['trained_tokens']:,} trained tokens).",
                  "", f"## The first {label} prompt", "", "```text", shots["first_prompt"], "```"]
    if report["examples"]:
        lines += ["", "## Examples", ""]
        for ex in report["examples"]:
            lines += [f"**{ex['where']}**: {ex['prompt']!r}", "", f"- reference: `{ex['reference']}`"]
            lines += [f"- {k}: `{ex[k]}`" for k in labels]
            lines.append("")
    text = "\n".join(lines).rstrip() + "\n"
    return text + f"\nVerdict: {report['verdict']}.\n" if report.get("verdict") else text


def _arms(model: str, baseline: str | None, k: int) -> dict[str, tuple[str, bool]]:
    """The report's columns: label -> (model source, with shots)."""
    if not k:
        return {"baseline": (baseline, False), "fine-tuned": (model, False)} if baseline else {"model": (model, False)}
    if baseline:
        return {"base zero-shot": (baseline, False), f"base {k}-shot": (baseline, True), "fine-tuned": (model, False)}
    return {"zero-shot": (model, False), f"{k}-shot": (model, True)}


def run_eval(cfg: Config, model: str, baseline: str | None = None, out: str | None = None,
             devices: list | None = None) -> dict:
    """`jaxsft eval`: evaluates `model` (and `baseline`) on `data.eval`, writes the report, returns it.

    With `eval.few_shot: K` the baseline (else the model) is evaluated twice: as it is (zero-shot)
    and with K shots (see the module docstring). The report goes to `out` (a directory), else the
    run directory of `model` when it is a run or checkpoint, else `run.dir`.
    """
    if not cfg.data.eval:
        raise ConfigError("config key 'data.eval' is not set: evaluation needs held-out data")
    if cfg.eval.few_shot and not cfg.data.train:
        raise ConfigError(f"config key 'eval.few_shot' is {cfg.eval.few_shot}, but 'data.train' is not set: the "
                          f"examples come from the training data")
    mesh = parallel.make_mesh(cfg.mesh, devices)
    arms = _arms(model, baseline, cfg.eval.few_shot)
    models = {}
    for source in dict.fromkeys(s for s, _ in arms.values()):  # one model in memory at a time, each loaded once
        loaded = load_model(source, mesh, cfg.model.param_dtype, cfg.model.compute_dtype)
        for label, (s, with_shots) in arms.items():
            if s != source:
                continue
            fewshot = None
            if with_shots:
                chat = bool(getattr(loaded.tokenizer, "chat_template", None))
                fewshot = FewShot(loaded.tokenizer, cfg.data, choose_shots(cfg, cfg.eval.few_shot, chat),
                                  max_prompt_tokens(loaded, cfg.eval))
            models[label] = evaluate_model(loaded, cfg, mesh, fewshot)
        del loaded
    models = {label: models[label] for label in arms}
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
    report["verdict"] = verdict(report)
    run = run_source(model)  # a run's report goes into its run directory
    out_dir = Path(out) if out else (run[0] if run else Path(cfg.run.dir))
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "eval_report.md").write_text(markdown(report))
        with open(out_dir / "eval_generations.jsonl", "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        info(f"eval report: {out_dir / 'eval_report.md'} and .json, generations in {out_dir / 'eval_generations.jsonl'}")
    report["out_dir"] = str(out_dir)
    return report
