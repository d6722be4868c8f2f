"""Checkpoint choice on valid (select_checkpoint) and the paired bootstrap comparison (compare)."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from mimigenrec.eval import compare, select_checkpoint
from mimigenrec.eval.metrics import paired_bootstrap
from mimigenrec.io import read_json
from mimigenrec.toy_data import make_dataset


def test_paired_bootstrap_against_hand_computation():
    a = [0.0, 1.0, 0.5, 0.0]
    b = [1.0, 1.0, 0.5, 0.0]
    r = paired_bootstrap(a, b, n_boot=4000, seed=1)
    assert r["delta"] == pytest.approx(0.25) and r["rel"] == pytest.approx(0.25 / 0.375)
    # the difference is 1 on one row of 4: resampled means lie on multiples of 1/4 in [0, 1]
    assert r["lo"] == pytest.approx(0.0) and 0.5 <= r["hi"] <= 0.75
    assert paired_bootstrap(a, a)["lo"] == paired_bootstrap(a, a)["hi"] == 0.0
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:3])


def _write_preds(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_pairs_rows_by_user_and_position(tmp_path):
    rng = random.Random(0)
    base = [{"user_id": u, "position": 5, "target": 1, "ranked": [1] if rng.random() < 0.3 else [2]} for u in range(200)]
    new = [dict(r, ranked=[1]) if r["user_id"] % 2 else dict(r) for r in base]
    _write_preds(tmp_path / "predictions_a.jsonl", base)
    _write_preds(tmp_path / "predictions_b.jsonl", list(reversed(new)))  # order must not matter
    r = compare.compare(tmp_path, "a", "b", "ndcg@10", n_boot=2000)
    want = sum(1 for x in base if x["user_id"] % 2 and x["ranked"] == [2]) / 200
    assert r["delta"] == pytest.approx(want) and r["lo"] > 0 and r["hi"] >= r["delta"] >= r["lo"]
    _write_preds(tmp_path / "predictions_c.jsonl", new[:150])
    assert compare.main([str(tmp_path), "a", "c"]) == 2  # different rows: refused, no traceback


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A dataset and a fake SFT output dir: three checkpoints = tiny models with different weights."""
    from mimigenrec.models.backbones import build_tiny_model

    root = tmp_path_factory.mktemp("sel")
    d = make_dataset(root / "ds", n_users=16)
    run = root / "run"
    for step, seed in ((10, 0), (20, 1), (30, 2)):
        build_tiny_model(run / f"checkpoint-{step}", new_tokens=read_json(d.new_tokens), seed=seed,
                         corpus=[it["title"] for it in d.load_items().values()])
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    for f in (run / "checkpoint-30").iterdir():  # the "final model" = the last step
        shutil.copy2(f, run / f.name)
    return d, run


def test_select_checkpoint_keeps_the_best_on_valid(run_dir):
    from safetensors.torch import load_file

    d, run = run_dir
    assert select_checkpoint.main(["--data_dir", str(d.root), "--run_dir", str(run), "--max_rows", "0",
                                   "--num_beams", "10", "--batch_size", "4"]) == 0
    rec = json.loads((run / "checkpoint_selection.json").read_text())
    scores = {c["checkpoint"]: c["ndcg@10"] for c in rec["checkpoints"]}
    assert list(scores) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert rec["selected"] == max(scores, key=lambda k: (scores[k], -list(scores).index(k)))
    assert len(set(scores.values())) > 1, "the three random models score alike; the test cannot tell them apart"
    final, best = load_file(str(run / "model.safetensors")), load_file(str(run / rec["selected"] / "model.safetensors"))
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert json.loads((run / "trainer_state.json").read_text()) == {}  # trainer state is not a model file


