"""Choose an SFT run's checkpoint by held-out ranking quality, not by the last step or the loss.

``python -m mimigenrec.eval.select_checkpoint --data_dir O --run_dir DIR [--run_dir DIR2 ...] [--max_rows 1000]``

Every ``DIR/checkpoint-<step>`` (e.g. one per epoch, LLaMA-Factory ``save_strategy: epoch``)
is scored by the evaluation itself (:mod:`mimigenrec.eval.evaluate`: constrained beam search, the
same prompts and score as ``evaluate.sh``) on a seeded subset of ``--split`` rows (never
test), into ``DIR/selection/<checkpoint>/``. The checkpoint with the highest ``--metric``
(the earliest of equals) wins: its model files are copied over ``DIR``'s own, so ``DIR`` is
the model to use, and ``DIR/checkpoint_selection.json`` lists every checkpoint's figure with
its standard error. Several ``--run_dir`` (e.g. the same SFT with other seeds) are one pool:
every checkpoint of every run is scored on the same rows and the best is copied over the FIRST
run dir; its record names the run (``selected``: ``<run>/<checkpoint>``) and gives ``ensemble``: the winner
plus every other run's best checkpoint, joined by ``+`` (``evaluate.sh --model NAME=<ensemble>`` ranks by
their mean log-probability, :mod:`mimigenrec.models.ensemble`). LLaMA-Factory's valid loss is no substitute here: with
``train_on_prompt`` it is dominated by the history tokens, which are training interactions.

Re-running reuses the evaluations whose checkpoint is unchanged (evaluate's own fingerprints).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from mimigenrec.eval.metrics import mean_se, per_row
from mimigenrec.io import BadInputError, cli_errors, iter_records
from mimigenrec.prompts import SEQ_TASKS, TASKS

__all__ = ["checkpoints", "main", "select"]

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# trainer state lives beside the weights in a checkpoint; only the model's own files are copied
_NOT_MODEL = {"trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"}


def checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders of ``run_dir`` by step; ``[run_dir]`` when there are none."""
    found = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name)))
    if found:
        return [p for _, p in found]
    if (run_dir / "config.json").is_file():
        return [run_dir]
    raise BadInputError(f"{run_dir}: no checkpoint-<step> folders and no model: is it a training output_dir?")


def _model_files(ckpt: Path) -> list[Path]:
    return [f for f in ckpt.iterdir() if f.is_file() and f.name not in _NOT_MODEL and not f.name.startswith("rng_state")]


def select(data_dir: str | Path, run_dir: str | Path | list[str | Path], split: str = "valid", max_rows: int = 1000,
           metric: str = "ndcg@10", num_beams: int = 50, batch_size: int = 32, seed: int = 0,
           task: str = "sid_seq") -> dict:
    """Score every checkpoint of ``run_dir`` (one or several runs), copy the best over the first run
    dir; returns the selection record."""
    from mimigenrec.eval import evaluate

    if split == "test":
        raise BadInputError("select_checkpoint: --split test would choose the model on the rows it is reported on; "
                            "use valid")
    if not re.fullmatch(r"(hr|ndcg)@\d+", metric):
        raise BadInputError(f"select_checkpoint: --metric {metric!r}: expected hr@K or ndcg@K")
    runs = [Path(r) for r in (run_dir if isinstance(run_dir, (list, tuple)) else [run_dir])]
    for run in runs:
        if not run.is_dir():
            raise BadInputError(f"{run}: not a folder: give the SFT output_dir")
    pool = [(run, ckpt) for run in runs for ckpt in checkpoints(run)]
    scores = []
    for run, ckpt in pool:
        out = run / "selection" / ckpt.name
        rc = evaluate.main(["--data_dir", str(data_dir), "--split", split, "--model", f"{ckpt.name}={ckpt}",
                            "--no_baselines", "--task", task, "--ks", metric.split("@")[1], "--max_rows", str(max_rows), "--seed", str(seed), "--num_beams",
                            str(num_beams), "--batch_size", str(batch_size), "--output_dir", str(out), "--quiet"])
        if rc:
            raise BadInputError(f"{ckpt}: evaluation failed (exit {rc}); see the message above")
        rows = per_row([r for _, r in iter_records(evaluate.pred_path(out, ckpt.name), strict=True)], metric)
        m, se = mean_se(list(rows.values()))
        name = ckpt.name if len(runs) == 1 else f"{run.name}/{ckpt.name}"
        scores.append({"checkpoint": name, metric: m, f"{metric}_se": se, "rows": len(rows)})
        print(f"[select] {name}: {split} {metric} {m:.4f} ± {se:.4f} ({len(rows)} rows)", flush=True)
    def best_of(indices) -> int:  # the highest metric, the earliest of equals
        return max(indices, key=lambda i: (scores[i][metric], -i))

    best = best_of(range(len(scores)))
    dest, src = runs[0], pool[best][1]
    if src != dest:
        for f in _model_files(src):
            shutil.copy2(f, dest / f.name)
    record = {"selected": scores[best]["checkpoint"], "metric": f"{split} {metric}", "max_rows": max_rows,
              "seed": seed, "num_beams": num_beams, "checkpoints": scores}
    if len(runs) > 1:
        from mimigenrec.models.ensemble import SEPARATOR

        record["runs"] = [str(r) for r in runs]
        # the winner (now in the first run dir) and every other run's own best: evaluate.sh --model NAME=<this>
        others = [best_of(i for i, (r, _) in enumerate(pool) if r == run) for run in runs if run != pool[best][0]]
        record["ensemble"] = SEPARATOR.join([str(dest)] + [str(pool[i][1]) for i in others])
    (dest / "checkpoint_selection.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[select] kept {scores[best]['checkpoint']} ({split} {metric} {scores[best][metric]:.4f}): "
          f"{dest} holds its weights", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimigenrec.eval.select_checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="preprocessed dataset dir the model was trained on")
    p.add_argument("--run_dir", required=True, action="append",
                   help="SFT output_dir holding checkpoint-<step> folders; repeat to choose across runs (e.g. "
                        "seeds): the winner is copied over the first")
    p.add_argument("--split", default="valid", choices=("valid",), help="rows scored (default: %(default)s)")
    p.add_argument("--max_rows", type=int, default=1000,
                   help="seeded subset of the split (0 = all; default: %(default)s)")
    p.add_argument("--metric", default="ndcg@10", help="hr@K or ndcg@K to maximise (default: %(default)s)")
    p.add_argument("--num_beams", type=int, default=50, help="beams of the ranking (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=32, help="prompts per forward batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row subset (default: %(default)s)")
    p.add_argument("--task", default="sid_seq", choices=[t for t in SEQ_TASKS if TASKS[t]["answer"] == "sid"],
                   help="the prompt the model was trained on (evaluate.sh --task; default: %(default)s)")
    a = p.parse_args(argv)
    return cli_errors(lambda: select(a.data_dir, a.run_dir, a.split, a.max_rows, a.metric, a.num_beams,
                                     a.batch_size, a.seed, a.task) and 0)


if __name__ == "__main__":
    sys.exit(main())
