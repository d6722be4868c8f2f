"""Reward-inflation watch and checkpoint choice: train reward beside held-out NDCG@K / HR@K.

A rising train reward with a flat or falling held-out NDCG is the signature of reward hacking
or overfitting. Before the first step (step 0 = the starting model), every ``every`` optimizer
steps and at the end, the callback runs the evaluation's ranking on the held-out rows
(constrained beam search with ``num_beams`` beams, the same score as ``evaluate.sh`` and the
beam rollouts) and records, per point: NDCG@K and HR@K with their standard errors, the paired
changes of NDCG@K and HR@K against step 0 with their standard errors, the mean train reward and the share of
zero-variance reward groups since the previous point. Points go to
``output_dir/reward_watch.jsonl``, to the trainer's ``log_history`` and to stdout;
``output_dir/reward_watch.png`` is drawn at the end.

With ``select_best`` the point with the highest held-out NDCG@K is the model the run keeps:
each new best is saved to ``output_dir/best_valid/`` and :func:`keep_best` copies it over the
final model, so a GRPO stage that lowers the held-out metric hands back its starting weights
(step 0) and says so, instead of silently keeping the last step. ``output_dir/selection.json``
records the choice. Work is sharded over processes (each runs its share of rows).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

from mimigenrec.eval.metrics import mean_se, row_metrics

__all__ = ["BEST_DIR", "RewardWatch", "keep_best", "plot_watch", "rank_metrics"]

BEST_DIR = "best_valid"


def rank_metrics(ranked_cols: torch.LongTensor, target_cols: Sequence[int | None], k: int) -> list[tuple[float, float]]:
    """Per row ``(NDCG@k, HR@k)`` with one relevant item (:func:`~mimigenrec.eval.metrics.row_metrics`,
    the evaluation's formulas); a row without a target scores 0."""
    out = []
    for row, t in zip(ranked_cols.tolist(), target_cols):
        m = row_metrics(row, t, (k,)) if t is not None else {f"ndcg@{k}": 0.0, f"hr@{k}": 0.0}
        out.append((m[f"ndcg@{k}"], m[f"hr@{k}"]))
    return out


def plot_watch(points: Sequence[dict], path: str | Path, k: int) -> Path:
    """Mean train reward (left axis) and held-out NDCG@k with a ±1 s.e. band (right axis) by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    rew = [p["train_reward"] if p.get("train_reward") is not None else float("nan") for p in points]
    ax.plot(steps, rew, "o-", color="tab:blue", label="mean train reward")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean train reward", color="tab:blue")
    ax2 = ax.twinx()
    nd = [p[f"ndcg@{k}"] for p in points]
    se = [p.get(f"ndcg@{k}_se", 0.0) for p in points]
    ax2.plot(steps, nd, "s--", color="tab:red", label=f"held-out NDCG@{k} (±1 s.e.)")
    ax2.fill_between(steps, [a - b for a, b in zip(nd, se)], [a + b for a, b in zip(nd, se)], color="tab:red",
                     alpha=0.15)
    ax2.set_ylabel(f"held-out NDCG@{k}", color="tab:red")
    ax.set_title(f"Reward-inflation watch ({points[-1].get('eval_rows', '?')} held-out rows)" if points else
                 "Reward-inflation watch")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _read_points(jsonl: Path, key: str) -> dict[int, dict]:
    by_step: dict[int, dict] = {}
    if jsonl.is_file():
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            if line.strip():
                p = json.loads(line)
                if key in p:
                    by_step[int(p["step"])] = p
    return by_step


class RewardWatch(TrainerCallback):
    """Callback pairing the trainer's mean train reward with held-out ranking metrics (module doc)."""

    def __init__(self, trainer, rows: Sequence[dict], every: int = 0, k: int = 10, num_beams: int = 50,
                 batch_size: int = 8, select_best: bool = False, min_se: float = 2.0) -> None:
        if num_beams < k:
            raise ValueError(f"eval_num_beams ({num_beams}) must be >= eval_k ({k}): ranks beyond the beams are unknown")
        self.trainer = trainer
        self.rows = list(rows)
        self.every = int(every)
        self.k = int(k)
        self.num_beams = int(num_beams)
        self.batch_size = max(1, int(batch_size))
        self.select_best = select_best
        self.min_se = float(min_se)  # a later point must beat step 0 by this many s.e. of the paired change
        self.points: list[dict] = []
        self.best: dict | None = None
        self._base: list[float] | None = None  # per-row NDCG@k of step 0 (paired deltas)
        self._base_hr: list[float] | None = None  # per-row HR@k of step 0
        self._seen = 0  # reward_history entries already paired
        self._zero_std_seen = 0

    @property
    def key(self) -> str:
        return f"ndcg@{self.k}"

    @property
    def out(self) -> Path:
        return Path(self.trainer.args.output_dir)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def heldout(self) -> list[tuple[float, float]]:
        """Per-row ``(NDCG@k, HR@k)`` over all held-out rows, in a fixed order (every process takes part)."""
        from accelerate.utils import gather_object
        from trl.data_utils import maybe_apply_chat_template
        from trl.models import unwrap_model_for_generation

        from mimigenrec.decoding.beam_search import constrained_beam_search

        tr = self.trainer
        acc = tr.accelerator
        space = tr.answer_space
        tok = tr.processing_class
        device = acc.device
        trie = space.trie.to(device)
        mine = self.rows[acc.process_index::acc.num_processes]
        scores: list[tuple[float, float]] = []
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
                    beams = self.num_beams if allowed is None else min(self.num_beams, int(allowed.sum(1).min()))
                    res = constrained_beam_search(model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                                  trie, num_beams=beams,
                                                  allowed_items=None if allowed is None else allowed.to(device))
                    scores += rank_metrics(res.items.cpu(), [space.target_col(r) for r in batch], self.k)
            finally:
                model.train(was_training)
        return gather_object(scores) if acc.num_processes > 1 else scores

    def _zero_std_share(self) -> float | None:
        vals = self.trainer._metrics["train"].get("frac_reward_zero_std", [])
        new = vals[self._zero_std_seen:]
        self._zero_std_seen = len(vals)
        return sum(new) / len(new) if new else None

    def _point(self, state) -> None:
        hist = self.trainer.reward_history[self._seen:]
        self._seen = len(self.trainer.reward_history)
        reward = sum(v for _, v in hist) / len(hist) if hist else None
        rows = self.heldout()
        ndcg, hits = [a for a, _ in rows], [b for _, b in rows]
        nd, nd_se = mean_se(ndcg)
        hr, hr_se = mean_se(hits)
        step = int(state.global_step)
        if step == 0:
            self._base, self._base_hr = ndcg, hits
        point = {"step": step, "train_reward": reward, "frac_reward_zero_std": self._zero_std_share(),
                 self.key: nd, f"{self.key}_se": nd_se, f"hr@{self.k}": hr, f"hr@{self.k}_se": hr_se,
                 "eval_rows": len(rows), "num_beams": self.num_beams}
        if self._base is not None and len(self._base) == len(ndcg):
            d, d_se = mean_se([a - b for a, b in zip(ndcg, self._base)])
            point[f"{self.key}_delta_vs_step0"], point[f"{self.key}_delta_se"] = d, d_se
            d, d_se = mean_se([a - b for a, b in zip(hits, self._base_hr)])
            point[f"hr@{self.k}_delta_vs_step0"], point[f"hr@{self.k}_delta_se"] = d, d_se
        self.points.append(point)
        state.log_history.append({"step": step, "watch/train_reward": reward, f"watch/{self.key}": nd,
                                  f"watch/hr@{self.k}": hr})
        improved = self.best is None or (nd > self.best[self.key] and self.significant(point))
        if self.select_best and improved:
            self.best = point
            self.trainer.save_model(str(self.out / BEST_DIR))  # collective under DeepSpeed/FSDP
        if self.trainer.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "reward_watch.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(point) + "\n")
            r = "n/a" if reward is None else f"{reward:.4f}"
            z = point["frac_reward_zero_std"]
            h = f"hr@{self.k}"
            delta = (f" | vs step 0: NDCG {point[f'{self.key}_delta_vs_step0']:+.4f} ± {point[f'{self.key}_delta_se']:.4f},"
                     f" HR {point[f'{h}_delta_vs_step0']:+.4f} ± {point[f'{h}_delta_se']:.4f}"
                     if f"{self.key}_delta_vs_step0" in point and step else "")
            print(f"[reward-watch] step {step}: mean train reward {r}"
                  + ("" if z is None else f" (zero-variance groups {z:.0%})")
                  + f" | held-out NDCG@{self.k} {nd:.4f} ± {nd_se:.4f}, HR@{self.k} {hr:.4f} ± {hr_se:.4f}"
                  f" ({len(rows)} rows)"
                  + delta + (" *best*" if self.select_best and improved else ""), flush=True)

    def significant(self, point: dict) -> bool:
        """Whether ``point`` beats step 0 by at least ``min_se`` standard errors of the paired change
        (step 0 itself always qualifies). Picking the best of many noisy points otherwise keeps noise:
        measured on the bundled data, a +0.0003 valid point (0.1 s.e.) cost 10.7% NDCG@10 on test."""
        if point["step"] == 0:
            return True
        d, se = point.get(f"{self.key}_delta_vs_step0"), point.get(f"{self.key}_delta_se")
        if d is None or se is None:
            return self.min_se <= 0
        return d > 0 and d >= self.min_se * se

    # ------------------------------------------------------------------ callback events
    def on_train_begin(self, args, state, control, **kwargs):
        earlier = _read_points(self.out / "reward_watch.jsonl", self.key)
        if earlier and state.global_step > 0:  # resumed: the best so far comes from the earlier run
            self.best = max((p for p in earlier.values() if self.significant(p)), key=lambda p: p[self.key],
                            default=None)
        elif state.global_step == 0:
            if self.trainer.accelerator.is_main_process:
                (self.out / "reward_watch.jsonl").unlink(missing_ok=True)
            self._point(state)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.every > 0 and state.global_step % self.every == 0:
            self._point(state)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if not self.points or self.points[-1]["step"] != state.global_step:
            self._point(state)
        if self.trainer.accelerator.is_main_process:
            by_step = _read_points(self.out / "reward_watch.jsonl", self.key)
            path = plot_watch([by_step[s] for s in sorted(by_step)], self.out / "reward_watch.png", self.k)
            print(f"[reward-watch] plot: {path}", flush=True)
        return control


def keep_best(watch: RewardWatch, final_step: int) -> dict | None:
    """After the final save: copy ``best_valid/`` over ``output_dir`` when the best point is not the
    last step, and write ``selection.json``. Returns the selection record (None without selection)."""
    if not watch.select_best or watch.best is None:
        return None
    best, out, key = watch.best, watch.out, watch.key
    last = watch.points[-1] if watch.points else best
    record = {"selected_step": best["step"], "final_step": final_step, "metric": f"held-out {key}",
              "selected": {key: best[key], f"{key}_se": best.get(f"{key}_se")},
              "last": {key: last[key], f"{key}_se": last.get(f"{key}_se")}, "eval_rows": best.get("eval_rows")}
    if watch.trainer.accelerator.is_main_process:
        if best["step"] != final_step:
            for f in (out / BEST_DIR).iterdir():
                if f.is_file():
                    shutil.copy2(f, out / f.name)
        (out / "selection.json").write_text(json.dumps(record, indent=2) + "\n")
        if best["step"] == 0:
            print(f"[reward-watch] GRPO did not raise held-out {key} ({last[key]:.4f} at step {final_step} vs "
                  f"{best[key]:.4f} at step 0): {out} holds the STARTING model's weights", flush=True)
        elif best["step"] != final_step:
            print(f"[reward-watch] kept step {best['step']} (held-out {key} {best[key]:.4f}) over the last step "
                  f"{final_step} ({last[key]:.4f}): {out} holds step {best['step']}'s weights", flush=True)
    return record
