"""The HF parts of a composite (a vision tower, an audio encoder, a causal LM) from a folder or an
inline config: the one loader that `mmloom train` (`model.image_model`, `model.encoders`,
`model.text_model`: through `training.builder`, on the meta device), `mmloom convert --from
hf-components` / `mmloom init` and the original-LLaVA reader use.

A part is given by a *spec*: a HF model folder (`str`), or an inline config dict (`model_type` +
config keys; random weights), optionally with `pretrained: FOLDER` (the folder's weights, its config
checked against the inline keys). Each kind has a *recipe* (:class:`PartRecipe`: how to build it
with random weights, how to load it, and its skeleton for the meta device) and one table of which
classes load it (`VISION_TOWERS`, `AUDIO_TYPES`, causal LMs as transformers maps them). A folder's
own code never runs (`trust_remote_code=False`, :func:`mmloom.remote_code.refuse_remote_code`).
The folder checks with their swapped-option messages (`--image-model` and `--text-model` given the
wrong way round) are here too: :func:`vision_config`, :func:`language_model_config`, :func:`audio_config`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mmloom.errors import MmloomError
from mmloom.remote_code import refuse_remote_code

# The vision tower of a folder of these model types (a full dual-tower model such as openai/clip-vit-*, or
# the tower alone); other vision folders load with AutoModel.
VISION_TOWERS = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
                 "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel"}
AUDIO_TYPES = {"whisper"}  # HF model types whose encoder takes log-mel input_features

Spec = str | dict[str, Any]


def is_causal_lm(model_type: str) -> bool:
    """Whether transformers has a causal-LM class for `model_type`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def is_inline(spec: Spec) -> bool:
    """An inline config without `pretrained` (random weights)."""
    return isinstance(spec, dict) and spec.get("pretrained") is None


def spec_folder(spec: Spec) -> str:
    """The folder of a folder spec (the spec itself, or its `pretrained`)."""
    return spec if isinstance(spec, str) else spec["pretrained"]


# ------------------------------------------------------------------------------------ configs
def folder_config(path: str | Path, what: str):
    """The `AutoConfig` of the HF model folder `path`, given as `what` (e.g. `--text-model`).

    Raises MmloomError (one line naming `what` and the folder) when the folder does not exist,
    holds no `config.json` (an empty folder, or a tokenizer / processor folder alone), names code of
    its own, or holds a config that transformers cannot read.
    """
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise MmloomError(f"{what} {str(path)!r} is not a folder")
    if not (path / "config.json").is_file():
        raise MmloomError(f"{what} {path}: no config.json: not a HF model folder (a folder written by "
                          "save_pretrained, or the model as downloaded)")
    refuse_remote_code(path, what)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MmloomError(f"{what} {path}: cannot read its config.json: {first[:200]}") from None


def vision_config(path: str | Path, what: str = "--image-model"):
    """The config of a vision-tower folder; raises MmloomError when `path` is not a model folder, or
    holds a causal LM or an audio model (e.g. `--image-model` and `--text-model` swapped)."""
    config = folder_config(path, what)
    if is_causal_lm(config.model_type):
        raise MmloomError(f"{what} {path} is a {config.model_type!r} causal LM, not a vision encoder "
                          "(--image-model and --text-model swapped?)")
    if config.model_type in AUDIO_TYPES:
        raise MmloomError(f"{what} {path} is a {config.model_type!r} audio model: give it as --audio-model")
    return config


def language_model_config(path: str | Path, what: str = "--text-model"):
    """The config of a causal-LM folder; raises MmloomError when `path` is not a model folder or holds
    another kind of model than a causal LM (e.g. a CLIP folder: the options swapped)."""
    config = folder_config(path, what)
    if config.model_type in AUDIO_TYPES:
        raise MmloomError(f"{what} {path} is a {config.model_type!r} audio model: give it as --audio-model")
    if not is_causal_lm(config.model_type):
        hint = (" (--image-model and --text-model swapped?)" if config.model_type in VISION_TOWERS
                or hasattr(config, "vision_config") or "vision" in config.model_type else "")
        raise MmloomError(f"{what} {path} is a {config.model_type!r} model, not a causal language "
                          f"model{hint}")
    return config


