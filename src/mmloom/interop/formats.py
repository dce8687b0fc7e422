"""Checkpoint formats and the conversions between them.

Every format that can be read gives a :class:`~mmloom.interop.common.Bundle` (model, tokenizer,
processors, template); every format that can be written takes one. A conversion is a read and a
write, so every readable format converts to every writable one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmloom.errors import MmloomError
from mmloom.outputs import check_destination


@dataclass(frozen=True)
class Format:
    """One `mmloom convert` format: its name, a one-line description, the reader / writer as
    ``"module:function"`` (None: cannot be read / written), whether SRC is one file rather than a
    folder, and whether a SRC is needed at all (hf-components takes its folders as options)."""

    name: str
    description: str
    reader: str | None = None  # "module:function"
    writer: str | None = None
    src_is_file: bool = False  # SRC is one file (a projector), not a folder
    needs_src: bool = True


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("mmloom", "native composite folder (config.json + safetensors + processor files)",
               "mmloom.interop.common:read_mmloom", "mmloom.interop.common:write_mmloom"),
        Format("hf-components", "separate HF folders: --image-model (CLIP/SigLIP), --text-model (causal LM), "
               "optional --audio-model (Whisper); a fresh projector", "mmloom.interop.hf_components:read_hf_components",
               needs_src=False),
        Format("hf-llava", "transformers LlavaForConditionalGeneration folder (+ LlavaProcessor)",
               "mmloom.interop.hf_llava:read_hf_llava", "mmloom.interop.hf_llava:write_hf_llava"),
        Format("llava", "original LLaVA (LlavaLlamaForCausalLM): DST/image_model + DST/text_model_llava",
               "mmloom.interop.llava_original:read_llava", "mmloom.interop.llava_original:write_llava"),
        Format("gguf", "llama.cpp / Ollama: DST/<name>.gguf (language model) + DST/mmproj-<name>.gguf (vision "
               "tower + projector) + DST/Modelfile", writer="mmloom.interop.llamacpp:write_gguf"),
        Format("llava-projector", "phase-1 mm_projector.bin (model.mm_projector.*) imported into --base MODEL_DIR",
               "mmloom.interop.llava_original:read_llava_projector", src_is_file=True),
    )
}


def _resolve(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def supported_pairs() -> list[tuple[str, str]]:
    """(from, to) pairs; the projector import only goes into an mmloom model."""
    pairs = []
    for src in FORMATS.values():
        for dst in FORMATS.values():
            if src.reader and dst.writer and src.name != dst.name:
                if src.name == "llava-projector" and dst.name != "mmloom":
                    continue
                pairs.append((src.name, dst.name))
    return pairs


def pairs_table() -> str:
    """The text `mmloom convert --list` prints: every format with its description, then the supported
    (--from -> --to) pairs."""
    lines = ["formats:"]
    lines += [f"  {f.name:<16} {f.description}" for f in FORMATS.values()]
    lines.append("conversions (--from -> --to):")
    lines += [f"  {a:<16} -> {b}" for a, b in supported_pairs()]
    return "\n".join(lines)


def read(fmt: str, src: str | Path | None, **options: Any):
    """Read `src` in format `fmt` into a :class:`~mmloom.interop.common.Bundle` (`options` go to the
    reader). Raises MmloomError when the format is unknown or cannot be read, or when SRC is missing
    or not the file / folder the format reads."""
    spec = _format(fmt)
    if spec.reader is None:
        raise MmloomError(f"format {fmt!r} cannot be read; readable: {[f.name for f in FORMATS.values() if f.reader]}")
    if spec.needs_src and src is None:
        raise MmloomError(f"--from {fmt} needs a SRC path")
    if spec.needs_src:
        kind, present = ("file", Path(src).is_file()) if spec.src_is_file else ("folder", Path(src).is_dir())
        if not present:
            what = "not found" if not Path(src).exists() else f"is not a {kind}"
            raise MmloomError(f"--from {fmt} reads a {kind}: {src} {what}")
    return _resolve(spec.reader)(src, **options)


def write(fmt: str, bundle, dst: str | Path, **options: Any) -> None:
    """Write `bundle` to `dst` in format `fmt` (`options` go to the writer). Raises MmloomError when
    the format is unknown or cannot be written."""
    spec = _format(fmt)
    if spec.writer is None:
        raise MmloomError(f"format {fmt!r} cannot be written; writable: {[f.name for f in FORMATS.values() if f.writer]}")
    _resolve(spec.writer)(bundle, dst, **options)


def convert(src_format: str, dst_format: str, src: str | Path | None, dst: str | Path, overwrite: bool = False,
            **options: Any):
    """Convert `src` (in `src_format`) to `dst` (in `dst_format`), written atomically; returns the bundle.

    `dst` is claimed before anything is read (:func:`mmloom.outputs.check_destination`): it must not
    exist, be an empty folder, or (with `overwrite`) hold an earlier `mmloom convert` / `init` output;
    it may not be, hold or lie inside a source (SRC, --base, the component folders). The one
    exception: the projector import updates its --base model folder in place when DST is that folder.
    Raises MmloomError for an unsupported pair, a refused destination, or what the reader or writer
    refuses."""
    if (src_format, dst_format) not in supported_pairs():
        raise MmloomError(
            f"no conversion from {src_format!r} to {dst_format!r}; run `mmloom convert --list` for the supported pairs"
        )
    base = options.get("base")
    in_place = src_format == "llava-projector" and base is not None and Path(base).resolve() == Path(dst).resolve()
    if not in_place:
        sources = [src, base, *(options.get(k) for k in ("image_model", "text_model", "audio_model"))]
        check_destination(dst, "convert", overwrite=overwrite, sources=sources)
    bundle = _without_traceback(f"reading {src or ''} as {src_format!r}", read, src_format, src, **options)
    _without_traceback(f"writing {dst} as {dst_format!r}", write, dst_format, bundle, dst, **options)
    return bundle


# What transformers, safetensors, PEFT and torch raise on files they cannot use (a config of the wrong
# kind, a truncated or foreign weights file, shapes that do not fit): reported as one MmloomError line.
LIBRARY_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, RuntimeError, TypeError, AttributeError,
                                                   IndexError, ImportError, EOFError)


def _without_traceback(what: str, function: Callable, *args: Any, **kwargs: Any):
    """`function(*args, **kwargs)`; a library error becomes MmloomError naming `what` (OSError passes:
    the CLI reports it as one line itself)."""
    try:
        from safetensors import SafetensorError

        errors = (*LIBRARY_ERRORS, SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        errors = LIBRARY_ERRORS
    try:
        return function(*args, **kwargs)
    except MmloomError:
        raise
    except errors as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise MmloomError(f"{what}: {type(err).__name__}: {message[:300]}") from err


def _format(name: str) -> Format:
    if name not in FORMATS:
        raise MmloomError(f"unknown format {name!r}; formats: {', '.join(FORMATS)}")
    return FORMATS[name]
