"""What every format reads into and writes from: a model with its tokenizer and processors.

The native `mmloom` folder is read and written here too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmloom.errors import MmloomError
from mmloom.files import read_json
from mmloom.model.adapters import base_module
from mmloom.model.callbacks import FeatureSelect
from mmloom.model.encoder import CALLBACK_SLOTS
from mmloom.model.multimodal import MultimodalModel
from mmloom.outputs import new_folder
from mmloom.processing.tokenizer_files import save_tokenizer
from mmloom.remote_code import refuse_remote_code

DEFAULT_TEMPLATE = "vicuna_v1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Bundle:
    """A composite model and what it needs to be used: tokenizer, per-modality processors, template."""

    model: MultimodalModel
    tokenizer: Any | None = None
    encoder_processors: dict[str, Any] = field(default_factory=dict)
    template: str = DEFAULT_TEMPLATE
    template_options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    source: Path | None = None  # the folder read (its tokenizer.model is copied into exports)


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name (``"float32"``, ``"float16"``, ``"bfloat16"``); a dtype or None is
    returned as given. Raises MmloomError for any other name."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise MmloomError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def hf_dtype(name) -> Any:
    """The `dtype=` argument for HF from_pretrained: the requested dtype, else the checkpoint's."""
    return torch_dtype(name) or "auto"


def check_dir(path: str | Path, what: str) -> Path:
    """`path` as a Path; raises MmloomError naming `what` (e.g. ``"hf-llava folder"``) when it is not a
    folder."""
    path = Path(path)
    if not path.is_dir():
        raise MmloomError(f"{what} {str(path)!r} is not a folder")
    return path


def has_tokenizer(directory: Path) -> bool:
    """Whether `directory` holds tokenizer files (tokenizer_config.json, tokenizer.json or the
    SentencePiece tokenizer.model)."""
    return any((directory / name).exists() for name in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"))


def load_tokenizer(directory: Path, required: bool = False):
    """The tokenizer of a model folder through mmloom's one loader
    (:func:`mmloom.processing.tokenizer.load_tokenizer`: SentencePiece Llama folders tokenize as
    the original code does); None without tokenizer files, or MmloomError when `required`."""
    from transformers.utils import logging as hf_logging

    from mmloom.processing.tokenizer import load_tokenizer as load

    if not has_tokenizer(directory):
        if required:
            raise MmloomError(f"no tokenizer files (tokenizer_config.json / tokenizer.json) in {directory}")
        return None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a LLaVA config.json (model_type llava_llama) is unknown to AutoConfig
    try:
        return load(directory, what=f"tokenizer of {directory}")
    finally:
        hf_logging.set_verbosity(verbosity)


def load_image_processor(directory: Path):
    """The image processor saved in `directory`, or None."""
    from transformers import AutoImageProcessor

    if not any((directory / name).exists() for name in ("preprocessor_config.json", "processor_config.json")):
        return None
    refuse_remote_code(directory, "image processor folder")
    try:
        return AutoImageProcessor.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError, KeyError):
        return None


def default_image_processor(vision_config):
    """A processor sized from a vision config: CLIP preprocessing (SigLIP's for SigLIP towers)."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    size = vision_config.image_size if isinstance(vision_config.image_size, int) else vision_config.image_size[0]
    if "siglip" in getattr(vision_config, "model_type", ""):
        return SiglipImageProcessor(size={"height": size, "width": size})
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def export_folder(dst: str | Path, model: nn.Module, command: str = "convert"):
    """The folder a `convert` (or `merge-lora`) writer fills (:func:`mmloom.outputs.new_folder`): a
    temporary sibling of `dst`, its weight files verified, marked as `mmloom COMMAND` output and
    swapped into place; a full disk is one line naming `dst` and the bytes the export needs. The
    destination itself was claimed first (:func:`mmloom.interop.formats.convert`, :func:`merge_lora`)."""
    from mmloom.model.serialization import verify_weight_files, weight_bytes

    return new_folder(dst, command, needed=weight_bytes(model) + 2**20, verify=verify_weight_files)


def cast_in_place(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Cast every parameter and buffer of `model` to `dtype` in place (None: leave it as it is)."""
    if dtype is not None:
        model.to(dtype)


