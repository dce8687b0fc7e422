"""`mmloom data build`: LLaVA jsonl records -> the Cerebras HDF5 layout + data_params.json.

Pipeline (`build`): `prepare_build` checks the settings and loads the tokenizer, template and media
specs once (`BuildState`); `open_output` claims the output folder; `run_chunks` has the main process
read the input lines in order and hand chunks of them to worker processes (forked: they share the
state; bounded window, results consumed in submission order); each worker parses, reads its media
items through their specs (`mmloom.processing.media`), templates, tokenizes and lays the sample out
as `[4, MSL]` int32 rows; the main process writes `data-NNNNN.h5` files of `samples_per_file`
samples and adds up the chunks' `BuildCounts`; `data_params` and `print_summary` report them.
Because chunking is fixed and results are consumed in order, the output is byte-identical for any
process count.

A line longer than `setup.max_record_bytes` is skipped (`line_too_long`) before it is parsed or
tokenized. A worker that dies (the OOM killer, `kill -9`) ends the build at once with one line
naming the file and lines it held (the main process watches every worker's process, so a dead one
cannot leave the build waiting).

The output folder has one writer (`mmloom.outputs.FolderLock`) and is claimed like every output
(`mmloom.outputs.check_destination`): new, empty, or with `--overwrite` an earlier build's. A build
removes `data_params.json` before it changes any `.h5` file and writes it last, with every file's
name, sample count and size, so a folder whose build did not finish has no `data_params.json`, and
readers (:func:`mmloom.data.h5_format.check_data_files`) refuse files that are not those it lists.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmloom.data.build_config import BuildConfig, template_spec
from mmloom.data.encode import (
    SKIP_REASONS,
    EncodedSample,
    MediaSlots,
    encode_record,
    media_file,
    parse_record_line,
    record_paths,
    to_h5_rows,
)
from mmloom.data.h5_format import H5_NAME, PARAMS_NAME, encode_img_path, is_build_output, write_h5
from mmloom.data.preference import PREFERENCE_SKIP_REASONS, PreferencePair, encode_pair, parse_preference
from mmloom.data.records_io import SkipRecord, iter_jsonl_lines
from mmloom.errors import MmloomError
from mmloom.files import free_bytes, is_disk_full, mib, write_json
from mmloom.outputs import FolderLock, check_destination
from mmloom.processing.image import ImageSpec
from mmloom.processing.media import MEDIA
from mmloom.processing.media_spec import MediaError, MediaSpec
from mmloom.processing.templates import get_template, template_choice
from mmloom.processing.tokenizer import load_tokenizer, token_id
from mmloom.progress import rate_progress

CHUNK_LINES = 64  # records per work item (fixed: does not depend on the process count)


# ----------------------------------------------------------------------------- inputs


def list_input_files(input_dir: str) -> list[Path]:
    path = Path(input_dir)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MmloomError(f"setup.input_dir not found: {input_dir}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".jsonl")
    if not files:
        raise MmloomError(f"setup.input_dir {input_dir} holds no .jsonl files")
    return files


def special_ids(tokenizer, placeholders: Sequence[str] = ()) -> dict[str, Any]:
    """eos / pad ids, `vocab_size` and the id of each placeholder (`placeholder_ids`); pad falls back to
    unk then eos when the tokenizer has none.

    A placeholder the tokenizer lacks (e.g. `<image>` in the stock Vicuna tokenizer) is added to this
    in-memory tokenizer as a special token, in the order given: it only marks where the slots go and
    never appears in the output (the slots hold pad ids). For a tokenizer that has none, the
    placeholders of `MEDIA` get vocab_size, vocab_size + 1, ... (`mmloom.processing.media.default_token_id`).
    `vocab_size` is the size before that.
    """
    vocab_size = len(tokenizer)
    ids = {placeholder: _placeholder_id(tokenizer, placeholder) for placeholder in placeholders}
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else eos
    if pad is None:
        raise MmloomError("the tokenizer has neither a pad, unk nor eos token")
    return {"eos_id": eos, "pad_id": pad, "vocab_size": vocab_size, "placeholder_ids": ids}


def _placeholder_id(tokenizer, token: str) -> int:
    """The id of `token`, added to the in-memory tokenizer as a special token when it lacks it."""
    tid = token_id(tokenizer, token)
    if tid is not None:
        return tid
    tokenizer.add_tokens([token], special_tokens=True)
    tid = token_id(tokenizer, token)
    if tid is None:
        raise MmloomError(f"cannot make '{token}' a single token of the tokenizer")
    return tid


def build_specs(dataset, tokenizer) -> tuple[ImageSpec, list[MediaSpec], dict[str, Any]]:
    """(images, the other modalities' specs, `special_ids`) of a build's `dataset` section: one spec per
    `MEDIA` modality the build reads (images always: their key and placeholder are the seed's), with
    the placeholder ids of `tokenizer` (added to it where it lacks them)."""
    specs = [spec for cls in MEDIA.values() if (spec := cls.from_build_config(dataset)) is not None]
    ids = special_ids(tokenizer, [spec.placeholder for spec in specs])
    specs = [spec.with_settings(token_id=ids["placeholder_ids"][spec.placeholder]) for spec in specs]
    vision = next(spec for spec in specs if isinstance(spec, ImageSpec))
    return vision, [spec for spec in specs if spec is not vision], ids


def resolve_template(cfg: BuildConfig, tokenizer) -> tuple[BuildConfig, str]:
    """`cfg` with `dataset.system_prompt_style` set (unset: the tokenizer's chat template when it has one,
    else vicuna_v1), so that the workers and data_params.json use and record the one template; and the
    line the summary prints about it."""
    name, why = template_choice(cfg.dataset.system_prompt_style, tokenizer)
    dataset = cfg.dataset.model_copy(update={"system_prompt_style": name})
    return cfg.model_copy(update={"dataset": dataset}), why


def make_template(cfg: BuildConfig, tokenizer=None):
    """The conversation template the build tokenizes with (`template_spec`)."""
    name, options = template_spec(cfg.dataset, tokenizer)
    return get_template(name, **options)


@dataclass
class BuildState:
    """What every chunk of a build needs, made once by `prepare_build` (forked workers share it): the
    config (template resolved), the input files, the tokenizer (placeholders added), the template, the
    eos/pad ids and vocabulary size, the images' spec (the seed's slot layout) and the other
    modalities' specs (runs of slots where their placeholders stand, HDF5 item datasets)."""

    cfg: BuildConfig
    files: list[Path]
    tokenizer: Any
    template: Any
    template_note: str | None
    eos_id: int
    pad_id: int
    vocab_size: int
    vision: ImageSpec
    items: list[MediaSpec]

    @property
    def specs(self) -> list[MediaSpec]:
        """Every modality's spec, images first (`MEDIA` order)."""
        return [self.vision, *self.items]


def prepare_build(cfg: BuildConfig) -> BuildState:
    """Check the settings and load what the chunks need: input files, the tokenizer (once), the
    template (unknown names refused before any work), the media specs and their folders.
    Raises MmloomError naming the bad setting."""
    files = list_input_files(cfg.setup.input_dir)
    tokenizer = load_tokenizer(cfg.processor.tokenizer_type, what="processor.tokenizer_type")
    cfg, template_note = resolve_template(cfg, tokenizer)
    template = make_template(cfg, tokenizer)
    vision, items, ids = build_specs(cfg.dataset, tokenizer)
    msl, num_feature_tokens = cfg.processor.max_sequence_length, cfg.dataset.num_patches
    if num_feature_tokens is not None and num_feature_tokens + 2 > msl:
        raise MmloomError(
            f"dataset.num_patches ({num_feature_tokens}) leaves no room for text in max_sequence_length {msl}"
        )
    for spec in (vision, *items):
        if spec.folder is not None and not spec.folder.is_dir():
            raise MmloomError(f"{spec.folder_setting} not found: {spec.folder}")
    return BuildState(cfg, files, tokenizer, template, template_note, ids["eos_id"], ids["pad_id"],
                      ids["vocab_size"], vision, items)


# ----------------------------------------------------------------------------- workers

_STATE: dict[str, Any] = {}  # "state": the BuildState of this process, "cfg_dict": the config it was made from


@dataclass
class BuildCounts:
    """What a build counted, per chunk (in a worker) and in total (`+=` adds a chunk's counts in).

    `skipped` counts the skipped records by reason and `first_skip` is the first one (file index,
    line, reason, detail: what `--strict` stops at); `kept_per_file` counts kept records per input
    file, `starts` / `later_starts` the kept samples by the first slot of their image (first-turn
    and later-turn images), `stats` the text statistics and each modality's `samples` / `items` /
    `tokens` (keys `<modality>.samples`, ...), and in a preference build the pairs' `prompt_tokens`,
    `chosen_tokens` and `rejected_tokens` (answer tokens)."""

    n_read: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    first_skip: tuple[int, int, str, str] | None = None
    kept_per_file: collections.Counter = field(default_factory=collections.Counter)
    starts: collections.Counter = field(default_factory=collections.Counter)
    later_starts: collections.Counter = field(default_factory=collections.Counter)
    stats: collections.Counter = field(default_factory=collections.Counter)

    def __iadd__(self, other: BuildCounts) -> BuildCounts:
        self.n_read += other.n_read
        if self.first_skip is None:
            self.first_skip = other.first_skip
        for name in ("skipped", "kept_per_file", "starts", "later_starts", "stats"):
            getattr(self, name).update(getattr(other, name))
        return self

    @property
    def kept(self) -> int:
        return sum(self.kept_per_file.values())

    def skip(self, file_idx: int, lineno: int, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if self.first_skip is None:
            self.first_skip = (file_idx, lineno, reason, detail)

    def media_counts(self, modality: str) -> dict[str, int]:
        """`samples` with items of `modality`, its `items` and their feature `tokens`."""
        return {key: self.stats[f"{modality}.{key}"] for key in ("samples", "items", "tokens")}


@dataclass
class ChunkResult:
    """The kept samples of one chunk (rows, `img_path` entries, first image slots, the `(paths,
    spans)` of each sample's images, and per other modality's noun the `(paths, spans)` of each
    sample; in a preference build also each pair's rejected rows and prompt length) and the chunk's
    counts."""

    rows: list[np.ndarray] = field(default_factory=list)
    img_paths: list[bytes] = field(default_factory=list)
    image_starts: list[int] = field(default_factory=list)
    images: list[tuple[list[str], list[tuple[int, int]]]] = field(default_factory=list)
    items: dict[str, list[tuple[list[str], list[tuple[int, int]]]]] = field(default_factory=dict)
    rejected_rows: list[np.ndarray] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)
    counts: BuildCounts = field(default_factory=BuildCounts)


def _media_slots(spec: MediaSpec, paths: list[str]) -> MediaSlots:
    """A record's items of one modality: with a fixed count (checked after the text, which is cheaper),
    or decoded now because their count (their slots in the text) depends on them. Raises SkipRecord."""
    fixed = spec.fixed_token_count
    if fixed is not None or not paths:
        return MediaSlots(spec, paths, [fixed or 0] * len(paths))
    counts = []
    for path in paths:
        try:
            counts += spec.token_counts([spec.load(media_file(spec, path))])
        except MediaError as exc:
            raise SkipRecord(exc.reason, f"{exc.path}: {exc.detail}") from None
    return MediaSlots(spec, paths, counts)


def _encode_line(line: str, state: BuildState) -> EncodedSample | PreferencePair:
    ds = state.cfg.dataset
    record = parse_record_line(line)
    if ds.preference is not None:
        return _encode_pair(record, state)
    media = _record_media(record, state)
    sample = _encode(record, media, state, ds.conversation_key, ds.content_key)
    _check_media(sample, media, state)
    return sample


def _record_media(record: dict, state: BuildState) -> list[MediaSlots]:
    """The record's items of every modality (`MEDIA` order); raises SkipRecord."""
    ds = state.cfg.dataset
    media = []
    for spec in state.specs:
        paths = record_paths(record, spec.record_key)
        if spec is state.vision:  # the seed's layout; several images only with multiple_images: keep
            if paths and spec.num_tokens is None:
                raise SkipRecord("bad_record", f"'{spec.record_key}' in a build without images (dataset.num_patches unset)")
            if len(paths) > 1 and ds.multiple_images == "skip":
                raise SkipRecord("multiple_images", f"{len(paths)} images (dataset.multiple_images: skip)")
        media.append(_media_slots(spec, paths))
    return media


def _encode(record: dict, media: list[MediaSlots], state: BuildState, conversation_key: str,
            content_key: str) -> EncodedSample:
    """`encode_record` with the build's tokenizer, template and settings; raises SkipRecord."""
    cfg = state.cfg
    return encode_record(
        record,
        tokenizer=state.tokenizer,
        template=state.template,
        media=media,
        slot_fill_id=state.pad_id,
        conversation_key=conversation_key,
        content_key=content_key,
        max_length=cfg.processor.max_sequence_length,
        text_only_slots=cfg.dataset.text_only_slots and cfg.dataset.num_patches is not None,
    )


def _check_media(sample: EncodedSample, media: list[MediaSlots], state: BuildState) -> None:
    """The build's media rules on an encoded sample: later-turn images (dataset.image_in_later_turn) and
    each item not decoded yet fully readable (its spec's `check`). Raises SkipRecord."""
    ds = state.cfg.dataset
    if sample.image_turn > 0 and ds.image_in_later_turn == "skip":
        raise SkipRecord(
            "image_in_later_turn", f"the image is in human turn {sample.image_turn + 1}, slots at {sample.image_start}"
        )
    for slots in media:
        if slots.spec.fixed_token_count is not None:  # not decoded yet
            for path in slots.paths:
                try:
                    slots.spec.check(media_file(slots.spec, path))
                except MediaError as exc:
                    raise SkipRecord(exc.reason, f"{exc.path}: {exc.detail}") from None


def _encode_pair(record: dict, state: BuildState) -> PreferencePair:
    """A preference record (`mmloom.data.preference`) encoded as its two sequences, sharing the prompt's
    items (read and checked once); raises SkipRecord."""
    ds = state.cfg.dataset
    fixed = None if ds.preference.format == "auto" else ds.preference.format
    pair = parse_preference(record, fixed, ds.image_token)
    media = _record_media({state.vision.record_key: pair.images}, state)
    encoded = encode_pair(pair, lambda turns: _encode({"conversations": turns}, media, state, "conversations",
                                                      "value"))
    _check_media(encoded.chosen, media, state)
    return encoded


def _process_chunk(chunk: list[tuple[int, int, str | SkipRecord]], state: BuildState | None = None) -> ChunkResult:
    state = state if state is not None else _STATE["state"]
    tokenizer, pad_id, eos_id = state.tokenizer, state.pad_id, state.eos_id
    msl = state.cfg.processor.max_sequence_length
    out = ChunkResult(items={spec.noun: [] for spec in state.items})
    counts = out.counts
    for file_idx, lineno, line in chunk:
        counts.n_read += 1
        try:
            if isinstance(line, SkipRecord):  # not UTF-8
                raise line
            sample = _encode_line(line, state)
            pair = None
            if isinstance(sample, PreferencePair):  # both sides share the prompt; `data` holds the chosen one
                pair, sample = sample, sample.chosen
                rejected_rows = to_h5_rows(pair.rejected, msl, pad_id)
        except SkipRecord as skip:
            counts.skip(file_idx, lineno, skip.reason, skip.detail)
            continue
        rows = to_h5_rows(sample, msl, pad_id)
        if pair is not None:
            out.rejected_rows.append(rejected_rows)
            out.prompt_lengths.append(pair.prompt_length)
            counts.stats["prompt_tokens"] += pair.prompt_length
            counts.stats["chosen_tokens"] += len(pair.chosen.input_ids) - pair.prompt_length
            counts.stats["rejected_tokens"] += len(pair.rejected.input_ids) - pair.prompt_length
        out.rows.append(rows)
        out.img_paths.append(encode_img_path(sample.image))
        out.image_starts.append(sample.image_start)
        out.images.append((sample.images, sample.spans(state.vision.modality)))
        for spec in state.items:
            out.items[spec.noun].append((sample.paths(spec.modality), sample.spans(spec.modality)))
        counts.kept_per_file[file_idx] += 1
        if sample.image_turn > 0:
            counts.later_starts[sample.image_start] += 1
        elif sample.has_image:
            counts.starts[sample.image_start] += 1
        # the statistics Cerebras' verify_saved_hdf5_files computes (utils.collect_stats)
        text = tokenizer.decode(rows[0].tolist(), skip_special_tokens=False)
        st = counts.stats
        st["raw_chars"] += sample.raw_chars
        st["raw_bytes"] += sample.raw_bytes
        st["non_pad_tokens"] += int(((rows[0] != eos_id) & (rows[0] != pad_id)).sum())
        st["attended_tokens"] += int((rows[3] == 0).sum())
        st["loss_valid_tokens"] += int(rows[1].sum())
        st["detokenized_chars"] += len(text)
        st["detokenized_bytes"] += len(text.encode("utf-8"))
        st["text_only"] += int(not any(sample.items.values()))
        st["images"] += len(sample.images)
        st["several_images"] += int(len(sample.images) > 1)
        for spec in state.items:
            spans = sample.spans(spec.modality)
            st[f"{spec.modality}.samples"] += int(bool(spans))
            st[f"{spec.modality}.items"] += len(spans)
            st[f"{spec.modality}.tokens"] += sum(n for _, n in spans)
    return out


# ----------------------------------------------------------------------------- writing


class DiskFullError(MmloomError):
    """The disk filled up during `data build` (raised by the writer; `build` removes the output)."""

    def __init__(self, path: Path, needed: int, free: int, per_sample: float):
        super().__init__(f"cannot write {path}: no space left on the device (this file needs up to {mib(needed)}, "
                         f"{mib(max(free, 0))} free)")
        self.path, self.needed, self.free, self.per_sample = path, needed, free, per_sample


class _Writer:
    """Collects encoded samples and writes them `samples_per_file` at a time (`data-0000k.h5`);
    raises DiskFullError when the disk cannot take the next file. With `pairs` (a preference build),
    each sample's rejected rows and prompt length are written beside it."""

    def __init__(self, out_dir: Path, samples_per_file: int, item_nouns: Sequence[str] = (), pairs: bool = False):
        self.out_dir = out_dir
        self.per_file = samples_per_file
        self.pairs = pairs
        self.rejected: list[np.ndarray] = []
        self.prompt_lengths: list[int] = []
        self.rows: list[np.ndarray] = []
        self.paths: list[bytes] = []
        self.starts: list[int] = []
        self.images: list[tuple[list[str], list[tuple[int, int]]]] = []  # per sample (paths, spans)
        self.items: dict[str, list] = {noun: [] for noun in item_nouns}  # noun -> per sample (paths, spans)
        self.files: list[str] = []
        self.file_info: dict[str, dict[str, int]] = {}  # name -> {"n_examples", "bytes"}

    def add(self, chunk: ChunkResult) -> None:
        self.rows.extend(chunk.rows)
        self.paths.extend(chunk.img_paths)
        self.starts.extend(chunk.image_starts)
        self.images.extend(chunk.images or [([], [])] * len(chunk.rows))
        self.rejected.extend(chunk.rejected_rows)
        self.prompt_lengths.extend(chunk.prompt_lengths)
        for noun, per_sample in self.items.items():
            per_sample.extend(chunk.items.get(noun) or [([], [])] * len(chunk.rows))
        while len(self.rows) >= self.per_file:
            self._flush(self.per_file)

    def _flush(self, n: int) -> None:
        name = H5_NAME.format(len(self.files))
        rows = np.stack(self.rows[:n])
        preference = (np.stack(self.rejected[:n]), self.prompt_lengths[:n]) if self.pairs else None
        # uncompressed: an upper bound
        needed = rows.nbytes * (2 if self.pairs else 1) + sum(map(len, self.paths[:n])) + 2**16
        free = free_bytes(self.out_dir)
        if 0 <= free < needed:
            raise DiskFullError(self.out_dir / name, needed, free, needed / n)
        items = {noun: per_sample[:n] for noun, per_sample in self.items.items()}
        if any(len(paths) > 1 for paths, _ in self.images[:n]):  # mmloom's image items, for this file only
            items = {ImageSpec.noun: self.images[:n], **items}
        try:
            write_h5(self.out_dir / name, rows, self.paths[:n], self.starts[:n], items, preference)
        except OSError as err:
            if is_disk_full(err):
                raise DiskFullError(self.out_dir / name, needed, free_bytes(self.out_dir), needed / n) from None
            raise
        del self.rows[:n], self.paths[:n], self.starts[:n], self.images[:n]
        del self.rejected[:n], self.prompt_lengths[:n]
        for per_sample in self.items.values():
            del per_sample[:n]
        self.files.append(name)
        self.file_info[name] = {"n_examples": n, "bytes": (self.out_dir / name).stat().st_size}

    def remove_output(self) -> None:
        """Delete the files this build wrote (and temporary files of an interrupted write)."""
        for name in self.files:
            (self.out_dir / name).unlink(missing_ok=True)
        for stale in self.out_dir.glob(".data-*.h5.tmp-*"):
            stale.unlink(missing_ok=True)
        self.files.clear()

    def close(self) -> None:
        if self.rows:
            self._flush(len(self.rows))


# ----------------------------------------------------------------------------- driver


def _chunks(files: list[Path], max_bytes: int | None = None):
    buf: list[tuple[int, int, str | SkipRecord]] = []
    for file_idx, path in enumerate(files):
        for lineno, line in iter_jsonl_lines(path, max_bytes):
            buf.append((file_idx, lineno, line))
            if len(buf) == CHUNK_LINES:
                yield buf
                buf = []
    if buf:
        yield buf


def _count_lines(files: list[Path]) -> int:
    """Lines of the input files (for the progress bar and the space estimate), read in blocks so
    that no line is held whole."""
    total = 0
    for path in files:
        last = b"\n"
        with open(path, "rb") as fh:
            while block := fh.read(2**22):
                total += block.count(b"\n")
                last = block[-1:]
        total += last != b"\n"
    return total


class WorkerDied(MmloomError):
    """A build worker process ended without returning its chunk (killed, out of memory, crashed)."""


def _worker_main(conn, cfg_dict: dict, parent_ends: list) -> None:
    """A build worker: chunks in from `conn`, results out, until None or the main process is gone
    (the main process's ends of the pipes, inherited by the fork, are closed first, so that its death
    ends `recv`). Ctrl-C is the main process's to handle (it stops the workers). A forked worker
    has the main process's `BuildState`; a spawned one (macOS) prepares its own from `cfg_dict`."""
    for end in parent_ends:
        end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _STATE.get("cfg_dict") != cfg_dict:
        _STATE.update(cfg_dict=cfg_dict, state=prepare_build(BuildConfig.model_validate(cfg_dict)))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        index, chunk = task
        try:
            result = _process_chunk(chunk)
        except Exception as err:  # noqa: BLE001 - reported by the main process with the chunk it came from
            text = str(err).strip().splitlines()
            result = f"{type(err).__name__}: {text[0][:300] if text else ''}"
        conn.send((index, result))


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}" + (" (the out-of-memory killer, or kill -9)" if -exitcode == signal.SIGKILL else "")
    return f"exited with code {exitcode}"


