"""Item head (R2ec recipe): ranking against a brute-force dot product, the RecPO reward by hand and
through the trainer, save/load round trip, the warm-up loss falling, and short runs of both stages."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mimigenrec.io import read_json, read_jsonl
from mimigenrec.toy_data import make_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from test_grpo import write_rl_splits  # tests/ is on sys.path (no package)

    from mimigenrec.models.backbones import build_tiny_model

    root = tmp_path_factory.mktemp("head")
    d = make_dataset(root / "ds")
    write_rl_splits(d)
    items = d.load_items()
    model = build_tiny_model(root / "model", new_tokens=read_json(d.new_tokens),
                             corpus=[it["title"] for it in items.values()])
    return SimpleNamespace(root=root, data=d, model=model, items=items, id2sid=d.load_id2sid())


def make_head(world, source="table", view="sid", temperature=0.5, seed=0, pooling="last"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mimigenrec.models.item_head import HeadConfig, ItemHeadModel, item_text

    tok = AutoTokenizer.from_pretrained(world.model)
    lm = AutoModelForCausalLM.from_pretrained(world.model).eval()
    ids = sorted(world.items)
    cfg = HeadConfig(item_ids=ids, item_texts=[item_text(view, i, world.items, world.id2sid) for i in ids],
                     item_source=source, item_view=view, temperature=temperature, item_pooling=pooling)
    head = ItemHeadModel.build(lm, tok, cfg)
    if source == "table":  # well-separated scores, so the brute-force order has no near-ties
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.item_table.copy_(torch.randn(head.item_table.shape, generator=g))
    return head


def single_state(lm, ids: list[int]) -> torch.Tensor:
    """Brute force: the final hidden state of one unpadded sequence's last token."""
    with torch.no_grad():
        out = lm(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1].float()


def brute_ranking(head, prompt: str, items: list[int]) -> list[int]:
    u = single_state(head.lm, head.user_tokens(prompt))
    E = head.item_embeddings().detach()
    s = {i: float(u @ E[head.col_of[i]]) / head.cfg.temperature for i in items}
    return sorted(items, key=lambda i: (-s[i], i))


def test_lm_item_encodings_and_user_states_equal_single_forwards(world):
    from mimigenrec.models.item_head import user_prompt

    head = make_head(world, source="lm", view="title_sid")
    toks = head.item_tokens()
    E = head.item_embeddings()
    for c in (0, 7, len(toks) - 1):  # batched, left-padded encodings == one unpadded forward each
        assert torch.allclose(E[c], single_state(head.lm, toks[c]), atol=1e-5)
        assert toks[c][-1] == head.marker_id == head.tokenizer.eos_token_id
    rows = read_jsonl(world.data.inter("test"))[:4]
    seqs = [head.user_tokens(user_prompt(head.tokenizer, "sid_seq", r["history"], world.items, world.id2sid))
            for r in rows]
    batched = head.encode(seqs, batch_size=4)
    for r, s in enumerate(seqs):
        assert torch.allclose(batched[r], single_state(head.lm, s), atol=1e-5)


def test_head_ranking_through_evaluate_equals_brute_force_dot_product(world, tmp_path):
    from mimigenrec.eval import evaluate
    from mimigenrec.models.item_head import user_prompt

    head = make_head(world, source="table", temperature=0.5)
    head.save_pretrained(tmp_path / "head")
    out = tmp_path / "eval"
    rc = evaluate.main(["--data_dir", str(world.data.root), "--split", "test", "--model", f"head={tmp_path / 'head'}",
                        "--no_baselines", "--num_beams", "20", "--ks", "1,5,10", "--batch_size", "5",
                        "--output_dir", str(out), "--quiet"])
    assert rc == 0
    preds = read_jsonl(out / "predictions_head.jsonl")
    rows = read_jsonl(world.data.inter("test"))
    assert len(preds) == len(rows)
    from mimigenrec.sequences import load_sequences

    universe = load_sequences(world.data.root)[1].all_items()
    for p, r in zip(preds, rows):
        prompt = user_prompt(head.tokenizer, "sid_seq", r["history"], world.items, world.id2sid)
        assert p["ranked"] == brute_ranking(head, prompt, universe)[:20]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head"]["n_rows"] == len(rows) and metrics["_meta"]["methods"]["head"]["kind"] == "item_head"
    # candidate ranking: the same scores, restricted to each row's candidates
    from mimigenrec.models.head_eval import HeadRanker

    args = evaluate.build_parser().parse_args(["--data_dir", str(world.data.root), "--model", str(tmp_path / "head")])
    args.methods = [f"model:{tmp_path / 'head'}"]
    ranker = HeadRanker("head", str(tmp_path / "head"), evaluate.load_eval_data(args), args, "cpu")
    cands = [list(dict.fromkeys([3, 9, 1, r["target"]])) for r in rows[:3]]
    for p, r, c in zip(ranker.predict(rows[:3], cands), rows, cands):
        prompt = user_prompt(head.tokenizer, "sid_seq", r["history"], world.items, world.id2sid)
        assert p["ranked"] == [i for i in brute_ranking(head, prompt, universe) if i in set(c)]
    # the head's own rank of a target agrees with its ranking
    prompt = user_prompt(head.tokenizer, "sid_seq", rows[0]["history"], world.items, world.id2sid)
    scores = head.scores(head.encode([head.user_tokens(prompt)]))
    full = head.rank(scores, len(head.cfg.item_ids))[0]
    cols = torch.tensor([head.col_of[i] for i in (full[0], full[3], full[-1])])
    assert head.target_ranks(scores.expand(3, -1), cols).tolist() == [0, 3, len(full) - 1]


