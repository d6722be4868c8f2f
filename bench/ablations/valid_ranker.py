"""The valid rows and one checkpoint's evaluation ranker, shared by the ablation diagnostics."""
from __future__ import annotations

from pathlib import Path


def valid_ranker(data_dir: str, model: str, rows: int, seed: int, out_name: str):
    """``(EvalData of a seeded subset of rows valid rows (0 = all), ModelRanker of model)``; the
    prompts, SIDs and trie are evaluate.sh's own. Work files go to ``data_dir/out_name``."""
    from mimigenrec.eval.evaluate import ModelRanker, build_parser, load_eval_data

    args = build_parser().parse_args(["--data_dir", data_dir, "--split", "valid", "--model", f"m={model}",
                                      "--output_dir", str(Path(data_dir) / out_name), "--max_rows", str(rows),
                                      "--seed", str(seed)])
    args.methods = ["model:m"]
    data = load_eval_data(args)
    return data, ModelRanker("m", model, data, args, "cpu")
