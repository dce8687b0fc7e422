"""Exports for the real consumers, checked in this environment (transformers 5): the original-LLaVA layout
as transformers 4.x reads it (vision_model.* names, RoPE fields, linear projector keys, the stock tokenizer
folder, image_aspect_ratio, Mistral folder names, a relative mm_vision_tower), hf-llava in the llava-hf
layout (no missing weights, a <pad> token, its processor equal to mmloom's preprocessing), every processor
mmloom saves exports, and no conversion error is a traceback. tests/clients/ runs the same exports in the
real transformers 4.37.2 + original LLaVA code and transformers 4.49 environments."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
)

from clients.clients_support import ASSET, stock_vicuna_folder, tiny_vicuna_composite
from helpers import IMAGE_ID, sp_vlm, vlm
from mmloom import MultimodalModel, MultimodalProcessor
from mmloom.cli.main import main
from mmloom.errors import MmloomError
from mmloom.interop.common import Bundle, write_mmloom
from mmloom.interop.hf4 import hf4_config_dict, rope_fields
from mmloom.interop.image_processors import transform_from_hf, transform_to_hf
from mmloom.processing.image import ImageTransform, load_image
from mmloom.processing.tokenizer_files import save_tokenizer, tokenizer_settings
from mmloom.testing import tiny_tokenizer

CLIP_PROC = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def save(model, folder, processor=CLIP_PROC, tokenizer=None):
    write_mmloom(Bundle(model, tokenizer or tiny_tokenizer(), {"vision": processor}), folder)
    return folder


def convert(src, dst, to, frm="mmloom", *extra):
    return main(["convert", "--from", frm, "--to", to, str(src), str(dst), *map(str, extra)])


def logits(model, seed=0, image_id=IMAGE_ID):
    torch.manual_seed(seed)
    ids = torch.tensor([[0] + [image_id] * 16 + [30, 31, 32, 33]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits


def noise_image(h=24, w=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


# --------------------------------------------------------------------------------- llava layout
def test_llava_vision_tower_has_transformers4_names(tmp_path):
    model, tokenizer = sp_vlm(tmp_path / "tok")
    assert convert(save(model, tmp_path / "mm", tokenizer=tokenizer), tmp_path / "llava", "llava") == 0
    state = load_file(str(tmp_path / "llava" / "image_model" / "model.safetensors"))
    tower = model.vision_encoder.module.state_dict()
    assert state and all(k.startswith("vision_model.") for k in state)
    assert {k.removeprefix("vision_model."): v for k, v in state.items()}.keys() == tower.keys()
    assert all(torch.equal(state["vision_model." + k], v) for k, v in tower.items())
    config = json.loads((tmp_path / "llava" / "image_model" / "config.json").read_text())
    assert config["model_type"] == "clip_vision_model" and config["torch_dtype"] == "float32"
    loaded = CLIPVisionModel.from_pretrained(tmp_path / "llava" / "image_model")  # transformers 5 maps them back
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tower.items())


def test_llava_linear_projector_both_ways(tmp_path):
    model, tokenizer = sp_vlm(tmp_path / "tok", projector="linear")
    image_id = model.placeholder_token_ids["vision"]
    src = save(model, tmp_path / "mm", tokenizer=tokenizer)
    assert convert(src, tmp_path / "llava", "llava") == 0
    text = tmp_path / "llava" / "text_model_llava"
    state = load_file(str(text / "model.safetensors"))
    assert json.loads((text / "config.json").read_text())["mm_projector_type"] == "linear"
    assert sorted(k for k in state if "mm_projector" in k) == ["model.mm_projector.bias", "model.mm_projector.weight"]
    assert convert(tmp_path / "llava", tmp_path / "back", "mmloom", "llava") == 0
    back = MultimodalModel.from_pretrained(tmp_path / "back")
    assert float((logits(back, image_id=image_id) - logits(model, image_id=image_id)).abs().max()) < 1e-5
    # phase 1: a linear mm_projector.bin (nn.Linear keys) into that model
    torch.manual_seed(3)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    torch.save({"model.mm_projector.weight": weight, "model.mm_projector.bias": bias}, tmp_path / "mm_projector.bin")
    assert convert(tmp_path / "mm_projector.bin", tmp_path / "p1", "mmloom", "llava-projector", "--base", tmp_path / "back") == 0
    projection = MultimodalModel.from_pretrained(tmp_path / "p1").vision_encoder.projector.projection
    assert torch.equal(projection[0].weight, weight) and torch.equal(projection[0].bias, bias)


def test_llava_projector_keys_that_do_not_fit_are_one_line(tmp_path, capsys):
    model, tokenizer = sp_vlm(tmp_path / "tok")  # mlp2x_gelu
    src = save(model, tmp_path / "mm", tokenizer=tokenizer)
    torch.save({"model.mm_projector.weight": torch.zeros(48, 32)}, tmp_path / "linear.bin")
    assert convert(tmp_path / "linear.bin", tmp_path / "x", "mmloom", "llava-projector", "--base", src) == 2
    err = capsys.readouterr().err
    assert "are not a mlp2x projector" in err and len(err.strip().splitlines()) == 1
    # a folder whose weights file is not safetensors: one line, no traceback
    assert convert(src, tmp_path / "llava", "llava") == 0
    (tmp_path / "llava" / "text_model_llava" / "model.safetensors").write_bytes(b"not a safetensors file")
    capsys.readouterr()
    assert convert(tmp_path / "llava", tmp_path / "y", "mmloom", "llava") == 2
    err = capsys.readouterr().err
    assert err.startswith("mmloom convert: error: reading") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("scaling, want", [(None, None), ({"rope_type": "linear", "factor": 2.0},
                                                         {"type": "linear", "factor": 2.0})])
def test_llava_rope_fields_in_transformers4_form(tmp_path, scaling, want):
    overrides = {"rope_theta": 500000.0} if scaling is None else {"rope_parameters": {"rope_theta": 500000.0, **scaling}}
    model, tokenizer = sp_vlm(tmp_path / "tok", **overrides)
    src = save(model, tmp_path / "mm", tokenizer=tokenizer)
    assert convert(src, tmp_path / "llava", "llava") == 0
    for name in ("config.json", "config_lmsys.json"):
        config = json.loads((tmp_path / "llava" / "text_model_llava" / name).read_text())
        assert config["rope_theta"] == 500000.0 and config["rope_scaling"] == want
        assert config["torch_dtype"] == "float32"


def test_rope_fields_of_newer_types_and_head_dim():
    theta, scaling, notes = rope_fields({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                              "low_freq_factor": 1.0}})
    assert theta == 5e5 and scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    assert "4.43" in notes[0]
    nested = hf4_config_dict({"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
                              "dtype": "bfloat16"})
    assert nested["text_config"]["rope_theta"] == 1e6 and nested["torch_dtype"] == "bfloat16"
    with pytest.raises(MmloomError, match="per layer type"):
        rope_fields({"rope_parameters": {"full_attention": {"rope_theta": 1.0}, "sliding_attention": {}}})


def test_llava_refuses_a_head_dim_transformers_437_cannot_build(tmp_path, capsys):
    model, tokenizer = sp_vlm(tmp_path / "tok", head_dim=16)  # 48 hidden / 4 heads = 12
    src = save(model, tmp_path / "mm", tokenizer=tokenizer)
    assert convert(src, tmp_path / "llava", "llava") == 2
    assert "head_dim 16" in capsys.readouterr().err and not (tmp_path / "llava").exists()


def test_llava_mistral_folder_and_relative_vision_tower(tmp_path, capsys):
    src = save(vlm("mistral").eval(), tmp_path / "mm")
    assert convert(src, tmp_path / "bad", "llava", "mmloom", "--text-folder", "text_model_llava") == 2
    assert "must contain 'mistral'" in capsys.readouterr().err
    assert convert(src, tmp_path / "pair", "llava", "mmloom", "--mm-vision-tower", "image_model") == 0
    text = tmp_path / "pair" / "text_model_llava_mistral"
    config = json.loads(text.joinpath("config.json").read_text())
    assert config["architectures"] == ["LlavaMistralForCausalLM"] and config["mm_vision_tower"] == "image_model"
    moved = tmp_path / "elsewhere" / "pair"
    shutil.move(tmp_path / "pair", moved)  # the relative tower still resolves (sibling of the text folder)
    assert convert(moved, tmp_path / "back", "mmloom", "llava") == 0
    model, tokenizer = sp_vlm(tmp_path / "tok")
    llama = save(model, tmp_path / "llama", tokenizer=tokenizer)
    assert convert(llama, tmp_path / "l", "llava", "mmloom", "--text-folder", "text_model_llava_mistral") == 2
    assert "contains 'mistral'" in capsys.readouterr().err


@pytest.mark.skipif(not ASSET.is_file(), reason="CI has ../shared/assets/llama2-tokenizer")
def test_llava_tokenizer_folder_as_vicuna_ships_it(tmp_path):
    model, tokenizer = tiny_vicuna_composite(stock_vicuna_folder(tmp_path), "mlp2x_gelu")
    tokenizer.pad_token = None
    src = tmp_path / "mm"
    write_mmloom(Bundle(model, tokenizer, {"vision": CLIP_PROC}), src)
    assert (src / "tokenizer.model").read_bytes() == ASSET.read_bytes()  # kept in mmloom's own folder too
    assert convert(src, tmp_path / "llava", "llava") == 0
    text = tmp_path / "llava" / "text_model_llava"
    assert (text / "tokenizer.model").read_bytes() == ASSET.read_bytes() and not (text / "tokenizer.json").exists()
    config = json.loads((text / "tokenizer_config.json").read_text())
    assert config["legacy"] is False and config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["pad_token"] == "<unk>"
    assert config["added_tokens_decoder"]["32000"]["content"] == "<image>"
    special = json.loads((text / "special_tokens_map.json").read_text())
    assert {k: v["content"] for k, v in special.items() if k.endswith("_token")} == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    probe = "Hi there.</s>USER: What next?\nASSISTANT: Nothing.</s>"
    assert AutoTokenizer.from_pretrained(text)(probe).input_ids == tokenizer(probe).input_ids


@pytest.mark.skipif(not ASSET.is_file(), reason="CI has ../shared/assets/llama2-tokenizer")
def test_save_tokenizer_completes_the_folder_and_checks_the_sentencepiece_model(tmp_path):
    stock = stock_vicuna_folder(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(stock)
    save_tokenizer(tokenizer, tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert tokenizer_settings(reloaded) == {"legacy": False, "add_bos_token": True, "add_eos_token": False}
    assert (tmp_path / "saved" / "special_tokens_map.json").exists()
    assert (tmp_path / "saved" / "tokenizer.model").read_bytes() == ASSET.read_bytes()
    # a tokenizer.model that is not this tokenizer's is never copied
    bpe = tiny_tokenizer()
    save_tokenizer(bpe, tmp_path / "bpe", search=[stock])
    assert not (tmp_path / "bpe" / "tokenizer.model").exists()


# ----------------------------------------------------------------------------- image processors
def test_every_processor_mmloom_saves_exports(tmp_path):
    """ImageTransform (what `mmloom train` saves) -> both formats, with processors giving its pixels."""
    transform = ImageTransform(32, pad_to_square=True)
    model, tokenizer = sp_vlm(tmp_path / "tok")
    src = save(model, tmp_path / "mm", processor=transform, tokenizer=tokenizer)
    wide = noise_image()
    ref = transform(wide)
    assert convert(src, tmp_path / "hf", "hf-llava") == 0
    exported = AutoProcessor.from_pretrained(tmp_path / "hf").image_processor
    assert np.abs(exported(images=wide, return_tensors="np")["pixel_values"][0] - ref).max() < 1e-5
    assert convert(src, tmp_path / "llava", "llava") == 0
    config = json.loads((tmp_path / "llava" / "text_model_llava" / "config.json").read_text())
    assert config["image_aspect_ratio"] == "pad"
    clip = CLIPImageProcessor.from_pretrained(tmp_path / "llava" / "image_model")
    back = transform_from_hf(clip, pad_to_square=config["image_aspect_ratio"] == "pad")
    assert np.abs(back(wide) - ref).max() < 1e-6
    # the llava import gives the same preprocessing back (pad -> expand2square with the CLIP mean)
    assert convert(tmp_path / "llava", tmp_path / "back", "mmloom", "llava") == 0
    processor = MultimodalProcessor.from_pretrained(tmp_path / "back")
    assert np.abs(np.asarray(processor.encoder_processors["vision"](wide)) - ref).max() < 1e-6


@pytest.mark.parametrize("steps", [
    [{"name": "resize", "size": 32, "interpolation": "bilinear"}, {"name": "center_crop", "size": 32},
     {"name": "rescale", "factor": 0.5}],
    [{"name": "expand_to_square", "background_color": [10, 20, 30]}, {"name": "resize", "size": 32},
     {"name": "center_crop", "size": 32}, {"name": "to_tensor"}],
    [{"name": "resize", "size": [32, 32]}, {"name": "to_tensor"}, {"name": "center_crop", "size": 32},
     {"name": "normalize", "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.3, 0.4]}],
])
def test_transform_steps_map_onto_transformers(steps):
    transform = ImageTransform.from_config(steps, 32)
    processor, pads = transform_to_hf(transform)
    assert pads == (steps[0]["name"] == "expand_to_square")
    image = noise_image(30, 44, seed=1)
    assert np.abs(processor(images=image, return_tensors="np")["pixel_values"][0] - transform(image)).max() < 1e-4


def test_transforms_without_an_equivalent_are_refused(tmp_path, capsys):
    with pytest.raises(MmloomError, match="int\\(image_mean \\* 255\\)"):
        transform_to_hf(ImageTransform(32, pad_to_square=True, background=(0, 0, 0)))
    crop_first = ImageTransform.from_config([{"name": "center_crop", "size": 40}, {"name": "resize", "size": 32},
                                             {"name": "center_crop", "size": 32}], 32)
    with pytest.raises(MmloomError, match="no transformers image processor equivalent"):
        transform_to_hf(crop_first)
    src = save(vlm().eval(), tmp_path / "mm", processor=ImageTransform(32, pad_to_square=True, background=(0, 0, 0)))
    for fmt in ("hf-llava", "llava"):
        assert convert(src, tmp_path / fmt, fmt) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / fmt).exists()


def test_transparent_images_training_equals_exported_processor(tmp_path):
    """RGBA / palette-with-transparency: the training transform and the hf-llava processor (transformers 5)
    both composite onto white."""
    src = save(vlm().eval(), tmp_path / "mm")
    assert convert(src, tmp_path / "hf", "hf-llava") == 0
    exported = AutoProcessor.from_pretrained(tmp_path / "hf").image_processor
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (220, 30, 30, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pal = Image.fromarray(rgba, "RGBA").convert("P")
    pal.save(tmp_path / "palette.png", transparency=pal.getpixel((0, 0)))
    training = ImageTransform.from_config(None, 32)
    for name in ("rgba", "palette"):
        a = training(load_image(tmp_path / f"{name}.png"))
        b = exported(images=Image.open(tmp_path / f"{name}.png"), return_tensors="np")["pixel_values"][0]
        assert np.abs(a - b).max() < 1e-5, name


# ------------------------------------------------------------------------------------- hf-llava
def test_hf_llava_without_pad_token_adds_one_and_batches(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    model = vlm().eval()
    src = save(model, tmp_path / "mm", tokenizer=tokenizer)
    assert convert(src, tmp_path / "hf", "hf-llava") == 0
    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    pad = processor.tokenizer.pad_token_id
    assert processor.tokenizer.pad_token == "<pad>" and hf.config.pad_token_id == pad == hf.config.text_config.pad_token_id
    rows = hf.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows > pad
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in state)  # llava-hf names, as transformers 4.x reads
    assert any(k.startswith("vision_tower.vision_model.") for k in state)
    processor.tokenizer.padding_side = "left"
    images = [noise_image(32, 32, seed=i) for i in range(2)]
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
                for q in ("What is it?", "Describe the picture in a few words, please.")]
    prompts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        singles = []
        for prompt, image in zip(prompts, images, strict=True):
            batch = processor(text=[prompt], images=[image], return_tensors="pt")
            singles.append(hf.generate(**batch, **gen)[0, batch["input_ids"].shape[1]:].tolist())
        batch = processor(text=prompts, images=images, padding=True, return_tensors="pt")
        batched = [row[batch["input_ids"].shape[1]:].tolist() for row in hf.generate(**batch, **gen)]
    assert batched == singles


def test_hf_llava_processor_gives_mmloom_ids_and_pixels(tmp_path):
    transform = ImageTransform(32, pad_to_square=True)
    model, tokenizer = sp_vlm(tmp_path / "tok")
    src = save(model, tmp_path / "mm", processor=transform, tokenizer=tokenizer)
    assert convert(src, tmp_path / "hf", "hf-llava") == 0
    theirs = AutoProcessor.from_pretrained(tmp_path / "hf")
    ours = MultimodalProcessor.from_pretrained(src)
    image = noise_image()
    text = theirs.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
                                      add_generation_prompt=True)
    hf_batch = theirs(text=text, images=image, return_tensors="pt")
    mine = ours(conversations=[{"conversations": [{"from": "human", "value": "<image>\nWhat?"}]}], images=[image],
                add_generation_prompt=True)
    assert hf_batch["input_ids"][0].tolist() == mine["input_ids"][0].tolist()
    assert float((hf_batch["pixel_values"] - mine["vision"]["pixel_values"]).abs().max()) < 1e-5
