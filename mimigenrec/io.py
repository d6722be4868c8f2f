"""Small file helpers shared by every stage: the one user-error path, tolerant line readers, atomic
writers, content fingerprints and the data-dir layout."""
from __future__ import annotations

import ast
import errno
import fnmatch
import gzip
import hashlib
import json
import os
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


class BadInputError(ValueError):
    """An anticipated user error (bad input file, setting or path); the message reads
    ``file: what is wrong: what to do``. Entry points print it and exit 2 (:func:`cli_errors`)."""


def bad(where: Any, what: str, todo: str = "") -> BadInputError:
    """``BadInputError("where: what: todo")``: name the file (or option), the problem, the fix."""
    return BadInputError(f"{where}: {what}" + (f": {todo}" if todo else ""))


_OS_HINTS = {
    errno.ENOENT: "check the path, or run the stage that writes it first",
    errno.EACCES: "choose a folder you can write to, or fix its permissions",
    errno.EPERM: "choose a folder you can write to, or fix its permissions",
    errno.ENOSPC: "free some space or write elsewhere",
    errno.ENOTDIR: "a file stands where a folder is expected: check the path",
    errno.EISDIR: "a folder stands where a file is expected: check the path",
    errno.EEXIST: "a file stands where a folder is expected: check the path",
}


def cli_errors(fn: Callable[[], Any]) -> int:
    """Run an entry point; anticipated errors become one ``error: ...`` line on stderr and exit code 2.

    Anticipated: :class:`BadInputError`, and file-system errors that name a file (missing, not
    writable, disk full, file/folder mix-up). Anything else is a bug and keeps its traceback.
    ``MIMIGENREC_TRACEBACK=1`` shows tracebacks for every error.
    """
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (BadInputError, OSError) as e:
        if os.environ.get("MIMIGENREC_TRACEBACK") == "1":
            raise
        if isinstance(e, BadInputError):
            msg = str(e)
        elif e.errno in _OS_HINTS and (e.filename or e.errno == errno.ENOSPC):
            msg = f"{e.filename or 'disk'}: {(e.strerror or str(e)).lower()}: {_OS_HINTS[e.errno]}"
        else:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2


GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: str | os.PathLike) -> bool:
    """True when the file starts with the gzip magic bytes (whatever its name says)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head != GZIP_MAGIC and str(path).endswith(".gz"):
        raise bad(path, "named .gz but is not gzip data (a failed download saves an error page)",
                  "download it again, or drop the .gz from the name if it is plain text")
    return head == GZIP_MAGIC


@contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Turn a truncated or corrupt gzip stream and non-UTF-8 bytes into errors that name ``path``."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise bad(path, f"the compressed data is truncated or corrupt ({e})",
                  "an interrupted download? fetch the file again (`gzip -t FILE` checks it)") from None
    except UnicodeDecodeError as e:
        raise bad(path, f"not UTF-8 text at byte {e.start} (a binary or differently encoded file?)",
                  "give the JSON-lines text file (plain or .gz)") from None


def open_text(path: str | os.PathLike) -> IO[str]:
    """Open a text file for reading, gunzipping it when its content is gzip (whatever the name)."""
    if is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


@dataclass
class LineErrors:
    """Counts malformed lines and remembers the first few locations."""

    path: str
    count: int = 0
    examples: list = None  # type: ignore[assignment]

    def add(self, lineno: int, why: str) -> None:
        self.count += 1
        if self.examples is None:
            self.examples = []
        if len(self.examples) < 5:
            self.examples.append(f"{self.path}:{lineno}: {why}")

    def report(self, stream: IO[str] | None = None) -> None:
        """Print the count and the first locations (to ``stream``, default stderr)."""
        stream = stream or sys.stderr
        if self.count:
            print(f"[warn] skipped {self.count} malformed line(s) in {self.path}", file=stream)
            for e in self.examples or []:
                print(f"  {e}", file=stream)


def iter_records(
    path: str | os.PathLike,
    errors: LineErrors | None = None,
    allow_literal: bool = False,
    strict: bool = False,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each JSON (or Python-literal) line of ``path``.

    Malformed lines are counted in ``errors`` with their ``file:line``; with ``strict`` the
    first one raises :class:`BadInputError` instead.
    """
    errors = errors if errors is not None else LineErrors(str(path))
    with reading(path), open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj = None
                if allow_literal:
                    try:
                        obj = ast.literal_eval(line)
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        obj = None
                if obj is None:
                    if strict:
                        raise BadInputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    errors.add(lineno, f"not valid JSON ({e.msg})")
                    continue
            if not isinstance(obj, dict):
                if strict:
                    raise BadInputError(f"{path}:{lineno}: expected an object, got {type(obj).__name__}")
                errors.add(lineno, f"expected an object, got {type(obj).__name__}")
                continue
            yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file written by this project; any malformed line is an error naming file:line."""
    return [obj for _, obj in iter_records(path, strict=True)]


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_outputs(paths: Iterable[str | os.PathLike], mode: str = "w") -> Iterator[list[IO]]:
    """Open files for writing; each replaces its target (with the usual umask permissions, not
    mkstemp's 0600) only if the block succeeds, so a crash never leaves a half-written output."""
    paths = [Path(p) for p in paths]
    tmps: list[str] = []
    files: list[IO] = []
    try:
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
            tmps.append(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)
            files.append(os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})))
        yield files
        for f in files:
            f.close()
        for tmp, p in zip(tmps, paths):
            os.replace(tmp, p)
    finally:
        for f in files:
            f.close()
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Atomically write ``obj`` as JSON."""
    with atomic_outputs([path]) as (f,):
        json.dump(obj, f, ensure_ascii=False, indent=indent)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Atomically write an iterable of objects, one JSON object per line."""
    with atomic_outputs([path]) as (f,):
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file (plain or gzip); malformed content is an error naming ``file:line``."""
    try:
        with reading(path), open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


# ----------------------------------------------------------------------------- fingerprints

INPUTS_FILE = "mimigenrec_inputs.json"


def guard_resume(out: str | os.PathLike, now: dict[str, Any], resuming: bool, start_over: str) -> Path:
    """Record what a training run in ``out`` learns from (``now``: name -> fingerprint) in
    ``out/mimigenrec_inputs.json``; when ``resuming`` from checkpoints there, first refuse if they
    were trained on other inputs (``start_over`` says how to begin afresh instead)."""
    out = Path(out)
    record = out / INPUTS_FILE
    if resuming and record.is_file():
        old = read_json(record)
        changed = [k for k in now if old.get(k) != now[k]]
        if changed:
            raise bad(out, f"holds checkpoints trained on other inputs ({', '.join(changed)} changed), so resuming "
                      "would mix two runs", f"use another output_dir, or {start_over}")
    elif resuming:
        print(f"[warn] {out}: checkpoints without an inputs record (not started by the launchers?): resuming "
              "without checking what they were trained on", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    write_json(record, now)
    return record



def file_digest(path: str | os.PathLike) -> str:
    """blake2b (128 bits) of a file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(paths: Iterable[str | os.PathLike], extra: Any = None) -> str:
    """One digest over the content of ``paths`` (a missing file counts as "missing") and ``extra``.

    Reuse and resume decisions compare these: a cache made from other bytes is stale.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in paths:
        p = Path(p)
        h.update(f"\0{p.name}\0{file_digest(p) if p.is_file() else 'missing'}".encode())
    return h.hexdigest()


MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "pytorch_model*.bin", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
               "merges.txt", "chat_template*", "*.model", "adapter_config.json", "*.gguf")


def model_files(model_dir: str | os.PathLike) -> list[Path]:
    """The files of a Hugging Face model folder that define it (weights, config, tokenizer), sorted."""
    d = Path(model_dir)
    return sorted(p for p in d.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, m) for m in MODEL_FILES))


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Digest of a model folder's weights, config and tokenizer (not its logs or checkpoints)."""
    return fingerprint(model_files(model_dir))


def check_model_dir(path: str | os.PathLike, role: str = "model") -> Path:
    """``path`` as a Hugging Face model folder, or an error saying what it is instead and what to do."""
    p = Path(path)
    if p.suffix == ".gguf":
        raise bad(p, f"{role} is a GGUF file", "convert it first: python -m mimigenrec.models.gguf_import --help")
    if not p.exists():
        raise bad(p, f"no such {role} folder", "give the output_dir of an SFT or GRPO run (a folder with config.json)")
    if not p.is_dir():
        raise bad(p, f"{role} is a file, not a model folder", "give the folder holding config.json")
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        raise bad(p, f"{role} is a LoRA adapter, not a full model",
                  "merge it first: SFT_CMD=export bash sft.sh examples/merge/lora_merge.yaml")
    if not (p / "config.json").is_file():
        raise bad(p, f"{role} folder has no config.json",
                  "give the output_dir of a finished SFT or GRPO run (a checkpoint-N folder also works)")
    return p


