"""Decoding-time levers of one SFT checkpoint, measured on valid: how its 50 (or more) constrained
beams are ordered.

``python bench/ablations/beam_rerank.py --data_dir O --model M [--rows 0] [--beams 100]``

A diagnostic of the README, not a method. One beam search per valid row with ``--beams`` beams
(``mimigenrec.decoding.beam_search``, the evaluation's score), keeping each beam's per-level
answer log-probs. Printed, valid NDCG@10 / HR@10 / HR@50 with standard errors, for:

- ``raw@50`` / ``raw@B``: the evaluation's ranking at 50 beams and at ``--beams`` (beam-search
  pruning errors show as a difference);
- ``level w``: the beams reordered by ``sum_l w_l * logp_l`` (the weight of each SID level);
- ``pop beta``: the beams reordered by ``sum_l logp_l - beta * log(1 + popularity)``, popularity = the
  item's train interactions (a logit adjustment against popularity bias: the LLM's top 10 is more
  popular than SASRec's, ``mimigenrec.eval.strata``);
- ``history``: how often the target is a history item, and how many of the top-10 slots go to
  history items (repeats), with the hit rate of those slots.

``--mc_dropout K`` decodes with K dropout masks at once (the checkpoint K times in training mode, ranked
as one by ``mimigenrec.models.ensemble.EnsembleLM``): a one-model ensemble.

The settings are compared on the same rows; a reordering chosen here should be confirmed on a
disjoint row set (``--seed``) before it is believed. One JSON line at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def summarize(rows: list[dict], order) -> dict:
    """Mean NDCG@10, HR@10, HR@50 (and s.e. of NDCG@10) when each row's beams are sorted by ``order``."""
    from mimigenrec.eval.metrics import mean_se, row_metrics

    ms = [row_metrics([b["item"] for b in sorted(r["beams"], key=lambda b: -order(r, b))], r["target"], (10, 50))
          for r in rows]
    nd, se = mean_se([m["ndcg@10"] for m in ms])
    return {"ndcg@10": nd, "se": se, "hr@10": sum(m["hr@10"] for m in ms) / len(ms),
            "hr@50": sum(m["hr@50"] for m in ms) / len(ms)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="preprocessed dataset dir O")
    p.add_argument("--model", required=True, help="checkpoint")
    p.add_argument("--rows", type=int, default=0, help="seeded valid rows (0 = all; default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="seed of the row subset (default: %(default)s)")
    p.add_argument("--beams", type=int, default=100, help="beams per row (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per batch (default: %(default)s)")
    p.add_argument("--mc_dropout", type=int, default=0,
                   help="decode with this many dropout masks averaged (0 = the model as evaluated; default: %(default)s)")
    a = p.parse_args(argv)

    import torch
    from tqdm import tqdm
    from valid_ranker import valid_ranker

    from mimigenrec.decoding.beam_search import constrained_beam_search

    data, ranker = valid_ranker(a.data_dir, a.model, a.rows, a.seed, "beam_rerank")
    if a.mc_dropout:
        import copy

        from mimigenrec.models.ensemble import EnsembleLM

        torch.manual_seed(a.seed)
        ranker.model = EnsembleLM([copy.deepcopy(ranker.model) for _ in range(a.mc_dropout)])
        for m in ranker.model.members:
            m.train()  # dropout on: each member draws its own masks
    rows = []
    with torch.no_grad():
        for b in tqdm(range(0, len(data.rows), a.batch_size), desc="beams", unit="batch"):
            batch = data.rows[b:b + a.batch_size]
            enc = ranker.tok([ranker.prompt(r, None) for r in batch], return_tensors="pt", padding=True,
                             add_special_tokens=False)
            res = constrained_beam_search(ranker.model, enc["input_ids"], enc["attention_mask"], ranker.trie, a.beams)
            for j, r in enumerate(batch):
                beams = [{"item": int(i), "rank": k, "lp": [float(x) for x in res.token_logps[j, k] if x != 0.0]}
                         for k, i in enumerate(res.items[j].tolist()) if i >= 0]
                rows.append({"target": int(r["target"]), "history": [int(h) for h in r["history"]], "beams": beams})
    out: dict[str, object] = {"rows": len(rows), "beams": a.beams}
    out["raw@50"] = summarize([dict(r, beams=[x for x in r["beams"] if x["rank"] < 50]) for r in rows],
                              lambda r, x: -x["rank"])
    out[f"raw@{a.beams}"] = summarize(rows, lambda r, x: -x["rank"])
    for w in ([1, 1, 0.5], [1, 1, 0.75], [1, 0.75, 0.5], [0.75, 1, 1], [0.5, 1, 1], [1.25, 1, 1], [1, 1, 1.5]):
        out[f"level {w}"] = summarize(rows, lambda r, x, w=w: sum(wi * v for wi, v in zip(w, x["lp"])))
    from collections import Counter

    from mimigenrec.sequences import load_sequences

    pop = Counter(it for _, _, it in load_sequences(a.data_dir)[1].interactions(("train",)))
    for beta in (0.05, 0.1, 0.2, 0.3, 0.5):
        out[f"pop beta {beta}"] = summarize(rows, lambda r, x, b=beta: sum(x["lp"]) - b * math.log1p(pop[x["item"]]))
    in_hist = [r["target"] in set(r["history"]) for r in rows]
    slots = [(b["item"] in set(r["history"]), b["item"] == r["target"]) for r in rows for b in r["beams"][:10]]
    rep = [hit for h, hit in slots if h]
    out["history"] = {"target_in_history": sum(in_hist) / len(rows),
                      "top10_slots_on_history": len(rep) / len(slots),
                      "hit_rate_of_those_slots": sum(rep) / max(len(rep), 1),
                      "hit_rate_of_other_slots": sum(hit for h, hit in slots if not h) / max(len(slots) - len(rep), 1)}
    for k, v in out.items():
        if isinstance(v, dict):
            print(f"{k:>22}: " + "  ".join(f"{m} {x:.4f}" for m, x in v.items()))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
