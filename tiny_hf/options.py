"""Stage options: dataclasses parsed with transformers' `HfArgumentParser`, plus `--config file.yaml`.

A stage's options are fields of one or more dataclasses (a TRL or transformers config where their trainer runs, and
a small one of ours), so every field has one definition, one default and one help text, and `--max-steps` and
`--max_steps` both work. `--config` reads a YAML mapping of the same fields first; flags on the command line win.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser


class StageParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line, `PROG: error: ...` with exit code 2 (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(*types: type, description: str | None = None) -> HfArgumentParser:
    """The parser of `types` (dataclasses) with the stage's docstring as its description and `--config`."""
    parser = StageParser(types, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="a YAML file of these options; flags override it")
    return parser


def parse_options(
    *types: type, argv: list[str] | None = None, description: str | None = None, defaults: dict | None = None
) -> tuple[Any, ...]:
    """One instance of each dataclass in `types` from `argv` (and the `--config` YAML file, if given).

    Args:
        types: The option dataclasses (a library's config, such as TRL's `SFTConfig`, and the stage's own).
        argv: The command line after the stage name (default: `sys.argv[1:]`).
        description: The `--help` text above the options (the stage's module docstring).
        defaults: The stage's own defaults for library fields, where they differ from the library's: the one place
            a stage sets them (the YAML file and the command line override them, in that order).
    """
    parser = build_parser(*types, description=description)
    if defaults:
        unknown = sorted(set(defaults) - {action.dest for action in parser._actions})
        if unknown:
            raise ValueError(f"defaults for fields no option has: {unknown}")
        parser.set_defaults(**defaults)
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        parser.set_defaults(**_read_config(parser, first.config))
    *parsed, unused = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unused:
        parser.error(f"unrecognized arguments: {' '.join(unused)}")
    return tuple(parsed[: len(types)])  # the item after them holds --config itself


def _read_config(parser: argparse.ArgumentParser, path: Path) -> dict:
    import yaml

    if not path.is_file():
        parser.error(f"--config {path}: no such file")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values, got {type(values).__name__}")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"--config {path}: unknown options {unknown}; see --help for the allowed ones")
    return values
