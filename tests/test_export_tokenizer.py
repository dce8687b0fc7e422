"""`convert --to hf-llava` of a model whose tokenizer lacks `<image>` (the stock Vicuna tokenizer, as a
run saves it when no processor could be written) exports a tokenizer with it, as `mmloom data build`
adds it; a model folder without a tokenizer is refused (never an export without one)."""

from __future__ import annotations

import json

import torch
from transformers import AutoTokenizer, CLIPImageProcessor

from mmloom import FeatureSelect, ModalEncoderModule, MultimodalModel
from mmloom.cli.main import main
from mmloom.testing import tiny_clip_vision, tiny_llm
from tokenizer_families import LLAMA2_TOKENIZER_MODEL, stock_vicuna_folder


def stock_model_folder(folder, with_tokenizer: bool = True):
    torch.manual_seed(0)
    encoder = ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch"))
    # Vicuna's 32000 ids; <image> = 32000 as `data build` and the trainer's default give it
    model = MultimodalModel({"vision": encoder}, tiny_llm("llama", vocab_size=32000, hidden_size=16),
                            init_projector_type="mlp2x_gelu", placeholder_token_ids={"vision": 32000})
    model.save_pretrained(folder, trainable_only=False)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    if with_tokenizer:
        stock_vicuna_folder(folder)
    return folder


def test_hf_llava_export_adds_the_image_token_to_a_stock_tokenizer(tmp_path, capsys):
    assert LLAMA2_TOKENIZER_MODEL.is_file(), "CI has ../shared/assets/llama2-tokenizer"
    src = stock_model_folder(tmp_path / "final_model")
    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(src), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert "added <image> (id 32000) to the tokenizer" in err
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.convert_tokens_to_ids("<image>") == 32000
    assert tokenizer("<image>", add_special_tokens=False).input_ids == [32000]
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id not in (32000,)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["image_token_index"] == 32000
    assert json.loads((tmp_path / "hf" / "processor_config.json").read_text())["image_token"] == "<image>"


def test_hf_llava_export_without_a_tokenizer_is_refused(tmp_path, capsys):
    src = stock_model_folder(tmp_path / "final_model", with_tokenizer=False)
    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(src), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmloom convert: error: {src} has no tokenizer: an hf-llava export needs one")
    assert len(err.splitlines()) == 1 and not (tmp_path / "hf").exists()
