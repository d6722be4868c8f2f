"""Backbones built offline: a tiny random Qwen2 (or GPT-NeoX) model with a locally trained tokenizer.

``python -m mimigenrec.models.backbones tiny --out DIR [--data_dir O]`` builds one in seconds; it is
the model of the tests and of the README's main job. GGUF import lives in
:mod:`mimigenrec.models.gguf_import`.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_BASE_CORPUS = [
    "system user assistant recommender history item items title semantic id candidates answer",
    "<think> </think> reasoning the user likes prefers bought next likely because similar brand",
    "Predict the next item the user will interact with. Answer with its semantic ID.",
    "The quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 , . ; : ! ? ( ) [ ] \" '",
]


def _corpus(extra: Iterable[str] | None) -> list[str]:
    from mimigenrec import prompts

    texts = list(_BASE_CORPUS) + [prompts.SYSTEM]   # the chat roles are added tokens (add_phrase_tokens)
    texts += [t["instruction"] for t in prompts.TASKS.values()]
    texts += list(extra or [])
    return texts


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048):
    """Byte-level BPE trained on ``texts`` with ChatML specials; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], model_max_length=4096,
        padding_side="left", model_input_names=["input_ids", "attention_mask"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


CHAT_ROLES = ("system", "user", "assistant")


def add_phrase_tokens(tokenizer) -> int:
    """Give each fixed prompt phrase (:func:`mimigenrec.prompts.fixed_phrases`) and each chat role one
    normal token.

    A from-scratch model learns nothing from spelling out the system prompt and the
    instruction: with a 2k BPE vocabulary they are ~90 of a ~130-token ``sid_seq`` row, so
    as single tokens a row is ~4x shorter and SFT ~4x cheaper. Decoding is unchanged (a
    phrase token decodes to its text), and LLaMA-Factory, TRL and evaluation tokenize with
    this same tokenizer, so every stage sees the same ids. The SID history's separator is one of
    them (4 tokens an item, not 5), and the roles are, so a small BPE vocabulary (``--vocab_size``)
    does not spell them out.
    """
    from tokenizers import AddedToken

    from mimigenrec import prompts

    return tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                                 for t in [*prompts.fixed_phrases(), *CHAT_ROLES]])


def add_item_tokens(tokenizer, model, tokens: Sequence[str]) -> int:
    """Add SID tokens as normal (non-special) single tokens and resize the embeddings.

    The new rows start as LLaMA-Factory starts the tokens it adds (``add_tokens``): the mean of
    the old embeddings plus Gaussian noise of std ``1/sqrt(hidden)``, so a backbone whose SID
    tokens are added here trains like one whose tokens ``sft.sh`` adds. (The covariance-matched
    init of ``resize_token_embeddings`` gives them the old rows' small norm instead; on the
    bundled data that cost a third of the SFT model's valid NDCG@10: 0.071 against 0.103.)
    """
    import torch
    from tokenizers import AddedToken

    n = tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in tokens])
    if n:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = model.get_input_embeddings().weight
        with torch.no_grad():
            mean = emb[:-n].mean(0, keepdim=True)
            emb[-n:] = mean + torch.randn(n, emb.shape[1], dtype=emb.dtype) / emb.shape[1] ** 0.5
    return n


def semantic_sid_vectors(id2sid: Mapping[int, Sequence[str]], item_emb) -> dict[str, np.ndarray]:
    """One vector per SID token from the item text embeddings, residual by level like RQ codebooks.

    Level 0: the code's vector is the mean embedding of its items; level ``l``: the mean of its
    items' residuals after subtracting the vectors of their codes at levels ``< l``. This rebuilds
    the residual codebooks from ``id2sid.json`` and ``item_emb.npy`` alone.
    """
    import numpy as np

    ids = sorted(int(i) for i in id2sid)
    res = np.asarray(item_emb, dtype=np.float64)[ids].copy()
    sids = [list(id2sid[i]) for i in ids]
    out: dict[str, np.ndarray] = {}
    for level in range(max(len(s) for s in sids)):
        rows = [r for r, s in enumerate(sids) if len(s) > level]
        groups: dict[str, list[int]] = {}
        for r in rows:
            groups.setdefault(sids[r][level], []).append(r)
        for tok, members in groups.items():
            out[tok] = res[members].mean(0)
            res[members] -= out[tok]
    return out


def init_sid_embeddings(model, tokenizer, vectors: Mapping[str, np.ndarray]) -> int:
    """Set the input embedding of every SID token in ``vectors`` to its vector, projected to the
    model width by PCA over all SID vectors and scaled to the mean norm the SID rows have now
    (:func:`add_item_tokens`' init), so only their directions change."""
    import numpy as np
    import torch

    toks = [t for t in vectors if tokenizer.convert_tokens_to_ids(t) not in (None, tokenizer.unk_token_id)]
    if not toks:
        return 0
    x = np.stack([vectors[t] for t in toks])
    x = x - x.mean(0)
    emb = model.get_input_embeddings().weight
    h = emb.shape[1]
    u, sv, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:h].T  # [n, min(h, dims)]
    if proj.shape[1] < h:
        proj = np.pad(proj, ((0, 0), (0, h - proj.shape[1])))
    ids = tokenizer.convert_tokens_to_ids(toks)
    target = float(emb[ids].detach().norm(dim=1).mean())
    proj = proj / np.maximum(np.linalg.norm(proj, axis=1, keepdims=True), 1e-12) * target
    with torch.no_grad():
        emb[ids] = torch.tensor(proj, dtype=emb.dtype)
    return len(ids)