def _ordered_results(chunks, processes: int, state: BuildState, describe=lambda chunk: "a chunk"):
    """Yield chunk results in input order; at most a few chunks per worker in flight.

    With several processes, each worker gets one chunk at a time over its own pipe and the main
    process waits on the pipes and the processes together: a worker that dies is seen at once and
    raises WorkerDied naming `describe(chunk)` of the chunk it held; an error inside a worker raises
    MmloomError naming its chunk."""
    cfg_dict = state.cfg.model_dump(mode="json")
    _STATE.update(cfg_dict=cfg_dict, state=state)  # in this process; forked workers inherit it
    if processes <= 1:
        for chunk in chunks:
            yield _process_chunk(chunk)
        return
    ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
    workers = []
    for _ in range(processes):
        parent, child = ctx.Pipe()
        ends = [conn for _, conn in workers] + [parent]
        process = ctx.Process(target=_worker_main, args=(child, cfg_dict, ends), daemon=True)
        process.start()
        child.close()
        workers.append((process, parent))
    held: dict[int, tuple[int, Any]] = {}  # worker -> (chunk index, chunk)
    done: dict[int, ChunkResult] = {}
    idle = list(range(processes))[::-1]
    source = enumerate(chunks)
    exhausted, next_out, window = False, 0, processes * 4
    try:
        while True:
            while idle and not exhausted and len(done) + len(held) < window:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                worker = idle.pop()
                try:
                    workers[worker][1].send(item)
                except OSError:  # died while idle
                    workers[worker][0].join(1)
                    raise WorkerDied(f"a build worker (PID {workers[worker][0].pid}) "
                                     f"{_death(workers[worker][0].exitcode)} before {describe(item[1])}") from None
                held[worker] = item
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
            if not held:
                if exhausted:
                    return
                continue
            conns = {workers[w][1]: w for w in held}
            sentinels = {workers[w][0].sentinel: w for w in held}
            ready = multiprocessing.connection.wait([*conns, *sentinels])
            for obj in sorted(ready, key=lambda o: o not in conns):  # results before deaths
                worker = conns.get(obj, sentinels.get(obj))
                if worker not in held:
                    continue
                index, chunk = held[worker]
                if obj in conns:
                    try:
                        got, result = obj.recv()
                    except (EOFError, OSError):
                        result = None
                    if result is not None:
                        if isinstance(result, str):
                            raise MmloomError(f"{describe(chunk)}: the build worker failed: {result}")
                        done[got] = result
                        del held[worker]
                        idle.append(worker)
                        continue
                process = workers[worker][0]
                process.join(5)
                raise WorkerDied(f"a build worker (PID {process.pid}) {_death(process.exitcode)} while it held "
                                 f"{describe(chunk)}")
    finally:
        for _process, conn in workers:
            with contextlib.suppress(OSError):
                conn.send(None)
            conn.close()
        for process, _ in workers:
            process.join(0.5)
            if process.is_alive():
                process.kill()
                process.join()


