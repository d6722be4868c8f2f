"""Source stages (amazon18, movielens): parsing, k-core fixed point, ids, split protocols, no-leak guarantee."""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mimigenrec.io import SPLITS, BadInputError, DataDir, read_json, read_jsonl
from preprocess import amazon18, movielens
from preprocess.interactions import clean_text, kcore_filter

ROW_KEYS = {"user_id", "history", "target", "timestamp", "position"}
ITEM_KEYS = {"item_id", "raw_id", "title", "description", "brand", "categories", "image_urls"}


def run_stage(module, argv: list[str]) -> dict:
    """Parse ``argv`` with the stage's own options, run it, return its stats.json."""
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    args = p.parse_args(argv)
    assert module.run(args) == 0
    return read_json(DataDir(args.out_dir).stats)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(line + "\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def rev(user: str, asin: str, ts) -> str:
    return json.dumps({"overall": 5.0, "reviewerID": user, "asin": asin, "reviewText": "ok", "unixReviewTime": ts})


# U1: A B C A(repeat) N(no title) D; U2: B C C(tie, line order) A D("600" as a string); U3: E A (too short);
# U4: X(no metadata) A B C. Plus three malformed lines.
HAND_REVIEWS = [
    rev("U1", "A", 100), rev("U2", "B", 150), rev("U1", "B", 200), "{not json", rev("U2", "C", 250),
    rev("U2", "C", 250), rev("U1", "C", 300), rev("U2", "A", 350), rev("U1", "A", 400), rev("U1", "N", 450),
    '{"reviewerID": "U9", "unixReviewTime": 5}', rev("U1", "D", 500), rev("U2", "D", "600"), "[1, 2]",
    rev("U3", "E", 100), rev("U3", "A", 200), rev("U4", "X", 100), rev("U4", "A", 200), rev("U4", "B", 300),
    rev("U4", "C", 400),
]
HAND_META = [
    json.dumps({"asin": "A", "title": "Apple &amp; Pear <b>Juice</b>", "description": ["<p>Fresh</p>", "tasty  drink"],
                "brand": "Orchard", "category": ["Food", "Drinks", "Food"], "imageURL": ["http://x/a.jpg"],
                "imageURLHighRes": ["http://x/a_hr.jpg"]}),
    repr({"asin": "B", "title": "Banana", "description": "Yellow", "categories": [["Food", "Fruit"], ["Fruit"]],
          "imUrl": "http://x/b.jpg"}),
    "this line is garbage",
    json.dumps({"asin": "C", "title": "Cherry", "brand": "Tree"}),
    repr({"asin": "D", "title": "Date", "description": ["Sweet"]}),
    json.dumps({"asin": "E", "title": "Eggplant"}),
    json.dumps({"asin": "N", "title": "   ", "description": "no title"}),
    json.dumps({"asin": "Z", "title": "Never reviewed"}),
]


def hand_dump(root: Path, gz: bool) -> Path:
    sfx = ".gz" if gz else ""
    write_lines(root / f"Toy_5.json{sfx}", HAND_REVIEWS)
    write_lines(root / f"meta_Toy.json{sfx}", HAND_META)
    return root


def rows_of(out: Path) -> dict[str, list[dict]]:
    return {s: read_jsonl(DataDir(out).inter(s)) for s in SPLITS}


@pytest.mark.parametrize("gz", [False, True])
def test_amazon_hand_made_dump(tmp_path, gz):
    raw = hand_dump(tmp_path / "raw", gz)
    out = tmp_path / "out"
    stats = run_stage(amazon18, ["--raw_dir", str(raw), "--category", "Toy", "--out_dir", str(out)])
    assert stats["raw_lines"] == len(HAND_REVIEWS)
    assert stats["malformed_lines"] == 3
    assert any(":4:" in e for e in stats["malformed_examples"])  # file:line of the bad JSON
    assert any(":11:" in e and "asin" in e for e in stats["malformed_examples"])
    assert stats["meta_malformed"] == 1
    assert stats["items_without_meta"] == 1 and stats["dropped_no_title_items"] == 2
    assert stats["dropped_no_title_interactions"] == 2
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 4, 13)
    assert stats["repeat_interactions"] == 2  # U1 A twice, U2 C twice

    items = read_jsonl(DataDir(out).items)
    assert all(set(it) == ITEM_KEYS for it in items)
    assert [it["raw_id"] for it in items] == ["A", "B", "C", "D"]  # ids in raw-id order
    a, b = items[0], items[1]
    assert a["title"] == "Apple & Pear Juice" and a["description"] == "Fresh tasty drink"
    assert a["categories"] == ["Food", "Drinks"] and a["image_urls"] == ["http://x/a_hr.jpg"]
    assert b["categories"] == ["Food", "Fruit"] and b["image_urls"] == ["http://x/b.jpg"]
    assert b["description"] == "Yellow" and items[2]["brand"] == "Tree"
    users = read_jsonl(DataDir(out).users)
    assert users == [{"user_id": 0, "raw_id": "U1"}, {"user_id": 1, "raw_id": "U2"}, {"user_id": 2, "raw_id": "U4"}]

    r = rows_of(out)
    A, B, C, D = range(4)
    assert r["train"] == [
        {"user_id": 0, "history": [A], "target": B, "timestamp": 200, "position": 1},
        {"user_id": 0, "history": [A, B], "target": C, "timestamp": 300, "position": 2},
        {"user_id": 1, "history": [B], "target": C, "timestamp": 250, "position": 1},
        {"user_id": 1, "history": [B, C], "target": C, "timestamp": 250, "position": 2},
    ]
    assert r["valid"] == [
        {"user_id": 0, "history": [A, B, C], "target": A, "timestamp": 400, "position": 3},
        {"user_id": 1, "history": [B, C, C], "target": A, "timestamp": 350, "position": 3},
        {"user_id": 2, "history": [A], "target": B, "timestamp": 300, "position": 1},
    ]
    assert r["test"][0] == {"user_id": 0, "history": [A, B, C, A], "target": D, "timestamp": 500, "position": 4}
    assert r["test"][1]["timestamp"] == 600 and r["test"][2]["history"] == [A, B]
    assert stats["rows"] == {"train": 4, "valid": 3, "test": 3}


