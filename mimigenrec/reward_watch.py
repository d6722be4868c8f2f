"""Reward-inflation watch: mean train reward and held-out NDCG@K side by side, plus a PNG of both.

A rising train reward with a flat or falling held-out NDCG is the signature of reward hacking
or overfitting. Every ``every`` optimizer steps (and at the end of training) the callback
runs constrained beam search (``K`` beams, stock full-vocabulary scores, as evaluation does)
on the held-out rows, computes NDCG@K = mean over rows of ``1/log2(rank + 2)`` for the
target's rank among the beams (0 if absent), and pairs it with the mean train reward of the
generations since the previous point. Points go to ``output_dir/reward_watch.jsonl``, to the
trainer's ``log_history`` and to stdout; ``output_dir/reward_watch.png`` is drawn at the end.
Work is sharded over processes (each runs its share of rows on the unwrapped model).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from transformers import TrainerCallback

__all__ = ["RewardWatch", "ndcg_at_k", "plot_watch"]


def ndcg_at_k(ranked_cols: torch.LongTensor, target_cols: Sequence[int | None]) -> list[float]:
    """Per-row NDCG@K with one relevant item: ``1/log2(rank+2)`` if the target is among the K columns."""
    out = []
    for row, t in zip(ranked_cols.tolist(), target_cols):
        out.append(1.0 / math.log2(row.index(t) + 2) if t is not None and t in row else 0.0)
    return out


def plot_watch(points: Sequence[dict], path: str | Path, k: int) -> Path:
    """Line plot of mean train reward (left axis) and held-out NDCG@k (right axis) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    rew = [p["train_reward"] if p["train_reward"] is not None else float("nan") for p in points]
    ax.plot(steps, rew, "o-", color="tab:blue", label="mean train reward")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean train reward", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [p[f"ndcg@{k}"] for p in points], "s--", color="tab:red", label=f"held-out NDCG@{k}")
    ax2.set_ylabel(f"held-out NDCG@{k}", color="tab:red")
    ax.set_title("Reward-inflation watch")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


class RewardWatch(TrainerCallback):
    """Callback pairing the trainer's mean train reward with held-out NDCG@k (see module doc)."""

    def __init__(self, trainer, rows: Sequence[dict], every: int = 0, k: int = 10, batch_size: int = 8) -> None:
        self.trainer = trainer
        self.rows = list(rows)
        self.every = int(every)
        self.k = int(k)
        self.batch_size = max(1, int(batch_size))
        self.points: list[dict] = []
        self._seen = 0  # reward_history entries already paired

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def heldout_ndcg(self) -> float:
        """Mean NDCG@k over the held-out rows (all processes take part; each runs its shard)."""
        from accelerate.utils import gather_object
        from trl.data_utils import maybe_apply_chat_template
        from trl.models import unwrap_model_for_generation

        from mimigenrec.beam_search import constrained_beam_search

        tr = self.trainer
        acc = tr.accelerator
        space = tr.answer_space
        tok = tr.processing_class
        device = acc.device
        trie = space.trie.to(device)
        mine = self.rows[acc.process_index::acc.num_processes]
        scores: list[float] = []
        with unwrap_model_for_generation(tr.model_wrapped, acc,
                                         gather_deepspeed3_params=tr.args.ds3_gather_for_generation) as model:
            was_training = model.training
            model.eval()
            try:
                for s in range(0, len(mine), self.batch_size):
                    batch = mine[s:s + self.batch_size]
                    texts = [maybe_apply_chat_template({"prompt": r["prompt"]}, tok)["prompt"] for r in batch]
                    enc = tok(text=texts, return_tensors="pt", padding=True, padding_side="left",
                              add_special_tokens=False)
                    allowed = space.allowed(batch)
                    res = constrained_beam_search(model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                                  trie, num_beams=self.k,
                                                  allowed_items=None if allowed is None else allowed.to(device))
                    scores += ndcg_at_k(res.items.cpu(), [space.target_col(r) for r in batch])
            finally:
                model.train(was_training)
        allscores = gather_object(scores) if acc.num_processes > 1 else scores
        return float(sum(allscores) / max(len(allscores), 1))

    def _point(self, state) -> None:
        hist = self.trainer.reward_history[self._seen:]
        self._seen = len(self.trainer.reward_history)
        reward = sum(v for _, v in hist) / len(hist) if hist else None
        point = {"step": int(state.global_step), "train_reward": reward, f"ndcg@{self.k}": self.heldout_ndcg(),
                 "eval_rows": len(self.rows)}
        self.points.append(point)
        state.log_history.append({"step": point["step"], "watch/train_reward": reward,
                                  f"watch/ndcg@{self.k}": point[f"ndcg@{self.k}"]})
        if self.trainer.accelerator.is_main_process:
            out = Path(self.trainer.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "reward_watch.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(point) + "\n")
            r = "n/a" if reward is None else f"{reward:.4f}"
            print(f"[reward-watch] step {point['step']}: mean train reward {r} | "
                  f"held-out NDCG@{self.k} {point[f'ndcg@{self.k}']:.4f} ({len(self.rows)} rows)", flush=True)

    def _all_points(self, jsonl: Path) -> list[dict]:
        """Points of this run and of earlier runs in the same output_dir (a resumed run), by step."""
        by_step: dict[int, dict] = {}
        if jsonl.is_file():
            for line in jsonl.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    p = json.loads(line)
                    if f"ndcg@{self.k}" in p:
                        by_step[int(p["step"])] = p
        for p in self.points:
            by_step[p["step"]] = p
        return [by_step[s] for s in sorted(by_step)]

    # ------------------------------------------------------------------ callback events
    def on_step_end(self, args, state, control, **kwargs):
        if self.every > 0 and state.global_step % self.every == 0:
            self._point(state)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if not self.points or self.points[-1]["step"] != state.global_step:
            self._point(state)
        if self.trainer.accelerator.is_main_process:
            path = plot_watch(self._all_points(Path(args.output_dir) / "reward_watch.jsonl"),
                              Path(args.output_dir) / "reward_watch.png", self.k)
            print(f"[reward-watch] plot: {path}", flush=True)
        return control
