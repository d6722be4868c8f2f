"""embed and sid stages: real MiniLM and a tiny causal LM for embed, synthetic vectors for sid."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from mimigenrec.io import BadInputError, DataDir, read_json, read_jsonl, write_jsonl
from mimigenrec.prompts import SID_TOKEN_RE
from preprocess import embed, sid
from preprocess.__main__ import main as cli

ITEMS = [
    {"item_id": 0, "raw_id": "A0", "title": "Digital caliper 150 mm stainless steel", "brand": "Mitutoyo",
     "description": "Measures inside, outside and depth.", "categories": [], "image_urls": []},
    {"item_id": 1, "raw_id": "A1", "title": "Digital caliper 6 inch stainless", "brand": "iGaging",
     "description": "Electronic vernier caliper with LCD.", "categories": [], "image_urls": []},
    {"item_id": 2, "raw_id": "A2", "title": "Nitrile examination gloves, box of 100", "brand": "",
     "description": "Powder-free disposable gloves.", "categories": [], "image_urls": []},
    {"item_id": 3, "raw_id": "A3", "title": "Lab glass beaker set 50-1000 ml", "brand": "Pyrex",
     "description": "", "categories": [], "image_urls": []},
    {"item_id": 4, "raw_id": "A4", "title": "3D printer PLA filament 1.75 mm", "brand": "Hatchbox",
     "description": "Dimensional accuracy +/- 0.03 mm.", "categories": [], "image_urls": []},
]


@pytest.fixture()
def items_dir(tmp_path):
    # shuffled on disk: rows must still land at row = item_id
    write_jsonl(tmp_path / "items.jsonl", [ITEMS[i] for i in (3, 0, 4, 1, 2)])
    return tmp_path


# ----------------------------------------------------------------------------- embed

def test_item_text_skips_empty_fields_and_keeps_order():
    assert embed.item_text(ITEMS[2], ["title", "brand", "description"]) == (
        "Title: Nitrile examination gloves, box of 100\nDescription: Powder-free disposable gloves.")
    assert embed.item_text({"categories": ["a", "b"], "title": " x  y "}, ["categories", "title"]) == (
        "Categories: a, b\nTitle: x y")


def test_unknown_field_is_an_error_naming_it(items_dir):
    with pytest.raises(BadInputError, match="colour"):
        embed.load_item_texts(items_dir / "items.jsonl", ["title", "colour"])


def test_bad_encoder_path_is_an_error(tmp_path):
    with pytest.raises(BadInputError, match="config.json"):
        embed.TextEncoder(str(tmp_path / "nope"), device="cpu")


def test_embed_minilm_real(items_dir, monkeypatch):
    assert cli(["embed", "--out_dir", str(items_dir), "--batch_size", "2", "--device", "cpu"]) == 0
    d = DataDir(items_dir)
    emb = np.load(d.emb)
    meta = read_json(d.emb_meta)
    assert emb.dtype == np.float32 and emb.shape == (5, 384)
    assert meta["dim"] == 384 and meta["n_items"] == 5 and meta["fields"] == ["title", "brand", "description"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sims = emb @ emb.T
    # the two calipers (rows 0, 1) are each other's nearest neighbour: row = item_id, real semantics
    assert sims[0, 1] > max(sims[0, 2:].max(), sims[1, 2:].max())

    # same vectors as the model's own sentence-transformers pipeline
    from sentence_transformers import SentenceTransformer

    texts = embed.load_item_texts(d.items, embed.DEFAULT_FIELDS)
    ref = SentenceTransformer(str(embed.minilm_path()), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(emb, ref, atol=1e-4)

    # cached: unchanged items and settings do not load the encoder again
    def boom(*a, **k):
        raise AssertionError("encoder loaded on a cached re-run")

    monkeypatch.setattr(embed, "TextEncoder", boom)
    assert cli(["embed", "--out_dir", str(items_dir)]) == 0
    with pytest.raises(AssertionError, match="cached"):
        cli(["embed", "--out_dir", str(items_dir), "--fields", "title"])  # settings changed -> recompute
    with pytest.raises(AssertionError, match="cached"):
        cli(["embed", "--out_dir", str(items_dir), "--overwrite"])


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory):
    """A random 2-layer Qwen2 with a BPE tokenizer trained here (no pad token: eos must stand in)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny_lm")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [embed.item_text(it) for it in ITEMS] * 4
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def test_embed_causal_lm_pooling_is_batch_invariant(items_dir, tiny_causal_lm):
    assert cli(["embed", "--out_dir", str(items_dir), "--encoder", str(tiny_causal_lm), "--batch_size", "4"]) == 0
    emb = np.load(DataDir(items_dir).emb)
    meta = read_json(DataDir(items_dir).emb_meta)
    assert emb.shape == (5, 32) and meta["encoder_kind"] == "causal" and meta["dim"] == 32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(r, 5)) for r in emb}) == 5

    # one text at a time (no padding at all) gives the same vectors: padding is masked out
    enc = embed.TextEncoder(str(tiny_causal_lm), device="cpu")
    texts = embed.load_item_texts(items_dir / "items.jsonl", embed.DEFAULT_FIELDS)
    single = enc.encode(texts, batch_size=1, progress=False)
    np.testing.assert_allclose(emb, single, atol=1e-5)

    # and the pooling is the plain mean of the decoder's last hidden state
    import torch

    ids = enc.tokenizer(texts[3], return_tensors="pt")
    with torch.no_grad():
        h = enc.model(**ids).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(single[3], (h / h.norm()).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- sid

def _clustered(n, d, n_clusters, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, d))
    return (centers[rng.integers(0, n_clusters, n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


def _assert_unique_equal_length(res: sid.SidResult):
    assert len({tuple(t) for t in res.tokens}) == len(res.tokens)
    assert len({len(t) for t in res.tokens}) == 1
    assert res.stats["collisions_after_fix"] == 0


@pytest.mark.parametrize("method", sid.METHODS)
@pytest.mark.parametrize("dedup", sid.DEDUP)
def test_zero_collisions_when_forced(method, dedup):
    # 50 items, only 10 distinct vectors, 2 levels x 2 codes: at most 4 tuples for 50 items
    base = np.random.default_rng(1).normal(size=(10, 8)).astype(np.float32)
    emb = np.repeat(base, 5, axis=0)
    res = sid.build_sids(emb, levels=2, codebook_size=2, method=method, dedup=dedup, progress=False)
    _assert_unique_equal_length(res)
    s = res.stats
    assert s["collisions_before_fix"] >= 46
    assert s["sid_length"] == 3 and s["extra_level"]
    assert s["codebook_sizes"][:2] == [2, 2] and s["codebook_sizes"][2] >= 13  # >= ceil(50 / 4)
    if dedup == "reassign":  # each prefix has 2 last-level codes, so few can move; the rest are extended
        assert s["items_reassigned"] <= 4 and s["items_reassign_failed"] > 0
    assert s["items_extended"] == s["collisions_before_fix"] - s["items_reassigned"]
    assert res.tokens[0][0].startswith("<a_") and res.tokens[0][2].startswith("<c_")


def test_reassign_keeps_length_when_free_codes_exist():
    emb = _clustered(200, 16, 40, seed=3, spread=0.0)  # exact duplicates inside each of 40 groups
    res = sid.build_sids(emb, levels=3, codebook_size=16, dedup="reassign", progress=False)
    _assert_unique_equal_length(res)
    s = res.stats
    assert s["collisions_before_fix"] > 0
    assert s["items_reassigned"] == s["collisions_before_fix"] and s["items_reassign_failed"] == 0
    assert s["sid_length"] == 3 and not s["extra_level"] and s["items_extended"] == 0


def test_small_catalogue_caps_codebook():
    emb = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    res = sid.build_sids(emb, levels=2, codebook_size=256, progress=False)
    _assert_unique_equal_length(res)
    assert res.stats["codebook_sizes"][:2] == [7, 7]


@pytest.mark.parametrize("method", sid.METHODS)
def test_deterministic_under_seed(method):
    emb = _clustered(600, 12, 30, seed=5, spread=0.3)
    kw = {"levels": 3, "codebook_size": 8, "method": method, "train_size": 400, "progress": False,
          "vae": sid.RQVAEConfig(epochs=5)}  # (ignored by the k-means methods)
    a = sid.build_sids(emb, seed=7, **kw)
    b = sid.build_sids(emb, seed=7, **kw)
    c = sid.build_sids(emb, seed=8, **kw)
    assert a.tokens == b.tokens and a.new_tokens == b.new_tokens
    assert a.tokens != c.tokens


def test_balanced_assign_respects_capacity():
    d2 = np.random.default_rng(0).random((103, 10)).astype(np.float32)
    lab = sid.balanced_assign(d2, capacity=11)
    assert (lab >= 0).all() and np.bincount(lab, minlength=10).max() <= 11
    # with room for everybody it is the nearest-centroid assignment
    np.testing.assert_array_equal(sid.balanced_assign(d2, capacity=103), d2.argmin(1))
    with pytest.raises(ValueError):
        sid.balanced_assign(d2, capacity=10)


def test_balanced_beats_plain_on_skewed_data():
    rng = np.random.default_rng(0)
    n, k = 2000, 32
    blob = 0.05 * rng.normal(size=(1800, 16))  # 90 % of the items in one tight blob
    spread = 3.0 * rng.normal(size=(200, 16))  # 10 % spread widely
    emb = np.concatenate([blob, spread]).astype(np.float32)
    kw = {"levels": 2, "codebook_size": k, "dedup": "extend", "progress": False}  # reassign would move last-level codes
    plain = sid.build_sids(emb, method="rqkmeans", **kw).stats
    bal = sid.build_sids(emb, method="rqkmeans_balanced", **kw).stats
    for lvl in range(2):
        assert bal["per_level"][lvl]["max_cluster"] <= math.ceil(n / k)
        assert bal["per_level"][lvl]["entropy_ratio"] > plain["per_level"][lvl]["entropy_ratio"]
    assert plain["per_level"][0]["max_cluster"] > 2 * math.ceil(n / k)
    assert bal["unique_prefixes"][1] > plain["unique_prefixes"][1]  # more distinct (a, b) pairs in use
    assert bal["collisions_before_fix"] < plain["collisions_before_fix"]


def test_prefixes_are_validated():
    emb = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="prefixes"):
        sid.build_sids(emb, levels=3, prefixes="a,b,c", progress=False)
    with pytest.raises(ValueError, match="single letters"):
        sid.parse_prefixes("a,bb,c")


def test_sid_stage_files_and_cache(items_dir, capsys):
    d = DataDir(items_dir)
    emb = _clustered(5, 8, 2, seed=0, spread=0.0)  # 2 distinct vectors for 5 items: collisions guaranteed
    np.save(d.emb, emb)
    # plain RQ-KMeans keeps identical vectors together (balanced clusters would split them): collisions to fix
    args = ["sid", "--out_dir", str(items_dir), "--levels", "2", "--codebook_size", "4", "--method", "rqkmeans",
            "--dedup", "extend"]
    assert cli(args) == 0
    id2sid = json.loads(d.id2sid.read_text())
    assert sorted(id2sid, key=int) == [str(i) for i in range(5)]
    assert all(SID_TOKEN_RE.fullmatch(t) for v in id2sid.values() for t in v)
    assert len({tuple(v) for v in id2sid.values()}) == 5
    new_tokens = read_json(d.new_tokens)
    stats = read_json(d.sid_stats)
    assert len(set(new_tokens)) == len(new_tokens)
    assert {t for v in id2sid.values() for t in v} <= set(new_tokens)
    sizes = stats["codebook_sizes"]
    assert stats["extra_level"] and len(sizes) == 3 and sizes[:2] == [4, 4]
    assert len(new_tokens) == sum(sizes) and new_tokens[:2] == ["<a_0>", "<a_1>"]
    assert stats["collisions_before_fix"] >= 3 and stats["items_extended"] == stats["collisions_before_fix"]
    for key in ("levels", "per_level", "seconds", "settings", "items_reassigned"):
        assert key in stats

    # up to date -> skipped; a changed setting -> recomputed
    mtime = os.stat(d.id2sid).st_mtime_ns
    capsys.readouterr()
    assert cli(args) == 0
    assert "up to date" in capsys.readouterr().out and os.stat(d.id2sid).st_mtime_ns == mtime
    assert cli(args + ["--new_tokens", "used"]) == 0
    used = read_json(d.new_tokens)
    assert set(used) == {t for v in json.loads(d.id2sid.read_text()).values() for t in v}
    # the default fix (reassign) keeps 2 tokens: each prefix has 4 last-level codes for <= 5 items
    assert cli(args[:-2]) == 0
    stats = read_json(d.sid_stats)
    assert stats["dedup"] == "reassign" and stats["items_reassigned"] == stats["collisions_before_fix"] > 0
    assert {len(v) for v in json.loads(d.id2sid.read_text()).values()} == {2}

    # embeddings that do not match items.jsonl are refused
    np.save(d.emb, emb[:4])
    with pytest.raises(BadInputError, match="re-run embed"):
        sid.run(sid_args(items_dir))


def sid_args(out_dir, *extra):
    import argparse

    p = argparse.ArgumentParser()
    sid.add_arguments(p)
    return p.parse_args(["--out_dir", str(out_dir), *extra])


def test_sid_cf_weight_quantizes_text_beside_the_valid_protocol_sasrec(tmp_path, capsys):
    """--cf_weight W: the vectors quantized are [unit(text), W * unit(SASRec item embedding)], from
    the SASRec that scores valid (never trained or stopped on a valid or test target), with a zero
    collaborative part for items in no train sequence; the setting is in the fingerprint, so W = 0
    and W > 0 are not mistaken for each other."""
    from mimigenrec.toy_data import make_dataset
    from preprocess.cf_embed import sasrec_item_vectors, with_collaborative
    from rewards.collaborative import _reward_model

    d = make_dataset(tmp_path / "ds", n_items=40)
    text = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    np.save(d.emb, text)
    cf = sasrec_item_vectors(d.root, 40)
    scorer, _, _ = _reward_model(str(d.root.resolve()), None, "valid")
    assert scorer.info["early_stopping_rows"].startswith("each user's last train row")
    weight = scorer.model.item_emb.weight[1:].detach().numpy()
    in_train = {i for r in read_jsonl(d.inter("train")) for i in r["history"] + [r["target"]]}
    for i in range(40):
        want = weight[i] if i in in_train else np.zeros_like(weight[i])
        np.testing.assert_allclose(cf[i], want, atol=1e-6)
    assert len(in_train) < 40  # the toy data leaves some items out of train: their part is 0
    x = with_collaborative(text, d.root, 0.5)
    assert x.shape == (40, 8 + weight.shape[1])
    np.testing.assert_allclose(np.linalg.norm(x[:, :8], axis=1), 1.0, atol=1e-5)
    norms = np.linalg.norm(x[:, 8:], axis=1)
    assert all(abs(n - (0.5 if i in in_train else 0.0)) < 1e-5 for i, n in enumerate(norms))
    assert with_collaborative(text, d.root, 0.0) is text

    base = ["sid", "--out_dir", str(d.root), "--levels", "2", "--codebook_size", "4", "--method", "rqkmeans"]
    assert cli(base) == 0
    text_only = read_json(d.sid_stats)["settings"]
    assert "cf_weight" not in text_only and text_only["emb_sha256"] == sha(text)
    assert cli(base + ["--cf_weight", "1"]) == 0
    s = read_json(d.sid_stats)["settings"]
    assert s["cf_weight"] == 1.0 and s["emb_sha256"] == sha(with_collaborative(text, d.root, 1.0))
    capsys.readouterr()
    assert cli(base + ["--cf_weight", "1"]) == 0 and "up to date" in capsys.readouterr().out
    with pytest.raises(BadInputError, match="--cf_weight -1"):
        sid.run(sid_args(d.root, "--cf_weight", "-1"))


def sha(x):
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
