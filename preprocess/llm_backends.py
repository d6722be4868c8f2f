"""Pluggable LLM backends for the offline caption / CoT stages: local HF models or any OpenAI-compatible endpoint.

All backends answer a batch of chat conversations with :meth:`Backend.chat`, one :class:`Reply`
per conversation; a failed call is a ``Reply`` with ``error`` set (never an empty text), so callers
can retry or record it instead of saving it. Images travel as PIL images next to the messages:
each ``{"type": "image"}`` part of a conversation takes the next image of that conversation.

- :class:`HFCausalLM`  local ``AutoModelForCausalLM`` (a directory, or a ``.gguf`` file); also
  scores continuations (:meth:`HFCausalLM.continuation_logprobs`) for the likelihood judge.
- :class:`HFVisionLM`  local ``AutoModelForImageTextToText`` + ``AutoProcessor`` (e.g. Qwen2-VL).
- :class:`OpenAIChatBackend`  ``{base_url}/chat/completions`` through the official ``openai`` client
  (its retries with exponential backoff and its per-request timeout); images as base64 data URLs.
"""
from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import os
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimigenrec.io import bad, check_model_dir

Messages = list[dict[str, Any]]


@dataclass
class Reply:
    """One answer: ``text`` on success, ``error`` (a short reason) on failure."""

    text: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


class Backend:
    """Interface: ``chat(conversations, ...) -> [Reply]`` (same order, same length)."""

    name = "backend"

    def chat(
        self,
        conversations: Sequence[Messages],
        *,
        images: Sequence[Sequence[Any]] | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[Reply]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- helpers


def image_to_data_url(image: Any, fmt: str = "PNG") -> str:
    """PIL image -> ``data:image/<fmt>;base64,...``."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _flatten_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")


def _text_only(conversation: Messages) -> Messages:
    return [{"role": m["role"], "content": _flatten_text(m["content"])} for m in conversation]


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------- OpenAI-compatible HTTP


class OpenAIChatBackend(Backend):
    """Any OpenAI-compatible ``/chat/completions`` endpoint (llama.cpp server, vLLM, OpenAI, ...).

    The ``openai`` client retries connection errors, timeouts and HTTP 408/409/429/5xx ``retries``
    times with exponential backoff (honouring ``Retry-After``); other errors fail at once. An
    endpoint that cannot be reached before it ever answered is an error naming ``base_url``.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, concurrency: int = 1, image_format: str = "PNG"):
        import openai

        self.base_url, self.model, self.retries = base_url, model, max(0, retries)
        self.concurrency, self.image_format = max(1, concurrency), image_format
        self.name = f"http:{model}"
        # never send loopback traffic through an environment proxy
        http = openai.DefaultHttpx2Client(trust_env=False) if _is_loopback(base_url) else None
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "unused", timeout=timeout,
                                    max_retries=self.retries, http_client=http)
        self._answered = False

    def _messages(self, conversation: Messages, images: Sequence[Any]) -> list[dict]:
        pending = list(images)
        messages = []
        for m in conversation:
            content = m["content"]
            if not isinstance(content, str):
                parts = []
                for p in content:
                    if p.get("type") == "image":
                        if not pending:
                            raise ValueError("more image placeholders than images")
                        url = image_to_data_url(pending.pop(0), self.image_format)
                        parts.append({"type": "image_url", "image_url": {"url": url}})
                    else:
                        parts.append({"type": "text", "text": p.get("text", "")})
                content = parts
            messages.append({"role": m["role"], "content": content})
        if pending:
            raise ValueError("more images than image placeholders")
        return messages

    def _one(self, args: tuple) -> Reply:
        import openai

        conversation, images, max_new_tokens, temperature, seed = args
        try:
            messages = self._messages(conversation, images)
        except ValueError as e:
            return Reply(error=str(e))
        try:
            resp = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_new_tokens,
                                                       temperature=temperature, seed=seed, stream=False)
        except openai.APIStatusError as e:
            retried = e.status_code >= 500 or e.status_code in (408, 409, 429)
            detail = " ".join(str(e.response.text)[:200].split())
            return Reply(error=f"HTTP {e.status_code}: {detail} (after {self.retries + 1 if retried else 1} attempt(s))")
        except openai.APIConnectionError as e:  # APITimeoutError included
            if not self._answered and not isinstance(e, openai.APITimeoutError):
                raise bad(self.base_url, f"cannot reach the endpoint ({e})",
                          "start the server, or fix --base_url (e.g. http://127.0.0.1:8000/v1)") from None
            return Reply(error=f"{type(e).__name__}: {e} (after {self.retries + 1} attempt(s))")
        self._answered = True
        text = resp.choices[0].message.content if resp.choices else None
        if not isinstance(text, str):
            return Reply(error=f"malformed response: no message content in {str(resp)[:200]}")
        return Reply(text=text)

    def chat(self, conversations, *, images=None, max_new_tokens=128, temperature=0.0, seed=0):
        images = images or [[] for _ in conversations]
        jobs = [(c, im, max_new_tokens, temperature, seed) for c, im in zip(conversations, images)]
        if self.concurrency == 1 or len(jobs) == 1:
            return [self._one(j) for j in jobs]
        with ThreadPoolExecutor(self.concurrency) as ex:
            return list(ex.map(self._one, jobs))


