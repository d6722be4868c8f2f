"""Tensorised item trie + TrieLogitsProcessor: brute-force agreement and constrained decoding."""
from __future__ import annotations

import random

import pytest
import torch

from mimigenrec import prompts
from mimigenrec.decoding.trie import ItemTrie, TrieLogitsProcessor


def sharpen(model, seed: int, std: float = 0.5):
    """Re-draw the (tied) embeddings with a larger std: build_tiny_model's init (0.02) gives a nearly
    uniform next-token distribution, so every ranking would be a near-tie."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=g) * std)
    return model


# ---------------------------------------------------------------------------- reference
def reference_allowed(seqs, prefix, eos, pad, allowed=None):
    """Pure-Python allowed next tokens after ``prefix`` (allowed: set of sequence indices or None)."""
    for s in seqs:
        if len(prefix) >= len(s) and list(prefix[:len(s)]) == list(s) and all(t in (eos, pad) for t in prefix[len(s):]):
            return {eos, pad}
    nxt = {s[len(prefix)] for i, s in enumerate(seqs)
           if len(s) > len(prefix) and list(s[:len(prefix)]) == list(prefix) and (allowed is None or i in allowed)}
    return nxt or {eos, pad}


def random_trie_case(rng: random.Random):
    """Random vocab, lengths and heavy prefix sharing; EOS not used inside answers."""
    vocab = rng.randint(6, 40)
    eos = rng.randrange(vocab)
    pad = eos if rng.random() < 0.3 else rng.choice([t for t in range(vocab) if t != eos])
    alphabet = [t for t in range(vocab) if t != eos][: rng.randint(2, 6)]
    seqs = set()
    for _ in range(rng.randint(1, 30)):
        seqs.add(tuple(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) + (eos,))
    seqs = sorted(seqs, key=lambda s: rng.random())
    ids = rng.sample(range(1000), len(seqs))
    return vocab, eos, pad, seqs, ids


def random_prefixes(rng, seqs, eos, pad, vocab, n, length):
    """Prefixes of exactly ``length`` tokens: valid partial answers, finished answers + padding, garbage."""
    out = []
    for _ in range(n):
        s = list(rng.choice(seqs))
        kind = rng.random()
        if kind < 0.6 and length < len(s):
            p = s[:length]
        elif kind < 0.85:
            p = (s + [rng.choice([eos, pad]) for _ in range(length)])[:length]
        else:
            p = [rng.randrange(vocab) for _ in range(length)]
        out.append(p)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_processor_matches_bruteforce(seed):
    rng = random.Random(seed)
    vocab, eos, pad, seqs, ids = random_trie_case(rng)
    trie = ItemTrie.from_sequences(seqs, ids, eos_token_id=eos, pad_token_id=pad, vocab_size=vocab)
    assert trie.num_items == len(seqs) and trie.max_len == max(map(len, seqs))
    batch, beams = rng.randint(1, 4), rng.choice([1, 2, 5])
    use_cands = seed % 2 == 1
    allowed = torch.rand(batch, len(seqs), generator=torch.Generator().manual_seed(seed)) < 0.4 if use_cands else None
    prompt_len = rng.randint(1, 4)
    for length in range(trie.max_len + 2):
        prefixes = random_prefixes(rng, seqs, eos, pad, vocab, batch * beams, length)
        prompt = torch.randint(0, vocab, (batch * beams, prompt_len))
        input_ids = torch.cat([prompt, torch.tensor(prefixes, dtype=torch.long).view(batch * beams, length)], 1)
        scores = torch.randn(batch * beams, vocab)
        proc = TrieLogitsProcessor(trie, prompt_len, allowed_items=allowed, num_beams=beams)
        out = proc(input_ids, scores)
        mask = trie.allowed_mask(input_ids[:, prompt_len:], allowed)
        for r, p in enumerate(prefixes):
            cand = None if allowed is None else set(torch.nonzero(allowed[r // beams]).flatten().tolist())
            want = reference_allowed(seqs, p, eos, pad, cand)
            got = set(torch.nonzero(torch.isfinite(out[r])).flatten().tolist())
            assert got == want, (p, got, want)
            assert set(torch.nonzero(mask[r]).flatten().tolist()) == want
            assert torch.equal(out[r][list(want)], scores[r][list(want)])


@pytest.mark.parametrize("seed", range(6))
def test_items_of_and_item_of(seed):
    rng = random.Random(100 + seed)
    vocab, eos, pad, seqs, ids = random_trie_case(rng)
    trie = ItemTrie.from_sequences(seqs, ids, eos_token_id=eos, pad_token_id=pad, vocab_size=vocab)
    width = trie.max_len + 2
    rows, want = [], []
    for s, i in zip(seqs, ids):
        rows.append(list(s) + [pad] * (width - len(s)))
        want.append(i)
        assert trie.item_of(s) == i
        if len(s) > 1:
            assert trie.item_of(s[:-1]) is None  # EOS missing: not a full answer
    rows.append([rng.randrange(vocab) for _ in range(width)])
    want.append(next((i for s, i in zip(seqs, ids) if rows[-1][:len(s)] == list(s)
                      and all(t in (eos, pad) for t in rows[-1][len(s):])), -1))
    assert trie.items_of(torch.tensor(rows)).tolist() == want
    assert trie.item_of([]) is None


def test_trie_rejects_bad_input():
    with pytest.raises(ValueError, match="share the answer"):
        ItemTrie.from_sequences([[1, 2, 9], [1, 2, 9]], [5, 6])
    with pytest.raises(ValueError, match="prefix"):
        ItemTrie.from_sequences([[1, 9], [1, 9, 9]], eos_token_id=9)
    with pytest.raises(ValueError, match="different tokens"):
        ItemTrie.from_sequences([[1, 9], [2, 8]])
    trie = ItemTrie.from_sequences([[1, 9], [2, 9]], [7, 8])
    with pytest.raises(ValueError, match="columns"):
        trie.allowed_mask(torch.zeros(1, 0, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(KeyError, match="not in the trie"):
        trie.candidates_mask([[7, 99]])
    assert trie.candidates_mask([[8], [7, 8]]).tolist() == [[False, True], [True, True]]


def test_processor_renormalize_and_dtype():
    trie = ItemTrie.from_sequences([[1, 2, 9], [1, 3, 9], [4, 9]], vocab_size=12)
    proc = TrieLogitsProcessor(trie, prompt_length=2, renormalize=True)
    ids = torch.tensor([[0, 0, 1], [0, 0, 4]])
    out = proc(ids, torch.randn(2, 12, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float().exp().sum(-1), torch.ones(2), atol=2e-2)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [2, 3]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [9]


def test_trie_to_device_roundtrip():
    trie = ItemTrie.from_sequences([[1, 2, 9], [1, 3, 9]])
    assert trie.to("cpu") is trie
    if torch.cuda.is_available():
        g = trie.to("cuda")
        assert g.items_of(torch.tensor([[1, 3, 9]], device="cuda")).tolist() == [1]


# ---------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="session")
def sid_model(tmp_path_factory):
    """Tiny random Qwen2 with SID tokens <a_*><b_*><c_*>, plus a random unique id2sid."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mimigenrec.models.backbones import build_tiny_model

    tokens = [f"<{lvl}_{i}>" for lvl in "abc" for i in range(6)]
    out = build_tiny_model(tmp_path_factory.mktemp("tiny_sid"), new_tokens=tokens)
    tok = AutoTokenizer.from_pretrained(out)
    model = sharpen(AutoModelForCausalLM.from_pretrained(out).eval(), seed=3)
    rng = random.Random(0)
    codes = rng.sample([(a, b, c) for a in range(6) for b in range(6) for c in range(6)], 40)
    id2sid = {10 + i: [f"<a_{a}>", f"<b_{b}>", f"<c_{c}>"] for i, (a, b, c) in enumerate(codes)}
    return model, tok, id2sid


