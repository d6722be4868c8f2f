"""``ConstrainedGRPOTrainer``: stock TRL 0.24 ``GRPOTrainer`` whose rollouts are always valid items.

A thin subclass that overrides five hooks of ``trl.GRPOTrainer``:

* ``_generate_and_score_completions`` remembers the rows of the generation batch, builds each
  row's allowed-item mask (all SIDs, or the row's own ``extra_info.candidates`` for
  ``[ITEM_n]`` answers) and ships it with the batch (``allowed_items``) so that it follows
  TRL's shuffle / split into micro-batches;
* ``_generate_single_turn`` generates the completions:
  - ``rollout_mode: sample``: ``num_generations`` samples per prompt with ``model.generate``
    and :class:`~mimigenrec.decoding.trie.TrieLogitsProcessor` (mask applied before temperature /
    top-k / top-p, so those act on the constrained distribution);
  - ``rollout_mode: beam``: TRL repeats each prompt ``num_generations`` times in a row; the
    group is run once through :func:`~mimigenrec.decoding.beam_search.constrained_beam_search` with
    ``num_generations`` beams, ranked by the same score as evaluation (see that function), and
    the beams become the group's completions **in rank order**;
  - ``use_vllm``: TRL's own vLLM path with ``vllm_guided_decoding_regex`` = an escaped
    alternation of every valid answer string; completions are mapped back to the canonical
    trie token sequence (vLLM may spell an answer with other tokens). Untested here (no GPU);
* ``_calculate_rewards`` adds ``beam_rank`` (0 = best beam) and ``beam_logp`` (the beam's
  summed answer log-prob, the ranking score) columns in beam mode, so reward functions
  receive ``beam_rank=[...]`` and ``beam_logp=[...]`` beside the dataset columns;
* ``_get_per_token_logps_and_entropies`` computes the log-probs of the **constrained
  policy** for the policy, the old policy and the reference model alike: at every completion
  position the logits (divided by the temperature) are masked to the tokens the trie allows
  after the answer prefix (one vectorised mask for all rows and positions) before the
  log-softmax; entropies are those of the constrained distribution. Positions after the
  first EOS are masked out of the loss by TRL and are left unconstrained (finite).

After a complete answer the trie allows EOS and pad; this trainer keeps only EOS there (in
sampling and in the log-probs), so every completion is ``answer + EOS`` with log-prob 0 on EOS.
With ``constrained: false`` every hook defers to stock TRL (free-form completions, e.g. for
``<think>`` reasoning rewarded by ``format`` / ``think``).
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from trl import GRPOTrainer
from trl.data_utils import maybe_apply_chat_template
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import selective_log_softmax

from mimigenrec.decoding.answer_logps import answer_logps
from mimigenrec.decoding.beam_search import constrained_beam_search
from mimigenrec.decoding.trie import ItemTrie, TrieLogitsProcessor
from mimigenrec.prompts import ITEM_REF_RE, item_ref, sid_string, split_sid

__all__ = ["AnswerSpace", "ConstrainedGRPOTrainer", "answer_kind", "row_answer_kind", "without_label"]

ROLLOUT_MODES = ("sample", "beam")


def answer_kind(ground_truth: Any) -> str | None:
    """"sid" for ``<a_1><b_2>…``, "item" for ``[ITEM_12]``, None for anything else."""
    text = str(ground_truth or "").strip()
    if ITEM_REF_RE.fullmatch(text):
        return "item"
    toks = split_sid(text)
    if toks and "".join(toks) == text:
        return "sid"
    return None


def _row_truth(row: Mapping[str, Any]) -> Any:
    rm = row.get("reward_model") or {}
    return rm.get("ground_truth") if isinstance(rm, Mapping) else None


def row_answer_kind(row: Mapping[str, Any]) -> str | None:
    """The kind of answer a row asks for: its ground truth's, or ``reward_model.answer_kind`` on a row
    whose label was removed (:func:`without_label`)."""
    rm = row.get("reward_model") or {}
    return (rm.get("answer_kind") if isinstance(rm, Mapping) else None) or answer_kind(_row_truth(row))


def without_label(row: Mapping[str, Any]) -> dict:
    """A copy of an RL row that keeps its prompt, user and kind of answer, and drops every trace of
    its target (``ground_truth``, ``extra_info.target``): a prompt for label-free rewards."""
    info = {k: v for k, v in (row.get("extra_info") or {}).items() if k != "target"}
    return {**row, "reward_model": {"style": "none", "ground_truth": None, "answer_kind": row_answer_kind(row)},
            "extra_info": {**info, "target": None}}


@dataclass
class AnswerSpace:
    """Every valid answer in one trie: SIDs (columns ``sid_cols``) and/or ``[ITEM_n]`` references.

    Trie item ids are column numbers; ``col_item[c]`` is the real item id of column ``c``.
    """

    trie: ItemTrie
    col_item: list[int]
    texts: list[str]
    sid_cols: range
    ref_col_of: dict[int, int]
    col_of_text: dict[str, int]

    @classmethod
    def build(cls, tokenizer, id2sid: Mapping[int, Sequence[str]] | None = None,
              ref_items: Sequence[int] | None = None, vocab_size: int | None = None) -> AnswerSpace:
        """Answers = SIDs of ``id2sid`` (if given) + ``[ITEM_n]`` for ``ref_items`` (if given), each + EOS."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id")
        seqs, col_item, texts = [], [], []
        for item, sid in sorted((int(k), list(v)) for k, v in (id2sid or {}).items()):
            text = sid_string(sid)
            toks = tokenizer(text, add_special_tokens=False).input_ids
            if len(toks) != len(sid):
                raise ValueError(f"item {item}: SID {text} tokenizes to {len(toks)} tokens, expected {len(sid)}: "
                                 f"the SID tokens are missing from the tokenizer (was the model SFT-ed with add_tokens?)")
            seqs.append(list(toks) + [eos]); col_item.append(item); texts.append(text)
        n_sid = len(seqs)
        ref_col_of = {}
        for item in sorted(int(i) for i in (ref_items or ())):
            text = item_ref(item)
            ref_col_of[item] = len(seqs)
            seqs.append(list(tokenizer(text, add_special_tokens=False).input_ids) + [eos])
            col_item.append(item); texts.append(text)
        if not seqs:
            raise ValueError("no valid answers: give id2sid and/or reference items")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        trie = ItemTrie.from_sequences(seqs, item_ids=list(range(len(seqs))), eos_token_id=eos, pad_token_id=pad,
                                       vocab_size=max(vocab_size or 0, len(tokenizer)))
        return cls(trie, col_item, texts, range(n_sid), ref_col_of, {t: c for c, t in enumerate(texts)})

    @property
    def has_refs(self) -> bool:
        return bool(self.ref_col_of)

    def regex(self) -> str:
        """One regex matching exactly the valid answer strings (for vLLM guided decoding)."""
        return "(?:" + "|".join(re.escape(t) for t in self.texts) + ")"

    def check_rows(self, rows: Sequence[Mapping[str, Any]], where: str) -> None:
        """Every row's ground truth must be an answer of this space (its kind must be present)."""
        for i, row in enumerate(rows):
            gt = _row_truth(row)
            kind = row_answer_kind(row)
            if kind is None:
                raise ValueError(f"{where} row {i}: ground truth {gt!r} is neither a SID nor [ITEM_n]; constrained "
                                 f"rollouts need item answers (set constrained: false for free-form tasks)")
            if kind == "sid" and not len(self.sid_cols):
                raise ValueError(f"{where} row {i}: SID answer but no id2sid.json was loaded")
            if kind == "item" and not self.has_refs:
                raise ValueError(f"{where} row {i}: [ITEM_n] answer but no item references in the answer space")

    def allowed(self, rows: Sequence[Mapping[str, Any]]) -> torch.BoolTensor | None:
        """``[len(rows), num_items]`` allowed columns per row; None when every row may give any SID."""
        kinds = [row_answer_kind(r) for r in rows]
        if not self.has_refs and all(k == "sid" for k in kinds):
            return None
        mask = torch.zeros(len(rows), self.trie.num_items, dtype=torch.bool)
        for i, (row, kind) in enumerate(zip(rows, kinds)):
            if kind == "sid":
                mask[i, self.sid_cols.start:self.sid_cols.stop] = True
                continue
            cands = (row.get("extra_info") or {}).get("candidates")
            if cands is None:
                mask[i, list(self.ref_col_of.values())] = True
                continue
            try:
                mask[i, [self.ref_col_of[int(c)] for c in cands]] = True
            except KeyError as e:
                raise KeyError(f"row {i}: candidate item {e.args[0]} is not in the item catalog") from None
        return mask

    def target_col(self, row: Mapping[str, Any]) -> int | None:
        """Column of the row's ground-truth answer (None if it is not a valid answer)."""
        return self.col_of_text.get(str(_row_truth(row) or "").strip())


