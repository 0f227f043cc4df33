"""`jaxsft data inspect`: what the data stage makes of a config's training data, before any training.

`inspect_data` prints the statistics a run logs at start-up and more (records, tokens, the
trained-token fraction, dropped and truncated counts, the packing efficiency of an epoch, a length
histogram), then the first examples rendered with their trained tokens highlighted: ANSI colour on
a terminal, `[[brackets]]` otherwise. `dump_json` prints the first examples as JSON lines instead,
`{"tokens", "loss_mask", "text"}` (unshifted ids; `loss_mask[i]` says whether token i is trained),
for comparing with other tools.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import TextIO

import numpy as np

from jaxsft.config import Config
from jaxsft.data.pack import packing_bound
from jaxsft.data.pipeline import prepare_train, record_sources
from jaxsft.data.prepare import DataStats
from jaxsft.data.render import EMPTY, Renderer, load_tokenizer, nothing_to_train
from jaxsft.errors import ConfigError

ANSI_TRAINED, ANSI_RESET = "\x1b[1;32m", "\x1b[0m"


def _tokenizer(cfg: Config):
    if not cfg.model.path:
        raise ConfigError("config key 'model.path' is not set (the model directory whose tokenizer renders the data)")
    return load_tokenizer(cfg.model.path)


def highlight(tokenizer, ids: np.ndarray, mask: np.ndarray, color: bool) -> str:
    """The example's text with its trained tokens marked (colour, or `[[...]]`)."""
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False)
            if mask[start]:
                text = f"{ANSI_TRAINED}{text}{ANSI_RESET}" if color else f"[[{text}]]"
            parts.append(text)
            start = end
    return "".join(parts)


def histogram(lengths: list[int], seq_len: int, bins: int = 12, width: int = 40) -> list[str]:
    """Text bars of how many examples have each length (in tokens, before truncation)."""
    if not lengths:
        return ["  (no examples)"]
    x = np.asarray(lengths)
    lo, hi = int(x.min()), int(x.max())
    edges = np.unique(np.linspace(lo, hi + 1, bins + 1).round().astype(int))
    counts, _ = np.histogram(x, edges)
    top = max(int(counts.max()), 1)
    lines = []
    for a, b, n in zip(edges[:-1], edges[1:], counts):
        mark = "  > seq_len" if a > seq_len else ""
        lines.append(f"  {a:>7,}-{b - 1:<7,} {'#' * int(round(width * n / top)):<{width}} {n:,}{mark}")
    q = np.percentile(x, [50, 90, 99]).round().astype(int)
    lines.append(f"  median {q[0]:,} | p90 {q[1]:,} | p99 {q[2]:,} | max {hi:,} tokens")
    return lines


def report(stats: DataStats, cfg: Config, kept_lengths: list[int]) -> list[str]:
    """The statistics block of `inspect_data` (`kept_lengths`: the kept examples' tokens, as packed)."""
    d = stats
    bound, why = packing_bound(kept_lengths, cfg.data.seq_len)
    return [
        f"records     {d.records:,}",
        f"kept        {d.kept:,} ({d.truncation(cfg.data.seq_len, named=False)})",
        f"dropped     {d.overlong:,} too long (data.overlong={cfg.data.overlong}), "
        f"{d.empty:,} with nothing to train (data.empty={cfg.data.empty})",
        f"tokens      {d.tokens:,}, {d.trained:,} trained ({d.trained / max(d.tokens, 1):.1%})",
        f"packing     one epoch into {d.rows:,} rows of {cfg.data.seq_len} "
        f"(windows of {cfg.data.packing_bins} rows)",
        f"packing efficiency {d.efficiency:.2%} (non-padding fraction of the packed rows; no packing of these "
        f"lengths can pass {bound:.2%}: {why})",
        "lengths (tokens per example, before truncation):",
        *histogram(d.lengths, cfg.data.seq_len),
    ]


def inspect_data(cfg: Config, *, examples: int = 3, out: TextIO | None = None, color: bool | None = None) -> DataStats:
    """Prints statistics and the first `examples` examples of `cfg.data.train` (all processes' records)."""
    out = out or sys.stdout
    color = out.isatty() if color is None else color
    tokenizer = _tokenizer(cfg)
    prepared = prepare_train(cfg.data, tokenizer, seed=cfg.train.seed)
    print(f"data: {', '.join(cfg.data.train)} | tokenizer {cfg.model.path} | seq_len {cfg.data.seq_len} | "
          f"schema {cfg.data.schema}", file=out)
    kept = [int(n) for store in prepared.stores for n in store.lengths()]
    for line in report(prepared.stats, cfg, kept):
        print(line, file=out)
    shown = list(itertools.islice(((store, i) for store in prepared.stores for i in range(len(store))), examples))
    if shown:
        legend = "bold green" if color else "[[brackets]]"
        print(f"\nfirst {len(shown)} example(s), trained tokens in {legend}:", file=out)
    for store, i in shown:
        ids, mask = store.ids_and_mask(i)
        print(f"--- {store.where(i)}: {len(ids) - 1} tokens, {int(mask[1:].sum())} trained", file=out)
        print(highlight(tokenizer, ids, mask, color), file=out)
    return prepared.stats


def dump_json(cfg: Config, n: int, out: TextIO | None = None) -> int:
    """Prints the first `n` kept examples in dataset order as JSON lines; returns how many it printed."""
    out = out or sys.stdout
    tokenizer = _tokenizer(cfg)
    renderer = Renderer(tokenizer, cfg.data)
    printed = 0
    for source in record_sources(cfg.data):
        for index in range(len(source)):
            if printed >= n:
                return printed
            record = source[index]
            ids, mask, status = renderer.fit(record, *renderer.render(record))
            if status == EMPTY and cfg.data.empty == "error":
                raise nothing_to_train(record["_where"])
            if ids is None:
                continue
            print(json.dumps({"tokens": ids.tolist(), "loss_mask": mask.tolist(),
                              "text": tokenizer.decode(ids.tolist(), skip_special_tokens=False)}), file=out)
            printed += 1
    return printed
