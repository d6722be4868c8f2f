"""Candidate lists for candidate ranking: the target plus N sampled negatives per row.

Each row's draw is seeded by ``(seed, user_id, position)`` alone, so a row gets the same
candidates whatever the order or subset of rows it is sampled with. Negatives are distinct,
never the target and never an item the user interacted with before the target (the row's
history and, given the user's full sequence, every earlier item). The target sits at a
random position of the shuffled list.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from mimigenrec.io import BadInputError, DataDir, read_json, write_json


def row_rng(seed: int, user_id: int, position: int) -> random.Random:
    """A generator that depends on ``(seed, user, position)`` only (string seeds hash stably)."""
    return random.Random(f"cand:{int(seed)}:{int(user_id)}:{int(position)}")


def sample_row(target: int, banned: set[int], pool: Sequence[int], pool_set: frozenset[int],
               num_negatives: int, rng: random.Random) -> list[int]:
    """``num_negatives`` distinct items of ``pool`` outside ``banned`` and the target, plus the target, shuffled."""
    banned = banned | {int(target)}
    free = len(pool) - len(banned & pool_set)
    if free < num_negatives:
        raise BadInputError(f"only {free} items can be negatives for target {target}, {num_negatives} needed")
    if free < 4 * num_negatives:  # dense case: sample from the explicit complement
        negs = rng.sample([i for i in pool if i not in banned], num_negatives)
    else:  # rejection sampling: cheap when the complement is large
        negs, chosen = [], set()
        while len(negs) < num_negatives:
            it = pool[rng.randrange(len(pool))]
            if it not in banned and it not in chosen:
                chosen.add(it)
                negs.append(it)
    cands = negs + [int(target)]
    rng.shuffle(cands)
    return cands


def sample_candidates(rows: Sequence[Mapping], item_pool: Sequence[int], num_negatives: int, seed: int,
                      exclude: Mapping[int, Sequence[int]] | None = None) -> list[list[int]]:
    """Candidates for each row (``user_id``, ``position``, ``history``, ``target``), aligned with ``rows``.

    ``item_pool``: items negatives are drawn from. ``exclude``: optional user id -> full
    chronological sequence; the items before the row's ``position`` are never negatives
    (the row's own ``history`` never is, with or without it).
    """
    pool = sorted({int(i) for i in item_pool})
    pool_set = frozenset(pool)
    if num_negatives < 0:
        raise ValueError("num_negatives must be >= 0")
    out = []
    for r in rows:
        u, p = int(r["user_id"]), int(r["position"])
        banned = {int(i) for i in r["history"]}
        if exclude is not None and u in exclude:
            banned.update(int(i) for i in exclude[u][:p])
        out.append(sample_row(int(r["target"]), banned, pool, pool_set, num_negatives, row_rng(seed, u, p)))
    return out


def inputs_digest(rows: Sequence[Mapping], item_pool: Sequence[int],
                  exclude: Mapping[int, Sequence[int]] | None) -> str:
    """Digest of everything a candidate draw depends on besides ``(num_negatives, seed)``."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([[int(r["user_id"]), int(r["position"]), int(r["target"]), [int(i) for i in r["history"]]]
                         for r in rows]).encode())
    h.update(json.dumps(sorted({int(i) for i in item_pool})).encode())
    h.update(json.dumps(sorted((int(u), [int(i) for i in s]) for u, s in (exclude or {}).items())).encode())
    return h.hexdigest()


def cache_path(data_dir: str | os.PathLike, split: str, num_negatives: int, seed: int) -> Path:
    """``O/candidates/<split>_n<N>_s<seed>.json``."""
    return DataDir(data_dir).candidates / f"{split}_n{num_negatives}_s{seed}.json"


def cached_candidates(data_dir: str | os.PathLike, split: str, rows: Sequence[Mapping], item_pool: Sequence[int],
                      num_negatives: int, seed: int, exclude: Mapping[int, Sequence[int]] | None = None,
                      fallback_dir: str | os.PathLike | None = None) -> list[list[int]]:
    """:func:`sample_candidates` for ``rows`` of ``split``, cached as ``{"u:p": [items]}``.

    The cache is read when it was drawn from the same inputs (a digest of the rows, the item pool
    and the excluded sequences) and holds every row; it is (re)written otherwise, so a dataset
    rebuilt in the same folder never reuses candidates of the old one. If ``O`` is not writable
    the cache goes to ``fallback_dir`` instead.
    """
    paths = [cache_path(data_dir, split, num_negatives, seed)]
    if fallback_dir is not None:
        paths.append(Path(fallback_dir) / "candidates" / paths[0].name)
    keys = [f"{int(r['user_id'])}:{int(r['position'])}" for r in rows]
    digest = inputs_digest(rows, item_pool, exclude)
    for path in paths:
        if path.is_file():
            cached = read_json(path)
            if cached.get("inputs") == digest and all(k in cached.get("rows", {}) for k in keys):
                return [[int(i) for i in cached["rows"][k]] for k in keys]
    cands = sample_candidates(rows, item_pool, num_negatives, seed, exclude)
    payload = {"split": split, "num_negatives": num_negatives, "seed": seed, "inputs": digest,
               "rows": dict(zip(keys, cands))}
    for path in paths:
        try:
            write_json(path, payload, indent=None)
            break
        except OSError:
            continue
    return cands