class _EosOverPad(LogitsProcessor):
    """Where EOS is allowed, forbid pad: a finished answer is always closed by EOS."""

    def __init__(self, eos: int, pad: int) -> None:
        self.eos, self.pad = eos, pad

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pad == self.eos:
            return scores
        eos_ok = torch.isfinite(scores[:, self.eos])
        scores[:, self.pad] = torch.where(eos_ok, float("-inf"), scores[:, self.pad])
        return scores


@contextmanager
def neutral_generation_config(model) -> Iterator[None]:
    """While inside, ``model.generation_config`` holds token ids only.

    ``generate(generation_config=cfg)`` (transformers >= 4.50) replaces every field of ``cfg``
    that equals Hugging Face's global default with the model's saved value. TRL's sampling
    settings (temperature 1.0, top_p 1.0, repetition_penalty 1.0) ARE those defaults, so
    without this an Instruct backbone's saved temperature / top_p / top_k / repetition penalty
    would shape the rollouts while the loss scores them under the trainer's settings.
    """
    mods = [model] + ([model.get_base_model()] if hasattr(model, "get_base_model") else [])
    saved = [(m, m.generation_config) for m in mods if getattr(m, "generation_config", None) is not None]
    for m, cfg in saved:
        m.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id,
                                               decoder_start_token_id=cfg.decoder_start_token_id)
    try:
        yield
    finally:
        for m, cfg in saved:
            m.generation_config = cfg


