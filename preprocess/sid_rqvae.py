"""RQ-VAE and RQ-Kmeans+ quantizers for the sid stage (PyTorch, CPU is enough for catalogues of 10^4-10^5 items).

``rqvae`` (TIGER-style): an MLP encoder maps each item embedding ``x`` to a latent ``z``; ``L``
residual codebooks quantize it (level ``l`` takes the code nearest to ``z - e_0 - ... - e_{l-1}``);
an MLP decoder maps the sum of the chosen codes back to ``x̂``. Loss = ``mse(x̂, x)`` +
``quant_weight`` * sum over levels of ``mse(e_l, sg[r_l]) + beta * mse(r_l, sg[e_l])`` (codebook and
commitment terms; ``sg`` = stop-gradient), straight-through gradients from ``x̂`` to ``z``.
Codebooks start from residual k-means of the initial encoder outputs (faiss, on a seeded sample);
after every epoch, codes no item picked in that epoch are re-initialised to the residuals of the
items that level quantized worst (among a seeded sample of 4,096; their Adam state reset), except
after the last epoch. The model sees the embeddings centred and scaled to unit mean variance per
dimension (reconstructions are mapped back); Adam, mini-batches in a seeded order.

``rqkmeans_plus`` (RQ-Kmeans+, as described for GPR, arXiv 2511.10138, and MiniOneRec's
``generate_indices_plus``: "RQ-Kmeans codebooks initialise an RQ-VAE whose encoder is residual,
``Z = X + MLP(X)``"): the same model and loss with a residual encoder ``z = x + f(x)`` and a
residual decoder ``x̂ = q + g(q)`` (latent dim = input dim), whose last layers start at zero, and
codebooks initialised by residual k-means of ``x``. At step 0 it *is* RQ-KMeans; training moves
codes and the two maps from there.

Determinism: weights, sampling and batch order come from ``seed``; results are identical for the
same seed, data and thread count.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .sid import RQVAEConfig, residual_quantize


def _mlp(sizes: list[int], zero_last: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    layers = layers[:-1]
    if zero_last:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """Encoder, ``L`` codebooks of ``K`` codes (one ``[L, K, d]`` parameter), decoder."""

    def __init__(self, dim: int, levels: int, k: int, cfg: RQVAEConfig):
        super().__init__()
        self.residual, self.beta = cfg.residual, cfg.beta
        latent = dim if cfg.residual else cfg.latent_dim
        hidden = list(cfg.hidden)
        self.encoder = _mlp([dim, *hidden, latent], zero_last=cfg.residual)
        self.decoder = _mlp([latent, *reversed(hidden), dim], zero_last=cfg.residual)
        self.codebooks = nn.Parameter(torch.zeros(levels, k, latent))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return x + z if self.residual else z

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        y = self.decoder(q)
        return q + y if self.residual else y

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(codes [n, L], quantized sum e_0+...+e_{L-1} [n, d], vq loss, residual before each level)``."""
        r = z
        codes, chosen, residuals = [], [], []
        loss = z.new_zeros(())
        for book in self.codebooks:
            idx = _sq_dists(r.detach(), book.detach()).argmin(1)
            e = book[idx]
            loss = loss + torch.mean((e - r.detach()) ** 2) + self.beta * torch.mean((r - e.detach()) ** 2)
            codes.append(idx)
            chosen.append(e)
            residuals.append(r)
            r = r - e.detach()
        return torch.stack(codes, 1), torch.stack(chosen).sum(0), loss, residuals

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(reconstruction loss, vq loss, codes, residuals)``."""
        z = self.encode(x)
        codes, q, vq, residuals = self.quantize(z)
        q_ste = z + (q - z).detach()  # straight-through: the decoder's gradient reaches the encoder
        rec = torch.mean((self.decode(q_ste) - x) ** 2)
        return rec, vq, codes, residuals


@dataclass
class RQVAEResult:
    """What the sid stage needs from a trained model: the same fields as ``sid.Quantized`` plus
    reconstructions in embedding space and the training record."""

    codes: np.ndarray
    codebooks: list[np.ndarray]
    residuals: list[np.ndarray]
    final_residual: np.ndarray
    model: RQVAE
    training: dict[str, Any]
    mean: np.ndarray  # the model sees (emb - mean) / scale
    scale: float

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        """Decoded embeddings ``[n, dim]`` of code tuples ``[n, >= L]`` (extra levels ignored)."""
        books = torch.from_numpy(np.stack(self.codebooks))
        idx = torch.from_numpy(np.ascontiguousarray(codes[:, :len(self.codebooks)], dtype=np.int64))
        with torch.no_grad():
            q = sum(books[lvl][idx[:, lvl]] for lvl in range(idx.shape[1]))
            return _batched(self.model.decode, q) * self.scale + self.mean


def _sq_dists(r: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances ``[n, k]`` between rows of ``r`` and codes of ``book``."""
    return (r ** 2).sum(1, keepdim=True) - 2 * r @ book.T + (book ** 2).sum(1)[None]


