"""bench/quality.py's stage runner: side-by-side stages share the cores, reuse needs the same command."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _job(stage: str, out: Path, code: str = "") -> tuple:
    cmd = [sys.executable, "-c", f"import os, pathlib; {code}"
           f"pathlib.Path({str(out)!r}).write_text(os.environ.get('OMP_NUM_THREADS', ''))"]
    return stage, cmd, None, (), None


def test_run_many_runs_stages_side_by_side_and_reuses_them(quality, tmp_path, monkeypatch):
    monkeypatch.setattr(quality.os, "cpu_count", lambda: 4)
    r = quality.Runner(tmp_path / "work", reuse=True)
    outs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert r.run_many([_job("a", outs[0]), _job("b", outs[1])]) == {"a": True, "b": True}
    assert [o.read_text() for o in outs] == ["2", "2"]  # 4 cores shared by 2 stages
    assert set(r.seconds) == {"a", "b"} and (tmp_path / "work" / "stages" / "a.json").is_file()
    again = quality.Runner(tmp_path / "work", reuse=True)
    assert again.run_many([_job("a", outs[0]), _job("b", outs[1], "x = 1; ")]) == {"a": False, "b": True}
    assert json.loads((tmp_path / "work" / "stages" / "b.json").read_text())["command"] == again.commands["b"]


def test_a_failing_side_by_side_stage_stops_the_run_with_its_log(quality, tmp_path, capsys):
    r = quality.Runner(tmp_path / "work", reuse=False)
    bad = ("bad", [sys.executable, "-c", "print('the reason'); raise SystemExit(3)"], None, (), None)
    with pytest.raises(SystemExit) as e:
        r.run_many([_job("ok", tmp_path / "ok.txt"), bad])
    assert "bad failed (exit 3)" in str(e.value) and "the reason" in str(e.value)
    assert (tmp_path / "ok.txt").is_file() and not (tmp_path / "work" / "stages" / "bad.json").exists()


def test_sft_epochs_are_capped_by_the_step_budget_on_a_bigger_category(quality, tmp_path):
    data = tmp_path / "data"
    (data / "sft").mkdir(parents=True)
    (data / "dataset_info.json").write_text(json.dumps({"cat_sft_train": {"file_name": "sft/train.json"}}))
    for rows, want in ((12888, 0), (40000, quality.SFT_MAX_STEPS)):  # the bundled size trains its epochs
        (data / "sft" / "train.json").write_text(json.dumps([{}] * rows))
        a = quality.parse_args(["--raw_dir", str(tmp_path), "--category", "cat"])
        assert quality.sft_steps(a, data, "cat") == want
    a = quality.parse_args(["--raw_dir", str(tmp_path), "--category", "cat", "--sft_epochs", "2"])
    assert quality.sft_steps(a, data, "cat") == 0          # 2 epochs of 40,000 rows fit the budget
    a = quality.parse_args(["--raw_dir", str(tmp_path), "--category", "cat", "--sft_steps", "7"])
    assert quality.sft_steps(a, data, "cat") == 7
