"""Ranking throughput: an item head (one forward pass per row scores every item) against trie-constrained
beam search over SIDs, on the same rows, through the evaluation's own rankers.

``python bench/bench_head.py --data_dir O --head HEAD_DIR --sid_model SID_DIR [--rows 300] [--batch_size 8]
[--num_beams 50]``

Prints rows/s by wall clock and by this process's CPU time (the CPU figure is the one to compare on a
busy machine), interleaving the two methods batch by batch so both see the same load. Model loading
is excluded. Any HF model with the dataset's SID tokens serves for the beam-search timing (its weights
do not change the work a 50-beam search over the whole trie does).
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--head", required=True, help="item-head folder (no reasoning, or set --think off)")
    ap.add_argument("--sid_model", required=True, help="SID model folder for constrained beam search")
    ap.add_argument("--rows", type=int, default=300, help="test rows (seeded subset)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--num_beams", type=int, default=50)
    a = ap.parse_args()

    from mimigenrec.eval import evaluate

    args = evaluate.build_parser().parse_args([
        "--data_dir", a.data_dir, "--split", "test", "--model", f"head={a.head}", "--model", f"beam={a.sid_model}",
        "--no_baselines", "--max_rows", str(a.rows), "--batch_size", str(a.batch_size),
        "--num_beams", str(a.num_beams), "--ks", f"1,{a.num_beams}"])
    args.methods = [f"model:{a.head}", f"model:{a.sid_model}"]
    data = evaluate.load_eval_data(args)
    rankers = {n: evaluate.build_ranker(n, f"model:{p}", data, args, evaluate.Dist(), "cpu")
               for n, p in (("head", a.head), ("beam", a.sid_model))}
    batches = evaluate.plan_batches(rankers["head"], data.rows, a.batch_size)
    wall = dict.fromkeys(rankers, 0.0)
    cpu = dict.fromkeys(rankers, 0.0)
    for idx in batches:
        rows = [data.rows[i] for i in idx]
        for name, r in rankers.items():
            w0, c0 = time.perf_counter(), time.process_time()
            r.predict(rows, None)
            wall[name] += time.perf_counter() - w0
            cpu[name] += time.process_time() - c0
    n = len(data.rows)
    out = {name: {"rows_per_s_wall": round(n / wall[name], 1), "rows_per_cpu_s": round(n / cpu[name], 1)}
           for name in rankers}
    out["speedup_wall"] = round(wall["beam"] / wall["head"], 1)
    out["speedup_cpu"] = round(cpu["beam"] / cpu["head"], 1)
    print(json.dumps({"rows": n, "batch_size": a.batch_size, "num_beams": a.num_beams, **out}))


if __name__ == "__main__":
    main()
