"""transformers' `LlavaForConditionalGeneration` folders (llava-hf layout), both directions.

Mapping: FeatureSelect(layer, patch|cls_patch) <-> `vision_feature_layer` /
`vision_feature_select_strategy` (default|full); the vision placeholder id <-> `image_token_index`;
an `mlp2x_{act}` projector <-> `multi_modal_projector.linear_1/linear_2` + `projector_hidden_act`;
`image_seq_length` = feature tokens per image.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from mmloom.errors import MmloomError
from mmloom.interop.common import (
    Bundle,
    check_dir,
    copy_modules_dtype,
    default_image_processor,
    hf_dtype,
    load_image_processor,
    load_tokenizer,
    merge_adapters,
    read_json,
    torch_dtype,
    vision_parts,
)
from mmloom.interop.tokens import resize_to_cover, token_id
from mmloom.model.callbacks import FeatureSelect
from mmloom.model.encoder import ModalEncoderModule
from mmloom.model.multimodal import MultimodalModel
from mmloom.model.projector import MultimodalProjector, MultimodalProjectorConfig
from mmloom.model.serialization import atomic_directory

FORMAT = "hf-llava"

# vicuna_v1 for HF's chat API (content lists with {"type": "image"} / {"type": "text"} parts).
VICUNA_CHAT_TEMPLATE = (
    "{% set ns = namespace(system='A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.') %}"
    "{% if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] if messages[0]['content'] "
    "is string else messages[0]['content'][0]['text'] %}{% endif %}"
    "{% if ns.system %}{{ ns.system + ' ' }}{% endif %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}"
    "{% else %}{% generation %}{% for part in message['content'] if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endfor %}{{ '</s>' }}{% endgeneration %}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _check_same_class(module, config, what: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    expected = MODEL_MAPPING_NAMES.get(config.model_type)
    if expected != type(module).__name__:
        raise MmloomError(
            f"format {FORMAT!r} rebuilds the {what} with AutoModel ({expected or 'no class'} for model type "
            f"{config.model_type!r}), which is not this model's {type(module).__name__}"
        )


# --------------------------------------------------------------------------------------- writing
def write_hf_llava(
    bundle: Bundle, dst: str | Path, dtype: str | None = None, pad_to_multiple_of: int | None = None, **_: Any
) -> None:
    """Write a folder that `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor` load."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.activations import ACT2FN

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
    copy_modules_dtype(model, torch_dtype(dtype))
    # transformers looks the image token up in the embeddings: it must lie inside the vocabulary.
    resize_to_cover(llm, parts.placeholder_id + 1, pad_to_multiple_of)

    tokenizer = bundle.tokenizer
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
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    # Share the modules (no copy): the composite is discarded after the conversion.
    hf.model.vision_tower = parts.tower
    hf.model.multi_modal_projector.linear_1 = parts.projection[0]
    hf.model.multi_modal_projector.linear_2 = parts.projection[2]
    hf.model.multi_modal_projector.act = ACT2FN[parts.activation]
    hf.model.language_model = base_llm
    hf.lm_head = llm.lm_head
    if getattr(llm, "generation_config", None) is not None:
        hf.generation_config = copy.deepcopy(llm.generation_config)
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.device.type == "meta"]
    if left:
        raise MmloomError(f"internal error: weights not transferred to the Llava model: {left[:5]}")

    with atomic_directory(dst) as tmp:
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            _save_llava_processor(bundle, parts, tmp)
    if merged:
        bundle.notes.append(f"merged LoRA adapters of: {', '.join(merged)}")


def _save_llava_processor(bundle: Bundle, parts, directory: Path) -> None:
    from transformers import LlavaProcessor

    tokenizer = bundle.tokenizer
    if token_id(tokenizer, "<image>") != parts.placeholder_id:
        raise MmloomError(
            f"the tokenizer's <image> id ({token_id(tokenizer, '<image>')}) differs from the model's vision "
            f"placeholder id {parts.placeholder_id}: LlavaProcessor would insert the wrong token"
        )
    image_processor = bundle.encoder_processors.get("vision") or default_image_processor(parts.tower.config)
    patch = parts.tower.config.patch_size
    has_cls = getattr(parts.tower.config, "model_type", "") == "clip_vision_model"
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch if isinstance(patch, int) else patch[0],
        vision_feature_select_strategy="default" if parts.drops_cls else "full",
        num_additional_image_tokens=1 if has_cls else 0,
        image_token="<image>",
        chat_template=VICUNA_CHAT_TEMPLATE if bundle.template == "vicuna_v1" else None,
    )
    processor.save_pretrained(directory)


# --------------------------------------------------------------------------------------- reading
def read_hf_llava(src: str | Path, dtype: str | None = None, template: str | None = None, **_: Any) -> Bundle:
    """Load a llava-hf folder into a composite (the same modules, no copies)."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    src = check_dir(src, "hf-llava folder")
    raw = read_json(src / "config.json")
    if raw.get("model_type") != "llava":
        raise MmloomError(
            f"{src} is a {raw.get('model_type')!r} model, not 'llava' (LlavaForConditionalGeneration); "
            "LLaVA-NeXT and other variants are not supported"
        )
    hf = LlavaForConditionalGeneration.from_pretrained(src, dtype=hf_dtype(dtype)).eval()
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
        llm = AutoModelForCausalLM.from_config(text_config)
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
    return Bundle(model.eval(), tokenizer, {"vision": image_processor}, template or "vicuna_v1", notes=notes)
