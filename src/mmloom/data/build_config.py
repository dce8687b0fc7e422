"""Configuration of `mmloom data build` (the Cerebras LLaVA preprocessing keys), validated with pydantic.

```yaml
setup:     {input_dir: ..., output_dir: ..., processes: 4, samples_per_file: 2000}
processor: {tokenizer_type: path/to/hf_tokenizer_folder, max_sequence_length: 2048}
dataset:   {num_patches: 576, image_dir: ..., system_prompt_style: vicuna_v1,
            audio: {feature_extractor: ..., audio_dir: ..., stride: 4},                   # audio: optional
            video: {video_dir: ..., num_frames: 8, pool: {mode: bilinear, stride: 2}},   # video: optional
            preference: {format: auto}}                                                  # preference pairs: optional
```

Relative paths are taken relative to the current working directory (like the seed's tool).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmloom.config_io import apply_overrides, load_yaml_mapping, validate
from mmloom.processing.image import MAX_IMAGE_PIXELS

MAX_RECORD_BYTES = 4 * 2**20


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SetupConfig(_Section):
    """`setup`: where the records are read and the .h5 files written (the seed's keys)."""

    input_dir: str = Field(description="folder of .jsonl files (sorted, not recursive) or one .jsonl file")
    output_dir: str = Field(description="where the .h5 files and data_params.json go")
    processes: int = Field(1, ge=1, description="worker processes; the output does not depend on it")
    samples_per_file: int = Field(
        2000, ge=1, description="samples per .h5 file (the last file holds the rest)"
    )
    max_record_bytes: int = Field(
        MAX_RECORD_BYTES, ge=1, description="longest jsonl line (bytes) that is read: a longer one is skipped "
        "(line_too_long) before it is parsed or tokenized; 4 MiB by default, a thousand times a long LLaVA record"
    )


class ProcessorConfig(_Section):
    """`processor`: the tokenizer and the max sequence length (MSL, image slots included)."""

    tokenizer_type: str = Field(
        description="tokenizer folder (e.g. the stock vicuna-7b-v1.5 folder; mmloom.processing.tokenizer."
        "load_tokenizer, no remote code)"
    )
    max_sequence_length: int = Field(ge=2, description="MSL, image slots included")


class AudioDataConfig(_Section):
    """How the records' audio clips are read and counted (mmloom's extension; see `h5_format`)."""

    feature_extractor: str | dict[str, Any] = Field(
        description="the audio encoder's HF feature extractor: a folder (preprocessor_config.json, e.g. a Whisper "
        "checkpoint) or its settings inline ({feature_size: 80, sampling_rate: 16000, ...}; "
        "feature_extractor_type defaults to WhisperFeatureExtractor)"
    )
    audio_dir: str | None = Field(None, description="root folder of the records' relative audio paths")
    audio_key: str = "audio"
    audio_token: str = "<audio>"
    downsample: int = Field(2, ge=1, description="feature frames per encoder position (Whisper: 2)")
    stride: int = Field(1, ge=1, description="encoder positions per LLM token: the model's AudioPool stride")
    max_seconds: float | None = Field(
        None, gt=0, description="longer clips are skipped (audio_too_long); default and upper bound: the "
        "extractor's window (Whisper: 30 s)"
    )

    def token_count(self) -> dict[str, Any]:
        """The per-clip count rule (`mmloom.model.feature_count`), compared with the model's at training."""
        return {"type": "audio_frames", "downsample": self.downsample, "stride": self.stride}


class PreferenceDataConfig(_Section):
    """Records are preference pairs (a prompt, a chosen and a rejected answer; `mmloom.data.preference`)."""

    format: Literal["auto", "trl", "llava", "rlaif_v"] = Field(
        "auto", description="record layout: TRL's vision preference format (images, prompt, chosen, rejected), "
        "LLaVA's DPO json (image, prompt, chosen, rejected strings), RLAIF-V's fields (image_path, question, chosen, "
        "rejected); auto: told apart by each record's keys")


class VideoPoolConfig(_Section):
    """Per-frame spatial pooling of the vision features (LLaVA-NeXT's `mm_spatial_pool_mode` / `_stride`):
    the model's `FramePool`."""

    mode: Literal["bilinear", "average", "max"] = Field(
        "bilinear", description="bilinear resize (LLaVA-OneVision), average or max pooling of each frame's patch grid"
    )
    stride: int = Field(2, ge=1, description="a g x g patch grid becomes ceil(g / stride)^2 features per frame")


class VideoDataConfig(_Section):
    """How the records' video clips are sampled and counted (mmloom's extension; see `h5_format`)."""

    video_dir: str | None = Field(None, description="root folder of the records' relative video paths")
    video_key: str = "video"
    video_token: str = "<video>"
    num_frames: int | None = Field(
        None, ge=1, description="frames per clip, taken uniformly (np.linspace(0, n - 1, k), LLaVA-NeXT's "
        "load_video); a shorter clip keeps all its frames. Default 8 unless fps is set"
    )
    fps: float | None = Field(None, gt=0, description="instead of num_frames: one frame per 1/fps s (the first at or "
                              "after each time), at most max_frames of them taken uniformly")
    max_frames: int | None = Field(None, ge=1, description="with fps: the most frames per clip")
    pool: VideoPoolConfig = Field(default_factory=VideoPoolConfig)
    newline: Literal["no_token", "one_token", "frame"] = Field(
        "one_token", description="the learned newline (LLaVA-NeXT's mm_newline_position): none, one after the last "
        "frame (LLaVA-OneVision) or one after each frame"
    )

    @model_validator(mode="after")
    def _one_sampling(self):
        if self.fps is not None and self.num_frames is not None:
            raise ValueError("set dataset.video.num_frames or dataset.video.fps (with max_frames), not both")
        if self.fps is not None and self.max_frames is None:
            raise ValueError("dataset.video.fps needs dataset.video.max_frames")
        if self.fps is None and self.max_frames is not None:
            raise ValueError("dataset.video.max_frames goes with dataset.video.fps")
        if self.fps is None and self.num_frames is None:
            self.num_frames = 8
        return self

    def token_count(self, num_patches: int) -> dict[str, Any]:
        """The per-clip count rule (`mmloom.model.callbacks.video_token_count`) for frames of
        `num_patches` patch features (a square grid), compared with the model's `FramePool` at training.
        Raises ValueError when `num_patches` is not a square (e.g. a kept CLS: 577)."""
        from math import isqrt

        from mmloom.model.callbacks import video_frame_tokens

        grid = isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"video frames need a square patch grid, but dataset.num_patches is {num_patches} "
                             "(a kept CLS token?): use the patch features only")
        return {"type": "video_frames", "grid": grid, "frame_tokens": video_frame_tokens(grid, self.pool.stride),
                "newline": self.newline}


