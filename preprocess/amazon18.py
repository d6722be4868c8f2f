"""Amazon Reviews 2018 (or 2014) dump -> items/users/inter splits/stats (ids, k-core, chronological splits).

Reads ``RAW_DIR/<category>_5.json[.gz]`` (or ``<category>.json``, ``reviews_<category>[_5].json``;
one review per line: ``reviewerID``, ``asin``, ``unixReviewTime``) and
``RAW_DIR/meta_<category>.json[.gz]`` (one item per line, JSON or, in older dumps, a Python
literal: ``asin``, ``title``, ``description``, ``brand``, ``category``/``categories``,
``imageURLHighRes``/``imageURL``/``imUrl``). Malformed lines (also review lines missing a
field) are counted, reported with ``file:line`` and skipped (``--strict`` stops instead).
Metadata lines of items that have no review are skipped without being parsed.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimigenrec.io import BadInputError, LineErrors, bad

from .interactions import (
    EventLog,
    ItemStore,
    RecordReader,
    add_common_arguments,
    build_dataset,
    check_read,
    clean_text,
    config_from_args,
    flat_strings,
    gc_paused,
    item_record,
    print_summary,
    to_timestamp,
)

REVIEW_NAMES = ("{c}_5.json", "{c}.json", "reviews_{c}_5.json", "reviews_{c}.json")
META_NAMES = ("meta_{c}.json",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m preprocess amazon18``."""
    parser.add_argument("--raw_dir", default=".", help="folder holding the review and metadata files")
    add_source_arguments(parser)
    add_common_arguments(parser)


def add_source_arguments(parser: Any) -> None:
    """The options only this source stage has (``all`` offers them too)."""
    parser.add_argument("--category", default=None,
                        help="category name as in the file names, e.g. Industrial_and_Scientific "
                             "(needed unless --reviews and --meta are given)")
    parser.add_argument("--reviews", default=None, help="review file path (overrides the name found in --raw_dir)")
    parser.add_argument("--meta", default=None, help="metadata file path (overrides the name found in --raw_dir)")
    parser.add_argument("--max_title_chars", type=int, default=300, help="cut cleaned titles to this length")
    parser.add_argument("--max_desc_chars", type=int, default=1000,
                        help="cut cleaned descriptions to this length (0 = no cap)")


def find_file(raw_dir: str | Path, category: str | None, names: tuple[str, ...], what: str) -> Path:
    """First existing ``raw_dir/<name>[.gz]`` of ``names`` (formatted with the category)."""
    if not category:
        raise BadInputError(f"--category is needed to find the {what} file (or give --{what} PATH)")
    tried = []
    for n in names:
        for suffix in ("", ".gz"):
            p = Path(raw_dir) / (n.format(c=category) + suffix)
            tried.append(p.name)
            if p.is_file():
                return p
    raise BadInputError(f"no {what} file for category {category!r} in {raw_dir} (tried: {', '.join(tried)})")


@dataclass(frozen=True)
class DumpFormat:
    """What differs between the Amazon review dumps: file names, field names, time unit, item mapping."""

    name: str
    review_names: tuple[str, ...]
    meta_names: tuple[str, ...]
    user_key: str
    item_key: str
    time_key: str
    time_divisor: int  # raw time value // divisor = unix seconds
    meta_item_key: str
    meta_to_item: Callable[[dict[str, Any], int, int], dict]
    allow_literal: bool
    review_expected: str  # what a review line should look like (for error messages)