def test_amazon_keep_untitled_history_cap_and_overrides(tmp_path):
    raw = hand_dump(tmp_path / "raw", gz=False)
    out = tmp_path / "out"
    stats = run_stage(amazon18, ["--reviews", str(raw / "Toy_5.json"), "--meta", str(raw / "meta_Toy.json"),
                                 "--out_dir", str(out), "--no-require_title", "--max_history", "2"])
    items = {it["raw_id"]: it for it in read_jsonl(DataDir(out).items)}
    assert set(items) == {"A", "B", "C", "D", "N", "X"}
    assert items["X"]["title"] == "" and items["N"]["title"] == "" and items["N"]["description"] == "no title"
    assert stats["dropped_no_title_items"] == 0 and stats["items_without_title"] == 2
    r = rows_of(out)
    assert all(len(row["history"]) <= 2 for s in SPLITS for row in r[s])
    u1_test = r["test"][0]  # U1: A B C A N D -> history capped to [A, N]
    ids = {it["item_id"]: k for k, it in items.items()}
    assert [ids[i] for i in u1_test["history"]] == ["A", "N"] and ids[u1_test["target"]] == "D"


def test_amazon_strict_and_missing_files(tmp_path):
    raw = hand_dump(tmp_path / "raw", gz=False)
    with pytest.raises(BadInputError, match=r"Toy_5\.json:4:"):
        run_stage(amazon18, ["--raw_dir", str(raw), "--category", "Toy", "--out_dir", str(tmp_path / "o"),
                             "--strict"])
    with pytest.raises(BadInputError, match="no reviews file"):
        run_stage(amazon18, ["--raw_dir", str(raw), "--category", "Nope", "--out_dir", str(tmp_path / "o")])


