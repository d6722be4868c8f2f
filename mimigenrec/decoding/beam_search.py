"""Trie-constrained beam search that runs each prompt through the model once.

Stock ``generate(num_beams=K)`` copies every prompt K times before the first forward pass,
so almost all of its time in full-ranking evaluation is K identical prefills. Here the
left-padded batch is prefilled once, the first answer token is chosen from that single
distribution, and only then is the KV cache expanded to the beams; every later step feeds
one token per beam. The beam bookkeeping follows stock beam search with
``length_penalty=0, early_stopping=True`` (top ``2K`` continuations, EOS ones among the top
``K`` become finished hypotheses, the best ``K`` others keep running), so the ranking equals
stock constrained ``generate`` (ties aside); ``use_generate=True`` runs that instead.

Two ways to hold the beams' keys and values (``cache_mode``):

- ``"tree"`` (default where the model takes a custom 4D attention mask): one cache row per
  prompt. Each step appends the K beams' new tokens to it, and a 4D mask lets each beam see
  the prompt, its own ancestors and itself, so beams never copy the prompt's cache.
- ``"expand"``: the prompt's cache is copied to K rows after the prefill and reordered to the
  surviving beams at every step (what stock beam search does after its K prefills).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mimigenrec.decoding.trie import ItemTrie, TrieLogitsProcessor

__all__ = ["BeamResult", "constrained_beam_search", "stock_generate_kwargs", "tree_attention_supported"]

NEG_INF = float("-inf")


@dataclass
class BeamResult:
    """Ranked answers per prompt row (best first)."""

    items: torch.LongTensor         # [B, K] item ids, -1 where fewer valid items than K
    scores: torch.FloatTensor       # [B, K] summed log-prob of the answer tokens (-inf on padding)
    sequences: torch.LongTensor     # [B, K, max_len] answer token ids (pad after EOS)
    token_logps: torch.FloatTensor  # [B, K, max_len] per-token log-probs (0 on padding)


def stock_generate_kwargs(num_beams: int, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> dict:
    """Every setting of stock beam search made explicit, so a model's generation_config cannot leak in."""
    return {
        "num_beams": num_beams, "num_return_sequences": num_beams, "length_penalty": 0.0,
        "early_stopping": True, "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
        "min_p": None, "typical_p": None, "epsilon_cutoff": None, "eta_cutoff": None,
        "repetition_penalty": None, "no_repeat_ngram_size": None, "encoder_no_repeat_ngram_size": None,
        "bad_words_ids": None, "num_beam_groups": 1, "diversity_penalty": None, "min_new_tokens": None,
        "min_length": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
        "begin_suppress_tokens": None, "renormalize_logits": False, "max_new_tokens": max_new_tokens,
        "max_length": None, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "output_scores": True,
        "return_dict_in_generate": True, "use_cache": True,
    }


def _finish(trie: ItemTrie, seq: torch.Tensor, logp: torch.Tensor, score: torch.Tensor) -> BeamResult:
    """Items from sequences; pad everything after EOS; -1 / -inf / pad on invalid rows."""
    B, K, L = seq.shape
    flat = seq.reshape(B * K, L)
    items = trie.items_of(flat).view(B, K)
    valid = (items >= 0) & torch.isfinite(score)
    is_eos = flat == trie.eos_token_id
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    keep = ~after.view(B, K, L) & valid[..., None]
    seq = torch.where(keep, seq, trie.pad_token_id)
    logp = torch.where(keep, logp, 0.0)
    return BeamResult(items=torch.where(valid, items, -1), scores=torch.where(valid, score, NEG_INF),
                      sequences=seq, token_logps=logp)


@torch.no_grad()
def _generate_fallback(model, input_ids, attention_mask, trie: ItemTrie, num_beams: int,
                       allowed_items, renormalize: bool) -> BeamResult:
    B, P = input_ids.shape
    proc = TrieLogitsProcessor(trie, P, allowed_items=allowed_items, num_beams=num_beams, renormalize=renormalize)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[proc],
                         **stock_generate_kwargs(num_beams, trie.max_len, trie.eos_token_id, trie.pad_token_id))
    steps = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    gen = out.sequences[:, P:]
    L = trie.max_len
    seq = torch.full((B * num_beams, L), trie.pad_token_id, dtype=torch.long, device=gen.device)
    logp = torch.zeros(B * num_beams, L, dtype=torch.float32, device=gen.device)
    n = min(L, gen.shape[1])
    seq[:, :n] = gen[:, :n]
    logp[:, :n] = steps[:, :n].float()
    logp = torch.nan_to_num(logp, neginf=0.0)
    score = out.sequences_scores.float()
    score = torch.where(score < -1e8, NEG_INF, score)  # stock marks empty hypotheses with -1e9
    return _finish(trie.to(gen.device), seq.view(B, num_beams, L), logp.view(B, num_beams, L),
                   score.view(B, num_beams))


