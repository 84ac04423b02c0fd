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


_METAVARS: dict[Any, str] = {int: "N", float: "X", str: "S", Path: "PATH"}
"""Short placeholders by type, so most flags and their help share one line of `--help`."""


class HelpFormatter(argparse.HelpFormatter):
    """`--help` that fits a screen: the usage line names positionals and required flags only
    (every flag is listed below it), and a boolean flag reads `--[no-]name`."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("max_help_position", 28)  # argparse's 24 puts most flags on a line of their own
        super().__init__(prog, **kwargs)

    def add_usage(self, usage, actions, groups, prefix=None):  # type: ignore[override]
        shown = [a for a in actions if not a.option_strings or a.required
                 or isinstance(a, argparse._HelpAction)]
        if usage is None and len(shown) < len(actions):
            more = argparse.Action(option_strings=[], dest="options", nargs="?", metavar="options")
            shown = shown[:1] + [more] + shown[1:]
        super().add_usage(usage, shown, [], prefix)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, argparse.BooleanOptionalAction):
            return ", ".join(s.replace("--", "--[no-]", 1) for s in action.option_strings
                             if not s.startswith("--no-"))
        return super()._format_action_invocation(action)


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
        if not required and default is not None:  # a None default is described by the docstring
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
            kwargs["metavar"] = _METAVARS.get(item)
        elif tp in (int, float, str, Path):
            kwargs["type"] = tp
            kwargs["metavar"] = _METAVARS[tp]
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
