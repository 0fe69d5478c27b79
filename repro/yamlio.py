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
import math
import types
import typing
import unicodedata
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
        _check_events(text, path)  # before composing: an alias bomb must never be expanded
        node = yaml.compose(text, Loader=_LOADER)
        data = yaml.load(text, Loader=_LOADER)  # the safe loader (libyaml's when present)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        detail = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{path}{line}: not valid YAML ({plain(detail)})") from None
    except ConfigError:
        raise
    except ValueError as e:  # a constructor's own limit, e.g. an integer of more than 4300 digits
        raise ConfigError(f"{path}: not valid YAML ({plain(str(e))})") from None
    lines: dict[str, int] = {}
    _index_lines(node, "", lines, path)
    return ({} if data is None else data), lines


# Nesting deeper than any config needs; the line index and the dataclass builder recurse once per level.
MAX_DEPTH = 64


def _check_events(text: str, path: Path) -> None:
    """Refuse anchors and aliases, and absurd nesting, from the parser's events, before anything is built.

    An alias is a reference: nine levels of nine aliases each are under 400 bytes that expand to 9^9 (387M) nodes
    (the "billion laughs"); yaml.load shares them, but anything that walks the data visits every copy. No config
    needs them (a study shares settings through `defaults` and `extends`), so the strict files refuse them outright
    instead of capping an expansion.
    """
    depth = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise ConfigError(f"{path}:{event.start_mark.line + 1}: YAML {kind}{plain(str(event.anchor))}: anchors "
                              f"and aliases are not allowed in config files (write the value out, or use "
                              f"defaults/extends)")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"{path}:{event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


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
        dotted = plain(dotted)  # keys are user text: never a second line in the message
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
        raise ConfigError(f"{where.at(prefix.rstrip('.') or '<top>')}: expected a mapping, got {show_value(data)}")
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
            raise ConfigError(f"{where.at(dotted)}: {show_value(value)} is not one of "
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
            raise ConfigError(f"{where.at(dotted)}: expected a list, got {show_value(value)}")
        return tuple(_convert(args[0], v, where, f"{dotted}.{i}") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where.at(dotted)}: expected a list of {len(args)}, got {show_value(value)}")
        return tuple(_convert(a, v, where, f"{dotted}.{i}") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where.at(dotted)}: expected a mapping, got {show_value(value)}")
        return {str(k): (tuple(v) if isinstance(v, list) else v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where.at(dotted)}: expected true or false, got {show_value(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where.at(dotted)}: expected an integer, got {show_value(value)}")
        return value
    if tp is float:
        number = None
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        elif isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond a float's range
                raise ConfigError(f"{where.at(dotted)}: out of range, got {show_value(value)}") from None
        if number is None:
            raise ConfigError(f"{where.at(dotted)}: expected a number, got {show_value(value)}")
        if not math.isfinite(number):  # .inf / .nan: no config value means them, and NaN compares false to any bound
            raise ConfigError(f"{where.at(dotted)}: must be a finite number, got {show_value(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where.at(dotted)}: expected a string, got {show_value(value)}")
        return value
    raise AssertionError(f"unsupported config type {tp} at {dotted}")


def show_value(value) -> str:
    """A user's value for a one-line message: its repr (which escapes control characters), shortened."""
    if value is None:
        return "nothing"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits"
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than Python prints
        return f"a {type(value).__name__} too large to print"
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


# Unicode categories no config string may hold where it reaches a shell script, a file name or a message: control
# characters (Cc: newline, tab, NUL), format characters (Cf: bidi overrides U+202A-U+202E and isolates
# U+2066-U+2069, zero-width characters) and the line and paragraph separators (Zl, Zp).
_HIDDEN = {"Cc", "Cf", "Zl", "Zp"}


def hidden_characters(text: str) -> list[str]:
    """The control, format (bidi) and line-separator characters in `text`, as escapes ('\\n', '\\u202e')."""
    return sorted({c.encode("unicode_escape").decode() for c in text if unicodedata.category(c) in _HIDDEN})


def plain(text: str, limit: int = 200) -> str:
    """`text` safe to print on one line: hidden characters escaped, shortened to about `limit` characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text)} characters)"


def check_text(value: str | None, key: str, limit: int = 4096) -> None:
    """Refuse hidden characters and absurd lengths in a config string that reaches sbatch, a path or a report.

    A newline in a partition or a job name would start a new `#SBATCH` line of the job script; a bidi override
    shows a name other than the one used. Raises ConfigError naming `key`, for `from_dict` to add the file:line."""
    if value is None:
        return
    bad = hidden_characters(value)
    if bad:
        raise ConfigError(f"control or bidi character {', '.join(bad)} not allowed, got {show_value(value)}", key=key)
    if len(value) > limit:
        raise ConfigError(f"longer than {limit} characters ({len(value)})", key=key)


def check_ranges(obj, **bounds: tuple[float, float]) -> None:
    """Each named numeric field of dataclass `obj` (each item, for a tuple; None skipped) within [low, high] and
    finite. Raises ConfigError naming the field, for `from_dict` to add the file:line."""
    for name, (low, high) in bounds.items():
        value = getattr(obj, name)
        items = value if isinstance(value, tuple) else (value,)
        for v in items:
            if v is None or isinstance(v, str):  # None: unset; a str: a Literal alternative such as "all"
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"must be a finite number, got {v}", key=name)
            if v < low:
                raise ConfigError(f"must be >= {low}, got {show_value(v)}", key=name)
            if v > high:
                limit = f"{high:_}" if high >= 10**5 else f"{high}"  # 1_000_000_000: readable, and valid YAML
                raise ConfigError(f"must be <= {limit}, got {show_value(v)}", key=name)
