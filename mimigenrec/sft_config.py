"""SFT configuration helpers: a dataset's SID tokens for ``add_tokens``, YAML with ``key=value`` overrides.

``python -m mimigenrec.sft_config add-tokens CONFIG.yaml [key=value ...]`` prints the
comma-separated SID tokens of the config's dataset(s) (what ``sft.sh`` passes as
``add_tokens=...``), or nothing when the config already sets ``add_tokens``;
``python -m mimigenrec.sft_config get CONFIG.yaml KEY [key=value ...]`` prints one setting;
``python -m mimigenrec.sft_config check CONFIG.yaml [key=value ...]`` checks a training config before
``llamafactory-cli`` starts (the model folder, the datasets) and records the fingerprint of its inputs
in ``output_dir/mimigenrec_inputs.json``: checkpoints there are resumed only when they were trained on
the same inputs (run by ``sft.sh``);
``python -m mimigenrec.sft_config untie-merged DIR`` fixes a merged LoRA model of a tied-embedding
backbone (run by ``SFT_CMD=export bash sft.sh``).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from mimigenrec import yaml_config
from mimigenrec.io import (
    INPUTS_FILE,
    BadInputError,
    check_model_spec,
    cli_errors,
    file_digest,
    guard_resume,
    model_fingerprint,
)


class SFTConfigError(BadInputError):
    """A dataset registry, token file or config is missing or malformed; the message names it."""


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SFTConfigError(f"{path}: {what} not found: check the path, or run the preprocess stage that writes it")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SFTConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _split_names(dataset: str | Iterable[str]) -> list[str]:
    names = dataset.split(",") if isinstance(dataset, str) else list(dataset)
    return [n.strip() for n in names if n and n.strip()]


def dataset_file(dataset_dir: str | Path, dataset: str) -> Path:
    """The data file ``dataset_dir/dataset_info.json`` registers under the name ``dataset``."""
    info_path = Path(dataset_dir) / "dataset_info.json"
    info = _read_json(info_path, "dataset registry")
    if dataset not in info:
        known = ", ".join(sorted(info)) or "(none)"
        raise SFTConfigError(f"{info_path}: no dataset named {dataset!r}; registered: {known}: set dataset_dir to "
                             "the preprocessed folder O (its own dataset_info.json), or build with --dataset_dir")
    entry = info[dataset]
    if not isinstance(entry, dict) or "file_name" not in entry:
        raise SFTConfigError(f"{info_path}: dataset {dataset!r} has no 'file_name'")
    data_file = Path(entry["file_name"])
    return data_file if data_file.is_absolute() else Path(dataset_dir) / data_file


def new_tokens_path(dataset_dir: str | Path, dataset: str) -> Path:
    """The ``new_tokens.json`` of the preprocessed directory ``O`` a registered dataset comes from.

    ``dataset_info.json`` maps ``dataset`` to ``file_name`` = ``O/sft/<split>.json`` (relative to
    ``dataset_dir`` unless absolute), so the tokens are in ``O/new_tokens.json``.
    """
    info_path = Path(dataset_dir) / "dataset_info.json"
    data_file = dataset_file(dataset_dir, dataset)
    if data_file.parent.name != "sft":
        raise SFTConfigError(
            f"{info_path}: dataset {dataset!r} file {data_file} is not under a preprocessed directory's "
            "sft/ folder, so its new_tokens.json cannot be located: set add_tokens yourself"
        )
    return data_file.parent.parent / "new_tokens.json"


def sid_tokens_for_dataset(dataset_dir: str, dataset: str) -> list[str]:
    """SID tokens of one or more (comma-separated) registered datasets, in first-seen order."""
    names = _split_names(dataset)
    if not names:
        raise SFTConfigError("no dataset name given")
    tokens: list[str] = []
    seen: set[str] = set()
    for name in names:
        path = new_tokens_path(dataset_dir, name)
        toks = _read_json(path, f"new_tokens.json of dataset {name!r}")
        if not isinstance(toks, list) or not all(isinstance(t, str) and t for t in toks):
            raise SFTConfigError(f"{path}: expected a JSON list of non-empty token strings")
        bad = [t for t in toks if "," in t]
        if bad:
            raise SFTConfigError(f"{path}: token {bad[0]!r} contains a comma (add_tokens is comma-separated)")
        for t in toks:
            if t not in seen:
                seen.add(t)
                tokens.append(t)
    return tokens


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)`` with the value parsed as YAML."""
    return yaml_config.parse_override(item, SFTConfigError)


