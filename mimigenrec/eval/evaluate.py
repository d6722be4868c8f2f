"""Evaluate models and baselines: full ranking (constrained beam search) or candidate ranking, HR@K / NDCG@K.

Protocol: each row of ``inter/<split>.jsonl`` is one prediction. Full ranking ranks every
item that appears in the interactions (items of the item table never interacted with are not
ranked); candidate ranking ranks the row's target plus N negatives: by default the candidate lists
that ``preprocess build`` drew for the cand_rank rows it wrote (recorded in ``O/build_stats.json``,
stored under ``O/candidates/``), so SFT, RL and evaluation rank the same lists; a ``--num_negatives``
that disagrees with them is refused. ``--candidates sample`` draws ``--num_negatives`` new negatives
per row instead (seeded per row by ``--seed``, never an earlier item of the user, cached under
``O/candidates/``); every method of one run ranks the same lists.
History items are NOT excluded from the ranking. A ranked list is deduplicated (first
occurrence counts); ``rank`` = 0-based position of the target; ``HR@K = 1[rank < K]``,
``NDCG@K = 1/log2(rank + 2)`` if ``rank < K`` else 0; a missing target or an empty /
unparsable answer is a miss.

Models: prompts come from :mod:`mimigenrec.prompts` (the SFT template); full ranking runs
trie-constrained beam search over the items' semantic IDs (``--num_beams`` >= the largest K,
length penalty 0, sampling off whatever the model's generation_config says); candidate
ranking constrains the answer ``[ITEM_<id>]`` to the row's candidates, or, with ``--think``,
lets the model reason greedily and reads its answer with :func:`mimigenrec.prompts.parse_choice`,
the parser of the ``candidate_choice`` reward (exactly one candidate reference after an optional
``<think>...</think>``; anything else makes the row a miss, so HR@K = HR@1 for every K there).

Query generation (``--task query``, the Rec-R1 protocol): the model writes a search query
greedily (optionally after ``<think>``), read by :func:`mimigenrec.prompts.parse_query`; BM25 over
the item catalogue (``items.jsonl``, the index of the ``retrieval_ndcg`` reward) ranks every item
and the target's rank is scored (ties ranked against the target, as in the reward). Baselines:
``query_last`` (the last history item's title as the query) and ``query_history`` (every history
title).

Baselines on the same rows: ``popularity`` (interaction counts of the splits before the
evaluated one: train, + valid for test; ties -> smaller item id) and ``sasrec``
(``sasrec_bce``): SASRec trained on the train split, early-stopped on valid NDCG@10, fed the
whole earlier sequence (so for test the valid item is history, never a training target). When
the valid split is the one scored, SASRec early-stops on each user's last train row instead
(held out from its training), never on the rows it is scored on.

Sharding: under ``torchrun`` / ``accelerate launch`` each rank takes rows ``i % WORLD_SIZE
== RANK``, appends to ``OUTPUT_DIR/shards/``; rank 0 merges after a barrier and scores.

Reuse: ``OUTPUT_DIR/run_config.json`` records the settings and, per method, a fingerprint of
what its predictions were made from (the data files; a model's weights, config and tokenizer).
A re-run with the same settings continues where a run stopped; a method whose fingerprint
changed (a model retrained into the same folder, a dataset rebuilt) is predicted again, with a
message. Other settings in an output dir that holds predictions are refused (``--overwrite``
discards them). ``metrics.json`` and the table hold exactly the methods of this run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mimigenrec import prompts
from mimigenrec.eval.metrics import (
    DEFAULT_KS,
    aggregate,
    dedupe,
    markdown_table,
    rank_by_score,
)
from mimigenrec.io import (
    BadInputError,
    DataDir,
    bad,
    check_model_dir,
    cli_errors,
    file_digest,
    fingerprint,
    iter_records,
    model_fingerprint,
    read_json,
    write_json,
    write_jsonl,
)
from mimigenrec.sequences import UserSequences, load_sequences, splits_before

TASKS = ("sid_seq", "sid_item_seq", "title_seq2sid", "cand_rank", "query")
QUERY_BASELINES = ("query_last", "query_history")
BASELINE_NAMES = ("popularity", "sasrec", "sasrec_bce", *QUERY_BASELINES)
DEFAULT_NUM_NEGATIVES = 99
_SEP_RE = re.compile(r"[\s,;]+")


# ----------------------------------------------------------------------------- processes
@dataclass
class Dist:
    """This process's place among the evaluation processes (from RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @classmethod
    def from_env(cls) -> Dist:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        d = cls(rank, world, int(os.environ.get("LOCAL_RANK", rank)))
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                if "MASTER_ADDR" not in os.environ:
                    raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun or accelerate")
                # gloo is only used for barriers, so it works on every device
                dist.init_process_group("gloo", rank=rank, world_size=world, timeout=_dt.timedelta(hours=12))
                d.initialized_here = True
        return d

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


# ----------------------------------------------------------------------------- data
@dataclass
class EvalData:
    """Everything the methods need, loaded once."""

    data_dir: Path
    split: str
    rows: list[dict]                      # rows to evaluate, in file order
    seqs: UserSequences
    all_rows: dict[str, list[dict]]
    items: dict[int, dict]
    universe: list[int]                   # ranked items: those that appear in interactions
    num_item_ids: int
    candidates: list[list[int]] | None = None
    captions: dict[int, str] | None = None
    id2sid: dict[int, list[str]] | None = None


