"""Whole-composite save/load: full, trainable-only, PEFT, sharded, dtype, callbacks, anyres."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

from helpers import IMAGE_ID, LlavaNextStub, sample_ids, vlm
from mmloom import (
    AnyresPack,
    FeatureSelect,
    ModalEncoderModule,
    MultimodalModel,
    MultimodalProjector,
    MultimodalProjectorConfig,
)
from mmloom.errors import MmloomError
from mmloom.testing import tiny_clip_vision, tiny_llama

IDS = torch.tensor([sample_ids(16)])
PIXELS = torch.randn(1, 3, 32, 32)


def logits(model, **extra):
    with torch.no_grad():
        return model.eval()(input_ids=IDS, pixel_values=PIXELS, **extra).logits


def test_full_round_trip_rebuilds_every_part(tmp_path):
    model = vlm("qwen2")
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["language_model"]["class"].endswith("Qwen2ForCausalLM")
    assert config["encoders"]["vision"]["callbacks"]["postprocess_module_callback"] == {
        "type": "feature_select", "layer": -2, "strategy": "patch"}
    assert config["encoders"]["vision"]["projector"]["projector_type"] == "mlp2x_gelu"
    assert config["placeholder_token_ids"] == {"vision": IMAGE_ID}
    loaded = MultimodalModel.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    half = MultimodalModel.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.language_model.dtype == torch.bfloat16


def test_tied_embeddings_and_sharding(tmp_path):
    model = vlm("gemma", tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "m", max_shard_size=20_000)
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    loaded = MultimodalModel.from_pretrained(tmp_path / "m")
    assert loaded.language_model.lm_head.weight.data_ptr() == \
        loaded.language_model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_trainable_only_round_trip_needs_base(tmp_path):
    base = vlm()
    base.save_pretrained(tmp_path / "base")
    model = MultimodalModel.from_pretrained(tmp_path / "base").train(
        encoders_mode={"vision": (False, True)}, llm_mode=False)
    with torch.no_grad():
        for p in model.vision_encoder.projector.parameters():
            p.add_(0.5)
    model.save_pretrained(tmp_path / "phase1", trainable_only=True)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "phase1" / "model.safetensors"))
    assert saved and all(k.startswith("vision_encoder.projector") for k in saved)
    with pytest.raises(MmloomError, match="trainable parameters only; pass base="):
        MultimodalModel.from_pretrained(tmp_path / "phase1")
    loaded = MultimodalModel.from_pretrained(tmp_path / "phase1", base=tmp_path / "base")
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_lora_llm_and_lora_encoder_train_generate_and_round_trip(tmp_path):
    llm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    clip = get_peft_model(tiny_clip_vision(), LoraConfig(r=2, target_modules=["q_proj"]))
    model = MultimodalModel(
        {"vision": ModalEncoderModule(clip, postprocess_module_callback=FeatureSelect(-2, "patch"))},
        llm, init_projector_type="mlp2x_gelu", placeholder_token_ids={"vision": IMAGE_ID},
    ).train(encoders_mode={"vision": (True, True)}, llm_mode=True)
    model.language_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight.data.normal_()
    out = model(input_ids=IDS, labels=IDS, pixel_values=PIXELS)
    out.loss.backward()
    lora_grads = [p.grad for n, p in model.language_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert all(p.grad is None for n, p in model.language_model.named_parameters() if "lora_" not in n)
    generated = model.eval().generate(IDS, pixel_values=PIXELS, max_new_tokens=4, do_sample=False, pad_token_id=3)
    assert generated.shape == (1, IDS.shape[1] + 4)
    model.save_pretrained(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "config.json").read_text())["language_model"]["peft"]["r"] == 4
    loaded = MultimodalModel.from_pretrained(tmp_path / "lora")
    assert hasattr(loaded.language_model, "peft_config") and hasattr(loaded.vision_encoder.module, "peft_config")
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_arbitrary_callable_warns_on_save_and_load_says_how(tmp_path):
    def my_select(inputs, output):
        return output

    model = MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=my_select)},
                            tiny_llama(), placeholder_token_ids={"vision": IMAGE_ID})
    with pytest.warns(UserWarning, match="my_select is an arbitrary callable"):
        model.save_pretrained(tmp_path / "m")
    with pytest.raises(MmloomError, match=r"callbacks=\{'vision': \{'postprocess_module_callback': my_fn\}\}"):
        MultimodalModel.from_pretrained(tmp_path / "m")
    loaded = MultimodalModel.from_pretrained(
        tmp_path / "m", callbacks={"vision": {"postprocess_module_callback": my_select}})
    ids = torch.tensor([sample_ids(17)])
    torch.testing.assert_close(loaded(input_ids=ids, pixel_values=PIXELS).logits,
                               model.eval()(input_ids=ids, pixel_values=PIXELS).logits)


def test_custom_projection_must_be_passed_again(tmp_path):
    projection = torch.nn.Linear(32, 48)
    model = MultimodalModel(
        {"vision": ModalEncoderModule(tiny_clip_vision(), projector=MultimodalProjector(
            MultimodalProjectorConfig(), projection=projection))},
        tiny_llama(), placeholder_token_ids={"vision": IMAGE_ID})
    with pytest.warns(UserWarning, match="custom module"):
        model.save_pretrained(tmp_path / "m")
    with pytest.raises(MmloomError, match=r"projections=\{'vision': my_module\}"):
        MultimodalModel.from_pretrained(tmp_path / "m")
    loaded = MultimodalModel.from_pretrained(tmp_path / "m", projections={"vision": torch.nn.Linear(32, 48)})
    torch.testing.assert_close(loaded.vision_encoder.projector.projection.weight, projection.weight)


def test_projector_saves_and_loads_on_its_own(tmp_path):
    projector = vlm().vision_encoder.projector
    projector.save_pretrained(tmp_path / "p")
    loaded = MultimodalProjector.from_pretrained(tmp_path / "p")
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(loaded(x), projector(x))


def test_anyres_packing_matches_llava_next_and_saves_its_newline(tmp_path):
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    anyres = AnyresPack(hidden_size=48, image_grid_pinpoints=pinpoints, patch_grid=4, image_size=32)
    model = MultimodalModel(
        {"vision": ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch"),
                                      postprocess_projector_callback=anyres)},
        tiny_llama(), init_projector_type="mlp2x_gelu", placeholder_token_ids={"vision": IMAGE_ID}).eval()
    image_sizes = torch.tensor([[40, 70], [64, 30]])  # (height, width)
    views = [anyres.num_views(s.tolist()) for s in image_sizes]
    pixels = torch.randn(sum(views), 3, 32, 32)
    packed = model.encode("vision", pixel_values=pixels, image_sizes=image_sizes)
    assert [p.shape[0] for p in packed] == [model.num_feature_tokens("vision", s.tolist()) for s in image_sizes]
    # Reference: transformers' LlavaNext packing on the same projected features.
    projected = model.vision_encoder.projector(
        model.vision_encoder.module(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
    reference = LlavaNextModel.pack_image_features(
        LlavaNextStub(pinpoints, anyres.image_newline), list(torch.split(projected, views)), image_sizes,
        vision_feature_select_strategy="default", image_newline=anyres.image_newline)[0]
    torch.testing.assert_close(torch.cat(packed), torch.cat(reference))
    ids = torch.tensor([[0, *[IMAGE_ID] * packed[0].shape[0], 9]])
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalModel.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.vision_encoder.postprocess_projector_callback.image_newline, anyres.image_newline)
    torch.testing.assert_close(
        loaded(input_ids=ids, pixel_values=pixels[: views[0]], image_sizes=image_sizes[:1]).logits,
        model(input_ids=ids, pixel_values=pixels[: views[0]], image_sizes=image_sizes[:1]).logits)


def test_loads_in_the_saved_dtype_by_default(tmp_path):
    model = vlm().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    assert MultimodalModel.from_pretrained(tmp_path / "m").dtype == torch.bfloat16
    assert MultimodalModel.from_pretrained(tmp_path / "m", torch_dtype="float32").dtype == torch.float32
