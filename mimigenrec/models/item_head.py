"""An item-scoring head on any causal LM (R2ec's ``rec_head``): one forward pass ranks every item.

* **User state** ``u``: the LM's final hidden state (after its last norm) at a fixed *marker* token
  (the tokenizer's EOS unless ``marker`` names another token) appended right after the prompt, or
  after generated reasoning: ``prompt + reasoning + marker``. The prompt is the ``sid_seq`` (or
  ``title_seq2sid``) prompt of :mod:`mimigenrec.prompts`, rendered by the chat template.
* **Item embeddings** ``E``: ``item_source: lm`` = the same LM's final hidden state at the marker
  after each item's text (``item_view``: its title, SID or both, as :mod:`mimigenrec.prompts` writes
  them), cached and refreshed on a schedule by the trainers; ``item_source: table`` = a learned
  ``[num_items, hidden]`` table, initialised from those LM encodings.
  ``item_pooling: mean`` averages the item text's states instead: a model trained from scratch starts
  with every marker state nearly equal (the marker token dominates it), where ``last`` cannot learn.
* **Score** ``s(u, i) = u · E_i / temperature``.

Saved as a normal Hugging Face model folder (``AutoModelForCausalLM.from_pretrained`` still loads
it) plus ``item_head.json`` (the head's settings, item ids and texts) and ``item_head.safetensors``
(``E``). Sequences are left-padded with position ids from the attention mask, so a row's state does
not depend on its batch-mates.
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimigenrec import prompts
from mimigenrec.eval.metrics import rank_by_score

__all__ = ["HEAD_CONFIG", "HEAD_WEIGHTS", "HeadConfig", "ItemHeadModel", "cut_at_eos", "is_head_dir", "item_text",
           "last_hidden", "pad_left", "user_prompt"]

HEAD_CONFIG = "item_head.json"
HEAD_WEIGHTS = "item_head.safetensors"
ITEM_SOURCES = ("lm", "table")
ITEM_VIEWS = ("title", "sid", "title_sid")
USER_TASKS = ("sid_seq", "title_seq2sid")


@dataclass
class HeadConfig:
    """What a head is; saved as ``item_head.json``. ``item_ids[c]`` is the item of column ``c``."""

    item_ids: list[int]
    item_texts: list[str]
    item_source: str = "lm"
    item_view: str = "sid"
    item_pooling: str = "last"         # item encoding: state at the marker (R2ec) or mean over the item text
    temperature: float = 1.0
    task: str = "sid_seq"
    marker: str | None = None          # None = the tokenizer's EOS
    reasoning: bool = False            # user state after greedy reasoning (set by RecPO)
    max_reasoning_tokens: int = 64
    max_item_tokens: int = 64
    max_prompt_tokens: int = 1024
    extra: dict = field(default_factory=dict)  # provenance (training settings), not read back

    def __post_init__(self) -> None:
        if self.item_source not in ITEM_SOURCES:
            raise ValueError(f"item_source must be one of {ITEM_SOURCES}, got {self.item_source!r}")
        if self.item_view not in ITEM_VIEWS:
            raise ValueError(f"item_view must be one of {ITEM_VIEWS}, got {self.item_view!r}")
        if self.item_pooling not in ("last", "mean"):
            raise ValueError(f"item_pooling must be last or mean, got {self.item_pooling!r}")
        if self.task not in USER_TASKS:
            raise ValueError(f"task must be one of {USER_TASKS}, got {self.task!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if len(self.item_ids) != len(self.item_texts) or not self.item_ids:
            raise ValueError(f"{len(self.item_ids)} item ids for {len(self.item_texts)} item texts")
        if len(set(self.item_ids)) != len(self.item_ids):
            raise ValueError("item_ids holds duplicates")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HeadConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown head settings {unknown}")
        return cls(**{**d, "item_ids": [int(i) for i in d["item_ids"]]})


def item_text(view: str, item: int, items: Mapping[int, Mapping[str, Any]],
              id2sid: Mapping[int, Sequence[str]] | None = None) -> str:
    """An item's text for the LM encoder: its title line and/or SID line from :mod:`mimigenrec.prompts`."""
    parts = []
    if view in ("title", "title_sid"):
        parts.append(prompts.build_input("title2sid", item=item, items=items))
    if view in ("sid", "title_sid"):
        if id2sid is None or item not in id2sid:
            raise ValueError(f"item {item}: item_view {view!r} needs its SID (id2sid.json)")
        parts.append(prompts.build_input("sid2title", item=item, items=items, id2sid=id2sid))
    return "\n".join(parts)


