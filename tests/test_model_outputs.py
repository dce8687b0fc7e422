"""Encoder and callback outputs of every form: bare tensors, tuples, ModelOutputs, lists, flat
(total_tokens, D) tensors; per-item counts and the errors that report them."""

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

from helpers import IMAGE_ID, LlavaNextStub, pad_batch, sample_ids
from mmloom import AnyresPack, FeatureSelect, ModalEncoderModule, MultimodalModel
from mmloom.errors import MmloomError
from mmloom.model.merge import PlaceholderMismatchError
from mmloom.testing import tiny_clip_vision, tiny_conv_encoder, tiny_llama


def composite(encoder, **module_kwargs) -> MultimodalModel:
    torch.manual_seed(0)
    return MultimodalModel({"vision": ModalEncoderModule(encoder, **module_kwargs)}, tiny_llama(),
                           init_projector_type="mlp2x_gelu", placeholder_token_ids={"vision": IMAGE_ID}).eval()


def two_samples():
    """Two samples with one 16-token image each, different text and lengths (right-padded)."""
    ids, mask = pad_batch([sample_ids(16, (10, 11, 12)), [0, 13, *[IMAGE_ID] * 16, 14]])
    return ids, mask, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("form", ["tensor", "tuple", "list"])
def test_every_encoder_output_form_gives_the_model_output_logits(form):
    # A bare (N, L, D) tensor used to be read as output[0] = item 0 only (bare-tensor-encoder-output).
    ids, mask, pixels = two_samples()
    with torch.no_grad():
        reference = composite(tiny_conv_encoder("output"))(input_ids=ids, attention_mask=mask, labels=ids,
                                                            pixel_values=pixels)
        out = composite(tiny_conv_encoder(form))(input_ids=ids, attention_mask=mask, labels=ids, pixel_values=pixels)
    torch.testing.assert_close(out.logits, reference.logits, atol=0, rtol=0)
    torch.testing.assert_close(out.loss, reference.loss)


def test_bare_tensor_encoder_in_encode_generate_and_cached_features():
    model = composite(tiny_conv_encoder("tensor"))
    pixels = torch.randn(3, 3, 32, 32)
    module_out = model.vision_encoder.encode_module(pixel_values=pixels)
    assert module_out[0].shape == (3, 16, 32)  # the whole batch, as `mmloom data cache-features` reads it
    assert model.encode("vision", pixel_values=pixels).shape == (3, 16, 48)
    ids = torch.tensor([sample_ids(16)])
    generated = model.generate(ids, pixel_values=pixels[:1], max_new_tokens=2, do_sample=False, pad_token_id=3)
    assert generated.shape == (1, ids.shape[1] + 2)
    cached = model(input_ids=ids, vision={"module_features": module_out[0][:1]}).logits
    torch.testing.assert_close(cached, model(input_ids=ids, pixel_values=pixels[:1]).logits)


def _flatten(inputs, output):
    """A postprocess callback packing all items into one flat (N * L, D) tensor."""
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    flat = hidden.reshape(-1, hidden.shape[-1])
    if hasattr(output, "last_hidden_state"):
        output.last_hidden_state = flat
        return output
    return (flat, *tuple(output)[1:])


