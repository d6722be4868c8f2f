"""Collaborative reward: how a SASRec reward model ranks the answered item for this user.

``cf_rank``: 1 on a hit, else 1/log2(rank + 2) - 1 with ``rank`` the answer's 0-based rank among
the evaluated items under SASRec's scores for the row's history (so a wrong answer SASRec also likes costs
little, a wrong answer it ranks last costs about 1). The idea is MiniOneRec's collaborative
reward (``reward_type=sasrec``): the reward model brings the co-occurrence signal that SID
generation learns slowly. The SASRec model is the one ``evaluate.sh --baseline sasrec`` trains for
the test split (train interactions, early-stopped on valid) and caches in ``DATA/baselines``, so
the reward costs no second training when the baseline has run, and it is trained once otherwise. When
DATA is read-only the model is cached under ``cache_dir/baselines`` (the trainer passes its output_dir).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from rewards import completion_text, extra_infos


@functools.lru_cache(maxsize=4)
def _reward_model(data_dir: str, cache_dir: str | None = None, split: str = "test"):
    """``(SASRecScorer, {sid string: item id}, universe ids)`` for ``data_dir``, read from its cache in
    ``data_dir/baselines`` (or ``cache_dir/baselines``) or trained and cached in the first writable one.
    ``split``: the protocol of ``evaluate.sh``'s SASRec for that split: "test" = trained on train,
    early-stopped on valid; "valid" = stopped on each user's held-out last train row (valid unseen)."""
    from mimigenrec import prompts
    from mimigenrec.eval.evaluate import split_sasrec
    from mimigenrec.io import DataDir

    data, scorer = split_sasrec(data_dir, split, cache_dir)
    sid_to_item = {prompts.sid_string(s): i for i, s in DataDir(data_dir).load_id2sid().items()}
    return scorer, sid_to_item, torch.tensor(sorted(data.universe))


def sasrec_scored(completions, kwargs: dict, data_dir: str | None, cache_dir: str | None = None, split: str = "test"
                  ) -> tuple[list[tuple[int | None, int | None, torch.Tensor] | None], torch.Tensor]:
    """Per completion whose row names a user: ``(its item id, None if not an item; the target, None
    on a row without a label; SASRec's scores of every item for the row's user)``, None elsewhere; and
    the ids of the items evaluation ranks. Every row's scores come from one batched SASRec call."""
    if not data_dir:
        raise ValueError("the cf rewards need the data folder (the trainer passes data_dir)")
    scorer, sid_to_item, universe = _reward_model(str(Path(data_dir).resolve()), cache_dir, split)
    completions = list(completions or [])
    infos = extra_infos(kwargs, len(completions))
    out: list[tuple[int | None, int | None, torch.Tensor] | None] = [None] * len(completions)
    todo = [k for k, info in enumerate(infos) if "user_id" in info and "position" in info]
    if not todo:
        return out, universe
    keys = sorted({(int(infos[k]["user_id"]), int(infos[k]["position"])) for k in todo})
    with torch.no_grad():
        scores = scorer.score_rows([{"user_id": u, "position": p} for u, p in keys])
    row_of = {key: j for j, key in enumerate(keys)}
    for k in todo:
        info = infos[k]
        target = info.get("target")
        out[k] = (sid_to_item.get(completion_text(completions[k]).strip()), None if target is None else int(target),
                  scores[row_of[(int(info["user_id"]), int(info["position"]))]])
    return out, universe


def _sasrec_ranks(completions, kwargs: dict, data_dir: str | None, cache_dir: str | None) -> list[int | str | None]:
    """Per completion: None (no target), "hit", "invalid" (not an item), or the answer's 0-based SASRec rank."""
    scored, universe = sasrec_scored(completions, kwargs, data_dir, cache_dir)
    out: list[int | str | None] = []
    for x in scored:
        if x is None or x[1] is None:
            out.append(None)
            continue
        item, target, s = x
        # the rank is among the items evaluation ranks
        out.append("invalid" if item is None else "hit" if item == target else int((s[universe] > s[item]).sum()))
    return out


def _cf_rewards(ranks: list[int | str | None], miss) -> list[float | None]:
    """1 on a hit, -1 for a non-item, None without a target, else ``miss(k, rank) - 1`` for completion k."""
    return [None if r is None else 1.0 if r == "hit" else -1.0 if r == "invalid" else miss(k, r) - 1.0
            for k, r in enumerate(ranks)]


def cf_rank(prompts=None, completions=None, completion_ids=None, *, data_dir: str | None = None,
            cache_dir: str | None = None, **kwargs) -> list[float | None]:
    """r = 1 if the answer is the target, else 1/log2(SASRec rank of the answer + 2) - 1 (None without a target)."""
    return _cf_rewards(_sasrec_ranks(completions, kwargs, data_dir, cache_dir), lambda k, r: 1.0 / math.log2(r + 2))


