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
    read_item_paths,
    read_items,
    slot_layout,
    unfinished_build,
)
from mmloom.errors import MmloomError
from mmloom.processing.image import ImageSpec
from mmloom.processing.tokenizer import load_tokenizer


@dataclass
class Segment:
    """A run of a sample's tokens shown one way: text, supervised text, or image slots."""

    kind: str  # "text" | "supervised" | "image"
    text: str
    start: int = 0
    end: int = 0  # inclusive, for image segments


def read_sample(path: str | Path, index: int) -> tuple[np.ndarray, list[str], int, list[tuple[int, int]]]:
    """(rows [4, MSL], the sample's image paths (first image first; [] for text-only), samples in the
    file, the (first slot, slots) of each image run: every image of a file with image items, else the
    first image's run, masked for a text-only sample in the seed's layout, or none).

    The file's structure is checked (`h5_format.check_h5_file`), and the folder's files against its
    `data_params.json` (`h5_format.check_data_files`). Raises MmloomError naming the file and problem."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise MmloomError(f"no such file: {path}")
    params = read_data_params(path.parent, required=False)
    count = slot_layout(params)[1]
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
            located = read_items(f, ImageSpec.noun, path)
            if located is not None:  # several images per sample: every image's run
                offsets, spans = located
                first, last = int(offsets[index]), int(offsets[index + 1])
                images = read_item_paths(f, ImageSpec.noun, first, last)
                runs = [(int(a), int(b)) for a, b in spans[first:last]]
                if not runs and start >= 0 and count:  # a text-only sample's masked slots
                    runs = [(start, count)]
                return rows, images, n, runs
    except (OSError, KeyError) as exc:
        raise MmloomError(f"{path}: not an mmloom/Cerebras LLaVA .h5 file ({exc})") from None
    return rows, [img] if img else [], n, [(start, count)] if start >= 0 and count else []


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


def segments(rows: np.ndarray, tokenizer, runs: list[tuple[int, int]]) -> tuple[list[Segment], dict]:
    """The sample as text / supervised / image segments; `runs` = (first slot, count) of each image run."""
    ids, loss, inv = rows[0], rows[1], rows[3]
    attended = inv == 0
    length = int(attended.nonzero()[0].max()) + 1 if attended.any() else 0
    if runs:
        length = max(length, *(s + c for s, c in runs))
    starts = dict(runs)
    supervised = np.zeros(len(ids), dtype=bool)
    supervised[1:] = loss[:-1] == 1  # the token at t+1 is the target of position t
    segs: list[Segment] = []
    i = 0
    while i < length:
        if i in starts:
            segs.append(Segment("image", "", i, i + starts[i] - 1))
            i += starts[i]
            continue
        kind = "supervised" if supervised[i] else "text"
        j = i
        while j < length and j not in starts and bool(supervised[j]) == (kind == "supervised"):
            j += 1
        segs.append(Segment(kind, tokenizer.decode(ids[i:j].tolist(), skip_special_tokens=False), i, j - 1))
        i = j
    info = {
        "tokens": length,
        "non_pad": int(attended.sum()),
        "supervised": int(loss.sum()),
        "msl": len(ids),
        "slots": list(runs),
    }
    return segs, info


def inspect_sample(
    path: str | Path, index: int = 0, tokenizer_path: str | None = None, markup: bool | None = None
) -> str:
    """Render sample `index`; `markup=True` uses rich markup, False `[[...]]` brackets."""
    from rich.markup import escape

    path = Path(path)
    rows, images, n, runs = read_sample(path, index)
    tokenizer = tokenizer_for(path, tokenizer_path)
    segs, info = segments(rows, tokenizer, runs)
    has_image = bool(images)
    parts = []
    for seg in segs:
        if seg.kind == "image":
            label = f"<image x{seg.end - seg.start + 1} @ {seg.start}..{seg.end}{'' if has_image else ' masked: text-only'}>"
            parts.append(f"[bold magenta]{escape(label)}[/]" if markup else label)
        elif seg.kind == "supervised":
            parts.append(f"[bold green]{escape(seg.text)}[/]" if markup else f"[[{seg.text}]]")
        else:
            parts.append(escape(seg.text) if markup else seg.text)
    esc = escape if markup else str
    if len(runs) > 1:
        slot_line = "image slots: " + ", ".join(f"{s}..{s + c - 1}" for s, c in runs) + f" ({runs[0][1]} each)"
    else:
        slot_line = f"image slots: {runs[0][0]}..{runs[0][0] + runs[0][1] - 1} ({runs[0][1]})" if runs else \
            "image slots: none"
    header = [
        f"{esc(str(path))} sample {index % n} of {n}",
        (f"images: {esc(', '.join(images))}" if len(images) > 1 else f"image: {esc(images[0])}") if images else
        "image: (none: text-only, slots masked, fed a dummy image)",
        slot_line,
        f"tokens: {info['tokens']} of {info['msl']}  non-pad: {info['non_pad']}  supervised: {info['supervised']}",
        "supervised spans: " + ("[bold green]green[/]" if markup else "[[...]]"),
        "",
    ]
    return "\n".join(header) + "".join(parts)
