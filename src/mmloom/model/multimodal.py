"""The composite model: any number of modality encoders around any HF causal language model."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

import mmloom
from mmloom.errors import MmloomError
from mmloom.files import read_json, write_json
from mmloom.model import adapters
from mmloom.model import serialization as ser
from mmloom.model.adapters import base_module
from mmloom.model.attention import check_packed_attention
from mmloom.model.callbacks import callback_from_dict, callback_to_dict
from mmloom.model.checkpointing import disable_checkpointing, enable_checkpointing, sync_frozen_checkpointing
from mmloom.model.encoder import (
    CALLBACK_SLOTS,
    ModalEncoderModule,
    forward_parameter_names,
    forward_takes_kwargs,
    output_width_from_structure,
)
from mmloom.model.feature_count import num_feature_tokens
from mmloom.model.freezing import (
    apply_eval_to_frozen,
    set_part_trainable,
    set_requires_grad_by_patterns,
    trainable_table,
)
from mmloom.model.loss import (
    SupervisedTokenStats,
    TokenLogps,
    supervised_loss,
    supervised_token_logps,
    supervised_token_stats,
)
from mmloom.model.merge import IGNORE_INDEX, merge_features
from mmloom.model.outputs import Features
from mmloom.model.projector import MultimodalProjector, MultimodalProjectorConfig

CONFIG_NAME = "config.json"


@dataclass
class MultimodalConfig:
    """Everything needed to rebuild a composite: HF configs, projectors, callbacks, token ids."""

    encoders: dict[str, dict[str, Any]]
    language_model: dict[str, Any]
    placeholder_token_ids: dict[str, int] = field(default_factory=dict)
    # modalities run by another modality's encoder, e.g. {"video": {"encoder": "vision", "pool": {"type":
    # "frame_pool", ...}}}; written to config.json only when there are some
    media: dict[str, dict[str, Any]] = field(default_factory=dict)
    tied_weights: dict[str, str] = field(default_factory=dict)
    trainable_only: bool = False
    torch_dtype: str = "float32"
    architecture: str = "MultimodalModel"
    mmloom_version: str = mmloom.__version__

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (what config.json holds; `media` only when set)."""
        data = asdict(self)
        if not data["media"]:
            del data["media"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultimodalConfig:
        """A config from `to_dict()` output; unknown keys (newer releases) are ignored."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, directory: Path) -> None:
        """Write `config.json` into `directory` (atomically)."""
        write_json(Path(directory) / CONFIG_NAME, self.to_dict(), sort_keys=True)

    @classmethod
    def load(cls, directory: str | Path) -> MultimodalConfig:
        """The config of an mmloom model folder; raises MmloomError when `directory` is not one."""
        path = Path(directory) / CONFIG_NAME
        if not path.exists():
            raise MmloomError(f"{path} not found: not an mmloom model folder")
        data = read_json(path)
        if data.get("architecture") != "MultimodalModel":
            raise MmloomError(f"{path} is not an mmloom MultimodalModel config")
        return cls.from_dict(data)

    def encoder_hf_config(self, name: str):
        """The HF config of encoder `name`, rebuilt from the saved spec (no weights loaded)."""
        spec = self.encoders[name]["module"]
        return ser.resolve_class(spec["class"]).config_class.from_dict(spec["config"])


def _part_spec(module: nn.Module) -> dict[str, Any]:
    base = base_module(module)
    return {"class": ser.class_path(base), "config": base.config.to_dict(), "peft": adapters.peft_spec(module)}


def _build_part(spec: dict[str, Any], meta: bool = False) -> nn.Module:
    from transformers.initialization import no_init_weights

    from mmloom.model.meta_init import meta_module

    cls = ser.resolve_class(spec["class"])
    config = cls.config_class.from_dict(spec["config"])
    with no_init_weights():  # the weights are loaded right after
        # on meta: the same random draws as on the CPU (torch.randn in constructors)
        module = meta_module(lambda: cls(config), cpu_draws=True) if meta else cls(config)
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # skipped under no_init_weights
    if spec.get("peft"):
        module = adapters.wrap(module, spec["peft"])
    return module


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's padding (attention_mask 0) to the left, keeping its tokens in order.

    input_ids, attention_mask: (B, T). Rows already left-padded are returned unchanged (the
    tensors themselves when all are)."""
    mask = attention_mask.bool()
    # Left-padded: once a row attends, it attends to the end.
    if bool((mask.long().cummax(dim=1).values.bool() == mask).all()):
        return input_ids, attention_mask
    keys = mask.long() * (torch.arange(mask.shape[1], device=mask.device) + 1)  # pads first, then tokens in order
    order = keys.argsort(dim=1, stable=True)
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def language_model_kwargs(module: nn.Module, **kwargs) -> dict[str, Any]:
    """Keyword arguments for a language model's forward, as its signature wants them.

    `past_key_values` is passed under the name the forward declares (`cache` in transformers
    5.x, where the old name only triggers a deprecation warning); None values of arguments the
    forward does not name are left out. A non-None argument that a forward without **kwargs does
    not take raises MmloomError.
    """
    names, takes_extra = forward_parameter_names(module), forward_takes_kwargs(module)
    cache = kwargs.pop("past_key_values", None)
    if cache is not None:
        if kwargs.get("cache") is not None:
            raise MmloomError("give the KV cache once: past_key_values or cache, not both")
        kwargs["cache" if "cache" in names and "past_key_values" not in names else "past_key_values"] = cache
    out = {}
    for key, value in kwargs.items():
        if key in names:
            out[key] = value
        elif value is None:
            continue
        elif takes_extra:
            out[key] = value
        else:
            raise MmloomError(
                f"{type(base_module(module)).__name__}.forward takes no argument {key!r} (it takes {sorted(names)})"
            )
    return out


class MultimodalModel(nn.Module):
    """Encoders (`{name}_encoder` attributes) whose projected features fill the placeholder
    tokens of their modality in the input of `language_model`.

    Encoder inputs are given per encoder (`vision={"pixel_values": x}`) or, when only one
    encoder accepts the name, as flat keyword arguments (`pixel_values=x`).

    `media` adds modalities that another modality's encoder runs, each with a pooling of its own
    (`{name}_pool` attributes): `{"video": ("vision", FramePool(...))}` sends video frames
    (`video={"pixel_values": (sum F, 3, H, W), "video_frames": (N_clips,)}`) through the vision tower
    and projector (`ModalEncoderModule.project`, without the images' projector callback), then
    pools them per frame into one feature sequence per clip.
    """

    def __init__(
        self,
        encoders: dict[str, ModalEncoderModule],
        language_model: nn.Module,
        init_projector_type: str = "linear",
        init_activation: str = "gelu",
        placeholder_token_ids: dict[str, int] | None = None,
        media: dict[str, tuple[str, nn.Module]] | None = None,
    ):
        super().__init__()
        self.encoder_names: list[str] = list(encoders)
        for name, encoder in encoders.items():
            if not isinstance(encoder, ModalEncoderModule):
                raise TypeError(f"encoder {name!r} must be a ModalEncoderModule, got {type(encoder).__name__}")
            setattr(self, f"{name}_encoder", encoder)
        self.media_encoders: dict[str, str] = {}  # modality -> the encoder that runs it
        for name, (encoder_name, pool) in (media or {}).items():
            if encoder_name not in encoders or name in encoders:
                raise MmloomError(f"media {name!r}: its encoder {encoder_name!r} must be one of {self.encoder_names}, "
                                  "and its name not an encoder's")
            self.media_encoders[name] = encoder_name
            setattr(self, f"{name}_pool", pool)
        self.language_model = language_model
        self.placeholder_token_ids: dict[str, int] = dict(placeholder_token_ids or {})
        self._unknown_modalities(self.placeholder_token_ids, "placeholder_token_ids")
        self._accepted_inputs = {name: enc.accepted_inputs() for name, enc in self.encoders.items()}
        for name, encoder in self.encoders.items():
            self._connect_projector(name, encoder, init_projector_type, init_activation)

    # ----------------------------------------------------------------- structure
    @property
    def encoders(self) -> dict[str, ModalEncoderModule]:
        """The encoders by modality name (attributes `{name}_encoder`), in composition order."""
        return {name: getattr(self, f"{name}_encoder") for name in self.encoder_names}

    @property
    def modalities(self) -> list[str]:
        """Every modality the model takes: its encoders, then the `media` run by one of them."""
        return [*self.encoder_names, *self.media_encoders]

    def pool(self, modality: str) -> nn.Module:
        """The pooling of a modality run by another's encoder (`media`)."""
        return getattr(self, f"{modality}_pool")

    @property
    def llm_hidden_size(self) -> int:
        """Width of the language model's input embeddings, which projected features must have:
        `get_input_embeddings().embedding_dim` (OPT: `word_embed_proj_dim`, not `hidden_size`)."""
        embeddings = self.language_model.get_input_embeddings()
        width = getattr(embeddings, "embedding_dim", None)
        return int(width) if width is not None else int(embeddings.weight.shape[-1])

    @property
    def device(self) -> torch.device:
        """The device of the first parameter."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first parameter."""
        return next(self.parameters()).dtype

    def _connect_projector(self, name: str, encoder: ModalEncoderModule, projector_type: str, activation: str):
        """Build a lazy projector from the encoder's and the LLM's widths, or check a given one;
        a projector whose widths do not fit raises MmloomError naming both widths."""
        hidden, projector = self.llm_hidden_size, encoder.projector
        cfg = projector.config
        cfg.projector_type = cfg.projector_type or projector_type
        cfg.activation = cfg.activation or activation
        try:
            feature_dim = encoder.feature_dim()
        except MmloomError:
            if cfg.in_features is None and not projector.is_built:
                raise
            feature_dim = None  # the encoder cannot tell: trust the given projector
        if cfg.in_features is not None and feature_dim is not None and cfg.in_features != feature_dim:
            raise MmloomError(
                f"{name} projector takes {cfg.in_features} features but the {name} encoder gives {feature_dim}"
            )
        if not projector.is_built:
            if cfg.out_features is not None and cfg.out_features != hidden:
                raise MmloomError(
                    f"{name} projector config says out_features={cfg.out_features} but the language model's "
                    f"input embeddings are {hidden} wide"
                )
            projector.build(cfg.in_features if cfg.in_features is not None else feature_dim, hidden)
            return
        in_features = cfg.in_features if cfg.in_features is not None else feature_dim
        if in_features is not None:
            out = projector.output_width(in_features)  # what the projection really gives
        else:
            out = cfg.out_features or output_width_from_structure(projector.projection)
        if out is not None and out != hidden:
            raise MmloomError(
                f"{name} projector outputs {out} features but the language model's input embeddings are "
                f"{hidden} wide: the projection must map to {hidden}"
            )
        if cfg.out_features is not None and cfg.out_features != hidden:
            raise MmloomError(
                f"{name} projector config says out_features={cfg.out_features} but the language model's "
                f"input embeddings are {hidden} wide"
            )
        cfg.in_features, cfg.out_features = in_features, hidden

    def _unknown_modalities(self, names: Iterable[str], what: str) -> None:
        unknown = sorted(set(names) - set(self.modalities))
        if unknown:
            raise MmloomError(f"{what}: unknown encoder(s) {unknown}; this model has {self.modalities}")

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def num_feature_tokens(self, modality: str, image_size_hw=None) -> int:
        """Feature tokens one item of `modality` turns into (what each placeholder expands to)."""
        encoder = self.encoders[modality]
        return num_feature_tokens(encoder.config, encoder.callbacks, image_size_hw)

    # ------------------------------------------------------------------- inputs
    def _route_inputs(self, kwargs: dict[str, Any]) -> tuple[dict[str, dict], dict[str, Any]]:
        """Split keyword arguments into per-encoder inputs and the language model's own."""
        per_encoder: dict[str, dict] = {}
        rest: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in self.encoder_names or key in self.media_encoders:
                if value is not None:
                    per_encoder.setdefault(key, {}).update({k: v for k, v in value.items() if v is not None})
                continue
            owners = [name for name in self.encoder_names if key in self._accepted_inputs[name]]
            if len(owners) > 1:
                if value is None:
                    continue
                raise MmloomError(
                    f"input {key!r} is accepted by encoders {', '.join(owners)}; pass it per encoder, "
                    f"e.g. {owners[0]}={{'{key}': ...}}"
                )
            if owners:
                if value is not None:
                    per_encoder.setdefault(owners[0], {})[key] = value
            else:
                rest[key] = value
        return {name: inputs for name, inputs in per_encoder.items() if inputs}, rest

    def encode(self, modality: str, **inputs) -> Features:
        """Projected features of one modality: (N_items, L, D), a list of (L_i, D), or a flat
        (T, D) stream when the item boundaries cannot be told. A modality of `media` runs its
        encoder's `project` and its own pooling (video: one (F_i * t (+ newlines), D) tensor per clip)."""
        if modality in self.media_encoders:
            encoder = self.encoders[self.media_encoders[modality]]
            pool = self.pool(modality)
            own = set(getattr(pool, "input_names", ()))
            output, _ = encoder.project(**{k: v for k, v in inputs.items() if k not in own})
            return pool(inputs, output)
        return self.encoders[modality].item_features(**inputs)

    def embed_inputs(self, input_ids: torch.Tensor, encoder_inputs: dict[str, dict]) -> torch.Tensor:
        """Token embeddings with every modality's features merged at its placeholders.
        Raises MmloomError when `input_ids` hold placeholders of a modality without its inputs, or a
        modality has no placeholder id."""
        placeholder_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for name, token_id in self.placeholder_token_ids.items():
            is_placeholder = input_ids == token_id
            placeholder_mask |= is_placeholder
            if name not in encoder_inputs and bool(is_placeholder.any()):
                raise MmloomError(f"input_ids contain {name} placeholder tokens (id {token_id}) but no {name} inputs")
        # Placeholder ids may lie outside the vocabulary: look up a harmless id there instead.
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholder_mask, 0))  # (B, T, D)
        for name, inputs in encoder_inputs.items():
            if name not in self.placeholder_token_ids:
                raise MmloomError(
                    f"no placeholder token id for {name}: build the model with "
                    f"placeholder_token_ids={{'{name}': token_id}}"
                )
            features = self.encode(name, **inputs)
            inputs_embeds = merge_features(input_ids, inputs_embeds, features, self.placeholder_token_ids[name], name)
        return inputs_embeds

    def mask_placeholder_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`labels` (B, T) with -100 (``IGNORE_INDEX``) at every placeholder position of `input_ids` (B, T):
        feature positions are never supervised."""
        ids = torch.tensor(list(self.placeholder_token_ids.values()), device=input_ids.device)
        return labels.masked_fill(torch.isin(input_ids, ids), IGNORE_INDEX)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T), 1 = attend
        labels: torch.LongTensor | None = None,  # (B, T), unshifted, -100 = ignore
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,  # (B, T, D), skips encoders when given
        use_cache: bool | None = None,
        compute_logits: bool = True,
        token_stats: bool = False,
        token_logps: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast | SupervisedTokenStats | TokenLogps:
        """Run the encoders, merge their features at the placeholder positions and run the LLM.

        Encoder inputs come per encoder (`vision={"pixel_values": (N, 3, H, W)}`,
        `audio={"input_features": ...}`) or flat when only one encoder takes the name. Returns the
        LLM's `CausalLMOutputWithPast`: `logits` (B, T, V) float, and with `labels` the loss — the
        mean next-token cross-entropy over the supervised positions of the whole batch (labels
        shifted inside: position t predicts labels[t+1]; -100 ignored; placeholder positions never
        supervised), or its sum divided by `num_items_in_batch` when given (exact normalisation over
        micro-batches and ranks). With labels and `compute_logits=False`, the LM head runs only at
        supervised positions (chunked) and the output carries the loss without logits (`logits`
        None): the fast path for training; with `token_stats=True` as well, the output is a
        `SupervisedTokenStats` (loss sum, supervised tokens, argmax-correct tokens; no gradient): the
        evaluation path; with `token_logps=True` instead, a `TokenLogps` (each supervised label's
        log-probability, (B, T-1), with gradient): the preference-tuning path. Packed rows (`mmloom.data.collate.PackedCollator`) pass their sample
        boundaries as `cu_seq_lens_q` / `cu_seq_lens_k` / `max_length_q` / `max_length_k` (see
        `mmloom.model.attention`); MmloomError when the language model's attention cannot take them.
        Extra keyword arguments that no encoder takes go to the LLM. Raises
        `PlaceholderMismatchError` (an MmloomError) when a sample's placeholder count and its items'
        feature counts differ, naming the sample.
        """
        encoder_inputs, llm_kwargs = self._route_inputs(kwargs)
        llm_kwargs.pop("return_dict", None)
        if use_cache is None and (labels is not None or self.training):
            use_cache = False  # a training/loss forward builds no KV cache (nor checkpointing warnings)
        if llm_kwargs.get("cu_seq_lens_q") is not None:
            check_packed_attention(self.language_model)
        if (token_stats or token_logps) and (labels is None or compute_logits):
            raise MmloomError("token_stats=True / token_logps=True need labels and compute_logits=False")
        if inputs_embeds is None:
            if input_ids is None:
                raise MmloomError("forward needs input_ids or inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, encoder_inputs)
            if labels is not None:
                labels = self.mask_placeholder_labels(input_ids, labels)
        if labels is not None and not compute_logits:
            return self._supervised_only(inputs_embeds, attention_mask, position_ids, labels, llm_kwargs, token_stats,
                                         token_logps)
        return self.language_model(**language_model_kwargs(
            self.language_model,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            labels=labels,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            return_dict=True,
            **llm_kwargs,
        ))

    def _supervised_only(self, inputs_embeds, attention_mask, position_ids, labels, llm_kwargs, token_stats=False,
                         token_logps=False):
        llm = base_module(self.language_model)
        num_items = llm_kwargs.pop("num_items_in_batch", None)
        decoder = llm.get_decoder()
        hidden = decoder(**language_model_kwargs(
            decoder, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=False, return_dict=True, **llm_kwargs,
        )).last_hidden_state  # (B, T, D)
        config = llm.config
        head_options = {"softcap": getattr(config, "final_logit_softcapping", None),
                        "logit_scale": getattr(config, "logit_scale", None)}
        if token_stats:
            return supervised_token_stats(hidden, labels, llm.get_output_embeddings(), **head_options)
        if token_logps:
            return supervised_token_logps(hidden, labels, llm.get_output_embeddings(), **head_options)
        loss = supervised_loss(hidden, labels, llm.get_output_embeddings(), num_items, **head_options)
        return CausalLMOutputWithPast(loss=loss)

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Generate with the language model's own `generate` (KV cache, greedy/sampling, batching).

        `input_ids` (B, T) may be padded on either side: the LLM sees only `inputs_embeds`, so
        it cannot tell padding itself, and a right-padded row would continue after its pads.
        Rows that are not left-padded are re-padded to the left (tokens kept in order, pads
        moved first) before the features are merged, so every row gives the answer it gives
        alone. Returns the `input_ids` as given followed by the generated ids (B, T + new),
        like HF: the new tokens of every row start at column T.
        """
        encoder_inputs, generate_kwargs = self._route_inputs(kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompt_ids, prompt_mask = left_pad(input_ids, attention_mask)
        inputs_embeds = self.embed_inputs(prompt_ids, encoder_inputs)
        new_tokens = self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=prompt_mask, **generate_kwargs
        )
        return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)

    # ----------------------------------------------------------------- freezing
    @property
    def parts(self) -> dict[str, nn.Module]:
        """The named parts that freezing patterns match: ``{name}_encoder.module``,
        ``{name}_encoder.projector``, ``{name}_encoder.{slot}`` (callbacks with parameters) and
        ``language_model``."""
        parts: dict[str, nn.Module] = {}
        for name, encoder in self.encoders.items():
            parts[f"{name}_encoder.module"] = encoder.module
            parts[f"{name}_encoder.projector"] = encoder.projector
            for slot in CALLBACK_SLOTS:
                callback = getattr(encoder, slot)
                if isinstance(callback, nn.Module) and any(True for _ in callback.parameters()):
                    parts[f"{name}_encoder.{slot}"] = callback
        for name in self.media_encoders:
            if any(True for _ in self.pool(name).parameters()):
                parts[f"{name}_pool"] = self.pool(name)
        parts["language_model"] = self.language_model
        return parts

    def train(
        self,
        mode: bool = True,
        encoders_mode: dict[str, tuple[bool, bool]] | None = None,
        llm_mode: bool | None = None,
    ) -> MultimodalModel:
        """Set train/eval mode and, optionally, what trains. Returns the model.

        - `mode`: train (True) or eval (False) mode, as `nn.Module.train`.
        - `encoders_mode={"vision": (module_trainable, projector_trainable)}`: requires_grad of
          the named encoders' modules and projectors (and of the poolings of the `media` they run,
          e.g. video's newline, with the projector). Encoders not named keep theirs.
        - `llm_mode`: requires_grad of the language model; None leaves it as it is.

        Each argument touches only the parts it names: `train(llm_mode=False)` freezes the
        language model and nothing else (encoders and projectors keep their requires_grad),
        unlike Cornstarch, where `llm_mode=False` alone freezes every part. LLaVA phase 1 is
        `train(encoders_mode={"vision": (False, True)}, llm_mode=False)`.
        A PEFT-wrapped part made trainable trains only its adapters and `modules_to_save`,
        never its base weights. Fully frozen modules stay in eval mode (no dropout), and
        gradient checkpointing stays effective in them (see `model.checkpointing`).

        Raises MmloomError for unknown encoder names and for arguments of the wrong kind, e.g.
        `train({...}, False)`: pass `encoders_mode` and `llm_mode` by keyword.
        """
        self._check_train_arguments(mode, encoders_mode, llm_mode)
        if encoders_mode is not None:
            self._unknown_modalities(encoders_mode, "encoders_mode")
            for name, (module_trainable, projector_trainable) in encoders_mode.items():
                set_part_trainable(self.encoders[name].module, bool(module_trainable))
                set_part_trainable(self.encoders[name].projector, bool(projector_trainable))
                for media, encoder_name in self.media_encoders.items():
                    if encoder_name == name:
                        set_part_trainable(self.pool(media), bool(projector_trainable))
        if llm_mode is not None:
            set_part_trainable(self.language_model, bool(llm_mode))
        super().train(mode)
        apply_eval_to_frozen(self)
        sync_frozen_checkpointing(self)
        return self

    def _check_train_arguments(self, mode, encoders_mode, llm_mode) -> None:
        usage = ("use model.train(mode=True, encoders_mode={'vision': (module_trainable, projector_trainable)}, "
                 "llm_mode=True/False), with encoders_mode and llm_mode by keyword")
        if not isinstance(mode, bool):
            hint = " (the dict looks like encoders_mode)" if isinstance(mode, dict) else ""
            raise MmloomError(f"train(): mode must be True or False, got {type(mode).__name__} {mode!r}{hint}; {usage}")
        if encoders_mode is not None:
            if not isinstance(encoders_mode, dict):
                raise MmloomError(
                    f"train(): encoders_mode must be a dict of encoder name -> (module_trainable, "
                    f"projector_trainable), got {type(encoders_mode).__name__} {encoders_mode!r}; {usage}"
                )
            for name, value in encoders_mode.items():
                if not (isinstance(value, (tuple, list)) and len(value) == 2
                        and all(isinstance(v, bool) for v in value)):
                    raise MmloomError(
                        f"train(): encoders_mode[{name!r}] must be a pair of bools (module_trainable, "
                        f"projector_trainable), got {value!r}"
                    )
        if llm_mode is not None and not isinstance(llm_mode, bool):
            raise MmloomError(f"train(): llm_mode must be True, False or None, got {type(llm_mode).__name__}; {usage}")

    def freeze(self, patterns: str | list[str]) -> MultimodalModel:
        """Freeze parameters whose names match any regex (Cerebras names like `^image_model` map
        to `vision_encoder.module`, `^text_model` to `language_model`)."""
        set_requires_grad_by_patterns(self, [patterns] if isinstance(patterns, str) else list(patterns), False)
        apply_eval_to_frozen(self)
        sync_frozen_checkpointing(self)
        return self

    def unfreeze(self, patterns: str | list[str]) -> MultimodalModel:
        """Unfreeze parameters whose names match any regex. The base weights of a PEFT-wrapped
        part stay frozen (its adapters unfreeze); a pattern matching only such weights raises
        MmloomError."""
        set_requires_grad_by_patterns(self, [patterns] if isinstance(patterns, str) else list(patterns), True)
        self.train(self.training)
        return self

    def trainable_summary(self, print_table: bool = True) -> list[tuple[str, int, int]]:
        """Parameter counts per part (total, trainable); prints a table unless told not to."""
        rows = trainable_table(self.parts)
        if print_table:
            table = Table(title="mmloom parameters")
            for column in ("part", "parameters", "trainable", "mode"):
                table.add_column(column, justify="left" if column in ("part", "mode") else "right")
            for name, total, trainable in rows:
                module = self.parts[name]
                table.add_row(name, f"{total:,}", f"{trainable:,}", "train" if module.training else "eval")
            table.add_row("total", f"{sum(r[1] for r in rows):,}", f"{sum(r[2] for r in rows):,}", "")
            Console().print(table)
        return rows

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint activations in every encoder, projector and the language model, frozen
        parts included (phase 1: the frozen LLM that gradients flow through)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for part in [*(e.module for e in self.encoders.values()), self.language_model]:
            base = base_module(part)
            if getattr(base, "supports_gradient_checkpointing", False):
                enable_checkpointing(base, kwargs)
        for encoder in self.encoders.values():
            encoder.projector.gradient_checkpointing = True
        sync_frozen_checkpointing(self)

    def gradient_checkpointing_disable(self) -> None:
        """Turn activation checkpointing off in every encoder, projector and the language model."""
        for part in [*(e.module for e in self.encoders.values()), self.language_model]:
            base = base_module(part)
            if getattr(base, "supports_gradient_checkpointing", False):
                disable_checkpointing(base)
        for encoder in self.encoders.values():
            encoder.projector.gradient_checkpointing = False
        sync_frozen_checkpointing(self)

    # ------------------------------------------------------------ save and load
    @property
    def config(self) -> MultimodalConfig:
        """The :class:`MultimodalConfig` describing this composite as it is now (what config.json holds):
        each part's class and HF config, PEFT specs, projector configs, callbacks, placeholder ids, dtype."""
        encoders = {}
        for name, encoder in self.encoders.items():
            encoders[name] = {
                "module": _part_spec(encoder.module),
                "projector": encoder.projector.config.to_dict(),
                "callbacks": {slot: callback_to_dict(getattr(encoder, slot)) for slot in CALLBACK_SLOTS},
            }
        media = {name: {"encoder": encoder, "pool": callback_to_dict(self.pool(name))}
                 for name, encoder in self.media_encoders.items()}
        return MultimodalConfig(
            encoders=encoders,
            language_model=_part_spec(self.language_model),
            placeholder_token_ids=dict(self.placeholder_token_ids),
            media=media,
            torch_dtype=str(self.dtype).removeprefix("torch."),
        )

    def save_pretrained(
        self, save_directory: str | Path, trainable_only: bool = False, max_shard_size: str | int = "5GB"
    ) -> None:
        """Write config.json and safetensors weights (only trainable ones if asked), atomically."""
        config = self.config
        for name, spec in config.encoders.items():
            for slot, callback in spec["callbacks"].items():
                if callback is not None and callback["type"] == "<callable>":
                    warnings.warn(
                        f"{name} encoder's {slot} {callback['repr']} is an arbitrary callable: it cannot be "
                        "rebuilt from the saved config; pass it again to from_pretrained(callbacks=...)",
                        stacklevel=2,
                    )
            if spec["projector"]["projector_type"] == "custom":
                warnings.warn(
                    f"{name} projector wraps a custom module: pass it again to from_pretrained(projections=...)",
                    stacklevel=2,
                )
        state = self.state_dict()
        if trainable_only:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            state = {n: t for n, t in state.items() if n in trainable}
        state, config.tied_weights = ser.dedupe_shared_tensors(state)
        config.trainable_only = trainable_only
        with ser.atomic_directory(save_directory) as tmp:
            config.save(tmp)
            ser.save_state_dict(state, tmp, max_shard_size)

    @classmethod
    def from_config(
        cls,
        config: MultimodalConfig,
        callbacks: dict[str, dict[str, Any]] | None = None,
        projections: dict[str, nn.Module] | None = None,
        meta_parts: bool = False,
    ) -> MultimodalModel:
        """Build the composite (random weights) from a config; see `from_pretrained`. With
        `meta_parts`, the HF parts are built on the meta device (`mmloom.model.meta_init.meta_module`:
        no storage, buffers computed), for weights loaded later; projectors are built as always.
        Raises MmloomError when a projector wraps a custom module that is not passed in `projections`."""
        callbacks, projections = callbacks or {}, projections or {}
        encoders = {}
        for name, spec in config.encoders.items():
            slots = {}
            for slot in CALLBACK_SLOTS:
                given = callbacks.get(name, {})
                slots[slot] = given[slot] if slot in given else callback_from_dict(spec["callbacks"].get(slot))
            projector_config = MultimodalProjectorConfig.from_dict(spec["projector"])
            if projector_config.projector_type == "custom" and name not in projections:
                raise MmloomError(
                    f"the {name} projector wraps a custom module that cannot be rebuilt from config.json; "
                    f"pass it: from_pretrained(dir, projections={{'{name}': my_module}})"
                )
            projector = MultimodalProjector(projector_config, projection=projections.get(name))
            encoders[name] = ModalEncoderModule(_build_part(spec["module"], meta_parts), projector=projector, **slots)
        media = {name: (spec["encoder"], callback_from_dict(spec["pool"])) for name, spec in config.media.items()}
        return cls(
            encoders,
            _build_part(config.language_model, meta_parts),
            placeholder_token_ids=config.placeholder_token_ids,
            media=media,
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        torch_dtype: torch.dtype | str | None = None,
        base: str | Path | MultimodalModel | None = None,
        callbacks: dict[str, dict[str, Any]] | None = None,
        projections: dict[str, nn.Module] | None = None,
        device: str | torch.device | None = None,
    ) -> MultimodalModel:
        """Rebuild a saved composite, in its saved dtype unless `torch_dtype` says otherwise.

        A trainable-only save needs `base`: the full model (or its folder) that supplies the
        frozen weights.
        Raises MmloomError when the folder is not an mmloom model, or holds trainable parameters only and
        no `base` is given."""
        config = MultimodalConfig.load(directory)
        state = ser.load_state_dict(Path(directory))
        if config.trainable_only:
            if base is None:
                raise MmloomError(
                    f"{directory} holds trainable parameters only; pass base=<full model folder or model> "
                    "that supplies the other weights"
                )
            model = base if isinstance(base, MultimodalModel) else cls.from_pretrained(
                base, callbacks=callbacks, projections=projections
            )
            adapters.apply_peft_specs(model, config)  # a PEFT run's checkpoint: adapters on the plain base
        else:
            model = cls.from_config(config, callbacks=callbacks, projections=projections)
        model.load_weights(state, tied_weights=config.tied_weights, strict=not config.trainable_only)
        torch_dtype = config.torch_dtype if torch_dtype is None else torch_dtype  # default: as saved
        model.to(getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype)
        if device is not None:
            model.to(device)
        return model.eval()

    def load_weights(self, state: dict[str, torch.Tensor], tied_weights: dict[str, str] | None = None,
                     strict: bool = True) -> None:
        """Load a (possibly partial) state dict, re-tying weights that were saved once.
        Raises MmloomError when `state` has keys the model lacks, or (with `strict`) misses some of its
        weights."""
        state = dict(state)
        for dropped, kept in (tied_weights or {}).items():
            if kept in state:
                state[dropped] = state[kept]
        result = self.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise MmloomError(f"weights do not fit this model; unexpected keys: {result.unexpected_keys[:5]}")
        if strict and result.missing_keys:
            raise MmloomError(f"weights are missing for: {result.missing_keys[:5]}")
