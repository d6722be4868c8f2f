"""Prefill-once constrained beam search vs stock constrained ``generate`` beam search."""
from __future__ import annotations

import math
import random

import pytest
import torch
from test_trie import sharpen  # tests/ is on sys.path (no package)

from mimigenrec import prompts
from mimigenrec.decoding.beam_search import (
    BeamResult,
    constrained_beam_search,
    tree_attention_supported,
)
from mimigenrec.decoding.trie import ItemTrie


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny random Qwen2 (SID tokens added) and a unique random id2sid over 60 items."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mimigenrec.models.backbones import build_tiny_model

    tokens = [f"<{lvl}_{i}>" for lvl in "abc" for i in range(8)]
    out = build_tiny_model(tmp_path_factory.mktemp("tiny_beam"), new_tokens=tokens, seed=1)
    tok = AutoTokenizer.from_pretrained(out)
    model = sharpen(AutoModelForCausalLM.from_pretrained(out).eval(), seed=3)
    rng = random.Random(1)
    codes = rng.sample([(a, b, c) for a in range(8) for b in range(8) for c in range(8)], 60)
    id2sid = {i: [f"<a_{a}>", f"<b_{b}>", f"<c_{c}>"] for i, (a, b, c) in enumerate(codes)}
    return model, tok, id2sid


def batch(tok, n, seed=0):
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        hist = ", ".join(f"<a_{rng.randrange(8)}><b_{rng.randrange(8)}><c_{rng.randrange(8)}>"
                         for _ in range(1 + (3 * i) % 7))
        row = prompts.sft_row("sid_seq", f"User history (oldest first): {hist}", "")
        texts.append(prompts.render_prompt(tok, prompts.chat_messages(row)))
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False, return_token_type_ids=False)


def random_token_trie(tok, n_items, seed):
    """Items of unequal length (1-4 tokens + EOS) over random non-special vocab tokens, shared prefixes."""
    rng = random.Random(seed)
    special = set(tok.all_special_ids)
    pool = rng.sample([t for t in range(len(tok)) if t not in special], 6)
    seqs = set()
    while len(seqs) < n_items:
        seqs.add(tuple(rng.choice(pool) for _ in range(rng.randint(1, 4))) + (tok.eos_token_id,))
    return ItemTrie.from_sequences(sorted(seqs), [100 + i for i in range(n_items)],
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   vocab_size=len(tok))


def assert_same(new: BeamResult, ref: BeamResult, trie: ItemTrie):
    """Same ranking as stock beam search: every item stock returns, with the same score and tokens.

    Stock marks empty slots with a -1e9 score that still counts as a finished hypothesis, so when
    fewer than K valid continuations exist at some step it can stop before finding K items (its
    extra slots decode to -1 here). The new search uses -inf, so it returns those items and may
    add valid ones in stock's empty slots; where stock is full the item sets are equal.
    """
    assert new.items.shape == ref.items.shape
    K = new.items.shape[1]
    for b in range(new.items.shape[0]):
        n = int((new.items[b] >= 0).sum())
        assert (new.items[b, :n] >= 0).all() and (new.items[b, n:] == -1).all()
        assert torch.isneginf(new.scores[b, n:]).all() and torch.isfinite(new.scores[b, :n]).all()
        assert (new.scores[b, 1:n] <= new.scores[b, :n - 1] + 1e-6).all()
        got = {int(i): k for k, i in enumerate(new.items[b, :n])}
        ref_items = [int(i) for i in ref.items[b] if i >= 0]
        assert set(ref_items) <= set(got) or len(ref_items) == K, (new.items[b], ref.items[b])
        if len(ref_items) == K:  # stock found K items: same set, except ties at the boundary
            kth = float(ref.scores[b, K - 1])
            diff = set(ref_items) ^ set(got)
            assert all(abs(float(new.scores[b, got[i]] if i in got else ref.scores[b, ref_items.index(i)]) - kth)
                       < 1e-5 for i in diff), (new.items[b], ref.items[b])
        for r, item in enumerate(ref_items):
            if item not in got:
                continue
            k = got[item]
            assert abs(float(new.scores[b, k]) - float(ref.scores[b, r])) < 1e-4
            assert torch.equal(new.sequences[b, k], ref.sequences[b, r])
            assert torch.allclose(new.token_logps[b, k], ref.token_logps[b, r], atol=1e-4)
        assert torch.allclose(new.token_logps[b, :n].sum(-1), new.scores[b, :n], atol=1e-4)
        for k in range(n):  # every returned answer decodes to its item
            assert trie.item_of(new.sequences[b, k].tolist()) == int(new.items[b, k])


