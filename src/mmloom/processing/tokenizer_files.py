"""Tokenizer folders as the model releases ship them, readable by transformers 4.x and 5.x.

transformers 5 saves a tokenizer as ``tokenizer.json`` + a ``tokenizer_config.json`` in its own form: it
drops the SentencePiece ``tokenizer.model``, the ``legacy`` flag, ``add_bos_token`` / ``add_eos_token`` and
``special_tokens_map.json``, and names fast tokenizers ``TokenizersBackend``. The original LLaVA code
(transformers 4.37.2) opens Llama tokenizers with ``use_fast=False``, i.e. from ``tokenizer.model``; with
``legacy`` missing, 4.x falls back to ``legacy: true`` and tokenizes text after special tokens differently
(multi-turn prompts change).

* :func:`save_tokenizer`: transformers 5's save, completed with ``tokenizer.model`` (when the tokenizer
  is SentencePiece-based), the ``legacy`` / ``add_bos_token`` / ``add_eos_token`` settings and
  ``special_tokens_map.json``, so that the folder can be exported later.
* :func:`save_hf4_tokenizer`: the layout of a stock Llama-2 / Vicuna / LLaVA-1.5 folder
  (``tokenizer.model``, ``tokenizer_config.json`` in the 4.x form with ``added_tokens_decoder``,
  ``special_tokens_map.json``), plus ``tokenizer.json`` when asked or when there is no SentencePiece model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmloom.files import read_json, write_json

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SETTINGS = ("legacy", "add_bos_token", "add_eos_token")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers 5 class names -> the 4.x class AutoTokenizer can build from tokenizer.json
FAST_ONLY_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _sentencepiece_matches(path: Path, tokenizer) -> bool:
    """The SentencePiece model's pieces are the tokenizer's first ids (it belongs to this tokenizer)."""
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (ImportError, OSError, RuntimeError):
        return False
    n = sp.get_piece_size()
    if n > len(tokenizer):
        return False
    probe = list(range(min(n, 2000)))
    return tokenizer.convert_ids_to_tokens(probe) == [sp.id_to_piece(i) for i in probe]


def sentencepiece_file(tokenizer, search: Iterable[str | Path] = ()) -> Path | None:
    """The ``tokenizer.model`` behind `tokenizer`: its ``vocab_file``, else one in its own folder or in
    `search`, accepted only when its pieces are the tokenizer's vocabulary. None for non-SentencePiece
    tokenizers (byte-level BPE, tiktoken)."""
    candidates = []
    vocab = getattr(tokenizer, "vocab_file", None)
    if isinstance(vocab, str) and vocab:
        candidates.append(Path(vocab))
    name = getattr(tokenizer, "name_or_path", None)
    if isinstance(name, str) and name:
        candidates.append(Path(name) / SENTENCEPIECE_FILE)
    candidates += [Path(folder) / SENTENCEPIECE_FILE for folder in search if folder is not None]
    seen = set()
    for path in candidates:
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        if _sentencepiece_matches(path, tokenizer):
            return path
    return None


def fast_backend(tokenizer):
    """The `tokenizers.Tokenizer` behind `tokenizer`, what ``tokenizer.json`` holds. A SentencePiece
    tokenizer (mmloom's `SentencePieceLlamaTokenizer`) has none: it is saved and reloaded through
    transformers' own conversion of ``tokenizer.model`` (added tokens kept), which is what a 4.x
    reader builds from the same folder. None when there is no way to get one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return getattr(AutoTokenizer.from_pretrained(tmp, trust_remote_code=False), "backend_tokenizer", None)


def _backend_json(tokenizer) -> dict[str, Any]:
    if getattr(tokenizer, "backend_tokenizer", None) is None and isinstance(getattr(tokenizer, "legacy", None), bool):
        return {}  # SentencePiece tokenizers state their settings: no conversion needed to read them
    backend = fast_backend(tokenizer)
    try:
        return json.loads(backend.to_str()) if backend is not None else {}
    except (AttributeError, ValueError):
        return {}


def _walk(component: Any):
    """A tokenizers component and its children (Sequence normalizers / pre-tokenizers)."""
    if isinstance(component, dict):
        yield component
        for child in component.get("normalizers", []) + component.get("pretokenizers", []):
            yield from _walk(child)


def legacy_behaviour(tokenizer) -> bool | None:
    """The SentencePiece ``legacy`` flag as the tokenizer behaves: ``True`` when the ``▁`` prefix is added
    to every text segment (also after special tokens), ``False`` when only to the first; None when the
    tokenizer adds no such prefix (not SentencePiece-style). Read from the fast tokenizer's pipeline,
    where transformers 5's attribute may be a default."""
    data = _backend_json(tokenizer)
    for part in _walk(data.get("pre_tokenizer")):
        if part.get("type") == "Metaspace":
            scheme = part.get("prepend_scheme", "always" if part.get("add_prefix_space", True) else "never")
            return {"always": True, "first": False}.get(scheme)
    if any(part.get("type") == "Prepend" for part in _walk(data.get("normalizer"))):
        return True  # transformers 4.x fast Llama: normalizer Prepend("▁") on every segment
    value = getattr(tokenizer, "legacy", None)
    return value if isinstance(value, bool) else None


def tokenizer_settings(tokenizer) -> dict[str, Any]:
    """``legacy`` (:func:`legacy_behaviour`), ``add_bos_token`` and ``add_eos_token`` as the tokenizer
    behaves (BOS / EOS added to a probe text), for the readers that take them from tokenizer_config.json."""
    out: dict[str, Any] = {}
    legacy = legacy_behaviour(tokenizer)
    if legacy is not None:
        out["legacy"] = legacy
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    if plain and len(full) >= len(plain):
        start = full.index(plain[0]) if plain[0] in full else 0
        out["add_bos_token"] = start > 0 and tokenizer.bos_token_id is not None and full[start - 1] == tokenizer.bos_token_id
        after = full[start + len(plain):]
        out["add_eos_token"] = bool(after) and tokenizer.eos_token_id is not None and after[-1] == tokenizer.eos_token_id
    return out


def _added_token_dict(token) -> dict[str, Any]:
    return {"content": str(token), "lstrip": bool(getattr(token, "lstrip", False)),
            "normalized": bool(getattr(token, "normalized", False)), "rstrip": bool(getattr(token, "rstrip", False)),
            "single_word": bool(getattr(token, "single_word", False))}


def special_tokens_map(tokenizer) -> dict[str, Any]:
    """bos/eos/unk/pad (those set) and the additional special tokens, as ``special_tokens_map.json`` holds them."""
    by_content = {str(t): t for t in tokenizer.added_tokens_decoder.values()}
    out: dict[str, Any] = {}
    for key in SPECIAL_KEYS:
        value = getattr(tokenizer, key, None)
        if value is not None:
            out[key] = _added_token_dict(by_content.get(str(value), str(value)))
    extra = additional_special_tokens(tokenizer)
    if extra:
        out["additional_special_tokens"] = extra
    return out


def additional_special_tokens(tokenizer) -> list[str]:
    """The tokenizer's extra special tokens (``additional_special_tokens``, transformers 5's
    ``extra_special_tokens``) without bos/eos/unk/pad, as strings in their order."""
    extra = getattr(tokenizer, "additional_special_tokens", None)
    if extra is None:
        extra = getattr(tokenizer, "extra_special_tokens", None) or []
    if isinstance(extra, dict):
        extra = list(extra.values())
    base = {str(getattr(tokenizer, k, None)) for k in SPECIAL_KEYS}
    return [str(t) for t in extra if str(t) not in base]


def hf4_tokenizer_class(tokenizer) -> str:
    """The ``tokenizer_class`` written for transformers 4.x: the tokenizer's class name (mmloom's SentencePiece
    Llama: ``LlamaTokenizer``), transformers 5's fast-only backend as ``PreTrainedTokenizerFast``."""
    name = getattr(tokenizer, "saved_class_name", None) or type(tokenizer).__name__
    return FAST_ONLY_CLASSES.get(name, name)


def hf4_tokenizer_config(tokenizer, sentencepiece: bool) -> dict[str, Any]:
    """``tokenizer_config.json`` in the transformers 4.x form (4.37 and later; 5.x reads it too)."""
    config: dict[str, Any] = {
        "tokenizer_class": hf4_tokenizer_class(tokenizer),
        "added_tokens_decoder": {
            str(i): {**_added_token_dict(t), "special": bool(getattr(t, "special", True))}
            for i, t in sorted(tokenizer.added_tokens_decoder.items())
        },
        "additional_special_tokens": additional_special_tokens(tokenizer),
        "clean_up_tokenization_spaces": bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
        "model_max_length": int(min(tokenizer.model_max_length, 10**30)),
        "padding_side": tokenizer.padding_side,
        **tokenizer_settings(tokenizer),
    }
    for key in SPECIAL_KEYS:
        value = getattr(tokenizer, key, None)
        config[key] = None if value is None else str(value)
    if sentencepiece:
        config["sp_model_kwargs"] = {}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        config["chat_template"] = template
    return config


def save_tokenizer(tokenizer, directory: str | Path, search: Iterable[str | Path] = ()) -> None:
    """`tokenizer.save_pretrained(directory)` (transformers 5 form), completed with what a later export
    to a transformers 4.x consumer needs: ``tokenizer.model`` (SentencePiece tokenizers, found by
    :func:`sentencepiece_file`), the ``legacy`` / ``add_bos_token`` / ``add_eos_token`` settings and
    ``special_tokens_map.json``."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    spm_path = sentencepiece_file(tokenizer, search)
    if spm_path is not None and spm_path.resolve() != (directory / SENTENCEPIECE_FILE).resolve():
        shutil.copyfile(spm_path, directory / SENTENCEPIECE_FILE)
    path = directory / TOKENIZER_CONFIG
    config = read_json(path) if path.exists() else {}
    config.update(tokenizer_settings(tokenizer))
    write_json(path, config)
    write_json(directory / SPECIAL_TOKENS_MAP, special_tokens_map(tokenizer))


def tokenizers_015_json(tokenizer, backend=None) -> dict[str, Any] | None:
    """The fast tokenizer's ``tokenizer.json`` in the form tokenizers 0.15 (transformers 4.37) parses, or
    None when it holds something that form cannot express.

    Newer tokenizers releases write BPE merges as pairs, add ``ignore_merges`` and Metaspace's ``split``;
    0.15 reads merges as ``"a b"`` strings and needs Metaspace's ``add_prefix_space``. (0.15's Metaspace
    always splits on the ``▁``, so runs of spaces are cut differently from SentencePiece.)
    `backend`: the tokenizer's :func:`fast_backend` when the caller has it already."""
    backend = backend if backend is not None else fast_backend(tokenizer)
    try:
        data = json.loads(backend.to_str()) if backend is not None else {}
    except (AttributeError, ValueError):
        data = {}
    model = data.get("model") or {}
    if not data or model.get("ignore_merges"):
        return None
    merges = model.get("merges")
    if merges and isinstance(merges[0], list):
        if any(" " in a or " " in b for a, b in merges):
            return None
        model["merges"] = [f"{a} {b}" for a, b in merges]
    model.pop("ignore_merges", None)
    for part in _walk(data.get("pre_tokenizer")):
        if part.get("type") == "Metaspace":
            part.pop("split", None)
            part["add_prefix_space"] = part.get("prepend_scheme", "always") != "never"
    return data


