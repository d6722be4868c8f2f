"""Shared logic of the source stages: event log -> filters -> ids -> chronological splits -> files.

A source stage (``amazon18``, ``movielens``) only parses its raw files into an
:class:`EventLog` (one ``(user, item, timestamp)`` per interaction, in file order) and a
table of item metadata; :func:`build_dataset` does everything else the same way for all
sources and writes the files of ``docs/formats.md`` (``items.jsonl``, ``users.jsonl``,
``inter/{train,valid,test}.jsonl``, ``stats.json``).

Order of the filters: time window -> items without a usable title (``require_title``) ->
iterative user/item k-core, with the user threshold ``max(kcore, min_seq_len)``, repeated
until nothing changes (a fixed point) -> ids -> splits.

Ids: users and items that survive the filters are numbered ``0..n-1`` in the order of
their raw id (numeric order when every raw id is a decimal integer, else string order).
A user's events are ordered by ``(timestamp, order in the raw file)``; repeated
user-item interactions are kept.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import gzip
import html
import json
import os
import re
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from mimigenrec.io import (
    SPLITS,
    BadInputError,
    DataDir,
    LineErrors,
    add_out_dir_argument,
    atomic_outputs,
    bad,
    is_gzip,
    reading,
    write_json,
)

try:  # orjson parses JSON lines ~3x faster than json; optional
    import orjson as _orjson

    _loads: Callable[[bytes], Any] = _orjson.loads
    _DecodeError: tuple = (_orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None
    _loads = json.loads
    _DecodeError = (json.JSONDecodeError, UnicodeDecodeError)

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

ID_ORDER = "raw id order (numeric if all raw ids are integers, else lexicographic)"


# --------------------------------------------------------------------------- reading


class _Progress:
    """Byte-based progress bar over a (possibly gzipped) file; cheap: updated every few MB."""

    def __init__(self, path: str, raw: IO[bytes], desc: str):
        self.raw = raw
        self.done = 0
        total = os.path.getsize(path)
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None,
                        leave=False, file=sys.stderr) if tqdm else None

    def update(self) -> None:
        if self.bar is not None:
            pos = self.raw.tell()
            self.bar.update(pos - self.done)
            self.done = pos

    def close(self) -> None:
        if self.bar is not None:
            self.update()
            self.bar.close()


@contextmanager
def open_bytes(path: str | os.PathLike, desc: str = "") -> Iterator[tuple[IO[bytes], _Progress]]:
    """Open a plain or gzip file (recognised by its content, whatever the name) for binary line
    iteration, with a byte progress bar; truncated or corrupt gzip data is an error naming the file."""
    path = str(path)
    gz = is_gzip(path)
    with reading(path), open(path, "rb") as raw:
        f: IO[bytes] = gzip.GzipFile(fileobj=raw) if gz else raw
        prog = _Progress(path, raw, desc or os.path.basename(path))
        try:
            yield f, prog
        finally:
            prog.close()


def iter_lines(path: str | os.PathLike, desc: str = "") -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw line bytes)`` of a plain or gzip file, with a progress bar."""
    with open_bytes(path, desc) as (f, prog):
        for lineno, line in enumerate(f, 1):
            if not lineno & 0xFFFF:
                prog.update()
            yield lineno, line


