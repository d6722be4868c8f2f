"""The reasoning recipes: their launchers parse, their RL configs load, the CoT filter summary is right."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mimigenrec.io import write_jsonl
from preprocess.cot import input_id

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.parametrize("script", ["mllmrec_r1.sh", "rec_r1.sh"])
def test_recipe_launchers_parse(script):
    path = REPO / "examples" / "recipes" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("config,rewards", [("cand_rank_tiny.yaml", ["candidate_choice", "format"]),
                                            ("cand_rank_think.yaml", ["candidate_choice", "format"]),
                                            ("query_smollm2.yaml", ["retrieval_ndcg", "query_format"])])
def test_recipe_rl_configs_load(config, rewards):
    from mimigenrec.rl.config import load_config
    from rewards import get_reward

    cfg = load_config(REPO / "examples" / "rl" / config)
    assert cfg.rewards == rewards and len(cfg.reward_weights) == len(rewards)
    for r in cfg.rewards:
        get_reward(r, data_dir="unused")
    assert cfg.constrained == (config == "cand_rank_tiny.yaml")


def test_cot_filter_summary_and_unfiltered_copy(tiny_dataset, tmp_path):
    import cot_filter_stats

    d = tiny_dataset
    items = d.load_items()
    train = [json.loads(x) for x in open(d.inter("train"))][:4]
    lik = [(-1.0, -2.0), (-1.5, -2.5), (-3.0, -2.0), (-2.0, -1.0)]  # gains +1, +1, -1, -1
    write_jsonl(d.cot, [{"user_id": r["user_id"], "position": r["position"], "input_id": input_id(r, items),
                         "draft": "d", "reasoning": "two words", "score": 0.9 if w > wo else 0.1,
                         "kept": w > wo, "hindsight": False,
                         "judge_detail": {"likelihood": {"logp_with": w, "logp_without": wo, "tokens": 3}}}
                        for r, (w, wo) in zip(train, lik)])
    s = cot_filter_stats.summary(d.root)
    assert s["rows"] == 4 and s["kept"]["n"] == 2 and s["dropped"]["n"] == 2
    assert s["kept"]["gain"] == pytest.approx(1.0) and s["dropped"]["gain"] == pytest.approx(-1.0)
    assert s["kept"]["logp_with"] == pytest.approx(-1.25) and s["kept"]["reasoning_words"] == 2
    out = cot_filter_stats.make_unfiltered(d.root, tmp_path / "all")
    from preprocess.cot import load_kept_cot

    assert len(load_kept_cot(d.root)) == 2 and len(load_kept_cot(out)) == 4
