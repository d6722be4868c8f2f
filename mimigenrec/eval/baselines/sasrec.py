"""SASRec (Kang & McAuley, 2018) in compact PyTorch, trained by the evaluation command.

Model as in the paper's reference code: item embeddings (scaled by sqrt(d)) + learned
positional embeddings, ``blocks`` × [Q = LayerNorm(x); x = Q + causal-MHA(Q, x, x);
x = x + FFN(LayerNorm(x))] with dropout and padding zeroed after each block, a final
LayerNorm; the score of item ``i`` is ``<h_t, E_i>`` with the input embedding table shared.

Loss: ``ce`` = full-softmax cross-entropy over every item at every training position
(default), or ``bce`` = the paper's binary cross-entropy with one uniformly sampled negative.

Data protocol: the model is trained on the train part of every user's sequence (each
position whose item is a train-row target is a training target); early stopping watches
NDCG@10 of the valid rows (input = everything before the valid target), or of rows the caller
holds out of training instead (the evaluation does so when it scores the valid split). When the test
split is evaluated, the input is the user's whole sequence before the test target, so the
valid item is history there but never a training target. The same checkpoint therefore
serves both splits; it is cached under a hash of the data and the settings.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mimigenrec.io import DataDir
from mimigenrec.sequences import UserSequences


@dataclass
class SASRecConfig:
    """Hyper-parameters (d=64, 2 blocks, max_len 50 as in the paper; dropout 0.2 matched DESIGN §7)."""

    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = 50
    loss: str = "ce"            # "ce" (full softmax) or "bce" (1 sampled negative)
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 200           # upper bound with early stopping, exact count without
    patience: int = 10          # epochs without a better valid NDCG@10 before stopping; 0 = fixed epochs
    seed: int = 0


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_q = nn.LayerNorm(d, eps=1e-8)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ln_ff = nn.LayerNorm(d, eps=1e-8)
        self.ff = nn.Sequential(nn.Linear(d, d), nn.Dropout(dropout), nn.ReLU(), nn.Linear(d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = self.ln_q(x)
        a, _ = self.attn(q, x, x, attn_mask=mask, need_weights=False)
        x = q + a
        x = x + self.ff(self.ln_ff(x))
        return x * keep


class SASRec(nn.Module):
    """Self-attentive sequential recommender over item ids ``0..num_items-1`` (0 in inputs = padding
    after the +1 shift done by :meth:`encode`)."""

    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.num_items, self.cfg = num_items, cfg
        d = cfg.hidden
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(d, cfg.heads, cfg.dropout) for _ in range(cfg.blocks))
        self.ln_out = nn.LayerNorm(d, eps=1e-8)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq`` ``[B, L]`` shifted ids (0 = pad, left-padded) -> hidden states ``[B, L, d]``."""
        B, L = seq.shape
        keep = (seq > 0).unsqueeze(-1).float()
        pos = torch.arange(self.cfg.max_len - L, self.cfg.max_len, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.cfg.hidden) + self.pos_emb(pos)[None]
        x = self.drop(x) * keep
        # additive mask: causal + padded keys, finite so fully masked (padding) rows stay finite
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=seq.device), 1)
        blocked = causal[None] | (seq == 0)[:, None, :]
        mask = torch.zeros(B, L, L, device=seq.device).masked_fill(blocked, -1e9)
        mask = mask.repeat_interleave(self.cfg.heads, 0)
        for blk in self.blocks:
            x = blk(x, mask, keep)
        return self.ln_out(x)

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden ``[..., d]`` -> scores of every item ``[..., num_items]`` (item id order)."""
        return h @ self.item_emb.weight[1:].T

    def encode(self, histories: Sequence[Sequence[int]], device: torch.device | str) -> torch.Tensor:
        """Left-padded, shifted input of the last ``max_len`` items of each history (width = longest)."""
        L = max(1, min(self.cfg.max_len, max((len(h) for h in histories), default=1)))
        out = torch.zeros(len(histories), L, dtype=torch.long)
        for r, h in enumerate(histories):
            h = list(h)[-L:]
            if h:
                out[r, L - len(h):] = torch.tensor(h) + 1
        return out.to(device)

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[len(histories), num_items]`` next-item scores."""
        dev = self.item_emb.weight.device
        h = self(self.encode(histories, dev))[:, -1]
        return self.item_logits(h)