def read_reviews(path: str | Path, strict: bool = False, fmt: DumpFormat | None = None) -> tuple[EventLog, LineErrors, int]:
    """Parse review lines into an :class:`EventLog`; returns ``(log, errors, line count)``."""
    fmt = fmt or AMAZON18
    uk, ik, tk, div = fmt.user_key, fmt.item_key, fmt.time_key, fmt.time_divisor
    log = EventLog()
    errors = LineErrors(str(path))
    reader = RecordReader(path, errors, allow_literal=fmt.allow_literal, strict=strict, desc="reviews")
    add = log.adder()
    for lineno, obj in reader:
        u, i, t = obj.get(uk), obj.get(ik), obj.get(tk)
        ts = t if type(t) is int else to_timestamp(t)
        if type(u) is not str or type(i) is not str or not u or not i or ts is None:
            why = ("missing or empty field " + ", ".join(
                k for k, v in ((uk, u), (ik, i)) if not isinstance(v, str) or not v)) \
                if ts is not None else f"bad or missing {tk} {t!r}"
            if strict:
                raise BadInputError(f"{path}:{lineno}: {why}")
            errors.add(lineno, why)
            continue
        add(u, i, ts // div if div != 1 else ts)
    return log, errors, reader.lines


def meta_to_item(obj: dict[str, Any], max_title: int, max_desc: int) -> dict:
    """An ``items.jsonl`` record (without ``item_id``) from one Amazon-2018 metadata object."""
    images = obj.get("imageURLHighRes") or obj.get("imageURL") or obj.get("imUrl") or []
    return item_record(
        raw_id=str(obj["asin"]),
        title=clean_text(obj.get("title"), max_title),
        description=clean_text(obj.get("description"), max_desc),
        brand=clean_text(obj.get("brand")),
        categories=flat_strings(obj.get("category") or obj.get("categories")),
        image_urls=flat_strings(images, clean=False),
    )


def _key_regex(key: str) -> re.Pattern[bytes]:
    """Finds ``"key": "value"`` in a raw line (JSON or Python literal); no match -> the line is parsed."""
    return re.compile(rb"""["']""" + re.escape(key.encode()) + rb"""["']\s*:\s*(["'])([^"'\\]*)\1""")


def read_meta(path: str | Path, wanted: Mapping[str, int], max_title: int, max_desc: int,
              strict: bool = False, fmt: DumpFormat | None = None,
              out_dir: str | Path | None = None) -> tuple[ItemStore, LineErrors, dict]:
    """Item records of the ``wanted`` raw ids (raw id -> provisional code, first line wins), kept in an
    :class:`ItemStore` (spilled to a temporary file in ``out_dir``); returns ``(items, errors, counts)``."""
    fmt = fmt or AMAZON18
    key = fmt.meta_item_key
    errors = LineErrors(str(path))
    key_re, key_b = _key_regex(key), key.encode()

    def prefilter(line: bytes) -> bool:
        m = key_re.search(line, max(0, line.find(key_b) - 1))
        return m is None or m.group(2).decode("utf-8", "replace") in wanted

    reader = RecordReader(path, errors, allow_literal=fmt.allow_literal, strict=strict, prefilter=prefilter,
                          desc="meta")
    items = ItemStore(wanted, out_dir)
    dup = 0
    for lineno, obj in reader:
        raw = obj.get(key)
        if not isinstance(raw, str) or not raw:
            if strict:
                raise BadInputError(f"{path}:{lineno}: missing field {key}")
            errors.add(lineno, f"missing field {key}")
            continue
        if raw not in wanted:
            continue
        if raw in items:
            dup += 1
            continue
        items.add(raw, fmt.meta_to_item(obj, max_title, max_desc))
    return items, errors, {"meta_lines": reader.lines, "meta_malformed": errors.count, "meta_duplicates": dup,
                           "meta_items_matched": len(items)}


AMAZON18 = DumpFormat(
    name="amazon18", review_names=REVIEW_NAMES, meta_names=META_NAMES, user_key="reviewerID", item_key="asin",
    time_key="unixReviewTime", time_divisor=1, meta_item_key="asin", meta_to_item=meta_to_item, allow_literal=True,
    review_expected="one JSON object per line with reviewerID, asin, unixReviewTime")


def run(args: argparse.Namespace) -> int:
    """Run the stage (see the module docstring)."""
    return run_dump(args, AMAZON18)


def run_dump(args: argparse.Namespace, fmt: DumpFormat) -> int:
    """Run a source stage of the Amazon-dump family ``fmt`` (amazon18, amazon23)."""
    with gc_paused():
        return _run(args, fmt)


def _run(args: argparse.Namespace, fmt: DumpFormat) -> int:
    cfg = config_from_args(args)
    raw_dir = args.raw_dir or "."
    reviews = Path(args.reviews) if args.reviews else find_file(raw_dir, args.category, fmt.review_names, "reviews")
    meta = Path(args.meta) if args.meta else find_file(raw_dir, args.category, fmt.meta_names, "meta")
    for p in (reviews, meta):
        if not p.is_file():
            raise bad(p, "file not found", "check --reviews / --meta, or --raw_dir and --category")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)  # the item store spills next to the outputs
    t0 = time.perf_counter()
    log, rev_err, n_lines = read_reviews(reviews, strict=args.strict, fmt=fmt)
    t1 = time.perf_counter()
    items, meta_err, meta_counts = read_meta(meta, log.item_codes, args.max_title_chars, args.max_desc_chars,
                                             strict=args.strict, fmt=fmt, out_dir=args.out_dir)
    t2 = time.perf_counter()
    rev_err.report()
    meta_err.report()
    check_read(reviews, n_lines, len(log), rev_err, "reviews", fmt.review_expected)
    stats = {
        "dataset": f"{fmt.name}/{args.category or reviews.stem}",
        "source": {"reviews": str(reviews), "meta": str(meta)},
        "raw_lines": n_lines,
        "malformed_lines": rev_err.count,
        "malformed_examples": rev_err.examples or [],
        "reviews_read": len(log),
        **meta_counts,
        "meta_malformed_examples": meta_err.examples or [],
        "seconds": {"read_reviews": round(t1 - t0, 3), "read_meta": round(t2 - t1, 3)},
    }
    with items:
        stats = build_dataset(log, items, args.out_dir, cfg, stats)
    if stats["items_without_meta"] or stats["dropped_no_title_items"]:
        print(f"[info] items without metadata: {stats['items_without_meta']}, without a usable title: "
              f"{stats['items_without_title']} ({'dropped' if cfg.require_title else 'kept with empty title'}, "
              f"{stats['dropped_no_title_interactions']} interactions dropped)", file=sys.stderr)
    print_summary(stats, args.out_dir)
    return 0
