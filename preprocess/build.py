"""Build LLaMA-Factory SFT JSON, verl-style RL JSON and register the datasets in dataset_info.json.

Reads the files of the earlier stages (items.jsonl, inter/*.jsonl, id2sid.json, and when
present captions.jsonl and cot.jsonl) and writes O/sft/{train,valid,test}.json,
O/rl/{train,valid,test}.json, O/sft_full.yaml / O/sft_lora.yaml (complete llamafactory-cli
configs with add_tokens filled in and absolute paths, so they run from any directory) and the
entries "<name>_sft_<split>" in O/dataset_info.json (O is a LLaMA-Factory dataset_dir of its
own). With --dataset_dir DIR the entries also go into DIR/dataset_info.json; a name already
registered there for another folder is refused unless --reregister. Captions and CoT rows made
for other items (after a source stage re-ran) are left out.

Tasks (prompt text from mimigenrec.prompts): sid_seq (SID history -> next SID), sid_item_seq (the
same, each history item's SID followed by its own <item_N> token: needs ``sid --item_tokens``),
title_seq2sid (title history -> next SID), sid_seq2title (SID history -> next title),
title2sid / sid2title (item-level, training only), cand_rank (history + candidate list
"[ITEM_id] Title" -> chosen item), query (title history -> a search query; the SFT answer is the
target's title, RL rows carry the target item for the retrieval_ndcg reward). Valid/test rows are
built for --eval_tasks (SFT) and --rl_tasks (RL) only. The cand_rank candidate lists of every split
are drawn once (seeded per row) and recorded in build_stats.json ("candidates": negatives, seed and
the O/candidates/ file per split): evaluation ranks those same lists by default.
CoT (from the cot stage) is mixed into exactly round(cot_prob * n) of the eligible
training rows, chosen by a seeded draw keyed by (user_id, position), never by row index.
"""
from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path
from typing import Any

from mimigenrec import prompts
from mimigenrec.io import (
    SPLITS,
    BadInputError,
    DataDir,
    add_out_dir_argument,
    atomic_outputs,
    bad,
    read_json,
    read_jsonl,
    write_json,
)

ALL_TASKS = list(prompts.TASKS)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def used_tasks(*task_lists: str | None) -> set[str]:
    """The known prompt tasks named in comma-separated ``--tasks`` / ``--eval_tasks`` / ``--rl_tasks`` values
    (``None`` = not given)."""
    return {t for spec in task_lists if spec for t in _csv(spec) if t in prompts.TASKS}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_out_dir_argument(p, "preprocessed dataset directory (input and output)")
    p.add_argument("--name", help="dataset name for dataset_info.json (default: basename of --out_dir)")
    p.add_argument("--dataset_dir", default=None,
                   help="also register the dataset in this LLaMA-Factory dataset_dir (e.g. data, for the example "
                        "yamls); the entries always go into O/dataset_info.json")
    p.add_argument("--reregister", action="store_true",
                   help="let --name re-point a name that --dataset_dir already registers for another folder")
    p.add_argument("--tasks", default="sid_seq,title2sid,sid2title,sid_seq2title,title_seq2sid",
                   help=f"SFT training tasks, comma-separated, from {ALL_TASKS}")
    p.add_argument("--eval_tasks", default="sid_seq", help="tasks of the SFT valid/test files")
    p.add_argument("--rl_tasks", default="sid_seq", help="tasks of the RL files (all splits)")
    p.add_argument("--num_negatives", type=int, default=9, help="sampled negatives per cand_rank row")
    p.add_argument("--cot_prob", type=float, default=0.0,
                   help="fraction of eligible training rows (those with a kept CoT) that carry CoT")
    p.add_argument("--cot_mode", choices=["think", "reference"], default="think",
                   help="think: CoT becomes the <think> part of the target; reference: CoT is shown in the prompt")
    p.add_argument("--cot_tasks", default="sid_seq,title_seq2sid,cand_rank", help="tasks whose rows may carry CoT")
    p.add_argument("--hindsight_cot", action="store_true",
                   help="also use CoT written in hindsight mode (it saw the target); training rows only")
    p.add_argument("--seed", type=int, default=42, help="seed of the CoT draw and candidate sampling")
    p.add_argument("--max_train_rows", type=int, default=0, help="cap per training task (0 = no cap; seeded subsample)")
    p.add_argument("--sft_model", default=None,
                   help="model_name_or_path written into the SFT yamls (a folder relative to the current directory, "
                        "or a hub id; default O/models/tiny, which `python -m mimigenrec.models.backbones tiny` creates)")


