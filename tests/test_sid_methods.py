"""RQ-VAE / RQ-Kmeans+ semantic IDs and the codebook diagnostics of every sid method."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_embed_sid import _clustered

from mimigenrec.io import DataDir, read_json, write_jsonl
from preprocess import sid
from preprocess.__main__ import main as cli
from preprocess.sid_rqvae import RQVAE, _reinit_dead, train_rqvae


def test_level_usage_hand_computed():
    u = sid.level_usage(np.array([0, 0, 1, 2]), 4)
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert (u["used"], u["utilisation"], u["max_cluster"], u["min_cluster"]) == (3, 0.75, 2, 1)
    assert u["entropy"] == pytest.approx(h, abs=1e-4) and u["perplexity"] == pytest.approx(math.exp(h), abs=1e-3)
    assert u["entropy_ratio"] == pytest.approx(h / math.log(4), abs=1e-4) and u["max_cluster_share"] == 0.5
    assert sid.largest_group(np.array([[0, 1], [0, 1], [0, 1], [2, 0]])) == 3
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert sid.relative_error(x, np.zeros_like(x)) == 1.0 and sid.relative_error(x, x) == 0.0


def test_rqkmeans_plus_starts_as_rqkmeans():
    """With no training the residual encoder/decoder are the identity and the codebooks RQ-KMeans'."""
    emb = _clustered(400, 16, 12, seed=2, spread=0.2)
    kw = {"levels": 2, "codebook_size": 8, "seed": 3, "dedup": "extend", "progress": False}
    plain = sid.build_sids(emb, method="rqkmeans", **kw)
    plus0 = sid.build_sids(emb, method="rqkmeans_plus", vae=sid.RQVAEConfig(epochs=0), **kw)
    assert plus0.tokens == plain.tokens
    assert plus0.stats["reconstruction"]["relative_mse_before_fix"] == pytest.approx(
        plain.stats["reconstruction"]["relative_mse_before_fix"], rel=1e-3)
    trained = sid.build_sids(emb, method="rqkmeans_plus", vae=sid.RQVAEConfig(epochs=30, batch_size=64), **kw)
    t = trained.stats["training"]
    assert t["latent_dim"] == 16 and t["steps"] == 30 * 6
    assert t["loss_last_epoch"]["rec"] < t["loss_first_epoch"]["rec"]  # training moved it


def test_rqvae_learns_and_stats():
    emb = _clustered(1200, 24, 40, seed=4, spread=0.15)
    cfg = sid.RQVAEConfig(epochs=40, batch_size=128, hidden=(64, 32), latent_dim=8)
    res = sid.build_sids(emb, levels=3, codebook_size=16, method="rqvae", seed=0, vae=cfg, progress=False)
    s = res.stats
    t = s["training"]
    assert t["latent_dim"] == 8 and t["config"]["hidden"] == [64, 32] and len(t["dead_codes_reinitialised"]) == 3
    assert t["loss_last_epoch"]["rec"] < 0.5 * t["loss_first_epoch"]["rec"]
    # the decoder's reconstruction in embedding space is far better than the mean vector (error 1 - |mean|^2/E|x|^2)
    mean_err = sid.relative_error(emb, np.broadcast_to(emb.mean(0), emb.shape))
    assert s["reconstruction"]["relative_mse_before_fix"] < 0.5 * mean_err
    assert s["per_level"][0]["used"] >= 12 and s["collisions_after_fix"] == 0
    assert len({tuple(x) for x in res.tokens}) == len(emb)
    assert s["items_moved"] == s["items_reassigned"] + s["items_extended"]


