"""Several causal LMs that share one tokenizer, scored as one: the mean of their log-probabilities.

``EnsembleLM(models)`` answers ``forward`` like a single Hugging Face causal LM whose next-token
log-probabilities are the log-softmax of the members' mean log-probabilities (a product of experts,
renormalised per token), so the constrained beam search ranks an item by the sum of those over its
answer tokens: the mean of the members' summed log-probs plus the per-token normalisers. Each member keeps its own KV cache inside an
:class:`EnsembleCache`, which forwards the cache operations the beam search uses.

The use here: the default recipe trains two SFT seeds and keeps the better on valid; ranking with
both kept checkpoints at once is the cheapest way to use the other one (twice the inference cost,
no training). ``evaluate.sh --model NAME=DIR_A+DIR_B`` builds one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

SEPARATOR = "+"


class EnsembleCache:
    """The members' caches side by side; the beam search's reorder / repeat calls go to each."""

    def __init__(self, caches: Sequence) -> None:
        self.caches = list(caches)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for c in self.caches:
            c.batch_repeat_interleave(repeats)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for c in self.caches:
            c.reorder_cache(beam_idx)


class EnsembleLM(torch.nn.Module):
    """The members' mean log-softmax outputs, returned as logits (a log-softmax then renormalises them)."""

    def __init__(self, models: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if len(models) < 2:
            raise ValueError("an ensemble needs at least two models")
        vocab = {m.get_output_embeddings().weight.shape[0] for m in models}
        if len(vocab) != 1:
            raise ValueError(f"ensemble members have different vocabulary sizes {sorted(vocab)}")
        self.members = torch.nn.ModuleList(models)
        self.config = models[0].config

    @property
    def dtype(self) -> torch.dtype:
        return self.members[0].dtype

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def forward(self, past_key_values: EnsembleCache | None = None, **kwargs) -> CausalLMOutputWithPast:
        caches = past_key_values.caches if past_key_values is not None else [None] * len(self.members)
        outs = [m(past_key_values=c, **kwargs) for m, c in zip(self.members, caches)]
        logp = torch.stack([o.logits.float().log_softmax(-1) for o in outs]).mean(0)
        cache = EnsembleCache([o.past_key_values for o in outs]) if kwargs.get("use_cache") else None
        return CausalLMOutputWithPast(logits=logp, past_key_values=cache)


def split_paths(spec: str) -> list[str]:
    """``"A+B"`` -> ``["A", "B"]``; a single path -> ``[path]``."""
    return [p for p in str(spec).split(SEPARATOR) if p]
