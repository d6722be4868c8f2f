"""What the confidence filter of the cot stage kept and dropped: ``python bench/cot_filter_stats.py O [O2 ...]``.

Reads ``O/cot.jsonl`` (rows of ``python -m preprocess cot``) and prints, per dataset, the rows written,
kept and dropped, and for each group the mean judge score and, for the likelihood judge, the mean
per-token log-probability of the target title with and without the reasoning (``logp_with`` /
``logp_without``) and their difference: the gain the kept reasoning brings and the loss the dropped
reasoning would have brought. Optionally ``--make_unfiltered DIR`` copies O's files needed by
``build`` to DIR with every CoT row marked kept, for the "no filter" arm of an ablation (the same
CoT text, the same rows, only the filter removed). The figures come last.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from mimigenrec.io import DataDir, iter_records


def summary(out_dir: str | Path) -> dict:
    """Counts and mean judge figures of the kept and the dropped rows of ``out_dir/cot.jsonl``."""
    d = DataDir(out_dir)
    if not d.cot.is_file():
        raise SystemExit(f"error: {d.cot}: missing: run python -m preprocess cot --out_dir {d.root} first")
    rows = [r for _, r in iter_records(d.cot)]
    res: dict = {"data_dir": str(d.root), "rows": len(rows)}
    for name, group in (("kept", [r for r in rows if r.get("kept")]), ("dropped", [r for r in rows if not r.get("kept")])):
        g: dict = {"n": len(group)}
        if group:
            g["score"] = round(statistics.fmean(float(r["score"]) for r in group), 4)
            lik = [r["judge_detail"]["likelihood"] for r in group
                   if isinstance(r.get("judge_detail", {}).get("likelihood"), dict)]
            if lik:
                w = statistics.fmean(x["logp_with"] for x in lik)
                wo = statistics.fmean(x["logp_without"] for x in lik)
                g.update(logp_with=round(w, 4), logp_without=round(wo, 4), gain=round(w - wo, 4))
            g["reasoning_words"] = round(statistics.fmean(len(str(r.get("reasoning", "")).split()) for r in group), 1)
        res[name] = g
    return res


def make_unfiltered(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src``'s items, interactions, captions and CoT to ``dst`` with every CoT row kept."""
    s, t = DataDir(src), DataDir(dst)
    t.root.mkdir(parents=True, exist_ok=True)
    for p in (s.items, s.users, s.captions, s.id2sid, s.new_tokens):
        if Path(p).is_file():
            shutil.copy2(p, t.root / Path(p).name)
    shutil.copytree(s.root / "inter", t.root / "inter", dirs_exist_ok=True)
    with open(t.cot, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({**r, "kept": True}, ensure_ascii=False) + "\n" for _, r in iter_records(s.cot))
    return t.root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dirs", nargs="+", help="preprocessed dataset dirs holding cot.jsonl")
    p.add_argument("--make_unfiltered", default=None, metavar="DIR",
                   help="copy the first dataset to DIR with every CoT row marked kept (default: off)")
    a = p.parse_args(argv)
    if a.make_unfiltered:
        print(f"unfiltered copy: {make_unfiltered(a.data_dirs[0], a.make_unfiltered)}", file=sys.stderr)
    for d in a.data_dirs:
        print(json.dumps(summary(d)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
