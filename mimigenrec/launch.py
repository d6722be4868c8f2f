"""What the launchers (sft.sh, trl_trainer.sh) need before they start a job: caller-relative paths
made absolute once, and checks that turn the usual mistakes into one clear line instead of a
traceback from inside ``accelerate launch`` or ``llamafactory-cli``.

``python -m mimigenrec.launch resolve CALLER_DIR key=value ...`` prints the overrides as shell words,
path values relative to CALLER_DIR made absolute (see :func:`resolve_override`).
``python -m mimigenrec.launch check-rl CONFIG [key=value ...]`` checks a GRPO config (run from the
repository root, like the trainer): the model folder, the RL data, the reward names, the SID tokens and
the teachers' tokenizers.
Both exit 2 with ``error: file: what is wrong: what to do`` on a problem.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mimigenrec import yaml_config
from mimigenrec.io import (
    BadInputError,
    DataDir,
    bad,
    check_model_dir,
    check_model_spec,
    cli_errors,
    file_digest,
    guard_resume,
    model_fingerprint,
    read_json,
)

# keys whose value names something that must already exist / that a run creates
INPUT_KEYS = ("model_name_or_path", "adapter_name_or_path", "dataset_dir", "deepspeed", "data_dir",
              "resume_from_checkpoint", "tokenized_path", "media_dir")
OUTPUT_KEYS = ("output_dir", "export_dir", "logging_dir")


def resolve_path(value: str, caller: str | os.PathLike, must_exist: bool) -> str:
    """``value`` relative to ``caller`` made absolute (see :func:`resolve_override` for when not)."""
    caller = Path(caller)
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    full = caller / p
    if must_exist and not full.exists() and (p.exists() or _hub_id(value)):
        return value  # relative to the repository root (the current directory here), or a hub id
    return str(full.resolve())


def _hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "~"))


def _resolve_teachers(value: str, caller: Path) -> str:
    specs = yaml_config.load_yaml(value)
    return json.dumps([resolve_path(str(t), caller, True) for t in (specs if isinstance(specs, list) else [specs])])


def _resolve_rewards(value: str, caller: Path) -> str:
    specs = yaml_config.load_yaml(value)
    if not isinstance(specs, list):
        specs = [specs]
    out = []
    for s in map(str, specs):
        target, sep, attr = s.rpartition(":")
        out.append(f"{resolve_path(target, caller, True)}:{attr}" if sep and target.endswith(".py") else s)
    return json.dumps(out)


def resolve_override(item: str, caller: str | os.PathLike) -> str:
    """``key=value`` with a path value relative to ``caller`` made absolute.

    Output paths (``output_dir``, ``export_dir``, ``logging_dir``) always are. Input paths
    (``model_name_or_path``, ``dataset_dir``, ``data_dir``, ``deepspeed``, ...) and the files of
    ``path/to/file.py:function`` rewards and the ``teachers`` folders are too, unless they exist only relative to the repository
    root (the current directory of the launchers, as in the example configs) or look like a hub id
    (``org/name``). Run from the repository root.
    """
    key, sep, value = item.partition("=")
    k = key.strip().lstrip("-")
    if not sep or not value.strip() or value.strip().lower() in ("true", "false", "null", "none"):
        return item
    caller = Path(caller)
    if k in OUTPUT_KEYS:
        return f"{key}={resolve_path(value, caller, must_exist=False)}"
    if k in INPUT_KEYS:
        return f"{key}={resolve_path(value, caller, must_exist=True)}"
    if k == "rewards":
        return f"{key}={_resolve_rewards(value, caller)}"
    if k == "teachers":
        return f"{key}={_resolve_teachers(value, caller)}"
    return item


# ----------------------------------------------------------------------------- GRPO config check


def tokenizer_vocab(model_dir: Path) -> set[str] | None:
    """Every token of a model folder's ``tokenizer.json`` (None when it has none: nothing to check)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return set(Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True))


def check_sid_tokens(vocab: Iterable[str] | None, tokens: Sequence[str], model: Any, data_dir: Any) -> None:
    """The dataset's SID tokens must be single tokens of the model's tokenizer."""
    if vocab is None:
        return
    vocab = set(vocab)
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise bad(model, f"the tokenizer lacks {len(missing)} of the {len(tokens)} SID tokens of {data_dir} "
                  f"(e.g. {missing[0]})", "use a model fine-tuned by sft.sh on this dataset (it adds "
                  "O/new_tokens.json); a dataset rebuilt with other SIDs needs a new SFT")


def check_rewards(specs: Sequence[str], where: Any) -> None:
    """Built-in reward names or ``path/to/file.py:function`` with an existing file."""
    from rewards import list_rewards

    for s in specs:
        target, sep, _ = str(s).rpartition(":")
        if s in list_rewards() or (sep and not target.endswith(".py")):
            continue
        if sep and not Path(target).is_file():
            raise bad(where, f"reward {s!r}: no file {target}", "fix the path (relative to the repository root)")
        if not sep:
            raise bad(where, f"unknown reward {s!r}",
                      f"use one of {', '.join(list_rewards())}, or 'path/to/file.py:function'")


