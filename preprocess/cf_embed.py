"""Collaborative item vectors for the sid stage: SASRec's item embeddings beside the text embeddings.

``sid --cf_weight W`` quantizes ``[unit(text), W * unit(sasrec)]`` per item instead of the text
embedding alone, so items that users take in the same contexts can share SID prefixes, not only
items whose titles read alike (LC-Rec and LETTER add the collaborative signal to the tokenizer in
the same spirit; this is the plain concatenation).

The SASRec is the one ``evaluate.sh`` trains to score the valid split (``mimigenrec.eval``'s
baseline, trained on the train split and stopped on each user's held-out last train row): no valid
or test target reaches the SIDs. It is cached in ``O/baselines`` under a hash of the data and its
settings, so the ``cf_logp`` reward, which uses the same model, does not train it again. Items that
never occur in a train sequence get a zero collaborative part (their text alone places them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def sasrec_item_vectors(data_dir: str | Path, n_items: int) -> np.ndarray:
    """``[n_items, d]`` item embeddings of the valid-protocol SASRec of ``data_dir`` (trained and
    cached on first use); rows of items absent from every train sequence are 0."""
    from mimigenrec.eval.evaluate import split_sasrec

    data, scorer = split_sasrec(data_dir, "valid")
    weight = scorer.model.item_emb.weight[1:].detach().cpu().numpy().astype(np.float32)  # row i = item id i
    out = np.zeros((n_items, weight.shape[1]), dtype=np.float32)
    m = min(n_items, len(weight))
    out[:m] = weight[:m]
    seen = np.zeros(n_items, dtype=bool)
    for seq, _ in data.seqs.training_sequences(("train",)).values():
        seen[[i for i in seq if i < n_items]] = True
    out[~seen] = 0.0
    return out


def with_collaborative(text: np.ndarray, data_dir: str | Path, weight: float) -> np.ndarray:
    """``[unit(text), weight * unit(sasrec)]``; ``text`` unchanged when ``weight`` is 0."""
    if weight <= 0:
        return text
    cf = _unit(sasrec_item_vectors(data_dir, len(text)))  # zero rows (items in no train sequence) stay 0
    return np.concatenate([_unit(text.astype(np.float32)), weight * cf], axis=1).astype(np.float32)
