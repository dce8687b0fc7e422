"""What a resumed run depends on besides its config: the data, the tokenizer and the base model (`start_model`).

A checkpoint records them (`trainer_state.json` key `depends_on`): the training data's sample count and
a fingerprint of its built files, a fingerprint of the tokenizer files the data was built with, and one
of the folders the run's model was built from (pretrained parts, `model.init_from`,
`runconfig.checkpoint_path`). Resuming with any of them changed is refused in one line (a data folder
rebuilt with other records would silently draw another sample order), unless
`runconfig.resume_allow_changed` names it: then the change is reported and the run goes on.
Fingerprints (`mmloom.files.files_fingerprint`) read each file's name, size and sampled blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmloom.data.h5_format import data_fingerprint, read_data_params
from mmloom.errors import MmloomError
from mmloom.files import files_fingerprint

DEPENDENCIES = ("data", "tokenizer", "start_model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt")
MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "*.bin", "*.index.json")


def _folder_files(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def base_folders(cfg, base_folder: Path | None) -> list[Path]:
    """The folders a run's base model is built from (`model_loading`): `base_folder`
    (`runconfig.checkpoint_path`), `model.init_from`, and the pretrained folders of `image_model`,
    `text_model` and `model.encoders` (inline configs without a folder are covered by the config itself)."""
    m = cfg.model
    specs = [m.image_model, m.text_model, *(settings.model for settings in m.encoders.values())]
    folders = [base_folder, m.init_from]
    folders += [spec if isinstance(spec, str) else spec.get("pretrained") for spec in specs
                if isinstance(spec, (str, dict))]
    return [Path(f) for f in folders if f]


def run_dependencies(cfg, samples: int, base_folder: Path | None) -> dict[str, Any]:
    """What a checkpoint of this run records under `depends_on` (see the module docstring)."""
    data_dir = Path(cfg.train_input.data_dir)
    tokenizer = (read_data_params(data_dir, required=False).get("processor") or {}).get("tokenizer_type")
    tokenizer_dir = Path(tokenizer) if tokenizer else None
    model_files = [p for folder in base_folders(cfg, base_folder) if folder.is_dir()
                   for p in _folder_files(folder, MODEL_FILE_PATTERNS)]
    return {
        "data": {"samples": int(samples), "fingerprint": data_fingerprint(data_dir)},
        "tokenizer": (files_fingerprint(_folder_files(tokenizer_dir, TOKENIZER_FILES))
                      if tokenizer_dir is not None and tokenizer_dir.is_dir() else None),
        "start_model": files_fingerprint(model_files) if model_files else None,
    }


def dependency_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, str]:
    """{dependency: what changed} between a checkpoint's `depends_on` and this run's (checkpoints that
    recorded none, and dependencies unknown on either side, are not compared)."""
    if not isinstance(saved, dict):
        return {}
    changes = {}
    old, new = saved.get("data") or {}, now.get("data") or {}
    if old and new:
        if old.get("samples") != new.get("samples"):
            changes["data"] = f"the training data has {new.get('samples')} samples, the checkpoint's run {old.get('samples')}"
        elif old.get("fingerprint") != new.get("fingerprint"):
            changes["data"] = f"the training data's files differ from those the checkpoint's run read (same {new.get('samples')} samples count; rebuilt?)"
    for key, what in (("tokenizer", "the data's tokenizer files"), ("start_model", "the starting model's files")):
        if saved.get(key) and now.get(key) and saved[key] != now[key]:
            changes[key] = f"{what} differ from those of the checkpoint's run"
    return changes


def check_resume_dependencies(folder: Path, saved: dict[str, Any] | None, now: dict[str, Any],
                              allowed: list[str]) -> list[str]:
    """Refuse (MmloomError, one line) to resume `folder` when a dependency changed that `allowed`
    (`runconfig.resume_allow_changed`) does not name; returns notes on the allowed changes."""
    changes = dependency_changes(saved, now)
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        keys = ", ".join(refused)
        raise MmloomError(
            f"cannot resume {folder}: {'; '.join(refused.values())}: the run would go on with other inputs than "
            f"it started with; use a new --model-dir (runconfig.checkpoint_path={folder} starts a new run from its "
            f"weights), or set runconfig.resume_allow_changed=[{keys}] to resume anyway")
    return [f"resuming although {text} (runconfig.resume_allow_changed)" for k, text in changes.items() if k in allowed]
