"""amazon23 source stage: the 2023 format, the same filters/splits as amazon18, bad lines, time window, item store."""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
from test_preprocess_sources import check_rows, rows_of, run_stage, write_lines

from mimigenrec.io import SPLITS, BadInputError, DataDir, read_jsonl
from preprocess import amazon18, amazon23, interactions
from preprocess.interactions import ItemStore, item_record

MS = 1000


def rev23(user: str, item: str, ts_ms, **extra) -> str:
    return json.dumps({"rating": 5.0, "title": "ok", "text": "fine", "images": [], "asin": item + "v",
                       "parent_asin": item, "user_id": user, "timestamp": ts_ms, "helpful_vote": 0,
                       "verified_purchase": True, **extra})


def meta23(item: str, title: str, **extra) -> str:
    return json.dumps({"main_category": "Toys", "title": title, "average_rating": 4.5, "rating_number": 3,
                       "features": [], "description": [], "price": None, "images": [], "videos": [], "store": "",
                       "categories": [], "details": {}, "parent_asin": item, "bought_together": None, **extra})


# U1: A B C A(repeat) D; U2: B C C(same second: file order) A D; U3: too short; plus four bad lines
HAND_REVIEWS = [
    rev23("U1", "A", 100 * MS + 7), rev23("U2", "B", 150 * MS), rev23("U1", "B", 200 * MS), "{not json",
    rev23("U2", "C", 250 * MS + 900), rev23("U2", "C", 250 * MS + 100), rev23("U1", "C", 300 * MS),
    rev23("U2", "A", 350 * MS), json.dumps({"user_id": "U9", "timestamp": 5}), rev23("U1", "A", 400 * MS),
    rev23("U1", "D", 500 * MS), rev23("U2", "D", str(600 * MS)), rev23("U3", "A", 100 * MS),
    rev23("U3", "B", 200 * MS), rev23("U4", "A", None), "[1, 2]", "",
]
HAND_META = [
    meta23("A", "Apple &amp; Pear <b>Juice</b>", description=["<p>Fresh</p>", "tasty  drink"], store="Orchard",
           categories=["Food", "Drinks", "Food"],
           images=[{"thumb": "t", "large": "http://x/a.jpg", "variant": "MAIN", "hi_res": "http://x/a_hr.jpg"},
                   {"thumb": "t2", "large": "http://x/a2.jpg", "variant": "PT01", "hi_res": None}]),
    meta23("B", "Banana", features=["Yellow", "curved"]),
    "garbage line",
    meta23("C", "Cherry", store="Tree", description=["Red"]),
    meta23("D", "Date", description=["Sweet"]),
    json.dumps({"title": "no parent_asin"}),
    meta23("Z", "Never reviewed"),
    meta23("A", "Duplicate A (first line wins)"),
]


def hand23(root: Path, gz: bool = False) -> Path:
    sfx = ".gz" if gz else ""
    write_lines(root / f"Toy.jsonl{sfx}", HAND_REVIEWS)
    write_lines(root / f"meta_Toy.jsonl{sfx}", HAND_META)
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_amazon23_hand_made_dump(tmp_path, gz):
    raw = hand23(tmp_path / "raw", gz)
    out = tmp_path / "out"
    stats = run_stage(amazon23, ["--raw_dir", str(raw), "--category", "Toy", "--out_dir", str(out)])
    assert stats["dataset"] == "amazon23/Toy" and stats["raw_lines"] == len(HAND_REVIEWS)
    assert stats["malformed_lines"] == 4  # bad JSON, missing parent_asin, null timestamp, a list
    ex = stats["malformed_examples"]
    assert any(":4: not valid JSON" in e for e in ex) and any(":9: missing or empty field parent_asin" in e for e in ex)
    assert any(":15: bad or missing timestamp None" in e for e in ex) and any(":16: expected an object" in e for e in ex)
    assert stats["meta_malformed"] == 2 and stats["meta_duplicates"] == 1 and stats["meta_items_matched"] == 4
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 4, 10)

    items = read_jsonl(DataDir(out).items)
    assert [it["raw_id"] for it in items] == ["A", "B", "C", "D"]
    a, b, c = items[0], items[1], items[2]
    assert a["title"] == "Apple & Pear Juice" and a["description"] == "Fresh tasty drink" and a["brand"] == "Orchard"
    assert a["categories"] == ["Food", "Drinks"] and a["image_urls"] == ["http://x/a_hr.jpg", "http://x/a2.jpg"]
    assert b["description"] == "Yellow curved" and b["categories"] == ["Toys"]  # features / main_category fallbacks
    assert c["brand"] == "Tree" and c["description"] == "Red"

    r = rows_of(out)
    A, B, C, D = range(4)
    # U2's two C reviews fall in the same second: file order (250.9 s before 250.1 s) decides
    assert r["train"] == [
        {"user_id": 0, "history": [A], "target": B, "timestamp": 200, "position": 1},
        {"user_id": 0, "history": [A, B], "target": C, "timestamp": 300, "position": 2},
        {"user_id": 1, "history": [B], "target": C, "timestamp": 250, "position": 1},
        {"user_id": 1, "history": [B, C], "target": C, "timestamp": 250, "position": 2},
    ]
    assert [row["target"] for row in r["valid"]] == [A, A] and [row["target"] for row in r["test"]] == [D, D]
    assert r["test"][1]["timestamp"] == 600  # a numeric string timestamp is read too


