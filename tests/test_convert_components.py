"""`mmloom init` / `--from hf-components`: compose a new model from separate HF folders."""

import json

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, LlavaForConditionalGeneration

from mmloom import MultimodalModel, MultimodalProcessor
from mmloom.cli.main import main
from mmloom.testing import SAMPLE_TEXTS, tiny_llama
from mmloom.tokenization import train_bpe_tokenizer


def test_init_from_clip_and_llama_folders(tmp_path, capsys):
    torch.manual_seed(0)
    # a full CLIP folder (vision part taken), without preprocessor_config.json
    clip_config = CLIPConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=99),
    )
    clip = CLIPModel(clip_config).eval()
    clip.save_pretrained(tmp_path / "clip")
    # a tokenizer without <image> and a vocabulary that is not a multiple of 64
    tokenizer = train_bpe_tokenizer(SAMPLE_TEXTS * 4, vocab_size=300, extra_special_tokens=())
    llm = tiny_llama(vocab_size=len(tokenizer))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")

    out = tmp_path / "new"
    assert main(["init", "--image-model", str(tmp_path / "clip"), "--text-model", str(tmp_path / "llm"),
                 "--projector", "mlp2x_gelu", "--pad-to-multiple-of", "64", "--out", str(out)]) == 0
    model = MultimodalModel.from_pretrained(out)
    processor = MultimodalProcessor.from_pretrained(out)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == len(tokenizer) and model.placeholder_token_ids == {"vision": image_id}
    rows = model.language_model.get_input_embeddings().weight.shape[0]
    assert rows == 320 and model.language_model.lm_head.weight.shape[0] == 320  # 301 rounded up to 64
    assert model.language_model.config.vocab_size == 320
    # old rows kept, tower weights from the CLIPModel's vision part, LLaVA-1.5 feature selection
    assert torch.equal(model.language_model.get_input_embeddings().weight[: len(tokenizer)],
                       llm.get_input_embeddings().weight)
    tower_state, vision_state = model.vision_encoder.module.state_dict(), clip.vision_model.state_dict()
    assert tower_state.keys() == vision_state.keys()
    assert all(torch.equal(v, vision_state[k]) for k, v in tower_state.items())
    assert model.config.encoders["vision"]["callbacks"]["postprocess_module_callback"] == {
        "type": "feature_select", "layer": -2, "strategy": "patch"}
    assert model.config.encoders["vision"]["projector"]["projector_type"] == "mlp2x_gelu"
    assert processor.num_tokens == {"vision": 16} and processor.template.name == "vicuna_v1"
    assert json.loads((out / "vision_processor" / "preprocessor_config.json").read_text())["crop_size"] == {
        "height": 32, "width": 32}

    from PIL import Image

    batch = processor(conversations=[[{"role": "user", "content": "<image>\nWhat is it?"},
                                      {"role": "assistant", "content": "A red square."}]],
                      images=[Image.new("RGB", (48, 40), (255, 0, 0))])
    assert torch.isfinite(model(**batch).loss)

    # the same sources straight to transformers' Llava (read hf-components, write hf-llava)
    assert main(["convert", "--from", "hf-components", "--to", "hf-llava", "--image-model", str(tmp_path / "clip"),
                 "--text-model", str(tmp_path / "llm"), str(tmp_path / "hf")]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert hf.config.image_token_index == image_id


@pytest.mark.filterwarnings("ignore:At least one mel filter")
def test_init_with_an_audio_encoder_and_refusals(tmp_path, capsys):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    whisper = WhisperModel(WhisperConfig(
        num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=8,
        max_target_positions=16, vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        decoder_start_token_id=0))
    whisper.save_pretrained(tmp_path / "whisper")
    WhisperFeatureExtractor(feature_size=16, sampling_rate=1600, hop_length=100, chunk_length=1,
                            n_fft=200).save_pretrained(tmp_path / "whisper")
    tokenizer = train_bpe_tokenizer(SAMPLE_TEXTS * 4, vocab_size=300, extra_special_tokens=())
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    assert main(["init", "--audio-model", str(tmp_path / "whisper"), "--text-model", str(tmp_path / "llm"),
                 "--projector", "mlp", "--out", str(tmp_path / "audio")]) == 0
    model = MultimodalModel.from_pretrained(tmp_path / "audio")
    processor = MultimodalProcessor.from_pretrained(tmp_path / "audio")
    assert model.encoder_names == ["audio"]
    # per-clip counts from the real length (AudioPool), not the encoder's full window
    assert processor.num_tokens == {"audio": {"type": "audio_frames", "downsample": 2, "stride": 1}}
    assert model.placeholder_token_ids == {"audio": processor.tokenizer.convert_tokens_to_ids("<audio>")}
    sound = torch.sin(torch.linspace(0, 100, 1600)).numpy()
    batch = processor(text=["USER: <audio> What is it? ASSISTANT: A tone."], audio=[sound],
                      processor_kwargs={"audio": {"sampling_rate": 1600}})
    assert torch.isfinite(model(**batch).loss)
    capsys.readouterr()
    assert main(["convert", "--from", "mmloom", "--to", "llava", str(tmp_path / "audio"), str(tmp_path / "x")]) == 2
    assert "exactly one encoder named 'vision'" in capsys.readouterr().err
    assert main(["init", "--text-model", str(tmp_path / "llm"), "--out", str(tmp_path / "y")]) == 2
    assert main(["init", "--image-model", str(tmp_path / "nowhere"), "--text-model", str(tmp_path / "llm"),
                 "--out", str(tmp_path / "y")]) == 2
    assert "argument --image-model: folder not found" in capsys.readouterr().err
