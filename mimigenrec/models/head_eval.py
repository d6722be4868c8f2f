"""``HeadRanker``: :mod:`mimigenrec.eval.evaluate` ranks every item with an item head in one forward pass per row.

``evaluate.sh --model head=DIR`` picks it for any folder holding ``item_head.json``. Rows and prompts
are those of the other methods (the head's ``task`` prompt from :mod:`mimigenrec.prompts`); a head
trained with reasoning (RecPO, ``reasoning: true``), or ``--think``, first writes its reasoning
greedily (``max_reasoning_tokens``; ``--max_new_tokens`` with ``--think``) and is then scored after it.
Full ranking scores every item that appears in the interactions (the evaluation's universe) and keeps
the top ``--num_beams``, like the beam search keeps its beams; candidate ranking (``--task cand_rank``)
scores the row's candidates. The prompt is always the head's own (``sid_seq`` or ``title_seq2sid``).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from mimigenrec.eval.evaluate import EvalData, Ranker
from mimigenrec.eval.metrics import rank_by_score
from mimigenrec.io import DataDir, bad, check_model_dir
from mimigenrec.models.item_head import ItemHeadModel, user_prompt

__all__ = ["HeadRanker"]


class HeadRanker(Ranker):
    """An item-head folder as an evaluation method (see the module docstring)."""

    def __init__(self, name: str, path: str, data: EvalData, args: argparse.Namespace, device: str) -> None:
        self.name, self.path, self.data, self.args = name, path, data, args
        if args.task not in ("sid_seq", "title_seq2sid", "cand_rank"):
            raise bad(path, f"an item head ranks items, not task {args.task!r}",
                      "evaluate it with --task sid_seq (full ranking) or cand_rank")
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        self.head = ItemHeadModel.from_pretrained(check_model_dir(path), device=device, dtype=dtype).eval()
        cfg = self.head.cfg
        # candidate ranking loads no SIDs, but the head's sid_seq prompt shows them
        self.id2sid = data.id2sid if data.id2sid is not None or cfg.task != "sid_seq" else DataDir(data.data_dir).load_id2sid()
        missing = [i for i in data.universe if i not in self.head.col_of]
        if missing:
            raise bad(path, f"the head has no embedding for {len(missing)} ranked item(s), e.g. {missing[:5]}",
                      "warm up a head on this dataset (python -m mimigenrec.models.head_train)")
        if cfg.task == "sid_seq":
            from mimigenrec.launch import check_sid_tokens

            tokens = sorted({t for i in data.universe for t in self.id2sid[i]})
            check_sid_tokens(self.head.tokenizer.get_vocab(), tokens, path, data.data_dir)
        self.cols = torch.tensor([self.head.col_of[i] for i in data.universe], dtype=torch.long, device=device)
        self.think = bool(args.think or cfg.reasoning)
        self.budget = args.max_new_tokens if args.think else cfg.max_reasoning_tokens

    def sort_key(self, row: dict) -> int:
        return -len(row["history"])

    def prompt(self, row: dict) -> str:
        d = self.data
        return user_prompt(self.head.tokenizer, self.head.cfg.task, row["history"], d.items, self.id2sid, d.captions)

    @torch.no_grad()
    def predict(self, rows: Sequence[dict], cands: Sequence[list[int]] | None) -> list[dict]:
        head = self.head
        prompts = [head.user_tokens(self.prompt(r))[:-1] for r in rows]  # without the marker
        reasoning = head.reason(prompts, self.budget, batch_size=len(prompts)) if self.think else [[] for _ in rows]
        users = head.encode([p + z + [head.marker_id] for p, z in zip(prompts, reasoning)], batch_size=len(rows))
        scores = head.scores(users)
        if cands is None:
            ranked = rank_by_score(scores[:, self.cols], self.data.universe, self.args.num_beams)
        else:
            ranked = [rank_by_score(scores[r:r + 1, [head.col_of[c] for c in c_]], c_, len(c_))[0]
                      for r, c_ in enumerate(cands)]
        out = [{"ranked": rk} for rk in ranked]
        if self.think:
            for o, z in zip(out, reasoning):
                o["completion"] = head.tokenizer.decode(z, skip_special_tokens=True)
        return out

    def describe(self) -> dict:
        c = self.head.cfg
        return {"path": self.path, "kind": "item_head", "item_source": c.item_source, "item_view": c.item_view,
                "temperature": c.temperature, "task": c.task, "reasoning": self.think,
                "max_reasoning_tokens": self.budget if self.think else 0, "head_items": len(c.item_ids)}
