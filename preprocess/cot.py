"""Chain-of-thought supervision: pseudo-CoT draft -> LLM refinement -> confidence-aware filter (cot.jsonl).

Rows come from ``O/inter/<split>.jsonl`` and are keyed by ``(user_id, position)``.

1. Draft (pure Python, deterministic, history only): attributes of the history items (categories,
   brands, frequent title words, visual attributes from ``captions.jsonl``) -> preference summary
   -> plausible next-item kinds. The target is never read.
2. Refinement: the LLM rewrites the draft into concise reasoning. Its prompt holds the history and
   the draft only, never the target's title, id or SID. ``--hindsight`` (train split only, off by
   default) instead shows the target ("rationale" mode); such rows carry ``"hindsight": true``.
3. Assessment: ``likelihood`` = sigmoid(d / T), d = mean per-token log-probability of the target
   title given history + reasoning minus the same without reasoning, under a local causal LM
   (``--judge_model``; 0.5 = the reasoning neither helps nor hurts); ``llm`` = the LLM's strict 0-10
   rating / 10; ``both`` = their mean. Rows with ``score >= --threshold`` get ``"kept": true``.

Rows ``{"user_id","position","input_id","draft","reasoning","score","kept","hindsight",...}`` are
appended to ``O/cot.jsonl`` as each finishes (fsync; restart skips finished keys, cuts a torn last
line). ``input_id`` digests the raw ids of the row's history and target: a row whose ``input_id``
no longer matches the interaction row at its (user_id, position) (a source stage re-ran and
renumbered users or items) is stale, so the restart drops and redoes it and ``build`` ignores it.
Failed or rejected LLM calls are retried, then listed in ``O/cot_failures.jsonl`` - never saved as
empty reasoning. SFT mixing is done by ``build`` via :func:`load_kept_cot`.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from mimigenrec.io import (
    SPLITS,
    BadInputError,
    DataDir,
    LineErrors,
    add_out_dir_argument,
    bad,
    iter_records,
    write_jsonl,
)
from mimigenrec.prompts import render_history
from preprocess.caption import open_current_log
from preprocess.llm_backends import (
    Backend,
    HFCausalLM,
    add_backend_arguments,
    backend_from_args,
    chat_validated,
)
from preprocess.reasoning_prompts import (
    hindsight_messages,
    judge_likelihood_messages,
    judge_llm_messages,
    parse_judge_score,
    refine_messages,
)

FAILURES_FILE = "cot_failures.jsonl"
Key = tuple[int, int]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_out_dir_argument(p, "preprocessed dataset directory O")
    p.add_argument("--split", default="train", choices=["train", "valid", "test"], help="which inter/<split>.jsonl")
    p.add_argument("--threshold", type=float, default=0.5, help="keep rows whose judge score (0..1) is at least this")
    p.add_argument("--judge", default="likelihood", choices=["likelihood", "llm", "both"],
                   help="likelihood: target-title log-likelihood gain under --judge_model; "
                        "llm: the backend rates 0-10; both: mean of the two")
    p.add_argument("--judge_model", default=None,
                   help="causal LM for the likelihood judge (directory or .gguf; default: --model with --backend hf)")
    p.add_argument("--likelihood_temp", type=float, default=0.25,
                   help="T in sigmoid(d / T), d = per-token log-likelihood gain from the reasoning (nats)")
    p.add_argument("--hindsight", action="store_true",
                   help="rationale mode: the refinement prompt sees the target (train split only; rows flagged)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of the split file")
    p.add_argument("--max_history", type=int, default=20, help="most recent history items shown to the LLM")
    p.add_argument("--batch_size", type=int, default=8, help="rows per LLM call")
    p.add_argument("--max_new_tokens", type=int, default=160, help="reasoning length limit in tokens")
    p.add_argument("--seed", type=int, default=0, help="seed for generation and the sampled re-asks")
    add_backend_arguments(p, ["hf", "http", "none"])


# ----------------------------------------------------------------------------- stage 1: pseudo-CoT

_STOP = set("""a an and are as at be by for from has have in into is it its of on or per the to with without
this that these those up x pk pcs pack set lot inch inches mm cm ft oz lb lbs ml piece pieces size new""".split())
_WORD = re.compile(r"[a-z][a-z\-]{2,}")
_VISUAL = set("""black white grey gray silver gold red orange yellow green blue purple pink brown beige clear
transparent translucent metallic dark light bright matte glossy shiny round square rectangular cylindrical
flat long short thin thick small large tiny coiled plastic metal steel aluminum aluminium wood wooden glass
rubber paper cardboard fabric cloth leather foam ceramic silicone nylon box boxed bag bagged bottle tube
blister packaged package carton roll spool jar can pouch""".split())


def _top(counter: Counter, k: int) -> list[str]:
    return [w for w, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def _counted(counter: Counter, k: int) -> str:
    return ", ".join(f"{w} ({counter[w]})" if counter[w] > 1 else w for w in _top(counter, k))


def _short(title: str, n: int = 60) -> str:
    return title if len(title) <= n else title[: n - 3].rstrip() + "..."


def pseudo_cot(history: Sequence[int], items: Mapping[int, Mapping[str, Any]],
               captions: Mapping[int, str] | None = None) -> str:
    """Deterministic structured draft from the history alone (no LLM, no target)."""
    caps = captions or {}
    hist = [i for i in history if i in items]
    cats, brands, words, visual = Counter(), Counter(), Counter(), Counter()
    for i in hist:
        it = items[i]
        cat_list = [c for c in it.get("categories") or [] if isinstance(c, str) and c.strip()]
        if cat_list:
            cats[cat_list[-1].strip()] += 1  # the most specific category
        brand = (it.get("brand") or "").strip()
        if brand:
            brands[brand] += 1
        brand_words = set(_WORD.findall(brand.lower()))
        words.update(set(_WORD.findall((it.get("title") or "").lower())) - _STOP - brand_words)
        visual.update(set(_WORD.findall(caps.get(i, "").lower())) & _VISUAL)
    attrs = [f"categories: {_counted(cats, 3) or 'unknown'}", f"brands: {_counted(brands, 3) or 'unknown'}",
             f"frequent title words: {_counted(words, 5) or 'none'}"]
    if visual:
        attrs.append(f"visual: {_counted(visual, 5)}")
    n = len(hist)
    pref = [f"{n} past item(s)"]
    if cats:
        c, k = _top(cats, 1)[0], cats[_top(cats, 1)[0]]
        pref.append(f"mostly {c}" if k > 1 or n == 1 else f"spread over {len(cats)} categories")
    if brands and brands[_top(brands, 1)[0]] > 1:
        pref.append(f"repeat buyer of {_top(brands, 1)[0]}")
    if words:
        pref.append("recurring themes: " + ", ".join(_top(words, 3)))
    if visual:
        pref.append("visually favours " + ", ".join(_top(visual, 3)))
    kinds = []
    if hist:
        last = items[hist[-1]]
        last_cats = [c for c in last.get("categories") or [] if isinstance(c, str) and c.strip()]
        if last_cats:
            kinds.append(f"another {last_cats[-1].strip()} item")
        kinds.append(f"a complement or refill for the latest item (\"{_short(last.get('title') or '')}\")")
    if words:
        kinds.append("items about " + " / ".join(_top(words, 2)))
    if brands:
        kinds.append(f"other {_top(brands, 1)[0]} products")
    return ("Attributes: " + "; ".join(attrs) + ".\n"
            "Preference: " + "; ".join(pref) + ".\n"
            "Next-item kinds: " + "; ".join(kinds or ["popular items"]) + ".")


def history_texts(history: Sequence[int], items: Mapping[int, Mapping[str, Any]],
                  captions: Mapping[int, str] | None, max_items: int) -> list[str]:
    """The last ``max_items`` history items as prompt lines (title + caption, shared item format)."""
    hist = [i for i in history if i in items][-max_items:] if max_items > 0 else []
    return [render_history([i], "title", items, captions=captions) for i in hist]


# ----------------------------------------------------------------------------- stage 2: refinement


def clean_reasoning(text: str) -> str:
    """Strip think tags and collapse whitespace."""
    text = re.sub(r"</?think>", " ", text)
    return " ".join(text.split())


def _validate_reasoning(_: int, text: str) -> tuple[str, str | None]:
    r = clean_reasoning(text)
    return r, None if r else "empty reasoning"


# ----------------------------------------------------------------------------- stage 3: assessment


def likelihood_scores(judge: HFCausalLM, hists: list[list[str]], reasonings: list[str], targets: list[str],
                      temp: float = 0.25) -> list[tuple[float, dict]]:
    """``sigmoid((mean_logp(target | hist, reasoning) - mean_logp(target | hist)) / temp)`` per row."""
    convs = [judge_likelihood_messages(h, r) for h, r in zip(hists, reasonings)]
    convs += [judge_likelihood_messages(h, None) for h in hists]
    lps = judge.continuation_logprobs(convs, targets + targets)
    n = len(hists)
    out = []
    for (lw, k), (l0, _) in zip(lps[:n], lps[n:]):
        d = (lw - l0) / k
        out.append((1.0 / (1.0 + math.exp(-d / temp)),
                    {"logp_with": round(lw / k, 4), "logp_without": round(l0 / k, 4), "tokens": k}))
    return out


def llm_scores(backend: Backend, hists: list[list[str]], reasonings: list[str], targets: list[str], *,
               retries: int, seed: int) -> list[tuple[float | None, str | None]]:
    """The backend's strict 0-10 rating / 10, or ``(None, reason)`` when no parsable rating came back."""
    convs = [judge_llm_messages(h, r, t) for h, r, t in zip(hists, reasonings, targets)]

    def validate(_: int, text: str) -> tuple[int | None, str | None]:
        v = parse_judge_score(text)
        return v, None if v is not None else f"unparsable rating {text[:40]!r}"

    res = chat_validated(backend, convs, validate, retries=retries, max_new_tokens=8, seed=seed)
    return [(v / 10.0 if v is not None else None, why) for v, why in res]


