"""Freezing, eval mode of frozen parts, trainable summary, gradient checkpointing, generation."""

import pytest
import torch

from helpers import pad_batch, sample_ids, vlm
from mmloom.errors import MmloomError


def test_train_modes_set_requires_grad_and_eval_and_return_model():
    model = vlm()
    assert model.train(encoders_mode={"vision": (False, True)}, llm_mode=False) is model
    assert not any(p.requires_grad for p in model.vision_encoder.module.parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert all(p.requires_grad for p in model.vision_encoder.projector.parameters())
    assert not model.vision_encoder.module.training and not model.language_model.training
    assert model.vision_encoder.projector.training
    model.train()  # a later plain train() keeps frozen parts in eval mode
    assert not model.language_model.training and not model.language_model.model.layers[0].training
    with pytest.raises(MmloomError, match=r"unknown encoder\(s\) \['audio'\]; this model has \['vision'\]"):
        model.train(encoders_mode={"audio": (True, True)})


def test_freeze_regexes_with_cerebras_aliases():
    model = vlm()
    assert model.freeze(["^image_model", "^text_model"]) is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("vision_encoder.projector") for n in trainable)
    assert not model.vision_encoder.module.training and model.vision_encoder.projector.training
    model.unfreeze(r"^language_model\.model\.layers\.1\.")
    assert model.language_model.model.layers[1].training and not model.language_model.model.layers[0].training
    with pytest.raises(MmloomError, match=r"freeze pattern '\^audio_model' matches no parameter; names start with"):
        model.freeze("^audio_model")


def test_trainable_summary_counts_parts(capsys):
    model = vlm().train(encoders_mode={"vision": (False, True)}, llm_mode=False)
    rows = {name: (total, trainable) for name, total, trainable in model.trainable_summary()}
    projector = sum(p.numel() for p in model.vision_encoder.projector.parameters())
    assert rows["vision_encoder.projector"] == (projector, projector)
    assert rows["language_model"][1] == 0 and rows["vision_encoder.module"][1] == 0
    assert "vision_encoder.projector" in capsys.readouterr().out


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.tensor([sample_ids(16)] * 2)
    pixels = torch.randn(2, 3, 32, 32)

    def grads(checkpointing):
        model = vlm().train(encoders_mode={"vision": (True, True)}, llm_mode=True)
        for module in model.modules():  # no dropout: compare exactly
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=ids, labels=ids, pixel_values=pixels).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_batched_left_padded_generation_matches_one_by_one_and_sampling_runs():
    model = vlm().eval()
    rows = [sample_ids(16, (30, 31, 32, 33)), sample_ids(16, (40,))]
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = pad_batch(rows, "left")
    batched = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                             pad_token_id=3)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), pixel_values=pixels[i : i + 1], max_new_tokens=6,
                               do_sample=False, pad_token_id=3)
        assert batched[i, -6:].tolist() == alone[0, -6:].tolist()
    torch.manual_seed(1)
    sampled = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, do_sample=True,
                             temperature=1.5, top_k=50, pad_token_id=3)
    assert sampled.shape == (2, ids.shape[1] + 6) and torch.equal(sampled[:, : ids.shape[1]], ids)
