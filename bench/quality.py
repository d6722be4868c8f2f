"""Quality table on real data: popularity, SASRec, the tiny LLM after SFT and after GRPO (and
optionally SmolLM2-135M after SFT), HR@{5,10} / NDCG@{5,10}, plus wall time per stage.

``python bench/quality.py --dataset amazon|ml100k [--sft_steps N] [--grpo_steps M] [--eval_rows R]
[--smollm2] [--smollm2_sft_steps K] [--smollm2_eval_rows S] [--out bench/results]``

Everything runs through the project's public commands, as subprocesses, so the figures are what a
user gets: ``python -m preprocess all`` -> ``python -m mimigenrec.backbones tiny`` -> ``bash sft.sh
examples/sft/tiny_full.yaml ...`` -> ``bash trl_trainer.sh examples/rl/tiny_sample.yaml ...`` ->
(``python -m mimigenrec.gguf_import --model smollm2`` -> ``bash sft.sh examples/sft/smollm2_full.yaml
...``) -> ONE ``bash evaluate.sh`` call with every model beside ``--baseline popularity --baseline
sasrec`` on the same split and rows. With ``--smollm2`` a second evaluate call scores every method
again on a seeded subset of ``--smollm2_eval_rows`` test rows (SmolLM2 beam search is slow on CPU),
and that subset is a separate table.

Data: ``amazon`` = the bundled ``data/raw/amazon18/Industrial_and_Scientific`` (``--kcore 0``);
``ml100k`` = MovieLens-100k fetched at run time (``preprocess.movielens.fetch_ml100k``: RecBole's
copy, cached under ``~/.cache/mimigenrec``, never committed). Work files go to ``runs/quality/``
(gitignored); the LLaMA-Factory datasets are registered in ``runs/quality/data/dataset_info.json``
(``--dataset_dir``), so ``data/dataset_info.json`` is not touched.

Protocol (stated in every output): leave-one-out per user (last item = test, second last = valid),
full ranking over every item that appears in the interactions, history items not excluded,
``HR@K = 1[rank < K]``, ``NDCG@K = 1/log2(rank + 2)`` for the 0-based rank, 0 beyond K.

Device: CUDA when ``torch.cuda.is_available()`` (SFT and GRPO with ``bf16=true``, GRPO under
``examples/accelerate/single_gpu.yaml``), else CPU. Outputs: ``<out>/quality_<dataset>.md`` and
``.json``; the table is printed last. A finished stage leaves ``runs/quality/<dataset>/stages/
<stage>.json`` (command + seconds); with ``--reuse`` a stage whose command is unchanged, and whose
inputs' stages were reused too, is not run again and its recorded time is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KS = (5, 10)
COLUMNS = [f"hr@{k}" for k in KS] + [f"ndcg@{k}" for k in KS]
PROTOCOL = ("leave-one-out per user (last interaction = test, second last = valid, the rest = train; "
            "history window 10); full ranking over all items appearing in the interactions "
            "(LLMs: trie-constrained beam search over semantic IDs, 50 beams; prompts show the last 10 items, "
            "SASRec is fed the last 50 earlier items, popularity counts train (+valid for test)); "
            "history items NOT excluded; "
            "HR@K = target in top K; NDCG@K = 1/log2(rank+2) for the 0-based rank if rank < K else 0")
DATASETS = {
    "amazon": {"name": "quality_amazon", "source": "amazon18",
               "raw_dir": "data/raw/amazon18/Industrial_and_Scientific",
               "extra": ["--category", "Industrial_and_Scientific"],
               "label": "Amazon-2018 Industrial_and_Scientific (bundled 5-core file, --kcore 0)"},
    "ml100k": {"name": "quality_ml100k", "source": "movielens", "raw_dir": None, "extra": [],
               "label": "MovieLens-100k (RecBole copy fetched at run time; every rating is an interaction)"},
}
LLM_METHODS = ("tiny_sft", "tiny_grpo", "smollm2_sft")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="which real dataset to run")
    p.add_argument("--sft_steps", type=int, default=600, help="SFT optimizer steps of the tiny model (max_steps)")
    p.add_argument("--grpo_steps", type=int, default=20, help="GRPO steps on top of the tiny SFT model")
    p.add_argument("--tiny_hidden", type=int, default=64, help="width of the tiny random Qwen2")
    p.add_argument("--tiny_layers", type=int, default=2, help="layers of the tiny random Qwen2")
    p.add_argument("--eval_rows", type=int, default=0,
                   help="seeded subset of test rows for the main table (0 = the whole test split)")
    p.add_argument("--smollm2", action="store_true",
                   help="also import SmolLM2-135M-Instruct (GGUF, from PyPI) and SFT it")
    p.add_argument("--smollm2_sft_steps", type=int, default=100, help="SFT optimizer steps of SmolLM2")
    p.add_argument("--smollm2_eval_rows", type=int, default=200,
                   help="test rows of the second table that adds SmolLM2 (every method on the same subset)")
    p.add_argument("--runs", default="runs/quality", help="work dir for datasets, models, logs (gitignored)")
    p.add_argument("--out", default="bench/results", help="where quality_<dataset>.md / .json are written")
    p.add_argument("--reuse", action="store_true",
                   help="skip a stage already finished with the same command (its recorded time is reported)")
    p.add_argument("--seed", type=int, default=42, help="seed of preprocessing, row subsets and SASRec")
    return p.parse_args(argv)


class Runner:
    """Runs stage commands from the repo root, logs each to a file, records command + wall time."""

    def __init__(self, work: Path, reuse: bool) -> None:
        self.work = work
        self.reuse = reuse
        self.logs = work / "logs"
        self.stages = work / "stages"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.stages.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}
        self.commands: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self.ran: set[str] = set()   # stages (re-)run by this invocation
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                        PYTHON=sys.executable)
        if (Path(sys.prefix) / "bin" / "activate").is_file():
            self.env["VENV"] = sys.prefix   # sft.sh activates this venv (the one running this script)

    def run(self, stage: str, cmd: list[str], env: dict[str, str] | None = None, after: tuple[str, ...] = ()) -> bool:
        """Run ``cmd``; returns False when it was reused from an earlier identical run.

        ``after``: the stages whose outputs ``cmd`` reads; if one of them ran, so does this one."""
        extra_env = env or {}
        line = " ".join(f"{k}={shlex.quote(v)}" for k, v in extra_env.items()) + (" " if extra_env else "")
        line += shlex.join(cmd)
        self.commands[stage] = line
        marker = self.stages / f"{stage}.json"
        # reused only when no stage it reads from was (re-)run in this invocation
        if self.reuse and not self.ran & set(after) and marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("command") == line:
                self.seconds[stage] = done["seconds"]
                if done.get("note"):
                    self.notes[stage] = done["note"]
                print(f"[quality] {stage}: reused ({done['seconds']:.0f} s recorded)", flush=True)
                return False
        marker.unlink(missing_ok=True)
        self.ran.add(stage)
        log = self.logs / f"{stage}.log"
        print(f"[quality] {stage}: {line}\n[quality]   log: {log}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            res = subprocess.run(cmd, cwd=ROOT, env={**self.env, **extra_env}, stdout=f, stderr=subprocess.STDOUT)
        dt = time.perf_counter() - t0
        if res.returncode != 0:
            tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-25:]
            sys.exit(f"[quality] {stage} failed (exit {res.returncode}) after {dt:.0f} s; last lines of {log}:\n"
                     + "\n".join(tail))
        self.seconds[stage] = round(dt, 1)
        if "is up to date" in log.read_text(errors="replace"):
            self.notes[stage] = "some sub-stages were cached from an earlier run (see its log)"
        marker.write_text(json.dumps({"command": line, "seconds": round(dt, 1), "note": self.notes.get(stage)}))
        print(f"[quality] {stage}: done in {dt:.0f} s", flush=True)
        return True


def fetch_raw_dir(dataset: str) -> str:
    """Raw dir of the dataset; ml100k is fetched at run time through the project's own fetcher."""
    raw = DATASETS[dataset]["raw_dir"]
    if raw is not None:
        return raw
    code = "from preprocess.movielens import fetch_ml100k; print(fetch_ml100k())"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"[quality] could not fetch ml-100k:\n{res.stderr.strip()}")
    return res.stdout.strip().splitlines()[-1]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def sft_result(out_dir: Path) -> dict:
    """Final train loss / steps LLaMA-Factory recorded in ``all_results.json`` / ``trainer_state.json``."""
    res = read_json(out_dir / "all_results.json")
    state = read_json(out_dir / "trainer_state.json")
    return {"train_loss": res.get("train_loss"), "eval_loss": res.get("eval_loss"),
            "global_step": state.get("global_step"), "epochs": state.get("epoch")}


