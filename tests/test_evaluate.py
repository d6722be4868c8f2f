"""End to end: ``python -m mimigenrec.eval.evaluate`` on a tiny synthetic dataset (baselines, tiny model,
sharding, resume)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mimigenrec.eval import evaluate
from mimigenrec.eval.baselines import SASRecConfig
from mimigenrec.eval.baselines.sasrec import train_sasrec
from mimigenrec.sequences import load_sequences

REPO = Path(__file__).resolve().parents[1]
N_ITEMS, N_USERS, MAX_HIST = 32, 48, 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def sid_of(i: int) -> list[str]:
    return [f"<a_{i // 8}>", f"<b_{(i // 2) % 4}>", f"<c_{i % 2}>"]


def make_sequences(seed: int = 0) -> dict[int, list[int]]:
    """Users walk the item ring mostly one step at a time (a pattern SASRec can learn), with noise."""
    rng = random.Random(seed)
    seqs = {}
    for u in range(N_USERS):
        cur = rng.randrange(N_ITEMS)
        seq = [cur]
        for _ in range(rng.randint(3, 9)):
            cur = (cur + 1) % N_ITEMS if rng.random() < 0.85 else rng.randrange(N_ITEMS)
            seq.append(cur)
        seqs[u] = seq
    return seqs


def write_dataset(root: Path, seqs: dict[int, list[int]]) -> Path:
    """A preprocessed dir as docs/formats.md describes it (leave-one-out, history capped)."""
    (root / "inter").mkdir(parents=True)
    with open(root / "items.jsonl", "w") as f:
        f.writelines(json.dumps({"item_id": i, "raw_id": f"I{i}", "title": f"widget number {i}", "description": "",
                                "brand": "", "categories": [], "image_urls": []}) + "\n" for i in range(N_ITEMS))
    files = {s: open(root / "inter" / f"{s}.jsonl", "w") for s in ("train", "valid", "test")}
    for u, seq in seqs.items():
        n = len(seq)
        for p in range(1, n):
            split = "test" if p == n - 1 else "valid" if p == n - 2 else "train"
            row = {"user_id": u, "history": seq[max(0, p - MAX_HIST):p], "target": seq[p],
                   "timestamp": 1000 * u + p, "position": p}
            files[split].write(json.dumps(row) + "\n")
    for f in files.values():
        f.close()
    (root / "id2sid.json").write_text(json.dumps({str(i): sid_of(i) for i in range(N_ITEMS)}))
    toks = sorted({t for i in range(N_ITEMS) for t in sid_of(i)})
    (root / "new_tokens.json").write_text(json.dumps(toks))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict[int, list[int]]]:
    seqs = make_sequences()
    return write_dataset(tmp_path_factory.mktemp("ds"), seqs), seqs


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, data) -> Path:
    from mimigenrec.models.backbones import build_tiny_model

    toks = json.loads((data[0] / "new_tokens.json").read_text())
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), new_tokens=toks, vocab_size=400)


def run_eval(*args: str) -> dict:
    assert evaluate.main([*map(str, args), "--quiet"]) == 0
    out = Path(args[list(args).index("--output_dir") + 1])
    return json.loads((out / "metrics.json").read_text())


def read_preds(out: Path, method: str) -> list[dict]:
    return [json.loads(x) for x in (out / f"predictions_{method}.jsonl").read_text().splitlines()]


SAS = ("--sasrec_epochs", "30", "--sasrec_patience", "5", "--sasrec_dropout", "0.1", "--sasrec_batch_size", "16")


# ----------------------------------------------------------------------------- baselines
def test_popularity_matches_independent_count(data, tmp_path):
    root, seqs = data
    m = run_eval("--data_dir", root, "--split", "test", "--baseline", "popularity", "--output_dir", tmp_path,
                 "--num_beams", "50", "--ks", "1,5,10")
    assert set(m) == {"popularity", "_meta"}
    assert m["popularity"]["n_rows"] == N_USERS and "hr@10" in m["popularity"] and "ndcg@5" in m["popularity"]
    counts = Counter(it for s in seqs.values() for it in s[:-1])   # train + valid = all but the last item
    expected = sorted(range(N_ITEMS), key=lambda i: (-counts[i], i))
    preds = read_preds(tmp_path, "popularity")
    assert all(p["ranked"] == expected for p in preds)
    hits = sum(s[-1] in expected[:10] for s in seqs.values())
    assert m["popularity"]["hr@10"] == pytest.approx(hits / N_USERS)
    valid = run_eval("--data_dir", root, "--split", "valid", "--baseline", "popularity",
                     "--output_dir", tmp_path / "v", "--ks", "1,5,10")
    vcounts = Counter(it for s in seqs.values() for it in s[:-2])
    vexpected = sorted(range(N_ITEMS), key=lambda i: (-vcounts[i], i))
    assert read_preds(tmp_path / "v", "popularity")[0]["ranked"] == vexpected
    assert valid["_meta"]["split"] == "valid"


def test_sasrec_deterministic_and_learns(data):
    root, _ = data
    rows, seqs = load_sequences(root)
    cfg = SASRecConfig(epochs=6, patience=0, dropout=0.1, batch_size=16, hidden=32, seed=3)
    torch.set_num_threads(1)
    m1, info1 = train_sasrec(seqs, N_ITEMS, cfg, rows["valid"], seqs.all_items(), progress=False)
    m2, _ = train_sasrec(seqs, N_ITEMS, cfg, rows["valid"], seqs.all_items(), progress=False)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert info1["epochs_run"] == 6 and info1["history"][-1]["loss"] < info1["history"][0]["loss"]


def test_baselines_and_candidates_end_to_end(data, tmp_path):
    root, seqs = data
    m = run_eval("--data_dir", root, "--baseline", "popularity", "--baseline", "sasrec", *SAS,
                 "--output_dir", tmp_path, "--ks", "1,5,10")
    assert m["sasrec"]["n_rows"] == N_USERS
    # the ring pattern is easy: SASRec must beat popularity clearly
    assert m["sasrec"]["hr@5"] > m["popularity"]["hr@5"] + 0.2, m
    assert list((root / "baselines").glob("sasrec_ce_*.pt")), "checkpoint cached under O/baselines"
    for p in read_preds(tmp_path, "sasrec"):
        assert len(p["ranked"]) == N_ITEMS and len(set(p["ranked"])) == N_ITEMS
    c = run_eval("--data_dir", root, "--task", "cand_rank", "--num_negatives", "9", "--baseline", "popularity",
                 "--baseline", "sasrec", *SAS, "--output_dir", tmp_path / "c", "--ks", "1,5,10")
    assert c["_meta"]["task"] == "cand_rank" and c["popularity"]["hr@10"] == 1.0   # 10 candidates
    assert (root / "candidates" / "test_n9_s0.json").is_file()
    for p in read_preds(tmp_path / "c", "sasrec"):
        u, pos = p["user_id"], p["position"]
        assert sorted(p["ranked"]) == sorted(p["candidates"]) and p["target"] in p["candidates"]
        assert not set(seqs[u][:pos]) - {p["target"]} & set(p["candidates"])


# ----------------------------------------------------------------------------- tiny model
@pytest.mark.parametrize("task,extra", [("sid_seq", ()), ("title_seq2sid", ()),
                                        ("cand_rank", ("--num_negatives", "9"))])
def test_tiny_model_predictions_are_valid_items(data, tiny_model, tmp_path, task, extra):
    root, seqs = data
    m = run_eval("--data_dir", root, "--model", f"tiny={tiny_model}", "--no_baselines", "--task", task, *extra,
                 "--num_beams", "10", "--ks", "1,5,10", "--max_rows", "6", "--batch_size", "4",
                 "--output_dir", tmp_path, "--device", "cpu")
    assert set(m) == {"tiny", "_meta"} and m["tiny"]["n_rows"] == 6
    preds = read_preds(tmp_path, "tiny")
    assert len(preds) == 6
    for p in preds:
        assert len(p["ranked"]) == 10 and len(set(p["ranked"])) == 10
        allowed = set(p["candidates"]) if task == "cand_rank" else set(range(N_ITEMS))
        assert set(p["ranked"]) <= allowed


def test_think_mode_parses_free_generation(data, tiny_model, tmp_path):
    root, _ = data
    m = run_eval("--data_dir", root, "--model", f"tiny={tiny_model}", "--no_baselines", "--task", "cand_rank",
                 "--num_negatives", "9", "--think", "--max_new_tokens", "6", "--ks", "1,5", "--max_rows", "4",
                 "--output_dir", tmp_path, "--device", "cpu")
    assert m["tiny"]["n_rows"] == 4
    for p in read_preds(tmp_path, "tiny"):
        assert isinstance(p["completion"], str)
        choice = evaluate.prompts.parse_choice(p["completion"], p["candidates"])
        assert p["ranked"] == ([] if choice is None else [choice])


def test_think_scoring_agrees_with_the_candidate_choice_reward(data, tiny_model, tmp_path):
    """The reward pays +1 exactly for the completions evaluation counts as hits (one shared parser)."""
    from rewards import get_reward

    root, _ = data
    args = evaluate.build_parser().parse_args(["--data_dir", str(root), "--task", "cand_rank", "--think",
                                               "--num_negatives", "9", "--output_dir", str(tmp_path)])
    evaluate.resolve_candidates(args)
    args.methods = ["model:x"]
    ranker = evaluate.ModelRanker("m", str(tiny_model), evaluate.load_eval_data(args), args, "cpu")
    cands, target = [2, 5, 9], 5
    comps = ["[ITEM_5]", "I pick [ITEM_5]", "[ITEM_5] [ITEM_5]", "<think>[ITEM_2]?</think>[ITEM_5]", "[ITEM_2]",
             "[ITEM_5], [ITEM_2]", "<think>no answer", "[ITEM_7]", "[ITEM_5].", "<think>x</think>[ITEM_5]</think>"]
    reward = get_reward("candidate_choice")(completions=comps, reward_model=[{"ground_truth": "[ITEM_5]"}] * len(comps),
                                            extra_info=[{"target": target, "candidates": cands}] * len(comps))
    hits = [ranker.parse(c, cands)[:1] == [target] for c in comps]
    assert [r == 1 for r in reward] == hits == [True, False, False, True, False, False, False, False, False, False]
    assert [r == -1 for r in reward] == [ranker.parse(c, cands) == [] for c in comps]


def test_query_task_scores_queries_by_bm25_rank(data, tiny_model, tmp_path):
    from rewards.retrieval import catalog_index

    root, _ = data
    m = run_eval("--data_dir", root, "--task", "query", "--model", f"tiny={tiny_model}", "--max_new_tokens", "8",
                 "--ks", "1,10,50", "--max_rows", "6", "--output_dir", tmp_path, "--device", "cpu")
    assert list(m) == ["tiny", "query_last", "query_history", "_meta"]  # default baselines of the task
    index = catalog_index(root)
    for method in ("tiny", "query_last", "query_history"):
        for p in read_preds(tmp_path, method):
            rank = None if p["query"] is None else index.rank(p["query"], p["target"])
            got = p["ranked"].index(p["target"]) if p["target"] in p["ranked"] else None
            assert got == (rank if rank is not None and rank < 50 else None), (method, p)
    last = read_preds(tmp_path, "query_last")[0]
    assert last["query"].startswith("widget number")
    assert evaluate.main(["--data_dir", str(root), "--task", "query", "--baseline", "popularity",
                          "--output_dir", str(tmp_path / "x"), "--quiet"]) == 2


def test_model_and_default_baselines_share_a_table(data, tiny_model, tmp_path, capsys):
    root, _ = data
    m = run_eval("--data_dir", root, "--model", str(tiny_model), *SAS, "--num_beams", "5", "--ks", "1,5",
                 "--max_rows", "4", "--output_dir", tmp_path, "--device", "cpu")
    assert list(m) == [Path(tiny_model).name, "popularity", "sasrec", "_meta"]
    table = capsys.readouterr().out
    assert "| method | HR@1 | HR@5 | NDCG@1 | NDCG@5 | rows |" in table and "| sasrec |" in table


def test_parse_items_is_strict():
    ref = evaluate.prompts.ITEM_REF_RE
    answer_of = {f"[ITEM_{i}]": i for i in range(10)}
    allowed = {1, 2, 3}
    cases = {
        "<think>hmm</think>[ITEM_2]": [2],
        "<think>x</think> [ITEM_3], [ITEM_1] [ITEM_3]": [3, 1],
        "[ITEM_2]": [2],
        "<think>x</think>I pick [ITEM_2]": [],     # extra text
        "<think>x</think>[ITEM_7]": [],            # not a candidate
        "<think>unfinished [ITEM_2]": [],          # no answer after reasoning -> text around the ref
        "": [],
    }
    for completion, expected in cases.items():
        assert evaluate.parse_items(completion, ref, answer_of, allowed) == expected, completion


# ----------------------------------------------------------------------------- sharding / resume
def test_two_processes_equal_one(data, tiny_model, tmp_path):
    root, _ = data
    common = ["--data_dir", str(root), "--model", f"tiny={tiny_model}", "--baseline", "popularity",
              "--baseline", "sasrec", *SAS, "--num_beams", "5", "--ks", "1,3,5", "--max_rows", "10",
              "--batch_size", "3", "--device", "cpu", "--quiet"]
    one = tmp_path / "one"
    assert evaluate.main([*common, "--output_dir", str(one)]) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
           "-m", "mimigenrec.eval.evaluate", *common, "--output_dir", str(two)]
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["_meta"]["world_size"] == 2
    for method in ("tiny", "popularity", "sasrec"):
        assert m1[method] == m2[method], method
        assert read_preds(one, method) == read_preds(two, method)
    assert not list((two / "shards").glob("*.jsonl")), "shards are merged away"


def test_resume_skips_done_rows_and_refuses_other_settings(data, tmp_path, capsys):
    root, _ = data
    args = ["--data_dir", root, "--baseline", "popularity", "--output_dir", tmp_path, "--ks", "1,10"]
    first = run_eval(*args)
    merged = tmp_path / "predictions_popularity.jsonl"
    lines = merged.read_text().splitlines()
    merged.unlink()
    shard = tmp_path / "shards" / "predictions_popularity.r0.jsonl"
    shard.parent.mkdir(exist_ok=True)
    shard.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])        # crash mid-line
    again = run_eval(*args)
    assert again["popularity"] == first["popularity"]
    assert again["_meta"]["methods"]["popularity"]["rows_predicted"] == N_USERS - 5
    assert merged.read_text().splitlines() == lines
    assert evaluate.main([*map(str, args), "--task", "cand_rank", "--num_negatives", "9", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err
    run_eval(*args, "--task", "cand_rank", "--num_negatives", "9", "--overwrite")


@pytest.mark.parametrize("impl", ["auto", "expand", "generate"])
def test_model_ranking_equals_exhaustive_scoring(data, tiny_model, tmp_path, impl):
    """With beams = number of items the search is exhaustive: the saved ranking must be every item
    sorted by the summed log-prob of its SID (+ EOS) after the rendered prompt, row by row, whichever
    beam search implementation ran it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mimigenrec import prompts

    root, _ = data
    run_eval("--data_dir", root, "--model", f"tiny={tiny_model}", "--no_baselines", "--num_beams", str(N_ITEMS),
             "--ks", "1,10", "--max_rows", "3", "--batch_size", "3", "--output_dir", tmp_path, "--device", "cpu",
             "--beam_search", impl)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    lines = (root / "inter/test.jsonl").read_text().splitlines()
    rows = {(r["user_id"], r["position"]): r for r in map(json.loads, lines)}
    items = {i: {"item_id": i, "title": f"widget number {i}"} for i in range(N_ITEMS)}
    id2sid = {i: sid_of(i) for i in range(N_ITEMS)}
    for p in read_preds(tmp_path, "tiny"):
        row = rows[(p["user_id"], p["position"])]
        text = prompts.build_input("sid_seq", history=row["history"], items=items, id2sid=id2sid)
        prompt = prompts.render_prompt(tok, prompts.chat_messages(prompts.sft_row("sid_seq", text, "")))
        ids = tok(prompt, add_special_tokens=False).input_ids
        scores = {}
        with torch.no_grad():
            for i in range(N_ITEMS):
                ans = tok(prompts.sid_string(id2sid[i]), add_special_tokens=False).input_ids + [tok.eos_token_id]
                logits = model(torch.tensor([ids + ans])).logits[0, len(ids) - 1:-1].float()
                scores[i] = torch.log_softmax(logits, -1).gather(1, torch.tensor(ans)[:, None]).sum().item()
        expected = sorted(scores, key=lambda i: -scores[i])
        got = p["ranked"]
        assert sorted(got) == list(range(N_ITEMS))
        # equal up to float noise: compare the score sequence, not ids (near-ties may swap)
        assert [scores[i] for i in got] == pytest.approx([scores[i] for i in expected], abs=1e-4)