def _describe_chunk(files: list[Path], chunk) -> str:
    (first_file, first_line, _), (last_file, last_line, _) = chunk[0], chunk[-1]
    if first_file == last_file:
        return f"{files[first_file]} lines {first_line}-{last_line}"
    return f"{files[first_file]} line {first_line} to {files[last_file]} line {last_line}"


def _progress(enabled: bool):
    return rate_progress("[bold]building[/]", "samples", enabled)


@contextlib.contextmanager
def open_output(cfg: BuildConfig, state: BuildState, overwrite: bool = False) -> Iterator[_Writer]:
    """The writer of `setup.output_dir`, locked for this build (one writer per folder) and claimed
    (`check_destination`: new, empty, or with `overwrite` an earlier build's, whose files are removed
    first: `clear_build_output`). What the build wrote is removed when the block raises (an error,
    `--strict`, Ctrl-C)."""
    out_dir = Path(cfg.setup.output_dir)
    hint = "wait for that build to finish, or build into another setup.output_dir"
    with FolderLock(out_dir, what="data folder", hint=hint):
        if check_destination(out_dir, "data build", overwrite=overwrite, recognise=is_build_output):
            clear_build_output(out_dir)
        writer = _Writer(out_dir, cfg.setup.samples_per_file, [spec.noun for spec in state.items],
                         pairs=cfg.dataset.preference is not None)
        try:
            yield writer
        except BaseException:  # nothing of an unfinished build is kept
            writer.remove_output()
            raise


