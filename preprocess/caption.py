"""Textualize item images: one short, visually grounded caption per item (captions.jsonl).

Reads ``O/items.jsonl``; an item's image is ``image_path`` (absolute, or relative to
``--image_root``) or else the first of its ``image_urls`` that loads (http(s) fetched with a
timeout, or file://). A vision-language model (local HF, or an OpenAI-compatible endpoint) is
asked to describe only visible attributes. A caption that is empty or contains the item's title
verbatim is rejected and re-asked (sampling, seeded), then skipped; it is never saved empty.

Each caption is appended to ``O/captions.jsonl`` as ``{"item_id", "raw_id", "caption", "backend"}``
the moment it is done (flush + fsync): a killed job loses nothing, and a restart skips the items
already captioned (a torn last line is cut off). A row whose ``raw_id`` is not the item's in
items.jsonl (a source stage re-ran and renumbered the items) is stale: it is dropped and redone.
Items without a usable image, or whose caption failed, are listed in ``O/captions_skipped.jsonl``
(``{"item_id", "reason"}``) for this run.
"""
from __future__ import annotations

import argparse
import io
import re
import sys
import urllib.request
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from mimigenrec.io import DataDir, add_out_dir_argument, caption_is_current, write_jsonl
from preprocess.append_log import AppendLog
from preprocess.llm_backends import (
    Backend,
    add_backend_arguments,
    backend_from_args,
    chat_validated,
)
from preprocess.reasoning_prompts import caption_messages

SKIPPED_FILE = "captions_skipped.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_out_dir_argument(p, "preprocessed dataset directory O (reads items.jsonl)")
    p.add_argument("--image_root", default=None,
                   help="directory that relative image_path values are resolved against (unset: --out_dir)")
    p.add_argument("--batch_size", type=int, default=4, help="images per model call")
    p.add_argument("--max_new_tokens", type=int, default=48, help="caption length limit in tokens")
    p.add_argument("--max_image_side", type=int, default=448,
                   help="images are downscaled so that their longer side is at most this many pixels")
    p.add_argument("--fetch_timeout", type=float, default=20.0, help="seconds allowed to fetch one image URL")
    p.add_argument("--limit", type=int, default=None, help="only the first N items by item_id")
    p.add_argument("--seed", type=int, default=0, help="seed for the sampled re-asks")
    add_backend_arguments(p, ["hf", "http"])


# ----------------------------------------------------------------------------- resumable output


def open_current_log(path: Path, key: Callable[[dict], Hashable], is_current: Callable[[dict], bool],
                     what: str) -> AppendLog:
    """An :class:`AppendLog` on ``path`` holding only rows made for the current data.

    Rows failing ``is_current`` (made before a source stage re-ran with other data) are removed from
    the file, with a message, so that they are recomputed instead of reused.
    """
    log = AppendLog(path, key=key)
    stale = [k for k, r in log.rows.items() if not is_current(r)]
    if not stale:
        return log
    log.close()
    for k in stale:
        del log.rows[k]
    write_jsonl(path, log.rows.values())
    print(f"[warn] {path}: {len(stale)} {what} were made for other data (a source stage re-ran?): "
          "dropped, they are computed again", file=sys.stderr)
    return AppendLog(path, key=key)


# ----------------------------------------------------------------------------- images


def _open_image(data: bytes, max_side: int) -> Any:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # decode now, so a truncated file fails here
    img = img.convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    return img


def _read_source(src: str, timeout: float) -> bytes:
    if re.match(r"^(https?|file)://", src, re.IGNORECASE):
        with urllib.request.urlopen(src, timeout=timeout) as r:
            return r.read()
    return Path(src).read_bytes()


def image_sources(item: Mapping[str, Any], image_root: str | Path) -> list[str]:
    """Where an item's image may be, in the order tried: ``image_path`` then ``image_urls``."""
    out = []
    if item.get("image_path"):
        p = Path(item["image_path"])
        out.append(str(p if p.is_absolute() else Path(image_root) / p))
    out.extend(u for u in item.get("image_urls") or [] if isinstance(u, str) and u.strip())
    return out


