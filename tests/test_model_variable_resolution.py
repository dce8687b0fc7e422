"""Variable-resolution encoders (Pixtral, Qwen2-VL vision) with a Llama LLM: per-item token counts
from what the encoder's own processor returns, the right output selected, parity with
transformers' own multimodal models, forward/backward through MultimodalProcessor."""

import pytest
import torch
from PIL import Image
from transformers import LlavaConfig, LlavaModel, Qwen2VLConfig, Qwen2VLModel

from helpers import IMAGE_ID
from mmloom import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from mmloom.errors import MmloomError
from mmloom.model.feature_count import item_token_counts, token_count_spec
from mmloom.testing import (
    tiny_llama,
    tiny_pixtral_processor,
    tiny_pixtral_vision,
    tiny_qwen2_vl_processor,
    tiny_qwen2_vl_vision,
)

# (width, height): a 64x32 portrait, a wide 50x20 and a square 40x40 image.
IMAGES = [Image.new("RGB", (32, 64), (200, 30, 30)), Image.new("RGB", (50, 20), (30, 200, 30)),
          Image.new("RGB", (40, 40), (30, 30, 200))]
ENCODERS = {"pixtral": (tiny_pixtral_vision, tiny_pixtral_processor), "qwen2_vl": (tiny_qwen2_vl_vision,
                                                                                    tiny_qwen2_vl_processor)}


def composite(encoder) -> MultimodalModel:
    return MultimodalModel({"vision": ModalEncoderModule(encoder)}, tiny_llama(), init_projector_type="mlp2x_gelu",
                           placeholder_token_ids={"vision": IMAGE_ID})


def test_pixtral_counts_follow_each_image_and_match_transformers_llava():
    torch.manual_seed(0)
    tower = tiny_pixtral_vision()  # config says 64 px / 8 px = 64 tokens: only right for a square 64 px image
    processor = tiny_pixtral_processor()
    spec = token_count_spec(tower.config, {})
    counts = item_token_counts(spec, IMAGES, processor)
    # Pixtral's processor keeps sizes up to a longest edge of 64, rounded up to whole patches:
    # (h 64, w 32) -> 8 x 4 patches, (20, 50) -> (24, 56) -> 3 x 7, (40, 40) -> 5 x 5.
    assert counts == [32, 21, 25]
    # Oracle: transformers' LlavaModel with the same Pixtral tower splits its projected features per image.
    llava = LlavaModel(LlavaConfig(vision_config=tower.config.to_dict(), text_config=tiny_llama().config.to_dict(),
                                   vision_feature_layer=-1, vision_feature_select_strategy="full",
                                   image_token_id=IMAGE_ID)).eval()
    model = composite(llava.vision_tower).eval()
    projection = model.vision_encoder.projector.projection
    projection[0].load_state_dict(llava.multi_modal_projector.linear_1.state_dict())
    projection[2].load_state_dict(llava.multi_modal_projector.linear_2.state_dict())
    inputs = dict(processor(IMAGES, return_tensors="pt"))
    with torch.no_grad():
        want = llava.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                        vision_feature_layer=-1, vision_feature_select_strategy="full").pooler_output
        got = model.encode("vision", **inputs)
    assert [g.shape[0] for g in got] == counts == [w.shape[0] for w in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_qwen2_vl_uses_the_merger_output_and_grid_counts_like_transformers():
    torch.manual_seed(0)
    tower = tiny_qwen2_vl_vision(out_hidden_size=40, embed_dim=32)
    text = dict(vocab_size=400, hidden_size=40, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=3,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 3]})
    qwen = Qwen2VLModel(Qwen2VLConfig(vision_config=tower.config.to_dict(), text_config=text)).eval()
    processor = tiny_qwen2_vl_processor()
    inputs = dict(processor(IMAGES, return_tensors="pt"))  # pixel_values (patches, C*T*P*P), image_grid_thw
    model = composite(qwen.visual).eval()
    assert model.vision_encoder.projector.config.in_features == 40  # the merger's width, not embed_dim (32)
    with torch.no_grad():
        want = qwen.get_image_features(pixel_values=inputs["pixel_values"],
                                       image_grid_thw=inputs["image_grid_thw"]).pooler_output
        module_features = model.vision_encoder.encode_module(**inputs)[0]
        got = model.encode("vision", **inputs)
    counts = item_token_counts(token_count_spec(tower.config, {}), IMAGES, processor)
    assert counts == [w.shape[0] for w in want] == [g.shape[0] for g in got]
    torch.testing.assert_close(module_features, torch.cat(want), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_forward_backward_through_the_multimodal_processor(kind, tokenizer, tmp_path):
    torch.manual_seed(0)
    build_tower, build_processor = ENCODERS[kind]
    model = composite(build_tower())
    processor = MultimodalProcessor.from_model(model, tokenizer, {"vision": build_processor()}, template="vicuna_v1")
    conversations = [
        [{"role": "user", "content": "<image>\nWhat colour is the shape?"}, {"role": "assistant", "content": "Red."}],
        [{"role": "user", "content": "Compare <image> and <image>."}, {"role": "assistant", "content": "Two."}],
        [{"role": "user", "content": "No image here."}, {"role": "assistant", "content": "Yes."}],
    ]
    batch = processor(conversations=conversations, images=[IMAGES[0], [IMAGES[1], IMAGES[2]], None])
    counts = item_token_counts(processor.num_tokens["vision"], IMAGES, build_processor())
    assert batch["input_ids"].eq(IMAGE_ID).sum(1).tolist() == [counts[0], counts[1] + counts[2], 0]
    model.train(encoders_mode={"vision": (True, True)}, llm_mode=True)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.vision_encoder.projector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision_encoder.module.parameters())
    # The count rule saves with the processor and with the model's config.
    processor.save_pretrained(tmp_path / "p")
    reloaded = MultimodalProcessor.from_pretrained(tmp_path / "p")
    again = reloaded(conversations=conversations, images=[IMAGES[0], [IMAGES[1], IMAGES[2]], None])
    assert torch.equal(again["input_ids"], batch["input_ids"])
    model.save_pretrained(tmp_path / "m")
    from_config = MultimodalProcessor.from_model(MultimodalModel.from_pretrained(tmp_path / "m").config, tokenizer,
                                                 {"vision": build_processor()}, template="vicuna_v1")
    assert from_config.num_tokens == processor.num_tokens


def test_a_single_count_is_refused_for_variable_resolution_encoders():
    model = composite(tiny_pixtral_vision())
    with pytest.raises(MmloomError, match="pixtral is a variable-resolution encoder.*image_sizes"):
        model.num_feature_tokens("vision")
