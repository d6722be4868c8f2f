"""Typed RL configuration: every ``trl.GRPOConfig`` field plus ours, loaded from YAML + ``key=value``.

``load_config("examples/rl/tiny_sample.yaml", ["learning_rate=1e-5", "rewards=[rule,format]"])``.
Override values are parsed as YAML (``3`` -> int, ``true`` -> bool, ``[a,b]`` -> list, ``null``
-> None). Unknown keys are an error naming the closest known ones. On a machine without CUDA,
``bf16`` defaults to false; ``report_to`` defaults to ``none`` everywhere.
"""
from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from trl import GRPOConfig

from mimigenrec import yaml_config
from mimigenrec.io import BadInputError

__all__ = ["RLConfig", "load_config", "our_fields", "parse_overrides"]


@dataclass
class RLConfig(GRPOConfig):
    """``GRPOConfig`` + the dataset, reward, rollout, LoRA and watch settings of mimigenrec."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "HF model directory to train (an SFT output; SID tokens already added)."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Preprocessed dataset dir O: reads O/rl/<split>.json, O/id2sid.json, "
                                        "O/items.jsonl (docs/formats.md)."})
    disable_dropout: bool = field(
        default=True, metadata={"help": "Switch the policy's dropout off (TRL's default: false). Rollouts are drawn in "
                                        "eval mode, so with dropout on, the loss would score them under another "
                                        "policy than the one that drew them."})
    train_split: str = field(default="train", metadata={"help": "RL split trained on (O/rl/<split>.json)."})
    eval_split: str = field(default="valid", metadata={"help": "RL split of the held-out NDCG@10 watch."})
    heldout_prompts: float = field(
        default=0.0, metadata={"help": "0: train on train_split's rows. p in (0, 1): train instead on the prompts of a "
                                       "seeded share p of eval_split's users with their labels removed, and let the "
                                       "watch score only the other users' rows. For label-free rewards (teacher_kl, "
                                       "teacher_gain, cf_logp): teachers trained on the train rows mostly repeat "
                                       "them there, so a prompt none of them saw (a user's whole train history) is "
                                       "where their generalisation, what distillation passes on, shows."})
    max_train_rows: int | None = field(
        default=None, metadata={"help": "Train on a seeded random subset of this many rows (None or 0 = all)."})
    rewards: list[str] = field(
        default_factory=lambda: ["rule"],
        metadata={"help": "Reward functions: built-in names (rule, partial_match, ndcg_rank, format, think, "
                          "candidate_choice, retrieval_ndcg) or path/to/file.py:function. Weights: reward_weights."})
    retrieval_top_k: int = field(default=100, metadata={"help": "Cut-off K of retrieval_ndcg (BM25 NDCG@K)."})
    teachers: list[str] = field(
        default_factory=list,
        metadata={"help": "Frozen checkpoints sharing the policy's tokenizer whose mean answer log-prob the teacher "
                          "rewards (teacher_kl, teacher_gain) use, e.g. the SFT seeds' kept checkpoints "
                          "(select_checkpoint's 'ensemble')."})
    rollout_mode: str = field(
        default="sample", metadata={"help": "sample: num_generations constrained samples per prompt; beam: one "
                                            "constrained beam search per prompt, num_generations beams (ranked)."})
    constrained: bool = field(
        default=True, metadata={"help": "Trie-constrained rollouts and constrained-policy log-probs; false = stock "
                                        "TRL free-form generation (e.g. <think> reasoning)."})
    inject_target: bool = field(
        default=False, metadata={"help": "When no rollout of a group is the row's target, replace the group's last "
                                         "rollout with it (every group then has a positive to rank above the model's "
                                         "own best wrong answers); share logged as injected_target."})
    propose_cf: int = field(
        default=0, metadata={"help": "rollout_mode beam: the last N beams of every group give way to the N items "
                                     "cf_logp's SASRec (no valid label seen) ranks highest among those the group's "
                                     "other beams miss; each keeps the policy's own log-prob, so teacher_kl scores "
                                     "it like a beam. Label-free: lets distillation raise items the policy ranks "
                                     "too low to reach its beams (0 = the policy's beams only)."})
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of the full model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Module names LoRA adapts."})
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full beside LoRA (e.g. [embed_tokens, lm_head] so new "
                                        "SID token embeddings keep learning)."})
    eval_every_steps: int = field(
        default=0, metadata={"help": "Every N optimizer steps (and at step 0 and the end) log mean train reward beside "
                                     "held-out NDCG@eval_k / HR@eval_k with standard errors (0 = step 0 and the end "
                                     "only); a PNG of both is written at the end."})
    eval_rows: int = field(default=1000, metadata={"help": "Held-out rows of eval_split used by the watch (0 = no "
                                                           "watch; ~1,000 resolve a 5% change of NDCG@10)."})
    eval_num_beams: int = field(default=50, metadata={"help": "Beams of the watch's constrained beam search (the "
                                                              "evaluation's default)."})
    eval_k: int = field(default=10, metadata={"help": "Cut-off K of the watch's NDCG@K / HR@K."})
    select_best: bool = field(
        default=True, metadata={"help": "Keep the watch point with the best held-out NDCG@eval_k (step 0 = the "
                                        "starting model included) as the final model; selection.json says which."})
    select_min_se: float = field(
        default=2.0, metadata={"help": "select_best: a later point replaces step 0 only when its paired gain over "
                                       "step 0 is at least this many standard errors (0 = the plain best point)."})
    trainer: str = field(
        default="grpo", metadata={"help": "grpo: ConstrainedGRPOTrainer (mimigenrec.rl.grpo); recpo: RecPO on an "
                                          "item-head folder (mimigenrec.rl.recpo; the watch fields do not apply)."})
    recpo: dict | None = field(
        default=None, metadata={"help": "trainer recpo: options of mimigenrec.rl.recpo.RecPOOptions, e.g. "
                                        "{rec_loss_weight: 1.0, refresh_steps: 50, prob_weight: 0.05}."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rollout_mode not in ("sample", "beam"):
            raise BadInputError(f"rollout_mode must be 'sample' or 'beam', got {self.rollout_mode!r}")
        if not 0.0 <= self.heldout_prompts < 1.0:
            raise BadInputError(f"heldout_prompts must be in [0, 1), got {self.heldout_prompts}")
        if self.propose_cf and (self.rollout_mode != "beam" or self.inject_target
                                or not 0 < self.propose_cf < self.num_generations):
            raise BadInputError(f"propose_cf: {self.propose_cf} needs rollout_mode: beam, inject_target: false and "
                                f"0 < propose_cf < num_generations ({self.num_generations})")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise BadInputError(f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards")


def our_fields() -> list[str]:
    """Names of the fields mimigenrec adds to GRPOConfig."""
    base = {f.name for f in fields(GRPOConfig)}
    return [f.name for f in fields(RLConfig) if f.name not in base]


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "b=[x,y]"]`` -> ``{"a": 1, "b": ["x", "y"]}`` (values parsed as YAML)."""
    return yaml_config.parse_overrides(pairs)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Strings YAML leaves as text (``1e-5``, ``"3"``) -> the field's scalar type; other values as they are."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if not isinstance(value, str):
        if isinstance(value, int) and not isinstance(value, bool) and float in args and int not in args:
            return float(value)
        return value
    for typ in args:
        if typ is float:
            try:
                return float(value)
            except ValueError:
                pass
        elif typ is int:
            try:
                return int(value)
            except ValueError:
                pass
        elif typ is bool and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    if any(t in (float, int, bool) for t in args) and str not in args and not any(
            isinstance(t, type) and issubclass(t, str) for t in args):
        raise BadInputError(f"config key {name}: {value!r} is not a valid {' or '.join(getattr(t, '__name__', str(t)) for t in args)}")
    return value


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), **extra: Any) -> RLConfig:
    """YAML file (optional) + ``key=value`` overrides + keyword values -> :class:`RLConfig`."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(yaml_config.read_yaml_mapping(path))
    values.update(parse_overrides(overrides))
    values.update(extra)
    known = {f.name for f in fields(RLConfig) if f.init}
    unknown = [k for k in values if k not in known]
    if unknown:
        hints = "; ".join(f"{k} (did you mean {', '.join(difflib.get_close_matches(k, known, 3)) or '?'})"
                          for k in unknown)
        raise BadInputError(f"unknown config key(s): {hints}")
    hints = typing.get_type_hints(RLConfig)
    values = {k: _coerce(k, v, hints.get(k, Any)) for k, v in values.items()}
    if "bf16" not in values and not _cuda():
        values["bf16"] = False
    values.setdefault("report_to", "none")
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(RLConfig).parse_dict(values, allow_extra_keys=False)
    return cfg
