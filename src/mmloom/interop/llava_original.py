"""The original LLaVA layout (`LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM` of haotian-liu/LLaVA,
PyPI ``llava-torch``), as the Cerebras pair of folders, written for the transformers 4.x that code pins.

    DST/image_model/            CLIP vision tower for transformers 4.x ``CLIPVisionModel.from_pretrained``:
                                config.json, model.safetensors (``vision_model.*`` names),
                                preprocessor_config.json (``CLIPImageProcessor``)
    DST/text_model_llava/       the LLM + projector (``LlavaLlamaForCausalLM``; for a Mistral LLM the
                                folder is ``text_model_llava_mistral``: the original builder picks
                                ``LlavaMistralForCausalLM`` only when the folder name holds "mistral"):
        model.safetensors       LLM weights (``model.*``, ``lm_head.weight`` unless tied) and the projector:
                                ``model.mm_projector.weight/bias`` (``linear``, one ``nn.Linear``) or
                                ``model.mm_projector.{0,2,...}.*`` (``mlpNx_gelu``, a Sequential)
        config.json             the LLM config in the 4.x form (top-level ``rope_theta`` / ``rope_scaling``,
                                ``torch_dtype``) + ``mm_*`` keys: ``mm_vision_tower`` (see below),
                                ``mm_projector_type``, ``mm_hidden_size``, ``mm_vision_select_layer``,
                                ``mm_vision_select_feature``, ``image_aspect_ratio`` (``pad`` when the model's
                                image processor pads to a square, else ``square``), ...
        config_lmsys.json       the LLM's own config, 4.x form (Cerebras)
        tokenizer files         as Vicuna / LLaVA-1.5 ship them: ``tokenizer.model`` (SentencePiece
                                tokenizers), ``tokenizer_config.json`` with ``legacy`` / ``add_bos_token``,
                                ``special_tokens_map.json``; the pad token is ``<unk>`` when the tokenizer has
                                none (LLaVA's training script sets it so). The builder opens Llama tokenizers
                                with ``use_fast=False`` (``tokenizer.model``) and Mistral ones fast: for those a
                                ``tokenizer.json`` in the form tokenizers 0.15 reads is added (without it,
                                transformers 4.37 converts tokenizer.model ignoring ``legacy: false``)
        generation_config.json

``mm_vision_tower`` is the absolute path of DST/image_model unless ``--mm-vision-tower PATH`` is given;
the original code resolves a relative path against its working directory (e.g. ``image_model`` when
it runs in DST). mmloom's reader also tries it relative to the text folder and its parent, then the
sibling ``image_model/``, so a moved pair of folders still imports.

The original loader only recognises a LLaVA model when its folder path contains "llava".
Also: a phase-1 ``mm_projector.bin`` imported into an existing mmloom model (``llava-projector``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmloom.errors import MmloomError
from mmloom.files import read_json, write_json
from mmloom.interop.common import (
    Bundle,
    cast_in_place,
    check_dir,
    default_image_processor,
    export_folder,
    hf_dtype,
    load_image_processor,
    load_tokenizer,
    load_weight_files,
    read_mmloom,
    torch_dtype,
    vision_parts,
)
from mmloom.interop.hf4 import (
    check_head_dim,
    hf4_config_dict,
    save_hf4_vision_tower,
    weights_dtype,
)
from mmloom.interop.image_processors import hf_image_processor, transform_from_hf
from mmloom.interop.tokens import ensure_pad_token, prepare_tokenizer_and_vocab, resize_to_cover
from mmloom.model.adapters import merge_adapters
from mmloom.model.callbacks import FeatureSelect
from mmloom.model.encoder import ModalEncoderModule
from mmloom.model.multimodal import MultimodalModel
from mmloom.model.projector import MultimodalProjector, MultimodalProjectorConfig, parse_projector_type
from mmloom.model.serialization import dedupe_shared_tensors, save_state_dict
from mmloom.processing.tokenizer_files import hf4_tokenizer_class, save_hf4_tokenizer, sentencepiece_file

FORMAT = "llava"
IMAGE_FOLDER = "image_model"
TEXT_FOLDER = "text_model_llava"
PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower."
# LLM model_type -> (LLaVA model_type, LLaVA architecture, word the folder name must hold, default folder)
LLAVA_FAMILIES = {
    "llama": ("llava_llama", "LlavaLlamaForCausalLM", None, TEXT_FOLDER),
    "mistral": ("llava_mistral", "LlavaMistralForCausalLM", "mistral", "text_model_llava_mistral"),
}
# mmloom template -> the original code's --conv-mode that prompts the same way (conversation.py's
# conv_templates); other templates (chatml, llama3, zephyr, mistral, tokenizer) have no equal there.
CONV_MODES = {"vicuna_v1": "llava_v1", "llama2": "llava_llama_2", "plain": "plain"}
TEMPLATE_KEY = "mmloom_template"  # config.json: the template the model was trained with (read back on import)
# words in the folder name that make the original builder pick another class than LlavaLlamaForCausalLM
OTHER_BUILDER_WORDS = ("mistral", "mpt")
LLAVA_KEYS = {
    "mm_vision_tower", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer",
    "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token", "image_aspect_ratio",
    "mm_patch_merge_type", "tokenizer_model_max_length", "tokenizer_padding_side", "freeze_mm_mlp_adapter",
    "tune_mm_mlp_adapter", "use_mm_proj", "mm_projector_lr", "unfreeze_mm_vision_tower", "image_grid_pinpoints",
    "mm_vision_tower_lr", "image_crop_resolution", "image_split_resolution",
}


# ------------------------------------------------------------------------------ projector weights
def projector_to_llava(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """mmloom's projection (a Sequential: ``0.*``, ``2.*``...) under the original module's names:
    ``nn.Linear`` keys ``weight`` / ``bias`` for a linear projector, the Sequential's otherwise."""
    if depth == 1:
        return {k.removeprefix("0."): v for k, v in state.items()}
    return dict(state)


