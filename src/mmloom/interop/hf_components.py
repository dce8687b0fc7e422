"""Separate HF folders (a vision tower, optionally an audio encoder, and a causal LM) -> a new
composite with fresh projectors, ready for phase 1 (projector alignment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmloom.errors import MmloomError
from mmloom.interop.common import Bundle, default_image_processor, hf_dtype, load_image_processor
from mmloom.interop.tokens import prepare_tokenizer_and_vocab
from mmloom.model.callbacks import AudioPool, FeatureSelect
from mmloom.model.encoder import ModalEncoderModule
from mmloom.model.feature_count import check_feature_strategy, default_feature_strategy
from mmloom.model.hf_parts import (
    audio_config,
    language_model_config,
    load_audio_encoder,
    load_language_model,
    load_vision_tower,
    vision_config,
)
from mmloom.model.multimodal import MultimodalModel
from mmloom.processing.templates import TEMPLATE_NAMES, get_template, template_choice
from mmloom.processing.tokenizer import load_tokenizer


def read_hf_components(
    src: str | Path | None = None,
    image_model: str | Path | None = None,
    text_model: str | Path | None = None,
    audio_model: str | Path | None = None,
    projector: str = "mlp2x_gelu",
    activation: str = "gelu",
    feature_layer: int | list[int] = -2,
    feature_strategy: str | None = None,
    pad_to_multiple_of: int | None = None,
    template: str | None = None,
    dtype: str | None = None,
    audio_stride: int = 1,
    audio_pool_mode: str = "mean",
    **_: Any,
) -> Bundle:
    """Compose a new model: fresh projector(s), `<image>` (and `<audio>`) added to the tokenizer,
    embeddings resized to cover it (rounded up to `pad_to_multiple_of`). The audio encoder keeps
    each clip's real-length positions, pooled by `audio_stride` (`AudioPool`). `template` None: the
    LLM tokenizer's chat template when it has one, else vicuna_v1 (:func:`choose_template`)."""
    if src is not None:
        raise MmloomError("hf-components takes no SRC: give --image-model DIR --text-model DIR")
    if text_model is None or (image_model is None and audio_model is None):
        raise MmloomError("hf-components needs --text-model DIR and --image-model DIR (and/or --audio-model DIR)")
    # every folder is checked before any weights are read (a 7B LLM takes a while to load)
    language_model_config(text_model)
    if image_model is not None:
        tower_config = vision_config(image_model)
        feature_strategy = feature_strategy or default_feature_strategy(tower_config)  # no CLS (SigLIP): full
        check_feature_strategy(tower_config, feature_strategy, "--feature-strategy")
    if audio_model is not None:
        audio_config(audio_model)
    tokenizer = load_tokenizer(Path(text_model), what="--text-model")
    template, why = choose_template(template, tokenizer)
    llm = load_language_model(text_model, hf_dtype(dtype))
    encoders, processors, placeholders = {}, {}, {}
    if image_model is not None:
        tower = load_vision_tower(image_model, hf_dtype(dtype)).eval()
        select = FeatureSelect(feature_layer, feature_strategy)
        encoders["vision"] = ModalEncoderModule(tower, postprocess_module_callback=select)
        processors["vision"] = load_image_processor(Path(image_model)) or default_image_processor(tower.config)
        placeholders["vision"] = "<image>"
    if audio_model is not None:
        whisper, extractor = load_audio_encoder(audio_model, hf_dtype(dtype))
        encoders["audio"] = ModalEncoderModule(
            whisper, postprocess_module_callback=AudioPool(audio_stride or 1, audio_pool_mode))
        processors["audio"] = extractor
        placeholders["audio"] = "<audio>"
    ids = prepare_tokenizer_and_vocab(tokenizer, llm, list(placeholders.values()), pad_to_multiple_of)
    model = MultimodalModel(
        encoders,
        llm,
        init_projector_type=projector,
        init_activation=activation,
        placeholder_token_ids={name: ids[token] for name, token in placeholders.items()},
    )
    model.to(llm.dtype)  # fresh projectors in the checkpoint's dtype
    notes = [f"new projector(s): {projector}; placeholder ids {model.placeholder_token_ids}; "
             f"vocabulary {llm.get_input_embeddings().weight.shape[0]} rows", why]
    return Bundle(model.eval(), tokenizer, processors, template, notes=notes)


def choose_template(template: str | None, tokenizer) -> tuple[str, str]:
    """(template name, the line saying why) for `--template` (None: the tokenizer's chat template when it
    has one, else vicuna_v1; :func:`mmloom.processing.templates.template_choice`). Raises MmloomError,
    naming the choices, for an unknown name or a tokenizer chat template that cannot render a
    system + two-turn conversation with an image (mmloom must locate every answer in it)."""
    name, why = template_choice(template, tokenizer)
    try:
        probe = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A square."},
                 {"role": "user", "content": "And its colour?"}, {"role": "assistant", "content": "Red."}]
        get_template(name).tokenize(tokenizer, probe)
    except MmloomError as err:
        if template is not None:
            raise
        raise MmloomError(f"{err}; give --template NAME, one of {', '.join(TEMPLATE_NAMES)}") from None
    return name, why
