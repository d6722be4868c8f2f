"""Benchmark trie-constrained decoding: processor overhead, naive baseline, prefill-once beam search.

(a) stock beam search with TrieLogitsProcessor vs the same call unconstrained (ratio; target <= 1.15x),
    plus the share of the constrained call spent inside the processor (robust on a shared CPU);
(b) stock constrained beam search with a straightforward per-beam Python-loop processor (the seed-code
    style) vs ours: speed-up of the processor call and of the whole generate call;
(c) mimigenrec.decoding.beam_search.constrained_beam_search (prefill once; its default tree-attention cache and
    its expand-the-cache mode) vs stock constrained generate: evaluation rows per second.

Models: random Qwen2s built offline (``mimigenrec.models.backbones.build_tiny_model``: "tiny", "wide") and
SmolLM2-135M-Instruct imported from its PyPI-shipped GGUF (``mimigenrec.models.gguf_import``; "smollm2", the
HF import cached under ``--model_cache``), all with 3-level SID tokens added as normal tokens
(``add_item_tokens``; the imported model's SID rows are redrawn at its pretrained rows' spread, as
transformers' resize leaves them near-identical, i.e. every ranking a near-tie). The catalogue is
``--n_items`` random unique SIDs (3,541 = Industrial_and_Scientific).
Prompts use the project template (``sid_seq`` task) with random SID histories. Medians of
``--repeats`` timed runs after one warm-up; the figures are printed last.

    OMP_NUM_THREADS=1 python bench/bench_constrained.py --models tiny wide --beams 20 50
    OMP_NUM_THREADS=2 python bench/bench_constrained.py --models smollm2 --beams 20 50 --threads 2
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

from mimigenrec import prompts
from mimigenrec.decoding.beam_search import (
    constrained_beam_search,
    stock_generate_kwargs,
)
from mimigenrec.decoding.trie import ItemTrie, TrieLogitsProcessor
from mimigenrec.models.backbones import add_item_tokens, build_tiny_model
from mimigenrec.models.gguf_import import cache_dir, import_gguf


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked backbone: a random Qwen2 (``hidden`` x ``layers``) or a named GGUF import."""

    prompt_tokens: int
    hidden: int | None = None
    layers: int | None = None
    gguf: str | None = None


MODELS = {
    "tiny": ModelSpec(64, hidden=64, layers=2),
    "wide": ModelSpec(96, hidden=256, layers=4),  # issue 7's setup: 4 layers, 256 wide, 96-token prompts
    "smollm2": ModelSpec(96, gguf="smollm2"),  # SmolLM2-135M-Instruct (30 layers x 576), 96-token prompts
}


class NaivePerBeamProcessor(LogitsProcessor):
    """The baseline: a dict trie walked row by row in Python, mask built per beam (host syncs)."""

    def __init__(self, seqs, prompt_length: int, eos: int, pad: int):
        self.root: dict = {}
        for s in seqs:
            node = self.root
            for t in s:
                node = node.setdefault(t, {})
        self.prompt_length, self.eos, self.pad = prompt_length, eos, pad

    def __call__(self, input_ids, scores):
        mask = torch.full_like(scores, float("-inf"))
        for r, row in enumerate(input_ids[:, self.prompt_length:].tolist()):
            node = self.root
            for t in row:
                node = node.get(t) if node is not None else None
                if node is None or t == self.eos:
                    break
            allowed = list(node.keys()) if node else []
            mask[r, allowed or [self.eos, self.pad]] = 0.0
        return scores + mask


def random_catalogue(n_items: int, codebook: int, seed: int) -> dict[int, list[str]]:
    rng = random.Random(seed)
    codes: set[tuple[int, int, int]] = set()
    while len(codes) < n_items:
        codes.add((rng.randrange(codebook), rng.randrange(codebook), rng.randrange(codebook)))
    return {i: [f"<a_{a}>", f"<b_{b}>", f"<c_{c}>"] for i, (a, b, c) in enumerate(sorted(codes))}


