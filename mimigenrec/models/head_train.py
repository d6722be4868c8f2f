"""Warm-up of an item head: softmax cross-entropy over the catalogue on the ``sid_seq`` rows.

``python -m mimigenrec.models.head_train CONFIG.yaml [key=value ...]`` (``accelerate launch -m
mimigenrec.models.head_train ...`` on several GPUs). CONFIG holds any ``transformers.TrainingArguments``
field plus the head's own (``--help`` lists them); ``key=value`` overrides it (values parsed as YAML).

Rows: every row of ``O/inter/<train_split>.jsonl``, prompted exactly like SFT, RL and evaluation
(:func:`mimigenrec.models.item_head.user_prompt`); the label is the target item. The loss is the
softmax cross-entropy of the target over every item (``num_negatives`` > 0: over the batch's targets
+ that many uniformly sampled items). ``item_source: lm`` caches the catalogue's LM encodings (for
evaluation, re-encoded every ``refresh_steps`` optimizer steps) and, with ``item_grad``, encodes every
item the loss scores afresh with gradient (a fresh target among stale cached negatives would win by
staleness alone: the loss falls, the ranking does not); ``table`` learns the table. With
``eval_strategy: epoch|steps`` the trainer scores NDCG@10 / HR@10 on ``eval_rows`` rows of
``eval_split`` (full ranking, every interacted item), and ``load_best_model_at_end`` +
``metric_for_best_model: ndcg@10`` keeps the best. The final model is a head folder
(:meth:`ItemHeadModel.save_pretrained`) that ``evaluate.sh --model head=DIR`` ranks with.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import random
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from mimigenrec import yaml_config
from mimigenrec.io import BadInputError, DataDir, bad
from mimigenrec.models.item_head import (
    HeadConfig,
    ItemHeadModel,
    is_head_dir,
    item_text,
    user_prompt,
)

__all__ = ["HeadTrainConfig", "HeadTrainer", "RefreshItems", "build", "load_config", "main", "run"]


@dataclass
class HeadTrainConfig(TrainingArguments):
    """``TrainingArguments`` + the head and data settings of the warm-up."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Causal LM folder (backbone or SFT output, SID tokens added); a head folder "
                                        "continues training that head with its own head settings."})
    data_dir: str | None = field(default=None, metadata={"help": "Preprocessed dataset dir O."})
    train_split: str = field(default="train", metadata={"help": "Rows trained on (O/inter/<split>.jsonl)."})
    eval_split: str = field(default="valid", metadata={"help": "Rows of the NDCG@10 evaluation (eval_strategy)."})
    eval_rows: int = field(default=1000, metadata={"help": "Seeded subset of eval_split rows scored (0 = all)."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Seeded subset of train rows (None/0 = all)."})
    task: str = field(default="sid_seq", metadata={"help": "Prompt of the rows: sid_seq or title_seq2sid."})
    item_source: str = field(default="lm", metadata={"help": "lm: item embeddings = the LM's encodings of the item "
                                                             "texts (cached, refreshed); table: a learned table."})
    item_view: str = field(default="sid", metadata={"help": "Item text the LM encodes: title, sid or title_sid."})
    item_pooling: str = field(default="last", metadata={"help": "item_source lm: item state at the marker (last, "
                                                                "R2ec) or the mean over the item text (mean)."})
    temperature: float = field(default=1.0, metadata={"help": "Score = dot product / temperature."})
    marker: str | None = field(default=None, metadata={"help": "Token whose final hidden state is the state "
                                                                  "(None = EOS); added to the tokenizer if new."})
    num_negatives: int = field(default=0, metadata={"help": "0 = softmax over every item; N = over the batch's "
                                                            "targets + N uniformly sampled items."})
    item_grad: bool = field(default=True, metadata={"help": "item_source lm: encode every scored item (all, or the "
                                                            "targets + sampled negatives) now, with gradient "
                                                            "(trains the item encoder); false = cached encodings."})
    refresh_steps: int = field(default=100, metadata={"help": "item_source lm: re-encode the catalogue every N "
                                                              "optimizer steps (0 = only at the start and the end)."})
    encode_batch_size: int = field(default=64, metadata={"help": "Sequences per forward when encoding items."})
    max_prompt_tokens: int = field(default=1024, metadata={"help": "Prompt tokens kept (from the right)."})
    max_item_tokens: int = field(default=64, metadata={"help": "Item text tokens kept (+ marker)."})

    def __post_init__(self) -> None:
        self.remove_unused_columns = False  # our collator builds the batch
        super().__post_init__()


def our_fields() -> list[str]:
    base = {f.name for f in fields(TrainingArguments)}
    return [f.name for f in fields(HeadTrainConfig) if f.name not in base]


def _coerce(name: str, value: Any, hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if not isinstance(value, str):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) and float in args else value
    for typ in args:
        try:
            if typ is float:
                return float(value)
            if typ is int:
                return int(value)
        except ValueError:
            continue
        if typ is bool and value.lower() in ("true", "false"):
            return value.lower() == "true"
    if str not in args and all(t in (float, int, bool) for t in args):
        raise BadInputError(f"config key {name}: {value!r} is not a valid {args[0].__name__}")
    return value


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), **extra: Any) -> HeadTrainConfig:
    """YAML (optional) + ``key=value`` overrides + keyword values -> :class:`HeadTrainConfig`."""
    from transformers import HfArgumentParser

    values: dict[str, Any] = dict(yaml_config.read_yaml_mapping(path, BadInputError)) if path is not None else {}
    values.update(yaml_config.parse_overrides(overrides, BadInputError))
    values.update(extra)
    known = {f.name for f in fields(HeadTrainConfig) if f.init}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise BadInputError("unknown config key(s): " + "; ".join(
            f"{k} (did you mean {', '.join(difflib.get_close_matches(k, known, 3)) or '?'})" for k in unknown))
    hints = typing.get_type_hints(HeadTrainConfig)
    values = {k: _coerce(k, v, hints.get(k, Any)) for k, v in values.items()}
    if "bf16" not in values and not torch.cuda.is_available():
        values["bf16"] = False
    values.setdefault("report_to", "none")
    values.setdefault("save_safetensors", True)
    (cfg,) = HfArgumentParser(HeadTrainConfig).parse_dict(values, allow_extra_keys=False)
    return cfg


