"""Semantic IDs: residual k-means (plain or balanced) over item_emb.npy, unique per item by construction.

Reads ``O/item_emb.npy`` (row = item_id) and writes ``O/id2sid.json``, ``O/new_tokens.json``
and ``O/sid_stats.json``.

Quantization. ``L`` levels of ``K`` codes. Level 0 clusters the embeddings, level ``l``
clusters the residuals left by levels ``0..l-1``. Centroids are trained on a seeded sample
of ``--train_size`` items and every item is then assigned. ``K`` is capped at the number of
items (``K_eff = min(K, n_items)``), since more centroids than points cannot be trained.

* ``rqkmeans``: faiss k-means per level, nearest-centroid assignment.
* ``rqkmeans_balanced``: the same k-means as a start, then Lloyd iterations whose assignment
  step is capacity-constrained (every cluster holds at most ``ceil(n / K_eff)`` points):
  each unplaced point proposes to its nearest non-full cluster, each cluster accepts its
  closest proposers up to its remaining capacity, repeat until all are placed. The final
  assignment of all items uses the same rule, so every level's cluster sizes are balanced.
* ``rqvae``: an RQ-VAE (MLP encoder/decoder, ``L`` residual codebooks in a 32-d latent, k-means
  init, commitment loss, dead-code re-init), trained on all items (``preprocess/sid_rqvae.py``).
* ``rqkmeans_plus``: RQ-Kmeans+: the RQ-VAE with a residual encoder ``z = x + f(x)`` and decoder,
  both starting as the identity, and codebooks starting as the RQ-KMeans codebooks of ``x``.
  For both, collisions are resolved in the latent space with the same rules as below.

Collisions. Items that still share a full code tuple are disambiguated (``--dedup``); in
every group of items sharing a tuple, the item closest to its reconstruction keeps it:

* ``reassign`` (default): every other item of the group moves to the nearest last-level code
  (by its residual before the last level) whose full tuple is still free under the same prefix,
  so SIDs stay ``L`` tokens long and every token keeps its meaning. Items whose prefix has no
  free code left fall back to ``extend`` (counted in ``sid_stats.json``).
* ``extend``: one more level is appended to EVERY item, so all SIDs keep the same length:
  ``<d_0>`` for the item that keeps the tuple, ``<d_1>``, ``<d_2>``... for the others.

Either way all SIDs of a dataset have the same length (``L``, or ``L + 1`` only when some
collision needed the extra level). Uniqueness is asserted before anything is written.

Tokens. Level ``l`` uses the ``l``-th letter of ``--token_prefixes``: ``<a_12><b_3><c_200>``.
``new_tokens.json`` lists every token of each level's codebook (``K_eff`` per quantized level,
and ``<d_0>..<d_m>`` up to the largest index used when the extra level exists), ordered by level
then code number, so the vocabulary depends only on the settings, not on which codes happen
to be used; the trie still restricts generation to real items. With ``--item_tokens`` it also lists
one ``<item_N>`` per item, after the SID tokens (the ``sid_item_seq`` task's history view).

Diagnostics (``sid_stats.json`` and a printed table): per level, codes used / utilisation,
perplexity ``exp(H)`` and entropy ``H`` (nats; ``entropy_ratio = H / ln K``) of the code
distribution, largest and smallest bucket; the largest group of items that shared one full SID
before the fix, the items moved to resolve collisions, and the relative reconstruction error
``mean ||x - x̂||² / mean ||x||²`` in embedding space before and after the fix (``x̂`` = sum of the
chosen centroids, or the decoder's output for the RQ-VAE methods). ``sid_usage.png`` plots each
level's code counts, largest first.

faiss, torch and numpy use as many threads as ``OMP_NUM_THREADS`` allows.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from mimigenrec.io import (
    BadInputError,
    DataDir,
    add_out_dir_argument,
    atomic_outputs,
    read_json,
    read_jsonl,
    write_json,
)
from mimigenrec.prompts import item_token

METHODS = ("rqkmeans", "rqkmeans_balanced", "rqvae", "rqkmeans_plus")
KMEANS_METHODS = METHODS[:2]
VAE_METHODS = METHODS[2:]
DEDUP = ("reassign", "extend")
NEW_TOKENS = ("all", "used")
DEFAULT_PREFIXES = "a,b,c,d,e,f,g,h"
DEFAULT_METHOD, DEFAULT_SEED = "rqkmeans_balanced", 42  # `all` uses the same
_PREFIX_RE = re.compile(r"^[a-z]$")  # prompts.SID_TOKEN_RE matches <[a-z]_\d+>


@dataclass
class RQVAEConfig:
    """Hyper-parameters of the RQ-VAE methods (``preprocess/sid_rqvae.py``; options ``--vae_*``)."""

    hidden: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 32  # ignored with residual=True (latent = input dim)
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    beta: float = 0.25  # commitment weight
    quant_weight: float = 1.0  # codebook + commitment loss beside the reconstruction loss
    dead_code_reinit: bool = True
    residual: bool = False  # RQ-Kmeans+: residual encoder/decoder started at the identity
    kmeans_niter: int = 20
    train_size: int = 20000  # items sampled for the k-means init


RQVAE_DEFAULTS = RQVAEConfig()


# ----------------------------------------------------------------------------- quantization

def _faiss():
    import faiss

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        faiss.omp_set_num_threads(int(threads))
    return faiss


def sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared L2 distances ``[n, k]`` between rows of ``x`` and rows of ``c`` (float32, >= 0)."""
    d = (x * x).sum(1, keepdims=True) - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0, out=d)


def nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest row of ``c`` for every row of ``x`` (faiss exact search)."""
    faiss = _faiss()
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(np.ascontiguousarray(c, dtype=np.float32))
    _, lab = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return lab[:, 0].astype(np.int64)


def kmeans(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """faiss k-means centroids ``[k, d]`` of the rows of ``x`` (needs ``len(x) >= k``)."""
    faiss = _faiss()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 20)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])


def balanced_assign(d2: np.ndarray, capacity: int) -> np.ndarray:
    """Assign each row of the distance matrix ``d2 [n, k]`` to a column, at most ``capacity`` per column.

    Rounds of proposals: every unplaced row proposes to its nearest column that still has room;
    a column accepts its closest proposers up to its remaining room; rejected rows propose again.
    Each round fills at least one column or places every proposer, so it ends in ``<= k + 1``
    rounds. Deterministic (ties broken by row order).
    """
    n, k = d2.shape
    if capacity * k < n:
        raise ValueError(f"capacity {capacity} x {k} clusters cannot hold {n} points")
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(k, capacity, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        d = d2[todo]
        d[:, room == 0] = np.inf
        choice = d.argmin(1)
        dist = d[np.arange(todo.size), choice]
        order = np.lexsort((np.arange(todo.size), dist, choice))  # by cluster, then distance, then row
        ch = choice[order]
        rank = np.arange(ch.size) - np.searchsorted(ch, ch, side="left")
        ok = rank < room[ch]
        labels[todo[order[ok]]] = ch[ok]
        room -= np.bincount(ch[ok], minlength=k)
        todo = np.sort(todo[order[~ok]])
    return labels


def balanced_kmeans(x: np.ndarray, k: int, seed: int, niter: int, balanced_iters: int) -> np.ndarray:
    """Centroids from k-means refined by ``balanced_iters`` capacity-constrained Lloyd iterations."""
    cent = kmeans(x, k, seed, niter)
    cap = math.ceil(len(x) / k)
    for _ in range(balanced_iters):
        lab = balanced_assign(sq_dists(x, cent), cap)
        new = cent.copy()
        order = np.argsort(lab, kind="stable")
        filled, starts, counts = np.unique(lab[order], return_index=True, return_counts=True)
        sums = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
        new[filled] = (sums / counts[:, None]).astype(np.float32)
        if np.allclose(new, cent, atol=1e-7):
            break
        cent = new
    return cent


@dataclass
class Quantized:
    """Codes ``[n, L]``, codebooks ``[L][k, d]`` and the residual before each level ``[L][n, d]``."""

    codes: np.ndarray
    codebooks: list[np.ndarray]
    residuals: list[np.ndarray]
    final_residual: np.ndarray


def residual_quantize(
    emb: np.ndarray,
    levels: int,
    k: int,
    method: str = "rqkmeans",
    seed: int = 0,
    train_size: int = 20000,
    niter: int = 20,
    balanced_iters: int = 10,
    progress: bool = True,
) -> Quantized:
    """Residual k-means of ``emb`` (``L = levels`` codebooks of ``k`` codes, trained on a seeded sample)."""
    if method not in KMEANS_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {KMEANS_METHODS}")
    x = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(x)
    n_train = min(n, max(train_size, k))
    train_idx = np.arange(n) if n_train == n else np.sort(
        np.random.default_rng(seed).choice(n, n_train, replace=False))
    cap = math.ceil(n / k)
    codes = np.zeros((n, levels), dtype=np.int64)
    books, residuals = [], []
    r = x.copy()
    for lvl in tqdm(range(levels), desc=f"sid {method}", unit="level", disable=not progress):
        residuals.append(r.copy())
        xt = r[train_idx]
        if method == "rqkmeans":
            cent = kmeans(xt, k, seed + lvl, niter)
            lab = nearest(r, cent)
        else:
            cent = balanced_kmeans(xt, k, seed + lvl, niter, balanced_iters)
            lab = balanced_assign(sq_dists(r, cent), cap)
        codes[:, lvl] = lab
        books.append(cent)
        r = r - cent[lab]
    return Quantized(codes=codes, codebooks=books, residuals=residuals, final_residual=r)


# ----------------------------------------------------------------------------- collisions

def _group_rank(codes: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Rank of each item among those sharing its code tuple, by (error, item_id); 0 = keeps the tuple."""
    n = len(codes)
    keys = [np.arange(n), err] + [codes[:, j] for j in range(codes.shape[1] - 1, -1, -1)]
    order = np.lexsort(keys)
    sc = codes[order]
    new_group = np.ones(n, dtype=bool)
    if n > 1:
        new_group[1:] = (sc[1:] != sc[:-1]).any(1)
    starts = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts
    return rank


