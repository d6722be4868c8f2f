"""Time the amazon18 / amazon23 source stage on synthetic dumps of growing size (reviews/s, peak memory).

``python bench/bench_preprocess.py [--format amazon18|amazon23] [--sizes 100000,1000000] [--with_5m]
[--engines python,duckdb,polars] [--cleanup] [--gz] [--real_dir DIR --real_category C]``

For each size N it writes (once, cached in ``--work_dir``) a synthetic dump with N reviews
and N/10 items (``bench/synth_amazon18.py`` / ``synth_amazon23.py``), runs ``python -m preprocess
amazon18|amazon23`` on it in a child process and reports wall seconds, CPU seconds, reviews/s (by
wall and by CPU time: on a shared machine CPU time is the fairer figure), CPU seconds per million
reviews (constant = linear time) and the child's peak RSS. With ``--engines`` (amazon23 only) it also
times the part an engine could take over, reading the reviews into integer columns, with the stage's
own reader, DuckDB and Polars side by side (``bench/read_engines.py``; single-threaded unless
``--engine_threads``), on the sizes in ``--engine_sizes``. ``--cleanup`` deletes each dump after use.
The figures tables are printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synth_amazon18 import write_synthetic
from synth_amazon23 import write_synthetic23

FILES = {"amazon18": ("Synthetic_5.json", "meta_Synthetic.json"), "amazon23": ("Synthetic.jsonl", "meta_Synthetic.jsonl")}


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` from the repository root; return wall/CPU seconds, peak RSS (MB) and stdout.

    The child's output goes to temporary files (a pipe could fill up and block it)."""
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fo, stderr=fe)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(), fe.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"child failed ({code}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024, "out": out.strip()}


def run_stage(reviews: Path, meta: Path, out_dir: Path, extra: list[str], stage: str = "amazon18") -> dict:
    """Run the source stage in a child process; return wall/CPU seconds, peak RSS and its stats.json."""
    r = run_child([sys.executable, "-m", "preprocess", stage, "--reviews", str(reviews), "--meta", str(meta),
                   "--out_dir", str(out_dir), *extra])
    return {**r, "stats": json.loads((out_dir / "stats.json").read_text()), "summary": r["out"]}


