"""MultimodalProcessor: placeholder expansion agreeing with the model, labels, padding, save/load."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from transformers import CLIPImageProcessor, WhisperFeatureExtractor

from helpers import IMAGE_ID, audio_vlm, vlm
from mmloom import MultimodalModel, MultimodalProcessor
from mmloom.errors import MmloomError

ASTRONAUT = Image.fromarray(skdata.astronaut())
CHELSEA = Image.fromarray(skdata.chelsea())
CLIP_PROC = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
RECORD = {"id": "1", "image": "a.png", "conversations": [
    {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "One."}]}


@pytest.fixture(scope="module")
def model():
    return vlm().eval()


def test_expands_placeholders_to_the_models_feature_count_and_masks_prompts(model, tokenizer):
    processor = MultimodalProcessor.from_model(model, tokenizer, {"vision": CLIP_PROC}, template="vicuna_v1")
    assert processor.num_tokens == {"vision": 16}
    batch = processor(conversations=[RECORD], images=[ASTRONAUT])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert (ids == IMAGE_ID).sum() == 16 and (labels[ids == IMAGE_ID] == -100).all()
    assert tokenizer.decode(ids[labels != -100]) == " A red circle.</s> One.</s>"
    text = tokenizer.decode(ids[ids != IMAGE_ID])
    assert text.startswith("<s>A chat between") and "USER: \nWhat is shown? ASSISTANT:" in text
    assert batch["vision"]["pixel_values"].shape == (1, 3, 32, 32)
    out = model(**batch)  # the batch goes straight into the model
    assert torch.isfinite(out.loss)


def test_generation_prompt_left_padding_and_several_images(model, tokenizer):
    processor = MultimodalProcessor.from_model(model, tokenizer, {"vision": CLIP_PROC})
    conversations = [
        [{"role": "user", "content": "<image>\nDescribe."}],
        [{"role": "user", "content": "<image> and <image>: which is a cat?"}],
        [{"role": "user", "content": "No picture here."}],
    ]
    batch = processor(conversations=conversations, images=[ASTRONAUT, [ASTRONAUT, CHELSEA], None],
                      add_generation_prompt=True, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ((ids == IMAGE_ID).sum(1) == torch.tensor([16, 32, 0])).all()
    assert (mask[:, -1] == 1).all() and (mask[2, 0] == 0)
    assert tokenizer.decode(ids[0][mask[0] == 1]).endswith("ASSISTANT:")
    assert batch["vision"]["pixel_values"].shape[0] == 3
    out = model.generate(ids, attention_mask=mask, vision=batch["vision"], max_new_tokens=3, do_sample=False,
                         pad_token_id=3)
    assert out.shape == (3, ids.shape[1] + 3)


def test_item_count_and_length_errors_name_the_sample(model, tokenizer):
    processor = MultimodalProcessor.from_model(model, tokenizer, {"vision": CLIP_PROC}, max_length=100)
    with pytest.raises(MmloomError, match=r"sample 1: 1 <image> placeholder\(s\) in the text but 0 vision item"):
        processor(conversations=[[{"role": "user", "content": "hi"}], RECORD], images=[None, None])
    with pytest.raises(MmloomError, match="sample 0 is .* tokens long .* over max_length 100; it is not truncated"):
        processor(conversations=[RECORD], images=[ASTRONAUT])
    with pytest.raises(MmloomError, match="not a token of the tokenizer"):
        MultimodalProcessor({"vision": CLIP_PROC}, tokenizer, placeholders={"vision": "<picture>"})


def test_audio_and_raw_text_prompts(tokenizer):
    model = audio_vlm().eval()
    whisper = WhisperFeatureExtractor(feature_size=16, sampling_rate=1600, hop_length=100, chunk_length=1, n_fft=200)
    processor = MultimodalProcessor.from_model(model, tokenizer, {"vision": CLIP_PROC, "audio": whisper})
    assert processor.num_tokens == {"vision": 16, "audio": 8}
    sound = np.sin(np.linspace(0, 100, 1600)).astype(np.float32)  # 1 s -> 16 frames
    batch = processor(text=["USER: <image> then <audio> ASSISTANT:"], images=[ASTRONAUT], audio=[sound],
                      processor_kwargs={"audio": {"sampling_rate": 1600}})
    assert batch["audio"]["input_features"].shape == (1, 16, 16)
    assert torch.isfinite(model(**batch).loss)


def test_save_and_load_with_the_model_directory(model, tokenizer, tmp_path):
    processor = MultimodalProcessor.from_model(model, tokenizer, {"vision": CLIP_PROC}, template="chatml")
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    loaded = MultimodalProcessor.from_pretrained(tmp_path / "m")
    assert loaded.template.name == "chatml" and loaded.num_tokens == {"vision": 16}
    from_config = MultimodalProcessor.from_model(MultimodalModel.from_pretrained(tmp_path / "m").config,
                                                 loaded.tokenizer, loaded.encoder_processors, template="chatml")
    assert from_config.num_tokens == processor.num_tokens
    a = processor(conversations=[RECORD], images=[CHELSEA])
    b = loaded(conversations=[RECORD], images=[CHELSEA])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(a["vision"]["pixel_values"], b["vision"]["pixel_values"])


def test_anyres_counts_follow_each_images_size_and_feed_the_model(tokenizer, tmp_path):
    from transformers import LlavaNextImageProcessor

    from mmloom import AnyresPack, FeatureSelect, ModalEncoderModule
    from mmloom.testing import tiny_clip_vision, tiny_llama

    pinpoints = [[32, 64], [64, 32], [64, 64]]
    model = MultimodalModel(
        {"vision": ModalEncoderModule(
            tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch"),
            postprocess_projector_callback=AnyresPack(48, pinpoints, patch_grid=4, image_size=32))},
        tiny_llama(), init_projector_type="mlp2x_gelu", placeholder_token_ids={"vision": IMAGE_ID}).eval()
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=pinpoints)
    processor = MultimodalProcessor.from_model(model, tokenizer, {"vision": image_processor})
    wide, tall = ASTRONAUT.resize((70, 40)), CHELSEA.resize((30, 64))  # (width, height)
    batch = processor(conversations=[RECORD, RECORD], images=[wide, tall])
    expected = [model.num_feature_tokens("vision", (40, 70)), model.num_feature_tokens("vision", (64, 30))]
    assert expected[0] != expected[1]
    assert (batch["input_ids"] == IMAGE_ID).sum(1).tolist() == expected
    assert batch["vision"]["pixel_values"].dim() == 4  # real views only, flattened
    assert torch.isfinite(model(**batch).loss)  # the model's per-sample count check passes
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    loaded = MultimodalProcessor.from_pretrained(tmp_path / "m")
    assert loaded.anyres == processor.anyres
    assert torch.equal(loaded(conversations=[RECORD], images=[tall])["input_ids"], processor(
        conversations=[RECORD], images=[tall])["input_ids"])
