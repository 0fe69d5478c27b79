"""Strict YAML reading: safe-loaded data with every dotted key's line, built into frozen dataclasses.

Run configs, studies, paper tables and launch profiles are all read this way, so a mistake in any of them is one
line naming the file, the line and the dotted key, with the nearest valid key suggested:

    experiments/x.yaml:7: train.lr: expected a number, got 'fast'
    experiments/x.yaml:3: model.nmae: unknown key (did you mean name?)

The dataclasses are the schema; this module knows none of them, so every reader can use it without importing
another reader.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from repro.errors import ConfigError, did_you_mean


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the same safe loader, about 10x faster


def read_yaml(path: str | Path) -> tuple[Any, dict[str, int]]:
    """Safe-load a YAML file and map every dotted key to its line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    try:
        node = yaml.compose(text, Loader=_LOADER)
        data = yaml.load(text, Loader=_LOADER)  # the safe loader (libyaml's when present)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    lines: dict[str, int] = {}
    _index_lines(node, "", lines, path)
    return ({} if data is None else data), lines


def _index_lines(node, prefix: str, lines: dict[str, int], path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            if key_node.value in seen:  # PyYAML keeps the last silently; a typo'd copy would win unnoticed
                raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: {dotted}: duplicate key")
            seen.add(key_node.value)
            lines[dotted] = key_node.start_mark.line + 1
            _index_lines(value_node, dotted + ".", lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[f"{prefix}{i}"] = item.start_mark.line + 1
            _index_lines(item, f"{prefix}{i}.", lines, path)


@dataclass(frozen=True)
class Where:
    """Where values come from, for error messages: a file, its key -> line map, and the other files that
    keys inherited through `extends:` come from."""

    file: str = "<config>"
    lines: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def at(self, dotted: str) -> str:
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):  # the key's own line, else its nearest parent's
            key = ".".join(parts[:n])
            line = self.lines.get(key)
            if line:
                return f"{self.files.get(key, self.file)}:{line}: {dotted}"
        return f"{self.file}: {dotted}"


def from_dict(cls, data: Any, where: Where = Where(), prefix: str = ""):
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.at(prefix.rstrip('.') or '<top>')}: expected a mapping, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where.at(dotted)}: unknown key{did_you_mean(str(key), fields)}; "
                              f"valid keys: {', '.join(fields)}")
        kwargs[key] = _convert(hints[key], value, where, dotted)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where.at(prefix.rstrip('.') or '<top>')}: missing required key {prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if e.key is not None:
            raise ConfigError(f"{where.at(prefix + e.key)}: {e.detail}") from None
        raise ConfigError(f"{where.at(prefix.rstrip('.')) if prefix else where.file}: {e}") from None


def _convert(tp, value, where: Where, dotted: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, dotted + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where.at(dotted)}: {_show(value)} is not one of "
                              f"{', '.join(repr(a) for a in args)}{did_you_mean(str(value), map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(option, value, where, dotted)
            except ConfigError as e:
                errors.append(str(e).split(": ", 2)[-1])
        raise ConfigError(f"{where.at(dotted)}: {' or '.join(errors)}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where.at(dotted)}: expected a list, got {_show(value)}")
        return tuple(_convert(args[0], v, where, f"{dotted}.{i}") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where.at(dotted)}: expected a list of {len(args)}, got {_show(value)}")
        return tuple(_convert(a, v, where, f"{dotted}.{i}") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where.at(dotted)}: expected a mapping, got {_show(value)}")
        return {str(k): (tuple(v) if isinstance(v, list) else v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where.at(dotted)}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where.at(dotted)}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where.at(dotted)}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where.at(dotted)}: expected a string, got {_show(value)}")
        return value
    raise AssertionError(f"unsupported config type {tp} at {dotted}")


def _show(value) -> str:
    return "nothing" if value is None else repr(value)
