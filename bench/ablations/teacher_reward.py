"""GRPO rewards from frozen teachers that the README's ablation rows measured and that are not built in.

The built-in teacher rewards (``teacher_kl``, ``teacher_gain``) live in :mod:`rewards.teacher`; these
use its scores and ranks. Use one as a reward file, with the teachers as the RL config key::

    bash trl_trainer.sh examples/rl/tiny_beam.yaml model_name_or_path=SFT data_dir=O inject_target=false \\
        "teachers=[DIR_A,DIR_B]" "rewards=[bench/ablations/teacher_reward.py:teacher_rank]"

* ``teacher_rank``: 1/log2(the teachers' rank of the beam in its group + 2), no label (distillation
  of the teachers' order of the beams);
* ``teacher_cf``: 1 on a hit, else 1/log2(teacher rank + 2) - 1 (``cf_rank`` with the teachers for SASRec);
* ``sasrec_gain``: ``teacher_gain`` with the SASRec reward model of ``cf_rank`` as the teacher (no teachers);
* ``fused_gain``: ``teacher_gain`` with the mean of the teachers' and SASRec's ranks as the teacher order.

Measured on the bundled data (README "What was tried"): all four lowered valid NDCG@10.
"""
from __future__ import annotations

import math

from rewards.teacher import group_ranks, rank_gain, teacher_scores


def teacher_rank(prompts=None, completions=None, completion_ids=None, *, teachers=None, **kwargs) -> list[float]:
    """1/log2(rank of the completion within its group under the teachers + 2); no label."""
    return [1.0 / math.log2(r + 2) for r in group_ranks(prompts, teacher_scores(prompts, completions, teachers))]


def teacher_cf(prompts=None, completions=None, completion_ids=None, *, teachers=None, **kwargs) -> list[float]:
    """1 if the completion is the target, else 1/log2(teacher rank within the group + 2) - 1."""
    from rewards.sid_match import rule

    ranks = group_ranks(prompts, teacher_scores(prompts, completions, teachers))
    hits = rule(prompts=prompts, completions=completions, **kwargs)
    return [1.0 if h == 1 else 1.0 / math.log2(r + 2) - 1.0 for h, r in zip(hits, ranks)]


def sasrec_gain(prompts=None, completions=None, completion_ids=None, *, data_dir: str | None = None,
                **kwargs) -> list[float]:
    """``teacher_gain`` with SASRec's scores of the beams (the cf_rank reward model); no label."""
    return rank_gain(group_ranks(prompts, sasrec_scores(completions, kwargs, data_dir)), kwargs.get("beam_rank"))


def fused_gain(prompts=None, completions=None, completion_ids=None, *, data_dir: str | None = None,
               teachers=None, **kwargs) -> list[float]:
    """``teacher_gain`` with the mean of the teachers' and SASRec's within-group ranks as the teacher order."""
    llm = group_ranks(prompts, teacher_scores(prompts, completions, teachers))
    cf = group_ranks(prompts, sasrec_scores(completions, kwargs, data_dir))
    return rank_gain(group_ranks(prompts, [-(a + b) / 2 for a, b in zip(llm, cf)]), kwargs.get("beam_rank"))


def sasrec_scores(completions: list, kwargs: dict, data_dir: str | None) -> list[float]:
    """SASRec's score of each completion's item for its row's user (the cf_rank reward model)."""
    from rewards.collaborative import sasrec_scored

    scored, _ = sasrec_scored(completions, kwargs, data_dir)
    if any(x is None or x[0] is None for x in scored):
        raise ValueError("the SASRec rewards need rows with a target and a user, and completions that are items")
    return [float(s[item]) for item, _, s in scored]
