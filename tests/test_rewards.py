"""Every built-in reward against hand-computed values, malformed completions included."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from mimigenrec.io import DataDir, write_jsonl
from rewards import completion_text, get_reward, list_rewards

SID = "<a_1><b_2><c_3>"


def rm(*truths):
    return [{"style": "rule", "ground_truth": t} for t in truths]


def call(name, completions, truths, **kw):
    fn = get_reward(name, **{k: kw.pop(k) for k in ("data_dir", "top_k", "cache_dir") if k in kw})
    return fn(prompts=[None] * len(completions), completions=completions, completion_ids=None,
              reward_model=rm(*truths), **kw)


MALFORMED = ["", "   ", "<think>unclosed " + SID, "garbage text", SID + " extra", "<a_1><b_2>",
             "<think>a</think><think>b</think>" + SID, "<think><think>x</think></think>" + SID]


def test_registry_lists_all_builtins():
    assert list_rewards() == sorted(["rule", "partial_match", "ndcg_rank", "ndcg_rank_hit", "listwise", "format", "think",
                                     "candidate_choice", "retrieval_ndcg", "recpo", "think_only", "query_format", "cf_rank",
                                     "cf_fused", "cf_logp", "teacher_kl", "teacher_gain"])
    for name in list_rewards():
        fn = get_reward(name, data_dir="unused")
        assert fn.__name__ == name and fn.__doc__ and "r =" in fn.__doc__
    with pytest.raises(KeyError, match="unknown reward"):
        get_reward("nope")


def test_user_reward_from_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def length_bonus(prompts=None, completions=None, completion_ids=None, *, scale=1.0, **kw):\n"
                 "    return [scale * len(c) for c in completions]\n")
    fn = get_reward(f"{f}:length_bonus", scale=2.0, data_dir="ignored")
    assert fn.__name__ == "length_bonus"
    assert fn(completions=["ab", "abc"]) == [4.0, 6.0]
    with pytest.raises(AttributeError, match="no attribute"):
        get_reward(f"{f}:missing")
    with pytest.raises(FileNotFoundError):
        get_reward(f"{tmp_path}/absent.py:f")


def test_completion_text_handles_chat_messages():
    assert completion_text([{"role": "assistant", "content": SID}]) == SID
    assert completion_text(SID) == SID and completion_text(None) == ""


@pytest.mark.parametrize("conversational", [False, True])
def test_rule(conversational):
    comps = [SID, "<think>because</think>" + SID, "<a_1><b_2><c_4>", SID + " extra", *MALFORMED[:4]]
    if conversational:
        comps = [[{"role": "assistant", "content": c}] for c in comps]
    assert call("rule", comps, *[[SID] * len(comps)]) == [1, 1, 0, 0, 0, 0, 0, 0]


def test_rule_without_ground_truth_is_none():
    fn = get_reward("rule")
    assert fn(completions=[SID], reward_model=[{"style": "rule"}]) == [None]


def test_partial_match():
    comps = [SID, "<a_1><b_2><c_9>", "<a_1><b_7><c_3>", "<a_5><b_2><c_3>", "<a_1>", "<a_1><b_2><c_3> junk", "",
             "<think>x</think><a_1><b_2><c_0>", "[ITEM_3]"]
    want = [1, 2 / 3, 1 / 3, 0, 1 / 3, 0, 0, 2 / 3, 0]
    assert call("partial_match", comps, *[[SID] * len(comps)]) == pytest.approx(want)
    # item-reference truths: all or nothing
    assert call("partial_match", ["[ITEM_3]", "[ITEM_4]"], ["[ITEM_3]", "[ITEM_3]"]) == [1, 0]


def test_ndcg_rank():
    comps = ["<a_0><b_0><c_0>", SID, "<a_2><b_2><c_2>", "junk"]
    got = call("ndcg_rank", comps, [SID] * 4, beam_rank=[0, 1, 2, 3])
    assert got == pytest.approx([-1.0, 1.0, -1 / math.log2(4), -1 / math.log2(5)])
    with pytest.raises(ValueError, match="beam"):
        call("ndcg_rank", comps, [SID] * 4)


def test_ndcg_rank_hit_zeroes_groups_without_a_hit():
    comps = ["<a_0><b_0><c_0>", SID, "<a_2><b_2><c_2>", "<a_0><b_0><c_0>", "<a_2><b_2><c_2>"]
    got = call("ndcg_rank_hit", comps, [SID] * 5, beam_rank=[0, 1, 2, 0, 1])
    assert got == pytest.approx([-1.0, 1.0, -1 / math.log2(4), 0.0, 0.0])


def test_listwise_is_hit_minus_group_softmax():
    comps = ["<a_0><b_0><c_0>", SID, "<a_2><b_2><c_2>", SID, "<a_0><b_0><c_0>"]
    truths = [SID] * 3 + ["<a_0><b_0><c_0>"] * 2  # two groups: ranks 0,1,2 and 0,1
    logp = [-1.0, -2.0, -3.0, -0.5, -0.5]
    got = call("listwise", comps, truths, beam_rank=[0, 1, 2, 0, 1], beam_logp=logp)
    z = sum(math.exp(x) for x in logp[:3])
    want = [-math.exp(-1) / z, 1 - math.exp(-2) / z, -math.exp(-3) / z, -0.5, 0.5]
    assert got == pytest.approx(want)
    assert sum(got[:3]) == pytest.approx(0.0)  # one hit per group: the advantages need no centring
    with pytest.raises(ValueError, match="beam"):
        call("listwise", comps, truths, beam_rank=[0, 1, 2, 0, 1])


def test_format():
    comps = [SID, "  " + SID + "\n", "<think>r</think>" + SID, "<think></think>" + SID, "[ITEM_3]", *MALFORMED]
    want = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # [ITEM_3] is the wrong kind for a SID truth; <a_1><b_2> too short
    assert call("format", comps, [SID] * len(comps)) == want
    assert call("format", ["[ITEM_3]", "<think>x</think>[ITEM_12]", "[ITEM_3][ITEM_4]", "[ITEM_x]", SID],
                ["[ITEM_1]"] * 5) == [1, 1, 0, 0, 0]


def test_think():
    comps = ["<think>because</think>" + SID, "<think> \n </think>" + SID, SID, "<think>why</think>",
             "<think>why</think>" + SID + " tail", *MALFORMED]
    assert call("think", comps, [SID] * len(comps)) == [1, 0, 0, 0, 0] + [0] * len(MALFORMED)


def test_candidate_choice():
    infos = {"target": 5, "candidates": [2, 5, 9]}
    comps = ["[ITEM_5]", "<think>[ITEM_2] or [ITEM_5]?</think>[ITEM_5]", "[ITEM_2]", "[ITEM_7]", "[ITEM_2][ITEM_5]",
             "[ITEM_5] [ITEM_5]", "", "pick five", "<think>unclosed [ITEM_5]", "I choose [ITEM_9].",
             "<think>a</think>[ITEM_5]</think>", "I pick [ITEM_5]", " [ITEM_5]\n", "[ITEM_05]"]
    got = get_reward("candidate_choice")(completions=comps, reward_model=rm(*["[ITEM_5]"] * len(comps)),
                                         extra_info=[infos] * len(comps))
    # extra words and repeated items are invalid (-1), exactly as evaluation counts them as misses
    assert got == [1, 1, 0, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, -1]
    # the target also comes from extra_info when the truth is not an item reference
    assert get_reward("candidate_choice")(completions=["[ITEM_5]"], reward_model=rm(SID),
                                          extra_info=[infos]) == [1]


@pytest.fixture
def catalog(tmp_path):
    d = DataDir(tmp_path / "ds")
    docs = ["red digital multimeter", "blue safety goggles", "soldering iron station",
            "digital caliper stainless steel", "stainless steel ruler", "brass valve", "brass valve"]
    write_jsonl(d.items, [{"item_id": i, "title": t, "description": "lab tool" if i == 4 else ""}
                          for i, t in enumerate(docs)])
    return d


def test_retrieval_ndcg(catalog):
    comps = ["digital caliper stainless steel", "steel ruler", "goggles", "", "<think>q</think>caliper",
             [{"role": "assistant", "content": "caliper steel"}], "brass valve"]
    infos = [{"target": 3}] * 6 + [{"target": 6}]
    got = call("retrieval_ndcg", comps, [SID] * len(comps), data_dir=catalog.root, extra_info=infos)
    # "steel ruler": item 4 matches both words, item 3 one -> rank 1; "goggles" misses item 3;
    # "brass valve": items 5 and 6 tie -> pessimistic rank 1
    assert got == pytest.approx([1.0, 1 / math.log2(3), 0.0, 0.0, 1.0, 1.0, 1 / math.log2(3)])
    assert call("retrieval_ndcg", ["steel ruler"], [SID], data_dir=catalog.root, top_k=1,
                extra_info=[{"target": 3}]) == [0.0]
    # description text is indexed too
    assert call("retrieval_ndcg", ["lab tool"], [SID], data_dir=catalog.root,
                extra_info=[{"target": 4}]) == [1.0]


def test_retrieval_index_built_once(catalog):
    from rewards import retrieval

    a = retrieval.catalog_index(catalog.root)
    assert retrieval.catalog_index(catalog.root) is a
    with pytest.raises(ValueError, match="data_dir"):
        get_reward("retrieval_ndcg")(completions=["x"], extra_info=[{"target": 1}])


def test_shared_parser_cases():
    from mimigenrec import prompts

    refs = {"[ITEM_5]": [5], "<think>[ITEM_1]?</think> [ITEM_3], [ITEM_1]; [ITEM_2]": [3, 1, 2],
            "I pick [ITEM_5]": None, "[ITEM_5] [ITEM_5]": None, "[ITEM_05]": None, "": None,
            "<think>a</think><think>b</think>[ITEM_5]": None, "<think>unclosed [ITEM_5]": None,
            "<think></think>[ITEM_5]": [5], "[ITEM_5]</think>": None}
    for text, want in refs.items():
        assert prompts.parse_item_refs(text) == want, text
    assert prompts.parse_choice("[ITEM_5]", [2, 5]) == 5 and prompts.parse_choice("[ITEM_5]", [2]) is None
    assert prompts.parse_choice("[ITEM_2], [ITEM_5]") is None and prompts.parse_choice("[ITEM_7]") == 7
    assert prompts.split_reasoning("  <think> why </think>  ans ") == ("why", "ans")
    assert prompts.split_reasoning("<think>a<think>b</think></think>x") is None
    queries = {"<think>she likes steel</think>steel  ruler\n": "steel ruler", "caliper": "caliper",
               "<think>only thinking</think>": None, "<think>cut off": None, "[ITEM_3]": None, "  ": None}
    for text, want in queries.items():
        assert prompts.parse_query(text) == want, text


def test_query_format():
    comps = ["steel ruler", "<think>x</think>steel ruler", "<think>x</think>", "<think>x", "[ITEM_2]",
             " ".join(["w"] * 33), "<think>a</think>q</think>"]
    assert get_reward("query_format")(completions=comps) == [1, 1, 0, 0, 0, 0, 0]


def test_retrieval_reads_the_query_with_the_shared_parser(catalog):
    # an unclosed think block is a malformed completion: 0, however well its words match
    got = call("retrieval_ndcg", ["<think>digital caliper stainless steel", "<think>x</think>caliper"],
               [SID] * 2, data_dir=catalog.root, extra_info=[{"target": 3}] * 2)
    assert got == [0.0, 1.0]


def test_ranked_list_places_the_target_at_its_reward_rank(catalog):
    from rewards import retrieval

    index = retrieval.catalog_index(catalog.root)
    for query, target in [("brass valve", 6), ("brass valve", 5), ("steel ruler", 3), ("steel", 4),
                          ("goggles", 3), ("", 1)]:
        ranked = index.ranked(query, target, 10)
        rank = index.rank(query, target)
        assert (ranked.index(target) if target in ranked else None) == rank, (query, target)
        assert len(set(ranked)) == len(ranked)


def test_cf_rank_is_the_sasrec_rank_of_the_answer(tmp_path):
    """cf_rank = 1 on a hit, else 1/log2(rank + 2) - 1 with rank the answer's place among the
    evaluated items under the SASRec reward model (the test-split baseline's, cached in DATA/baselines)."""
    import torch

    from mimigenrec import prompts
    from mimigenrec.io import read_jsonl
    from mimigenrec.toy_data import make_dataset
    from rewards.collaborative import _reward_model

    d = make_dataset(tmp_path / "ds")
    id2sid = d.load_id2sid()
    rows = list(read_jsonl(d.inter("train")))[:3]
    items = sorted(id2sid)
    comps = [prompts.sid_string(id2sid[r["target"]]) for r in rows] + [prompts.sid_string(id2sid[i]) for i in items[:3]]
    infos = [{"user_id": r["user_id"], "position": r["position"], "target": r["target"]} for r in rows * 2]
    got = call("cf_rank", comps + ["not an item"], [None] * 7, data_dir=str(d.root), extra_info=infos + [infos[0]])
    scorer, _, universe = _reward_model(str(d.root.resolve()))
    assert list((d.root / "baselines").glob("sasrec_ce_*.pt"))  # trained once, cached beside the data
    s = scorer.score_rows(rows)
    want = []
    for k, info in enumerate(infos):
        item = items[k - 3] if k >= 3 else info["target"]
        rank = int((s[k % 3][universe] > s[k % 3][item]).sum())
        want.append(1.0 if item == info["target"] else 1 / math.log2(rank + 2) - 1)
    assert got[:6] == pytest.approx(want) and got[6] == -1.0
    assert call("cf_rank", [comps[0]], [None], data_dir=str(d.root), extra_info=[{}]) == [None]
    assert torch.equal(universe, torch.tensor(sorted(universe.tolist())))
    # cf_fused: a wrong answer's reward is the mean of its SASRec and beam-rank gains, minus 1
    beams = [0, 1, 2, 3, 4, 5, 0]
    fused = call("cf_fused", comps + ["not an item"], [None] * 7, data_dir=str(d.root), extra_info=infos + [infos[0]],
                 beam_rank=beams)
    want_f = [1.0 if w == 1.0 else ((w + 1) + 1 / math.log2(b + 2)) / 2 - 1 for w, b in zip(want, beams)]
    assert fused[:6] == pytest.approx(want_f) and fused[6] == -1.0
    with pytest.raises(ValueError, match="beam"):
        call("cf_fused", comps[:1], [None], data_dir=str(d.root), extra_info=infos[:1])


def test_cf_logp_is_the_log_softmax_of_the_valid_protocol_sasrec(tmp_path):
    """cf_logp = log of SASRec's softmax over the ranked items at the answer, from the SASRec that
    evaluate.sh trains to score valid (stopped on held-out train rows, not the test split's), the
    lowest item's for a non-item, None without a user; with teacher_kl it sums to the product of experts."""
    from mimigenrec import prompts
    from mimigenrec.io import read_jsonl
    from mimigenrec.toy_data import make_dataset
    from rewards.collaborative import _reward_model

    d = make_dataset(tmp_path / "ds")
    id2sid = d.load_id2sid()
    rows = list(read_jsonl(d.inter("train")))[:2]
    items = sorted(id2sid)[:4]
    comps = [prompts.sid_string(id2sid[i]) for i in items] * 2 + ["not an item"]
    infos = [{"user_id": r["user_id"], "position": r["position"], "target": r["target"]} for r in rows for _ in items]
    got = call("cf_logp", comps, [None] * 9, data_dir=str(d.root), extra_info=infos + [infos[0]])
    scorer, _, universe = _reward_model(str(d.root.resolve()), None, "valid")
    test_scorer, _, _ = _reward_model(str(d.root.resolve()), None, "test")
    assert scorer is not test_scorer and scorer.info.get("early_stopping_rows", "").startswith("each user's last train row")
    logp = scorer.score_rows(rows)[:, universe].log_softmax(-1)
    pos = {int(i): k for k, i in enumerate(universe)}
    want = [float(logp[k // 4, pos[items[k % 4]]]) for k in range(8)]
    assert got[:8] == pytest.approx(want, abs=1e-6) and got[8] == pytest.approx(float(logp[0].min()))
    assert all(x < 0 for x in got)
    assert call("cf_logp", comps[:1], [None], data_dir=str(d.root), extra_info=[{}]) == [None]


def test_cf_rank_caches_its_reward_model_in_cache_dir_when_the_data_is_read_only(tmp_path, monkeypatch):
    """A read-only data folder: the SASRec reward model is trained once and cached under the run's
    cache_dir/baselines (the trainer passes its output_dir), nothing is written beside the data."""
    import os

    from mimigenrec import prompts
    from mimigenrec.io import read_jsonl
    from mimigenrec.toy_data import make_dataset

    d = make_dataset(tmp_path / "ro")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode == os.W_OK and Path(p).resolve() == d.root.resolve()
                        else real_access(p, mode, **kw))
    row = next(iter(read_jsonl(d.inter("train"))))
    info = [{"user_id": row["user_id"], "position": row["position"], "target": row["target"]}]
    comp = [prompts.sid_string(d.load_id2sid()[row["target"]])]
    run = tmp_path / "run"
    assert call("cf_rank", comp, [None], data_dir=str(d.root), cache_dir=str(run), extra_info=info) == [1.0]
    assert list((run / "baselines").glob("sasrec_ce_*.pt")) and not (d.root / "baselines").exists()
