"""``python -m preprocess <stage> ...``: one sub-command per stage module.

Each stage module in this package exposes ``add_arguments(parser)`` and ``run(args)``
and a one-line module docstring used as the sub-command's help.
"""
from __future__ import annotations

import argparse
import importlib
import sys

STAGES = ["amazon18", "amazon23", "movielens", "embed", "sid", "caption", "cot", "build", "all"]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the stage docstrings' layout and shows every option's default."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess",
        description="Raw interaction logs -> ids/splits -> embeddings -> semantic IDs -> captions/CoT -> SFT/RL JSON.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    modules = {}
    for name in STAGES:
        try:
            mod = importlib.import_module(f"preprocess.{name}_stage" if name == "all" else f"preprocess.{name}")
        except ModuleNotFoundError as e:  # a stage not written yet / optional dependency missing
            if e.name and e.name.startswith("preprocess."):
                continue
            raise
        doc = (mod.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=(mod.__doc__ or doc).strip(),
                           formatter_class=_HelpFormatter)
        mod.add_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    from mimigenrec.io import cli_errors

    return cli_errors(lambda: modules[args.stage].run(args))


if __name__ == "__main__":
    sys.exit(main())
