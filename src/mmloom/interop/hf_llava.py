"""transformers' `LlavaForConditionalGeneration` folders (llava-hf layout), both directions.

Mapping: FeatureSelect(layer, patch|cls_patch) <-> `vision_feature_layer` /
`vision_feature_select_strategy` (default|full); the vision placeholder id <-> `image_token_index`;
an `mlp2x_{act}` projector <-> `multi_modal_projector.linear_1/linear_2` + `projector_hidden_act`;
`image_seq_length` = feature tokens per image.

The folder is written in the layout of the llava-hf releases, which transformers 4.x (from 4.46, e.g.
the 4.4x releases serving and evaluation tools pin) and 5.x both load:

* weights under the 4.x names: ``language_model.model.*``, ``language_model.lm_head.weight``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.*`` (transformers 5 maps them on load);
* config.json with both RoPE forms and ``torch_dtype`` (:mod:`mmloom.interop.hf4`);
* the processor as separate files: ``preprocessor_config.json`` (the image processor: mmloom's
  ``ImageTransform`` becomes an equivalent ``CLIPImageProcessor`` / ``LlavaImageProcessor(do_pad=True)``),
  ``processor_config.json``, ``chat_template.json`` and the tokenizer in the 4.x form;
* a ``<pad>`` token when the tokenizer has none (``LlavaProcessor(padding=True)`` needs one), embeddings
  resized to cover it and padded to a multiple of 64 (or ``--pad-to-multiple-of``), as the official
  llava-hf conversion did.

The chat template (``chat_template.json``) is the model's mmloom template in HF's chat form
(:mod:`mmloom.interop.chat_templates`: every template, ``tokenizer`` included), with the text after each
image chosen so that ``LlavaProcessor`` gives the ids mmloom's own processor gives (for SentencePiece
tokenizers the ``▁`` that LLaVA's ``tokenizer_image_token`` puts after the image span comes from a space
before the newline); the writer checks this on probe conversations and says so in its notes when no
template text reproduces the ids. Reading an export back takes the template recorded in it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from mmloom.errors import MmloomError
from mmloom.files import read_json, write_json
from mmloom.interop.chat_templates import hf_chat_template, mmloom_template_of
from mmloom.interop.common import (
    Bundle,
    cast_in_place,
    check_dir,
    default_image_processor,
    export_folder,
    hf_dtype,
    load_image_processor,
    load_tokenizer,
    torch_dtype,
    vision_parts,
)
from mmloom.interop.hf4 import hf4_config_dict, hf4_vision_state, weights_dtype
from mmloom.interop.image_processors import hf_image_processor
from mmloom.interop.tokens import ensure_special_token, resize_to_cover, token_id
from mmloom.model.adapters import merge_adapters
from mmloom.model.callbacks import FeatureSelect
from mmloom.model.encoder import ModalEncoderModule
from mmloom.model.feature_count import has_cls_token
from mmloom.model.multimodal import MultimodalModel
from mmloom.model.projector import MultimodalProjector, MultimodalProjectorConfig
from mmloom.model.serialization import dedupe_shared_tensors, save_state_dict
from mmloom.processing.tokenizer_files import save_hf4_tokenizer
from mmloom.remote_code import refuse_remote_code

FORMAT = "hf-llava"
PAD_MULTIPLE = 64  # the official llava-hf conversion padded the vocabulary to a multiple of 64
IMAGE_TEXTS = ("<image>\n", "<image> \n")  # what follows an image part in the chat template


def _check_same_class(module, config, what: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    expected = MODEL_MAPPING_NAMES.get(config.model_type)
    if expected != type(module).__name__:
        raise MmloomError(
            f"format {FORMAT!r} rebuilds the {what} with AutoModel ({expected or 'no class'} for model type "
            f"{config.model_type!r}), which is not this model's {type(module).__name__}"
        )


# --------------------------------------------------------------------------------------- writing
def ensure_image_token(tokenizer, placeholder_id: int, source=None) -> str | None:
    """Make `tokenizer` give `<image>` the model's vision placeholder id, as `mmloom data build` does
    for a stock tokenizer that lacks it (added in memory as a special token, id = its length); the
    note to report, or None when nothing was added.

    Raises MmloomError, before anything is written, when there is no tokenizer (an hf-llava folder
    without its LlavaProcessor is of no use to transformers' pipelines) or when adding `<image>`
    cannot give `placeholder_id`.
    """
    if tokenizer is None:
        where = f"{source} has" if source else "the model has"
        raise MmloomError(
            f"{where} no tokenizer: an hf-llava export needs one for its LlavaProcessor; save the processor "
            "with the model (MultimodalProcessor.save_pretrained; `mmloom train` does when the data's tokenizer "
            "is known) and convert again"
        )
    existing = token_id(tokenizer, "<image>")
    if existing is not None or placeholder_id != len(tokenizer):
        return None  # present (a differing id is refused with both ids when the processor is written)
    added, _ = ensure_special_token(tokenizer, "<image>")
    if added != placeholder_id:
        raise MmloomError(f"adding <image> to the tokenizer gives id {added}, not the model's vision placeholder "
                          f"id {placeholder_id}")
    return f"added <image> (id {added}) to the tokenizer, which lacked it (as `mmloom data build` does)"


def add_pad_token(tokenizer, language_model, pad_to_multiple_of: int | None) -> str | None:
    """Give a tokenizer without a pad token a new ``<pad>`` (as the llava-hf conversion did) and grow the
    embeddings to cover it, rounded up to `pad_to_multiple_of` (default 64). Returns a note, or None."""
    if tokenizer is None or tokenizer.pad_token is not None:
        return None
    pad_id, _ = ensure_special_token(tokenizer, "<pad>")
    tokenizer.pad_token = "<pad>"
    _, rows = resize_to_cover(language_model, len(tokenizer), pad_to_multiple_of or PAD_MULTIPLE)
    return f"added <pad> (id {pad_id}) to the tokenizer, which had no pad token; vocabulary {rows} rows"


def hf4_llava_state(parts, llm, base_llm) -> dict[str, torch.Tensor]:
    """The Llava weights under the llava-hf (transformers 4.x) names."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in hf4_vision_state(parts.tower).items():
        state[f"vision_tower.{name}"] = tensor
    for index, layer in (("1", parts.projection[0]), ("2", parts.projection[2])):
        for name, tensor in layer.state_dict().items():
            state[f"multi_modal_projector.linear_{index}.{name}"] = tensor.detach().contiguous()
    llm_state = {f"language_model.model.{k}": v for k, v in base_llm.state_dict().items()}
    if not getattr(llm.config, "tie_word_embeddings", False):
        llm_state["language_model.lm_head.weight"] = llm.lm_head.weight
    llm_state, _ = dedupe_shared_tensors(llm_state)
    state.update(llm_state)
    return state


PROBES = (  # (messages in HF's chat form, the same turns as mmloom messages); generation prompt on
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}],
     [{"role": "user", "content": "<image>\nWhat is shown here?"}]),
    ([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
      {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}],
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is shown here?"},
      {"role": "assistant", "content": "A red square."}, {"role": "user", "content": "And its colour?"}]),
)