def audio_config(path: str | Path, what: str = "--audio-model"):
    """The config of an audio-encoder folder; raises MmloomError unless it is a Whisper model."""
    config = folder_config(path, what)
    if config.model_type not in AUDIO_TYPES:
        raise MmloomError(f"{what}: only Whisper folders are supported, {path} is {config.model_type!r}")
    return config


def inline_config(spec: dict[str, Any], key: str):
    """The HF config of an inline `model.{key}` dict (`model_type` + config keys). Raises MmloomError
    naming the key when transformers refuses it."""
    from transformers import AutoConfig

    params = {k: v for k, v in spec.items() if k not in ("model_type", "pretrained")}
    try:
        return AutoConfig.for_model(spec["model_type"], **params)
    except (ValueError, KeyError) as exc:
        raise MmloomError(f"model.{key}: {exc}") from None


def check_inline_matches(inline: dict, loaded: dict, key: str) -> None:
    """Refuse (MmloomError naming `model.{key}.NAME`) an inline key whose value differs from the
    pretrained folder's config (lists and tuples of the same items are the same)."""
    for name, value in inline.items():
        if name in ("model_type", "pretrained"):
            continue
        if name in loaded and loaded[name] != value and not (
            isinstance(value, (list, tuple)) and list(loaded[name] or []) == list(value)
        ):
            raise MmloomError(
                f"model.{key}.{name} = {value!r} but the pretrained folder's config has {loaded[name]!r}"
            )


def spec_model_type(spec: Spec, what: str = "model folder") -> str:
    """The HF model type of a spec (the inline `model_type`, else the folder's config)."""
    if is_inline(spec):
        return str(spec["model_type"])
    from transformers import AutoConfig

    path = spec_folder(spec)
    refuse_remote_code(path, what)
    return AutoConfig.from_pretrained(path, trust_remote_code=False).model_type


def _vision_part(config):
    return getattr(config, "vision_config", None) or config


# ------------------------------------------------------------------------------------ recipes
@dataclass
class PartRecipe:
    """How one HF part is built: `random()` for an inline spec (random weights), else `load()`
    (`from_pretrained` of `folder`) or, for weights loaded later, `skeleton()` (the model of the
    folder's config); `finish` turns what was built into the part (e.g. a Whisper model into its
    encoder)."""

    folder: Path | None = None
    random: Callable[[], nn.Module] | None = None
    load: Callable[[], nn.Module] | None = None
    skeleton: Callable[[], nn.Module] | None = None
    finish: Callable[[nn.Module], nn.Module] = lambda module: module

    def build(self) -> nn.Module:
        """The part with its weights (random, or the folder's)."""
        return self.finish(self.random() if self.random is not None else self.load())


def _kwargs(attn: str | None, dtype) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model kwargs, from_pretrained-only kwargs)."""
    return ({"attn_implementation": attn} if attn else {}), ({"dtype": dtype} if dtype is not None else {})


def vision_tower(spec: Spec, key: str = "image_model", attn: str | None = None, dtype=None,
                 what: str | None = None) -> PartRecipe:
    """The recipe of a vision tower (`model.{key}`, given as `what` in messages): an inline config's
    (its `vision_config` when it has one), or a folder's: the tower of a CLIP/SigLIP folder
    (`VISION_TOWERS`), else `AutoModel`. `dtype` (None: transformers' default) is the loaded
    weights'. Raises MmloomError for a folder holding a model with several parts (e.g. a LLaVA or
    Qwen2-VL folder), inline keys the folder's config contradicts, or code of its own."""
    import transformers
    from transformers import AutoConfig, AutoModel

    what = what or f"model.{key}"
    kwargs, load_kwargs = _kwargs(attn, dtype)
    if is_inline(spec):
        config = _vision_part(inline_config(spec, key))
        return PartRecipe(random=lambda: AutoModel.from_config(config, trust_remote_code=False, **kwargs))
    path = spec_folder(spec)
    refuse_remote_code(path, what)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if isinstance(spec, dict):
        check_inline_matches(spec, _vision_part(config).to_dict(), key)
    cls_name = VISION_TOWERS.get(config.model_type)
    if cls_name:  # the vision tower (of a dual-tower folder, or alone)
        cls = getattr(transformers, cls_name)
        tower_config = cls.config_class.from_pretrained(path, trust_remote_code=False)
        skeleton = lambda: cls._from_config(tower_config, **kwargs)  # noqa: E731
    elif hasattr(config, "vision_config") or hasattr(config, "text_config"):
        raise MmloomError(f"{what} {path} is a {config.model_type!r} model with several parts; give a vision-only "
                          "folder (CLIP, SigLIP or any AutoModel vision encoder)")
    else:
        cls = AutoModel
        skeleton = lambda: AutoModel.from_config(config, trust_remote_code=False, **kwargs)  # noqa: E731
    return PartRecipe(Path(path), load=lambda: cls.from_pretrained(path, trust_remote_code=False, **load_kwargs,
                                                                    **kwargs), skeleton=skeleton)