def pipeline(a: argparse.Namespace) -> dict:
    import torch  # the venv's torch: decides the device the same way evaluate --device auto does

    cuda = torch.cuda.is_available()
    spec = DATASETS[a.dataset]
    runs = Path(a.runs)
    work = runs / a.dataset
    data = work / "data"
    dataset_dir = runs / "data"
    models = work / "models"
    r = Runner(ROOT / work, a.reuse)
    py = sys.executable
    t_start = time.perf_counter()

    raw = fetch_raw_dir(a.dataset)
    r.run("preprocess", [py, "-m", "preprocess", "all", "--source", spec["source"], "--raw_dir", raw,
                         *spec["extra"], "--out_dir", str(data), "--kcore", "0", "--split", "loo",
                         "--name", spec["name"], "--dataset_dir", str(dataset_dir), "--seed", str(a.seed)])
    r.run("backbone", [py, "-m", "mimigenrec.backbones", "tiny", "--out", str(models / "tiny"),
                       "--data_dir", str(data), "--hidden_size", str(a.tiny_hidden),
                       "--num_layers", str(a.tiny_layers), "--embed_std", "0.02"], after=("preprocess",))

    sft_common = [f"dataset={spec['name']}_sft_train", f"eval_dataset={spec['name']}_sft_valid",
                  f"dataset_dir={dataset_dir}", "report_to=none"]
    gpu_train = ["bf16=true"] if cuda else []
    r.run("sft_tiny", ["bash", "sft.sh", "examples/sft/tiny_full.yaml", f"model_name_or_path={models / 'tiny'}",
                       f"output_dir={models / 'tiny_sft'}", f"max_steps={a.sft_steps}", *sft_common, *gpu_train],
          after=("preprocess", "backbone"))
    grpo_env = {"ACCELERATE_CONFIG": "examples/accelerate/single_gpu.yaml"} if cuda else {}
    r.run("grpo_tiny", ["bash", "trl_trainer.sh", "examples/rl/tiny_sample.yaml",
                        f"model_name_or_path={models / 'tiny_sft'}", f"data_dir={data}",
                        f"output_dir={models / 'tiny_grpo'}", f"max_steps={a.grpo_steps}",
                        *(["bf16=true", "use_cpu=false"] if cuda else [])], env=grpo_env,
          after=("preprocess", "sft_tiny"))
    llms = {"tiny_sft": models / "tiny_sft", "tiny_grpo": models / "tiny_grpo"}
    if a.smollm2:
        smol = runs / "models" / "smollm2"   # the import is the same for every dataset
        r.run("import_smollm2", [py, "-m", "mimigenrec.gguf_import", "--model", "smollm2", "--out", str(smol)])
        r.run("sft_smollm2", ["bash", "sft.sh", "examples/sft/smollm2_full.yaml", f"model_name_or_path={smol}",
                              f"output_dir={models / 'smollm2_sft'}", f"max_steps={a.smollm2_sft_steps}",
                              "eval_strategy=no", *sft_common, *gpu_train],
              after=("preprocess", "import_smollm2"))
    baselines = ["--baseline", "popularity", "--baseline", "sasrec"]

    def evaluate(stage: str, names: list[str], rows: int) -> dict:
        out = work / f"eval_{stage}"
        models_args = [x for n in names for x in ("--model", f"{n}={llms[n]}")]
        cmd = ["bash", "evaluate.sh", "--data_dir", str(data), "--split", "test", *models_args, *baselines,
               "--max_rows", str(rows), "--seed", str(a.seed), "--output_dir", str(out), "--overwrite",
               "--quiet"]
        trained = {"tiny_sft": "sft_tiny", "tiny_grpo": "grpo_tiny", "smollm2_sft": "sft_smollm2"}
        r.run(f"eval_{stage}", cmd, after=("preprocess", *(trained[n] for n in names)))
        return read_json(ROOT / out / "metrics.json")

    tables = {"main": {"rows": a.eval_rows, "metrics": evaluate("main", ["tiny_sft", "tiny_grpo"], a.eval_rows)}}
    if a.smollm2:
        llms["smollm2_sft"] = models / "smollm2_sft"
        tables["smollm2_subset"] = {"rows": a.smollm2_eval_rows,
                                    "metrics": evaluate("smollm2", list(llms), a.smollm2_eval_rows)}
    stats = read_json(ROOT / data / "stats.json")
    return {
        "dataset": a.dataset, "label": spec["label"], "protocol": PROTOCOL,
        "device": f"cuda ({torch.cuda.get_device_name(0)}), bf16" if cuda else
        f"cpu (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} cores visible)",
        "settings": {"sft_steps": a.sft_steps, "grpo_steps": a.grpo_steps, "eval_rows": a.eval_rows,
                     "tiny_hidden": a.tiny_hidden, "tiny_layers": a.tiny_layers,
                     "smollm2": a.smollm2, "smollm2_sft_steps": a.smollm2_sft_steps if a.smollm2 else None,
                     "smollm2_eval_rows": a.smollm2_eval_rows if a.smollm2 else None, "seed": a.seed},
        "data_stats": {k: stats[k] for k in ("users", "items", "interactions", "rows") if k in stats},
        "training": {"tiny_sft": sft_result(ROOT / models / "tiny_sft"),
                     **({"smollm2_sft": sft_result(ROOT / models / "smollm2_sft")} if a.smollm2 else {})},
        "tables": tables,
        "stage_seconds": r.seconds, "stage_notes": r.notes, "commands": r.commands,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "reproduce": "python bench/quality.py " + shlex.join(sys.argv[1:]),
    }


