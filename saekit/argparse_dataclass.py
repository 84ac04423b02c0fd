"""Frozen dataclass configs → argparse flags, with each field's docstring as its help.

A config is written once, as a frozen dataclass whose fields carry a docstring (the
string literal on the line after the field). The CLI is generated from it, so the
`--help` text and the defaults can never drift from the code.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

ConfigT = TypeVar("ConfigT")


def field_docstrings(cls: type) -> dict[str, str]:
    """Map each field of `cls` (and its dataclass bases) to the docstring below it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
            and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def add_config_args(parser: argparse.ArgumentParser, cls: type, *,
                    skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of the dataclass `cls` to `parser`."""
    hints = typing.get_type_hints(cls)
    docs = field_docstrings(cls)
    group = parser.add_argument_group(cls.__name__)
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING  # type: ignore[misc]
            else None)
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        # argparse %-formats help strings: a literal '%' in a docstring ("10%") must be doubled.
        help_text = docs.get(field.name, "").replace("%", "%%")
        if not required:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text, "required": required,
                                  "default": argparse.SUPPRESS}
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(typing.get_args(tp)[0])
        elif origin in (tuple, list):
            item = typing.get_args(tp)[0]
            kwargs["nargs"] = "+"
            kwargs["type"] = item
        elif tp in (int, float, str):
            kwargs["type"] = tp
        elif tp is Path:
            kwargs["type"] = Path
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: no CLI parser for type {tp!r}")
        group.add_argument(_flag(field.name), **kwargs)


def config_from_args(cls: type[ConfigT], namespace: argparse.Namespace, **overrides: Any) -> ConfigT:
    """Build `cls` from the flags that were given (others keep the dataclass default)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(namespace).items() if k in names}
    for key, value in list(values.items()):
        if isinstance(value, list):
            values[key] = tuple(value)
    values.update(overrides)
    return cls(**values)