def causal_lm(spec: Spec, key: str = "text_model", attn: str | None = None, dtype=None,
              what: str | None = None) -> PartRecipe:
    """The recipe of a causal LM (`AutoModelForCausalLM`), as :func:`vision_tower`'s."""
    from transformers import AutoConfig, AutoModelForCausalLM

    what = what or f"model.{key}"
    kwargs, load_kwargs = _kwargs(attn, dtype)
    if is_inline(spec):
        config = inline_config(spec, key)
        return PartRecipe(random=lambda: AutoModelForCausalLM.from_config(config, trust_remote_code=False, **kwargs))
    path = spec_folder(spec)
    refuse_remote_code(path, what)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if isinstance(spec, dict):
        check_inline_matches(spec, config.to_dict(), key)
    return PartRecipe(
        Path(path),
        load=lambda: AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, **load_kwargs, **kwargs),
        skeleton=lambda: AutoModelForCausalLM.from_config(config, trust_remote_code=False, **kwargs),
    )


def audio_encoder(spec: Spec, key: str = "encoders.audio.model", attn: str | None = None, dtype=None,
                  what: str | None = None) -> PartRecipe:
    """The recipe of a Whisper encoder: from an inline config (random weights) or a Whisper folder
    (WhisperModel or WhisperForConditionalGeneration weights), as :func:`vision_tower`'s."""
    from transformers import AutoConfig, WhisperConfig, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    what = what or key
    kwargs, load_kwargs = _kwargs(attn, dtype)
    if is_inline(spec):
        config = inline_config(spec, key)
        if attn:
            config._attn_implementation = attn
        return PartRecipe(random=lambda: WhisperEncoder(config))
    path = spec_folder(spec)
    refuse_remote_code(path, what)
    if isinstance(spec, dict):
        check_inline_matches(spec, AutoConfig.from_pretrained(path, trust_remote_code=False).to_dict(), key)
    return PartRecipe(
        Path(path),
        load=lambda: WhisperModel.from_pretrained(path, trust_remote_code=False, **load_kwargs, **kwargs),
        skeleton=lambda: WhisperModel._from_config(WhisperConfig.from_pretrained(path, trust_remote_code=False),
                                                   **kwargs),
        finish=lambda model: model.get_encoder(),
    )


# ------------------------------------------------------------------------- folders, as commands give them
def load_vision_tower(path: str | Path, dtype=None, what: str = "--image-model") -> nn.Module:
    """The vision tower of a HF folder (a full CLIP/SigLIP folder gives its vision part), its
    weights in `dtype` (e.g. ``"auto"``: the folder's). Raises as :func:`vision_config` and
    :func:`vision_tower`."""
    vision_config(path, what)
    return vision_tower(str(path), dtype=dtype, what=what).build()


def load_audio_encoder(path: str | Path, dtype=None, what: str = "--audio-model"):
    """(encoder in eval mode, feature extractor) of a Whisper folder: the folder's extractor when it
    has one, else Whisper's for its number of mel bins. Raises as :func:`audio_config`."""
    from transformers import AutoFeatureExtractor, WhisperFeatureExtractor

    config = audio_config(path, what)
    encoder = audio_encoder(str(path), dtype=dtype, what=what).build()
    if (Path(path) / "preprocessor_config.json").exists():
        extractor = AutoFeatureExtractor.from_pretrained(path, trust_remote_code=False)
    else:
        extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return encoder.eval(), extractor


def load_language_model(path: str | Path, dtype=None, what: str = "--text-model") -> nn.Module:
    """The causal LM of a HF folder, in eval mode; raises as :func:`language_model_config`."""
    language_model_config(path, what)
    return causal_lm(str(path), dtype=dtype, what=what).build().eval()
