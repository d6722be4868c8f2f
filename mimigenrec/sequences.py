"""Per-user chronological sequences rebuilt from the ``inter/{split}.jsonl`` rows.

A row holds at most ``N`` history items, so a user's full sequence is rebuilt from all rows:
``position`` is the target's index in the user's sequence and the history fills the
positions right before it. Every position must be named consistently by every row that
mentions it (else :class:`~mimigenrec.io.BadInputError` names the file and line).
"""
from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence

from mimigenrec.io import SPLITS, BadInputError, DataDir, iter_records

_FIELDS = (("user_id", int), ("target", int), ("position", int), ("history", list))


def load_rows(data_dir: str | os.PathLike, split: str) -> list[dict]:
    """Rows of ``inter/<split>.jsonl`` in file order, fields checked (errors name file:line)."""
    path = DataDir(data_dir).inter(split)
    if not path.is_file():
        raise BadInputError(f"{path}: missing (expected a preprocessed dataset dir with inter/{split}.jsonl)")
    rows = []
    for lineno, obj in iter_records(path, strict=True):
        for field, typ in _FIELDS:
            if not isinstance(obj.get(field), typ) or isinstance(obj.get(field), bool):
                raise BadInputError(f"{path}:{lineno}: field {field!r} missing or not {typ.__name__}")
        if obj["position"] < len(obj["history"]):
            raise BadInputError(f"{path}:{lineno}: position {obj['position']} < history length {len(obj['history'])}")
        obj["_where"] = f"{path}:{lineno}"
        rows.append(obj)
    return rows


class UserSequences:
    """Full per-user sequences plus which split each target position belongs to."""

    def __init__(self, rows_by_split: Mapping[str, Sequence[dict]]) -> None:
        known: dict[int, dict[int, int]] = {}
        where: dict[tuple[int, int], str] = {}
        self.split_of: dict[tuple[int, int], str] = {}

        def put(u: int, p: int, item: int, src: str) -> None:
            pos = known.setdefault(u, {})
            old = pos.get(p)
            if old is None:
                pos[p] = item
                where[(u, p)] = src
            elif old != item:
                raise BadInputError(f"{src}: user {u} position {p} is item {item}, but {where[(u, p)]} says {old}")

        for split, rows in rows_by_split.items():
            for r in rows:
                u, p, src = int(r["user_id"]), int(r["position"]), r.get("_where", f"{split} row")
                key = (u, p)
                if key in self.split_of:
                    raise BadInputError(f"{src}: (user {u}, position {p}) is a target twice "
                                        f"(also in {self.split_of[key]})")
                self.split_of[key] = split
                put(u, p, int(r["target"]), src)
                h = r["history"]
                for j, it in enumerate(h):
                    put(u, p - len(h) + j, int(it), src)
        self.seqs: dict[int, list[int]] = {}
        for u, pos in known.items():
            n = max(pos) + 1
            missing = [p for p in range(n) if p not in pos]
            if missing:
                raise BadInputError(f"user {u}: positions {missing[:5]} are named by no row "
                                    f"(history too short to rebuild the sequence)")
            self.seqs[u] = [pos[p] for p in range(n)]

    def prefix(self, user: int, position: int) -> list[int]:
        """Every item of ``user`` before ``position`` (the full history, not capped)."""
        return self.seqs[int(user)][: int(position)]

    def cut(self, splits: Sequence[str]) -> dict[int, int]:
        """Per user, the last position that is a target of a row in ``splits`` (users without one left out)."""
        out: dict[int, int] = {}
        for (u, p), s in self.split_of.items():
            if s in splits and p > out.get(u, -1):
                out[u] = p
        return out

    def interactions(self, splits: Sequence[str]) -> Iterator[tuple[int, int, int]]:
        """``(user, position, item)`` of every interaction known once ``splits`` are seen:
        the targets of their rows and every earlier item of the same user."""
        for u, last in sorted(self.cut(splits).items()):
            for p in range(last + 1):
                yield u, p, self.seqs[u][p]

    def training_sequences(self, splits: Sequence[str]) -> dict[int, tuple[list[int], list[bool]]]:
        """Per user ``(items up to the last target in splits, is_target flags)``; a flag marks a
        position whose item is the target of a row in ``splits`` (trained to be predicted)."""
        out = {}
        for u, last in self.cut(splits).items():
            flags = [self.split_of.get((u, p)) in splits for p in range(last + 1)]
            out[u] = (self.seqs[u][: last + 1], flags)
        return out

    def hold_out_last(self, split: str, as_split: str) -> tuple[UserSequences, list[dict]]:
        """A copy where each user's last ``split`` target belongs to ``as_split`` instead, and those rows
        (``user_id``, ``position``, ``target``): an inner validation set carved out of ``split``."""
        new = copy.copy(self)
        new.split_of = dict(self.split_of)
        rows = []
        for u, p in sorted(self.cut((split,)).items()):
            new.split_of[(u, p)] = as_split
            rows.append({"user_id": u, "position": p, "target": self.seqs[u][p]})
        return new, rows

    def all_items(self) -> list[int]:
        """Sorted ids of every item that appears in any interaction."""
        return sorted({it for s in self.seqs.values() for it in s})


def load_sequences(data_dir: str | os.PathLike) -> tuple[dict[str, list[dict]], UserSequences]:
    """Rows of every split present (train/valid/test) and the sequences rebuilt from all of them."""
    dd = DataDir(data_dir)
    rows = {s: load_rows(data_dir, s) for s in SPLITS if dd.inter(s).is_file()}
    if not rows:
        raise BadInputError(f"{dd.root}: no inter/{{train,valid,test}}.jsonl")
    return rows, UserSequences(rows)


def splits_before(split: str) -> tuple[str, ...]:
    """Splits whose interactions are known when ``split`` is evaluated (train; + valid for test)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS[: SPLITS.index(split)]
