"""Paired comparison of two methods scored by one ``evaluate.sh`` call: the change of a metric
over the same rows, with a percentile bootstrap interval.

``python -m mimigenrec.eval.compare EVAL_DIR BASE NEW [--metric ndcg@10] [--n_boot 10000] [--seed 0]``
reads ``EVAL_DIR/predictions_<BASE>.jsonl`` and ``predictions_<NEW>.jsonl`` and prints one JSON
object: ``delta`` (mean of NEW - BASE per row), ``lo`` / ``hi`` (95% interval), ``rel``
(delta / BASE's mean) and the row count. Both files must hold the same rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Collection
from pathlib import Path

from mimigenrec.eval.metrics import paired_bootstrap, per_row
from mimigenrec.io import BadInputError, cli_errors, iter_records

__all__ = ["compare", "main", "predictions"]


def predictions(eval_dir: Path, method: str) -> list[dict]:
    """The prediction rows ``evaluate.sh`` wrote for ``method`` into ``eval_dir`` (missing: a clear error)."""
    from mimigenrec.eval.evaluate import pred_path

    path = pred_path(eval_dir, method)
    if not path.is_file():
        raise BadInputError(f"{path}: missing: evaluate {method!r} into {eval_dir} first")
    return [rec for _, rec in iter_records(path, strict=True)]


def _rows(eval_dir: Path, method: str, metric: str) -> dict[str, float]:
    return per_row(predictions(eval_dir, method), metric)


def compare(eval_dir: str | Path, base: str, new: str, metric: str = "ndcg@10", n_boot: int = 10000,
            seed: int = 0, users: Collection[int] | None = None) -> dict:
    """``paired_bootstrap`` of ``metric`` for ``new`` against ``base`` over their common rows (which must be all),
    or over the rows of ``users`` only."""
    a, b = _rows(Path(eval_dir), base, metric), _rows(Path(eval_dir), new, metric)
    if a.keys() != b.keys():
        raise BadInputError(f"{eval_dir}: {base} and {new} were scored on different rows "
                            f"({len(a)} vs {len(b)}, {len(a.keys() ^ b.keys())} differ): evaluate them in one call")
    keys = sorted(a)
    if users is not None:   # row keys are "user:position"
        wanted = {int(u) for u in users}
        keys = [k for k in keys if int(k.split(":", 1)[0]) in wanted]
        if not keys:
            raise BadInputError(f"{eval_dir}: none of the {len(wanted)} users given has a row")
        a, b = {k: a[k] for k in keys}, {k: b[k] for k in keys}
    out = paired_bootstrap([a[k] for k in keys], [b[k] for k in keys], n_boot=n_boot, seed=seed)
    return {"metric": metric, "base": base, "new": new, "base_mean": sum(a.values()) / len(a),
            "new_mean": sum(b.values()) / len(b), **out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimigenrec.eval.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("eval_dir", help="output dir of one evaluate.sh call holding both methods' predictions")
    p.add_argument("base", help="method name of the reference (e.g. tiny_sft)")
    p.add_argument("new", help="method name compared against it (e.g. tiny_grpo)")
    p.add_argument("--metric", default="ndcg@10", help="hr@K or ndcg@K (default: %(default)s)")
    p.add_argument("--n_boot", type=int, default=10000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    a = p.parse_args(argv)
    return cli_errors(lambda: print(json.dumps(compare(a.eval_dir, a.base, a.new, a.metric, a.n_boot, a.seed))))


if __name__ == "__main__":
    sys.exit(main())
