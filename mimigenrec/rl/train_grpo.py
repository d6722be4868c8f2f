"""GRPO with trie-constrained rollouts: ``python -m mimigenrec.rl.train_grpo CONFIG.yaml [key=value ...]``.

CONFIG holds any ``trl.GRPOConfig`` field plus mimigenrec's own (see ``--help``); ``key=value``
arguments override it (values parsed as YAML). Usually launched by ``trl_trainer.sh`` through
``accelerate launch``. Reads ``data_dir/rl/<split>.json``, ``id2sid.json`` and ``items.jsonl``;
writes checkpoints (every ``save_steps``), the final model (with ``select_best``: the watch point with
the best held-out NDCG, see :mod:`mimigenrec.rl.reward_watch`), ``reward_watch.{jsonl,png}`` and
``selection.json`` to ``output_dir``. ``resume_from_checkpoint=PATH`` (or ``true`` = latest in ``output_dir``) resumes.
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from mimigenrec.io import BadInputError, DataDir, read_json, read_jsonl

__all__ = ["HELDOUT_USERS", "build_trainer", "heldout_split", "load_rl_rows", "main", "run"]

HELDOUT_USERS = "heldout_users.json"   # with heldout_prompts: the users whose prompts trained, and the watch's


def load_rl_rows(path: str | Path) -> list[dict]:
    """RL rows from a JSON array or JSON-lines file; every row checked (errors name file and row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RL split not found: {path} (run the preprocess 'build' stage)")
    with open(path, encoding="utf-8") as f:
        head = f.read(64).lstrip()
    rows = read_json(path) if head.startswith("[") else read_jsonl(path)
    if not isinstance(rows, list):
        raise BadInputError(f"{path}: expected a JSON array of RL rows")
    for i, r in enumerate(rows):
        where = f"{path}: row {i}"
        if not isinstance(r, dict):
            raise BadInputError(f"{where}: expected an object")
        msgs = r.get("prompt")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                               for m in msgs):
            raise BadInputError(f"{where}: 'prompt' must be a non-empty list of {{role, content}} messages")
        rm = r.get("reward_model")
        if not isinstance(rm, dict) or rm.get("ground_truth") in (None, ""):
            raise BadInputError(f"{where}: 'reward_model.ground_truth' is missing")
        if not isinstance(r.get("extra_info", {}), dict):
            raise BadInputError(f"{where}: 'extra_info' must be an object")
    return rows