def run_engine(engine: str, reviews: Path, threads: int, memory_limit: str) -> dict:
    """Time one engine reading ``reviews`` into integer columns (``bench/read_engines.py``)."""
    r = run_child([sys.executable, str(ROOT / "bench" / "read_engines.py"), engine, str(reviews), "--threads",
                   str(threads), "--memory_limit", memory_limit], env={"POLARS_MAX_THREADS": str(threads)})
    return {**r, **json.loads(r["out"].splitlines()[-1])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated review counts")
    p.add_argument("--with_5m", action="store_true", help="also run 5,000,000 reviews (~2 GB of JSON)")
    p.add_argument("--work_dir", default="/tmp/mimigenrec_bench", help="where dumps and outputs go")
    p.add_argument("--gz", action="store_true", help="benchmark .json.gz dumps")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic dumps")
    p.add_argument("--real_dir", default=None, help="also time a real Amazon-2018 folder (e.g. the shared one)")
    p.add_argument("--real_category", default="Industrial_and_Scientific", help="category of --real_dir")
    p.add_argument("--stage_args", default="", help="extra stage options, e.g. '--kcore 5 --split time'")
    p.add_argument("--format", choices=sorted(FILES), default="amazon18", help="dump format and source stage")
    p.add_argument("--engines", default="", help="amazon23: also time reading the reviews with these engines "
                                                 "(comma-separated: python,duckdb,polars)")
    p.add_argument("--engine_sizes", default="1000000,5000000", help="sizes on which --engines run")
    p.add_argument("--engine_threads", type=int, default=1, help="threads of duckdb / polars")
    p.add_argument("--duckdb_memory_limit", default="512MB", help="duckdb buffer pool limit (it spills beyond)")
    p.add_argument("--cleanup", action="store_true", help="delete each synthetic dump and output after use")
    a = p.parse_args(argv)
    if a.engines and a.format != "amazon23":
        p.error("--engines needs --format amazon23")
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if a.with_5m and 5_000_000 not in sizes:
        sizes.append(5_000_000)
    work = Path(a.work_dir)
    extra = a.stage_args.split()
    results, engine_rows = [], []
    engines = [e for e in a.engines.split(",") if e]
    engine_sizes = {int(x) for x in a.engine_sizes.split(",") if x}
    if a.real_dir:
        import importlib

        from preprocess.amazon18 import find_file

        mod = importlib.import_module(f"preprocess.{a.format}")
        rv = find_file(a.real_dir, a.real_category, mod.REVIEW_NAMES, "reviews")
        mt = find_file(a.real_dir, a.real_category, mod.META_NAMES, "meta")
        r = run_stage(rv, mt, work / f"out_{a.real_category}", extra, a.format)
        results.append((a.real_category, r["stats"]["raw_lines"], r))
        print(r["summary"], flush=True)
    for n in sizes:
        tag = "synth23" if a.format == "amazon23" else "synth"
        d = work / f"{tag}_{n}_{a.seed}{'_gz' if a.gz else ''}"
        sfx = ".gz" if a.gz else ""
        rv, mt = (d / (f + sfx) for f in FILES[a.format])
        if not (rv.is_file() and mt.is_file()):
            t = time.perf_counter()
            writer = write_synthetic23 if a.format == "amazon23" else write_synthetic
            writer(d, n, max(10, n // 10), seed=a.seed, gz=a.gz)
            print(f"wrote synthetic dump of {n} reviews in {time.perf_counter() - t:.1f}s", flush=True)
        out = work / f"out_{tag}_{n}"
        r = run_stage(rv, mt, out, extra, a.format)
        results.append((f"synthetic {n:,}", n, r))
        print(r["summary"], flush=True)
        for e in engines if n in engine_sizes else []:
            er = run_engine(e, rv, a.engine_threads, a.duckdb_memory_limit)
            engine_rows.append((n, e, er))
            print(f"engine {e} on {n:,}: {er['wall']:.1f}s wall, {er['cpu']:.1f}s CPU, {er['rss_mb']:.0f} MB", flush=True)
        if a.cleanup:
            import shutil

            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)

    print(f"\nload average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; orjson "
          f"{'yes' if _has_orjson() else 'no'}")
    print(f"{a.format} stage")
    print(f"{'dataset':>22} {'reviews':>10} {'stage s':>8} {'wall s':>8} {'CPU s':>7} {'rev/s (stage)':>14} "
          f"{'rev/s (CPU)':>12} {'CPU s/1M':>9} {'peak RSS MB':>12} {'B/review':>9}")
    for name, n, r in results:
        stage = r["stats"]["seconds"]["total"]
        print(f"{name:>22} {n:>10,} {stage:>8.2f} {r['wall']:>8.2f} {r['cpu']:>7.2f} {n / stage:>14,.0f} "
              f"{n / r['cpu']:>12,.0f} {1e6 * r['cpu'] / n:>9.2f} {r['rss_mb']:>12,.0f} "
              f"{r['rss_mb'] * 2 ** 20 / n:>9.0f}")
    if engine_rows:
        print(f"\nreading the reviews into integer columns ({a.engine_threads} thread(s); duckdb memory_limit "
              f"{a.duckdb_memory_limit})")
        print(f"{'reviews':>10} {'engine':>8} {'wall s':>8} {'CPU s':>7} {'CPU s/1M':>9} {'peak RSS MB':>12} "
              f"{'users':>9} {'items':>9}")
        for n, e, r in engine_rows:
            print(f"{n:>10,} {e:>8} {r['wall']:>8.2f} {r['cpu']:>7.2f} {1e6 * r['cpu'] / n:>9.2f} {r['rss_mb']:>12,.0f} "
                  f"{r['users']:>9,} {r['items']:>9,}")


def _has_orjson() -> bool:
    try:
        import orjson  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