def row_key(r: Mapping) -> str:
    return f"{int(r['user_id'])}:{int(r['position'])}"


def load_eval_data(args: argparse.Namespace) -> EvalData:
    dd = DataDir(args.data_dir)
    if not dd.items.is_file():
        raise bad(dd.items, "missing", "give --data_dir the folder that `python -m preprocess` wrote")
    items = dd.load_items()
    all_rows, seqs = load_sequences(dd.root)
    if args.split not in all_rows:
        raise bad(dd.inter(args.split), "missing", "re-run the source stage of preprocess")
    universe = seqs.all_items()
    unknown = [i for i in universe if i not in items]
    if unknown:
        raise BadInputError(f"{dd.items}: items {unknown[:5]} appear in interactions but not in the item table")
    rows = all_rows[args.split]
    if args.max_rows and args.max_rows < len(rows):
        keep = sorted(random.Random(args.seed).sample(range(len(rows)), args.max_rows))
        rows = [rows[i] for i in keep]
    data = EvalData(dd.root, args.split, rows, seqs, all_rows, items, universe, max(items) + 1)
    if args.task == "cand_rank":
        from mimigenrec.eval.candidates import cached_candidates, inputs_digest

        built = getattr(args, "candidate_file", None)
        if built:  # the lists build wrote (resolve_candidates chose them)
            rec = read_json(built)
            if rec.get("inputs") != inputs_digest(all_rows[args.split], universe, seqs.seqs):
                raise bad(built, f"drawn for other {args.split} rows than {dd.inter(args.split)} holds now (the "
                          "dataset changed after build)", f"re-run python -m preprocess build --out_dir {dd.root}")
            by_key = rec.get("rows", {})
            lost = [row_key(r) for r in rows if row_key(r) not in by_key]
            if lost:
                raise bad(built, f"no candidate list for {len(lost)} {args.split} row(s), e.g. {lost[:3]}",
                          f"re-run python -m preprocess build --out_dir {dd.root}")
        else:
            every = cached_candidates(dd.root, args.split, all_rows[args.split], universe, args.num_negatives,
                                      args.seed, exclude=seqs.seqs, fallback_dir=args.output_dir)
            by_key = {row_key(r): c for r, c in zip(all_rows[args.split], every)}
        data.candidates = [[int(i) for i in by_key[row_key(r)]] for r in rows]
    if uses_captions(args):
        if not dd.captions.is_file():
            raise bad(dd.captions, "missing (--captions on)", "run the caption stage, or use --captions auto")
        data.captions = dd.load_captions(items)
    if args.task not in ("cand_rank", "query") and any(not m.startswith("baseline:") for m in args.methods):
        if not dd.id2sid.is_file():
            raise bad(dd.id2sid, "missing: full ranking with a model needs the semantic IDs", "run the sid stage")
        data.id2sid = dd.load_id2sid()
    return data


def uses_captions(args: argparse.Namespace) -> bool:
    return args.captions == "on" or (args.captions == "auto" and DataDir(args.data_dir).captions.is_file())


def data_files(args: argparse.Namespace) -> list[Path]:
    """The files of ``--data_dir`` whose content decides every prediction of this run."""
    dd = DataDir(args.data_dir)
    files = [dd.items, *(dd.inter(s) for s in ("train", "valid", "test")), dd.id2sid]
    if getattr(args, "candidate_file", None):
        files.append(Path(args.candidate_file))
    return files + ([dd.captions] if uses_captions(args) else [])


def built_candidates(data_dir: str | os.PathLike, split: str) -> tuple[Path, dict] | None:
    """``(O/build_stats.json, its "candidates" record)`` when ``build`` drew candidate lists for ``split``."""
    path = DataDir(data_dir).root / "build_stats.json"
    if not path.is_file():
        return None
    rec = read_json(path).get("candidates")
    if not isinstance(rec, dict) or split not in (rec.get("files") or {}):
        return None
    return path, rec


def resolve_candidates(args: argparse.Namespace) -> None:
    """Decide the candidate lists of a cand_rank run: sets ``num_negatives``, ``candidate_seed`` and
    ``candidate_file`` (build's lists) on ``args``; refuses a ``--num_negatives`` that disagrees with them."""
    args.candidate_file = None
    if args.task != "cand_rank":
        args.num_negatives = args.num_negatives if args.num_negatives is not None else DEFAULT_NUM_NEGATIVES
        args.candidate_seed = None
        return
    found = built_candidates(args.data_dir, args.split) if args.candidates == "build" else None
    if found is None:
        if args.candidates == "build":
            n = args.num_negatives if args.num_negatives is not None else DEFAULT_NUM_NEGATIVES
            print(f"[evaluate] note: {DataDir(args.data_dir).root / 'build_stats.json'} records no cand_rank "
                  f"candidate lists for {args.split} (build without cand_rank in --eval_tasks/--rl_tasks?): drawing "
                  f"{n} negatives per row (seed {args.seed}) for every method", file=sys.stderr)
        args.num_negatives = args.num_negatives if args.num_negatives is not None else DEFAULT_NUM_NEGATIVES
        args.candidate_seed = args.seed
        return
    stats, rec = found
    n = int(rec["num_negatives"])
    if args.num_negatives is not None and args.num_negatives != n:
        raise bad(stats, f"build wrote the {args.split} cand_rank rows with {n} negatives per row, but "
                  f"--num_negatives is {args.num_negatives}",
                  f"drop --num_negatives to rank build's lists (the ones SFT and RL saw), or pass --candidates "
                  f"sample --num_negatives {args.num_negatives} to draw new lists for every method")
    args.num_negatives, args.candidate_seed = n, int(rec["seed"])
    args.candidate_file = str(DataDir(args.data_dir).root / rec["files"][args.split])
    if not Path(args.candidate_file).is_file():
        raise bad(args.candidate_file, "missing (build_stats.json names it)",
                  f"re-run python -m preprocess build --out_dir {DataDir(args.data_dir).root}")


