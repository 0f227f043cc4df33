"""The Grain pipeline: records -> rendered + masked examples -> packed rows -> local batches.

Order is deterministic from the seed; each process reads a disjoint share of the records (every
`process_count`-th record from its index), reshuffled each epoch. The iterator's state is small
and goes into every checkpoint (see `checkpoint.py`), so a resumed run sees the same next batch.
"""

from __future__ import annotations

import grain

from jaxsft.config import DataConfig
from jaxsft.data.pack import pack, pack_list, pad_row, stack_rows
from jaxsft.data.render import Renderer, to_example
from jaxsft.data.sources import JsonlSource


def _examples(source: JsonlSource, renderer: Renderer, cfg: DataConfig, process_index: int, process_count: int,
              seed: int | None, repeat: bool) -> grain.MapDataset:
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if seed is not None:
        ds = ds.shuffle(seed)
    if repeat:
        ds = ds.repeat(None)
    return ds.map(lambda r: to_example(*renderer.render(r), cfg.seq_len, cfg.overlong))


def train_dataset(cfg: DataConfig, tokenizer, *, seed: int, local_batch: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
    """An endless dataset of local batches (`[local_batch, seq_len]` batch contract dicts)."""
    source = JsonlSource(cfg.train)
    ds = _examples(source, Renderer(tokenizer), cfg, process_index, process_count,
                   seed if cfg.shuffle else None, repeat=True)
    ds = ds.to_iter_dataset().filter(lambda x: x is not None)
    return pack(ds, cfg.seq_len, cfg.packing_bins, seed).batch(local_batch, drop_remainder=True)


def eval_batches(cfg: DataConfig, tokenizer, *, local_batch: int, process_index: int = 0,
                 process_count: int = 1, max_batches: int = 0) -> list[dict]:
    """The held-out set, packed in order into local batches; the last is padded with empty rows."""
    source = JsonlSource(cfg.eval)
    examples = [x for x in _examples(source, Renderer(tokenizer), cfg, process_index, process_count, None, False)
                if x is not None]
    rows = pack_list(examples, cfg.seq_len, cfg.packing_bins)
    batches = []
    for start in range(0, len(rows), local_batch):
        chunk = rows[start:start + local_batch]
        chunk += [pad_row(cfg.seq_len)] * (local_batch - len(chunk))
        batches.append(stack_rows(chunk))
    return batches[:max_batches] if max_batches else batches