def run_chunks(state: BuildState, writer: _Writer, *, strict: bool = False, show: bool = False) -> BuildCounts:
    """Encode every input line (in chunks, on `setup.processes` workers) and write the kept samples;
    returns the totals. Raises MmloomError at the first bad record with `strict` (file:line: reason),
    for a full disk and for a dead worker (after removing what was written)."""
    cfg, files = state.cfg, state.files
    if cfg.setup.processes > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    total = _count_lines(files)
    counts = BuildCounts()
    try:
        with _progress(show) as bar:
            task = bar.add_task("build", total=total)
            chunks = _chunks(files, cfg.setup.max_record_bytes)
            results = contextlib.closing(_ordered_results(chunks, cfg.setup.processes, state,
                                                          lambda chunk: _describe_chunk(files, chunk)))
            with results as ordered:
                for res in ordered:
                    if strict and res.counts.first_skip is not None:
                        file_idx, lineno, reason, detail = res.counts.first_skip
                        raise MmloomError(
                            f"{files[file_idx]}:{lineno}: {reason}" + (f" ({detail})" if detail else "")
                        )
                    counts += res.counts
                    writer.add(res)
                    bar.advance(task, res.counts.n_read)
        writer.close()
    except DiskFullError as err:
        writer.remove_output()
        raise MmloomError(f"{err}; the whole build needs up to {mib(err.per_sample * total)}; nothing of it was kept "
                          f"in {writer.out_dir}") from None
    except WorkerDied as err:
        writer.remove_output()
        raise MmloomError(f"{err}; the build stopped and nothing of it was kept in {writer.out_dir} (a line that needs "
                          "more memory than the machine has? lower setup.max_record_bytes or setup.processes)") from None
    assert counts.n_read == counts.kept + sum(counts.skipped.values())
    return counts