def projector_from_llava(state: dict[str, torch.Tensor], depth: int, source: str) -> dict[str, torch.Tensor]:
    """The original projector weights (keys without the ``model.mm_projector.`` prefix) under mmloom's
    Sequential names; raises MmloomError naming `source` when they are not a `depth`-layer projector."""
    if depth == 1 and set(state) <= {"weight", "bias"}:
        state = {f"0.{k}": v for k, v in state.items()}
    renamed = {}
    for key, value in state.items():  # transformers' Llava names: linear_1 / linear_2
        head, _, tail = key.partition(".")
        index = int(head.removeprefix("linear_")) if head.startswith("linear_") and head[7:].isdigit() else None
        renamed[f"{2 * (index - 1)}.{tail}" if index else key] = value
    state = renamed
    want = {f"{2 * i}.{kind}" for i in range(depth) for kind in ("weight", "bias")}
    if not set(state) <= want or not any(k.endswith("weight") for k in state):
        kind = "linear" if depth == 1 else f"mlp{depth}x"
        raise MmloomError(
            f"{source}: projector weights {sorted(state)} are not a {kind} projector "
            f"(expected {'weight, bias' if depth == 1 else ', '.join(sorted(want))})"
        )
    return state


# --------------------------------------------------------------------------------------- writing
def text_folder_for(model_type: str, text_folder: str | None) -> str:
    """The LLM folder name: it must hold "llava" (the original loader) and its family's word.
    Raises MmloomError when `name` lacks either word or holds another family's word."""
    family = LLAVA_FAMILIES[model_type]
    name = text_folder or family[3]
    lowered = name.lower()
    if "llava" not in lowered:
        raise MmloomError(f"the text folder name must contain 'llava' (the original loader checks it): {name!r}")
    if family[2] is not None and family[2] not in lowered:
        raise MmloomError(
            f"the text folder of a {model_type} model must contain {family[2]!r}: the original builder picks "
            f"{family[1]} only then (got {name!r})"
        )
    wrong = [w for w in OTHER_BUILDER_WORDS if w in lowered and w != family[2]]
    if wrong:
        raise MmloomError(
            f"the text folder name {name!r} contains {wrong[0]!r}: the original builder would load this "
            f"{model_type} model with another class"
        )
    return name


