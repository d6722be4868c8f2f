"""Retrieval reward: the completion is a search query; BM25 over the item catalog ranks it.

The catalog is ``items.jsonl`` of the dataset directory (title + description of every item);
its BM25 index (``bm25s``) is built once per file and cached in the process. The target is the
``[ITEM_n]`` ground truth, else ``extra_info.target`` (an item id). Ties are ranked
pessimistically (every item scoring at least the target's score ranks above it), so a query
that matches nothing gets 0. The query is the answer part of the completion as
:func:`mimigenrec.prompts.parse_query` reads it (a malformed completion gets 0); ``evaluate
--task query`` scores generated queries with the same index and rank.
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np

from mimigenrec.io import DataDir, read_jsonl
from mimigenrec.prompts import parse_query
from rewards import item_rows

_LOCK = threading.Lock()
_INDEXES: dict[tuple, CatalogIndex] = {}


def _doc_text(item: dict) -> str:
    parts = []
    for key in ("title", "description"):
        v = item.get(key)
        if isinstance(v, (list, tuple)):
            v = " ".join(str(x) for x in v)
        if v:
            parts.append(str(v))
    return " ".join(parts)


class CatalogIndex:
    """BM25 index over an ``items.jsonl`` catalog: ``rank(query, item_id)`` -> 0-based rank or None."""

    def __init__(self, items_path: str | os.PathLike) -> None:
        import bm25s

        rows = read_jsonl(items_path)
        if not rows:
            raise ValueError(f"{items_path}: empty item catalog")
        self.item_ids = np.array([int(r["item_id"]) for r in rows])
        self.row_of = {int(i): k for k, i in enumerate(self.item_ids)}
        self.tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
        corpus = self.tokenizer.tokenize([_doc_text(r) for r in rows], return_as="tuple", show_progress=False)
        self.bm25 = bm25s.BM25()
        self.bm25.index(corpus, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every catalog row for ``query`` (zeros for an empty / unknown query)."""
        ids = self.tokenizer.tokenize([query], update_vocab=False, return_as="ids", show_progress=False)[0]
        return np.asarray(self.bm25.get_scores(ids), dtype=np.float64)

    def rank(self, query: str, item_id: int) -> int | None:
        """0-based pessimistic rank of ``item_id`` for ``query``; None if it scores 0 or is unknown."""
        row = self.row_of.get(int(item_id))
        if row is None or not query.strip():
            return None
        s = self.scores(query)
        if s[row] <= 0:
            return None
        return int((s >= s[row]).sum()) - 1

    def ranked(self, query: str, item_id: int, n: int) -> list[int]:
        """The top ``n`` item ids for ``query``, best first, ties ordered against ``item_id``.

        Items scoring 0 are left out. Among equal scores the other items come first (then by item id),
        so ``item_id``'s position in the list is :meth:`rank`, the rank the reward pays for.
        """
        if not query.strip():
            return []
        s = self.scores(query)
        target_row = self.row_of.get(int(item_id), -1)
        rows = np.flatnonzero(s > 0)
        order = sorted(rows.tolist(), key=lambda r: (-s[r], r == target_row, int(self.item_ids[r])))
        return [int(self.item_ids[r]) for r in order[:n]]


def catalog_index(data_dir: str | os.PathLike) -> CatalogIndex:
    """The cached index of ``data_dir/items.jsonl`` (rebuilt if the file changed)."""
    path = Path(DataDir(data_dir).items).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"retrieval_ndcg: no item catalog at {path}")
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    with _LOCK:
        if key not in _INDEXES:
            _INDEXES[key] = CatalogIndex(path)
        return _INDEXES[key]


def retrieval_ndcg(prompts=None, completions=None, completion_ids=None, *, data_dir=None, top_k: int = 100,
                   **kwargs) -> list[float | None]:
    """r = 1/log2(rank + 2) if the target ranks < top_k under BM25(query = parse_query(completion)) else 0."""
    if data_dir is None:
        raise ValueError("retrieval_ndcg needs the dataset directory (data_dir) holding items.jsonl")
    index = catalog_index(data_dir)
    out: list[float | None] = []
    for text, target, _ in item_rows(completions, kwargs):
        if target is None:
            out.append(None)
            continue
        query = parse_query(text)
        rank = None if query is None else index.rank(query, target)
        out.append(0.0 if rank is None or rank >= top_k else 1.0 / math.log2(rank + 2))
    return out
