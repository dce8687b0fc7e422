"""The HDF5 sample format: Cerebras' LLaVA layout (the seed's) plus mmloom's per-sample datasets.

Each `data-NNNNN.h5` file written by `mmloom data build` holds

- attribute `n_examples`;
- `data` int32 `[n, 4, MSL]` (gzip): input ids, loss mask, labels (ids shifted left), inverted
  attention mask (1 = padding) — Cerebras ModelZoo's `LlavaPhaseOne/TwoPreprocessor` layout;
- `img_path` bytes `[n, 1]`: the image path relative to the image folder, `b"None"` for a
  text-only sample (what every Cerebras release writes and its `MultiModalHDF5Dataset` tests);
- mmloom's extension, ignored by Cerebras' reader (it reads `data` and `img_path` by name):
  `image_start_idx` int32 `[n]`, the first image slot of each sample (-1 = no slots). Slots are
  located from these positions, never from token values (a pad id may occur in text: pad = eos,
  pad = unk with a literal `<unk>`).

Files without `image_start_idx` (Cerebras' own) put every sample's slots at the dataset's one
`image_patch_info.image_patch_start_idx` of `data_params.json`, as Cerebras' model does.
`data_params.json` sits next to the files (see `mmloom.data.build`).

`data_params.json` lists the files of the build (`post-process.output_files`) with each one's sample
count and size (`post-process.output_file_info`) and the total (`post-process.n_examples`);
:func:`check_data_files` refuses a folder whose files differ from it (a build that did not finish,
a file added, removed or replaced), and :func:`check_h5_file` the structure of each file (datasets,
shapes, dtypes), once, when the data is opened.

Media items beyond the seed's one image (mmloom's extension, written only for the modalities a
build reads besides images: `dataset.audio`, `dataset.video`; image-only files are exactly as above).
A sample may hold any number of items of such a modality, each a run of slots in `data` (row 0: the
pad id, row 3: attended, no loss) whose length is the item's feature-token count. Per file and
modality (its noun: `audio`, `video`), with m the number of items of all its samples, in sample order
then placeholder order (:func:`write_items`, :func:`read_items`):

- `<noun>_path` bytes `[m]` (`audio_path`): each item's path relative to its folder;
- `<noun>_span` int32 `[m, 2]` (`audio_span`): each item's (first slot, number of slots) in its row;
- `<noun>_offset` int64 `[n + 1]` (`audio_offset`): sample i's items are `offset[i]:offset[i + 1]`.

`data_params.json` records how they were read and counted under `modalities.<modality>` (audio: the
extractor and count rule; video: the frame sampling (`num_frames`, or `fps` with `max_frames`), the
per-frame pooling and the count rule `{"type": "video_frames", "grid", "frame_tokens", "newline"}`:
a clip of F sampled frames spans F * frame_tokens slots, + 1 or + F for the learned newline).
Cerebras' reader ignores these datasets (its model would see the slots as pad tokens); mmloom's
trainer writes the placeholder id (`<audio>`, `<video>`) into every span and feeds the items'
features there.

Several images per sample (`dataset.multiple_images: keep`, the default): a file in which some
sample holds two or more images adds the same three datasets for images, covering every image of
every sample of that file (single-image and text-only samples included): `image_path` bytes `[m]`,
`image_span` int32 `[m, 2]` (each span is `num_patches` slots long), `image_offset` int64
`[n + 1]`. `img_path` and `image_start_idx` still name the first image of each sample, so a file
whose samples hold at most one image is byte for byte what it was before (no image items), and
readers without this extension (Cerebras' `MultiModalHDF5Dataset` reads `data` and `img_path` by
name) open every file: Cerebras' model sees a several-image sample as its first image, the other
images' slots as pad tokens. For Cerebras, build with `dataset.multiple_images: skip`. mmloom's
reader takes a file's images from its image items when it has them, else from `img_path` and
`image_start_idx`. `data_params.json` then records `image_patch_info.samples.several_images` (the
samples with two or more images) and `image_patch_info.images` (all images); both keys are
written only when some sample holds several images.

Preference pairs (mmloom's extension, written only by builds with `dataset.preference`; see
`mmloom.data.preference`). Each sample is a pair sharing one prompt (its images, their slots):

- `data` holds prompt + chosen answer, exactly as an instruction-tuning sample (loss on the final
  answer only), so `img_path`, `image_start_idx` and the item datasets (images' too) describe both sides;
- `rejected` int32 `[n, 4, MSL]` (gzip, the layout of `data`): prompt + rejected answer;
- `prompt_length` int32 `[n]`: the tokens both rows share (the prompt, image slots included); the
  answers start there.

`data_params.json` records the pair counts and token totals under `preference`. Cerebras' reader
reads `data` only: it would train on the chosen answers as instruction data.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from mmloom.errors import MmloomError
from mmloom.files import atomic_file, read_json

H5_NAME = "data-{:05d}.h5"
PARAMS_NAME = "data_params.json"
IMAGE_START = "image_start_idx"
ITEM_PATH, ITEM_SPAN, ITEM_OFFSET = "{noun}_path", "{noun}_span", "{noun}_offset"  # e.g. audio_path
REJECTED, PROMPT_LENGTH = "rejected", "prompt_length"
NO_IMAGE = b"None"
GZIP_LEVEL = 4


class LazyH5Files:
    """Read-only h5py handles of `paths`, opened on first use in each process (so a dataset that
    holds them can be pickled into DataLoader workers: handles are never pickled)."""

    def __init__(self, paths):
        self.paths = list(paths)
        self._handles: list | None = None
        self._pid: int | None = None

    @property
    def opened(self) -> bool:
        """Whether this process holds open handles."""
        return self._handles is not None

    def __getitem__(self, i: int):
        import h5py

        if self._handles is None or self._pid != os.getpid():
            self._handles = [h5py.File(p, "r") for p in self.paths]
            self._pid = os.getpid()
        return self._handles[i]

    def __getstate__(self):
        return {"paths": self.paths, "_handles": None, "_pid": None}

    def close(self) -> None:
        """Close the handles (they reopen on the next access)."""
        for h in self._handles or []:
            with contextlib.suppress(Exception):
                h.close()
        self._handles = None


def encode_img_path(path: str | None) -> bytes:
    """`img_path` bytes of a sample: its relative image path, `b"None"` for text-only."""
    return NO_IMAGE if path is None else path.encode("utf-8")


def decode_img_path(value) -> str | None:
    """The relative image path of an `img_path` entry, None for text-only (`b"None"`, and the
    `b""` older mmloom releases wrote)."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    value = "" if value is None else str(value)
    return None if value in ("", "None") else value