def build_tiny_model(
    out_dir: str | Path,
    new_tokens: Sequence[str] | None = None,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    embed_std: float = 0.5,
    phrase_tokens: bool = True,
    sid_vectors: Mapping[str, Sequence[float]] | None = None,
    arch: str = "qwen2",
    dropout: float = 0.0,
) -> Path:
    """Write a random causal LM + tokenizer (ChatML template, EOS ``<|im_end|>``) to ``out_dir``.

    ``arch``: ``qwen2`` (RMSNorm, SwiGLU; its only dropout is on attention weights) or ``gpt_neox``
    (LayerNorm, GELU, sequential residual, rotary on every dim), whose ``dropout`` also drops the
    embeddings and each attention / MLP output before the residual add, as SASRec does.

    ``embed_std``: std of the (tied) embeddings; 0.02 would give near-uniform next-token
    distributions, where every beam ranking is a near-tie. ``phrase_tokens``: one token per
    fixed prompt phrase (:func:`add_phrase_tokens`). ``sid_vectors``: initial embeddings of the
    SID tokens (:func:`semantic_sid_vectors`), applied after ``new_tokens`` are added.
    """
    import torch
    from transformers import (
        GenerationConfig,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout {dropout}: must be in [0, 1)")
    out = Path(out_dir)
    tok = train_tokenizer(_corpus(corpus), vocab_size)
    if phrase_tokens:
        add_phrase_tokens(tok)
    torch.manual_seed(seed)
    common = {"vocab_size": len(tok), "hidden_size": hidden_size, "num_hidden_layers": num_layers,
              "num_attention_heads": 4, "max_position_embeddings": 4096, "tie_word_embeddings": True,
              "bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
              "torch_dtype": "float32", "attention_dropout": dropout}
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(intermediate_size=hidden_size * 2, num_key_value_heads=2, **common))
    else:  # the MLP's 2 matrices of width 3d hold about the parameters of Qwen2's 3 of width 2d
        model = GPTNeoXForCausalLM(GPTNeoXConfig(intermediate_size=hidden_size * 3, hidden_dropout=dropout,
                                                 rotary_pct=1.0, use_parallel_residual=False, **common))
    with torch.no_grad():  # tied embeddings drawn wide so a random model's next-token distribution is not flat
        model.get_input_embeddings().weight.normal_(0.0, embed_std)
    if new_tokens:
        add_item_tokens(tok, model, new_tokens)
    if sid_vectors:
        init_sid_embeddings(model, tok, sid_vectors)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


ARCHS = ("qwen2", "gpt_neox")


def _titles(data_dir: str | Path | None, limit: int = 20000) -> list[str]:
    if not data_dir:
        return []
    from mimigenrec.io import DataDir

    items = DataDir(data_dir).load_items()
    return [it.get("title", "") for it in list(items.values())[:limit]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mimigenrec.models.backbones", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="build the tiny random Qwen2 model + local tokenizer",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--out", required=True, help="output model directory")
    t.add_argument("--data_dir", help="preprocessed dataset dir: its item titles join the tokenizer corpus")
    t.add_argument("--add_sid_tokens", action="store_true",
                   help="also add the dataset's new_tokens.json (LLaMA-Factory's add_tokens does this at SFT time)")
    t.add_argument("--sid_init", choices=("random", "semantic"), default="random",
                   help="SID token embeddings: random, or semantic = the dataset's residual code vectors rebuilt "
                        "from id2sid.json and item_emb.npy, PCA-projected (implies --add_sid_tokens)")
    t.add_argument("--vocab_size", type=int, default=2048, help="BPE vocabulary size before added tokens")
    t.add_argument("--hidden_size", type=int, default=64, help="model width")
    t.add_argument("--num_layers", type=int, default=2, help="transformer layers")
    t.add_argument("--seed", type=int, default=0, help="weight-init seed")
    t.add_argument("--arch", choices=ARCHS, default="qwen2",
                   help="qwen2 (its only dropout is on attention weights) or gpt_neox (LayerNorm, GELU; --dropout also "
                        "drops the embeddings and each block's attention / MLP output)")
    t.add_argument("--dropout", type=float, default=0.0,
                   help="dropout rate while training: attention weights (qwen2), + embeddings and residual branches (gpt_neox)")
    t.add_argument("--no_phrase_tokens", dest="phrase_tokens", action="store_false",
                   help="spell the fixed prompt phrases (system prompt, instructions, headers) with BPE pieces "
                        "instead of one token each (4x longer sid_seq rows)")
    t.add_argument("--embed_std", type=float, default=0.5,
                   help="std of the tied embeddings (0.5: peaked random model for tests; 0.02: standard init, better for SFT)")
    a = p.parse_args(argv)
    if not 0.0 <= a.dropout < 1.0:
        p.error(f"--dropout {a.dropout}: must be in [0, 1)")
    toks = vectors = None
    if (a.add_sid_tokens or a.sid_init == "semantic") and not a.data_dir:
        p.error("--add_sid_tokens / --sid_init semantic need --data_dir")
    if a.add_sid_tokens or a.sid_init == "semantic":
        from mimigenrec.io import DataDir, read_json

        d = DataDir(a.data_dir)
        toks = read_json(d.new_tokens)
        if a.sid_init == "semantic":
            import numpy as np

            vectors = semantic_sid_vectors(d.load_id2sid(), np.load(d.emb))
    out = build_tiny_model(a.out, toks, _titles(a.data_dir), a.vocab_size, a.hidden_size, a.num_layers, a.seed,
                           a.embed_std, a.phrase_tokens, vectors, a.arch, a.dropout)
    print(json.dumps({"model": str(out)}))


if __name__ == "__main__":
    main()