def test_empty_after_filter_names_the_filter(tmp_path, capsys):
    from preprocess.__main__ import main

    raw = hand_dump(tmp_path / "raw", gz=False)
    base = ["--raw_dir", str(raw), "--category", "Toy", "--out_dir", str(tmp_path / "o")]
    with pytest.raises(BadInputError, match="--kcore"):
        run_stage(amazon18, base + ["--kcore", "10"])
    with pytest.raises(BadInputError, match="time window"):
        run_stage(amazon18, base + ["--start", "2001-01-01"])
    write_lines(raw / "meta_Toy.json", [json.dumps({"asin": "A", "title": ""})])
    with pytest.raises(BadInputError, match="title"):
        run_stage(amazon18, base)
    assert main(["amazon18", *base]) == 2  # the CLI turns it into a clear message and exit code 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "o" / "stats.json").exists()


def test_kcore_fixed_point_hand_computed():
    # u0:[i0,i1] u1:[i0,i1] u2:[i1,i2] u3:[i2,i3], k=2. Pass 1 drops i3 -> u3 has 1 -> pass 2 drops u3
    # -> i2 has 1 -> drops i2 -> u2 has 1 -> drops u2. Fixed point: u0, u1 with i0, i1.
    users = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    items = np.array([0, 1, 0, 1, 1, 2, 2, 3])
    keep, rounds = kcore_filter(users, items, np.ones(8, bool), 2, 2)
    assert keep.tolist() == [True] * 4 + [False] * 4
    assert rounds >= 4
    # a single pass would not be a fixed point
    keep1, _ = kcore_filter(users[keep], items[keep], np.ones(4, bool), 2, 2)
    assert keep1.all()