def load_item_image(item: Mapping[str, Any], image_root: str | Path, timeout: float = 20.0,
                    max_side: int = 448) -> tuple[Any, str | None]:
    """``(PIL image, None)`` from the first source that loads, else ``(None, reason)``."""
    reasons = []
    for src in image_sources(item, image_root):
        try:
            return _open_image(_read_source(src, timeout), max_side), None
        except FileNotFoundError:
            reasons.append(f"missing file {src}")
        except Exception as e:  # network errors, unreadable/truncated images, ...
            reasons.append(f"{src}: {type(e).__name__}: {str(e)[:120]}")
    return None, "; ".join(reasons) or "no image_path or image_urls"


# ----------------------------------------------------------------------------- captions


def clean_caption(text: str) -> str:
    """First non-empty line, surrounding quotes and a ``Caption:`` prefix removed, spaces collapsed."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*caption\s*:\s*", "", line, flags=re.IGNORECASE)
    return " ".join(line.strip().strip("\"'`").split())


def caption_problem(caption: str, title: str) -> str | None:
    """Why a caption is unusable (empty, or restates the title verbatim), else ``None``."""
    if not caption:
        return "empty caption"
    t = " ".join((title or "").split()).lower()
    if t and t in caption.lower():
        return "caption restates the title"
    return None


def caption_images(backend: Backend, images: list[Any], titles: list[str], *, retries: int = 3,
                   max_new_tokens: int = 48, seed: int = 0) -> list[tuple[str | None, str | None]]:
    """Caption each image: ``[(caption, None)]`` or ``[(None, reason)]``; never an empty caption."""
    def validate(i: int, text: str) -> tuple[str, str | None]:
        cap = clean_caption(text)
        return cap, caption_problem(cap, titles[i])

    convs = [caption_messages() for _ in images]
    return chat_validated(backend, convs, validate, images=[[im] for im in images], retries=retries,
                          max_new_tokens=max_new_tokens, seed=seed)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    d = DataDir(args.out_dir)
    items = d.load_items()
    ids = sorted(items)[: args.limit] if args.limit is not None else sorted(items)
    image_root = args.image_root or args.out_dir
    skipped: list[dict] = []
    done = 0
    current = partial(caption_is_current, items=items)
    with open_current_log(d.captions, lambda r: int(r["item_id"]), current, "caption(s)") as log:
        todo = [i for i in ids if i not in log]
        print(f"[caption] {len(ids)} items, {len(ids) - len(todo)} already captioned, {len(todo)} to do",
              file=sys.stderr)
        backend = backend_from_args(args, vision=True) if todo else None
        try:
            with ThreadPoolExecutor(8) as pool, tqdm(total=len(todo), desc="caption", unit="item") as bar:
                for s in range(0, len(todo), args.batch_size):
                    batch = todo[s:s + args.batch_size]
                    loaded = list(pool.map(lambda i: load_item_image(
                        items[i], image_root, args.fetch_timeout, args.max_image_side), batch))
                    ok = [(i, img) for i, (img, _) in zip(batch, loaded) if img is not None]
                    skipped += [{"item_id": i, "reason": why} for i, (img, why) in zip(batch, loaded) if img is None]
                    results = caption_images(backend, [img for _, img in ok], [items[i].get("title", "") for i, _ in ok],
                                             retries=args.retries, max_new_tokens=args.max_new_tokens,
                                             seed=args.seed) if ok else []
                    for (i, _), (cap, why) in zip(ok, results):
                        if cap:
                            log.append({"item_id": i, "raw_id": items[i].get("raw_id"), "caption": cap,
                                        "backend": backend.name})
                            done += 1
                        else:
                            skipped.append({"item_id": i, "reason": why})
                    bar.update(len(batch))
        finally:
            write_jsonl(d.root / SKIPPED_FILE, sorted(skipped, key=lambda r: r["item_id"]))
        total = len(log)
    print(f"[caption] captioned {done} now, {total} in {d.captions}; skipped {len(skipped)} "
          f"(listed in {d.root / SKIPPED_FILE})")
    return 0
