"""The one prompt-template module: SFT rows, RL rows and evaluation prompts all come from here.

A prompt is rendered exactly as LLaMA-Factory's alpaca converter renders it
(``user = instruction + "\\n" + input``), so the text the model sees at SFT time is
the text RL rollouts and evaluation feed it (see :func:`chat_messages`).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SYSTEM = (
    "You are a recommender system. Read the user's interaction history and answer "
    "with exactly what the instruction asks for."
)

# Items are referred to in candidate lists as "[ITEM_<id>]".
ITEM_REF = "[ITEM_{}]"
# One vocabulary token per item, shown after each history item's SID in the ``sid_item`` history view
# (the sid stage's ``--item_tokens`` adds them to new_tokens.json).
ITEM_TOKEN = "<item_{}>"
ITEM_REF_RE = re.compile(r"\[ITEM_(\d+)\]")
THINK_RE = re.compile(r"^\s*<think>(.*?)</think>\s*(.*)$", re.DOTALL)
SID_TOKEN_RE = re.compile(r"<[a-z]_\d+>")

# task name -> (instruction, what the history shows, what the answer is)
TASKS: dict[str, dict[str, str]] = {
    "sid_seq": {
        "instruction": "Predict the next item the user will interact with. Answer with its semantic ID.",
        "history": "sid",
        "answer": "sid",
    },
    "sid_item_seq": {
        "instruction": "Predict the next item the user will interact with. Answer with its semantic ID.",
        "history": "sid_item",
        "answer": "sid",
    },
    "title_seq2sid": {
        "instruction": "Predict the next item the user will interact with. Answer with its semantic ID.",
        "history": "title",
        "answer": "sid",
    },
    "sid_seq2title": {
        "instruction": "Predict the next item the user will interact with. Answer with its title.",
        "history": "sid",
        "answer": "title",
    },
    "title2sid": {"instruction": "Give the semantic ID of this item.", "history": "none", "answer": "sid"},
    "sid2title": {"instruction": "Give the title of the item with this semantic ID.", "history": "none", "answer": "title"},
    "cand_rank": {
        "instruction": (
            "Choose the item the user is most likely to interact with next from the candidates. "
            "Answer with its reference, e.g. [ITEM_12]."
        ),
        "history": "title",
        "answer": "item_ref",
    },
    "query": {
        "instruction": (
            "Write a short keyword search query that would find the item the user is most likely to "
            "interact with next in the catalogue. You may reason first inside <think></think>; then "
            "answer with the query only."
        ),
        "history": "title",
        "answer": "title",
    },
}
HISTORY_HEADER = "User history (oldest first):"
CANDIDATES_HEADER = "Candidates:"
REFERENCE_HEADER = "Reference reasoning:"
ITEM_TITLE_HEADER = "Item title:"
SID_HEADER = "Semantic ID:"
HISTORY_SEP = ", "   # between the items of a SID history
SEQ_TASKS = ("sid_seq", "sid_item_seq", "title_seq2sid", "sid_seq2title")
ITEM_TASKS = ("title2sid", "sid2title")


def fixed_phrases() -> list[str]:
    """Every fixed string a prompt is built from (system prompt, instructions, headers, the SID
    history's separator), longest first.

    A tokenizer trained for this template may hold each as one token (see
    :func:`mimigenrec.models.backbones.build_tiny_model`), so a small model from scratch spends its
    compute on the history, not on boilerplate.
    """
    texts = {SYSTEM, HISTORY_HEADER, CANDIDATES_HEADER, REFERENCE_HEADER, ITEM_TITLE_HEADER, SID_HEADER, HISTORY_SEP}
    texts |= {t["instruction"] for t in TASKS.values()}
    return sorted(texts, key=lambda t: (-len(t), t))


def sid_string(tokens: Sequence[str]) -> str:
    """``["<a_1>","<b_2>"]`` -> ``"<a_1><b_2>"``."""
    return "".join(tokens)


def split_sid(text: str) -> list[str]:
    """Inverse of :func:`sid_string` (ignores anything that is not a SID token)."""
    return SID_TOKEN_RE.findall(text)


def item_ref(item_id: int | str) -> str:
    return ITEM_REF.format(int(item_id))


def item_token(item_id: int | str) -> str:
    """``17`` -> ``"<item_17>"``: the item's own token in the ``sid_item`` history view."""
    return ITEM_TOKEN.format(int(item_id))


def uses_sids(task: str) -> bool:
    """Whether ``task``'s history or answer is written in semantic IDs."""
    spec = TASKS[task]
    return spec["history"].startswith("sid") or spec["answer"] == "sid"


def uses_item_tokens(task: str) -> bool:
    """Whether ``task``'s history shows each item's own token (:data:`ITEM_TOKEN`) after its SID."""
    return TASKS[task]["history"] == "sid_item"


def _item_text(item: Mapping[str, Any], caption: str | None = None) -> str:
    title = item.get("title") or f"item {item['item_id']}"
    return f"{title} (looks like: {caption})" if caption else title


def render_history(
    history: Sequence[int],
    kind: str,
    items: Mapping[int, Mapping[str, Any]],
    id2sid: Mapping[int, Sequence[str]] | None = None,
    captions: Mapping[int, str] | None = None,
) -> str:
    """Comma-separated history in the chosen view, oldest first: "sid" (each item's SID), "sid_item"
    (its SID followed by its own token, ``<a_3><b_7><c_1><item_17>``: the SID shares what similar items
    share, the item token is free to learn what is particular to the item, as an ID-based recommender's
    embedding does) or "title"."""
    if kind in ("sid", "sid_item"):
        assert id2sid is not None, "sid history needs id2sid"
        own = kind == "sid_item"
        return HISTORY_SEP.join(sid_string(id2sid[i]) + (item_token(i) if own else "") for i in history)
    caps = captions or {}
    return "; ".join(f'"{_item_text(items[i], caps.get(i))}"' for i in history)


def render_candidates(cands: Sequence[int], items: Mapping[int, Mapping[str, Any]],
                      captions: Mapping[int, str] | None = None) -> str:
    caps = captions or {}
    return "\n".join(f"{item_ref(c)} {_item_text(items[c], caps.get(c))}" for c in cands)


def answer_text(task: str, target: int, items: Mapping[int, Mapping[str, Any]],
                id2sid: Mapping[int, Sequence[str]] | None = None) -> str:
    """The answer string for ``target`` under ``task`` (no reasoning part)."""
    kind = TASKS[task]["answer"]
    if kind == "sid":
        assert id2sid is not None
        return sid_string(id2sid[target])
    if kind == "title":
        return items[target].get("title") or f"item {target}"
    return item_ref(target)


def with_think(reasoning: str, answer: str) -> str:
    """Target with a reasoning part: ``<think>reasoning</think>answer``."""
    return f"<think>{reasoning.strip()}</think>{answer}"


def parse_answer(completion: str) -> tuple[str | None, str]:
    """Split a completion into (reasoning or None, answer), stripping whitespace."""
    m = THINK_RE.match(completion)
    if m:
        return m.group(1).strip(), m.group(2).strip()
    return None, completion.strip()


# one think block with no nested / stray tags inside it, then the rest
_THINK_BLOCK_RE = re.compile(r"<think>((?:(?!</?think>).)*)</think>(.*)", re.DOTALL)
_REF_SEP_RE = re.compile(r"[\s,;]+")


def split_reasoning(completion: str) -> tuple[str | None, str] | None:
    """Strict split of a free-form completion: ``(reasoning or None, answer)``, or None if its tags are broken.

    Well formed = an optional single leading ``<think>...</think>`` (no nested or repeated think tags)
    followed by an answer with no think tags. Whitespace around both parts is stripped. The format
    rewards, the answer rewards and evaluation all read completions through this one function.
    """
    text = completion.strip()
    if text.startswith("<think>"):
        m = _THINK_BLOCK_RE.fullmatch(text)
        if m is None:
            return None
        reasoning, answer = m.group(1).strip(), m.group(2).strip()
    else:
        reasoning, answer = None, text
    if "<think>" in answer or "</think>" in answer:
        return None
    return reasoning, answer


def parse_item_refs(completion: str) -> list[int] | None:
    """The item ids a completion's answer names, in order, or None when it is not a clean list.

    Clean = the answer (after :func:`split_reasoning`) is one or more canonical ``[ITEM_<id>]``
    references separated only by whitespace, ``,`` or ``;``, each item named once. So
    ``"I pick [ITEM_5]"`` (extra words), ``"[ITEM_5] [ITEM_5]"`` (a repeat) and ``"[ITEM_05]"`` are None.
    """
    parts = split_reasoning(completion)
    if parts is None:
        return None
    answer = parts[1]
    refs = list(ITEM_REF_RE.finditer(answer))
    if not refs or _REF_SEP_RE.sub("", ITEM_REF_RE.sub("", answer)):
        return None
    ids = [int(m.group(1)) for m in refs]
    if any(m.group(0) != item_ref(i) for m, i in zip(refs, ids)) or len(set(ids)) != len(ids):
        return None
    return ids


def parse_choice(completion: str, candidates: Iterable[int] | None = None) -> int | None:
    """The one item a candidate-ranking answer chooses, or None (malformed, several items, or not a candidate).

    The single parser of ``cand_rank`` answers: the ``candidate_choice`` reward and ``--think``
    evaluation both call it, so a completion the reward pays for is one evaluation scores.
    ``candidates=None`` accepts any item id.
    """
    ids = parse_item_refs(completion)
    if ids is None or len(ids) != 1:
        return None
    if candidates is not None and ids[0] not in {int(c) for c in candidates}:
        return None
    return ids[0]


def parse_query(completion: str) -> str | None:
    """The search query of a ``query`` answer (after an optional ``<think>``), or None if empty or malformed.

    One line of text: internal whitespace is collapsed; item references or think tags are not a query.
    """
    parts = split_reasoning(completion)
    if parts is None:
        return None
    query = " ".join(parts[1].split())
    if not query or ITEM_REF_RE.search(query):
        return None
    return query


def build_input(
    task: str,
    *,
    history: Sequence[int] = (),
    item: int | None = None,
    items: Mapping[int, Mapping[str, Any]],
    id2sid: Mapping[int, Sequence[str]] | None = None,
    captions: Mapping[int, str] | None = None,
    candidates: Sequence[int] | None = None,
    cot_reference: str | None = None,
) -> str:
    """The ``input`` field of a row for ``task``."""
    spec = TASKS[task]
    if spec["history"] == "none":
        assert item is not None
        if spec["answer"] == "sid":
            return f'{ITEM_TITLE_HEADER} "{items[item].get("title") or f"item {item}"}"'
        return f"{SID_HEADER} {sid_string(id2sid[item])}"  # type: ignore[index]
    parts = [f"{HISTORY_HEADER} {render_history(history, spec['history'], items, id2sid, captions)}"]
    if candidates is not None:
        parts.append(f"{CANDIDATES_HEADER}\n" + render_candidates(candidates, items, captions))
    if cot_reference:
        parts.append(f"{REFERENCE_HEADER} {cot_reference.strip()}")
    return "\n".join(parts)


def sft_row(task: str, input_text: str, output: str, system: str = SYSTEM) -> dict[str, str]:
    """LLaMA-Factory alpaca row."""
    return {"system": system, "instruction": TASKS[task]["instruction"], "input": input_text, "output": output}


def chat_messages(row: Mapping[str, str]) -> list[dict[str, str]]:
    """Alpaca row -> chat messages, joined exactly like LLaMA-Factory's alpaca converter."""
    user = "\n".join(x for x in (row["instruction"], row.get("input", "")) if x)
    msgs = []
    if row.get("system"):
        msgs.append({"role": "system", "content": row["system"]})
    msgs.append({"role": "user", "content": user})
    return msgs


def rl_row(
    sft: Mapping[str, str],
    *,
    data_source: str,
    task: str,
    split: str,
    index: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """verl-style RL row built from the SFT row (same prompt text, ground truth carried in the row)."""
    _, answer = parse_answer(sft["output"])
    info = {"split": split, "index": index, "task": task}
    info.update(extra or {})
    return {
        "data_source": data_source,
        "prompt": chat_messages(sft),
        "ability": "seq_rec",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": info,
    }


def render_prompt(tokenizer: Any, messages: Iterable[Mapping[str, str]]) -> str:
    """Chat messages -> prompt string with the generation prompt, via the tokenizer's chat template."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
