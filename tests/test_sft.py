"""SFT: dataset token lookup, YAML overrides, SFT/RL template agreement, and real ``bash sft.sh`` runs.

The slow tests launch the real ``llamafactory-cli train`` (through ``sft.sh``) on the tiny model
and a small synthetic dataset built with :mod:`mimigenrec.prompts`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mimigenrec import prompts
from mimigenrec.sft_config import (
    SFTConfigError,
    add_tokens_for_config,
    lf_encode_row,
    load_yaml_with_overrides,
    sid_tokens_for_dataset,
    write_sft_yaml,
)

ROOT = Path(__file__).resolve().parents[1]
PRODUCTS = [
    "Digital caliper 150 mm", "Nitrile gloves, box of 100", "Safety goggles", "Soldering iron kit",
    "Lab notebook", "Thermal paste", "Multimeter", "Cable ties, 200 pack", "Heat shrink tubing",
    "Precision screwdriver set", "Magnifying lamp", "Anti-static wrist strap",
]
ITEMS = {i: {"item_id": i, "title": t} for i, t in enumerate(PRODUCTS)}
ID2SID = {i: [f"<a_{i % 4}>", f"<b_{(i * 3) % 5}>", f"<c_{i}>"] for i in ITEMS}


def _rows(seed: int = 0) -> list[dict]:
    """SID-history -> next-SID rows from a few deterministic sequences, plus title -> SID rows."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(40):
        seq = rng.sample(sorted(ITEMS), 4)
        inp = prompts.build_input("sid_seq", history=seq[:3], items=ITEMS, id2sid=ID2SID)
        rows.append(prompts.sft_row("sid_seq", inp, prompts.answer_text("sid_seq", seq[3], ITEMS, ID2SID)))
    for i in ITEMS:
        inp = prompts.build_input("title2sid", item=i, items=ITEMS, id2sid=ID2SID)
        rows.append(prompts.sft_row("title2sid", inp, prompts.answer_text("title2sid", i, ITEMS, ID2SID)))
    return rows


def _new_tokens() -> list[str]:
    return sorted({t for sid in ID2SID.values() for t in sid})


