"""Bad inputs and faults a researcher meets, as one table: each case builds its scenario, runs the
real command (in-process CLI, or the shell launcher), and asserts the exit code, that the message
names the file or field (``file: what is wrong: what to do``, no traceback), and that nothing was
lost or silently reused. Reruns, renumbered data and retrained models are faults here too."""
from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mimigenrec import sft_config
from mimigenrec.eval import evaluate
from mimigenrec.io import DataDir, read_json, read_jsonl, write_json, write_jsonl
from mimigenrec.toy_data import make_dataset
from preprocess.__main__ import main as preprocess

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHON": sys.executable, "VENV": "system",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


# ----------------------------------------------------------------------------- scenario builders


def review(user: str, asin: str, ts: int) -> str:
    return json.dumps({"reviewerID": user, "asin": asin, "unixReviewTime": ts, "overall": 5.0})


REVIEWS = [review(f"U{u}", f"A{(u + k) % 6}", 100 * k + u) for u in range(8) for k in range(4)]
META = [json.dumps({"asin": f"A{i}", "title": f"Widget {i}", "brand": "Acme"}) for i in range(6)]


def raw_dump(tmp: Path, reviews: bytes | None = None, name: str = "C_5.json.gz", meta: list[str] = META) -> Path:
    """``tmp/raw`` with a reviews file (gzip of REVIEWS unless ``reviews`` bytes are given) and meta_C.json."""
    raw = tmp / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    text = "".join(x + "\n" for x in REVIEWS).encode()
    (raw / name).write_bytes(gzip.compress(text) if reviews is None else reviews)
    (raw / "meta_C.json").write_text("".join(x + "\n" for x in meta))
    return raw


def amazon(tmp: Path, *extra: str, stage: str = "amazon18") -> list[str]:
    head = ["all", "--source", "amazon18"] if stage == "all" else [stage]
    return [*head, "--raw_dir", str(tmp / "raw"), "--category", "C", "--out_dir", str(tmp / "out"), *extra]


def tiny_model(path: Path, tokens: list[str] | None, seed: int = 0) -> Path:
    from mimigenrec.models.backbones import build_tiny_model

    return build_tiny_model(path, new_tokens=tokens, vocab_size=300, seed=seed)


def toy(tmp: Path, name: str = "ds", seed: int = 0) -> DataDir:
    return make_dataset(tmp / name, seed=seed)


def eval_argv(tmp: Path, *extra: str, out: str = "ev") -> list[str]:
    return ["--data_dir", str(tmp / "ds"), "--output_dir", str(tmp / out), "--num_beams", "5", "--ks", "1,5",
            "--device", "cpu", "--quiet", *extra]


def rl_config(tmp: Path, **values) -> Path:
    cfg = tmp / "rl.yaml"
    cfg.write_text(json.dumps({"data_dir": str(tmp / "ds"), "output_dir": str(tmp / "rl_out"), **values}))
    return cfg


def build_rl(d: DataDir) -> None:
    assert preprocess(["build", "--out_dir", str(d.root), "--tasks", "sid_seq"]) == 0


def rl_model(tmp: Path) -> DataDir:
    """The toy dataset (tmp/ds) with its RL rows built, and a tiny model holding its SID tokens (tmp/m)."""
    d = toy(tmp)
    build_rl(d)
    tiny_model(tmp / "m", read_json(d.new_tokens))
    return d


