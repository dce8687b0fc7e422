"""Audio data: decoding (WAV/FLAC/OGG/MP3, resampling), every bad-input class counted by the HDF5
build, the .h5 extension (image-only files unchanged), and one token count per clip that the
build, the processor and the model agree on."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from audio_data import EXTRACTOR, RATE, data_params, make_audio_data, tone, write_clip
from mmloom import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from mmloom.errors import MmloomError
from mmloom.model.callbacks import AudioPool, audio_positions, audio_token_count
from mmloom.processing.audio import extract_features, load_audio
from mmloom.processing.media_spec import MediaError
from mmloom.testing import tiny_llm, tiny_whisper_encoder


def extractor():
    return WhisperFeatureExtractor(**EXTRACTOR)


@pytest.mark.parametrize("fmt,suffix", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg"), ("MP3", "mp3")])
def test_formats_decode_and_resample(tmp_path, fmt, suffix):
    wave = tone(0.5, 440.0, rate=8000)
    write_clip(tmp_path / f"a.{suffix}", wave, rate=8000, fmt=fmt)
    out = load_audio(tmp_path / f"a.{suffix}", RATE)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 0.5 * RATE) <= 0.02 * RATE  # MP3 adds encoder delay/padding
    # the resampled tone keeps its pitch: the spectrum peaks at 440 Hz
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    peak = np.fft.rfftfreq(len(out), 1 / RATE)[spectrum.argmax()]
    assert abs(peak - 440.0) < 10


def test_stereo_is_mixed_to_mono(tmp_path):
    left, right = tone(0.25, 300.0), np.zeros(int(0.25 * RATE), np.float32)
    write_clip(tmp_path / "s.wav", np.stack([left, right], axis=1))
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav", RATE), left / 2, atol=1e-4)


def test_bad_audio_raises_by_reason(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    write_clip(tmp_path / "empty.wav", np.zeros(0, np.float32))
    write_clip(tmp_path / "long.wav", tone(2.0, 300.0))
    write_clip(tmp_path / "slow.wav", tone(1.0, 10.0, rate=50), rate=50)
    cases = {"missing.wav": "missing_audio", "junk.wav": "bad_audio", "empty.wav": "empty_audio",
             "long.wav": "audio_too_long", "slow.wav": "bad_sample_rate"}
    for name, reason in cases.items():
        with pytest.raises(MediaError) as info:
            load_audio(tmp_path / name, RATE, max_seconds=1.0)
        assert info.value.reason == reason, (name, info.value)
        assert name in str(info.value)


def test_build_counts_every_bad_audio_class(tmp_path):
    bad = tmp_path / "audio"
    write_clip(bad / "empty.wav", np.zeros(0, np.float32))
    write_clip(bad / "long.wav", tone(1.5, 300.0))  # over the extractor's 1 s window
    write_clip(bad / "slow.wav", tone(1.0, 10.0, rate=50), rate=50)
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "junk.wav").write_bytes(b"not audio")

    def record(audio, question="<audio>\nWhat is it?"):
        return {"audio": audio, "conversations": [{"from": "human", "value": question},
                                                  {"from": "gpt", "value": "A tone."}]}

    extra = [record("missing.wav"), record("junk.wav"), record("empty.wav"), record("long.wav"),
             record("slow.wav"), record("../outside.wav"), record("clip0.wav", question="No placeholder here."),
             record(["clip0.wav", "clip1.wav"]), record(5)]
    root = make_audio_data(tmp_path, n=5, extra_records=extra)
    skipped = data_params(root)["post-process"]["skipped"]
    assert skipped == {"bad_record": 1, "bad_audio_path": 1, "missing_audio": 1, "bad_audio": 1, "empty_audio": 1,
                       "audio_too_long": 1, "bad_sample_rate": 1, "audio_token_mismatch": 2}


def test_h5_extension_and_image_only_layout(tmp_path):
    root = make_audio_data(tmp_path / "a", n=6)
    params = data_params(root)
    audio = params["modalities"]["audio"]
    assert audio["token_count"] == {"type": "audio_frames", "downsample": 2, "stride": 2}
    assert audio["token_id"] == 5 and audio["placeholder"] == "<audio>"
    with h5py.File(root / "h5" / "data-00000.h5") as f:
        assert set(f) == {"data", "img_path", "image_start_idx", "audio_path", "audio_span", "audio_offset"}
        offsets, spans, paths = f["audio_offset"][:], f["audio_span"][:], f["audio_path"][:]
        data = f["data"][:]
    assert offsets.tolist() == [0, 1, 2, 4, 5, 5, 7]  # samples 2 and 5 have two clips, sample 4 none
    assert paths[2:4].tolist() == [b"clip2.wav", b"clip2b.wav"]
    for sample in range(6):
        for k in range(offsets[sample], offsets[sample + 1]):
            start, length = spans[k]
            assert (data[sample, 3, start:start + length] == 0).all()  # attended
            assert (data[sample, 1, start - 1:start + length - 1] == 0).all()  # never a target
    # image-only data keep the Cerebras layout exactly: no audio dataset, no modalities entry
    from test_train_loop import make_data

    images = make_data(tmp_path / "img", n=4)
    with h5py.File(images / "phase2_h5" / "data-00000.h5") as f:
        assert set(f) == {"data", "img_path", "image_start_idx"}
    assert "modalities" not in __import__("json").loads((images / "phase2_h5" / "data_params.json").read_text())


def test_conv_arithmetic_and_pooling():
    # Whisper's conv2 (kernel 3, stride 2, padding 1) over F real frames gives audio_positions(F, 2) outputs
    conv = torch.nn.Conv1d(1, 1, kernel_size=3, stride=2, padding=1)
    for frames in range(1, 40):
        assert conv(torch.zeros(1, 1, frames)).shape[-1] == audio_positions(frames, 2)
    assert audio_token_count(3000, 2, 4) == 375 and audio_token_count(1000, 2, 4) == 125  # 30 s, 10 s
    features = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    from transformers.modeling_outputs import BaseModelOutput

    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[0, :16], mask[1, :5] = 1, 1  # 8 and 3 real positions
    mean = AudioPool(stride=3, mode="mean")({"feature_attention_mask": mask}, BaseModelOutput(last_hidden_state=features))
    stack = AudioPool(stride=3, mode="stack")({"feature_attention_mask": mask}, BaseModelOutput(last_hidden_state=features))
    assert [m.shape for m in mean] == [(3, 3), (1, 3)] and [s.shape for s in stack] == [(3, 9), (1, 9)]
    torch.testing.assert_close(mean[0][2], features[0, 6:8].mean(0))  # the partial last group: its own mean
    torch.testing.assert_close(stack[0][2], torch.cat([features[0, 6], features[0, 7], torch.zeros(3)]))
    torch.testing.assert_close(mean[1][0], features[1, :3].mean(0))


@pytest.mark.parametrize("mode", ["mean", "stack"])
def test_build_processor_and_model_agree_on_counts(tmp_path, tokenizer, mode):
    root = make_audio_data(tmp_path, n=6)
    with h5py.File(root / "h5" / "data-00000.h5") as f:
        built = f["audio_span"][:, 1].tolist()
        paths = [p.decode() for p in f["audio_path"][:]]
    model = MultimodalModel({"audio": ModalEncoderModule(tiny_whisper_encoder(),
                                                         postprocess_module_callback=AudioPool(2, mode))},
                            tiny_llm(), init_projector_type="mlp2x_gelu", placeholder_token_ids={"audio": 5}).eval()
    processor = MultimodalProcessor.from_model(model, tokenizer, {"audio": extractor()})
    clips = [str(root / "audio" / p) for p in paths]
    assert processor.item_tokens("audio", clips) == built
    batch = processor(text=["USER: <audio> hi ASSISTANT:"] * len(clips), audio=clips)
    assert (batch["input_ids"] == 5).sum(1).tolist() == built
    features = model.encode("audio", **batch["audio"])
    assert [f.shape[0] for f in features] == built
    assert len(set(built)) > 2  # clips of different lengths give different counts
    with torch.no_grad():
        model(**batch)  # every placeholder filled


def test_processor_refuses_wrong_rate_and_too_long_waveforms(tokenizer):
    model = MultimodalModel({"audio": ModalEncoderModule(tiny_whisper_encoder(), postprocess_module_callback=AudioPool(2))},
                            tiny_llm(), placeholder_token_ids={"audio": 5})
    processor = MultimodalProcessor.from_model(model, tokenizer, {"audio": extractor()})
    with pytest.raises(MmloomError, match="1600 Hz"):
        processor(text=["<audio> hi"], audio=[tone(0.5, 300)], processor_kwargs={"audio": {"sampling_rate": 16000}})
    with pytest.raises(MmloomError, match="window"):
        extract_features(extractor(), [tone(1.5, 300)])


def test_build_summary_counts_audio_and_text_only_samples(tmp_path, capsys):
    from mmloom.data.build import print_summary

    root = make_audio_data(tmp_path / "a", n=6)
    capsys.readouterr()
    print_summary(data_params(root), elapsed=1.0)  # what a build without --quiet prints last
    lines = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    assert any(line.startswith("with audio (7 clips,") and line.endswith(" 5") for line in lines), lines
    assert any(line.startswith("text-only ") for line in lines), lines
