"""Candidate-choice reward for candidate ranking: the answer names one ``[ITEM_id]``.

The choice is read from the answer part (after an optional ``<think>…</think>``, whose
text may mention any candidate). The target is the row's ground truth (``[ITEM_12]``) or
``extra_info.target``; the allowed set is ``extra_info.candidates``.
"""
from __future__ import annotations

from mimigenrec.prompts import ITEM_REF_RE, parse_answer
from rewards import item_rows


def candidate_choice(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
    """r = +1 if the one chosen [ITEM_id] is the target; 0 if another candidate; -1 if none / several / not a candidate / broken tags.

    Rows without ``extra_info.candidates`` accept any item id as a valid choice.
    """
    out: list[float | None] = []
    for text, target, info in item_rows(completions, kwargs):
        if target is None:
            out.append(None)
            continue
        answer = parse_answer(text)[1]
        chosen = {int(x) for x in ITEM_REF_RE.findall(answer)}
        cands = info.get("candidates")
        if len(chosen) != 1 or "<think>" in answer or "</think>" in answer:  # none, several, or broken tags
            out.append(-1.0)
            continue
        choice = chosen.pop()
        if cands is not None and choice not in {int(x) for x in cands}:
            out.append(-1.0)
        else:
            out.append(1.0 if choice == target else 0.0)
    return out
