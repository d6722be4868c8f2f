"""YAML configs with ``key=value`` command-line overrides, shared by the SFT and RL launchers."""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

_BOOL = "tag:yaml.org,2002:bool"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as
    booleans, which turns ``eval_strategy=no`` or ``save_strategy: no`` into False."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != _BOOL] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 booleans (``no`` stays the string "no")."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass


def read_yaml_mapping(path: str | Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; ``error`` names the file on any problem."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: config file not found: check the path")
    try:
        cfg = load_yaml(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML ({' '.join(str(e).split())}): fix the line it names") from None
    if not isinstance(cfg, dict):
        raise error(f"{p}: expected a mapping (key: value lines) at the top level, got {type(cfg).__name__}: "
                    "write one setting per line")
    return cfg


def parse_override(item: str, error: type[Exception] = ValueError) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``, the value read as YAML (``key=`` gives None).

    YAML 1.1 leaves ``3e-3`` as text; such numeric strings become numbers.
    """
    key, sep, raw = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise error(f"override {item!r}: not of the form key=value: write e.g. max_steps=3")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key, value


def parse_overrides(items: Iterable[str], error: type[Exception] = ValueError) -> dict[str, Any]:
    """``["a=1", "b=[x,y]"]`` -> ``{"a": 1, "b": ["x", "y"]}``."""
    return dict(parse_override(i, error) for i in items)
