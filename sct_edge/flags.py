"""Dataclass fields that declare their own command-line flag: a setting's default and help are stated once.

A settings dataclass marks each field a command exposes with `flag(default, help=...)`; `add_flags` adds
one argparse option per such field (flag name, type, default and help taken from the field; the help
shows the default) and
`from_flags` builds the dataclass back from the parsed namespace. Fields declared with plain `field()` or a
bare default stay out of the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

Settings = TypeVar("Settings")
_SCALARS = (int, float, str, Path)


def flag(default: Any = dataclasses.MISSING, *, help: str, name: str | None = None, metavar: str | None = None,
         default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is also the command-line option `name` (default: `--field-name`)."""
    metadata = {"help": help, "flag": name, "metavar": metavar}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of settings dataclass `cls` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one option to `parser` for every `flag` field of `cls`, its default and help taken from the field."""
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls):
        option = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = f" (default: {default})" if default not in (None, False, []) else ""
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata["help"] + shown}
        if f.metadata["metavar"]:
            kwargs["metavar"] = f.metadata["metavar"]
        hint = hints[f.name]
        if hint is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            kwargs.update(type=item, nargs="+")
        else:
            kwargs["type"] = _scalar_type(hint, f.name)
        parser.add_argument(option, **kwargs)


def from_flags(cls: type[Settings], args: argparse.Namespace) -> Settings:
    """The settings `cls` with every `flag` field taken from the parsed `args` (other fields keep defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in flag_fields(cls)})


def _scalar_type(hint: Any, name: str) -> type:
    """The argparse type of a field typed `T` or `T | None` for a scalar T."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(options) == 1:
            hint = options[0]
    if hint not in _SCALARS:
        raise TypeError(f"field {name}: a command-line flag cannot have type {hint}")
    return hint