def _seeded_pick(keys: list[tuple], k: int, seed: int) -> set[tuple]:
    """Exactly ``k`` of ``keys`` chosen by a seeded shuffle of the sorted keys (order-independent)."""
    ks = sorted(keys)
    random.Random(seed).shuffle(ks)
    return set(ks[:k])


class _Builder:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.d = DataDir(args.out_dir)
        # title-only tasks (cand_rank, query) need no semantic IDs: the embed / sid stages may be skipped
        used = used_tasks(args.tasks, args.eval_tasks, args.rl_tasks)
        self.needs_sids = any(prompts.uses_sids(t) for t in used)
        for path in (self.d.items, *([self.d.id2sid] if self.needs_sids else []), self.d.inter("train")):
            if not path.exists():
                raise BadInputError(f"{path} is missing: run the earlier stages first (python -m preprocess all ...)")
        self.items = self.d.load_items()
        if any(prompts.uses_item_tokens(t) for t in used):
            have = set(read_json(self.d.new_tokens)) if self.d.new_tokens.is_file() else set()
            lacking = [i for i in self.items if prompts.item_token(i) not in have]
            if lacking:
                raise BadInputError(f"{self.d.new_tokens}: no {prompts.item_token(lacking[0])} (and {len(lacking) - 1} "
                                    "more items): the sid_item_seq history needs the item tokens; run "
                                    "`python -m preprocess sid --item_tokens` (preprocess all adds them by itself)")
        self.id2sid = self.d.load_id2sid() if self.needs_sids or self.d.id2sid.exists() else {}
        missing = [i for i in self.items if i not in self.id2sid] if self.needs_sids else []
        if missing:
            raise BadInputError(f"{self.d.id2sid}: {len(missing)} item(s) of items.jsonl have no SID, e.g. {missing[:5]}")
        from preprocess.cot import load_kept_cot

        self.captions = self.d.load_captions(self.items)
        self.rows = {s: read_jsonl(self.d.inter(s)) for s in SPLITS}
        self.name = args.name or self.d.root.resolve().name
        self.cot = load_kept_cot(self.d.root, include_hindsight=self.a.hindsight_cot)
        self._cands: dict[str, list[list[int]]] = {}

    def candidates(self, split: str) -> list[list[int]]:
        if split not in self._cands:
            from mimigenrec.eval.candidates import cached_candidates
            from mimigenrec.sequences import UserSequences

            seqs = UserSequences(self.rows).seqs
            pool = sorted({i for s in seqs.values() for i in s})
            self._cands[split] = cached_candidates(
                self.d.root, split, self.rows[split], pool, self.a.num_negatives, self.a.seed, exclude=seqs)
        return self._cands[split]

    def seq_rows(self, task: str, split: str, cot_pick: set | None = None) -> list[tuple[dict, dict]]:
        """(sft_row, extra_info) for every interaction row of ``split`` under ``task``."""
        out = []
        cands = self.candidates(split) if task == "cand_rank" else None
        for i, r in enumerate(self.rows[split]):
            key = (int(r["user_id"]), int(r["position"]))
            reasoning = self.cot.get(key) if cot_pick and (task, *key) in cot_pick else None
            c = cands[i] if cands is not None else None
            inp = prompts.build_input(
                task, history=r["history"], items=self.items, id2sid=self.id2sid, captions=self.captions,
                candidates=c, cot_reference=reasoning if self.a.cot_mode == "reference" else None,
            )
            ans = prompts.answer_text(task, r["target"], self.items, self.id2sid)
            if reasoning and self.a.cot_mode == "think":
                ans = prompts.with_think(reasoning, ans)
            extra = {"user_id": key[0], "position": key[1], "target": int(r["target"]),
                     "history": list(r["history"]), "cot": bool(reasoning)}
            if c is not None:
                extra["candidates"] = list(c)
            out.append((prompts.sft_row(task, inp, ans), extra))
        return out

    def item_rows(self, task: str) -> list[tuple[dict, dict]]:
        out = []
        for i in sorted(self.items):
            inp = prompts.build_input(task, item=i, items=self.items, id2sid=self.id2sid)
            out.append((prompts.sft_row(task, inp, prompts.answer_text(task, i, self.items, self.id2sid)),
                        {"target": i}))
        return out

    def cot_pick(self) -> set:
        """Exactly round(cot_prob * n) eligible (task, user, position) training rows get CoT."""
        if self.a.cot_prob <= 0 or not self.cot:
            return set()
        tasks = [t for t in _csv(self.a.tasks) if t in _csv(self.a.cot_tasks)]
        eligible = [(t, int(r["user_id"]), int(r["position"])) for t in tasks for r in self.rows["train"]
                    if (int(r["user_id"]), int(r["position"])) in self.cot]
        return _seeded_pick(eligible, round(self.a.cot_prob * len(eligible)), self.a.seed)

    def task_rows(self, task: str, split: str, cot_pick: set | None = None) -> list[tuple[dict, dict]]:
        if task not in prompts.TASKS:
            raise BadInputError(f"unknown task {task!r}; choose from {ALL_TASKS}")
        if task in prompts.ITEM_TASKS:
            return self.item_rows(task) if split == "train" else []
        rows = self.seq_rows(task, split, cot_pick)
        if split == "train" and self.a.max_train_rows and len(rows) > self.a.max_train_rows:
            rows = random.Random(self.a.seed).sample(rows, self.a.max_train_rows)
        return rows


