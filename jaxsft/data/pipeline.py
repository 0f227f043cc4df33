"""The Grain pipeline: prepared examples -> run order -> packed rows -> local batches.

Order is deterministic from the seed. Each process reads a disjoint share of the records (every
`process_count`-th record of each source, from its index), reshuffled each epoch; together the
processes read every record. With `data.weights`, each `data.train` entry is its own source,
shuffled and repeated on its own, and the sources are interleaved in those proportions.

Before the first batch every record of the process is rendered once (`prepare.py`), so bad records
stop the run before it starts and the counts are logged: kept, truncated, dropped, trained tokens,
and the packing efficiency of an epoch packed exactly as the run packs it.

The iterator's state is small (the position of the current packing window in the run order and
the rows already taken from it) and goes into every checkpoint (see `checkpoint.py`), so a resumed
run sees the same next batch, bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import grain

from jaxsft.config import DataConfig
from jaxsft.data.pack import pack, pack_list, packing_efficiency, pad_row, stack_rows
from jaxsft.data.prepare import Prepared, prepare
from jaxsft.data.sources import ConcatSource, open_source
from jaxsft.errors import DataError

# The examples are already in memory: reader threads would only contend for the GIL.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def sources(cfg: DataConfig, key: str = "data.train") -> list[ConcatSource]:
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


def prepare_train(cfg: DataConfig, tokenizer, *, seed: int, process_index: int = 0,
                  process_count: int = 1) -> Prepared:
    """This process's training examples, rendered, checked and counted, with the epoch's packing."""
    components = sources(cfg)
    prepared = prepare(cfg, tokenizer, components, process_index=process_index, process_count=process_count)
    for source, store in zip(components, prepared.stores):
        if not len(store):
            s = prepared.stats
            raise DataError(f"{source}: no example left to train on for process {process_index} of {process_count} "
                            f"({s.overlong:,} dropped as too long, {s.empty:,} with nothing to train; see "
                            f"data.seq_len, data.overlong, data.empty)")
    prepared.stats.efficiency, prepared.stats.rows = epoch_packing(prepared, cfg, seed)
    return prepared


def batches(prepared: Prepared, cfg: DataConfig, *, seed: int, local_batch: int) -> grain.IterDataset:
    """The endless dataset of local batches over prepared examples."""
    examples = ordered([len(s) for s in prepared.stores], [s.__getitem__ for s in prepared.stores], cfg,
                       _seed(cfg, seed), repeat=True)
    rows = pack(examples.to_iter_dataset(READ_OPTIONS), cfg.seq_len, cfg.packing_bins, seed)
    return rows.batch(local_batch, drop_remainder=True)


def train_dataset(cfg: DataConfig, tokenizer, *, seed: int, local_batch: int, process_index: int = 0,
                  process_count: int = 1, report: bool = True) -> grain.IterDataset:
    """An endless dataset of local batches (`[local_batch, seq_len]` batch contract dicts).

    Renders every record of this process first; with `report`, logs what that found.
    """
    prepared = prepare_train(cfg, tokenizer, seed=seed, process_index=process_index, process_count=process_count)
    if report:
        _report(prepared, cfg, process_count, f" (~{prepared.stats.rows / local_batch:,.0f} steps)")
    return batches(prepared, cfg, seed=seed, local_batch=local_batch)


def _report(prepared: Prepared, cfg: DataConfig, process_count: int, epoch: str = "", name: str = "data") -> None:
    from jaxsft.monitor import info

    who = f" (process 0 of {process_count}: its share)" if process_count > 1 else ""
    for line in prepared.stats.summary(cfg.seq_len, name + who, epoch):
        info(line)


def eval_batches(cfg: DataConfig, tokenizer, *, local_batch: int, process_index: int = 0,
                 process_count: int = 1, max_batches: int = 0, report: bool = True) -> list[dict]:
    """The held-out set, packed in order into local batches; the last is padded with empty rows.

    With `report`, logs the counts and packing as for the training data.
    """
    prepared = prepare(cfg, tokenizer, sources(cfg, "data.eval"), process_index=process_index,
                       process_count=process_count)
    rows = pack_list([ex for store in prepared.stores for ex in (store[i] for i in range(len(store)))], cfg.seq_len)
    if report:
        prepared.stats.rows = len(rows)
        prepared.stats.efficiency = prepared.stats.tokens / max(len(rows) * cfg.seq_len, 1)
        _report(prepared, cfg, process_count, name="eval data")
    out = []
    for start in range(0, len(rows), local_batch):
        chunk = rows[start:start + local_batch]
        chunk += [pad_row(cfg.seq_len)] * (local_batch - len(chunk))
        out.append(stack_rows(chunk))
    return out[:max_batches] if max_batches else out