def test_amazon23_strict_names_file_and_line(tmp_path):
    raw = hand23(tmp_path / "raw")
    with pytest.raises(BadInputError, match=r"Toy\.jsonl:4: not valid JSON"):
        run_stage(amazon23, ["--raw_dir", str(raw), "--category", "Toy", "--out_dir", str(tmp_path / "o"), "--strict"])
    with pytest.raises(BadInputError, match=r"no reviews file for category 'Nope'.*Nope\.jsonl"):
        run_stage(amazon23, ["--raw_dir", str(raw), "--category", "Nope", "--out_dir", str(tmp_path / "o")])
    write_lines(tmp_path / "e" / "E.jsonl", ["not json"] * 3)
    write_lines(tmp_path / "e" / "meta_E.jsonl", [meta23("A", "a")])
    with pytest.raises(BadInputError, match="none of its 3 lines is a usable reviews record.*user_id, parent_asin"):
        run_stage(amazon23, ["--raw_dir", str(tmp_path / "e"), "--category", "E", "--out_dir", str(tmp_path / "o")])


def test_amazon23_time_window_in_milliseconds(tmp_path):
    day = 86400 * MS
    base = 19266 * day  # 2022-10-01 00:00 UTC, R2ec's window start
    lines = [rev23("U1", "A", base - 1)]  # the last millisecond of 2022-09-30: outside
    lines += [rev23("U1", "A", base + k * day // 2) for k in range(4)]
    lines += [rev23("U1", "A", base + 365 * day + k) for k in (-1, 0)]  # 2023-09-30 23:59:59.999 in, 2023-10-01 out
    write_lines(tmp_path / "W.jsonl", lines)
    write_lines(tmp_path / "meta_W.jsonl", [meta23("A", "a")])
    stats = run_stage(amazon23, ["--raw_dir", str(tmp_path), "--category", "W", "--out_dir", str(tmp_path / "o"),
                                 "--start", "2022-10-01", "--end", "2023-09-30"])
    assert stats["dropped_outside_window"] == 2 and stats["interactions"] == 5


def _both_formats(root: Path, n_users: int = 80, n_items: int = 30, seed: int = 0) -> None:
    """The same random events as an Amazon-2018 dump and an Amazon-2023 dump (same order, bad lines, titles)."""
    rng = random.Random(seed)
    r18, r23 = [], []
    for k in range(n_users * 6):
        u, i, t = f"U{rng.randrange(n_users)}", f"I{min(int(rng.paretovariate(0.8)), n_items) - 1:03d}", rng.randint(1, 60)
        r18.append(json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t}))
        r23.append(rev23(u, i, t * MS + rng.randrange(MS)))
        if k % 97 == 5:
            r18.append("{broken")
            r23.append("{broken")
    write_lines(root / "R_5.json", r18)
    write_lines(root / "R.jsonl", r23)
    titles = {i: ("" if i % 11 == 3 else f"Item {i}") for i in range(n_items)}
    write_lines(root / "meta_R.json", [json.dumps({"asin": f"I{i:03d}", "title": t}) for i, t in titles.items()])
    write_lines(root / "meta_R.jsonl", [meta23(f"I{i:03d}", t) for i, t in titles.items()])


