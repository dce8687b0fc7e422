"""Configuration of `mmloom train` (the Cerebras LLaVA keys), validated with pydantic.

```yaml
train_input: {data_dir, img_data_dir, image_size, transforms, batch_size, micro_batch_size, shuffle, num_workers,
              packing, group_by_length}
eval_input:  {... same keys ...}
model:       {image_model, encoders, text_model, projector, freeze, image_feature_select_layer_idx,
              image_feature_select_mode, image_start_idx, image_token_id, loss_scaling, precision,
              attn_implementation, gradient_checkpointing, lora, init_from, video}
optimizer:   {optimizer_type, lr, betas, eps, weight_decay, max_gradient_norm, projector_lr, encoder_lr, llm_lr,
              adapter_lr, part_lr}
schedule:    {warmup_steps | warmup_ratio, decay, min_lr}
runconfig:   {max_steps | num_epochs, checkpoint_steps, keep_last, log_steps, eval_steps, seed,
              num_threads, num_interop_threads, load_checkpoint_states, checkpoint_path, distributed, mfu_peak_flops, resume_weights_only, ...}
preference:  {loss, beta, label_smoothing, rpo_alpha, reference}    # optional: the preference phase (DPO)
```

`batch_size` is the global batch (all ranks, all micro-batches of one optimizer step); with `preference`, in pairs.
Relative paths are taken relative to the current working directory (like the seed's tools).
Paths are checked by `check_paths` only when a run needs them, so configs with placeholder
paths still validate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mmloom.config_io import apply_overrides, load_yaml_mapping, validate
from mmloom.data.build_config import VideoPoolConfig
from mmloom.errors import MmloomError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputConfig(_Section):
    data_dir: str = Field(description="folder of .h5 files written by `mmloom data build`")
    img_data_dir: str | None = Field(None, description="root folder of the samples' relative image paths")
    audio_data_dir: str | None = Field(
        None, description="root folder of the samples' relative audio paths (data built with dataset.audio); "
        "default: the data's dataset.audio.audio_dir"
    )
    video_data_dir: str | None = Field(
        None, description="root folder of the samples' relative video paths (data built with dataset.video); "
        "default: the data's dataset.video.video_dir"
    )
    image_size: int | None = Field(None, ge=1, description="image side; default: the vision model's image_size")
    transforms: list[dict[str, Any]] | None = Field(None, description="ImageTransform steps ([{name: ...}])")
    batch_size: int = Field(ge=1, description="global batch size: all ranks and micro-batches of one step")
    micro_batch_size: int | None = Field(None, ge=1, description="per-rank micro-batch; default batch_size / ranks")
    shuffle: bool = True
    num_workers: int = Field(0, ge=0)
    use_cached_features: bool = Field(
        False,
        description="train_input only: read the frozen vision encoder's features precomputed by `mmloom data "
        "cache-features` instead of the images (no image I/O, no encoder forward); refused when the encoder "
        "trains or the cache is missing or stale",
    )
    feature_cache_dir: str | None = Field(None, description="folder of the cached features; default DATA_DIR/feature_cache")
    drop_last: bool = Field(
        True,
        description="train_input: an epoch is floor(samples / batch_size) steps; false: ceil, the last step "
        "of each epoch filled up with padding samples that carry no loss",
    )
    packing: bool = Field(
        False,
        description="train_input only: each micro-batch is one padding-free row of whole samples, each sample "
        "attending to itself only (per-sample SDPA: sdpa/eager attention becomes mmloom_sdpa_varlen; or varlen "
        "flash_attention_2/3), no (T, T) mask; the step's samples are split over the micro-batches and ranks at "
        "even token counts (at most micro_batch_size x MSL tokens each). Same samples, loss and schedule per "
        "step; nothing computed for padding. Off by default (the Cerebras/seed behaviour); the shipped "
        "LLaVA-1.5 configs turn it on",
    )
    group_by_length: bool = Field(
        False,
        description="train_input only: sort each step's samples by length and cut them into micro-batches "
        "of even padded cost (samples x longest; short samples in larger micro-batches), dealt evenly to "
        "the ranks, rows trimmed to their longest sample (same samples and loss per step). Off by default: "
        "it scans every sample's length at start and gives variable batch shapes. Not with packing",
    )

    @model_validator(mode="after")
    def _one_batching(self):
        if self.packing and self.group_by_length:
            raise ValueError("packing and group_by_length exclude each other: packing already groups the step's "
                             "samples at even cost, without padding")
        return self


class LoraSettings(_Section):
    r: int = Field(128, ge=1)
    alpha: float = 256
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    parts: list[str] = Field(
        default_factory=lambda: ["language_model"],
        description="parts that get adapters: language_model (text_model) and/or encoders by name (audio, "
        "audio_encoder, vision, image_model); each is wrapped with its own LoRA",
    )


class PoolingSettings(_Section):
    stride: int = Field(1, ge=1, description="encoder positions per LLM token (Whisper: 1500 positions per 30 s)")
    mode: Literal["mean", "stack"] = Field("mean", description="mean: average each group; stack: concatenate it")


class EncoderSettings(_Section):
    """One encoder of `model.encoders` (modality name -> encoder)."""

    model: str | dict[str, Any] = Field(
        description="HF folder (a Whisper folder gives its encoder), or an inline HF config dict with model_type "
        "(e.g. whisper, clip_vision_model) + optional 'pretrained' folder"
    )
    projector: str | None = Field(None, description="projector type; default model.projector")
    feature_layer: int | None = Field(
        None, description="hidden layer fed to the projector; default -2 for vision, the final output for audio"
    )
    feature_mode: Literal["patch", "cls_patch", "full"] | None = Field(
        None, description="vision: drop the first (CLS) position (patch) or keep every position (cls_patch / full); "
        "default: patch for towers with a CLS token (CLIP), full for those without (SigLIP)")
    placeholder: str | None = Field(None, description="placeholder token; default <image> / <audio> / <NAME>")
    token_id: int | None = Field(
        None, description="placeholder id; default the LLM's vocab_size for vision, vocab_size + 1 for audio (the ids "
        "`mmloom data build` gives <image> and <audio> when the tokenizer lacks them)"
    )
    pooling: PoolingSettings | None = Field(
        None, description="audio: real-length positions, then groups of `stride` (default stride 1, mean)"
    )

    @field_validator("model")
    @classmethod
    def _model_type(cls, value):
        if isinstance(value, dict) and "model_type" not in value:
            raise ValueError("an inline HF config needs a 'model_type' key (or give an HF folder path)")
        return value


class VideoModelSettings(_Section):
    """Video clips through the vision encoder (`model.video`): each frame through the vision tower and
    its projector, then `FramePool` (the pooling and newline of the data's `dataset.video`, which
    `mmloom train` checks)."""

    pool: VideoPoolConfig = Field(default_factory=VideoPoolConfig)
    newline: Literal["no_token", "one_token", "frame"] = Field(
        "one_token", description="the learned newline: none, one after the last frame (LLaVA-OneVision), one after "
        "each frame")
    token_id: int | None = Field(
        None, description="the <video> placeholder id; default vocab_size + 2 (the id `mmloom data build` gives "
        "<video> when the tokenizer lacks it)")


class ModelSection(_Section):
    image_model: str | dict[str, Any] | None = Field(
        None, description="HF folder, or an inline HF config dict with model_type (+ optional 'pretrained' folder)"
    )
    text_model: str | dict[str, Any] | None = Field(
        None, description="HF folder, or an inline HF config dict with model_type (+ optional 'pretrained' folder)"
    )
    encoders: dict[str, EncoderSettings] = Field(
        default_factory=dict,
        description="modality name -> encoder (audio, vision, ...), next to or instead of image_model (= 'vision')",
    )
    init_from: str | None = Field(None, description="an mmloom model folder to start from (instead of the parts)")
    projector: str = "mlp2x_gelu"
    freeze: list[str] = Field(default_factory=list, description="regexes over parameter names (Cerebras names ok)")
    image_feature_select_layer_idx: int = -2
    image_feature_select_mode: Literal["patch", "cls_patch", "full"] | None = Field(
        None, description="drop the first (CLS) position (patch, LLaVA-1.5) or keep every position (cls_patch / "
        "full); default: patch for towers with a CLS token (CLIP), full for those without (SigLIP)")
    image_start_idx: int | None = Field(None, ge=0, description="checked against the data's data_params.json")
    image_token_id: int | None = Field(None, description="placeholder id; default: the LLM's vocab_size")
    pad_token_id: int | None = Field(None, description="default: data_params.json pad_id, else the LLM's")
    loss_scaling: Literal["num_tokens", "batch_size"] = "num_tokens"
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="bfloat16 = mixed precision: bf16 autocast over float32 master weights and optimizer "
        "state (the weights are not stored in bf16)"
    )
    attn_implementation: str | None = "sdpa"
    gradient_checkpointing: bool = False
    loss_on_supervised_only: bool = Field(
        True, description="compute the LM head and loss only at supervised positions (chunked); false = full logits"
    )
    lora: LoraSettings | None = None
    video: VideoModelSettings | None = Field(
        None, description="the model takes video clips (frames through the vision encoder, pooled per frame)")

    @field_validator("freeze", mode="before")
    @classmethod
    def _one_pattern(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("image_model", "text_model")
    @classmethod
    def _model_type(cls, value):
        if isinstance(value, dict) and "model_type" not in value:
            raise ValueError("an inline HF config needs a 'model_type' key (or give an HF folder path)")
        return value

    @model_validator(mode="after")
    def _parts_or_init(self):
        if self.image_model is not None and "vision" in self.encoders:
            raise ValueError("model.image_model and model.encoders.vision both define the vision encoder: keep one")
        if self.init_from is None:
            missing = [k for k in ("image_model", "text_model") if getattr(self, k) is None]
            if self.encoders and "image_model" in missing:
                missing.remove("image_model")
            if missing:
                raise ValueError(f"set model.{' and model.'.join(missing)} (or model.init_from)")
        if self.video is not None and self.image_model is None and "vision" not in self.encoders:
            raise ValueError("model.video needs a vision encoder (model.image_model or model.encoders.vision)")
        if self.video is not None and self.init_from is not None:
            raise ValueError("model.video adds to the parts it builds; with model.init_from the video route is the "
                             "saved model's own: remove model.video")
        return self


class OptimizerSection(_Section):
    optimizer_type: Literal["AdamW", "adamw"] = "AdamW"
    lr: float = Field(gt=0, description="peak learning rate")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="not applied to biases and norm weights")
    max_gradient_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null to disable")
    projector_lr: float | None = Field(
        None, gt=0, description="peak lr of every projector (default: lr); LLaVA's name mm_projector_lr is accepted")
    encoder_lr: float | None = Field(
        None, gt=0, description="peak lr of the encoders' modules (the vision tower, an audio encoder; default: lr); "
        "LLaVA's name mm_vision_tower_lr is accepted")
    llm_lr: float | None = Field(None, gt=0, description="peak lr of the language model (default: lr)")
    adapter_lr: float | None = Field(
        None, gt=0, description="peak lr of the LoRA adapters, in whichever part they sit (default: that part's lr)")
    part_lr: dict[str, float] = Field(
        default_factory=dict,
        description="peak lr per part, over the options above: a part name of the model (vision_encoder.module, "
        "vision_encoder.projector, audio_encoder.projector, language_model; Cerebras names such as "
        "projector_image_model accepted) -> lr. Every lr follows the schedule (warmup, decay to min_lr x lr / "
        "optimizer.lr)")

    @model_validator(mode="before")
    @classmethod
    def _llava_names(cls, data):
        """LLaVA's `mm_projector_lr` / `mm_vision_tower_lr` (train.py's TrainingArguments) as our names."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for llava, ours in (("mm_projector_lr", "projector_lr"), ("mm_vision_tower_lr", "encoder_lr")):
            if llava in data:
                if data.get(ours) is not None:
                    raise ValueError(f"optimizer.{llava} and optimizer.{ours} are the same setting: keep one")
                data[ours] = data.pop(llava)
        return data

    @field_validator("part_lr")
    @classmethod
    def _positive(cls, value):
        bad = {k: v for k, v in value.items() if not v > 0}
        if bad:
            raise ValueError(f"learning rates must be > 0, got {bad}")
        return value


