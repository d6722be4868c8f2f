"""Run every stage in order: source (amazon18|amazon23|movielens) -> embed -> sid -> [caption] -> [cot] -> build.

Example: python -m preprocess all --source amazon18 --raw_dir R --category C --out_dir O
Every option of the source stages (filters, split, --reviews/--meta, --strict, ...) is accepted
here under the same name and default. The source stage always runs; embed and sid are skipped
when their outputs are up to date for their inputs (content fingerprints), and embed continues
a killed run from its last finished chunk; caption and cot (run only when their backend is
given) continue where they stopped and recompute rows made for other data.
"""
from __future__ import annotations

import argparse
import importlib
import time
from typing import Any

from preprocess import amazon18, movielens
from preprocess.interactions import add_common_arguments
from preprocess.sid import DEFAULT_METHOD, DEFAULT_SEED, METHODS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=["amazon18", "amazon23", "movielens"], required=True, help="raw log format")
    p.add_argument("--raw_dir", default=None, help="directory of the raw files (amazon18: default .)")
    add_common_arguments(p.add_argument_group("source stage: filters and split"))
    amazon18.add_source_arguments(p.add_argument_group(
        "amazon18 / amazon23 source (python -m preprocess amazon18 --help, amazon23 --help)"))
    movielens.add_source_arguments(p.add_argument_group("movielens source (python -m preprocess movielens --help)"))
    g = p.add_argument_group("later stages")
    g.add_argument("--encoder", default="minilm", help="embed: 'minilm' or a local HF model directory")
    g.add_argument("--sid_method", default=DEFAULT_METHOD, choices=METHODS,
                   help="sid: quantizer (python -m preprocess sid --help; its other options keep their defaults)")
    g.add_argument("--levels", type=int, default=3, help="sid: residual levels")
    g.add_argument("--codebook_size", type=int, default=256, help="sid: codes per level")
    g.add_argument("--sid_cf_weight", type=float, default=0.0,
                   help="sid: weight W of SASRec's item embeddings beside the text ones (sid --cf_weight; 0 = text only)")
    g.add_argument("--caption_backend", choices=["hf", "http"], help="caption images with this backend (off if unset)")
    g.add_argument("--cot_backend", choices=["hf", "http", "none"], help="build CoT with this backend (off if unset)")
    g.add_argument("--llm", help="caption/cot: model path (hf backends)")
    g.add_argument("--base_url", help="caption/cot: OpenAI-compatible endpoint (http backends)")
    g.add_argument("--api_model", default="default", help="caption/cot: model name at the endpoint (http backends)")
    g.add_argument("--judge", default="likelihood", choices=["likelihood", "llm", "both"], help="cot: CoT filter")
    g.add_argument("--judge_model", help="cot: causal LM of the likelihood judge (default: --llm with hf)")
    g.add_argument("--tasks", help="build: SFT training tasks (default: build's default)")
    g.add_argument("--eval_tasks", help="build: tasks of the SFT valid/test files (default: build's default)")
    g.add_argument("--rl_tasks", help="build: tasks of the RL files (default: build's default)")
    g.add_argument("--cot_prob", type=float, default=0.0, help="build: fraction of eligible rows carrying CoT")
    g.add_argument("--name", help="build: dataset name (default: basename of --out_dir)")
    g.add_argument("--dataset_dir", default=None,
                   help="build: also register the dataset in this LLaMA-Factory dataset_dir (e.g. data)")
    g.add_argument("--reregister", action="store_true", help="build: let --name re-point an existing registration")
    g.add_argument("--sft_model", default=None, help="build: model_name_or_path written into the SFT yamls")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for SIDs, sampling and CoT mixing")


def stage_namespace(stage: str, argv: list[str], **values: Any) -> argparse.Namespace:
    """``stage``'s own defaults (parsed from its required ``argv``) with ``values`` set on top."""
    p = argparse.ArgumentParser(prog=f"python -m preprocess {stage}")
    importlib.import_module(f"preprocess.{stage}").add_arguments(p)
    ns = p.parse_args(argv)
    unknown = set(values) - set(vars(ns))
    if unknown:
        raise AssertionError(f"{stage} has no option(s) {sorted(unknown)}")
    for k, v in values.items():
        if v is not None:
            setattr(ns, k, v)
    return ns


def _needs_item_tokens(args: argparse.Namespace) -> bool:
    """Whether a task of the build asks for the item tokens (then the sid stage adds them)."""
    from mimigenrec.prompts import uses_item_tokens
    from preprocess.build import used_tasks

    return any(uses_item_tokens(t) for t in used_tasks(args.tasks, args.eval_tasks, args.rl_tasks))


def plan(args: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    """``[(stage, its arguments)]`` in the order they run."""
    o = ["--out_dir", args.out_dir]
    source = stage_namespace(args.source, o)
    for k in vars(source):
        setattr(source, k, getattr(args, k))  # all of them are options of `all` too
    steps = [(args.source, source),
             ("embed", stage_namespace("embed", o, encoder=args.encoder)),
             ("sid", stage_namespace("sid", o, method=args.sid_method, levels=args.levels,
                                     codebook_size=args.codebook_size, seed=args.seed,
                                     cf_weight=args.sid_cf_weight, item_tokens=_needs_item_tokens(args) or None))]
    llm = {"model": args.llm, "base_url": args.base_url, "api_model": args.api_model}
    if args.caption_backend:
        steps.append(("caption", stage_namespace("caption", [*o, "--backend", args.caption_backend], **llm)))
    if args.cot_backend:
        steps.append(("cot", stage_namespace("cot", [*o, "--backend", args.cot_backend], judge=args.judge,
                                             judge_model=args.judge_model, **llm)))
    steps.append(("build", stage_namespace(
        "build", o, dataset_dir=args.dataset_dir, seed=args.seed, cot_prob=args.cot_prob, tasks=args.tasks,
        eval_tasks=args.eval_tasks, rl_tasks=args.rl_tasks,
        name=args.name, sft_model=args.sft_model, reregister=args.reregister or None)))
    return steps


def run(args: argparse.Namespace) -> int:
    t_all = time.time()
    for stage, ns in plan(args):
        t0 = time.time()
        print(f"[all] {stage} ...", flush=True)
        rc = importlib.import_module(f"preprocess.{stage}").run(ns)
        if rc:
            print(f"[all] stage {stage} failed (exit {rc})")
            return rc
        print(f"[all] {stage} done in {time.time() - t0:.1f}s", flush=True)
    print(f"[all] finished in {time.time() - t_all:.1f}s: {args.out_dir}")
    return 0