def parse_record(line: bytes, allow_literal: bool) -> tuple[dict | None, str]:
    """Parse one JSON (or, with ``allow_literal``, Python-literal) line; ``(None, why)`` if it is malformed."""
    try:
        obj = _loads(line)
    except _DecodeError as e:
        obj, why = None, f"not valid JSON ({e})"
        if allow_literal:
            import ast

            try:
                obj = ast.literal_eval(line.decode("utf-8", "replace").strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                obj = None
        if obj is None:
            return None, why
    if not isinstance(obj, dict):
        return None, f"expected an object, got {type(obj).__name__}"
    return obj, ""


class RecordReader:
    """Iterate ``(line_number, object)`` over a JSON-lines file (plain or ``.gz``), fast.

    Like :func:`mimigenrec.io.iter_records` but reads bytes and uses orjson when installed.
    ``prefilter(line) -> False`` skips a line without parsing it (used to skip metadata of
    items without interactions). Malformed lines go to ``errors`` (``file:line``) or, with
    ``strict``, raise :class:`BadInputError`. After iteration ``lines`` holds the line count.
    """

    def __init__(self, path: str | os.PathLike, errors: LineErrors | None = None, allow_literal: bool = False,
                 strict: bool = False, prefilter: Callable[[bytes], bool] | None = None, desc: str = ""):
        self.path, self.allow_literal, self.strict, self.prefilter = str(path), allow_literal, strict, prefilter
        self.errors = errors if errors is not None else LineErrors(self.path)
        self.desc = desc
        self.lines = 0

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        prefilter, errors, loads = self.prefilter, self.errors, _loads
        lineno = 0
        with open_bytes(self.path, self.desc) as (f, prog):
            try:
                for lineno, line in enumerate(f, 1):
                    if not lineno & 0xFFFF:
                        prog.update()
                    if prefilter is not None and not prefilter(line):
                        continue
                    try:
                        obj = loads(line)
                    except _DecodeError:
                        obj = None
                    if type(obj) is not dict:
                        if not line.strip():
                            continue
                        obj, why = parse_record(line, self.allow_literal)
                        if obj is None:
                            if self.strict:
                                raise BadInputError(f"{self.path}:{lineno}: {why}")
                            errors.add(lineno, why)
                            continue
                    yield lineno, obj
            finally:
                self.lines = lineno


# --------------------------------------------------------------------------- event log


class EventLog:
    """Interactions in raw-file order as compact columns (int codes + timestamp arrays).

    Raw ids are mapped to provisional codes on first sight; final ids are assigned by
    :func:`build_dataset` after filtering.
    """

    def __init__(self) -> None:
        self.user_codes: dict[str, int] = {}
        self.item_codes: dict[str, int] = {}
        self.users = array("i")
        self.items = array("i")
        self.ts = array("q")

    def __len__(self) -> int:
        return len(self.ts)

    def adder(self) -> Callable[[str, str, int], None]:
        """A fast ``add(user, item, ts)`` bound to this log (for tight reading loops)."""
        ucodes, icodes = self.user_codes, self.item_codes
        uapp, iapp, tapp = self.users.append, self.items.append, self.ts.append

        def add(user: str, item: str, ts: int) -> None:
            u = ucodes.get(user)
            if u is None:
                u = ucodes[user] = len(ucodes)
            i = icodes.get(item)
            if i is None:
                i = icodes[item] = len(icodes)
            uapp(u)
            iapp(i)
            tapp(ts)

        return add

    def add(self, user: str, item: str, ts: int) -> None:
        """Append one interaction (``user``/``item`` raw ids, ``ts`` unix seconds)."""
        self.adder()(user, item, ts)

    def release(self) -> None:
        """Drop the columns and the user table (the item table stays: an :class:`ItemStore` keys on it)."""
        self.users, self.items, self.ts = array("i"), array("i"), array("q")
        self.user_codes = {}

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(users, items, timestamps)`` as numpy arrays (zero-copy views)."""
        return (np.frombuffer(self.users, dtype=np.int32) if len(self) else np.zeros(0, np.int32),
                np.frombuffer(self.items, dtype=np.int32) if len(self) else np.zeros(0, np.int32),
                np.frombuffer(self.ts, dtype=np.int64) if len(self) else np.zeros(0, np.int64))


def to_timestamp(value: Any) -> int | None:
    """Unix seconds from an int/float/numeric string; ``None`` if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value == value else None
    if isinstance(value, str):
        try:
            return int(float(value))
        except ValueError:
            return None
    return None


# --------------------------------------------------------------------------- item text


_TAG_RE = re.compile(r"<[^>]*>")
_SCRIPT_RE = re.compile(r"<(script|style)\b.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_CODE_RE = re.compile(r"^\s*var\s+\w+\s*=|getTime\(\)|function\s*\(")


def clean_text(value: Any, max_chars: int = 0) -> str:
    """Plain text from a raw field: lists joined, HTML entities decoded, tags removed,
    whitespace collapsed, cut at ``max_chars`` (on a word boundary; 0 = no cap)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(v if isinstance(v, str) else clean_text(v) for v in value)
    elif not isinstance(value, str):
        value = str(value)
    if max_chars and len(value) > 4 * max_chars + 1000:  # bound the work on huge fields
        value = value[:4 * max_chars + 1000]
    if "<" in value:
        if "<script" in value or "<style" in value or "<SCRIPT" in value or "<STYLE" in value:
            value = _SCRIPT_RE.sub(" ", value)
        value = _TAG_RE.sub(" ", value)
    if "&" in value:
        value = html.unescape(value)
        if "<" in value:  # escaped markup such as &lt;br&gt;
            value = _TAG_RE.sub(" ", value)
    value = " ".join(value.split())
    if max_chars and len(value) > max_chars:
        cut = value[:max_chars]
        sp = cut.rfind(" ")
        value = (cut[:sp] if sp > max_chars // 2 else cut).rstrip() + "..."
    return value


def usable_title(title: str) -> bool:
    """A cleaned title is usable when it is non-empty and is not page script junk."""
    return bool(title) and not _CODE_RE.search(title)


def flat_strings(value: Any, clean: bool = True) -> list[str]:
    """Flatten a str / list / list-of-lists field into a de-duplicated list of non-empty strings
    (cleaned with :func:`clean_text`, or only stripped with ``clean=False``)."""
    if isinstance(value, str):
        leaves: list = [value]
    elif isinstance(value, (list, tuple)) and all(type(v) is str for v in value):
        leaves = list(value)
    else:
        leaves, stack = [], [value]
        while stack:
            v = stack.pop()
            if isinstance(v, (list, tuple)):
                stack.extend(reversed(v))
            elif v is not None:
                leaves.append(str(v))
    cleaned = map(clean_text, leaves) if clean else (x.strip() for x in leaves)
    return list(dict.fromkeys(x for x in cleaned if x))


def item_record(raw_id: str, title: str = "", description: str = "", brand: str = "",
                categories: Iterable[str] = (), image_urls: Iterable[str] = ()) -> dict:
    """An item row of ``items.jsonl`` without its ``item_id`` (filled in at write time)."""
    return {"raw_id": raw_id, "title": title, "description": description, "brand": brand,
            "categories": list(categories), "image_urls": list(image_urls)}


class ItemStore(Mapping[str, dict]):
    """Item records keyed by raw id, kept on disk rather than in memory (a read-only mapping once filled).

    Each record is written as one JSON line to an unlinked temporary file in ``dir`` (default: the
    system's temporary folder); memory keeps only its offset, length and whether its title is usable,
    indexed by ``codes[raw_id]`` (a raw id -> dense index map the caller already holds, e.g.
    ``EventLog.item_codes``): ~13 bytes per item instead of ~1 KB of Python objects. Raw ids missing
    from ``codes`` cannot be stored. Use as a context manager (or :meth:`close`) to drop the file.
    """

    def __init__(self, codes: Mapping[str, int], dir: str | os.PathLike | None = None):
        self.codes = codes
        n = len(codes)
        self.offsets = np.full(n, -1, dtype=np.int64)
        self.lengths = np.zeros(n, dtype=np.int32)
        self.titled = np.zeros(n, dtype=bool)
        self._file = tempfile.TemporaryFile(dir=dir)
        self._pos = self._count = 0
        self._buf: list[bytes] = []
        self._buffered = 0

    def add(self, raw: str, record: dict) -> None:
        """Store ``record`` (an :func:`item_record`) for ``raw``, replacing nothing: first one wins."""
        code = self.codes[raw]
        if self.offsets[code] >= 0:
            return
        b = _dumps_line(record)[:-1].encode("utf-8")
        self.offsets[code], self.lengths[code] = self._pos, len(b)
        self.titled[code] = usable_title(record.get("title", ""))
        self._pos += len(b)
        self._count += 1
        self._buf.append(b)
        self._buffered += len(b)
        if self._buffered > 1 << 22:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._file.write(b"".join(self._buf))
            self._file.flush()
            self._buf.clear()
            self._buffered = 0

    def record_bytes(self, raw: str) -> bytes | None:
        """The stored record of ``raw`` as one JSON object (bytes, no newline), or None."""
        code = self.codes.get(raw)
        if code is None or self.offsets[code] < 0:
            return None
        self._flush()
        return os.pread(self._file.fileno(), int(self.lengths[code]), int(self.offsets[code]))

    def usable_titles(self, raws: Iterable[str]) -> np.ndarray:
        """Whether each raw id has a record with a usable title (bool array)."""
        codes = self.codes
        idx = np.fromiter((codes.get(r, -1) for r in raws), dtype=np.int64)
        ok = idx >= 0
        out = np.zeros(len(idx), dtype=bool)
        out[ok] = self.titled[idx[ok]] & (self.offsets[idx[ok]] >= 0)
        return out

    def __getitem__(self, raw: str) -> dict:
        b = self.record_bytes(raw)
        if b is None:
            raise KeyError(raw)
        return _loads(b)

    def __contains__(self, raw: object) -> bool:
        code = self.codes.get(raw) if isinstance(raw, str) else None  # type: ignore[arg-type]
        return code is not None and self.offsets[code] >= 0

    def __iter__(self) -> Iterator[str]:
        return (r for r, c in self.codes.items() if self.offsets[c] >= 0)

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        """Drop the temporary file."""
        self._buf.clear()
        self._file.close()

    def __enter__(self) -> ItemStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def usable_titles(item_meta: Mapping[str, dict], raws: list[str]) -> np.ndarray:
    """Bool array: does each raw id have metadata with a usable title."""
    if isinstance(item_meta, ItemStore):
        return item_meta.usable_titles(raws)
    return np.array([usable_title(item_meta[r]["title"]) if r in item_meta else False for r in raws], dtype=bool)


# --------------------------------------------------------------------------- options


@dataclass
class SplitConfig:
    """Filter and split options shared by every source stage (see :func:`add_common_arguments`)."""

    kcore: int = 0
    min_seq_len: int = 3
    max_history: int = 10
    split: str = "loo"
    time_ratio: tuple[float, float, float] = (0.8, 0.1, 0.1)
    start: int | None = None  # unix seconds, inclusive
    end: int | None = None  # unix seconds, exclusive
    require_title: bool = True


def _date(s: str) -> _dt.date:
    try:
        return _dt.date.fromisoformat(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {s!r}") from None


def _ratio(s: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in s.replace(",", ":").split(":")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0 or parts[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected train:valid:test like 8:1:1, got {s!r}")
    tot = sum(parts)
    return (parts[0] / tot, parts[1] / tot, parts[2] / tot)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every source stage shares: output, filters, split protocol."""
    add_out_dir_argument(parser, "dataset directory to write (items.jsonl, users.jsonl, inter/, stats.json)")
    parser.add_argument("--kcore", type=int, default=0,
                        help="iterative k-core: drop users and items with fewer than K interactions, repeated until "
                             "nothing changes (0 = off; the user side always needs --min_seq_len)")
    parser.add_argument("--min_seq_len", type=int, default=3,
                        help="drop users with fewer interactions (part of the k-core fixed point); loo needs >= 3")
    parser.add_argument("--max_history", type=int, default=10,
                        help="items kept in a row's history, the most recent ones (0 = whole prefix)")
    parser.add_argument("--split", choices=["loo", "time"], default="loo",
                        help="loo: per user, last event = test, second-to-last = valid, earlier = train; "
                             "time: every event after a user's first is a row, rows sorted by target time and cut "
                             "globally by --time_ratio")
    parser.add_argument("--time_ratio", type=_ratio, default=(0.8, 0.1, 0.1), metavar="TRAIN:VALID:TEST",
                        help="train:valid:test proportions of the time split (e.g. 8:1:1)")
    parser.add_argument("--start", type=_date, default=None, metavar="YYYY-MM-DD",
                        help="keep interactions on or after this UTC date")
    parser.add_argument("--end", type=_date, default=None, metavar="YYYY-MM-DD",
                        help="keep interactions on or before this UTC date (inclusive)")
    parser.add_argument("--require_title", action=argparse.BooleanOptionalAction, default=True,
                        help="drop items without a usable title and their interactions (with "
                             "--no-require_title they are kept with title \"\")")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first malformed line instead of skipping and counting it")


def config_from_args(args: argparse.Namespace) -> SplitConfig:
    """Validate the shared options into a :class:`SplitConfig` (raises :class:`BadInputError`)."""
    def utc(d: _dt.date) -> int:
        return int(_dt.datetime(d.year, d.month, d.day, tzinfo=_dt.timezone.utc).timestamp())

    if args.kcore < 0 or args.min_seq_len < 1 or args.max_history < 0:
        raise BadInputError("--kcore and --max_history must be >= 0 and --min_seq_len >= 1")
    if args.split == "loo" and args.min_seq_len < 3:
        raise BadInputError("--split loo needs --min_seq_len >= 3 (one train, one valid and one test target "
                            "after the first item)")
    start = utc(args.start) if args.start else None
    end = utc(args.end) + 86400 if args.end else None
    if start is not None and end is not None and end <= start:
        raise BadInputError(f"--end {args.end} is before --start {args.start}")
    return SplitConfig(kcore=args.kcore, min_seq_len=args.min_seq_len, max_history=args.max_history,
                       split=args.split, time_ratio=tuple(args.time_ratio), start=start, end=end,
                       require_title=args.require_title)


# --------------------------------------------------------------------------- filters


def kcore_filter(users: np.ndarray, items: np.ndarray, keep: np.ndarray,
                 user_min: int, item_min: int) -> tuple[np.ndarray, int]:
    """Iterate ``user count >= user_min`` and ``item count >= item_min`` until a fixed point.

    Counts are interactions (repeats included). Returns ``(keep mask, rounds)``.
    """
    keep = keep.copy()
    nu = int(users.max()) + 1 if len(users) else 0
    ni = int(items.max()) + 1 if len(items) else 0
    rounds = 0
    while True:
        rounds += 1
        u, i = users[keep], items[keep]
        bad_u = np.bincount(u, minlength=nu) < user_min
        bad_i = np.bincount(i, minlength=ni) < item_min
        drop = bad_u[users] | bad_i[items]
        drop &= keep
        if not drop.any():
            return keep, rounds
        keep &= ~drop


def raw_id_order(raw_ids: list[str]) -> list[int]:
    """Indices that sort ``raw_ids``: numerically if all are decimal integers, else as strings."""
    if raw_ids and all(r.isdigit() for r in raw_ids):
        return sorted(range(len(raw_ids)), key=lambda k: (int(raw_ids[k]), raw_ids[k]))
    return sorted(range(len(raw_ids)), key=raw_ids.__getitem__)


def dense_ids(codes: np.ndarray, code_to_raw: list[str]) -> tuple[np.ndarray, list[str]]:
    """Renumber the codes present in ``codes`` as ``0..n-1`` in raw-id order.

    Returns ``(new id per element of codes, raw id of each new id)``.
    """
    present = np.flatnonzero(np.bincount(codes, minlength=len(code_to_raw)))
    raws = [code_to_raw[c] for c in present.tolist()]
    perm = raw_id_order(raws)
    lut = np.full(len(code_to_raw), -1, dtype=_int_dtype(len(code_to_raw)))
    lut[present[perm]] = np.arange(len(perm))
    return lut[codes], [raws[k] for k in perm]


# --------------------------------------------------------------------------- splits


def split_labels(user_start: np.ndarray, n_events: int, order_ts: np.ndarray, order_line: np.ndarray,
                 cfg: SplitConfig) -> np.ndarray:
    """Split of each event (events grouped by user, chronological within a user).

    ``-1`` = no row (a user's first event has no history), 0/1/2 = train/valid/test.
    loo: positions ``1..n-3`` train, ``n-2`` valid, ``n-1`` test. time: rows ranked by
    ``(target timestamp, raw line)`` and cut by ``cfg.time_ratio``.
    """
    dt = _int_dtype(n_events)
    lengths = np.diff(np.append(user_start, n_events)).astype(dt)
    pos = np.arange(n_events, dtype=dt) - np.repeat(user_start.astype(dt), lengths)
    labels = np.full(n_events, -1, dtype=np.int8)
    if cfg.split == "loo":
        n_of = np.repeat(lengths, lengths)
        labels[(pos >= 1) & (pos <= n_of - 3)] = 0
        labels[pos == n_of - 2] = 1
        labels[pos == n_of - 1] = 2
        return labels
    rows = np.flatnonzero(pos >= 1)
    rank = np.empty(len(rows), dtype=np.int64)
    rank[np.lexsort((order_line[rows], order_ts[rows]))] = np.arange(len(rows))
    n = len(rows)
    cut1 = int(n * cfg.time_ratio[0])
    cut2 = int(n * (cfg.time_ratio[0] + cfg.time_ratio[1]))
    labels[rows] = np.where(rank < cut1, 0, np.where(rank < cut2, 1, 2))
    return labels


# --------------------------------------------------------------------------- writing


def check_read(path: str | os.PathLike, lines: int, read: int, errors: LineErrors, what: str, expected: str) -> None:
    """An error naming ``path`` when reading it gave no usable record (empty file, or every line bad)."""
    if read or (lines and not errors.count):  # lines read but filtered out: build_dataset names the filter
        return
    if lines == 0:
        raise bad(path, "the file is empty", f"give the {what} file ({expected})")
    example = f", e.g. {errors.examples[0]}" if errors.examples else ""
    raise bad(path, f"none of its {lines} lines is a usable {what} record ({errors.count} malformed{example})",
              f"is it the {what} file? expected {expected}")


def _empty_error(what: str, hint: str) -> BadInputError:
    return BadInputError(f"no {what} left after {hint}")


def build_dataset(log: EventLog, item_meta: Mapping[str, dict], out_dir: str | os.PathLike,
                  cfg: SplitConfig, stats: dict | None = None) -> dict:
    """Filter ``log``, assign ids, split, and write the dataset files into ``out_dir``.

    ``item_meta`` maps a raw item id to an :func:`item_record` (items missing from it have
    no title). ``stats`` (counts from reading) is extended and written to ``stats.json``.
    Raises :class:`BadInputError` naming the filter that left nothing. The log is consumed: once
    the surviving events are copied, its columns and user table are released
    (:meth:`EventLog.release`), so peak memory stays near 60 bytes per event plus the id tables.
    """
    t0 = time.perf_counter()
    stats = dict(stats or {})
    users, items, ts = log.arrays()
    if not len(ts):
        raise BadInputError("no interactions were read (every review line was malformed or the file is empty)")
    item_raw = list(log.item_codes)
    user_raw = list(log.user_codes)
    keep = np.ones(len(ts), dtype=bool)

    # time window
    if cfg.start is not None:
        keep &= ts >= cfg.start
    if cfg.end is not None:
        keep &= ts < cfg.end
    stats["dropped_outside_window"] = int(len(ts) - keep.sum())
    if not keep.any():
        raise _empty_error("interactions", "the --start/--end time window (widen it)")

    # items without metadata / usable title
    present = np.zeros(len(item_raw), dtype=bool)
    present[items[keep]] = True
    titled = usable_titles(item_meta, item_raw)
    no_meta = sum(1 for c in np.flatnonzero(present).tolist() if item_raw[c] not in item_meta)
    stats["items_without_meta"] = no_meta
    stats["items_without_title"] = int((present & ~titled).sum())
    if cfg.require_title:
        before = int(keep.sum())
        keep &= titled[items]
        stats["dropped_no_title_items"] = stats["items_without_title"]
        stats["dropped_no_title_interactions"] = before - int(keep.sum())
        if not keep.any():
            raise _empty_error("interactions", "dropping items without a usable title "
                               "(is the metadata file the right one? try --no-require_title)")
    else:
        stats["dropped_no_title_items"] = stats["dropped_no_title_interactions"] = 0

    # iterative k-core with the user threshold max(kcore, min_seq_len)
    user_min = max(cfg.kcore, cfg.min_seq_len)
    keep, rounds = kcore_filter(users, items, keep, user_min, cfg.kcore)
    stats["kcore"] = cfg.kcore
    stats["kcore_rounds"] = rounds
    if not keep.any():
        raise _empty_error("users", f"the k-core / --min_seq_len filter (users need >= {user_min} and items "
                           f">= {cfg.kcore} interactions; try a smaller --kcore or --min_seq_len)")

    idx = np.flatnonzero(keep).astype(_int_dtype(len(ts)))  # raw line order of each kept event
    del keep, present, titled
    new_u, users_out = dense_ids(users[idx], user_raw)
    del user_raw
    new_i, items_out = dense_ids(items[idx], item_raw)
    ts_k = ts[idx]
    del users, items, ts
    log.release()
    # events grouped by user, then (timestamp, raw line order); lexsort is stable and idx ascends
    order = np.lexsort((ts_k, new_u))
    ev_user, ev_item, ev_ts, ev_line = new_u[order], new_i[order], ts_k[order], idx[order]
    del order, new_u, new_i, ts_k, idx
    user_start = np.flatnonzero(np.r_[True, ev_user[1:] != ev_user[:-1]])
    labels = split_labels(user_start, len(ev_user), ev_ts, ev_line, cfg)
    del ev_line
    stats.update(users=len(users_out), items=len(items_out), interactions=len(ev_user),
                 repeat_interactions=_repeats(ev_user.astype(np.int64) * (len(items_out) + 1) + ev_item))
    rows = {s: int((labels == k).sum()) for k, s in enumerate(SPLITS)}
    for s, n in rows.items():
        hint = ("every user has exactly 3 interactions; use --min_seq_len 4 or more data"
                if cfg.split == "loo" else "use more data or a different --time_ratio")
        if n == 0 and s != "valid":
            raise _empty_error(f"{s} rows", f"the {cfg.split} split ({stats['interactions']} interactions of "
                               f"{len(users_out)} users; {hint})")
        if n == 0:
            print(f"[warn] the valid split is empty ({hint})", file=sys.stderr)
    stats["rows"] = rows

    dd = DataDir(out_dir)
    _write_items(dd, items_out, users_out, item_meta)
    _write_rows(dd, ev_user, ev_item, ev_ts, labels, user_start, cfg.max_history)
    stats.update(split=cfg.split, max_history=cfg.max_history, min_seq_len=cfg.min_seq_len,
                 require_title=cfg.require_title, id_order=ID_ORDER,
                 event_order="per user by (timestamp, raw line order); repeats kept")
    if cfg.split == "time":
        stats["time_ratio"] = list(cfg.time_ratio)
    secs = stats.setdefault("seconds", {})
    secs["build"] = round(time.perf_counter() - t0, 3)
    secs["total"] = round(sum(v for k, v in secs.items() if k not in ("total", "process_cpu")), 3)
    secs["process_cpu"] = round(time.process_time(), 3)  # CPU seconds of this process so far
    write_json(dd.stats, stats)
    return stats


def _int_dtype(n: int) -> type:
    """The smaller integer type that holds ``0..n``."""
    return np.int32 if n < 2 ** 31 - 1 else np.int64


def _repeats(keys: np.ndarray) -> int:
    """How many elements equal an earlier element."""
    k = np.sort(keys)
    return int((k[1:] == k[:-1]).sum())


def _dumps_line(obj: Any) -> str:
    """One JSON line (orjson when installed; non-ASCII kept as is)."""
    if _orjson is not None:
        return _orjson.dumps(obj).decode("utf-8") + "\n"
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _write_items(dd: DataDir, items_out: list[str], users_out: list[str], item_meta: Mapping[str, dict]) -> None:
    """Write ``items.jsonl`` and ``users.jsonl``."""
    store = item_meta if isinstance(item_meta, ItemStore) else None
    head = '{"item_id":%d,' if _orjson is not None else '{"item_id": %d, '
    with atomic_outputs([dd.items, dd.users]) as (fi, fu):
        for k, raw in enumerate(items_out):
            b = store.record_bytes(raw) if store is not None else None
            if b is not None:  # the stored line is this record without item_id; raw_id comes first
                fi.write(head % k + b[1:].decode("utf-8") + "\n")
                continue
            rec = (None if store is not None else item_meta.get(raw)) or item_record(raw)
            fi.write(_dumps_line({"item_id": k, **rec, "raw_id": raw}))
        fu.writelines(f'{{"user_id": {k}, "raw_id": {_dumps_line(raw)[:-1]}}}\n' for k, raw in enumerate(users_out))


def _write_rows(dd: DataDir, ev_user: np.ndarray, ev_item: np.ndarray, ev_ts: np.ndarray,
                labels: np.ndarray, user_start: np.ndarray, max_history: int, block: int = 1 << 16) -> None:
    """Write ``inter/{train,valid,test}.jsonl``; rows grouped by user, positions ascending.

    Events are processed in blocks of ``block`` (a long user spans several blocks), so memory stays
    bounded whatever the users' lengths (with ``max_history`` 0 a block also holds its users' prefixes).
    """
    H = max_history
    n = len(ev_item)
    with atomic_outputs([dd.inter(s) for s in SPLITS]) as files:
        for e0 in range(0, n, block):
            e1 = min(n, e0 + block)
            lab_l = labels[e0:e1].tolist()
            if not any(x >= 0 for x in lab_l):
                continue
            first = user_start[np.searchsorted(user_start, np.arange(e0, e1), side="right") - 1]
            lo = int(first[0]) if not H else max(int(first[0]), e0 - H)  # oldest history item needed
            items_s = list(map(str, ev_item[lo:e1].tolist()))
            ts_l = ev_ts[e0:e1].tolist()
            users_l = ev_user[e0:e1].tolist()
            first_l = (first - lo).tolist()
            bufs: list[list[str]] = [[], [], []]
            for k, lab in enumerate(lab_l):
                if lab < 0:
                    continue
                j, a = k + e0 - lo, first_l[k]  # offsets into items_s
                h0 = j - H if H and j - H > a else a
                bufs[lab].append(f'{{"user_id": {users_l[k]}, "history": [{", ".join(items_s[h0:j])}], '
                                 f'"target": {items_s[j]}, "timestamp": {ts_l[k]}, "position": {j - a}}}\n')
            for f, buf in zip(files, bufs):
                f.writelines(buf)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (the stages allocate millions of acyclic objects)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def print_summary(stats: Mapping[str, Any], out_dir: str | os.PathLike, stream: IO[str] | None = None) -> None:
    """One short human-readable summary of a source stage's stats (to ``stream``, default stdout)."""
    r = stats["rows"]
    print(f"{stats.get('dataset', '')}: {stats['users']} users, {stats['items']} items, "
          f"{stats['interactions']} interactions -> train/valid/test rows {r['train']}/{r['valid']}/{r['test']} "
          f"({stats['split']}); malformed lines {stats.get('malformed_lines', 0)} (+ {stats.get('meta_malformed', 0)} "
          f"in the item file), items dropped without title "
          f"{stats.get('dropped_no_title_items', 0)}; {stats['seconds']['total']:.2f}s -> {out_dir}", file=stream or sys.stdout)
