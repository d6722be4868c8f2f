"""The build stage: formats of DESIGN §3, registration, CoT mixing, no leakage."""
from __future__ import annotations

import json

import pytest

from mimigenrec import prompts
from mimigenrec.io import read_json, read_jsonl, write_jsonl
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


def _eval(root, out, *extra) -> int:
    from mimigenrec.eval import evaluate

    return evaluate.main(["--data_dir", str(root), "--task", "cand_rank", "--baseline", "popularity",
                          "--output_dir", str(out), "--ks", "1,3", "--quiet", *extra])


def _pred_cands(out) -> dict:
    return {(p["user_id"], p["position"]): p["candidates"]
            for p in map(json.loads, (out / "predictions_popularity.jsonl").read_text().splitlines())}


def test_evaluation_ranks_the_candidate_lists_build_wrote(tiny_dataset, tmp_path, capsys):
    d = tiny_dataset
    _build(d, tmp_path, "--tasks", "cand_rank", "--eval_tasks", "cand_rank", "--rl_tasks", "cand_rank",
           "--num_negatives", "5", "--seed", "7")
    rec = read_json(d.root / "build_stats.json")["candidates"]
    assert rec["num_negatives"] == 5 and rec["seed"] == 7 and set(rec["files"]) == {"train", "valid", "test"}
    assert _eval(d.root, tmp_path / "ev") == 0
    rl = {(r["extra_info"]["user_id"], r["extra_info"]["position"]): r["extra_info"]["candidates"]
          for r in read_json(d.rl("test"))}
    assert _pred_cands(tmp_path / "ev") == rl  # one source of candidate lists for SFT, RL and evaluation
    meta = read_json(tmp_path / "ev" / "metrics.json")["_meta"]
    assert meta["num_negatives"] == 5 and meta["candidates"].endswith("test_n5_s7.json")
    # the SFT test prompts list the same candidates
    sft = read_json(d.sft("test"))
    assert all(all(prompts.item_ref(i) in row["input"] for i in c) for row, c in zip(sft, rl.values()))
    # a --num_negatives that disagrees with build's lists is refused, naming both ways out
    capsys.readouterr()
    assert _eval(d.root, tmp_path / "ev9", "--num_negatives", "9") == 2
    err = capsys.readouterr().err
    assert "build_stats.json" in err and "5 negatives" in err and "--candidates sample" in err
    assert _eval(d.root, tmp_path / "ev5", "--num_negatives", "5") == 0
    assert _pred_cands(tmp_path / "ev5") == rl
    # --candidates sample draws other lists (here 9 negatives), the same for every method of the run
    assert _eval(d.root, tmp_path / "s9", "--candidates", "sample", "--num_negatives", "9") == 0
    assert all(len(c) == 10 for c in _pred_cands(tmp_path / "s9").values())
    # a dataset rebuilt after build (other rows) makes build's lists stale: refused, not silently re-drawn
    rows = [json.loads(x) for x in open(d.inter("test"))]
    rows[0]["target"] = (rows[0]["target"] + 1) % 30
    write_jsonl(d.inter("test"), rows)
    capsys.readouterr()
    assert _eval(d.root, tmp_path / "stale") == 2
    assert "re-run python -m preprocess build" in capsys.readouterr().err


def test_no_recorded_lists_samples_with_a_note(tiny_dataset, tmp_path, capsys):
    d = tiny_dataset
    _build(d, tmp_path, "--tasks", "sid_seq")
    assert read_json(d.root / "build_stats.json")["candidates"] is None
    assert _eval(d.root, tmp_path / "ev", "--num_negatives", "9") == 0
    assert "records no cand_rank candidate lists" in capsys.readouterr().err
    assert all(len(c) == 10 for c in _pred_cands(tmp_path / "ev").values())


def test_query_rows_carry_the_target(tiny_dataset, tmp_path):
    from rewards import get_reward

    d = tiny_dataset
    _build(d, tmp_path, "--tasks", "query", "--eval_tasks", "query", "--rl_tasks", "query")
    items = d.load_items()
    rl = read_json(d.rl("test"))
    assert rl and all(r["extra_info"]["task"] == "query" for r in rl)
    for r in rl:
        assert r["reward_model"]["ground_truth"] == items[r["extra_info"]["target"]]["title"]
        user = r["prompt"][1]["content"]
        assert user.startswith(prompts.TASKS["query"]["instruction"])
        assert all(items[i]["title"] in user for i in r["extra_info"]["history"])
    # the target's own title is a query that retrieves it (the reward reads the target from extra_info)
    got = get_reward("retrieval_ndcg", data_dir=d.root)(
        completions=[r["reward_model"]["ground_truth"] for r in rl], reward_model=[r["reward_model"] for r in rl],
        extra_info=[r["extra_info"] for r in rl])
    assert all(g > 0 for g in got)