def test_select_checkpoint_pools_several_runs_and_fills_the_first(run_dir, tmp_path):
    """Seeds of one SFT: every checkpoint of every run on the same rows, the best copied over run 1."""
    from safetensors.torch import load_file

    d, run = run_dir
    first, second = tmp_path / "seed42", tmp_path / "seed43"
    shutil.copytree(run / "checkpoint-10", first / "checkpoint-10")
    # run 2 = the fixture's other two models (different weights, so the pool has a real choice)
    shutil.copytree(run / "checkpoint-20", second / "checkpoint-10")
    shutil.copytree(run / "checkpoint-30", second / "checkpoint-20")
    rec = select_checkpoint.select(d.root, [first, second], max_rows=0, num_beams=10, batch_size=4)
    names = [c["checkpoint"] for c in rec["checkpoints"]]
    assert names == ["seed42/checkpoint-10", "seed43/checkpoint-10", "seed43/checkpoint-20"]
    assert rec["runs"] == [str(first), str(second)]
    scores = {c["checkpoint"]: c["ndcg@10"] for c in rec["checkpoints"]}
    assert rec["selected"] == max(names, key=lambda k: (scores[k], -names.index(k)))
    src = (first if rec["selected"].startswith("seed42/") else second) / rec["selected"].split("/")[1]
    kept, best = load_file(str(first / "model.safetensors")), load_file(str(src / "model.safetensors"))
    assert all(torch.equal(kept[k], best[k]) for k in best)
    assert json.loads((first / "checkpoint_selection.json").read_text())["selected"] == rec["selected"]
    assert not (second / "checkpoint_selection.json").exists()
    # the ensemble: the winner (in run 1) and the other run's own best checkpoint
    other = "seed43" if rec["selected"].startswith("seed42/") else "seed42"
    own = max((c for c in rec["checkpoints"] if c["checkpoint"].startswith(other + "/")),
              key=lambda c: c["ndcg@10"])["checkpoint"].split("/")[1]
    assert rec["ensemble"] == f"{first}+{(second if other == 'seed43' else first) / own}"


def test_select_checkpoint_refuses_test_and_a_missing_run(run_dir, tmp_path, capsys):
    d, run = run_dir
    with pytest.raises(SystemExit):  # argparse: valid is the only choice
        select_checkpoint.main(["--data_dir", str(d.root), "--run_dir", str(run), "--split", "test"])
    assert select_checkpoint.main(["--data_dir", str(d.root), "--run_dir", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_grpo_folder_is_not_taken_for_a_model_of_other_sids(tmp_path):
    """trl_trainer.sh records one id2sid digest (a string), sft.sh a list: both read as the digests."""
    from mimigenrec.sft_config import INPUTS_FILE, trained_sids

    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / INPUTS_FILE).write_text(json.dumps({"sids": "b9c2c1a8dd8b1493d26986afc4915d8a"}))
    assert trained_sids(tmp_path / "grpo") == ["b9c2c1a8dd8b1493d26986afc4915d8a"]
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / INPUTS_FILE).write_text(json.dumps({"sids": ["x", "y"]}))
    assert trained_sids(tmp_path / "sft") == ["x", "y"]


def test_grpo_selection_keeps_step_0_unless_a_later_point_beats_it_by_2_se():
    """The best of many noisy watch points is noise: a later point replaces step 0 only when its paired
    gain is >= select_min_se standard errors (0 = the plain best)."""
    from mimigenrec.rl.reward_watch import RewardWatch

    w = RewardWatch(trainer=None, rows=[], select_best=True, min_se=2.0)
    step0 = {"step": 0, "ndcg@10": 0.12}
    noise = {"step": 400, "ndcg@10": 0.1233, "ndcg@10_delta_vs_step0": 0.0003, "ndcg@10_delta_se": 0.0028}
    real = {"step": 500, "ndcg@10": 0.13, "ndcg@10_delta_vs_step0": 0.01, "ndcg@10_delta_se": 0.004}
    worse = {"step": 600, "ndcg@10": 0.10, "ndcg@10_delta_vs_step0": -0.02, "ndcg@10_delta_se": 0.001}
    assert w.significant(step0) and not w.significant(noise) and w.significant(real) and not w.significant(worse)
    assert RewardWatch(trainer=None, rows=[], min_se=0.0).significant(noise)