def sh(tmp: Path, script: str, *args: str, cwd: Path | None = None, **env: str) -> tuple[int, str]:
    p = subprocess.run(["bash", str(REPO / script), *args], cwd=cwd or tmp, env={**ENV, **env},
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stderr + p.stdout


def sft_check(*argv: str) -> int:
    try:
        sft_config.main(["check", *argv])
    except SystemExit as e:
        return int(e.code)
    return 0


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    run: Callable[[Path], int | tuple[int, str]]   # builds the scenario, runs the command: rc (+ its output)
    rc: int
    names: tuple[str, ...]                          # the message must contain these ({tmp} = the case's folder)
    after: Callable[[Path], None] = field(default=lambda tmp: None)   # nothing lost, nothing silently reused


CASES: list[Case] = []


def case(rc: int, *names: str, after: Callable[[Path], None] | None = None):
    def add(fn):
        CASES.append(Case(fn.__name__, fn, rc, names, after or (lambda tmp: None)))
        return fn
    return add


def no_outputs(tmp: Path) -> None:
    assert not (tmp / "out" / "items.jsonl").exists()


# --- raw files -------------------------------------------------------------------------------


@case(2, "{tmp}/raw/C_5.json.gz", "truncated or corrupt", "fetch the file again", after=no_outputs)
def truncated_gz(tmp):
    raw_dump(tmp, gzip.compress("".join(x + "\n" for x in REVIEWS).encode())[:-40])
    return preprocess(amazon(tmp))


@case(2, "{tmp}/raw/C_5.json.gz", "not gzip data", after=no_outputs)
def gz_that_is_not_gzip(tmp):
    raw_dump(tmp, b"<html><body>503 Service Unavailable</body></html>\n")
    return preprocess(amazon(tmp))


def same_as_gz(tmp):
    want = tmp / "want"
    raw_dump(want)
    assert preprocess(amazon(want)) == 0
    assert read_jsonl(tmp / "out" / "inter" / "test.jsonl") == read_jsonl(want / "out" / "inter" / "test.jsonl")


@case(0, after=same_as_gz)
def gzip_data_saved_as_json(tmp):
    raw_dump(tmp, gzip.compress("".join(x + "\n" for x in REVIEWS).encode()), name="C_5.json")
    return preprocess(amazon(tmp))


@case(2, "{tmp}/raw/C_5.json", "the file is empty", after=no_outputs)
def empty_reviews_file(tmp):
    raw_dump(tmp, b"", name="C_5.json")
    return preprocess(amazon(tmp))


@case(2, "{tmp}/raw/C_5.json", "none of its", "is it the reviews file", after=no_outputs)
def binary_reviews_file(tmp):
    raw_dump(tmp, bytes(range(256)) * 4 + b"\n\x00\xff\n", name="C_5.json")
    return preprocess(amazon(tmp))


def meta_line_counted(tmp):
    import io

    from preprocess.interactions import print_summary

    stats = read_json(tmp / "out" / "stats.json")
    assert stats["malformed_lines"] == 0 and stats["meta_malformed"] == 1
    buf = io.StringIO()
    print_summary(stats, tmp / "out", buf)
    assert "(+ 1 in the item file)" in buf.getvalue()


@case(0, "meta_C.json:3", after=meta_line_counted)
def broken_metadata_line(tmp):
    raw_dump(tmp, meta=META[:2] + ['{"asin": "A2", "title": '] + META[2:])
    return preprocess(amazon(tmp))


@case(2, "no reviews file for category 'Nope'", "tried: Nope_5.json")
def unknown_category(tmp):
    raw_dump(tmp)
    return preprocess(["amazon18", "--raw_dir", str(tmp / "raw"), "--category", "Nope", "--out_dir", str(tmp / "out")])


@case(2, "{tmp}/raw/C_5.json:3", "not valid JSON", after=no_outputs)
def all_passes_strict(tmp):
    lines = REVIEWS[:2] + ["{broken"] + REVIEWS[2:]
    raw_dump(tmp, "".join(x + "\n" for x in lines).encode(), name="C_5.json")
    return preprocess(amazon(tmp, "--strict", stage="all"))


@case(2, "{tmp}/out", "file exists", "a file stands where a folder is expected")
def out_dir_is_a_file(tmp):
    raw_dump(tmp)
    (tmp / "out").write_text("not a folder")
    return preprocess(amazon(tmp))


@case(2, "{tmp}/empty/items.jsonl", "no such file or directory", "run the stage that writes it")
def stage_run_before_its_inputs_exist(tmp):
    (tmp / "empty").mkdir()
    return preprocess(["caption", "--out_dir", str(tmp / "empty"), "--backend", "http", "--base_url", "http://x/v1"])


# --- registrations and stale derived files ---------------------------------------------------


def registry_unchanged(tmp):
    info = read_json(tmp / "reg" / "dataset_info.json")
    assert Path(info["out_sft_train"]["file_name"]).resolve() == (tmp / "a" / "out" / "sft" / "train.json").resolve()


@case(2, "{tmp}/reg/dataset_info.json", "'out_sft_train' is already registered for {tmp}/a/out", "--name NEW",
      after=registry_unchanged)
def second_dataset_with_same_basename(tmp):
    (tmp / "reg").mkdir()
    a, b = make_dataset(tmp / "a" / "out"), make_dataset(tmp / "b" / "out", seed=1)
    assert preprocess(["build", "--out_dir", str(a.root), "--dataset_dir", str(tmp / "reg")]) == 0
    return preprocess(["build", "--out_dir", str(b.root), "--dataset_dir", str(tmp / "reg")])


def renumber_items(d: DataDir) -> None:
    """What re-running a source stage on other data does: the same ids now name other items."""
    items = read_jsonl(d.items)
    raws = [it["raw_id"] for it in items][::-1]
    write_jsonl(d.items, [{**it, "raw_id": r} for it, r in zip(items, raws)])


def no_stale_cot(tmp):
    sft = read_json(DataDir(tmp / "ds").sft("train"))
    assert not any("why " in r["output"] for r in sft), "reasoning of other users reached the SFT targets"


@case(0, "{tmp}/ds/cot.jsonl", "made for other interactions", after=no_stale_cot)
def cot_after_source_rerun(tmp):
    from preprocess.cot import input_id

    d = toy(tmp)
    items = d.load_items()
    write_jsonl(d.cot, [{"user_id": r["user_id"], "position": r["position"], "input_id": input_id(r, items),
                         "reasoning": f"why {k}", "kept": True, "hindsight": False}
                        for k, r in enumerate(read_jsonl(d.inter("train")))])
    renumber_items(d)
    return preprocess(["build", "--out_dir", str(d.root), "--tasks", "sid_seq", "--cot_prob", "1"])


def only_current_captions(tmp):
    rows = read_jsonl(tmp / "ds" / "captions.jsonl")
    items = DataDir(tmp / "ds").load_items()
    assert [r["item_id"] for r in rows] == [0, 1] and all(r["raw_id"] == items[r["item_id"]]["raw_id"] for r in rows)


@case(0, "{tmp}/ds/captions.jsonl", "made for other data", after=only_current_captions)
def captions_after_source_rerun(tmp):
    d = toy(tmp)
    items = d.load_items()
    write_jsonl(d.captions, [{"item_id": i, "raw_id": items[i]["raw_id"] if i < 2 else "OLD", "caption": f"c{i}",
                              "backend": "t"} for i in range(5)])
    # no item has an image, so nothing is asked of the (unreachable) endpoint
    return preprocess(["caption", "--out_dir", str(d.root), "--backend", "http", "--base_url",
                       "http://127.0.0.1:9/v1"])


def embed_continues(tmp):
    import numpy as np

    d = DataDir(tmp / "items")
    assert (d.root / ".item_emb.partial" / "chunk_000000.npy").is_file()
    assert preprocess(["embed", "--out_dir", str(d.root), "--chunk_size", "2", "--device", "cpu"]) == 0
    assert not (d.root / ".item_emb.partial").exists()
    fresh = tmp / "fresh"
    fresh.mkdir()
    (fresh / "items.jsonl").write_bytes(d.items.read_bytes())
    assert preprocess(["embed", "--out_dir", str(fresh), "--chunk_size", "5", "--device", "cpu"]) == 0
    assert np.allclose(np.load(d.emb), np.load(fresh / "item_emb.npy"), atol=1e-5)


@case(130, "interrupted", after=embed_continues)
def embed_killed_after_one_chunk(tmp):
    from preprocess import embed

    d = toy(tmp, "items")
    real, calls = embed.TextEncoder.encode, []

    def encode_then_die(self, texts, **kw):
        calls.append(len(texts))
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(self, texts, **kw)

    embed.TextEncoder.encode = encode_then_die
    try:
        return preprocess(["embed", "--out_dir", str(d.root), "--chunk_size", "2", "--device", "cpu"])
    finally:
        embed.TextEncoder.encode = real


# --- evaluation ------------------------------------------------------------------------------


def fixed_rerun_works(tmp):
    assert not (tmp / "ev" / "metrics.json").exists()
    assert evaluate.main(eval_argv(tmp, "--baseline", "popularity", "--num_beams", "10", "--ks", "1,10")) == 0


@case(2, "{tmp}/nope", "no such model folder", after=fixed_rerun_works)
def eval_model_path_missing(tmp):
    toy(tmp)
    return evaluate.main(eval_argv(tmp, "--model", f"m={tmp / 'nope'}", "--baseline", "popularity"))


@case(2, "{tmp}/adapter", "LoRA adapter", "merge it first")
def eval_lora_adapter(tmp):
    toy(tmp)
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_config.json").write_text("{}")
    return evaluate.main(eval_argv(tmp, "--model", str(tmp / "adapter")))


@case(2, "{tmp}/m.gguf", "GGUF", "gguf_import")
def eval_gguf_file(tmp):
    toy(tmp)
    (tmp / "m.gguf").write_bytes(b"GGUF")
    return evaluate.main(eval_argv(tmp, "--model", str(tmp / "m.gguf")))


@case(2, "{tmp}/plain", "tokenizer lacks", "SID tokens", "sft.sh")
def eval_tokenizer_without_sid_tokens(tmp):
    toy(tmp)
    tiny_model(tmp / "plain", None)
    return evaluate.main(eval_argv(tmp, "--model", str(tmp / "plain"), "--no_baselines"))


@case(2, "--num_beams", "5 < largest K 10")
def eval_fewer_beams_than_k(tmp):
    toy(tmp)
    return evaluate.main(eval_argv(tmp, "--baseline", "popularity", "--ks", "1,10"))


def same_as_fresh(method: str):
    def check(tmp):
        got = read_json(tmp / "ev" / "metrics.json")
        model = ["--model", f"m={tmp / 'm'}"] if method == "m" else ["--baseline", "popularity"]
        assert evaluate.main(eval_argv(tmp, *model, "--no_baselines", out="fresh")) == 0
        assert got[method] == read_json(tmp / "fresh" / "metrics.json")[method]
    return check


@case(0, "m: ", "predicting again", after=same_as_fresh("m"))
def eval_model_retrained_into_same_folder(tmp):
    d = toy(tmp)
    tokens = read_json(d.new_tokens)
    tiny_model(tmp / "m", tokens, seed=0)
    assert evaluate.main(eval_argv(tmp, "--model", f"m={tmp / 'm'}", "--no_baselines")) == 0
    tiny_model(tmp / "m", tokens, seed=1)  # a new SFT run writes other weights into the same folder
    return evaluate.main(eval_argv(tmp, "--model", f"m={tmp / 'm'}", "--no_baselines"))


def first_predictions_kept(tmp):
    assert read_jsonl(tmp / "ev" / "predictions_m.jsonl") == read_jsonl(tmp / "first.jsonl")


@case(2, "{tmp}/ev", "holds predictions made with other settings", "--overwrite", after=first_predictions_kept)
def eval_same_name_for_another_model(tmp):
    d = toy(tmp)
    tokens = read_json(d.new_tokens)
    tiny_model(tmp / "a", tokens, seed=0)
    tiny_model(tmp / "b", tokens, seed=1)
    assert evaluate.main(eval_argv(tmp, "--model", f"m={tmp / 'a'}", "--no_baselines")) == 0
    (tmp / "first.jsonl").write_bytes((tmp / "ev" / "predictions_m.jsonl").read_bytes())
    return evaluate.main(eval_argv(tmp, "--model", f"m={tmp / 'b'}", "--no_baselines"))


@case(0, "popularity: ", "predicting again", after=same_as_fresh("popularity"))
def eval_dataset_rebuilt_in_same_folder(tmp):
    toy(tmp)
    assert evaluate.main(eval_argv(tmp, "--baseline", "popularity")) == 0
    make_dataset(tmp / "ds", seed=5)  # preprocess re-ran with other data into the same folder
    return evaluate.main(eval_argv(tmp, "--baseline", "popularity"))


def only_this_runs_methods(tmp):
    assert set(read_json(tmp / "ev" / "metrics.json")) == {"m", "_meta"}


@case(0, after=only_this_runs_methods)
def eval_no_baselines_after_a_run_with_them(tmp):
    d = toy(tmp)
    tiny_model(tmp / "m", read_json(d.new_tokens))
    assert evaluate.main(eval_argv(tmp, "--baseline", "popularity")) == 0
    return evaluate.main(eval_argv(tmp, "--model", f"m={tmp / 'm'}", "--no_baselines"))


@case(2, "{tmp}/raw/items.jsonl", "missing", "the folder that `python -m preprocess` wrote")
def eval_on_the_raw_folder(tmp):
    raw_dump(tmp)
    return evaluate.main(["--data_dir", str(tmp / "raw"), "--baseline", "popularity", "--output_dir", str(tmp / "ev")])


@case(0, "warning: m:", "fine-tuned with other semantic IDs than {tmp}/ds/id2sid.json")
def eval_model_trained_on_other_sids(tmp):
    d = toy(tmp)
    build_rl(d)
    argv = sft_out(tmp, d)
    assert sft_check(argv[0], argv[1], f"output_dir={tmp / 'm'}", "overwrite_output_dir=true") == 0
    id2sid = read_json(d.id2sid)
    id2sid["0"], id2sid["1"] = id2sid["1"], id2sid["0"]  # the dataset was rebuilt with other SIDs
    write_json(d.id2sid, id2sid)
    return evaluate.main(eval_argv(tmp, "--model", f"m={tmp / 'm'}", "--no_baselines"))


@case(0)
def evaluate_sh_with_caller_relative_paths(tmp):
    toy(tmp)
    return sh(tmp, "evaluate.sh", "--data_dir", "ds", "--baseline", "popularity", "--output_dir", "ev",
              "--num_beams", "5", "--ks", "1,5", "--quiet")


# --- launchers -------------------------------------------------------------------------------


@case(2, "nope.yaml", "config file not found")
def trl_trainer_missing_config(tmp):
    rc, out = sh(tmp, "trl_trainer.sh", "nope.yaml", "max_steps=1")
    assert "unbound variable" not in out
    return rc, out


@case(2, "{tmp}/rl.yaml", "unknown reward 'nosuch'", "path/to/file.py:function")
def trl_trainer_unknown_reward(tmp):
    rl_model(tmp)
    return sh(tmp, "trl_trainer.sh", str(rl_config(tmp, model_name_or_path=str(tmp / "m"), rewards=["rule", "nosuch"])))


@case(2, "{tmp}/nope", "no such model_name_or_path folder")
def trl_trainer_missing_model(tmp):
    d = toy(tmp)
    build_rl(d)
    return sh(tmp, "trl_trainer.sh", str(rl_config(tmp)), "model_name_or_path=nope")  # caller-relative


@case(2, "{tmp}/plain", "tokenizer lacks")
def trl_trainer_model_without_sid_tokens(tmp):
    d = toy(tmp)
    build_rl(d)
    tiny_model(tmp / "plain", None)
    return sh(tmp, "trl_trainer.sh", str(rl_config(tmp, model_name_or_path=str(tmp / "plain"))))


@case(2, "{tmp}/gone", "no such teacher folder")
def trl_trainer_missing_teacher(tmp):
    rl_model(tmp)
    return sh(tmp, "trl_trainer.sh", str(rl_config(tmp, model_name_or_path=str(tmp / "m"))),
              "teachers=[m,gone]", "rewards=[teacher_kl]", "rollout_mode=beam")  # caller-relative


@case(2, "{tmp}/plain", "teacher's tokenizer differs from the policy's", "other SFT seeds")
def trl_trainer_teacher_with_other_tokens(tmp):
    rl_model(tmp)
    tiny_model(tmp / "plain", None)
    return sh(tmp, "trl_trainer.sh", str(rl_config(tmp, model_name_or_path=str(tmp / "m"), teachers=[str(tmp / "plain")])))


@case(2, "{tmp}/rl.yaml", "reward teacher_kl needs teachers", "set teachers:")
def trl_trainer_teacher_reward_without_teachers(tmp):
    rl_model(tmp)
    return sh(tmp, "trl_trainer.sh", str(rl_config(tmp, model_name_or_path=str(tmp / "m"), rollout_mode="beam",
                                                   rewards=["teacher_kl"], max_steps=1, eval_rows=0)))


@case(2, "{tmp}/ds/rl/train.json", "missing", "preprocess build")
def trl_trainer_before_build(tmp):
    d = toy(tmp)
    tiny_model(tmp / "m", read_json(d.new_tokens))
    return sh(tmp, "trl_trainer.sh", str(rl_config(tmp, model_name_or_path=str(tmp / "m"))))


@case(2, "{tmp}/rl.yaml", "not valid YAML")
def trl_trainer_bad_yaml(tmp):
    (tmp / "rl.yaml").write_text("model_name_or_path: [unclosed\n")
    return sh(tmp, "trl_trainer.sh", "rl.yaml")


@case(2, "{tmp}/rl.yaml", "reward_weights has 1 values for 2 rewards")
def trl_trainer_reward_weights_mismatch(tmp):
    rl_model(tmp)
    return sh(tmp, "trl_trainer.sh", str(rl_config(tmp, model_name_or_path=str(tmp / "m"))),
              "rewards=[rule,partial_match]", "reward_weights=[1.0]")


@case(2, "{tmp}/rl_out", "trained on other inputs", "rl_data", "drop resume_from_checkpoint")
def grpo_resume_after_dataset_rebuilt(tmp):
    from mimigenrec import launch

    d = rl_model(tmp)
    cfg = str(rl_config(tmp, model_name_or_path=str(tmp / "m")))
    assert launch.main(["check-rl", cfg]) == 0  # what trl_trainer.sh runs before the first launch
    (tmp / "rl_out" / "checkpoint-3").mkdir()
    make_dataset(d.root, seed=4)
    build_rl(d)
    return launch.main(["check-rl", cfg, "resume_from_checkpoint=true"])


@case(2, "{tmp}/gone", "no such checkpoint folder")
def grpo_resume_from_missing_checkpoint(tmp):
    rl_model(tmp)
    return sh(tmp, "trl_trainer.sh", str(rl_config(tmp, model_name_or_path=str(tmp / "m"))),
              "resume_from_checkpoint=gone")


@case(2, "no dataset named 'Nope'", "dataset_info.json")
def sft_sh_undefined_dataset(tmp):
    d = toy(tmp)
    build_rl(d)
    return sh(tmp, "sft.sh", str(d.root / "sft_full.yaml"), "dataset=Nope")


def sft_out(tmp: Path, d: DataDir) -> list[str]:
    tiny_model(tmp / "m", read_json(d.new_tokens))
    return [str(d.root / "sft_full.yaml"), f"model_name_or_path={tmp / 'm'}", f"output_dir={tmp / 'sft'}"]


@case(2, "{tmp}/sft", "trained on other inputs", "datasets changed", "overwrite_output_dir=true")
def sft_resume_after_dataset_rebuilt(tmp):
    d = toy(tmp)
    build_rl(d)
    argv = sft_out(tmp, d)
    assert sft_check(*argv) == 0
    (tmp / "sft" / "checkpoint-2").mkdir()  # a killed run left a checkpoint
    make_dataset(d.root, seed=3)
    build_rl(d)
    return sft_check(*argv)


@case(2, "{tmp}/sft", "holds a trained model and no checkpoint")
def sft_into_finished_output_dir(tmp):
    d = toy(tmp)
    build_rl(d)
    argv = sft_out(tmp, d)
    (tmp / "sft").mkdir()
    (tmp / "sft" / "model.safetensors").write_bytes(b"x")
    return sft_check(*argv)


@case(2, "{tmp}/ds/models/tiny", "no such model_name_or_path folder", "SFT")
def sft_build_yaml_before_the_model_exists(tmp):
    d = toy(tmp)
    build_rl(d)
    return sft_check(str(d.root / "sft_full.yaml"))


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c: Case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = c.run(tmp_path)
    rc, out = res if isinstance(res, tuple) else (res, "")
    cap = capsys.readouterr()
    msg = out + cap.err + cap.out
    assert rc == c.rc, msg[-3000:]
    for needle in c.names:
        assert needle.format(tmp=tmp_path) in msg, f"{needle!r} not in:\n{msg[-3000:]}"
    # (a logging handler bound to an earlier test's closed capture stream prints "--- Logging error ---")
    ours = re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", msg, flags=re.DOTALL)
    assert "Traceback" not in ours, ours[-3000:]
    if rc == 2:
        assert "error: " in msg
    c.after(tmp_path)


# ----------------------------------------------------------------------------- what goes right now


def test_all_forwards_the_source_options(tmp_path):
    import argparse

    from preprocess.all_stage import add_arguments, plan

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--source", "amazon18", "--out_dir", "O", "--reviews", "r.json", "--meta", "m.json",
                         "--strict", "--min_seq_len", "4", "--time_ratio", "7:2:1", "--split", "time",
                         "--start", "2015-01-01", "--end", "2016-01-01", "--no-require_title",
                         "--sft_model", "M", "--dataset_dir", "D"])
    steps = dict(plan(args))
    src = steps["amazon18"]
    assert (src.reviews, src.meta, src.strict, src.min_seq_len, src.split, src.require_title) == \
        ("r.json", "m.json", True, 4, "time", False)
    assert src.time_ratio == pytest.approx((0.7, 0.2, 0.1)) and str(src.start) == "2015-01-01"
    assert (steps["build"].sft_model, steps["build"].dataset_dir) == ("M", "D")
    from preprocess import sid

    q = argparse.ArgumentParser()
    sid.add_arguments(q)
    own = q.parse_args(["--out_dir", "O"])
    assert (steps["sid"].method, steps["sid"].seed) == (own.method, own.seed)  # one set of defaults
    assert steps["sid"].item_tokens is False
    items = dict(plan(p.parse_args(["--source", "amazon18", "--out_dir", "O", "--tasks", "sid_item_seq",
                                    "--eval_tasks", "sid_item_seq"])))
    assert items["sid"].item_tokens is True and items["build"].eval_tasks == "sid_item_seq"
    assert items["build"].rl_tasks == "sid_seq"  # unset: build's own default


