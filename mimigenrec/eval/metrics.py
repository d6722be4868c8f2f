"""Ranking metrics: HR@K and NDCG@K of one target in a ranked list, averaged over rows.

Protocol (the one every method in :mod:`mimigenrec.eval.evaluate` is scored with):

* the ranked list is deduplicated first (the first occurrence of an item counts, later
  copies are dropped), and items that are ``None`` / negative (invalid answers) are dropped;
* ``rank`` = 0-based position of the target in that list (``None`` if absent);
* ``HR@K = 1[rank < K]``; ``NDCG@K = 1 / log2(rank + 2)`` if ``rank < K`` else 0
  (one relevant item, so the ideal DCG is 1);
* a ``K`` larger than the list simply sees the whole list; an empty list is a miss.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

DEFAULT_KS = (1, 3, 5, 10, 20, 50)


def dedupe(ranked: Iterable[int | None]) -> list[int]:
    """Ranked items with invalid entries (``None`` or ``< 0``) and repeats removed, order kept."""
    seen: set[int] = set()
    out = []
    for it in ranked:
        if it is None or int(it) < 0 or int(it) in seen:
            continue
        seen.add(int(it))
        out.append(int(it))
    return out


def target_rank(ranked: Sequence[int | None], target: int) -> int | None:
    """0-based rank of ``target`` in the deduplicated list, or ``None`` if it is absent."""
    for r, it in enumerate(dedupe(ranked)):
        if it == int(target):
            return r
    return None


def row_metrics(ranked: Sequence[int | None], target: int, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"hr@K": 0/1, "ndcg@K": ...}`` for one row."""
    rank = target_rank(ranked, target)
    out: dict[str, float] = {}
    for k in ks:
        hit = rank is not None and rank < k
        out[f"hr@{k}"] = 1.0 if hit else 0.0
        out[f"ndcg@{k}"] = 1.0 / math.log2(rank + 2) if hit else 0.0  # type: ignore[operator]
    return out


def metric_keys(ks: Sequence[int]) -> list[str]:
    """Column order of a results table: all HR@K, then all NDCG@K."""
    return [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]


def aggregate(predictions: Iterable[Mapping], ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean metrics over prediction rows ``{"target", "ranked"}``, plus ``n_rows``."""
    sums = dict.fromkeys(metric_keys(ks), 0.0)
    n = 0
    for p in predictions:
        for key, v in row_metrics(p["ranked"], p["target"], ks).items():
            sums[key] += v
        n += 1
    out: dict[str, float] = {k: (v / n if n else 0.0) for k, v in sums.items()}
    out["n_rows"] = n
    return out


def rank_by_score(scores: torch.Tensor, item_ids: torch.Tensor | Sequence[int], k: int) -> list[list[int]]:
    """Top ``k`` item ids per row of ``scores`` ``[B, N]`` (columns = ``item_ids``), best first.

    Ties are broken by the smaller item id, deterministically (a stable sort over columns
    ordered by item id), so equal scores never make results depend on the hardware.
    """
    ids = torch.as_tensor(item_ids, dtype=torch.long, device=scores.device)
    order = torch.argsort(ids)
    s = scores[:, order].float()
    idx = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return ids[order][idx].tolist()


def markdown_table(results: Mapping[str, Mapping[str, float]], ks: Sequence[int]) -> str:
    """Methods as rows, ``HR@K`` then ``NDCG@K`` columns, 4 decimals, plus the row count."""
    keys = metric_keys(ks)
    head = "| method | " + " | ".join(k.upper() for k in keys) + " | rows |"
    lines = [head, "|---|" + "---|" * (len(keys) + 1)]
    for name, m in results.items():
        cells = [f"{m[k]:.4f}" if k in m else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {int(m.get('n_rows', 0))} |")
    return "\n".join(lines)


def per_row(predictions: Iterable[Mapping], metric: str) -> dict[str, float]:
    """``{"user:position": value}`` of one metric (e.g. ``"ndcg@10"``) for prediction rows."""
    k = int(metric.split("@")[1])
    return {f"{int(p['user_id'])}:{int(p['position'])}": row_metrics(p["ranked"], p["target"], (k,))[metric]
            for p in predictions}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n); 0 for fewer than 2 values)."""
    n = len(values)
    if not n:
        return 0.0, 0.0
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of ``b - a`` over paired rows and its percentile bootstrap interval (rows resampled).

    Returns ``{"delta", "lo", "hi", "rel"}``; ``rel`` = delta / mean(a) (NaN if mean(a) = 0).
    """
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_bootstrap needs two equally long non-empty lists, got {len(a)} and {len(b)}")
    d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = torch.empty(n_boot, dtype=torch.float64)
    for s in range(0, n_boot, 1000):  # chunks keep memory at 1000 x n
        m = min(1000, n_boot - s)
        idx = torch.randint(len(d), (m, len(d)), generator=g)
        means[s:s + m] = d[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64))
    base = sum(a) / len(a)
    delta = float(d.mean())
    return {"delta": delta, "lo": float(lo), "hi": float(hi), "rel": delta / base if base else float("nan"),
            "n_rows": len(d), "n_boot": n_boot, "level": level}
