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
from pathlib import Path
from typing import Any

from mimigenrec.io import BadInputError, LineErrors, bad

from .interactions import (
    EventLog,
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
_ASIN_RE = re.compile(rb"""["']asin["']\s*:\s*(["'])([^"'\\]*)\1""")  # no match -> the line is parsed


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


def read_reviews(path: str | Path, strict: bool = False) -> tuple[EventLog, LineErrors, int]:
    """Parse review lines into an :class:`EventLog`; returns ``(log, errors, line count)``."""
    log = EventLog()
    errors = LineErrors(str(path))
    reader = RecordReader(path, errors, allow_literal=True, strict=strict, desc="reviews")
    add = log.adder()
    for lineno, obj in reader:
        u, i, t = obj.get("reviewerID"), obj.get("asin"), obj.get("unixReviewTime")
        ts = t if type(t) is int else to_timestamp(t)
        if type(u) is not str or type(i) is not str or not u or not i or ts is None:
            why = ("missing or empty field " + ", ".join(
                k for k, v in (("reviewerID", u), ("asin", i)) if not isinstance(v, str) or not v)) \
                if ts is not None else f"bad or missing unixReviewTime {t!r}"
            if strict:
                raise BadInputError(f"{path}:{lineno}: {why}")
            errors.add(lineno, why)
            continue
        add(u, i, ts)
    return log, errors, reader.lines


def meta_to_item(obj: dict[str, Any], max_title: int, max_desc: int) -> dict:
    """An ``items.jsonl`` record (without ``item_id``) from one metadata object."""
    images = obj.get("imageURLHighRes") or obj.get("imageURL") or obj.get("imUrl") or []
    return item_record(
        raw_id=str(obj["asin"]),
        title=clean_text(obj.get("title"), max_title),
        description=clean_text(obj.get("description"), max_desc),
        brand=clean_text(obj.get("brand")),
        categories=flat_strings(obj.get("category") or obj.get("categories")),
        image_urls=flat_strings(images, clean=False),
    )


def read_meta(path: str | Path, wanted: set[str], max_title: int, max_desc: int,
              strict: bool = False) -> tuple[dict[str, dict], LineErrors, dict]:
    """Item records of the ``wanted`` asins (first line wins); returns ``(items, errors, counts)``."""
    errors = LineErrors(str(path))

    def prefilter(line: bytes) -> bool:
        m = _ASIN_RE.search(line, max(0, line.find(b"asin") - 1))
        return m is None or m.group(2).decode("utf-8", "replace") in wanted

    reader = RecordReader(path, errors, allow_literal=True, strict=strict, prefilter=prefilter, desc="meta")
    items: dict[str, dict] = {}
    dup = 0
    for lineno, obj in reader:
        asin = obj.get("asin")
        if not isinstance(asin, str) or not asin:
            if strict:
                raise BadInputError(f"{path}:{lineno}: missing field asin")
            errors.add(lineno, "missing field asin")
            continue
        if asin not in wanted:
            continue
        if asin in items:
            dup += 1
            continue
        items[asin] = meta_to_item(obj, max_title, max_desc)
    return items, errors, {"meta_lines": reader.lines, "meta_malformed": errors.count, "meta_duplicates": dup,
                           "meta_items_matched": len(items)}


def run(args: argparse.Namespace) -> int:
    """Run the stage (see the module docstring)."""
    with gc_paused():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the amazon18 stage (see the module docstring)."""
    cfg = config_from_args(args)
    raw_dir = args.raw_dir or "."
    reviews = Path(args.reviews) if args.reviews else find_file(raw_dir, args.category, REVIEW_NAMES, "reviews")
    meta = Path(args.meta) if args.meta else find_file(raw_dir, args.category, META_NAMES, "meta")
    for p in (reviews, meta):
        if not p.is_file():
            raise bad(p, "file not found", "check --reviews / --meta, or --raw_dir and --category")
    t0 = time.perf_counter()
    log, rev_err, n_lines = read_reviews(reviews, strict=args.strict)
    t1 = time.perf_counter()
    items, meta_err, meta_counts = read_meta(meta, set(log.item_codes), args.max_title_chars,
                                             args.max_desc_chars, strict=args.strict)
    t2 = time.perf_counter()
    rev_err.report()
    meta_err.report()
    check_read(reviews, n_lines, len(log), rev_err, "reviews", "one JSON object per line with reviewerID, asin, "
               "unixReviewTime")
    stats = {
        "dataset": f"amazon18/{args.category or reviews.stem}",
        "source": {"reviews": str(reviews), "meta": str(meta)},
        "raw_lines": n_lines,
        "malformed_lines": rev_err.count,
        "malformed_examples": rev_err.examples or [],
        "reviews_read": len(log),
        **meta_counts,
        "meta_malformed_examples": meta_err.examples or [],
        "seconds": {"read_reviews": round(t1 - t0, 3), "read_meta": round(t2 - t1, 3)},
    }
    stats = build_dataset(log, items, args.out_dir, cfg, stats)
    if stats["items_without_meta"] or stats["dropped_no_title_items"]:
        print(f"[info] items without metadata: {stats['items_without_meta']}, without a usable title: "
              f"{stats['items_without_title']} ({'dropped' if cfg.require_title else 'kept with empty title'}, "
              f"{stats['dropped_no_title_interactions']} interactions dropped)", file=sys.stderr)
    print_summary(stats, args.out_dir)
    return 0
