"""ConstrainedGRPOTrainer on a tiny random model: valid rollouts in both modes, constrained
log-probs against brute force, and a real 3-step run through trl_trainer.sh that resumes."""
from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mimigenrec import prompts
from mimigenrec.io import read_json, read_jsonl, write_json
from mimigenrec.toy_data import make_dataset

ROOT = Path(__file__).resolve().parents[1]
G = 4  # num_generations


def write_rl_splits(d, cand_every: int = 0, n_cands: int = 5, seed: int = 0) -> None:
    """RL rows from the dataset's interactions: sid_seq rows, and every ``cand_every``-th row a cand_rank one."""
    items, id2sid = d.load_items(), d.load_id2sid()
    rng = random.Random(seed)
    for split in ("train", "valid", "test"):
        rows = []
        for i, r in enumerate(read_jsonl(d.inter(split))):
            extra = {"user_id": r["user_id"], "position": r["position"], "target": r["target"]}
            task, cands = "sid_seq", None
            if cand_every and i % cand_every == 1:
                task = "cand_rank"
                cands = [r["target"]] + rng.sample([j for j in items if j != r["target"]], n_cands - 1)
                rng.shuffle(cands)
                extra["candidates"] = cands
            inp = prompts.build_input(task, history=r["history"], items=items, id2sid=id2sid, candidates=cands)
            sft = prompts.sft_row(task, inp, prompts.answer_text(task, r["target"], items, id2sid))
            rows.append(prompts.rl_row(sft, data_source="toy", task=task, split=split, index=i, extra=extra))
        write_json(d.rl(split), rows)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset (SID rows + candidate rows) and a tiny model holding its SID tokens."""
    from mimigenrec.models.backbones import build_tiny_model

    root = tmp_path_factory.mktemp("grpo")
    d = make_dataset(root / "ds")
    write_rl_splits(d, cand_every=3)
    items = d.load_items()
    model = build_tiny_model(root / "model", new_tokens=read_json(d.new_tokens),
                             corpus=[it["title"] for it in items.values()])
    return SimpleNamespace(root=root, data=d, model=model, id2sid=d.load_id2sid())


def make_trainer(world, tmp_path, **overrides):
    from mimigenrec.rl.config import load_config
    from mimigenrec.rl.train_grpo import build_trainer

    values = dict(model_name_or_path=str(world.model), data_dir=str(world.data.root), output_dir=str(tmp_path / "out"),
                  num_generations=G, per_device_train_batch_size=2 * G, max_steps=1, eval_rows=0, seed=0,
                  rewards=["rule", "partial_match", "candidate_choice"], use_cpu=True)
    values.update(overrides)
    return build_trainer(load_config(None, **values))


def group_batch(trainer, idx):
    """Dataset rows ``idx``, each repeated num_generations times (as TRL's RepeatSampler does)."""
    return [trainer.train_dataset[i] for i in idx for _ in range(G)]


def decoded(trainer, out) -> list[str]:
    return trainer.processing_class.batch_decode(out["completion_ids"], skip_special_tokens=True)


def valid_answers(world, row) -> set[str]:
    cands = (row["extra_info"] or {}).get("candidates")
    if cands is not None:
        return {prompts.item_ref(c) for c in cands}
    return {prompts.sid_string(s) for s in world.id2sid.values()}


@pytest.mark.parametrize("mode", ["sample", "beam"])
def test_every_rollout_is_a_valid_item(world, tmp_path, mode):
    rewards = ["ndcg_rank", "rule"] if mode == "beam" else ["rule", "partial_match", "candidate_choice"]
    trainer = make_trainer(world, tmp_path, rollout_mode=mode, rewards=rewards)
    idx = [0, 1, 2, 4]  # rows 1 and 4 are candidate-ranking rows
    batch = group_batch(trainer, idx)
    assert any(r["extra_info"]["candidates"] for r in batch)
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch)
    texts = decoded(trainer, out)
    assert len(texts) == len(batch)
    for row, text in zip(batch, texts):
        assert text in valid_answers(world, row), text
        item = (int(re.findall(r"\d+", text)[0]) if text.startswith("[ITEM_")
                else next(i for i, s in world.id2sid.items() if prompts.sid_string(s) == text))
        assert item in world.id2sid
    # every completion is answer + EOS
    eos = trainer.processing_class.eos_token_id
    lengths = out["completion_mask"].sum(1)
    assert all(out["completion_ids"][i, n - 1] == eos for i, n in enumerate(lengths.tolist()))
    if mode == "beam":
        for g in range(0, len(texts), G):
            assert len(set(texts[g:g + G])) == G  # one group = G distinct beams
        # beam ranks reached the reward: ndcg_rank = 1 on a hit, else -1/log2(rank + 2)
        want = [1.0 if t == r["reward_model"]["ground_truth"] else -1 / math.log2(k % G + 2)
                for k, (r, t) in enumerate(zip(batch, texts))]
        got = trainer._metrics["train"]["rewards/ndcg_rank/mean"][-1]
        assert got == pytest.approx(sum(want) / len(want), abs=1e-6)


