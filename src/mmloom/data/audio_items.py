"""Audio clips of HDF5 samples: reading each sample's clips (paths and slot spans written by
`mmloom data build`, see `mmloom.data.h5_format`) and turning them into encoder inputs exactly as
the build counted them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmloom.errors import MmloomError
from mmloom.model.feature_count import counts_from_inputs
from mmloom.processing.audio import (
    FEATURE_MASK,
    extract_features,
    feature_extractor_from_spec,
    load_audio,
)
from mmloom.processing.media_spec import MediaError


class AudioClipReader:
    """Reads one sample's clips: decode + resample (`load_audio`), the encoder's feature extractor,
    and a check that each clip still gives the token count its span in the data says.

    `params` is `data_params.json["modalities"]["audio"]` of the data (extractor settings, count
    rule, length limit); `audio_dir` the root of the relative clip paths. Each clip becomes
    `{"input_features": (n_mels, frames) float, "feature_attention_mask": (frames,) long,
    "span": (start, length)}`.
    """

    def __init__(self, params: dict[str, Any], audio_dir: str | Path | None, dtype: torch.dtype = torch.float32):
        try:
            self.extractor = feature_extractor_from_spec(params["feature_extractor"])
            self.token_count = dict(params["token_count"])
        except KeyError as exc:
            raise MmloomError(f"data_params.json modalities.audio lacks {exc}: rebuild the data") from None
        self.max_seconds = params.get("max_seconds")
        self.audio_dir = Path(audio_dir) if audio_dir is not None else None
        self.dtype = dtype

    def clip(self, relative: str, span: tuple[int, int], index: int) -> dict[str, Any]:
        path = (self.audio_dir / relative) if self.audio_dir is not None else Path(relative)
        try:
            waveform = load_audio(path, self.extractor.sampling_rate, self.max_seconds)
        except MediaError as exc:
            raise MmloomError(f"sample {index}: {exc}") from None
        inputs = extract_features(self.extractor, [waveform])
        (tokens,) = counts_from_inputs(self.token_count, inputs)
        if tokens != int(span[1]):
            raise MmloomError(
                f"sample {index}: audio {path} gives {tokens} feature tokens but the data holds {span[1]} slots for "
                "it (the file or the feature extractor changed since `mmloom data build`)"
            )
        return {
            "input_features": inputs["input_features"][0].to(self.dtype),
            FEATURE_MASK: inputs[FEATURE_MASK][0],
            "span": (int(span[0]), int(span[1])),
        }

    def dummy(self) -> dict[str, Any]:
        """A silent clip with one real frame (one feature token for any count rule): the input that
        keeps the audio encoder in every micro-batch's graph (DDP/FSDP) at the cost of one token."""
        inputs = extract_features(self.extractor, [np.zeros(1, dtype=np.float32)])
        mask = torch.zeros_like(inputs[FEATURE_MASK][0])
        mask[0] = 1
        (tokens,) = counts_from_inputs(self.token_count, {FEATURE_MASK: mask[None]})
        return {"input_features": torch.zeros_like(inputs["input_features"][0]).to(self.dtype), FEATURE_MASK: mask,
                "span": (0, tokens)}