def _subset(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded random subset of ``n`` rows in their original order; ``None`` or ``0`` = all rows."""
    if not n or n >= len(rows):
        return rows
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


def heldout_split(rows: list[dict], share: float, seed: int, where: str) -> tuple[list[dict], list[dict]]:
    """``(prompts, watch rows)``: the rows of a seeded ``share`` of the users, labels removed
    (:func:`mimigenrec.rl.grpo.without_label`), and the other users' rows as they are."""
    from mimigenrec.rl.grpo import without_label

    no_user = [i for i, r in enumerate(rows) if "user_id" not in (r.get("extra_info") or {})]
    if no_user:
        raise BadInputError(f"{where}: row {no_user[0]} has no extra_info.user_id, which heldout_prompts splits by")
    users = sorted({int(r["extra_info"]["user_id"]) for r in rows})
    chosen = set(random.Random(seed).sample(users, max(1, min(len(users) - 1, round(share * len(users))))))
    return ([without_label(r) for r in rows if int(r["extra_info"]["user_id"]) in chosen],
            [r for r in rows if int(r["extra_info"]["user_id"]) not in chosen])


def _item_ids(dd: DataDir, id2sid: dict | None) -> list[int]:
    if dd.items.is_file():
        return [int(r["item_id"]) for r in read_jsonl(dd.items)]
    return sorted(int(i) for i in (id2sid or {}))


def build_trainer(cfg, callbacks: Sequence[Any] = ()):
    """Tokenizer, answer space, datasets, rewards, LoRA -> a ready :class:`ConstrainedGRPOTrainer`."""
    if cfg.trainer == "recpo":  # the item-head GRPO stage (R2ec's RecPO)
        if cfg.heldout_prompts:
            raise BadInputError("heldout_prompts applies to trainer: grpo (RecPO's rewards read the labels)")
        from mimigenrec.rl.recpo import build_recpo_trainer

        return build_recpo_trainer(cfg, callbacks)
    if cfg.trainer != "grpo":
        raise BadInputError(f"trainer must be grpo or recpo, got {cfg.trainer!r}")
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer

    from mimigenrec.rl.grpo import AnswerSpace, ConstrainedGRPOTrainer, row_answer_kind
    from mimigenrec.rl.reward_watch import RewardWatch
    from rewards import LABEL_FREE_REWARDS, TEACHER_REWARDS, get_reward
    from rewards.collaborative import sasrec_proposals

    if not cfg.model_name_or_path:
        raise BadInputError("model_name_or_path is required")
    if str(cfg.model_name_or_path).endswith(".gguf"):
        raise BadInputError("model_name_or_path is a GGUF file: convert it first (python -m mimigenrec.models.gguf_import)")
    if not cfg.data_dir:
        raise BadInputError("data_dir is required")
    dd = DataDir(cfg.data_dir)
    heldout = None
    train_src = dd.rl(cfg.eval_split if cfg.heldout_prompts else cfg.train_split)
    eval_rows: list[dict] = []
    if cfg.heldout_prompts:   # label-free prompts of some eval users; the watch scores the others
        labelled = [r for r in cfg.rewards if r not in LABEL_FREE_REWARDS]
        if labelled or cfg.inject_target:
            what = f"reward {labelled[0]}" if labelled else "inject_target"
            raise BadInputError(f"heldout_prompts trains on prompts whose labels are removed, but {what} needs "
                                f"them: use the label-free rewards ({', '.join(LABEL_FREE_REWARDS)}) only")
        train_rows, watch_rows = heldout_split(load_rl_rows(train_src), cfg.heldout_prompts, cfg.seed, str(train_src))
        heldout = {"split": cfg.eval_split, "share": cfg.heldout_prompts, "seed": cfg.seed,
                   "prompt_users": sorted({int(r["extra_info"]["user_id"]) for r in train_rows}),
                   "watch_users": sorted({int(r["extra_info"]["user_id"]) for r in watch_rows})}
        train_rows = _subset(train_rows, cfg.max_train_rows, cfg.seed)
        if cfg.eval_rows > 0:
            eval_rows = _subset(watch_rows, cfg.eval_rows, cfg.seed)
    else:
        train_rows = _subset(load_rl_rows(train_src), cfg.max_train_rows, cfg.seed)
        if cfg.eval_rows > 0 and dd.rl(cfg.eval_split).is_file():
            eval_rows = _subset(load_rl_rows(dd.rl(cfg.eval_split)), cfg.eval_rows, cfg.seed)
    if not train_rows:
        raise BadInputError(f"{train_src} holds no rows to train on")

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # causal LMs take no token_type_ids; a generic fast tokenizer would return them and generate() rejects them
    tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]

    # the answer space: every rollout's trie when constrained; else only the NDCG watch's (item answers)
    watch_kinds = {row_answer_kind(r) for r in eval_rows}
    space = None
    if cfg.constrained or (eval_rows and None not in watch_kinds):
        kinds = watch_kinds | ({row_answer_kind(r) for r in train_rows}
                               if cfg.constrained else set())
        id2sid = dd.load_id2sid() if "sid" in kinds else None
        refs = _item_ids(dd, id2sid) if "item" in kinds else None
        vocab = getattr(AutoConfig.from_pretrained(cfg.model_name_or_path), "vocab_size", None)
        space = AnswerSpace.build(tokenizer, id2sid, refs, vocab_size=vocab)
        if cfg.constrained:
            space.check_rows(train_rows, str(train_src))
        space.check_rows(eval_rows, str(dd.rl(cfg.eval_split)))

    beam_only = [r for r in cfg.rewards if r in ("ndcg_rank", "ndcg_rank_hit", "listwise", *TEACHER_REWARDS)]
    if beam_only and cfg.rollout_mode != "beam":
        raise BadInputError(f"reward {beam_only[0]} needs beam ranks: set rollout_mode: beam")
    teacher = [r for r in cfg.rewards if r in TEACHER_REWARDS]
    if teacher and not cfg.teachers:
        raise BadInputError(f"reward {teacher[0]} needs teachers: set teachers: [DIR, ...] (e.g. the SFT seeds' "
                            "kept checkpoints)")
    if "teacher_kl" in teacher and cfg.inject_target:
        raise BadInputError("reward teacher_kl reads each beam's own log-prob, which an injected target lacks: "
                            "set inject_target: false")
    reward_funcs = [get_reward(r, data_dir=cfg.data_dir, cache_dir=cfg.output_dir, top_k=cfg.retrieval_top_k,
                               teachers=tuple(cfg.teachers)) for r in cfg.rewards]
    peft_config = None
    if cfg.use_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=list(cfg.lora_target_modules),
                                 modules_to_save=cfg.lora_modules_to_save, task_type="CAUSAL_LM")
    trainer = ConstrainedGRPOTrainer(
        model=cfg.model_name_or_path, reward_funcs=reward_funcs, args=cfg,
        train_dataset=Dataset.from_list(train_rows), processing_class=tokenizer, peft_config=peft_config,
        callbacks=list(callbacks), answer_space=space, rollout_mode=cfg.rollout_mode, constrained=cfg.constrained,
        inject_target=cfg.inject_target, propose=cfg.propose_cf,
        proposer=functools.partial(sasrec_proposals, data_dir=cfg.data_dir, cache_dir=cfg.output_dir)
        if cfg.propose_cf else None,
    )
    trainer.heldout_users = heldout
    if eval_rows and space is not None:
        trainer.watch = RewardWatch(trainer, eval_rows, every=cfg.eval_every_steps, k=cfg.eval_k,
                                    num_beams=cfg.eval_num_beams, batch_size=cfg.per_device_eval_batch_size,
                                    select_best=cfg.select_best, min_se=cfg.select_min_se)
        trainer.add_callback(trainer.watch)
    return trainer