# ----------------------------------------------------------------------------- I/O


def _title(items: Mapping[int, Mapping[str, Any]], i: int) -> str:
    return (items[i].get("title") or "").strip() or f"item {i}"


def load_rows(d: DataDir, split: str, limit: int | None = None) -> list[dict]:
    """Interaction rows of a split; a repeated ``(user_id, position)`` is an error naming file:line."""
    path = d.inter(split)
    if not path.exists():
        raise BadInputError(f"{path}: not found (run the amazon18/movielens stage first)")
    rows, seen = [], {}
    for lineno, r in iter_records(path, strict=True):
        try:
            key = (int(r["user_id"]), int(r["position"]))
            r["target"] = int(r["target"])
            r["history"] = [int(x) for x in r["history"]]
        except (KeyError, TypeError, ValueError) as e:
            raise BadInputError(f"{path}:{lineno}: bad or missing field ({e})") from None
        if key in seen:
            raise BadInputError(f"{path}:{lineno}: (user_id, position) {key} already on line {seen[key]}")
        seen[key] = lineno
        rows.append(r)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def input_id(row: Mapping[str, Any], items: Mapping[int, Mapping[str, Any]]) -> str:
    """What a CoT row is made from: a digest of the raw ids of its history and target (item ids
    are renumbered when a source stage re-runs; raw ids are not)."""
    raw = [str(items[i].get("raw_id")) if i in items else f"?{i}" for i in [*row["history"], row["target"]]]
    return hashlib.blake2b("\x00".join(raw).encode(), digest_size=8).hexdigest()


