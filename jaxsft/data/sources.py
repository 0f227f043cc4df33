"""Records from JSONL files, read lazily by index, checked once up front.

`JsonlSource` indexes the byte offset of every line (one pass, which also validates each record),
then serves records by index as Grain's random-access source. A bad record raises `DataError`
naming the file and line, before any training starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxsft.errors import DataError

REQUIRED_FIELDS = ("prompt", "completion")


def check_record(record, where: str) -> dict:
    """Validates one `{"prompt", "completion"}` record; `where` is `file:line` for the message."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt' and 'completion', got {type(record).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise DataError(f"{where}: record has no '{field}' field (it has: {', '.join(record) or 'nothing'})")
        if not isinstance(record[field], str):
            raise DataError(f"{where}: '{field}' must be a string, got {type(record[field]).__name__}")
    if not record["completion"].strip():
        raise DataError(f"{where}: 'completion' is empty, so the record has nothing to train on")
    return record


class JsonlSource:
    """Random-access records from one or more JSONL files (Grain `RandomAccessDataSource` protocol)."""

    def __init__(self, paths: Sequence[str | Path]):
        if not paths:
            raise DataError("no data files given (config key 'data.train')")
        self.paths = [Path(p) for p in paths]
        file_ids, offsets, sizes, lines = [], [], [], []
        for fid, path in enumerate(self.paths):
            if not path.is_file():
                raise DataError(f"data file not found: {path}")
            with path.open("rb") as f:
                offset = 0
                for line_no, raw in enumerate(f, start=1):
                    if raw.strip():
                        where = f"{path}:{line_no}"
                        try:
                            record = json.loads(raw)
                        except (json.JSONDecodeError, UnicodeDecodeError) as e:
                            raise DataError(f"{where}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
                        check_record(record, where)
                        file_ids.append(fid)
                        offsets.append(offset)
                        sizes.append(len(raw))
                        lines.append(line_no)
                    offset += len(raw)
            if not file_ids or file_ids[-1] != fid:
                raise DataError(f"{path}: the file holds no records")
        self._file_ids = np.asarray(file_ids, np.int32)
        self._offsets = np.asarray(offsets, np.int64)
        self._sizes = np.asarray(sizes, np.int64)
        self._lines = np.asarray(lines, np.int64)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._offsets)

    def where(self, index: int) -> str:
        """`file:line` of record `index`, for messages."""
        return f"{self.paths[self._file_ids[index]]}:{self._lines[index]}"

    def __getitem__(self, index: int) -> dict:
        fid = int(self._file_ids[index])
        fd = self._fds.get(fid)
        if fd is None:
            fd = self._fds[fid] = os.open(self.paths[fid], os.O_RDONLY)
        # pread: no shared file position, so Grain's reader threads may call this concurrently.
        record = json.loads(os.pread(fd, int(self._sizes[index]), int(self._offsets[index])))
        record["_where"] = self.where(index)
        return record

    def __getstate__(self):  # open file descriptors do not travel to worker processes
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __repr__(self) -> str:
        return f"JsonlSource({[str(p) for p in self.paths]}, records={len(self)})"
