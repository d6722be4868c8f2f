"""Reward functions for GRPO, chosen by name (``get_reward("rule")``) or by ``path/to/file.py:function``.

Every reward has TRL's signature ``f(prompts=None, completions=None, completion_ids=None, **kwargs)
-> list[float]`` and reads its ground truth from the row's own dataset columns, which TRL passes
as keyword lists aligned with ``completions`` (``reward_model=[{"ground_truth": ...}, ...]``,
``extra_info=[{"target": ..., "candidates": [...]}, ...]``). The trainer adds ``beam_rank`` in
beam-search rollouts (and ``beam_logp``, the beam's summed answer log-prob), the RecPO trainer ``head_rank`` / ``head_prob``. Completions may be plain
strings or chat messages.

Built-in rewards (one module per family):

=================  ==========================  ===================================================
name               module                      formula
=================  ==========================  ===================================================
rule               rewards.sid_match           1 if the answer equals the ground truth else 0
partial_match      rewards.sid_match           matched leading SID levels / levels of the truth
ndcg_rank          rewards.sid_match           1 if hit else -1/log2(beam_rank + 2)
ndcg_rank_hit      rewards.sid_match           ndcg_rank in a group that holds the target, else 0
listwise           rewards.sid_match           1[hit] - softmax(beam_logp within the group)
cf_rank            rewards.collaborative       1 if hit else 1/log2(SASRec rank of the answer + 2) - 1
cf_fused           rewards.collaborative       1 if hit else mean of 1/log2(SASRec rank + 2), 1/log2(beam_rank + 2), - 1
cf_logp            rewards.collaborative       log SASRec softmax(answer) over the ranked items; no label
teacher_kl         rewards.teacher             teachers' mean log p(answer) - beam_logp (on-policy distillation; no label)
teacher_gain       rewards.teacher             1/log2(teachers' rank in the group + 2) - 1/log2(beam_rank + 2); no label
format             rewards.format              1 if [<think>..</think>] + one well-formed answer
think              rewards.format              1 if a non-empty <think>..</think> precedes an answer
candidate_choice   rewards.candidate           +1 target, 0 other candidate, -1 invalid (prompts.parse_choice)
query_format       rewards.format              1 if [<think>..</think>] + a one-line query of <= 32 words
retrieval_ndcg     rewards.retrieval           1/log2(rank + 2) of the target under BM25(query)
recpo              rewards.head                0.95/log2(head_rank + 2) + 0.05 head_prob (item head)
think_only         rewards.head                1 if the completion is one non-empty <think>..</think>
=================  ==========================  ===================================================

A reward may declare keyword-only options (``data_dir`` for the BM25 catalog, ``cache_dir`` for the
SASRec reward model of a read-only data folder, ``teachers`` for the teacher rewards); the trainer
fills those named in ``get_reward(..., **context)`` and leaves the rest at their defaults.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mimigenrec.prompts import ITEM_REF_RE

RewardFunc = Callable[..., list]

TEACHER_REWARDS = ("teacher_kl", "teacher_gain")  # built-ins that need the ``teachers`` config key
LABEL_FREE_REWARDS = (*TEACHER_REWARDS, "cf_logp")  # built-ins that never read a row's label

_BUILTIN: dict[str, str] = {
    "rule": "rewards.sid_match:rule",
    "partial_match": "rewards.sid_match:partial_match",
    "ndcg_rank": "rewards.sid_match:ndcg_rank",
    "ndcg_rank_hit": "rewards.sid_match:ndcg_rank_hit",
    "listwise": "rewards.sid_match:listwise",
    "cf_rank": "rewards.collaborative:cf_rank",
    "cf_fused": "rewards.collaborative:cf_fused",
    "cf_logp": "rewards.collaborative:cf_logp",
    "teacher_kl": "rewards.teacher:teacher_kl",
    "teacher_gain": "rewards.teacher:teacher_gain",
    "format": "rewards.format:format_reward",
    "think": "rewards.format:think",
    "candidate_choice": "rewards.candidate:candidate_choice",
    "query_format": "rewards.format:query_format",
    "retrieval_ndcg": "rewards.retrieval:retrieval_ndcg",
    "recpo": "rewards.head:recpo",
    "think_only": "rewards.head:think_only",
}


def list_rewards() -> list[str]:
    """Names of the built-in rewards."""
    return sorted(_BUILTIN)


def completion_text(completion: Any) -> str:
    """A completion as text: a string as is, chat messages -> their contents joined."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return str(completion.get("content") or "")
    if isinstance(completion, Sequence):
        return "".join(completion_text(m) for m in completion)
    raise TypeError(f"unsupported completion type {type(completion).__name__}")


