"""mimigenrec.eval.strata: metrics by target popularity and on repeat rows, checked by hand."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from mimigenrec.eval import strata
from mimigenrec.sequences import load_sequences
from mimigenrec.toy_data import make_dataset


def test_popularity_groups_are_contiguous_ranges_of_about_equal_size_with_ties_kept_together():
    counts = {f"r{i}": c for i, c in enumerate([0, 0, 0, 1, 1, 2, 5, 5, 9, 30])}
    groups = strata.popularity_groups(counts, 3)
    assert [(lo, hi) for lo, hi, _ in groups] == [(0, 1), (2, 5), (9, 30)]
    assert [len(k) for _, _, k in groups] == [5, 3, 2]
    assert sorted(k for _, _, keys in groups for k in keys) == sorted(counts)
    # every value tied: one group, however many are asked for
    assert [(lo, hi, len(k)) for lo, hi, k in strata.popularity_groups({"a": 3, "b": 3}, 4)] == [(3, 3, 2)]
    with pytest.raises(ValueError):
        strata.popularity_groups(counts, 0)


def _eval_dir(tmp_path, d, preds_by_method):
    out = tmp_path / "eval"
    out.mkdir()
    for m, preds in preds_by_method.items():
        (out / f"predictions_{m}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    meta = {"data_dir": str(d.root), "split": "test"}
    (out / "metrics.json").write_text(json.dumps({**{m: {} for m in preds_by_method}, "_meta": meta}))
    return out


def test_strata_split_the_rows_and_average_each_methods_metric_per_group(tmp_path):
    d = make_dataset(tmp_path / "ds", n_users=12, n_items=8, seq_len=6, seed=3)
    rows, seqs = load_sequences(d.root)
    test = rows["test"]
    pop = Counter(it for _, _, it in seqs.interactions(("train", "valid")))
    repeat = {r["user_id"] for r in test if r["target"] in seqs.prefix(r["user_id"], r["position"])}
    assert repeat and len(repeat) < len(test)  # the seeded toy data has both kinds
    # "oracle" ranks every target first; "head" ranks the catalogue by popularity for every row
    head = sorted(range(8), key=lambda i: (-pop[i], i))
    oracle = [{"user_id": r["user_id"], "position": r["position"], "target": r["target"], "ranked": [r["target"]]}
              for r in test]
    by_pop = [dict(p, ranked=head) for p in oracle]
    res = strata.strata(_eval_dir(tmp_path, d, {"oracle": oracle, "head": by_pop}), ("hr@1", "hr@10"), groups=2)

    assert res["split"] == "test" and res["rows"] == len(test)
    assert res["groups"][0]["name"] == "repeat" and res["groups"][0]["rows"] == len(repeat)
    assert sum(g["rows"] for g in res["groups"]) == len(test)
    for g in res["groups"]:
        assert g["metrics"]["oracle"]["hr@1"] == 1.0
        keys = [p for p in by_pop if (p["user_id"] in repeat) == (g["name"] == "repeat")
                and (g["popularity"] is None or g["popularity"][0] <= pop[p["target"]] <= g["popularity"][1])]
        want = sum(p["target"] == head[0] for p in keys) / len(keys)
        assert g["metrics"]["head"]["hr@1"] == pytest.approx(want)
    lo_group, hi_group = res["groups"][1:]
    assert lo_group["popularity"][1] < hi_group["popularity"][0]
    # the top-10 popularity: the mean count over the ranked items (all 8 for "head", each target for "oracle")
    assert res["top10_popularity"]["head"] == pytest.approx(sum(pop[i] for i in head) / 8)
    assert res["top10_popularity"]["oracle"] == pytest.approx(sum(pop[r["target"]] for r in test) / len(test))
    table = strata.strata_table(res)
    assert "| HR@1 | repeat" in table and "| oracle | 1.0000 |" in table


def test_strata_refuse_methods_scored_on_different_rows_with_a_clear_error(tmp_path, capsys):
    d = make_dataset(tmp_path / "ds", n_users=6)
    test, _ = load_sequences(d.root)
    preds = [{"user_id": r["user_id"], "position": r["position"], "target": r["target"], "ranked": [0]}
             for r in test["test"]]
    out = _eval_dir(tmp_path, d, {"a": preds, "b": preds[:-1]})
    assert strata.main([str(out)]) == 2
    assert "different rows" in capsys.readouterr().err
    (out / "predictions_b.jsonl").unlink()
    assert strata.main([str(out)]) == 2
    assert "predictions_b.jsonl: missing" in capsys.readouterr().err