@pytest.mark.parametrize("cache_mode", ["tree", "expand"])
@pytest.mark.parametrize("n_rows,beams", [(1, 4), (3, 4), (1, 20), (3, 20)])
def test_matches_stock_generate_sid_trie(tiny, n_rows, beams, cache_mode):
    model, tok, id2sid = tiny
    trie = ItemTrie.from_id2sid(id2sid, tok)
    enc = batch(tok, n_rows, seed=n_rows)
    new = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, beams, cache_mode=cache_mode)
    ref = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, beams, use_generate=True)
    assert (new.items >= 0).all()  # 60 items > beams: every beam is a valid item
    assert new.sequences.shape == (n_rows, beams, trie.max_len)
    assert_same(new, ref, trie)
    assert (new.scores[:, 1:] <= new.scores[:, :-1] + 1e-6).all()


@pytest.mark.parametrize("seed,n_rows,beams,n_items", [(0, 1, 4, 12), (1, 3, 4, 30), (2, 3, 20, 12), (3, 1, 20, 40)])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("cache_mode", ["tree", "expand"])
def test_matches_stock_generate_random_tries(tiny, seed, n_rows, beams, n_items, renormalize, cache_mode):
    model, tok, _ = tiny
    trie = random_token_trie(tok, n_items, seed)
    enc = batch(tok, n_rows, seed=10 + seed)
    new = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, beams, renormalize=renormalize,
                                  cache_mode=cache_mode)
    ref = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, beams,
                                  renormalize=renormalize, use_generate=True)
    assert_same(new, ref, trie)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("cache_mode", ["tree", "expand"])
def test_candidate_sets(tiny, renormalize, cache_mode):
    model, tok, id2sid = tiny
    trie = ItemTrie.from_id2sid(id2sid, tok)
    enc = batch(tok, 3, seed=7)
    cands = [[0, 5, 9], list(range(10, 40)), [59]]
    allowed = trie.candidates_mask(cands)
    new = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, 5, allowed_items=allowed,
                                  renormalize=renormalize, cache_mode=cache_mode)
    ref = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, 5, allowed_items=allowed,
                                  renormalize=renormalize, use_generate=True)
    assert_same(new, ref, trie)
    for r, c in enumerate(cands):
        got = [i for i in new.items[r].tolist() if i >= 0]
        assert len(got) == min(5, len(c)) and set(got) <= set(c)
    if renormalize:  # a single candidate is certain under the constrained policy
        assert abs(float(new.scores[2, 0])) < 1e-5


def test_bf16_runs_and_agrees_with_stock(tiny):
    model, tok, id2sid = tiny
    trie = ItemTrie.from_id2sid(id2sid, tok)
    enc = batch(tok, 2, seed=5)
    bf = constrained_beam_search(model.to(torch.bfloat16), enc.input_ids, enc.attention_mask, trie, 6)
    model.to(torch.float32)
    ref = constrained_beam_search(model.to(torch.bfloat16), enc.input_ids, enc.attention_mask, trie, 6,
                                  use_generate=True)
    model.to(torch.float32)
    assert bf.scores.dtype == torch.float32 and (bf.items >= 0).all()
    # bf16 prefill-once vs bf16 stock: batched shapes differ, so allow bf16-size score noise
    assert torch.allclose(bf.scores, ref.scores, atol=0.1)
    for b in range(2):  # items both return carry the same score up to bf16 noise (random model: near-ties)
        ours = dict(zip(bf.items[b].tolist(), bf.scores[b].tolist()))
        for item, score in zip(ref.items[b].tolist(), ref.scores[b].tolist()):
            if item in ours:
                assert abs(ours[item] - score) < 0.1