def test_registration_by_name_or_on_request(tmp_path):
    reg = tmp_path / "reg"
    reg.mkdir()
    a, b = make_dataset(tmp_path / "a" / "out"), make_dataset(tmp_path / "b" / "out", seed=1)
    assert preprocess(["build", "--out_dir", str(a.root), "--dataset_dir", str(reg)]) == 0
    assert preprocess(["build", "--data_dir", str(b.root), "--dataset_dir", str(reg), "--name", "b_out"]) == 0
    info = read_json(reg / "dataset_info.json")
    assert {"out_sft_train", "b_out_sft_train"} <= set(info)
    assert preprocess(["build", "--out_dir", str(b.root), "--dataset_dir", str(reg), "--reregister"]) == 0
    again = read_json(reg / "dataset_info.json")
    assert Path(again["out_sft_train"]["file_name"]).resolve() == b.sft("train").resolve()
    # each dataset is also its own LLaMA-Factory dataset_dir, with paths relative to it
    own = read_json(a.root / "dataset_info.json")
    assert own["out_sft_train"]["file_name"] == "sft/train.json"


def test_build_yaml_runs_from_any_directory(tmp_path, monkeypatch):
    import yaml

    d = make_dataset(tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    assert preprocess(["build", "--out_dir", "ds", "--sft_model", "m"]) == 0
    cfg = yaml.safe_load((d.root / "sft_full.yaml").read_text())
    assert Path(cfg["dataset_dir"]).is_absolute() and Path(cfg["output_dir"]).is_absolute()
    assert cfg["overwrite_output_dir"] is False and cfg["save_total_limit"] == 2
    monkeypatch.chdir("/")
    assert sft_config.add_tokens_for_config({**cfg, "add_tokens": None}).split(",") == read_json(d.new_tokens)


def test_sasrec_does_not_stop_on_the_scored_valid_rows(tmp_path):
    import argparse

    d = make_dataset(tmp_path / "ds")
    args = argparse.Namespace(data_dir=str(d.root), split="valid", max_rows=0, seed=0, task="sid_seq",
                              captions="auto", methods=["baseline:sasrec"], output_dir=str(tmp_path / "ev"),
                              num_negatives=9)
    data = evaluate.load_eval_data(args)
    seqs, stop_rows, _ = evaluate.sasrec_stopping(data)
    scored = {(r["user_id"], r["position"]) for r in data.rows}
    stop = {(r["user_id"], r["position"]) for r in stop_rows}
    assert stop and not stop & scored
    trained = {(u, p) for u, (_, flags) in seqs.training_sequences(("train",)).items() for p, f in enumerate(flags) if f}
    assert not stop & trained and trained  # held out of training, the rest still trains


def test_outputs_keep_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        raw_dump(tmp_path)
        assert preprocess(amazon(tmp_path)) == 0
        write_json(tmp_path / "x.json", {})
    finally:
        os.umask(old)
    for p in (tmp_path / "out" / "items.jsonl", tmp_path / "out" / "inter" / "test.jsonl", tmp_path / "x.json"):
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_permission_and_disk_errors_name_the_file(capsys):
    import errno

    from mimigenrec.io import cli_errors

    def denied():
        raise PermissionError(errno.EACCES, "Permission denied", "/data/O/items.jsonl")

    assert cli_errors(denied) == 2
    assert "/data/O/items.jsonl: permission denied" in capsys.readouterr().err


def test_evaluate_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        evaluate.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: 50)" in text and "(default: test)" in text


