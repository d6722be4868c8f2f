"""Small file helpers shared by every stage: tolerant line readers, atomic writers, the data-dir layout."""
from __future__ import annotations

import ast
import gzip
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator


class BadInputError(ValueError):
    """Raised when input is malformed beyond what a stage may skip."""


def open_text(path: str | os.PathLike) -> Any:
    """Open a plain or ``.gz`` text file for reading."""
    p = str(path)
    return gzip.open(p, "rt", encoding="utf-8") if p.endswith(".gz") else open(p, encoding="utf-8")


@dataclass
class LineErrors:
    """Counts malformed lines and remembers the first few locations."""

    path: str
    count: int = 0
    examples: list = None  # type: ignore[assignment]

    def add(self, lineno: int, why: str) -> None:
        self.count += 1
        if self.examples is None:
            self.examples = []
        if len(self.examples) < 5:
            self.examples.append(f"{self.path}:{lineno}: {why}")

    def report(self, stream=sys.stderr) -> None:
        if self.count:
            print(f"[warn] skipped {self.count} malformed line(s) in {self.path}", file=stream)
            for e in self.examples or []:
                print(f"  {e}", file=stream)


def iter_records(
    path: str | os.PathLike,
    errors: LineErrors | None = None,
    allow_literal: bool = False,
    strict: bool = False,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each JSON (or Python-literal) line of ``path``.

    Malformed lines are counted in ``errors`` with their ``file:line``; with ``strict`` the
    first one raises :class:`BadInputError` instead.
    """
    errors = errors if errors is not None else LineErrors(str(path))
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj = None
                if allow_literal:
                    try:
                        obj = ast.literal_eval(line)
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        obj = None
                if obj is None:
                    if strict:
                        raise BadInputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    errors.add(lineno, f"not valid JSON ({e.msg})")
                    continue
            if not isinstance(obj, dict):
                if strict:
                    raise BadInputError(f"{path}:{lineno}: expected an object, got {type(obj).__name__}")
                errors.add(lineno, f"expected an object, got {type(obj).__name__}")
                continue
            yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file written by this project; any malformed line is an error naming file:line."""
    return [obj for _, obj in iter_records(path, strict=True)]


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: str | os.PathLike, writer: Callable[[Any], None], mode: str = "w") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            writer(f)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Atomically write ``obj`` as JSON."""
    _atomic(path, lambda f: json.dump(obj, f, ensure_ascii=False, indent=indent))


def write_jsonl(path: str | os.PathLike, rows: Any) -> None:
    """Atomically write an iterable of objects, one JSON object per line."""
    def w(f):
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    _atomic(path, w)


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class DataDir:
    """The layout of a preprocessed dataset directory ``O`` (see README, "Files")."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    items = property(lambda s: s.root / "items.jsonl")          # item table
    users = property(lambda s: s.root / "users.jsonl")          # user table
    stats = property(lambda s: s.root / "stats.json")           # counts from the source stage
    emb = property(lambda s: s.root / "item_emb.npy")           # item text embeddings, row = item_id
    emb_meta = property(lambda s: s.root / "item_emb.json")
    id2sid = property(lambda s: s.root / "id2sid.json")
    new_tokens = property(lambda s: s.root / "new_tokens.json")
    sid_stats = property(lambda s: s.root / "sid_stats.json")
    captions = property(lambda s: s.root / "captions.jsonl")
    cot = property(lambda s: s.root / "cot.jsonl")
    candidates = property(lambda s: s.root / "candidates")

    def inter(self, split: str) -> Path:
        """Interaction rows of a split: ``inter/<split>.jsonl``."""
        return self.root / "inter" / f"{split}.jsonl"

    def sft(self, split: str) -> Path:
        return self.root / "sft" / f"{split}.json"

    def rl(self, split: str) -> Path:
        return self.root / "rl" / f"{split}.json"

    def load_items(self) -> dict[int, dict]:
        return {int(r["item_id"]): r for r in read_jsonl(self.items)}

    def load_id2sid(self) -> dict[int, list[str]]:
        return {int(k): v for k, v in read_json(self.id2sid).items()}
