"""Build the composite LLaVA model a training config describes: its HF parts (pretrained folders or inline
configs), encoders, projectors and placeholder ids, on the meta device for `model_loading.build_base_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmloom.errors import MmloomError
from mmloom.model.callbacks import AudioPool, FeatureSelect
from mmloom.model.encoder import ModalEncoderModule
from mmloom.model.feature_count import check_feature_strategy, default_feature_strategy
from mmloom.model.meta_init import (
    WeightSources,
    hf_folder_sources,
    meta_module,
    mmloom_folder_sources,
)
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


class StartPlan:
    """How `build_model` builds a model on the meta device, for `model_loading.build_base_model`.

    Parts with pretrained weights are built on the meta device (no storage, no random draws: as
    transformers' `from_pretrained` builds them) and their tensors recorded in `sources` (file and
    key). Parts with random weights (inline configs, projectors, LoRA adapters) are built as one
    process builds them, with the same random draws, where `values_here` (the first rank: their
    values are handed out from there), else on the meta device. An HF folder whose tensors
    transformers would have to convert, or to initialise, is loaded by `from_pretrained` itself
    (where `values_here`; noted in `notes`)."""

    def __init__(self, values_here: bool = True) -> None:
        self.values_here = values_here
        self.sources = WeightSources()
        self.notes: list[str] = []

    def random_part(self, factory) -> nn.Module:
        """A part with random weights: `factory()` here, else on the meta device."""
        return factory() if self.values_here else meta_module(factory)

    def pretrained_part(self, load, skeleton, folder: str | Path) -> nn.Module:
        """A part with the weights of an HF folder: `skeleton()` (the model built from the folder's
        config) on the meta device with the folder's tensors as sources, else `load()`
        (`from_pretrained`) where `values_here`."""
        model = meta_module(skeleton)
        sources = hf_folder_sources(model, folder)
        if sources is not None:
            self.sources.add_by_name(model, sources)
            return model
        self.notes.append(f"{folder}: no safetensors weights that map one to one onto the model; loaded whole by "
                          "transformers on the first rank")
        return load() if self.values_here else model

    def mmloom_model(self, folder: str | Path) -> MultimodalModel:
        """The composite of an mmloom model folder (`model.init_from`), as `MultimodalModel.from_pretrained`
        builds it, with the folder's tensors as sources."""
        config = MultimodalConfig.load(folder)
        if config.trainable_only:
            raise MmloomError(f"{folder} holds trainable parameters only; pass base=<full model folder or model> "
                              "that supplies the other weights")
        model = MultimodalModel.from_config(config, meta_parts=True)
        self.sources.add_by_name(model, mmloom_folder_sources(folder, model, strict=True))
        return model

    def load_folder(self, model: nn.Module, folder: str | Path) -> None:
        """The tensors an mmloom model folder holds replace those `model` would take (start weights)."""
        self.sources.add_by_name(model, mmloom_folder_sources(folder, model))


def _part(plan: StartPlan | None, spec, load, skeleton, random) -> nn.Module:
    """One HF part: `random()` for an inline config, `load()` for a folder; on the meta device by `plan`."""
    if isinstance(spec, dict) and spec.get("pretrained") is None:
        return random() if plan is None else plan.random_part(random)
    if plan is None:
        return load()
    return plan.pretrained_part(load, skeleton, spec if isinstance(spec, str) else spec["pretrained"])


def build_vision_model(spec: str | dict[str, Any], attn_implementation: str | None,
                       plan: StartPlan | None = None) -> nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModel

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if isinstance(spec, dict) and spec.get("pretrained") is None:
        config = _vision_config(_inline_config(spec, "image_model"))
        return _part(plan, spec, None, None, lambda: AutoModel.from_config(config, trust_remote_code=False, **kwargs))
    path = spec if isinstance(spec, str) else spec["pretrained"]
    refuse_remote_code(path, "model.image_model")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if isinstance(spec, dict):
        _check_inline_matches(spec, _vision_config(config).to_dict(), "image_model")
    cls_name = _VISION_TOWERS.get(config.model_type)
    if cls_name:  # the vision tower of a dual-tower folder
        cls = getattr(transformers, cls_name)
        tower_config = cls.config_class.from_pretrained(path, trust_remote_code=False)
        skeleton = lambda: cls._from_config(tower_config, **kwargs)  # noqa: E731
    else:
        cls = AutoModel
        skeleton = lambda: AutoModel.from_config(config, trust_remote_code=False, **kwargs)  # noqa: E731
    return _part(plan, spec, lambda: cls.from_pretrained(path, trust_remote_code=False, **kwargs), skeleton, None)