def _make_dataset(root: Path, name: str = "Toy") -> Path:
    """``root/data`` registry + ``root/data/<name>`` preprocessed dir; returns the dataset_dir."""
    data = root / "data"
    out = data / name
    (out / "sft").mkdir(parents=True)
    rows = _rows()
    (out / "sft" / "train.json").write_text(json.dumps(rows))
    (out / "sft" / "valid.json").write_text(json.dumps(rows[:8]))
    (out / "new_tokens.json").write_text(json.dumps(_new_tokens()))
    cols = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
    info = {f"{name}_sft_{s}": {"file_name": f"{name}/sft/{s}.json", "formatting": "alpaca", "columns": cols}
            for s in ("train", "valid")}
    (data / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return data


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A dataset_dir with the toy dataset and a tiny model whose tokenizer saw the item titles."""
    from mimigenrec.models.backbones import build_tiny_model

    root = tmp_path_factory.mktemp("sft")
    data = _make_dataset(root)
    model = build_tiny_model(root / "tiny", corpus=PRODUCTS + [r["input"] for r in _rows()][:10])
    return {"root": root, "data": data, "model": model}


# ---------------------------------------------------------------- config helpers (fast)

def test_sid_tokens_for_dataset(tmp_path):
    data = _make_dataset(tmp_path)
    assert sid_tokens_for_dataset(str(data), "Toy_sft_train") == _new_tokens()
    # several datasets: union, first-seen order, no duplicates
    other = tmp_path / "data" / "Other"
    (other / "sft").mkdir(parents=True)
    (other / "new_tokens.json").write_text(json.dumps(["<a_0>", "<z_9>"]))
    info = json.loads((data / "dataset_info.json").read_text())
    info["Other_sft_train"] = {"file_name": str(other / "sft" / "train.json"), "formatting": "alpaca"}
    (data / "dataset_info.json").write_text(json.dumps(info))
    both = sid_tokens_for_dataset(str(data), "Toy_sft_train, Other_sft_train")
    assert both == _new_tokens() + ["<z_9>"]


@pytest.mark.parametrize("breakage, message", [
    ("unknown_name", "no dataset named 'Nope'"),
    ("no_tokens_file", "new_tokens.json of dataset"),
    ("bad_json", "new_tokens.json:1"),
    ("no_file_name", "has no 'file_name'"),
])
def test_sid_tokens_errors_name_the_problem(tmp_path, breakage, message):
    data = _make_dataset(tmp_path)
    name = "Toy_sft_train"
    if breakage == "unknown_name":
        name = "Nope"
    elif breakage == "no_tokens_file":
        (data / "Toy" / "new_tokens.json").unlink()
    elif breakage == "bad_json":
        (data / "Toy" / "new_tokens.json").write_text("[\"<a_1>\",")
    else:
        (data / "dataset_info.json").write_text(json.dumps({"Toy_sft_train": {"formatting": "alpaca"}}))
    with pytest.raises(SFTConfigError, match=message.replace("(", r"\(")):
        sid_tokens_for_dataset(str(data), name)


def test_yaml_overrides_and_write(tmp_path):
    base = tmp_path / "a.yaml"
    write_sft_yaml({"learning_rate": 1e-4, "bf16": True}, base, dataset="X", add_tokens=["<a_1>", "<b_2>"])
    cfg = load_yaml_with_overrides(base, ["learning_rate=3e-3", "bf16=false", "max_steps=7", "output_dir=runs/x"])
    assert cfg == {"learning_rate": 3e-3, "bf16": False, "dataset": "X", "add_tokens": "<a_1>,<b_2>",
                   "max_steps": 7, "output_dir": "runs/x"}
    assert add_tokens_for_config(cfg) is None  # already set: sft.sh leaves it alone
    with pytest.raises(SFTConfigError, match="key=value"):
        load_yaml_with_overrides(base, ["no_equals_sign"])
    # YAML 1.2 booleans: "no" / "off" stay strings (TrainingArguments rejects eval_strategy=False)
    base.write_text("save_strategy: no\nplot_loss: true\n")
    cfg = load_yaml_with_overrides(base, ["eval_strategy=no", "report_to=none", "do_eval=False"])
    assert cfg == {"save_strategy": "no", "plot_loss": True, "eval_strategy": "no", "report_to": "none",
                   "do_eval": False}
    out = tmp_path / "b.yaml"
    write_sft_yaml(cfg, out)
    assert load_yaml_with_overrides(out)["eval_strategy"] == "no"


def test_sft_sh_injects_add_tokens(tmp_path):
    data = _make_dataset(tmp_path)
    env = dict(os.environ, DRY_RUN="1")
    cmd = ["bash", str(ROOT / "sft.sh"), str(ROOT / "examples/sft/tiny_full.yaml"),
           f"dataset_dir={data}", "dataset=Toy_sft_train", "eval_dataset=Toy_sft_valid"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert "llamafactory-cli train" in out and "add_tokens=" + ",".join(_new_tokens()) in out.replace("\\", "")
    out = subprocess.run(cmd + ["add_tokens=<q_1>"], capture_output=True, text=True, env=env, cwd=tmp_path,
                         check=True).stdout
    assert out.count("add_tokens=") == 1
    out = subprocess.run(cmd + ["eval_strategy=no", "bf16=false"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=True).stdout
    assert "eval_strategy=\\'no\\'" in out and "bf16=false" in out  # quoted for OmegaConf's YAML 1.1
    help_text = subprocess.run(["bash", str(ROOT / "sft.sh"), "--help"], capture_output=True, text=True).stdout
    for var in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "DEEPSPEED", "VENV"):
        assert var in help_text


# ---------------------------------------------------------------- template agreement

@pytest.mark.parametrize("with_system", [True, False])
@pytest.mark.parametrize("task", ["sid_seq", "title2sid", "cand_rank"])
def test_sft_prompt_equals_rl_prompt(env, task, with_system):
    """LLaMA-Factory's SFT encoding (template unset) == tokenizer.apply_chat_template used by RL/eval."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env["model"])
    tok.add_tokens(_new_tokens())
    if task == "cand_rank":
        inp = prompts.build_input(task, history=[0, 1], candidates=[2, 3, 4], items=ITEMS)
        out = prompts.with_think("the user buys tools", prompts.answer_text(task, 3, ITEMS))
    else:
        kw = {"history": [0, 5, 7]} if task == "sid_seq" else {"item": 6}
        inp = prompts.build_input(task, items=ITEMS, id2sid=ID2SID, **kw)
        out = prompts.answer_text(task, 9, ITEMS, ID2SID)
    row = prompts.sft_row(task, inp, out, system=prompts.SYSTEM if with_system else "")
    prompt_ids, response_ids = lf_encode_row(tok, row)
    rl_ids = tok.encode(prompts.render_prompt(tok, prompts.chat_messages(row)), add_special_tokens=False)
    assert prompt_ids == rl_ids
    answer_ids = tok.encode(out, add_special_tokens=False)
    assert response_ids[: len(answer_ids)] == answer_ids
    assert response_ids[len(answer_ids)] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(response_ids[len(answer_ids) + 1:]).strip() == ""  # only the template's newline follows


# ---------------------------------------------------------------- real training runs

def _run_sft(env: dict, yaml_name: str, out: Path, *overrides: str, extra_env: dict | None = None) -> float:
    import time

    cmd = ["bash", str(ROOT / "sft.sh"), str(ROOT / "examples/sft" / yaml_name),
           f"model_name_or_path={env['model']}", f"dataset_dir={env['data']}",
           "dataset=Toy_sft_train", "eval_dataset=Toy_sft_valid", f"output_dir={out}",
           "per_device_train_batch_size=8", "logging_steps=5", "save_strategy='no'", "eval_strategy='no'",
           "warmup_ratio=0", "lr_scheduler_type=constant", *overrides]
    run_env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   **(extra_env or {}))
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=run_env, cwd=env["root"], timeout=400)
    if res.returncode != 0:
        pytest.fail(f"sft.sh failed (rc={res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return time.time() - t0


def _losses(out: Path) -> list[float]:
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in logs if "loss" in r]


