"""Records from data files, read lazily by index: JSONL (plain or gzip), Parquet, Hugging Face datasets.

Every reader is a random-access source (`__len__`, `__getitem__`, as Grain's sources) that returns records as
plain dicts with a `_where` key (`file:line` for JSONL, `file row N` for Parquet and Hugging Face
datasets), so a bad record anywhere later on is reported with its place.

  *.jsonl, *.json (JSON lines)  byte offset of every non-blank line indexed once; records read
                                with `pread` and checked as they are read
  *.jsonl.gz, *.json.gz         decompressed into memory once, then the same
  *.parquet                     the table held in memory (Arrow, columnar); rows converted on access
  a directory                   a `datasets.Dataset.save_to_disk` directory, memory-mapped

`open_source(specs)` expands globs and concatenates the files of several specs into one source.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxsft.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json")
SUFFIXES = "JSON lines (.jsonl, .json, optionally .gz), Parquet (.parquet) or a Hugging Face save_to_disk directory"


def _json_object(raw: bytes, where: str) -> dict:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        hint = "; a JSON array is not read: write one record per line" if raw.lstrip().startswith(b"[") else ""
        raise DataError(f"{where}: not valid JSON ({e.msg if hasattr(e, 'msg') else e}){hint}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object (one record per line), got {type(record).__name__}")
    return record


def _check_not_binary(path: Path, head: bytes) -> None:
    """A clear error for a compressed or Parquet file named as JSON lines (else: bad UTF-8 at line 1)."""
    if head.startswith(b"\x1f\x8b"):
        raise DataError(f"{path}: the file is gzip-compressed; name it {path.name}.gz")
    if head.startswith(b"PAR1"):
        raise DataError(f"{path}: the file is Parquet; name it {path.with_suffix('.parquet').name}")
    for magic, kind, tool in ((b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"), (b"BZh", "bzip2", "bunzip2"),
                              (b"\xfd7zXZ", "xz", "unxz")):
        if head.startswith(magic):
            raise DataError(f"{path}: the file is {kind}-compressed, which is not read; decompress it ({tool}) "
                            f"or recompress it with gzip as {path.name}.gz")


class JsonlSource:
    """Records of one JSON-lines file, plain or gzip-compressed (`.gz`: held decompressed in memory)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._buffer = None  # the decompressed bytes of a .gz file
        if self.path.suffix == ".gz":
            try:
                self._buffer = gzip.decompress(self.path.read_bytes())
            except (OSError, EOFError) as e:
                raise DataError(f"{self.path}: not a readable gzip file ({e})") from None
            offsets, sizes, line_numbers = self._index(self._buffer.splitlines(keepends=True))
        else:
            with self.path.open("rb") as f:
                _check_not_binary(self.path, f.read(4))
                f.seek(0)
                offsets, sizes, line_numbers = self._index(f)
        if not offsets:
            raise DataError(f"{self.path}: the file holds no records")
        self._offsets = np.asarray(offsets, np.int64)
        self._sizes = np.asarray(sizes, np.int64)
        self._lines = np.asarray(line_numbers, np.int64)
        self._fd: int | None = None

    def _index(self, lines) -> tuple[list[int], list[int], list[int]]:
        offsets, sizes, line_numbers = [], [], []
        offset = 0
        for line_no, raw in enumerate(lines, start=1):
            if raw.strip():
                offsets.append(offset)
                sizes.append(len(raw))
                line_numbers.append(line_no)
            offset += len(raw)
        return offsets, sizes, line_numbers

    def __len__(self) -> int:
        return len(self._offsets)

    def where(self, index: int) -> str:
        """`file:line` of record `index`."""
        return f"{self.path}:{self._lines[index]}"

    def _raw(self, index: int) -> bytes:
        start, size = int(self._offsets[index]), int(self._sizes[index])
        if self._buffer is not None:
            return self._buffer[start:start + size]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        # pread: no shared file position, so Grain's reader threads may call this concurrently.
        return os.pread(self._fd, size, start)

    def __getitem__(self, index: int) -> dict:
        where = self.where(index)
        record = _json_object(self._raw(index), where)
        record["_where"] = where
        return record

    def __getstate__(self):  # an open file descriptor does not travel to worker processes
        return self.__dict__ | {"_fd": None}