def _mmloom_prompt_ids(bundle: Bundle, image_processor, messages: list[dict]) -> list[int] | None:
    """mmloom's processor ids of `messages` (one image, one slot), generation prompt on."""
    from mmloom.processing.processor import MultimodalProcessor

    try:
        processor = MultimodalProcessor.from_model(
            bundle.model, bundle.tokenizer, {"vision": image_processor}, template=bundle.template,
            template_options=bundle.template_options)
        ids, _ = processor.encode_messages(messages, {"vision": [1]}, add_generation_prompt=True)
        return ids
    except MmloomError:
        return None


def hf_prompt_ids(tokenizer, chat_template: str, messages: list[dict]) -> list[int]:
    """The ids transformers' processor gives for `messages` with `chat_template` (generation prompt on,
    one `<image>` token per image): the rendered text tokenized, with the tokenizer's special tokens
    unless the text starts with its BOS (as `ProcessorMixin.apply_chat_template` does)."""
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])


def _same_ids(bundle: Bundle, image_processor, template: str) -> bool:
    """Whether `template` gives mmloom's processor ids on every probe that mmloom's processor can encode
    (a probe it refuses, e.g. a second question without an image for `plain`, is left out)."""
    checked = 0
    for hf, ours in PROBES:
        want = _mmloom_prompt_ids(bundle, image_processor, ours)
        if want is None:  # a conversation the template cannot hold (plain: one image per question)
            continue
        try:
            got = hf_prompt_ids(bundle.tokenizer, template, hf)
        except Exception:  # jinja errors, raise_exception() in a tokenizer's own template
            got = None
        if got != want:
            return False
        checked += got is not None
    return checked > 0