def test_beam_groups_are_the_evaluation_ranking(world, tmp_path):
    """A beam group = evaluate.sh's top num_generations items for that prompt, in the same order."""
    import argparse

    from mimigenrec.eval.evaluate import ModelRanker, load_eval_data

    trainer = make_trainer(world, tmp_path, rollout_mode="beam", rewards=["rule"])
    sid_rows = [i for i, r in enumerate(trainer.train_dataset) if r["extra_info"]["task"] == "sid_seq"][:3]
    batch = group_batch(trainer, sid_rows)
    trainer.model.train()
    texts = decoded(trainer, trainer._generate_and_score_completions(batch))
    args = argparse.Namespace(data_dir=str(world.data.root), split="train", max_rows=0, seed=0, task="sid_seq",
                              captions="auto", methods=["model:x"], output_dir=str(tmp_path / "ev"),
                              num_negatives=9, num_beams=G, beam_search="auto", think=False, max_new_tokens=8)
    data = load_eval_data(args)
    ranker = ModelRanker("m", str(world.model), data, args, "cpu")
    by_key = {(r["user_id"], r["position"]): r for r in data.rows}
    rows = [by_key[(r["extra_info"]["user_id"], r["extra_info"]["position"])] for r in batch[::G]]
    ranked = [p["ranked"] for p in ranker.predict(rows, None)]
    want = [prompts.sid_string(world.id2sid[i]) for rk in ranked for i in rk]
    assert texts == want


def _target_in_group(trainer, texts, batch) -> list[bool]:
    return [any(t == batch[g]["reward_model"]["ground_truth"] for t in texts[g:g + G]) for g in range(0, len(texts), G)]


def test_a_step_on_rows_with_hits_has_advantages_and_moves_the_weights(world, tmp_path):
    """Beam rollouts on rows whose target is among the beams (injected, so the test does not hang on
    what a random model happens to rank): non-zero advantages, and one optimizer step changes the weights."""
    trainer = make_trainer(world, tmp_path, rollout_mode="beam", rewards=["ndcg_rank"], learning_rate=1e-3,
                           max_steps=1, logging_steps=1, save_strategy="no", inject_target=True)
    sid = [i for i, r in enumerate(trainer.train_dataset) if r["extra_info"]["task"] == "sid_seq"]
    trainer.model.train()
    hits = []
    for i in sid[:4]:
        batch = group_batch(trainer, [i])
        if _target_in_group(trainer, decoded(trainer, trainer._generate_and_score_completions(batch)), batch)[0]:
            hits.append(i)
    assert len(hits) == 4, "inject_target left a group without its target"
    out = trainer._generate_and_score_completions(group_batch(trainer, hits[:2]))
    assert (out["advantages"].abs() > 1e-6).all()
    trainer.train_dataset = trainer.train_dataset.select(hits[:2])
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "frac_reward_zero_std" in h]
    assert logged and logged[-1]["frac_reward_zero_std"] == 0.0
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


