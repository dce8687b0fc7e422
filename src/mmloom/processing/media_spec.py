"""What a media item is, for one modality: the interface every stage reads items through.

A :class:`MediaSpec` says, for one modality (images, audio clips; video next), everything that
differs between modalities on an item's way from a record or a prompt to its encoder:

- where items are named: the record key (`image`, `audio`), the placeholder in the text
  (`<image>`, `<audio>`) and its token id, the folder relative paths start from;
- how an item is read (:meth:`MediaSpec.load`: decoded and checked, :class:`MediaError` with the
  build's skip reason otherwise), how many feature tokens it becomes (:meth:`MediaSpec.token_counts`,
  the same rule the model counts with), what its encoder takes (:meth:`MediaSpec.encoder_inputs`),
  the dummy item that keeps the encoder in every micro-batch (:meth:`MediaSpec.dummy`) and the
  baseline of demos and `generate` (:meth:`MediaSpec.blank`);
- what the data build records about it (:meth:`MediaSpec.params`, `data_params.json`'s
  `modalities.<modality>`) and how a spec is made again from that (:meth:`MediaSpec.from_data`).

The stages (the build, the datasets and collators, the trainer's wiring, the processor, chat and
`generate`) iterate over specs; `mmloom.processing.media.MEDIA` lists them. The concrete specs live
beside their loaders: `ImageSpec` in `processing/image.py`, `AudioSpec` in `processing/audio.py`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from mmloom.errors import MmloomError


class MediaError(MmloomError):
    """A media file cannot be used. `path` names it, `reason` is the data build's skip reason
    (`missing_image`, `bad_audio`, ... one of the spec's `reasons`) and `detail` says what is wrong."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str, message: str | None = None):
        super().__init__(message if message is not None else f"cannot use {str(path)!r}: {detail}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class MediaSpec(ABC):
    """One modality's items on their way from a record or a prompt to its encoder.

    Instance fields: `modality` (the key of the model's `placeholder_token_ids`, of the processor's
    encoder processors, of the batch's input dict and of `data_params.json`'s `modalities`),
    `placeholder` (its text in records and prompts), `record_key` (the record field holding the
    item paths: one path or a list), `token_id` (the placeholder's id; None: not known yet) and
    `folder` (the root of relative item paths; None: the current folder).

    Class attributes, the same for every instance of a kind: `noun` (skip reasons, messages, the
    HDF5 dataset prefix, CLI options: `--image`, `--image-dir`), `item_noun` (one item in messages),
    `processor_arg` (the `MultimodalProcessor` keyword), `folder_keys` (the build's key and the
    trainer's input key of the folder), `build_key` (the section of the build's `dataset` that
    holds the modality's settings; None: `dataset` itself), `reasons` (its skip reasons),
    `baseline` (the `generate` option that replaces every item by :meth:`blank`), `cli_help` (the
    help of the `chat` option (`item`), of the `generate` folder option (`dir`) and of `baseline`),
    `default_placeholder`, `token_offset` (a tokenizer without the placeholder gets id
    `vocab_size + token_offset`), `hf_processor_loader` (the transformers Auto class its saved
    processor loads with) and `shared_encoder` (the encoder of another modality that runs the items,
    with its inputs' transform: `vision` for video frames; None: an encoder of its own).

    A kind implements the abstract methods; `check`, `check_encoder`, `fixed_token_count` and
    `params` have defaults (a full decode, no check, a count that needs the item, nothing recorded in
    data_params.json); a kind whose `params` records its items implements `summary_row` too.
    """

    noun: ClassVar[str]
    item_noun: ClassVar[str]
    processor_arg: ClassVar[str]
    folder_keys: ClassVar[tuple[str, str]]
    build_key: ClassVar[str | None]
    reasons: ClassVar[tuple[str, ...]]
    baseline: ClassVar[str]
    cli_help: ClassVar[dict[str, str]]
    default_placeholder: ClassVar[str]
    token_offset: ClassVar[int]
    hf_processor_loader: ClassVar[str]
    shared_encoder: ClassVar[str | None] = None

    modality: str
    placeholder: str
    record_key: str
    token_id: int | None = None
    folder: Path | None = None

    # --------------------------------------------------------------------- naming
    @property
    def encoder(self) -> str:
        """The encoder that runs this modality's items: `shared_encoder`, else its own."""
        return self.shared_encoder or self.modality

    @property
    def keyword(self) -> str:
        """The `MultimodalProcessor` keyword of the items: `processor_arg` (`images`, `audio`), or the
        modality's name for an encoder under another name (a second image encoder `sketch`: `sketch=`)."""
        return self.processor_arg if self.modality == type(self).modality else self.modality

    def path(self, relative: str | os.PathLike) -> Path:
        """The file of an item path: under `folder` when the path is relative."""
        return Path(self.folder) / relative if self.folder is not None else Path(relative)

    def with_settings(self, **changes: Any) -> MediaSpec:
        """A copy with some fields changed (e.g. the token id once a tokenizer gave it)."""
        return replace(self, **changes)

    @property
    @abstractmethod
    def encoder_processor(self) -> Any:
        """What turns items into encoder inputs (an image transform, a feature extractor): what the
        processor saved with a trained model holds for this modality."""
        raise NotImplementedError

    def check_encoder(self, encoder: Any, where: str) -> None:
        """Refuse (MmloomError naming `where`, the data) an encoder that reads or counts this
        modality's items otherwise than the spec does; the default checks nothing."""
        return None

    # --------------------------------------------------------------------- items
    @abstractmethod
    def load(self, path: str | os.PathLike) -> Any:
        """The item stored at `path`, decoded and checked; MediaError (with a skip reason) otherwise."""
        raise NotImplementedError

    def check(self, path: str | os.PathLike) -> None:
        """Raise MediaError unless `path` holds a usable item (the data build's check)."""
        self.load(path)

    @property
    def sampling(self) -> dict[str, Any] | None:
        """How items are sampled before encoding (video frames: `{"num_frames": k}`), what the processor
        saved with a model keeps; None for kinds read whole."""
        return None

    @property
    def fixed_token_count(self) -> int | None:
        """Feature tokens of every item when they do not depend on the item (a fixed-size image
        encoder), else None: the count needs the item (:meth:`token_counts`)."""
        return None

    @abstractmethod
    def token_counts(self, items: Sequence[Any], inputs: dict[str, Any] | None = None) -> list[int]:
        """Feature tokens of each item, by the rule the model counts with; `inputs` are the
        items' :meth:`encoder_inputs` when already computed."""
        raise NotImplementedError

    @abstractmethod
    def encoder_inputs(self, items: Sequence[Any], **kwargs: Any) -> dict[str, Any]:
        """What the encoder takes for `items`, stacked in order (the batch format of
        `mmloom.model.batch`); `kwargs` go to the modality's own processor."""
        raise NotImplementedError

    @abstractmethod
    def dummy(self) -> tuple[dict[str, Any], int]:
        """(encoder inputs of one item, its feature tokens): the item given to micro-batches
        without any, so that the encoder runs on every micro-batch of every rank (DDP/FSDP)."""
        raise NotImplementedError

    @abstractmethod
    def blank(self, item: Any) -> Any:
        """The item with its content removed but its shape kept: the baseline that shows whether
        answers come from the item."""
        raise NotImplementedError

    @classmethod
    @abstractmethod
    def from_processor(cls, modality: str, encoder_processor: Any, *, placeholder: str, token_id: int | None = None,
                       count: Any = None, anyres: dict[str, Any] | None = None, record_key: str | None = None,
                       sampling: dict[str, Any] | None = None) -> MediaSpec:
        """The spec of one modality of a `MultimodalProcessor`: its encoder processor, placeholder
        and id, its count rule (`num_tokens[modality]`; `anyres`: the image-size rule) and how items
        are sampled (`sampling[modality]`: video frames; None for the other kinds)."""
        raise NotImplementedError

    # --------------------------------------------------------------------- data_params.json
    def params(self, counts: dict[str, int]) -> dict[str, Any] | None:
        """What `data_params.json` records under `modalities.<modality>` (None: nothing there;
        images are described by the seed's own keys), with the build's `counts` of items."""
        return None

    @classmethod
    def summary_row(cls, recorded: dict[str, Any]) -> tuple[str, int]:
        """(label, samples) of the build summary's row for this modality, from what :meth:`params`
        recorded (kinds whose `params` record something implement it)."""
        raise NotImplementedError

    @property
    def folder_setting(self) -> str:
        """The build-config key of the folder, e.g. `dataset.image_dir`, `dataset.audio.audio_dir`."""
        return ".".join(["dataset", *([self.build_key] if self.build_key else []), self.folder_keys[0]])

    @classmethod
    @abstractmethod
    def from_build_config(cls, dataset: Any) -> MediaSpec | None:
        """The spec of a data build from its `dataset` config section (None: the build reads none)."""
        raise NotImplementedError

    @classmethod
    @abstractmethod
    def from_data(cls, data_params: dict[str, Any], folder: str | os.PathLike | None = None, **settings: Any
                  ) -> MediaSpec | None:
        """The spec of a built data folder (its `data_params.json`), items read from `folder`
        (None: the folder the build read them from); None when the data holds none of them."""
        raise NotImplementedError
