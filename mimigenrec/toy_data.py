"""A tiny hand-made preprocessed dataset (the files of docs/formats.md), for tests and benchmarks."""
from __future__ import annotations

import random

from mimigenrec.io import DataDir, write_json, write_jsonl

WORDS = "red blue steel brass tape glue drill filament nozzle valve pump gauge wire clamp".split()


def make_dataset(root, n_users: int = 12, n_items: int = 30, seq_len: int = 6, seed: int = 0) -> DataDir:
    """A tiny preprocessed dataset (loo split) with unique 3-level SIDs, written by hand."""
    rng = random.Random(seed)
    d = DataDir(root)
    items = [{"item_id": i, "raw_id": f"I{i:04d}", "title": f"{rng.choice(WORDS)} {rng.choice(WORDS)} {i}",
              "description": "", "brand": rng.choice(["Acme", "Bolt"]), "categories": [], "image_urls": []}
             for i in range(n_items)]
    write_jsonl(d.items, items)
    write_jsonl(d.users, [{"user_id": u, "raw_id": f"U{u}"} for u in range(n_users)])
    rows = {"train": [], "valid": [], "test": []}
    for u in range(n_users):
        seq = [rng.randrange(n_items) for _ in range(seq_len)]
        for p in range(1, seq_len):
            split = "test" if p == seq_len - 1 else "valid" if p == seq_len - 2 else "train"
            rows[split].append({"user_id": u, "history": seq[max(0, p - 10):p], "target": seq[p],
                                "timestamp": 1000 * u + p, "position": p})
    for s, r in rows.items():
        write_jsonl(d.inter(s), r)
    id2sid = {str(i): [f"<a_{i % 4}>", f"<b_{(i // 4) % 4}>", f"<c_{i // 16}>"] for i in range(n_items)}
    write_json(d.id2sid, id2sid)
    write_json(d.new_tokens, sorted({t for v in id2sid.values() for t in v}))
    return d