def run(cfg) -> Any:
    """Train per ``cfg`` (resuming if asked), save the final model; returns the trainer."""
    from transformers import set_seed

    from mimigenrec.rl.reward_watch import keep_best

    set_seed(cfg.seed)
    trainer = build_trainer(cfg)
    resume = cfg.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "latest"):
        resume = True
    elif isinstance(resume, str) and resume.lower() in ("false", "none", ""):
        resume = None
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(cfg.output_dir)
    watch = getattr(trainer, "watch", None)
    selection = keep_best(watch, trainer.state.global_step) if watch is not None else None
    if trainer.accelerator.is_main_process:
        heldout = getattr(trainer, "heldout_users", None)   # the GRPO trainer's, with heldout_prompts
        if heldout is not None:   # which users' prompts trained, which the watch scored
            Path(cfg.output_dir, HELDOUT_USERS).write_text(json.dumps(heldout) + "\n")
        summary = {"output_dir": cfg.output_dir, "global_step": trainer.state.global_step,
                   "selected_step": None if selection is None else selection["selected_step"],
                   "reward_history": trainer.reward_history[-5:]}
        print(json.dumps(summary))
    return trainer


def _help_epilog() -> str:
    from mimigenrec.rl.config import RLConfig, our_fields

    lines = ["mimigenrec fields (besides every trl.GRPOConfig / TrainingArguments field):"]
    meta = {f.name: f for f in fields(RLConfig)}
    for name in our_fields():
        f = meta[name]
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        lines.append(f"  {name} (default {default!r}): {f.metadata.get('help', '')}")
    lines += [
        "",
        "Often used GRPOConfig fields: output_dir, num_generations, per_device_train_batch_size,",
        "gradient_accumulation_steps, learning_rate, max_steps / num_train_epochs, beta, temperature,",
        "reward_weights, save_steps, logging_steps, bf16, report_to, use_vllm, vllm_mode, seed.",
        "Example: python -m mimigenrec.rl.train_grpo examples/rl/tiny_sample.yaml max_steps=3 rewards=[rule,format]",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m mimigenrec.rl.train_grpo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=_help_epilog() if any(a in ("-h", "--help") for a in argv) else None)
    p.add_argument("config", help="YAML config (examples/rl/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config field (YAML value)")
    a = p.parse_args(argv)
    from mimigenrec.io import cli_errors
    from mimigenrec.rl.config import load_config

    sys.exit(cli_errors(lambda: run(load_config(a.config, a.overrides)) and 0))


if __name__ == "__main__":
    main()