def _assert_learned_and_tokens(out: Path) -> None:
    from transformers import AutoTokenizer

    losses = _losses(out)
    assert len(losses) >= 4, losses
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.7 * first, f"loss did not fall enough: {losses}"
    tok = AutoTokenizer.from_pretrained(out)
    for t in _new_tokens():
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [t], (t, ids)
        assert t not in tok.all_special_tokens  # normal tokens: skip_special_tokens keeps them
    sid = "".join(ID2SID[3])
    assert tok.decode(tok.encode(sid, add_special_tokens=False), skip_special_tokens=True) == sid


def _answer_loss(model, tok, rows: list[dict]) -> float:
    """Mean answer-token loss with the RL/eval prompt rendering."""
    import torch

    total = 0.0
    for r in rows:
        p = tok.encode(prompts.render_prompt(tok, prompts.chat_messages(r)), add_special_tokens=False)
        a = tok.encode(r["output"], add_special_tokens=False) + [tok.eos_token_id]
        with torch.no_grad():
            total += model(torch.tensor([p + a]), labels=torch.tensor([[-100] * len(p) + a])).loss.item()
    return total / len(rows)


def _safetensors_shapes(path: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.slow
def test_full_sft_loss_falls(env):
    out = env["root"] / "full"
    secs = _run_sft(env, "tiny_full.yaml", out, "max_steps=30", "learning_rate=5e-3")
    _assert_learned_and_tokens(out)
    shapes = _safetensors_shapes(out / "model.safetensors")
    from transformers import AutoTokenizer

    emb = [s for k, s in shapes.items() if k.endswith("embed_tokens.weight")]
    assert emb and emb[0][0] >= len(AutoTokenizer.from_pretrained(out))
    print(f"full SFT: 30 steps in {secs:.1f}s (incl. start-up)", file=sys.stderr)


@pytest.mark.slow
def test_lora_sft_trains_new_embeddings_and_merges(env):
    out = env["root"] / "lora"
    secs = _run_sft(env, "tiny_lora.yaml", out, "max_steps=30", "learning_rate=1e-2")
    _assert_learned_and_tokens(out)
    shapes = _safetensors_shapes(out / "adapter_model.safetensors")
    saved = [k for k in shapes if "embed_tokens" in k and "lora" not in k]
    assert saved, f"adapter lacks the resized embeddings: {sorted(shapes)[:10]}"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n_tok = len(AutoTokenizer.from_pretrained(out))
    assert shapes[saved[0]][0] >= n_tok
    merged = env["root"] / "merged"
    cmd = ["bash", str(ROOT / "sft.sh"), str(ROOT / "examples/merge/lora_merge.yaml"),
           f"model_name_or_path={env['model']}", f"adapter_name_or_path={out}", f"dataset_dir={env['data']}",
           "dataset=Toy_sft_train", f"export_dir={merged}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=env["root"], timeout=300,
                         env=dict(os.environ, SFT_CMD="export", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr[-4000:]
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.get_input_embeddings().weight.shape[0] >= n_tok
    # The merged model computes what base + adapter computes (tied lm_head kept apart, see sft.sh).
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(env["model"])
    base.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    adapted = PeftModel.from_pretrained(base, out)
    rows = _rows()[:6]
    assert _answer_loss(model, tok, rows) == pytest.approx(_answer_loss(adapted, tok, rows), rel=1e-4)
    print(f"LoRA SFT: 30 steps in {secs:.1f}s (incl. start-up)", file=sys.stderr)


def _deepspeed_cpu_op_ready() -> bool:
    """DeepSpeed on CPU JIT-compiles its shared-memory comm op once (minutes); is it built already?"""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return False
    from torch.utils.cpp_extension import _get_build_directory

    return any(Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).glob("*.so"))


@pytest.mark.slow
@pytest.mark.skipif(
    not (os.environ.get("MIMIGENREC_TEST_DEEPSPEED") == "1" or _deepspeed_cpu_op_ready()),
    reason="deepspeed is not installed, or its CPU comm op is not compiled yet (one-time, minutes); build it with "
           "`python -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()'` "
           "or set MIMIGENREC_TEST_DEEPSPEED=1 to compile it inside this test",
)
def test_zero2_on_cpu(env):
    out = env["root"] / "zero2"
    secs = _run_sft(env, "tiny_full.yaml", out, "max_steps=4", "learning_rate=5e-3", "logging_steps=1",
                    extra_env={"DEEPSPEED": "examples/deepspeed/ds_z2.json", "NPROC_PER_NODE": "1"})
    losses = _losses(out)
    assert len(losses) == 4 and all(x == x for x in losses)
    print(f"ZeRO-2 CPU: 4 steps in {secs:.1f}s (incl. start-up)", file=sys.stderr)