def test_recpo_reward_equals_hand_computed_values():
    from rewards import get_reward

    recpo = get_reward("recpo")
    got = recpo(completions=["a", "b", "c"], head_rank=[0, 3, 9], head_prob=[0.5, 0.1, 0.0])
    # 0.95 * 1/log2(rank + 2) + 0.05 * p, by hand: log2(2) = 1, log2(5) = 2.321928..., log2(11) = 3.459431...
    want = [0.95 * 1 + 0.05 * 0.5, 0.95 / 2.321928094887362 + 0.05 * 0.1, 0.95 / 3.4594316186372973]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[0] == pytest.approx(0.975) and got[1] == pytest.approx(0.41414, abs=1e-5)
    cut = get_reward("recpo", prob_weight=0.2, ndcg_k=5)(completions=["a", "b"], head_rank=[4, 5], head_prob=[1.0, 1.0])
    assert cut == pytest.approx([0.8 / math.log2(6) + 0.2, 0.2])
    with pytest.raises(ValueError, match="head_rank"):
        recpo(completions=["a"])
    think = get_reward("think_only")
    assert think(completions=["<think>likes drills</think>", " <think> x </think>\n", "<think></think>",
                              "<think>a</think><a_1>", "plain"]) == [1.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("source", ["table", "lm"])
def test_save_load_round_trip(world, tmp_path, source):
    from transformers import AutoModelForCausalLM

    from mimigenrec.models.item_head import (
        HEAD_CONFIG,
        ItemHeadModel,
        is_head_dir,
        user_prompt,
    )

    head = make_head(world, source=source, temperature=0.7)
    head.save_pretrained(tmp_path / "h")
    assert is_head_dir(tmp_path / "h") and not is_head_dir(world.model)
    back = ItemHeadModel.from_pretrained(tmp_path / "h")
    assert back.cfg == head.cfg and back.marker_id == head.marker_id
    assert torch.equal(back.item_embeddings(), head.item_embeddings())
    r = read_jsonl(world.data.inter("test"))[0]
    prompt = user_prompt(back.tokenizer, "sid_seq", r["history"], world.items, world.id2sid)
    assert back.user_tokens(prompt) == head.user_tokens(prompt)
    s0 = head.scores(head.encode([head.user_tokens(prompt)]))
    s1 = back.scores(back.encode([back.user_tokens(prompt)]))
    assert torch.allclose(s0, s1, atol=1e-6)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "h")  # still a normal HF folder
    assert plain.config.hidden_size == head.lm.config.hidden_size
    cfg = json.loads((tmp_path / "h" / HEAD_CONFIG).read_text())
    assert cfg["item_source"] == source and cfg["temperature"] == 0.7 and len(cfg["item_ids"]) == len(world.items)
    if source == "lm":  # the cache is the LM's own encoding of the item texts
        assert torch.allclose(back.encode_items(), back.item_embeddings(), atol=1e-5)


def _warmup(world, out, **kw):
    from mimigenrec.models.head_train import load_config, run

    values = dict(model_name_or_path=str(world.model), data_dir=str(world.data.root), output_dir=str(out),
                  num_train_epochs=12, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
                  lr_scheduler_type="constant", save_strategy="no", eval_strategy="no", use_cpu=True,
                  disable_tqdm=True, seed=0)
    values.update(kw)
    return run(load_config(None, **values))