def chat_template_for(bundle: Bundle, image_processor, notes: list[str]) -> str | None:
    """The chat template of the model's mmloom template (:func:`mmloom.interop.chat_templates.hf_chat_template`)
    whose text after an image makes transformers' tokenization equal mmloom's processor ids, checked on
    probe conversations (one turn with an image; a system text, an answer and a second question); None
    without a tokenizer. When no image text reproduces the ids the first one is written and a note says so."""
    if bundle.tokenizer is None:
        return None
    candidates = []
    for image_text in IMAGE_TEXTS:
        try:
            candidates.append(hf_chat_template(bundle.template, bundle.tokenizer, image_text, bundle.template_options))
        except MmloomError as err:
            notes.append(f"no chat template written: {err}")
            return None
    for template in candidates:
        if _same_ids(bundle, image_processor, template):
            return template
    notes.append(f"no chat template text reproduces mmloom's token ids for template {bundle.template!r} with this "
                 "tokenizer; the exported template writes '<image>\\n' before each question")
    return candidates[0]


def write_hf_llava(
    bundle: Bundle, dst: str | Path, dtype: str | None = None, pad_to_multiple_of: int | None = None, **_: Any
) -> None:
    """Write a folder that `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor` load in
    transformers 4.x (>= 4.46) and 5.x (see the module docstring).
    Raises MmloomError when the model does not fit the format: not one vision encoder
    (:func:`~mmloom.interop.common.vision_parts`), a projector other than mlp2x_{act}, a language model
    without `lm_head`, or a tokenizer whose <image> id differs from the model's."""
    from transformers import LlavaConfig

    model = bundle.model
    merged = merge_adapters(model)
    parts = vision_parts(model, FORMAT)
    if parts.depth != 2:
        raise MmloomError(
            f"format {FORMAT!r} holds a 2-layer MLP projector (mlp2x_{{act}}); this model's projector is "
            f"{parts.projector_type!r}"
        )
    llm = parts.language_model
    if not hasattr(llm, "lm_head") or not hasattr(llm, llm.base_model_prefix):
        raise MmloomError(f"format {FORMAT!r} needs a causal LM with `lm_head`; got {type(llm).__name__}")
    base_llm = getattr(llm, llm.base_model_prefix)
    _check_same_class(parts.tower, parts.tower.config, "vision tower")
    _check_same_class(base_llm, llm.config, "language model")
    image_processor, _ = hf_image_processor(
        bundle.encoder_processors.get("vision") or default_image_processor(parts.tower.config))
    cast_in_place(model, torch_dtype(dtype))
    tokenizer = bundle.tokenizer
    notes: list[str] = []
    image_note = ensure_image_token(tokenizer, parts.placeholder_id, bundle.source)
    if image_note:
        notes.append(image_note)
    note = add_pad_token(tokenizer, llm, pad_to_multiple_of)
    if note:
        notes.append(note)
    # transformers looks every id up in the embeddings: the image token and the whole tokenizer must fit.
    resize_to_cover(llm, max(parts.placeholder_id + 1, len(tokenizer) if tokenizer is not None else 0),
                    pad_to_multiple_of)

    config = LlavaConfig(
        vision_config=parts.tower.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=parts.placeholder_id,
        image_seq_length=model.num_feature_tokens("vision"),
        projector_hidden_act=parts.activation,
        vision_feature_layer=parts.layer,
        vision_feature_select_strategy="default" if parts.drops_cls else "full",
        multimodal_projector_bias=parts.bias,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
        config.text_config.pad_token_id = tokenizer.pad_token_id
    config_dict = hf4_config_dict(config, notes)
    config_dict["architectures"] = ["LlavaForConditionalGeneration"]
    config_dict["torch_dtype"] = config_dict["dtype"] = weights_dtype(llm)
    state = hf4_llava_state(parts, llm, base_llm)
    with export_folder(dst, model) as tmp:
        save_state_dict(state, tmp)
        write_json(tmp / "config.json", config_dict, sort_keys=True)
        if getattr(llm, "generation_config", None) is not None:
            generation = copy.deepcopy(llm.generation_config)
            if tokenizer is not None and tokenizer.pad_token_id is not None:
                generation.pad_token_id = tokenizer.pad_token_id
            generation.save_pretrained(tmp)
        _save_llava_processor(bundle, parts, image_processor, tmp, notes)
    bundle.notes += notes
    if merged:
        bundle.notes.append(f"merged LoRA adapters of: {', '.join(merged)}")


def _save_llava_processor(bundle: Bundle, parts, image_processor, directory: Path, notes: list[str]) -> None:
    """LlavaProcessor files in the layout transformers 4.x and 5.x read: preprocessor_config.json,
    processor_config.json, chat_template.json and the tokenizer (4.x form)."""
    tokenizer = bundle.tokenizer
    if token_id(tokenizer, "<image>") != parts.placeholder_id:
        raise MmloomError(
            f"the tokenizer's <image> id ({token_id(tokenizer, '<image>')}) differs from the model's vision "
            f"placeholder id {parts.placeholder_id}: LlavaProcessor would insert the wrong token"
        )
    patch = parts.tower.config.patch_size
    image_config = image_processor.to_dict()
    image_config.pop("_processor_class", None)
    image_config["processor_class"] = "LlavaProcessor"
    write_json(directory / "preprocessor_config.json", image_config, sort_keys=True)
    write_json(directory / "processor_config.json", {
        "image_token": "<image>",
        "num_additional_image_tokens": 1 if has_cls_token(parts.tower.config) else 0,
        "patch_size": patch if isinstance(patch, int) else patch[0],
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": "default" if parts.drops_cls else "full",
    }, sort_keys=True)
    template = chat_template_for(bundle, image_processor, notes)
    if template is not None:
        write_json(directory / "chat_template.json", {"chat_template": template}, sort_keys=True)
    save_hf4_tokenizer(tokenizer, directory, search=[bundle.source] if bundle.source else (),
                       json_always=True)
    config_path = directory / "tokenizer_config.json"
    config = read_json(config_path)
    config["processor_class"] = "LlavaProcessor"
    write_json(config_path, config, sort_keys=True)


# --------------------------------------------------------------------------------------- reading
def read_hf_llava(src: str | Path, dtype: str | None = None, template: str | None = None, **_: Any) -> Bundle:
    """Load a llava-hf folder into a composite (the same modules, no copies).
    Raises MmloomError when the folder is not a llava model (LLaVA-NeXT and other variants), has an unknown
    feature select strategy, or its tokenizer's <image> id differs from `image_token_index`."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    src = check_dir(src, "hf-llava folder")
    raw = read_json(src / "config.json")
    if raw.get("model_type") != "llava":
        raise MmloomError(
            f"{src} is a {raw.get('model_type')!r} model, not 'llava' (LlavaForConditionalGeneration); "
            "LLaVA-NeXT and other variants are not supported"
        )
    refuse_remote_code(src, "hf-llava folder")
    hf = LlavaForConditionalGeneration.from_pretrained(src, dtype=hf_dtype(dtype), trust_remote_code=False).eval()
    cfg = hf.config
    strategy = {"default": "patch", "full": "cls_patch"}.get(cfg.vision_feature_select_strategy)
    if strategy is None:
        raise MmloomError(f"unknown vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
    tower = hf.model.vision_tower
    linear_1, linear_2 = hf.model.multi_modal_projector.linear_1, hf.model.multi_modal_projector.linear_2
    projector = MultimodalProjector(
        MultimodalProjectorConfig(
            in_features=linear_1.in_features,
            out_features=linear_1.out_features,
            projector_type=f"mlp2x_{cfg.projector_hidden_act}",
            activation=cfg.projector_hidden_act,
            bias=linear_1.bias is not None,
        )
    )
    projector.projection[0], projector.projection[2] = linear_1, linear_2

    text_config = cfg.text_config
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(text_config, trust_remote_code=False)
    setattr(llm, llm.base_model_prefix, hf.model.language_model)
    llm.lm_head = hf.lm_head
    if getattr(hf, "generation_config", None) is not None:
        llm.generation_config = copy.deepcopy(hf.generation_config)
    left = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.device.type == "meta"]
    if left:
        raise MmloomError(f"internal error: language model weights left on the meta device: {left[:5]}")
    encoder = ModalEncoderModule(
        tower, projector=projector, postprocess_module_callback=FeatureSelect(cfg.vision_feature_layer, strategy)
    )
    model = MultimodalModel({"vision": encoder}, llm.eval(), placeholder_token_ids={"vision": cfg.image_token_index})

    tokenizer = load_tokenizer(src)
    notes = []
    if cfg.image_seq_length != model.num_feature_tokens("vision"):
        notes.append(f"config image_seq_length {cfg.image_seq_length} differs from the "
                     f"{model.num_feature_tokens('vision')} feature tokens the vision tower gives; the latter is used")
    if tokenizer is None:
        notes.append("the folder has no tokenizer: the mmloom model is written without a processor")
    elif token_id(tokenizer, "<image>") != cfg.image_token_index:
        raise MmloomError(
            f"{src}: the tokenizer's <image> id ({token_id(tokenizer, '<image>')}) differs from "
            f"image_token_index {cfg.image_token_index}"
        )
    image_processor = load_image_processor(src) or default_image_processor(tower.config)
    name, options = recorded_template(src, template, notes)
    return Bundle(model.eval(), tokenizer, {"vision": image_processor}, name, options, notes=notes, source=src)


def recorded_template(src: Path, template: str | None, notes: list[str]) -> tuple[str, dict[str, Any]]:
    """(template, options) of an hf-llava folder: `template` when given, else the mmloom template its
    chat template records (an mmloom export), else LLaVA-1.5's vicuna_v1 (what llava-hf releases use), said
    in `notes`."""
    if template is not None:
        return template, {}
    text = None
    if (src / "chat_template.json").is_file():
        text = read_json(src / "chat_template.json").get("chat_template")
    elif (src / "chat_template.jinja").is_file():
        text = (src / "chat_template.jinja").read_text(encoding="utf-8")
    found = mmloom_template_of(text if isinstance(text, str) else None)
    if found is not None:
        notes.append(f"template {found[0]}, as the folder's chat template records")
        return found
    notes.append("template vicuna_v1 (LLaVA-1.5's): the folder's chat template records no mmloom template; "
                 "give --template NAME for another")
    return "vicuna_v1", {}