# ----------------------------------------------------------------------------- data
class _Rows(torch.utils.data.Dataset):
    """Tokenised rows ``{"input_ids": [...], "labels": column, "key": "user:position"}``."""

    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def _subset(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    if not n or n >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def head_rows(head: ItemHeadModel, dd: DataDir, split: str, items: dict, id2sid: dict | None,
              captions: dict | None, n: int | None = None, seed: int = 0) -> _Rows:
    """The ``split`` rows of ``dd`` as head examples (prompt tokens + marker, target column)."""
    from mimigenrec.sequences import load_rows

    rows = _subset(load_rows(dd.root, split), n, seed)
    if not rows:
        raise bad(dd.inter(split), "holds no rows")
    out = []
    for r in rows:
        col = head.col_of.get(int(r["target"]))
        if col is None:
            raise bad(r.get("_where", dd.inter(split)), f"target item {r['target']} is not in the head's items")
        text = user_prompt(head.tokenizer, head.cfg.task, r["history"], items, id2sid, captions)
        out.append({"input_ids": head.user_tokens(text), "labels": col,
                    "key": f"{int(r['user_id'])}:{int(r['position'])}"})
    return _Rows(out)


def collate(pad_id: int):
    """Left-padding collator of head examples."""
    from mimigenrec.models.item_head import pad_left

    def fn(batch: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_left([b["input_ids"] for b in batch], pad_id)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([b["labels"] for b in batch], dtype=torch.long)}

    return fn


# ----------------------------------------------------------------------------- trainer
class RefreshItems(TrainerCallback):
    """``item_source: lm``: re-encode the catalogue at the start and every ``every`` optimizer steps
    (``lm``: a callable returning the model to encode with, e.g. the trainer's unwrapped policy)."""

    def __init__(self, head: ItemHeadModel, every: int, batch_size: int, lm: Any = None) -> None:
        self.head, self.every, self.batch_size, self.lm = head, every, batch_size, lm
        self.refreshes = 0

    def refresh(self) -> None:
        if self.head.refresh_items(self.batch_size, self.lm() if self.lm else None):
            self.refreshes += 1

    def on_train_begin(self, args, state, control, **kw):
        self.refresh()

    def on_step_end(self, args, state, control, **kw):
        if self.every and state.global_step % self.every == 0:
            self.refresh()


class HeadTrainer(Trainer):
    """``transformers.Trainer`` for an :class:`ItemHeadModel`: saves head folders, resumes from them and
    evaluates by full-ranking NDCG@10 / HR@10 instead of a loss."""

    def __init__(self, *args: Any, universe: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        head: ItemHeadModel = self.model
        ids = list(head.cfg.item_ids) if universe is None else [int(i) for i in universe]
        self._eval_cols = torch.tensor([head.col_of[i] for i in ids], dtype=torch.long)
        self._eval_items = ids

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        out = output_dir or self.args.output_dir
        self.accelerator.unwrap_model(self.model).save_pretrained(out, safe_serialization=self.args.save_safetensors)
        torch.save(self.args, os.path.join(out, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        self.accelerator.unwrap_model(model or self.model).load_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.accelerator.unwrap_model(self.model).load_weights(self.state.best_model_checkpoint)

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        from mimigenrec.eval.metrics import rank_by_score, row_metrics

        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        head: ItemHeadModel = self.accelerator.unwrap_model(self.model)
        was = head.training
        head.eval()
        sums = {"ndcg@10": 0.0, "hr@10": 0.0}
        bs = self.args.per_device_eval_batch_size
        try:
            for s in range(0, len(data), bs):
                batch = [data[i] for i in range(s, min(s + bs, len(data)))]
                users = head.encode([b["input_ids"] for b in batch], batch_size=bs)
                scores = head.scores(users)[:, self._eval_cols.to(users.device)]
                for b, ranked in zip(batch, rank_by_score(scores, self._eval_items, 10)):
                    m = row_metrics(ranked, head.cfg.item_ids[b["labels"]], (10,))
                    for k in sums:
                        sums[k] += m[k]
        finally:
            head.train(was)
        metrics = {f"{metric_key_prefix}_{k}": v / max(1, len(data)) for k, v in sums.items()}
        metrics["epoch"] = self.state.epoch or 0.0
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def _lm_and_tokenizer(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mimigenrec.io import check_model_dir

    check_model_dir(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tok


def build(cfg: HeadTrainConfig) -> HeadTrainer:
    """Head (new, or loaded from a head folder), rows and trainer."""
    if not cfg.model_name_or_path or not cfg.data_dir:
        raise BadInputError("model_name_or_path and data_dir are required")
    dd = DataDir(cfg.data_dir)
    if not dd.items.is_file():
        raise bad(dd.items, "missing", "give data_dir the folder that `python -m preprocess` wrote")
    items = dd.load_items()
    needs_sid = cfg.task == "sid_seq" or "sid" in cfg.item_view
    id2sid = dd.load_id2sid() if dd.id2sid.is_file() else None
    if needs_sid and id2sid is None:
        raise bad(dd.id2sid, "missing", "run the sid stage (the sid_seq prompt and sid item view need it)")
    captions = dd.load_captions(items) if dd.captions.is_file() else None
    if is_head_dir(cfg.model_name_or_path):
        head = ItemHeadModel.from_pretrained(cfg.model_name_or_path)
        print(f"[head_train] continuing the head in {cfg.model_name_or_path} with its own head settings")
    else:
        lm, tok = _lm_and_tokenizer(cfg.model_name_or_path)
        if needs_sid:
            from mimigenrec.io import read_json
            from mimigenrec.launch import check_sid_tokens

            check_sid_tokens(tok.get_vocab(), read_json(dd.new_tokens), cfg.model_name_or_path, dd.root)
        ids = sorted(items)
        hcfg = HeadConfig(item_ids=ids, item_texts=[item_text(cfg.item_view, i, items, id2sid) for i in ids],
                          item_source=cfg.item_source, item_view=cfg.item_view, item_pooling=cfg.item_pooling,
                          temperature=cfg.temperature,
                          task=cfg.task, marker=cfg.marker, max_item_tokens=cfg.max_item_tokens,
                          max_prompt_tokens=cfg.max_prompt_tokens,
                          extra={"warmup": {"data_dir": str(dd.root.resolve()), "base_model": cfg.model_name_or_path,
                                            "num_negatives": cfg.num_negatives, "item_grad": cfg.item_grad,
                                            "refresh_steps": cfg.refresh_steps}})
        head = ItemHeadModel.build(lm, tok, hcfg, cfg.encode_batch_size)
    head.num_negatives, head.item_grad = cfg.num_negatives, cfg.item_grad
    train = head_rows(head, dd, cfg.train_split, items, id2sid, captions, cfg.max_train_rows, cfg.seed)
    evald = None
    if cfg.eval_strategy != "no":
        evald = head_rows(head, dd, cfg.eval_split, items, id2sid, captions, cfg.eval_rows, cfg.seed)
    from mimigenrec.sequences import load_sequences

    universe = load_sequences(dd.root)[1].all_items()
    pad = head.tokenizer.pad_token_id if head.tokenizer.pad_token_id is not None else head.marker_id
    refresh = RefreshItems(head, cfg.refresh_steps, cfg.encode_batch_size)
    trainer = HeadTrainer(model=head, args=cfg, train_dataset=train, eval_dataset=evald, data_collator=collate(pad),
                          callbacks=[refresh], universe=universe)
    trainer.refresh = refresh
    return trainer


def run(cfg: HeadTrainConfig) -> HeadTrainer:
    """Train per ``cfg`` (resuming if asked), refresh the item cache, save the head folder."""
    from transformers import set_seed

    set_seed(cfg.seed)
    trainer = build(cfg)
    resume = cfg.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "latest"):
        resume = True
    out = trainer.train(resume_from_checkpoint=resume or None)
    trainer.refresh.refresh()  # item_source lm: the saved cache = the saved LM's encodings
    trainer.save_model(cfg.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(json.dumps({"output_dir": cfg.output_dir, "global_step": trainer.state.global_step,
                          "train_loss": out.training_loss, "first_loss": losses[0] if losses else None,
                          "last_loss": losses[-1] if losses else None,
                          "refreshes": trainer.refresh.refreshes,
                          "best": trainer.state.best_metric}))
    return trainer


def main(argv: list[str] | None = None) -> None:
    from mimigenrec.io import cli_errors

    argv = sys.argv[1:] if argv is None else argv
    epilog = None
    if any(a in ("-h", "--help") for a in argv):
        meta = {f.name: f for f in fields(HeadTrainConfig)}
        epilog = "head fields (besides every transformers.TrainingArguments field):\n" + "\n".join(
            f"  {n} (default {meta[n].default!r}): {meta[n].metadata.get('help', '')}" for n in our_fields())
    p = argparse.ArgumentParser(prog="python -m mimigenrec.models.head_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    p.add_argument("config", help="YAML config (examples/head/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config field (YAML value)")
    a = p.parse_args(argv)
    sys.exit(cli_errors(lambda: run(load_config(a.config, a.overrides)) and 0))


if __name__ == "__main__":
    main()