def write_h5(path: Path, rows: np.ndarray, img_paths: list[bytes], image_starts: list[int],
             items: dict[str, list[tuple[list[str], list[tuple[int, int]]]]] | None = None,
             preference: tuple[np.ndarray, list[int]] | None = None) -> None:
    """Write one file atomically (temp name + os.replace); no timestamps, fixed gzip level, so the
    bytes depend on the samples only. `items` maps a modality's noun (`audio`) to one `(paths,
    spans)` per sample and adds its item datasets of the module docstring (`write_items`).
    `preference` (`(rejected rows [n, 4, MSL], prompt lengths)`) adds the preference datasets."""
    import h5py

    n, _, msl = rows.shape
    width = max([1, *(len(p) for p in img_paths)])
    with atomic_file(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["n_examples"] = np.int64(n)
        f.create_dataset(
            "data", data=rows, dtype="i4", chunks=(1, 4, msl), compression="gzip",
            compression_opts=GZIP_LEVEL, track_times=False,
        )
        f.create_dataset("img_path", data=np.array(img_paths, dtype=f"S{width}").reshape(n, 1), track_times=False)
        f.create_dataset(IMAGE_START, data=np.asarray(image_starts, dtype=np.int32), track_times=False)
        for noun, per_sample in (items or {}).items():
            write_items(f, noun, per_sample)
        if preference is not None:
            rejected, prompt_lengths = preference
            f.create_dataset(REJECTED, data=rejected, dtype="i4", chunks=(1, 4, msl), compression="gzip",
                             compression_opts=GZIP_LEVEL, track_times=False)
            f.create_dataset(PROMPT_LENGTH, data=np.asarray(prompt_lengths, dtype=np.int32), track_times=False)


def read_prompt_lengths(h5file, path: str | Path = "") -> np.ndarray:
    """`prompt_length` [n] (int64) of an open preference file, after checking `rejected` against `data`.
    Raises MmloomError naming the file when they disagree."""
    n = int(h5file.attrs["n_examples"])
    data_shape = tuple(h5file["data"].shape)
    if REJECTED not in h5file or PROMPT_LENGTH not in h5file:
        raise MmloomError(f"{path}: a preference file needs '{REJECTED}' and '{PROMPT_LENGTH}'")
    lengths = np.asarray(h5file[PROMPT_LENGTH][:], dtype=np.int64)
    if tuple(h5file[REJECTED].shape) != data_shape or lengths.shape != (n,) \
            or bool(((lengths < 1) | (lengths >= data_shape[2])).any()):
        raise MmloomError(f"{path}: the preference datasets disagree with 'data' ({REJECTED} "
                          f"{tuple(h5file[REJECTED].shape)}, {PROMPT_LENGTH} {lengths.shape}, data {data_shape})")
    return lengths


def write_items(f, noun: str, per_sample: list[tuple[list[str], list[tuple[int, int]]]]) -> None:
    """The `<noun>_path` / `<noun>_span` / `<noun>_offset` datasets of an open file (one `(paths,
    spans)` entry per sample)."""
    paths = [p.encode("utf-8") for items, _ in per_sample for p in items]
    spans = np.asarray([span for _, sample_spans in per_sample for span in sample_spans],
                       dtype=np.int32).reshape(-1, 2)
    offsets = np.cumsum([0, *(len(items) for items, _ in per_sample)]).astype(np.int64)
    width = max([1, *(len(p) for p in paths)])
    f.create_dataset(ITEM_PATH.format(noun=noun), data=np.array(paths, dtype=f"S{width}").reshape(-1),
                     track_times=False)
    f.create_dataset(ITEM_SPAN.format(noun=noun), data=spans, track_times=False)
    f.create_dataset(ITEM_OFFSET.format(noun=noun), data=offsets, track_times=False)


def read_items(h5file, noun: str, path: str | Path = "") -> tuple[np.ndarray, np.ndarray] | None:
    """(`<noun>_offset` [n + 1], `<noun>_span` [m, 2]) of an open data file, None when it has no items
    of that noun.

    Raises MmloomError when the datasets disagree with each other or with `n_examples`."""
    names = [name.format(noun=noun) for name in (ITEM_PATH, ITEM_SPAN, ITEM_OFFSET)]
    if names[2] not in h5file:
        return None
    n = int(h5file.attrs["n_examples"])
    offsets = np.asarray(h5file[names[2]][:], dtype=np.int64)
    spans = np.asarray(h5file[names[1]][:], dtype=np.int64).reshape(-1, 2)
    m = int(h5file[names[0]].shape[0])
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != m or spans.shape[0] != m \
            or bool((np.diff(offsets) < 0).any()):
        raise MmloomError(
            f"{path}: the {noun} datasets disagree ({names[2]} {offsets.shape}, {names[1]} {spans.shape}, "
            f"{names[0]} ({m},), {n} samples)"
        )
    return offsets, spans


def read_item_paths(h5file, noun: str, first: int, last: int) -> list[str]:
    """The relative paths of items `first:last` of `<noun>_path` in an open data file."""
    if last <= first:
        return []
    return [p.decode("utf-8") if isinstance(p, bytes) else str(p)
            for p in h5file[ITEM_PATH.format(noun=noun)][first:last]]


def is_build_output(folder: str | Path) -> bool:
    """Whether `folder` is the output of a `mmloom data build`: it holds the build's `data_params.json`
    (with `setup` and `post-process`), or only `data-NNNNN.h5` files and their temporary files (a
    build that did not finish), beside hidden files and a `feature_cache` folder."""
    folder = Path(folder)
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    partial = [p.name for p in folder.glob(".data-*.h5.tmp-*")]
    params = folder / PARAMS_NAME
    if params.is_file():
        try:
            data = read_json(params, max_bytes=2**26)
        except MmloomError:
            return False
        return "setup" in data and "post-process" in data
    return bool(names or partial) and all(n.startswith("data-") and n.endswith(".h5") or n == "feature_cache"
                                          for n in names)


def unfinished_build(data_dir: str | Path, h5file, params: dict) -> MmloomError | None:
    """The error for an mmloom-written data file (it has `image_start_idx`) with no data_params.json
    beside it: the build that wrote it did not finish. None otherwise (Cerebras' files need none)."""
    if params or IMAGE_START not in h5file:
        return None
    return MmloomError(f"{Path(data_dir) / PARAMS_NAME} not found beside files `mmloom data build` wrote: the build "
                       "did not finish; run it again with --overwrite")


def check_data_files(data_dir: str | Path, params: dict, counts: dict[str, int]) -> None:
    """Refuse a data folder whose `.h5` files are not the ones its `data_params.json` (`params`)
    lists: other names, other sample counts (`counts`: {file name: n_examples} as read from the
    files), other sizes, another total. Recorded fields that are absent (Cerebras' data_params.json,
    older mmloom builds) are not checked.

    Raises MmloomError naming the folder, the first difference and what to do."""
    post = params.get("post-process") or {}
    listed, info = post.get("output_files"), post.get("output_file_info")
    if not isinstance(listed, list):
        return
    path = Path(data_dir) / PARAMS_NAME
    fix = "rebuild the data with `mmloom data build --overwrite`"
    names = sorted(counts)
    if sorted(map(str, listed)) != names:
        missing = sorted(set(map(str, listed)) - set(names))
        extra = sorted(set(names) - set(map(str, listed)))
        what = "; ".join(part for part in (f"missing {', '.join(missing[:3])}" if missing else "",
                                           f"not listed: {', '.join(extra[:3])}" if extra else "") if part)
        raise MmloomError(f"{path} does not describe the .h5 files of {data_dir} ({what}): a build that did not "
                          f"finish, or files changed since; {fix}")
    if isinstance(info, dict):
        for name in names:
            entry = info.get(name) if isinstance(info.get(name), dict) else {}
            size = (Path(data_dir) / name).stat().st_size
            if entry.get("n_examples") not in (None, counts[name]) or entry.get("bytes") not in (None, size):
                raise MmloomError(f"{Path(data_dir) / name} is not the file {path} describes ({counts[name]} samples, "
                                  f"{size} bytes; recorded: {entry.get('n_examples')} samples, {entry.get('bytes')} "
                                  f"bytes); {fix}")
    total = post.get("n_examples")
    if total is not None and total != sum(counts.values()):
        raise MmloomError(f"{path} records {total} samples (post-process.n_examples) but the .h5 files of {data_dir} "
                          f"hold {sum(counts.values())}; {fix}")


def check_h5_file(h5file, path: str | Path, params: dict | None = None) -> tuple[int, int]:
    """(samples, max sequence length) of an open data file, after checking its structure: the
    `n_examples` attribute, `data` an integer `[n, 4, MSL]` dataset, `img_path` `[n, 1]` (or `[n]`)
    bytes, `image_start_idx` `[n]` integers within the sequence. Raises MmloomError naming the file
    and the field."""
    def bad(field: str, problem: str) -> MmloomError:
        return MmloomError(f"{path}: {field} {problem}; not an mmloom/Cerebras LLaVA .h5 file, or a damaged one")

    if "n_examples" not in h5file.attrs:
        raise bad("attribute n_examples", "is missing")
    try:
        n = int(np.asarray(h5file.attrs["n_examples"]).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        raise bad("attribute n_examples", "is not a number") from None
    for name in ("data", "img_path"):
        if name not in h5file or not hasattr(h5file[name], "shape"):
            raise bad(f"dataset '{name}'", "is missing")
    data, img = h5file["data"], h5file["img_path"]
    if data.dtype.kind not in "iu":
        raise bad("dataset 'data'", f"has dtype {data.dtype}, expected integers")
    if data.ndim != 3 or data.shape[0] != n or data.shape[1] != 4 or data.shape[2] < 2:
        raise bad("dataset 'data'", f"has shape {tuple(data.shape)}, expected ({n}, 4, MSL) for n_examples {n}")
    if img.shape not in ((n, 1), (n,)) or img.dtype.kind not in "SOU":
        raise bad("dataset 'img_path'", f"has shape {tuple(img.shape)} and dtype {img.dtype}, expected ({n}, 1) bytes")
    if IMAGE_START in h5file:
        starts = h5file[IMAGE_START]
        if starts.shape != (n,) or starts.dtype.kind not in "iu":
            raise bad(f"dataset '{IMAGE_START}'", f"has shape {tuple(starts.shape)} and dtype {starts.dtype}, "
                      f"expected ({n},) integers")
        values = np.asarray(starts[:], dtype=np.int64)
        slots = slot_layout(params or {})[1] or 0
        if n and (values.min() < -1 or values.max() + slots > data.shape[2]):
            raise bad(f"dataset '{IMAGE_START}'", f"holds {int(values.min())}..{int(values.max())}: image slots "
                      f"outside the sequence of {data.shape[2]}")
    return n, int(data.shape[2])


def read_data_params(data_dir: str | Path, required: bool = True) -> dict:
    """`data_params.json` of a data folder. Missing: `{}` unless `required`; unreadable or not a
    JSON object: MmloomError naming the file (a corrupt file must not silently disable checks)."""
    path = Path(data_dir) / PARAMS_NAME
    if not path.is_file() and not required:
        return {}
    return read_json(path, hint="a `mmloom data build` that did not finish, or not a build's folder: build the data "
                     "with `mmloom data build` (--overwrite over an unfinished build)")


def slot_layout(params: dict) -> tuple[int | None, int | None]:
    """(dataset image start index, slots per image) recorded in `data_params.json`."""
    info = params.get("image_patch_info") or {}
    start = info.get("image_patch_start_idx")
    count = info.get("num_patches", (params.get("dataset") or {}).get("num_patches"))
    return (None if start is None else int(start)), (None if count is None else int(count))


def read_image_starts(h5file, params: dict, path: str | Path = "") -> np.ndarray:
    """Per-sample first image slot (int64, -1 = none) of an open data file: the file's
    `image_start_idx` dataset, else (Cerebras files) the dataset's start index for every sample."""
    n = int(h5file.attrs["n_examples"])
    if IMAGE_START in h5file:
        starts = np.asarray(h5file[IMAGE_START][:], dtype=np.int64)
        if starts.shape != (n,):
            raise MmloomError(f"{path}: '{IMAGE_START}' has shape {starts.shape}, expected ({n},)")
        return starts
    start, _ = slot_layout(params)
    if start is None:
        raise MmloomError(
            f"{path} has no per-sample '{IMAGE_START}' and data_params.json names no "
            "image_patch_info.image_patch_start_idx: cannot tell where the image slots are"
        )
    return np.full(n, start, dtype=np.int64)


def data_fingerprint(data_dir: str | Path) -> str:
    """A fingerprint of a built data folder's sample files (`data-*.h5`: names, sizes and sampled
    contents, `mmloom.files.files_fingerprint`): a rebuild with other records changes it."""
    from mmloom.files import files_fingerprint

    return files_fingerprint(sorted(Path(data_dir).glob("data-*.h5")))
