"""Crash-safe, resumable JSONL output: one line per finished unit, fsynced, keyed for restart.

A job killed at any moment loses at most the line being written; on restart the torn tail
(a last line without its newline, or one that does not parse) is cut off and the keys already
present are skipped.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from mimigenrec.io import BadInputError


class AppendLog:
    """Append-only JSONL file with a set of finished keys.

    >>> with AppendLog(path, key=lambda r: r["item_id"]) as log:
    ...     if 3 not in log: log.append({"item_id": 3, ...})
    """

    def __init__(self, path: str | os.PathLike, key: Callable[[dict], Hashable]):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: dict[Hashable, dict] = {}
        self.truncated_bytes = 0
        self._recover()
        self._f = open(self.path, "ab")

    def _recover(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good = 0  # byte offset after the last complete, valid line
        lines = data.split(b"\n")
        for lineno, line in enumerate(lines, 1):
            is_last = lineno == len(lines)
            if is_last:  # bytes after the final newline: empty, or a torn write
                break
            end = good + len(line) + 1
            if line.strip():
                try:
                    row = json.loads(line)
                    k = self.key(row)
                except (ValueError, KeyError, TypeError) as e:
                    if lineno == len(lines) - 1 and not lines[-1]:
                        # the last complete line is garbage: a torn write followed by a newline
                        break
                    raise BadInputError(f"{self.path}:{lineno}: not a valid record ({e})") from None
                if k in self.rows:
                    print(f"[warn] {self.path}:{lineno}: duplicate key {k!r} ignored", file=sys.stderr)
                else:
                    self.rows[k] = row
            good = end
        if good < len(data):
            self.truncated_bytes = len(data) - good
            print(f"[warn] {self.path}: dropped a torn last line ({self.truncated_bytes} bytes)", file=sys.stderr)
            with open(self.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())

    def __contains__(self, key: Hashable) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, row: dict[str, Any]) -> None:
        """Write one row durably (flush + fsync) and remember its key."""
        k = self.key(row)
        if k in self.rows:
            raise ValueError(f"{self.path}: key {k!r} already written")
        self._f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.rows[k] = row

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