# ----------------------------------------------------------------------------- local Hugging Face models


def _torch_dtype(name: str | None) -> Any:
    import torch

    return {None: None, "auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def _model_source(path: str) -> tuple[str, dict]:
    """A model directory, or a ``.gguf`` file loaded through transformers' ``gguf_file=``."""
    p = Path(path)
    if p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def _render_chat(tokenizer: Any, conversation: Messages) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    # No chat template: a plain transcript ending with the assistant's turn.
    return "".join(f"{m['role']}: {m['content']}\n" for m in conversation) + "assistant:"


class _HFBase(Backend):
    """Shared generate loop: left-padded batches, greedy unless ``temperature > 0`` (seeded)."""

    model: Any
    tokenizer: Any

    def _generate(self, inputs: dict, max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        import torch

        torch.manual_seed(seed)
        sample = temperature > 0
        kw = {"max_new_tokens": max_new_tokens, "do_sample": sample,
              "pad_token_id": self.tokenizer.pad_token_id, "num_beams": 1}
        # Set every sampling knob explicitly: never inherit them from the model's generation_config.
        if sample:
            kw.update(temperature=temperature, top_p=1.0, top_k=0)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        inputs = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in inputs.items()
                  if k != "token_type_ids"}  # some tokenizers return it; decoder-only models reject it
        with torch.no_grad():
            out = self.model.generate(**inputs, **kw)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _encode(self, conversations: Sequence[Messages], images: Sequence[Sequence[Any]] | None) -> dict:
        raise NotImplementedError

    def chat(self, conversations, *, images=None, max_new_tokens=128, temperature=0.0, seed=0):
        try:
            texts = self._generate(self._encode(conversations, images), max_new_tokens, temperature, seed)
            return [Reply(text=t) for t in texts]
        except Exception as e:  # isolate the failing conversation(s) instead of losing the batch
            if len(conversations) == 1:
                return [Reply(error=f"{type(e).__name__}: {e}")]
        per = [self.chat([c], images=None if images is None else [im], max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed)[0]
               for c, im in zip(conversations, images or [None] * len(conversations))]
        return per


class HFCausalLM(_HFBase):
    """A local causal LM (directory or ``.gguf`` file) for text generation and likelihood scoring."""

    def __init__(self, path: str, device: str = "cpu", dtype: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src, kw = _model_source(path)
        self.tokenizer = AutoTokenizer.from_pretrained(src, **kw)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(src, dtype=_torch_dtype(dtype), **kw).to(device).eval()
        self.name = f"hf:{Path(path).name}"

    def _encode(self, conversations, images):
        prompts = [_render_chat(self.tokenizer, _text_only(c)) for c in conversations]
        return dict(self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False))

    def continuation_logprobs(self, conversations: Sequence[Messages], continuations: Sequence[str],
                              batch_size: int = 8) -> list[tuple[float, int]]:
        """Sum of log-probabilities of each continuation's tokens after the rendered prompt
        (with the assistant turn opened), and the number of those tokens: ``[(sum_logprob, n)]``."""
        import torch

        out: list[tuple[float, int]] = []
        pad = self.tokenizer.pad_token_id
        for s in range(0, len(conversations), batch_size):
            seqs, spans = [], []
            for conv, cont in zip(conversations[s:s + batch_size], continuations[s:s + batch_size]):
                p = self.tokenizer(_render_chat(self.tokenizer, _text_only(conv)), add_special_tokens=False)["input_ids"]
                c = self.tokenizer(cont, add_special_tokens=False)["input_ids"]
                if not c:
                    raise ValueError(f"empty continuation after tokenization: {cont!r}")
                seqs.append(p + c)
                spans.append((len(p), len(c)))
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, q in enumerate(seqs):  # right padding: positions stay 0..len-1
                ids[i, :len(q)] = torch.tensor(q)
                mask[i, :len(q)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.model.device),
                                    attention_mask=mask.to(self.model.device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tok = torch.gather(logp, 2, ids[:, 1:].unsqueeze(-1).to(logp.device)).squeeze(-1)
            for i, (start, n) in enumerate(spans):
                out.append((float(tok[i, start - 1:start - 1 + n].sum()), n))
        return out


class HFVisionLM(_HFBase):
    """A local vision-language model via ``AutoProcessor`` + ``AutoModelForImageTextToText``."""

    def __init__(self, path: str, device: str = "cpu", dtype: str | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=_torch_dtype(dtype)).to(device).eval()
        self.name = f"hf:{Path(path).name}"

    def _encode(self, conversations, images):
        texts = [self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        flat = [im for ims in (images or []) for im in ims]
        return dict(self.processor(text=texts, images=flat or None, padding=True, return_tensors="pt"))


# ----------------------------------------------------------------------------- validated calls


def chat_validated(
    backend: Backend,
    conversations: Sequence[Messages],
    validate: Callable[[int, str], tuple[Any, str | None]],
    *,
    images: Sequence[Sequence[Any]] | None = None,
    retries: int = 3,
    max_new_tokens: int = 128,
    seed: int = 0,
    retry_temperature: float = 0.7,
) -> list[tuple[Any, str | None]]:
    """Ask, check each answer with ``validate(index, text) -> (value, problem)`` and re-ask the
    rejected ones up to ``retries`` times (greedy first, then sampling seeded ``seed + attempt``).

    Returns ``[(value, None)]`` for accepted answers and ``[(None, reason)]`` for failures.
    Backend errors are not re-asked here: backends retry transport failures themselves.
    """
    out: list[tuple[Any, str | None]] = [(None, "not asked")] * len(conversations)
    pending = list(range(len(conversations)))
    for attempt in range(max(0, retries) + 1):
        if not pending:
            break
        replies = backend.chat([conversations[i] for i in pending],
                               images=None if images is None else [images[i] for i in pending],
                               max_new_tokens=max_new_tokens,
                               temperature=0.0 if attempt == 0 else retry_temperature, seed=seed + attempt)
        again = []
        for i, r in zip(pending, replies):
            if not r.ok:
                out[i] = (None, f"backend error: {r.error}")
                continue
            value, problem = validate(i, r.text or "")
            if problem is None:
                out[i] = (value, None)
            else:
                out[i] = (None, f"{problem} (after {attempt + 1} attempt(s))")
                again.append(i)
        pending = again
    return out


# ----------------------------------------------------------------------------- CLI glue


def add_backend_arguments(parser: argparse.ArgumentParser, kinds: Sequence[str]) -> None:
    """Options shared by every stage that talks to an LLM backend."""
    g = parser.add_argument_group("LLM backend")
    g.add_argument("--backend", choices=list(kinds), required=True,
                   help="hf: a local Hugging Face model (--model); http: an OpenAI-compatible endpoint "
                        "(--base_url, --api_model)" + ("; none: no LLM" if "none" in kinds else ""))
    g.add_argument("--model", help="hf backend: model directory (or a .gguf file for text models)")
    g.add_argument("--device", default="cpu", help="hf backend: torch device")
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="hf backend: weights dtype (unset: as stored)")
    g.add_argument("--base_url", help="http backend: API root, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--api_model", default="default", help="http backend: the 'model' field sent")
    g.add_argument("--api_key_env", default="OPENAI_API_KEY",
                   help="http backend: environment variable holding the bearer key (unset: no key)")
    g.add_argument("--timeout", type=float, default=60.0, help="http backend: seconds per request")
    g.add_argument("--retries", type=int, default=3,
                   help="retries after a failed call (http: by the openai client, with exponential backoff) "
                        "or a rejected answer")
    g.add_argument("--concurrency", type=int, default=1, help="http backend: parallel requests within a batch")


def backend_from_args(args: argparse.Namespace, vision: bool) -> Backend | None:
    """Build the backend named by ``args.backend`` (``None`` for ``none``)."""
    if args.backend == "none":
        return None
    if args.backend == "hf":
        if not args.model:
            raise bad("--backend hf", "needs a local model", "give --model DIR (or a .gguf file for text)")
        if Path(args.model).suffix != ".gguf":
            check_model_dir(args.model, "--model")
        elif not Path(args.model).is_file():
            raise bad(args.model, "no such GGUF file", "check --model")
        cls = HFVisionLM if vision else HFCausalLM
        return cls(args.model, device=args.device, dtype=args.dtype)
    if not args.base_url:
        raise bad("--backend http", "needs an endpoint", "give --base_url, e.g. http://127.0.0.1:8000/v1")
    return OpenAIChatBackend(args.base_url, args.api_model, api_key=os.environ.get(args.api_key_env),
                             timeout=args.timeout, retries=args.retries, concurrency=args.concurrency)