class ScheduleSection(_Section):
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, le=1)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the decay")

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set schedule.warmup_steps or schedule.warmup_ratio, not both")
        return self


class RunSection(_Section):
    max_steps: int | None = Field(None, ge=1)
    num_epochs: float | None = Field(None, gt=0)
    checkpoint_steps: int | None = Field(None, ge=1, description="also saved at the last step")
    keep_last: int | None = Field(None, ge=1, description="checkpoints to keep (default: all)")
    log_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="eval every N steps in train_and_eval mode")
    seed: int = 0
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op CPU threads of each process (default: torch's, one per core; "
        "torchrun: 1 per rank). A small model on a few shared cores is fastest with 1: threads that wait at every "
        "operation for a core another process holds make each step 10-20x slower")
    num_interop_threads: int | None = Field(None, ge=1, description="torch inter-op CPU threads of each process "
                                            "(default: torch's)")
    load_checkpoint_states: Literal["model", "all"] = "model"
    checkpoint_path: str | None = Field(None, description="mmloom model folder, checkpoint or run folder")
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    mfu_peak_flops: float | None = Field(None, gt=0, description="peak FLOP/s of one device, for the MFU estimate")
    save_trainable_only: bool = Field(True, description="checkpoints hold only trainable weights")
    save_final_model: bool = Field(True, description="write MODEL_DIR/final_model (all weights)")
    find_unused_parameters: bool = Field(
        False, description="DDP: look for parameters unused by each micro-batch (not needed for mmloom's models: those "
        "that never get a gradient are found and left out by themselves)")
    resume_allow_changed: list[Literal["data", "tokenizer", "start_model"]] = Field(
        default_factory=list, description="resume although these changed since the checkpoint was written (the "
        "training data's files, the data's tokenizer, the files of the base model the run started from); default: "
        "refused")
    resume_weights_only: bool = Field(
        False,
        description="resume from the latest checkpoint's weights, step and data position with a fresh optimizer "
        "state and RNG (for checkpoints whose optimizer or RNG state is missing or damaged; without it such a "
        "checkpoint is skipped for an older complete one, or refused)",
    )

    @model_validator(mode="after")
    def _one_length(self):
        if self.max_steps is not None and self.num_epochs is not None:
            raise ValueError("set runconfig.max_steps or runconfig.num_epochs, not both")
        return self