class DatasetConfig(_Section):
    """`dataset`: image slots, image folder, template and record keys (the seed's, plus mmloom's options)."""

    num_patches: int | None = Field(
        None, ge=1, description="image slots per sample: (image_size // patch_size)^2 (+1 with CLS); "
        "unset: the data has no images (audio-only data)"
    )
    image_dir: str | None = Field(None, description="root folder of the records' relative image paths")
    max_image_pixels: int = Field(
        default_factory=lambda: MAX_IMAGE_PIXELS, ge=1,
        description="largest image (width x height) decoded, read from the header first; larger ones are skipped "
        "(image_too_large). Default 67.1 Mpx (8192 x 8192; MMLOOM_MAX_IMAGE_PIXELS); recorded for training"
    )
    system_prompt_style: str | None = Field(
        None, description="template name: plain (phase 1), vicuna_v1, llama2, llama3, zephyr, chatml, mistral, "
        "tokenizer (the tokenizer's own chat_template); unset: tokenizer when the tokenizer has a chat_template, "
        "else vicuna_v1 (the build records the one it used)"
    )
    image_key: str = "image"
    conversation_key: str = "conversations"
    content_key: str = "value"
    image_token: str = "<image>"
    plain_terminator: Literal["eos", "newline"] = Field(
        "eos", description="plain template: end captions with EOS (Cerebras) or '\\n' (original LLaVA)"
    )
    text_only_slots: bool = Field(
        True,
        description="give text-only samples masked image slots at the image start index (the seed's and Cerebras' "
        "layout, which Cerebras' trainer needs); false: text-only samples are their text alone (no "
        "num_patches masked positions computed for nothing, more of them fit max_sequence_length); mmloom's "
        "trainer reads both",
    )
    image_in_later_turn: Literal["keep", "skip"] = Field(
        "keep",
        description="records whose image is not in the first human turn: keep (mmloom's trainer reads each "
        "sample's slot position) or skip (reason image_in_later_turn) for Cerebras-compatible output, whose "
        "model puts every image at the one image_start_idx",
    )
    multiple_images: Literal["keep", "skip"] = Field(
        "keep",
        description="records with several images (`image: [a, b, ...]`, one `<image>` per image in any human turn, "
        "in order): keep (each image's slots where its placeholder stands; the files holding such a sample "
        "add mmloom's image items, see `h5_format`) or skip (reason multiple_images) for Cerebras-bound output, "
        "whose layout holds one image per sample",
    )
    audio: AudioDataConfig | None = Field(
        None, description="records carry audio clips (`audio` field, `<audio>` placeholders): how to read them"
    )

    preference: PreferenceDataConfig | None = Field(
        None, description="the records are preference pairs for the preference phase (DPO): each pair is written as "
        "prompt + chosen answer (`data`) and prompt + rejected answer (`rejected`); see mmloom.data.preference")

    video: VideoDataConfig | None = Field(
        None, description="records carry video clips (`video` field: a path or a list, `<video>` placeholders): how "
        "their frames are sampled and pooled; the frames go through the vision encoder (dataset.num_patches each)"
    )

    @model_validator(mode="after")
    def _some_modality(self):
        if self.num_patches is None and self.audio is None:
            raise ValueError("set dataset.num_patches (images) and/or dataset.audio (audio clips)")
        if self.preference is not None and self.audio is not None:
            raise ValueError("dataset.preference pairs hold images or text; audio pairs are not supported yet")
        if self.video is not None:
            if self.preference is not None:
                raise ValueError("dataset.preference pairs hold images or text; video pairs are not supported yet")
            if self.num_patches is None:
                raise ValueError("dataset.video needs dataset.num_patches: video frames go through the vision encoder")
            self.video.token_count(self.num_patches)
        return self


