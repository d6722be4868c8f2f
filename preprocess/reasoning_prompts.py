"""Prompt text for the offline caption and chain-of-thought (CoT) stages, kept in one place.

Every message list here is OpenAI-style chat: ``[{"role", "content"}]`` where ``content`` is a
string or a list of parts (``{"type": "text", "text"}`` / ``{"type": "image"}``).

Leakage rule: the refinement prompt (:func:`refine_messages`) is built from the history and the
draft only; it has no parameter through which the target could enter. Only the clearly named
:func:`hindsight_messages` (opt-in, train split only) and the stage-3 judges see the target.
"""
from __future__ import annotations

import re
from typing import Any

CAPTION_PROMPT = (
    "Describe only what is visible in this product photo in one short sentence "
    "(at most 20 words): colour, shape, material, size cues, packaging, markings. "
    "Do not name the product, its brand or its title; do not guess its use."
)

COT_SYSTEM = (
    "You are an analyst for a recommender system. You reason briefly and concretely about "
    "a user's taste from the items they interacted with."
)

REFINE_TEMPLATE = (
    "User history (oldest first):\n{history}\n\n"
    "Structured notes drafted from this history:\n{draft}\n\n"
    "Rewrite the notes as concise reasoning (2-4 sentences) about what the user values and "
    "what kind of item they are likely to want next. Do not name a specific product."
)

HINDSIGHT_TEMPLATE = (
    "User history (oldest first):\n{history}\n\n"
    "Structured notes drafted from this history:\n{draft}\n\n"
    "The user's actual next item was: \"{target}\".\n"
    "Write concise reasoning (2-4 sentences) that explains, from the history alone, why an "
    "item like this is a natural next step. Do not quote the item's name."
)

JUDGE_LLM_TEMPLATE = (
    "User history (oldest first):\n{history}\n\n"
    "Reasoning about the user:\n{reasoning}\n\n"
    "The user's actual next item was: \"{target}\".\n"
    "On a scale from 0 (unrelated or wrong) to 10 (clearly points to such an item), how well "
    "does the reasoning support recommending it? Answer with a single integer from 0 to 10 only."
)

# Likelihood judge: a recommendation question whose answer (the target title) is scored.
JUDGE_LIKELIHOOD_QUESTION = "Name the item the user is most likely to interact with next."


def _history_lines(history_texts: list[str]) -> str:
    return "\n".join(f"- {t}" for t in history_texts) or "- (none)"


def caption_messages() -> list[dict[str, Any]]:
    """Chat messages asking a vision-language model for a visually grounded caption of one image."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]


def refine_messages(history_texts: list[str], draft: str) -> list[dict[str, Any]]:
    """Stage-2 refinement prompt: history + pseudo-CoT draft only (never the target)."""
    user = REFINE_TEMPLATE.format(history=_history_lines(history_texts), draft=draft)
    return [{"role": "system", "content": COT_SYSTEM}, {"role": "user", "content": user}]


def hindsight_messages(history_texts: list[str], draft: str, target_text: str) -> list[dict[str, Any]]:
    """Opt-in "rationale" prompt that DOES see the target (train split only; rows are flagged)."""
    user = HINDSIGHT_TEMPLATE.format(history=_history_lines(history_texts), draft=draft, target=target_text)
    return [{"role": "system", "content": COT_SYSTEM}, {"role": "user", "content": user}]


def judge_llm_messages(history_texts: list[str], reasoning: str, target_text: str) -> list[dict[str, Any]]:
    """Stage-3 LLM judge prompt: rate 0-10 how well ``reasoning`` supports the actual next item."""
    user = JUDGE_LLM_TEMPLATE.format(history=_history_lines(history_texts), reasoning=reasoning, target=target_text)
    return [{"role": "system", "content": COT_SYSTEM}, {"role": "user", "content": user}]


def judge_likelihood_messages(history_texts: list[str], reasoning: str | None) -> list[dict[str, Any]]:
    """Stage-3 likelihood judge context; the scored continuation is the target title.

    ``reasoning=None`` gives the same question without reasoning (the baseline).
    """
    parts = [f"User history (oldest first):\n{_history_lines(history_texts)}"]
    if reasoning:
        parts.append(f"Reasoning: {reasoning}")
    parts.append(JUDGE_LIKELIHOOD_QUESTION)
    return [{"role": "system", "content": COT_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


_SCORE_RE = re.compile(r"^\s*(?:score\s*[:=]\s*)?(10|[0-9])(?:\s*/\s*10)?\s*\.?\s*$", re.IGNORECASE)


def parse_judge_score(text: str) -> int | None:
    """Strictly parse a 0-10 rating: the first non-empty line must be just the integer
    (optionally ``Score: 7``, ``7/10`` or ``7.``); anything else is ``None``."""
    for line in text.strip().splitlines():
        if line.strip():
            m = _SCORE_RE.match(line)
            return int(m.group(1)) if m else None
    return None
