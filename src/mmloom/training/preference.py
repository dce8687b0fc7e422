"""The recipe's third phase: preference tuning (DPO and its variants) on pairs built with `dataset.preference`.

A run with a `preference` section trains on `mmloom.data.preference.PreferencePairs` (wired by
`mmloom.training.data.TrainData`), and its `Trainer` asks a `PreferenceStep` for each optimizer step's
forward and backward instead of the token loss: each optimizer step takes
`train_input.batch_size` pairs; each micro-batch holds its pairs' 2P sequences (chosen, then rejected) in one
forward (padded rows, or with `train_input.packing` one padding-free row where both answers of a pair sit side
by side), and the LM head runs only on the answers' tokens (`MultimodalModel(..., token_logps=True)`).

**Loss and its normalisation.** The per-pair losses of `mmloom.model.preference_loss` (TRL's definitions) are
summed and divided by the number of pairs of the whole optimizer step (all micro-batches, all ranks; padding
pairs excluded), so the gradient is that of the mean pair loss however the step is split (TRL: the mean over
the step's pairs when every micro-batch holds as many). With `rpo_alpha` > 0, `rpo_alpha` times the chosen answers'
mean token cross-entropy is added: their summed negative log-probabilities over the chosen tokens of the whole step
(counted and summed over the ranks before the first forward, padding pairs excluded), so this term too does not
depend on the split; TRL's token mean is over one micro-batch on one rank (the same when a step is one
micro-batch, as in the parity test; with accumulation TRL averages the micro-batches' means).

**The reference model** (the starting model, frozen), without a second copy in memory:

- `adapters_disabled` (LoRA runs where only adapters train): the same forward with every PEFT adapter disabled
  (`PeftModel.disable_adapter()`), under `torch.no_grad()`, each micro-batch (TRL's choice for PEFT);
- `precomputed` (every other run, e.g. a full fine-tune or LoRA plus a trainable projector, where disabling the
  adapters would not give the starting model back): before the first step, one no-grad pass of the starting
  model over the training pairs (sharded over the ranks, in eval mode), stored as `MODEL_DIR/reference_logps.
  safetensors` (float64 per pair) and read back when the run resumes. It costs one forward pass over the data
  and no memory during training, where a frozen copy would cost a whole model's weights (its forward over one
  epoch costs the same; over several epochs, more). The file is `RunFolder.reference_logps`.

`auto` picks `adapters_disabled` when every trainable parameter is an adapter, else `precomputed`.
Metrics (metrics.jsonl, TensorBoard, `mmloom plot`): TRL's `rewards/chosen`, `rewards/rejected`,
`rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`, each the mean over the step's pairs; with
`rpo_alpha`, TRL's `nll_loss` (the chosen answers' mean token cross-entropy, before the weight).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from mmloom.data.sampling import EvalSampler
from mmloom.errors import MmloomError
from mmloom.files import atomic_file
from mmloom.model.adapters import is_adapter, is_peft_model
from mmloom.model.batch import batch_to_device, item_count, model_inputs
from mmloom.model.preference_loss import (
    PairLogps,
    chosen_nll_sum,
    preference_losses,
    preference_sums,
    sequence_logps,
    sequence_token_counts,
)
from mmloom.training.config import PreferenceSection
from mmloom.training.data import TrainData, make_loader
from mmloom.training.distributed import DistContext, gradient_sync, unwrap
from mmloom.training.metrics import StepResult, StepWork, batch_work

METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


def reference_mode(setting: str, model) -> str:
    """`adapters_disabled` or `precomputed` for `preference.reference` (`auto`: see the module docstring).
    Raises MmloomError for `adapters_disabled` on a model whose trainable parameters are not all adapters."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    adapters_only = bool(trainable) and all(is_adapter(name) for name in trainable) \
        and any(is_peft_model(m) for m in model.modules())
    if setting == "adapters_disabled" and not adapters_only:
        others = [name for name in trainable if not is_adapter(name)]
        raise MmloomError("preference.reference: adapters_disabled gives the starting model back only when the LoRA "
                          f"adapters are all that trains; {others[0] if others else 'no adapter'} trains too (use "
                          "precomputed or auto)")
    if setting == "auto":
        return "adapters_disabled" if adapters_only else "precomputed"
    return setting


