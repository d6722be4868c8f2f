"""Answer-match rewards: exact match, per-level SID credit, rank-aware credit over beams.

The answer is the completion after an optional leading ``<think>…</think>`` (see
:func:`mimigenrec.prompts.parse_answer`); the truth is the row's ``reward_model.ground_truth``
(a SID string such as ``<a_1><b_2><c_3>`` or an item reference such as ``[ITEM_12]``).
Rows without a ground truth get ``None`` (TRL skips them for that reward).
"""
from __future__ import annotations

import math
from typing import Any

from mimigenrec.prompts import parse_answer, split_sid
from rewards import completion_text, ground_truths


def _answer(completion: Any) -> str:
    return parse_answer(completion_text(completion))[1]


def _levels(text: str) -> list[str]:
    """SID tokens of ``text`` if it is nothing but SID tokens, else ``[]``."""
    toks = split_sid(text)
    return toks if toks and "".join(toks) == text else []


def _hits(completions: list, truths: list[str | None]) -> list[bool | None]:
    return [None if gt is None else _answer(c) == str(gt).strip() for c, gt in zip(completions, truths)]


def rule(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
    """r = 1 if answer == ground_truth else 0."""
    completions = list(completions or [])
    return [None if h is None else float(h) for h in _hits(completions, ground_truths(kwargs, len(completions)))]


def partial_match(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
    """r = (number of leading SID levels equal to the truth's) / (levels of the truth); item refs: exact match."""
    completions = list(completions or [])
    out: list[float | None] = []
    for c, gt in zip(completions, ground_truths(kwargs, len(completions))):
        if gt is None:
            out.append(None)
            continue
        truth = _levels(str(gt).strip())
        ans = _answer(c)
        if not truth:  # not a SID (e.g. "[ITEM_12]"): all or nothing
            out.append(float(ans == str(gt).strip()))
            continue
        pred = _levels(ans)
        matched = 0
        for p, t in zip(pred, truth):
            if p != t:
                break
            matched += 1
        out.append(matched / len(truth))
    return out


def ndcg_rank(prompts=None, completions=None, completion_ids=None, beam_rank=None, **kwargs) -> list[float | None]:
    """r = 1 if answer == ground_truth else -1/log2(beam_rank + 2) (wrong beams ranked high cost most).

    ``beam_rank`` (0 = best beam) is passed by the trainer in ``rollout_mode: beam``.
    """
    completions = list(completions or [])
    if beam_rank is None:
        raise ValueError("ndcg_rank needs beam ranks: use rollout_mode: beam (the trainer passes beam_rank)")
    if len(beam_rank) != len(completions):
        raise ValueError(f"beam_rank has {len(beam_rank)} values for {len(completions)} completions")
    out: list[float | None] = []
    for h, r in zip(_hits(completions, ground_truths(kwargs, len(completions))), beam_rank):
        out.append(None if h is None else (1.0 if h else -1.0 / math.log2(int(r) + 2)))
    return out


def ndcg_rank_hit(prompts=None, completions=None, completion_ids=None, beam_rank=None,
                  **kwargs) -> list[float | None]:
    """r = ndcg_rank's value in a group that holds the target, else 0 (MiniOneRec's ranking reward).

    A group without a hit then has zero variance and no gradient, so wrong beams are only pushed
    down relative to a target the model already ranks among them. A group starts at ``beam_rank`` 0.
    """
    out = ndcg_rank(prompts, completions, completion_ids, beam_rank=beam_rank, **kwargs)
    hits = _hits(list(completions or []), ground_truths(kwargs, len(out)))
    starts = [i for i, r in enumerate(beam_rank) if int(r) == 0] + [len(out)]
    for a, b in zip(starts, starts[1:]):
        if not any(hits[a:b]):
            out[a:b] = [None if v is None else 0.0 for v in out[a:b]]
    return out


def listwise(prompts=None, completions=None, completion_ids=None, beam_rank=None, beam_logp=None,
             **kwargs) -> list[float | None]:
    """r = 1[hit] - q, q = softmax of the beams' log-probs within their group (beam mode).

    With ``scale_rewards: none`` the group advantages ``r_i - mean(r)`` are then exactly the
    gradient of a listwise softmax loss over the group (the target against the model's own best
    wrong answers, each pushed down by its probability); a row whose target already holds all of
    the group's mass gets no push, so memorised rows are not sharpened further. A group starts at
    ``beam_rank`` 0; ``beam_logp`` is passed by the trainer in ``rollout_mode: beam``.
    """
    completions = list(completions or [])
    if beam_rank is None or beam_logp is None:
        raise ValueError("listwise needs beam ranks and log-probs: use rollout_mode: beam")
    if not (len(beam_rank) == len(beam_logp) == len(completions)):
        raise ValueError(f"beam_rank/beam_logp have {len(beam_rank)}/{len(beam_logp)} values for "
                         f"{len(completions)} completions")
    hits = _hits(completions, ground_truths(kwargs, len(completions)))
    starts = [i for i, r in enumerate(beam_rank) if int(r) == 0] + [len(completions)]
    if not starts or starts[0] != 0:
        raise ValueError("listwise: the first completion is not a group's best beam (beam_rank 0)")
    out: list[float | None] = []
    for a, b in zip(starts, starts[1:]):
        lp = [float(x) for x in beam_logp[a:b]]
        top = max(lp)
        w = [math.exp(x - top) for x in lp]
        z = sum(w)
        out += [None if h is None else float(h) - wi / z for h, wi in zip(hits[a:b], w)]
    return out
