"""PEFT adapters on the parts of a composite: wrapping, what trains, the specs saved with a model,
and merging them into the weights (every adapted part, tied weights included).

Any part of a :class:`~mmloom.model.multimodal.MultimodalModel` (the language model, an encoder's
module) may be a PEFT model (LoRA, IA3, prompt tuning...): :func:`wrap` with a recorded spec,
:func:`add_lora` from a training config's `model.lora`. A PEFT part trains through its adapters only:
:func:`enable_adapters` enables its active adapters, `modules_to_save` and the biases its config
asks for, never its base weights. Its spec is recorded in `config.json` (:func:`peft_spec`), so a
trainable-only save (the adapters alone) loads on the plain base (:func:`apply_peft_specs`).

Merging: PEFT's `merge_and_unload` adds each adapter's update to its base weight in place. When that
weight is shared with another module (the input embeddings and `lm_head` of an LLM with
`tie_word_embeddings`: Qwen2/2.5 up to 3B, Gemma, Llama-3.2 1B/3B, SmolLM), the other module gets the
update too and the merged model computes something else than the adapter model (the adapter model
embeds its inputs with the base weight and adapts only the head). :func:`merge_adapters` gives the
adapted layer its own copy of the weight first and marks the part's config untied, so the merged
model computes what the adapter model computes. A shared weight that is not the embedding tie of its
part's config cannot be untied for good (a reload would tie it again): such an adapter is refused when
training starts (:func:`check_mergeable`), with the reason. `mmloom merge-lora` and the exports
(`mmloom.interop`) merge through :func:`merge_adapters`.

After litgpt's `lora.py` and torchtune's `modules/peft` (adapters, what trains and merging in one
place). A leaf of `mmloom.model`: it imports `peft` lazily and no other part of the model package.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from mmloom.errors import MmloomError
from mmloom.files import read_json


# --------------------------------------------------------------------------------- wrapping
def base_module(module: nn.Module) -> nn.Module:
    """The HF model inside a PEFT wrapper (or the module itself)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def is_peft_model(module: nn.Module) -> bool:
    """True for a PEFT-wrapped model (`get_peft_model(...)`, `PeftModel.from_pretrained(...)`)."""
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def peft_spec(module: nn.Module) -> dict[str, Any] | None:
    """The PEFT config of a wrapped part as JSON (what `config.json` records); None when it is not wrapped."""
    if not hasattr(module, "peft_config"):
        return None
    config = module.peft_config["default"].to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def wrap(module: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """`module` wrapped by PEFT as `spec` (a :func:`peft_spec`) says: `get_peft_model(module, get_peft_config(spec))`."""
    from peft import get_peft_config, get_peft_model

    return get_peft_model(module, get_peft_config(spec))


def apply_peft_specs(model, config) -> list[str]:
    """Wrap the parts of `model` that `config` (a MultimodalConfig) records as PEFT-wrapped, and that are
    not wrapped yet, with the recorded PEFT spec (LoRA ...), so that a trainable-only save of a PEFT run
    (adapter weights + the spec) loads on a base model without adapters. Returns the parts wrapped.
    Raises MmloomError when a recorded spec does not apply to the base model."""
    specs = [("language model", config.language_model, model, "language_model")]
    specs += [(f"{name} encoder", spec.get("module", {}), model.encoders[name], "module")
              for name, spec in config.encoders.items() if name in model.encoders]
    wrapped = []
    for what, spec, owner, attribute in specs:
        recorded = (spec or {}).get("peft")
        if not recorded or hasattr(getattr(owner, attribute), "peft_config"):
            continue
        try:
            setattr(owner, attribute, wrap(getattr(owner, attribute), recorded))
        except (ValueError, KeyError, TypeError) as err:
            raise MmloomError(f"the recorded PEFT spec of the {what} does not apply to the base model: {err}") from None
        wrapped.append(what)
    return wrapped


def has_adapters(folder: str | Path) -> bool:
    """Whether the mmloom model folder `folder` records a PEFT-wrapped part (False when it has no
    readable config.json)."""
    try:
        data = read_json(Path(folder) / "config.json")
    except MmloomError:
        return False
    if (data.get("language_model") or {}).get("peft"):
        return True
    return any(((spec or {}).get("module") or {}).get("peft") for spec in (data.get("encoders") or {}).values())


def lora_part(model, name: str) -> tuple[Any, str]:
    """(owner module, attribute) of a `lora.parts` entry: language_model / text_model, or an encoder
    by modality name, `{name}_encoder` or the Cerebras-style `image_model` / `audio_model`.
    Raises MmloomError for any other name."""
    if name in ("language_model", "text_model"):
        return model, "language_model"
    aliases = {"image_model": "vision", "audio_model": "audio"}
    modality = aliases.get(name, name.removesuffix("_encoder").removesuffix(".module"))
    if modality not in model.encoder_names:
        raise MmloomError(
            f"model.lora.parts: unknown part {name!r}; use language_model or an encoder of {model.encoder_names}"
        )
    return model.encoders[modality], "module"


def add_lora(model, settings) -> None:
    """Wrap each part of `settings.parts` (default the language model) with its own PEFT LoRA
    adapters (`settings.r`, `alpha`, `dropout`, `target_modules`: a `model.lora` section); only the
    adapters train. Parts wrapped already are left as they are. Raises MmloomError for an unknown
    part or an adapter that no merge could fold in exactly (:func:`check_mergeable`)."""
    from peft import LoraConfig, get_peft_model

    target = settings.target_modules
    for name in getattr(settings, "parts", ["language_model"]):
        owner, attribute = lora_part(model, name)
        module = getattr(owner, attribute)
        if hasattr(module, "peft_config"):
            continue
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=target if isinstance(target, str) else list(target),
        )
        setattr(owner, attribute, get_peft_model(module, config))
    check_mergeable(model)  # an adapter no merge can fold in exactly is refused before training


