"""The beam search's score of given answers: log p(answer + EOS | prompt), summed over the answer's tokens.

``answer_logps(tok, models, prompts, answers)`` is what ``constrained_beam_search`` would have given each
answer had a beam found it (the raw log-softmax, EOS included), averaged over ``models``. The teacher
rewards score a group's beams with it, and GRPO's ``propose_cf`` scores the items it puts beside them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["answer_logps", "answer_token_ids"]


def answer_token_ids(tok, prompts: list, answers: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the prompts (chat template applied, as the GRPO trainer renders them) and of the
    answers + EOS."""
    from trl.data_utils import maybe_apply_chat_template

    P = [tok(maybe_apply_chat_template({"prompt": p}, tok)["prompt"], add_special_tokens=False).input_ids
         for p in prompts]
    C = [tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id] for a in answers]
    return P, C


def _padded(rows: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of token rows padded to one length, on the left or the right."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad)
    att = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(L - len(r), L) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        att[i, span] = 1
    return ids, att


@torch.no_grad()
def answer_logps(tok, models: Sequence[torch.nn.Module], prompts: list, answers: list[str]) -> list[float]:
    """Mean over ``models`` of log p(answer + EOS | prompt), summed over the answer's tokens.

    Each distinct prompt is prefilled once per model (a GRPO batch holds a few prompts, each with
    its group of beams); its cache is then copied to its answers, which run as one short batch.
    """
    index: dict[str, int] = {}
    distinct = []
    for p in prompts:
        if repr(p) not in index:
            index[repr(p)] = len(distinct)
            distinct.append(p)
    owner = torch.tensor([index[repr(p)] for p in prompts])
    P, C = answer_token_ids(tok, distinct, answers)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    p_ids, p_att = _padded(P, pad, left=True)      # prompts end at the last column
    c_ids, c_att = _padded(C, pad, left=False)     # answers start at the first
    p_pos = (p_att.cumsum(-1) - 1).clamp(min=0)
    c_pos = p_att.sum(-1)[owner, None] + torch.arange(c_ids.shape[1])
    att = torch.cat([p_att[owner], c_att], 1)
    total = torch.zeros(len(C))
    for m in models:
        dev = m.device
        out = m(input_ids=p_ids.to(dev), attention_mask=p_att.to(dev), position_ids=p_pos.to(dev),
                use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float().log_softmax(-1).cpu()[owner]           # [N, V]: the answer's 1st token
        cache = out.past_key_values
        cache.reorder_cache(owner.to(dev))                                         # one prompt row per answer
        rest = m(input_ids=c_ids.to(dev), attention_mask=att.to(dev), position_ids=c_pos.to(dev),
                 past_key_values=cache, use_cache=False).logits[:, :-1].float().log_softmax(-1).cpu()
        lp = torch.cat([first.gather(-1, c_ids[:, :1]), rest.gather(-1, c_ids[:, 1:, None])[..., 0]], 1)
        total += (lp * c_att).sum(1)
    return (total / len(models)).tolist()
