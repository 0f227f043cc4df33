"""Packing unpacked examples into fixed-length rows: the batch contract.

Every batch, packed or not, is a dict of int32 `[rows, seq_len]` arrays:
  tokens       input token ids
  targets      the next token of the same example (0 where there is none)
  loss_mask    1 where `targets` is trained (completion tokens and their closing end-of-turn)
  segment_ids  1, 2, ... for the examples of a row; 0 for padding
  positions    position within the example, restarting at 0 for each example

Because each example is shifted before packing (`render.to_example`), the last token of one
example never predicts the first token of the next, and attention (which compares segment ids)
never crosses examples.

The packer reads a window of examples (`window_rows * seq_len` tokens), plans its rows (`plan_rows`:
the better of best-fit decreasing and filling one row at a time with the subset of the remaining
examples that fills it most, an exact subset sum over their lengths) and emits them in a seeded
shuffled order. Grain's own best-fit packer closes all its open rows as soon as one example fits
none of them: on narrow length distributions (the demo: 88-119 tokens into rows of 512) its rows
are 91.9% non-padding with 32 open rows, 93.1% with 256; this packer's are 97.8%, where no packing
can pass 98.0%. Its iterator state is the parent's state at the window start plus the number of
rows already emitted, so a restored iterator rebuilds the same window and gives the same next row.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from typing import Any, Iterable, Sequence

import grain
import numpy as np

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
_FEATURES = ("tokens", "targets", "loss_mask")


def _fill(counts: dict[int, int], capacity: int) -> dict[int, int]:
    """How many examples of each length to take so their total is as large as possible but <= capacity.

    Subset sum with bounded multiplicities, as bitsets in Python ints: each length's count is split
    into chunks of 1, 2, 4, ... examples, and bit `t` of `reach` says total `t` is reachable.
    """
    mask = (1 << (capacity + 1)) - 1
    chunks = []
    for length in sorted(counts, reverse=True):
        n, m = counts[length], 1
        while n > 0:
            take = min(m, n)
            chunks.append((length, take))
            n, m = n - take, m * 2
    reach, before = 1, []
    for length, take in chunks:
        before.append(reach)
        reach = (reach | (reach << (length * take))) & mask
        if reach >> capacity:  # a full row: nothing can beat it, the chunks so far make it
            break
    total = reach.bit_length() - 1
    # Walk back from the shortest chunk, leaving a chunk out whenever the total stays reachable
    # without it: of the best fills, this keeps the one with the longest examples.
    taken: dict[int, int] = defaultdict(int)
    for (length, take), reach in zip(reversed(chunks[:len(before)]), reversed(before)):
        if not (reach >> total) & 1:
            taken[length] += take
            total -= length * take
    return taken


def _fill_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Rows filled one at a time, each with the subset of the remaining examples that fills it most."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, length in enumerate(lengths):
        by_length[int(length)].append(i)
    counts = Counter({length: len(ids) for length, ids in by_length.items()})
    taken_so_far: dict[int, int] = defaultdict(int)
    rows = []
    fill: dict[int, int] = {}
    while counts:
        # The last row's fill is still a best one while the examples it takes remain: a best fill of
        # the remaining examples cannot beat the best fill of a superset of them. Solve anew only then.
        if not fill or any(counts[length] < n for length, n in fill.items()):
            fill = _fill(counts, seq_len)
        row = []
        for length, n in fill.items():
            start = taken_so_far[length]
            row += by_length[length][start:start + n]
            taken_so_far[length] += n
            counts[length] -= n
            if not counts[length]:
                del counts[length]
        rows.append(row)
    return rows


def _best_fit_decreasing(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Longest example first, each into the open row it leaves least room in."""
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(free, (int(lengths[i]), -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(free, (room - int(lengths[i]), r))
    return rows


def plan_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Groups example indices into as few rows of at most `seq_len` tokens as it can.

    Two plans, keeping the one with fewer rows: filling each row in turn with the best subset (near
    optimal on narrow length distributions, where best-fit decreasing leaves a gap in every row), and
    best-fit decreasing (near optimal on wide ones). Within a row, indices keep their input order.
    Every length must be in `1..seq_len`.
    """
    plan = _best_fit_decreasing(lengths, seq_len)
    if len(plan) > -(-sum(lengths) // seq_len):  # not yet as few rows as the tokens need
        plan = min(plan, _fill_rows(lengths, seq_len), key=len)
    return [sorted(row) for row in plan]


def build_row(examples: Sequence[dict], seq_len: int) -> dict:
    """One batch-contract row of `seq_len` from the examples that go in it (padding after them)."""
    row = {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS}
    at = 0
    for segment, ex in enumerate(examples, start=1):
        n = len(ex["tokens"])
        for k in _FEATURES:
            row[k][at:at + n] = ex[k]
        row["segment_ids"][at:at + n] = segment
        row["positions"][at:at + n] = np.arange(n, dtype=np.int32)
        at += n
    return row


class _PackIterator(grain.DatasetIterator):
    """Reads a window of examples, plans its rows, emits them one by one; see the module docstring."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, window_rows: int, seed: int, shuffle: bool):
        super().__init__(parent)
        self._seq_len, self._window_rows, self._seed, self._shuffle = seq_len, window_rows, seed, shuffle
        self._window = 0
        self._window_start = self._parent.get_state()
        self._examples: list[dict] = []
        self._plan: list[list[int]] | None = None  # None: (re)read and plan the current window first
        self._next = 0

    def _read_window(self) -> None:
        examples, tokens = [], 0
        while tokens < self._window_rows * self._seq_len:
            try:
                ex = next(self._parent)
            except StopIteration:
                break
            examples.append(ex)
            tokens += len(ex["tokens"])
        plan = plan_rows([len(ex["tokens"]) for ex in examples], self._seq_len)
        if self._shuffle:  # fullest rows come first: spread them over the window's batches
            order = np.random.default_rng([self._seed, self._window]).permutation(len(plan))
            plan = [plan[i] for i in order]
        self._examples, self._plan = examples, plan

    def __next__(self) -> dict:
        if self._plan is None:
            self._read_window()
        while self._next >= len(self._plan):
            if not self._plan:
                raise StopIteration
            self._window += 1
            self._window_start = self._parent.get_state()
            self._next = 0
            self._read_window()
        # Rows are built as they are taken: a window's rows at once would be large for long rows.
        row = build_row([self._examples[i] for i in self._plan[self._next]], self._seq_len)
        self._next += 1
        return row

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._window_start, "window": self._window, "next_row": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._window_start = state["parent"]
        self._window, self._next = state["window"], state["next_row"]
        self._plan = None


class PackIterDataset(grain.IterDataset):
    """Best-fit packs a stream of unpacked examples into batch-contract rows of `seq_len`."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, window_rows: int, seed: int, shuffle: bool = True):
        super().__init__(parent)
        self._seq_len, self._window_rows, self._seed, self._shuffle = seq_len, window_rows, seed, shuffle

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._window_rows, self._seed, self._shuffle)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len}, window_rows={self._window_rows})"


def pack(examples: grain.IterDataset, seq_len: int, window_rows: int, seed: int,
         shuffle: bool = True) -> grain.IterDataset:
    """Packs a stream of unpacked examples into rows of `seq_len` (batch contract dicts)."""
    return PackIterDataset(examples, seq_len, window_rows, seed, shuffle)


def pack_list(examples: Iterable[dict], seq_len: int) -> list[dict]:
    """Packs a finite list of examples as one window, rows fullest first (evaluation, inspection, tests)."""
    examples = list(examples)
    return [build_row([examples[i] for i in row], seq_len)
            for row in plan_rows([len(ex["tokens"]) for ex in examples], seq_len)]


def packing_efficiency(lengths: Sequence[int], seq_len: int, window_rows: int) -> tuple[float, int]:
    """`(non-padding fraction, rows)` of packing examples of these lengths, in this order, as the
    pipeline packs them (window by window)."""
    rows, total, start = 0, 0, 0
    lengths = [int(n) for n in lengths]
    while start < len(lengths):
        end, tokens = start, 0
        while end < len(lengths) and tokens < window_rows * seq_len:
            tokens += lengths[end]
            end += 1
        rows += len(plan_rows(lengths[start:end], seq_len))
        total, start = total + tokens, end
    return (total / (rows * seq_len) if rows else 0.0), rows


def packing_bound(lengths: Sequence[int], seq_len: int) -> tuple[float, str]:
    """`(efficiency, why)`: the highest non-padding fraction any packing of these lengths into rows
    of `seq_len` can reach, from the fewest rows they could need: the tokens' own count; one row
    each for examples over half a row; and, when the k shortest examples fill a row, n / k."""
    x = np.sort(np.asarray(lengths, np.int64))
    if not len(x):
        return 0.0, ""
    total = int(x.sum())
    per_row = int(np.searchsorted(np.cumsum(x), seq_len, side="right"))  # most examples one row can hold
    bounds = {-(-total // seq_len): "the tokens alone",
              int((x > seq_len // 2).sum()): "examples longer than half a row",
              -(-len(x) // max(per_row, 1)): f"no {per_row + 1} examples fit in {seq_len}"}
    rows = max(bounds)
    return total / (rows * seq_len), bounds[rows]


def pad_row(seq_len: int) -> dict:
    """An all-padding row (segment 0, nothing trained), to fill a short final batch."""
    return {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS}


def stack_rows(rows: list[dict]) -> dict:
    """Stacks rows into a `[rows, seq_len]` batch."""
    return {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in BATCH_KEYS}


def _as_rows(x: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """`[..., seq_len]` rows, or a list of such batches, as one `[rows, seq_len]` array (none: `[0, 0]`)."""
    parts = x if isinstance(x, list) else [x]
    if not parts:
        return np.zeros((0, 0), np.int32)
    return np.concatenate([np.reshape(p, (-1, np.shape(p)[-1])) for p in parts])


def most_trained(loss_mask: np.ndarray | list[np.ndarray]) -> int:
    """The most trained targets any one row of `[..., seq_len]` rows (or a list of such batches;
    none: 0) holds. The loss reads only that many positions per row (`row_trained`)."""
    return int(np.count_nonzero(_as_rows(loss_mask), axis=1).max(initial=0))


def longest_segment(segment_ids: np.ndarray | list[np.ndarray]) -> int:
    """The most tokens any one example (non-zero segment id) holds in `[..., seq_len]` rows (or a
    list of such batches; none: 0), or `seq_len` where a row's segment is not one contiguous run
    (then nothing bounds how far back a token attends). The model's attention skips keys further
    back than this (`max_segment_len`)."""
    s = _as_rows(segment_ids)
    if not s.size:
        return 0
    starts = np.ones(s.shape, bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]  # where a run of one id begins
    runs = np.bincount(np.cumsum(starts) - 1)  # the length of every run, row after row
    ids = s[starts]
    sorted_ids = np.sort(s, axis=1)
    distinct = (sorted_ids != 0) & np.concatenate([starts[:, :1], sorted_ids[:, 1:] != sorted_ids[:, :-1]], axis=1)
    if (distinct.sum(1) < (starts & (s != 0)).sum(1)).any():  # an id in two runs of one row
        return s.shape[1]
    return int(runs[ids != 0].max(initial=0))
