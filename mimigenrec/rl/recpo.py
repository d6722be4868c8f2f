"""RecPO (R2ec): GRPO over sampled reasoning, rewarded by the rank the item head then gives the target.

``trainer: recpo`` in a GRPO config (``trl_trainer.sh examples/head/recpo_tiny.yaml``) trains an
item-head folder (:mod:`mimigenrec.models.item_head`, e.g. a warm-up output) on the RL rows of its
task. :class:`RecPOTrainer` is stock TRL 0.24 ``GRPOTrainer`` with these hooks overridden:

* ``_generate_single_turn``: TRL's own free-form sampling (the model's saved generation_config
  neutralised, as in :mod:`mimigenrec.rl.grpo`), remembering prompt and completion token ids;
* ``_calculate_rewards``: encodes ``prompt + reasoning`` (the completion up to its first EOS) ``+
  marker`` with the current policy, scores every item with the head and hands each completion's
  ``head_rank`` (0-based rank of the target among all items) and ``head_prob`` (the target's softmax
  probability) to the reward functions (``recpo``: 0.95 · 1/log2(rank + 2) + 0.05 · prob, optional
  ``think_only`` format reward); marks each group's best-reward rollout;
* ``_compute_loss``: the GRPO loss (clipping ``epsilon`` / ``epsilon_high``, group advantages) +
  ``rec_loss_weight`` · softmax cross-entropy of the target from the state after each group's *best*
  rollout (R2ec trains the recommendation only on the highest-advantage trajectory);
* ``create_optimizer``: the head's table (``item_source: table``) joins the optimizer;
* ``_save`` / ``save_model`` / ``_load_from_checkpoint``: the policy as TRL saves it + the head files
  (``reasoning: true``, ``max_reasoning_tokens`` = ``max_completion_length``), so evaluation reasons
  greedily before it scores; the ``lm`` item cache is re-encoded every ``refresh_steps`` and before
  the final save.

RecPO settings go in the config's ``recpo:`` mapping (:class:`RecPOOptions`). Tested on one process;
LoRA and ``rollout_mode: beam`` are refused.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from trl import GRPOTrainer

from mimigenrec.io import BadInputError, DataDir, bad
from mimigenrec.models.item_head import (
    HEAD_WEIGHTS,
    ItemHeadModel,
    cut_at_eos,
    is_head_dir,
)
from mimigenrec.rl.grpo import neutral_generation_config

__all__ = ["RecPOOptions", "RecPOTrainer", "build_recpo_trainer"]


@dataclass
class RecPOOptions:
    """The ``recpo:`` mapping of a GRPO config."""

    rec_loss_weight: float = 1.0   # weight of the head's CE on each group's best rollout (0 = policy gradient only)
    refresh_steps: int = 50        # item_source lm: re-encode the catalogue every N optimizer steps (0 = start/end)
    num_negatives: int = 0         # CE over every item (0) or the targets + N sampled items
    item_grad: bool = True         # item_source lm: the CE re-encodes the targets with gradient
    encode_batch_size: int = 64    # sequences per forward when scoring rollouts / encoding items
    prob_weight: float = 0.05      # reward recpo: r = (1 - w) NDCG + w p(target)
    ndcg_k: int | None = None   # reward recpo: NDCG cut-off (None = the full ranking)

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> RecPOOptions:
        m = dict(m or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(m) - known)
        if unknown:
            raise BadInputError(f"recpo: unknown option(s) {unknown}: known are {sorted(known)}")
        return cls(**m)


class RecPOTrainer(GRPOTrainer):
    """GRPO whose reward is the item head's ranking after the sampled reasoning (module docstring)."""

    def __init__(self, *args: Any, head: ItemHeadModel, options: RecPOOptions | None = None, **kwargs: Any) -> None:
        from mimigenrec.models.head_train import RefreshItems

        self.head = head
        self.options = options or RecPOOptions()
        self.reward_history: list[tuple[int, float]] = []
        self._rollout_ids: tuple[list, list] | None = None
        self._rec: tuple[torch.Tensor, torch.Tensor] | None = None
        head.num_negatives, head.item_grad = self.options.num_negatives, self.options.item_grad
        super().__init__(*args, **kwargs)
        if self.accelerator.unwrap_model(self.model) is not head.lm:
            raise ValueError("RecPOTrainer's model must be the head's LM (model=head.lm)")
        head.to(self.accelerator.device)
        head.cfg.reasoning = True
        head.cfg.max_reasoning_tokens = int(self.max_completion_length)
        head.cfg.extra = {**head.cfg.extra, "recpo": {**vars(self.options), "num_generations": self.num_generations,
                                                       "temperature": self.temperature}}
        self.refresher = RefreshItems(head, self.options.refresh_steps, self.options.encode_batch_size,
                                      lm=lambda: self.accelerator.unwrap_model(self.model))
        self.add_callback(self.refresher)

    # ------------------------------------------------------------------ rollouts and rewards
    def _generate_single_turn(self, prompts: list, images: list | None):
        with neutral_generation_config(self.accelerator.unwrap_model(self.model)):
            out = super()._generate_single_turn(prompts, images)
        self._rollout_ids = (out[0], out[1])
        return out

    def target_col(self, row: Mapping[str, Any]) -> int:
        """The head column of a row's target item (``extra_info.target``)."""
        target = (row.get("extra_info") or {}).get("target")
        if target is None or int(target) not in self.head.col_of:
            raise ValueError(f"RL row without a target item of the head (extra_info.target = {target!r})")
        return self.head.col_of[int(target)]

    @torch.no_grad()
    def score_rollouts(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                       cols: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rank, prob)`` of each row's target column after ``prompt + reasoning + marker``."""
        head, lm = self.head, self.accelerator.unwrap_model(self.model)
        seqs = [list(p) + cut_at_eos(c, self.eos_token_id, self.pad_token_id) + [head.marker_id]
                for p, c in zip(prompt_ids, completion_ids)]
        was = lm.training
        lm.eval()
        try:
            scores = head.scores(head.encode(seqs, self.options.encode_batch_size, lm))
        finally:
            lm.train(was)
        t = torch.as_tensor(list(cols), device=scores.device)
        return head.target_ranks(scores, t), scores.softmax(-1).gather(1, t[:, None]).squeeze(1)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self._rollout_ids is None or len(self._rollout_ids[0]) != len(inputs):
            raise RuntimeError("RecPO: rollout token ids do not line up with the batch")
        cols = [self.target_col(r) for r in inputs]
        ranks, probs = self.score_rollouts(self._rollout_ids[0], completion_ids_list, cols)
        inputs = [{**row, "head_rank": int(r), "head_prob": float(p)}
                  for row, r, p in zip(inputs, ranks.tolist(), probs.tolist())]
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # all processes
        total = (rewards * self.reward_weights.to(rewards.device)[None]).nansum(1)
        G = self.num_generations
        best = torch.zeros_like(total, dtype=torch.bool)
        best[total.view(-1, G).argmax(1) + torch.arange(0, total.numel(), G, device=total.device)] = True
        n, pi = len(inputs), self.accelerator.process_index
        self._rec = (best[pi * n:(pi + 1) * n], torch.as_tensor(cols, device=best.device))
        mode = "train" if self.model.training else "eval"
        gathered = self.accelerator.gather(ranks.float().to(self.accelerator.device))
        self._metrics[mode]["head/rank_mean"].append(gathered.mean().item())
        self._metrics[mode]["head/ndcg"].append((1.0 / torch.log2(gathered + 2)).mean().item())
        self._metrics[mode]["head/prob"].append(self.accelerator.gather(probs.to(self.accelerator.device)).mean().item())
        return rewards

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._rec = None
        out = super()._generate_and_score_completions(inputs)
        if self._rec is not None and self.options.rec_loss_weight > 0:
            out["rec_best"], out["rec_target"] = self._rec  # tensors: shuffled and split with the batch
        mode = "train" if self.model.training else "eval"
        vals = self._metrics[mode].get("reward")
        if mode == "train" and vals:
            self.reward_history.append((int(self.state.global_step), float(vals[-1])))
        return out

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        best = inputs.get("rec_best")
        if best is None or not bool(best.any()):
            return loss
        rows = best.nonzero().flatten().tolist()
        head = self.head
        seqs = []
        for r in rows:
            p = inputs["prompt_ids"][r][inputs["prompt_mask"][r].bool()].tolist()
            c = cut_at_eos(inputs["completion_ids"][r].tolist(), self.eos_token_id, self.pad_token_id)
            seqs.append(p + c + [head.marker_id])
        lm = self.accelerator.unwrap_model(model)
        users = head.encode(seqs, batch_size=len(seqs), lm=lm)
        rec = head.softmax_loss(users, inputs["rec_target"][rows], lm=lm)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["rec_loss"].append(rec.item())
        return loss + self.options.rec_loss_weight * rec / self.current_gradient_accumulation_steps

    def create_optimizer(self):
        opt = super().create_optimizer()
        if self.head.cfg.item_source == "table" and self.options.rec_loss_weight > 0:
            opt.add_param_group({"params": [self.head.item_table], "weight_decay": 0.0})
        return opt

    # ------------------------------------------------------------------ files
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not _internal_call:  # the final model: its cache = its own encodings
            self.refresher.refresh()
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        self.head.save_head(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        path = Path(resume_from_checkpoint) / HEAD_WEIGHTS
        if path.is_file():
            with torch.no_grad():
                self.head.item_embeddings().copy_(load_file(str(path))["item_emb"])


def build_recpo_trainer(cfg: Any, callbacks: Sequence[Any] = ()) -> RecPOTrainer:
    """An item-head folder + the RL rows of its task + rewards -> a ready :class:`RecPOTrainer`."""
    from datasets import Dataset

    from mimigenrec.rl.train_grpo import _subset, load_rl_rows
    from rewards import get_reward

    opts = RecPOOptions.from_mapping(cfg.recpo)
    if not cfg.model_name_or_path or not cfg.data_dir:
        raise BadInputError("model_name_or_path and data_dir are required")
    if not is_head_dir(cfg.model_name_or_path):
        raise bad(cfg.model_name_or_path, "trainer: recpo needs an item-head folder (no item_head.json here)",
                  "warm a head up first: python -m mimigenrec.models.head_train examples/head/warmup_tiny.yaml")
    if cfg.rollout_mode != "sample" or cfg.inject_target:
        raise BadInputError("trainer: recpo samples free-form reasoning: use rollout_mode: sample, inject_target: false")
    if cfg.use_lora:
        raise BadInputError("trainer: recpo trains the full model (use_lora is not supported)")
    head = ItemHeadModel.from_pretrained(cfg.model_name_or_path)
    dd = DataDir(cfg.data_dir)
    rows = [r for r in load_rl_rows(dd.rl(cfg.train_split))
            if (r.get("extra_info") or {}).get("task", head.cfg.task) == head.cfg.task]
    rows = _subset(rows, cfg.max_train_rows, cfg.seed)
    if not rows:
        raise bad(dd.rl(cfg.train_split), f"holds no {head.cfg.task} rows", "build it with --rl_tasks including it")
    for i, r in enumerate(rows):
        t = (r.get("extra_info") or {}).get("target")
        if t is None or int(t) not in head.col_of:
            raise bad(dd.rl(cfg.train_split), f"row {i}: extra_info.target {t!r} is not an item of the head",
                      "use the dataset the head was warmed up on")
    rewards = [get_reward(r, data_dir=cfg.data_dir, cache_dir=cfg.output_dir, prob_weight=opts.prob_weight, ndcg_k=opts.ndcg_k)
               for r in cfg.rewards]
    tok = head.tokenizer
    tok.padding_side, tok.truncation_side = "left", "left"
    tok.model_input_names = [n for n in tok.model_input_names if n != "token_type_ids"]
    return RecPOTrainer(model=head.lm, reward_funcs=rewards, args=cfg, train_dataset=Dataset.from_list(rows),
                        processing_class=tok, callbacks=list(callbacks), head=head, options=opts)