def column(kwargs: Mapping[str, Any], name: str, n: int) -> list:
    """Dataset column ``name`` from TRL's reward kwargs (``[None] * n`` when absent)."""
    values = kwargs.get(name)
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ValueError(f"reward kwarg '{name}' has {len(values)} values for {n} completions")
    return list(values)


def ground_truths(kwargs: Mapping[str, Any], n: int) -> list[str | None]:
    """``reward_model[i]["ground_truth"]`` of every row (None where missing)."""
    return [(rm or {}).get("ground_truth") if isinstance(rm, Mapping) else None
            for rm in column(kwargs, "reward_model", n)]


def extra_infos(kwargs: Mapping[str, Any], n: int) -> list[dict]:
    """``extra_info`` dict of every row (empty where missing)."""
    return [dict(x) if isinstance(x, Mapping) else {} for x in column(kwargs, "extra_info", n)]


def item_rows(completions, kwargs: Mapping[str, Any]) -> list[tuple[str, int | None, dict]]:
    """``(completion text, target item id, extra_info)`` per row, for rewards over ``[ITEM_id]`` items.

    The target is the row's ``[ITEM_id]`` ground truth, else its ``extra_info.target``; None when neither says.
    """
    completions = list(completions or [])
    n = len(completions)
    rows = []
    for c, truth, info in zip(completions, ground_truths(kwargs, n), extra_infos(kwargs, n)):
        ids = ITEM_REF_RE.findall(str(truth or ""))
        target = int(ids[0]) if len(ids) == 1 else None if info.get("target") is None else int(info["target"])
        rows.append((completion_text(c), target, info))
    return rows


def _load_object(spec: str) -> Any:
    """``module.path:attr`` or ``path/to/file.py:attr`` -> the object."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"reward spec {spec!r}: expected 'name', 'module:function' or 'path/to/file.py:function'")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"reward spec {spec!r}: no file {path}")
        mod_name = f"_mimigenrec_user_reward_{abs(hash(str(path)))}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        module = importlib.import_module(target)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"reward spec {spec!r}: {target} has no attribute {attr!r}") from None


def _bind(fn: RewardFunc, name: str, context: Mapping[str, Any]) -> RewardFunc:
    """Fill ``fn``'s keyword-only options that appear in ``context``; keep a readable ``__name__``."""
    params = inspect.signature(fn).parameters
    bound = {k: v for k, v in context.items()
             if k in params and params[k].kind is inspect.Parameter.KEYWORD_ONLY and v is not None}
    if not bound and getattr(fn, "__name__", None) == name:
        return fn

    @functools.wraps(fn)
    def reward(*args, **kwargs):
        return fn(*args, **{**bound, **kwargs})

    reward.__name__ = name
    return reward


def get_reward(name_or_spec: str | RewardFunc, **context: Any) -> RewardFunc:
    """A reward function by built-in name, ``module:function`` or ``path/to/file.py:function``.

    ``context`` (e.g. ``data_dir=..., top_k=...``) fills the reward's keyword-only options of
    the same names. A callable is returned as is (bound to ``context``).
    """
    if callable(name_or_spec):
        return _bind(name_or_spec, getattr(name_or_spec, "__name__", "reward"), context)
    spec = str(name_or_spec).strip()
    if spec in _BUILTIN:
        fn, name = _load_object(_BUILTIN[spec]), spec
    elif ":" in spec:
        fn = _load_object(spec)
        name = getattr(fn, "__name__", spec.rpartition(":")[2])
    else:
        raise KeyError(f"unknown reward {spec!r}; built-in: {', '.join(list_rewards())}; "
                       f"or give 'path/to/file.py:function'")
    if not callable(fn):
        raise TypeError(f"reward {spec!r} is not callable")
    return _bind(fn, name, context)


__all__ = ["LABEL_FREE_REWARDS", "TEACHER_REWARDS", "column", "completion_text", "extra_infos", "get_reward", "ground_truths", "list_rewards"]
