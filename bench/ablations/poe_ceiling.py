"""How much a distillation teacher could pass on: valid NDCG@10 of product-of-experts rankers.

``python bench/ablations/poe_ceiling.py --data_dir O --model A [--model B ...] [--rows 1000] [--weights 0.5 1 2]``

A diagnostic of the README, not a method. Per valid row, the candidates are the first model's 50
constrained beams plus SASRec's 50 best items. Each candidate is scored by every model's summed
answer log-prob (``rewards.teacher.teacher_scores``, the score of beam search and of the
``teacher_kl`` reward) and by SASRec's log-softmax over the ranked items (``rewards.collaborative``'s
``cf_logp``: the SASRec that scores valid, stopped on held-out train rows). Printed: valid NDCG@10 /
HR@10 of the first model alone (equal to its beam search: its own beams hold its top 50), of the
models' mean log-prob (the ``teachers`` of ``teacher_kl``), of SASRec alone, and of
``mean + w * SASRec`` for each ``--weights`` w, the product of experts that ``teacher_kl + w
cf_logp`` distils. One JSON line at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def ndcg_hr(rows: list[dict], score) -> tuple[float, float]:
    """Mean NDCG@10 and HR@10 (``metrics.row_metrics``) when each row's candidates are ordered by
    ``score(candidate)``."""
    from mimigenrec.eval.metrics import row_metrics

    ms = [row_metrics([c["item"] for c in sorted(r["cands"], key=lambda c: -score(c))], r["target"], (10,))
          for r in rows]
    return sum(m["ndcg@10"] for m in ms) / len(ms), sum(m["hr@10"] for m in ms) / len(ms)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="preprocessed dataset dir O")
    p.add_argument("--model", action="append", required=True, help="checkpoint (repeatable; the first one's beams)")
    p.add_argument("--rows", type=int, default=1000, help="seeded valid rows (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="seed of the row subset (default: %(default)s)")
    p.add_argument("--beams", type=int, default=50, help="beams and SASRec items per row (default: %(default)s)")
    p.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="SASRec weights w (default: 0.5 1 2)")
    a = p.parse_args(argv)

    import torch
    from tqdm import tqdm
    from valid_ranker import valid_ranker

    from mimigenrec import prompts
    from mimigenrec.decoding.beam_search import constrained_beam_search
    from rewards.collaborative import _reward_model
    from rewards.teacher import teacher_scores

    data, ranker = valid_ranker(a.data_dir, a.model[0], a.rows, a.seed, "poe_ceiling")
    sasrec, _, universe = _reward_model(str(Path(a.data_dir).resolve()), None, "valid")
    sid = {i: prompts.sid_string(s) for i, s in data.id2sid.items()}
    col = {int(i): k for k, i in enumerate(universe)}
    out = []
    for b in tqdm(range(0, len(data.rows), 8), desc="poe", unit="batch"):
        rows = data.rows[b:b + 8]
        enc = ranker.tok([ranker.prompt(r, None) for r in rows], return_tensors="pt", padding=True,
                         add_special_tokens=False)
        beams = constrained_beam_search(ranker.model, enc["input_ids"], enc["attention_mask"], ranker.trie, a.beams)
        logp = sasrec.score_rows(rows)[:, universe].log_softmax(-1)
        msgs, comps, owner = [], [], []
        for j, r in enumerate(rows):
            top = universe[torch.topk(logp[j], a.beams).indices].tolist()
            cands = list(dict.fromkeys([i for i in beams.items[j].tolist() if i >= 0] + top))
            msgs += [ranker.messages(r, None)] * len(cands)
            comps += [sid[i] for i in cands]
            owner += [(j, i) for i in cands]
        llm = [teacher_scores(msgs, comps, [m]) for m in a.model]
        per_row = [{"target": int(r["target"]), "cands": []} for r in rows]
        for k, (j, i) in enumerate(owner):
            per_row[j]["cands"].append({"item": i, "llm": [s[k] for s in llm], "sasrec": float(logp[j, col[i]])})
        out += per_row
    res = {"rows": len(out), "first": ndcg_hr(out, lambda c: c["llm"][0]),
           "mean": ndcg_hr(out, lambda c: sum(c["llm"]) / len(c["llm"])), "sasrec": ndcg_hr(out, lambda c: c["sasrec"])}
    for w in a.weights:
        res[f"first+{w:g}sasrec"] = ndcg_hr(out, lambda c, w=w: c["llm"][0] + w * c["sasrec"])
        res[f"mean+{w:g}sasrec"] = ndcg_hr(out, lambda c, w=w: sum(c["llm"]) / len(c["llm"]) + w * c["sasrec"])
    for k, v in res.items():
        if k != "rows":
            print(f"{k:>18}: NDCG@10 {v[0]:.4f}  HR@10 {v[1]:.4f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
