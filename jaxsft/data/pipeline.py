"""The Grain pipeline: prepared examples -> run order -> packed rows -> local batches.

Order is deterministic from the seed. The records are split into `data.shards` disjoint shards
(every `shards`-th record of each source, from the shard's index; by default one shard per
process), each reshuffled each epoch and packed into rows on its own; together the shards hold
every record. Row r of a global batch of B rows is row `r % (B / shards)` of shard
`r // (B / shards)`'s batch, so the global batch depends only on the shard count, never on how
many processes assemble it: each process builds only the shards its rows come from (its own share
of the records when shards are a multiple of the processes) and takes its rows. With `data.weights`, each `data.train` entry is its own source,
shuffled and repeated on its own, and the sources are interleaved in those proportions.

Before the first batch every record of the process is rendered once (`prepare.py`), so bad records
stop the run before it starts and the counts are logged: kept, truncated, dropped, trained tokens,
and the packing efficiency of an epoch packed exactly as the run packs it.

The iterator's state is small and kept per shard (the position of the current packing window in
the shard's order and the rows already taken from it); it goes into every checkpoint (see
`checkpoint.py`), so a resumed run sees the same next batch, bit for bit, on any process count.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import grain
import numpy as np

from jaxsft.config import DataConfig
from jaxsft.data.pack import pack, pack_list, packing_efficiency, pad_row, stack_rows
from jaxsft.data.prepare import Prepared, prepare
from jaxsft.data.sources import ConcatSource, open_source
from jaxsft.errors import ConfigError, DataError

# The examples are already in memory: reader threads would only contend for the GIL.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def record_sources(cfg: DataConfig, key: str = "data.train") -> list[ConcatSource]:
    """The record sources: one per `data.train` entry for a weighted mixture, else one over all files."""
    specs = cfg.train if key == "data.train" else cfg.eval
    if key == "data.train" and cfg.weights:
        return [open_source([spec], key) for spec in specs]
    return [open_source(specs, key)]


def ordered(sizes: Sequence[int], fetch: Sequence[Callable[[int], Any]], cfg: DataConfig, seed: int | None,
            repeat: bool) -> grain.MapDataset:
    """The run's order over per-source items: each source's indices shuffled (when `seed` is given)
    and repeated, `fetch[k]` reading item i of source k, the sources mixed by `data.weights`."""
    out = []
    for k, (n, get) in enumerate(zip(sizes, fetch)):
        ds = grain.MapDataset.range(n)
        if seed is not None:
            ds = ds.shuffle(seed + 7919 * k)  # a different order for each source of a mixture
        if repeat:
            ds = ds.repeat(None)
        out.append(ds.map(get))  # after the shuffle: only indices are shuffled, cheaply
    return out[0] if len(out) == 1 else grain.MapDataset.mix(out, list(cfg.weights))


def _seed(cfg: DataConfig, seed: int) -> int | None:
    return seed if cfg.shuffle else None


def epoch_packing(prepared: Prepared, cfg: DataConfig, seed: int) -> tuple[float, int]:
    """`(efficiency, rows)` of packing the first epoch's worth of examples in the run's order."""
    lengths = ordered([len(s) for s in prepared.stores], [s.lengths().__getitem__ for s in prepared.stores], cfg,
                      _seed(cfg, seed), repeat=True)
    n = sum(len(s) for s in prepared.stores)
    return packing_efficiency([int(lengths[i]) for i in range(n)], cfg.seq_len, cfg.packing_bins)


def prepare_train(cfg: DataConfig, tokenizer, *, seed: int, shard: int = 0, shards: int = 1) -> Prepared:
    """The training examples of data shard `shard` of `shards` (every `shards`-th record of each
    source, from the `shard`-th), rendered, checked and counted, with the epoch's packing."""
    components = record_sources(cfg)
    prepared = prepare(cfg, tokenizer, components, shard=shard, shards=shards)
    for source, store in zip(components, prepared.stores):
        if not len(store):
            s = prepared.stats
            hint = "; data.overlong=truncate_prompt cuts prompts to fit" if s.overlong and cfg.overlong != \
                "truncate_prompt" else ""
            raise DataError(f"{source}: no example left to train on in data shard {shard} of {shards} "
                            f"({s.overlong:,} dropped as too long, {s.empty:,} with nothing to train; see "
                            f"data.seq_len, data.overlong, data.empty{hint})")
    prepared.stats.efficiency, prepared.stats.rows = epoch_packing(prepared, cfg, seed)
    return prepared


def batches(prepared: Prepared, cfg: DataConfig, *, seed: int, local_batch: int) -> grain.IterDataset:
    """The endless dataset of local batches over prepared examples."""
    examples = ordered([len(s) for s in prepared.stores], [s.__getitem__ for s in prepared.stores], cfg,
                       _seed(cfg, seed), repeat=True)
    rows = pack(examples.to_iter_dataset(READ_OPTIONS), cfg.seq_len, cfg.packing_bins, seed)
    return rows.batch(local_batch, drop_remainder=True)