def write_llava(
    bundle: Bundle,
    dst: str | Path,
    dtype: str | None = None,
    mm_vision_tower: str | None = None,
    text_folder: str | None = None,
    **_: Any,
) -> None:
    """Write DST/image_model + DST/text_model_llava (see the module docstring) for the original code.
    Raises MmloomError when the model does not fit the original code: not a Llama-family LLM, not a CLIP
    tower, several feature layers, a projector other than linear / mlpNx_gelu with bias, or an image
    processor whose crop differs from the tower's image size; and what the original code cannot load or
    prompt (:func:`check_servable`)."""
    model = bundle.model
    parts = vision_parts(model, FORMAT)
    llm, tower = parts.language_model, parts.tower
    model_type = getattr(llm.config, "model_type", None)
    if model_type not in LLAVA_FAMILIES:
        raise MmloomError(
            f"format {FORMAT!r} (original LLaVA) supports Llama-family language models "
            f"({', '.join(LLAVA_FAMILIES)}); this model's is {model_type!r}"
        )
    family = LLAVA_FAMILIES[model_type]
    if getattr(tower.config, "model_type", "") != "clip_vision_model":
        raise MmloomError(
            f"format {FORMAT!r} loads its vision tower with CLIPVisionModel; this model's tower is "
            f"{tower.config.model_type!r}"
        )
    if not isinstance(parts.layer, int):
        raise MmloomError(f"format {FORMAT!r} selects one vision layer; this model concatenates {parts.layer}")
    if (parts.activation != "gelu" and parts.depth > 1) or not parts.bias:
        raise MmloomError(
            f"format {FORMAT!r} supports 'linear' and 'mlp{{N}}x_gelu' projectors with bias; this model's is "
            f"{parts.projector_type!r} (activation {parts.activation}, bias {parts.bias})"
        )
    folder_name = text_folder_for(model_type, text_folder)
    check_head_dim(llm.config, f"format {FORMAT!r}")
    conv_mode = check_servable(bundle, model_type)
    merged = merge_adapters(model)  # every check passed: fold the adapters in, then read the plain parts
    parts = vision_parts(model, FORMAT)
    llm, tower = parts.language_model, parts.tower
    image_processor, pads = hf_image_processor(
        bundle.encoder_processors.get("vision") or default_image_processor(tower.config), "CLIPImageProcessor"
    )
    crop = (image_processor.crop_size or {}).get("height") if image_processor.do_center_crop else None
    if crop is not None and crop != tower.config.image_size:
        raise MmloomError(
            f"the image processor crops to {crop} px but the vision tower takes {tower.config.image_size} px"
        )
    cast_in_place(model, torch_dtype(dtype))
    projector_type = "linear" if parts.depth == 1 else f"mlp{parts.depth}x_gelu"
    dst = Path(dst)
    vision_path = mm_vision_tower or str((dst / IMAGE_FOLDER).resolve())
    tokenizer = bundle.tokenizer
    if tokenizer is not None and ensure_pad_token(tokenizer):  # <unk> as LLaVA sets it, else a new <pad>
        resize_to_cover(llm, len(tokenizer))

    state, _ = dedupe_shared_tensors(llm.state_dict())
    if getattr(llm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    projection = {k: v.detach().contiguous() for k, v in parts.projection.state_dict().items()}
    for name, tensor in projector_to_llava(projection, parts.depth).items():
        state[PROJECTOR_PREFIX + name] = tensor
    notes: list[str] = []
    llm_config = hf4_config_dict(llm.config, notes)
    llm_config["architectures"] = [type(llm).__name__]
    llm_config["torch_dtype"] = llm_config["dtype"] = weights_dtype(llm)
    config = dict(llm_config)
    max_length = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    config.update(
        architectures=[family[1]],
        model_type=family[0],
        mm_vision_tower=vision_path,
        mm_projector_type=projector_type,
        mm_hidden_size=parts.projection[0].in_features,
        mm_vision_select_layer=parts.layer,
        mm_vision_select_feature="patch" if parts.drops_cls else "cls_patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad" if pads else "square",
        mm_patch_merge_type="flat",
        tokenizer_model_max_length=max_length if max_length and max_length < 10**9 else 2048,
        tokenizer_padding_side="right",
        use_mm_proj=True,
        freeze_mm_mlp_adapter=False,
        tune_mm_mlp_adapter=False,
    )
    config[TEMPLATE_KEY] = {"name": bundle.template, "options": dict(bundle.template_options), "conv_mode": conv_mode}
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        config["pad_token_id"] = llm_config["pad_token_id"] = tokenizer.pad_token_id
    with export_folder(dst, model) as tmp:
        save_hf4_vision_tower(tower, tmp / IMAGE_FOLDER, notes)
        image_processor.save_pretrained(tmp / IMAGE_FOLDER)
        text = tmp / folder_name
        text.mkdir()
        save_state_dict(state, text)
        write_json(text / "config.json", config, sort_keys=True)
        write_json(text / "config_lmsys.json", llm_config, sort_keys=True)
        if getattr(llm, "generation_config", None) is not None:
            llm.generation_config.save_pretrained(text)
        # the original builder opens Llama tokenizers slow (tokenizer.model), Mistral ones fast (tokenizer.json)
        save_hf4_tokenizer(tokenizer, text, search=[bundle.source] if bundle.source else (),
                           json_form="tokenizers-0.15", json_always=model_type == "mistral")
    bundle.notes += notes + [f"image_aspect_ratio {config['image_aspect_ratio']}; mm_vision_tower {vision_path}",
                             f"prompt it with the original code's --conv-mode {conv_mode} (template {bundle.template})"]
    if merged:
        bundle.notes.append(f"merged LoRA adapters of: {', '.join(merged)}")


def check_servable(bundle: Bundle, model_type: str) -> str:
    """The original code's --conv-mode for the bundle's template; raises MmloomError (one line, before
    anything is written) for what the original code cannot load or prompt: no tokenizer, a slow Llama
    tokenizer class without its SentencePiece ``tokenizer.model`` (the builder opens Llama tokenizers with
    ``use_fast=False``; a ``PreTrainedTokenizerFast`` folder loads from ``tokenizer.json``), or a template (or
    a changed default system text) that none of its conversation templates reproduces."""
    if bundle.tokenizer is None:
        raise MmloomError(f"format {FORMAT!r}: the model has no tokenizer, and the original loader needs one in "
                          "the text folder; save the processor with the model and convert again")
    search = [bundle.source] if bundle.source else ()
    written = hf4_tokenizer_class(bundle.tokenizer)
    if model_type == "llama" and not written.endswith("Fast") and sentencepiece_file(bundle.tokenizer, search) is None:
        raise MmloomError(
            f"format {FORMAT!r}: the tokenizer ({written}) has no SentencePiece tokenizer.model, and the original "
            "builder opens Llama tokenizers with use_fast=False, which needs it for that class; export with --to "
            "hf-llava (transformers) or keep the model in mmloom's format")
    conv_mode = CONV_MODES.get(bundle.template)
    if conv_mode is None or "system" in bundle.template_options:
        what = (f"template {bundle.template!r}" if conv_mode is None
                else f"template {bundle.template!r} with another default system text")
        raise MmloomError(
            f"format {FORMAT!r}: the original code has no conversation template for this model's {what} (it "
            f"prompts as {', '.join(f'{k} (--conv-mode {v})' for k, v in CONV_MODES.items())}); export with "
            "--to hf-llava, whose chat template reproduces it, or keep the model in mmloom's format")
    return conv_mode


def llava_template(config: dict, template: str | None, notes: list[str]) -> tuple[str, dict[str, Any]]:
    """(template, options) of an original-LLaVA folder: `template` when given, else the one an mmloom
    export records in config.json, else LLaVA-1.5's vicuna_v1 (--conv-mode llava_v1), said in `notes`."""
    if template is not None:
        return template, {}
    recorded = config.get(TEMPLATE_KEY)
    if isinstance(recorded, dict) and isinstance(recorded.get("name"), str):
        notes.append(f"template {recorded['name']}, as config.json records ({TEMPLATE_KEY})")
        return recorded["name"], dict(recorded.get("options") or {})
    notes.append("template vicuna_v1 (LLaVA-1.5's --conv-mode llava_v1): the folder records no template; give "
                 "--template NAME for another (llama2 for --conv-mode llava_llama_2)")
    return "vicuna_v1", {}


# --------------------------------------------------------------------------------------- reading
def _is_llava_config(folder: Path) -> bool:
    path = folder / "config.json"
    return path.exists() and any(key.startswith("mm_") for key in read_json(path))


def find_text_folder(src: Path) -> Path:
    """SRC is the LLaVA folder itself (config.json with mm_* keys) or a parent holding one.
    Raises MmloomError when neither holds one."""
    if _is_llava_config(src):
        return src
    candidates = sorted(p for p in src.iterdir() if p.is_dir() and "llava" in p.name and _is_llava_config(p))
    if len(candidates) != 1:
        raise MmloomError(
            f"{src} is not an original-LLaVA folder: expected config.json with mm_* keys, or one sub-folder "
            f"whose name contains 'llava' holding it (found {[p.name for p in candidates]})"
        )
    return candidates[0]


def resolve_vision_tower(config: dict, text: Path, image_model: str | Path | None) -> Path:
    """The folder of the vision tower of an original-LLaVA model whose text folder is `text`:
    `image_model` when given, else the config's ``mm_vision_tower`` (as given, or relative to the
    text folder or its parent), else the export's sibling ``image_model/``. Raises MmloomError when
    none of them holds a config.json (hub ids are not downloaded)."""
    if image_model is not None:
        return check_dir(image_model, "--image-model")
    given = config.get("mm_vision_tower") or config.get("vision_tower")
    candidates = []
    if given:
        candidates += [Path(given), text / given, text.parent / given]
    candidates.append(text.parent / IMAGE_FOLDER)
    for path in candidates:
        if (path / "config.json").exists():
            return path
    raise MmloomError(
        f"the vision tower {given!r} (mm_vision_tower) is not a local folder and there is no "
        f"{text.parent / IMAGE_FOLDER}; pass --image-model DIR (a CLIP folder)"
    )


def read_llava(
    src: str | Path,
    image_model: str | Path | None = None,
    dtype: str | None = None,
    pad_to_multiple_of: int | None = None,
    template: str | None = None,
    **_: Any,
) -> Bundle:
    """An original-LLaVA model folder (or a parent holding one) -> a composite, with a processor that
    reproduces the original preprocessing (``image_aspect_ratio: pad`` -> LLaVA's ``expand2square`` with
    the ``int(image_mean * 255)`` background, as an mmloom :class:`ImageTransform`).
    Raises MmloomError naming the folder for an unsupported model_type, image start/end or patch tokens,
    anyres (LLaVA-NeXT), an unknown feature selection or projector, missing projector weights, or weights
    that do not fit the language model."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from mmloom.model.hf_parts import load_vision_tower

    text = find_text_folder(check_dir(src, "llava folder"))
    config = read_json(text / "config.json")
    base_type = {v[0]: k for k, v in LLAVA_FAMILIES.items()}.get(config.get("model_type"))
    if base_type is None:
        raise MmloomError(
            f"{text}: model_type {config.get('model_type')!r} is not one of "
            f"{[v[0] for v in LLAVA_FAMILIES.values()]}"
        )
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise MmloomError(f"{text}: image start/end or patch tokens (mm_use_im_*) are not supported")
    if config.get("mm_patch_merge_type", "flat") != "flat" or "anyres" in str(config.get("image_aspect_ratio")):
        raise MmloomError(f"{text}: anyres / spatial patch merging (LLaVA-NeXT) is not supported by this format")
    strategy = config.get("mm_vision_select_feature", "patch")
    if strategy not in ("patch", "cls_patch"):
        raise MmloomError(f"{text}: unknown mm_vision_select_feature {strategy!r}")
    projector_type = config.get("mm_projector_type", "linear")
    if projector_type == "identity":
        raise MmloomError(f"{text}: the 'identity' projector (no weights) is not supported; mmloom projectors are "
                          "linear or mlpNx_act")
    try:
        depth, activation = parse_projector_type(projector_type, "gelu")
    except MmloomError as err:
        raise MmloomError(f"{text}: mm_projector_type: {err}") from None

    llm_config = {k: v for k, v in config.items()
                  if k not in LLAVA_KEYS and k != TEMPLATE_KEY and not k.startswith("mm_")}
    llm_config.update(model_type=base_type, architectures=[MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base_type]])
    hf_config = CONFIG_MAPPING[base_type].from_dict(llm_config)
    state = load_weight_files(text)
    projector_state = {k[len(PROJECTOR_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(PROJECTOR_PREFIX)}
    tower_keys = [k for k in state if k.startswith(TOWER_PREFIX)]
    notes = []
    for k in tower_keys:
        state.pop(k)
    if tower_keys:
        notes.append(f"ignored {len(tower_keys)} vision-tower weights stored with the LLM; the tower comes from "
                     "mm_vision_tower / --image-model")
    if not projector_state:
        raise MmloomError(f"{text}: no {PROJECTOR_PREFIX}* weights")
    projector_state = projector_from_llava(projector_state, depth, str(text))
    with no_init_weights():
        llm = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    tied = getattr(hf_config, "tie_word_embeddings", False)
    result = llm.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise MmloomError(
            f"{text}: the weights do not fit {type(llm).__name__}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if tied:
        llm.tie_weights()
    if (text / "generation_config.json").exists():
        from transformers import GenerationConfig

        llm.generation_config = GenerationConfig.from_pretrained(text)
    tower_path = resolve_vision_tower(config, text, image_model)
    tower = load_vision_tower(tower_path, hf_dtype(dtype)).eval()

    in_features = projector_state["0.weight"].shape[1]
    projector = MultimodalProjector(
        MultimodalProjectorConfig(in_features=in_features, out_features=hf_config.hidden_size,
                                  projector_type=projector_type, activation=activation,
                                  bias="0.bias" in projector_state)
    )
    _load_projection(projector, projector_state, str(text))
    tokenizer = load_tokenizer(text, required=True)
    ids = prepare_tokenizer_and_vocab(tokenizer, llm, ["<image>"], pad_to_multiple_of)
    encoder = ModalEncoderModule(
        tower,
        projector=projector,
        postprocess_module_callback=FeatureSelect(config.get("mm_vision_select_layer", -2), strategy),
    )
    model = MultimodalModel({"vision": encoder}, llm.eval(), placeholder_token_ids={"vision": ids["<image>"]})
    target = torch_dtype(dtype) or next(llm.parameters()).dtype
    model.to(target)
    image_processor = load_image_processor(tower_path) or default_image_processor(tower.config)
    aspect = config.get("image_aspect_ratio")
    if aspect == "pad":  # the original process_images: expand2square(int(image_mean * 255)), then the processor
        image_processor = transform_from_hf(image_processor, pad_to_square=True)
    notes.append(f"image_aspect_ratio {aspect!r}: {'pad to square, then ' if aspect == 'pad' else ''}"
                 f"{type(image_processor).__name__}")
    name, options = llava_template(config, template, notes)
    return Bundle(model.eval(), tokenizer, {"vision": image_processor}, name, options, notes=notes, source=text)


def _load_projection(projector: MultimodalProjector, state: dict[str, torch.Tensor], source: str) -> None:
    expected = projector.projection.state_dict()
    got_shapes = {k: tuple(v.shape) for k, v in state.items()}
    want_shapes = {k: tuple(v.shape) for k, v in expected.items()}
    if got_shapes != want_shapes:
        raise MmloomError(
            f"{source}: projector weights {got_shapes} do not fit the model's "
            f"{projector.config.projector_type} projector {want_shapes}"
        )
    dtype = next(iter(expected.values())).dtype
    projector.projection.load_state_dict({k: v.to(dtype) for k, v in state.items()})


# ------------------------------------------------------------------------ phase-1 projector import
def read_llava_projector(src: str | Path, base: str | Path | None = None, dtype: str | None = None,
                         **_: Any) -> Bundle:
    """An existing mmloom model (`base`) with its vision projector replaced by a phase-1 ``mm_projector.bin``
    (``model.mm_projector.*``: ``weight``/``bias`` for a linear projector, ``0.*``, ``2.*`` for mlp2x_gelu).
    Raises MmloomError when the file is missing or not a weights-only state dict with
    ``model.mm_projector.*`` keys, or `base` is missing or has no vision encoder with a standard projector."""
    from safetensors.torch import load_file

    src = Path(src)
    if not src.is_file():
        raise MmloomError(f"projector file {str(src)!r} not found")
    if base is None:
        raise MmloomError("llava-projector needs the mmloom model to import into: --base MODEL_DIR")
    try:
        if src.suffix == ".safetensors":
            raw = load_file(str(src))
        else:
            raw = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles with code, corrupt files
        raise MmloomError(f"cannot load {src} as a weights-only PyTorch / safetensors file: {err}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise MmloomError(f"{src} does not hold a state dict of tensors")
    state = {}
    for key, tensor in raw.items():
        for prefix in (PROJECTOR_PREFIX, "mm_projector.", "model.multi_modal_projector."):
            if key.startswith(prefix):
                state[key[len(prefix):]] = tensor
                break
    if not state:
        raise MmloomError(f"{src}: no {PROJECTOR_PREFIX}* keys (found {sorted(raw)[:5]})")
    bundle = read_mmloom(base, dtype=dtype)
    if "vision" not in bundle.model.encoder_names:
        raise MmloomError(f"{base} has no vision encoder to take the projector")
    projector = bundle.model.vision_encoder.projector
    if projector.config.projector_type == "custom":
        raise MmloomError(f"{base}: the vision projector is a custom module; cannot import LLaVA projector weights")
    depth, _ = parse_projector_type(projector.config.projector_type, projector.config.activation)
    _load_projection(projector, projector_from_llava(state, depth, str(src)), str(src))
    bundle.notes.append(f"vision projector weights from {src} ({len(state)} tensors)")
    return bundle