def check_model_spec(spec: str, role: str = "model") -> str:
    """A local model folder (checked by :func:`check_model_dir`) or a hub id that can load: in the
    Hugging Face cache, or any id while the hub is reachable (``HF_HUB_OFFLINE`` unset)."""
    if not spec:
        raise bad(role, "not set", f"set {role} in the config or as {role}=PATH")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if Path(spec).exists() or not looks_like_hub_id:
        return str(check_model_dir(spec, role))
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "config.json"), str) or os.environ.get("HF_HUB_OFFLINE") != "1":
        return spec
    raise bad(spec, f"{role} is neither a local folder nor a model in the Hugging Face cache (HF_HUB_OFFLINE=1)",
              "give a local model folder (relative to the directory you run from)")


SPLITS = ("train", "valid", "test")


def add_out_dir_argument(parser: Any, help: str) -> None:
    """``--out_dir O`` (alias ``--data_dir``, the name every command after preprocessing uses)."""
    parser.add_argument("--out_dir", "--data_dir", dest="out_dir", required=True, metavar="O", help=help)


@dataclass(frozen=True)
class DataDir:
    """The layout of a preprocessed dataset directory ``O`` (see README, "Files")."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    items = property(lambda s: s.root / "items.jsonl")          # item table
    users = property(lambda s: s.root / "users.jsonl")          # user table
    stats = property(lambda s: s.root / "stats.json")           # counts from the source stage
    emb = property(lambda s: s.root / "item_emb.npy")           # item text embeddings, row = item_id
    emb_meta = property(lambda s: s.root / "item_emb.json")
    id2sid = property(lambda s: s.root / "id2sid.json")
    new_tokens = property(lambda s: s.root / "new_tokens.json")
    sid_stats = property(lambda s: s.root / "sid_stats.json")
    sid_usage = property(lambda s: s.root / "sid_usage.png")        # code usage per level (sid stage)
    captions = property(lambda s: s.root / "captions.jsonl")
    cot = property(lambda s: s.root / "cot.jsonl")
    candidates = property(lambda s: s.root / "candidates")

    def inter(self, split: str) -> Path:
        """Interaction rows of a split: ``inter/<split>.jsonl``."""
        return self.root / "inter" / f"{split}.jsonl"

    def sft(self, split: str) -> Path:
        return self.root / "sft" / f"{split}.json"

    def rl(self, split: str) -> Path:
        return self.root / "rl" / f"{split}.json"

    def load_items(self) -> dict[int, dict]:
        return {int(r["item_id"]): r for r in read_jsonl(self.items)}

    def load_id2sid(self) -> dict[int, list[str]]:
        return {int(k): v for k, v in read_json(self.id2sid).items()}

    def load_captions(self, items: dict[int, dict]) -> dict[int, str]:
        """``item_id -> caption`` of the captions made for the items now in items.jsonl.

        A caption row carries its item's ``raw_id``; rows whose raw_id differs (a source stage re-ran
        and renumbered the items) are stale: they are left out and counted in a warning.
        """
        if not self.captions.is_file():
            return {}
        errs = LineErrors(str(self.captions))
        caps, stale = {}, 0
        for _, r in iter_records(self.captions, errs):
            if caption_is_current(r, items):
                caps[int(r["item_id"])] = r["caption"]
            else:
                stale += 1
        errs.report()
        if stale:
            print(f"[warn] {self.captions}: {stale} caption(s) were made for other items (a re-run source stage "
                  "renumbered them?): left out; re-run the caption stage to redo them", file=sys.stderr)
        return caps


def caption_is_current(row: dict, items: dict[int, dict]) -> bool:
    """True when a caption row names an item of ``items`` with the same ``raw_id`` and has a caption."""
    try:
        item = items.get(int(row["item_id"]))
    except (KeyError, TypeError, ValueError):
        return False
    return bool(item and row.get("caption") and row.get("raw_id") == item.get("raw_id"))
