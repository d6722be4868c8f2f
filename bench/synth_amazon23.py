"""Write a synthetic Amazon-Reviews-2023-format dump (reviews + metadata), seeded.

``python bench/synth_amazon23.py --out_dir D --n_reviews 1000000 --n_items 100000 [--gz]``
writes ``D/<category>.jsonl[.gz]`` (one review per line with the 2023 fields: ``rating, title, text,
images, asin, parent_asin, user_id, timestamp`` in ms, ``helpful_vote, verified_purchase``) and
``D/meta_<category>.jsonl[.gz]`` (``main_category, title, average_rating, rating_number, features,
description, price, images, videos, store, categories, details, parent_asin, bought_together``).
The events are those of ``synth_amazon18.synthetic_events`` (every user >= 5 reviews, Zipf items),
2018-01..2023-10, 28-character user ids and 10-character parent_asins as in the real files;
~1% of items lack a title, titles carry HTML entities, 10% extra items have no review.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_amazon18 import _open, synthetic_events

TS_RANGE_MS = (1_514_764_800_000, 1_696_118_400_000)  # 2018-01-01 .. 2023-10-01


def write_synthetic23(out_dir: str | Path, n_reviews: int, n_items: int, n_users: int | None = None,
                      category: str = "Synthetic", seed: int = 0, gz: bool = False,
                      text_words: int = 30) -> tuple[Path, Path]:
    """Write the dump; returns ``(reviews path, meta path)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = synthetic_events(n_reviews, n_items, n_users, seed, ts_range=TS_RANGE_MS, user_width=27, item_width=9,
                          text_words=text_words)
    user, item, ts, texts = ev["user"], ev["item"], ev["ts"], ev["texts"]
    user_ids, item_ids = ev["user_ids"], ev["item_ids"]
    sfx = ".gz" if gz else ""
    rpath = out / f"{category}.jsonl{sfx}"
    dumps = orjson.dumps
    with _open(rpath) as f:
        buf = []
        for r in ev["order"].tolist():
            i = int(item[r])
            buf.append(dumps({
                "rating": float(1 + r % 5), "title": texts[(r * 7) % 997][:30], "text": texts[r % 997],
                "images": [], "asin": item_ids[i][:-1] + "X", "parent_asin": item_ids[i],
                "user_id": user_ids[user[r]], "timestamp": int(ts[r]), "helpful_vote": r % 4,
                "verified_purchase": bool(r % 3)}).decode() + "\n")
            if len(buf) >= 65536:
                f.writelines(buf)
                buf.clear()
        f.writelines(buf)
    mpath = out / f"meta_{category}.jsonl{sfx}"
    cat = category.replace("_", " ")
    with _open(mpath) as f:
        buf = []
        for k in range(n_items + n_items // 10):
            pa = item_ids[k] if k < n_items else f"Z{k:09d}"
            title = "" if k % 97 == 13 else f"Widget {k} &amp; {texts[k % 997][:40].title()} <b>Pro</b>"
            buf.append(dumps({
                "main_category": cat, "title": title, "average_rating": 4.2, "rating_number": k % 500,
                "features": [texts[(k * 11) % 997][:60]], "description": [texts[(k * 3) % 997], texts[(k * 5) % 997]],
                "price": None if k % 7 == 0 else k % 100 + 0.99,
                "images": [{"thumb": f"https://example.com/{pa}_t.jpg", "large": f"https://example.com/{pa}.jpg",
                            "variant": "MAIN", "hi_res": None if k % 5 == 0 else f"https://example.com/{pa}_hr.jpg"}],
                "videos": [], "store": f"Brand{k % 300}", "categories": [cat, f"Sub {k % 50}"],
                "details": {"Item Weight": f"{k % 9 + 1} pounds"}, "parent_asin": pa, "bought_together": None,
            }).decode() + "\n")
            if len(buf) >= 65536:
                f.writelines(buf)
                buf.clear()
        f.writelines(buf)
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
    p.add_argument("--gz", action="store_true", help="write .jsonl.gz files")
    p.add_argument("--text_words", type=int, default=30, help="mean words of a review text")
    a = p.parse_args(argv)
    r, m = write_synthetic23(a.out_dir, a.n_reviews, a.n_items, a.n_users, a.category, a.seed, a.gz, a.text_words)
    print(f"wrote {r} and {m}")


if __name__ == "__main__":
    main()