def test_teacher_kl_is_zero_for_its_own_teacher_and_trains_toward_another(world, tmp_path):
    """teacher_kl through the trainer: with the policy as its only teacher every beam's reward is 0
    (the trainer's beam_logp is the teacher's score); with another model as teacher the groups have
    advantages and one step changes the weights."""
    from mimigenrec.models.backbones import build_tiny_model

    sid = [i for i, r in enumerate(make_trainer(world, tmp_path, rollout_mode="beam", rewards=["rule"]).train_dataset)
           if r["extra_info"]["task"] == "sid_seq"][:2]
    own = make_trainer(world, tmp_path, rollout_mode="beam", rewards=["teacher_kl"], teachers=[str(world.model)])
    own.model.train()
    own._generate_and_score_completions(group_batch(own, sid))
    m = own._metrics["train"]
    assert abs(m["rewards/teacher_kl/mean"][-1]) < 1e-4 and m["rewards/teacher_kl/std"][-1] < 1e-4

    other = build_tiny_model(tmp_path / "teacher", new_tokens=read_json(world.data.new_tokens),
                             corpus=[it["title"] for it in world.data.load_items().values()], seed=7)
    trainer = make_trainer(world, tmp_path, rollout_mode="beam", rewards=["teacher_kl"], learning_rate=1e-3,
                           teachers=[str(other), str(world.model)], logging_steps=1, save_strategy="no")
    trainer.model.train()
    out = trainer._generate_and_score_completions(group_batch(trainer, sid))
    assert (out["advantages"].abs() > 1e-6).any()
    trainer.train_dataset = trainer.train_dataset.select(sid)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]


def test_propose_cf_puts_sasrecs_best_items_beside_the_policys_beams_with_their_own_logps(world, tmp_path):
    """propose_cf: a group's last beams give way to the items SASRec ranks highest among those its other
    beams miss; each is scored with the policy's own log-prob, so teacher_kl with the policy as its only
    teacher stays 0 on them too."""
    from mimigenrec.io import BadInputError
    from rewards.collaborative import sasrec_proposals

    kw = {"rollout_mode": "beam", "rewards": ["teacher_kl"], "teachers": [str(world.model)]}
    plain = make_trainer(world, tmp_path / "plain", **kw)
    sid = [i for i, r in enumerate(plain.train_dataset) if r["extra_info"]["task"] == "sid_seq"][:3]
    batch = group_batch(plain, sid)
    plain.model.train()
    before = decoded(plain, plain._generate_and_score_completions(batch))
    trainer = make_trainer(world, tmp_path / "prop", propose_cf=2, **kw)
    trainer.model.train()
    texts = decoded(trainer, trainer._generate_and_score_completions(batch))
    for g in range(0, len(batch), G):
        kept = before[g:g + G - 2]
        assert texts[g:g + G - 2] == kept                       # the policy's best beams stay
        want = sasrec_proposals([batch[g]], [set(kept)], 2, str(world.data.root), str(tmp_path / "prop" / "out"))[0]
        assert texts[g + G - 2:g + G] == want and len(set(texts[g:g + G])) == G
    assert texts != before, "the proposals equal the policy's own last beams: the test shows nothing"
    m = trainer._metrics["train"]
    assert abs(m["rewards/teacher_kl/mean"][-1]) < 1e-4 and m["rewards/teacher_kl/std"][-1] < 1e-4
    for bad in ({"rollout_mode": "sample"}, {"propose_cf": G}, {"inject_target": True}):
        with pytest.raises(BadInputError, match="propose_cf"):
            make_trainer(world, tmp_path / "bad", **{**kw, "propose_cf": 2, **bad})


