"""`mmloom data inspect FILE.h5 [--index N]`: show one HDF5 sample the way a person wants to see it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmloom.data.h5_format import (
    check_data_files,
    check_h5_file,
    decode_img_path,
    read_data_params,
    read_image_starts,
    slot_layout,
    unfinished_build,
)
from mmloom.errors import MmloomError
from mmloom.processing.tokenizer import load_tokenizer


@dataclass
class Segment:
    """A run of a sample's tokens shown one way: text, supervised text, or image slots."""

    kind: str  # "text" | "supervised" | "image"
    text: str
    start: int = 0
    end: int = 0  # inclusive, for image segments


def read_sample(path: str | Path, index: int) -> tuple[np.ndarray, str | None, int, int]:
    """(rows [4, MSL], image path or None, samples in the file, first image slot or -1).

    The file's structure is checked (`h5_format.check_h5_file`), and the folder's files against its
    `data_params.json` (`h5_format.check_data_files`). Raises MmloomError naming the file and problem."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise MmloomError(f"no such file: {path}")
    params = read_data_params(path.parent, required=False)
    try:
        counts = {}
        for sibling in sorted(path.parent.glob("*.h5")):
            with h5py.File(sibling, "r") as f:
                if (unfinished := unfinished_build(path.parent, f, params)) is not None:
                    raise unfinished
                counts[sibling.name] = check_h5_file(f, sibling, params)[0]
        check_data_files(path.parent, params, counts)
        with h5py.File(path, "r") as f:
            n = int(f.attrs["n_examples"])
            if not -n <= index < n:
                raise MmloomError(f"{path}: index {index} out of range (the file holds {n} samples)")
            index %= n
            rows = np.asarray(f["data"][index])
            img = decode_img_path(f["img_path"][index])
            start = int(read_image_starts(f, params, path)[index])
    except (OSError, KeyError) as exc:
        raise MmloomError(f"{path}: not an mmloom/Cerebras LLaVA .h5 file ({exc})") from None
    return rows, img, n, start


def tokenizer_for(path: Path, tokenizer_path: str | None):
    """The tokenizer to decode `path` with: `tokenizer_path`, else the data_params.json's one."""
    if tokenizer_path is None:
        params = read_data_params(path.parent, required=False)
        if not params:
            raise MmloomError(f"no data_params.json next to {path}; pass --tokenizer")
        tokenizer_path = params.get("processor", {}).get("tokenizer_type")
        if not tokenizer_path:
            raise MmloomError(f"{path.parent / 'data_params.json'} names no processor.tokenizer_type; pass --tokenizer")
    return load_tokenizer(tokenizer_path, what="the data's tokenizer (--tokenizer)")


def segments(rows: np.ndarray, tokenizer, slots: tuple[int, int] | None) -> tuple[list[Segment], dict]:
    """The sample as text / supervised / image segments; `slots` = (first slot, count) or None."""
    ids, loss, inv = rows[0], rows[1], rows[3]
    attended = inv == 0
    length = int(attended.nonzero()[0].max()) + 1 if attended.any() else 0
    if slots is not None:
        length = max(length, slots[0] + slots[1])
    supervised = np.zeros(len(ids), dtype=bool)
    supervised[1:] = loss[:-1] == 1  # the token at t+1 is the target of position t
    segs: list[Segment] = []
    i = 0
    while i < length:
        if slots and i == slots[0]:
            s, c = slots
            segs.append(Segment("image", "", s, s + c - 1))
            i = s + c
            continue
        kind = "supervised" if supervised[i] else "text"
        j = i
        while j < length and (not slots or j != slots[0]) and bool(supervised[j]) == (kind == "supervised"):
            j += 1
        segs.append(Segment(kind, tokenizer.decode(ids[i:j].tolist(), skip_special_tokens=False), i, j - 1))
        i = j
    info = {
        "tokens": length,
        "non_pad": int(attended.sum()),
        "supervised": int(loss.sum()),
        "msl": len(ids),
        "slots": slots,
    }
    return segs, info


def inspect_sample(
    path: str | Path, index: int = 0, tokenizer_path: str | None = None, markup: bool | None = None
) -> str:
    """Render sample `index`; `markup=True` uses rich markup, False `[[...]]` brackets."""
    from rich.markup import escape

    path = Path(path)
    rows, img, n, start = read_sample(path, index)
    tokenizer = tokenizer_for(path, tokenizer_path)
    count = slot_layout(read_data_params(path.parent, required=False))[1]
    slots = (start, count) if start >= 0 and count else None
    segs, info = segments(rows, tokenizer, slots)
    has_image = img is not None
    parts = []
    for seg in segs:
        if seg.kind == "image":
            label = f"<image x{seg.end - seg.start + 1} @ {seg.start}..{seg.end}{'' if has_image else ' masked: text-only'}>"
            parts.append(f"[bold magenta]{escape(label)}[/]" if markup else label)
        elif seg.kind == "supervised":
            parts.append(f"[bold green]{escape(seg.text)}[/]" if markup else f"[[{seg.text}]]")
        else:
            parts.append(escape(seg.text) if markup else seg.text)
    slots = info["slots"]
    esc = escape if markup else str
    header = [
        f"{esc(str(path))} sample {index % n} of {n}",
        f"image: {esc(img) if img else '(none: text-only, slots masked, fed a dummy image)'}",
        f"image slots: {slots[0]}..{slots[0] + slots[1] - 1} ({slots[1]})" if slots else "image slots: none",
        f"tokens: {info['tokens']} of {info['msl']}  non-pad: {info['non_pad']}  supervised: {info['supervised']}",
        "supervised spans: " + ("[bold green]green[/]" if markup else "[[...]]"),
        "",
    ]
    return "\n".join(header) + "".join(parts)
