"""Decoding over the item space: :mod:`mimigenrec.decoding.trie` (the semantic-ID prefix trie and its
logits constraint) and :mod:`mimigenrec.decoding.beam_search` (trie-constrained beam search, shared by
evaluation and the GRPO beam rollouts)."""
