"""Eval loss (token mean), perplexity and next-token accuracy over an eval set, on any number of ranks."""

from __future__ import annotations

import contextlib
import math

import torch

from mmloom.model.batch import batch_to_device, model_inputs
from mmloom.model.merge import IGNORE_INDEX
from mmloom.training.distributed import DistContext


def supervised_samples(batch: dict) -> int:
    """Samples of a batch with at least one supervised token: rows of a padded batch, `spans` of a
    packed one."""
    supervised = batch["labels"] != IGNORE_INDEX  # (B, T); a sample's first label is never supervised
    if batch.get("spans") is not None:
        return sum(bool(supervised[row, start:end].any()) for row, start, end in batch["spans"])
    return int((supervised[:, 1:].sum(dim=1) > 0).sum())


@torch.no_grad()
def evaluate(model, loader, ctx: DistContext, autocast=contextlib.nullcontext) -> dict:
    """Eval loss (mean over supervised tokens), perplexity and next-token accuracy (argmax at
    supervised positions), summed over every rank's batches. The model computes them at the
    supervised positions only (`token_stats=True`: no full-vocabulary logits)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, tokens, correct, samples
    for batch in loader:
        batch = batch_to_device(batch, ctx.device)
        with autocast():
            out = model(**model_inputs(batch), labels=batch["labels"], compute_logits=False, token_stats=True)
        totals[0] += float(out.loss_sum)
        totals[1] += float(out.num_tokens)
        totals[2] += float(out.num_correct)
        totals[3] += supervised_samples(batch)
    if was_training:
        model.train()
    totals = ctx.all_reduce_sum(totals)
    loss_sum, tokens, correct, samples = totals.tolist()
    loss = loss_sum / tokens if tokens else float("nan")
    return {
        "eval_loss": loss,
        "perplexity": math.exp(loss) if tokens and loss < 700 else float("inf"),
        "accuracy": correct / tokens if tokens else float("nan"),
        "num_tokens": int(tokens),
        "num_samples": int(samples),
    }


class Evaluator:
    """Evaluation of `model` on the micro-batches of `loader` (:func:`evaluate`): alone
    (`--mode eval`: :meth:`evaluate`), or during a run (`--mode train_and_eval`: :meth:`run` after
    every `every` steps (`runconfig.eval_steps`) and after the last one; never when `every` is None)."""

    def __init__(self, model, loader, ctx: DistContext, autocast=contextlib.nullcontext, every: int | None = None):
        self.model = model
        self.loader = loader
        self.ctx = ctx
        self.autocast = autocast
        self.every = every

    def due(self, step: int, last_step: bool = False) -> bool:
        """Whether step `step` (1-based, done) is evaluated."""
        return bool(self.every) and (step % self.every == 0 or last_step)

    def run(self, step: int, last_step: bool = False) -> dict | None:
        """The evaluation results after step `step` when it is due (:meth:`due`), else None. Collective."""
        return self.evaluate() if self.due(step, last_step) else None

    def evaluate(self) -> dict:
        """Eval loss, perplexity, accuracy, token and sample counts of the model as it is now. Collective."""
        return evaluate(self.model, self.loader, self.ctx, self.autocast)

