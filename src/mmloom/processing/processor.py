"""MultimodalProcessor: conversations + media items -> model-ready tensors with labels.

It runs each modality's processor (through the modality's `MediaSpec`, `mmloom.processing.media`),
renders the conversation with a template, expands every placeholder (`<image>`, ...) to exactly as
many tokens as the composite model produces features for that item, and masks everything but the
assistant answers. It never touches the model: token ids and feature counts come from the model's
saved config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoProcessor, BatchFeature

from mmloom.errors import MmloomError
from mmloom.files import read_json, write_json
from mmloom.model.callbacks import AnyresPack
from mmloom.model.feature_count import token_count_spec
from mmloom.model.merge import IGNORE_INDEX
from mmloom.processing.image import ImageTransform
from mmloom.processing.media import MEDIA, default_placeholder, spec_for_processor
from mmloom.processing.media_spec import MediaSpec
from mmloom.processing.templates import (
    ConversationTemplate,
    default_template_name,
    get_template,
    messages_from_llava,
    tokenize_prompt,
)
from mmloom.processing.tokenizer import load_tokenizer, token_id
from mmloom.processing.tokenizer_files import save_tokenizer
from mmloom.remote_code import refuse_remote_code

PROCESSOR_CONFIG = "mmloom_processor.json"
TRANSFORM_FILE = "{name}_transform.json"  # an mmloom ImageTransform, saved as its steps


def _as_item_lists(items, batch_size: int, what: str) -> list[list[Any]]:
    """Normalise per-sample items: None, one item, or a list of items per sample."""
    if items is None:
        return [[] for _ in range(batch_size)]
    if len(items) != batch_size:
        raise MmloomError(f"got {len(items)} {what} entries for {batch_size} samples (use None for no {what})")
    return [[] if x is None else list(x) if isinstance(x, (list, tuple)) else [x] for x in items]


def pad_rows(rows, pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad (ids, labels) rows into input_ids, attention_mask and labels tensors (B, T)."""
    if padding_side not in ("left", "right"):
        raise MmloomError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[i, span] = torch.as_tensor(ids)
        labels[i, span] = torch.as_tensor(labs)
        attention_mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class MultimodalProcessor:
    """Tokenizer + template + one processor per modality.

    `num_tokens` maps each modality to the feature tokens one item becomes; build it from a
    model with `MultimodalProcessor.from_model(...)` so the two always agree. `sampling` says how
    the items of a sampled modality are taken (video: `{"video": {"num_frames": 8}}`, or `fps` with
    `max_frames`; the data build's `dataset.video`). `template` None: the
    tokenizer's own chat template (`tokenizer`) when it has one, else LLaVA-1.5's `vicuna_v1`.
    """

    def __init__(
        self,
        encoder_processors: dict[str, Any] | None = None,
        tokenizer=None,
        template: str | ConversationTemplate | None = None,
        num_tokens: dict[str, int] | None = None,
        placeholders: dict[str, str] | None = None,
        anyres: dict[str, dict[str, Any]] | None = None,
        template_options: dict[str, Any] | None = None,
        max_length: int | None = None,
        sampling: dict[str, dict[str, Any]] | None = None,
    ):
        if tokenizer is None:
            raise MmloomError("MultimodalProcessor needs a tokenizer")
        self.tokenizer = tokenizer
        self.encoder_processors = dict(encoder_processors or {})
        self.template_options = dict(template_options or {})
        if template is None:  # the tokenizer's own chat template when it has one, else vicuna_v1
            template = default_template_name(tokenizer)
        self.template = get_template(template, **self.template_options) if isinstance(template, str) else template
        self.placeholders = {
            name: default_placeholder(name) for name in self.encoder_processors
        } | dict(placeholders or {})
        self.num_tokens = dict(num_tokens or {})
        self.anyres = dict(anyres or {})  # modality -> AnyresPack settings: tokens depend on image size
        self.sampling = dict(sampling or {})  # modality -> how its items are sampled (video: num_frames or fps)
        self.max_length = max_length
        self.placeholder_ids = {}
        for name, placeholder in self.placeholders.items():
            placeholder_id = token_id(tokenizer, placeholder)
            if placeholder_id is None:
                raise MmloomError(
                    f"placeholder {placeholder!r} for {name} is not a token of the tokenizer: add it with "
                    f"tokenizer.add_special_tokens({{'additional_special_tokens': [{placeholder!r}]}})"
                )
            self.placeholder_ids[name] = placeholder_id
        # one media-item spec per modality: how its items are processed and counted
        self.media: dict[str, MediaSpec] = {
            name: spec_for_processor(name, self.encoder_processors.get(name), placeholder, self.placeholder_ids[name],
                                     self.num_tokens.get(name), self.anyres.get(name), self.sampling.get(name))
            for name, placeholder in self.placeholders.items()
        }

    @classmethod
    def from_model(cls, model, tokenizer, encoder_processors: dict[str, Any], template=None, **kwargs):
        """A processor whose feature counts and placeholder ids are read from `model` (or its config)."""
        from mmloom.model.callbacks import callback_from_dict
        from mmloom.model.multimodal import MultimodalConfig

        config = model if isinstance(model, MultimodalConfig) else model.config
        num_tokens, anyres = {}, {}
        for name, spec in config.encoders.items():
            if isinstance(model, MultimodalConfig):
                hf_config = config.encoder_hf_config(name)
                callbacks = {slot: callback_from_dict(cb) for slot, cb in spec["callbacks"].items()}
            else:
                hf_config, callbacks = model.encoders[name].config, model.encoders[name].callbacks
            packer = callbacks.get("postprocess_projector_callback")
            if isinstance(packer, AnyresPack):
                anyres[name] = {k: v for k, v in packer.to_dict().items() if k != "hidden_size"}
            else:
                num_tokens[name] = token_count_spec(hf_config, callbacks)
        for name, spec in config.media.items():  # modalities run by another's encoder: their pooling counts
            pool = callback_from_dict(spec["pool"]) if isinstance(model, MultimodalConfig) else model.pool(name)
            num_tokens[name] = pool.count_rule()
        processor = cls(encoder_processors, tokenizer, template, num_tokens=num_tokens, anyres=anyres, **kwargs)
        for name, model_id in config.placeholder_token_ids.items():
            if processor.placeholder_ids.get(name) != model_id:
                raise MmloomError(
                    f"the model's {name} placeholder id is {model_id} but the tokenizer gives "
                    f"{processor.placeholder_ids.get(name)} for {processor.placeholders.get(name)!r}"
                )
        return processor

    # ----------------------------------------------------------------- encoding
    def _messages(self, sample) -> list[dict]:
        """A sample as chat messages: messages, LLaVA turns, or a whole LLaVA record."""
        if isinstance(sample, dict):
            sample = sample.get("conversations", sample.get("messages"))
        if sample and isinstance(sample[0], dict) and "from" in sample[0]:
            return messages_from_llava(sample, placeholder=tuple(self.placeholders.values()))
        return list(sample)

    def item_tokens(self, modality: str, items: list[Any], inputs: dict[str, Any] | None = None) -> list[int]:
        """Feature tokens each item of `modality` becomes (its spec's count rule: a fixed count, from
        each image's size for anyres, from the items' encoder `inputs` (or their processor's outputs)
        for variable-resolution images and audio). Raises MmloomError when the processor has no count
        for `modality` (build it with `from_model`)."""
        if modality not in self.anyres and modality not in self.num_tokens:
            raise MmloomError(f"no feature-token count for {modality}: build the processor with from_model()")
        return self.media[modality].token_counts(items, inputs)

    def encode_messages(
        self, messages: list[dict], item_tokens: dict[str, list[int]], add_generation_prompt: bool = False,
        index: int = 0,
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels of one conversation, each placeholder expanded to its item's feature
        tokens (`item_tokens[modality]`: one count per item, in order)."""
        tokenized = self.template.tokenize(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                                           placeholders=tuple(self.placeholders.values()))
        return self._expand(tokenized.input_ids, tokenized.labels, item_tokens, index)

    def _expand(self, ids: list[int], labels: list[int], item_tokens: dict[str, list[int]], index: int):
        id_to_modality = {pid: name for name, pid in self.placeholder_ids.items()}
        for name, pid in self.placeholder_ids.items():
            found, given = ids.count(pid), len(item_tokens.get(name, []))
            if found != given:
                raise MmloomError(
                    f"sample {index}: {found} {self.placeholders[name]} placeholder(s) in the text but "
                    f"{given} {name} item(s) given"
                )
        remaining = {name: iter(counts) for name, counts in item_tokens.items()}
        out_ids, out_labels = [], []
        for token, label in zip(ids, labels, strict=True):
            modality = id_to_modality.get(token)
            if modality is None:
                out_ids.append(token)
                out_labels.append(label)
                continue
            n = next(remaining[modality])
            out_ids += [token] * n
            out_labels += [IGNORE_INDEX] * n
        if self.max_length is not None and len(out_ids) > self.max_length:
            raise MmloomError(
                f"sample {index} is {len(out_ids)} tokens long (placeholders expanded), over max_length "
                f"{self.max_length}; it is not truncated because that could cut a placeholder span"
            )
        return out_ids, out_labels

    def __call__(
        self,
        conversations: Sequence | None = None,
        text: Sequence[str] | None = None,
        *,
        add_generation_prompt: bool = False,
        padding_side: str = "right",
        return_labels: bool = True,
        processor_kwargs: dict[str, dict] | None = None,
        **items,
    ) -> BatchFeature:
        """Process a batch. The media items come per modality under its spec's `keyword`
        (`images=`, `audio=`): per sample None, one item or a list of items, in placeholder order
        (images: PIL images or arrays; audio: waveforms at the extractor's rate or file paths).

        `conversations` are chat messages or LLaVA records (rendered with the template);
        `text` are raw prompts used as they are (e.g. "USER: <image>\\nWhat? ASSISTANT:").
        `processor_kwargs` maps a modality to keyword arguments of its processor.
        Returns input_ids, attention_mask, labels and one dict of inputs per modality with items
        (e.g. `vision={"pixel_values": ...}`: the batch format of `mmloom.model.batch`), ready for
        `model(**batch)`. Raises MmloomError for an unknown keyword, items of a modality without a
        processor, and placeholders that do not match the items.
        """
        if (conversations is None) == (text is None):
            raise MmloomError("pass either conversations or text")
        samples = list(conversations if conversations is not None else text)
        known = {spec.keyword for spec in self.media.values()} | {cls.processor_arg for cls in MEDIA.values()}
        if set(items) - known:
            raise MmloomError(f"unknown argument(s) {sorted(set(items) - known)}; the items go as "
                              f"{', '.join(f'{arg}=' for arg in sorted(known))}")
        per_sample = {name: _as_item_lists(items.get(spec.keyword), len(samples), spec.keyword)
                      for name, spec in self.media.items()}
        encoded = {}
        for name, spec in self.media.items():
            flat = [item for sample_items in per_sample[name] for item in sample_items]
            if flat:
                if name not in self.encoder_processors:
                    raise MmloomError(f"no processor for {name} inputs; this processor has "
                                      f"{sorted(self.encoder_processors)}")
                encoded[name] = spec.encoder_inputs(flat, **(processor_kwargs or {}).get(name, {}))
        counted = {}
        for name in self.media:
            flat = [item for sample_items in per_sample[name] for item in sample_items]
            flat_counts = iter(self.item_tokens(name, flat, encoded.get(name)))
            counted[name] = [[next(flat_counts) for _ in sample_items] for sample_items in per_sample[name]]
        rows = []
        for index, sample in enumerate(samples):
            tokens = {name: counted[name][index] for name in self.media}
            if text is not None:  # LLaVA's tokenizer_image_token layout
                ids = tokenize_prompt(self.tokenizer, sample, tuple(self.placeholders.values()))
                rows.append(self._expand(ids, list(ids), tokens, index))
            else:
                rows.append(self.encode_messages(self._messages(sample), tokens, add_generation_prompt, index))
        batch = self.pad(rows, padding_side)
        if not return_labels:
            batch.pop("labels")
        batch.update(encoded)
        return BatchFeature(batch)

    def pad(self, rows: list[tuple[list[int], list[int]]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad (ids, labels) rows into input_ids, attention_mask and labels tensors (B, T)."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return pad_rows(rows, pad_id, padding_side)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        """The tokenizer's `batch_decode` (ids (B, T) -> B strings)."""
        return self.tokenizer.batch_decode(ids, **kwargs)

    # ------------------------------------------------------------ save and load
    def to_dict(self) -> dict[str, Any]:
        """The settings saved in `mmloom_processor.json` (template, placeholders, token counts...)."""
        return {
            "template": self.template.name,
            "template_options": self.template_options,
            "placeholders": self.placeholders,
            "num_tokens": self.num_tokens,
            "anyres": self.anyres,
            **({"sampling": self.sampling} if self.sampling else {}),
            "max_length": self.max_length,
            "encoder_processors": sorted(self.encoder_processors),
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the tokenizer, each modality's processor (`{name}_processor/`) and the settings."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_tokenizer(self.tokenizer, directory)
        for name, processor in self.encoder_processors.items():
            if isinstance(processor, ImageTransform):
                spec = {"image_size": processor.image_size, "transforms": processor.to_config()}
                write_json(directory / TRANSFORM_FILE.format(name=name), spec)
            elif hasattr(processor, "save_pretrained"):
                processor.save_pretrained(directory / f"{name}_processor")
            else:
                raise MmloomError(
                    f"the {name} processor ({type(processor).__name__}) cannot be saved; use a HF processor "
                    "or an mmloom ImageTransform"
                )
        write_json(directory / PROCESSOR_CONFIG, self.to_dict(), sort_keys=True)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides) -> MultimodalProcessor:
        """Load a processor saved by `save_pretrained` (tokenizer through `load_tokenizer`, each
        modality's processor); `overrides` replace saved settings (a `template` given without
        `template_options` drops the saved template's options). Raises MmloomError when the
        folder has no `mmloom_processor.json`."""
        directory = Path(directory)
        path = directory / PROCESSOR_CONFIG
        if not path.exists():
            raise MmloomError(f"{path} not found: save a processor with MultimodalProcessor.save_pretrained")
        settings = read_json(path)
        processors = {}
        for name in settings.pop("encoder_processors"):
            transform = directory / TRANSFORM_FILE.format(name=name)
            if transform.exists():
                spec = read_json(transform)
                processors[name] = ImageTransform.from_config(spec["transforms"], spec["image_size"])
                continue
            loader = getattr(transformers, MEDIA[name].hf_processor_loader) if name in MEDIA else AutoProcessor
            refuse_remote_code(directory / f"{name}_processor", f"{name} processor folder")
            processors[name] = loader.from_pretrained(directory / f"{name}_processor", trust_remote_code=False)
        tokenizer = load_tokenizer(directory)
        if "template" in overrides and "template_options" not in overrides:
            settings.pop("template_options", None)  # the saved options belong to the saved template
        return cls(processors, tokenizer, **{**settings, **overrides})