def test_an_ensemble_of_one_checkpoint_twice_ranks_as_it(data, tiny_model, tmp_path, capsys):
    """``--model NAME=A+B``: both members' weights are in its fingerprint; A+A ranks exactly as A; an
    ensemble is refused where it cannot rank (free-form generation)."""
    root, _ = data
    common = ("--data_dir", root, "--no_baselines", "--num_beams", "10", "--ks", "1,5,10", "--max_rows", "6",
              "--batch_size", "4", "--device", "cpu")
    m = run_eval(*common, "--model", f"one={tiny_model}", "--model", f"ens={tiny_model}+{tiny_model}",
                 "--output_dir", tmp_path)
    assert m["one"] == m["ens"]
    assert [p["ranked"] for p in read_preds(tmp_path, "one")] == [p["ranked"] for p in read_preds(tmp_path, "ens")]
    cfg = json.loads((tmp_path / "run_config.json").read_text())
    assert cfg["methods"]["ens"]["source"] == f"model:{tiny_model.resolve()}+{tiny_model.resolve()}"
    assert cfg["methods"]["ens"]["inputs"] != cfg["methods"]["one"]["inputs"]
    assert evaluate.main([*map(str, common), "--model", f"ens={tiny_model}+{tiny_model}", "--think",
                          "--output_dir", str(tmp_path / "think"), "--quiet"]) == 2
    assert "ranks by beam search only" in capsys.readouterr().err


