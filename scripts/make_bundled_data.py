"""Derive the bundled default dataset (data/raw/amazon18/<Category>/) from an Amazon 2018 dump.

Copies the reviews and meta files of one category, keeping only the metadata of items that
occur in the reviews, as deterministic gzip files (mtime 0), and validates every line.
Usage: python scripts/make_bundled_data.py --src DIR --category C [--dest data/raw/amazon18]
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from mimigenrec.io import LineErrors, iter_records


def _write_gz(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write("".join(lines).encode("utf-8"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="directory with <C>_5.json and meta_<C>.json (plain or .gz)")
    p.add_argument("--category", required=True, help="category name C")
    p.add_argument("--dest", default="data/raw/amazon18", help="output root; files go to DEST/C/")
    a = p.parse_args()
    src = Path(a.src)
    find = lambda stem: next(f for f in (src / stem, src / f"{stem}.gz") if f.exists())
    errs = LineErrors(str(find(f"{a.category}_5.json")))
    reviews = [obj for _, obj in iter_records(find(f"{a.category}_5.json"), errs)]
    errs.report()
    asins = {r["asin"] for r in reviews}
    meta = [obj for _, obj in iter_records(find(f"meta_{a.category}.json"), allow_literal=True)
            if obj.get("asin") in asins]
    out = Path(a.dest) / a.category
    _write_gz(out / f"{a.category}_5.json.gz", [json.dumps(r) + "\n" for r in reviews])
    _write_gz(out / f"meta_{a.category}.json.gz", [json.dumps(m) + "\n" for m in meta])
    print(f"wrote {len(reviews)} reviews, {len(meta)} items to {out}")


if __name__ == "__main__":
    main()
