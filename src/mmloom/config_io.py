"""Loading YAML configs: `--set key.sub=value` overrides and pydantic errors that name the key.

Shared by `mmloom data build` and `mmloom train`: an unknown or mistyped key is reported with the
closest valid key, a wrong value with the key and what was given.

A config is bounded before anything reads it: at most `MAX_CONFIG_BYTES` of YAML, and at most
`MAX_CONFIG_NODES` values once its aliases are expanded (a few lines of nested aliases, a "billion
laughs", would otherwise expand to gigabytes in the validation or in an error message); values
quoted in error messages are cut to `MAX_QUOTED` characters.
"""

from __future__ import annotations

import difflib
import reprlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mmloom.errors import MmloomError

MAX_CONFIG_BYTES = 4 * 2**20
MAX_CONFIG_NODES = 100_000  # values and containers, aliases expanded; configs hold hundreds
MAX_QUOTED = 120


def check_expanded_size(data: Any, source: str, limit: int = MAX_CONFIG_NODES) -> None:
    """Raise MmloomError naming `source` when `data` (as YAML loaded it: aliases are shared
    references) holds more than `limit` values with every alias expanded, or refers to itself.
    Stops counting at the limit, so its cost is bounded whatever the expansion."""
    stack, count = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > limit or depth > 100:
            raise MmloomError(f"{source}: more than {limit:,} values once its aliases (*name) are expanded, or "
                              "nested deeper than 100 levels (or referring to itself); a config this large is refused")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for pair in node.items() for v in pair)
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def quoted(value: Any, limit: int = MAX_QUOTED) -> str:
    """`repr(value)` for an error message: nested containers abbreviated, at most `limit` characters."""
    short = reprlib.Repr()
    short.maxlevel, short.maxdict, short.maxlist, short.maxstring, short.maxother = 3, 8, 8, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def load_yaml_mapping(path: str | Path, sections: str) -> dict:
    """A YAML file that must hold a mapping (`sections` names what it should contain, for errors).

    Raises MmloomError naming the file when it is missing, a folder, larger than MAX_CONFIG_BYTES,
    not UTF-8 text (e.g. an image or an .h5 file given by mistake), invalid YAML, larger than
    MAX_CONFIG_NODES values with its aliases expanded, or not a mapping."""
    path = Path(path)
    if path.is_dir():
        raise MmloomError(f"{path} is a folder, not a YAML config file")
    if not path.is_file():
        raise MmloomError(f"config file not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise MmloomError(f"{path}: {path.stat().st_size:,} bytes, more than a config may hold ({MAX_CONFIG_BYTES:,})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise MmloomError(f"{path}: not a YAML text file (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} "
                          "is not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise MmloomError(f"{path}: invalid YAML: {str(exc)[:500]}") from None
    except RecursionError:
        raise MmloomError(f"{path}: YAML nested too deeply to read") from None
    check_expanded_size(data, str(path))
    if not isinstance(data, dict):
        raise MmloomError(f"{path}: expected a mapping with {sections} sections")
    return data


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply `key.sub=value` overrides in place (values parsed as YAML, so lists and dicts work)."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not sep or not parts:
            raise MmloomError(f"--set expects key=value, got {item!r}")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise MmloomError(f"--set {key}: '{part}' is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError):
            node[parts[-1]] = raw
        check_expanded_size(node[parts[-1]], f"--set {key}")
    return data


def _section_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    model = root
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        found = _section_model(getattr(field, "annotation", None))
        if found is None:
            return None
        model = found
    return model


def describe_error(root: type[BaseModel], err: dict) -> str:
    """One pydantic error as a sentence naming the key (and the closest valid one if unknown)."""
    # pydantic puts union member names (e.g. 'str', 'dict[str,any]') into loc: drop them
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in {"str", "int", "float"})))
    key = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        prefix = ".".join(str(p) for p in loc[:-1])
        if close:
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
        else:
            hint = f"valid keys{' under ' + prefix if prefix else ''}: {', '.join(valid)}"
        return f"unknown key '{key}'; {hint}"
    if kind == "missing":
        return f"missing required key '{key}'"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and kind != "value_error":
        return f"'{key}': {msg[:1].lower() + msg[1:]} (got {quoted(err['input'])})"
    return f"'{key}': {msg}" if key else msg


def validate(root: type[BaseModel], data: Any, source: str, sections: str):
    """`root.model_validate(data)`, or one MmloomError listing every problem by key."""
    if not isinstance(data, dict):
        raise MmloomError(f"{source}: expected a mapping with {sections} sections")
    try:
        return root.model_validate(data)
    except ValidationError as exc:
        problems = list(dict.fromkeys(describe_error(root, e) for e in exc.errors()))
        raise MmloomError(f"{source}: {'; '.join(problems)}") from None