class PreferenceSection(_Section):
    """Preference tuning (the recipe's third phase, DPO) on data built with `dataset.preference`
    (`mmloom.training.preference`)."""

    loss: Literal["sigmoid", "ipo", "robust", "hinge"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: IPO (per-token averaged log-ratios); robust: robust DPO (needs "
        "label_smoothing); hinge: SLiC's hinge; as TRL's DPOTrainer loss_type")
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference model (IPO: its tau)")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="assumed share of flipped preference labels: conservative DPO (sigmoid), "
        "robust DPO; unused by ipo and hinge")
    rpo_alpha: float = Field(
        0.0, ge=0, description="weight of the chosen answers' negative log-likelihood (mean over the step's chosen "
        "tokens) added to the preference loss: RPO (Pang et al. 2024), TRL's rpo_alpha (TRL 1.16: loss_type "
        "[sigmoid, sft] with loss_weights [1, rpo_alpha]); 0: off")
    reference: Literal["auto", "adapters_disabled", "precomputed"] = Field(
        "auto", description="the reference log-probabilities of the starting model: the LoRA model with its "
        "adapters disabled (when only adapters train), or computed once before the first step and stored in "
        "MODEL_DIR/reference_logps.safetensors; auto picks the first when it applies. No second copy of the model")