class _RowSource:
    """A source of table rows (Parquet, Arrow) held as `_rows`: `_row(index)` gives the record,
    named `PATH row N`."""

    path: Path
    _rows: Any

    def _hold(self, rows: Any, what: str) -> None:
        """Keeps the opened table or dataset `rows`; an error naming the file when it holds none."""
        if not len(rows):
            raise DataError(f"{self.path}: the {what} holds no records")
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def where(self, index: int) -> str:
        """`PATH row N` of record `index` (rows count from 0)."""
        return f"{self.path} row {index}"

    def __getitem__(self, index: int) -> dict:
        record = self._row(index)
        record["_where"] = self.where(index)
        return record


class ParquetSource(_RowSource):
    """Records (rows) of one Parquet file, the table held in memory."""

    def __init__(self, path: str | Path):
        import pyarrow.parquet as pq

        self.path = Path(path)
        try:
            table = pq.read_table(self.path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
            raise DataError(f"{self.path}: not a readable Parquet file ({e})") from None
        self._hold(table, "file")

    def _row(self, index: int) -> dict:
        return self._rows.slice(index, 1).to_pylist()[0]


class HfDiskSource(_RowSource):
    """Records of a Hugging Face dataset saved with `Dataset.save_to_disk` (memory-mapped Arrow)."""

    def __init__(self, path: str | Path):
        import datasets

        self.path = Path(path)
        if (self.path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in self.path.iterdir() if p.is_dir())
            raise DataError(f"{self.path}: a DatasetDict with splits {', '.join(splits)}; name one split's "
                            f"directory, e.g. {self.path / (splits[0] if splits else 'train')}")
        try:
            ds = datasets.load_from_disk(str(self.path))
        except Exception as e:  # noqa: BLE001 - datasets raises several types for unreadable directories
            raise DataError(f"{self.path}: not a Hugging Face dataset saved with save_to_disk ({e})") from None
        self._hold(ds, "dataset")

    def _row(self, index: int) -> dict:
        return dict(self._rows[int(index)])


def _open_file(path: Path):
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return HfDiskSource(path)
        raise DataError(f"{path}: a directory that is not a Hugging Face save_to_disk dataset")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    name = path.name.removesuffix(".gz")
    if name.endswith(JSONL_SUFFIXES):
        return JsonlSource(path)
    if name.endswith(".parquet") and not path.name.endswith(".gz"):
        return ParquetSource(path)
    raise DataError(f"{path}: unknown data format; expected {SUFFIXES}")


def expand(spec: str, key: str = "data.train") -> list[Path]:
    """The files a path or glob names (sorted); an error names the spec when it names nothing."""
    if glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        if not paths:
            raise DataError(f"config key '{key}': '{spec}' matches no files")
        return paths
    return [Path(spec)]


class ConcatSource:
    """Several sources read as one, record indices running through them in order."""

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        self._starts = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[object, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.sources[k], index - int(self._starts[k])

    def where(self, index: int) -> str:
        """Where record `index` lives (`file:line` or `file row N`)."""
        source, i = self._locate(index)
        return source.where(i)

    def __getitem__(self, index: int) -> dict:
        source, i = self._locate(int(index))
        return source[i]

    def __str__(self) -> str:
        return ", ".join(str(s.path) for s in self.sources)

    def __repr__(self) -> str:
        return f"ConcatSource({[str(s.path) for s in self.sources]}, records={len(self)})"


def open_source(specs: Sequence[str | Path], key: str = "data.train") -> ConcatSource:
    """One random-access source over every file the specs (paths, globs, directories) name."""
    if not specs:
        raise DataError(f"no data files given (config key '{key}')")
    return ConcatSource([_open_file(p) for spec in specs for p in expand(str(spec), key)])
