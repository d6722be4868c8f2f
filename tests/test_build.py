"""The build stage: formats of DESIGN §3, registration, CoT mixing, no leakage."""
from __future__ import annotations

import json

import pytest

from mimigenrec import prompts
from mimigenrec.io import read_json, write_jsonl
from preprocess.__main__ import main
from preprocess.cot import input_id


def _build(d, dataset_dir, *extra):
    assert main(["build", "--out_dir", str(d.root), "--dataset_dir", str(dataset_dir), "--name", "toy", *extra]) == 0


def test_formats_and_registration(tiny_dataset, tmp_path):
    d = tiny_dataset
    info_dir = tmp_path / "data"
    info_dir.mkdir()
    (info_dir / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "x.json"}}))
    _build(d, info_dir, "--tasks", "sid_seq,title2sid,sid2title,sid_seq2title,title_seq2sid,cand_rank")
    sft = read_json(d.sft("train"))
    assert all(set(r) == {"system", "instruction", "input", "output"} for r in sft)
    n_train = len(open(d.inter("train")).read().splitlines())
    assert len(sft) == 4 * n_train + 2 * 30  # four sequence tasks + two item tasks over 30 items
    rl = read_json(d.rl("test"))
    r0 = rl[0]
    assert set(r0) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert [m["role"] for m in r0["prompt"]] == ["system", "user"]
    assert r0["reward_model"]["style"] == "rule"
    assert prompts.split_sid(r0["reward_model"]["ground_truth"]) == d.load_id2sid()[r0["extra_info"]["target"]]
    assert {"split", "index", "task"} <= set(r0["extra_info"])
    # RL prompt is the SFT prompt, joined like LLaMA-Factory's alpaca converter
    sft_test = read_json(d.sft("test"))
    assert r0["prompt"][1]["content"] == sft_test[0]["instruction"] + "\n" + sft_test[0]["input"]
    info = read_json(info_dir / "dataset_info.json")
    assert "other" in info and info["toy_sft_train"]["formatting"] == "alpaca"
    assert info["toy_sft_train"]["columns"] == {"prompt": "instruction", "query": "input",
                                                "response": "output", "system": "system"}
    assert (info_dir / info["toy_sft_train"]["file_name"]).resolve() == d.sft("train").resolve()
    before = (info_dir / "dataset_info.json").read_text()
    _build(d, info_dir, "--tasks", "sid_seq")
    assert (info_dir / "dataset_info.json").read_text() == before  # idempotent
    import yaml

    cfg = yaml.safe_load((d.root / "sft_full.yaml").read_text())
    assert cfg["add_tokens"].split(",") == read_json(d.new_tokens) and cfg["dataset"] == "toy_sft_train"


def test_cand_rank_rows(tiny_dataset, tmp_path):
    d = tiny_dataset
    _build(d, tmp_path, "--tasks", "cand_rank", "--rl_tasks", "cand_rank", "--num_negatives", "5")
    for split in ("train", "test"):
        for r in read_json(d.rl(split)):
            c = r["extra_info"]["candidates"]
            assert len(c) == 6 == len(set(c)) and r["extra_info"]["target"] in c
            assert not set(c) - {r["extra_info"]["target"]} & set(r["extra_info"]["history"])
            assert r["reward_model"]["ground_truth"] == prompts.item_ref(r["extra_info"]["target"])
            for item in c:
                assert prompts.item_ref(item) in r["prompt"][1]["content"]


@pytest.mark.parametrize("mode", ["think", "reference"])
def test_cot_mixing_exact_and_seeded(tiny_dataset, tmp_path, mode):
    d = tiny_dataset
    train = [json.loads(x) for x in open(d.inter("train"))]
    items = d.load_items()
    cot = [{"user_id": r["user_id"], "position": r["position"], "input_id": input_id(r, items), "draft": "d",
            "reasoning": f"why {i}", "score": 0.9, "kept": i % 4 != 0, "hindsight": False}
           for i, r in enumerate(train)]
    write_jsonl(d.cot, cot)
    kept = sum(c["kept"] for c in cot)
    outs = []
    for seed in (1, 1, 2):
        _build(d, tmp_path, "--tasks", "sid_seq", "--cot_prob", "0.5", "--cot_mode", mode, "--seed", str(seed))
        outs.append(read_json(d.sft("train")))
    marker = "<think>" if mode == "think" else "Reference reasoning:"
    field = "output" if mode == "think" else "input"
    n_cot = sum(marker in r[field] for r in outs[0])
    assert n_cot == round(0.5 * kept)
    assert outs[0] == outs[1] and outs[0] != outs[2]
    # the reasoning attached to a row is that row's own (user, position) CoT
    by_key = {(c["user_id"], c["position"]): c["reasoning"] for c in cot}
    rl = read_json(d.rl("train"))
    for row, r in zip(outs[0], rl):
        if marker in row[field]:
            assert by_key[(r["extra_info"]["user_id"], r["extra_info"]["position"])] in row[field]
    for split in ("valid", "test"):
        assert not any("why" in r["input"] + r["output"] for r in read_json(d.sft(split)))


def test_missing_inputs_are_clear_errors(tmp_path, capsys):
    assert main(["build", "--out_dir", str(tmp_path / "nothing"), "--dataset_dir", str(tmp_path)]) == 2
    assert "items.jsonl is missing" in capsys.readouterr().err