def template_spec(dataset: DatasetConfig, tokenizer=None) -> tuple[str, dict[str, Any]]:
    """(template name, options) for the data's `system_prompt_style`: what `mmloom data build`
    tokenizes with and what the processor saved with a trained model must use (plain: the
    terminator, the placeholder and the tokenizer's EOS string). Unset: `tokenizer` when `tokenizer`
    has a chat_template, else vicuna_v1 (`mmloom.processing.templates.default_template_name`)."""
    name, options = dataset.system_prompt_style, {}
    if name is None:  # data_params.json of a build records the resolved name; this is for a bare config
        from mmloom.processing.templates import default_template_name

        name = default_template_name(tokenizer)
    if name == "plain":
        options = {"terminator": dataset.plain_terminator, "placeholder": dataset.image_token}
        if tokenizer is not None and tokenizer.eos_token:
            options["eos"] = tokenizer.eos_token
    return name, options


class BuildConfig(_Section):
    """A whole `mmloom data build` config; unknown keys are errors naming the closest valid key."""

    setup: SetupConfig
    processor: ProcessorConfig
    dataset: DatasetConfig


SECTIONS = "setup/processor/dataset"


def parse_build_config(data: Any, source: str = "config") -> BuildConfig:
    """Validate a build config mapping; raises MmloomError naming `source` and the bad key."""
    return validate(BuildConfig, data, source, SECTIONS)


def load_build_config(path: str | Path, overrides: list[str] | None = None) -> BuildConfig:
    """Read a build config YAML, apply `--set KEY=VALUE` overrides, validate (raises MmloomError)."""
    return parse_build_config(apply_overrides(load_yaml_mapping(path, SECTIONS), overrides), source=str(path))
