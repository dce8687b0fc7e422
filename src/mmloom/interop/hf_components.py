"""Separate HF folders (a vision tower, optionally an audio encoder, and a causal LM) -> a new
composite with fresh projectors, ready for phase 1 (projector alignment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmloom.errors import MmloomError
from mmloom.interop.common import (
    Bundle,
    check_dir,
    default_image_processor,
    hf_dtype,
    load_image_processor,
)
from mmloom.interop.tokens import prepare_tokenizer_and_vocab
from mmloom.model.callbacks import AudioPool, FeatureSelect
from mmloom.model.encoder import ModalEncoderModule
from mmloom.model.feature_count import check_feature_strategy, default_feature_strategy
from mmloom.model.multimodal import MultimodalModel
from mmloom.processing.templates import TEMPLATE_NAMES, get_template, template_choice
from mmloom.processing.tokenizer import load_tokenizer
from mmloom.remote_code import refuse_remote_code

VISION_TYPES = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
                "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel"}


AUDIO_TYPES = {"whisper"}


def _is_causal_lm(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def hf_folder_config(path: str | Path, what: str):
    """The `AutoConfig` of the HF model folder `path`, given as option `what` (e.g. `--text-model`).

    Raises MmloomError (one line naming the option and the folder) when the folder does not exist,
    holds no `config.json` (an empty folder, or a tokenizer / processor folder alone) or a config
    that transformers cannot read.
    """
    from transformers import AutoConfig

    path = check_dir(path, what)
    if not (path / "config.json").is_file():
        raise MmloomError(f"{what} {path}: no config.json: not a HF model folder (a folder written by "
                          "save_pretrained, or the model as downloaded)")
    refuse_remote_code(path, what)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MmloomError(f"{what} {path}: cannot read its config.json: {first[:200]}") from None


def vision_config(path: str | Path):
    """The config of an `--image-model` folder; raises MmloomError when `path` is not a model folder,
    or holds a causal LM or an audio model (e.g. `--image-model` and `--text-model` swapped)."""
    config = hf_folder_config(path, "--image-model")
    if _is_causal_lm(config.model_type):
        raise MmloomError(f"--image-model {path} is a {config.model_type!r} causal LM, not a vision encoder "
                          "(--image-model and --text-model swapped?)")
    if config.model_type in AUDIO_TYPES:
        raise MmloomError(f"--image-model {path} is a {config.model_type!r} audio model: give it as --audio-model")
    return config


def language_model_config(path: str | Path):
    """The config of a `--text-model` folder; raises MmloomError when `path` is not a model folder or
    holds another kind of model than a causal LM (e.g. a CLIP folder: the options swapped)."""
    config = hf_folder_config(path, "--text-model")
    if config.model_type in AUDIO_TYPES:
        raise MmloomError(f"--text-model {path} is a {config.model_type!r} audio model: give it as --audio-model")
    if not _is_causal_lm(config.model_type):
        hint = (" (--image-model and --text-model swapped?)" if config.model_type in VISION_TYPES
                or hasattr(config, "vision_config") or "vision" in config.model_type else "")
        raise MmloomError(f"--text-model {path} is a {config.model_type!r} model, not a causal language "
                          f"model{hint}")
    return config


def audio_config(path: str | Path):
    """The config of an `--audio-model` folder; raises MmloomError unless it is a Whisper model."""
    config = hf_folder_config(path, "--audio-model")
    if config.model_type not in AUDIO_TYPES:
        raise MmloomError(f"--audio-model: only Whisper folders are supported, {path} is {config.model_type!r}")
    return config


def load_vision_tower(path: str | Path, dtype=None):
    """A vision tower from a HF folder; a full CLIP/SigLIP folder gives its vision part
    (raises as `vision_config`)."""
    import transformers

    path = check_dir(path, "--image-model")
    config = vision_config(path)
    class_name = VISION_TYPES.get(config.model_type)
    if class_name is None:
        if hasattr(config, "vision_config") or hasattr(config, "text_config"):
            raise MmloomError(
                f"{path} is a {config.model_type!r} model with several parts; give a vision-only folder "
                "(CLIP, SigLIP or any AutoModel vision encoder)"
            )
        class_name = "AutoModel"
    return getattr(transformers, class_name).from_pretrained(path, dtype=hf_dtype(dtype), trust_remote_code=False)


def load_audio_encoder(path: str | Path, dtype=None):
    """The encoder of a Whisper folder (and its feature extractor, when the folder has one)."""
    from transformers import AutoFeatureExtractor, WhisperFeatureExtractor, WhisperModel

    path = check_dir(path, "--audio-model")
    config = audio_config(path)
    encoder = WhisperModel.from_pretrained(path, dtype=hf_dtype(dtype), trust_remote_code=False).get_encoder()
    if (path / "preprocessor_config.json").exists():
        extractor = AutoFeatureExtractor.from_pretrained(path, trust_remote_code=False)
    else:
        extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return encoder.eval(), extractor


def load_language_model(path: str | Path, dtype=None):
    """The causal LM of a HF folder (eval mode); raises as `language_model_config`."""
    from transformers import AutoModelForCausalLM

    path = check_dir(path, "--text-model")
    language_model_config(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=hf_dtype(dtype), trust_remote_code=False).eval()


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
    llm = load_language_model(text_model, dtype)
    encoders, processors, placeholders = {}, {}, {}
    if image_model is not None:
        tower = load_vision_tower(image_model, dtype).eval()
        select = FeatureSelect(feature_layer, feature_strategy)
        encoders["vision"] = ModalEncoderModule(tower, postprocess_module_callback=select)
        processors["vision"] = load_image_processor(Path(image_model)) or default_image_processor(tower.config)
        placeholders["vision"] = "<image>"
    if audio_model is not None:
        whisper, extractor = load_audio_encoder(audio_model, dtype)
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