def test_fewer_items_than_beams_pads(tiny):
    model, tok, id2sid = tiny
    small = {i: id2sid[i] for i in range(3)}
    trie = ItemTrie.from_id2sid(small, tok)
    enc = batch(tok, 2, seed=2)
    res = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, 5)
    for r in range(2):
        assert sorted(res.items[r, :3].tolist()) == [0, 1, 2]
        assert res.items[r, 3:].tolist() == [-1, -1]
        assert torch.isneginf(res.scores[r, 3:]).all()
        assert (res.sequences[r, 3:] == tok.pad_token_id).all() and (res.token_logps[r, 3:] == 0).all()
    # the full distribution over 3 items: renormalised scores are log-probs that sum to 1
    ren = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, 5, renormalize=True)
    assert torch.allclose(ren.scores[:, :3].exp().sum(-1), torch.ones(2), atol=1e-4)


def test_generation_config_cannot_leak(tiny):
    """A model whose generation_config asks for sampling still gets deterministic beam search."""
    model, tok, id2sid = tiny
    trie = ItemTrie.from_id2sid(id2sid, tok)
    enc = batch(tok, 2, seed=4)
    ref = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, 4, use_generate=True)
    saved = model.generation_config
    model.generation_config = saved.__class__(**{**saved.to_dict(), "do_sample": True, "temperature": 3.0,
                                                  "top_k": 2, "top_p": 0.5, "repetition_penalty": 1.5,
                                                  "length_penalty": 2.0, "num_beams": 7})
    try:
        runs = [constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, 4, use_generate=u)
                for u in (True, True, False)]
    finally:
        model.generation_config = saved
    for r in runs:
        assert torch.equal(r.items, ref.items) and torch.allclose(r.scores, ref.scores, atol=1e-4)


def test_tree_mode_is_the_default_for_full_attention_models(tiny):
    model, _, _ = tiny
    assert tree_attention_supported(model)
    impl = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"  # no custom 4D masks there: expand mode
    try:
        assert not tree_attention_supported(model)
    finally:
        model.config._attn_implementation = impl
    with pytest.raises(ValueError, match="cache_mode"):
        constrained_beam_search(model, torch.ones(1, 3, dtype=torch.long), None, None, 2, cache_mode="shared")


@pytest.mark.parametrize("cache_mode", ["tree", "expand"])
def test_ensemble_ranks_by_the_mean_log_probability(tiny, cache_mode):
    """EnsembleLM: the beam search over two models returns every item by the sum over its answer tokens
    of the log-softmax of the two models' mean log-probs (checked exhaustively by teacher forcing), and
    an ensemble of a model with itself ranks exactly as the model."""
    import copy

    from mimigenrec.models.ensemble import EnsembleLM

    model, tok, id2sid = tiny
    other = sharpen(copy.deepcopy(model), seed=5)
    trie = ItemTrie.from_id2sid(id2sid, tok)
    enc = batch(tok, 2, seed=4)
    n = len(id2sid)
    same = constrained_beam_search(EnsembleLM([model, model]), enc.input_ids, enc.attention_mask, trie, 10,
                                   cache_mode=cache_mode)
    ref = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, 10, cache_mode=cache_mode)
    assert torch.equal(same.items, ref.items) and torch.allclose(same.scores, ref.scores, atol=1e-5)

    got = constrained_beam_search(EnsembleLM([model, other]), enc.input_ids, enc.attention_mask, trie, n,
                                  cache_mode=cache_mode)
    answers = {i: tok("".join(s), add_special_tokens=False).input_ids + [tok.eos_token_id] for i, s in id2sid.items()}
    for b in range(2):
        prompt = enc.input_ids[b][enc.attention_mask[b].bool()].tolist()
        ids = torch.tensor([prompt + answers[i] for i in range(n)])
        with torch.no_grad():  # per token: log-softmax of the members' mean log-probs (renormalised)
            lp = torch.stack([m(input_ids=ids).logits[:, :-1].log_softmax(-1) for m in (model, other)]).mean(0)
            tok_lp = lp.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        mean = tok_lp[:, len(prompt) - 1:].sum(-1)
        items = got.items[b].tolist()
        assert sorted(items) == list(range(n))  # as many beams as items: the search is exhaustive
        assert torch.allclose(got.scores[b], mean[items], atol=1e-4)
        assert (got.scores[b, 1:] <= got.scores[b, :-1] + 1e-6).all()


