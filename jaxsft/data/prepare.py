"""Render every record once, before training: checks, counts, and the tokens held in memory.

`prepare` reads one data shard of each source, renders and masks every record, applies the
length and empty-example policies, and keeps the surviving examples as flat token and mask arrays
(5 bytes a token). A bad record therefore stops the run before its first step, with its file and
line; the counts people need (kept, truncated, dropped, trained tokens) are exact, not estimated;
and the Grain pipeline after it only orders and packs, so templates and tokenization run once a
run rather than once an epoch.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxsft.config import DataConfig
from jaxsft.data.render import EMPTY, OVERLONG, PROMPT_TRUNCATED, TRUNCATED, Renderer, nothing_to_train, shift

RENDER_CHUNK = 1024  # records templated, then tokenized in one batch


class ExampleStore:
    """Rendered examples in memory (a Grain random-access source of unpacked examples)."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, where: list[str]):
        self._ids, self._mask, self._offsets, self._where = ids, mask, offsets, where

    @classmethod
    def build(cls, pieces: list[tuple[np.ndarray, np.ndarray, str]]) -> "ExampleStore":
        """From `(ids, mask, where)` per example."""
        offsets = np.cumsum([0] + [len(ids) for ids, _, _ in pieces]).astype(np.int64)
        ids = np.concatenate([p[0] for p in pieces]).astype(np.int32) if pieces else np.zeros(0, np.int32)
        mask = np.concatenate([p[1] for p in pieces]).astype(np.uint8) if pieces else np.zeros(0, np.uint8)
        return cls(ids, mask, offsets, [p[2] for p in pieces])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def lengths(self) -> np.ndarray:
        """Tokens (= targets) of each example."""
        return np.diff(self._offsets) - 1

    def trained(self) -> np.ndarray:
        """Trained targets of each example."""
        done = np.concatenate([[0], np.cumsum(self._mask, dtype=np.int64)])
        return done[self._offsets[1:]] - done[self._offsets[:-1] + 1]

    def where(self, index: int) -> str:
        """The record an example came from (`file:line` or `file row N`)."""
        return self._where[index]

    def ids_and_mask(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The example's unshifted token ids and per-token trained mask."""
        a, b = self._offsets[index], self._offsets[index + 1]
        return self._ids[a:b], self._mask[a:b].astype(np.int32)

    def __getitem__(self, index: int) -> dict:
        return shift(*self.ids_and_mask(int(index)))


@dataclasses.dataclass
class DataStats:
    """What one pass over a process's records found."""

    records: int = 0
    kept: int = 0  # including truncated
    truncated: int = 0  # cut at the end (after the last trained turn that fits whole; text at seq_len)
    prompt_truncated: int = 0  # the prompt cut from the left (overlong=truncate_prompt)
    overlong: int = 0  # dropped: too long, with no trained turn that could be kept whole
    empty: int = 0  # dropped: nothing trained (empty=drop)
    policy: str = "drop"  # data.overlong
    tokens: int = 0  # tokens of the kept examples, as packed (after truncation)
    trained: int = 0  # trained targets among them
    lengths: list = dataclasses.field(default_factory=list)  # each record's rendered length (targets), untruncated
    efficiency: float = 0.0  # non-padding fraction of the packed rows of one epoch
    rows: int = 0  # packed rows of one epoch

    def truncation(self, seq_len: int, named: bool = True) -> str:
        """What `data.overlong` cut, e.g. `truncated 30 prompts to fit 512 (data.overlong=truncate_prompt)`
        (without `named`, no policy in brackets)."""
        policy = f" (data.overlong={self.policy})" if named else ""
        if self.policy == "drop":
            return f"none truncated{policy}"
        cuts = f"{self.truncated:,}"
        if self.policy == "truncate_prompt":
            at_end = f" and {self.truncated:,} at the end" if self.truncated else ""
            cuts = f"{self.prompt_truncated:,} prompt{'' if self.prompt_truncated == 1 else 's'}{at_end}"
        return f"truncated {cuts} to fit {seq_len}{policy}"

    def summary(self, seq_len: int, name: str = "data", epoch: str = "") -> list[str]:
        """Console lines: counts, tokens, packing (`epoch` is added after the rows of an epoch)."""
        frac = self.trained / max(self.tokens, 1)
        return [f"{name}: {self.records:,} records | kept {self.kept:,} | dropped {self.overlong:,} too long, "
                f"{self.empty:,} with nothing to train | {self.truncation(seq_len)}",
                f"{name}: {self.tokens:,} tokens, {self.trained:,} trained ({frac:.1%}) | one epoch packs into "
                f"{self.rows:,} rows of {seq_len}{epoch} | packing efficiency {self.efficiency:.2%} (non-padding)"]


@dataclasses.dataclass
class Prepared:
    """A process's examples, one store per source, and what preparing them found."""

    stores: list[ExampleStore]
    stats: DataStats


def prepare(cfg: DataConfig, tokenizer, components: Sequence, *, shard: int = 0, shards: int = 1) -> Prepared:
    """Renders every record of data shard `shard` of `shards` of each source (see the module docstring)."""
    renderer = Renderer(tokenizer, cfg)
    stats = DataStats(policy=cfg.overlong)
    stores = []
    for source in components:
        pieces = []
        # The shard's records: every `shards`-th, from the `shard`-th, rendered in chunks
        # (tokenizing many texts in one call is several times faster than one by one).
        share = range(shard, len(source), shards)
        for c in range(0, len(share), RENDER_CHUNK):
            records = [source[i] for i in share[c:c + RENDER_CHUNK]]
            for record, (ids, mask) in zip(records, renderer.render_many(records)):
                _count_and_keep(record, renderer.fit(record, ids, mask), len(ids), cfg, stats, pieces)
        stores.append(ExampleStore.build(pieces))
    return Prepared(stores, stats)


def _count_and_keep(record: dict, fitted: tuple, length: int, cfg: DataConfig, stats: DataStats,
                    pieces: list) -> None:
    """Counts one rendered record of `length` ids in `stats` after the length policy (`fitted`:
    `Renderer.fit`), applies the empty policy, and appends what survives to `pieces`."""
    kept_ids, kept_mask, status = fitted
    stats.records += 1
    stats.lengths.append(length - 1)
    if kept_ids is None:
        if status == EMPTY and cfg.empty == "error":
            raise nothing_to_train(record["_where"])
        stats.overlong += status == OVERLONG
        stats.empty += status == EMPTY
        return
    stats.kept += 1
    stats.truncated += status == TRUNCATED
    stats.prompt_truncated += status == PROMPT_TRUNCATED
    stats.tokens += len(kept_ids) - 1
    stats.trained += int(kept_mask[1:].sum())
    pieces.append((kept_ids, kept_mask, record["_where"]))
