"""Observability: metrics.jsonl + TensorBoard, a rich progress bar, throughput and MFU estimates."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mmloom.model.encoder import base_module

METRICS_NAME = "metrics.jsonl"


# ------------------------------------------------------------------------------------ FLOPs
class FlopsEstimator:
    """Trainable-aware training FLOPs (the "6 N per token" rule, split by what trains).

    Per token (or image position) through a linear part with N weights: 2N forward, 2N for the
    input gradients when the backward pass has to go through the part (something before it, or in
    it, trains), 2N_trainable for the weight gradients. A fully trainable part is thus 6N; the
    frozen LLM of phase 1 is 4N (gradients flow through it to the projector); the frozen vision
    encoder is 2N. Attention's sequence-quadratic terms and embeddings lookups are left out, and so
    are encoders other than the vision encoder (an audio encoder's FLOPs are not counted).
    """

    def __init__(self, model: nn.Module, image_positions: int, feature_tokens: int):
        def counts(module: nn.Module, skip_embeddings: bool = False) -> tuple[int, int]:
            total = trainable = 0
            emb = set()
            if skip_embeddings:
                base = base_module(module)
                emb = {id(p) for p in base.get_input_embeddings().parameters()}
            for p in module.parameters():
                if id(p) in emb:
                    continue
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
            return total, trainable

        encoder = model.encoders.get("vision")  # other encoders (audio) are not counted
        nv, tv = counts(encoder.module) if encoder is not None else (0, 0)
        npj, tpj = counts(encoder.projector) if encoder is not None else (0, 0)
        nl, tl = counts(model.language_model, skip_embeddings=True)
        vision_bwd = tv > 0
        projector_bwd = vision_bwd or tpj > 0
        llm_bwd = projector_bwd or tl > 0
        self.vision_per_image = image_positions * (2 * nv + (2 * nv if vision_bwd else 0) + 2 * tv)
        self.vision_per_image += feature_tokens * (2 * npj + (2 * npj if vision_bwd else 0) + 2 * tpj)
        self.llm_per_token = 2 * nl + (2 * nl if llm_bwd else 0) + 2 * tl
        self.params = {"vision": nv, "projector": npj, "language_model": nl}

    def step_flops(self, tokens: int, images: int) -> float:
        return float(self.llm_per_token * tokens + self.vision_per_image * images)


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


class MetricsWriter:
    """Append records to MODEL_DIR/metrics.jsonl and TensorBoard scalars (rank 0 only)."""

    def __init__(self, model_dir: Path, enabled: bool, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(model_dir) / METRICS_NAME
        self.tb = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            # Drop records of steps after the checkpoint we resume from (they will be redone).
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:
                    continue
            self.path.write_text("".join(k + "\n" for k in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(
                    log_dir=str(Path(model_dir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
                )
            except ImportError:  # tensorboard not installed
                self.tb = None

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


def read_metrics(model_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(model_dir) / METRICS_NAME
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
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
        if self.progress is not None:
            info = (f"loss {_fmt(record.get('loss'))} lr {_fmt(record.get('lr'), '.3g')} "
                    f"{_fmt(record.get('tokens_per_s'), ',.0f')} tok/s")
            self.progress.update(self.task, completed=step, info=info)

    def log(self, record: dict[str, Any]) -> None:
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
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
