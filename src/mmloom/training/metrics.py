"""Observability: metrics.jsonl + TensorBoard, a rich progress bar, throughput and MFU estimates."""

from __future__ import annotations

import json
import math
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from mmloom.errors import MmloomError
from mmloom.files import is_disk_full, write_text
from mmloom.model.adapters import base_module
from mmloom.model.merge import IGNORE_INDEX
from mmloom.training.run_folder import METRICS, TENSORBOARD, RunFolder


# ------------------------------------------------------------------------------------ FLOPs
@dataclass
class StepWork:
    """What micro-batches make the model compute, in the units `FlopsEstimator` prices.

    Counts add up (`a + b`) over micro-batches; `to_list`/`from_list` carry them through an
    all-reduce so that a step's work covers every rank.

    - `tokens`: real LLM positions (attended tokens). Padding columns, the masked image slots of
      text-only samples and a packed row's padding tail are computed but not counted: they are
      not the model's work, and counting them would let padding raise the MFU.
    - `attention_pairs`: causal (query, key) pairs of real tokens, sum over samples of
      L_i (L_i + 1) / 2, L_i a sample's real tokens (one term per sample, packed or padded).
    - `head_positions`: positions the LM head runs at: the supervised positions (labels != -100
      after the shift) when the loss is computed there only (`loss_on_supervised_only`), else
      every real position.
    - `encoder_images`: images run through the vision encoder, dummy images of text-only samples
      included (the encoder really runs on them); 0 for cached features.
    - `projected_images`: images whose features go through the projector (cached ones too).
    """

    tokens: int = 0
    attention_pairs: int = 0
    head_positions: int = 0
    encoder_images: int = 0
    projected_images: int = 0

    def __add__(self, other: StepWork) -> StepWork:
        return StepWork(*(a + b for a, b in zip(self.to_list(), other.to_list(), strict=True)))

    def to_list(self) -> list[int]:
        """The counts as a list of ints in field order (for an all-reduce or a checkpoint)."""
        return [int(getattr(self, f.name)) for f in fields(self)]

    @classmethod
    def from_list(cls, values) -> StepWork:
        """The counts back from :meth:`to_list`'s list."""
        return cls(*(int(v) for v in values))


