"""Checkpoint conversion: mmloom <-> hf-llava, mmloom <-> original LLaVA, HF components -> mmloom,
phase-1 projector import; equal logits and greedy generations after every conversion."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from helpers import IMAGE_ID, pad_batch, sample_ids, sp_vlm, vlm
from mmloom import MultimodalModel, MultimodalProcessor
from mmloom.cli.main import main
from mmloom.errors import MmloomError
from mmloom.interop.common import Bundle, write_mmloom
from mmloom.interop.formats import supported_pairs
from mmloom.testing import tiny_tokenizer

CLIP_PROC = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=3)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny CLIP + Llama composite saved with its processor; returns (model, folder)."""
    torch.manual_seed(0)
    model = vlm().eval()
    folder = tmp_path_factory.mktemp("conv") / "mm"
    write_mmloom(Bundle(model, tiny_tokenizer(), {"vision": CLIP_PROC}), folder)
    return model, folder


@pytest.fixture(scope="module")
def batch():
    return make_batch(IMAGE_ID)


@pytest.fixture(scope="module")
def sp_source(tmp_path_factory):
    """A composite the original LLaVA code can serve (SentencePiece tokenizer, vicuna_v1), saved with its
    processor; returns (model, folder, batch)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sp")
    model, tokenizer = sp_vlm(root / "tok")
    folder = root / "mm"
    write_mmloom(Bundle(model, tokenizer, {"vision": CLIP_PROC}), folder)
    return model, folder, make_batch(model.placeholder_token_ids["vision"])


def make_batch(image_id):
    ids, mask = pad_batch([sample_ids(16, (30, 31, 32, 33, 34), placeholder=image_id),
                           sample_ids(16, (40, 41), placeholder=image_id)], side="left")
    torch.manual_seed(1)
    return ids, mask, torch.randn(2, 3, 32, 32)


def logits_and_greedy(model, batch):
    ids, mask, pixels = batch
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        if isinstance(model, MultimodalModel):
            generated = model.generate(ids, attention_mask=mask, pixel_values=pixels, **GREEDY)
        else:
            generated = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **GREEDY)
    return logits, generated


def assert_same(reference, other, batch):
    ref_logits, ref_generated = logits_and_greedy(reference, batch)
    logits, generated = logits_and_greedy(other, batch)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(generated, ref_generated)


def test_list_shows_every_pair(capsys):
    assert main(["convert", "--list"]) == 0
    out = capsys.readouterr().out
    for a, b in [("hf-components", "mmloom"), ("mmloom", "hf-llava"), ("hf-llava", "mmloom"), ("mmloom", "llava"),
                 ("llava", "mmloom"), ("llava-projector", "mmloom"), ("hf-llava", "llava")]:
        assert (a, b) in supported_pairs()
        assert f"{a:<16} -> {b}" in out


def test_hf_llava_both_ways(source, batch, tmp_path):
    model, folder = source
    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(folder), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["image_token_index"] == IMAGE_ID and config["image_seq_length"] == 16
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["projector_hidden_act"] == "gelu"
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()  # transformers' own loader
    assert_same(model, hf, batch)

    # LlavaProcessor from the folder expands <image> exactly like mmloom's processor.
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    ours = MultimodalProcessor.from_pretrained(folder)
    image, prompt = Image.new("RGB", (40, 30), (200, 30, 10)), "USER: <image>\nWhat is it? ASSISTANT:"
    theirs = hf_processor(images=image, text=prompt, return_tensors="pt")
    mine = ours(text=[prompt], images=[image])
    assert torch.equal(theirs["input_ids"], mine["input_ids"])
    torch.testing.assert_close(theirs["pixel_values"], mine["vision"]["pixel_values"])
    chat = hf_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True)
    assert chat == ours.template.render([{"role": "user", "content": "<image>\nWhat is it?"}], True)

    assert main(["convert", "--from", "hf-llava", "--to", "mmloom", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = MultimodalModel.from_pretrained(tmp_path / "back")
    assert back.config.encoders["vision"]["callbacks"] == model.config.encoders["vision"]["callbacks"]
    assert back.config.encoders["vision"]["projector"]["projector_type"] == "mlp2x_gelu"
    assert_same(model, back, batch)
    processor = MultimodalProcessor.from_pretrained(tmp_path / "back")
    assert processor.num_tokens == {"vision": 16} and processor.template.name == "vicuna_v1"
    assert processor.encoder_processors["vision"].crop_size["height"] == 32


def reimplemented_llava_forward(folder, batch, image_id=IMAGE_ID):
    """Logits computed from the original-LLaVA files with plain transformers parts."""
    text = folder / "text_model_llava"
    config = json.loads((text / "config.json").read_text())
    state = load_file(str(text / "model.safetensors"))
    projector = {k: state.pop(k) for k in list(state) if k.startswith("model.mm_projector.")}
    llm = LlamaForCausalLM(LlamaConfig(**json.loads((text / "config_lmsys.json").read_text()))).eval()
    llm.load_state_dict(state, strict=True)
    tower = CLIPVisionModel.from_pretrained(config["mm_vision_tower"]).eval()
    ids, mask, pixels = batch
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[config["mm_vision_select_layer"]][:, 1:]
        p = "model.mm_projector."
        features = torch.nn.functional.linear(hidden, projector[p + "0.weight"], projector[p + "0.bias"])
        features = torch.nn.functional.gelu(features)
        features = torch.nn.functional.linear(features, projector[p + "2.weight"], projector[p + "2.bias"])
        embeds = llm.get_input_embeddings()(ids.masked_fill(ids == image_id, 0))
        embeds[ids == image_id] = features.reshape(-1, features.shape[-1])
        return llm(inputs_embeds=embeds, attention_mask=mask).logits


def test_original_llava_both_ways(sp_source, tmp_path):
    model, folder, batch = sp_source
    image_id = model.placeholder_token_ids["vision"]
    dst = tmp_path / "pair"
    assert main(["convert", "--from", "mmloom", "--to", "llava", str(folder), str(dst)]) == 0
    text = dst / "text_model_llava"
    config = json.loads((text / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["model_type"] == "llava_llama"
    assert config["mm_vision_tower"] == str((dst / "image_model").resolve())
    expected = {"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32, "mm_vision_select_layer": -2,
                "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
                "image_aspect_ratio": "square", "mm_patch_merge_type": "flat", "tokenizer_padding_side": "right"}
    assert {k: config[k] for k in expected} == expected and config["tokenizer_model_max_length"] == 4096
    assert json.loads((text / "config_lmsys.json").read_text())["model_type"] == "llama"
    assert (dst / "image_model" / "preprocessor_config.json").exists() and (text / "tokenizer.model").exists()
    assert config["mmloom_template"] == {"name": "vicuna_v1", "options": {}, "conv_mode": "llava_v1"}
    keys = set(load_file(str(text / "model.safetensors")))
    assert {"model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight",
            "model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
            "model.mm_projector.2.bias"} <= keys
    assert not any(k.startswith("model.vision_tower") for k in keys)
    ref_logits, _ = logits_and_greedy(model, batch)
    torch.testing.assert_close(reimplemented_llava_forward(dst, batch, image_id), ref_logits, atol=1e-5, rtol=0)

    assert main(["convert", "--from", "llava", "--to", "mmloom", str(dst), str(tmp_path / "back")]) == 0
    back = MultimodalModel.from_pretrained(tmp_path / "back")
    assert back.placeholder_token_ids == {"vision": image_id}
    assert_same(model, back, batch)

    # chained through the composite: original LLaVA straight to transformers' Llava
    assert main(["convert", "--from", "llava", "--to", "hf-llava", str(text), str(tmp_path / "hf")]) == 0
    assert_same(model, LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval(), batch)


def test_llava_projector_import(source, batch, tmp_path):
    model, folder = source
    torch.manual_seed(5)
    donor = vlm().eval()  # same shapes, other projector weights
    projection = donor.vision_encoder.projector.projection
    torch.save({f"model.mm_projector.{k}": v for k, v in projection.state_dict().items()}, tmp_path / "mm_projector.bin")
    dst = tmp_path / "phase1"
    assert main(["convert", "--from", "llava-projector", "--to", "mmloom", str(tmp_path / "mm_projector.bin"),
                 str(dst), "--base", str(folder)]) == 0
    imported = MultimodalModel.from_pretrained(dst)
    for k, v in projection.state_dict().items():
        assert torch.equal(imported.vision_encoder.projector.projection.state_dict()[k], v)
    llm_keys = model.language_model.state_dict()
    assert all(torch.equal(v, llm_keys[k]) for k, v in imported.language_model.state_dict().items())
    assert MultimodalProcessor.from_pretrained(dst).num_tokens == {"vision": 16}
    # in place (base defaults to DST), then a mismatching projector is refused
    assert main(["convert", "--from", "llava-projector", "--to", "mmloom", str(tmp_path / "mm_projector.bin"),
                 str(dst)]) == 0
    torch.save({"model.mm_projector.0.weight": torch.zeros(48, 32)}, tmp_path / "linear.bin")
    assert main(["convert", "--from", "llava-projector", "--to", "mmloom", str(tmp_path / "linear.bin"), str(dst)]) == 2


def test_refuses_what_a_format_cannot_hold(tmp_path, capsys):
    from helpers import audio_vlm

    tok = tiny_tokenizer()
    with pytest.warns(UserWarning, match="only the tokenizer is saved"):
        write_mmloom(Bundle(audio_vlm(), tok, {}), tmp_path / "audio")
    write_mmloom(Bundle(vlm("qwen2"), tok, {"vision": CLIP_PROC}), tmp_path / "qwen")
    linear, sp_tok = sp_vlm(tmp_path / "tok", projector="linear")
    write_mmloom(Bundle(linear, sp_tok, {"vision": CLIP_PROC}), tmp_path / "linear")
    write_mmloom(Bundle(vlm(), tok, {"vision": CLIP_PROC}), tmp_path / "bpe")
    chatml, sp_tok = sp_vlm(tmp_path / "tok2")
    write_mmloom(Bundle(chatml, sp_tok, {"vision": CLIP_PROC}, "chatml"), tmp_path / "chatml")
    cases = [("audio", "hf-llava", "exactly one encoder named 'vision'"),
             ("qwen", "llava", "supports Llama-family language models"),
             ("linear", "hf-llava", "2-layer MLP projector"),
             ("chatml", "llava", "no conversation template for this model's template 'chatml'")]
    for name, fmt, message in cases:
        capsys.readouterr()
        assert main(["convert", "--from", "mmloom", "--to", fmt, str(tmp_path / name), str(tmp_path / f"{name}-out")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / f"{name}-out").exists()  # nothing half-written
    # a byte-level tokenizer is written as PreTrainedTokenizerFast, which the original builder loads even with
    # use_fast=False (checked in transformers 4.37.2); a slow Llama class without its tokenizer.model is refused
    assert main(["convert", "--from", "mmloom", "--to", "llava", str(tmp_path / "bpe"), str(tmp_path / "b")]) == 0
    from mmloom.interop.llava_original import check_servable

    slow = tiny_tokenizer()
    slow.saved_class_name = "LlamaTokenizer"
    with pytest.raises(MmloomError, match=r"\(LlamaTokenizer\) has no SentencePiece tokenizer.model"):
        check_servable(Bundle(vlm(), slow, {"vision": CLIP_PROC}), "llama")
    # qwen2 is fine for transformers' Llava; a linear projector for the original LLaVA
    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(tmp_path / "qwen"), str(tmp_path / "q")]) == 0
    assert main(["convert", "--from", "mmloom", "--to", "llava", str(tmp_path / "linear"), str(tmp_path / "l")]) == 0
    config = json.loads((tmp_path / "l" / "text_model_llava" / "config.json").read_text())
    assert config["mm_projector_type"] == "linear"
    assert main(["convert", "--from", "hf-llava", "--to", "hf-components", str(tmp_path / "q"), str(tmp_path / "x")]) == 2


def test_dtype_option_casts_the_written_weights(sp_source, tmp_path):
    _, folder, _ = sp_source
    assert main(["convert", "--from", "mmloom", "--to", "llava", "--dtype", "bfloat16", str(folder),
                 str(tmp_path / "bf16")]) == 0
    state = load_file(str(tmp_path / "bf16" / "text_model_llava" / "model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert main(["convert", "--from", "llava", "--to", "mmloom", str(tmp_path / "bf16"), str(tmp_path / "m")]) == 0
    assert {t.dtype for t in load_file(str(tmp_path / "m" / "model.safetensors")).values()} == {torch.bfloat16}