@pytest.mark.parametrize("mode", ["sample", "beam"])
def test_inject_target_puts_the_target_in_every_group(world, tmp_path, mode):
    rewards = ["ndcg_rank"] if mode == "beam" else ["rule"]
    plain = make_trainer(world, tmp_path / "plain", rollout_mode=mode, rewards=rewards)
    sid = [i for i, r in enumerate(plain.train_dataset) if r["extra_info"]["task"] == "sid_seq"]
    plain.model.train()
    batch = group_batch(plain, sid[:6])
    torch.manual_seed(0)
    before = decoded(plain, plain._generate_and_score_completions(batch))
    assert not all(_target_in_group(plain, before, batch)), "every group already holds its target"
    trainer = make_trainer(world, tmp_path / "inject", rollout_mode=mode, rewards=rewards, inject_target=True)
    trainer.model.train()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(batch)
    texts = decoded(trainer, out)
    assert all(_target_in_group(trainer, texts, batch))
    missing = [not h for h in _target_in_group(plain, before, batch)]
    for g, miss in enumerate(missing):  # only the last completion of a group without its target changes
        if mode == "beam":
            want = before[g * G:(g + 1) * G - 1] + [batch[g * G]["reward_model"]["ground_truth"]] if miss else \
                before[g * G:(g + 1) * G]
            assert texts[g * G:(g + 1) * G] == want
    assert trainer._metrics["train"]["injected_target"][-1] == pytest.approx(sum(missing) / len(missing))
    assert (out["advantages"].view(-1, G).abs().sum(1) > 0).all()


def brute_force_logps(world, trainer, row, comp: list[int], logits: torch.Tensor) -> list[float]:
    """Log-softmax over the tokens some allowed answer continues with, by enumerating the answers."""
    tok = trainer.processing_class
    eos = tok.eos_token_id
    answers = [tok(a, add_special_tokens=False).input_ids + [eos] for a in valid_answers(world, row)]
    out = []
    for t, token in enumerate(comp):
        allowed = {a[t] for a in answers if a[:t] == comp[:t] and len(a) > t}
        if not allowed:  # complete answer: only EOS
            allowed = {eos}
        assert token in allowed
        sel = logits[t, sorted(allowed)]
        out.append(float(logits[t, token] - torch.logsumexp(sel, 0)))
        if token == eos:
            break
    return out


@pytest.mark.parametrize("mode", ["sample", "beam"])
def test_constrained_logps_equal_brute_force(world, tmp_path, mode):
    trainer = make_trainer(world, tmp_path, rollout_mode=mode, temperature=0.7, rewards=["rule"])
    batch = group_batch(trainer, [0, 1])
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    T = out["completion_ids"].shape[1]
    trainer._logp_allowed = out.get("allowed_items")
    with torch.no_grad():
        logps, ent = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, T, compute_entropy=True)
        logits = trainer.model(input_ids=ids, attention_mask=attn).logits[:, -T - 1:-1] / 0.7
    trainer._logp_allowed = None
    assert torch.isfinite(logps).all() and torch.isfinite(ent).all()
    unconstrained = torch.log_softmax(logits, -1).gather(-1, out["completion_ids"][..., None])[..., 0]
    for r, row in enumerate(batch):
        n = int(out["completion_mask"][r].sum())
        comp = out["completion_ids"][r, :n].tolist()
        want = brute_force_logps(world, trainer, row, comp, logits[r])
        assert logps[r, :n].tolist() == pytest.approx(want, abs=1e-5)
        assert logps[r, n - 1] == pytest.approx(0.0, abs=1e-6)  # EOS after a complete answer is certain
        assert (logps[r, :n] >= unconstrained[r, :n] - 1e-6).all()  # renormalising never lowers a log-prob


