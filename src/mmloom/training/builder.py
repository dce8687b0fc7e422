"""Build the composite LLaVA model a training config describes: its HF parts (pretrained folders or inline
configs), encoders, projectors and placeholder ids, on the meta device for `model_loading.build_base_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmloom.errors import MmloomError
from mmloom.model import hf_parts
from mmloom.model.callbacks import AudioPool, FeatureSelect, FramePool
from mmloom.model.encoder import ModalEncoderModule
from mmloom.model.feature_count import check_feature_strategy, default_feature_strategy
from mmloom.model.hf_parts import AUDIO_TYPES, PartRecipe, spec_model_type
from mmloom.model.meta_init import (
    WeightSources,
    hf_folder_sources,
    meta_module,
    mmloom_folder_sources,
)
from mmloom.model.multimodal import MultimodalConfig, MultimodalModel
from mmloom.model.projector import MultimodalProjector, MultimodalProjectorConfig
from mmloom.processing.media import default_token_id
from mmloom.training.config import ModelSection, TrainConfig


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


def _part(plan: StartPlan | None, recipe: PartRecipe) -> nn.Module:
    """One HF part by its recipe (`model.hf_parts`): random weights for an inline config, the folder's
    otherwise; on the meta device by `plan` (see `StartPlan`)."""
    if recipe.random is not None:
        module = recipe.random() if plan is None else plan.random_part(recipe.random)
    elif plan is None:
        module = recipe.load()
    else:
        module = plan.pretrained_part(recipe.load, recipe.skeleton, recipe.folder)
    return recipe.finish(module)


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


def build_encoder(name: str, settings, m: ModelSection, plan: StartPlan | None = None) -> ModalEncoderModule:
    """One encoder of the composite: the module, its feature selection / pooling callback and a
    lazy projector of its own type (default `model.projector`)."""
    projector = MultimodalProjector(MultimodalProjectorConfig(projector_type=settings.projector or m.projector))
    seed_keys = name == "vision" and m.image_model is not None  # the seed's image_model keys
    key = "image_model" if seed_keys else f"encoders.{name}.model"
    if spec_model_type(settings.model) in AUDIO_TYPES:
        pooling = settings.pooling
        pool = AudioPool(stride=pooling.stride if pooling else 1, mode=pooling.mode if pooling else "mean",
                         downsample=2, layer=settings.feature_layer)
        recipe = hf_parts.audio_encoder(settings.model, key, m.attn_implementation, dtype=torch.float32)
        return ModalEncoderModule(_part(plan, recipe), projector=projector, postprocess_module_callback=pool)
    if settings.pooling is not None:
        raise MmloomError(f"model.encoders.{name}.pooling applies to audio encoders only")
    layer = -2 if settings.feature_layer is None else settings.feature_layer
    tower = _part(plan, hf_parts.vision_tower(settings.model, key, m.attn_implementation))
    mode = settings.feature_mode or default_feature_strategy(tower.config)  # no CLS token (SigLIP): full
    check_feature_strategy(tower.config, mode, "model.image_feature_select_mode" if seed_keys
                           else f"model.encoders.{name}.feature_mode")
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
    llm = _part(plan, hf_parts.causal_lm(m.text_model, "text_model", m.attn_implementation, dtype=torch.float32))
    vocab = llm.config.vocab_size
    token_ids = {name: s.token_id if s.token_id is not None else default_token_id(name, vocab, k)
                 for k, (name, s) in enumerate(settings.items())}
    media = {}
    if m.video is not None:
        media["video"] = ("vision", frame_pool(m.video, encoders["vision"], llm))
        token_ids["video"] = m.video.token_id if m.video.token_id is not None else default_token_id("video", vocab, 0)
    model = MultimodalModel(encoders, llm, init_projector_type=m.projector, placeholder_token_ids=token_ids,
                            media=media)
    return model.float().train()


def frame_pool(video, vision: ModalEncoderModule, llm: nn.Module) -> FramePool:
    """The `FramePool` of `model.video` for frames of the `vision` encoder: its patch grid (the
    features per image after feature selection, a square) pooled at the LLM's width. Raises
    MmloomError when the vision features are not a square grid (a kept CLS token)."""
    from math import isqrt

    from mmloom.model.feature_count import num_feature_tokens

    tokens = num_feature_tokens(vision.config, vision.callbacks)
    grid = isqrt(tokens)
    if grid * grid != tokens:
        raise MmloomError(f"model.video needs a square grid of vision features per frame, but the vision encoder gives "
                          f"{tokens} (a kept CLS token? use image_feature_select_mode: patch)")
    width = llm.get_input_embeddings().embedding_dim
    return FramePool(width, grid, stride=video.pool.stride, mode=video.pool.mode, newline=video.newline)
