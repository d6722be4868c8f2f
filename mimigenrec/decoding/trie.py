"""Tensorised item trie and the logits processor that constrains generation to valid items.

Every valid answer is a token-id sequence ending in EOS (an item's SID tokens, or a
candidate reference such as ``[ITEM_12]``). The trie stores them as flat tensors so that
the state of every row (batch × beams) is found with a few vectorised look-ups and the
mask of allowed next tokens with one gather + scatter: no Python loop over rows or beams and
no host synchronisation on the hot path.

Layout (items sorted lexicographically by token sequence, so every node's items form a
contiguous range ``[lo, hi)`` of the sorted order):

* nodes are numbered so that the children of each node are contiguous in the edge arrays,
  sorted by token: ``edge_tok[e]``, ``edge_child[e]`` for ``e`` in
  ``[node_start[n], node_start[n + 1])``;
* ``edge_key = parent * vocab + token`` is strictly increasing, so one ``searchsorted``
  moves every row one token down the trie;
* per-row candidate sets become prefix sums over the sorted item order: a child is allowed
  iff its item range holds at least one allowed item.

States: a node id, ``DEAD`` (left the trie) or a terminal node (a complete answer). After
a complete answer only EOS / pad are allowed; the same holds for dead rows and for rows with
no allowed continuation, so sampling never sees an all ``-inf`` row.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch
from transformers import LogitsProcessor

from mimigenrec import prompts

__all__ = ["ItemTrie", "TrieLogitsProcessor"]

_TENSORS = ("edge_key", "edge_tok", "edge_child", "node_start", "node_deg", "node_lo", "node_hi",
            "node_item_pos", "item_ids", "sorted_to_orig", "special_toks")


class ItemTrie:
    """All valid answers as token-id sequences (each ends with EOS), tensorised.

    Item columns of ``allowed_items`` masks follow the construction order (``item_ids``).
    """

    def __init__(self, seqs: Sequence[Sequence[int]], item_ids: Sequence[int] | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 vocab_size: int | None = None) -> None:
        seqs = [tuple(int(t) for t in s) for s in seqs]
        if not seqs:
            raise ValueError("ItemTrie needs at least one sequence")
        if any(len(s) == 0 for s in seqs):
            raise ValueError("ItemTrie: empty token sequence")
        ids = list(range(len(seqs))) if item_ids is None else [int(i) for i in item_ids]
        if len(ids) != len(seqs):
            raise ValueError(f"ItemTrie: {len(seqs)} sequences but {len(ids)} item ids")
        if len(set(ids)) != len(ids):
            raise ValueError("ItemTrie: duplicate item ids")
        if eos_token_id is None:
            lasts = {s[-1] for s in seqs}
            if len(lasts) != 1:
                raise ValueError("ItemTrie: sequences end in different tokens; pass eos_token_id")
            eos_token_id = lasts.pop()
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(self.eos_token_id if pad_token_id is None else pad_token_id)
        max_tok = max(max(s) for s in seqs)
        self.vocab_size = int(vocab_size) if vocab_size is not None else max(
            max_tok, self.eos_token_id, self.pad_token_id) + 1
        if max_tok >= self.vocab_size or min(min(s) for s in seqs) < 0:
            raise ValueError(f"ItemTrie: token ids must lie in [0, {self.vocab_size})")

        order = sorted(range(len(seqs)), key=lambda i: seqs[i])
        for a, b in pairwise(order):
            sa, sb = seqs[a], seqs[b]
            if sa == sb:
                raise ValueError(f"ItemTrie: items {ids[a]} and {ids[b]} share the answer {list(sa)}")
            if sb[:len(sa)] == sa:
                raise ValueError(f"ItemTrie: answer of item {ids[a]} is a prefix of item {ids[b]}'s")
        self.max_len = max(len(s) for s in seqs)
        self.min_len = min(len(s) for s in seqs)
        self.num_items = len(seqs)
        self._build([seqs[i] for i in order])
        self.item_ids = torch.tensor(ids, dtype=torch.long)
        self.sorted_to_orig = torch.tensor(order, dtype=torch.long)
        self._id_to_col = {i: c for c, i in enumerate(ids)}
        self.special_toks = torch.tensor([self.eos_token_id, self.pad_token_id], dtype=torch.long)
        self.device = torch.device("cpu")

    def _build(self, sorted_seqs: list[tuple[int, ...]]) -> None:
        """Breadth-first numbering: node 0 is the root; children of a node are contiguous.

        A frontier entry ``(node, lo, hi)`` is a node and the sorted items ``[lo, hi)`` below it.
        Nodes are visited in id order, so edges come out sorted by (parent, token).
        """
        node_lo, node_hi, node_item = [0], [len(sorted_seqs)], [-1]
        starts, keys, toks, childs = [], [], [], []
        frontier = [(0, 0, len(sorted_seqs))]
        depth, depth_fanout = 0, []
        while frontier:
            nxt = []
            for node, lo, hi in frontier:
                assert node == len(starts)
                starts.append(len(toks))
                i = lo
                while i < hi:
                    if len(sorted_seqs[i]) == depth:  # terminal: no children (prefix-freeness checked)
                        break
                    tok, j = sorted_seqs[i][depth], i + 1
                    while j < hi and sorted_seqs[j][depth] == tok:
                        j += 1
                    child = len(node_lo)
                    node_lo.append(i)
                    node_hi.append(j)
                    node_item.append(i if len(sorted_seqs[i]) == depth + 1 else -1)
                    keys.append(node * self.vocab_size + tok)
                    toks.append(tok)
                    childs.append(child)
                    nxt.append((child, i, j))
                    i = j
            fan = [starts[n + 1] - starts[n] if n + 1 < len(starts) else len(toks) - starts[n] for n, _, _ in frontier]
            depth_fanout.append(max(fan))
            frontier = nxt
            depth += 1
        n_nodes = len(node_lo)
        node_start = torch.tensor(starts + [len(toks), len(toks)], dtype=torch.long)  # + DEAD, + end
        deg = node_start[1:] - node_start[:-1]
        self.num_nodes = n_nodes
        self.DEAD = n_nodes  # absorbing state for rows that left the trie
        self.edge_key = torch.tensor(keys, dtype=torch.long)
        self.edge_tok = torch.tensor(toks, dtype=torch.long)
        self.edge_child = torch.tensor(childs, dtype=torch.long)
        self.node_start = node_start[:-1].contiguous()       # [n_nodes + 1]
        self.node_deg = deg.contiguous()                     # [n_nodes + 1], DEAD has 0
        self.node_lo = torch.tensor(node_lo + [0], dtype=torch.long)
        self.node_hi = torch.tensor(node_hi + [0], dtype=torch.long)
        self.node_item_pos = torch.tensor(node_item + [-1], dtype=torch.long)  # sorted position at terminals
        self.max_fanout = int(deg.max())
        self.depth_fanout = depth_fanout  # host ints: max children of a node at each depth

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_sequences(cls, seqs: Sequence[Sequence[int]], item_ids: Sequence[int] | None = None,
                       **kw) -> ItemTrie:
        """Trie over explicit token sequences (each a complete answer ending in EOS).

        Keyword options: ``eos_token_id`` (default: the common last token), ``pad_token_id``
        (default: EOS), ``vocab_size`` (default: largest id + 1; pass the model's to get masks
        of its width).
        """
        return cls(seqs, item_ids, **kw)

    @classmethod
    def _from_strings(cls, texts: Mapping[int, str], tokenizer, check) -> ItemTrie:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("tokenizer has no eos_token_id")
        ids, seqs = [], []
        for item, text in texts.items():
            toks = tokenizer(text, add_special_tokens=False).input_ids
            check(item, toks)
            ids.append(int(item))
            seqs.append(list(toks) + [eos])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(seqs, ids, eos_token_id=eos, pad_token_id=pad, vocab_size=len(tokenizer))

    @classmethod
    def from_id2sid(cls, id2sid: Mapping[int, Sequence[str]], tokenizer) -> ItemTrie:
        """Trie over ``id2sid`` answers, tokenized exactly as the template renders them (+ EOS).

        Every SID token must be one token of ``tokenizer`` (added with ``add_tokens``).
        """
        sids = {int(i): list(s) for i, s in id2sid.items()}

        def check(item, toks):
            if len(toks) != len(sids[item]):
                raise ValueError(f"item {item}: SID {sids[item]} tokenizes to {len(toks)} tokens, "
                                 f"expected one per SID token (were the SID tokens added to the tokenizer?)")
        return cls._from_strings({i: prompts.sid_string(s) for i, s in sids.items()}, tokenizer, check)

    @classmethod
    def from_texts(cls, texts: Mapping[int, str], tokenizer) -> ItemTrie:
        """Trie over arbitrary answer strings per item (e.g. ``prompts.item_ref(i)``) + EOS."""
        return cls._from_strings({int(i): t for i, t in texts.items()}, tokenizer, lambda item, toks: None)

    # ------------------------------------------------------------------ device
    def to(self, device) -> ItemTrie:
        """A copy whose tensors live on ``device`` (self if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        new = object.__new__(ItemTrie)
        new.__dict__.update(self.__dict__)
        for name in _TENSORS:
            setattr(new, name, getattr(self, name).to(device))
        new.device = device
        return new

    # ------------------------------------------------------------------ state walking
    def step(self, state: torch.LongTensor, tok: torch.LongTensor) -> torch.LongTensor:
        """Move every row one token down: ``state[N]``, ``tok[N]`` -> next state ``[N]``.

        A terminal node stays put on EOS / pad; any other unknown move leads to ``DEAD``.
        """
        query = state * self.vocab_size + tok
        idx = torch.searchsorted(self.edge_key, query).clamp_(max=self.edge_key.numel() - 1)
        found = self.edge_key[idx] == query
        nxt = torch.where(found, self.edge_child[idx], self.DEAD)
        terminal = self.node_item_pos[state] >= 0
        stay = terminal & ((tok == self.eos_token_id) | (tok == self.pad_token_id))
        return torch.where(stay, state, nxt)

    def walk(self, answer_prefix: torch.LongTensor) -> torch.LongTensor:
        """State reached by each row of ``answer_prefix`` ``[N, T]`` from the root: ``[N]``."""
        prefix = answer_prefix.to(self.device, torch.long)
        state = torch.zeros(prefix.shape[0], dtype=torch.long, device=self.device)
        for t in range(prefix.shape[1]):  # T <= a few tokens; vectorised over all rows
            state = self.step(state, prefix[:, t])
        return state

    def items_of(self, seqs: torch.LongTensor) -> torch.LongTensor:
        """Item id of each complete answer in ``seqs`` ``[N, T]`` (pad after EOS allowed), else -1."""
        pos = self.node_item_pos[self.walk(seqs)]
        out = self.item_ids[self.sorted_to_orig[pos.clamp(min=0)]]
        return torch.where(pos >= 0, out, torch.full_like(out, -1)).to(seqs.device)

    def item_of(self, token_ids: Sequence[int]) -> int | None:
        """Item id of one complete answer, or None."""
        ids = list(token_ids)
        if not ids:
            return None
        item = int(self.items_of(torch.tensor([ids], dtype=torch.long, device=self.device))[0])
        return None if item < 0 else item

    def candidates_mask(self, candidates: Sequence[Sequence[int]]) -> torch.BoolTensor:
        """Per-row candidate item ids -> ``[len(candidates), num_items]`` mask in column order."""
        mask = torch.zeros(len(candidates), self.num_items, dtype=torch.bool)
        for r, cands in enumerate(candidates):
            try:
                cols = [self._id_to_col[int(c)] for c in cands]
            except KeyError as e:
                raise KeyError(f"candidate row {r}: item {e.args[0]} is not in the trie") from None
            mask[r, cols] = True
        return mask.to(self.device)

    # ------------------------------------------------------------------ masks
    def fanout(self, depth: int | None) -> int:
        """Most children any node at ``depth`` has (a live row after ``depth`` answer tokens sits
        at that depth; complete and dead rows have none); all depths when None."""
        if depth is None:
            return max(self.max_fanout, 1)
        return max(self.depth_fanout[depth] if depth < len(self.depth_fanout) else 0, 1)

    def _children(self, state: torch.LongTensor, allowed_cum: torch.LongTensor | None,
                  row_group: int = 1, depth: int | None = None) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Child tokens ``[N, F]`` of each state and which are allowed ``[N, F]``.

        ``allowed_cum``: ``[B, num_items + 1]`` prefix sums of allowed items in sorted order;
        row ``r`` uses ``allowed_cum[r // row_group]``. ``depth``: see :meth:`fanout`.
        """
        fan = self.fanout(depth)
        k = torch.arange(fan, device=self.device)
        edge = self.node_start[state][:, None] + k                 # [N, F]
        valid = k < self.node_deg[state][:, None]
        edge = torch.where(valid, edge, 0).clamp_(max=max(self.edge_tok.numel() - 1, 0))
        toks = self.edge_tok[edge]
        if allowed_cum is not None:
            child = self.edge_child[edge]
            rows = torch.arange(state.shape[0], device=self.device) // row_group
            cum = allowed_cum[rows]                                # [N, I + 1]
            cnt = cum.gather(1, self.node_hi[child]) - cum.gather(1, self.node_lo[child])
            valid = valid & (cnt > 0)
        return toks, valid

    def allowed_cumsum(self, allowed_items: torch.BoolTensor) -> torch.LongTensor:
        """``[B, num_items]`` mask (column order) -> ``[B, num_items + 1]`` prefix sums in sorted order."""
        if allowed_items.shape[-1] != self.num_items:
            raise ValueError(f"allowed_items has {allowed_items.shape[-1]} columns, trie has {self.num_items} items")
        srt = allowed_items.to(self.device)[:, self.sorted_to_orig].long()
        return torch.nn.functional.pad(srt.cumsum(1), (1, 0))

    def mask_from_state(self, state: torch.LongTensor, allowed_cum: torch.LongTensor | None = None,
                        row_group: int = 1, vocab_size: int | None = None,
                        depth: int | None = None) -> torch.BoolTensor:
        """``[N, vocab]`` mask of allowed next tokens for trie states ``[N]`` (reached after ``depth`` tokens)."""
        vocab = vocab_size or self.vocab_size
        toks, valid = self._children(state, allowed_cum, row_group, depth)
        n = state.shape[0]
        mask = torch.zeros(n, vocab + 1, dtype=torch.bool, device=self.device)
        mask.scatter_(1, torch.where(valid, toks, vocab), True)
        mask = mask[:, :vocab]
        # complete / dead / exhausted rows: only EOS and pad (keeps sampling well-defined)
        stuck = ~valid.any(1)
        mask[:, self.special_toks] |= stuck[:, None]
        return mask

    def allowed_mask(self, answer_prefix: torch.LongTensor,
                     allowed_items: torch.BoolTensor | None = None) -> torch.BoolTensor:
        """``[N, vocab]`` mask of allowed next tokens after each row's answer prefix ``[N, T]``.

        ``allowed_items``: optional ``[B, num_items]`` candidate sets with ``N`` a multiple of ``B``;
        row ``r`` uses set ``r // (N // B)`` (beams / return sequences are contiguous per row).
        """
        state = self.walk(answer_prefix)
        cum, group = None, 1
        if allowed_items is not None:
            cum = self.allowed_cumsum(allowed_items)
            group = _group(answer_prefix.shape[0], cum.shape[0])
        return self.mask_from_state(state, cum, group, depth=answer_prefix.shape[1]).to(answer_prefix.device)

    def constrain(self, scores: torch.Tensor, state: torch.LongTensor, allowed_cum: torch.LongTensor | None = None,
                  row_group: int = 1, depth: int | None = None) -> torch.Tensor:
        """``scores`` ``[N, V]`` with ``-inf`` wherever the next token is not allowed (one pass over N x V)."""
        toks, valid = self._children(state, allowed_cum, row_group, depth)
        n, vocab = scores.shape
        valid = valid & (toks < vocab)
        stuck = ~valid.any(1, keepdim=True)
        # children of a node have distinct tokens; every slot not written goes to a dump column
        idx = torch.cat([torch.where(valid, toks, vocab),
                         torch.where(stuck, self.special_toks[None, :], vocab)], 1)
        out = torch.full((n, vocab + 1), float("-inf"), dtype=scores.dtype, device=scores.device)
        out.scatter_(1, idx, scores.gather(1, idx.clamp(max=vocab - 1)))
        return out[:, :vocab].contiguous()

    def __repr__(self) -> str:
        return (f"ItemTrie(num_items={self.num_items}, num_nodes={self.num_nodes}, max_len={self.max_len}, "
                f"max_fanout={self.max_fanout}, vocab_size={self.vocab_size}, device={self.device})")


def _group(n_rows: int, n_sets: int) -> int:
    if n_sets == 0 or n_rows % n_sets:
        raise ValueError(f"{n_rows} rows cannot be split evenly over {n_sets} candidate sets")
    return n_rows // n_sets


class TrieLogitsProcessor(LogitsProcessor):
    """Sets scores of tokens that leave the item trie to ``-inf``.

    ``prompt_length``: width of the (left-padded) prompt batch; the answer starts there.
    ``allowed_items``: optional ``[batch, num_items]`` candidate sets; row ``i`` of the batch
    (and all its beams / return sequences) may only produce its own candidates.
    ``renormalize``: return log-softmax over the allowed tokens (the constrained policy), which
    changes beam-search scores but not greedy or sampling choices.
    """

    def __init__(self, trie: ItemTrie, prompt_length: int, allowed_items: torch.BoolTensor | None = None,
                 num_beams: int = 1, renormalize: bool = False) -> None:
        self.trie = trie
        self.prompt_length = int(prompt_length)
        self.allowed_items = allowed_items
        self.num_beams = int(num_beams)
        self.renormalize = renormalize
        self._cache: dict[torch.device, tuple[ItemTrie, torch.LongTensor | None]] = {}

    def _on(self, device: torch.device) -> tuple[ItemTrie, torch.LongTensor | None]:
        if device not in self._cache:
            trie = self.trie.to(device)
            cum = None if self.allowed_items is None else trie.allowed_cumsum(self.allowed_items)
            self._cache[device] = (trie, cum)
        return self._cache[device]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        trie, cum = self._on(scores.device)
        group = 1 if cum is None else _group(scores.shape[0], cum.shape[0])
        prefix = input_ids[:, self.prompt_length:]
        out = trie.constrain(scores, trie.walk(prefix), cum, group, depth=prefix.shape[1])
        if self.renormalize:
            out = torch.log_softmax(out.float(), dim=-1).to(scores.dtype)
        return out