class TrainConfig(_Section):
    """A training config (`mmloom train CONFIG`): the seed's Cerebras LLaVA sections (see the module
    docstring). `train_input` is needed to train, `eval_input` to evaluate (checked by
    :func:`check_config_paths` for the mode a run uses); `model` says what the base model is built
    from (`model_loading.build_base_model`) and what trains; `optimizer` and `schedule` the AdamW
    settings and the learning-rate schedule; `runconfig` the run's length, checkpoints, logging,
    seed, distribution and resume policy. Unknown keys are refused (pydantic, `extra="forbid"`);
    load one with :func:`load_train_config`."""

    train_input: InputConfig | None = None
    eval_input: InputConfig | None = None
    model: ModelSection
    optimizer: OptimizerSection
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    runconfig: RunSection = Field(default_factory=RunSection)
    preference: PreferenceSection | None = Field(
        None, description="preference tuning (DPO, IPO, ...) instead of next-token training: the data holds pairs")


SECTIONS = "model/optimizer/runconfig"


def parse_train_config(data: Any, source: str = "config") -> TrainConfig:
    return validate(TrainConfig, data, source, SECTIONS)


def load_config_dict(path: str | Path, overrides: list[str] | None = None) -> dict:
    return apply_overrides(load_yaml_mapping(path, SECTIONS), overrides)