def _log_probs(trie: ItemTrie, logits: torch.Tensor, state: torch.LongTensor, cum, group: int, depth: int,
               renormalize: bool) -> torch.Tensor:
    """Full-vocab log-softmax (stock beam search) or over allowed tokens only; -inf where not allowed."""
    logits = logits.float()
    if renormalize:
        return torch.log_softmax(trie.constrain(logits, state, cum, group, depth), dim=-1)
    return trie.constrain(torch.log_softmax(logits, dim=-1), state, cum, group, depth)


def tree_attention_supported(model) -> bool:
    """Whether ``model`` takes a custom 4D float mask as is: sdpa/eager attention, full attention in every layer."""
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    layer_types = getattr(cfg, "layer_types", None) or ()
    return all(t == "full_attention" for t in layer_types) and not getattr(cfg, "use_sliding_window", False)


def _tree_mask(prompt_mask: torch.Tensor, anc: torch.LongTensor, t: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[B, 1, K, P + (t+1)K]`` mask: beam k at depth t sees the prompt, its ancestors and itself.

    Cache slot ``P + d*K + j`` holds the depth-``d`` token of the beam that was ``j``-th at step ``d``;
    ``anc[b, k]`` lists the slots of beam k's tokens at depths ``0..t-1``.
    """
    B, K = anc.shape[:2]
    P = prompt_mask.shape[1]
    see = torch.zeros(B, K, P + (t + 1) * K, dtype=torch.bool, device=anc.device)
    see[:, :, :P] = prompt_mask.bool()[:, None, :]
    if t:
        see.scatter_(2, anc, True)
    beams = torch.arange(K, device=anc.device)
    see[:, beams, P + t * K + beams] = True
    mask = torch.zeros(see.shape, dtype=dtype, device=anc.device).masked_fill_(~see, torch.finfo(dtype).min)
    return mask[:, None]


@torch.no_grad()
def constrained_beam_search(model, input_ids: torch.LongTensor, attention_mask: torch.LongTensor,
                            trie: ItemTrie, num_beams: int, allowed_items: torch.BoolTensor | None = None,
                            use_generate: bool = False, renormalize: bool = False,
                            cache_mode: str = "auto") -> BeamResult:
    """Top ``num_beams`` items per (left-padded) prompt row by summed answer log-probability.

    ``allowed_items``: optional ``[B, num_items]`` candidate sets (columns in trie order).
    ``renormalize``: score with the constrained policy (log-softmax over allowed tokens only).
    The default, False, is the one score of the project: evaluation, the GRPO watch and beam-mode
    GRPO rollouts all rank by the model's own (full-vocabulary) log-probs of the answer tokens,
    the distribution SFT trains. (Measured on a tiny SFT model, 1,000 valid rows: NDCG@10
    0.0894 with it against 0.0869 renormalised.)
    ``use_generate``: run stock ``model.generate`` beam search with :class:`TrieLogitsProcessor`.
    ``cache_mode``: ``"tree"``, ``"expand"`` (see the module docstring) or ``"auto"`` (tree where
    :func:`tree_attention_supported`).
    """
    if cache_mode not in ("auto", "tree", "expand"):
        raise ValueError(f"cache_mode must be auto, tree or expand, not {cache_mode!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if model.config.is_encoder_decoder:
        raise ValueError("constrained_beam_search supports decoder-only models")
    if use_generate:
        return _generate_fallback(model, input_ids, attention_mask, trie, num_beams, allowed_items, renormalize)

    device = input_ids.device
    trie = trie.to(device)
    B, P = input_ids.shape
    K, L = int(num_beams), trie.max_len
    cum = None
    if allowed_items is not None:
        cum = trie.allowed_cumsum(allowed_items)
        if cum.shape[0] != B:
            raise ValueError(f"allowed_items has {cum.shape[0]} rows for a batch of {B}")

    tree = tree_attention_supported(model) if cache_mode == "auto" else cache_mode == "tree"
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_(min=0)
    # 1. prefill every prompt once; only the last position's logits are needed
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    logits = out.logits[:, -1, :]
    V = logits.shape[-1]
    del out

    root = torch.zeros(B, dtype=torch.long, device=device)
    lp0 = _log_probs(trie, logits, root, cum, 1, 0, renormalize)           # [B, V]
    k0 = min(2 * K, V)
    top_s, top_tok = torch.topk(lp0, k0, dim=-1)                           # [B, k0]
    top_from = torch.zeros_like(top_tok)                                   # all from the single prompt beam

    # running beams (K per row) and finished hypotheses (K per row)
    run_seq = torch.full((B, K, L), trie.pad_token_id, dtype=torch.long, device=device)
    run_lp = torch.zeros(B, K, L, dtype=torch.float32, device=device)
    run_score = torch.full((B, K), NEG_INF, dtype=torch.float32, device=device)
    run_state = torch.zeros(B, K, dtype=torch.long, device=device)
    fin_seq, fin_lp = run_seq.clone(), run_lp.clone()
    fin_score = run_score.clone()
    prev_seq = run_seq[:, :1]          # [B, 1, L]: the single prompt beam before step 0
    prev_lp = run_lp[:, :1]
    prev_state = run_state[:, :1]
    prev_score = torch.zeros(B, 1, dtype=torch.float32, device=device)
    tok_lp_prev = lp0[:, None, :]      # [B, beams, V] token log-probs of the current step

    row = torch.arange(B, device=device)[:, None]
    full_mask = torch.cat([attention_mask.repeat_interleave(K, 0),
                           attention_mask.new_ones(B * K, L)], dim=1)
    next_pos = attention_mask.sum(-1)                                        # [B]
    anc = torch.zeros(B, K, 0, dtype=torch.long, device=device)             # tree: ancestors' cache slots
    ranks = torch.arange(2 * K, device=device)
    for t in range(L):
        if t > 0:
            cand = (prev_score[:, :, None] + tok_lp_prev).reshape(B, -1)    # [B, K*V]
            top_s, idx = torch.topk(cand, 2 * K, dim=-1)
            top_from, top_tok = idx // V, idx % V
        kk = top_s.shape[1]
        # new sequences / log-probs / trie states of the top candidates
        seq = prev_seq[row, top_from].clone()                               # [B, kk, L]
        seq[:, :, t] = top_tok
        lps = prev_lp[row, top_from].clone()
        lps[:, :, t] = tok_lp_prev[row, top_from, top_tok]
        state = trie.step(prev_state[row, top_from].reshape(-1), top_tok.reshape(-1)).view(B, kk)
        finite = torch.isfinite(top_s)
        is_eos = top_tok == trie.eos_token_id
        if t == L - 1:  # max length reached: every continuation stops here (as stock's max-length criterion)
            is_eos = torch.ones_like(is_eos)
        # finished hypotheses: EOS among the top K, unless the row already holds K finished
        full = torch.isfinite(fin_score).all(1, keepdim=True)
        add = is_eos & finite & (ranks[:kk] < K)[None, :] & ~full
        m_score = torch.cat([fin_score, torch.where(add, top_s, NEG_INF)], 1)
        keep = torch.topk(m_score, K, dim=1).indices
        fin_score = m_score.gather(1, keep)
        fin_seq = torch.cat([fin_seq, seq], 1)[row, keep]
        fin_lp = torch.cat([fin_lp, lps], 1)[row, keep]
        if t == L - 1:
            break
        # running beams: the best K continuations that did not stop
        r_score = torch.where(is_eos, NEG_INF, top_s)
        if kk < K:
            r_score = torch.nn.functional.pad(r_score, (0, K - kk), value=NEG_INF)
            seq = torch.nn.functional.pad(seq, (0, 0, 0, K - kk), value=trie.pad_token_id)
            lps = torch.nn.functional.pad(lps, (0, 0, 0, K - kk))
            state = torch.nn.functional.pad(state, (0, K - kk), value=trie.DEAD)
            top_from = torch.nn.functional.pad(top_from, (0, K - kk))
        r_score, sel = torch.topk(r_score, K, dim=1)
        prev_seq, prev_lp, prev_state, prev_score = seq[row, sel], lps[row, sel], state.gather(1, sel), r_score
        if trie.min_len <= t + 1 < L and bool(torch.isfinite(fin_score).all()):
            break  # every row holds K finished hypotheses (only possible with unequal answer lengths)
        # 2. one token per beam through the model
        origin = top_from.gather(1, sel)                                     # [B, K] parent beam
        if tree:  # the K new tokens join the row's cache; the mask keeps each beam on its own path
            if t:
                anc = torch.cat([anc[row, origin], (P + (t - 1) * K + origin)[..., None]], dim=2)
            out = model(input_ids=prev_seq[:, :, t], attention_mask=_tree_mask(attention_mask, anc, t, model.dtype),
                        position_ids=(next_pos + t)[:, None].expand(B, K), past_key_values=cache, use_cache=True)
            logits = out.logits.reshape(B * K, V)
        else:  # copy the prompt's cache to the K beams, then reorder it to the chosen beams
            if t == 0:
                cache.batch_repeat_interleave(K)
            else:
                cache.reorder_cache((row * K + origin).reshape(-1))
            out = model(input_ids=prev_seq[:, :, t].reshape(B * K, 1), attention_mask=full_mask[:, :P + t + 1],
                        position_ids=(next_pos + t).repeat_interleave(K, 0)[:, None], past_key_values=cache,
                        use_cache=True)
            logits = out.logits[:, -1, :]
        cache = out.past_key_values
        del out
        tok_lp_prev = _log_probs(trie, logits, prev_state.reshape(-1), cum, K, t + 1, renormalize).view(B, K, V)
    return _finish(trie, fin_seq, fin_lp, fin_score)
