"""Packing unpacked examples into fixed-length rows: the batch contract.

Every batch, packed or not, is a dict of int32 `[rows, seq_len]` arrays:
  tokens       input token ids
  targets      the next token of the same example (0 where there is none)
  loss_mask    1 where `targets` is trained (completion tokens and their closing end-of-turn)
  segment_ids  1, 2, ... for the examples of a row; 0 for padding
  positions    position within the example, restarting at 0 for each example

Because each example is shifted before packing (`render.to_example`), the last token of one
example never predicts the first token of the next, and attention (which compares segment ids)
never crosses examples. Packing itself is Grain's best-fit packer.
"""

from __future__ import annotations

from typing import Iterable

import grain
import numpy as np

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
_FEATURES = ("tokens", "targets", "loss_mask")


def _to_contract(row: dict) -> dict:
    # Grain gives segment ids / positions per feature; they agree, so one pair serves all.
    return {"tokens": row["tokens"], "targets": row["targets"], "loss_mask": row["loss_mask"],
            "segment_ids": row["tokens_segment_ids"], "positions": row["tokens_positions"]}


def pack(examples: grain.IterDataset, seq_len: int, num_bins: int, seed: int, shuffle_bins: bool = True) -> grain.IterDataset:
    """Best-fit packs a stream of unpacked examples into rows of `seq_len` (batch contract dicts)."""
    packed = grain.experimental.BestFitPackIterDataset(
        examples, length_struct={k: seq_len for k in _FEATURES}, num_packing_bins=num_bins,
        seed=seed, shuffle_bins=shuffle_bins)
    return packed.map(_to_contract)


def pack_list(examples: Iterable[dict], seq_len: int, num_bins: int = 8) -> list[dict]:
    """Packs a finite list of examples in order (for evaluation, inspection and tests)."""
    ds = grain.MapDataset.source(list(examples)).to_iter_dataset()
    return list(pack(ds, seq_len, num_bins, seed=0, shuffle_bins=False))


def pad_row(seq_len: int) -> dict:
    """An all-padding row (segment 0, nothing trained), to fill a short final batch."""
    return {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS}


def stack_rows(rows: list[dict]) -> dict:
    """Stacks rows into a `[rows, seq_len]` batch."""
    return {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in BATCH_KEYS}