def _cut_after_eos(seqs: torch.LongTensor, eos: int) -> list[list[int]]:
    """Rows up to and including the first EOS (whole row if none)."""
    out = []
    for row in seqs.tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def _no_attention_dropout(model: torch.nn.Module) -> None:
    """Zero the attention-weight dropout that TRL's ``disable_dropout`` misses: HF attention layers keep
    it as a float rate (``attention_dropout``), not as an ``nn.Dropout`` module."""
    for m in model.modules():
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    if hasattr(model, "config") and getattr(model.config, "attention_dropout", None):
        model.config.attention_dropout = 0.0


class ConstrainedGRPOTrainer(GRPOTrainer):
    """GRPO whose rollouts are valid items and whose loss uses the constrained policy's log-probs.

    Extra arguments: ``answer_space`` (:class:`AnswerSpace`), ``rollout_mode`` ("sample" |
    "beam") and ``constrained`` (False = stock TRL). Everything else is ``GRPOTrainer``'s.
    """

    def __init__(self, *args, answer_space: AnswerSpace | None = None, rollout_mode: str = "sample",
                 constrained: bool = True, inject_target: bool = False, propose: int = 0,
                 proposer: Callable[[list[dict], list[set[str]], int], list[list[str]]] | None = None,
                 **kwargs) -> None:
        grpo_args = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        if rollout_mode not in ROLLOUT_MODES:
            raise ValueError(f"rollout_mode must be one of {ROLLOUT_MODES}, got {rollout_mode!r}")
        if constrained and answer_space is None:
            raise ValueError("constrained rollouts need an answer_space (AnswerSpace.build(tokenizer, id2sid, ...))")
        if rollout_mode == "beam" and not constrained:
            raise ValueError("rollout_mode: beam needs constrained: true (beams are ranked valid items)")
        if inject_target and not constrained:
            raise ValueError("inject_target needs constrained: true (the target must be a valid item)")
        if propose and (rollout_mode != "beam" or inject_target or proposer is None):
            raise ValueError("propose needs rollout_mode: beam, inject_target: false and a proposer (the last beams "
                             "of a group give way to proposed items)")
        if grpo_args is not None and constrained:
            self._check_args(grpo_args, answer_space, rollout_mode)
        self.answer_space = answer_space
        self.rollout_mode = rollout_mode
        self.constrained = constrained
        self.inject_target = inject_target
        self.propose, self.proposer = propose, proposer
        self.reward_history: list[tuple[int, float]] = []  # (global_step, mean train reward) per generation
        self._rows: list[dict] | None = None        # rows of the batch being generated
        self._rows_allowed: torch.Tensor | None = None
        self._logp_allowed: torch.Tensor | None = None  # allowed mask aligned with the next log-prob calls
        self._beam_ranks: list[int] | None = None
        self._beam_logps: list[float] | None = None
        self._tries: dict[torch.device, ItemTrie] = {}
        super().__init__(*args, **kwargs)
        if self.args.disable_dropout:
            _no_attention_dropout(self.model)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_args(args, space: AnswerSpace, mode: str) -> None:
        if args.use_liger_loss:
            raise ValueError("use_liger_loss computes unconstrained log-probs; it cannot be used with constrained: true")
        if args.use_transformers_paged:
            raise ValueError("use_transformers_paged bypasses the trie; it cannot be used with constrained: true")
        if args.use_vllm:
            if mode == "beam":
                raise ValueError("rollout_mode: beam cannot run on vLLM (vLLM has no constrained beam search "
                                 "here); use rollout_mode: sample with use_vllm, or beam without vLLM")
            if args.vllm_guided_decoding_regex:
                raise ValueError("vllm_guided_decoding_regex is set by the trainer from the item catalog; leave it unset")
            if args.vllm_importance_sampling_correction:
                raise ValueError("set vllm_importance_sampling_correction: false with constrained vLLM rollouts "
                                 "(completions are re-tokenised canonically, so vLLM's token log-probs do not apply)")
            args.vllm_guided_decoding_regex = space.regex()
        if mode == "beam":
            per_proc = args.per_device_train_batch_size * args.steps_per_generation
            if per_proc % args.num_generations:
                raise ValueError(
                    f"rollout_mode: beam needs whole prompt groups on every process: per_device_train_batch_size "
                    f"({args.per_device_train_batch_size}) x steps_per_generation ({args.steps_per_generation}) must "
                    f"be a multiple of num_generations ({args.num_generations})")

    def _trie(self, device: torch.device) -> ItemTrie:
        if device not in self._tries:
            self._tries[device] = self.answer_space.trie.to(device)
        return self._tries[device]

    # ------------------------------------------------------------------ hook 1: batch bookkeeping
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.constrained:
            out = super()._generate_and_score_completions(inputs)
            self._record_reward()
            return out
        device = self.accelerator.device
        self.answer_space.check_rows(inputs, "batch")
        allowed = self.answer_space.allowed(inputs)
        allowed = None if allowed is None else allowed.to(device)
        self._rows, self._rows_allowed, self._logp_allowed = inputs, allowed, allowed
        self._beam_ranks = self._beam_logps = None
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._rows = self._rows_allowed = self._logp_allowed = None
        if allowed is not None:
            out["allowed_items"] = allowed  # a tensor: shuffled and split with the rest of the batch
        self._record_reward()
        return out

    def _record_reward(self) -> None:
        mode = "train" if self.model.training else "eval"
        vals = self._metrics[mode].get("reward")
        if mode == "train" and vals:
            self.reward_history.append((int(self.state.global_step), float(vals[-1])))

    def _compute_loss(self, model, inputs):
        self._logp_allowed = inputs.get("allowed_items")
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._logp_allowed = None

    # ------------------------------------------------------------------ hook 2: rollouts
    def _generate_single_turn(self, prompts: list, images: list | None):
        if self.use_vllm:
            return self._vllm_rollouts(prompts) if self.constrained else super()._generate_single_turn(prompts, images)
        with neutral_generation_config(self.accelerator.unwrap_model(self.model)):
            if not self.constrained:
                return super()._generate_single_turn(prompts, images)
            if images is not None:
                raise NotImplementedError("constrained rollouts take text prompts only")
            return self._constrained_rollouts(prompts)

    def _constrained_rollouts(self, prompts: list):
        device = self.accelerator.device
        tok = self.processing_class
        texts = [maybe_apply_chat_template({"prompt": p}, tok)["prompt"] for p in prompts]
        enc = tok(text=texts, return_tensors="pt", padding=True, padding_side="left",
                  max_length=self.max_prompt_length, truncation=True, add_special_tokens=False)
        input_ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        trie = self._trie(device)
        with (
            unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                        gather_deepspeed3_params=self.args.ds3_gather_for_generation) as unwrapped,
            torch.no_grad(),
            self._fsdp_full_params(),
        ):
            was_training = unwrapped.training
            unwrapped.eval()  # gradient checkpointing would drop the KV cache
            try:
                if self.rollout_mode == "beam":
                    seqs = self._beam_rollouts(unwrapped, prompts, input_ids, attn, trie)
                else:
                    seqs = self._sample_rollouts(unwrapped, input_ids, attn, trie)
            finally:
                unwrapped.train(was_training)
        items = trie.items_of(seqs)
        if bool((items < 0).any()):
            raise RuntimeError("a constrained rollout is not a valid item; this is a bug in the trie constraint")
        if self.inject_target:
            seqs = self._inject_targets(seqs, items)
        prompt_ids = [p[m].tolist() for p, m in zip(input_ids, attn.bool())]
        return prompt_ids, _cut_after_eos(seqs, trie.eos_token_id), None, {}

    def _inject_targets(self, seqs: torch.LongTensor, items: torch.LongTensor) -> torch.LongTensor:
        """Where no completion of a group is the row's target, the group's last one becomes the target.

        Every group then holds its positive, so a rank-aware reward always has a hit to push up
        against the model's own best wrong answers (in beam mode: its top beams); the share of
        groups that needed it is logged as ``injected_target``.
        """
        G, space = self.num_generations, self.answer_space
        seqs = seqs.clone()
        injected = 0
        for g in range(0, seqs.shape[0], G):
            col = space.target_col(self._rows[g])
            if col is None or bool((items[g:g + G] == col).any()):
                continue
            self._put_answer(seqs, g + G - 1, space.texts[col])
            if self._beam_logps is not None:  # not among the beams: its log-prob is at most the lowest beam's
                self._beam_logps[g + G - 1] = min(self._beam_logps[g:g + G])
            injected += 1
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["injected_target"].append(injected / max(1, seqs.shape[0] // G))
        return seqs

    def _put_answer(self, seqs: torch.LongTensor, i: int, text: str) -> None:
        """Rollout row ``i`` becomes the answer ``text`` + EOS, padded (the trie's canonical tokens)."""
        tok, trie = self.processing_class, self.answer_space.trie
        ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
        seqs[i] = trie.pad_token_id
        seqs[i, :len(ids)] = torch.tensor(ids, dtype=seqs.dtype, device=seqs.device)

    def _fsdp_full_params(self):
        if not self.is_fsdp_enabled:
            return nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(self.model_wrapped, recurse=False)

    def _sample_rollouts(self, model, input_ids, attn, trie: ItemTrie) -> torch.LongTensor:
        """One constrained sample per (repeated) prompt row: ``[N, trie.max_len]`` (pad after EOS)."""
        cfg = copy.deepcopy(self.generation_config)
        cfg.max_new_tokens, cfg.min_new_tokens, cfg.num_return_sequences = trie.max_len, None, 1
        procs = LogitsProcessorList([
            TrieLogitsProcessor(trie, input_ids.shape[1], allowed_items=self._rows_allowed),
            _EosOverPad(trie.eos_token_id, trie.pad_token_id),
        ])
        out = model.generate(input_ids=input_ids, attention_mask=attn, generation_config=cfg,
                             logits_processor=procs, disable_compile=True)
        gen = out[:, input_ids.shape[1]:]
        n = min(gen.shape[1], trie.max_len)
        seqs = torch.full((gen.shape[0], trie.max_len), trie.pad_token_id, dtype=gen.dtype, device=gen.device)
        seqs[:, :n] = gen[:, :n]
        return seqs

    def _beam_rollouts(self, model, prompts: list, input_ids, attn, trie: ItemTrie) -> torch.LongTensor:
        """Each group of ``num_generations`` identical prompts -> its ``num_generations`` beams, best first."""
        G = self.num_generations
        n = len(prompts)
        if n % G:
            raise RuntimeError(f"beam rollouts got {n} prompts, not a multiple of num_generations={G}")
        for g in range(0, n, G):
            if any(prompts[g + k] != prompts[g] for k in range(1, G)):
                raise RuntimeError(f"beam rollouts: prompts {g}..{g + G - 1} are not one repeated prompt group")
        allowed = None if self._rows_allowed is None else self._rows_allowed[::G]
        if allowed is not None:
            short = (allowed.sum(1) < G).nonzero().flatten().tolist()
            if short:
                raise ValueError(f"rollout_mode: beam with num_generations={G} needs at least {G} allowed items per "
                                 f"prompt; {len(short)} prompt(s) have fewer candidates")
        elif trie.num_items < G:
            raise ValueError(f"num_generations={G} beams but only {trie.num_items} valid items")
        # ranked by the evaluation's score (the model's own log-probs of the answer tokens), so a group's
        # beam ranks are the ranks evaluate.sh would give; see constrained_beam_search(renormalize=...)
        res = constrained_beam_search(model, input_ids[::G], attn[::G], trie, num_beams=G, allowed_items=allowed)
        self._beam_ranks = list(range(G)) * (n // G)
        self._beam_logps = res.scores.reshape(-1).tolist()
        seqs = res.sequences.reshape(n, -1)
        return self._add_proposals(model, prompts, seqs, trie) if self.propose else seqs

    def _add_proposals(self, model, prompts: list, seqs: torch.LongTensor, trie: ItemTrie) -> torch.LongTensor:
        """The last ``propose`` beams of each group give way to the proposer's items that the group's other
        beams miss (e.g. SASRec's best: items the policy ranks too low to reach its beams, where distillation
        alone cannot move them). Each keeps the policy's own log-prob as its ``beam_logp``, so ``teacher_kl``
        scores it as it scores a beam, and its slot's rank."""
        G, N, tok, space = self.num_generations, self.propose, self.processing_class, self.answer_space
        starts = range(0, seqs.shape[0], G)
        if any((self._rows[g].get("extra_info") or {}).get("candidates") for g in starts):
            raise ValueError("propose: the proposals come from the whole catalogue; rows with candidate lists "
                             "(allowed items) cannot take them")
        cols = trie.items_of(seqs)
        keep = [{space.texts[int(c)] for c in cols[g:g + G - N].tolist()} for g in starts]
        picked = self.proposer([self._rows[g] for g in starts], keep, N)
        seqs = seqs.clone()
        slots, texts = [], []
        for g, group in zip(starts, picked):
            if len(group) != N:
                raise RuntimeError(f"the proposer returned {len(group)} items for a group, not propose={N}")
            for k, text in enumerate(group):
                i = g + G - N + k
                self._put_answer(seqs, i, text)
                slots.append(i)
                texts.append(text)
        for i, lp in zip(slots, answer_logps(tok, [model], [prompts[i] for i in slots], texts)):
            self._beam_logps[i] = lp
        return seqs

    def _vllm_rollouts(self, prompts: list):
        """TRL's vLLM generation (guided by the answer regex), re-tokenised to the canonical trie sequences."""
        prompt_ids, completion_ids, _, kw = super()._generate_single_turn(prompts, None)
        tok = self.processing_class
        space = self.answer_space
        canon = []
        for ids in completion_ids:
            text = tok.decode(ids, skip_special_tokens=True).strip()
            col = space.col_of_text.get(text)
            if col is None:
                raise RuntimeError(f"vLLM guided decoding returned {text!r}, not a valid answer "
                                   f"(max_completion_length too small for the regex?)")
            canon.append(tok(space.texts[col], add_special_tokens=False).input_ids + [tok.eos_token_id])
        return prompt_ids, canon, None, kw

    # ------------------------------------------------------------------ hook 3: beam ranks to rewards
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self._beam_ranks is not None:
            if len(self._beam_ranks) != len(inputs) or len(self._beam_logps) != len(inputs):
                raise RuntimeError("beam ranks do not line up with the batch")
            inputs = [{**row, "beam_rank": r, "beam_logp": lp}
                      for row, r, lp in zip(inputs, self._beam_ranks, self._beam_logps)]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    # ------------------------------------------------------------------ hook 4: constrained log-probs
    def answer_masks(self, completion_ids: torch.LongTensor, allowed: torch.Tensor | None,
                     vocab: int) -> torch.BoolTensor:
        """``[N, T, vocab]``: tokens the constrained policy allows at each completion position.

        Position ``t`` allows what the trie allows after ``completion_ids[:, :t]`` (EOS only
        after a complete answer); positions after the first EOS allow everything (TRL masks
        them out of the loss; this keeps their log-probs finite).
        """
        trie = self._trie(completion_ids.device)
        N, T = completion_ids.shape
        states = torch.empty(N, T, dtype=torch.long, device=completion_ids.device)
        state = torch.zeros(N, dtype=torch.long, device=completion_ids.device)
        for t in range(T):  # T = answer length (a few tokens); vectorised over all rows
            states[:, t] = state
            state = trie.step(state, completion_ids[:, t])
        cum = None if allowed is None else trie.allowed_cumsum(allowed)
        mask = trie.mask_from_state(states.reshape(-1), cum, row_group=T, vocab_size=max(vocab, trie.vocab_size))
        mask = mask[:, :vocab].view(N, T, vocab)
        if trie.pad_token_id != trie.eos_token_id and trie.pad_token_id < vocab:
            mask[..., trie.pad_token_id] &= ~mask[..., trie.eos_token_id]
        is_eos = completion_ids == trie.eos_token_id
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        return mask | after[..., None]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, **extra):
        if not self.constrained or any(v is not None for k, v in extra.items() if k != "num_images"):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **extra)
        allowed = self._logp_allowed
        if allowed is not None and allowed.shape[0] != input_ids.shape[0]:
            raise RuntimeError(f"allowed-item mask has {allowed.shape[0]} rows for {input_ids.shape[0]} sequences")
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_ent = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start:start + batch_size]
            kw = {"input_ids": ids, "attention_mask": attention_mask[start:start + batch_size], "use_cache": False}
            if "logits_to_keep" in self.model_kwarg_keys:
                kw["logits_to_keep"] = logits_to_keep + 1
            logits = model(**kw).logits[:, :-1, :][:, -logits_to_keep:, :] / self.temperature
            comp = ids[:, -logits_to_keep:]
            rows_allowed = None if allowed is None else allowed[start:start + batch_size]
            mask = self.answer_masks(comp, rows_allowed, logits.shape[-1])
            if not bool(mask.gather(-1, comp[..., None]).all()):
                raise RuntimeError("a completion token lies outside the item trie: completions must come from "
                                   "constrained rollouts (or set constrained: false)")
            logits = logits.masked_fill(~mask, float("-inf"))
            all_logps.append(selective_log_softmax(logits, comp))
            if compute_entropy:
                with torch.no_grad():
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    all_ent.append(-(logp.exp() * logp.masked_fill(~mask, 0.0)).sum(-1))
        logps = torch.cat(all_logps, 0)
        return logps, (torch.cat(all_ent, 0) if compute_entropy else None)