def cf_fused(prompts=None, completions=None, completion_ids=None, *, data_dir: str | None = None,
             cache_dir: str | None = None, **kwargs) -> list[float | None]:
    """Beam rollouts: r = 1 on a hit, else (1/log2(SASRec rank + 2) + 1/log2(beam rank + 2)) / 2 - 1.

    The policy's own beam order is half of a wrong answer's reward, so a beam overtakes a better-ranked
    one only where SASRec prefers it clearly (a fusion of the two rankings as target). Measured on the
    bundled data it feeds back on itself: the beams the policy already ranks first earn more, their
    log-probs rise, and without target injection valid NDCG@10 fell 0.1067 -> 0.0433 in 200 steps
    (README "What was tried"); kept for that record, not for use."""
    beam_rank = kwargs.get("beam_rank")
    if beam_rank is None:
        raise ValueError("cf_fused needs beam-search rollouts (rollout_mode: beam), which pass beam_rank")
    return _cf_rewards(_sasrec_ranks(completions, kwargs, data_dir, cache_dir),
                       lambda k, r: (1.0 / math.log2(r + 2) + 1.0 / math.log2(int(beam_rank[k]) + 2)) / 2)


def cf_logp(prompts=None, completions=None, completion_ids=None, *, data_dir: str | None = None,
            cache_dir: str | None = None, **kwargs) -> list[float | None]:
    """r = log of SASRec's softmax over the ranked items at the answer (a non-item: the lowest item's);
    None for a row without a user. No label: added to ``teacher_kl`` (weights w) the reward is
    log(p_teachers * p_SASRec^w) - log p_policy, on-policy distillation of that product of experts.

    The SASRec is the one ``evaluate.sh`` trains to score valid: stopped on each user's held-out last
    train row, so neither the reward nor a GRPO step the watch picks on valid has seen a valid label.
    """
    scored, universe = sasrec_scored(completions, kwargs, data_dir, cache_dir, split="valid")
    out: list[float | None] = []
    row_logp: dict[int, torch.Tensor] = {}   # a group's beams share their row's score vector
    for x in scored:
        if x is None:
            out.append(None)
            continue
        item, _, s = x
        if s.data_ptr() not in row_logp:   # each completion holds a view of its row of one score matrix
            row_logp[s.data_ptr()] = s[universe].log_softmax(-1)
        logp = row_logp[s.data_ptr()]
        pos = int(torch.searchsorted(universe, item)) if item is not None else len(universe)
        out.append(float(logp[pos]) if pos < len(universe) and int(universe[pos]) == item else float(logp.min()))
    return out


def sasrec_proposals(rows: list[dict], exclude: list[set[str]], n: int, data_dir: str,
                     cache_dir: str | None = None) -> list[list[str]]:
    """Per RL row (its ``extra_info`` names the user and position): the answer texts (SID strings) of the
    ``n`` items that ``cf_logp``'s SASRec scores highest among the ranked items, skipping the texts in
    ``exclude`` (the group's own beams) and the user's earlier items. That SASRec saw no valid label, so the
    proposals are label-free: the trainer's ``propose_cf`` puts them in a beam group beside the policy's own
    beams. Earlier items are skipped because SASRec ranks the user's last item first in most rows (a repeat
    prior worth little: 2-6% of targets are repeats); proposed, GRPO learned to repeat it (README)."""
    with torch.enable_grad():  # the trainer asks from inside its no-grad rollout; a first call trains SASRec
        scorer, sid_to_item, universe = _reward_model(str(Path(data_dir).resolve()), cache_dir, "valid")
    text_of = {i: s for s, i in sid_to_item.items()}
    keys = []
    for r in rows:
        info = r.get("extra_info") or {}
        if "user_id" not in info or "position" not in info:
            raise ValueError("propose_cf needs rows whose extra_info names user_id and position (the RL JSON's)")
        keys.append({"user_id": int(info["user_id"]), "position": int(info["position"])})
    with torch.no_grad():
        scores = scorer.score_rows(keys)[:, universe]
    order = scores.argsort(dim=1, descending=True)
    out = []
    for j, skip in enumerate(exclude):
        seen = set(scorer.seqs.prefix(keys[j]["user_id"], keys[j]["position"]))
        picked: list[str] = []
        for col in order[j].tolist():
            item = int(universe[col])
            text = text_of.get(item)
            if text is not None and text not in skip and item not in seen:
                picked.append(text)
                if len(picked) == n:
                    break
        out.append(picked)
    return out
