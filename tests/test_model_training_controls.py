"""Freezing, eval mode of frozen parts, trainable summary, gradient checkpointing, generation."""

import pytest
import torch

from helpers import pad_batch, sample_ids, vlm
from mmloom import FeatureSelect, ModalEncoderModule, MultimodalModel
from mmloom.errors import MmloomError
from mmloom.testing import tiny_clip_vision, tiny_llm, tiny_opt


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


def _lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    clip = get_peft_model(tiny_clip_vision(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         modules_to_save=["post_layernorm"]))
    llm = get_peft_model(tiny_llm("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return MultimodalModel({"vision": ModalEncoderModule(clip, postprocess_module_callback=FeatureSelect(-2, "patch"))},
                           llm, placeholder_token_ids={"vision": 4})


def _trainable(module):
    return sorted(n for n, p in module.named_parameters() if p.requires_grad)


def test_peft_encoder_trains_only_its_adapters_like_the_peft_llm():
    # train(encoders_mode={"vision": (True, ...)}) used to unfreeze every base weight of a LoRA tower.
    model = _lora_model()
    adapters = _trainable(model.vision_encoder.module)  # what get_peft_model leaves trainable
    assert adapters and all("lora_" in n or "modules_to_save" in n for n in adapters)
    llm_adapters = _trainable(model.language_model)
    model.train(encoders_mode={"vision": (True, True)}, llm_mode=True)
    assert _trainable(model.vision_encoder.module) == adapters
    assert _trainable(model.language_model) == llm_adapters
    assert all(p.requires_grad for p in model.vision_encoder.projector.parameters())
    model.train(encoders_mode={"vision": (False, True)}, llm_mode=False)
    assert not _trainable(model.vision_encoder.module) and not _trainable(model.language_model)
    model.train(encoders_mode={"vision": (True, False)})
    assert _trainable(model.vision_encoder.module) == adapters and not _trainable(model.language_model)
    ids = torch.tensor([sample_ids(16)])
    model(input_ids=ids, labels=ids, pixel_values=torch.randn(1, 3, 32, 32)).loss.backward()
    grads = {n for n, p in model.vision_encoder.module.named_parameters() if p.grad is not None}
    assert grads and grads <= set(adapters)  # layer -2: the last layer and post_layernorm get none


def test_unfreeze_keeps_peft_base_weights_frozen():
    model = _lora_model()
    adapters = _trainable(model.vision_encoder.module)
    model.freeze(["^vision_encoder", "^language_model"])
    assert not _trainable(model.vision_encoder.module)
    model.unfreeze("^vision_encoder.module")  # adapters come back, base weights do not
    assert _trainable(model.vision_encoder.module) == adapters
    with pytest.raises(MmloomError, match=r"matches only base weights of a PEFT-wrapped part .*modules_to_save"):
        model.unfreeze(r"vision_encoder\.module\..*encoder\.layers\.0\.mlp\.fc1")
    model.unfreeze("^text_model")
    assert all("lora_" in n for n in _trainable(model.language_model)) and _trainable(model.language_model)


def test_train_semantics_and_positional_misuse():
    model = vlm()
    model.train(encoders_mode={"vision": (True, True)}, llm_mode=True)
    model.train(llm_mode=False)  # freezes the language model only
    assert not _trainable(model.language_model)
    assert all(p.requires_grad for p in model.vision_encoder.parameters())
    assert "llm_mode=False" in MultimodalModel.train.__doc__ and "nothing else" in MultimodalModel.train.__doc__
    with pytest.raises(MmloomError, match=r"mode must be True or False, got dict .*encoders_mode.*by keyword"):
        model.train({"vision": (False, True)}, False)
    with pytest.raises(MmloomError, match=r"encoders_mode must be a dict .*got bool False"):
        model.train(True, False)
    with pytest.raises(MmloomError, match=r"encoders_mode\['vision'\] must be a pair of bools"):
        model.train(encoders_mode={"vision": True})
    with pytest.raises(MmloomError, match="llm_mode must be True, False or None"):
        model.train(llm_mode="yes")


def _saved_bytes_and_grads(phase1: bool, checkpointing: bool, enable_first: bool):
    """Bytes autograd saves for backward in one forward (saved-tensor hooks) and the gradients."""
    torch.manual_seed(0)
    model = vlm(num_hidden_layers=4, hidden_size=64, intermediate_size=256)
    for module in model.modules():  # dropout stays off in frozen parts; make trainable parts comparable too
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0

    def set_mode():
        model.train(encoders_mode={"vision": (False, True)}, llm_mode=not phase1)

    if checkpointing and enable_first:
        model.gradient_checkpointing_enable()
    set_mode()
    if checkpointing and not enable_first:
        model.gradient_checkpointing_enable()
    gen = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.tensor([sample_ids(16, ())]), torch.randint(10, 400, (1, 160), generator=gen)], dim=1)
    labels = ids.clone()
    labels[:, :17] = -100
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=labels, pixel_values=torch.randn(1, 3, 32, 32, generator=gen)).loss
    loss.backward()
    return total[0], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, model


@pytest.mark.parametrize("enable_first", [False, True])
def test_gradient_checkpointing_saves_memory_in_phase1_with_the_same_gradients(enable_first):
    # Frozen modules were in eval mode, where transformers does not checkpoint: phase 1 saved 0.99x.
    plain, grads, _ = _saved_bytes_and_grads(True, False, False)
    checkpointed, ckpt_grads, model = _saved_bytes_and_grads(True, True, enable_first)
    assert checkpointed <= 0.4 * plain, f"{checkpointed} vs {plain} bytes"
    assert set(ckpt_grads) == set(grads) and all(n.startswith("vision_encoder.projector") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # Frozen parts keep dropout off: every submodule of the frozen LLM stays in eval mode.
    layer = model.language_model.model.layers[0]
    assert not any(m.training for m in layer.modules() if m is not layer)
    with torch.no_grad():  # without gradients the frozen layer runs as an eval layer
        model(input_ids=torch.tensor([sample_ids(16)]), pixel_values=torch.randn(1, 3, 32, 32))
    assert not layer.training
    model.eval()
    assert not any(m.training for m in model.modules())
    model.gradient_checkpointing_disable()
    assert not layer._forward_pre_hooks


def test_frozen_checkpointed_layers_keep_layer_dropout_off():
    # OPT decoder layers apply dropout (p=0.1) themselves: a frozen OPT in phase 1 must stay deterministic.
    model = MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision(),
                                                          postprocess_module_callback=FeatureSelect(-2, "patch"))},
                            tiny_opt(), placeholder_token_ids={"vision": 4})
    model.train(encoders_mode={"vision": (False, True)}, llm_mode=False)
    model.gradient_checkpointing_enable()
    ids = torch.tensor([sample_ids(16)])
    pixels = torch.randn(1, 3, 32, 32)
    first = model(input_ids=ids, labels=ids, pixel_values=pixels)
    second = model(input_ids=ids, labels=ids, pixel_values=pixels)
    torch.testing.assert_close(first.logits, second.logits, atol=0, rtol=0)
    first.loss.backward()
