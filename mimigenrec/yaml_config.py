"""YAML configs with ``key=value`` command-line overrides, shared by the SFT and RL launchers."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml


def read_yaml_mapping(path: str | Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; ``error`` names the file on any problem."""
    p = Path(path)
    if not p.is_file():
        raise error(f"config file not found: {p}")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise error(f"{p}: expected a mapping at the top level, got {type(cfg).__name__}")
    return cfg


def parse_override(item: str, error: type[Exception] = ValueError) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``, the value read as YAML (``key=`` gives None).

    YAML 1.1 leaves ``3e-3`` as text; such numeric strings become numbers.
    """
    key, sep, raw = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise error(f"override {item!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
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
