"""Audio loading for every stage: decode with `soundfile` (libsndfile: WAV, FLAC, MP3, OGG/Vorbis,
Opus...), mix to mono, resample with `soxr` to the feature extractor's rate, and run the encoder's
own HF feature extractor (Whisper's log-mel) with the per-frame mask that tells real audio from
padding.

The frame mask is what every stage counts an item's feature tokens from
(`mmloom.model.feature_count.audio_token_counts`): the processor, `mmloom data build` and the
model itself, so the three always agree.

Bad input raises :class:`AudioLoadError` with a `reason` that the HDF5 build counts like image
reasons: `missing_audio`, `bad_audio` (not decodable, or non-finite samples), `empty_audio` (no
samples), `audio_too_long` (longer than the extractor's window or the given
limit: Whisper's extractor would silently cut it), `bad_sample_rate` (a rate soxr cannot convert).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mmloom.errors import MmloomError
from mmloom.remote_code import refuse_remote_code

# Input names: the extractor's frame mask is renamed so that it never meets the language
# model's `attention_mask` (the name Qwen2-Audio uses for the same mask).
FEATURE_MASK = "feature_attention_mask"
AUDIO_REASONS = ("bad_audio_path", "missing_audio", "bad_audio", "empty_audio", "audio_too_long", "bad_sample_rate")
# soxr converts rates whose ratio is within its range; rates outside these bounds are not audio.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 100, 1_536_000


class AudioLoadError(MmloomError):
    """An audio file cannot be used; `path` and `reason` (one of AUDIO_REASONS) are set."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str):
        super().__init__(f"cannot use audio {str(path)!r}: {detail}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail


def resample(waveform: np.ndarray, rate: int, target_rate: int, path: str | os.PathLike = "<array>") -> np.ndarray:
    """`waveform` (T,) float32 at `rate` Hz -> (T',) float32 at `target_rate` Hz (soxr, high quality).

    Raises AudioLoadError('bad_sample_rate') for a rate outside [100 Hz, 1.536 MHz] or one soxr refuses."""
    if rate == target_rate:
        return waveform
    if not MIN_SAMPLE_RATE <= int(rate) <= MAX_SAMPLE_RATE:
        raise AudioLoadError(path, "bad_sample_rate", f"sample rate {rate} Hz cannot be resampled to {target_rate} Hz")
    import soxr

    try:
        return np.asarray(soxr.resample(waveform, int(rate), int(target_rate), quality="HQ"), dtype=np.float32)
    except (ValueError, RuntimeError) as exc:
        raise AudioLoadError(path, "bad_sample_rate", f"cannot resample {rate} Hz to {target_rate} Hz ({exc})") from None


def load_audio(path: str | os.PathLike, sampling_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Decode an audio file to a mono float32 waveform (T,) in [-1, 1] at `sampling_rate` Hz.

    Channels are averaged. Raises AudioLoadError: `missing_audio` (no such file), `bad_audio`
    (libsndfile cannot decode it), `empty_audio` (no samples), `audio_too_long`
    (more than `max_seconds`), `bad_sample_rate` (see `resample`).
    """
    import soundfile

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise AudioLoadError(p, "missing_audio", "file not found")
    try:
        with soundfile.SoundFile(p) as f:
            rate, frames = int(f.samplerate), int(f.frames)
            if max_seconds is not None and rate > 0 and frames / rate > max_seconds:
                raise AudioLoadError(p, "audio_too_long",
                                     f"{frames / rate:.2f} s is longer than the {max_seconds:g} s limit")
            data = f.read(dtype="float32", always_2d=True)  # (T, channels)
    except AudioLoadError:
        raise
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
        raise AudioLoadError(p, "bad_audio", f"not decodable audio ({str(exc).strip() or type(exc).__name__})") from None
    waveform = data.mean(axis=1) if data.size else np.zeros(0, dtype=np.float32)
    if waveform.size == 0:
        raise AudioLoadError(p, "empty_audio", "no samples")
    if not np.all(np.isfinite(waveform)):
        raise AudioLoadError(p, "bad_audio", "non-finite samples")
    waveform = resample(waveform.astype(np.float32, copy=False), rate, sampling_rate, p)
    if max_seconds is not None:  # resampling may round up by a sample
        waveform = waveform[: int(round(max_seconds * sampling_rate))]
    return waveform


def max_seconds_of(extractor) -> float | None:
    """The longest clip `extractor` takes whole: Whisper's `n_samples / sampling_rate` (30 s)."""
    n_samples = getattr(extractor, "n_samples", None)
    rate = getattr(extractor, "sampling_rate", None)
    return float(n_samples) / float(rate) if n_samples and rate else None


def extract_features(extractor, clips: list[np.ndarray]) -> dict[str, Any]:
    """Run an HF audio feature extractor on waveforms at its own rate.

    Returns `input_features` (N, n_mels, frames) float32 and `feature_attention_mask`
    (N, frames) int (1 = a frame of real audio, 0 = padding): the extractor's `attention_mask`,
    renamed (see FEATURE_MASK). Raises MmloomError for clips longer than the extractor's window
    (it would cut them silently).
    """
    import torch

    limit = getattr(extractor, "n_samples", None)
    for k, clip in enumerate(clips):
        if limit and len(clip) > limit:
            raise MmloomError(
                f"audio item {k} has {len(clip)} samples, more than the feature extractor's window of {limit} "
                f"({max_seconds_of(extractor):g} s); cut it or split it into several items"
            )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few ms of STFT per clip: intra-op threads only add contention (10x slower)
    try:
        out = dict(extractor([np.asarray(c, dtype=np.float32) for c in clips], return_tensors="pt",
                             return_attention_mask=True, sampling_rate=extractor.sampling_rate))
    finally:
        torch.set_num_threads(threads)
    mask = out.pop("attention_mask", None)
    features = out["input_features"]
    if mask is None:  # an extractor without a mask: every frame counts
        mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long)
    out[FEATURE_MASK] = torch.as_tensor(mask).long()
    return out


def feature_extractor_from_spec(spec: str | dict[str, Any]):
    """An HF audio feature extractor from a folder (preprocessor_config.json) or an inline dict of
    its settings (`feature_extractor_type`, default WhisperFeatureExtractor, + its arguments).
    Raises MmloomError for an unknown type, settings it refuses, or a folder it cannot load."""
    import transformers
    from transformers import AutoFeatureExtractor

    if isinstance(spec, str):
        refuse_remote_code(spec, "feature extractor folder")
        try:
            return AutoFeatureExtractor.from_pretrained(spec, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise MmloomError(f"cannot load a feature extractor from {spec}: {exc}") from None
    params = dict(spec)
    kind = params.pop("feature_extractor_type", "WhisperFeatureExtractor")
    cls = getattr(transformers, str(kind), None)
    if cls is None:
        raise MmloomError(f"unknown feature_extractor_type {kind!r}")
    params.pop("processor_class", None)
    try:
        return cls(**params)
    except TypeError as exc:
        raise MmloomError(f"{kind}: {exc}") from None
