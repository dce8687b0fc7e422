"""Configuration of `mmloom data build` (the Cerebras LLaVA preprocessing keys), validated with pydantic.

```yaml
setup:     {input_dir: ..., output_dir: ..., processes: 4, samples_per_file: 2000}
processor: {tokenizer_type: path/to/hf_tokenizer_folder, max_sequence_length: 2048}
dataset:   {num_patches: 576, image_dir: ..., system_prompt_style: vicuna_v1}
```

Relative paths are taken relative to the current working directory (like the seed's tool).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmloom.errors import MmloomError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SetupConfig(_Section):
    input_dir: str = Field(description="folder of .jsonl files (sorted, not recursive) or one .jsonl file")
    output_dir: str = Field(description="where the .h5 files and data_params.json go")
    processes: int = Field(1, ge=1, description="worker processes; the output does not depend on it")
    samples_per_file: int = Field(
        2000, ge=1, description="samples per .h5 file (the last file holds the rest)"
    )


class ProcessorConfig(_Section):
    tokenizer_type: str = Field(
        description="HF tokenizer folder (AutoTokenizer.from_pretrained, no remote code)"
    )
    max_sequence_length: int = Field(ge=2, description="MSL, image slots included")


class DatasetConfig(_Section):
    num_patches: int = Field(
        ge=1, description="image slots per sample: (image_size // patch_size)^2 (+1 with CLS)"
    )
    image_dir: str | None = Field(None, description="root folder of the records' relative image paths")
    system_prompt_style: str = Field(
        "vicuna_v1", description="template name: plain (phase 1), vicuna_v1, ..."
    )
    image_key: str = "image"
    conversation_key: str = "conversations"
    content_key: str = "value"
    image_token: str = "<image>"
    plain_terminator: Literal["eos", "newline"] = "eos"


class BuildConfig(_Section):
    setup: SetupConfig
    processor: ProcessorConfig
    dataset: DatasetConfig


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = BuildConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
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
    got = err.get("input")
    return f"'{key}': {err['msg'].lower()} (got {got!r})"


def parse_build_config(data: Any, source: str = "config") -> BuildConfig:
    if not isinstance(data, dict):
        raise MmloomError(f"{source}: expected a mapping with setup/processor/dataset sections")
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise MmloomError(f"{source}: {problems}") from None


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply `key.sub=value` overrides (values parsed as YAML scalars)."""
    for item in overrides or []:
        if "=" not in item:
            raise MmloomError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
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


def load_build_config(path: str | Path, overrides: list[str] | None = None) -> BuildConfig:
    path = Path(path)
    if not path.is_file():
        raise MmloomError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise MmloomError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise MmloomError(f"{path}: expected a mapping with setup/processor/dataset sections")
    return parse_build_config(apply_overrides(data, overrides), source=str(path))