def _causal_pairs(lengths) -> int:
    """Causal (query, key) pairs of sequences of the given lengths: sum of L (L + 1) / 2."""
    return int(sum(int(n) * (int(n) + 1) // 2 for n in lengths))


def batch_work(batch: dict, supervised_only: bool = True) -> StepWork:
    """The `StepWork` of one collated micro-batch, as the trainer's collators build it.

    Reads `TrainCollator` batches (padded rows: `attention_mask` (B, T), 1 = real token),
    `PackedCollator` batches (`spans`: per sample `(row, start, end)` of its real tokens) and
    `FeatureCollator` batches (`vision` holds `module_features` (N, L, D) instead of `pixel_values`
    (N, 3, H, W); the batch format: `mmloom.model.batch`).
    `labels` (B, T) follow the HF convention (unshifted, -100 = ignored). Without `spans` and
    with a 4D or no attention mask, each row counts as one sample of its full width.
    """
    mask = batch.get("attention_mask")
    input_ids = batch["input_ids"]
    if batch.get("num_attended_tokens") is not None:
        tokens = int(batch["num_attended_tokens"])
    elif mask is not None and mask.dim() == 2:
        tokens = int(mask.sum())
    else:
        tokens = int(input_ids.numel())
    if batch.get("spans") is not None:
        lengths = [end - start for _row, start, end in batch["spans"] if end > start]
    elif mask is not None and mask.dim() == 2:
        lengths = mask.sum(dim=1).tolist()
    else:
        lengths = [input_ids.shape[1]] * input_ids.shape[0]
    labels = batch.get("labels")
    if supervised_only and labels is not None:
        head = int((labels[:, 1:] != IGNORE_INDEX).sum())
    else:
        head = tokens
    vision = batch.get("vision") or {}
    features = vision.get("module_features")
    pixels = vision.get("pixel_values")
    encoder_images = 0 if features is not None or pixels is None else int(pixels.shape[0])
    projected = int(features.shape[0]) if features is not None else encoder_images
    return StepWork(tokens, _causal_pairs(lengths), head, encoder_images, projected)


@dataclass
class _Weights:
    """Weights of the matrix multiplies of a module: (total, trainable) of linear layers and of
    convolutions (which run at fewer positions: one per patch)."""

    linear: int = 0
    linear_trainable: int = 0
    conv: int = 0
    conv_trainable: int = 0

    @classmethod
    def of(cls, module: nn.Module | None, skip: tuple[nn.Module, ...] = ()) -> _Weights:
        from transformers.pytorch_utils import Conv1D

        out = cls()
        if module is None:
            return out
        skipped = {id(m) for s in skip if s is not None for m in s.modules()}
        for m in module.modules():
            if id(m) in skipped:
                continue
            w = getattr(m, "weight", None)
            if w is None:
                continue
            if isinstance(m, (nn.Linear, Conv1D)):
                out.linear += w.numel()
                out.linear_trainable += w.numel() if w.requires_grad else 0
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                out.conv += w.numel()
                out.conv_trainable += w.numel() if w.requires_grad else 0
        return out

    @property
    def trainable(self) -> int:
        return self.linear_trainable + self.conv_trainable


def _attention_width(config) -> tuple[int, int]:
    """(layers, query heads x head dim) of a transformer config, (0, 0) when it does not say."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(heads, int):
        return 0, 0
    head_dim = getattr(config, "head_dim", None)
    if not isinstance(head_dim, int):
        if not isinstance(hidden, int):
            return 0, 0
        head_dim = hidden // heads
    return layers, heads * head_dim


class FlopsEstimator:
    """Training FLOPs of what a step really computes (model FLOPs, for MFU).

    Matrix multiplies only (norms, activations, softmax and embedding lookups are left out), by
    the usual rule: a weight matrix with N entries costs 2N per position forward, 2N for the
    input gradient when the backward pass has to go through it (something before it, or in its
    part, trains) and 2N for its weight gradient when it trains. Parts and where they run:

    - vision encoder (every layer it has, whatever layer the features come from), per image it
      runs on (`StepWork.encoder_images`): linear weights at `image_positions` positions, the
      patch convolution at (image_size // patch_size)^2 (it gets no input gradient), and the
      bidirectional attention, 4 x layers x positions^2 x width forward (QK^T and AV: 2 FLOPs
      per multiply-add over the heads' width);
    - projector, at `feature_tokens` positions per projected image;
    - decoder layers of the LLM, at every real token;
    - causal attention of the LLM, 4 x layers x width per (query, key) pair of real tokens of
      the same sample, backward 2x the forward when gradients go through the LLM;
    - LM head (the output embedding), at `StepWork.head_positions`.

    Encoders other than the vision encoder (audio) are not counted.

    Recomputation (gradient checkpointing, the chunked loss's recomputed logits) and padding
    are not counted: MFU counts the model's FLOPs, not the hardware's.
    """

    def __init__(self, model: nn.Module, image_positions: int, feature_tokens: int):
        encoder = model.encoders.get("vision")
        llm = base_module(model.language_model)
        head_module = llm.get_output_embeddings()
        vision = _Weights.of(encoder.module if encoder is not None else None)
        projector = _Weights.of(encoder.projector if encoder is not None else None)
        decoder = _Weights.of(model.language_model, skip=(head_module,))
        head = _Weights.of(head_module)
        vision_bwd = vision.trainable > 0
        llm_bwd = vision_bwd or projector.trainable > 0 or decoder.trainable > 0

        def cost(weights: int, trainable: int, input_grad: bool) -> int:
            return 2 * weights + (2 * weights if input_grad else 0) + 2 * trainable

        vision_flops = 0
        if encoder is not None:
            cfg = encoder.config
            size, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
            patches = (size // patch) ** 2 if isinstance(size, int) and isinstance(patch, int) else image_positions
            layers, width = _attention_width(cfg)
            attention = 4 * layers * image_positions**2 * width
            vision_flops = (
                image_positions * cost(vision.linear, vision.linear_trainable, vision_bwd)
                + patches * cost(vision.conv, vision.conv_trainable, False)
                + attention * (3 if vision_bwd else 1)
            )
        layers, width = _attention_width(llm.config)
        self.per_encoder_image = vision_flops
        self.per_projected_image = feature_tokens * cost(projector.linear, projector.linear_trainable, vision_bwd)
        self.per_token = cost(decoder.linear, decoder.linear_trainable, llm_bwd)
        self.per_attention_pair = 4 * layers * width * (3 if llm_bwd else 1)
        self.per_head_position = cost(head.linear, head.linear_trainable, llm_bwd)
        self.params = {"vision": vision.linear + vision.conv, "projector": projector.linear,
                       "language_model": decoder.linear, "lm_head": head.linear}

    def parts(self, work: StepWork) -> dict[str, float]:
        """FLOPs of `work` per part: vision, projector, decoder, attention, lm_head."""
        return {
            "vision": float(self.per_encoder_image * work.encoder_images),
            "projector": float(self.per_projected_image * work.projected_images),
            "decoder": float(self.per_token * work.tokens),
            "attention": float(self.per_attention_pair * work.attention_pairs),
            "lm_head": float(self.per_head_position * work.head_positions),
        }

    def flops(self, work: StepWork) -> float:
        """Training FLOPs of `work` (a micro-batch's, or a step's summed over micro-batches and ranks)."""
        return sum(self.parts(work).values())

    def batch_flops(self, batch: dict, supervised_only: bool = True) -> float:
        """Training FLOPs of one collated micro-batch (see `batch_work`)."""
        return self.flops(batch_work(batch, supervised_only))

    def step_flops(self, tokens: int, images: int) -> float:
        """Coarse FLOPs from a step's real token and image counts alone: the LM head counted at
        every token, attention left out. Prefer `flops(work)` with the step's `StepWork`, summed
        over micro-batches (`batch_work`) and all-reduced over ranks."""
        return self.flops(StepWork(tokens=tokens, head_positions=tokens, encoder_images=images,
                                   projected_images=images))


# ---------------------------------------------------------------------------------- writers
@dataclass
class ThroughputWindow:
    """Time, tokens and FLOPs accumulated over the steps since the last log line."""

    time: float = 0.0
    wait: float = 0.0  # seconds spent waiting for data
    tokens: int = 0
    samples: int = 0
    flops: float = 0.0
    steps: int = 0

    def add(self, seconds: float, wait: float, tokens: int, samples: int, flops: float) -> None:
        """Add one optimizer step: its seconds, seconds spent waiting for data, tokens, samples and FLOPs."""
        self.time += seconds
        self.wait += wait
        self.tokens += tokens
        self.samples += samples
        self.flops += flops
        self.steps += 1

    def summary(self, peak_flops: float | None, world_size: int) -> dict[str, float]:
        """tokens/s, samples/s, data-wait share, step time and (with a peak) MFU."""
        record = {
            "tokens_per_s": self.tokens / self.time,
            "samples_per_s": self.samples / self.time,
            "data_wait_share": self.wait / self.time,
            "step_time_s": self.time / self.steps,
        }
        if peak_flops:
            record["mfu"] = self.flops / self.time / (peak_flops * world_size)
        return record


class MetricsWriteError(MmloomError):
    """metrics.jsonl or the TensorBoard events could not be written (full disk): the trainer stops at
    the step boundary, after a checkpoint when one can be written."""


def _quiet_tensorboard_threads(previous):
    """A `threading.excepthook` that leaves the error of TensorBoard's event-writer thread to
    `MetricsWriter` (which reports it in one line when it next writes) and passes the rest on."""
    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, Exception):
            return
        previous(args)

    return hook


class MetricsWriter:
    """Append records to MODEL_DIR/metrics.jsonl and TensorBoard scalars (rank 0 only).

    A record that cannot be written because the disk is full raises MetricsWriteError naming the file
    and the bytes it needed (a partial line is cut off again); TensorBoard's own failures other than a
    full disk only stop the TensorBoard events, with a note."""

    def __init__(self, model_dir: Path, enabled: bool, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        self.path = RunFolder(model_dir).metrics
        self.tb = None
        self._hook = None
        if not enabled:
            return
        if self.path.exists():
            # Drop records of steps after the checkpoint we resume from (they will be redone); at step 0,
            # those of an earlier attempt killed before its first checkpoint.
            kept = [record for record in read_metrics(model_dir) if record.get("step", 0) <= resume_step]
            write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                events = RunFolder(model_dir).tensorboard
                self.tb = SummaryWriter(log_dir=str(events), purge_step=resume_step + 1 if events.is_dir() else None)
                self._hook = threading.excepthook
                threading.excepthook = _quiet_tensorboard_threads(self._hook)
            except ImportError:  # tensorboard not installed
                self.tb = None

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        """Append `record` as one JSON line to metrics.jsonl and its finite numbers as TensorBoard scalars
        ``{prefix}/{key}`` at its ``step`` (nothing when disabled). Raises MetricsWriteError on a full disk."""
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with self.path.open("a") as f:
                f.write(line)
        except OSError as err:
            self._cut(size)
            raise self._error(self.path, err, len(line.encode())) from None
        if self.tb is not None:
            step = record.get("step", 0)
            try:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                        self.tb.add_scalar(f"{prefix}/{key}", value, step)
            except Exception as err:  # noqa: BLE001 - the event-writer thread's error, raised here
                self._tensorboard_failed(err)

    def _cut(self, size: int) -> None:
        """Cut a partly written line off metrics.jsonl (a full disk in the middle of it)."""
        try:
            with self.path.open("r+b") as f:
                f.truncate(size)
        except OSError:
            pass  # readers pass over a torn last line

    def _error(self, path: Path, err: BaseException, needed: int) -> MmloomError:
        from mmloom.outputs import disk_full_error

        if is_disk_full(err):
            return MetricsWriteError(str(disk_full_error(path, err, needed, "the records before it are kept")))
        return MetricsWriteError(f"cannot write {path}: {getattr(err, 'strerror', None) or err}")

    def _tensorboard_failed(self, err: BaseException) -> None:
        folder = self.path.parent / TENSORBOARD
        tb, self.tb = self.tb, None
        try:
            tb.close()
        except Exception:  # noqa: BLE001 - it failed already
            pass
        if is_disk_full(err):
            raise self._error(folder, err, 2**16)
        print(f"note: TensorBoard events are no longer written to {folder} ({str(err).splitlines()[0][:200]}); "
              f"{METRICS} still is", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (a failure then is a note: the records are in metrics.jsonl)."""
        if self.tb is not None:
            try:
                self.tb.flush()
                self.tb.close()
            except Exception as err:  # noqa: BLE001 - the event-writer thread's error
                print(f"note: the last TensorBoard events may be missing from {self.path.parent / 'tensorboard'} "
                      f"({str(err).splitlines()[0][:200]})", file=sys.stderr, flush=True)
            self.tb = None
        if self._hook is not None:
            threading.excepthook, self._hook = self._hook, None


def read_metrics(model_dir: str | Path) -> list[dict[str, Any]]:
    """The records of MODEL_DIR/metrics.jsonl in order ([] when there is none); a line that is not
    JSON (the torn last line of a killed run) is passed over."""
    path = RunFolder(model_dir).metrics
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):
            continue
    return records


# ---------------------------------------------------------------------------------- display
def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


class ProgressDisplay:
    """A rich progress bar (step, loss, lr, tokens/s, ETA) on a TTY; plain log lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool, tty: bool | None = None):
        self.enabled = enabled
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.progress = None
        if enabled and self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        """Move the bar to `step` and show the record's loss, learning rate and tokens/s (tty only)."""
        if self.progress is not None:
            info = (f"loss {_fmt(record.get('loss'))} lr {_fmt(record.get('lr'), '.3g')} "
                    f"{_fmt(record.get('tokens_per_s'), ',.0f')} tok/s")
            self.progress.update(self.task, completed=step, info=info)

    def log(self, record: dict[str, Any]) -> None:
        """Print one log line of the record's figures (``step N | loss ... | mfu ...``), above the bar on a tty."""
        if not self.enabled:
            return
        parts = [f"step {record.get('step')}"]
        for key, spec in (("loss", ".5g"), ("eval_loss", ".5g"), ("perplexity", ".5g"), ("accuracy", ".4f"),
                          ("lr", ".3g"), ("grad_norm", ".3g"), ("tokens_per_s", ",.0f"),
                          ("samples_per_s", ".2f"), ("data_wait_share", ".1%"), ("mfu", ".2%")):
            if record.get(key) is not None:
                parts.append(f"{key} {format(record[key], spec)}")
        line = " | ".join(parts)
        if self.progress is not None:
            self.progress.console.print(line)
        else:
            print(line, flush=True)

    def message(self, text: str) -> None:
        """Print `text` (above the bar on a tty); nothing when disabled."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Stop the live bar."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# ------------------------------------------------------------------------- a run's metrics
@dataclass
class StepResult:
    """What one optimizer step did, summed over its micro-batches and ranks (what `TrainMetrics.step`
    records)."""

    loss: float
    grad_norm: float | None
    tokens: int  # attended tokens, all ranks
    loss_tokens: int  # supervised tokens, all ranks
    samples: int
    images: int  # images through the vision encoder (dummies included), all ranks
    work: StepWork | None = None  # what ran, summed over micro-batches and ranks (for the FLOPs)
    extra: dict[str, Any] | None = None  # further metrics of the step (preference tuning: rewards, log-probs)


class TrainMetrics:
    """What a run records of its steps (rank 0 writes; `ctx` says which rank this is):

    - every step: a record (step, loss, lr, grad_norm, loss_tokens, epoch, each part's learning rate
      when it has its own: `projector_lr`, `encoder_lr`, ..., and the step's `extra` metrics: a
      preference step's rewards and log-probabilities) appended to metrics.jsonl and TensorBoard
      (:class:`MetricsWriter`, which continues the run's records from `start_step`), and the progress bar;
    - every `log_steps` steps and at the last step: throughput, data-wait share and, with
      `peak_flops` (FLOP/s of one device), MFU over the steps since the last such line
      (:class:`ThroughputWindow`, FLOPs from `flops`), added to the record and printed;
    - evaluation results (:meth:`eval`), as `eval` records.

    `earlier` records (those a full disk kept out of the resumed checkpoint's run) are written first.
    A record that a full disk keeps out goes to `unwritten` (the trainer saves them with its next
    checkpoint), and `write_error` holds the error until the next step: the trainer stops at this
    step boundary."""

    def __init__(self, run_folder, ctx, total_steps: int, steps_per_epoch: int, log_steps: int,
                 peak_flops: float | None, flops: FlopsEstimator, start_step: int = 0,
                 earlier: list[tuple[str, dict[str, Any]]] = ()):
        self.ctx = ctx
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.log_steps = log_steps
        self.peak_flops = peak_flops
        self.flops = flops
        self.writer = MetricsWriter(run_folder.path, enabled=ctx.is_main, resume_step=start_step)
        for prefix, record in earlier:
            self.writer.write(record, prefix=prefix)
        self.progress = ProgressDisplay(total_steps, start_step, enabled=ctx.is_main)
        self.window = ThroughputWindow()
        self.unwritten: list[tuple[str, dict[str, Any]]] = []  # (prefix, record) kept out by a full disk
        self.write_error: MetricsWriteError | None = None

    def step(self, step: int, result: StepResult, lr: float, lrs: dict[str, float], seconds: float,
             data_wait: float, last_step: bool = False) -> None:
        """Record optimizer step `step` (1-based, done): its `result` (loss, grad_norm, token, sample
        counts, work and extra metrics), the learning rate it ran with (`lr`: the first group's; `lrs`:
        each part with its own, `optim.group_lrs`), its `seconds`, of which `data_wait` waiting for data."""
        self.write_error = None
        self.window.add(seconds, data_wait, result.tokens, result.samples, self.flops.flops(result.work))
        record = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                  "loss_tokens": result.loss_tokens, "epoch": step / self.steps_per_epoch, **(result.extra or {}),
                  **lrs}
        if step % self.log_steps == 0 or last_step:
            record.update(self.window.summary(self.peak_flops, self.ctx.world_size))
            self.window = ThroughputWindow()
            self.progress.log(record)
        self._write("train", record)
        self.progress.update(step, {**record, "tokens_per_s": record.get("tokens_per_s", result.tokens / seconds)})

    def eval(self, step: int, results: dict[str, Any]) -> None:
        """Record the evaluation after step `step` (not written when this step's record was not)."""
        record = {"step": step, **results}
        self._write("eval", record)
        self.progress.log(record)

    def _write(self, prefix: str, record: dict[str, Any]) -> None:
        try:
            if self.write_error is not None:
                raise self.write_error
            self.writer.write(record, prefix=prefix)
        except MetricsWriteError as err:  # a full disk: the trainer stops at this step boundary
            self.write_error = err
            self.unwritten.append((prefix, record))

    def message(self, text: str) -> None:
        """Print `text` above the progress bar (rank 0)."""
        self.progress.message(text)

    def close(self) -> None:
        """Stop the progress bar; flush and close the writers."""
        self.progress.close()
        self.writer.close()