def check_rl_config(config: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The checks of ``check-rl`` (see the module docstring); returns the merged config."""
    cfg = yaml_config.read_yaml_mapping(config, BadInputError)
    cfg.update(yaml_config.parse_overrides(overrides, BadInputError))
    for key in ("model_name_or_path", "data_dir"):
        if not cfg.get(key):
            raise bad(config, f"{key} is not set", f"set it in the config or add {key}=PATH")
    model_dir = Path(check_model_spec(str(cfg["model_name_or_path"]), "model_name_or_path"))
    d = DataDir(cfg["data_dir"])
    split = d.rl(str(cfg.get("train_split", "train")))
    if not split.is_file():
        raise bad(split, "missing", f"build the RL files first: python -m preprocess build --out_dir {d.root}")
    rewards = cfg.get("rewards") or ["rule"]
    check_rewards(rewards, config)
    weights = cfg.get("reward_weights")
    if weights is not None and len(weights) != len(rewards):
        raise bad(config, f"reward_weights has {len(weights)} values for {len(rewards)} rewards",
                  "give one weight per reward")
    if model_dir.is_dir() and d.new_tokens.is_file() and cfg.get("constrained", True):
        check_sid_tokens(tokenizer_vocab(model_dir), read_json(d.new_tokens), model_dir, d.root)
    from rewards import TEACHER_REWARDS

    needs = [r for r in map(str, rewards) if r in TEACHER_REWARDS]
    if needs and not cfg.get("teachers"):
        raise bad(config, f"reward {needs[0]} needs teachers",
                  "set teachers: [DIR, ...] (checkpoints sharing the policy's tokenizer, e.g. the SFT seeds' kept ones)")
    teachers = check_teachers(cfg.get("teachers") or [], model_dir)
    guard_rl_resume(cfg, model_dir, split, d, teachers)
    return cfg


def check_teachers(teachers: Sequence[str] | str, model_dir: Path) -> list[Path]:
    """The ``teachers`` folders, each a model whose tokenizer has exactly the policy's tokens (teacher
    rewards score the policy's token ids with them)."""
    out = []
    policy = tokenizer_vocab(model_dir) if model_dir.is_dir() else None
    for t in [teachers] if isinstance(teachers, str) else teachers:
        t = Path(check_model_dir(str(t), "teacher"))
        vocab = tokenizer_vocab(t)
        if policy is not None and vocab is not None and vocab != policy:
            raise bad(t, f"teacher's tokenizer differs from the policy's ({model_dir}): "
                         f"{len(vocab - policy)} token(s) only in the teacher, {len(policy - vocab)} only in the policy",
                      "give teachers trained from the same backbone and SID tokens (e.g. other SFT seeds)")
        out.append(t)
    return out


def guard_rl_resume(cfg: dict[str, Any], model_dir: Path, split: Path, d: DataDir, teachers: Sequence[Path] = ()
                    ) -> None:
    """Resume GRPO checkpoints only when they were trained from the same model, data, rewards and teachers."""
    resume = cfg.get("resume_from_checkpoint")
    if isinstance(resume, str) and resume.lower() not in ("true", "last", "latest", "false", "none", ""):
        if not Path(resume).is_dir():
            raise bad(resume, "resume_from_checkpoint: no such checkpoint folder",
                      "give a checkpoint-N folder of this output_dir, or resume_from_checkpoint=true")
    if not cfg.get("output_dir"):
        return
    now = {"model": model_fingerprint(model_dir) if model_dir.is_dir() else str(model_dir),
           "rl_data": file_digest(split), "sids": file_digest(d.id2sid) if d.id2sid.is_file() else None,
           "rewards": [str(r) for r in cfg.get("rewards") or ["rule"]]}
    if teachers:
        now["teachers"] = [model_fingerprint(t) for t in teachers]
    resuming = resume not in (None, False) and str(resume).lower() not in ("false", "none", "")
    guard_resume(cfg["output_dir"], now, resuming, "drop resume_from_checkpoint to start again from step 0")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimigenrec.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resolve", help="print overrides with caller-relative paths made absolute")
    r.add_argument("caller", help="the directory the user ran the launcher from")
    r.add_argument("overrides", nargs="*", help="key=value")
    c = sub.add_parser("check-rl", help="check a GRPO config before launching")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*", help="key=value")
    args = p.parse_args(argv)
    if args.cmd == "resolve":
        import shlex

        print(" ".join(shlex.quote(resolve_override(o, args.caller)) for o in args.overrides))
        return 0
    return cli_errors(lambda: check_rl_config(args.config, args.overrides) and 0)


if __name__ == "__main__":
    sys.exit(main())