@pytest.mark.parametrize("opts", [[], ["--kcore", "3"], ["--split", "time", "--min_seq_len", "2"],
                                  ["--max_history", "0", "--kcore", "2"]])
def test_amazon23_same_filters_and_splits_as_amazon18(tmp_path, opts):
    _both_formats(tmp_path / "raw")
    base = ["--raw_dir", str(tmp_path / "raw"), "--category", "R", *opts]
    s18 = run_stage(amazon18, base + ["--out_dir", str(tmp_path / "a")])
    s23 = run_stage(amazon23, base + ["--out_dir", str(tmp_path / "b")])
    for key in ("users", "items", "interactions", "rows", "malformed_lines", "dropped_no_title_items",
                "kcore_rounds", "repeat_interactions"):
        assert s18[key] == s23[key], key
    for s in SPLITS:
        assert DataDir(tmp_path / "a").inter(s).read_bytes() == DataDir(tmp_path / "b").inter(s).read_bytes()
    assert DataDir(tmp_path / "a").users.read_bytes() == DataDir(tmp_path / "b").users.read_bytes()
    if "--max_history" not in opts:  # (check_rows knows capped histories only)
        check_rows(tmp_path / "b", 10)


def test_all_accepts_amazon23(tmp_path):
    import argparse

    from preprocess.all_stage import add_arguments, plan

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--source", "amazon23", "--raw_dir", "R", "--category", "Books", "--out_dir", "O",
                         "--start", "2022-10-01", "--sid_method", "rqvae"])
    steps = dict(plan(args))
    assert (steps["amazon23"].category, str(steps["amazon23"].start)) == ("Books", "2022-10-01")
    assert steps["sid"].method == "rqvae"


def test_item_store_is_a_mapping_on_disk(tmp_path):
    codes = {"a": 0, "b": 1, "c": 2}
    with ItemStore(codes, tmp_path) as st:
        st.add("b", item_record("b", "Bee", "buzz é"))
        st.add("a", item_record("a", "", "no title"))
        st.add("b", item_record("b", "second wins? no"))
        assert len(st) == 2 and set(st) == {"a", "b"} and "c" not in st and "zz" not in st
        assert st["b"]["title"] == "Bee" and st["b"]["description"] == "buzz é" and st.get("c") is None
        assert st.usable_titles(["a", "b", "c", "zz"]).tolist() == [False, True, False, False]
        assert not list(tmp_path.iterdir())  # the spill file is unlinked from the start
    with pytest.raises(KeyError):
        ItemStore(codes, tmp_path).add("zz", item_record("zz"))


def test_items_file_same_from_store_and_dict(tmp_path):
    """_write_items writes the stored bytes directly: the result equals the dict path byte for byte."""
    recs = {r: item_record(r, f"T {r} ü", "d", "b", ["x", "y"], ["http://u"]) for r in ("q", "p")}
    recs["p"]["title"] = 'quote " and \\ backslash'
    with ItemStore({"p": 0, "q": 1, "r": 2}, tmp_path) as st:
        for r, rec in recs.items():
            st.add(r, rec)
        interactions._write_items(DataDir(tmp_path / "s"), ["p", "q", "r"], ["u"], st)
    interactions._write_items(DataDir(tmp_path / "d"), ["p", "q", "r"], ["u"], recs)
    assert (tmp_path / "s" / "items.jsonl").read_bytes() == (tmp_path / "d" / "items.jsonl").read_bytes()
    assert read_jsonl(tmp_path / "s" / "items.jsonl")[2] == {"item_id": 2, **item_record("r")}


@pytest.mark.parametrize("max_history", [0, 2])
def test_row_blocks_split_long_users(tmp_path, monkeypatch, max_history):
    """Blocks smaller than one user's events (a user spans blocks) write the same bytes."""
    _both_formats(tmp_path / "raw", n_users=5)
    argv = ["--raw_dir", str(tmp_path / "raw"), "--category", "R", "--max_history", str(max_history)]
    run_stage(amazon23, argv + ["--out_dir", str(tmp_path / "a")])
    monkeypatch.setattr(interactions, "_write_rows", functools.partial(interactions._write_rows, block=4))
    run_stage(amazon23, argv + ["--out_dir", str(tmp_path / "b")])
    for s in SPLITS:
        a, b = (DataDir(tmp_path / d).inter(s).read_bytes() for d in "ab")
        assert a == b and a.count(b"\n") >= 5
