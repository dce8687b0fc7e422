"""The trainer's data wiring (`mmloom.training.data`) and evaluation: which collator and sampler a
`train_input` section gives, the attention switch packing needs, pinned memory, and evaluation
at supervised positions only (same figures as full logits, no full-vocabulary logits)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import IMAGE_ID, vlm
from mmloom.data.collate import PackedCollator, TrainCollator
from mmloom.data.sampling import LengthGroupedStepSampler, PackedStepSampler, StepBatchSampler
from mmloom.errors import MmloomError
from mmloom.model.attention import VARLEN_ATTENTION
from mmloom.model.batch import model_inputs
from mmloom.training import data as train_data
from mmloom.training.config import InputConfig
from mmloom.training.distributed import DistContext
from mmloom.training.evaluate import evaluate
from test_packing import N_IMG, PAD, items_mixed


class Sized:
    max_sequence_length = 64


def section(**kw) -> InputConfig:
    return InputConfig(data_dir="x", batch_size=8, micro_batch_size=2, **kw)


def test_sections_pick_collator_sampler_and_attention():
    plan = train_data.StepPlan(samples=8, global_batch=4, micro_batch=2, total_steps=2, world_size=2, rank=1, seed=0,
                               shuffle=True)
    lengths = np.arange(1, 9)
    model = vlm().float()
    collator = TrainCollator(IMAGE_ID, PAD, N_IMG)
    assert train_data.train_collator(collator, section(), model) is collator
    assert model.language_model.config._attn_implementation == "sdpa"  # untouched without packing
    assert type(train_data.step_sampler(section(), Sized(), None, plan, start_step=0)) is StepBatchSampler
    grouped = train_data.step_sampler(section(group_by_length=True), Sized(), lengths, plan, start_step=0)
    assert type(grouped) is LengthGroupedStepSampler
    packed = train_data.step_sampler(section(packing=True), Sized(), lengths, plan, start_step=0)
    assert type(packed) is PackedStepSampler and packed.max_length == 64
    assert isinstance(train_data.train_collator(collator, section(packing=True), model), PackedCollator)
    assert model.language_model.config._attn_implementation == VARLEN_ATTENTION
    with pytest.raises(ValueError, match="packing and group_by_length exclude each other"):
        section(packing=True, group_by_length=True)
    flex = vlm().float()
    flex.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(MmloomError, match="packing needs attn_implementation sdpa, eager or flash"):
        train_data.train_collator(collator, section(packing=True), flex)


def test_loader_pins_memory_when_cuda_runs(monkeypatch):
    dataset = list(range(4))
    sampler = [[0, 1], [2, 3]]
    assert not train_data.make_loader(dataset, sampler, list, 0).pin_memory  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_data.make_loader(dataset, sampler, list, 0).pin_memory
    assert not train_data.make_loader(dataset, sampler, list, 0, pin_memory=False).pin_memory


@pytest.mark.parametrize("packed", [False, True])
def test_evaluation_runs_the_head_at_supervised_positions_only(packed, monkeypatch):
    """evaluate() gives the loss and accuracy of full logits, while the LM head only ever sees the
    supervised positions (padded and packed batches alike)."""
    torch.set_num_threads(1)
    model = vlm().float()
    items = items_mixed()
    collator = TrainCollator(IMAGE_ID, PAD, N_IMG)
    batches = [collator(items[:3]), collator(items[3:])]
    with torch.no_grad():  # by hand, from full logits
        loss_sum, tokens, correct = 0.0, 0, 0
        for b in batches:
            logits = model(**model_inputs(b)).logits[:, :-1].double()
            labels = b["labels"][:, 1:]
            keep = labels != -100
            loss_sum += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            tokens += int(keep.sum())
            correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
    if packed:
        train_data.train_collator(collator, section(packing=True), model)
        batches = [PackedCollator(collator)(items[:3]), PackedCollator(collator)(items[3:])]
    head_rows = []
    head = model.language_model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[0]))
    result = evaluate(model, batches, DistContext())
    assert sum(head_rows) == tokens  # the head ran on the supervised positions only
    assert result["num_tokens"] == tokens and result["num_samples"] == len(items)
    assert result["eval_loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss_sum / tokens), rel=1e-5)
    assert result["accuracy"] == pytest.approx(correct / tokens)
    assert model.training  # the model is back in training mode
