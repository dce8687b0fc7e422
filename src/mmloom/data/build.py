"""`mmloom data build`: LLaVA jsonl records -> the Cerebras HDF5 layout + data_params.json.

Pipeline: the main process reads the input lines in order and hands chunks of them to
worker processes (bounded window, results consumed in submission order); each worker parses,
checks the image, templates, tokenizes and lays the sample out as `[4, MSL]` int32 rows; the
main process writes `data-NNNNN.h5` files of `samples_per_file` samples. Because chunking is
fixed and results are consumed in order, the output is byte-identical for any process count.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmloom.data.build_config import BuildConfig, template_spec
from mmloom.data.encode import (
    SKIP_REASONS,
    audio_file,
    encode_record,
    image_file,
    parse_record_line,
    record_paths,
    to_h5_rows,
)
from mmloom.data.h5_format import H5_NAME, PARAMS_NAME, encode_img_path, is_build_output, write_h5
from mmloom.data.records_io import SkipRecord, iter_jsonl_lines
from mmloom.errors import MmloomError
from mmloom.files import free_bytes, is_disk_full, mib, write_json
from mmloom.model.feature_count import counts_from_inputs
from mmloom.outputs import FolderLock, check_destination
from mmloom.processing.audio import (
    extract_features,
    feature_extractor_from_spec,
    load_audio,
    max_seconds_of,
)
from mmloom.processing.image import load_image
from mmloom.processing.media_spec import MediaError
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


def special_ids(tokenizer, image_token: str, audio_token: str | None = None) -> dict[str, int]:
    """eos / pad / image (and audio) ids; pad falls back to unk then eos when the tokenizer has none.

    When the tokenizer lacks `image_token` (e.g. the stock Vicuna tokenizer) it is added to this
    in-memory tokenizer as a special token: it only marks where the slots go and never appears in
    the output (the slots hold pad ids). `audio_token` likewise, after it (ids vocab_size and
    vocab_size + 1 for a tokenizer that has neither). `vocab_size` is the size before that.
    """
    vocab_size = len(tokenizer)
    image_id, added = _placeholder_id(tokenizer, image_token)
    audio_id = _placeholder_id(tokenizer, audio_token)[0] if audio_token else None
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else eos
    if pad is None:
        raise MmloomError("the tokenizer has neither a pad, unk nor eos token")
    ids = {
        "eos_id": eos,
        "pad_id": pad,
        "image_token_id": image_id,
        "vocab_size": vocab_size,
        "image_token_added": added,
    }
    if audio_token:
        ids["audio_token_id"] = audio_id
    return ids


def _placeholder_id(tokenizer, token: str) -> tuple[int, bool]:
    """(id of `token`, whether it had to be added to the in-memory tokenizer as a special token)."""
    tid = token_id(tokenizer, token)
    if tid is not None:
        return tid, False
    tokenizer.add_tokens([token], special_tokens=True)
    tid = token_id(tokenizer, token)
    if tid is None:
        raise MmloomError(f"cannot make '{token}' a single token of the tokenizer")
    return tid, True


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


# ----------------------------------------------------------------------------- workers

_STATE: dict[str, Any] = {}


def _init_worker(cfg_dict: dict) -> None:
    """Load tokenizer + template once per process (forked workers inherit the parent's)."""
    if _STATE.get("cfg_dict") == cfg_dict:
        return
    cfg = BuildConfig.model_validate(cfg_dict)
    tokenizer = load_tokenizer(cfg.processor.tokenizer_type, what="processor.tokenizer_type")
    _STATE.clear()
    audio = cfg.dataset.audio
    ids = special_ids(tokenizer, cfg.dataset.image_token, audio.audio_token if audio else None)
    extractor = feature_extractor_from_spec(audio.feature_extractor) if audio else None
    _STATE.update(
        cfg_dict=cfg_dict, cfg=cfg, tokenizer=tokenizer, template=make_template(cfg, tokenizer),
        extractor=extractor, **ids
    )


def check_image(path: Path, max_pixels: int | None = None) -> None:
    """Raise SkipRecord('missing_image' | 'image_too_large' | 'bad_image') unless PIL can fully
    decode the file within the pixel budget `max_pixels` (checked from the header first)."""
    if not path.is_file():
        raise SkipRecord("missing_image", str(path))
    try:
        load_image(path, convert=None, max_pixels=max_pixels).close()  # full decode: catches truncated files too
    except MediaError as exc:
        raise SkipRecord(exc.reason, str(exc)) from None


def audio_limit(audio_cfg, extractor) -> float | None:
    """The longest clip a build keeps: `max_seconds`, never more than the extractor's window."""
    window = max_seconds_of(extractor)
    given = audio_cfg.max_seconds
    return window if given is None else given if window is None else min(given, window)


def count_audio_tokens(path: Path, audio_cfg, extractor) -> tuple[int, float]:
    """(feature tokens, seconds) of one clip: decoded, resampled and run through the extractor, its
    frame mask counted as the model counts it. Raises SkipRecord with the audio reason."""
    try:
        waveform = load_audio(path, extractor.sampling_rate, audio_limit(audio_cfg, extractor))
    except MediaError as exc:
        raise SkipRecord(exc.reason, f"{exc.path}: {exc.detail}") from None
    inputs = extract_features(extractor, [waveform])
    (tokens,) = counts_from_inputs(audio_cfg.token_count(), inputs)
    return tokens, len(waveform) / extractor.sampling_rate


@dataclass
class ChunkResult:
    n_read: int = 0
    rows: list[np.ndarray] = field(default_factory=list)
    img_paths: list[bytes] = field(default_factory=list)
    image_starts: list[int] = field(default_factory=list)
    audio: list[tuple[list[str], list[tuple[int, int]]]] = field(default_factory=list)  # (paths, spans) per sample
    kept_per_file: collections.Counter = field(default_factory=collections.Counter)
    skips: list[tuple[int, int, str, str]] = field(default_factory=list)  # (file index, line, reason, detail)
    starts: collections.Counter = field(default_factory=collections.Counter)  # first-turn images
    later_starts: collections.Counter = field(default_factory=collections.Counter)  # later-turn images
    stats: collections.Counter = field(default_factory=collections.Counter)


def _encode_line(line: str):
    cfg: BuildConfig = _STATE["cfg"]
    ds = cfg.dataset
    record = parse_record_line(line)
    images = record_paths(record, ds.image_key)
    if images and ds.num_patches is None:
        raise SkipRecord("bad_record", f"'{ds.image_key}' in a build without images (dataset.num_patches unset)")
    if len(images) > 1:
        raise SkipRecord(
            "multiple_images", f"{len(images)} images; the HDF5 layout holds one image per sample"
        )
    audio = None
    if ds.audio is not None:
        clips = record_paths(record, ds.audio.audio_key)
        files = [audio_file(ds.audio.audio_dir, clip) for clip in clips]
        counts = [count_audio_tokens(path, ds.audio, _STATE["extractor"])[0] for path in files]
        audio = (ds.audio.audio_token, _STATE["audio_token_id"], clips, counts)
    sample = encode_record(
        record,
        tokenizer=_STATE["tokenizer"],
        template=_STATE["template"],
        num_feature_tokens=ds.num_patches or 0,
        slot_fill_id=_STATE["pad_id"],
        image_token=ds.image_token,
        image_token_id=_STATE["image_token_id"],
        image_key=ds.image_key,
        conversation_key=ds.conversation_key,
        content_key=ds.content_key,
        max_length=cfg.processor.max_sequence_length,
        text_only_slots=ds.text_only_slots and ds.num_patches is not None,
        audio=audio,
    )
    if sample.image_turn > 0 and ds.image_in_later_turn == "skip":
        raise SkipRecord(
            "image_in_later_turn", f"the image is in human turn {sample.image_turn + 1}, slots at {sample.image_start}"
        )
    for image in sample.images:
        check_image(image_file(ds.image_dir, image), ds.max_image_pixels)
    return sample


def _process_chunk(chunk: list[tuple[int, int, str | SkipRecord]]) -> ChunkResult:
    cfg: BuildConfig = _STATE["cfg"]
    tokenizer = _STATE["tokenizer"]
    pad_id, eos_id = _STATE["pad_id"], _STATE["eos_id"]
    msl = cfg.processor.max_sequence_length
    out = ChunkResult()
    for file_idx, lineno, line in chunk:
        out.n_read += 1
        try:
            if isinstance(line, SkipRecord):  # not UTF-8
                raise line
            sample = _encode_line(line)
        except SkipRecord as skip:
            out.skips.append((file_idx, lineno, skip.reason, skip.detail))
            continue
        rows = to_h5_rows(sample, msl, pad_id)
        out.rows.append(rows)
        out.img_paths.append(encode_img_path(sample.image))
        out.image_starts.append(sample.image_start)
        out.audio.append((sample.audio, sample.audio_spans))
        out.kept_per_file[file_idx] += 1
        if sample.image_turn > 0:
            out.later_starts[sample.image_start] += 1
        elif sample.has_image:
            out.starts[sample.image_start] += 1
        # the statistics Cerebras' verify_saved_hdf5_files computes (utils.collect_stats)
        text = tokenizer.decode(rows[0].tolist(), skip_special_tokens=False)
        st = out.stats
        st["raw_chars"] += sample.raw_chars
        st["raw_bytes"] += sample.raw_bytes
        st["non_pad_tokens"] += int(((rows[0] != eos_id) & (rows[0] != pad_id)).sum())
        st["attended_tokens"] += int((rows[3] == 0).sum())
        st["loss_valid_tokens"] += int(rows[1].sum())
        st["detokenized_chars"] += len(text)
        st["detokenized_bytes"] += len(text.encode("utf-8"))
        st["text_only"] += int(not sample.has_image and not sample.audio)
        st["with_audio"] += int(bool(sample.audio))
        st["audio_clips"] += len(sample.audio)
        st["audio_tokens"] += sum(n for _, n in sample.audio_spans)
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
    raises DiskFullError when the disk cannot take the next file."""

    def __init__(self, out_dir: Path, samples_per_file: int, with_audio: bool = False):
        self.out_dir = out_dir
        self.per_file = samples_per_file
        self.with_audio = with_audio
        self.rows: list[np.ndarray] = []
        self.paths: list[bytes] = []
        self.starts: list[int] = []
        self.audio: list = []
        self.files: list[str] = []
        self.file_info: dict[str, dict[str, int]] = {}  # name -> {"n_examples", "bytes"}

    def add(self, rows: list[np.ndarray], paths: list[bytes], starts: list[int], audio: list | None = None) -> None:
        self.rows.extend(rows)
        self.paths.extend(paths)
        self.starts.extend(starts)
        self.audio.extend(audio if audio is not None else [([], [])] * len(rows))
        while len(self.rows) >= self.per_file:
            self._flush(self.per_file)

    def _flush(self, n: int) -> None:
        name = H5_NAME.format(len(self.files))
        rows = np.stack(self.rows[:n])
        audio = self.audio[:n] if self.with_audio else None
        audio_bytes = sum(getattr(a, "nbytes", 0) for item in (audio or []) for part in item for a in part)
        needed = rows.nbytes + audio_bytes + sum(map(len, self.paths[:n])) + 2**16  # uncompressed: an upper bound
        free = free_bytes(self.out_dir)
        if 0 <= free < needed:
            raise DiskFullError(self.out_dir / name, needed, free, needed / n)
        try:
            write_h5(self.out_dir / name, rows, self.paths[:n], self.starts[:n], audio)
        except OSError as err:
            if is_disk_full(err):
                raise DiskFullError(self.out_dir / name, needed, free_bytes(self.out_dir), needed / n) from None
            raise
        del self.rows[:n], self.paths[:n], self.starts[:n], self.audio[:n]
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
    ends `recv`). Ctrl-C is the main process's to handle (it stops the workers)."""
    for end in parent_ends:
        end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(cfg_dict)
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


def _ordered_results(chunks, processes: int, cfg_dict: dict, describe=lambda chunk: "a chunk"):
    """Yield chunk results in input order; at most a few chunks per worker in flight.

    With several processes, each worker gets one chunk at a time over its own pipe and the main
    process waits on the pipes and the processes together: a worker that dies is seen at once and
    raises WorkerDied naming `describe(chunk)` of the chunk it held; an error inside a worker raises
    MmloomError naming its chunk."""
    _init_worker(cfg_dict)  # in this process; forked workers inherit it
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


def recorded_params(cfg: BuildConfig) -> dict:
    """The resolved config as recorded in data_params.json (every input parameter, as the seed's),
    folder paths made absolute so that the file means the same from any working directory."""
    params = cfg.model_dump(mode="json")
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
    files = list_input_files(cfg.setup.input_dir)
    tokenizer = load_tokenizer(cfg.processor.tokenizer_type, what="processor.tokenizer_type")
    cfg, template_note = resolve_template(cfg, tokenizer)
    make_template(cfg, tokenizer)  # unknown template name -> MmloomError before any work
    audio_cfg = cfg.dataset.audio
    ids = special_ids(tokenizer, cfg.dataset.image_token, audio_cfg.audio_token if audio_cfg else None)
    extractor = feature_extractor_from_spec(audio_cfg.feature_extractor) if audio_cfg else None
    if audio_cfg is not None and audio_cfg.audio_dir is not None and not Path(audio_cfg.audio_dir).is_dir():
        raise MmloomError(f"dataset.audio.audio_dir not found: {audio_cfg.audio_dir}")
    msl, num_feature_tokens = cfg.processor.max_sequence_length, cfg.dataset.num_patches
    if num_feature_tokens is not None and num_feature_tokens + 2 > msl:
        raise MmloomError(
            f"dataset.num_patches ({num_feature_tokens}) leaves no room for text in max_sequence_length {msl}"
        )
    if cfg.dataset.image_dir is not None and not Path(cfg.dataset.image_dir).is_dir():
        raise MmloomError(f"dataset.image_dir not found: {cfg.dataset.image_dir}")

    out_dir = Path(cfg.setup.output_dir)
    hint = "wait for that build to finish, or build into another setup.output_dir"
    with FolderLock(out_dir, what="data folder", hint=hint):
        if check_destination(out_dir, "data build", overwrite=overwrite, recognise=is_build_output):
            clear_build_output(out_dir)
        return _build(cfg, files, out_dir, ids, extractor, strict=strict, quiet=quiet, progress=progress,
                      template_note=template_note)


def clear_build_output(out_dir: Path) -> None:
    """Remove an earlier build's files from `out_dir`: `data_params.json` first (the folder stops
    looking complete before any `.h5` file changes), then its `.h5` files and temporary files. Other
    files in the folder (a feature cache, the user's) stay."""
    (out_dir / PARAMS_NAME).unlink(missing_ok=True)
    for path in [*out_dir.glob("data-*.h5"), *out_dir.glob(".data-*.h5.tmp-*")]:
        path.unlink(missing_ok=True)


def _build(cfg: BuildConfig, files: list[Path], out_dir: Path, ids: dict, extractor, *, strict: bool, quiet: bool,
           progress: bool | None, template_note: str | None = None) -> dict:
    """The build proper, into `out_dir` (locked and claimed by `build`); data_params.json last."""
    audio_cfg = cfg.dataset.audio
    msl, num_feature_tokens = cfg.processor.max_sequence_length, cfg.dataset.num_patches
    cfg_dict = cfg.model_dump(mode="json")
    if cfg.setup.processes > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    total = _count_lines(files)
    show = (sys.stdout.isatty() and not quiet) if progress is None else progress
    writer = _Writer(out_dir, cfg.setup.samples_per_file, with_audio=audio_cfg is not None)
    n_read = 0
    skipped: collections.Counter = collections.Counter()
    kept_per_file: collections.Counter = collections.Counter()
    starts: collections.Counter = collections.Counter()
    later_starts: collections.Counter = collections.Counter()
    stats: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    try:
        with _progress(show) as bar:
            task = bar.add_task("build", total=total)
            chunks = _chunks(files, cfg.setup.max_record_bytes)
            results = contextlib.closing(_ordered_results(chunks, cfg.setup.processes, cfg_dict,
                                                          lambda chunk: _describe_chunk(files, chunk)))
            with results as ordered:
                for res in ordered:
                    if strict and res.skips:
                        file_idx, lineno, reason, detail = res.skips[0]
                        raise MmloomError(
                            f"{files[file_idx]}:{lineno}: {reason}" + (f" ({detail})" if detail else "")
                        )
                    n_read += res.n_read
                    for _, _, reason, _ in res.skips:
                        skipped[reason] += 1
                    kept_per_file.update(res.kept_per_file)
                    starts.update(res.starts)
                    later_starts.update(res.later_starts)
                    stats.update(res.stats)
                    writer.add(res.rows, res.img_paths, res.image_starts, res.audio)
                    bar.advance(task, res.n_read)
        writer.close()
    except DiskFullError as err:
        writer.remove_output()
        raise MmloomError(f"{err}; the whole build needs up to {mib(err.per_sample * total)}; nothing of it was kept "
                          f"in {out_dir}") from None
    except WorkerDied as err:
        writer.remove_output()
        raise MmloomError(f"{err}; the build stopped and nothing of it was kept in {out_dir} (a line that needs more "
                          "memory than the machine has? lower setup.max_record_bytes or setup.processes)") from None
    except BaseException:  # --strict, Ctrl-C, a worker's error: nothing of an unfinished build is kept
        writer.remove_output()
        raise
    elapsed = time.perf_counter() - t0
    kept = sum(kept_per_file.values())
    assert n_read == kept + sum(skipped.values())

    start_idx = min(starts, key=lambda k: (-starts[k], k)) if starts else None
    patch_info: dict[str, Any] = {"image_patch_start_idx": start_idx, "num_patches": num_feature_tokens}
    if len(starts) > 1:
        patch_info["note"] = "first-turn images disagree on the image start index; the most common one is recorded"
        patch_info["start_idx_counts"] = {str(k): v for k, v in sorted(starts.items())}
    n_with_image = sum(starts.values())
    n_later = sum(later_starts.values())
    patch_info["samples"] = {
        "image_in_first_turn": n_with_image,
        "image_in_later_turn": n_later,
        "text_only": stats["text_only"],
    }
    if later_starts:
        patch_info["image_in_later_turn_start_idx_counts"] = {str(k): v for k, v in sorted(later_starts.items())}
    params = {
        **recorded_params(cfg),
        "post-process": {  # Cerebras' names: *_files count records ("documents"), as its preprocessors do
            "discarded_files": n_read - kept,
            "processed_files": n_read,
            "successful_files": kept,
            "n_examples": kept,
            "raw_chars_count": stats["raw_chars"],
            "raw_bytes_count": stats["raw_bytes"],
            "eos_id": ids["eos_id"],
            "pad_id": ids["pad_id"],
            "vocab_size": ids["vocab_size"],
            "image_token_id": ids["image_token_id"],
            "input_files": [str(p) for p in files],
            "output_files": writer.files,
            "output_file_info": writer.file_info,  # per file: n_examples, bytes (checked by readers)
            "skipped": {r: skipped[r] for r in sorted(skipped, key=_reason_order)},
        },
        "h5_dataset_stats": {  # as Cerebras' collect_stats computes them over row 0 of `data`
            "num_sequences": kept,
            "num_tokens": kept * msl,
            "non_pad_tokens": stats["non_pad_tokens"],
            "loss_valid_tokens": stats["loss_valid_tokens"],
            "detokenized_bytes": stats["detokenized_bytes"],
            "detokenized_chars": stats["detokenized_chars"],
            "attended_tokens": stats["attended_tokens"],
        },
        "image_patch_info": patch_info,
    }
    if audio_cfg is not None:
        params["modalities"] = {"audio": audio_params(audio_cfg, extractor, ids, stats)}
    try:
        write_json(out_dir / PARAMS_NAME, params)
    except OSError as err:
        if not is_disk_full(err):
            raise
        writer.remove_output()
        raise MmloomError(f"cannot write {out_dir / PARAMS_NAME}: no space left on the device "
                          f"({mib(max(free_bytes(out_dir), 0))} free); nothing of the build was kept") from None
    if not quiet:
        print_summary(params, elapsed, template_note)
    if kept == 0:
        reasons = ", ".join(f"{r}: {c}" for r, c in params["post-process"]["skipped"].items()) or "no input records"
        raise MmloomError(
            f"no record was kept out of {n_read} ({reasons}); no .h5 file was written to {out_dir} "
            "(--strict stops at the first bad record with its file and line)"
        )
    return params


def audio_params(audio_cfg, extractor, ids: dict, stats) -> dict[str, Any]:
    """`modalities.audio` of data_params.json: what the trainer needs to read the clips exactly as
    the build counted them (placeholder, count rule, the extractor's settings) and the counts."""
    settings = {k: v for k, v in extractor.to_dict().items() if k not in ("mel_filters", "window")}
    return {
        "placeholder": audio_cfg.audio_token,
        "token_id": ids["audio_token_id"],
        "token_count": audio_cfg.token_count(),
        "feature_extractor": settings,
        "max_seconds": audio_limit(audio_cfg, extractor),
        "samples_with_audio": stats["with_audio"],
        "clips": stats["audio_clips"],
        "audio_tokens": stats["audio_tokens"],
    }


def _reason_order(reason: str) -> tuple[int, str]:
    return (SKIP_REASONS.index(reason) if reason in SKIP_REASONS else len(SKIP_REASONS), reason)


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
    if samples.get("image_in_later_turn"):
        where = ", ".join(f"{c:,} at {k}" for k, c in info["image_in_later_turn_start_idx_counts"].items())
        table.add_row(f"  image in a later turn (slots start: {where})", f"{samples['image_in_later_turn']:,}")
    audio = (params.get("modalities") or {}).get("audio")
    if audio is not None:
        table.add_row(f"  with audio ({audio['clips']:,} clips, {audio['audio_tokens']:,} audio tokens)",
                      f"{audio['samples_with_audio']:,}")
    table.add_row("  text-only", f"{samples.get('text_only', 0):,}")
    for reason, count in pp["skipped"].items():
        table.add_row(f"skipped: {reason}", f"{count:,}")
    console = Console()
    console.print(table)
    rate = pp["processed_files"] / elapsed if elapsed > 0 else 0.0
    start = "" if info["image_patch_start_idx"] is None else f", image_patch_start_idx={info['image_patch_start_idx']}"
    console.print(f"{len(pp['output_files'])} .h5 files{start}, {elapsed:.1f} s ({rate:,.0f} samples/s)")
    if template_note:
        console.print(template_note, markup=False, highlight=False)