def data_params(state: BuildState, counts: BuildCounts, writer: _Writer) -> dict:
    """data_params.json: the resolved config, Cerebras' `post-process` / `h5_dataset_stats` /
    `image_patch_info` (with mmloom's per-file info and counts), `modalities` for the modalities
    other than images (their specs' `params`), and `preference` (pairs and token totals) for a
    preference build."""
    cfg, kept, starts, later_starts, stats = state.cfg, counts.kept, counts.starts, counts.later_starts, counts.stats
    start_idx = min(starts, key=lambda k: (-starts[k], k)) if starts else None
    patch_info: dict[str, Any] = {"image_patch_start_idx": start_idx, "num_patches": cfg.dataset.num_patches}
    if len(starts) > 1:
        patch_info["note"] = "first-turn images disagree on the image start index; the most common one is recorded"
        patch_info["start_idx_counts"] = {str(k): v for k, v in sorted(starts.items())}
    patch_info["samples"] = {
        "image_in_first_turn": sum(starts.values()),
        "image_in_later_turn": sum(later_starts.values()),
        "text_only": stats["text_only"],
    }
    if stats["several_images"]:  # keys of data with several images per sample only
        patch_info["samples"]["several_images"] = stats["several_images"]
        patch_info["images"] = stats["images"]
    if later_starts:
        patch_info["image_in_later_turn_start_idx_counts"] = {str(k): v for k, v in sorted(later_starts.items())}
    params = {
        **recorded_params(cfg),
        "post-process": {  # Cerebras' names: *_files count records ("documents"), as its preprocessors do
            "discarded_files": counts.n_read - kept,
            "processed_files": counts.n_read,
            "successful_files": kept,
            "n_examples": kept,
            "raw_chars_count": stats["raw_chars"],
            "raw_bytes_count": stats["raw_bytes"],
            "eos_id": state.eos_id,
            "pad_id": state.pad_id,
            "vocab_size": state.vocab_size,
            "image_token_id": state.vision.token_id,
            "input_files": [str(p) for p in state.files],
            "output_files": writer.files,
            "output_file_info": writer.file_info,  # per file: n_examples, bytes (checked by readers)
            "skipped": {r: counts.skipped[r] for r in sorted(counts.skipped, key=_reason_order)},
        },
        "h5_dataset_stats": {  # as Cerebras' collect_stats computes them over row 0 of `data`
            "num_sequences": kept,
            "num_tokens": kept * cfg.processor.max_sequence_length,
            "non_pad_tokens": stats["non_pad_tokens"],
            "loss_valid_tokens": stats["loss_valid_tokens"],
            "detokenized_bytes": stats["detokenized_bytes"],
            "detokenized_chars": stats["detokenized_chars"],
            "attended_tokens": stats["attended_tokens"],
        },
        "image_patch_info": patch_info,
    }
    modalities = {spec.modality: spec.params(counts.media_counts(spec.modality)) for spec in state.items}
    modalities = {name: recorded for name, recorded in modalities.items() if recorded is not None}
    if modalities:
        params["modalities"] = modalities
    if cfg.dataset.preference is not None:  # preference pairs: `rejected` and `prompt_length` in every file
        params["preference"] = {"pairs": kept, "prompt_tokens": stats["prompt_tokens"],
                                "chosen_tokens": stats["chosen_tokens"], "rejected_tokens": stats["rejected_tokens"]}
    return params


