"""The supervised-positions-only, chunked loss equals the LLM's own loss, value and gradients."""

import pytest
import torch

from helpers import pad_batch, sample_ids, vlm
from mmloom.model import loss as loss_module


@pytest.mark.parametrize("llm_kind", ["llama", "qwen2", "gemma"])
def test_fast_loss_matches_full_logits_loss(llm_kind, monkeypatch):
    rows = [sample_ids(16, (30, 31, 32, 33, 34, 35)), sample_ids(16, (40, 41, 42))]
    ids, mask = pad_batch(rows)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :19] = -100  # a prompt: only part of each sample is supervised
    pixels = torch.randn(2, 3, 32, 32)

    def run(compute_logits, **extra):
        model = vlm(llm_kind).train(encoders_mode={"vision": (False, True)}, llm_mode=True)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        out = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels,
                    compute_logits=compute_logits, **extra)
        out.loss.backward()
        return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setattr(loss_module.supervised_loss, "__defaults__", (None, 3, None, None))  # tiny chunks
    full, full_grads = run(True)
    fast, fast_grads = run(False)
    assert fast.logits is None
    torch.testing.assert_close(fast.loss, full.loss, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # Token-level normalisation across micro-batches: sum / num_items_in_batch, as HF does.
    full_n, _ = run(True, num_items_in_batch=torch.tensor(50))
    fast_n, _ = run(False, num_items_in_batch=torch.tensor(50))
    torch.testing.assert_close(fast_n.loss, full_n.loss, atol=1e-5, rtol=1e-5)


def test_a_micro_batch_without_supervised_tokens_still_backpropagates():
    """E.g. the padding samples that fill the last step of an epoch (drop_last: false)."""
    from mmloom.model.loss import supervised_loss

    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11)
    loss = supervised_loss(hidden, torch.full((2, 5), -100), head)
    loss.backward()
    assert float(loss) == 0.0 and hidden.grad is not None and not hidden.grad.any()