def make_batch(tok, id2sid, batch: int, prompt_tokens: int, seed: int):
    """Left-padded template prompts whose SID history is cut to about ``prompt_tokens`` tokens."""
    rng = random.Random(seed)
    items = list(id2sid)
    texts = []
    for _ in range(batch):
        hist: list[int] = []
        while True:
            hist.append(rng.choice(items))
            row = prompts.sft_row("sid_seq", prompts.build_input("sid_seq", history=hist, items={}, id2sid=id2sid), "")
            text = prompts.render_prompt(tok, prompts.chat_messages(row))
            if len(tok(text, add_special_tokens=False).input_ids) >= prompt_tokens or len(hist) > 200:
                break
        texts.append(text)
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False, return_token_type_ids=False)


def timed(fn, repeats: int, warm: bool = True, best: bool = False) -> float:
    """Median (or best) wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    if warm:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) if best else statistics.median(times)


class TimedProcessor(LogitsProcessor):
    """Wraps a processor and adds up the wall time spent inside it."""

    def __init__(self, inner):
        self.inner, self.total = inner, 0.0

    def __call__(self, input_ids, scores):
        t0 = time.perf_counter()
        out = self.inner(input_ids, scores)
        self.total += time.perf_counter() - t0
        return out


def measure_beams(model, tok, trie: ItemTrie, enc, seqs, name: str, K: int, args) -> dict:
    """All figures for one model at ``K`` beams."""
    B, P = enc.input_ids.shape
    kw = stock_generate_kwargs(K, trie.max_len, tok.eos_token_id, tok.pad_token_id)
    ours = TimedProcessor(TrieLogitsProcessor(trie, P, num_beams=K))
    naive = NaivePerBeamProcessor(seqs, P, tok.eos_token_id, tok.pad_token_id)
    steps = {}

    def gen(proc, key):
        with torch.no_grad():
            out = model.generate(**enc, logits_processor=[proc] if proc else None, **kw)
        steps[key] = out.sequences.shape[1] - P

    if args.skip_overhead:  # (c) only: stock constrained calls, no unconstrained pairs, no naive baseline
        gen(ours, "constrained")  # warm-up
        t_con = timed(lambda: gen(ours, "constrained"), args.repeats, warm=False)
        return {"model": name, **prefill_once_figures(model, trie, enc, K, t_con, args),
                "vocab": model.config.vocab_size, "steps": steps, "constrained_s": t_con,
                **dict.fromkeys(OVERHEAD_FIGURES, float("nan"))}
    # (a) unconstrained / constrained in interleaved pairs (the shared CPU drifts), processor time inside
    gen(None, "unconstrained")  # warm-up
    gen(ours, "constrained")
    pairs, shares = [], []
    for _ in range(args.repeats):
        t_u = timed(lambda: gen(None, "unconstrained"), 1, warm=False)
        ours.total = 0.0
        t_c = timed(lambda: gen(ours, "constrained"), 1, warm=False)
        pairs.append((t_u, t_c))
        shares.append(ours.total / t_c)
    t_unc = statistics.median(p[0] for p in pairs)
    t_con = statistics.median(p[1] for p in pairs)
    ratio = statistics.median(p[1] / p[0] for p in pairs)
    # (b) naive per-beam processor: whole call once, and the processor alone at every answer depth
    t_naive = timed(lambda: gen(naive, "naive"), 1, warm=False)
    rng = torch.Generator().manual_seed(args.seed)
    picks = torch.randint(0, len(seqs), (B * K,), generator=rng)
    proc_rows = {}
    for depth in range(trie.max_len):
        prefix = torch.tensor([seqs[i][:depth] for i in picks.tolist()], device=args.device).view(B * K, depth)
        ids = torch.cat([enc.input_ids.repeat_interleave(K, 0), prefix], 1)
        scores = torch.randn(B * K, model.config.vocab_size, device=args.device)
        proc_rows[depth] = (timed(lambda ids=ids, scores=scores: ours.inner(ids, scores), args.repeats * 5, best=True),
                            timed(lambda ids=ids, scores=scores: naive(ids, scores), args.repeats, best=True))
    t_proc = sum(v[0] for v in proc_rows.values())  # one call per depth = one generate call's worth
    t_proc_naive = sum(v[1] for v in proc_rows.values())
    return {
        "model": name, **prefill_once_figures(model, trie, enc, K, t_con, args),
        "vocab": model.config.vocab_size, "steps": steps, "unconstrained_s": t_unc, "constrained_s": t_con,
        "ratio_constrained_vs_unconstrained": ratio, "processor_share_of_call": statistics.median(shares),
        "naive_generate_s": t_naive, "speedup_vs_naive_generate": t_naive / t_con,
        "processor_ms_per_call": t_proc * 1e3, "naive_processor_ms_per_call": t_proc_naive * 1e3,
        "speedup_vs_naive_processor": t_proc_naive / t_proc,
    }


OVERHEAD_FIGURES = ("unconstrained_s", "ratio_constrained_vs_unconstrained", "processor_share_of_call",
                    "naive_generate_s", "speedup_vs_naive_generate", "processor_ms_per_call",
                    "naive_processor_ms_per_call", "speedup_vs_naive_processor")


def prefill_once_figures(model, trie: ItemTrie, enc, K: int, t_con: float, args) -> dict:
    """(c) prefill-once search vs stock constrained generate (median ``t_con`` seconds per call)."""
    B, P = enc.input_ids.shape
    t_new = timed(lambda: constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, K), args.repeats)
    t_exp = timed(lambda: constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, K,
                                                  cache_mode="expand"), args.repeats)
    new = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, K)
    ref = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie, K, use_generate=True)
    same = float((new.items == ref.items).float().mean())
    return {
        "hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers, "batch": B, "prompt_len": P,
        "beams": K, "items": trie.num_items, "prefill_once_s": t_new, "stock_rows_per_s": B / t_con,
        "prefill_once_rows_per_s": B / t_new, "prefill_once_speedup": t_con / t_new, "same_items_as_stock": same,
        "expand_s": t_exp, "expand_speedup": t_con / t_exp,
    }


def imported_dir(spec: ModelSpec, name: str, args) -> Path:
    """The HF import of ``spec.gguf`` under ``--model_cache`` (imported once; its gguf_import.json is written last)."""
    out = Path(args.model_cache or cache_dir() / "models") / name
    if not (out / "gguf_import.json").exists():
        print(f"[bench] importing {spec.gguf} GGUF into {out} ...", flush=True)
        import_gguf(spec.gguf, out)
    return out


def load_model(name: str, sid_tokens: list[str], args, work: Path):
    """(model, tokenizer) in eval mode with the SID tokens in the vocabulary, on ``--device``."""
    spec = MODELS[name]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if spec.gguf is None:
        path = build_tiny_model(work / name, new_tokens=sid_tokens, hidden_size=spec.hidden, num_layers=spec.layers,
                                seed=args.seed)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        with torch.no_grad():  # the 0.02 init is near-uniform over the vocab: every ranking would be a tie
            torch.nn.init.normal_(model.get_input_embeddings().weight, std=args.embed_std)  # tied with lm_head
    else:
        path = imported_dir(spec, name, args)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        n = add_item_tokens(tok, model, sid_tokens)
        if not n:
            raise ValueError(f"{path}: the SID tokens are already in its vocabulary")
        # transformers' resize draws new rows from mean + 1e-9 * covariance: near-identical SID rows whose logits
        # tie up to fp32 noise. Trained SID rows differ; redraw them at the pretrained rows' spread (seeded).
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for emb in {id(w): w for w in (model.get_input_embeddings().weight,
                                           model.get_output_embeddings().weight)}.values():
                old = emb[:-n].float()
                emb[-n:] = (old.mean(0) + old.std() * torch.randn(n, emb.shape[1], generator=gen)).to(emb.dtype)
    return model.to(args.device), tok


def run_model(name: str, args, work: Path) -> list[dict]:
    id2sid = random_catalogue(args.n_items, args.codebook, args.seed)
    sid_tokens = [f"<{lvl}_{i}>" for lvl in "abc" for i in range(args.codebook)]
    model, tok = load_model(name, sid_tokens, args, work)
    prompt_tokens = MODELS[name].prompt_tokens
    trie = ItemTrie.from_id2sid(id2sid, tok).to(args.device)
    enc = make_batch(tok, id2sid, args.batch, prompt_tokens, args.seed).to(args.device)
    seqs = [tok(prompts.sid_string(s), add_special_tokens=False).input_ids + [tok.eos_token_id] for s in id2sid.values()]
    rows = []
    for K in args.beams:
        rows.append(measure_beams(model, tok, trie, enc, seqs, name, K, args))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "wide"], choices=sorted(MODELS),
                   help="tiny: random Qwen2, 2 layers x 64 wide, 64-token prompts; wide: random Qwen2, 4 layers x "
                        "256 wide, 96-token prompts; smollm2: SmolLM2-135M-Instruct (30 x 576) from its GGUF, "
                        "96-token prompts")
    p.add_argument("--model_cache", default=None,
                   help="folder for imported GGUF models (one subfolder per model; imported once, reused "
                        "after); default: ~/.cache/mimigenrec/models (MIMIGENREC_CACHE overrides the root)")
    p.add_argument("--beams", nargs="+", type=int, default=[20, 50], help="beam counts to measure")
    p.add_argument("--batch", type=int, default=8, help="prompt rows per call")
    p.add_argument("--n_items", type=int, default=3541, help="catalogue size (random unique 3-level SIDs)")
    p.add_argument("--codebook", type=int, default=256, help="codes per SID level")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model weights dtype")
    p.add_argument("--embed_std", type=float, default=0.5,
                   help="random models only: std of the re-drawn (tied) embeddings, so that rankings are not near-ties")
    p.add_argument("--skip_overhead", action="store_true",
                   help="measure (c) only (stock constrained generate vs prefill-once); the (a)/(b) figures, which "
                        "cost several more stock calls per beam count, are printed as nan (for large models)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed for catalogue, prompts and weights")
    p.add_argument("--json", help="also write all figures to this JSON file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in a.models:
            rows += run_model(name, a, Path(work))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"\n== figures (median of {a.repeats}; device {a.device}, {a.dtype}, {a.threads} thread(s)) ==")
    hdr = (f"{'model':7} {'B':>2} {'P':>3} {'K':>3} | {'uncons s':>8} {'cons s':>7} {'ratio':>5} {'proc%':>5} | "
           f"{'naive s':>7} {'x gen':>5} {'proc ms':>7} {'naive ms':>8} {'x proc':>6} | "
           f"{'stock r/s':>9} {'new r/s':>8} {'x new':>5} {'x exp':>5} {'same':>4}")
    print(hdr)
    for r in rows:
        print(f"{r['model']:7} {r['batch']:>2} {r['prompt_len']:>3} {r['beams']:>3} | {r['unconstrained_s']:8.3f} "
              f"{r['constrained_s']:7.3f} {r['ratio_constrained_vs_unconstrained']:5.2f} "
              f"{100 * r['processor_share_of_call']:5.2f} | "
              f"{r['naive_generate_s']:7.3f} {r['speedup_vs_naive_generate']:5.1f} {r['processor_ms_per_call']:7.2f} "
              f"{r['naive_processor_ms_per_call']:8.2f} {r['speedup_vs_naive_processor']:6.1f} | "
              f"{r['stock_rows_per_s']:9.2f} {r['prefill_once_rows_per_s']:8.2f} {r['prefill_once_speedup']:5.1f} "
              f"{r['expand_speedup']:5.1f} {r['same_items_as_stock']:4.2f}")
    print("ratio: median over interleaved pairs of constrained / unconstrained stock beam search; proc%: time inside\n"
          "TrieLogitsProcessor as % of the constrained call; proc ms: processor alone, one call per answer depth\n"
          "(one generate call's worth, best of runs), ours vs the naive per-beam loop; r/s: prompt rows per second;\n"
          "x new / x exp: prefill-once search (tree-attention cache / expanded cache) speed-up over stock.")

if __name__ == "__main__":
    main()