# ------------------------------------------------------------------------------ what trains
def enable_adapters(module: nn.Module) -> None:
    """Set requires_grad on what a PEFT part trains: its active adapters, `modules_to_save` and the
    biases its config names (`bias="all"` / `"*_only"`), as PEFT's own `get_peft_model` leaves them.
    Nothing else is changed (the caller froze the base weights)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.tuners.tuners_utils import set_requires_grad as peft_set_requires_grad

    adapters = list(module.active_adapters)
    # Adapter layers and auxiliary wrappers (modules_to_save) of the active adapters.
    peft_set_requires_grad(module, adapter_names=adapters, requires_grad=True)
    prompt_encoder = getattr(module, "prompt_encoder", None)
    if prompt_encoder is not None:  # prompt learning (prefix / prompt tuning, p-tuning)
        for name in adapters:
            if name in prompt_encoder:
                prompt_encoder[name].requires_grad_(True)
    for name in adapters:
        bias = getattr(module.peft_config[name], "bias", "none") or "none"
        if bias == "all":
            for pname, param in module.named_parameters():
                if pname == "bias" or pname.endswith(".bias"):
                    param.requires_grad_(True)
        elif bias.endswith("_only"):
            for sub in module.modules():
                if isinstance(sub, BaseTunerLayer) and getattr(sub.get_base_layer(), "bias", None) is not None:
                    sub.get_base_layer().bias.requires_grad_(True)


_ADAPTER_RE = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def is_adapter(name: str) -> bool:
    """Whether a parameter name (qualified, any wrapper prefixes) is a LoRA adapter weight (PEFT's
    `lora_A` / `lora_B` / DoRA magnitude)."""
    return bool(_ADAPTER_RE.search(f".{name}."))


def adapter_parameter_names(module: nn.Module) -> set[str]:
    """Names (relative to `module`) of the parameters that train when the part is made trainable:
    those :func:`enable_adapters` enables for a PEFT part, every parameter of a plain one.
    requires_grad is unchanged."""
    params = dict(module.named_parameters())
    if not is_peft_model(module):
        return set(params)
    before = {name: p.requires_grad for name, p in params.items()}
    try:
        module.requires_grad_(False)
        enable_adapters(module)
        return {name for name, p in params.items() if p.requires_grad}
    finally:
        for name, p in params.items():
            p.requires_grad_(before[name])


def peft_parts(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT-wrapped submodules of `model` by their qualified name."""
    return {name: module for name, module in model.named_modules() if name and is_peft_model(module)}


# ---------------------------------------------------------------------------------- merging
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
    `["vision encoder", "language model (lm_head untied from the shared embedding weight)"]`."""
    merged = []
    for what, owner, attribute in adapted_parts(model):
        peft_model = getattr(owner, attribute)
        untied = _untie(peft_model)
        setattr(owner, attribute, peft_model.merge_and_unload())
        merged.append(what + (f" ({', '.join(untied)} untied from the shared embedding weight)" if untied else ""))
    return merged
