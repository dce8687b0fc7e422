"""Figures and guards pinned to values computed by hand: eval loss/accuracy, the frozen-weights
fingerprint, inline-config mismatches, non-finite gradient norms."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmloom.errors import MmloomError
from mmloom.model.hf_parts import check_inline_matches
from mmloom.model.loss import supervised_token_stats
from mmloom.training.distributed import DistContext
from mmloom.training.evaluate import evaluate
from mmloom.training.model_loading import frozen_fingerprint


class FixedLogits(nn.Module):
    """Has the same logits (B, T, V) whatever the input: its final states are the logits and its
    LM head is the identity, evaluated at the supervised positions as the composite model does
    (`forward(..., labels, compute_logits=False, token_stats=True)`)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, labels=None, compute_logits=True, token_stats=False, **inputs):
        if token_stats:
            return supervised_token_stats(self.logits, labels, nn.Identity())
        return SimpleNamespace(logits=self.logits)


def test_eval_figures_pinned_to_hand_computation():
    # one sample, T = 4, vocabulary 3; position t predicts labels[t + 1]
    logits = torch.tensor([[[2.0, 0.0, 0.0],    # predicts label[1] = 0: argmax 0, correct
                            [0.0, 0.0, 1.0],    # predicts label[2] = 1: argmax 2, wrong
                            [0.0, 3.0, 0.0],    # predicts label[3] = 1: argmax 1, correct
                            [9.0, 9.0, 9.0]]])  # last position: predicts nothing
    labels = torch.tensor([[-100, 0, 1, 1]])
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": labels}
    result = evaluate(FixedLogits(logits), [batch, {**batch, "labels": torch.full((1, 4), -100)}], DistContext())
    # cross-entropy by hand: -log softmax
    l1 = -(2 - math.log(math.exp(2) + 2))           # target 0 of [2, 0, 0]
    l2 = -(0 - math.log(2 + math.e))                # target 1 of [0, 0, 1]
    l3 = -(3 - math.log(math.exp(3) + 2))           # target 1 of [0, 3, 0]
    assert result["num_tokens"] == 3 and result["num_samples"] == 1  # the all-masked sample counts nothing
    assert result["eval_loss"] == pytest.approx((l1 + l2 + l3) / 3, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp((l1 + l2 + l3) / 3), rel=1e-6)
    assert result["accuracy"] == pytest.approx(2 / 3)


def test_frozen_fingerprint_follows_frozen_weights_only():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[0].requires_grad_(False)
    before = frozen_fingerprint(model)
    with torch.no_grad():
        model[1].weight.add_(1.0)  # a trainable weight: the fingerprint does not see it
    assert frozen_fingerprint(model) == before
    with torch.no_grad():
        model[0].weight[0, 0].add_(1e-3)  # a frozen weight changed: a trainable-only checkpoint no longer fits
    assert frozen_fingerprint(model) != before


def test_inline_config_must_match_the_pretrained_folder():
    check_inline_matches({"model_type": "llama", "hidden_size": 48, "pretrained": "x"}, {"hidden_size": 48}, "text_model")
    check_inline_matches({"layers": [1, 2]}, {"layers": (1, 2)}, "text_model")  # list vs tuple is the same
    with pytest.raises(MmloomError, match=r"model.text_model.hidden_size = 64 but the pretrained folder's config has 48"):
        check_inline_matches({"hidden_size": 64}, {"hidden_size": 48}, "text_model")


def test_non_finite_gradient_norm_stops_the_run(tmp_path, monkeypatch, capsys):
    from mmloom.cli.main import main
    from mmloom.training.loop import Trainer
    from test_train_loop import make_data, train_args

    data = make_data(tmp_path / "data", n=8)
    monkeypatch.setattr(Trainer, "clip_gradients", lambda self: float("nan"))
    args = train_args(data, 1, tmp_path / "run", "runconfig.max_steps=2", "runconfig.checkpoint_steps=1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "non-finite gradient norm at step 1" in err and "Last good checkpoint: none" in err
    assert not (tmp_path / "run" / "checkpoint-1").exists()  # nothing saved after a bad step
