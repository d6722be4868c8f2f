"""Candidate-choice reward for candidate ranking: the answer names one ``[ITEM_id]``.

The choice is read by :func:`mimigenrec.prompts.parse_choice`, the parser evaluation uses too:
the answer part (after an optional ``<think>…</think>``, whose text may mention any candidate)
must be exactly one canonical ``[ITEM_id]`` reference and nothing else. The target is the row's
ground truth (``[ITEM_12]``) or ``extra_info.target``; the allowed set is ``extra_info.candidates``.
"""
from __future__ import annotations

from mimigenrec.prompts import parse_choice
from rewards import item_rows


def candidate_choice(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
    """r = +1 if the one chosen [ITEM_id] is the target; 0 if another candidate; -1 if none / several / extra text / not a candidate / broken tags.

    Rows without ``extra_info.candidates`` accept any item id as a valid choice.
    """
    out: list[float | None] = []
    for text, target, info in item_rows(completions, kwargs):
        if target is None:
            out.append(None)
            continue
        cands = info.get("candidates")
        choice = parse_choice(text, None if cands is None else [int(x) for x in cands])
        out.append(-1.0 if choice is None else 1.0 if choice == target else 0.0)
    return out