def _windows(seq: Sequence[int], flags: Sequence[bool], L: int) -> list[tuple[list[int], list[int]]]:
    """Cut one user's sequence into training windows ``(input, target or -1)`` of at most ``L``
    steps, so every flagged position is predicted exactly once."""
    inp, tgt = list(seq[:-1]), [t if f else -1 for t, f in zip(seq[1:], flags[1:])]
    out = []
    for end in range(len(inp), 0, -L):
        s = max(0, end - L)
        if any(t >= 0 for t in tgt[s:end]):
            out.append((inp[s:end], tgt[s:end]))
    return out


def _batch(windows: list[tuple[list[int], list[int]]], L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded inputs / targets, only as wide as the longest window (padding columns add nothing:
    they are masked, and positions count from the right end)."""
    L = min(L, max(len(i) for i, _ in windows))
    x = torch.zeros(len(windows), L, dtype=torch.long)
    y = torch.full((len(windows), L), -1, dtype=torch.long)
    for r, (i, t) in enumerate(windows):
        x[r, L - len(i):] = torch.tensor(i) + 1
        y[r, L - len(t):] = torch.tensor(t)
    return x, y


@torch.no_grad()
def ranks_of_targets(scores: torch.Tensor, targets: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among ``items`` (ties -> smaller id first) from ``[B, num_items]`` scores."""
    s = scores[:, items]
    t = scores.gather(1, targets[:, None])
    better = (s > t) | ((s == t) & (items[None, :] < targets[:, None]))
    return better.sum(1)


def evaluate_ndcg(model: SASRec, seqs: UserSequences, rows: Sequence[Mapping], items: torch.Tensor,
                  k: int = 10, batch_size: int = 512) -> float:
    """Mean NDCG@k over ``rows`` with the full prefix as input and ``items`` as the ranking universe."""
    model.eval()
    total = 0.0
    dev = model.item_emb.weight.device
    items = items.to(dev)
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        sc = model.score([seqs.prefix(r["user_id"], r["position"]) for r in chunk])
        tg = torch.tensor([int(r["target"]) for r in chunk], device=dev)
        rk = ranks_of_targets(sc, tg, items).float()
        total += torch.where(rk < k, 1.0 / torch.log2(rk + 2), torch.zeros_like(rk)).sum().item()
    return total / max(len(rows), 1)


def sample_negatives(pos: torch.Tensor, universe: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One uniform negative from ``universe`` per positive, never equal to it (redrawn until it differs)."""
    neg = universe[torch.randint(len(universe), pos.shape, generator=gen)]
    clash = neg == pos
    while bool(clash.any()) and len(universe) > 1:
        neg[clash] = universe[torch.randint(len(universe), (int(clash.sum()),), generator=gen)]
        clash = neg == pos
    return neg


def train_sasrec(seqs: UserSequences, num_items: int, cfg: SASRecConfig, valid_rows: Sequence[Mapping],
                 items: Sequence[int], train_splits: Sequence[str] = ("train",), device: str = "cpu",
                 progress: bool = True) -> tuple[SASRec, dict]:
    """Train on ``train_splits``; keep the epoch with the best valid NDCG@10 (or the last, without patience)."""
    if cfg.loss not in ("ce", "bce"):
        raise ValueError(f"SASRec loss must be 'ce' or 'bce', got {cfg.loss!r}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = SASRec(num_items, cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    windows = [w for u, (s, f) in sorted(seqs.training_sequences(train_splits).items())
               for w in _windows(s, f, cfg.max_len)]
    if not windows:
        raise ValueError("SASRec: no training sequences (empty train split?)")
    universe = torch.tensor(sorted(items), dtype=torch.long)
    best, best_state, best_epoch, bad, hist = -1.0, None, 0, 0, []
    early = cfg.patience > 0 and len(valid_rows) > 0
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"sasrec[{cfg.loss}]", disable=not progress, leave=False)
    t0 = time.time()
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(windows), generator=gen).tolist()
        tot, n = 0.0, 0
        for s in range(0, len(perm), cfg.batch_size):
            x, y = _batch([windows[i] for i in perm[s:s + cfg.batch_size]], cfg.max_len)
            x, y = x.to(device), y.to(device)
            h = model(x)
            m = y >= 0
            hm, ym = h[m], y[m]
            if cfg.loss == "ce":
                loss = nn.functional.cross_entropy(model.item_logits(hm), ym)
            else:
                neg = sample_negatives(ym.cpu(), universe, gen).to(device)
                e = model.item_emb.weight
                pos_l = (hm * e[ym + 1]).sum(-1)
                neg_l = (hm * e[neg + 1]).sum(-1)
                loss = nn.functional.softplus(-pos_l).mean() + nn.functional.softplus(neg_l).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * len(ym)
            n += len(ym)
        rec = {"epoch": epoch, "loss": tot / max(n, 1)}
        if early:
            rec["valid_ndcg@10"] = evaluate_ndcg(model, seqs, valid_rows, universe)
            if rec["valid_ndcg@10"] > best:
                best, best_epoch, bad = rec["valid_ndcg@10"], epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
        hist.append(rec)
        bar.set_postfix({k: round(v, 4) for k, v in rec.items() if k != "epoch"})
        if early and bad >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    info = {"best_epoch": best_epoch or hist[-1]["epoch"], "best_valid_ndcg@10": best if early else None,
            "epochs_run": len(hist), "train_windows": len(windows), "train_seconds": round(time.time() - t0, 1),
            "history": hist}
    return model, info


def data_fingerprint(data_dir: str | os.PathLike, splits: Sequence[str] = ("train", "valid")) -> str:
    """Hash of the interaction files the model is trained and early-stopped on."""
    h = hashlib.sha1()
    dd = DataDir(data_dir)
    for s in splits:
        p = dd.inter(s)
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


class SASRecScorer:
    """Scores rows by a trained :class:`SASRec` with the user's full prefix as input."""

    def __init__(self, model: SASRec, seqs: UserSequences, name: str = "sasrec", info: dict | None = None) -> None:
        self.model, self.seqs, self.name, self.info = model, seqs, name, info or {}

    def score_rows(self, rows: Sequence[Mapping]) -> torch.Tensor:
        return self.model.score([self.seqs.prefix(r["user_id"], r["position"]) for r in rows]).float().cpu()

    def describe(self) -> dict:
        return {k: v for k, v in self.info.items() if k != "history"}

    @classmethod
    def load_or_train(cls, data_dir: str | os.PathLike, cache_dirs: Sequence[str | os.PathLike], seqs: UserSequences,
                      num_items: int, items: Sequence[int], valid_rows: Sequence[Mapping], cfg: SASRecConfig,
                      device: str = "cpu", name: str = "sasrec", progress: bool = True,
                      stopping: str = "valid rows") -> SASRecScorer:
        """Load the cached checkpoint for this data + config + early-stopping protocol (``stopping``
        names which rows ``valid_rows`` are), or train and cache it (first writable dir)."""
        key_parts = [asdict(cfg), num_items, data_fingerprint(data_dir)] + ([stopping] if stopping != "valid rows" else [])
        key = hashlib.sha1(json.dumps(key_parts).encode()).hexdigest()[:12]
        fname = f"sasrec_{cfg.loss}_{key}.pt"
        for d in cache_dirs:
            p = Path(d) / fname
            if p.is_file():
                blob = torch.load(p, map_location="cpu", weights_only=False)
                model = SASRec(num_items, SASRecConfig(**blob["config"]))
                model.load_state_dict(blob["state_dict"])
                model.to(device).eval()
                return cls(model, seqs, name, {**blob["info"], "checkpoint": str(p), "cached": True,
                                               "early_stopping_rows": stopping})
        model, info = train_sasrec(seqs, num_items, cfg, valid_rows, items, device=device, progress=progress)
        blob = {"config": asdict(cfg), "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "info": info}
        for d in cache_dirs:
            p = Path(d) / fname
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_suffix(".tmp")
                torch.save(blob, tmp)
                os.replace(tmp, p)
                info = {**info, "checkpoint": str(p)}
                break
            except OSError:
                continue
        return cls(model, seqs, name, {**info, "config": asdict(cfg), "cached": False, "early_stopping_rows": stopping})