def _entry(file_name: str) -> dict[str, Any]:
    return {"file_name": file_name, "formatting": "alpaca",
            "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}}


def _registered_file(dataset_dir: Path, entry: Any) -> Path | None:
    name = entry.get("file_name") if isinstance(entry, dict) else None
    return (dataset_dir / name).resolve() if name else None


def register(dataset_dir: Path, name: str, out_dir: Path, reregister: bool = False) -> Path:
    """Add "<name>_sft_<split>" entries to ``dataset_dir/dataset_info.json`` (idempotent).

    ``file_name`` is relative to ``dataset_dir`` when O lies inside it, else absolute. A name that
    already points at another file is refused unless ``reregister``: re-pointing it silently would make
    every yaml that names it train on this dataset instead.
    """
    dataset_dir = dataset_dir.resolve()
    info_path = dataset_dir / "dataset_info.json"
    info = read_json(info_path) if info_path.exists() else {}
    if not isinstance(info, dict):
        raise bad(info_path, "expected a JSON object of dataset entries", "fix or remove the file")
    for split in SPLITS:
        f = DataDir(out_dir).sft(split).resolve()
        key = f"{name}_sft_{split}"
        old = _registered_file(dataset_dir, info.get(key))
        if old is not None and old != f and not reregister:
            raise bad(info_path, f"dataset {key!r} is already registered for {old}, not {f}",
                      "pass --name NEW to register this dataset under another name, or --reregister to re-point it")
        info[key] = _entry(os.path.relpath(f, dataset_dir) if f.is_relative_to(dataset_dir) else str(f))
    write_json(info_path, dict(sorted(info.items())), indent=2)
    return info_path


def sft_yaml(name: str, dataset_dir: str, model: str, tokens: list[str], lora: bool) -> dict[str, Any]:
    """A complete llamafactory-cli SFT config for this dataset (CPU-safe defaults; override on the CLI).

    ``dataset_dir`` is the absolute path of O (its own dataset_info.json); outputs go to O/models/.

    ``template`` is left unset on purpose: LLaMA-Factory then uses the tokenizer's own chat
    template, the one RL and evaluation render prompts with (see tests/test_sft.py).
    """
    kind = "lora" if lora else "full"
    cfg: dict[str, Any] = {
        "model_name_or_path": model, "trust_remote_code": True, "stage": "sft", "do_train": True,
        "finetuning_type": kind,
        "dataset": f"{name}_sft_train", "eval_dataset": f"{name}_sft_valid", "dataset_dir": dataset_dir,
        "cutoff_len": 1024, "overwrite_cache": True, "preprocessing_num_workers": 1,
        "add_tokens": ",".join(tokens),
        # a re-run resumes from the last checkpoint instead of overwriting it (LLaMA-Factory's own rule)
        "output_dir": str(Path(dataset_dir) / "models" / f"sft_{kind}"), "overwrite_output_dir": False,
        "logging_steps": 10, "save_steps": 500, "save_total_limit": 2, "plot_loss": True, "report_to": "none",
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
        "learning_rate": 2.0e-4 if lora else 1.0e-4, "num_train_epochs": 3.0,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "bf16": False,
        "per_device_eval_batch_size": 8, "eval_strategy": "no",
    }
    if lora:
        cfg.update({"lora_rank": 16, "lora_alpha": 32, "lora_target": "all"})
    if not tokens:  # a dataset without SIDs adds no tokens (an empty add_tokens would add "")
        cfg.pop("add_tokens")
    return cfg


def sft_model_path(spec: str | None, out_dir: Path) -> str:
    """``--sft_model`` as written into the yamls: absolute (relative to the current directory) unless it
    looks like a hub id (``org/name``) and is no local folder; default ``O/models/tiny``."""
    if spec is None:
        return str(out_dir / "models" / "tiny")
    from mimigenrec.launch import resolve_path

    return resolve_path(spec, Path.cwd(), must_exist=True)


def run(args: argparse.Namespace) -> int:
    import yaml

    t0 = time.time()
    b = _Builder(args)
    pick = b.cot_pick()
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        sft, rl = [], []
        sft_tasks = _csv(args.tasks) if split == "train" else _csv(args.eval_tasks)
        for task in sft_tasks:
            sft += [row for row, _ in b.task_rows(task, split, pick if split == "train" else None)]
        for task in _csv(args.rl_tasks):
            for idx, (row, extra) in enumerate(b.task_rows(task, split)):
                rl.append(prompts.rl_row(row, data_source=b.name, task=task, split=split, index=idx, extra=extra))
        write_json(b.d.sft(split), sft)
        write_json(b.d.rl(split), rl)
        counts[split] = {"sft": len(sft), "rl": len(rl)}
    cand_record = None
    if b._cands:
        from mimigenrec.eval.candidates import cache_path

        files = {}
        for split in b._cands:
            path = cache_path(b.d.root, split, args.num_negatives, args.seed)
            if not path.is_file():
                raise bad(path, "the candidate lists could not be written", f"make {path.parent} writable")
            files[split] = str(path.relative_to(b.d.root))
        cand_record = {"num_negatives": args.num_negatives, "seed": args.seed, "files": files}
    tokens = read_json(b.d.new_tokens) if b.needs_sids or b.d.new_tokens.exists() else []
    if not b.d.new_tokens.exists():  # no SIDs: sft.sh reads this file and adds no tokens
        write_json(b.d.new_tokens, tokens)
    root = b.d.root.resolve()
    infos = [register(Path(d), b.name, root, args.reregister) for d in (root, args.dataset_dir) if d is not None]
    model = sft_model_path(args.sft_model, root)
    for lora in (False, True):
        path = b.d.root / f"sft_{'lora' if lora else 'full'}.yaml"
        with atomic_outputs([path]) as (f,):
            yaml.safe_dump(sft_yaml(b.name, str(root), model, tokens, lora), f, sort_keys=False)
    n_cot = sum(1 for _ in pick)
    print(f"[build] {b.name}: " + ", ".join(f"{s}: sft {c['sft']} / rl {c['rl']}" for s, c in counts.items())
          + f"; CoT rows {n_cot}; registered in {' and '.join(map(str, infos))}; {time.time() - t0:.1f}s")
    if not Path(model).exists():
        print(f"[build] note: {b.d.root / 'sft_full.yaml'} trains {model}, which does not exist yet: create it "
              f"(python -m mimigenrec.models.backbones tiny --out {model} --data_dir {root}), or pass --sft_model DIR, "
              "or launch with model_name_or_path=DIR")
    write_json(b.d.root / "build_stats.json", {"counts": counts, "cot_rows": n_cot, "seconds": time.time() - t0,
                                               "tasks": _csv(args.tasks), "cot_prob": args.cot_prob,
                                               "cot_mode": args.cot_mode, "seed": args.seed,
                                               "candidates": cand_record})
    return 0
