"""Build the composite LLaVA model described by a training config, and load start weights."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmloom.errors import MmloomError
from mmloom.files import read_json
from mmloom.model import serialization as ser
from mmloom.model.callbacks import AudioPool, FeatureSelect
from mmloom.model.encoder import ModalEncoderModule
from mmloom.model.feature_count import check_feature_strategy, default_feature_strategy
from mmloom.model.multimodal import MultimodalConfig, MultimodalModel
from mmloom.model.projector import MultimodalProjector, MultimodalProjectorConfig
from mmloom.remote_code import refuse_remote_code
from mmloom.training.config import ModelSection, TrainConfig

# Vision model classes when a folder holds a full dual-tower model (e.g. openai/clip-vit-*).
_VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}


def _vision_config(config):
    return getattr(config, "vision_config", None) or config


def _check_inline_matches(inline: dict, loaded: dict, key: str) -> None:
    for name, value in inline.items():
        if name in ("model_type", "pretrained"):
            continue
        if name in loaded and loaded[name] != value and not (
            isinstance(value, (list, tuple)) and list(loaded[name] or []) == list(value)
        ):
            raise MmloomError(
                f"model.{key}.{name} = {value!r} but the pretrained folder's config has {loaded[name]!r}"
            )


def _inline_config(spec: dict[str, Any], key: str):
    """The HF config of an inline `model.{key}` dict (`model_type` + config keys)."""
    from transformers import AutoConfig

    params = {k: v for k, v in spec.items() if k not in ("model_type", "pretrained")}
    try:
        return AutoConfig.for_model(spec["model_type"], **params)
    except (ValueError, KeyError) as exc:
        raise MmloomError(f"model.{key}: {exc}") from None


def build_vision_model(spec: str | dict[str, Any], attn_implementation: str | None) -> nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModel

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if isinstance(spec, dict) and spec.get("pretrained") is None:
        return AutoModel.from_config(_vision_config(_inline_config(spec, "image_model")), trust_remote_code=False,
                                     **kwargs)
    path = spec if isinstance(spec, str) else spec["pretrained"]
    refuse_remote_code(path, "model.image_model")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if isinstance(spec, dict):
        _check_inline_matches(spec, _vision_config(config).to_dict(), "image_model")
    cls_name = _VISION_TOWERS.get(config.model_type)
    cls = getattr(transformers, cls_name) if cls_name else AutoModel
    return cls.from_pretrained(path, trust_remote_code=False, **kwargs)


def build_text_model(spec: str | dict[str, Any], attn_implementation: str | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if isinstance(spec, dict) and spec.get("pretrained") is None:
        return AutoModelForCausalLM.from_config(_inline_config(spec, "text_model"), trust_remote_code=False, **kwargs)
    path = spec if isinstance(spec, str) else spec["pretrained"]
    refuse_remote_code(path, "model.text_model")
    if isinstance(spec, dict):
        _check_inline_matches(spec, AutoConfig.from_pretrained(path, trust_remote_code=False).to_dict(), "text_model")
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, trust_remote_code=False, **kwargs)


AUDIO_MODEL_TYPES = {"whisper"}  # HF model types whose encoder takes log-mel input_features


def _model_type(spec: str | dict[str, Any]) -> str:
    if isinstance(spec, dict) and spec.get("pretrained") is None:
        return str(spec["model_type"])
    from transformers import AutoConfig

    path = spec if isinstance(spec, str) else spec["pretrained"]
    refuse_remote_code(path, "model folder")
    return AutoConfig.from_pretrained(path, trust_remote_code=False).model_type


def build_audio_model(spec: str | dict[str, Any], attn_implementation: str | None) -> nn.Module:
    """The encoder of a Whisper model: from an inline config (random weights) or a Whisper folder
    (WhisperModel or WhisperForConditionalGeneration weights)."""
    from transformers import AutoConfig, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if isinstance(spec, dict) and spec.get("pretrained") is None:
        config = _inline_config(spec, "encoders.audio.model")
        if attn_implementation:
            config._attn_implementation = attn_implementation
        return WhisperEncoder(config)
    path = spec if isinstance(spec, str) else spec["pretrained"]
    refuse_remote_code(path, "encoders.audio.model")
    if isinstance(spec, dict):
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        _check_inline_matches(spec, config.to_dict(), "encoders.audio.model")
    return WhisperModel.from_pretrained(path, torch_dtype=torch.float32, trust_remote_code=False, **kwargs).get_encoder()


def encoder_settings(m: ModelSection) -> dict[str, Any]:
    """Every encoder a model section describes: `image_model` (the seed's keys) as `vision`, then
    `model.encoders` in order; EncoderSettings-like objects keyed by modality name."""
    from mmloom.training.config import EncoderSettings

    out: dict[str, Any] = {}
    if m.image_model is not None:
        out["vision"] = EncoderSettings(model=m.image_model, feature_layer=m.image_feature_select_layer_idx,
                                        feature_mode=m.image_feature_select_mode, token_id=m.image_token_id)
    out.update(m.encoders)
    return out


def default_token_id(name: str, vocab_size: int, index: int) -> int:
    """Placeholder ids when a config gives none: those `mmloom data build` adds to a tokenizer that
    lacks them (`<image>` = vocab_size, `<audio>` = vocab_size + 1), others after them."""
    return vocab_size + {"vision": 0, "audio": 1}.get(name, 2 + index)


def build_encoder(name: str, settings, m: ModelSection) -> ModalEncoderModule:
    """One encoder of the composite: the module, its feature selection / pooling callback and a
    lazy projector of its own type (default `model.projector`)."""
    projector = MultimodalProjector(MultimodalProjectorConfig(projector_type=settings.projector or m.projector))
    if _model_type(settings.model) in AUDIO_MODEL_TYPES:
        pooling = settings.pooling
        pool = AudioPool(stride=pooling.stride if pooling else 1, mode=pooling.mode if pooling else "mean",
                         downsample=2, layer=settings.feature_layer)
        return ModalEncoderModule(build_audio_model(settings.model, m.attn_implementation), projector=projector,
                                  postprocess_module_callback=pool)
    if settings.pooling is not None:
        raise MmloomError(f"model.encoders.{name}.pooling applies to audio encoders only")
    layer = -2 if settings.feature_layer is None else settings.feature_layer
    tower = build_vision_model(settings.model, m.attn_implementation)
    mode = settings.feature_mode or default_feature_strategy(tower.config)  # no CLS token (SigLIP): full
    check_feature_strategy(tower.config, mode, "model.image_feature_select_mode" if name == "vision" and
                           m.image_model is not None else f"model.encoders.{name}.feature_mode")
    return ModalEncoderModule(tower, projector=projector, postprocess_module_callback=FeatureSelect(layer, mode))


def build_model(cfg: TrainConfig | ModelSection, seed: int = 0):
    """The composite model in float32 (random parts are initialised from `seed`, deterministically):
    the seed's `image_model` as the `vision` encoder and/or `model.encoders`, and `text_model`."""
    m = cfg.model if isinstance(cfg, TrainConfig) else cfg
    torch.manual_seed(seed)
    if m.init_from is not None:
        model = MultimodalModel.from_pretrained(m.init_from, torch_dtype=torch.float32)
        return model.train()
    settings = encoder_settings(m)
    encoders = {name: build_encoder(name, s, m) for name, s in settings.items()}
    llm = build_text_model(m.text_model, m.attn_implementation)
    vocab = llm.config.vocab_size
    token_ids = {name: s.token_id if s.token_id is not None else default_token_id(name, vocab, k)
                 for k, (name, s) in enumerate(settings.items())}
    model = MultimodalModel(encoders, llm, init_projector_type=m.projector, placeholder_token_ids=token_ids)
    return model.float().train()


def lora_part(model, name: str) -> tuple[Any, str]:
    """(owner module, attribute) of a `lora.parts` entry: language_model / text_model, or an encoder
    by modality name, `{name}_encoder` or the Cerebras-style `image_model` / `audio_model`."""
    if name in ("language_model", "text_model"):
        return model, "language_model"
    aliases = {"image_model": "vision", "audio_model": "audio"}
    modality = aliases.get(name, name.removesuffix("_encoder").removesuffix(".module"))
    if modality not in model.encoder_names:
        raise MmloomError(
            f"model.lora.parts: unknown part {name!r}; use language_model or an encoder of {model.encoder_names}"
        )
    return model.encoders[modality], "module"


def apply_lora(model, settings) -> None:
    """Wrap each part of `settings.parts` (default the language model) with its own PEFT LoRA
    adapters (only the adapters train)."""
    from peft import LoraConfig, get_peft_model

    target = settings.target_modules
    for name in getattr(settings, "parts", ["language_model"]):
        owner, attribute = lora_part(model, name)
        module = getattr(owner, attribute)
        if hasattr(module, "peft_config"):
            continue
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=target if isinstance(target, str) else list(target),
        )
        setattr(owner, attribute, get_peft_model(module, config))
    from mmloom.training.lora import check_mergeable

    check_mergeable(model)  # an adapter no merge can fold in exactly is refused before training