def row_plan(global_batch: int, shards: int, process_index: int = 0, process_count: int = 1
             ) -> list[tuple[int, int, int]]:
    """`(shard, start, stop)`: the rows of each shard's batch that this process supplies, in the
    order of its rows of the global batch (rows `[p B / P, (p + 1) B / P)`)."""
    per_shard, per_process = global_batch // shards, global_batch // process_count
    lo, hi = process_index * per_process, (process_index + 1) * per_process
    return [(s, max(lo, s * per_shard) - s * per_shard, min(hi, (s + 1) * per_shard) - s * per_shard)
            for s in range(lo // per_shard, (hi - 1) // per_shard + 1)]


def process_batch(global_batch: int, process_count: int) -> int:
    """The rows of a global batch each process supplies, with a clear error when the processes
    cannot split it evenly."""
    if global_batch % process_count:
        raise ConfigError(f"config key 'train.batch_size' ({global_batch}) must be divisible by the process count "
                          f"({process_count})")
    return global_batch // process_count


def check_shards(shards: int, global_batch: int, process_count: int) -> None:
    """A clear error when the global batch cannot be split evenly by shards and processes."""
    if shards < 1 or global_batch % shards:
        raise ConfigError(f"config key 'data.shards' ({shards}) must divide 'train.batch_size' ({global_batch})")
    process_batch(global_batch, process_count)


class ShardedBatches:
    """This process's local batches, assembled from the data shards its rows come from.

    An iterator of batch contract dicts `[global_batch / process_count, seq_len]`; `get_state` /
    `set_state` hold one Grain iterator state per shard, keyed by shard index. `longest` is the
    most tokens of any example of those shards: no row it yields holds a longer one. Nor does any
    row hold more than `most_trained` trained targets (the largest trained share of any example,
    times seq_len).
    """

    def __init__(self, iterators: dict[int, Any], plan: list[tuple[int, int, int]], shards: int, longest: int = 0,
                 most_trained: int = 0):
        self.iterators, self.plan, self.shards, self.longest = iterators, plan, shards, longest
        self.most_trained = most_trained
        # The shards whose first row is this process's: it writes their state into checkpoints.
        self.owned = [s for s, start, _ in plan if start == 0]

    def __iter__(self) -> "ShardedBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [(next(self.iterators[s]), a, b) for s, a, b in self.plan]
        if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == len(next(iter(parts[0][0].values()))):
            return parts[0][0]
        return {k: np.concatenate([batch[k][a:b] for batch, a, b in parts]) for k in parts[0][0]}

    def get_state(self) -> dict[str, Any]:
        return {str(s): it.get_state() for s, it in self.iterators.items()}

    def set_state(self, state: dict[str, Any]) -> None:
        missing = [s for s in self.iterators if str(s) not in state]
        if missing:
            raise DataError(f"the checkpoint's data state has no state for shards {missing} of {self.shards}")
        for s, it in self.iterators.items():
            it.set_state(state[str(s)])


def train_batches(cfg: DataConfig, tokenizer, *, seed: int, global_batch: int, shards: int, process_index: int = 0,
                  process_count: int = 1, report: bool = True) -> ShardedBatches:
    """The endless iterator of this process's local batches (see the module docstring).

    Renders every record of the shards it needs first; with `report`, logs what that found.
    """
    check_shards(shards, global_batch, process_count)
    plan = row_plan(global_batch, shards, process_index, process_count)
    per_shard = global_batch // shards
    iterators, longest, most_trained = {}, 0, 0
    for s, _, _ in plan:
        prepared = prepare_train(cfg, tokenizer, seed=seed, shard=s, shards=shards)
        for store in prepared.stores:
            lengths = store.lengths()
            longest = max(longest, int(lengths.max(initial=0)))
            # A row's examples hold at most seq_len tokens, so at most this share of them is trained.
            most_trained = max(most_trained, int((store.trained() * cfg.seq_len // np.maximum(lengths, 1)).max(initial=0)))
        if report:
            who = f" (shard {s} of {shards})" if shards > 1 else ""
            _report(prepared, cfg, f" (~{prepared.stats.rows / per_shard:,.0f} steps)", name="data" + who,
                    everywhere=process_count > 1)
        iterators[s] = iter(batches(prepared, cfg, seed=seed, local_batch=per_shard))
    return ShardedBatches(iterators, plan, shards, longest, min(most_trained, cfg.seq_len))


def _report(prepared: Prepared, cfg: DataConfig, epoch: str = "", name: str = "data",
            everywhere: bool = False) -> None:
    """Logs what preparing found; `everywhere`: from every process (each names its process)."""
    import sys

    import jax

    from jaxsft.monitor import info

    for line in prepared.stats.summary(cfg.seq_len, name, epoch):
        if everywhere:
            print(f"[process {jax.process_index()}] {line}", file=sys.stderr, flush=True)
        else:
            info(line)


def eval_batches(cfg: DataConfig, tokenizer, *, local_batch: int, process_index: int = 0,
                 process_count: int = 1, max_batches: int = 0, report: bool = True,
                 records: Sequence[dict] | None = None) -> list[dict]:
    """This process's rows of the held-out set, packed in order into global batches of
    `local_batch * process_count` rows; the last is padded with empty rows.

    Every process renders the whole (small) held-out set, so the batches and the loss do not
    depend on the process count. With `report`, logs the counts and packing as for training data.
    `records` (each with its `_where`, as sources give them) replaces the files of `data.eval`.
    """
    prepared = prepare(cfg, tokenizer, [records] if records is not None else record_sources(cfg, "data.eval"))
    rows = pack_list([ex for store in prepared.stores for ex in (store[i] for i in range(len(store)))], cfg.seq_len)
    if report:
        prepared.stats.rows = len(rows)
        prepared.stats.efficiency = prepared.stats.tokens / max(len(rows) * cfg.seq_len, 1)
        _report(prepared, cfg, name="eval data")
    size = local_batch * process_count
    mine = slice(process_index * local_batch, (process_index + 1) * local_batch)
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        chunk += [pad_row(cfg.seq_len)] * (size - len(chunk))
        out.append(stack_rows(chunk[mine]))
    return out[:max_batches] if max_batches else out