def test_sid_item_task_needs_a_model_with_the_item_tokens(data, tiny_model, tmp_path, capsys):
    from mimigenrec import prompts
    from mimigenrec.models.backbones import build_tiny_model

    root, _ = data
    args = ["--data_dir", root, "--no_baselines", "--num_beams", "10", "--ks", "10", "--max_rows", "4",
            "--device", "cpu", "--quiet"]
    # the model without the item tokens is refused the prompts that show them, and the other way round
    assert evaluate.main([*map(str, args), "--model", f"tiny={tiny_model}", "--task", "sid_item_seq",
                          "--output_dir", str(tmp_path / "a")]) == 2
    assert "--task sid_seq" in capsys.readouterr().err
    toks = json.loads((root / "new_tokens.json").read_text()) + [prompts.item_token(i) for i in range(N_ITEMS)]
    with_items = build_tiny_model(tmp_path / "items", new_tokens=toks, vocab_size=400)
    assert evaluate.main([*map(str, args), "--model", f"tiny={with_items}", "--output_dir", str(tmp_path / "b")]) == 2
    assert "--task sid_item_seq" in capsys.readouterr().err
    m = run_eval(*args[:-1], "--model", f"tiny={with_items}", "--task", "sid_item_seq", "--output_dir", tmp_path / "c")
    assert m["tiny"]["n_rows"] == 4
    assert all(len(p["ranked"]) == 10 for p in read_preds(tmp_path / "c", "tiny"))
