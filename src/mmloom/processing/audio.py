"""Audio loading for every stage: decode with `soundfile` (libsndfile: WAV, FLAC, MP3, OGG/Vorbis,
Opus...), mix to mono, resample with `soxr` to the feature extractor's rate, and run the encoder's
own HF feature extractor (Whisper's log-mel) with the per-frame mask that tells real audio from
padding.

The frame mask is what every stage counts an item's feature tokens from
(`mmloom.model.feature_count.audio_token_counts`): the processor, `mmloom data build` and the
model itself, so the three always agree.

Bad input raises :class:`~mmloom.processing.media_spec.MediaError` with a `reason` that the HDF5
build counts like image reasons: `missing_audio`, `bad_audio` (not decodable, or non-finite samples), `empty_audio` (no
samples), `audio_too_long` (longer than the extractor's window or the given
limit: Whisper's extractor would silently cut it), `bad_sample_rate` (a rate soxr cannot convert).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmloom.errors import MmloomError
from mmloom.processing.media_spec import MediaError, MediaSpec
from mmloom.remote_code import refuse_remote_code

if TYPE_CHECKING:  # numpy is imported where arrays are made: `mmloom --help` reads the specs without it
    import numpy as np

# Input names: the extractor's frame mask is renamed so that it never meets the language
# model's `attention_mask` (the name Qwen2-Audio uses for the same mask).
FEATURE_MASK = "feature_attention_mask"
# soxr converts rates whose ratio is within its range; rates outside these bounds are not audio.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 100, 1_536_000


def audio_error(path: str | os.PathLike, reason: str, detail: str) -> MediaError:
    """The MediaError of an audio file that cannot be used (`reason`: one of `AudioSpec.reasons`)."""
    return MediaError(path, reason, detail, f"cannot use audio {str(path)!r}: {detail}")


def resample(waveform: np.ndarray, rate: int, target_rate: int, path: str | os.PathLike = "<array>") -> np.ndarray:
    """`waveform` (T,) float32 at `rate` Hz -> (T',) float32 at `target_rate` Hz (soxr, high quality).

    Raises MediaError('bad_sample_rate') for a rate outside [100 Hz, 1.536 MHz] or one soxr refuses."""
    import numpy as np

    if rate == target_rate:
        return waveform
    if not MIN_SAMPLE_RATE <= int(rate) <= MAX_SAMPLE_RATE:
        raise audio_error(path, "bad_sample_rate", f"sample rate {rate} Hz cannot be resampled to {target_rate} Hz")
    import soxr

    try:
        return np.asarray(soxr.resample(waveform, int(rate), int(target_rate), quality="HQ"), dtype=np.float32)
    except (ValueError, RuntimeError) as exc:
        raise audio_error(path, "bad_sample_rate", f"cannot resample {rate} Hz to {target_rate} Hz ({exc})") from None


def load_audio(path: str | os.PathLike, sampling_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Decode an audio file to a mono float32 waveform (T,) in [-1, 1] at `sampling_rate` Hz.

    Channels are averaged. Raises MediaError: `missing_audio` (no such file), `bad_audio`
    (libsndfile cannot decode it), `empty_audio` (no samples), `audio_too_long`
    (more than `max_seconds`), `bad_sample_rate` (see `resample`).
    """
    import numpy as np
    import soundfile

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise audio_error(p, "missing_audio", "file not found")
    try:
        with soundfile.SoundFile(p) as f:
            rate, frames = int(f.samplerate), int(f.frames)
            if max_seconds is not None and rate > 0 and frames / rate > max_seconds:
                raise audio_error(p, "audio_too_long",
                                     f"{frames / rate:.2f} s is longer than the {max_seconds:g} s limit")
            data = f.read(dtype="float32", always_2d=True)  # (T, channels)
    except MediaError:
        raise
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
        raise audio_error(p, "bad_audio", f"not decodable audio ({str(exc).strip() or type(exc).__name__})") from None
    waveform = data.mean(axis=1) if data.size else np.zeros(0, dtype=np.float32)
    if waveform.size == 0:
        raise audio_error(p, "empty_audio", "no samples")
    if not np.all(np.isfinite(waveform)):
        raise audio_error(p, "bad_audio", "non-finite samples")
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
    import numpy as np
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


def is_audio_processor(processor) -> bool:
    """An HF audio feature extractor (it has a sampling rate and turns waveforms into features)."""
    return hasattr(processor, "sampling_rate") and hasattr(processor, "model_input_names") and \
        "input_features" in getattr(processor, "model_input_names", ())


def audio_limit(max_seconds: float | None, extractor) -> float | None:
    """The longest clip kept: `max_seconds`, never more than the extractor's window (Whisper: 30 s)."""
    window = max_seconds_of(extractor)
    return window if max_seconds is None else max_seconds if window is None else min(max_seconds, window)


@dataclass(frozen=True)
class AudioSpec(MediaSpec):
    """Audio clips (`audio`): waveforms decoded with :func:`load_audio` at the extractor's rate (mono,
    at most `max_seconds`), turned into `input_features` (N, n_mels, F) and `feature_attention_mask`
    (N, F) by the encoder's HF feature extractor (:func:`extract_features`).

    Counting (`count_rule`): the rule of `mmloom.model.feature_count` the model counts with, per
    clip from its frame mask (`{"type": "audio_frames", "downsample": d, "stride": s}`, the model's
    `AudioPool`), or a fixed number per clip. `dtype` is the torch dtype of `input_features` (None:
    float32, as the extractor gives it).
    """

    noun = "audio"
    item_noun = "audio clip"
    processor_arg = "audio"
    folder_keys = ("audio_dir", "audio_data_dir")
    build_key = "audio"
    reasons = ("bad_audio_path", "missing_audio", "bad_audio", "empty_audio", "audio_too_long", "bad_sample_rate",
               "audio_token_mismatch")
    baseline = "silence-audio"
    cli_help = {"item": "the audio clip to talk about (WAV/FLAC/MP3/OGG, resampled to the model's rate; default: none)",
                "dir": "root of the question audio (default: the questions file's folder)",
                "baseline": "replace every audio clip by silence of the same length (checks that answers come from the "
                            "audio)"}
    default_placeholder = "<audio>"
    token_offset = 1
    hf_processor_loader = "AutoFeatureExtractor"

    modality: str = "audio"
    placeholder: str = "<audio>"
    record_key: str = "audio"
    extractor: Any = None
    count_rule: int | dict[str, Any] | None = None
    max_seconds: float | None = None
    dtype: Any = None

    @property
    def encoder_processor(self) -> Any:
        return self.extractor

    def check_encoder(self, encoder: Any, where: str) -> None:
        """Refuse an audio encoder that counts the clips' tokens otherwise (its `AudioPool`) or takes
        other features (mel bins, frames per clip) than the clips were counted with."""
        from mmloom.model.encoder import base_module
        from mmloom.model.feature_count import token_count_spec

        rule = token_count_spec(encoder.config, encoder.callbacks)
        if rule != self.count_rule:
            raise MmloomError(
                f"audio feature tokens are counted differently: {where} was built with {self.count_rule} "
                f"(dataset.audio downsample/stride) but the model gives {rule} (model.encoders.{self.modality}.pooling)"
            )
        settings = self._extractor().to_dict()
        config = base_module(encoder.module).config
        mels, frames = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
        if mels is not None and settings.get("feature_size") not in (None, mels):
            raise MmloomError(f"the data's feature extractor gives {settings.get('feature_size')} mel bins but the "
                              f"audio encoder takes {mels} (num_mel_bins)")
        if frames is not None and settings.get("nb_max_frames") not in (None, 2 * frames):
            raise MmloomError(f"the data's feature extractor gives {settings.get('nb_max_frames')} frames per clip but "
                              f"the audio encoder takes {2 * frames} (2 x max_source_positions)")

    def _extractor(self):
        if self.extractor is None:
            raise MmloomError(f"no feature extractor for {self.modality} inputs")
        return self.extractor

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """The clip at `path` as a mono float32 waveform (T,) at the extractor's rate (:func:`load_audio`)."""
        return load_audio(path, self._extractor().sampling_rate, self.max_seconds)

    def waveform(self, item) -> np.ndarray:
        """An item as a waveform at the extractor's rate: arrays as given, paths decoded."""
        return self.load(item) if isinstance(item, (str, os.PathLike)) else item

    def token_counts(self, items: Sequence[Any], inputs: dict[str, Any] | None = None) -> list[int]:
        """Feature tokens per clip: the count rule applied to the clips' frame masks (`inputs`, else
        the features are extracted), or a fixed count. Raises MmloomError without a rule."""
        from mmloom.model.feature_count import counts_from_inputs

        if isinstance(self.count_rule, int):
            return [self.count_rule] * len(items)
        if self.count_rule is None:
            raise MmloomError(f"no feature-token count for {self.modality}: build the processor with from_model()")
        if not items:
            return []
        counts = counts_from_inputs(self.count_rule, inputs if inputs is not None else self.encoder_inputs(items))
        if counts is None or len(counts) != len(items):
            raise MmloomError(f"the {self.modality} inputs give no frame mask per clip: cannot count feature tokens")
        return counts

    def encoder_inputs(self, items: Sequence[Any], sampling_rate: int | None = None, **kwargs: Any) -> dict[str, Any]:
        """`{"input_features": (N, n_mels, F), "feature_attention_mask": (N, F)}` of waveforms (at the
        extractor's rate: `sampling_rate`, if given, must be it) or audio files.
        Raises MmloomError for another rate or a clip longer than the extractor's window."""
        extractor = self._extractor()
        if sampling_rate is not None and sampling_rate != extractor.sampling_rate:
            raise MmloomError(
                f"{self.modality} waveforms given at {sampling_rate} Hz but the feature extractor takes "
                f"{extractor.sampling_rate} Hz; resample them (mmloom.processing.audio.resample) or pass file paths"
            )
        inputs = extract_features(extractor, [self.waveform(item) for item in items])
        if self.dtype is not None:
            inputs["input_features"] = inputs["input_features"].to(self.dtype)
        return inputs

    def dummy(self) -> tuple[dict[str, Any], int]:
        """A silent clip with one real frame (one feature token for any count rule): the input that
        keeps the audio encoder in every micro-batch's graph (DDP/FSDP) at the cost of one token."""
        import numpy as np
        import torch

        inputs = self.encoder_inputs([np.zeros(1, dtype=np.float32)])
        mask = torch.zeros_like(inputs[FEATURE_MASK])
        mask[:, 0] = 1
        (tokens,) = self.token_counts([None], {FEATURE_MASK: mask})
        return {"input_features": torch.zeros_like(inputs["input_features"]), FEATURE_MASK: mask}, tokens

    def blank(self, item) -> np.ndarray:
        """Silence of the clip's length."""
        import numpy as np

        return np.zeros_like(self.waveform(item))

    def params(self, counts: dict[str, int]) -> dict[str, Any]:
        """`modalities.audio` of data_params.json: what the trainer needs to read the clips exactly as
        the build counted them (placeholder, count rule, the extractor's settings, length limit) and
        the build's `counts` (`samples`, `items`, `tokens`)."""
        settings = {k: v for k, v in self._extractor().to_dict().items() if k not in ("mel_filters", "window")}
        return {
            "placeholder": self.placeholder,
            "token_id": self.token_id,
            "token_count": self.count_rule,
            "feature_extractor": settings,
            "max_seconds": self.max_seconds,
            "samples_with_audio": counts.get("samples", 0),
            "clips": counts.get("items", 0),
            "audio_tokens": counts.get("tokens", 0),
        }

    @classmethod
    def summary_row(cls, recorded: dict[str, Any]) -> tuple[str, int]:
        return (f"with audio ({recorded['clips']:,} clips, {recorded['audio_tokens']:,} audio tokens)",
                recorded["samples_with_audio"])

    @classmethod
    def from_processor(cls, modality: str, encoder_processor: Any, *, placeholder: str, token_id: int | None = None,
                       count: Any = None, anyres: dict[str, Any] | None = None, record_key: str | None = None,
                       sampling: dict[str, Any] | None = None) -> AudioSpec:
        return cls(modality=modality, placeholder=placeholder, record_key=record_key or "audio", token_id=token_id,
                   extractor=encoder_processor, count_rule=count)

    @classmethod
    def from_build_config(cls, dataset) -> AudioSpec | None:
        """The clips of a data build: its `dataset.audio` section (`mmloom.data.build_config.AudioDataConfig`;
        None: the build reads no audio)."""
        audio = getattr(dataset, cls.build_key)
        if audio is None:
            return None
        extractor = feature_extractor_from_spec(audio.feature_extractor)
        return cls(placeholder=audio.audio_token, record_key=audio.audio_key,
                   folder=Path(audio.audio_dir) if audio.audio_dir is not None else None, extractor=extractor,
                   count_rule=audio.token_count(), max_seconds=audio_limit(audio.max_seconds, extractor))

    @classmethod
    def from_data(cls, data_params: dict[str, Any], folder: str | os.PathLike | None = None, **settings: Any
                  ) -> AudioSpec | None:
        """The clips of a built data folder (`modalities.audio` of data_params.json; None: no audio),
        read from `folder`, else the build's `dataset.audio.audio_dir`. Raises MmloomError when
        `modalities.audio` lacks the extractor or the count rule."""
        params = (data_params.get("modalities") or {}).get("audio")
        if params is None:
            return None
        try:
            extractor = feature_extractor_from_spec(params["feature_extractor"])
            rule = dict(params["token_count"])
        except KeyError as exc:
            raise MmloomError(f"data_params.json modalities.audio lacks {exc}: rebuild the data") from None
        built = (data_params.get("dataset") or {}).get(cls.build_key) or {}
        folder = folder if folder is not None else built.get(cls.folder_keys[0])
        return cls(placeholder=params.get("placeholder", built.get("audio_token", cls.default_placeholder)),
                   record_key=built.get("audio_key", "audio"), token_id=params.get("token_id"),
                   folder=Path(folder) if folder is not None else None, extractor=extractor, count_rule=rule,
                   max_seconds=params.get("max_seconds"), **settings)
