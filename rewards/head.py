"""Item-head rewards (RecPO, :mod:`mimigenrec.rl.recpo`): the head's ranking after the reasoning.

The RecPO trainer scores every item after each rollout's reasoning and passes, per completion,
``head_rank`` (0-based rank of the target among all items, ties -> smaller item id) and
``head_prob`` (the target's softmax probability over all items) beside the dataset columns.
"""
from __future__ import annotations

import math
import re

from rewards import column, completion_text

_THINK_ONLY = re.compile(r"\s*<think>((?:(?!</?think>).)*)</think>\s*", re.DOTALL)


def recpo(prompts=None, completions=None, completion_ids=None, *, prob_weight: float = 0.05,
          ndcg_k: int | None = None, **kwargs) -> list[float]:
    """r = (1 - w) · 1/log2(head_rank + 2) + w · head_prob, w = 0.05 (NDCG term 0 if rank >= ndcg_k when set)."""
    n = len(list(completions or []))
    ranks, probs = column(kwargs, "head_rank", n), column(kwargs, "head_prob", n)
    if any(r is None for r in ranks) or any(p is None for p in probs):
        raise ValueError("reward recpo needs head_rank / head_prob: train an item head with trainer: recpo")
    out = []
    for r, p in zip(ranks, probs):
        ndcg = 0.0 if ndcg_k is not None and r >= ndcg_k else 1.0 / math.log2(int(r) + 2)
        out.append((1.0 - prob_weight) * ndcg + prob_weight * float(p))
    return out


def think_only(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
    """r = 1 if the completion is exactly one non-empty <think>…</think> block (the head answers) else 0."""
    out = []
    for c in completions or []:
        m = _THINK_ONLY.fullmatch(completion_text(c))
        out.append(1.0 if m and m.group(1).strip() else 0.0)
    return out