def _teacher_reward_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "ablations" / "teacher_reward.py"
    spec = importlib.util.spec_from_file_location("teacher_reward_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_teacher_reward_scores_are_the_beam_search_scores(tiny, tmp_path):
    """rewards.teacher: with the policy as its teacher, a completion's teacher score is the beam
    search's own score of it, ranks within a group follow the beam order, and the gain / KL rewards are 0
    (the ablation file's rewards use the same scores)."""
    from rewards import teacher

    model, tok, id2sid = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    teachers = [str(tmp_path / "m")]
    mod = _teacher_reward_module()
    trie = ItemTrie.from_id2sid(id2sid, tok)
    msgs = [prompts.chat_messages(prompts.sft_row("sid_seq", f"User history (oldest first): <a_{i}><b_1><c_2>", ""))
            for i in (1, 2)]
    enc = tok([prompts.render_prompt(tok, m) for m in msgs], return_tensors="pt", padding=True,
              padding_side="left", add_special_tokens=False, return_token_type_ids=False)
    res = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, 6)
    beams = [(m, "".join(id2sid[int(i)])) for m, row in zip(msgs, res.items) for i in row]
    ps, cs = [b[0] for b in beams], [b[1] for b in beams]
    got = teacher.teacher_scores(ps, cs, teachers)
    assert torch.allclose(torch.tensor(got), res.scores.reshape(-1), atol=1e-4)
    assert teacher.group_ranks(ps, got) == list(range(6)) * 2
    assert mod.teacher_rank(ps, cs, teachers=teachers) == [1 / math.log2(r + 2) for r in range(6)] * 2
    assert teacher.teacher_gain(ps, cs, teachers=teachers, beam_rank=list(range(6)) * 2) == [0.0] * 12  # no push
    swapped = [1, 0, 2, 3, 4, 5] * 2
    gain = teacher.teacher_gain(ps, cs, teachers=teachers, beam_rank=swapped)
    assert gain[0] > 0 > gain[1] and gain[2:6] == [0.0] * 4
    kl = teacher.teacher_kl(ps, cs, teachers=teachers, beam_logp=res.scores.reshape(-1).tolist())
    assert max(abs(x) for x in kl) < 1e-4  # its own teacher: log-ratio 0
    assert teacher.teacher_kl(ps, cs, teachers=teachers, beam_logp=[x - 1.0 for x in got]) == pytest.approx([1.0] * 12)
    with pytest.raises(ValueError, match="teachers"):
        teacher.teacher_kl(ps, cs, teachers=[], beam_logp=got)