# ----------------------------------------------------------------------------- checks for export
@dataclass
class VisionParts:
    """The pieces of a single-vision-encoder composite, validated for export."""

    tower: nn.Module
    layer: int | list[int]
    drops_cls: bool
    projection: nn.Sequential
    projector_type: str
    activation: str
    depth: int
    bias: bool
    language_model: nn.Module
    placeholder_id: int


def vision_parts(model: MultimodalModel, fmt: str) -> VisionParts:
    """Check that `model` is one vision encoder (feature selection only) + projector + causal LM.
    Raises MmloomError naming format `fmt` when the model has other encoders than 'vision', a video route
    (`media`), a callback other than FeatureSelect, features that are not a hidden layer of the tower, a
    custom projector, or no vision placeholder id."""
    from mmloom.model.projector import parse_projector_type

    if model.encoder_names != ["vision"]:
        raise MmloomError(
            f"format {fmt!r} holds exactly one encoder named 'vision'; this model has encoders "
            f"{model.encoder_names} (audio or other encoders cannot be represented); keep such composites in "
            "the mmloom format (--to mmloom), which mmloom chat/generate and MultimodalModel.from_pretrained read"
        )
    if model.media_encoders:
        names = ", ".join(model.media_encoders)
        raise MmloomError(
            f"format {fmt!r} cannot represent this model's {names} input (frames through the vision encoder, pooled "
            "per frame by FramePool); keep it in the mmloom format (--to mmloom), which mmloom chat/generate and "
            "MultimodalModel.from_pretrained read")
    encoder = model.vision_encoder
    tower = base_module(encoder.module)
    for slot in CALLBACK_SLOTS:
        callback = getattr(encoder, slot)
        if callback is None or (slot == "postprocess_module_callback" and isinstance(callback, FeatureSelect)):
            continue
        raise MmloomError(
            f"format {fmt!r} cannot represent the vision encoder's {slot} {callback!r}: only a FeatureSelect "
            "feature-layer selection is supported"
        )
    select = encoder.postprocess_module_callback
    if select is None:
        if getattr(tower.config, "model_type", "") != "clip_vision_model":
            raise MmloomError(
                f"format {fmt!r} needs the vision features to be a hidden layer of the tower; add "
                "FeatureSelect(layer, strategy) to the vision encoder"
            )
        layer, drops_cls = -1, False  # CLIP's last_hidden_state is the last layer's output, with CLS
    else:
        layer, drops_cls = select.layer, select.drops_cls
    cfg = encoder.projector.config
    if cfg.projector_type == "custom":
        raise MmloomError(f"format {fmt!r} cannot represent a custom projector module (only linear / mlpNx_act)")
    depth, activation = parse_projector_type(cfg.projector_type, cfg.activation)
    if "vision" not in model.placeholder_token_ids:
        raise MmloomError("the model has no placeholder token id for 'vision'")
    return VisionParts(
        tower=tower,
        layer=layer,
        drops_cls=drops_cls,
        projection=encoder.projector.projection,
        projector_type=cfg.projector_type,
        activation=activation,
        depth=depth,
        bias=bool(cfg.bias),
        language_model=base_module(model.language_model),
        placeholder_id=int(model.placeholder_token_ids["vision"]),
    )


# ---------------------------------------------------------------------------------- mmloom folder
def read_mmloom(src: str | Path, dtype: str | None = None, base: str | Path | None = None, **_: Any) -> Bundle:
    """An mmloom folder: the composite, plus its processor (or bare tokenizer / image processor).

    A training checkpoint works too: a trainable-only one loads on `base`, else on the starting model
    its run config describes (:func:`mmloom.training.model_loading.load_model`)."""
    from mmloom.processing.processor import PROCESSOR_CONFIG, MultimodalProcessor
    from mmloom.training.model_loading import load_model
    from mmloom.training.run_folder import resolve_model_folder

    src = resolve_model_folder(check_dir(src, "mmloom model folder"))
    model = load_model(src, base=base, dtype=torch_dtype(dtype))
    if (src / PROCESSOR_CONFIG).exists():
        processor = MultimodalProcessor.from_pretrained(src)
        return Bundle(
            model,
            processor.tokenizer,
            dict(processor.encoder_processors),
            processor.template.name,
            dict(processor.template_options),
            source=src,
        )
    processors = {}
    for name in model.encoder_names:
        found = load_image_processor(src / f"{name}_processor") if (src / f"{name}_processor").is_dir() else None
        if found is None and name == "vision":
            found = load_image_processor(src)
        if found is not None:
            processors[name] = found
    return Bundle(model, load_tokenizer(src), processors, source=src)


