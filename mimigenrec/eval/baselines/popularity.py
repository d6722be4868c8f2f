"""Most-popular baseline: every user gets the items ranked by interaction count.

Counts cover every interaction known before the evaluated split (train, + valid when the
test split is evaluated), rebuilt from the rows (:meth:`UserSequences.interactions`), each
``(user, position)`` once. Ties go to the smaller item id.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mimigenrec.sequences import UserSequences


class Popularity:
    """Scores = interaction counts; the same ranking for every row."""

    name = "popularity"

    def __init__(self, counts: torch.Tensor) -> None:
        self.counts = counts.float()

    @classmethod
    def fit(cls, seqs: UserSequences, splits: Sequence[str], num_items: int) -> Popularity:
        """Count the interactions of ``splits`` (ids ``< num_items``)."""
        counts = torch.zeros(num_items, dtype=torch.float64)
        items = [it for _, _, it in seqs.interactions(splits)]
        if items:
            counts.index_add_(0, torch.tensor(items), torch.ones(len(items), dtype=torch.float64))
        return cls(counts)

    def score_rows(self, rows: Sequence[Mapping]) -> torch.Tensor:
        """``[len(rows), num_items]`` scores (higher = ranked first)."""
        return self.counts[None, :].expand(len(rows), -1)

    def describe(self) -> dict:
        return {"interactions_counted": int(self.counts.sum()), "items_seen": int((self.counts > 0).sum())}