@pytest.mark.slow
def test_sft_sh_resumes_a_killed_run_from_another_directory(tmp_path):
    """The build yaml, launched from elsewhere: trains, a re-run resumes from the checkpoint, and a
    re-run after the dataset was rebuilt is refused instead of mixing two runs."""
    d = make_dataset(tmp_path / "ds")
    build_rl(d)
    tiny_model(d.root / "models" / "tiny", read_json(d.new_tokens))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    common = ["save_steps=2", "per_device_train_batch_size=8", "report_to=none", "logging_steps=1"]
    rc, out = sh(tmp_path, "sft.sh", "../ds/sft_full.yaml", "max_steps=2", *common, cwd=elsewhere)
    assert rc == 0, out[-3000:]
    ckpt = d.root / "models" / "sft_full" / "checkpoint-2"
    assert ckpt.is_dir()
    rc, out = sh(tmp_path, "sft.sh", "../ds/sft_full.yaml", "max_steps=4", *common, cwd=elsewhere)
    assert rc == 0, out[-3000:]
    assert "Resuming training from" in out
    state = json.loads((d.root / "models" / "sft_full" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    make_dataset(d.root, seed=9)
    build_rl(d)
    rc, out = sh(tmp_path, "sft.sh", "../ds/sft_full.yaml", "max_steps=6", *common, cwd=elsewhere)
    assert rc == 2 and "trained on other inputs" in out and "Traceback" not in out