def verdict(metrics: dict) -> str:
    """Plain statement: does the best LLM (by NDCG@10) beat SASRec on NDCG@10 and HR@10?"""
    llm = {n: m for n, m in metrics.items() if n in LLM_METHODS}
    if not llm or "sasrec" not in metrics:
        return "no LLM or no SASRec row to compare"
    best = max(llm, key=lambda n: llm[n]["ndcg@10"])
    b, s = llm[best], metrics["sasrec"]
    beats = b["ndcg@10"] > s["ndcg@10"] and b["hr@10"] > s["hr@10"]
    return (f"best LLM = {best} (NDCG@10 {b['ndcg@10']:.4f}, HR@10 {b['hr@10']:.4f}) vs SASRec "
            f"(NDCG@10 {s['ndcg@10']:.4f}, HR@10 {s['hr@10']:.4f}): the LLM "
            + ("BEATS SASRec." if beats else "does NOT beat SASRec yet."))


def metrics_table(metrics: dict) -> str:
    meta = metrics.get("_meta", {}).get("methods", {})
    lines = ["| method | " + " | ".join(c.upper() for c in COLUMNS)
             + " | eval s |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, m in metrics.items():
        if name == "_meta":
            continue
        secs = meta.get(name, {}).get("seconds")
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in COLUMNS)
                     + f" | {secs if secs is not None else '-'} |")
    return "\n".join(lines)