def save_hf4_tokenizer(
    tokenizer, directory: str | Path, search: Iterable[str | Path] = (), json_form: str = "current",
    json_always: bool = False,
) -> Path | None:
    """Write the tokenizer as the stock releases ship it, for transformers 4.x (and 5.x) readers:
    ``tokenizer.model`` + ``tokenizer_config.json`` (4.x form) + ``special_tokens_map.json``, and a
    ``tokenizer.json`` when `json_always` or when there is no SentencePiece model, in `json_form`:
    ``"current"`` (tokenizers >= 0.20, transformers >= 4.45) or ``"tokenizers-0.15"`` (transformers 4.37,
    :func:`tokenizers_015_json`; the current form when that one cannot express the tokenizer).
    Returns the SentencePiece model copied (None when the tokenizer has none)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spm_path = sentencepiece_file(tokenizer, search)
    if spm_path is not None:
        shutil.copyfile(spm_path, directory / SENTENCEPIECE_FILE)
    if json_always or spm_path is None:
        backend = fast_backend(tokenizer)  # a conversion for SentencePiece tokenizers: once
        old = tokenizers_015_json(tokenizer, backend) if json_form == "tokenizers-0.15" else None
        if old is not None:
            write_json(directory / "tokenizer.json", old)
        else:
            backend.save(str(directory / "tokenizer.json"))
    write_json(directory / TOKENIZER_CONFIG, hf4_tokenizer_config(tokenizer, spm_path is not None))
    write_json(directory / SPECIAL_TOKENS_MAP, special_tokens_map(tokenizer))
    return spm_path