# ----------------------------------------------------------------------------- methods
def parse_items(completion: str, unit_re: re.Pattern, answer_of: Mapping[str, int], allowed: set[int]) -> list[int]:
    """Strict parse of a free-form completion (optional ``<think>...</think>`` first) into ranked items.

    The answer may hold only answer units (``unit_re``: item references or SIDs) and
    separators (whitespace, ``,``, ``;``); every unit must name an item in ``allowed``.
    Anything else makes the whole answer a miss (``[]``); repeated items count once.
    """
    parts = prompts.split_reasoning(completion)
    if parts is None:
        return []
    answer = parts[1]
    units = [m.group(0) for m in unit_re.finditer(answer)]
    if not units or _SEP_RE.sub("", unit_re.sub("", answer)):
        return []
    items = [answer_of.get(u) for u in units]
    if any(i is None or i not in allowed for i in items):
        return []
    return dedupe(items)


class Ranker:
    """A method: turns a batch of rows (+ their candidates) into ranked item lists."""

    name: str

    def predict(self, rows: Sequence[dict], cands: Sequence[list[int]] | None) -> list[dict]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {}

    def sort_key(self, row: dict) -> int:
        return 0


class ScoreRanker(Ranker):
    """Ranks by a baseline's per-item scores (ties -> smaller item id)."""

    def __init__(self, name: str, scorer: Any, data: EvalData, num_ranked: int) -> None:
        self.name, self.scorer, self.data, self.num_ranked = name, scorer, data, num_ranked
        self.universe = torch.tensor(data.universe, dtype=torch.long)

    def predict(self, rows, cands):
        scores = self.scorer.score_rows(rows)
        if cands is None:
            ranked = rank_by_score(scores[:, self.universe], self.universe, self.num_ranked)
        else:
            ranked = [rank_by_score(scores[r:r + 1, c], c, len(c))[0] for r, c in enumerate(cands)]
        return [{"ranked": rk} for rk in ranked]

    def describe(self):
        return self.scorer.describe()