def fmt_num(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def render(res: dict) -> str:
    s = res["settings"]
    out = [f"# Quality: {res['label']}", "",
           f"Protocol: {res['protocol']}.", "",
           f"Device: {res['device']}. Data: " + ", ".join(f"{k} {v}" for k, v in res["data_stats"].items()) + ".",
           f"Tiny model (random Qwen2, {s.get('tiny_layers', 2)} layers x {s.get('tiny_hidden', 64)} wide) "
           f"SFT {s['sft_steps']} steps = {fmt_num(res['training']['tiny_sft'].get('epochs'), 2)} epochs "
           f"(mean train loss {fmt_num(res['training']['tiny_sft'].get('train_loss'))}), "
           f"then GRPO {s['grpo_steps']} steps.", ""]
    for key, t in res["tables"].items():
        meta = t["metrics"].get("_meta", {})
        n = meta.get("n_rows")
        if key == "main":
            out.append(f"## Test split, {n} rows ({'all' if not t['rows'] else 'seeded subset'}), "
                       f"{meta.get('n_ranked_items')} items ranked")
        else:
            ep = fmt_num(res["training"].get("smollm2_sft", {}).get("epochs"), 3)
            out.append(f"## SmolLM2-135M after SFT ({s['smollm2_sft_steps']} steps = {ep} epochs: UNDER-TRAINED), "
                       f"seeded subset of {n} test rows, every method on the same rows")
        out += ["", metrics_table(t["metrics"]), "", verdict(t["metrics"]), ""]
    out += ["## Wall time per stage", "", "| stage | seconds | note |", "|---|---|---|"]
    notes = res.get("stage_notes", {})
    out += [f"| {k} | {v:.0f} | {notes.get(k, '')} |" for k, v in res["stage_seconds"].items()]
    out += [f"| this invocation (reused stages not re-run) | {res['wall_seconds']:.0f} | |", "",
            "## Reproduce", "", "```bash", res["reproduce"], "```", "", "Stage commands:", "", "```bash"]
    out += [c.replace(sys.executable, "python") for c in res["commands"].values()] + ["```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    res = pipeline(a)
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    md = render(res)
    (out / f"quality_{a.dataset}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"quality_{a.dataset}.md").write_text(md)
    print(f"\n[quality] wrote {out / f'quality_{a.dataset}.md'} and .json\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