def current_input_ids(d: DataDir, items: Mapping[int, Mapping[str, Any]]) -> dict[Key, str]:
    """``(user_id, position) -> input_id`` of every interaction row of the splits present."""
    out = {}
    for split in SPLITS:
        if d.inter(split).exists():
            for _, r in iter_records(d.inter(split), strict=True):
                out[(int(r["user_id"]), int(r["position"]))] = input_id(r, items)
    return out


def is_current(rec: Mapping[str, Any], ids: Mapping[Key, str]) -> bool:
    """True when a cot.jsonl row was made for the interaction row now at its (user_id, position)."""
    return rec.get("input_id") is not None and ids.get((int(rec["user_id"]), int(rec["position"]))) == rec["input_id"]


def load_kept_cot(out_dir: str | Path, include_hindsight: bool = True) -> dict[Key, str]:
    """``(user_id, position) -> reasoning`` for the kept, current rows of ``O/cot.jsonl`` (read-only; a
    torn last line of a running job is ignored; stale rows are left out with a warning). This is
    what ``build`` mixes into SFT rows."""
    d = DataDir(out_dir)
    if not d.cot.exists():
        return {}
    ids = current_input_ids(d, d.load_items())
    errs = LineErrors(str(d.cot))
    out, stale = {}, 0
    for _, r in iter_records(d.cot, errs):
        if not is_current(r, ids):
            stale += 1
        elif r.get("kept") and r.get("reasoning") and (include_hindsight or not r.get("hindsight")):
            out[(int(r["user_id"]), int(r["position"]))] = r["reasoning"]
    errs.report()
    if stale:
        print(f"[warn] {d.cot}: {stale} row(s) were made for other interactions (a re-run source stage renumbered "
              "users or items?): left out; re-run the cot stage to redo them", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- driver


def _check_args(args: argparse.Namespace) -> None:
    if args.hindsight and args.split != "train":
        raise bad("--hindsight", "the prompt sees the target, so it is only allowed with --split train",
                  "drop --hindsight or use --split train")
    if args.hindsight and args.backend == "none":
        raise bad("--hindsight", "needs an LLM backend", "give --backend hf or http")
    if args.judge in ("llm", "both") and args.backend == "none":
        raise bad(f"--judge {args.judge}", "needs an LLM backend", "give --backend hf or http, or --judge likelihood")
    if args.judge in ("likelihood", "both") and not (args.judge_model or (args.backend == "hf" and args.model)):
        raise bad(f"--judge {args.judge}", "needs a local causal LM to score with", "give --judge_model DIR")


def process_batch(rows: list[dict], items: Mapping[int, Mapping[str, Any]], captions: Mapping[int, str],
                  backend: Backend | None, judge_lm: HFCausalLM | None, args: argparse.Namespace
                  ) -> Iterable[tuple[dict, dict | None, str | None]]:
    """Yield ``(row, cot_record or None, failure reason or None)`` for each row of a batch."""
    drafts = [pseudo_cot(r["history"], items, captions) for r in rows]
    hists = [history_texts(r["history"], items, captions, args.max_history) for r in rows]
    if backend is None:
        refined = [(dr, None) for dr in drafts]
    else:
        if args.hindsight:
            convs = [hindsight_messages(h, dr, _title(items, r["target"])) for h, dr, r in zip(hists, drafts, rows)]
        else:
            convs = [refine_messages(h, dr) for h, dr in zip(hists, drafts)]
        refined = chat_validated(backend, convs, _validate_reasoning, retries=args.retries,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed)
    ok = [j for j, (text, _) in enumerate(refined) if text]
    targets = [_title(items, rows[j]["target"]) for j in ok]
    scores: dict[str, list] = {}
    if ok and args.judge in ("likelihood", "both"):
        scores["likelihood"] = likelihood_scores(judge_lm, [hists[j] for j in ok], [refined[j][0] for j in ok],
                                                 targets, args.likelihood_temp)
    if ok and args.judge in ("llm", "both"):
        scores["llm"] = llm_scores(backend, [hists[j] for j in ok], [refined[j][0] for j in ok], targets,
                                   retries=args.retries, seed=args.seed)
    pos = {j: n for n, j in enumerate(ok)}
    for j, r in enumerate(rows):
        text, why = refined[j]
        if not text:
            yield r, None, f"refinement: {why}"
            continue
        parts, detail = [], {}
        for name, vals in scores.items():
            value, info = vals[pos[j]]
            if value is None:
                why = f"judge {name}: {info}"
                break
            parts.append(value)
            detail[name] = info if isinstance(info, dict) else round(value, 4)
        else:
            score = sum(parts) / len(parts)
            yield r, {"user_id": int(r["user_id"]), "position": int(r["position"]),
                      "input_id": input_id(r, items), "draft": drafts[j],
                      "reasoning": text, "score": round(score, 6), "kept": score >= args.threshold,
                      "hindsight": bool(args.hindsight), "judge": args.judge, "judge_detail": detail,
                      "backend": backend.name if backend else "none"}, None
            continue
        yield r, None, why


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    _check_args(args)
    torch.manual_seed(args.seed)
    d = DataDir(args.out_dir)
    items = d.load_items()
    captions = d.load_captions(items)
    rows = load_rows(d, args.split, args.limit)
    ids = current_input_ids(d, items)
    for r in rows:
        missing = [i for i in r["history"] + [r["target"]] if i not in items]
        if missing:
            raise BadInputError(f"{d.inter(args.split)}: row {(r['user_id'], r['position'])} names unknown item(s) {missing}")
    failures: list[dict] = []
    kept = written = 0
    with open_current_log(d.cot, lambda r: (int(r["user_id"]), int(r["position"])),
                          partial(is_current, ids=ids), "CoT row(s)") as log:
        todo = [r for r in rows if (int(r["user_id"]), int(r["position"])) not in log]
        print(f"[cot] {len(rows)} rows in {args.split}, {len(rows) - len(todo)} done before, {len(todo)} to do",
              file=sys.stderr)
        backend = backend_from_args(args, vision=False) if todo else None
        judge_lm = None
        if todo and args.judge in ("likelihood", "both"):
            if args.judge_model and not (args.backend == "hf" and args.judge_model == args.model):
                judge_lm = HFCausalLM(args.judge_model, device=args.device, dtype=args.dtype)
            else:
                judge_lm = backend  # the hf refinement model judges too
        t0 = time.perf_counter()
        try:
            with tqdm(total=len(todo), desc="cot", unit="row") as bar:
                for s in range(0, len(todo), args.batch_size):
                    for r, rec, why in process_batch(todo[s:s + args.batch_size], items, captions, backend,
                                                     judge_lm, args):
                        if rec is None:
                            failures.append({"user_id": int(r["user_id"]), "position": int(r["position"]),
                                             "reason": why})
                        else:
                            log.append(rec)
                            written += 1
                            kept += rec["kept"]
                    bar.update(len(todo[s:s + args.batch_size]))
        finally:
            write_jsonl(d.root / FAILURES_FILE, failures)
        total, total_kept = len(log), sum(bool(r.get("kept")) for r in log.rows.values())
        seconds = time.perf_counter() - t0
    print(f"[cot] processed {len(todo)} rows in {seconds:.1f} s; wrote {written} ({kept} kept), {len(failures)} "
          f"failed (listed in {d.root / FAILURES_FILE}); {d.cot}: {total} rows, {total_kept} kept")
    return 0