def test_title_tasks_build_without_semantic_ids(tiny_dataset, tmp_path, capsys):
    import yaml

    d = tiny_dataset
    d.id2sid.unlink()
    d.new_tokens.unlink()
    _build(d, tmp_path, "--tasks", "cand_rank,query", "--eval_tasks", "cand_rank", "--rl_tasks", "query")
    assert read_json(d.new_tokens) == [] and read_json(d.rl("test"))
    assert "add_tokens" not in yaml.safe_load((d.root / "sft_full.yaml").read_text())
    capsys.readouterr()
    assert main(["build", "--out_dir", str(d.root), "--tasks", "sid_seq"]) == 2  # a SID task still needs them
    assert "id2sid.json is missing" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["think", "reference"])
def test_cand_rank_cot_rows_parse_with_the_shared_parser(tiny_dataset, tmp_path, mode):
    d = tiny_dataset
    train = [json.loads(x) for x in open(d.inter("train"))]
    items = d.load_items()
    write_jsonl(d.cot, [{"user_id": r["user_id"], "position": r["position"], "input_id": input_id(r, items),
                         "draft": "d", "reasoning": f"likes steel kinds {r['position']}", "score": 0.9,
                         "kept": True, "hindsight": False} for r in train])
    _build(d, tmp_path, "--tasks", "cand_rank", "--rl_tasks", "cand_rank", "--cot_prob", "0.5", "--cot_mode", mode,
           "--cot_tasks", "cand_rank")
    sft = read_json(d.sft("train"))
    rl = read_json(d.rl("train"))
    with_cot = [r for r in sft if ("<think>" in r["output"]) or (prompts.REFERENCE_HEADER in r["input"])]
    assert len(with_cot) == round(0.5 * len(train))
    by_prompt = {r["prompt"][1]["content"]: r for r in rl}
    for row in sft:
        # every SFT target (reasoning or not) is an answer the candidate_choice reward pays +1 for
        key = row["instruction"] + "\n" + row["input"]
        cands = [int(x) for x in prompts.ITEM_REF_RE.findall(row["input"].split(prompts.CANDIDATES_HEADER)[1])]
        choice = prompts.parse_choice(row["output"], cands)
        assert choice is not None and prompts.item_ref(choice) == prompts.split_reasoning(row["output"])[1]
        if key in by_prompt:
            assert choice == by_prompt[key]["extra_info"]["target"]


def test_sid_item_history_needs_and_shows_the_item_tokens(tiny_dataset, tmp_path, capsys):
    import numpy as np

    d = tiny_dataset
    assert main(["build", "--out_dir", str(d.root), "--tasks", "sid_item_seq"]) == 2
    assert "sid --item_tokens" in capsys.readouterr().err  # the tokens are not in new_tokens.json yet
    np.save(d.emb, np.random.default_rng(0).normal(size=(30, 8)).astype("float32"))
    sid = ["sid", "--out_dir", str(d.root), "--levels", "2", "--codebook_size", "4", "--method", "rqkmeans"]
    assert main(sid) == 0
    plain = read_json(d.new_tokens)
    assert main(sid + ["--item_tokens"]) == 0  # another setting: recomputed, not "up to date"
    assert read_json(d.new_tokens) == plain + [f"<item_{i}>" for i in range(30)]
    assert read_json(d.sid_stats)["settings"]["item_tokens"] is True
    _build(d, tmp_path, "--tasks", "sid_item_seq", "--eval_tasks", "sid_item_seq", "--rl_tasks", "sid_item_seq")
    id2sid = d.load_id2sid()
    inter = read_jsonl(d.inter("test"))[0]
    row = read_json(d.sft("test"))[0]
    assert row["input"] == prompts.HISTORY_HEADER + " " + ", ".join(
        "".join(id2sid[i]) + f"<item_{i}>" for i in inter["history"])
    assert prompts.split_sid(row["output"]) == id2sid[inter["target"]]  # the answer stays the SID alone
    assert prompts.split_sid(row["input"]) == [t for i in inter["history"] for t in id2sid[i]]
    rl = read_json(d.rl("test"))[0]
    assert rl["prompt"][1]["content"] == row["instruction"] + "\n" + row["input"]
