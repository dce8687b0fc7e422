"""The trainer: the two-phase LLaVA recipe, gradient accumulation with exact token-level loss
normalisation, bf16 autocast over fp32 master weights, clipping, schedules, resumable
checkpoints, one process or many (DDP / FSDP2 under torchrun)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmloom.data.collate import FeatureCollator, TrainCollator
from mmloom.data.h5_format import read_data_params
from mmloom.data.sampling import EvalSampler, PaddedDataset, steps_per_epoch
from mmloom.errors import MmloomError
from mmloom.training.checkpoint import (
    CheckpointWriteError,
    load_training_state,
    read_trainer_state,
    save_checkpoint,
    save_model,
    verify_checkpoint,
)
from mmloom.training.config import TrainConfig, check_config_paths, config_to_yaml, resume_changes
from mmloom.training.data import (
    build_dataset,
    check_cached_features,
    check_token_ids,
    make_loader,
    processor_for,
    step_sampler,
    train_collator,
    train_lengths,
)
from mmloom.training.distributed import (
    DistContext,
    gradient_sync,
    parameters_without_gradient,
    unwrap,
    wrap_model,
)
from mmloom.training.evaluate import batch_to_device, evaluate, model_inputs
from mmloom.training.metrics import (
    FlopsEstimator,
    MetricsWriteError,
    MetricsWriter,
    ProgressDisplay,
    StepWork,
    ThroughputWindow,
    batch_work,
)
from mmloom.training.modalities import check_data_modalities, vision_geometry, with_audio
from mmloom.training.model_loading import base_folder, model_at
from mmloom.training.optim import build_optimizer, build_scheduler, set_schedule_step
from mmloom.training.preemption import StepFailure, StopSignals, TrainingStopped
from mmloom.training.resume_checks import check_resume_dependencies, run_dependencies
from mmloom.training.run_folder import RunFolder, checkpoint_name


class NonFiniteLossError(MmloomError):
    pass


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    tokens: int  # attended tokens, all ranks
    loss_tokens: int  # supervised tokens, all ranks
    samples: int
    images: int  # images through the vision encoder (dummies included), all ranks
    work: StepWork | None = None  # what ran, summed over micro-batches and ranks (for the FLOPs)


class Trainer:
    def __init__(self, cfg: TrainConfig, model_dir: str | Path, ctx: DistContext | None = None, mode: str = "train"):
        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.run_folder = RunFolder(self.model_dir)
        self.ctx = ctx or DistContext()
        self.mode = mode
        self.run = cfg.runconfig
        self.precision = cfg.model.precision
        self.device = self.ctx.device
        self.console = ProgressDisplay(0, 0, enabled=self.ctx.is_main, tty=False)
        # metrics records a full disk kept out of metrics.jsonl: saved with the checkpoint, written on resume
        self.unwritten_metrics: list[tuple[str, dict[str, Any]]] = []  # (prefix, record)
        self.unwritten_saved = 0  # how many of them the last checkpoint holds

    # ------------------------------------------------------------------------- setup
    def autocast(self):
        if self.precision == "bfloat16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _resume_folder(self) -> Path | None:
        """The newest complete checkpoint of the run folder (verified on rank 0, see
        `run_folder.RunFolder.resume_point`), after removing the temporary folders of saves that
        were interrupted (by the run folder's writer only); notes on skipped checkpoints are printed.
        Raises MmloomError when there are checkpoints but none is usable."""

        def choose() -> tuple[Path | None, list[str]]:
            # an evaluation, which shares the run folder with other readers, leaves a trainer's saves alone
            if self.mode != "eval" and self.run_folder.writing:
                self.run_folder.remove_stale_saves()
            # evaluation needs the weights only
            return self.run_folder.resume_point(verify_checkpoint, self.run.resume_weights_only or self.mode == "eval")

        folder, notes = self.ctx.on_main(choose)
        if self.ctx.is_main:
            for note in notes:
                self.console.message(f"note: {note}")
        return folder

    def setup_model(self, for_training: bool = True) -> None:
        """Build the model, load start weights, freeze, add LoRA, resume, wrap for distribution."""
        cfg = self.cfg
        self.resume_from = self._resume_folder()
        check_config_paths(cfg, self.mode, resuming=self.resume_from is not None)
        self.config_notes: list[str] = []
        if self.resume_from is not None:  # config changes a resume cannot honour are refused first
            self.config_notes = self.config_changes(self.resume_from, read_trainer_state(self.resume_from))
        # runconfig.checkpoint_path's weights start a new run; a resumed one takes its checkpoint's
        self.base_folder = base_folder(cfg) if self.resume_from is None else None
        # built on the meta device, sharded (FSDP2) or wrapped (DDP), then filled from the first rank
        wrapped, self.fingerprint = model_at(cfg, self.resume_from, self.base_folder, self.ctx,
                                             wrap=for_training or self.ctx.mode == "fsdp")
        model = unwrap(wrapped)
        # train_input.use_cached_features: a frozen encoder and an up-to-date cache, else refuse
        check_cached_features(cfg, model, self.mode)
        self.base_model = model
        # vision encoder geometry ((0, 0, 0) without one: audio-LLMs)
        self.num_feature_tokens, self.image_size, self.image_positions = vision_geometry(model)
        # DDP: wrapped by wrap_ddp once a micro-batch shows which parameters get gradients
        self.model = wrapped

    def wrap_ddp(self) -> None:
        """DDP around the model, leaving out the trainable parameters that cannot get a gradient (found on
        the first training sample, `distributed.parameters_without_gradient`): with them DDP waits forever
        for their gradients ("Expected to have finished reduction")."""
        if not (self.ctx.distributed and self.ctx.mode == "ddp") or self.model is not self.base_model:
            return
        batch = batch_to_device(self.train_collate([self.train_set[0]]), self.device)

        def forward():
            with self.autocast():
                return self.base_model(**model_inputs(batch), compute_logits=True).logits

        unused = parameters_without_gradient(self.base_model, forward)
        if unused and self.ctx.is_main:
            self.console.message(f"note: DDP leaves out {len(unused)} trainable parameter tensors that get no gradient "
                                 f"(e.g. {unused[0]}: after the selected feature layer)")
        self.model = wrap_model(self.base_model, self.ctx, self.run.find_unused_parameters, self.cfg.model.precision,
                                without_gradient=unused, synced=True)

    def _collator(self, data_dir: str, dummy_images: bool = True) -> TrainCollator:
        params = read_data_params(data_dir)
        patch_info = params.get("image_patch_info") or {}
        m = self.cfg.model
        start = patch_info.get("image_patch_start_idx")
        if m.image_start_idx is not None and start is not None and start != m.image_start_idx:
            raise MmloomError(
                f"model.image_start_idx is {m.image_start_idx} but {data_dir}/data_params.json says the image "
                f"slots start at {start} (image_patch_info.image_patch_start_idx)"
            )
        data_slots = patch_info.get("num_patches")
        if data_slots is not None and data_slots != self.num_feature_tokens:
            raise MmloomError(
                f"image features and image tokens do not match: the data in {data_dir} has {data_slots} image "
                f"slots per image but the model gives {self.num_feature_tokens} features per image "
                "(check image_size, patch_size and image_feature_select_mode)"
            )
        pad = m.pad_token_id
        if pad is None:
            pad = (params.get("post-process") or {}).get("pad_id")
        if pad is None:
            pad = getattr(unwrap(self.base_model).language_model.config, "pad_token_id", None)
        if pad is None:
            raise MmloomError("cannot tell the pad token id: set model.pad_token_id")
        check_data_modalities(self.base_model, data_dir)  # images / audio the model cannot read
        check_token_ids(self.base_model, data_dir)  # ids the LLM cannot embed, a placeholder id the data lacks
        image_token_id = self.base_model.placeholder_token_ids.get("vision", -1)
        dummy_images = dummy_images and "vision" in self.base_model.encoder_names
        return TrainCollator(image_token_id, int(pad), self.num_feature_tokens, dummy_images=dummy_images)

    def setup_data(self) -> None:
        cfg, run, ctx = self.cfg, self.run, self.ctx
        section = cfg.train_input
        self.train_set = build_dataset(section, self.image_size)
        B, W = section.batch_size, ctx.world_size
        micro = section.micro_batch_size or max(1, B // W)
        if B % (W * micro):
            raise MmloomError(
                f"train_input.batch_size {B} must be a multiple of ranks x micro_batch_size ({W} x {micro})"
            )
        self.global_batch, self.micro_batch, self.accum = B, micro, B // (W * micro)
        if not section.drop_last:  # the last step of an epoch is filled up with loss-free padding samples
            self.train_set = PaddedDataset(self.train_set)
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), B, section.drop_last)
        if len(self.train_set) < B:
            raise MmloomError(
                f"train_input: the dataset has {len(self.train_set)} samples, fewer than one global batch ({B})"
            )
        if run.max_steps is not None:
            self.total_steps = run.max_steps
        else:
            self.total_steps = max(1, int(math.ceil((run.num_epochs or 1.0) * self.steps_per_epoch)))
        self.train_collate = self._collator(section.data_dir)
        self.train_collate = train_collator(self.train_collate, section, self.base_model)
        if section.use_cached_features:  # batches carry module_features instead of pixel_values
            self.train_collate = FeatureCollator(self.train_collate)
        self.train_collate = with_audio(self.train_collate, self.base_model, getattr(self.train_set, "audio_reader", None))
        self.train_lengths = train_lengths(section, self.train_set)

    def train_loader(self, start_step: int):
        section = self.cfg.train_input
        sampler = step_sampler(
            section, self.train_set, getattr(self, "train_lengths", None),
            len(self.train_set), self.global_batch, self.ctx.world_size, self.ctx.rank, self.micro_batch,
            self.run.seed, section.shuffle, start_step, self.total_steps, drop_last=section.drop_last,
        )
        return make_loader(self.train_set, sampler, self.train_collate, section.num_workers, self.run.seed)

    def eval_loader(self):
        section = self.cfg.eval_input
        dataset = PaddedDataset(build_dataset(section, self.image_size))
        micro = section.micro_batch_size or max(1, section.batch_size // self.ctx.world_size)
        sampler = EvalSampler(len(dataset), self.ctx.world_size, self.ctx.rank, micro)
        collate = self._collator(section.data_dir)
        if section.use_cached_features:
            collate = FeatureCollator(collate)
        collate = with_audio(collate, self.base_model, getattr(dataset, "audio_reader", None), dummy=False)
        return make_loader(dataset, sampler, collate, section.num_workers, self.run.seed)

    def setup_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.schedule, self.cfg.optimizer.lr, self.total_steps)
        self.trainable_params = [p for g in self.optimizer.param_groups for p in g["params"]]

    # -------------------------------------------------------------------------- step
    def forward_loss(self, batch: dict, denominator: torch.Tensor) -> torch.Tensor:
        """Sum of this micro-batch's token losses / the global denominator."""
        with self.autocast():
            out = self.model(
                **model_inputs(batch), labels=batch["labels"], num_items_in_batch=denominator,
                compute_logits=not self.cfg.model.loss_on_supervised_only,
            )
        return out.loss

    def accumulate(self, micro_batches: list[dict]) -> StepResult:
        """Forward/backward all micro-batches of one optimizer step (gradients left in .grad).

        The gradient is that of (sum of token losses of the global batch) / (supervised tokens of
        the global batch) — or / global batch size with loss_scaling: batch_size — whatever the
        split into micro-batches and ranks: the token count is all-reduced first, every micro-batch
        loss is divided by it, and the loss is multiplied by the world size because DDP and FSDP
        average gradients over ranks.
        """
        ctx = self.ctx
        work = sum((batch_work(b, self.cfg.model.loss_on_supervised_only) for b in micro_batches), StepWork())
        local = [
            sum(b["num_loss_tokens"] for b in micro_batches),
            sum(b["num_attended_tokens"] for b in micro_batches),
            sum(b["num_samples"] for b in micro_batches),
            sum(0 if b.get("pixel_values") is None else int(b["pixel_values"].shape[0]) for b in micro_batches),
            *work.to_list(),
        ]
        reduced = [int(v) for v in ctx.all_reduce_sum(local).tolist()]
        loss_tokens, tokens, samples, images = reduced[:4]
        work = StepWork.from_list(reduced[4:])
        if self.cfg.model.loss_scaling == "num_tokens":
            denom = float(max(loss_tokens, 1))
        else:
            denom = float(self.global_batch)
        denominator = torch.tensor(denom, dtype=torch.float32, device=self.device)
        scale = float(ctx.world_size) if ctx.distributed else 1.0
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, batch in enumerate(micro_batches):
            batch = batch_to_device(batch, self.device)
            with gradient_sync(self.model, ctx, sync=(i == len(micro_batches) - 1)):
                loss = self.forward_loss(batch, denominator)
                (loss * scale).backward()
            loss_sum += loss.detach().double().cpu()
        total = float(ctx.all_reduce_sum(loss_sum.reshape(1))[0])
        return StepResult(total, None, tokens, loss_tokens, samples, images, work)

    def clip_gradients(self) -> float:
        max_norm = self.cfg.optimizer.max_gradient_norm
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, max_norm if max_norm else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # --------------------------------------------------------------------- checkpoints
    def trainer_state(self, step: int) -> dict[str, Any]:
        return {
            "global_step": step,
            "epoch": step / self.steps_per_epoch,
            "samples_seen": step * self.global_batch,
            "global_batch_size": self.global_batch,
            "world_size": self.ctx.world_size,
            "scheduler": self.scheduler.state_dict(),
            "trainable_only": self.run.save_trainable_only,
            "frozen_fingerprint": self.fingerprint,
            "total_steps": self.total_steps,
            "seed": self.run.seed,
            "config": self.cfg.model_dump(mode="json"),
            **({"unwritten_metrics": self.unwritten_metrics} if self.unwritten_metrics else {}),
            "depends_on": self.dependencies,
        }

    def saved_processor(self):
        """(processor, why not) saved with checkpoints and final_model, built once (rank 0 only)."""
        if not hasattr(self, "_saved_processor"):
            self._saved_processor = (
                processor_for(self.cfg.train_input, self.image_size, self.base_model) if self.ctx.is_main
                else (None, "not the main process"))
        return self._saved_processor

    def save(self, step: int) -> Path:
        self.unwritten_saved = len(self.unwritten_metrics)
        return save_checkpoint(
            self.model_dir, step, self.model, self.optimizer, self.trainer_state(step), self.ctx,
            trainable_only=self.run.save_trainable_only, keep_last=self.run.keep_last,
            processor=self.saved_processor()[0],
        )

    def save_final_model(self) -> None:
        """MODEL_DIR/final_model: all weights, streamed (see `checkpoint.save_model`), with the
        processor when the data allows one (so that chat/generate/convert can use the folder as it is)."""
        processor, why_not = None, None
        if self.ctx.is_main:
            processor, why_not = self.saved_processor()
        extra = (lambda folder: processor.save_pretrained(folder)) if processor is not None else None
        save_model(self.run_folder.final_model, self.model, self.ctx, extra)
        if self.ctx.is_main and processor is None:
            print(f"note: no processor saved with the final model ({why_not})")

    # -------------------------------------------------------------------------- run
    def write_resolved_config(self) -> None:
        """MODEL_DIR/resolved_config.yaml (rank 0): the config as the run uses it (atomic; a full disk is
        one line naming the file and its size)."""
        if self.ctx.is_main:
            text = config_to_yaml(self.cfg)
            if hasattr(self, "total_steps"):
                text = (
                    f"# resolved: total_steps {self.total_steps}, steps_per_epoch {self.steps_per_epoch}, "
                    f"world_size {self.ctx.world_size}, micro_batch_size {self.micro_batch}, "
                    f"accumulation_steps {self.accum}\n" + text
                )
            self.run_folder.write_resolved_config(text)

    def optimizer_step(self, micro_batches: list[dict], step: int, last_saved: int | None) -> StepResult:
        """Forward/backward every micro-batch, check the loss and gradient norm, clip, step."""
        res = self.accumulate(micro_batches)
        last = checkpoint_name(last_saved) if last_saved else "none"
        if not math.isfinite(res.loss):
            raise NonFiniteLossError(
                f"non-finite loss ({res.loss}) at step {step + 1}; stopping. "
                f"Last good checkpoint: {last} in {self.model_dir}"
            )
        res.grad_norm = self.clip_gradients()
        if not math.isfinite(res.grad_norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm at step {step + 1} (loss {res.loss:.4g}); stopping. "
                f"Last good checkpoint: {last} in {self.model_dir}"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return res

    def train(self) -> dict[str, Any]:
        ctx, run = self.ctx, self.run
        self.setup_model()
        self.setup_data()
        self.wrap_ddp()
        samples = len(getattr(self.train_set, "dataset", self.train_set))  # PaddedDataset: the real samples
        self.dependencies = ctx.on_main(run_dependencies, self.cfg, samples, self.base_folder)
        self.write_resolved_config()
        self.setup_optimizer()
        start_step = 0
        if self.resume_from is not None:
            start_step = self.resume_state(self.resume_from, run.resume_weights_only, same_run=True)
        elif run.checkpoint_path is not None and run.load_checkpoint_states == "all":
            start_step = self.resume_state(self.base_folder, False, same_run=False)
        if ctx.is_main:
            self.base_model.trainable_summary(print_table=True)
        flops = FlopsEstimator(self.base_model, self.image_positions, self.num_feature_tokens)
        metrics = MetricsWriter(self.model_dir, enabled=ctx.is_main, resume_step=start_step)
        if self.resume_from is not None:  # records of the checkpoint's steps that a full disk kept out
            for prefix, record in read_trainer_state(self.resume_from).get("unwritten_metrics", []):
                metrics.write(record, prefix=prefix)
        progress = ProgressDisplay(self.total_steps, start_step, enabled=ctx.is_main)
        eval_every = run.eval_steps if self.mode == "train_and_eval" else None
        eval_loader = self.eval_loader() if self.mode == "train_and_eval" else None
        debug_sleep = float(os.environ.get("MMLOOM_DEBUG_STEP_SLEEP", "0") or 0)
        last_saved = start_step if self.resume_from is not None else None
        window = ThroughputWindow()
        result: dict[str, Any] = {"start_step": start_step, "total_steps": self.total_steps}
        if start_step >= self.total_steps:
            progress.message(f"training already finished at step {start_step}")
        loader_iter = iter(self.train_loader(start_step)) if start_step < self.total_steps else None
        with StopSignals() as stops:  # SIGTERM / Ctrl-C: a checkpoint at the next step boundary
            try:
                for step in range(start_step, self.total_steps):
                    t0 = time.perf_counter()
                    micro_batches = [next(loader_iter) for _ in range(self.accum)]
                    t_data = time.perf_counter() - t0
                    lr = self.optimizer.param_groups[0]["lr"]
                    lrs = {g["group_name"]: g["lr"] for g in self.optimizer.param_groups}
                    res = self.optimizer_step(micro_batches, step, last_saved)
                    if debug_sleep:
                        time.sleep(debug_sleep)
                    done = step + 1
                    dt = time.perf_counter() - t0
                    window.add(dt, t_data, res.tokens, res.samples, flops.flops(res.work))
                    record = {"step": done, "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
                              "loss_tokens": res.loss_tokens, "epoch": done / self.steps_per_epoch}
                    if len(lrs) > 1 and "projector" in lrs:
                        record["projector_lr"] = lrs["projector"]
                    if done % run.log_steps == 0 or done == self.total_steps:
                        record.update(window.summary(run.mfu_peak_flops, ctx.world_size))
                        window = ThroughputWindow()
                        progress.log(record)
                    write_error = None
                    try:
                        metrics.write(record)
                    except MetricsWriteError as err:  # a full disk: stop at this step boundary (below)
                        write_error = err
                        self.unwritten_metrics.append(("train", record))
                    progress.update(done, {**record, "tokens_per_s": record.get("tokens_per_s", res.tokens / dt)})
                    result["last_loss"] = res.loss
                    if (run.checkpoint_steps and done % run.checkpoint_steps == 0) or done == self.total_steps:
                        self.save(done)
                        last_saved = done
                    if eval_every and (done % eval_every == 0 or done == self.total_steps):
                        ev = evaluate(self.model, eval_loader, ctx, self.autocast)
                        try:
                            if write_error is not None:
                                raise write_error
                            metrics.write({"step": done, **ev}, prefix="eval")
                        except MetricsWriteError as err:
                            write_error = err
                            self.unwritten_metrics.append(("eval", {"step": done, **ev}))
                        progress.log({"step": done, **ev})
                        result["eval"] = ev
                    try:  # every rank learns of a SIGTERM / Ctrl-C, or a failed write, on any rank
                        signum = stops.agreed(ctx, write_error)
                    except StepFailure as failure:
                        raise self.stopped_by_failure(failure, done, last_saved) from None
                    if signum is not None and done < self.total_steps:
                        if last_saved != done:
                            self.save(done)
                            last_saved = done
                        raise TrainingStopped(
                            f"stopped by {StopSignals.name(signum)} after step {done} of {self.total_steps}: "
                            f"saved {self.run_folder.checkpoint(done)}; run the same command again to resume",
                            signum,
                        )
            finally:
                progress.close()
                metrics.close()
        if run.save_final_model:
            self.save_final_model()
        result["final_step"] = self.total_steps
        return result

    def stopped_by_failure(self, failure: StepFailure, step: int, last_saved: int | None) -> MmloomError:
        """The one-line error that ends a run whose step `step` could not be recorded (metrics.jsonl
        on a full disk): a checkpoint of `step` is tried first when the step has none (collective),
        and the error names what the run can resume from."""
        if last_saved == step and self.unwritten_saved == len(self.unwritten_metrics):
            kept = f"{self.run_folder.checkpoint(step)} holds it"
        else:
            try:
                kept = f"saved {self.save(step)}"
            except CheckpointWriteError as err:
                kept = f"no checkpoint of it could be written either ({err})"
        return MmloomError(f"{failure}; training stopped after step {step}: {kept}; free some space and run the same "
                           "command again to resume")

    def config_changes(self, folder: Path, state: dict[str, Any]) -> list[str]:
        """Compare this run's config with the one `folder` was trained with (see
        `config.resume_changes`): raises MmloomError for changes a resume cannot honour, returns
        notes on the changes that apply and those that are not used."""
        if not isinstance(state.get("config"), dict):  # format 1 checkpoints did not record it
            return []
        refused, applied, ignored = resume_changes(state["config"], self.cfg)
        if refused:
            raise MmloomError(
                f"cannot resume {folder} with a changed config: {'; '.join(refused)} (these keys must stay as "
                f"the run started; use a new --model-dir, or runconfig.checkpoint_path={folder} to start a "
                "new run from its weights)"
            )
        step = int(state.get("global_step", 0)) + 1
        notes = []
        if applied:
            notes.append(f"config changed since the checkpoint, the new values apply from step {step}: "
                         + "; ".join(applied))
        if ignored:
            notes.append("config changed but not used when resuming: " + "; ".join(ignored))
        return notes

    def resume_state(self, folder: Path, weights_only: bool, same_run: bool) -> int:
        """Continue from `folder` (a checkpoint; its weights are loaded already): optimizer state and
        RNG (unless `weights_only`), the schedule at its step, and what changed in the config said
        (or refused, see `config.resume_changes`). Returns the step to start from."""
        state, notes = load_training_state(folder, self.model, self.optimizer, self.ctx, weights_only=weights_only)
        start_step = int(state["global_step"])
        if state.get("global_batch_size") != self.global_batch:
            raise MmloomError(
                f"{folder} was written with train_input.batch_size {state.get('global_batch_size')}, "
                f"this config has {self.global_batch}: the data position cannot be resumed"
            )
        if same_run:
            notes += self.config_notes
            notes += check_resume_dependencies(folder, state.get("depends_on"), self.dependencies,
                                               self.run.resume_allow_changed)
        if state.get("total_steps") not in (None, self.total_steps):
            notes.append(f"the learning-rate schedule now spans {self.total_steps} steps "
                         f"(the checkpoint's run planned {state['total_steps']})")
        set_schedule_step(self.scheduler, start_step)  # the schedule of this run's config, at the step
        if self.ctx.is_main:
            how = "; weights only: fresh optimizer and RNG state" if weights_only else ""
            self.console.message(f"resuming from {folder} (step {start_step}{how})")
            for note in notes:
                self.console.message(f"note: {note}")
        return start_step

    def evaluate_only(self) -> dict[str, Any]:
        """--mode eval: weights of the latest checkpoint in MODEL_DIR (else checkpoint_path, else the init)."""
        self.setup_model(for_training=False)
        source = self.resume_from or self.base_folder
        step = read_trainer_state(source)["global_step"] if self.resume_from is not None else 0
        results = evaluate(self.model, self.eval_loader(), self.ctx, self.autocast)
        results = {"step": step, "weights": str(source) if source else "initial", **results}
        if self.ctx.is_main:
            self.run_folder.write_eval_results(results)
            self.console.log(results)
        return results


def run_training(cfg: TrainConfig, model_dir: str | Path, mode: str = "train", ctx: DistContext | None = None,
                 lock: bool = True):
    """Train and/or evaluate (`mode`) into the run folder `model_dir`, holding its lock
    (`run_folder.RunFolder.lock`: exclusive to train, shared to evaluate) throughout; `lock` False
    when the caller holds it already (`mmloom train` takes it before importing the trainer)."""
    trainer = Trainer(cfg, model_dir, ctx=ctx, mode=mode)
    with RunFolder(model_dir).lock(trainer.ctx, mode) if lock else contextlib.nullcontext():
        return _run(trainer, model_dir, mode)


def _run(trainer: Trainer, model_dir: str | Path, mode: str):
    if mode == "eval":
        return trainer.evaluate_only()
    result = trainer.train()
    if mode == "train_and_eval" and "eval" in result and trainer.ctx.is_main:
        trainer.run_folder.write_eval_results({"step": result["final_step"], **result["eval"]})
    return result
