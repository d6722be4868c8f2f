"""A GRPO reward from frozen teacher LLMs: how they rank each beam of a group (an ablation of the README).

Use it as a reward file (``rewards/`` loads ``path.py:function``)::

    TEACHERS=DIR_A,DIR_B bash trl_trainer.sh examples/rl/tiny_beam.yaml model_name_or_path=SFT data_dir=O \\
        "rewards=[bench/ablations/teacher_reward.py:teacher_rank]" inject_target=false

``TEACHERS``: comma-separated checkpoints that share the policy's tokenizer (e.g. the two SFT seeds'
kept checkpoints). A completion's teacher score is the mean over the teachers of its summed answer
log-prob given the prompt (the beam search's score, so with the policy itself as teacher it equals the
``beam_logp`` the trainer passes). Rewards use the rank within the prompt's group:

* ``teacher_rank``: 1/log2(rank + 2), no label (distillation of the teachers' order of the beams);
* ``teacher_cf``: 1 on a hit, else 1/log2(rank + 2) - 1 (``cf_rank`` with the teachers for SASRec);
* ``teacher_gain``: 1/log2(teacher rank + 2) - 1/log2(own beam rank + 2), no label: zero where the
  teachers agree with the policy's order, so a group moves only where they disagree (a rank reward
  alone also sharpens the policy's own order: its top beams rise, its lower beams fall below items
  outside the group);
* ``sasrec_gain``: the same with the SASRec reward model of ``cf_rank`` as the teacher (no TEACHERS);
* ``fused_gain``: the same with the mean of the TEACHERS' and SASRec's ranks as the teacher order;
* ``teacher_kl``: the teachers' log-prob of the beam minus the policy's own (``beam_logp``), no label:
  the per-sample reward of on-policy distillation (its mean over the policy's samples is minus the
  reverse KL to the teachers), with the magnitudes that the rank rewards throw away.

Measured on the bundled data (README "What was tried"): none lifted valid NDCG@10 by 2 s.e., so none is
a built-in reward.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from rewards import completion_text


@functools.lru_cache(maxsize=1)
def _teachers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dirs = [d for d in os.environ.get("TEACHERS", "").split(",") if d]
    if not dirs:
        raise ValueError("set TEACHERS=DIR[,DIR...] (teacher checkpoints sharing the policy's tokenizer)")
    tok = AutoTokenizer.from_pretrained(dirs[0])
    return tok, [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in dirs]


@torch.no_grad()
def teacher_scores(prompts: list, completions: list) -> list[float]:
    """Mean over the teachers of log p(completion | prompt), summed over the completion's tokens."""
    from trl.data_utils import maybe_apply_chat_template

    tok, models = _teachers()
    P = [tok(maybe_apply_chat_template({"prompt": p}, tok)["prompt"], add_special_tokens=False).input_ids
         for p in prompts]
    C = [tok(completion_text(c).strip(), add_special_tokens=False).input_ids + [tok.eos_token_id]
         for c in completions]
    L = max(len(p) + len(c) for p, c in zip(P, C))
    ids = torch.full((len(P), L), tok.pad_token_id)
    att = torch.zeros((len(P), L), dtype=torch.long)
    answer = torch.zeros((len(P), L), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(P, C)):  # left-padded: every answer ends at the last column
        ids[i, L - len(p) - len(c):] = torch.tensor(p + c)
        att[i, L - len(p) - len(c):] = 1
        answer[i, L - len(c):] = True
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    total = torch.zeros(len(P))
    for m in models:
        lp = m(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, :-1].float().log_softmax(-1)
        total += (lp.gather(-1, ids[:, 1:, None])[..., 0] * answer[:, 1:]).sum(1)
    return (total / len(models)).tolist()


def group_ranks(prompts: list, scores: list[float]) -> list[int]:
    """0-based rank of each completion among those of the same prompt, by descending score."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(repr(p), []).append(i)
    ranks = [0] * len(scores)
    for idx in groups.values():
        for r, i in enumerate(sorted(idx, key=lambda i: -scores[i])):
            ranks[i] = r
    return ranks


def teacher_rank(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
    """1/log2(rank of the completion within its group under the teachers + 2); no label."""
    return [1.0 / math.log2(r + 2) for r in group_ranks(prompts, teacher_scores(prompts, completions))]


def teacher_cf(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
    """1 if the completion is the target, else 1/log2(teacher rank within the group + 2) - 1."""
    from rewards.sid_match import rule

    ranks = group_ranks(prompts, teacher_scores(prompts, completions))
    hits = rule(prompts=prompts, completions=completions, **kwargs)
    return [1.0 if h == 1 else 1.0 / math.log2(r + 2) - 1.0 for h, r in zip(hits, ranks)]


def _gain(ranks: list[int], beam_rank) -> list[float]:
    if beam_rank is None:
        raise ValueError("the gain rewards need beam-search rollouts (rollout_mode: beam), which pass beam_rank")
    return [1.0 / math.log2(r + 2) - 1.0 / math.log2(int(b) + 2) for r, b in zip(ranks, beam_rank)]


def teacher_gain(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
    """1/log2(teacher rank within the group + 2) - 1/log2(own beam rank + 2); no label."""
    return _gain(group_ranks(prompts, teacher_scores(prompts, completions)), kwargs.get("beam_rank"))


def teacher_kl(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
    """Teacher log p(completion | prompt) - the policy's own (``beam_logp``); no label."""
    own = kwargs.get("beam_logp")
    if own is None:
        raise ValueError("teacher_kl needs beam-search rollouts (rollout_mode: beam), which pass beam_logp")
    return [t - float(o) for t, o in zip(teacher_scores(prompts, completions), own)]


def sasrec_gain(prompts=None, completions=None, completion_ids=None, *, data_dir: str | None = None,
                **kwargs) -> list[float]:
    """``teacher_gain`` with SASRec's scores of the beams (the cf_rank reward model); no label."""
    return _gain(group_ranks(prompts, sasrec_scores(completions, kwargs, data_dir)), kwargs.get("beam_rank"))


def fused_gain(prompts=None, completions=None, completion_ids=None, *, data_dir: str | None = None,
               **kwargs) -> list[float]:
    """``teacher_gain`` with the mean of the TEACHERS' and SASRec's within-group ranks as the teacher order."""
    llm = group_ranks(prompts, teacher_scores(prompts, completions))
    cf = group_ranks(prompts, sasrec_scores(completions, kwargs, data_dir))
    return _gain(group_ranks(prompts, [-(a + b) / 2 for a, b in zip(llm, cf)]), kwargs.get("beam_rank"))


def sasrec_scores(completions: list, kwargs: dict, data_dir: str | None) -> list[float]:
    """SASRec's score of each completion's item for its row's user (the cf_rank reward model)."""
    from rewards.collaborative import sasrec_scored

    scored, _ = sasrec_scored(completions, kwargs, data_dir)
    if any(x is None or x[0] is None for x in scored):
        raise ValueError("the SASRec rewards need rows with a target and a user, and completions that are items")
    return [float(s[item]) for item, _, s in scored]
