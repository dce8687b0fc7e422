"""Loading YAML configs: `--set key.sub=value` overrides and pydantic errors that name the key.

Shared by `mmloom data build` and `mmloom train`: an unknown or mistyped key is reported with the
closest valid key, a wrong value with the key and what was given.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mmloom.errors import MmloomError


def load_yaml_mapping(path: str | Path, sections: str) -> dict:
    """A YAML file that must hold a mapping (`sections` names what it should contain, for errors).

    Raises MmloomError naming the file when it is missing, a folder, not UTF-8 text (e.g. an image
    or an .h5 file given by mistake), invalid YAML or not a mapping."""
    path = Path(path)
    if path.is_dir():
        raise MmloomError(f"{path} is a folder, not a YAML config file")
    if not path.is_file():
        raise MmloomError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise MmloomError(f"{path}: not a YAML text file (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} "
                          "is not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise MmloomError(f"{path}: invalid YAML: {exc}") from None
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
        except yaml.YAMLError:
            node[parts[-1]] = raw
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
        return f"'{key}': {msg[:1].lower() + msg[1:]} (got {err['input']!r})"
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
