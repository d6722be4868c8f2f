"""Throughput of full-ranking evaluation: rows/s of trie-constrained beam search through
``python -m mimigenrec.eval.evaluate`` with a tiny model.

``python bench/bench_eval.py [--rows 32] [--num_beams 50] [--batch_size 8] [--n_items 3541] [--compare_generate]``

Writes a synthetic preprocessed dataset (``--n_items`` items with unique 3-level SIDs from
codebooks of 256, users with 10-item histories) and a tiny random Qwen2 model into a temp
dir, evaluates ``--rows`` test rows and prints rows/s (model loading excluded). With
``--compare_generate`` the same batches also go through stock ``model.generate`` beam
search with the trie logits processor, for comparison.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def write_synthetic(root: Path, n_items: int, n_users: int, hist: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    (root / "inter").mkdir(parents=True)
    with open(root / "items.jsonl", "w") as f:
        f.writelines(json.dumps({"item_id": i, "raw_id": f"I{i}", "title": f"item {i}"}) + "\n" for i in range(n_items))
    codes = rng.sample(range(256 ** 3), n_items)
    id2sid = {str(i): [f"<a_{c // 65536}>", f"<b_{(c // 256) % 256}>", f"<c_{c % 256}>"] for i, c in enumerate(codes)}
    (root / "id2sid.json").write_text(json.dumps(id2sid))
    files = {s: open(root / "inter" / f"{s}.jsonl", "w") for s in ("train", "valid", "test")}
    for u in range(n_users):
        seq = [rng.randrange(n_items) for _ in range(hist + 3)]
        n = len(seq)
        for p in range(1, n):
            split = "test" if p == n - 1 else "valid" if p == n - 2 else "train"
            files[split].write(json.dumps({"user_id": u, "history": seq[max(0, p - hist):p], "target": seq[p],
                                           "timestamp": p, "position": p}) + "\n")
    for f in files.values():
        f.close()
    return sorted({t for s in id2sid.values() for t in s})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32, help="test rows to evaluate")
    ap.add_argument("--num_beams", type=int, default=50, help="beams (= largest K)")
    ap.add_argument("--batch_size", type=int, default=8, help="prompts per batch")
    ap.add_argument("--n_items", type=int, default=3541, help="items in the catalogue (trie size)")
    ap.add_argument("--history", type=int, default=10, help="history items per prompt")
    ap.add_argument("--hidden_size", type=int, default=64, help="tiny model width")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    ap.add_argument("--compare_generate", action="store_true", help="also time stock generate + trie processor")
    ap.add_argument("--seed", type=int, default=0, help="data / model seed")
    a = ap.parse_args()

    from mimigenrec.eval import evaluate
    from mimigenrec.models.backbones import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        root = Path(tmp) / "data"
        toks = write_synthetic(root, a.n_items, max(a.rows, 8), a.history, a.seed)
        model = build_tiny_model(Path(tmp) / "model", new_tokens=toks, hidden_size=a.hidden_size, seed=a.seed)
        out = Path(tmp) / "eval"
        args = ["--data_dir", str(root), "--model", f"tiny={model}", "--no_baselines", "--num_beams", str(a.num_beams),
                "--ks", f"1,10,{a.num_beams}", "--max_rows", str(a.rows), "--batch_size", str(a.batch_size),
                "--output_dir", str(out), "--device", a.device, "--quiet"]
        evaluate.main(args)
        meta = json.loads((out / "metrics.json").read_text())["_meta"]["methods"]["tiny"]
        result = {"rows": a.rows, "num_beams": a.num_beams, "batch_size": a.batch_size, "n_items": a.n_items,
                  "seconds": meta["seconds"], "rows_per_s": meta["rows_per_s"]}
        if a.compare_generate:
            result["generate_rows_per_s"] = time_generate(args, a)
        print(json.dumps(result))


def time_generate(argv: list[str], a: argparse.Namespace) -> float:
    """Stock generate beam search + TrieLogitsProcessor on the same rows and batches."""
    from mimigenrec.decoding.beam_search import constrained_beam_search
    from mimigenrec.eval import evaluate

    args = evaluate.build_parser().parse_args(argv)
    args.methods = [f"model:{args.model[0].split('=', 1)[1]}"]
    data = evaluate.load_eval_data(args)
    dist = evaluate.Dist()
    ranker = evaluate.build_ranker("tiny", args.methods[0], data, args, dist, evaluate.pick_device(args.device, dist))
    batches = evaluate.plan_batches(ranker, data.rows, args.batch_size)
    t0 = time.time()
    for idx in batches:
        texts = [ranker.prompt(data.rows[i], None) for i in idx]
        enc = ranker.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(ranker.device)
        constrained_beam_search(ranker.model, enc["input_ids"], enc["attention_mask"], ranker.trie, args.num_beams,
                                use_generate=True)
    return round(len(data.rows) / (time.time() - t0), 2)


if __name__ == "__main__":
    main()
