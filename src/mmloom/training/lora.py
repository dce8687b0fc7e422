"""LoRA adapters folded into the weights: exact for every adapted part, tied weights included.

PEFT's `merge_and_unload` adds each adapter's update to its base weight in place. When that weight
is shared with another module (the input embeddings and `lm_head` of an LLM with
`tie_word_embeddings`: Qwen2/2.5 up to 3B, Gemma, Llama-3.2 1B/3B, SmolLM), the other module gets
the update too and the merged model computes something else than the adapter model (the adapter
model embeds its inputs with the base weight and adapts only the head). Here the adapted layer gets
its own copy of the weight first and the part's config says the embeddings are no longer tied, so
the merged model computes what the adapter model computes. A shared weight that is not the
embedding tie of its part's config cannot be untied for good (a reload would tie it again): such an
adapter is refused when training starts (:func:`check_mergeable`), with the reason.

`mmloom merge-lora` (:func:`merge_lora`) and the exports (`mmloom.interop`) merge through
:func:`merge_adapters`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mmloom.errors import MmloomError
from mmloom.model.encoder import base_module, is_peft_model
from mmloom.training.run_folder import resolve_model_folder


def adapted_parts(model) -> list[tuple[str, object, str]]:
    """(what, owner, attribute) of every PEFT-wrapped part of a MultimodalModel: each encoder's module
    (`"vision encoder"` ...), then the language model."""
    parts = [(f"{name} encoder", encoder, "module") for name, encoder in model.encoders.items()]
    parts.append(("language model", model, "language_model"))
    return [(what, owner, attribute) for what, owner, attribute in parts if is_peft_model(getattr(owner, attribute))]


def _lora_layers(peft_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the PEFT tuner layers (LoRA Linear / Embedding / Conv) inside `peft_model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in peft_model.named_modules() if isinstance(module, BaseTunerLayer)]


def _base_weight(layer: nn.Module) -> nn.Parameter | None:
    weight = getattr(layer.get_base_layer(), "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None


def shared_adapted_weights(peft_model: nn.Module) -> list[tuple[str, list[str], bool]]:
    """The adapted layers whose base weight another module uses too: (layer name, the other modules'
    names, whether the sharing is the input/output embedding tie of the part's config, which merging can
    undo)."""
    base = base_module(peft_model)
    owners: dict[int, list[str]] = {}
    for name, module in base.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    tie = _embedding_tie(base)
    out = []
    for name, layer in _lora_layers(peft_model):
        weight = _base_weight(layer)
        if weight is None:
            continue
        users = [n for n in owners.get(id(weight), []) if not n.endswith("base_layer")]
        layer_name = name.split("base_model.model.", 1)[-1]
        others = [n for n in users if n != layer_name]
        if others:
            out.append((layer_name, others, tie is not None and id(weight) == id(tie)))
    return out


def _embedding_tie(base: nn.Module) -> nn.Parameter | None:
    """The one weight of tied input and output embeddings (config `tie_word_embeddings`), else None."""
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return None
    try:
        inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if inputs is None or outputs is None or inputs.weight is not outputs.weight:
        return None
    return inputs.weight


def check_mergeable(model) -> None:
    """Refuse (MmloomError, one line) adapters that no merge can fold in exactly: a LoRA layer whose base
    weight another module shares, other than the embedding tie that :func:`merge_adapters` undoes.
    Called when training starts, right after the adapters are added."""
    for what, owner, attribute in adapted_parts(model):
        for layer, others, untieable in shared_adapted_weights(getattr(owner, attribute)):
            if not untieable:
                raise MmloomError(
                    f"model.lora: the {what}'s adapted layer {layer} shares its weight with {', '.join(others)}: "
                    "merging the adapter would change those too (a merged model would differ from the trained "
                    f"one); leave {layer.rsplit('.', 1)[-1]} out of model.lora.target_modules")


def _untie(peft_model: nn.Module) -> list[str]:
    """Give every adapted layer whose weight is the embedding tie its own copy, and mark the part's
    config untied; returns the layers untied. Raises MmloomError for a sharing that cannot be undone."""
    untied = []
    base = base_module(peft_model)
    layers = dict(_lora_layers(peft_model))
    for layer_name, others, untieable in shared_adapted_weights(peft_model):
        if not untieable:
            raise MmloomError(f"cannot merge the adapter of {layer_name} exactly: its weight is shared with "
                              f"{', '.join(others)}")
        layer = next(m for n, m in layers.items() if n.split("base_model.model.", 1)[-1] == layer_name)
        base_layer = layer.get_base_layer()
        base_layer.weight = nn.Parameter(base_layer.weight.detach().clone(),
                                         requires_grad=base_layer.weight.requires_grad)
        untied.append(layer_name)
    if untied:
        for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    return untied


def merge_adapters(model) -> list[str]:
    """Fold the LoRA adapters of every adapted part (encoders and language model) into their weights,
    in place, so that the plain model computes what the adapter model computes (tied embeddings are
    untied first when an adapter sits on one of them). Returns what was merged, e.g.
    `["vision encoder", "language model (lm_head untied from the input embeddings)"]`."""
    merged = []
    for what, owner, attribute in adapted_parts(model):
        peft_model = getattr(owner, attribute)
        untied = _untie(peft_model)
        setattr(owner, attribute, peft_model.merge_and_unload())
        merged.append(what + (f" ({', '.join(untied)} untied from the shared embedding weight)" if untied else ""))
    return merged


def merge_lora(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False):
    """Load the model (a model folder, a checkpoint, or a run folder: its final_model, else its latest
    checkpoint), merge the adapters of every adapted part (:func:`merge_adapters`) and save a plain mmloom
    model folder to `out_dir` (with the processor files when the source has them). Returns (model, what
    was merged).

    `out_dir` is claimed first (:func:`mmloom.outputs.check_destination`): new, an empty folder, or with
    `overwrite` an earlier `mmloom merge-lora` output, never inside `model_dir` or holding it. The model
    and its processor are written into a temporary sibling, verified and renamed into place together
    (:func:`mmloom.outputs.new_folder`). Raises MmloomError for a refused destination, a model without
    adapters, or a full disk (naming `out_dir` and the bytes needed)."""
    from mmloom.model.serialization import verify_weight_files, weight_bytes
    from mmloom.outputs import check_destination, new_folder
    from mmloom.processing.processor import PROCESSOR_CONFIG, MultimodalProcessor
    from mmloom.training.checkpoint import load_saved_model

    check_destination(out_dir, "merge-lora", overwrite=overwrite, sources=[model_dir])
    folder = resolve_model_folder(model_dir)
    model = load_saved_model(folder)  # a trainable-only checkpoint: on the base its run config describes
    if not adapted_parts(model):
        raise MmloomError(f"{folder}: no part of the model has LoRA adapters to merge")
    merged = merge_adapters(model)
    with new_folder(out_dir, "merge-lora", needed=weight_bytes(model) + 2**20, verify=verify_weight_files) as tmp:
        model.save_pretrained(tmp)
        if (folder / PROCESSOR_CONFIG).exists():
            MultimodalProcessor.from_pretrained(folder).save_pretrained(tmp)
    return model, merged
