"""SFT data with history-item dropout copies (an ablation of the README, not a default).

``python bench/ablations/history_dropout.py --data_dir O --p 0.25 [--copies 1] [--seed 42]``
writes ``O/sft/train_drop<P>.json``: every ``sid_seq`` training row, then ``--copies`` copies of each
in which every item of the user's full prefix is dropped with probability ``--p`` (the last item
kept when all drop) before the most recent ``max_history`` remain, and registers it in
``O/dataset_info.json`` as ``<name>_sft_train_drop<P>``. Train on it with
``bash sft.sh examples/sft/tiny_full.yaml ... dataset=<name>_sft_train_drop<P> dataset_dir=O``.
Measured on the bundled data (p 0.25 / 0.5, one copy): no better than the plain rows.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mimigenrec import prompts
from mimigenrec.io import DataDir, read_json, write_json
from mimigenrec.sequences import load_sequences


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="preprocessed dataset dir (built with --tasks sid_seq)")
    p.add_argument("--p", type=float, required=True, help="drop probability of each history item")
    p.add_argument("--copies", type=int, default=1, help="dropout copies per row (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="seed of the draws (default: %(default)s)")
    a = p.parse_args(argv)
    d = DataDir(a.data_dir)
    items, id2sid = d.load_items(), d.load_id2sid()
    rows, seqs = load_sequences(a.data_dir)
    keep_last = max(len(r["history"]) for split in rows.values() for r in split)  # the build's max_history
    out = list(read_json(d.sft("train")))
    rng = random.Random(a.seed)
    for r in rows["train"]:
        full = seqs.prefix(r["user_id"], r["position"])
        for _ in range(a.copies):
            hist = ([it for it in full if rng.random() >= a.p] or full[-1:])[-keep_last:]
            text = prompts.build_input("sid_seq", history=hist, items=items, id2sid=id2sid, captions={})
            out.append(prompts.sft_row("sid_seq", text, prompts.answer_text("sid_seq", r["target"], items, id2sid)))
    tag = f"drop{a.p:g}".replace(".", "")
    path = d.sft("train").with_name(f"train_{tag}.json")
    write_json(path, out)
    info_path = d.root / "dataset_info.json"
    info = read_json(info_path)
    name = next(k for k, v in info.items() if v.get("file_name") == "sft/train.json")
    info[f"{name}_{tag}"] = {**info[name], "file_name": f"sft/{path.name}"}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {path} ({len(out)} rows, {len(out) - len(rows['train'])} dropout copies); "
          f"registered as {name}_{tag} in {info_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