@pytest.mark.parametrize("constrained", [True, False])
def test_rollouts_ignore_the_models_generation_config(world, tmp_path, monkeypatch, constrained):
    """A backbone's saved sampling settings (an Instruct model's temperature, top_p, top_k,
    repetition penalty) never reach the rollouts: generate() runs with the trainer's settings."""
    import shutil

    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    model_dir = tmp_path / "instruct_like"
    shutil.copytree(world.model, model_dir)
    saved = GenerationConfig.from_pretrained(world.model)
    saved.update(do_sample=True, temperature=0.05, top_p=0.1, top_k=1, repetition_penalty=3.0)
    saved.save_pretrained(model_dir)
    rewards = ["rule", "partial_match"] if constrained else ["format", "rule"]
    trainer = make_trainer(world, tmp_path, model_name_or_path=str(model_dir), constrained=constrained,
                           rewards=rewards, max_completion_length=6)
    assert trainer.model.generation_config.top_k == 1  # the source of the leak is there
    seen = []
    prepare = GenerationMixin._prepare_generation_config

    def spy(self, *a, **kw):
        cfg, rest = prepare(self, *a, **kw)
        seen.append(cfg)
        return cfg, rest

    monkeypatch.setattr(GenerationMixin, "_prepare_generation_config", spy)
    trainer.model.train()
    trainer._generate_and_score_completions(group_batch(trainer, [0, 2]))
    assert seen
    for cfg in seen:
        assert cfg.do_sample and cfg.temperature == 1.0 and cfg.top_p == 1.0
        assert cfg.top_k in (None, 0) and cfg.repetition_penalty == 1.0
    assert trainer.model.generation_config.top_k == 1  # the model's own config is restored afterwards


def test_unconstrained_mode_is_stock_trl(world, tmp_path):
    trainer = make_trainer(world, tmp_path, constrained=False, rewards=["format", "rule"], max_completion_length=6)
    trainer.model.train()
    out = trainer._generate_and_score_completions(group_batch(trainer, [0, 1]))
    assert "allowed_items" not in out and out["completion_ids"].shape[1] <= 6
    # free-form completions are scored but not forced onto the trie
    trainer._logp_allowed = None
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        logps, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, ids.shape[1] - out[
            "prompt_ids"].shape[1])
    assert torch.isfinite(logps).all()


def test_answer_space_regex_and_vllm_guards(world, tmp_path):
    from mimigenrec.rl.grpo import ConstrainedGRPOTrainer

    trainer = make_trainer(world, tmp_path, rewards=["rule"])
    space = trainer.answer_space
    rx = re.compile(space.regex())
    assert all(rx.fullmatch(t) for t in space.texts)
    assert not rx.fullmatch("<a_0><b_0>") and not rx.fullmatch("[ITEM_999]") and not rx.fullmatch("x")
    args = SimpleNamespace(use_liger_loss=False, use_transformers_paged=False, use_vllm=True,
                           vllm_guided_decoding_regex=None, vllm_importance_sampling_correction=False,
                           per_device_train_batch_size=G, steps_per_generation=1, num_generations=G)
    with pytest.raises(ValueError, match="beam cannot run on vLLM"):
        ConstrainedGRPOTrainer._check_args(args, space, "beam")
    ConstrainedGRPOTrainer._check_args(args, space, "sample")
    assert args.vllm_guided_decoding_regex == space.regex()
    args.use_vllm, args.per_device_train_batch_size = False, 3
    with pytest.raises(ValueError, match="whole prompt groups"):
        ConstrainedGRPOTrainer._check_args(args, space, "beam")


def test_config_overrides_and_errors(tmp_path):
    from mimigenrec.rl.config import load_config

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("rewards: [rule]\nnum_generations: 4\nper_device_train_batch_size: 4\nrollout_mode: sample\n")
    cfg = load_config(cfg_path, ["rewards=[rule,format]", "reward_weights=[1.0,0.5]", "rollout_mode=beam",
                                 "learning_rate=2e-5", f"output_dir={tmp_path}/o"])
    assert cfg.rewards == ["rule", "format"] and cfg.reward_weights == [1.0, 0.5]
    assert cfg.rollout_mode == "beam" and cfg.learning_rate == 2e-5 and cfg.report_to == []
    if not torch.cuda.is_available():
        assert cfg.bf16 is False
    with pytest.raises(ValueError, match="did you mean rewards"):
        load_config(cfg_path, ["rewardz=[rule]"])
    with pytest.raises(ValueError, match="rollout_mode"):
        load_config(cfg_path, ["rollout_mode=greedy", f"output_dir={tmp_path}/o"])