def encode_prompts(tok, n, seed=0):
    """n chat prompts of different lengths (so the batch is left-padded)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        hist = ", ".join(f"<a_{rng.randrange(6)}><b_{rng.randrange(6)}><c_{rng.randrange(6)}>"
                         for _ in range(1 + (i * 2) % 5))
        row = prompts.sft_row("sid_seq", f"User history (oldest first): {hist}", "")
        rows.append(prompts.render_prompt(tok, prompts.chat_messages(row)))
    return tok(rows, return_tensors="pt", padding=True, add_special_tokens=False, return_token_type_ids=False)


def test_from_id2sid_tokenization(sid_model):
    _, tok, id2sid = sid_model
    trie = ItemTrie.from_id2sid({str(k): v for k, v in id2sid.items()}, tok)
    assert trie.max_len == 4 and trie.num_items == len(id2sid) and trie.vocab_size == len(tok)
    item = next(iter(id2sid))
    ids = tok(prompts.sid_string(id2sid[item]), add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert trie.item_of(ids) == item
    with pytest.raises(ValueError, match="one per SID token"):
        ItemTrie.from_id2sid({1: ["<z_1>", "<z_2>"]}, tok)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("restricted", [False, True])
def test_constrained_generate_gives_valid_items(sid_model, mode, restricted):
    model, tok, id2sid = sid_model
    trie = ItemTrie.from_id2sid(id2sid, tok)
    enc = encode_prompts(tok, 3)
    B, P = enc.input_ids.shape
    allowed = None
    if restricted:
        g = torch.Generator().manual_seed(1)
        allowed = torch.zeros(B, trie.num_items, dtype=torch.bool)
        for r in range(B):
            allowed[r, torch.randperm(trie.num_items, generator=g)[:6]] = True  # >= beams: no padding
    nret = 4
    kw = {"greedy": {"do_sample": False, "num_return_sequences": 1},
          "sample": {"do_sample": True, "temperature": 1.5, "top_k": None, "top_p": None, "num_return_sequences": nret},
          "beam": {"do_sample": False, "num_beams": nret, "num_return_sequences": nret, "length_penalty": 0.0}}[mode]
    torch.manual_seed(0)
    proc = TrieLogitsProcessor(trie, P, allowed_items=allowed, num_beams=kw.get("num_beams", 1))
    out = model.generate(**enc, logits_processor=[proc], max_new_tokens=trie.max_len + 2,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    items = trie.items_of(out[:, P:])
    assert (items >= 0).all(), tok.batch_decode(out[:, P:])
    per_row = out.shape[0] // B
    for r, it in enumerate(items.tolist()):
        text = tok.decode(out[r, P:], skip_special_tokens=True)
        assert prompts.split_sid(text) == id2sid[it]
        if allowed is not None:
            assert allowed[r // per_row, trie.item_ids.tolist().index(it)]


def test_candidate_refs_trie_with_generate(sid_model):
    model, tok, _ = sid_model
    cands = [3, 12, 17, 120, 121, 1250]
    trie = ItemTrie.from_texts({c: prompts.item_ref(c) for c in cands}, tok)
    enc = encode_prompts(tok, 2, seed=3)
    P = enc.input_ids.shape[1]
    allowed = trie.candidates_mask([[3, 121], [17, 1250, 12]])
    proc = TrieLogitsProcessor(trie, P, allowed_items=allowed, num_beams=3)
    out = model.generate(**enc, logits_processor=[proc], max_new_tokens=trie.max_len, num_beams=3,
                         num_return_sequences=3, do_sample=False, length_penalty=0.0,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    items = trie.items_of(out[:, P:]).view(2, 3)
    assert set(items[0, :2].tolist()) == {3, 121}  # only two candidates: third beam is padding (-1)
    assert set(items[1].tolist()) == {17, 1250, 12}
    for r in range(out.shape[0]):
        it = items.view(-1)[r].item()
        if it >= 0:
            assert tok.decode(out[r, P:], skip_special_tokens=True) == prompts.item_ref(it)