def user_prompt(tokenizer: Any, task: str, history: Sequence[int], items: Mapping[int, Mapping[str, Any]],
                id2sid: Mapping[int, Sequence[str]] | None = None, captions: Mapping[int, str] | None = None) -> str:
    """The rendered ``task`` prompt of a history: the text SFT, RL and evaluation feed a model."""
    text = prompts.build_input(task, history=history, items=items, id2sid=id2sid, captions=captions)
    return prompts.render_prompt(tokenizer, prompts.chat_messages(prompts.sft_row(task, text, "")))


def is_head_dir(path: str | Path) -> bool:
    """True for a folder written by :meth:`ItemHeadModel.save_pretrained`."""
    return (Path(path) / HEAD_CONFIG).is_file()


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded ``(input_ids, attention_mask)``."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, n - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[r, n - len(s):] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(ids: Sequence[int], eos: int | None, pad: int | None = None) -> list[int]:
    """Tokens before the first EOS; without one, trailing pad tokens dropped (a truncated completion)."""
    ids = list(ids)
    if eos is not None and eos in ids:
        return ids[:ids.index(eos)]
    while ids and pad is not None and ids[-1] == pad:
        ids.pop()
    return ids


def _forward_keys(lm: nn.Module) -> set[str]:
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    base = getattr(base, "module", base)  # DDP
    return set(inspect.signature(base.forward).parameters)