def write_params(writer: _Writer, params: dict) -> None:
    """data_params.json, written last (the build's files are complete); on a full disk, the build's
    files are removed and MmloomError says so."""
    out_dir = writer.out_dir
    try:
        write_json(out_dir / PARAMS_NAME, params)
    except OSError as err:
        if not is_disk_full(err):
            raise
        writer.remove_output()
        raise MmloomError(f"cannot write {out_dir / PARAMS_NAME}: no space left on the device "
                          f"({mib(max(free_bytes(out_dir), 0))} free); nothing of the build was kept") from None


def recorded_params(cfg: BuildConfig) -> dict:
    """The resolved config as recorded in data_params.json (every input parameter, as the seed's),
    folder paths made absolute so that the file means the same from any working directory."""
    params = cfg.model_dump(mode="json")
    if params["dataset"].get("multiple_images") == "keep":  # the default: recorded only when changed, so
        del params["dataset"]["multiple_images"]  # single-image builds record what they recorded before
    for section, key in (("setup", "input_dir"), ("setup", "output_dir"), ("processor", "tokenizer_type"),
                         ("dataset", "image_dir")):
        if params[section].get(key):
            params[section][key] = str(Path(params[section][key]).resolve())
    return params


def build(
    cfg: BuildConfig,
    *,
    strict: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict:
    """Build the HDF5 dataset described by `cfg`; returns the data_params dict (also written).

    `setup.output_dir` is locked for this build and claimed (see the module docstring): with
    `overwrite`, an earlier build's files there are removed first (data_params.json before the
    .h5 files). An unfinished build (an error, `strict`, Ctrl-C) removes what it wrote.
    Raises MmloomError for bad settings, an output folder in use by another build or holding files
    a build did not write (or an earlier build's without `overwrite`), a dead worker, the first bad
    record with `strict`, and when no record is kept (after writing data_params.json with the skip
    reasons).
    """
    state = prepare_build(cfg)
    show = (sys.stdout.isatty() and not quiet) if progress is None else progress
    with open_output(state.cfg, state, overwrite) as writer:
        t0 = time.perf_counter()
        counts = run_chunks(state, writer, strict=strict, show=show)
        elapsed = time.perf_counter() - t0
        params = data_params(state, counts, writer)
        write_params(writer, params)
    if not quiet:
        print_summary(params, elapsed, state.template_note)
    if counts.kept == 0:
        reasons = ", ".join(f"{r}: {c}" for r, c in params["post-process"]["skipped"].items()) or "no input records"
        raise MmloomError(
            f"no record was kept out of {counts.n_read} ({reasons}); no .h5 file was written to {writer.out_dir} "
            "(--strict stops at the first bad record with its file and line)"
        )
    return params


def clear_build_output(out_dir: Path) -> None:
    """Remove an earlier build's files from `out_dir`: `data_params.json` first (the folder stops
    looking complete before any `.h5` file changes), then its `.h5` files and temporary files. Other
    files in the folder (a feature cache, the user's) stay."""
    (out_dir / PARAMS_NAME).unlink(missing_ok=True)
    for path in [*out_dir.glob("data-*.h5"), *out_dir.glob(".data-*.h5.tmp-*")]:
        path.unlink(missing_ok=True)


def _reason_order(reason: str) -> tuple[int, str]:
    reasons = (*SKIP_REASONS, *PREFERENCE_SKIP_REASONS)
    return (reasons.index(reason) if reason in reasons else len(reasons), reason)


def print_summary(params: dict, elapsed: float, template_note: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    pp = params["post-process"]
    info = params["image_patch_info"]
    table = Table(title="mmloom data build", show_header=True)
    table.add_column("records")
    table.add_column("count", justify="right")
    table.add_row("read", f"{pp['processed_files']:,}")
    table.add_row("kept", f"{pp['successful_files']:,}")
    samples = info.get("samples", {})
    table.add_row("  with an image (first turn)", f"{samples.get('image_in_first_turn', 0):,}")
    if samples.get("several_images"):
        table.add_row(f"  with several images ({info['images']:,} images in all)", f"{samples['several_images']:,}")
    if samples.get("image_in_later_turn"):
        where = ", ".join(f"{c:,} at {k}" for k, c in info["image_in_later_turn_start_idx_counts"].items())
        table.add_row(f"  image in a later turn (slots start: {where})", f"{samples['image_in_later_turn']:,}")
    for modality, recorded in (params.get("modalities") or {}).items():
        label, count = MEDIA[modality].summary_row(recorded)
        table.add_row(f"  {label}", f"{count:,}")
    table.add_row("  text-only", f"{samples.get('text_only', 0):,}")
    pairs = params.get("preference")
    if pairs is not None:
        table.add_row(f"  preference pairs ({pairs['chosen_tokens']:,} chosen / {pairs['rejected_tokens']:,} rejected "
                      "answer tokens)", f"{pairs['pairs']:,}")
    for reason, count in pp["skipped"].items():
        table.add_row(f"skipped: {reason}", f"{count:,}")
    console = Console()
    console.print(table)
    rate = pp["processed_files"] / elapsed if elapsed > 0 else 0.0
    start = "" if info["image_patch_start_idx"] is None else f", image_patch_start_idx={info['image_patch_start_idx']}"
    console.print(f"{len(pp['output_files'])} .h5 files{start}, {elapsed:.1f} s ({rate:,.0f} samples/s)")
    if template_note:
        console.print(template_note, markup=False, highlight=False)
