"""How config fields are declared and checked, and how YAML becomes plain values: the machinery of `config`.

    learning_rate: float = setting(1e-4, "peak learning rate", gt=0)

`setting` puts a field's default, one-line help and allowed range next to it; `check_value` checks a value
against the field's annotation; `load_yaml_unique` reads YAML, refusing a key given twice.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from kaggle_utils.core.errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """The allowed range of a numeric field (or a non-blank string), and how an error message states it."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""  # why the range, appended to the message in parentheses
    nonblank: bool = False  # a string that is not empty or whitespace; `note` says what it should be

    def allows(self, value: Any) -> bool:
        if self.nonblank:
            return value.strip() != ""
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        """E.g. ">= 1", "> 0", "in [0, 1)", "strictly between 0 and 1", each followed by " (note)"."""
        if self.nonblank:
            return self.note
        low, high = _first(self.ge, self.gt), _first(self.le, self.lt)
        if high is None:
            text = f">= {low:g}" if self.ge is not None else f"> {low:g}"
        elif low is None:
            text = f"<= {high:g}" if self.le is not None else f"< {high:g}"
        elif self.gt is not None and self.lt is not None:
            text = f"strictly between {low:g} and {high:g}"
        else:
            opening, closing = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
            text = f"in {opening}{low:g}, {high:g}{closing}"
        return f"{text} ({self.note})" if self.note else text


def _first(*values: float | None) -> float | None:
    return next((value for value in values if value is not None), None)


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    note: str = "",
    nonblank: bool = False,
) -> Any:
    """A dataclass field with its default, one-line `help` and range (`metadata["range"]`: a `Bound` or None).

    Choices are the field's `Literal[...]` annotation; None in an optional field is not range-checked."""
    ranged = nonblank or any(limit is not None for limit in (ge, gt, le, lt))
    bound = Bound(ge=ge, gt=gt, le=le, lt=lt, note=note, nonblank=nonblank) if ranged else None
    return dataclasses.field(default=default, metadata={"help": help, "range": bound})


def field_help(section: Any) -> dict[str, str]:
    """{field name: one-line help} of a config section (class or instance)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(section)}


def check_value(where: str, value: Any, annotation: Any) -> Any:
    """`value` if it fits `annotation`, repaired losslessly (an int for a float becomes that float, a numeric
    string for a float the number, a list for a tuple that tuple); ConfigError naming `where` otherwise."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(where, value, option)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"config {where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config {where} must be a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(check_value(f"{where}[{i}]", item, item_type) for i, item in enumerate(value))
    if annotation is Any:
        return value
    return _check_scalar(where, value, annotation)


def _check_scalar(where: str, value: Any, annotation: Any) -> Any:
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config {where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config {where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"config {where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config {where} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config {where} must be a string, got {value!r}")
        return value
    raise TypeError(f"config {where}: no check for the annotation {annotation!r}")


def build_section(section_cls: type, values: dict[str, Any], name: str) -> Any:
    """`section_cls(**values)`, refusing keys it lacks (naming section `name`); lists become tuples."""
    known = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(
            f"unknown keys in config section '{name}': {sorted(unknown)} (known: {sorted(known)})"
        )
    return section_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def plain(value: Any) -> Any:
    """A YAML-ready copy: tuples become lists, recursively."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"key {key!r} appears twice (lines {seen[key]} and {key_node.start_mark.line + 1}); keep one"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml_unique(stream: Any) -> Any:
    """`yaml.safe_load`, but a key given twice in one mapping is a ConfigError naming it and its lines."""
    loader = _UniqueKeyLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