def build_text_model(spec: str | dict[str, Any], attn_implementation: str | None,
                     plan: StartPlan | None = None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if isinstance(spec, dict) and spec.get("pretrained") is None:
        config = _inline_config(spec, "text_model")
        return _part(plan, spec, None, None,
                     lambda: AutoModelForCausalLM.from_config(config, trust_remote_code=False, **kwargs))
    path = spec if isinstance(spec, str) else spec["pretrained"]
    refuse_remote_code(path, "model.text_model")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if isinstance(spec, dict):
        _check_inline_matches(spec, config.to_dict(), "text_model")
    return _part(plan, spec,
                 lambda: AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, trust_remote_code=False,
                                                              **kwargs),
                 lambda: AutoModelForCausalLM.from_config(config, trust_remote_code=False, **kwargs), None)


AUDIO_MODEL_TYPES = {"whisper"}  # HF model types whose encoder takes log-mel input_features


def _model_type(spec: str | dict[str, Any]) -> str:
    if isinstance(spec, dict) and spec.get("pretrained") is None:
        return str(spec["model_type"])
    from transformers import AutoConfig

    path = spec if isinstance(spec, str) else spec["pretrained"]
    refuse_remote_code(path, "model folder")
    return AutoConfig.from_pretrained(path, trust_remote_code=False).model_type


def build_audio_model(spec: str | dict[str, Any], attn_implementation: str | None,
                      plan: StartPlan | None = None) -> nn.Module:
    """The encoder of a Whisper model: from an inline config (random weights) or a Whisper folder
    (WhisperModel or WhisperForConditionalGeneration weights)."""
    from transformers import AutoConfig, WhisperConfig, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if isinstance(spec, dict) and spec.get("pretrained") is None:
        config = _inline_config(spec, "encoders.audio.model")
        if attn_implementation:
            config._attn_implementation = attn_implementation
        return _part(plan, spec, None, None, lambda: WhisperEncoder(config))
    path = spec if isinstance(spec, str) else spec["pretrained"]
    refuse_remote_code(path, "encoders.audio.model")
    if isinstance(spec, dict):
        _check_inline_matches(spec, AutoConfig.from_pretrained(path, trust_remote_code=False).to_dict(),
                              "encoders.audio.model")
    model = _part(plan, spec,
                  lambda: WhisperModel.from_pretrained(path, torch_dtype=torch.float32, trust_remote_code=False,
                                                       **kwargs),
                  lambda: WhisperModel._from_config(WhisperConfig.from_pretrained(path, trust_remote_code=False),
                                                    **kwargs), None)
    return model.get_encoder()


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


def build_encoder(name: str, settings, m: ModelSection, plan: StartPlan | None = None) -> ModalEncoderModule:
    """One encoder of the composite: the module, its feature selection / pooling callback and a
    lazy projector of its own type (default `model.projector`)."""
    projector = MultimodalProjector(MultimodalProjectorConfig(projector_type=settings.projector or m.projector))
    if _model_type(settings.model) in AUDIO_MODEL_TYPES:
        pooling = settings.pooling
        pool = AudioPool(stride=pooling.stride if pooling else 1, mode=pooling.mode if pooling else "mean",
                         downsample=2, layer=settings.feature_layer)
        return ModalEncoderModule(build_audio_model(settings.model, m.attn_implementation, plan), projector=projector,
                                  postprocess_module_callback=pool)
    if settings.pooling is not None:
        raise MmloomError(f"model.encoders.{name}.pooling applies to audio encoders only")
    layer = -2 if settings.feature_layer is None else settings.feature_layer
    tower = build_vision_model(settings.model, m.attn_implementation, plan)
    mode = settings.feature_mode or default_feature_strategy(tower.config)  # no CLS token (SigLIP): full
    check_feature_strategy(tower.config, mode, "model.image_feature_select_mode" if name == "vision" and
                           m.image_model is not None else f"model.encoders.{name}.feature_mode")
    return ModalEncoderModule(tower, projector=projector, postprocess_module_callback=FeatureSelect(layer, mode))


def build_model(cfg: TrainConfig | ModelSection, seed: int = 0, plan: StartPlan | None = None):
    """The composite model in float32 (random parts are initialised from `seed`, deterministically):
    the seed's `image_model` as the `vision` encoder and/or `model.encoders`, and `text_model`, or
    `model.init_from`. With `plan`, pretrained weights are not loaded: those parts are on the meta
    device and `plan.sources` says where their tensors are (see `StartPlan`); the random state
    after the build is the same either way."""
    m = cfg.model if isinstance(cfg, TrainConfig) else cfg
    torch.manual_seed(seed)
    if m.init_from is not None:
        if plan is not None:
            return plan.mmloom_model(m.init_from).train()
        model = MultimodalModel.from_pretrained(m.init_from, torch_dtype=torch.float32)
        return model.train()
    settings = encoder_settings(m)
    encoders = {name: build_encoder(name, s, m, plan) for name, s in settings.items()}
    llm = build_text_model(m.text_model, m.attn_implementation, plan)
    vocab = llm.config.vocab_size
    token_ids = {name: s.token_id if s.token_id is not None else default_token_id(name, vocab, k)
                 for k, (name, s) in enumerate(settings.items())}
    model = MultimodalModel(encoders, llm, init_projector_type=m.projector, placeholder_token_ids=token_ids)
    return model.float().train()