@contextlib.contextmanager
def adapters_disabled(model):
    """Every PEFT adapter of `model` disabled (PEFT's `disable_adapter()` of each wrapped part): the base model."""
    with contextlib.ExitStack() as stack:
        for module in unwrap(model).modules():
            if is_peft_model(module):
                stack.enter_context(module.disable_adapter())
        yield


class PreferenceStep:
    """The preference phase's optimizer steps, the component a `Trainer` asks instead of its token loss.

    `settings`: the config's `preference` section; `model`: what the steps run (wrapped or not);
    `train_data`: the run's pairs and their collator; `ctx`, `autocast`: the trainer's ranks and its
    autocast context; `supervised_only`: `model.loss_on_supervised_only` (for the FLOPs of a step).
    The reference mode is chosen here (`reference_mode`; MmloomError when it cannot be honoured);
    :meth:`prepare` readies a precomputed reference before the first step."""

    def __init__(self, settings: PreferenceSection, model, train_data: TrainData, ctx: DistContext, autocast,
                 supervised_only: bool = True):
        self.settings = settings
        self.model = model
        self.base_model = unwrap(model)
        self.train_data = train_data
        self.ctx = ctx
        self.device = ctx.device
        self.autocast = autocast
        self.supervised_only = supervised_only
        self.mode = reference_mode(settings.reference, self.base_model)
        self.reference: dict[str, torch.Tensor] | None = None  # precomputed: (N,) chosen / rejected

    # ------------------------------------------------------------------------------------ forward
    def sequence_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(2P,) summed answer log-probabilities and (2P,) answer token counts of a batch's sequences."""
        with self.autocast():
            out = self.model(**model_inputs(batch), labels=batch["labels"], compute_logits=False, token_logps=True)
        return sequence_logps(out.token_logps, batch["labels"], batch["sequence_spans"], 2 * batch["pairs"])

    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) reference log-probabilities of the chosen and the rejected answers of a batch."""
        if self.mode == "precomputed":
            index = batch["pair_index"].cpu()
            device = batch["labels"].device
            return self.reference["chosen"][index].to(device), self.reference["rejected"][index].to(device)
        with torch.no_grad(), adapters_disabled(self.model):
            logps, _ = self.sequence_logps(batch)
        p = batch["pairs"]
        return logps[:p].detach().double(), logps[p:].detach().double()

    # ------------------------------------------------------------------------------------- a step
    def accumulate(self, micro_batches: list[dict]) -> StepResult:
        """Forward/backward every micro-batch of one optimizer step (gradients left in .grad) for the mean
        preference loss over the step's pairs (all ranks); returns what the step did, with the reward
        metrics in `extra`."""
        s, ctx = self.settings, self.ctx
        work = sum((batch_work(b, self.supervised_only) for b in micro_batches), StepWork())
        local = [
            sum(float(b["pair_weights"].sum()) for b in micro_batches),
            sum(float((sequence_token_counts(b["labels"], b["sequence_spans"], b["pairs"]) * b["pair_weights"]).sum())
                for b in micro_batches),  # the chosen answers' tokens (RPO's NLL is their mean)
            sum(b["num_loss_tokens"] for b in micro_batches),
            sum(b["num_attended_tokens"] for b in micro_batches),
            sum(b["num_samples"] for b in micro_batches),
            sum(item_count(b, "vision", "pixel_values") for b in micro_batches),
            *work.to_list(),
        ]
        reduced = ctx.all_reduce_sum(local).tolist()
        pairs, chosen_tokens = max(reduced[0], 1.0), max(reduced[1], 1.0)
        loss_tokens, tokens, samples, images = (int(v) for v in reduced[2:6])
        work = StepWork.from_list([int(v) for v in reduced[6:]])
        scale = float(ctx.world_size) if ctx.distributed else 1.0
        totals = torch.zeros(2 + len(METRIC_KEYS), dtype=torch.float64)  # loss, NLL sum, metric sums
        for i, batch in enumerate(micro_batches):
            batch = batch_to_device(batch, self.device)
            p = batch["pairs"]
            weights = batch["pair_weights"].to(self.device)
            with gradient_sync(self.model, ctx, sync=(i == len(micro_batches) - 1)):
                ref_chosen, ref_rejected = self.reference_logps(batch)
                logps, counts = self.sequence_logps(batch)
                pair = PairLogps(logps[:p], logps[p:], ref_chosen.to(logps.dtype), ref_rejected.to(logps.dtype),
                                 counts[:p], counts[p:])
                losses = preference_losses(pair, s.loss, s.beta, s.label_smoothing)
                loss = (losses * weights).sum() / pairs
                nll, _ = chosen_nll_sum(pair, weights)
                if s.rpo_alpha:
                    loss = loss + s.rpo_alpha * nll / chosen_tokens
                (loss * scale).backward()
            sums = preference_sums(pair, s.beta, weights)
            totals += torch.stack([loss.detach().double().cpu(), nll.detach().double().cpu(),
                                   *(sums[k].cpu() for k in METRIC_KEYS)])
        totals = ctx.all_reduce_sum(totals)
        extra = {key: float(totals[2 + k]) / pairs for k, key in enumerate(METRIC_KEYS)}
        if s.rpo_alpha:
            extra["nll_loss"] = float(totals[1]) / chosen_tokens
        extra["pairs"] = int(reduced[0])
        return StepResult(float(totals[0]), None, tokens, loss_tokens, samples, images, work, extra=extra)

    # ----------------------------------------------------------------------------- the reference
    def prepare(self, path: Path, resuming: bool, micro_batch: int, num_workers: int = 0, seed: int = 0) -> None:
        """`precomputed`: read the run's reference log-probabilities from `path` (`RunFolder.reference_logps`)
        when it resumes (`resuming`), else compute them with the starting model (every rank takes part,
        `micro_batch` pairs a batch) and write them there (rank 0, atomically). Nothing for
        `adapters_disabled`. Raises MmloomError when a resumed run's file is missing or does not fit the data."""
        if self.mode != "precomputed":
            return
        n = len(self.train_data.dataset)
        if resuming:
            if not path.is_file():
                raise MmloomError(f"{path} is missing: a resumed preference run reads the reference log-probabilities "
                                  "its first start computed (start the run afresh in a new --model-dir)")
            self.reference = read_reference(path, n)
            return
        self.reference = self.compute(n, micro_batch, num_workers, seed)
        if self.ctx.is_main:
            write_reference(path, self.reference)
        self.ctx.barrier()

    @torch.no_grad()
    def compute(self, n: int, micro_batch: int, num_workers: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
        """The starting model's (N,) log-probabilities of every pair's chosen and rejected answers (eval mode,
        no grad, the run's autocast; the pairs dealt over the ranks, every rank running as many batches)."""
        data = self.train_data
        sampler = EvalSampler(n, self.ctx.world_size, self.ctx.rank, micro_batch)
        loader = make_loader(data.dataset, sampler, data.collate, num_workers, seed)
        out = torch.zeros(2, n, dtype=torch.float64)
        was_training = self.base_model.training
        self.model.eval()
        try:
            for batch in loader:
                batch = batch_to_device(batch, self.device)
                logps, _ = self.sequence_logps(batch)
                p = batch["pairs"]
                keep = batch["pair_weights"].cpu() > 0
                index = batch["pair_index"].cpu()[keep]
                out[0, index] = logps[:p].double().cpu()[keep]
                out[1, index] = logps[p:].double().cpu()[keep]
        finally:
            self.base_model.train(was_training)
        out = self.ctx.all_reduce_sum(out)  # each pair was computed by one rank
        return {"chosen": out[0], "rejected": out[1]}


def write_reference(path: Path, reference: dict[str, torch.Tensor]) -> None:
    """The reference log-probabilities as safetensors, atomically."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp),
                  metadata={"format": "mmloom-reference-logps/1", "pairs": str(reference["chosen"].numel())})


def read_reference(path: Path, n: int) -> dict[str, torch.Tensor]:
    """The reference log-probabilities of `write_reference`; MmloomError unless they hold `n` pairs."""
    from safetensors.torch import load_file

    try:
        reference = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged file, named in one line
        raise MmloomError(f"{path}: not a readable reference log-probability file ({err})") from None
    if set(reference) != {"chosen", "rejected"} or any(v.shape != (n,) for v in reference.values()):
        raise MmloomError(f"{path} does not hold the reference log-probabilities of the {n} training pairs (was the "
                          "data rebuilt? start the run afresh in a new --model-dir)")
    return reference