# ------------------------------------------------------------------------------- weights
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINAL_MODEL = "final_model"


def list_checkpoints(model_dir: str | Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """`checkpoint-N` folders of a run folder, oldest first: those with trainer_state.json, or
    every one with `complete_only=False` (for `checkpoint.choose_resume_checkpoint` to report)."""
    model_dir = Path(model_dir)
    found = []
    if model_dir.is_dir():
        for p in model_dir.iterdir():
            match = CHECKPOINT_RE.match(p.name)
            if match and p.is_dir() and (not complete_only or (p / "trainer_state.json").exists()):
                found.append((int(match.group(1)), p))
    return sorted(found)


def resolve_weights_folder(path: str | Path) -> Path:
    """An mmloom model folder from a model folder, a checkpoint or a run folder (final model or latest checkpoint)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (path / FINAL_MODEL / "config.json").exists():
        return path / FINAL_MODEL
    checkpoints = list_checkpoints(path)
    if checkpoints:
        return checkpoints[-1][1]
    raise MmloomError(f"{path}: no mmloom model, final_model or checkpoint-N folder there")


def folder_has_peft(folder: Path) -> bool:
    try:
        data = read_json(Path(folder) / "config.json")
    except MmloomError:
        return False
    if (data.get("language_model") or {}).get("peft"):
        return True
    return any(((spec or {}).get("module") or {}).get("peft") for spec in (data.get("encoders") or {}).values())


def load_model_weights(model, folder: str | Path) -> int:
    """Load the weights of an mmloom model folder (full or trainable-only) into `model`; returns the count."""
    folder = Path(folder)
    config = MultimodalConfig.load(folder)
    state = ser.load_state_dict(folder)
    try:
        model.load_weights(state, tied_weights=config.tied_weights, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise MmloomError(f"weights in {folder} do not fit the configured model: {str(exc).splitlines()[0]}") from None
    return len(state)


def frozen_fingerprint(model) -> str:
    """A cheap fingerprint of the frozen parameters (trainable-only checkpoints rely on them)."""
    total, absolute, count = 0.0, 0.0, 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if not p.requires_grad:
                total += float(p.detach().double().sum())
                absolute += float(p.detach().double().abs().sum())
                count += p.numel()
    return f"{count}:{total:.10e}:{absolute:.10e}"


def build_starting_model(cfg: TrainConfig, start_folder: Path | None):
    """The model a run starts from: built from the config and seed, `start_folder`'s weights
    loaded (a PEFT folder after LoRA is added), frozen as configured."""
    model = build_model(cfg, seed=cfg.runconfig.seed)
    start_has_peft = start_folder is not None and folder_has_peft(start_folder)
    if start_folder is not None and not start_has_peft:
        load_model_weights(model, start_folder)
    if cfg.model.freeze:
        model.freeze(cfg.model.freeze)
    if cfg.model.lora is not None:
        apply_lora(model, cfg.model.lora)
    if start_has_peft:
        load_model_weights(model, start_folder)
    return model
