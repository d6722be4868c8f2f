"""Metrics against hand-computed cases, tie-breaking, candidate sampling and sequence rebuilding."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from mimigenrec.eval.candidates import cached_candidates, sample_candidates
from mimigenrec.eval.metrics import (
    aggregate,
    dedupe,
    markdown_table,
    rank_by_score,
    row_metrics,
    target_rank,
)
from mimigenrec.io import BadInputError
from mimigenrec.sequences import UserSequences, splits_before


# ----------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("ranked,target,expected_rank", [
    ([7, 3, 9], 7, 0),
    ([7, 3, 9], 9, 2),
    ([7, 7, 3], 3, 1),             # duplicates removed before ranking
    ([-1, None, 5], 5, 0),         # invalid answers dropped
    ([1, 2], 9, None),             # target absent
    ([], 4, None),                 # empty prediction
])
def test_target_rank(ranked, target, expected_rank):
    assert target_rank(ranked, target) == expected_rank


def test_row_metrics_hand_computed():
    m = row_metrics([4, 8, 15, 16], 15, ks=(1, 3, 10))
    assert m == {"hr@1": 0.0, "ndcg@1": 0.0, "hr@3": 1.0, "ndcg@3": pytest.approx(0.5),
                 "hr@10": 1.0, "ndcg@10": pytest.approx(0.5)}  # 1/log2(2+2) = 0.5
    top = row_metrics([15], 15, ks=(1,))
    assert top == {"hr@1": 1.0, "ndcg@1": 1.0}


def test_k_larger_than_list_and_duplicates():
    m = row_metrics([2, 2, 2, 9], 9, ks=(2, 50))   # dedupe -> [2, 9]: rank 1
    assert m["hr@2"] == 1.0 and m["ndcg@2"] == pytest.approx(1 / math.log2(3))
    assert m["hr@50"] == 1.0 and m["ndcg@50"] == pytest.approx(1 / math.log2(3))


@pytest.mark.parametrize("ranked", [[], [1, 2, 3], [-1, -1]])
def test_miss_is_zero(ranked):
    assert set(row_metrics(ranked, 99, ks=(1, 5, 50)).values()) == {0.0}


def test_aggregate_mean_and_empty():
    preds = [{"target": 1, "ranked": [1, 2]}, {"target": 2, "ranked": [1, 2]},
             {"target": 3, "ranked": []}, {"target": 4, "ranked": [5, 6, 7, 4]}]
    m = aggregate(preds, ks=(1, 2, 4))
    assert m["n_rows"] == 4
    assert m["hr@1"] == pytest.approx(1 / 4)
    assert m["hr@2"] == pytest.approx(2 / 4)
    assert m["hr@4"] == pytest.approx(3 / 4)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert m["ndcg@4"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 4)
    empty = aggregate([], ks=(1,))
    assert empty == {"hr@1": 0.0, "ndcg@1": 0.0, "n_rows": 0}


def test_rank_by_score_breaks_ties_by_item_id():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    ids = [3, 1, 0, 2]
    assert rank_by_score(scores, ids, 4) == [[0, 1, 3, 2], [0, 1, 2, 3]]
    assert rank_by_score(scores, ids, 2) == [[0, 1], [0, 1]]
    assert rank_by_score(scores, ids, 10)[0] == [0, 1, 3, 2]      # k beyond the list


def test_dedupe_keeps_first_occurrence():
    assert dedupe([3, 1, 3, -1, 2, 1]) == [3, 1, 2]


def test_markdown_table():
    t = markdown_table({"pop": {"hr@1": 0.25, "ndcg@1": 0.25, "n_rows": 4}}, (1,))
    assert t.splitlines()[0] == "| method | HR@1 | NDCG@1 | rows |"
    assert t.splitlines()[2] == "| pop | 0.2500 | 0.2500 | 4 |"


# ----------------------------------------------------------------------------- candidates
def _rows(n_users=30, n_items=60, seed=1):
    rng = random.Random(seed)
    seqs, rows = {}, []
    for u in range(n_users):
        seq = [rng.randrange(n_items) for _ in range(rng.randint(3, 12))]
        seqs[u] = seq
        for p in range(1, len(seq)):
            rows.append({"user_id": u, "position": p, "history": seq[max(0, p - 3):p], "target": seq[p]})
    return seqs, rows, list(range(n_items))


def test_candidates_exclude_history_and_hold_target_once():
    seqs, rows, pool = _rows()
    cands = sample_candidates(rows, pool, 9, seed=0, exclude=seqs)
    assert len(cands) == len(rows)
    positions = set()
    for r, c in zip(rows, cands):
        assert len(c) == 10 and len(set(c)) == 10
        assert c.count(r["target"]) == 1
        earlier = set(seqs[r["user_id"]][: r["position"]]) - {r["target"]}
        assert not earlier & set(c), "a candidate is an earlier item of the user"
        positions.add(c.index(r["target"]))
    assert len(positions) > 3, "the target should not sit at a fixed position"


def test_candidates_without_exclude_still_skip_row_history():
    seqs, rows, pool = _rows()
    for r, c in zip(rows, sample_candidates(rows, pool, 20, seed=3)):
        assert not (set(r["history"]) - {r["target"]}) & set(c)


def test_candidates_seeded_per_row_independent_of_order():
    seqs, rows, pool = _rows()
    a = sample_candidates(rows, pool, 9, seed=5, exclude=seqs)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    b = sample_candidates([rows[i] for i in order], pool, 9, seed=5, exclude=seqs)
    assert [a[i] for i in order] == b
    assert sample_candidates(rows[:4], pool, 9, seed=5, exclude=seqs) == a[:4]
    assert sample_candidates(rows, pool, 9, seed=6, exclude=seqs) != a


def test_candidates_dense_pool_and_too_small_pool():
    rows = [{"user_id": 0, "position": 3, "history": [0, 1, 2], "target": 3}]
    (c,) = sample_candidates(rows, range(8), 4, seed=0)   # exactly 4 free items: 4..7
    assert sorted(c) == [3, 4, 5, 6, 7]
    with pytest.raises(BadInputError):
        sample_candidates(rows, range(8), 5, seed=0)


def test_candidate_cache_roundtrip(tmp_path, monkeypatch):
    import mimigenrec.eval.candidates as cands

    seqs, rows, pool = _rows()
    a = cached_candidates(tmp_path, "test", rows, pool, 9, 0, exclude=seqs)
    path = tmp_path / "candidates" / "test_n9_s0.json"
    digest = json.loads(path.read_text())["inputs"]
    with monkeypatch.context() as m:  # the same inputs: read from the cache, not drawn again
        m.setattr(cands, "sample_candidates", lambda *a, **k: pytest.fail("drawn again despite a valid cache"))
        assert cached_candidates(tmp_path, "test", rows, pool, 9, 0, exclude=seqs) == a
    # other inputs (a dataset rebuilt in the same folder, here a larger item pool): drawn again, never reused
    cached_candidates(tmp_path, "test", rows, [*pool, max(pool) + 1, max(pool) + 2], 9, 0, exclude=seqs)
    assert json.loads(path.read_text())["inputs"] != digest


# ----------------------------------------------------------------------------- sequences
def test_user_sequences_rebuild_full_sequences():
    seqs, rows, _ = _rows()
    by_split = {"train": [], "valid": [], "test": []}
    for r in rows:
        n = len(seqs[r["user_id"]])
        split = "test" if r["position"] == n - 1 else "valid" if r["position"] == n - 2 else "train"
        by_split[split].append(r)
    us = UserSequences(by_split)
    assert us.seqs == seqs
    u = rows[0]["user_id"]
    assert us.prefix(u, 2) == seqs[u][:2]
    train_known = list(us.interactions(("train",)))
    assert all(p <= len(seqs[uu]) - 3 for uu, p, _ in train_known)
    assert len(list(us.interactions(("train", "valid", "test")))) == sum(map(len, seqs.values()))
    s, flags = us.training_sequences(("train",))[u]
    assert s == seqs[u][: len(seqs[u]) - 2] and flags[0] is False and all(flags[1:])
    assert splits_before("test") == ("train", "valid") and splits_before("valid") == ("train",)


def test_user_sequences_conflict_names_the_row():
    rows = {"train": [{"user_id": 0, "position": 2, "history": [1, 2], "target": 3, "_where": "a.jsonl:1"}],
            "test": [{"user_id": 0, "position": 3, "history": [9, 3], "target": 4, "_where": "b.jsonl:7"}]}
    with pytest.raises(BadInputError, match="b.jsonl:7"):
        UserSequences(rows)
