"""Run every stage in order: source (amazon18|movielens) -> embed -> sid -> [caption] -> [cot] -> build.

Example: python -m preprocess all --source amazon18 --raw_dir R --category C --out_dir O
Each stage is skipped or resumed by its own cache rules, so re-running continues where a
run stopped. Captions and CoT run only when their backend is given.
"""
from __future__ import annotations

import argparse
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=["amazon18", "movielens"], required=True, help="raw log format")
    p.add_argument("--raw_dir", required=True, help="directory of the raw files")
    p.add_argument("--category", help="Amazon category name (amazon18 only), e.g. Industrial_and_Scientific")
    p.add_argument("--out_dir", required=True, help="output dataset directory O")
    p.add_argument("--kcore", type=int, default=0, help="iterative user/item k-core (0 = off)")
    p.add_argument("--split", choices=["loo", "time"], default="loo",
                   help="leave-one-out per user, or global-time 8:1:1")
    p.add_argument("--max_history", type=int, default=10, help="at most this many history items per row")
    p.add_argument("--encoder", default="minilm", help="embed: 'minilm' or a local HF causal-LM directory")
    p.add_argument("--sid_method", default="rqkmeans_balanced", help="sid: rqkmeans | rqkmeans_balanced")
    p.add_argument("--levels", type=int, default=3, help="sid: residual levels")
    p.add_argument("--codebook_size", type=int, default=256, help="sid: codes per level")
    p.add_argument("--caption_backend", choices=["hf", "http"], help="caption images with this backend (off if unset)")
    p.add_argument("--cot_backend", choices=["hf", "http", "none"], help="build CoT with this backend (off if unset)")
    p.add_argument("--llm", help="model path (hf backends) for caption/cot")
    p.add_argument("--base_url", help="OpenAI-compatible endpoint (http backends)")
    p.add_argument("--api_model", help="model name at the endpoint (http backends)")
    p.add_argument("--tasks", help="build: SFT training tasks (default: build's default)")
    p.add_argument("--cot_prob", type=float, default=0.0, help="build: fraction of eligible rows carrying CoT")
    p.add_argument("--name", help="build: dataset name in dataset_info.json (default: basename of out_dir)")
    p.add_argument("--dataset_dir", default="data", help="build: LLaMA-Factory dataset_dir to register in")
    p.add_argument("--seed", type=int, default=42, help="seed for SIDs, sampling and CoT mixing")


def _opt(flag: str, value) -> list[str]:
    return [] if value is None else [flag, str(value)]


def run(args: argparse.Namespace) -> int:
    from preprocess.__main__ import main

    o = ["--out_dir", args.out_dir]
    src = ["--raw_dir", args.raw_dir, "--kcore", str(args.kcore), "--split", args.split,
           "--max_history", str(args.max_history)]
    if args.source == "amazon18":
        if not args.category:
            raise SystemExit("error: --category is required with --source amazon18")
        src += ["--category", args.category]
    plan = [[args.source, *o, *src],
            ["embed", *o, "--encoder", args.encoder],
            ["sid", *o, "--method", args.sid_method, "--levels", str(args.levels),
             "--codebook_size", str(args.codebook_size), "--seed", str(args.seed)]]
    llm = [*_opt("--model", args.llm), *_opt("--base_url", args.base_url), *_opt("--api_model", args.api_model)]
    if args.caption_backend:
        plan.append(["caption", *o, "--backend", args.caption_backend, *llm])
    if args.cot_backend:
        plan.append(["cot", *o, "--backend", args.cot_backend, *llm])
    plan.append(["build", *o, "--dataset_dir", args.dataset_dir, "--seed", str(args.seed),
                 "--cot_prob", str(args.cot_prob), *_opt("--tasks", args.tasks), *_opt("--name", args.name)])
    t_all = time.time()
    for argv in plan:
        t0 = time.time()
        print(f"[all] {argv[0]} ...", flush=True)
        rc = main(argv)
        if rc:
            print(f"[all] stage {argv[0]} failed (exit {rc})")
            return rc
        print(f"[all] {argv[0]} done in {time.time() - t0:.1f}s", flush=True)
    print(f"[all] finished in {time.time() - t_all:.1f}s: {args.out_dir}")
    return 0
