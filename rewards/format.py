"""Tag rewards: the completion is exactly one well-formed answer, optionally after one reasoning block.

An answer is a full SID (``<a_1><b_2><c_3>``) or one canonical item reference (``[ITEM_12]``).
When the row carries a ground truth, the answer must be of the same kind, and a SID must have as
many levels as the truth. Leading / trailing whitespace is ignored. Tags are split by
:func:`mimigenrec.prompts.split_reasoning`, the parser the answer rewards and evaluation share.
``query_format`` is the format reward of the ``query`` task (the answer is a search query).
"""
from __future__ import annotations

import re
from typing import Any

from mimigenrec.prompts import (
    SID_TOKEN_RE,
    parse_item_refs,
    parse_query,
    split_reasoning,
)
from rewards import completion_text, ground_truths

_SID_FULL = re.compile(rf"(?:{SID_TOKEN_RE.pattern})+")
QUERY_MAX_WORDS = 32


def _answer_kind(text: str) -> tuple[str, int] | None:
    """("sid", levels) / ("item", 1) if ``text`` is exactly one answer, else None."""
    if _SID_FULL.fullmatch(text):
        return "sid", len(SID_TOKEN_RE.findall(text))
    refs = parse_item_refs(text)
    if refs is not None and len(refs) == 1:
        return "item", 1
    return None


def _split(text: str) -> tuple[str | None, str] | None:
    """(reasoning or None, answer) if the tags are well formed, else None (the shared parser)."""
    return split_reasoning(text)


def _well_formed(completion: Any, truth: str | None, need_reasoning: bool) -> float:
    parts = _split(completion_text(completion))
    if parts is None:
        return 0.0
    reasoning, answer = parts
    if need_reasoning and (reasoning is None or not reasoning.strip()):
        return 0.0
    kind = _answer_kind(answer)
    if kind is None:
        return 0.0
    if truth is not None:
        want = _answer_kind(str(truth).strip())
        if want is not None and want != kind:
            return 0.0
    return 1.0


def format_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
    """r = 1 if completion == [<think>…</think>] + one answer of the truth's kind (and SID depth) else 0."""
    completions = list(completions or [])
    truths = ground_truths(kwargs, len(completions))
    return [_well_formed(c, t, need_reasoning=False) for c, t in zip(completions, truths)]


def think(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
    """r = 1 if completion == <think>non-empty</think> + one well-formed answer else 0."""
    completions = list(completions or [])
    truths = ground_truths(kwargs, len(completions))
    return [_well_formed(c, t, need_reasoning=True) for c, t in zip(completions, truths)]


def query_format(prompts=None, completions=None, completion_ids=None, *, max_words: int = QUERY_MAX_WORDS,
                 **kwargs) -> list[float]:
    """r = 1 if completion == [<think>…</think>] + a one-line query of 1..max_words words (no tags, no [ITEM_n]) else 0."""
    out = []
    for c in completions or []:
        q = parse_query(completion_text(c))
        out.append(1.0 if q is not None and len(q.split()) <= max_words else 0.0)
    return out