def load_yaml_with_overrides(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Load a YAML config (a mapping) and apply ``key=value`` overrides on top."""
    cfg = yaml_config.read_yaml_mapping(path, SFTConfigError)
    cfg.update(yaml_config.parse_overrides(overrides, SFTConfigError))
    return cfg


def write_sft_yaml(base: dict, out_path: str | Path, **fields: Any) -> Path:
    """Write ``base`` updated with ``fields`` as a LLaMA-Factory YAML (key order kept)."""
    cfg = dict(base)
    cfg.update(fields)
    if isinstance(cfg.get("add_tokens"), (list, tuple)):
        cfg["add_tokens"] = ",".join(cfg["add_tokens"])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1 << 20), encoding="utf-8")
    return out


def add_tokens_for_config(cfg: dict) -> str | None:
    """The ``add_tokens`` value a config needs, or None when it sets one already (or names no dataset)."""
    if cfg.get("add_tokens"):
        return None
    names = _split_names(cfg.get("dataset") or "") + _split_names(cfg.get("eval_dataset") or "")
    if not names:
        return None
    return ",".join(sid_tokens_for_dataset(str(cfg.get("dataset_dir", "data")), ",".join(names)))


# what LLaMA-Factory looks for before it refuses a non-empty output_dir without checkpoints
FINAL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def sft_inputs(cfg: dict) -> dict[str, Any]:
    """What a training run learns from, by content: dataset files, base model, added tokens, method."""
    names = _split_names(cfg.get("dataset") or "") + _split_names(cfg.get("eval_dataset") or "")
    files = [dataset_file(str(cfg.get("dataset_dir", "data")), n) for n in names]
    for f in files:
        if not f.is_file():
            raise SFTConfigError(f"{f}: registered dataset file missing: run `python -m preprocess build` for it")
    model = check_model_spec(str(cfg.get("model_name_or_path") or ""), "model_name_or_path")
    if Path(model).is_dir():
        model = model_fingerprint(model)
    sids = {file_digest(f.parent.parent / "id2sid.json") for f in files
            if f.parent.name == "sft" and (f.parent.parent / "id2sid.json").is_file()}
    return {"datasets": {n: file_digest(f) for n, f in zip(names, files)}, "model": model,
            "add_tokens": str(cfg.get("add_tokens") or ""), "finetuning_type": cfg.get("finetuning_type", "lora"),
            "sids": sorted(sids)}


def trained_sids(model_dir: str | Path) -> list[str] | None:
    """Digests of the id2sid.json files a model was fine-tuned with (from the ``sft.sh`` or
    ``trl_trainer.sh`` record in its folder, or its parent for a ``checkpoint-N``); None when there is no record."""
    d = Path(model_dir)
    for rec in (d / INPUTS_FILE, d.parent / INPUTS_FILE if d.name.startswith("checkpoint-") else None):
        if rec is not None and rec.is_file():
            sids = _read_json(rec, "inputs record").get("sids") or []
            return ([sids] if isinstance(sids, str) else list(sids)) or None  # trl_trainer.sh records one digest
    return None


def check_resume(cfg: dict) -> Path | None:
    """Refuse to resume checkpoints in ``output_dir`` that other inputs trained; record this run's inputs.

    LLaMA-Factory resumes from the last ``checkpoint-*`` unless ``overwrite_output_dir``; that is only
    right when the data, the base model and the tokens are the ones the checkpoints were trained on.
    Returns the record's path (None without ``output_dir``).
    """
    now = sft_inputs(cfg)
    if not cfg.get("output_dir"):
        return None
    out = Path(cfg["output_dir"])
    overwrite = bool(cfg.get("overwrite_output_dir"))
    resuming = any(out.glob("checkpoint-*")) and not overwrite
    if not resuming and not overwrite and any((out / f).is_file() for f in FINAL_MODEL_FILES):
        raise SFTConfigError(f"{out}: holds a trained model and no checkpoint to resume: use another output_dir, "
                             "or overwrite_output_dir=true to train again")
    return guard_resume(out, now, resuming, "overwrite_output_dir=true to start again from step 0")


def lf_encode_row(tokenizer: Any, row: dict, template: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of an alpaca row exactly as LLaMA-Factory's SFT encodes it.

    Uses LLaMA-Factory's own template code (``template=None`` = parse the tokenizer's chat
    template, the setting the example YAMLs use) on a copy of ``tokenizer``; compare the prompt
    ids with ``tokenizer.encode(prompts.render_prompt(...))`` to check SFT/RL agreement.
    """
    import copy

    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    from mimigenrec import prompts

    tok = copy.deepcopy(tokenizer)
    tmpl = get_template_and_fix_tokenizer(tok, DataArguments(template=template))
    user = prompts.chat_messages(row)[-1]
    messages = [user, {"role": "assistant", "content": row["output"]}]
    return tmpl.encode_oneturn(tok, messages, system=row.get("system") or None)


def untie_diverged_embeddings(model_dir: str | Path) -> bool:
    """After a LoRA merge, keep a separately trained output layer: untie it from the input embeddings.

    LLaMA-Factory trains the resized ``embed_tokens`` and ``lm_head`` of a tied model as two PEFT
    ``modules_to_save`` copies; the merged checkpoint stores both, but ``tie_word_embeddings: true``
    would make loading overwrite ``lm_head`` with ``embed_tokens``. Returns True when it untied.
    """
    import torch
    from safetensors import safe_open

    d = Path(model_dir)
    cfg_path = d / "config.json"
    cfg = _read_json(cfg_path, "merged model config")
    if not cfg.get("tie_word_embeddings"):
        return False
    index = d / "model.safetensors.index.json"
    weight_map = _read_json(index, "safetensors index")["weight_map"] if index.is_file() else None
    files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
    found: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(d / name), framework="pt") as f:
            for k in f.keys():
                for want in ("lm_head.weight", "embed_tokens.weight"):
                    if k.endswith(want):
                        found[want] = f.get_tensor(k)
    if len(found) < 2 or torch.equal(found["lm_head.weight"], found["embed_tokens.weight"]):
        return False
    cfg["tie_word_embeddings"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mimigenrec.sft_config", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add-tokens", help="print the add_tokens value for a config (empty if already set)")
    a.add_argument("config", help="LLaMA-Factory YAML; relative dataset_dir is resolved from the current directory")
    a.add_argument("overrides", nargs="*", help="key=value overrides applied on top of the YAML")
    g = sub.add_parser("get", help="print one key of a config after overrides (empty if unset)")
    g.add_argument("config", help="LLaMA-Factory YAML")
    g.add_argument("key", help="the key to print")
    g.add_argument("overrides", nargs="*", help="key=value overrides applied on top of the YAML")
    c = sub.add_parser("check", help="check a training config and record its inputs (refuses a mixed resume)")
    c.add_argument("config", help="LLaMA-Factory YAML")
    c.add_argument("overrides", nargs="*", help="key=value overrides applied on top of the YAML")
    u = sub.add_parser("untie-merged", help="after a LoRA merge, untie a separately trained lm_head (see docs)")
    u.add_argument("model_dir", help="the merged model directory (export_dir)")
    args = p.parse_args(argv)
    if args.cmd == "untie-merged":
        if untie_diverged_embeddings(args.model_dir):
            print(f"sft_config: {args.model_dir}: lm_head was trained apart from embed_tokens; "
                  "set tie_word_embeddings=false", file=sys.stderr)
        return
    def run() -> None:
        cfg = load_yaml_with_overrides(args.config, args.overrides)
        if args.cmd == "check":
            check_resume(cfg)
            return
        value = add_tokens_for_config(cfg) if args.cmd == "add-tokens" else cfg.get(args.key)
        print("" if value is None else value)

    rc = cli_errors(run)
    if rc:
        raise SystemExit(rc)


if __name__ == "__main__":
    main()
