"""Amazon Reviews 2023 dump -> items/users/inter splits/stats (same files, filters and splits as amazon18).

Reads ``RAW_DIR/<category>.jsonl[.gz]`` (one review per line: ``user_id``, ``parent_asin``,
``timestamp`` in milliseconds; ``asin``, ``rating``, ``title``, ``text`` are not needed) and
``RAW_DIR/meta_<category>.jsonl[.gz]`` (one item per line: ``parent_asin``, ``title``,
``description`` (a list), ``features``, ``store``, ``categories``, ``main_category``, ``images``).
Items are keyed by ``parent_asin`` (the product, not its colour/size variant ``asin``).

Mapping to ``items.jsonl``: ``description`` = the description list joined (``features`` when
it is empty), ``brand`` = ``store``, ``categories`` = ``categories`` (``[main_category]`` when
empty), ``image_urls`` = each image's ``hi_res`` or else ``large`` URL. Timestamps become unix
seconds (``timestamp // 1000``): events in the same second keep their file order, and
``--start``/``--end`` compare UTC dates as for amazon18.

Malformed lines (also review lines missing a field) are counted, reported with ``file:line`` and
skipped (``--strict`` stops instead). Metadata lines of items that have no review are skipped
without being parsed. Memory: interactions are kept as integer columns and item metadata in a
temporary file beside the outputs, so a full category (tens of millions of reviews) fits in a
few GB (``bench/bench_preprocess.py --format amazon23``).
"""
from __future__ import annotations

import argparse
from typing import Any

from .amazon18 import DumpFormat, add_source_arguments, run_dump
from .interactions import add_common_arguments, clean_text, flat_strings, item_record

REVIEW_NAMES = ("{c}.jsonl", "{c}.json", "reviews_{c}.jsonl")
META_NAMES = ("meta_{c}.jsonl", "meta_{c}.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m preprocess amazon23`` (the same as amazon18's)."""
    parser.add_argument("--raw_dir", default=".", help="folder holding the review and metadata files")
    add_source_arguments(parser)
    add_common_arguments(parser)


def image_urls(images: Any) -> list[str]:
    """URLs of a 2023 ``images`` field: per image ``hi_res`` or else ``large`` (plain strings kept)."""
    urls: list[Any] = []
    for im in images if isinstance(images, list) else []:
        if isinstance(im, dict):
            urls.append(im.get("hi_res") or im.get("large") or im.get("thumb"))
        else:
            urls.append(im)
    return flat_strings([u for u in urls if isinstance(u, str)], clean=False)


def meta_to_item(obj: dict[str, Any], max_title: int, max_desc: int) -> dict:
    """An ``items.jsonl`` record (without ``item_id``) from one Amazon-2023 metadata object."""
    desc = clean_text(obj.get("description"), max_desc) or clean_text(obj.get("features"), max_desc)
    cats = flat_strings(obj.get("categories")) or flat_strings(obj.get("main_category"))
    return item_record(
        raw_id=str(obj["parent_asin"]),
        title=clean_text(obj.get("title"), max_title),
        description=desc,
        brand=clean_text(obj.get("store")),
        categories=cats,
        image_urls=image_urls(obj.get("images")),
    )


AMAZON23 = DumpFormat(
    name="amazon23", review_names=REVIEW_NAMES, meta_names=META_NAMES, user_key="user_id", item_key="parent_asin",
    time_key="timestamp", time_divisor=1000, meta_item_key="parent_asin", meta_to_item=meta_to_item,
    allow_literal=False, review_expected="one JSON object per line with user_id, parent_asin, timestamp (ms)")


def run(args: argparse.Namespace) -> int:
    """Run the stage (see the module docstring)."""
    return run_dump(args, AMAZON23)