def load_train_config(
    path: str | Path, overrides: list[str] | None = None, check_paths: bool = False, mode: str = "train"
) -> TrainConfig:
    """Read, override (`--set`) and validate a training YAML; optionally check its paths for `mode`."""
    cfg = parse_train_config(load_config_dict(path, overrides), source=str(path))
    if check_paths:
        check_config_paths(cfg, mode)
    return cfg


def _check_dir(value: str | None, key: str, must_exist: bool = True) -> None:
    if value is not None and must_exist and not Path(value).exists():
        raise MmloomError(f"{key}: path not found: {value}")


def check_config_paths(cfg: TrainConfig, mode: str = "train", resuming: bool = False) -> None:
    """Check the paths a run in `mode` needs (train, eval or train_and_eval)."""
    sections = []
    if mode in ("train", "train_and_eval"):
        if cfg.train_input is None:
            raise MmloomError(f"--mode {mode} needs a train_input section")
        sections.append(("train_input", cfg.train_input))
    if mode in ("eval", "train_and_eval"):
        if cfg.eval_input is None:
            raise MmloomError(f"--mode {mode} needs an eval_input section")
        sections.append(("eval_input", cfg.eval_input))
    for name, section in sections:
        _check_dir(section.data_dir, f"{name}.data_dir")
        if not section.use_cached_features:  # cached features need no image
            _check_dir(section.img_data_dir, f"{name}.img_data_dir")
        _check_dir(section.audio_data_dir, f"{name}.audio_data_dir")
        _check_dir(section.video_data_dir, f"{name}.video_data_dir")
    m = cfg.model
    if m.init_from is not None:
        _check_dir(m.init_from, "model.init_from")
    else:
        for key in ("image_model", "text_model"):
            value = getattr(m, key)
            if isinstance(value, str):
                _check_dir(value, f"model.{key}")
            elif isinstance(value, dict) and value.get("pretrained") is not None:
                _check_dir(value["pretrained"], f"model.{key}.pretrained")
        for name, encoder in m.encoders.items():
            if isinstance(encoder.model, str):
                _check_dir(encoder.model, f"model.encoders.{name}.model")
            elif encoder.model.get("pretrained") is not None:
                _check_dir(encoder.model["pretrained"], f"model.encoders.{name}.model.pretrained")
    if not resuming:
        _check_dir(cfg.runconfig.checkpoint_path, "runconfig.checkpoint_path")


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------ resuming a run
# Keys a resumed run cannot change: the checkpoint's weights, optimizer state or data position
# would no longer mean what they meant (every `model.` key except those below, the data order).
RESUME_FIXED = ("model.", "train_input.data_dir", "train_input.batch_size", "train_input.shuffle",
                "train_input.drop_last", "runconfig.seed", "optimizer.optimizer_type", "preference.reference")
RESUME_FREE_MODEL = {"model.precision", "model.attn_implementation", "model.gradient_checkpointing",
                     "model.loss_on_supervised_only", "model.loss_scaling"}
# Keys a resume does not use: the run continues from its own checkpoint.
RESUME_IGNORED = {"runconfig.checkpoint_path", "runconfig.load_checkpoint_states"}


def flatten_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"section.key.sub": value} of a config dict (lists are leaves)."""
    if not isinstance(data, dict) or not data:
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten_config(value, f"{prefix}{key}."))
    return out


def resume_changes(saved: dict[str, Any], cfg: TrainConfig) -> tuple[list[str], list[str], list[str]]:
    """How `cfg` differs from the config a checkpoint was trained with (`saved`, its dump):
    (refused, applied, ignored) lines "key: old -> new". Refused keys make the resume meaningless;
    applied ones take effect from the next step (the new value wins); ignored ones are not used."""
    old = flatten_config(saved)
    new = flatten_config(cfg.model_dump(mode="json"))
    refused, applied, ignored = [], [], []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        line = f"{key}: {before!r} -> {after!r}"
        if key in RESUME_IGNORED:
            ignored.append(line)
        elif key.startswith(RESUME_FIXED) and key not in RESUME_FREE_MODEL:
            refused.append(line)
        else:
            applied.append(line)
    return refused, applied, ignored
