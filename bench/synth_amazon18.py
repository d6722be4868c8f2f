"""Write a synthetic Amazon-Reviews-2018-format dump (reviews + metadata), seeded.

``python bench/synth_amazon18.py --out_dir D --n_reviews 1000000 --n_items 100000 [--gz]``
writes ``D/<category>_5.json[.gz]`` (one review per line, grouped by item like the real
5-core files, with review text) and ``D/meta_<category>.json[.gz]`` (one item per line,
JSON or with ``--literal_meta`` Python literals as in older dumps; ~1% of items lack a
title, titles carry HTML entities, and 10% extra items have no review). Every user has at
least 5 reviews; item popularity is Zipf-like.
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import IO

import numpy as np

WORDS = ("great", "quality", "works", "fine", "cheap", "sturdy", "broke", "after", "week", "would", "buy",
         "again", "exactly", "as", "described", "fast", "shipping", "the", "a", "tool", "battery", "lasts",
         "long", "price", "is", "right", "not", "what", "expected", "small", "large", "fits", "well",
         "recommend", "this", "to", "anyone", "who", "needs", "one")


def _open(path: Path) -> IO[str]:
    return gzip.open(path, "wt", encoding="utf-8", compresslevel=1) if path.suffix == ".gz" else \
        open(path, "w", encoding="utf-8")


def _base36(n: int, width: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = []
    for _ in range(width):
        n, r = divmod(n, 36)
        out.append(digits[r])
    return "".join(reversed(out))


def synthetic_events(n_reviews: int, n_items: int, n_users: int | None = None, seed: int = 0,
                     ts_range: tuple[int, int] = (1_262_304_000, 1_538_352_000), user_width: int = 13,
                     item_width: int = 9, text_words: int = 30) -> dict:
    """The seeded content of a synthetic dump, whatever its format.

    Returns ``user``/``item``/``ts`` arrays (one per review), ``order`` (reviews grouped by item, as in
    the real 5-core files), raw ``user_ids``/``item_ids`` (``A``/``B`` + base-36 digits) and 997 texts.
    Every user has at least 5 reviews; item popularity is Zipf-like.
    """
    rng = np.random.default_rng(seed)
    n_users = n_users or max(1, n_reviews // 8)
    if n_reviews < 5 * n_users:
        raise ValueError(f"need n_reviews >= 5 * n_users ({5 * n_users})")
    # users: 5 reviews each, the rest Zipf-distributed; items: Zipf popularity
    extra = rng.zipf(1.6, n_reviews - 5 * n_users) % n_users
    user = np.concatenate([np.repeat(np.arange(n_users), 5), extra])
    item = (rng.zipf(1.3, n_reviews) - 1) % n_items
    item[:min(n_items, n_reviews)] = rng.permutation(n_items)[:min(n_items, n_reviews)]  # most items appear
    ts = rng.integers(ts_range[0], ts_range[1], n_reviews)
    order = np.lexsort((ts, item))  # grouped by item like the real 5-core files
    # distinct, random-looking raw ids: k -> (k * odd prime + offset) mod 36^w is a bijection
    off = int(rng.integers(0, 1 << 40))
    user_ids = [f"A{_base36((k * 1_000_003 + off) % 36 ** user_width, user_width)}" for k in range(n_users)]
    item_ids = [f"B{_base36((k * 998_244_353 + off) % 36 ** item_width, item_width)}" for k in range(n_items)]
    texts = [" ".join(rng.choice(WORDS, max(1, int(rng.integers(text_words // 2, text_words * 3 // 2 + 1)))))
             for _ in range(997)]
    return {"user": user, "item": item, "ts": ts, "order": order, "user_ids": user_ids, "item_ids": item_ids,
            "texts": texts}


def write_synthetic(out_dir: str | Path, n_reviews: int, n_items: int, n_users: int | None = None,
                    category: str = "Synthetic", seed: int = 0, gz: bool = False,
                    literal_meta: bool = False, text_words: int = 30) -> tuple[Path, Path]:
    """Write the dump; returns ``(reviews path, meta path)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = synthetic_events(n_reviews, n_items, n_users, seed, text_words=text_words)
    user, item, ts, order = ev["user"], ev["item"], ev["ts"], ev["order"]
    user_ids, item_ids, texts = ev["user_ids"], ev["item_ids"], ev["texts"]
    suffix = ".gz" if gz else ""
    rpath = out / f"{category}_5.json{suffix}"
    with _open(rpath) as f:
        buf = []
        for r in order.tolist():
            t = int(ts[r])
            buf.append(json.dumps({
                "overall": float(1 + r % 5), "verified": bool(r % 3), "reviewTime": "01 1, 2017",
                "reviewerID": user_ids[user[r]], "asin": item_ids[item[r]], "reviewerName": "Reviewer",
                "reviewText": texts[r % 997], "summary": texts[(r * 7) % 997][:30], "unixReviewTime": t}) + "\n")
            if len(buf) >= 65536:
                f.writelines(buf)
                buf.clear()
        f.writelines(buf)
    mpath = out / f"meta_{category}.json{suffix}"
    n_meta = n_items + n_items // 10
    with _open(mpath) as f:
        for k in range(n_meta):
            asin = item_ids[k] if k < n_items else f"Z{k:09d}"
            title = "" if k % 97 == 13 else f"Widget {k} &amp; {texts[k % 997][:40].title()} <b>Pro</b>"
            obj = {"category": [category.replace("_", " "), f"Sub {k % 50}"], "tech1": "",
                   "description": [texts[(k * 3) % 997], texts[(k * 5) % 997]], "fit": "", "title": title,
                   "also_buy": [], "brand": f"Brand{k % 300}", "feature": [texts[(k * 11) % 997][:60]],
                   "rank": f"{k:,} in {category}", "main_cat": category, "price": f"${k % 100}.99",
                   "asin": asin, "imageURL": [f"https://example.com/{asin}.jpg"],
                   "imageURLHighRes": [f"https://example.com/{asin}_hr.jpg"]}
            f.write((repr(obj) if literal_meta else json.dumps(obj)) + "\n")
    return rpath, mpath


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", required=True, help="folder to write the two files into")
    p.add_argument("--n_reviews", type=int, default=1_000_000, help="review lines")
    p.add_argument("--n_items", type=int, default=100_000, help="items with reviews (meta has 10%% more)")
    p.add_argument("--n_users", type=int, default=None, help="users (default n_reviews // 8)")
    p.add_argument("--category", default="Synthetic", help="category name used in the file names")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--gz", action="store_true", help="write .json.gz files")
    p.add_argument("--literal_meta", action="store_true", help="write metadata as Python literals (old dumps)")
    p.add_argument("--text_words", type=int, default=30, help="mean words of a review text")
    a = p.parse_args(argv)
    r, m = write_synthetic(a.out_dir, a.n_reviews, a.n_items, a.n_users, a.category, a.seed, a.gz,
                           a.literal_meta, a.text_words)
    print(f"wrote {r} and {m}")


if __name__ == "__main__":
    main()