def count_collisions(codes: np.ndarray) -> int:
    """Items that share their full code tuple with another item, beyond the first of each tuple."""
    return int(len(codes) - len(np.unique(codes, axis=0))) if len(codes) else 0


def dedup_extend(codes: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, int]:
    """Append one level (index within the tuple's group) to every item if any tuple is shared.

    Returns the new codes and the number of items that needed it (index > 0).
    """
    rank = _group_rank(codes, err)
    moved = int((rank > 0).sum())
    if moved == 0:
        return codes, 0
    return np.concatenate([codes, rank[:, None]], axis=1), moved


def dedup_reassign(codes: np.ndarray, err: np.ndarray, last_residual: np.ndarray,
                   last_book: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Move colliding items to the nearest free last-level code under their prefix.

    ``last_residual`` is each item's residual before the last level, ``last_book`` that level's
    codebook. Returns (codes, items reassigned, items left colliding because their prefix is full).
    """
    codes = codes.copy()
    rank = _group_rank(codes, err)
    movers = np.flatnonzero(rank > 0)
    if movers.size == 0:
        return codes, 0, 0
    used = set(map(tuple, codes[rank == 0].tolist()))
    order = np.argsort(sq_dists(last_residual[movers], last_book), axis=1, kind="stable")
    # process in a fixed order: by tuple, then rank
    seq = np.lexsort([rank[movers]] + [codes[movers, j] for j in range(codes.shape[1] - 1, -1, -1)])
    moved = stuck = 0
    for i in seq:
        item = movers[i]
        prefix = tuple(codes[item, :-1].tolist())
        for c in order[i].tolist():
            if prefix + (c,) not in used:
                codes[item, -1] = c
                used.add(prefix + (c,))
                moved += 1
                break
        else:
            used.add(tuple(codes[item].tolist()))
            stuck += 1
    return codes, moved, stuck


# ----------------------------------------------------------------------------- tokens / stats

def parse_prefixes(spec: str | Sequence[str]) -> list[str]:
    """``"a,b,c"`` -> ``["a","b","c"]``; each a distinct single lowercase letter."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    bad = [p for p in parts if not _PREFIX_RE.match(p)]
    if bad or len(set(parts)) != len(parts):
        raise ValueError(f"token prefixes must be distinct single letters a-z, got {parts}")
    return parts


def token(prefix: str, code: int) -> str:
    return f"<{prefix}_{int(code)}>"


def level_usage(codes: np.ndarray, k: int) -> dict[str, Any]:
    """How a level's codebook is used: codes used, utilisation, perplexity, entropy, bucket sizes."""
    counts = np.bincount(codes, minlength=k)
    nz = counts[counts > 0]
    p = nz / nz.sum()
    ent = float(-(p * np.log(p)).sum())
    return {
        "codebook_size": int(k),
        "used": len(nz),
        "utilisation": round(len(nz) / k, 4),
        "perplexity": round(math.exp(ent), 3),
        "entropy": round(ent, 4),
        "entropy_ratio": round(ent / math.log(k), 4) if k > 1 else 1.0,
        "max_cluster": int(nz.max()),
        "max_cluster_share": round(float(nz.max()) / len(codes), 4),
        "min_cluster": int(nz.min()),
    }


def largest_group(codes: np.ndarray) -> int:
    """Size of the largest group of rows sharing one full code tuple."""
    return int(np.unique(codes, axis=0, return_counts=True)[1].max()) if len(codes) else 0


def relative_error(emb: np.ndarray, recon: np.ndarray) -> float:
    """``mean ||x - x̂||² / mean ||x||²`` (0 when every x is 0)."""
    x = np.asarray(emb, dtype=np.float64)
    norm2 = float((x ** 2).sum(1).mean())
    return round(float(((x - recon) ** 2).sum(1).mean()) / norm2, 6) if norm2 > 0 else 0.0


def plot_usage(codes: np.ndarray, sizes: Sequence[int], path: str | os.PathLike, title: str = "") -> None:
    """PNG of each level's code counts, largest first (one panel per level, utilisation and perplexity in its title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes), 2.8), squeeze=False)
    for lvl, (ax, k) in enumerate(zip(axes[0], sizes)):
        counts = np.sort(np.bincount(codes[:, lvl], minlength=k))[::-1]
        u = level_usage(codes[:, lvl], k)
        ax.bar(np.arange(k), counts, width=1.0, color="C0")
        ax.axhline(len(codes) / k, color="C3", lw=0.8, ls="--", label="uniform")
        ax.set_title(f"level {lvl}: {u['used']}/{k} used, ppl {u['perplexity']:.0f}", fontsize=9)
        ax.set_xlabel("code (by count)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("items", fontsize=8)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_outputs([path], "wb") as (f,):
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def summary_lines(stats: dict[str, Any]) -> list[str]:
    """The printed diagnostics table of :func:`build_sids`' stats."""
    lines = [f"{'level':>5} {'used/K':>9} {'util':>6} {'perplexity':>10} {'entropy':>7} {'H/lnK':>6} "
             f"{'largest bucket':>15}"]
    for lvl, u in enumerate(stats["per_level"]):
        lines.append(f"{lvl:>5} {str(u['used']) + '/' + str(u['codebook_size']):>9} {u['utilisation']:>6.3f} "
                     f"{u['perplexity']:>10.1f} {u['entropy']:>7.3f} {u['entropy_ratio']:>6.3f} "
                     f"{u['max_cluster']:>7} ({100 * u['max_cluster_share']:.1f}%)")
    r = stats["reconstruction"]
    lines.append(f"collisions {stats['collisions_before_fix']} (largest shared SID: {stats['largest_collision_group']} "
                 f"items), moved {stats['items_moved']} ({stats['items_reassigned']} reassigned, "
                 f"{stats['items_extended']} extended); reconstruction error {r['relative_mse_before_fix']:.4f} "
                 f"before the fix, {r['relative_mse']:.4f} after")
    return lines


@dataclass
class SidResult:
    """Final per-item codes ``[n, L or L+1]``, the token lists and the statistics."""

    codes: np.ndarray
    tokens: list[list[str]]
    new_tokens: list[str]
    stats: dict[str, Any] = field(default_factory=dict)


def build_sids(
    emb: np.ndarray,
    *,
    levels: int = 3,
    codebook_size: int = 256,
    method: str = "rqkmeans",
    seed: int = 0,
    train_size: int = 20000,
    dedup: str = "reassign",
    prefixes: str | Sequence[str] = DEFAULT_PREFIXES,
    new_tokens: str = "all",
    niter: int = 20,
    balanced_iters: int = 10,
    vae: RQVAEConfig | None = None,
    progress: bool = True,
) -> SidResult:
    """Quantize ``emb`` into unique semantic IDs (see the module docstring for every choice).

    ``vae`` is an :class:`RQVAEConfig` for the RQ-VAE methods (default settings
    if None; its ``residual`` flag is set by the method)."""
    t0 = time.perf_counter()
    if emb.ndim != 2 or len(emb) == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array, got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or inf")
    if levels < 1 or codebook_size < 1:
        raise ValueError("levels and codebook_size must be >= 1")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if dedup not in DEDUP or new_tokens not in NEW_TOKENS:
        raise ValueError(f"dedup must be one of {DEDUP}, new_tokens one of {NEW_TOKENS}")
    pre = parse_prefixes(prefixes)
    if len(pre) < levels + 1:
        raise ValueError(f"need {levels + 1} token prefixes (levels + a spare for the dedup level), got {pre}")
    n = len(emb)
    k = min(codebook_size, n)
    training = None
    if method in VAE_METHODS:
        from dataclasses import replace

        from .sid_rqvae import train_rqvae

        cfg = replace(vae or RQVAEConfig(), residual=method == "rqkmeans_plus", train_size=train_size,
                      kmeans_niter=niter)
        q = train_rqvae(emb, levels, k, cfg, seed=seed, progress=progress)
        reconstruct, training = q.reconstruct, q.training
    else:
        q = residual_quantize(emb, levels, k, method, seed, train_size, niter, balanced_iters, progress)
        books = q.codebooks

        def reconstruct(c: np.ndarray) -> np.ndarray:
            return sum(books[j][c[:, j]] for j in range(levels))
    err = (q.final_residual ** 2).sum(1)
    codes = q.codes
    before = count_collisions(codes)
    reassigned = stuck = 0
    if dedup == "reassign" and before:
        codes, reassigned, stuck = dedup_reassign(codes, err, q.residuals[-1], q.codebooks[-1])
    codes, extended = dedup_extend(codes, err)
    if count_collisions(codes) != 0:  # cannot happen: the extra level ranks items within each tuple
        raise AssertionError("semantic IDs are not unique after deduplication")
    sizes = [k] * levels + ([int(codes[:, -1].max()) + 1] if codes.shape[1] > levels else [])
    toks = [[token(pre[j], c) for j, c in enumerate(row)] for row in codes.tolist()]
    if new_tokens == "all":
        vocab = [token(pre[j], c) for j, s in enumerate(sizes) for c in range(s)]
    else:
        vocab = [token(pre[j], c) for j in range(codes.shape[1]) for c in np.unique(codes[:, j])]
    # quantized space: the embeddings (k-means methods) or the encoder's latent (RQ-VAE methods)
    norm2 = float((np.asarray(q.residuals[0], dtype=np.float64) ** 2).sum(1).mean())
    stats = {
        "method": method,
        "dedup": dedup,
        "n_items": n,
        "levels": levels,
        "sid_length": int(codes.shape[1]),
        "codebook_size_requested": codebook_size,
        "codebook_sizes": sizes,
        "collisions_before_fix": before,
        "items_reassigned": reassigned,
        "items_reassign_failed": stuck,
        "items_extended": extended,
        "extra_level": codes.shape[1] > levels,
        "collisions_after_fix": 0,
        "unique_prefixes": [len(np.unique(q.codes[:, : j + 1], axis=0)) for j in range(levels)],
        "per_level": [level_usage(codes[:, j], s) for j, s in enumerate(sizes)],
        "largest_collision_group": largest_group(q.codes),
        "items_moved": reassigned + extended,
        "per_level_before_fix": [level_usage(q.codes[:, j], k) for j in range(levels)],
        "relative_quantization_error": round(float(err.mean()) / norm2, 6) if norm2 > 0 else 0.0,
        "reconstruction": {
            "space": "embedding",
            "relative_mse_before_fix": relative_error(emb, reconstruct(q.codes)),
            "relative_mse": relative_error(emb, reconstruct(codes[:, :levels])),
        },
        "n_new_tokens": len(vocab),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if training is not None:
        stats["training"] = training
    return SidResult(codes=codes, tokens=toks, new_tokens=vocab, stats=stats)


# ----------------------------------------------------------------------------- stage CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_out_dir_argument(p, "dataset directory holding item_emb.npy (and items.jsonl)")
    p.add_argument("--levels", type=int, default=3, help="number of residual quantization levels L")
    p.add_argument("--codebook_size", type=int, default=256,
                   help="codes per level K (capped at the number of items)")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help="plain residual k-means, with capacity-balanced clusters at every level, RQ-VAE, or "
                        "RQ-Kmeans+ (RQ-VAE with residual encoder/decoder started from RQ-KMeans)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for the training sample and k-means init")
    p.add_argument("--train_size", type=int, default=20000,
                   help="items sampled (seeded) to train the codebooks; all items are then assigned")
    p.add_argument("--niter", type=int, default=20, help="k-means iterations per level")
    p.add_argument("--balanced_iters", type=int, default=10,
                   help="capacity-constrained Lloyd iterations per level (rqkmeans_balanced only)")
    g = p.add_argument_group("rqvae / rqkmeans_plus")
    g.add_argument("--vae_epochs", type=int, default=RQVAE_DEFAULTS.epochs, help="training epochs over all items")
    g.add_argument("--vae_batch_size", type=int, default=RQVAE_DEFAULTS.batch_size, help="items per step")
    g.add_argument("--vae_lr", type=float, default=RQVAE_DEFAULTS.lr, help="Adam learning rate")
    g.add_argument("--vae_hidden", type=_int_list, default=",".join(map(str, RQVAE_DEFAULTS.hidden)),
                   help="hidden layer widths of the encoder (the decoder mirrors them)")
    g.add_argument("--vae_latent_dim", type=int, default=RQVAE_DEFAULTS.latent_dim,
                   help="latent (codebook) dimension of rqvae; rqkmeans_plus keeps the input dimension")
    g.add_argument("--vae_beta", type=float, default=RQVAE_DEFAULTS.beta, help="commitment loss weight")
    g.add_argument("--vae_quant_weight", type=float, default=RQVAE_DEFAULTS.quant_weight,
                   help="weight of the codebook + commitment loss beside the reconstruction loss")
    g.add_argument("--vae_dead_code_reinit", action=argparse.BooleanOptionalAction,
                   default=RQVAE_DEFAULTS.dead_code_reinit,
                   help="after each epoch, re-initialise codes no item used to the worst-quantized residuals")
    p.add_argument("--cf_weight", type=float, default=0.0,
                   help="quantize [text, W * SASRec item embedding] (both unit length) instead of the text alone: "
                        "items bought in the same contexts can share prefixes (preprocess/cf_embed.py; trains the "
                        "valid-protocol SASRec, cached in O/baselines; 0 = text only)")
    p.add_argument("--dedup", choices=DEDUP, default="reassign",
                   help="collision fix: reassign = move colliding items to the nearest free last-level code "
                        "(falling back to extend where a prefix is full); extend = one more level for every item")
    p.add_argument("--token_prefixes", default=DEFAULT_PREFIXES,
                   help="comma-separated letters, one per level, plus one spare for the extra dedup level")
    p.add_argument("--new_tokens", choices=NEW_TOKENS, default="all",
                   help="all = every codebook token of each level; used = only tokens some item uses")
    p.add_argument("--item_tokens", action="store_true",
                   help="also add one token per item, <item_N>, to new_tokens.json: the sid_item_seq task shows it "
                        "after each history item's SID (default: off)")
    p.add_argument("--overwrite", action="store_true", help="recompute even if the outputs are up to date")


def _int_list(spec: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in str(spec).split(",") if v.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive widths like 512,256,128, got {spec!r}")
    return out


def vae_config(args: argparse.Namespace) -> RQVAEConfig:
    """The :class:`RQVAEConfig` of the ``--vae_*`` options."""
    hidden = args.vae_hidden if isinstance(args.vae_hidden, tuple) else _int_list(args.vae_hidden)
    return RQVAEConfig(hidden=hidden, latent_dim=args.vae_latent_dim, epochs=args.vae_epochs,
                       batch_size=args.vae_batch_size, lr=args.vae_lr, beta=args.vae_beta,
                       quant_weight=args.vae_quant_weight, dead_code_reinit=args.vae_dead_code_reinit)


VAE_KEYS = ("vae_epochs", "vae_batch_size", "vae_lr", "vae_hidden", "vae_latent_dim", "vae_beta", "vae_quant_weight",
            "vae_dead_code_reinit")


def _settings(args: argparse.Namespace, emb: np.ndarray) -> dict[str, Any]:
    keys = ("levels", "codebook_size", "method", "seed", "train_size", "niter", "balanced_iters",
            "dedup", "new_tokens") + (VAE_KEYS if args.method in VAE_METHODS else ())
    s = {k: getattr(args, k) for k in keys}
    if "vae_hidden" in s:
        s["vae_hidden"] = list(vae_config(args).hidden)
    s["token_prefixes"] = parse_prefixes(args.token_prefixes)
    if args.cf_weight > 0:  # text-only settings keep their old fingerprint
        s["cf_weight"] = args.cf_weight
    if args.item_tokens:  # likewise
        s["item_tokens"] = True
    s["emb_sha256"] = hashlib.sha256(np.ascontiguousarray(emb).tobytes()).hexdigest()
    return s


def _up_to_date(d: DataDir, settings: dict[str, Any]) -> bool:
    outs = (d.id2sid, d.new_tokens, d.sid_stats, d.sid_usage)
    if not all(p.exists() for p in outs):
        return False
    if min(p.stat().st_mtime for p in outs) < d.emb.stat().st_mtime:
        return False
    try:
        return read_json(d.sid_stats).get("settings") == settings
    except (BadInputError, OSError):
        return False


def _item_ids(d: DataDir, n_rows: int) -> list[int]:
    """Item ids of items.jsonl (must be exactly 0..n-1 and match the embedding rows)."""
    if not d.items.exists():
        return list(range(n_rows))
    ids = sorted(int(r["item_id"]) for r in read_jsonl(d.items))
    if ids != list(range(len(ids))):
        raise BadInputError(f"{d.items}: item_id values must be exactly 0..n-1")
    if len(ids) != n_rows:
        raise BadInputError(f"{d.emb}: {n_rows} rows but {d.items} has {len(ids)} items; re-run embed")
    return ids


def run(args: argparse.Namespace) -> int:
    d = DataDir(args.out_dir)
    if not d.emb.exists():
        raise BadInputError(f"{d.emb}: not found; run `python -m preprocess embed --out_dir {args.out_dir}` first")
    emb = np.load(d.emb)
    ids = _item_ids(d, len(emb))
    if args.cf_weight < 0:
        raise BadInputError(f"--cf_weight {args.cf_weight}: must be >= 0 (0 = text embeddings only)")
    if args.cf_weight > 0:
        from preprocess.cf_embed import with_collaborative

        emb = with_collaborative(emb, d.root, args.cf_weight)
    settings = _settings(args, emb)
    if not args.overwrite and _up_to_date(d, settings):
        print(f"[sid] {d.id2sid} is up to date (use --overwrite to recompute)")
        return 0
    res = build_sids(
        emb, levels=args.levels, codebook_size=args.codebook_size, method=args.method, seed=args.seed,
        train_size=args.train_size, dedup=args.dedup, prefixes=args.token_prefixes,
        new_tokens=args.new_tokens, niter=args.niter, balanced_iters=args.balanced_iters,
        vae=vae_config(args) if args.method in VAE_METHODS else None,
    )
    id2sid = {str(i): res.tokens[i] for i in ids}
    if len({tuple(v) for v in id2sid.values()}) != len(id2sid):
        raise AssertionError("semantic IDs are not unique")
    stats = dict(res.stats, settings=settings, usage_plot=d.sid_usage.name)
    plot_usage(res.codes, res.stats["codebook_sizes"], d.sid_usage,
               f"{args.method}: {len(ids)} items, {res.stats['levels']} levels")
    write_json(d.new_tokens, res.new_tokens + ([item_token(i) for i in ids] if args.item_tokens else []))
    write_json(d.sid_stats, stats)
    write_json(d.id2sid, id2sid)  # last: its mtime marks the stage as done
    s = res.stats
    print(f"[sid] {s['n_items']} items, {s['method']}, codebooks {s['codebook_sizes']}: "
          f"{s['collisions_before_fix']} collisions before fix, {s['items_reassigned']} reassigned, "
          f"{s['items_extended']} extended, {s['n_new_tokens']} new tokens, {s['seconds']} s -> {d.id2sid}",
          file=sys.stderr)
    for line in summary_lines(s):
        print(f"[sid] {line}", file=sys.stderr)
    print(f"[sid] code usage per level: {d.sid_usage}", file=sys.stderr)
    return 0
