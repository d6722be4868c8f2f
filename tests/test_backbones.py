"""Tiny backbone: phrase tokens and semantic initialisation of the SID token embeddings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mimigenrec import prompts
from mimigenrec.models.backbones import (
    CHAT_ROLES,
    build_tiny_model,
    semantic_sid_vectors,
)


def test_semantic_vectors_are_residual_code_means():
    emb = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    id2sid = {0: ["<a_0>", "<b_0>"], 1: ["<a_0>", "<b_1>"], 2: ["<a_1>", "<b_0>"], 3: ["<a_1>", "<b_1>"]}
    v = semantic_sid_vectors(id2sid, emb)
    assert np.allclose(v["<a_0>"], [2, 0]) and np.allclose(v["<a_1>"], [0, 3])
    # residuals: item0 (-1,0), item2 (0,-1) -> b_0 = (-0.5,-0.5); item1 (1,0), item3 (0,1) -> b_1 = (0.5,0.5)
    assert np.allclose(v["<b_0>"], [-0.5, -0.5]) and np.allclose(v["<b_1>"], [0.5, 0.5])


def test_semantic_init_keeps_code_similarity(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    items = {i: centres[i % 4] + 0.05 * rng.normal(size=32) for i in range(16)}
    id2sid = {i: [f"<a_{i % 4}>", f"<b_{i // 4}>"] for i in items}
    emb = np.stack([items[i] for i in range(16)])
    toks = sorted({t for s in id2sid.values() for t in s})
    vec = semantic_sid_vectors(id2sid, emb)
    path = build_tiny_model(tmp_path / "m", new_tokens=toks, hidden_size=16, embed_std=0.02, sid_vectors=vec)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    e = model.get_input_embeddings().weight.detach()
    a = torch.nn.functional.normalize(e[tok.convert_tokens_to_ids([f"<a_{k}>" for k in range(4)])], dim=1)
    want = torch.nn.functional.normalize(torch.tensor(np.stack([vec[f"<a_{k}>"] for k in range(4)])
                                                      - np.stack(list(vec.values())).mean(0)), dim=1)
    # PCA to 16 dims keeps (almost all of) the geometry of the code vectors
    assert torch.allclose(a @ a.T, (want @ want.T).float(), atol=0.05)
    plain = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "p", new_tokens=toks, hidden_size=16,
                                                                  embed_std=0.02)).get_input_embeddings().weight
    ids = tok.convert_tokens_to_ids(toks)
    norm = plain[ids].detach().norm(dim=1).mean()  # the semantic vectors keep the scale of the plain init
    assert torch.allclose(e[ids].norm(dim=1), norm.expand(len(toks)), rtol=1e-4)


def test_added_sid_tokens_start_like_llamafactory_adds_them(tmp_path):
    """mean of the old rows + N(0, 1/hidden): the scale LLaMA-Factory gives tokens it adds, not the old rows' 0.02."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    toks = [f"<a_{k}>" for k in range(256)]
    path = build_tiny_model(tmp_path / "m", new_tokens=toks, hidden_size=64, embed_std=0.02)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    e = model.get_input_embeddings().weight.detach()
    ids = tok.convert_tokens_to_ids(toks)
    old = e[: min(ids)]
    new = e[ids] - old.mean(0)
    assert abs(float(new.std()) - 64 ** -0.5) < 0.01 and abs(float(old.std()) - 0.02) < 0.002
    assert len(tok) == e.shape[0]


@pytest.mark.parametrize("vocab_size", [2048, 256])
def test_each_fixed_phrase_is_one_token(tmp_path, vocab_size):
    """Phrases, the history separator and the chat roles are one token each, with merges (2048) or
    bytes only (256, bench/quality.py's vocabulary): a sid_seq row is its boilerplate + 4 tokens an item."""
    from transformers import AutoTokenizer

    sids = ["<a_1>", "<b_2>", "<a_3>", "<b_4>"]
    tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m", new_tokens=sids, hidden_size=16,
                                                         vocab_size=vocab_size))
    for phrase in [*prompts.fixed_phrases(), *CHAT_ROLES]:
        assert len(tok(phrase, add_special_tokens=False).input_ids) == 1, phrase

    def row_len(history: list[int]) -> tuple[int, str]:
        row = prompts.sft_row("sid_seq", prompts.build_input(
            "sid_seq", history=history, items={0: {"title": "x"}, 1: {"title": "y"}},
            id2sid={0: sids[:2], 1: sids[2:]}), "")
        text = prompts.render_prompt(tok, prompts.chat_messages(row))
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
        return len(ids), text

    (one, _), (two, text) = row_len([0]), row_len([0, 1])
    assert prompts.HISTORY_SEP + "<a_3>" in text and two - one == 3   # separator + 2 SID tokens
    assert one == 20, one   # ChatML markers, roles and newlines (14), 3 phrases, a space, 2 SID tokens