def train_loss(head, world) -> float:
    """Full-catalogue CE over the train rows with a freshly encoded catalogue (no stale cache, no sampling)."""
    from mimigenrec.models.head_train import head_rows

    head.eval()
    head.refresh_items()
    head.num_negatives, head.item_grad = 0, False
    rows = head_rows(head, world.data, "train", world.items, world.id2sid, None)
    with torch.no_grad():
        users = head.encode([r["input_ids"] for r in rows])
        return float(head.softmax_loss(users, torch.tensor([r["labels"] for r in rows])))


@pytest.mark.parametrize("source", ["table", "lm"])
def test_warmup_loss_falls_on_the_tiny_model(world, tmp_path, source):
    from mimigenrec.models.item_head import ItemHeadModel

    # random toy sequences: only memorisation lowers the loss. item_pooling mean: a from-scratch model's
    # marker states start equal (see item_head), the LM encoder needs a smaller step than a table
    lr, epochs = (1e-2, 30) if source == "table" else (3e-3, 40)
    trainer = _warmup(world, tmp_path / "w", item_source=source, refresh_steps=5, num_train_epochs=epochs,
                      learning_rate=lr, item_pooling="mean")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    n_items = len(world.items)
    assert losses[0] > math.log(n_items) - 0.1  # step 1 knows nothing: no better than uniform over the catalogue
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    before = train_loss(make_head(world, source=source, temperature=1.0, pooling="mean"), world)
    head = ItemHeadModel.from_pretrained(tmp_path / "w")
    after = train_loss(head, world)
    assert after < before - 0.5, (before, after)
    assert head.cfg.item_source == source
    if source == "lm":
        assert trainer.refresh.refreshes >= 2