def test_teacher_scores_prefill_once_equals_each_row_run_in_full(tiny, tmp_path):
    """teacher_scores prefills each distinct prompt once and scores its beams from a copy of the cache:
    prompts of different lengths, interleaved, repeated and answers of different lengths get the
    scores of every (prompt + answer + EOS) row run through the model in full; two teachers average."""
    import copy

    from rewards import teacher

    model, tok, id2sid = tiny
    other = sharpen(copy.deepcopy(model), seed=5)
    for name, m in (("a", model), ("b", other)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    msgs = [prompts.chat_messages(prompts.sft_row("sid_seq", "User history (oldest first): " + h, ""))
            for h in ("<a_1><b_1><c_2>", "<a_2><b_1><c_1>, <a_1><b_2><c_1>, <a_2><b_2><c_2>")]
    sids = ["".join(s) for s in list(id2sid.values())[:5]]
    ps = [msgs[k % 2] for k in range(10)]
    cs = [sids[k % 5] for k in range(9)] + [sids[0][:-7] if len(sids[0]) > 7 else sids[0]]

    def full(m, p, c):
        ids_p, ids_c = teacher.token_ids(tok, [p], [c])
        ids = torch.tensor([ids_p[0] + ids_c[0]])
        lp = m(input_ids=ids).logits[0, :-1].log_softmax(-1)
        n = len(ids_c[0])
        return float(lp[-n:].gather(-1, ids[0, -n:, None]).sum())

    teacher.teacher_models.cache_clear()
    with torch.no_grad():
        want = [(full(model, p, c) + full(other, p, c)) / 2 for p, c in zip(ps, cs)]
    got = teacher.teacher_scores(ps, cs, [str(tmp_path / "a"), str(tmp_path / "b")])
    assert got == pytest.approx(want, abs=1e-4)


def test_sasrec_gain_orders_each_group_by_the_reward_models_scores(monkeypatch):
    """sasrec_gain: within each prompt's group, SASRec's order of the beams minus their own order."""
    import rewards.collaborative as collab

    class Scorer:
        def score_rows(self, rows):  # user u prefers item i by -|i - u|
            return torch.tensor([[-abs(i - r["user_id"]) for i in range(5)] for r in rows], dtype=torch.float)

    sid = {f"<a_{i}>": i for i in range(5)}
    monkeypatch.setattr(collab, "_reward_model", lambda data_dir, cache_dir=None, split="test": (Scorer(), sid, torch.arange(5)))
    mod = _teacher_reward_module()
    comps = ["<a_0>", "<a_2>", "<a_1>", "<a_4>", "<a_3>", "<a_2>"]   # two groups of 3, in beam order
    ps = ["p0"] * 3 + ["p4"] * 3
    info = [{"user_id": 0, "position": 1, "target": 0}] * 3 + [{"user_id": 4, "position": 1, "target": 4}] * 3
    g = lambda r: 1 / math.log2(r + 2)
    got = mod.sasrec_gain(ps, comps, data_dir=".", beam_rank=[0, 1, 2] * 2, extra_info=info)
    # group 1: SASRec ranks items 0, 1, 2 first: beams (0, 2, 1) -> teacher ranks (0, 2, 1)
    assert got == pytest.approx([0.0, g(2) - g(1), g(1) - g(2), 0.0, 0.0, 0.0])


def test_gpt_neox_backbone_drops_out_in_training_only_and_beam_search_matches_stock(tmp_path):
    """--arch gpt_neox --dropout p: the embeddings and residual branches drop out while training, the
    model is deterministic in eval mode, and the prefill-once search ranks as stock generate does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mimigenrec.models.backbones import build_tiny_model

    tokens = [f"<{lvl}_{i}>" for lvl in "abc" for i in range(8)]
    out = build_tiny_model(tmp_path / "neox", new_tokens=tokens, seed=1, arch="gpt_neox", dropout=0.3)
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model.config.hidden_dropout == model.config.attention_dropout == 0.3
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied, as the Qwen2's
    enc = batch(tok, 3, seed=3)
    model.train()
    a, b = (model(**enc).logits for _ in range(2))
    assert not torch.allclose(a, b)
    model = sharpen(model.eval(), seed=3)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, model(**enc).logits)
    rng = random.Random(2)
    codes = rng.sample([(x, y, z) for x in range(8) for y in range(8) for z in range(8)], 40)
    trie = ItemTrie.from_id2sid({i: [f"<a_{x}>", f"<b_{y}>", f"<c_{z}>"] for i, (x, y, z) in enumerate(codes)}, tok)
    for mode in ("tree", "expand"):
        new = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, 8, cache_mode=mode)
        ref = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, 8, use_generate=True)
        assert_same(new, ref, trie)
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model(tmp_path / "x", arch="llama")
