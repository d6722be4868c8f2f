"""Time the amazon18 source stage on synthetic dumps of growing size (reviews/s, peak memory).

``python bench/bench_preprocess.py [--sizes 100000,1000000] [--with_5m] [--gz] [--real_dir DIR --real_category C]``

For each size N it writes (once, cached in ``--work_dir``) a synthetic dump with N reviews
and N/10 items (``bench/synth_amazon18.py``), runs ``python -m preprocess amazon18`` on it
in a child process and reports wall seconds, CPU seconds, reviews/s (by wall and by CPU
time: on a shared machine CPU time is the fairer figure) and the child's peak RSS.
The figures table is printed last.
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

from synth_amazon18 import write_synthetic  # noqa: E402


def run_stage(reviews: Path, meta: Path, out_dir: Path, extra: list[str]) -> dict:
    """Run the stage in a child process; return wall/CPU seconds, peak RSS and its stats.json."""
    cmd = [sys.executable, "-m", "preprocess", "amazon18", "--reviews", str(reviews), "--meta", str(meta),
           "--out_dir", str(out_dir), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"stage failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    stats = json.loads((out_dir / "stats.json").read_text())
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024, "stats": stats,
            "summary": out.strip()}


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
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if a.with_5m and 5_000_000 not in sizes:
        sizes.append(5_000_000)
    work = Path(a.work_dir)
    extra = a.stage_args.split()
    results = []
    if a.real_dir:
        from preprocess.amazon18 import META_NAMES, REVIEW_NAMES, find_file

        rv = find_file(a.real_dir, a.real_category, REVIEW_NAMES, "reviews")
        mt = find_file(a.real_dir, a.real_category, META_NAMES, "meta")
        r = run_stage(rv, mt, work / f"out_{a.real_category}", extra)
        results.append((a.real_category, r["stats"]["raw_lines"], r))
        print(r["summary"], flush=True)
    for n in sizes:
        d = work / f"synth_{n}_{a.seed}{'_gz' if a.gz else ''}"
        sfx = ".gz" if a.gz else ""
        rv, mt = d / f"Synthetic_5.json{sfx}", d / f"meta_Synthetic.json{sfx}"
        if not (rv.is_file() and mt.is_file()):
            t = time.perf_counter()
            write_synthetic(d, n, max(10, n // 10), seed=a.seed, gz=a.gz)
            print(f"wrote synthetic dump of {n} reviews in {time.perf_counter() - t:.1f}s", flush=True)
        r = run_stage(rv, mt, work / f"out_{n}", extra)
        results.append((f"synthetic {n:,}", n, r))
        print(r["summary"], flush=True)

    print(f"\nload average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; orjson "
          f"{'yes' if _has_orjson() else 'no'}")
    print(f"{'dataset':>22} {'reviews':>10} {'stage s':>8} {'wall s':>8} {'CPU s':>7} {'rev/s (stage)':>14} "
          f"{'rev/s (CPU)':>12} {'peak RSS MB':>12}")
    for name, n, r in results:
        stage = r["stats"]["seconds"]["total"]
        print(f"{name:>22} {n:>10,} {stage:>8.2f} {r['wall']:>8.2f} {r['cpu']:>7.2f} {n / stage:>14,.0f} "
              f"{n / r['cpu']:>12,.0f} {r['rss_mb']:>12,.0f}")


def _has_orjson() -> bool:
    try:
        import orjson  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