def _batched(fn: Any, x: torch.Tensor, batch: int = 8192) -> np.ndarray:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


def _kmeans_init(model: RQVAE, x: torch.Tensor, k: int, seed: int, cfg: RQVAEConfig) -> None:
    """Codebooks := residual k-means of the current encoder outputs (a seeded sample of them)."""
    with torch.no_grad():
        z = _batched(model.encode, x)
    levels = model.codebooks.shape[0]
    q = residual_quantize(z, levels, k, "rqkmeans", seed, cfg.train_size, cfg.kmeans_niter, progress=False)
    with torch.no_grad():
        model.codebooks.copy_(torch.from_numpy(np.stack(q.codebooks)))


def _reinit_dead(model: RQVAE, opt: torch.optim.Optimizer, used: torch.Tensor, x: torch.Tensor,
                 gen: torch.Generator, sample: int = 4096) -> list[int]:
    """Re-initialise codes unused this epoch to the residuals the level quantizes worst; count per level."""
    counts = []
    idx = torch.randperm(len(x), generator=gen)[:sample]
    with torch.no_grad():
        _, _, _, residuals = model.quantize(model.encode(x[idx]))
        state = opt.state.get(model.codebooks, {})
        for lvl, r in enumerate(residuals):
            dead = torch.nonzero(used[lvl] == 0).flatten()
            counts.append(int(dead.numel()))
            if not dead.numel():
                continue
            book = model.codebooks[lvl]
            err = _sq_dists(r, book).min(1).values
            worst = err.argsort(descending=True)[: dead.numel()]
            if worst.numel() < dead.numel():  # fewer samples than dead codes: repeat them
                worst = worst.repeat(math.ceil(dead.numel() / max(1, worst.numel())))[: dead.numel()]
            book[dead] = r[worst]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][lvl, dead] = 0
    return counts


def train_rqvae(emb: np.ndarray, levels: int, k: int, cfg: RQVAEConfig, seed: int = 0,
                progress: bool = True) -> RQVAEResult:
    """Train an RQ-VAE (or RQ-Kmeans+ with ``cfg.residual``) on ``emb [n, dim]`` and encode every item."""
    t0 = time.perf_counter()
    raw = np.asarray(emb, dtype=np.float64)
    mean = raw.mean(0)
    scale = float(np.sqrt(((raw - mean) ** 2).sum(1).mean() / raw.shape[1])) or 1.0
    x = torch.from_numpy(((raw - mean) / scale).astype(np.float32))  # centred, unit variance per dim on average
    n, dim = x.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RQVAE(dim, levels, k, cfg)
    gen = torch.Generator().manual_seed(seed)
    _kmeans_init(model, x, k, seed, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // bs)  # drop the ragged last batch (a 1-item batch is all noise)
    resets = [0] * levels
    hist: list[dict[str, float]] = []
    bar = tqdm(range(cfg.epochs), desc="sid rqkmeans_plus" if cfg.residual else "sid rqvae", unit="epoch",
               disable=not progress)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen)
        used = torch.zeros(levels, k, dtype=torch.long)
        tot_rec = tot_vq = 0.0
        model.train()
        for s in range(steps_per_epoch):
            batch = x[perm[s * bs:(s + 1) * bs]]
            rec, vq, codes, _ = model(batch)
            loss = rec + cfg.quant_weight * vq
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_rec += rec.item()
            tot_vq += vq.item()
            for lvl in range(levels):
                used[lvl] += torch.bincount(codes[:, lvl], minlength=k)
        hist.append({"rec": tot_rec / steps_per_epoch, "vq": tot_vq / steps_per_epoch})
        if cfg.dead_code_reinit and epoch < cfg.epochs - 1:
            for lvl, c in enumerate(_reinit_dead(model, opt, used, x, gen)):
                resets[lvl] += c
        bar.set_postfix(rec=f"{hist[-1]['rec']:.4g}", vq=f"{hist[-1]['vq']:.4g}")
    model.eval()
    with torch.no_grad():
        z = torch.from_numpy(_batched(model.encode, x))
        codes_l, residuals_l = [], []
        r = z
        for book in model.codebooks:
            idx = _sq_dists(r, book).argmin(1)
            codes_l.append(idx)
            residuals_l.append(r.numpy().copy())
            r = r - book[idx]
    training = {
        "config": {**asdict(cfg), "hidden": list(cfg.hidden)},
        "latent_dim": int(z.shape[1]),
        "epochs": cfg.epochs,
        "steps": cfg.epochs * steps_per_epoch,
        "loss_first_epoch": {k2: round(v, 6) for k2, v in hist[0].items()} if hist else None,
        "loss_last_epoch": {k2: round(v, 6) for k2, v in hist[-1].items()} if hist else None,
        "dead_codes_reinitialised": resets,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return RQVAEResult(
        codes=torch.stack(codes_l, 1).numpy().astype(np.int64),
        codebooks=[b.detach().numpy().copy() for b in model.codebooks],
        residuals=residuals_l, final_residual=r.numpy(), model=model, training=training,
        mean=mean.astype(np.float32), scale=scale)