class ModelRanker(Ranker):
    """An LLM checkpoint: constrained beam search, or greedy reasoning + strict parsing (``--think``)."""

    def __init__(self, name: str, path: str, data: EvalData, args: argparse.Namespace, device: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mimigenrec.decoding.trie import ItemTrie
        from mimigenrec.models.ensemble import EnsembleLM, split_paths

        self.name, self.path, self.data, self.args, self.device = name, path, data, args, device
        paths = split_paths(path)
        if len(paths) > 1 and (args.think or args.task == "query"):
            raise bad("--model", f"{name}: an ensemble ({path}) ranks by beam search only",
                      "drop --think / --task query, or give one checkpoint")
        tok = AutoTokenizer.from_pretrained(check_model_dir(paths[0]))
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.tok = tok
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        models = [AutoModelForCausalLM.from_pretrained(check_model_dir(p), dtype=dtype).to(device).eval()
                  for p in paths]
        self.model = models[0] if len(models) == 1 else EnsembleLM(models).eval()
        self.task = args.task
        self.index = None
        if self.task == "query":  # free-form query; BM25 (the retrieval_ndcg reward's index) ranks the catalogue
            from rewards.retrieval import catalog_index

            self.trie, self.index = None, catalog_index(data.data_dir)
        elif self.task == "cand_rank":
            texts = {i: prompts.item_ref(i) for i in data.universe}
            self.trie = ItemTrie.from_texts(texts, tok)
            self.answer_of = {t: i for i, t in texts.items()}
            self.unit_re = prompts.ITEM_REF_RE
        else:
            missing = [i for i in data.universe if i not in data.id2sid]
            if missing:
                raise bad(DataDir(data.data_dir).id2sid, f"no SID for items {missing[:5]}", "re-run the sid stage")
            sids = {i: data.id2sid[i] for i in data.universe}
            from mimigenrec.launch import check_sid_tokens

            vocab = tok.get_vocab()
            check_sid_tokens(vocab, sorted({t for s in sids.values() for t in s}), paths[0], data.data_dir)
            probe = prompts.item_token(next(iter(sids)))
            has_items = probe in vocab
            if has_items != prompts.uses_item_tokens(self.task):  # else its prompts are not the SFT prompts
                raise bad(paths[0], f"its vocabulary {'holds' if has_items else 'has no'} the item tokens "
                          f"({probe}), but --task {self.task} "
                          f"{'does not show' if has_items else 'shows'} them",
                          f"evaluate it with --task {'sid_item_seq' if has_items else 'sid_seq'}, the task it was "
                          "trained on")
            for p in paths:
                warn_if_other_sids(name, p, DataDir(data.data_dir).id2sid)
            self.trie = ItemTrie.from_id2sid(sids, tok)
            self.answer_of = {prompts.sid_string(s): i for i, s in sids.items()}
            self.unit_re = re.compile(r"(?:" + prompts.SID_TOKEN_RE.pattern + r")+")
        if self.trie is not None:
            self.trie = self.trie.to(device)
        self._len: dict[str, int] = {}

    def messages(self, row: dict, cands: list[int] | None) -> list[dict]:
        """The row's prompt as chat messages (the SFT template; what the RL rows hold as ``prompt``)."""
        d = self.data
        text = prompts.build_input(self.task, history=row["history"], items=d.items, id2sid=d.id2sid,
                                   captions=d.captions, candidates=cands)
        return prompts.chat_messages(prompts.sft_row(self.task, text, ""))

    def prompt(self, row: dict, cands: list[int] | None) -> str:
        return prompts.render_prompt(self.tok, self.messages(row, cands))

    def sort_key(self, row: dict) -> int:
        return -len(row["history"])  # long prompts first: similar lengths share a batch, OOM shows early

    def parse(self, completion: str, cands: list[int] | None) -> list[int]:
        if self.task == "cand_rank":  # the candidate_choice reward's parser: one candidate or a miss
            choice = prompts.parse_choice(completion, cands)
            return [] if choice is None else [choice]
        allowed = set(cands) if cands is not None else set(self.answer_of.values())
        return parse_items(completion, self.unit_re, self.answer_of, allowed)

    def greedy(self, enc: Mapping[str, torch.Tensor]) -> list[str]:
        """Greedy free-form completions (sampling off whatever the generation_config says), decoded."""
        from mimigenrec.decoding.beam_search import stock_generate_kwargs

        kw = stock_generate_kwargs(1, self.args.max_new_tokens, self.tok.eos_token_id, self.tok.pad_token_id)
        kw.update(num_return_sequences=1, output_scores=False)
        for beam_only in ("length_penalty", "early_stopping"):  # meaningless for greedy decoding
            kw.pop(beam_only)
        out = self.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
        gen = out.sequences[:, enc["input_ids"].shape[1]:]
        return self.tok.batch_decode(gen, skip_special_tokens=True)

    @torch.no_grad()
    def predict(self, rows, cands):
        from mimigenrec.decoding.beam_search import constrained_beam_search

        texts = [self.prompt(r, None if cands is None else cands[i]) for i, r in enumerate(rows)]
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        if self.task == "query":
            out = []
            for r, c in zip(rows, self.greedy(enc)):
                q = prompts.parse_query(c)
                ranked = [] if q is None else self.index.ranked(q, int(r["target"]), self.args.num_ranked)
                out.append({"ranked": ranked, "query": q, "completion": c})
            return out
        if self.args.think:
            comps = self.greedy(enc)
            return [{"ranked": self.parse(c, None if cands is None else cands[i]), "completion": c}
                    for i, c in enumerate(comps)]
        allowed = None
        beams = self.args.num_beams
        if cands is not None:
            allowed = self.trie.candidates_mask(cands)
            beams = min(beams, max(len(c) for c in cands))
        impl = self.args.beam_search
        res = constrained_beam_search(self.model, enc["input_ids"], enc["attention_mask"], self.trie, beams,
                                      allowed_items=allowed, use_generate=impl == "generate",
                                      cache_mode=impl if impl in ("tree", "expand") else "auto")
        return [{"ranked": [int(i) for i in row if i >= 0]} for row in res.items.tolist()]

    def describe(self):
        if self.trie is None:
            return {"path": self.path, "generation": "greedy", "max_new_tokens": self.args.max_new_tokens,
                    "catalogue_items": len(self.index.item_ids)}
        return {"path": self.path, "trie_items": self.trie.num_items, "think": bool(self.args.think),
                "beam_search": self.args.beam_search}


class QueryBaseline(Ranker):
    """A fixed query per row, ranked by BM25 like the model's: the last history title, or every history title."""

    def __init__(self, name: str, kind: str, data: EvalData, num_ranked: int) -> None:
        from rewards.retrieval import catalog_index

        self.name, self.kind, self.data, self.num_ranked = name, kind, data, num_ranked
        self.index = catalog_index(data.data_dir)

    def query(self, row: Mapping) -> str:
        hist = list(row["history"])[-1:] if self.kind == "query_last" else list(row["history"])
        return " ".join(str(self.data.items[i].get("title") or "") for i in hist).strip()

    def predict(self, rows, cands):
        out = []
        for r in rows:
            q = self.query(r)
            out.append({"ranked": self.index.ranked(q, int(r["target"]), self.num_ranked), "query": q})
        return out

    def describe(self):
        return {"query": "title of the last history item" if self.kind == "query_last" else "every history title",
                "ranker": "BM25 over items.jsonl (title + description)"}


def warn_if_other_sids(name: str, model: str, id2sid: Path) -> None:
    """A loud note when ``sft.sh`` recorded that the model learned other semantic IDs than ``id2sid``
    (a dataset rebuilt with other SIDs keeps the same token names, so nothing else would notice)."""
    from mimigenrec.sft_config import trained_sids

    sids = trained_sids(model)
    if sids and file_digest(id2sid) not in sids:
        print(f"[evaluate] warning: {name}: {model} was fine-tuned with other semantic IDs than {id2sid} "
              "(sft.sh's record in its folder): its answers name other items; evaluate it on the dataset it was "
              "trained on, or fine-tune it on this one", file=sys.stderr)


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``name=PATH`` or ``PATH`` (name = the folder's name)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        return name, path
    p = Path(spec.rstrip("/"))
    return p.name or "model", spec


def method_names(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``[(method name, "model:PATH" | "baseline:NAME")]`` in table order."""
    out: list[tuple[str, str]] = []
    for spec in args.model or []:
        name, path = parse_model_spec(spec)
        out.append((name, f"model:{path}"))
    baselines = list(args.baseline or [])
    query = getattr(args, "task", None) == "query"
    if not baselines and out and not args.no_baselines:
        baselines = list(QUERY_BASELINES) if query else ["popularity", "sasrec"]
    wrong = [b for b in baselines if (b in QUERY_BASELINES) != query]
    if wrong:
        raise bad("--baseline", f"{wrong[0]} does not rank {'queries' if query else 'this task'}",
                  f"with --task query use {', '.join(QUERY_BASELINES)}; query baselines need --task query")
    out += [(b, f"baseline:{b}") for b in baselines]
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise bad("--model", f"duplicate method names {names}", "name models with --model NAME=PATH")
    if not out:
        raise bad("evaluate", "nothing to evaluate", "give --model PATH and/or --baseline NAME")
    return out


def sasrec_config(args: argparse.Namespace, loss: str):
    from mimigenrec.eval.baselines import SASRecConfig

    patience = args.sasrec_patience if args.sasrec_patience is not None else (40 if loss == "bce" else 10)
    return SASRecConfig(hidden=args.sasrec_hidden, blocks=args.sasrec_blocks, heads=args.sasrec_heads,
                        dropout=args.sasrec_dropout, max_len=args.sasrec_max_len, loss=loss, lr=args.sasrec_lr,
                        batch_size=args.sasrec_batch_size, epochs=args.sasrec_epochs,
                        patience=patience, seed=args.seed)


def build_ranker(name: str, spec: str, data: EvalData, args: argparse.Namespace, dist: Dist, device: str) -> Ranker:
    kind, _, what = spec.partition(":")
    if kind == "model":
        from mimigenrec.models.item_head import is_head_dir

        if is_head_dir(what):  # an item-head folder: one forward pass scores every item (mimigenrec.models)
            from mimigenrec.models.head_eval import HeadRanker

            return HeadRanker(name, what, data, args, device)
        return ModelRanker(name, what, data, args, device)
    if what in QUERY_BASELINES:
        return QueryBaseline(name, what, data, args.num_ranked)
    before = splits_before(data.split) or ("train",)
    if what == "popularity":
        from mimigenrec.eval.baselines import Popularity

        return ScoreRanker(name, Popularity.fit(data.seqs, before, data.num_item_ids), data, args.num_beams)
    if what in ("sasrec", "sasrec_bce"):
        def make():
            return load_sasrec(data, args, "bce" if what == "sasrec_bce" else "ce", device=device, name=name,
                               progress=dist.rank == 0)
        if dist.world > 1:  # rank 0 trains and caches; the others load the checkpoint
            scorer = make() if dist.rank == 0 else None
            dist.barrier()
            scorer = scorer or make()
        else:
            scorer = make()
        return ScoreRanker(name, scorer, data, args.num_beams)
    raise bad("--baseline", f"unknown baseline {what!r}", f"choose from {', '.join(BASELINE_NAMES)}")


def load_sasrec(data: EvalData, args: argparse.Namespace, loss: str = "ce", device: str = "cpu",
                name: str = "sasrec", progress: bool = True):
    """The SASRec baseline of ``data``'s split (:func:`sasrec_stopping`), read from its cache in
    ``DATA/baselines`` (or ``--output_dir/baselines`` when DATA is read-only) or trained and cached."""
    from mimigenrec.eval.baselines import SASRecScorer

    caches = [data.data_dir / "baselines", Path(args.output_dir) / "baselines"]
    if not os.access(data.data_dir, os.W_OK):
        caches = caches[1:]
    seqs, stop_rows, stop = sasrec_stopping(data)
    return SASRecScorer.load_or_train(data.data_dir, caches, seqs, data.num_item_ids, data.universe, stop_rows,
                                      sasrec_config(args, loss), device=device, name=name, progress=progress,
                                      stopping=stop)


def split_sasrec(data_dir: str | os.PathLike, split: str, output_dir: str | os.PathLike | None = None):
    """``(EvalData, SASRecScorer)``: the SASRec baseline ``evaluate.sh --split split`` trains for
    ``data_dir`` (protocol: :func:`sasrec_stopping`), read from its cache or trained and cached in
    ``data_dir/baselines`` (``output_dir/baselines`` when the data is read-only). Needs no SIDs."""
    args = build_parser().parse_args(["--data_dir", str(data_dir), "--split", split, "--baseline", "sasrec",
                                      "--output_dir", str(output_dir or data_dir)])
    args.methods = ["baseline:sasrec"]
    data = load_eval_data(args)
    return data, load_sasrec(data, args, progress=False)


def sasrec_stopping(data: EvalData) -> tuple[UserSequences, list[dict], str]:
    """``(sequences to train on, early-stopping rows, protocol name)`` for SASRec.

    Scoring test: stop on the valid rows. Scoring valid: stop on each user's last train row, held
    out from training, so the model is never selected on the rows it is scored on.
    """
    if data.split != "valid":
        return data.seqs, data.all_rows.get("valid", []), "valid rows"
    seqs, rows = data.seqs.hold_out_last("train", as_split="stop")
    return seqs, rows, "each user's last train row (held out; the valid split is scored)"


# ----------------------------------------------------------------------------- files
def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@+-]", "_", name)


def pred_path(out: Path, method: str) -> Path:
    return out / f"predictions_{safe_name(method)}.jsonl"


def shard_paths(out: Path, method: str) -> list[Path]:
    return sorted((out / "shards").glob(f"predictions_{safe_name(method)}.r*.jsonl"))


def read_predictions(paths: Sequence[Path]) -> dict[str, dict]:
    """Predictions by row key from jsonl files (a torn last line from a crash is skipped)."""
    out: dict[str, dict] = {}
    for p in paths:
        if p.is_file():
            for _, rec in iter_records(p):
                if {"user_id", "position", "ranked"} <= rec.keys():
                    out.setdefault(row_key(rec), rec)
    return out


def open_shard(path: Path):
    """Append handle on this rank's shard, cutting a torn (unterminated) last line first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


RESUME_KEYS = ("data_dir", "split", "task", "num_beams", "num_negatives", "seed", "think", "max_new_tokens", "captions")


def method_records(args: argparse.Namespace, methods: list[tuple[str, str]]) -> dict[str, dict]:
    """Per method: its ``source`` and ``config`` (what the user chose; a change is refused) and its
    ``inputs`` fingerprint (the data files, a model's weights; a change makes its predictions stale)."""
    data_fp = fingerprint(data_files(args))
    sas = {k: v for k, v in sorted(vars(args).items()) if k.startswith("sasrec_")}
    out = {}
    for name, spec in methods:
        kind, _, what = spec.partition(":")
        if kind == "model":
            from mimigenrec.models.ensemble import SEPARATOR, split_paths

            paths = [check_model_dir(p).resolve() for p in split_paths(what)]
            inputs = fingerprint([], [data_fp, *map(model_fingerprint, paths)])
            rec = {"source": "model:" + SEPARATOR.join(map(str, paths)), "config": None, "inputs": inputs}
        else:
            rec = {"source": spec, "config": sas if what.startswith("sasrec") else None, "inputs": data_fp}
        out[name] = rec
    return out


def _has_predictions(out: Path, name: str) -> bool:
    return pred_path(out, name).is_file() or bool(shard_paths(out, name))


def _discard(out: Path, name: str) -> None:
    for p in [pred_path(out, name), *shard_paths(out, name)]:
        p.unlink(missing_ok=True)


def check_run_config(args: argparse.Namespace, out: Path, methods: list[tuple[str, str]], dist: Dist) -> None:
    """Decide what of ``out`` may be reused, then record this run (see the module docstring)."""
    path = out / "run_config.json"
    now = {k: getattr(args, k) for k in RESUME_KEYS}
    now["data_dir"] = str(Path(args.data_dir).resolve())
    if args.task == "cand_rank":  # where the lists come from (other tasks keep their old settings record)
        now["candidates"] = getattr(args, "candidates", "sample")
        now["candidate_seed"] = getattr(args, "candidate_seed", args.seed)
    records = method_records(args, methods)
    old = read_json(path) if path.is_file() else {}
    old_methods = old.get("methods", {}) if isinstance(old, dict) else {}
    held = [n for n in old_methods if _has_predictions(out, n)] + [n for n in records if _has_predictions(out, n)]
    if args.overwrite:
        held = []
        if dist.rank == 0:
            for name in {*records, *old_methods}:
                _discard(out, name)
    clash = {}
    if held and old.get("settings") != now:
        was = old.get("settings") or {}
        clash = {k: (was.get(k), now.get(k)) for k in [*now, *(k for k in was if k not in now)]
                 if was.get(k) != now.get(k)}
    stale = []
    for name, rec in records.items():
        was = old_methods.get(name)
        if name not in held:
            continue
        if isinstance(was, dict) and (was.get("source"), was.get("config")) != (rec["source"], rec["config"]):
            clash[name] = (was.get("source"), rec["source"]) if was.get("source") != rec["source"] else "config"
        elif not isinstance(was, dict) or was.get("inputs") != rec["inputs"]:  # no record: provenance unknown
            stale.append(name)
    if clash:
        raise bad(out, f"holds predictions made with other settings {clash}",
                  "use another --output_dir, or --overwrite to discard them")
    if dist.rank == 0:
        for name in stale:
            print(f"[evaluate] {name}: {out} holds predictions of other inputs (the model's weights or the data "
                  "changed since): predicting again", file=sys.stderr)
            _discard(out, name)
        write_json(path, {"settings": now, "methods": {**old_methods, **records}})
    dist.barrier()


# ----------------------------------------------------------------------------- running
def plan_batches(ranker: Ranker, rows: Sequence[dict], batch_size: int) -> list[list[int]]:
    """Global batches of row indices (similar prompt lengths together), the same for every world size,
    so a row sees the same batch-mates and padding whether 1 or P processes run."""
    order = sorted(range(len(rows)), key=lambda i: (ranker.sort_key(rows[i]), i))
    bs = max(1, batch_size)
    return [order[s:s + bs] for s in range(0, len(order), bs)]


def run_method(ranker: Ranker, data: EvalData, args: argparse.Namespace, out: Path, dist: Dist) -> dict:
    """Predict this rank's batches (``b % world == rank``) that still miss rows, appending to its shard.

    A batch that is partly done (a crash mid-run) is recomputed whole, so its composition and
    padding are those of an uninterrupted run; only its missing rows are written.
    """
    done = read_predictions([pred_path(out, ranker.name), *shard_paths(out, ranker.name)])
    batches = [b for k, b in enumerate(plan_batches(ranker, data.rows, args.batch_size))
               if k % dist.world == dist.rank and any(row_key(data.rows[i]) not in done for i in b)]
    todo = sum(len(b) for b in batches)
    written = 0
    t0 = time.time()
    shard = out / "shards" / f"predictions_{safe_name(ranker.name)}.r{dist.rank}.jsonl"
    with open_shard(shard) as f, tqdm(total=todo, desc=f"{ranker.name}[rank {dist.rank}]", unit="row",
                                      disable=args.quiet or not todo) as bar:
        for idx in batches:
            rows = [data.rows[i] for i in idx]
            cands = None if data.candidates is None else [data.candidates[i] for i in idx]
            preds = ranker.predict(rows, cands)
            for j, (r, p) in enumerate(zip(rows, preds)):
                if row_key(r) in done:
                    continue
                rec = {"user_id": int(r["user_id"]), "position": int(r["position"]), "target": int(r["target"]), **p}
                if cands is not None:
                    rec["candidates"] = cands[j]
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                written += 1
            f.flush()
            bar.update(len(idx))
    dt = time.time() - t0
    return {"rows_predicted": written, "seconds": round(dt, 2),
            "rows_per_s": round(todo / dt, 2) if todo and dt > 0 else None}


def merge_and_score(name: str, data: EvalData, out: Path, ks: Sequence[int]) -> dict:
    """Rank 0: merge every shard into ``predictions_<name>.jsonl`` (row order) and compute metrics."""
    shards = shard_paths(out, name)
    have = read_predictions([pred_path(out, name), *shards])
    missing = [row_key(r) for r in data.rows if row_key(r) not in have]
    if missing:
        raise RuntimeError(f"{name}: {len(missing)} rows have no prediction (first {missing[:3]}); a rank failed?")
    preds = [have[row_key(r)] for r in data.rows]
    write_jsonl(pred_path(out, name), preds)
    for p in shards:
        p.unlink(missing_ok=True)
    return aggregate(preds, ks)


def pick_device(arg: str, dist: Dist) -> str:
    if arg != "auto":
        return arg
    if torch.cuda.is_available():
        return f"cuda:{dist.local_rank % torch.cuda.device_count()}"
    return "cpu"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout and shows every option's default."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mimigenrec.eval.evaluate", description=__doc__,
                                formatter_class=_HelpFormatter)
    a = p.add_argument
    a("--data_dir", required=True, help="preprocessed dataset dir (items.jsonl, inter/, id2sid.json)")
    a("--split", default="test", choices=("valid", "test"), help="rows to evaluate")
    a("--model", action="append", metavar="[NAME=]PATH",
      help="model checkpoint dir (repeatable); NAME labels its table row (unset: the folder name); a folder with "
      "item_head.json is ranked by its item head (one forward pass per row) instead of beam search; DIR_A+DIR_B "
      "ranks by several checkpoints that share a tokenizer, each token's log-prob the log-softmax of their mean "
      "log-probs (mimigenrec.models.ensemble)")
    a("--baseline", action="append", choices=BASELINE_NAMES,
      help="baseline to evaluate (repeatable); with --model and no --baseline, popularity and sasrec are added "
      "(--task query: query_last and query_history, the only baselines of that task)")
    a("--no_baselines", action="store_true", help="with --model, evaluate only the models")
    a("--task", default="sid_seq", choices=TASKS,
      help="sid_seq / title_seq2sid: full ranking by the next item's SID; cand_rank: pick among candidates; "
      "query: the model writes a search query, BM25 ranks the catalogue")
    a("--num_beams", type=int, default=50, help="beams of constrained beam search = length of saved rankings; "
      "must be >= the largest K (candidate ranking caps it at the candidate count)")
    a("--beam_search", default="auto", choices=("auto", "tree", "expand", "generate"),
      help="constrained beam search: prefill each prompt once with a tree-attention cache (tree; auto picks it "
      "where the model supports 4D masks) or a copied cache (expand), or stock model.generate with the trie "
      "logits processor (generate; slow, for comparison). Rankings agree up to ties")
    a("--ks", default=",".join(map(str, DEFAULT_KS)), help="cut-offs K of HR@K / NDCG@K, comma-separated")
    a("--num_negatives", type=int, default=None,
      help="candidate ranking: negatives per row; unset = those of build's lists (--candidates build), "
      f"{DEFAULT_NUM_NEGATIVES} when sampling; a value that disagrees with build's lists is refused")
    a("--candidates", default="build", choices=("build", "sample"),
      help="candidate ranking: build = the lists preprocess build drew for its cand_rank rows (one source for SFT, "
      "RL and evaluation; sampled with a note when build drew none for the split); sample = draw --num_negatives "
      "negatives per row (seed --seed)")
    a("--batch_size", type=int, default=8, help="prompts per forward batch (rows per scoring batch for baselines)")
    a("--max_rows", type=int, default=0, help="evaluate a seeded random subset of this many rows (0 = all)")
    a("--seed", type=int, default=0, help="seed of row subsampling, candidate sampling and SASRec training")
    a("--output_dir", default="eval_out", help="metrics.json, predictions_<method>.jsonl, shards/, baselines/")
    a("--device", default="auto", help="auto = cuda:LOCAL_RANK if a GPU is visible, else cpu; or e.g. cpu, cuda:1")
    a("--think", action="store_true", help="let the model reason (<think>...</think>) greedily, then parse the "
      "answer strictly instead of constraining it")
    a("--max_new_tokens", type=int, default=512, help="--think and --task query: generation budget per row")
    a("--captions", default="auto", choices=("auto", "on", "off"),
      help="put image captions (O/captions.jsonl) into title views of the prompt; auto = if the file exists "
      "(must match how the SFT data was built)")
    a("--overwrite", action="store_true", help="discard earlier predictions in --output_dir instead of resuming")
    a("--quiet", action="store_true", help="no progress bars")
    s = p.add_argument_group("SASRec baseline")
    s.add_argument("--sasrec_epochs", type=int, default=200, help="max epochs (exact count with --sasrec_patience 0)")
    s.add_argument("--sasrec_patience", type=int, default=None,
                   help="stop after this many epochs without a better valid NDCG@10 (0 = fixed epochs; "
                        "unset: 10 for the CE loss, 40 for BCE, which improves slowly)")
    s.add_argument("--sasrec_hidden", type=int, default=64, help="embedding / hidden size d")
    s.add_argument("--sasrec_blocks", type=int, default=2, help="self-attention blocks")
    s.add_argument("--sasrec_heads", type=int, default=1, help="attention heads")
    s.add_argument("--sasrec_dropout", type=float, default=0.2, help="dropout rate")
    s.add_argument("--sasrec_max_len", type=int, default=50, help="most recent items fed to the model")
    s.add_argument("--sasrec_lr", type=float, default=1e-3, help="Adam learning rate")
    s.add_argument("--sasrec_batch_size", type=int, default=128, help="training sequences per batch")
    return p


def parse_ks(args: argparse.Namespace) -> list[int]:
    """``--ks`` as sorted positive cut-offs, checked against ``--num_beams``."""
    try:
        ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    except ValueError:
        raise bad("--ks", f"expected comma-separated integers, got {args.ks!r}", "e.g. --ks 1,5,10") from None
    if not ks or ks[0] < 1:
        raise bad("--ks", "needs positive integers", "e.g. --ks 1,5,10")
    if args.task not in ("cand_rank", "query") and args.num_beams < ks[-1]:
        raise bad("--num_beams", f"{args.num_beams} < largest K {ks[-1]}: ranks beyond the beams are unknown",
                  f"use --num_beams {ks[-1]} or more, or smaller --ks")
    return ks


def write_metrics(args: argparse.Namespace, data: EvalData, out: Path, ks: list[int], methods: list[tuple[str, str]],
                  described: dict[str, dict], dist: Dist) -> None:
    """Rank 0: merge and score every method of this run; metrics.json and the table hold exactly these."""
    metrics = {name: merge_and_score(name, data, out, ks) for name, _ in methods}
    meta = {
        "data_dir": str(Path(args.data_dir).resolve()), "split": args.split, "task": args.task,
        "ks": ks, "num_beams": args.num_beams,
        "num_negatives": args.num_negatives if args.task == "cand_rank" else None,
        "candidates": (None if args.task != "cand_rank" else getattr(args, "candidate_file", None)
                       or f"sampled (seed {getattr(args, 'candidate_seed', args.seed)})"),
        "seed": args.seed, "max_rows": args.max_rows, "n_rows": len(data.rows),
        "n_ranked_items": len(data.universe), "world_size": dist.world, "think": args.think,
        "protocol": "NDCG@K = 1/log2(rank+2) for the 0-based rank of the target if < K; HR@K = target in top K; "
                    "history items not excluded; full ranking over every item appearing in interactions",
        "methods": described,
    }
    write_json(out / "metrics.json", {**metrics, "_meta": meta})
    ranked = {"cand_rank": f"{args.num_negatives + 1} candidates ranked",
              "query": "BM25 over the item catalogue"}.get(args.task, f"{len(data.universe)} items ranked")
    print(f"\n{args.split} / {args.task}: {len(data.rows)} rows, {ranked}\n")
    print(markdown_table(metrics, ks))
    print(f"\nwrote {out / 'metrics.json'}")


def evaluate(args: argparse.Namespace) -> int:
    """Run the evaluation described by ``args`` (see the module docstring)."""
    ks = parse_ks(args)
    args.num_ranked = ks[-1]  # query task: length of the saved BM25 rankings
    resolve_candidates(args)
    methods = method_names(args)
    args.methods = [s for _, s in methods]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dist = Dist.from_env()
    try:
        check_run_config(args, out, methods, dist)
        data = load_eval_data(args)
        device = pick_device(args.device, dist)
        if args.task == "cand_rank":
            args.num_beams = max(args.num_beams, 1)
        described: dict[str, dict] = {}
        for name, spec in methods:
            ranker = build_ranker(name, spec, data, args, dist, device)
            timing = run_method(ranker, data, args, out, dist)
            described[name] = {**ranker.describe(), **timing}
            del ranker
        dist.barrier()
        if dist.rank == 0:
            write_metrics(args, data, out, ks, methods, described, dist)
        dist.barrier()
    finally:
        dist.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli_errors(lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
