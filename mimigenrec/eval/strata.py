"""Where each method wins and loses: its metrics on the rows of each target-popularity group and on
the repeat rows, from the predictions of one ``evaluate.sh`` call.

``python -m mimigenrec.eval.strata EVAL_DIR [--metric hr@10 --metric ndcg@10] [--groups 4] [--json]``

The rows of the call (every method scored on the same rows) are split into:

- ``repeat``: the target is one of the user's earlier items (any of them, not only the prompt's window);
- the other rows in ``--groups`` groups of about equal size by the target's popularity: its number of
  interactions in the splits known before the evaluated one (train; + valid for test: what the
  popularity baseline counts). Equal counts stay in one group, so the groups are contiguous count ranges.

Beside them, each method's **popularity of its top 10**: the mean popularity of the items it ranks in
the first 10 places, a reading of popularity bias (a method that recommends the head scores high). The
dataset and split come from the call's ``metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mimigenrec.eval.compare import predictions
from mimigenrec.eval.metrics import per_row
from mimigenrec.io import BadInputError, cli_errors, read_json
from mimigenrec.sequences import load_sequences, splits_before

__all__ = ["main", "popularity_groups", "strata", "strata_table"]

REPEAT = "repeat"


def popularity_groups(counts: dict[str, int], groups: int) -> list[tuple[int, int, list[str]]]:
    """Rows (``key -> popularity``) cut into ``groups`` contiguous popularity ranges of about equal size;
    ``[(lowest, highest, keys), ...]`` in ascending order (fewer groups when ties leave too few values)."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    by_value: dict[int, list[str]] = {}
    for key, c in counts.items():
        by_value.setdefault(c, []).append(key)
    out: list[tuple[int, int, list[str]]] = []
    cur: list[str] = []
    lo = None
    done = 0
    for c in sorted(by_value):
        lo = c if lo is None else lo
        cur += by_value[c]
        # close the group once it holds its share of the rows left for the groups still to fill
        if len(out) < groups - 1 and len(cur) >= (len(counts) - done) / (groups - len(out)):
            out.append((lo, c, sorted(cur)))
            done += len(cur)
            cur, lo = [], None
    if cur:
        out.append((lo, max(counts[k] for k in cur), sorted(cur)))
    return out


def strata(eval_dir: str | Path, metrics: Sequence[str] = ("hr@10", "ndcg@10"), groups: int = 4,
           data_dir: str | Path | None = None) -> dict:
    """Each method's ``metrics`` on the repeat rows and on each popularity group of the other rows, and the
    popularity of its top 10 (see the module doc). ``data_dir`` overrides the one the call recorded."""
    eval_dir = Path(eval_dir)
    recorded = read_json(eval_dir / "metrics.json")
    meta = recorded.get("_meta", {})
    methods = [m for m in recorded if m != "_meta"]
    data_dir = data_dir or meta.get("data_dir")
    split = meta.get("split")
    if not data_dir or not split:
        raise BadInputError(f"{eval_dir / 'metrics.json'}: _meta lacks data_dir / split: give --data_dir")
    _, seqs = load_sequences(data_dir)
    pop = Counter(item for _, _, item in seqs.interactions(splits_before(split)))
    preds = {m: predictions(eval_dir, m) for m in methods}
    values = {m: {k: per_row(preds[m], k) for k in metrics} for m in methods}
    rows = {f"{int(p['user_id'])}:{int(p['position'])}": p for p in preds[methods[0]]}
    for m in methods[1:]:
        if values[m][metrics[0]].keys() != rows.keys():
            raise BadInputError(f"{eval_dir}: {methods[0]} and {m} were scored on different rows: "
                                "evaluate them in one call")
    repeat = [k for k, p in rows.items() if p["target"] in set(seqs.prefix(p["user_id"], p["position"]))]
    repeats = set(repeat)
    rest = {k: pop[p["target"]] for k, p in rows.items() if k not in repeats}

    def group(name: str, keys: list[str], lo: int | None = None, hi: int | None = None) -> dict:
        return {"name": name, "rows": len(keys), "popularity": None if lo is None else [lo, hi],
                "metrics": {m: {k: sum(values[m][k][r] for r in keys) / len(keys) if keys else None
                                for k in metrics} for m in methods}}

    out = [group(REPEAT, repeat)]
    out += [group(f"popularity {lo}-{hi}" if lo != hi else f"popularity {lo}", keys, lo, hi)
            for lo, hi, keys in popularity_groups(rest, groups)]
    top10 = {m: sum(pop[i] for p in preds[m] for i in p["ranked"][:10]) / max(sum(len(p["ranked"][:10])
                                                                                  for p in preds[m]), 1)
             for m in methods}
    return {"eval_dir": str(eval_dir), "split": split, "rows": len(rows), "metrics": list(metrics),
            "popularity_counts": list(splits_before(split)), "groups": out, "top10_popularity": top10}


def strata_table(res: dict) -> str:
    """Markdown: per metric, a line per method with its value on each group, and its top-10 popularity."""
    groups = res["groups"]
    cols = [f"{g['name']} ({g['rows']} rows)" for g in groups]
    out = []
    for k in res["metrics"]:
        out += [f"| {k.upper()} | " + " | ".join(cols) + " | top-10 popularity |", "|---" * (len(cols) + 2) + "|"]
        for m, top in res["top10_popularity"].items():
            cells = [f"{g['metrics'][m][k]:.4f}" if g["metrics"][m][k] is not None else "-" for g in groups]
            out.append(f"| {m} | " + " | ".join(cells) + f" | {top:.1f} |")
        out.append("")
    out.append("Popularity = interactions in " + " + ".join(res["popularity_counts"]) + "; top-10 popularity = the "
               "mean popularity of the items a method ranks first to tenth.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimigenrec.eval.strata", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("eval_dir", help="output dir of one evaluate.sh call (metrics.json + predictions_<method>.jsonl)")
    p.add_argument("--metric", action="append", help="hr@K or ndcg@K, repeatable (default: hr@10 and ndcg@10)")
    p.add_argument("--groups", type=int, default=4,
                   help="popularity groups of the non-repeat rows, about equal in size (default: %(default)s)")
    p.add_argument("--data_dir", help="the preprocessed dataset (default: the one the call's metrics.json names)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    a = p.parse_args(argv)

    def run() -> None:
        res = strata(a.eval_dir, a.metric or ("hr@10", "ndcg@10"), a.groups, a.data_dir)
        print(json.dumps(res) if a.json else strata_table(res))

    return cli_errors(run)


if __name__ == "__main__":
    sys.exit(main())
