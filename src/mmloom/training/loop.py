"""The trainer: the two-phase LLaVA recipe, gradient accumulation with exact token-level loss
normalisation, bf16 autocast over fp32 master weights, clipping, schedules, resumable
checkpoints, one process or many (DDP / FSDP2 under torchrun).

After torchtitan's `Trainer`: the constructor builds what the run needs (the model, the data and
its step plan, the optimizer and schedule, the components below), and the training loop asks its
components when to act, each after its own settings: the metrics (`metrics.TrainMetrics`: log
lines every `runconfig.log_steps`), the checkpointer (`checkpoint.Checkpointer`: every
`checkpoint_steps`, the last step, a stop) and the evaluator (`evaluate.Evaluator`: every
`eval_steps` in `--mode train_and_eval`); a run with a `preference` section asks its preference step
(`preference.PreferenceStep`) for each step's forward and backward instead of the token loss."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from mmloom.devices import set_cpu_threads
from mmloom.errors import MmloomError
from mmloom.model.batch import batch_to_device, item_count, model_inputs
from mmloom.training.checkpoint import (
    Checkpointer,
    CheckpointWriteError,
    read_trainer_state,
    verify_checkpoint,
)
from mmloom.training.config import TrainConfig, check_config_paths, config_to_yaml, resume_changes
from mmloom.training.data import StepPlan, TrainData, check_cached_features, eval_loader, processor_for
from mmloom.training.distributed import (
    DistContext,
    gradient_sync,
    parameters_without_gradient,
    unwrap,
    wrap_model,
)
from mmloom.training.evaluate import Evaluator
from mmloom.training.metrics import (
    FlopsEstimator,
    ProgressDisplay,
    StepResult,
    StepWork,
    TrainMetrics,
    batch_work,
)
from mmloom.training.modalities import vision_geometry
from mmloom.training.model_loading import base_folder, model_at
from mmloom.training.optim import build_optimizer, build_scheduler, group_lrs, set_schedule_step
from mmloom.training.preemption import StepFailure, StopSignals, TrainingStopped
from mmloom.training.preference import PreferenceStep
from mmloom.training.resume_checks import check_resume_dependencies, run_dependencies
from mmloom.training.run_folder import RunFolder, checkpoint_name

MODES = ("train", "eval", "train_and_eval")


class NonFiniteLossError(MmloomError):
    """The loss or the gradient norm of a step is not finite (the run stops; its checkpoints are kept)."""


class Trainer:
    """One run of `mmloom train` in the run folder `model_dir`: `mode` ``"train"``,
    ``"train_and_eval"`` (:meth:`train`) or ``"eval"`` (:meth:`evaluate_only`), on the ranks of `ctx`
    (one process by default).

    The constructor builds everything the mode needs, in this order (the random draws of a run
    depend on it): the resume point (the newest usable checkpoint of the run folder), the model,
    then for training the data and its step plan, DDP (wrapped once a sample shows which parameters
    get no gradient), the optimizer and schedule, the checkpointer, the preference step (runs with a
    `preference` section); the evaluator for the modes that evaluate. Nothing is written to the run
    folder until :meth:`train` starts. Collective under torchrun. Raises MmloomError for a config,
    data or checkpoint that does not fit.

    Attributes (None where the mode needs none):

    - `cfg`, `run` (`cfg.runconfig`), `mode`, `ctx`, `device`, `run_folder`, `model_dir`;
    - `resume_from`: the checkpoint this run continues (None: a new run); `config_notes`: what changed
      in the config since it; `base_folder`: the weights a new run starts from
      (`runconfig.checkpoint_path`, resolved); `fingerprint`: the base model's frozen weights
      (`model_loading.frozen_fingerprint`, recorded in every checkpoint);
    - `base_model`: the composite; `model`: what the steps run (FSDP2- or DDP-wrapped, else `base_model`);
    - `plan` (:class:`mmloom.training.data.StepPlan`), `train_data` (:class:`~mmloom.training.data.TrainData`),
      `dependencies` (what a resume checks: data, tokenizer, base model files);
    - `optimizer`, `scheduler`, `trainable_params` (what the gradient norm is clipped over);
    - `preference` (:class:`mmloom.training.preference.PreferenceStep`: each step's forward and backward on
      preference pairs, the reference log-probabilities; None without a `preference` section);
    - `checkpointer` (:class:`mmloom.training.checkpoint.Checkpointer`), `evaluator`
      (:class:`mmloom.training.evaluate.Evaluator`), `metrics` (:class:`mmloom.training.metrics.TrainMetrics`,
      set when :meth:`train` starts: it continues metrics.jsonl from the resume step);
    - `console`: messages before the progress bar exists.
    """

    def __init__(self, cfg: TrainConfig, model_dir: str | Path, ctx: DistContext | None = None, mode: str = "train"):
        if mode not in MODES:
            raise MmloomError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        self.cfg = cfg
        self.run = cfg.runconfig
        self.mode = mode
        self.ctx = ctx or DistContext()
        self.device = self.ctx.device
        set_cpu_threads(self.run.num_threads, self.run.num_interop_threads,
                        ("runconfig.num_threads", "runconfig.num_interop_threads"))
        self.model_dir = Path(model_dir)
        self.run_folder = RunFolder(self.model_dir)
        self.console = ProgressDisplay(0, 0, enabled=self.ctx.is_main, tty=False)
        training = mode != "eval"
        # the model: built on the meta device, sharded (FSDP2), then filled from the first rank
        self.resume_from = self.resume_point()
        check_config_paths(cfg, mode, resuming=self.resume_from is not None)
        self.config_notes = self.config_changes(self.resume_from) if self.resume_from is not None else []
        # runconfig.checkpoint_path's weights start a new run; a resumed one takes its checkpoint's
        self.base_folder = base_folder(cfg) if self.resume_from is None else None
        self.model, self.fingerprint = model_at(cfg, self.resume_from, self.base_folder, self.ctx,
                                                wrap=training or self.ctx.mode == "fsdp")
        self.base_model = unwrap(self.model)
        # train_input.use_cached_features: a frozen encoder and an up-to-date cache, else refuse
        check_cached_features(cfg, self.base_model, mode)
        self.plan: StepPlan | None = None
        self.train_data: TrainData | None = None
        self.dependencies: dict[str, Any] | None = None
        self.optimizer = self.scheduler = None
        self.trainable_params: list[torch.nn.Parameter] = []
        self.checkpointer: Checkpointer | None = None
        self.preference: PreferenceStep | None = None
        if training:
            self.train_data, self.plan = TrainData.for_run(cfg, self.base_model, self.ctx)
            self.model = self.wrap_ddp()
            self.dependencies = self.ctx.on_main(run_dependencies, cfg, self.train_data.samples, self.base_folder)
            self.optimizer = build_optimizer(self.model, cfg.optimizer)
            self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.optimizer.lr, self.plan.total_steps)
            self.trainable_params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.checkpointer = Checkpointer(self.run_folder, self.model, self.optimizer, self.ctx, self.run,
                                             self.trainer_state, self.saved_processor)
            if cfg.preference is not None:
                self.preference = PreferenceStep(cfg.preference, self.model, self.train_data, self.ctx,
                                                 self.autocast, cfg.model.loss_on_supervised_only)
        self.evaluator: Evaluator | None = None
        if mode in ("eval", "train_and_eval"):
            every = self.run.eval_steps if mode == "train_and_eval" else None
            self.evaluator = Evaluator(self.model, eval_loader(cfg, self.base_model, self.ctx), self.ctx,
                                       self.autocast, every)
        self.metrics: TrainMetrics | None = None

    # ------------------------------------------------------------------------- setup
    def autocast(self):
        """bf16 autocast with `model.precision: bfloat16` (fp32 master weights), else nothing."""
        if self.cfg.model.precision == "bfloat16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def resume_point(self) -> Path | None:
        """The newest usable checkpoint of the run folder (verified on rank 0, see
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

    def wrap_ddp(self) -> torch.nn.Module:
        """The model the steps run under DDP: the composite wrapped, leaving out the trainable parameters
        that cannot get a gradient (found on the first training sample,
        `distributed.parameters_without_gradient`): with them DDP waits forever for their gradients
        ("Expected to have finished reduction"). Otherwise `self.model` as it is."""
        if not (self.ctx.distributed and self.ctx.mode == "ddp") or self.model is not self.base_model:
            return self.model
        batch = batch_to_device(self.train_data.collate([self.train_data.dataset[0]]), self.device)

        def forward():
            with self.autocast():
                return self.base_model(**model_inputs(batch), compute_logits=True).logits

        unused = parameters_without_gradient(self.base_model, forward)
        if unused and self.ctx.is_main:
            self.console.message(f"note: DDP leaves out {len(unused)} trainable parameter tensors that get no gradient "
                                 f"(e.g. {unused[0]}: after the selected feature layer)")
        return wrap_model(self.base_model, self.ctx, self.run.find_unused_parameters, self.cfg.model.precision,
                          without_gradient=unused, synced=True)

    def saved_processor(self):
        """(processor, why not) saved with checkpoints and final_model (see `data.processor_for`)."""
        return processor_for(self.cfg.train_input, vision_geometry(self.base_model)[1], self.base_model)

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
            sum(item_count(b, "vision", "pixel_values") for b in micro_batches),
            *work.to_list(),
        ]
        reduced = [int(v) for v in ctx.all_reduce_sum(local).tolist()]
        loss_tokens, tokens, samples, images = reduced[:4]
        work = StepWork.from_list(reduced[4:])
        if self.cfg.model.loss_scaling == "num_tokens":
            denom = float(max(loss_tokens, 1))
        else:
            denom = float(self.plan.global_batch)
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

    def optimizer_step(self, micro_batches: list[dict], step: int) -> StepResult:
        """Forward/backward every micro-batch, check the loss and gradient norm, clip, step. Raises
        NonFiniteLossError (naming the step and the last checkpoint) for a non-finite loss or norm."""
        if self.preference is not None:
            res = self.preference.accumulate(micro_batches)
        else:
            res = self.accumulate(micro_batches)
        last_saved = self.checkpointer.last_saved
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

    # --------------------------------------------------------------------- checkpoints
    def trainer_state(self, step: int) -> dict[str, Any]:
        """What a checkpoint of step `step` records besides weights, optimizer and RNG state
        (`trainer_state.json`)."""
        unwritten = list(self.metrics.unwritten) if self.metrics is not None else []
        return {
            "global_step": step,
            "epoch": step / self.plan.steps_per_epoch,
            "samples_seen": step * self.plan.global_batch,
            "global_batch_size": self.plan.global_batch,
            "world_size": self.ctx.world_size,
            "scheduler": self.scheduler.state_dict(),
            "trainable_only": self.run.save_trainable_only,
            "frozen_fingerprint": self.fingerprint,
            "total_steps": self.plan.total_steps,
            "seed": self.run.seed,
            "config": self.cfg.model_dump(mode="json"),
            **({"unwritten_metrics": unwritten} if unwritten else {}),
            "depends_on": self.dependencies,
        }

    def resolved_config(self) -> str:
        """`resolved_config.yaml`: the config as the run uses it, after a comment with its step plan."""
        plan = self.plan
        return (f"# resolved: total_steps {plan.total_steps}, steps_per_epoch {plan.steps_per_epoch}, "
                f"world_size {self.ctx.world_size}, micro_batch_size {plan.micro_batch}, "
                f"accumulation_steps {plan.accum}\n" + config_to_yaml(self.cfg))

    # -------------------------------------------------------------------------- run
    def train(self) -> dict[str, Any]:
        """Train from the resume point (or step 0) to `plan.total_steps`: write the resolved config,
        restore the checkpoint's optimizer, RNG and schedule, then run the steps, recording metrics,
        saving checkpoints and evaluating when their settings say; the final model at the end
        (`runconfig.save_final_model`). Returns {start_step, total_steps, final_step, last_loss,
        eval (the last evaluation)}.

        SIGTERM / SIGINT stop it at the next step boundary, on every rank, after a checkpoint of that
        step (TrainingStopped); so does a step whose metrics a full disk kept out (MmloomError naming
        what the run can resume from). Raises NonFiniteLossError for a non-finite loss or gradient norm."""
        ctx, run, plan = self.ctx, self.run, self.plan
        if ctx.is_main:
            self.run_folder.write_resolved_config(self.resolved_config())
        if self.preference is not None:  # precomputed reference log-probabilities, before any update
            self.preference.prepare(self.run_folder.reference_logps, self.resume_from is not None, plan.micro_batch,
                                    self.cfg.train_input.num_workers, run.seed)
        start_step = 0
        if self.resume_from is not None:
            start_step = self.resume_state(self.resume_from, run.resume_weights_only, same_run=True)
        elif run.checkpoint_path is not None and run.load_checkpoint_states == "all":
            start_step = self.resume_state(self.base_folder, False, same_run=False)
        if ctx.is_main:
            self.base_model.trainable_summary(print_table=True)
        tokens, _, positions = vision_geometry(self.base_model)
        earlier = read_trainer_state(self.resume_from).get("unwritten_metrics", []) if self.resume_from else []
        flops = FlopsEstimator(self.base_model, positions, tokens)
        self.metrics = TrainMetrics(self.run_folder, ctx, plan.total_steps, plan.steps_per_epoch, run.log_steps,
                                    run.mfu_peak_flops, flops, start_step, earlier)
        result: dict[str, Any] = {"start_step": start_step, "total_steps": plan.total_steps}
        if start_step >= plan.total_steps:
            self.metrics.message(f"training already finished at step {start_step}")
        else:
            batches = iter(self.train_data.loader(self.cfg.train_input, plan, start_step))
        with StopSignals() as stops:  # SIGTERM / Ctrl-C: a checkpoint at the next step boundary
            try:
                for step in range(start_step, plan.total_steps):
                    result["last_loss"], evaluation = self.train_step(step, batches, stops)
                    if evaluation is not None:
                        result["eval"] = evaluation
            finally:
                self.metrics.close()
        if run.save_final_model:
            self.checkpointer.save_final_model()
        result["final_step"] = plan.total_steps
        return result

    def train_step(self, step: int, batches, stops: StopSignals) -> tuple[float, dict[str, Any] | None]:
        """One optimizer step (`step` 0-based) on the next micro-batches of `batches`, then what the
        components decide to do after it: metrics, checkpoint, evaluation. Returns the step's loss and
        the evaluation results (None when there was none). A stop asked for on any rank (`stops`) ends
        the run here, after a checkpoint of the step (TrainingStopped)."""
        t0 = time.perf_counter()
        micro_batches = [next(batches) for _ in range(self.plan.accum)]
        t_data = time.perf_counter() - t0
        lr = self.optimizer.param_groups[0]["lr"]
        lrs = group_lrs(self.optimizer)
        res = self.optimizer_step(micro_batches, step)
        done, total = step + 1, self.plan.total_steps
        self.metrics.step(done, res, lr, lrs, time.perf_counter() - t0, t_data, last_step=done == total)
        self.checkpointer.save(done, last_step=done == total)
        evaluation = self.evaluator.run(done, last_step=done == total) if self.evaluator is not None else None
        if evaluation is not None:
            self.metrics.eval(done, evaluation)
        try:  # every rank learns of a SIGTERM / Ctrl-C, or a failed write, on any rank
            signum = stops.agreed(self.ctx, self.metrics.write_error)
        except StepFailure as failure:
            raise self.stopped_by_failure(failure, done) from None
        if signum is not None and done < total:
            if self.checkpointer.last_saved != done:
                self.checkpointer.save(done, force=True)
            raise TrainingStopped(
                f"stopped by {StopSignals.name(signum)} after step {done} of {total}: "
                f"saved {self.run_folder.checkpoint(done)}; run the same command again to resume",
                signum,
            )
        return res.loss, evaluation

    def stopped_by_failure(self, failure: StepFailure, step: int) -> MmloomError:
        """The one-line error that ends a run whose step `step` could not be recorded (metrics.jsonl
        on a full disk): a checkpoint of `step` is tried first when the step has none holding every
        unwritten record (collective), and the error names what the run can resume from."""
        saved = self.checkpointer
        if saved.last_saved == step and len(saved.last_state.get("unwritten_metrics", [])) == len(self.metrics.unwritten):
            kept = f"{self.run_folder.checkpoint(step)} holds it"
        else:
            try:
                kept = f"saved {saved.save(step, force=True)}"
            except CheckpointWriteError as err:
                kept = f"no checkpoint of it could be written either ({err})"
        return MmloomError(f"{failure}; training stopped after step {step}: {kept}; free some space and run the same "
                           "command again to resume")

    def config_changes(self, folder: Path) -> list[str]:
        """Compare this run's config with the one the checkpoint `folder` was trained with (see
        `config.resume_changes`): raises MmloomError for changes a resume cannot honour, returns
        notes on the changes that apply and those that are not used."""
        state = read_trainer_state(folder)
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
        state, notes = self.checkpointer.load(folder, weights_only=weights_only, same_run=same_run)
        start_step = int(state["global_step"])
        if state.get("global_batch_size") != self.plan.global_batch:
            raise MmloomError(
                f"{folder} was written with train_input.batch_size {state.get('global_batch_size')}, "
                f"this config has {self.plan.global_batch}: the data position cannot be resumed"
            )
        if same_run:
            notes += self.config_notes
            notes += check_resume_dependencies(folder, state.get("depends_on"), self.dependencies,
                                               self.run.resume_allow_changed)
        if state.get("total_steps") not in (None, self.plan.total_steps):
            notes.append(f"the learning-rate schedule now spans {self.plan.total_steps} steps "
                         f"(the checkpoint's run planned {state['total_steps']})")
        set_schedule_step(self.scheduler, start_step)  # the schedule of this run's config, at the step
        if self.ctx.is_main:
            how = "; weights only: fresh optimizer and RNG state" if weights_only else ""
            self.console.message(f"resuming from {folder} (step {start_step}{how})")
            for note in notes:
                self.console.message(f"note: {note}")
        return start_step

    def evaluate_only(self) -> dict[str, Any]:
        """--mode eval: the weights of the latest checkpoint in MODEL_DIR (else checkpoint_path, else
        the base model) evaluated on `eval_input`; the results are written to eval_results.json and
        returned ({step, weights, eval_loss, perplexity, accuracy, num_tokens, num_samples})."""
        source = self.resume_from or self.base_folder
        step = read_trainer_state(source)["global_step"] if self.resume_from is not None else 0
        results = self.evaluator.evaluate()
        results = {"step": step, "weights": str(source) if source else "initial", **results}
        if self.ctx.is_main:
            self.run_folder.write_eval_results(results)
            self.console.log(results)
        return results


def run_training(cfg: TrainConfig, model_dir: str | Path, mode: str = "train", ctx: DistContext | None = None,
                 lock: bool = True) -> dict[str, Any]:
    """Train and/or evaluate (`mode`: train, eval, train_and_eval) from the config `cfg` into the run
    folder `model_dir` on the ranks of `ctx` (one process by default), holding the folder's lock
    (`run_folder.RunFolder.lock`: exclusive to train, shared to evaluate) throughout; `lock` False
    when the caller holds it already (`mmloom train` takes it before importing the trainer).
    Returns :meth:`Trainer.train`'s result (with --mode train_and_eval, the last evaluation is also
    written to eval_results.json) or :meth:`Trainer.evaluate_only`'s. Raises as they do."""
    ctx = ctx or DistContext()
    with RunFolder(model_dir).lock(ctx, mode) if lock else contextlib.nullcontext():
        trainer = Trainer(cfg, model_dir, ctx=ctx, mode=mode)
        if mode == "eval":
            return trainer.evaluate_only()
        result = trainer.train()
        if mode == "train_and_eval" and "eval" in result and ctx.is_main:
            trainer.run_folder.write_eval_results({"step": result["final_step"], **result["eval"]})
        return result
