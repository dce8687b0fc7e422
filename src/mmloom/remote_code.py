"""mmloom runs no code that comes with a model folder.

A HF folder may name Python files of its own in `auto_map` (config.json, tokenizer_config.json,
preprocessor_config.json, processor_config.json): transformers would import them with
`trust_remote_code=True`, and without that argument it asks on the terminal (a "y" runs them).
Every HF load in mmloom passes `trust_remote_code=False` (tests/test_remote_code.py walks the
code for it), and :func:`refuse_remote_code` refuses, in one line, a folder whose model, tokenizer
or processor exists only as such code. A folder that also names a class transformers ships (many
hub folders keep an `auto_map` from before their architecture was added to transformers) loads
with transformers' own class, running none of the folder's code.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmloom.errors import MmloomError
from mmloom.files import read_json

# (file, the key that names the class transformers would use instead of the folder's code)
_CLASS_KEYS = {
    "config.json": "model_type",
    "tokenizer_config.json": "tokenizer_class",
    "preprocessor_config.json": ("image_processor_type", "feature_extractor_type", "processor_class"),
    "processor_config.json": "processor_class",
}


def _native(file: str, data: dict) -> bool:
    """Whether transformers has its own class for what `file` (holding `data`) describes."""
    import transformers

    if file == "config.json":
        from transformers import CONFIG_MAPPING

        return data.get("model_type") in CONFIG_MAPPING
    keys = _CLASS_KEYS[file]
    for key in (keys,) if isinstance(keys, str) else keys:
        name = data.get(key)
        if isinstance(name, str) and (getattr(transformers, name, None) is not None
                                      or getattr(transformers, f"{name}Fast", None) is not None
                                      or getattr(transformers, name.removesuffix("Fast"), None) is not None):
            return True
    return False


def refuse_remote_code(folder: str | os.PathLike, what: str = "model folder") -> None:
    """Raise MmloomError (one line, naming the file and the code it names) when the HF folder
    `folder` (given as `what`, e.g. ``"--text-model"``) has a model, tokenizer or processor that
    exists only as Python code in the folder (`auto_map` without a class transformers ships).
    Anything that is not such a folder passes (the loader reports it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for name in _CLASS_KEYS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = read_json(path, max_bytes=2**24)
        except MmloomError:
            continue  # the loader says what is wrong with it
        auto_map = data.get("auto_map")
        if not auto_map or _native(name, data):
            continue
        code = sorted({str(v) for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])
                       for v in (v if isinstance(v, list) else [v]) if v})
        raise MmloomError(
            f"{what} {folder}: {name} names code of its own ({', '.join(code[:3]) or auto_map}) and no class "
            "transformers includes; mmloom never runs code from a model folder (trust_remote_code=False): use a "
            "model whose architecture transformers supports"
        )
