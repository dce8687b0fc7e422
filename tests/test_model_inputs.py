"""Input routing, placeholder merging and its errors, padding sides, several items and modalities."""

from unittest import mock

import pytest
import torch

from helpers import AUDIO_ID, IMAGE_ID, audio_vlm, pad_batch, sample_ids, vlm
from mmloom import (
    FeatureSelect,
    ModalEncoderModule,
    MultimodalModel,
    MultimodalProjector,
    MultimodalProjectorConfig,
)
from mmloom.errors import MmloomError
from mmloom.testing import tiny_clip_vision, tiny_llama, tiny_siglip_vision


def test_flat_and_per_encoder_inputs_are_equivalent():
    model = vlm().eval()
    ids = torch.tensor([sample_ids(16)])
    pixels = torch.randn(1, 3, 32, 32)
    flat = model(input_ids=ids, pixel_values=pixels).logits
    nested = model(input_ids=ids, vision={"pixel_values": pixels}).logits
    torch.testing.assert_close(flat, nested, atol=0, rtol=0)


def test_ambiguous_flat_input_names_both_encoders():
    model = MultimodalModel(
        {"left": ModalEncoderModule(tiny_clip_vision()), "right": ModalEncoderModule(tiny_siglip_vision())},
        tiny_llama(),
        placeholder_token_ids={"left": 4, "right": 5},
    )
    with pytest.raises(MmloomError, match=r"'pixel_values' is accepted by encoders left, right.*left=\{'pixel_values'"):
        model(input_ids=torch.tensor([[0, 4]]), pixel_values=torch.randn(1, 3, 32, 32))
    # Namespaced inputs reach each encoder separately: 17 CLIP tokens (CLS kept) + 16 SigLIP tokens.
    ids = torch.tensor([[0, *[4] * 17, *[5] * 16, 9]])
    out = model(input_ids=ids, left={"pixel_values": torch.randn(1, 3, 32, 32)},
                right={"pixel_values": torch.randn(1, 3, 32, 32)})
    assert torch.isfinite(out.logits).all()


def test_per_sample_count_error_names_sample_and_counts():
    model = vlm().eval()
    ids, mask = pad_batch([sample_ids(16), sample_ids(15)])
    with pytest.raises(MmloomError, match=r"sample 1: 15 vision placeholder tokens.*16 vision features from 1 item"):
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(MmloomError, match=r"1 vision item\(s\) left over"):
        model(input_ids=torch.tensor([sample_ids(16)]), pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(MmloomError, match=r"placeholder tokens \(id 4\) but no vision inputs"):
        model(input_ids=torch.tensor([sample_ids(16)]))


def test_placeholder_labels_are_ignored_and_labels_optional():
    model = vlm().eval()
    ids = torch.tensor([sample_ids(16)])
    pixels = torch.randn(1, 3, 32, 32)
    assert model(input_ids=ids, pixel_values=pixels).loss is None
    with_labels = model(input_ids=ids, labels=ids, pixel_values=pixels).loss
    masked = ids.masked_fill(ids == IMAGE_ID, -100)
    torch.testing.assert_close(with_labels, model(input_ids=ids, labels=masked, pixel_values=pixels).loss)


def test_left_and_right_padding_give_the_same_logits():
    model = vlm().eval()
    rows = [sample_ids(16, (30, 31, 32, 33, 34, 35)), sample_ids(16, (40,))]
    pixels = torch.randn(2, 3, 32, 32)
    right_ids, right_mask = pad_batch(rows, "right")
    left_ids, left_mask = pad_batch(rows, "left")
    right = model(input_ids=right_ids, attention_mask=right_mask, pixel_values=pixels).logits
    left = model(input_ids=left_ids, attention_mask=left_mask, pixel_values=pixels).logits
    short = len(rows[1])
    torch.testing.assert_close(right[0], left[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(right[1, :short], left[1, -short:], atol=1e-5, rtol=0)


def test_several_items_per_sample_fill_in_order():
    model = vlm().eval()
    images = torch.randn(3, 3, 32, 32)
    # Sample 0 has two images, sample 1 one; features go in order across the batch.
    rows = [[0, *[IMAGE_ID] * 16, 20, *[IMAGE_ID] * 16, 21], [0, *[IMAGE_ID] * 16, 22]]
    ids, mask = pad_batch(rows)
    batched = model(input_ids=ids, attention_mask=mask, pixel_values=images).logits
    alone = model(input_ids=torch.tensor([rows[1]]), pixel_values=images[2:]).logits
    torch.testing.assert_close(batched[1, : len(rows[1])], alone[0], atol=1e-5, rtol=0)
    features = model.encode("vision", pixel_values=images)  # (3, 16, D)
    embeds = model.embed_inputs(ids, {"vision": {"pixel_values": images}})
    torch.testing.assert_close(embeds[0, 18:34], features[1])


def test_several_modalities_per_sample_and_text_only_batches():
    model = audio_vlm().eval()
    ids = torch.tensor([[0, *[IMAGE_ID] * 16, 20, *[AUDIO_ID] * 8, 21]])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), input_features=torch.randn(1, 16, 16))
    assert torch.isfinite(out.logits).all()
    # Text only: no encoder runs at all.
    text = torch.tensor([[0, 20, 21, 22]])
    with mock.patch.object(model.vision_encoder, "forward", side_effect=AssertionError("ran")), \
            mock.patch.object(model.audio_encoder, "forward", side_effect=AssertionError("ran")):
        logits = model(input_ids=text, labels=text).logits
    torch.testing.assert_close(logits, model.language_model(input_ids=text).logits)


def test_projector_types_activations_and_size_errors():
    for kind, n_linear in [("linear", 1), ("mlp", 2), ("mlp3x_relu", 3)]:
        model = vlm(projector=kind)
        linears = [m for m in model.vision_encoder.projector.projection if isinstance(m, torch.nn.Linear)]
        assert len(linears) == n_linear
        assert linears[0].in_features == 32 and linears[-1].out_features == 48
    model = MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision())}, tiny_llama(),
                            init_projector_type="mlp", init_activation="silu")
    assert type(model.vision_encoder.projector.projection[1]).__name__.startswith("SiLU")
    with pytest.raises(MmloomError, match="unknown projector type 'conv'"):
        vlm(projector="conv")
    with pytest.raises(MmloomError, match="unknown activation 'nope'"):
        vlm(projector="mlp2x_nope")
    bad = MultimodalProjector(MultimodalProjectorConfig(in_features=32, out_features=64))
    with pytest.raises(MmloomError, match="outputs 64 features but the language model's input embeddings are 48 wide"):
        MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision(), projector=bad)}, tiny_llama())
    bad_in = MultimodalProjector(MultimodalProjectorConfig(in_features=40, out_features=48))
    with pytest.raises(MmloomError, match="takes 40 features but the vision encoder gives 32"):
        MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision(), projector=bad_in)}, tiny_llama())