def save_processor(bundle: Bundle, directory: Path) -> None:
    """Write the MultimodalProcessor (tokenizer, processors, template) next to the model."""
    from mmloom.processing.processor import MultimodalProcessor

    if bundle.tokenizer is None:
        warnings.warn("no tokenizer to save with the model: add one before training or inference", stacklevel=2)
        return
    missing = [name for name in bundle.model.encoder_names if name not in bundle.encoder_processors]
    if missing:
        warnings.warn(
            f"no processor for encoder(s) {missing}: only the tokenizer is saved (no mmloom_processor.json)",
            stacklevel=2,
        )
        save_tokenizer(bundle.tokenizer, directory, search=[bundle.source] if bundle.source else ())
        return
    processor = MultimodalProcessor.from_model(
        bundle.model,
        bundle.tokenizer,
        bundle.encoder_processors,
        template=bundle.template,
        template_options=bundle.template_options,
    )
    processor.save_pretrained(directory)


def write_mmloom(bundle: Bundle, dst: str | Path, dtype: str | None = None, **_: Any) -> None:
    """Write `bundle` as an mmloom model folder at `dst` (atomically): config.json + safetensors
    weights (cast to `dtype` first, in place, when given) and its processor (:func:`save_processor`).
    Raises MmloomError for an unknown `dtype`."""
    cast_in_place(bundle.model, torch_dtype(dtype))
    with export_folder(dst, bundle.model) as tmp:
        bundle.model.save_pretrained(tmp)
        save_processor(bundle, tmp)


def merge_lora(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False):
    """`mmloom merge-lora`: load the model (a model folder, a checkpoint, or a run folder: its
    final_model, else its latest checkpoint), merge the adapters of every adapted part
    (:func:`mmloom.model.adapters.merge_adapters`) and save a plain mmloom model folder to `out_dir`
    (with the processor files when the source has them). Returns (model, what was merged).

    `out_dir` is claimed first (:func:`mmloom.outputs.check_destination`): new, an empty folder, or with
    `overwrite` an earlier `mmloom merge-lora` output, never inside `model_dir` or holding it. The model
    and its processor are written into a temporary sibling, verified and renamed into place together
    (:func:`export_folder`). Raises MmloomError for a refused destination, a model without adapters, or
    a full disk (naming `out_dir` and the bytes needed)."""
    from mmloom.model.adapters import adapted_parts, merge_adapters
    from mmloom.outputs import check_destination
    from mmloom.processing.processor import PROCESSOR_CONFIG, MultimodalProcessor
    from mmloom.training.model_loading import load_model
    from mmloom.training.run_folder import resolve_model_folder

    check_destination(out_dir, "merge-lora", overwrite=overwrite, sources=[model_dir])
    folder = resolve_model_folder(model_dir)
    model = load_model(folder)  # a trainable-only checkpoint: on the base its run config describes
    if not adapted_parts(model):
        raise MmloomError(f"{folder}: no part of the model has LoRA adapters to merge")
    merged = merge_adapters(model)
    with export_folder(out_dir, model, command="merge-lora") as tmp:
        model.save_pretrained(tmp)
        if (folder / PROCESSOR_CONFIG).exists():
            MultimodalProcessor.from_pretrained(folder).save_pretrained(tmp)
    return model, merged


def load_weight_files(directory: Path) -> dict[str, torch.Tensor]:
    """All weights of a HF-style folder: safetensors or PyTorch .bin, single or sharded.
    Raises MmloomError when the folder holds none of them."""
    from safetensors.torch import load_file

    files, loader = [], ""
    for index_name, kind in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "pt")):
        if (directory / index_name).exists():
            files, loader = sorted(set(read_json(directory / index_name)["weight_map"].values())), kind
            break
    if not files:
        if (directory / "model.safetensors").exists():
            files, loader = ["model.safetensors"], "st"
        elif (directory / "pytorch_model.bin").exists():
            files, loader = ["pytorch_model.bin"], "pt"
        else:
            raise MmloomError(f"no model.safetensors or pytorch_model.bin (or their index) in {directory}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = str(directory / name)
        state.update(load_file(path) if loader == "st" else torch.load(path, map_location="cpu", weights_only=True))
    return state