def last_hidden(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pooling: str = "last") -> torch.Tensor:
    """``[B, hidden]``: the final hidden state at the last position of left-padded rows
    (``pooling="mean"``: averaged over the unpadded positions)."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": pos,
                          "output_hidden_states": True, "use_cache": False}
    if "logits_to_keep" in _forward_keys(lm):
        kw["logits_to_keep"] = 1
    h = lm(**kw).hidden_states[-1]
    if pooling == "last":
        return h[:, -1]
    m = attention_mask.to(h.dtype)[..., None]
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def _hidden_size(lm: nn.Module) -> int:
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    return int(cfg.hidden_size)


class ItemHeadModel(nn.Module):
    """A causal LM (``.lm``) + item embeddings + the scoring rule; see the module docstring.

    ``forward(input_ids, attention_mask, labels)`` (labels = item *columns*) returns the softmax
    cross-entropy over the catalogue (``num_negatives`` > 0: over the targets + that many uniformly
    sampled items) and is what the warm-up trainer calls; with ``item_grad`` (``lm`` items) every
    scored item is encoded afresh with gradient, so the loss trains the item encoder too.
    """

    def __init__(self, lm: nn.Module, tokenizer: Any, cfg: HeadConfig, item_emb: torch.Tensor | None = None) -> None:
        super().__init__()
        self.lm, self.tokenizer, self.cfg = lm, tokenizer, cfg
        self.col_of = {int(i): c for c, i in enumerate(cfg.item_ids)}
        emb = torch.zeros(len(cfg.item_ids), _hidden_size(lm)) if item_emb is None else item_emb.detach().float()
        if emb.shape != (len(cfg.item_ids), _hidden_size(lm)):
            raise ValueError(f"item embeddings {tuple(emb.shape)} do not fit {len(cfg.item_ids)} items x "
                             f"hidden size {_hidden_size(lm)}")
        if cfg.item_source == "table":
            self.item_table = nn.Parameter(emb.clone())
        else:
            self.register_buffer("item_cache", emb.clone(), persistent=False)
        self.marker_id = self._marker_id()
        self.num_negatives = 0
        self.item_grad = False
        self._item_tokens: list[list[int]] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, lm: nn.Module, tokenizer: Any, cfg: HeadConfig, batch_size: int = 64) -> ItemHeadModel:
        """A new head on ``lm``: adds a marker token the tokenizer lacks, encodes every item with the LM."""
        if cfg.marker and cfg.marker not in tokenizer.get_vocab():
            from tokenizers import AddedToken

            tokenizer.add_tokens([AddedToken(cfg.marker, normalized=False, special=False)])
            lm.resize_token_embeddings(len(tokenizer))
        head = cls(lm, tokenizer, cfg)
        emb = head.encode_items(batch_size)
        with torch.no_grad():
            head.item_embeddings().copy_(emb)
        return head

    def _marker_id(self) -> int:
        tok = self.tokenizer
        if self.cfg.marker is None:
            if tok.eos_token_id is None:
                raise ValueError("the tokenizer has no EOS token: set the head's marker to a token")
            return int(tok.eos_token_id)
        mid = tok.convert_tokens_to_ids(self.cfg.marker)
        if mid is None or (tok.unk_token_id is not None and mid == tok.unk_token_id):
            raise ValueError(f"marker {self.cfg.marker!r} is not a token of the tokenizer")
        return int(mid)

    @property
    def config(self):  # what Trainer / TRL look up on a model
        return self.lm.config

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    # ------------------------------------------------------------------ tokens
    def item_tokens(self) -> list[list[int]]:
        """Every item's text tokens (truncated) + marker, in column order."""
        if self._item_tokens is None:
            enc = self.tokenizer(list(self.cfg.item_texts), add_special_tokens=False).input_ids
            n = max(1, self.cfg.max_item_tokens - 1)
            self._item_tokens = [list(ids[:n]) + [self.marker_id] for ids in enc]
        return self._item_tokens

    def user_tokens(self, prompt: str, reasoning: Sequence[int] | None = None) -> list[int]:
        """``prompt`` tokens (cut from the left to ``max_prompt_tokens``) + reasoning tokens + marker."""
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        ids = ids[-max(1, self.cfg.max_prompt_tokens - 1):]
        return list(ids) + list(reasoning or []) + [self.marker_id]

    # ------------------------------------------------------------------ encoding and scoring
    def encode(self, seqs: Sequence[Sequence[int]], batch_size: int = 64, lm: nn.Module | None = None,
               pooling: str = "last") -> torch.Tensor:
        """``[len(seqs), hidden]`` float32 states at the last token of each sequence (``pooling="mean"``:
        their mean over the sequence); gradients as the caller's."""
        lm = self.lm if lm is None else lm
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.marker_id
        out = []
        for s in range(0, len(seqs), batch_size):
            ids, mask = pad_left(seqs[s:s + batch_size], pad, self.device)
            out.append(last_hidden(lm, ids, mask, pooling).float())
        return torch.cat(out) if out else torch.zeros(0, _hidden_size(self.lm), device=self.device)

    @torch.no_grad()
    def encode_items(self, batch_size: int = 64, lm: nn.Module | None = None) -> torch.Tensor:
        """Every item's LM encoding (eval mode, no grad), in column order."""
        lm = self.lm if lm is None else lm
        was = lm.training
        lm.eval()
        try:
            return self.encode(self.item_tokens(), batch_size, lm, self.cfg.item_pooling)
        finally:
            lm.train(was)

    def refresh_items(self, batch_size: int = 64, lm: nn.Module | None = None) -> bool:
        """``lm`` items: re-encode the catalogue into the cache (True); a table is left alone (False)."""
        if self.cfg.item_source != "lm":
            return False
        self.item_cache.copy_(self.encode_items(batch_size, lm))
        return True

    def item_embeddings(self) -> torch.Tensor:
        """``[num_items, hidden]``: the learned table or the cached LM encodings."""
        return self.item_table if self.cfg.item_source == "table" else self.item_cache

    def scores(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N]`` = users · items^T / temperature (items default: every item, in column order)."""
        items = self.item_embeddings() if items is None else items
        return users.float() @ items.float().T / self.cfg.temperature

    def rank(self, scores: torch.Tensor, k: int) -> list[list[int]]:
        """Top-``k`` item ids per row of ``[B, num_items]`` scores (ties -> smaller item id)."""
        return rank_by_score(scores, self.cfg.item_ids, k)

    def target_ranks(self, scores: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """0-based rank of column ``cols[b]`` in row ``b`` of ``[B, num_items]`` scores, ties -> smaller item id
        (the order of :meth:`rank`)."""
        cols = cols.long().to(scores.device)
        s = scores.float()
        t = s.gather(1, cols[:, None])
        ids = torch.as_tensor(self.cfg.item_ids, device=scores.device)
        ahead = (s > t) | ((s == t) & (ids[None, :] < ids[cols][:, None]))
        return ahead.sum(1)

    @torch.no_grad()
    def reason(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, lm: nn.Module | None = None,
               batch_size: int = 16) -> list[list[int]]:
        """Greedy reasoning tokens after each prompt, up to (not including) the first EOS."""
        from transformers import GenerationConfig

        from mimigenrec.rl.grpo import neutral_generation_config

        lm = self.lm if lm is None else lm
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=pad)
        out: list[list[int]] = []
        was = lm.training
        lm.eval()
        try:
            with neutral_generation_config(lm):
                for s in range(0, len(prompts), batch_size):
                    ids, mask = pad_left(prompts[s:s + batch_size], pad, self.device)
                    gen = lm.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1]:]
                    out += [cut_at_eos(g, tok.eos_token_id, pad) for g in gen.tolist()]
        finally:
            lm.train(was)
        return out

    def softmax_loss(self, users: torch.Tensor, labels: torch.Tensor, lm: nn.Module | None = None) -> torch.Tensor:
        """Cross-entropy of the target columns ``labels`` over the catalogue (or targets + sampled negatives)."""
        E = self.item_embeddings()
        n = E.shape[0]
        labels = labels.long().to(E.device)
        if 0 < self.num_negatives and self.num_negatives + labels.numel() < n:
            neg = torch.randint(n, (self.num_negatives,), device=E.device)
            cols = torch.unique(torch.cat([labels, neg]))  # sorted
        else:
            cols = torch.arange(n, device=E.device)
        if self.item_grad and self.cfg.item_source == "lm":
            # every scored item encoded now, with gradient: a fresh target among stale cached negatives would
            # win by staleness alone (the loss falls while the ranking does not improve)
            toks = self.item_tokens()
            used = self.encode([toks[c] for c in cols.tolist()], max(64, len(users)), lm, self.cfg.item_pooling)
        else:
            used = E[cols].float()
        logits = self.scores(users, used)
        return nn.functional.cross_entropy(logits, torch.searchsorted(cols, labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"loss"}`` given target columns ``labels``, else ``{"scores"}`` over every item."""
        users = last_hidden(self.lm, input_ids, attention_mask).float()
        if labels is None:
            return {"scores": self.scores(users)}
        return {"loss": self.softmax_loss(users, labels)}

    # ------------------------------------------------------------------ files
    def save_pretrained(self, out_dir: str | Path, **kwargs: Any) -> None:
        """The LM and tokenizer as a normal HF folder + ``item_head.json`` + ``item_head.safetensors``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(out, **kwargs)
        self.tokenizer.save_pretrained(out)
        self.save_head(out)

    def save_head(self, out_dir: str | Path) -> None:
        """Only the head's files (beside an LM saved by someone else, e.g. TRL)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        text = json.dumps(asdict(self.cfg), ensure_ascii=False, indent=1)
        # the settings also ride in the weights' metadata, so a model fingerprint (weights files) covers them
        save_file({"item_emb": self.item_embeddings().detach().float().cpu().contiguous()}, str(out / HEAD_WEIGHTS),
                  metadata={"item_head": text})
        (out / HEAD_CONFIG).write_text(text, encoding="utf-8")

    @staticmethod
    def read_config(path: str | Path) -> HeadConfig:
        p = Path(path) / HEAD_CONFIG
        return HeadConfig.from_dict(json.loads(p.read_text(encoding="utf-8")))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, **kwargs: Any) -> ItemHeadModel:
        """Load a folder written by :meth:`save_pretrained` (``kwargs`` go to the LM's ``from_pretrained``)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        cfg = cls.read_config(path)
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
        emb = load_file(str(path / HEAD_WEIGHTS))["item_emb"]
        return cls(lm, tok, cfg, emb).to(device)

    def load_weights(self, path: str | Path) -> None:
        """Load the LM weights and item embeddings of a saved folder into this head (for resuming)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        state = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
        self.lm.load_state_dict(state)
        with torch.no_grad():
            self.item_embeddings().copy_(load_file(str(Path(path) / HEAD_WEIGHTS))["item_emb"])