def test_train_row_subset_is_seeded_and_zero_means_all():
    from mimigenrec.rl.train_grpo import _subset

    rows = [{"i": i} for i in range(20)]
    assert _subset(rows, None, 0) == rows and _subset(rows, 0, 0) == rows and _subset(rows, 50, 0) == rows
    a, b = _subset(rows, 5, 1), _subset(rows, 5, 1)
    assert a == b and len(a) == 5 and [r["i"] for r in a] == sorted(r["i"] for r in a)


def test_heldout_prompts_train_label_free_on_some_users_and_watch_the_others(world, tmp_path):
    """heldout_prompts: the valid rows of a seeded share of users, stripped of every trace of their target,
    are the training prompts; the watch holds the other users' rows, labels intact; a reward that reads
    labels is refused. A teacher_kl step on those prompts has advantages and moves the weights."""
    from mimigenrec.models.backbones import build_tiny_model
    from mimigenrec.rl.train_grpo import heldout_split

    valid = read_json(world.data.rl("valid"))
    prompts_, watch = heldout_split(valid, 0.5, 0, "valid.json")
    users = {r["extra_info"]["user_id"] for r in valid}
    p_users = {r["extra_info"]["user_id"] for r in prompts_}
    w_users = {r["extra_info"]["user_id"] for r in watch}
    assert p_users | w_users == users and not p_users & w_users and len(p_users) == round(len(users) / 2)
    assert all(r["reward_model"]["ground_truth"] is None and r["extra_info"]["target"] is None for r in prompts_)
    assert all(r["reward_model"]["ground_truth"] for r in watch) and len(prompts_) + len(watch) == len(valid)
    assert heldout_split(valid, 0.5, 0, "v")[0] == prompts_ and heldout_split(valid, 0.5, 1, "v")[0] != prompts_

    with pytest.raises(ValueError, match="reward rule needs them"):
        make_trainer(world, tmp_path, rollout_mode="beam", rewards=["rule"], heldout_prompts=0.5)
    with pytest.raises(ValueError, match="heldout_prompts must be in"):
        make_trainer(world, tmp_path, rollout_mode="beam", rewards=["teacher_kl"], heldout_prompts=1.0)
    other = build_tiny_model(tmp_path / "teacher", new_tokens=read_json(world.data.new_tokens),
                             corpus=[it["title"] for it in world.data.load_items().values()], seed=7)
    trainer = make_trainer(world, tmp_path, rollout_mode="beam", rewards=["teacher_kl"], heldout_prompts=0.5,
                           teachers=[str(other)], learning_rate=1e-3, eval_rows=1000, eval_every_steps=0,
                           logging_steps=1, save_strategy="no")
    sid = [i for i, r in enumerate(trainer.train_dataset) if r["extra_info"]["task"] == "sid_seq"]
    assert len(trainer.train_dataset) == len(prompts_) and sid
    assert {r["extra_info"]["user_id"] for r in trainer.train_dataset} == p_users
    assert {r["extra_info"]["user_id"] for r in trainer.watch.rows} <= w_users
    trainer.model.train()
    out = trainer._generate_and_score_completions(group_batch(trainer, sid[:2]))
    assert (out["advantages"].abs() > 1e-6).any()


def _run_config(world, out: Path) -> Path:
    cfg = world.root / "run.yaml"
    cfg.write_text(json.dumps(dict(
        model_name_or_path=str(world.model), data_dir=str(world.data.root), output_dir=str(out),
        rewards=["partial_match", "rule", "candidate_choice"], reward_weights=[1.0, 1.0, 0.5],
        num_generations=G, per_device_train_batch_size=2 * G, learning_rate=1e-3, logging_steps=1,
        save_steps=3, eval_every_steps=2, eval_rows=6, seed=0,
        inject_target=True)))  # JSON is valid YAML; the target in every group, so every step has a gradient
    return cfg


