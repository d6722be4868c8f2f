"""Seconds per GRPO optimizer step of ConstrainedGRPOTrainer, sample and beam rollouts.

``python bench/bench_grpo.py [--models tiny,smollm2] [--modes sample,beam] [--steps 4]``

Same data and config for every model: the tests' small hand-made dataset (30 items, 3-level
SIDs, SID and candidate rows), ``num_generations`` rollouts per prompt, rewards
``rule + partial_match + candidate_choice`` (``ndcg_rank`` added in beam mode). Models: the tiny
random Qwen2 of the tests, and SmolLM2-135M-Instruct imported from its GGUF by
:mod:`mimigenrec.models.gguf_import` (skipped when that fails), SID tokens added. The device is CUDA
when available (bf16), else CPU (fp32). The first step is warm-up; the report is the median
and mean of the others. Prints one JSON line per (model, mode).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of every optimizer step."""

        def __init__(self):
            self.times: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def prepare_models(names: list[str], work: Path, tokens: list[str], titles: list[str]) -> dict[str, Path]:
    from mimigenrec.models.backbones import add_item_tokens, build_tiny_model

    out: dict[str, Path] = {}
    for name in names:
        if name == "tiny":
            out[name] = build_tiny_model(work / "tiny", new_tokens=tokens, corpus=titles)
        elif name == "smollm2":
            try:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                from mimigenrec.models.gguf_import import import_gguf

                path = import_gguf("smollm2", work / "smollm2_base")
                tok = AutoTokenizer.from_pretrained(path)
                model = AutoModelForCausalLM.from_pretrained(path)
                add_item_tokens(tok, model, tokens)
                model.save_pretrained(work / "smollm2")
                tok.save_pretrained(work / "smollm2")
                out[name] = work / "smollm2"
            except Exception as e:  # the bench still reports the other models
                print(json.dumps({"model": name, "skipped": f"{type(e).__name__}: {e}"}), flush=True)
        else:
            raise SystemExit(f"unknown model {name!r} (tiny, smollm2)")
    return out


def bench_one(model_dir: Path, data_dir: Path, mode: str, steps: int, out_dir: Path, G: int) -> dict:
    import torch

    from mimigenrec.rl.config import load_config
    from mimigenrec.rl.train_grpo import build_trainer

    cuda = torch.cuda.is_available()
    rewards = ["rule", "partial_match", "candidate_choice"] + (["ndcg_rank"] if mode == "beam" else [])
    cfg = load_config(None, model_name_or_path=str(model_dir), data_dir=str(data_dir), output_dir=str(out_dir),
                      rollout_mode=mode, rewards=rewards, num_generations=G, per_device_train_batch_size=2 * G,
                      learning_rate=1e-5, max_steps=steps + 1, save_strategy="no", logging_steps=1, eval_rows=0,
                      seed=0, bf16=bool(cuda and torch.cuda.is_bf16_supported()), use_cpu=not cuda)
    timer = step_timer()
    trainer = build_trainer(cfg, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    times = timer.times[1:] or timer.times
    return {"mode": mode, "device": "cuda" if cuda else "cpu", "steps_timed": len(times),
            "s_per_step_median": round(statistics.median(times), 4), "s_per_step_mean": round(statistics.mean(times), 4),
            "first_step_s": round(timer.times[0], 4), "train_wall_s": round(total, 2),
            "prompts_per_step": 2, "rollouts_per_step": 2 * G,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--modes", default="sample,beam", help="comma-separated rollout modes: sample, beam")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after one warm-up step)")
    p.add_argument("--num_generations", type=int, default=4, help="rollouts per prompt (2 prompts per step)")
    p.add_argument("--work_dir", help="where data, models and outputs go (default: a temporary directory)")
    a = p.parse_args(argv)

    from mimigenrec.io import read_json
    from mimigenrec.toy_data import make_dataset
    from preprocess.__main__ import main as preprocess

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work_dir or tmp)
        d = make_dataset(work / "ds")
        rc = preprocess(["build", "--out_dir", str(d.root), "--dataset_dir", str(work / "data"),
                         "--tasks", "sid_seq", "--rl_tasks", "sid_seq,cand_rank", "--num_negatives", "4"])
        assert rc == 0, "build failed"
        titles = [it["title"] for it in d.load_items().values()]
        models = prepare_models([m for m in a.models.split(",") if m], work, read_json(d.new_tokens), titles)
        for name, path in models.items():
            for mode in [m for m in a.modes.split(",") if m]:
                res = bench_one(path, d.root, mode, a.steps, work / f"out_{name}_{mode}", a.num_generations)
                print(json.dumps({"model": name, **res}), flush=True)


if __name__ == "__main__":
    main()
