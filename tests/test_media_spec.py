"""The media-item specs (`mmloom.processing.media`): each spec loads, counts, extracts and makes its
dummy exactly as the model and the libraries underneath do, and the registry is the one list of
modalities (placeholders, default ids, skip reasons)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from transformers import CLIPImageProcessor, WhisperFeatureExtractor

from audio_data import EXTRACTOR, RATE, tone
from helpers import AUDIO_ID, IMAGE_ID, audio_vlm, vlm
from mmloom.data.build import special_ids
from mmloom.data.encode import SKIP_REASONS
from mmloom.errors import MmloomError
from mmloom.model.callbacks import AnyresPack, AudioPool, audio_token_count
from mmloom.model.encoder import ModalEncoderModule
from mmloom.model.feature_count import token_count_spec
from mmloom.processing.audio import AudioSpec, feature_extractor_from_spec
from mmloom.processing.image import ImageSpec, ImageTransform
from mmloom.processing.media import (
    MEDIA,
    PLACEHOLDERS,
    default_placeholder,
    default_token_id,
    spec_for_processor,
)
from mmloom.processing.media_spec import MediaError
from mmloom.processing.templates import PLACEHOLDERS as TEMPLATE_PLACEHOLDERS
from mmloom.processing.tokenizer import load_tokenizer
from mmloom.testing import tiny_whisper_encoder
from tokenizer_families import stock_vicuna_folder


def test_the_registry_is_the_one_list_of_modalities(tmp_path):
    assert list(MEDIA) == ["vision", "audio", "video"]
    assert TEMPLATE_PLACEHOLDERS is PLACEHOLDERS == ("<image>", "<audio>", "<video>")
    assert [default_placeholder(m) for m in ("vision", "audio", "video", "depth")] == [
        "<image>", "<audio>", "<video>", "<depth>"]
    for spec in MEDIA.values():  # every skip reason of a spec is counted and ordered by the build
        assert set(spec.reasons) <= set(SKIP_REASONS), spec
        assert {f"bad_{spec.noun}_path", f"{spec.noun}_token_mismatch"} <= set(spec.reasons)
    # the ids `mmloom data build` gives placeholders a tokenizer lacks are the default model ids
    tokenizer = load_tokenizer(stock_vicuna_folder(tmp_path / "vicuna"))
    for token in PLACEHOLDERS:  # a tokenizer without them
        assert token not in tokenizer.get_vocab()
    ids = special_ids(tokenizer, PLACEHOLDERS)
    vocab = ids["vocab_size"]
    assert ids["placeholder_ids"]["<image>"] == default_token_id("vision", vocab, 0) == vocab
    assert ids["placeholder_ids"]["<audio>"] == default_token_id("audio", vocab, 1) == vocab + 1
    assert ids["placeholder_ids"]["<video>"] == default_token_id("video", vocab, 2) == vocab + 2
    assert default_token_id("depth", vocab, 3) == vocab + 6


def test_image_spec_loads_checks_and_counts_as_the_model(tmp_path):
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    image.paste((10, 20, 30), (0, 0, 20, 24))
    image.save(tmp_path / "a.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    model = vlm().eval()
    transform = ImageTransform(image_size=32)
    spec = ImageSpec(num_tokens=model.num_feature_tokens("vision"), transform=transform, folder=tmp_path,
                     token_id=IMAGE_ID)
    loaded = spec.load(spec.path("a.png"))
    assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(image))
    for name, reason in (("missing.png", "missing_image"), ("junk.png", "bad_image"), (".", "missing_image")):
        with pytest.raises(MediaError) as info:
            spec.check(spec.path(name))
        assert info.value.reason == reason and info.value.reason in spec.reasons
    with pytest.raises(MediaError) as info:
        spec.with_settings(max_pixels=100).load(spec.path("a.png"))
    assert info.value.reason == "image_too_large"
    inputs = spec.encoder_inputs([loaded, loaded])
    np.testing.assert_array_equal(inputs["pixel_values"][0].numpy(), transform(loaded))
    counts = spec.token_counts([loaded, loaded], inputs)
    features = model.encode("vision", **inputs)  # (N, L, D): the model's own count
    assert counts == [features.shape[1]] * 2 == [spec.fixed_token_count] * 2
    dummy, tokens = spec.dummy()
    assert dummy["pixel_values"].shape == (1, 3, 32, 32) and not dummy["pixel_values"].any()
    assert tokens == model.encode("vision", **dummy).shape[1]
    blank = spec.blank(loaded)
    assert blank.size == loaded.size and len(set(blank.getdata())) == 1
    # a transformers image processor: the same pixels as calling it
    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    hf = spec.with_settings(transform=clip).encoder_inputs([loaded])
    torch.testing.assert_close(hf["pixel_values"], clip([loaded], return_tensors="pt")["pixel_values"])


def test_anyres_image_counts_follow_the_image_size():
    pack = AnyresPack(image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], patch_grid=4, image_size=32,
                      hidden_size=8)
    settings = {k: v for k, v in pack.to_dict().items() if k != "hidden_size"}
    spec = spec_for_processor("vision", None, anyres=settings)
    images = [Image.new("RGB", (64, 20)), Image.new("RGB", (20, 64)), np.zeros((3, 50, 50), np.float32)]
    assert spec.token_counts(images) == [pack.num_tokens((20, 64)), pack.num_tokens((64, 20)),
                                         pack.num_tokens((50, 50))]
    assert spec.fixed_token_count is None


def test_audio_spec_counts_extracts_and_makes_its_dummy_as_the_model(tmp_path):
    soundfile.write(tmp_path / "a.wav", tone(0.55, 300.0), RATE)
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    model = audio_vlm().eval()
    encoder = model.encoders["audio"]
    encoder.postprocess_module_callback = AudioPool(stride=2)
    rule = token_count_spec(encoder.config, encoder.callbacks)
    extractor = feature_extractor_from_spec(EXTRACTOR)
    spec = AudioSpec(extractor=extractor, count_rule=rule, folder=tmp_path, token_id=AUDIO_ID, max_seconds=1.0)
    wave = spec.load(spec.path("a.wav"))
    np.testing.assert_allclose(wave, soundfile.read(tmp_path / "a.wav", dtype="float32")[0], atol=1e-6)
    for name, reason in (("missing.wav", "missing_audio"), ("junk.wav", "bad_audio")):
        with pytest.raises(MediaError) as info:
            spec.load(spec.path(name))
        assert info.value.reason == reason and info.value.reason in spec.reasons
    inputs = spec.encoder_inputs([wave, tmp_path / "a.wav"])  # waveforms or files
    direct = WhisperFeatureExtractor(**EXTRACTOR)([wave, wave], return_tensors="pt", return_attention_mask=True,
                                                  sampling_rate=RATE)
    torch.testing.assert_close(inputs["input_features"], direct["input_features"])
    assert torch.equal(inputs["feature_attention_mask"], direct["attention_mask"].long())
    counts = spec.token_counts([wave, wave])
    frames = int(direct["attention_mask"][0].sum())
    assert counts == spec.token_counts([wave, wave], inputs) == [audio_token_count(frames, 2, 2)] * 2
    features = model.encode("audio", **inputs)  # per clip (n_i, D): the model's own count
    assert [f.shape[0] for f in features] == counts
    dummy, tokens = spec.dummy()
    assert tokens == 1 and [f.shape[0] for f in model.encode("audio", **dummy)] == [1]
    assert not dummy["input_features"].any()
    assert np.array_equal(spec.blank(wave), np.zeros_like(wave))
    with pytest.raises(MediaError) as info:
        spec.with_settings(max_seconds=0.5).load(spec.path("a.wav"))
    assert info.value.reason == "audio_too_long"


def test_audio_spec_round_trips_through_data_params():
    spec = AudioSpec(extractor=feature_extractor_from_spec(EXTRACTOR), token_id=7, max_seconds=1.0,
                     count_rule={"type": "audio_frames", "downsample": 2, "stride": 2})
    params = spec.params({"samples": 3, "items": 4, "tokens": 20})
    assert params["samples_with_audio"] == 3 and params["clips"] == 4 and params["audio_tokens"] == 20
    again = AudioSpec.from_data({"modalities": {"audio": params}, "dataset": {"audio": {"audio_dir": "clips"}}})
    assert (again.token_id, again.count_rule, again.max_seconds, str(again.folder)) == (7, spec.count_rule, 1.0, "clips")
    assert again.extractor.to_dict() == spec.extractor.to_dict()
    assert AudioSpec.from_data({"modalities": {}}) is None
    with pytest.raises(MmloomError, match="lacks 'token_count'"):
        AudioSpec.from_data({"modalities": {"audio": {"feature_extractor": EXTRACTOR}}})


def test_a_second_encoder_gets_the_spec_of_what_its_processor_takes():
    whisper = ModalEncoderModule(tiny_whisper_encoder())
    extractor = feature_extractor_from_spec(EXTRACTOR)
    spec = spec_for_processor("speech", extractor, count=token_count_spec(whisper.config, whisper.callbacks))
    assert isinstance(spec, AudioSpec) and spec.placeholder == "<speech>" and spec.record_key == "speech"
    other = spec_for_processor("sketch", ImageTransform(image_size=32), count=16)
    assert isinstance(other, ImageSpec) and other.placeholder == "<sketch>" and other.fixed_token_count == 16