def test_user_projection_module_and_multi_layer_selection():
    custom = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Tanh())
    projector = MultimodalProjector(MultimodalProjectorConfig(), projection=custom)
    model = MultimodalModel(
        {"vision": ModalEncoderModule(tiny_clip_vision(), projector=projector,
                                      postprocess_module_callback=FeatureSelect([-3, -2], "full"))},
        tiny_llama(),
        placeholder_token_ids={"vision": IMAGE_ID},
    )
    assert model.vision_encoder.projector.projection is custom
    assert model.num_feature_tokens("vision") == 17  # CLS kept
    features = model.encode("vision", pixel_values=torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 17, 48) and features.abs().max() <= 1


def test_callbacks_run_in_order_with_their_signatures():
    calls = []

    def pre(inputs):
        calls.append(("pre", sorted(inputs)))
        return {**inputs, "pixel_values": inputs["pixel_values"] * 0}

    def post_module(inputs, output):
        calls.append(("module", type(output).__name__, tuple(output[0].shape)))
        return output

    def post_projector(inputs, output):
        calls.append(("projector", tuple(output[0].shape)))
        return (output[0] + 1,)

    model = MultimodalModel(
        {"vision": ModalEncoderModule(tiny_clip_vision(), preprocess_callback=pre,
                                      postprocess_module_callback=post_module,
                                      postprocess_projector_callback=post_projector)},
        tiny_llama(), placeholder_token_ids={"vision": IMAGE_ID},
    )
    out = model.encode("vision", pixel_values=torch.randn(1, 3, 32, 32))
    assert calls == [("pre", ["pixel_values"]), ("module", "BaseModelOutputWithPooling", (1, 17, 32)),
                     ("projector", (1, 17, 48))]
    zero = model.vision_encoder.projector(model.vision_encoder.module(torch.zeros(1, 3, 32, 32))[0])
    torch.testing.assert_close(out, zero + 1)


def test_cached_module_features_skip_the_encoder_and_match():
    model = vlm().eval()
    ids = torch.tensor([sample_ids(16)])
    pixels = torch.randn(1, 3, 32, 32)
    features = model.vision_encoder.encode_module(pixel_values=pixels)[0]  # (1, 16, 32): CLS dropped
    assert features.shape == (1, 16, 32)
    with mock.patch.object(model.vision_encoder.module, "forward", side_effect=AssertionError("ran")):
        cached = model(input_ids=ids, vision={"module_features": features.half()}).logits
    torch.testing.assert_close(cached, model(input_ids=ids, pixel_values=pixels).logits, atol=1e-2, rtol=0)