def test_dead_codes_take_the_worst_quantized_residuals():
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    model = RQVAE(6, 2, 4, sid.RQVAEConfig(hidden=(8,), latent_dim=3))
    with torch.no_grad():
        model.codebooks.normal_()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rec, vq, _, _ = model(x)
    (rec + vq).backward()
    opt.step()
    before = model.codebooks.detach().clone()
    used = torch.ones(2, 4, dtype=torch.long)
    used[0, 1] = used[1, 3] = used[1, 0] = 0
    counts = _reinit_dead(model, opt, used, x, torch.Generator().manual_seed(0))
    assert counts == [1, 2]
    after = model.codebooks.detach()
    changed = (after != before).any(-1)
    assert changed.tolist() == [[False, True, False, False], [True, False, False, True]]
    with torch.no_grad():
        _, _, _, residuals = model.quantize(model.encode(x))
    # the new level-0 code is the level-0 residual (= latent) of an item, the one level 0 quantized worst
    r0 = residuals[0]
    err = ((r0[:, None] - before[0][None]) ** 2).sum(-1).min(1).values
    assert torch.allclose(after[0, 1], r0[err.argmax()])
    state = opt.state[model.codebooks]
    assert (state["exp_avg"][0, 1] == 0).all() and (state["exp_avg_sq"][1, 3] == 0).all()
    assert (state["exp_avg_sq"][0, 0] != 0).any()


def test_rqvae_seeded():
    emb = _clustered(300, 10, 8, seed=1, spread=0.3)
    cfg = sid.RQVAEConfig(epochs=3, hidden=(16,), latent_dim=4)
    a, b, c = (train_rqvae(emb, 2, 8, cfg, seed=s, progress=False) for s in (5, 5, 6))
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.codebooks[1], b.codebooks[1])
    assert not np.array_equal(a.codebooks[0], c.codebooks[0])


@pytest.fixture()
def emb_dir(tmp_path):
    emb = _clustered(120, 8, 6, seed=0, spread=0.2)
    write_jsonl(tmp_path / "items.jsonl", [{"item_id": i, "title": f"t{i}"} for i in range(len(emb))])
    np.save(tmp_path / "item_emb.npy", emb)
    return tmp_path


@pytest.mark.parametrize("method", sid.METHODS)
def test_sid_stage_diagnostics_every_method(emb_dir, capsys, method):
    d = DataDir(emb_dir)
    args = ["sid", "--out_dir", str(emb_dir), "--levels", "2", "--codebook_size", "8", "--method", method,
            "--vae_epochs", "3", "--vae_hidden", "16", "--vae_latent_dim", "4"]
    assert cli(args) == 0
    err = capsys.readouterr().err
    stats = read_json(d.sid_stats)
    for u in stats["per_level"]:
        assert {"utilisation", "perplexity", "entropy", "entropy_ratio", "max_cluster", "max_cluster_share"} <= set(u)
        assert 1.0 <= u["perplexity"] <= u["codebook_size"] + 1e-6
    assert {"relative_mse", "relative_mse_before_fix"} <= set(stats["reconstruction"])
    assert stats["items_moved"] == stats["items_reassigned"] + stats["items_extended"]
    assert stats["usage_plot"] == "sid_usage.png" and ("training" in stats) == (method in sid.VAE_METHODS)
    assert "perplexity" in err and "reconstruction error" in err and "largest bucket" in err
    png = d.sid_usage.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    ids = json.loads(d.id2sid.read_text())
    assert len({tuple(v) for v in ids.values()}) == 120


def test_vae_settings_key_the_cache(emb_dir, capsys):
    base = ["sid", "--out_dir", str(emb_dir), "--levels", "2", "--codebook_size", "8", "--vae_hidden", "16",
            "--vae_latent_dim", "4"]
    assert cli(base + ["--method", "rqvae", "--vae_epochs", "2"]) == 0
    capsys.readouterr()
    assert cli(base + ["--method", "rqvae", "--vae_epochs", "2"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli(base + ["--method", "rqvae", "--vae_epochs", "3"]) == 0  # a VAE setting changed
    assert read_json(DataDir(emb_dir).sid_stats)["training"]["epochs"] == 3
    assert cli(base + ["--method", "rqkmeans"]) == 0
    capsys.readouterr()
    assert cli(base + ["--method", "rqkmeans", "--vae_epochs", "9"]) == 0  # irrelevant to rqkmeans
    assert "up to date" in capsys.readouterr().out
    DataDir(emb_dir).sid_usage.unlink()  # a missing output is redone
    assert cli(base + ["--method", "rqkmeans"]) == 0
    assert DataDir(emb_dir).sid_usage.is_file()


def test_bad_vae_hidden_is_a_usage_error(emb_dir, capsys):
    with pytest.raises(SystemExit):
        cli(["sid", "--out_dir", str(emb_dir), "--vae_hidden", "64,x"])
    assert "512,256,128" in capsys.readouterr().err