@pytest.mark.parametrize("slot", ["postprocess_projector_callback", "postprocess_module_callback"])
def test_flat_features_from_a_callback_fill_the_placeholders_in_order(slot):
    # A flat (T, D) tensor used to be read as (items, tokens): 48 "features" per item (flat-projected-features).
    # Without FeatureSelect CLIP gives 17 tokens per image (CLS kept).
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = pad_batch([sample_ids(17, (10, 11, 12)), [0, 13, *[IMAGE_ID] * 17, 14]])
    with torch.no_grad():
        reference = composite(tiny_clip_vision())(input_ids=ids, attention_mask=mask, labels=ids, pixel_values=pixels)
        flat_model = composite(tiny_clip_vision(), **{slot: _flatten})
        out = flat_model(input_ids=ids, attention_mask=mask, labels=ids, pixel_values=pixels)
        features = flat_model.encode("vision", pixel_values=pixels)
    torch.testing.assert_close(out.logits, reference.logits, atol=0, rtol=0)
    # Split per item again, so that a mismatch is still caught per sample.
    assert [tuple(f.shape) for f in features] == [(17, 48), (17, 48)]
    ids, mask = pad_batch([sample_ids(16, (10, 11, 12)), [0, 13, *[IMAGE_ID] * 18, 14]])
    with pytest.raises(PlaceholderMismatchError, match="sample 0: 16 vision placeholder tokens .* but 17 vision"):
        flat_model(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def test_list_of_per_item_features_and_a_list_holding_one_flat_tensor():
    ids, mask, pixels = two_samples()

    def as_list(inputs, output):
        return (list(output[0]),)

    def one_flat_in_a_list(inputs, output):
        return (list(output[0].reshape(1, -1, output[0].shape[-1])),)

    with torch.no_grad():
        reference = composite(tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch"))(
            input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        for callback in (as_list, one_flat_in_a_list):
            model = composite(tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch"),
                              postprocess_projector_callback=callback)
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                                       reference, atol=0, rtol=0)


def test_seed_llava_next_callback_as_a_plain_function_equals_anyres_pack():
    """The composition seed's LLaVA-NeXT projector callback, written as a plain function around
    transformers' `pack_image_features` returning one flat (total_tokens, D) tensor as in 4.x."""
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    anyres = AnyresPack(hidden_size=48, image_grid_pinpoints=pinpoints, patch_grid=4, image_size=32)

    def postprocess_projector_callback(inputs, output):
        image_sizes = inputs["image_sizes"]
        views = [anyres.num_views(size.tolist()) for size in image_sizes]
        packed, _ = LlavaNextModel.pack_image_features(
            LlavaNextStub(pinpoints, anyres.image_newline), list(torch.split(output[0], views)), image_sizes,
            vision_feature_select_strategy="default", image_newline=anyres.image_newline)
        image_features = torch.cat(packed) if isinstance(packed, (list, tuple)) else packed  # (total_tokens, D)
        output.last_hidden_state = image_features
        return output

    image_sizes = torch.tensor([[40, 70], [64, 30]])
    pixels = torch.randn(sum(anyres.num_views(s.tolist()) for s in image_sizes), 3, 32, 32)
    named = composite(tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch"),
                      postprocess_projector_callback=anyres)
    plain = composite(tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch"),
                      postprocess_projector_callback=postprocess_projector_callback)
    counts = [named.num_feature_tokens("vision", s.tolist()) for s in image_sizes]
    ids, mask = pad_batch([sample_ids(counts[0], (10, 11)), sample_ids(counts[1], (12,))], side="left")
    vision = {"pixel_values": pixels, "image_sizes": image_sizes}  # a plain function names no inputs: pass per encoder
    with torch.no_grad():
        want = named(input_ids=ids, attention_mask=mask, labels=ids, vision=vision)
        got = plain(input_ids=ids, attention_mask=mask, labels=ids, vision=vision)
    torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)
    # A flat stream whose total does not fit the prompt: the error counts features, never widths.
    short, _ = pad_batch([sample_ids(counts[0] - 1, (10, 11)), sample_ids(counts[1], (12,))], side="left")
    with pytest.raises(PlaceholderMismatchError, match=rf"{sum(counts) - 1} vision placeholder tokens.*"
                                                       rf"but {sum(counts)} vision features"):
        plain(input_ids=short, vision=vision)


def test_mismatch_errors_report_feature_counts_not_the_hidden_size():
    model = composite(tiny_conv_encoder("tensor"))
    ids, mask = pad_batch([sample_ids(16), sample_ids(12)])
    with pytest.raises(PlaceholderMismatchError) as err:
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 32, 32))
    message = str(err.value)
    assert "sample 1: 12 vision placeholder tokens" in message and "16 vision features from 1 item" in message
    assert "[16]" in message and "32" not in message and "48" not in message  # widths are not counts

    def three_d_bad(inputs, output):
        return (output[0][..., None],)  # (N, L, D, 1): not a feature layout

    bad = composite(tiny_clip_vision(), postprocess_projector_callback=three_d_bad)
    with pytest.raises(MmloomError, match=r"features must be \(N, L, D\), \(total_tokens, D\) or a list"):
        bad(input_ids=torch.tensor([sample_ids(17)]), pixel_values=torch.randn(1, 3, 32, 32))