def _launch(cfg: Path, *overrides: str) -> subprocess.CompletedProcess:
    """./trl_trainer.sh CONFIG overrides..., i.e. accelerate launch with examples/accelerate/cpu.yaml."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(ROOT / "trl_trainer.sh"), str(cfg), *overrides], cwd=cfg.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_three_step_run_changes_weights_and_resumes(world):
    from mimigenrec.rl.config import load_config
    from mimigenrec.rl.train_grpo import run

    out = world.root / "run"
    cfg = _run_config(world, out)
    proc = _launch(cfg, "max_steps=3")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["global_step"] == 3
    ckpt = out / "checkpoint-3"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    before, after = _weights(world.model), _weights(ckpt)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "3 GRPO steps left every weight unchanged"
    watch = [json.loads(x) for x in (out / "reward_watch.jsonl").read_text().splitlines()]
    assert [p["step"] for p in watch] == [0, 2, 3] and all(0 <= p["ndcg@10"] <= 1 for p in watch)
    assert all(p["eval_rows"] == 6 and "ndcg@10_se" in p and "hr@10" in p for p in watch)
    for m in ("ndcg@10", "hr@10"):  # paired changes against step 0: mean of per-row changes = change of means
        assert watch[-1][f"{m}_delta_vs_step0"] == pytest.approx(watch[-1][m] - watch[0][m], abs=1e-9)
        assert watch[-1][f"{m}_delta_se"] >= 0
    sel = json.loads((out / "selection.json").read_text())
    # the best point among step 0 and those beating it by >= 2 s.e. of the paired change (first of equals)
    eligible = [p for p in watch if p["step"] == 0 or (p["ndcg@10_delta_vs_step0"] > 0 and
                                                       p["ndcg@10_delta_vs_step0"] >= 2 * p["ndcg@10_delta_se"])]
    best = max(eligible, key=lambda p: p["ndcg@10"])
    assert sel["selected_step"] == best["step"] and sel["final_step"] == 3
    kept = out / "best_valid" if best["step"] != 3 else ckpt
    assert torch.equal(_weights(out)[changed[0]], _weights(kept)[changed[0]])
    assert (out / "reward_watch.png").stat().st_size > 1000

    # resume in this process (the launcher path is covered above; this saves a second interpreter start)
    trainer = run(load_config(cfg, ["max_steps=5", f"resume_from_checkpoint={ckpt}", "use_cpu=true"]))
    assert trainer.state.global_step == 5
    assert [s for s, _ in trainer.reward_history] == [3, 4]  # only steps 4 and 5 were generated again
    state = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["global_step"] == 5
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5]
    assert not torch.equal(_weights(out / "checkpoint-5")[changed[0]], after[changed[0]])


def test_policy_dropout_is_off_by_default(world, tmp_path):
    """Rollouts are drawn in eval mode; a policy trained with dropout would be scored under another one."""
    from mimigenrec.models.backbones import build_tiny_model

    items = world.data.load_items()
    neox = build_tiny_model(tmp_path / "neox", new_tokens=read_json(world.data.new_tokens),
                            corpus=[it["title"] for it in items.values()], arch="gpt_neox", dropout=0.3)
    def drops(tr):  # nn.Dropout modules and the attention layers' float rates
        return [m.p for m in tr.model.modules() if isinstance(m, torch.nn.Dropout)] + \
            [m.attention_dropout for m in tr.model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    assert set(drops(make_trainer(world, tmp_path, model_name_or_path=str(neox)))) == {0.0}
    assert 0.3 in drops(make_trainer(world, tmp_path, model_name_or_path=str(neox), disable_dropout=False))
