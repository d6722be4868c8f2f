"""Seconds per GRPO batch of the teacher rewards' scoring: prefill once per prompt vs re-encode per beam.

``python bench/bench_teacher.py --data_dir O [--teacher DIR] [--prompts 8] [--beams 16] [--repeats 7]``

``rewards.teacher.teacher_scores`` prefills each distinct prompt once per teacher and runs the beams
from a copy of its cache. The baseline, measured in the same run on the same batches, is the plain
way: every (prompt + beam) row left-padded and run through the model in full, the prompt encoded
once per beam. Batches are the default recipe's (``examples/rl/tiny_teacher.yaml``: 8 prompts x 16
beams): consecutive train prompts of ``O/rl/train.json``, each with 16 seeded random items' SIDs as
completions. The teacher is ``--teacher`` (e.g. an SFT checkpoint) or, when not given, a random
tiny backbone of the default recipe's shape (4 layers x 128) built from ``O``; the speed of a
forward pass does not depend on what the weights have learnt. The two scorers must agree to 1e-4
on every row. Reports the median seconds over ``--repeats`` batches (the first is warm-up) and
their ratio; one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def reencode_scores(prompts: list, completions: list, teachers: list[str]) -> list[float]:
    """The baseline: each (prompt + completion + EOS) row run through every teacher in full."""
    import torch

    from rewards.teacher import _padded, teacher_models, token_ids

    tok, models = teacher_models(tuple(teachers))
    P, C = token_ids(tok, prompts, completions)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, att = _padded([p + c for p, c in zip(P, C)], pad, left=True)
    answer = torch.zeros_like(att, dtype=torch.bool)
    for i, c in enumerate(C):
        answer[i, ids.shape[1] - len(c):] = True
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    total = torch.zeros(len(P))
    with torch.no_grad():
        for m in models:
            lp = m(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, :-1].float().log_softmax(-1)
            total += (lp.gather(-1, ids[:, 1:, None])[..., 0] * answer[:, 1:]).sum(1)
    return (total / len(models)).tolist()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", required=True, help="preprocessed dataset folder O (needs rl/train.json, id2sid.json)")
    ap.add_argument("--teacher", default=None, help="teacher checkpoint (default: a random 4x128 tiny backbone)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per batch (default: 8, the recipe's)")
    ap.add_argument("--beams", type=int, default=16, help="completions per prompt (default: 16, the recipe's)")
    ap.add_argument("--repeats", type=int, default=7, help="batches timed per scorer, first = warm-up (default: 7)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts' offsets and the items (default: 0)")
    args = ap.parse_args(argv)

    import torch

    from mimigenrec.io import DataDir
    from mimigenrec.rl.train_grpo import load_rl_rows
    from rewards.teacher import teacher_scores

    dd = DataDir(args.data_dir)
    rows = load_rl_rows(dd.rl("train"))
    id2sid = dd.load_id2sid()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.teacher
        if teacher is None:
            from mimigenrec.models.backbones import main as backbones

            teacher = str(Path(tmp) / "tiny")
            backbones(["tiny", "--out", teacher, "--data_dir", str(dd.root), "--add_sid_tokens",
                       "--hidden_size", "128", "--num_layers", "4"])
        batches = []
        for _ in range(args.repeats):
            start = rng.randrange(max(1, len(rows) - args.prompts))
            group = rows[start:start + args.prompts]
            items = list(id2sid)
            batches.append(([r["prompt"] for r in group for _ in range(args.beams)],
                            ["".join(id2sid[rng.choice(items)]) for _ in group for _ in range(args.beams)]))
        times: dict[str, list[float]] = {"prefill_once": [], "reencode": []}
        worst = 0.0
        for ps, cs in batches:
            got = {}
            for name, fn in (("prefill_once", teacher_scores), ("reencode", reencode_scores)):
                t0 = time.perf_counter()
                got[name] = fn(ps, cs, [teacher])
                times[name].append(time.perf_counter() - t0)
            worst = max(worst, float((torch.tensor(got["prefill_once"]) - torch.tensor(got["reencode"])).abs().max()))
        if worst > 1e-4:
            raise SystemExit(f"the two scorers disagree by {worst:.2e} (> 1e-4)")
        med = {k: statistics.median(v[1:] or v) for k, v in times.items()}
        print(json.dumps({"batch": f"{args.prompts}x{args.beams}", "teacher": args.teacher or "random tiny 4x128",
                          "threads": torch.get_num_threads(), "median_s": med,
                          "speedup": round(med["reencode"] / med["prefill_once"], 2), "max_abs_diff": worst}))


if __name__ == "__main__":
    main()