def test_warmup_resumes_and_keeps_the_best_epoch(world, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "w"
    first = _warmup(world, out, item_source="table", num_train_epochs=3, save_strategy="epoch", eval_strategy="epoch",
                    eval_rows=0, per_device_eval_batch_size=4, load_best_model_at_end=True,
                    metric_for_best_model="ndcg@10")
    evals = [h for h in first.state.log_history if "eval_ndcg@10" in h]
    assert len(evals) == 3 and all(0 <= h["eval_ndcg@10"] <= 1 for h in evals)
    best = first.state.best_model_checkpoint
    assert first.state.best_metric == max(h["eval_ndcg@10"] for h in evals)
    for name in ("model.safetensors", "item_head.safetensors"):  # the final folder is the best epoch
        a, b = load_file(str(out / name)), load_file(str(Path(best) / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    again = _warmup(world, out, item_source="table", num_train_epochs=4, save_strategy="epoch",
                    resume_from_checkpoint=str(out / "checkpoint-15"))
    assert again.state.global_step == 20
    assert [h["step"] for h in again.state.log_history if "loss" in h] == list(range(1, 21))
    straight = tmp_path / "s"  # the same 4 epochs without the interruption end in the same weights
    _warmup(world, straight, item_source="table", num_train_epochs=4)
    for name in ("model.safetensors", "item_head.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(straight / name))
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name


def test_sampled_negatives_loss_runs_and_covers_targets(world):
    head = make_head(world, source="table")
    head.num_negatives = 5
    users = torch.randn(3, head.item_table.shape[1], requires_grad=True)
    labels = torch.tensor([0, 4, 4])
    loss = head.softmax_loss(users, labels)
    loss.backward()
    assert torch.isfinite(loss) and users.grad is not None
    rows_with_grad = (head.item_table.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert {0, 4} <= set(rows_with_grad) and len(rows_with_grad) <= 2 + 5


def _recpo_trainer(world, head_dir, tmp_path, **kw):
    from mimigenrec.rl.config import load_config
    from mimigenrec.rl.train_grpo import build_trainer

    values = dict(trainer="recpo", model_name_or_path=str(head_dir), data_dir=str(world.data.root),
                  output_dir=str(tmp_path / "rl"), num_generations=4, per_device_train_batch_size=8,
                  max_completion_length=6, max_steps=1, eval_rows=0, rewards=["recpo", "think_only"],
                  constrained=False, use_cpu=True, seed=0, learning_rate=1e-3, logging_steps=1)
    values.update(kw)
    return build_trainer(load_config(None, **values))


def test_recpo_rewards_are_the_heads_ranking_after_the_reasoning(world, tmp_path):
    from mimigenrec.models.item_head import cut_at_eos

    head = make_head(world, source="table", temperature=0.5)
    head.save_pretrained(tmp_path / "head")
    trainer = _recpo_trainer(world, tmp_path / "head", tmp_path)
    batch = [trainer.train_dataset[i] for i in (0, 1) for _ in range(4)]
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch)
    got = list(trainer._logs["rewards"]["recpo"])[-8:]
    th = trainer.head
    for k, row in enumerate(batch):
        p = out["prompt_ids"][k][out["prompt_mask"][k].bool()].tolist()
        c = cut_at_eos(out["completion_ids"][k].tolist(), trainer.eos_token_id, trainer.pad_token_id)
        u = single_state(th.lm, p + c + [th.marker_id])
        s = u @ th.item_table.detach().T / th.cfg.temperature
        t = th.col_of[row["extra_info"]["target"]]
        rank = int((s > s[t]).sum())
        prob = float(torch.softmax(s, 0)[t])
        assert got[k] == pytest.approx(0.95 / math.log2(rank + 2) + 0.05 * prob, abs=1e-5)
    best = out["rec_best"].view(2, 4)
    assert best.sum(1).tolist() == [1, 1]  # one best rollout per group trains the head
    assert out["rec_target"].tolist() == [th.col_of[r["extra_info"]["target"]] for r in batch]


def test_recpo_refuses_a_plain_model_and_bad_options(world, tmp_path):
    from mimigenrec.io import BadInputError

    with pytest.raises(BadInputError, match="item_head.json"):
        _recpo_trainer(world, world.model, tmp_path)
    head = make_head(world)
    head.save_pretrained(tmp_path / "head")
    with pytest.raises(BadInputError, match="unknown option"):
        _recpo_trainer(world, tmp_path / "head", tmp_path, recpo={"rec_weight": 1.0})


@pytest.mark.slow
def test_warmup_then_recpo_through_trl_trainer_sh(world, tmp_path):
    """The warm-up output is RecPO's input; 2 RecPO steps through the launcher move the weights and
    save a reasoning head that evaluate.sh ranks with."""
    from safetensors.torch import load_file

    from mimigenrec.models.item_head import ItemHeadModel

    _warmup(world, tmp_path / "warm", item_source="lm", num_train_epochs=2, refresh_steps=3)
    cfg = tmp_path / "recpo.yaml"
    cfg.write_text(json.dumps(dict(
        trainer="recpo", model_name_or_path=str(tmp_path / "warm"), data_dir=str(world.data.root),
        output_dir=str(tmp_path / "rl"), rewards=["recpo"], num_generations=4, per_device_train_batch_size=8,
        max_completion_length=6, learning_rate=1e-3, logging_steps=1, save_steps=2, eval_rows=0, seed=0,
        constrained=False, recpo={"refresh_steps": 1})))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(ROOT / "trl_trainer.sh"), str(cfg), "max_steps=2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["global_step"] == 2
    before, after = load_file(str(tmp_path / "warm" / "model.safetensors")), load_file(str(tmp_path / "rl" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    head = ItemHeadModel.from_pretrained(tmp_path / "rl")
    assert head.cfg.reasoning and head.cfg.max_reasoning_tokens == 6 and "recpo" in head.cfg.extra
    assert torch.allclose(head.encode_items(), head.item_embeddings(), atol=1e-5)  # refreshed before saving
    assert (tmp_path / "rl" / "checkpoint-2" / "item_head.json").is_file()
    from mimigenrec.eval import evaluate

    out = tmp_path / "eval"
    assert evaluate.main(["--data_dir", str(world.data.root), "--model", f"recpo={tmp_path / 'rl'}", "--no_baselines",
                          "--num_beams", "10", "--ks", "1,10", "--output_dir", str(out), "--quiet"]) == 0
    preds = read_jsonl(out / "predictions_recpo.jsonl")
    assert all("completion" in p and len(p["ranked"]) == 10 for p in preds)

    # resume from checkpoint-2 in this process: the head's embeddings come back with the policy
    from mimigenrec.rl.config import load_config
    from mimigenrec.rl.train_grpo import build_trainer, run

    ckpt = tmp_path / "rl" / "checkpoint-2"
    trainer = run(load_config(cfg, ["max_steps=3", f"resume_from_checkpoint={ckpt}", "use_cpu=true",
                                    f"output_dir={tmp_path / 'rl2'}"]))
    assert trainer.state.global_step == 3 and [s for s, _ in trainer.reward_history] == [2]
    assert ItemHeadModel.from_pretrained(tmp_path / "rl2").cfg.reasoning
    fresh = build_trainer(load_config(cfg, ["use_cpu=true"]))
    saved = load_file(str(ckpt / "item_head.safetensors"))["item_emb"]
    assert not torch.equal(fresh.head.item_embeddings(), saved)
    fresh._load_from_checkpoint(str(ckpt))
    assert torch.equal(fresh.head.item_embeddings(), saved)