def random_dump(root: Path, n_users: int = 60, n_items: int = 25, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for u in range(n_users):
        for _ in range(rng.randint(1, 14)):  # few distinct timestamps -> many ties; repeats happen
            lines.append(rev(f"U{u}", f"I{min(int(rng.paretovariate(0.8)), n_items) - 1:03d}", rng.randint(1, 40)))
    rng.shuffle(lines)
    write_lines(root / "R_5.json", lines)
    write_lines(root / "meta_R.json", [json.dumps({"asin": f"I{i:03d}", "title": f"Item {i}"}) for i in range(n_items)])
    return root


def naive_kcore(events: list[tuple[str, str]], umin: int, imin: int) -> list[tuple[str, str]]:
    while True:
        cu, ci = Counter(u for u, _ in events), Counter(i for _, i in events)
        kept = [(u, i) for u, i in events if cu[u] >= umin and ci[i] >= imin]
        if len(kept) == len(events):
            return kept
        events = kept


def sequences(out: Path) -> dict[int, list[int]]:
    """Each user's full sequence rebuilt from the rows (targets by position, plus history of position 1)."""
    seq: dict[int, dict[int, int]] = {}
    for s in SPLITS:
        for r in read_jsonl(DataDir(out).inter(s)):
            d = seq.setdefault(r["user_id"], {})
            d[r["position"]] = r["target"]
            if r["position"] == 1:
                d[0] = r["history"][0]
    return {u: [d[p] for p in range(len(d))] for u, d in seq.items()}


@pytest.mark.parametrize("kcore", [0, 3])
def test_stage_kcore_matches_naive_fixed_point(tmp_path, kcore):
    raw = random_dump(tmp_path / "raw")
    out = tmp_path / "out"
    stats = run_stage(amazon18, ["--raw_dir", str(raw), "--category", "R", "--out_dir", str(out),
                                 "--kcore", str(kcore)])
    events = []
    for line in (raw / "R_5.json").read_text().splitlines():
        o = json.loads(line)
        events.append((o["reviewerID"], o["asin"]))
    kept = naive_kcore(events, max(kcore, 3), kcore)
    assert stats["interactions"] == len(kept)
    assert stats["users"] == len({u for u, _ in kept}) and stats["items"] == len({i for _, i in kept})
    seqs = sequences(out)
    assert sum(map(len, seqs.values())) == len(kept)
    counts = Counter(i for s in seqs.values() for i in s)
    assert min(map(len, seqs.values())) >= max(kcore, 3) and min(counts.values()) >= kcore


def check_rows(out: Path, max_history: int) -> dict[str, list[dict]]:
    """Row format, histories = preceding items, and no test (user, position) in that user's train rows."""
    rows = rows_of(out)
    seqs = sequences(out)
    n_items = len(read_jsonl(DataDir(out).items))
    for s in SPLITS:
        for r in rows[s]:
            assert set(r) == ROW_KEYS and all(type(r[k]) is int for k in ROW_KEYS - {"history"})
            seq, p = seqs[r["user_id"]], r["position"]
            assert 0 <= r["target"] < n_items and seq[p] == r["target"]
            assert r["history"] == seq[max(0, p - max_history):p]
    train_seen: dict[int, set[int]] = {}
    for r in rows["train"]:
        train_seen.setdefault(r["user_id"], set()).update(range(r["position"] - len(r["history"]), r["position"] + 1))
    for r in rows["test"]:
        assert r["position"] not in train_seen.get(r["user_id"], set())
    keys = [(r["user_id"], r["position"]) for s in SPLITS for r in rows[s]]
    assert len(keys) == len(set(keys))
    return rows


def test_loo_split_no_leak(tmp_path):
    raw = random_dump(tmp_path / "raw", seed=1)
    out = tmp_path / "out"
    run_stage(amazon18, ["--raw_dir", str(raw), "--category", "R", "--out_dir", str(out), "--max_history", "4"])
    rows = check_rows(out, 4)
    seqs = sequences(out)
    last = {r["user_id"]: r["position"] for r in rows["test"]}
    assert last == {u: len(s) - 1 for u, s in seqs.items()}
    assert {r["user_id"]: r["position"] for r in rows["valid"]} == {u: len(s) - 2 for u, s in seqs.items()}
    for r in rows["train"]:  # no valid/test event in any train row (target or history)
        assert r["position"] <= last[r["user_id"]] - 2


def test_time_split_no_leak(tmp_path):
    raw = random_dump(tmp_path / "raw", seed=2)
    out = tmp_path / "out"
    stats = run_stage(amazon18, ["--raw_dir", str(raw), "--category", "R", "--out_dir", str(out),
                                 "--split", "time", "--min_seq_len", "2"])
    rows = check_rows(out, 10)
    n = sum(stats["rows"].values())
    assert stats["interactions"] - stats["users"] == n  # every event after a user's first is a row
    assert stats["rows"]["train"] == int(n * 0.8) and stats["rows"]["valid"] == int(n * 0.9) - int(n * 0.8)
    assert max(r["timestamp"] for r in rows["train"]) <= min(r["timestamp"] for r in rows["valid"])
    assert max(r["timestamp"] for r in rows["valid"]) <= min(r["timestamp"] for r in rows["test"])
    with pytest.raises(BadInputError, match="min_seq_len"):
        run_stage(amazon18, ["--raw_dir", str(raw), "--category", "R", "--out_dir", str(out), "--min_seq_len", "2"])


def test_time_window(tmp_path):
    day = 86400
    lines = [rev("U1", "A", 10 * day + k * day // 2) for k in range(12)]
    lines += [rev("U2", "A", 12 * day + k) for k in range(3)]
    write_lines(tmp_path / "W_5.json", lines)
    write_lines(tmp_path / "meta_W.json", [json.dumps({"asin": "A", "title": "a"})])
    stats = run_stage(amazon18, ["--raw_dir", str(tmp_path), "--category", "W", "--out_dir", str(tmp_path / "o"),
                                 "--start", "1970-01-12", "--end", "1970-01-14"])  # days 11..13 inclusive
    assert stats["dropped_outside_window"] == 6 and stats["interactions"] == 9


def test_clean_text():
    assert clean_text(["<div>a&nbsp;b</div>", "&lt;br&gt;c"]) == "a b c"
    assert clean_text("x <script>var a = 1;</script> y") == "x y"
    assert clean_text("one two three four", max_chars=9) == "one two..."


def test_movielens_raw_flavours(tmp_path):
    ml100 = tmp_path / "ml100"
    write_lines(ml100 / "u.data", [f"{u}\t{i}\t{(u + i) % 5 + 1}\t{100 * i + u}"
                                   for u in (1, 2) for i in (1, 2, 3, 10)])
    genres = ["0"] * 19
    genres[1] = genres[5] = "1"
    write_lines(ml100 / "u.item", [f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|" + "|".join(genres)
                                   for i in (1, 2, 3, 10)] + ["bad line"])
    stats = run_stage(movielens, ["--raw_dir", str(ml100), "--out_dir", str(tmp_path / "o1")])
    items = read_jsonl(DataDir(tmp_path / "o1").items)
    assert stats["flavour"] == "ml-100k" and stats["meta_malformed"] == 1
    assert [it["raw_id"] for it in items] == ["1", "2", "3", "10"]  # numeric raw-id order
    assert items[0]["categories"] == ["Action", "Comedy"] and items[0]["title"] == "Movie 1 (1995)"

    ml1m = tmp_path / "ml1m"
    write_lines(ml1m / "ratings.dat", [f"{u}::{i}::{i % 4 + 2}::{1000 + 10 * i + u}"
                                       for u in (1, 2) for i in range(6, 11)])
    write_lines(ml1m / "movies.dat", [f"{i}::Film {i} (2000)::Drama|Sci-Fi" for i in range(6, 11)])
    stats = run_stage(movielens, ["--raw_dir", str(ml1m), "--out_dir", str(tmp_path / "o2"), "--min_rating", "3"])
    assert stats["flavour"] == "ml-1m" and stats["interactions"] == 8  # item 8 is rated 2 < 3
    assert read_jsonl(DataDir(tmp_path / "o2").items)[0]["categories"] == ["Drama", "Sci-Fi"]
    with pytest.raises(BadInputError, match="no MovieLens files"):
        run_stage(movielens, ["--raw_dir", str(tmp_path), "--out_dir", str(tmp_path / "o3")])


@pytest.fixture(scope="module")
def ml100k_dir() -> Path:
    try:
        return movielens.fetch_ml100k()
    except BadInputError as e:
        pytest.skip(f"ml-100k unavailable (pip could not download recbole): {e}")


def test_movielens_recbole_ml100k(tmp_path, ml100k_dir):
    out = tmp_path / "ml"
    stats = run_stage(movielens, ["--fetch_ml100k", "--out_dir", str(out)])  # cached by the fixture
    assert stats["source"]["ratings"] == str(ml100k_dir / "ml-100k.inter")
    assert stats["flavour"] == "recbole" and stats["malformed_lines"] == 0
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    assert stats["rows"] == {"train": 100000 - 3 * 943, "valid": 943, "test": 943}
    items = read_jsonl(DataDir(out).items)
    assert items[0]["raw_id"] == "1" and items[0]["title"] == "Toy Story"
    assert "Animation" in items[0]["categories"] and items[0]["description"] == "Released in 1995."
    check_rows(out, 10)


def test_fetch_ml100k_clear_error_without_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(BadInputError, match="pip could not download recbole"):
        movielens.fetch_ml100k(tmp_path / "cache")


def test_row_writer_blocks_do_not_change_output(tmp_path, monkeypatch):
    import functools

    from preprocess import interactions

    raw = random_dump(tmp_path / "raw", seed=3)
    argv = ["--raw_dir", str(raw), "--category", "R", "--split", "time", "--min_seq_len", "1"]
    run_stage(amazon18, argv + ["--out_dir", str(tmp_path / "a")])
    monkeypatch.setattr(interactions, "_write_rows", functools.partial(interactions._write_rows, block=3))
    run_stage(amazon18, argv + ["--out_dir", str(tmp_path / "b")])
    for s in SPLITS:
        a, b = (DataDir(tmp_path / d).inter(s).read_bytes() for d in "ab")
        assert a == b and a.count(b"\n") > 3
