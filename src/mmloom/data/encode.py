"""Per-record encoding shared by `mmloom data build` (HDF5) and `JsonlLlavaDataset`.

`encode_record` turns one LLaVA record into the expanded token layout:

    template tokens before <image>  +  [slot_fill_id x num_feature_tokens]  +  tokens after <image>

(the ids of LLaVA's `tokenizer_image_token` + conversation template, each placeholder id expanded to
its item's slots) with HF-convention labels (unshifted, -100 = not supervised, -100 on every slot)
and the positions of the slots, which every later stage reads instead of looking for token values.
The items of each modality come as :class:`MediaSlots` (their `MediaSpec`, paths and feature-token
counts); images (`vision`) keep the seed's layout (`SLOT_LAYOUT`), the other modalities get runs of
slots where their placeholders stand. `to_h5_rows` turns that layout into the seed's four int32
rows of length MSL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmloom.data.records_io import SkipRecord, parse_json_line, relative_media_path, unencodable_text
from mmloom.model.merge import IGNORE_INDEX
from mmloom.processing.media import MEDIA
from mmloom.processing.media_spec import MediaSpec
from mmloom.processing.templates import ConversationError, messages_from_llava

# The modality laid out as the seed's (Cerebras') image slots: a lone placeholder moved to the front of
# its turn, one masked run of slots for text-only samples (`text_only_slots`), `image_starts`.
SLOT_LAYOUT = "vision"

# Reasons a record is skipped, in the order the build summary (and data_params.json) lists them: the
# record's and the images' (the seed's layout), the other modalities' (their specs' `reasons`), too_long.
_RECORD_REASONS = (
    "bad_json",
    "bad_encoding",
    "line_too_long",
    "bad_record",
    "bad_image_path",
    "missing_image",
    "bad_image",
    "image_too_large",
    "no_human_turn",
    "roles_not_alternating",
    "empty_answer",
    "unknown_role",
    "image_token_mismatch",
    "multiple_images",
    "image_in_later_turn",
)
SKIP_REASONS = (
    *_RECORD_REASONS,
    *(reason for spec in MEDIA.values() for reason in spec.reasons if reason not in _RECORD_REASONS),
    "too_long",
)


@dataclass(frozen=True)
class MediaSlots:
    """One modality's items of a record: its spec, the items' relative paths (in placeholder order)
    and the feature tokens (slots) of each."""

    spec: MediaSpec
    paths: list[str]
    counts: list[int]


@dataclass
class EncodedSample:
    """One record in the expanded token layout (LLaVA's `tokenizer_image_token` layout, each item's
    single placeholder replaced by its slot tokens).

    `items` maps each modality to its items `(relative path, first slot, slots)` in placeholder
    order. `image_starts` holds the first slot of each image run (`SLOT_LAYOUT`); a text-only
    sample built with `text_only_slots` has one (masked) slot run too, so `image_starts` is not
    empty for it while its `vision` items are. `attention_mask` is 0 exactly on the masked run of a
    text-only sample (its slots and the filler before them, see `encode_record`).
    """

    input_ids: list[int]  # expanded; the slots hold slot_fill_id
    labels: list[int]  # HF convention (unshifted); -100 on the slots
    attention_mask: list[int]  # 1 = attended; 0 on the masked slots of text-only samples
    image_starts: list[int]  # first slot of each image slot run, in order
    num_feature_tokens: int  # slots per image run (0 when none)
    image_turn: int  # index of the user turn holding the first image (-1: no image)
    raw_chars: int  # characters / UTF-8 bytes of the record's turn texts
    raw_bytes: int
    items: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)

    def paths(self, modality: str) -> list[str]:
        """The relative paths of the sample's items of `modality`, in placeholder order."""
        return [path for path, _, _ in self.items.get(modality, [])]

    def spans(self, modality: str) -> list[tuple[int, int]]:
        """(first slot, slots) of each of the sample's items of `modality`."""
        return [(start, n) for _, start, n in self.items.get(modality, [])]

    @property
    def images(self) -> list[str]:
        """Relative image paths, in placeholder order ([] = no image)."""
        return self.paths(SLOT_LAYOUT)

    @property
    def has_image(self) -> bool:
        """Whether the sample has at least one image."""
        return bool(self.images)

    @property
    def image(self) -> str | None:
        """The first image's relative path, None for text-only."""
        return self.images[0] if self.images else None

    @property
    def image_start(self) -> int:
        """The first slot of the first run, -1 when the sample has no slots."""
        return self.image_starts[0] if self.image_starts else -1


def parse_record_line(line: str) -> dict:
    """One jsonl line as a record dict; raises SkipRecord('bad_json')."""
    record = parse_json_line(line)
    if not isinstance(record, dict):
        raise SkipRecord("bad_json", "the line is not a JSON object")
    return record


def _turns(record: dict, conversation_key: str, content_key: str) -> list[dict]:
    conv = record.get(conversation_key)
    if not isinstance(conv, list) or not conv:
        raise SkipRecord("bad_record", f"'{conversation_key}' must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise SkipRecord("bad_record", f"turn {i} is not an object")
        value = turn.get(content_key)
        if not isinstance(value, str):
            raise SkipRecord("bad_record", f"turn {i} has no string '{content_key}'")
        bad = unencodable_text(value)
        if bad is not None:
            raise SkipRecord("bad_encoding", f"turn {i}: {bad}")
        role = turn.get("from", turn.get("role"))  # unknown / missing roles: messages_from_llava decides
        turns.append({"from": role, "value": value})
    return turns


def record_paths(record: dict, key: str) -> list[str]:
    """The record's relative media paths under `key` (a spec's `record_key`; [] when absent): a string or
    a list of strings (LLaVA's form). Raises SkipRecord("bad_record") for anything else."""
    value = record.get(key)
    if value is None or value == "" or value == []:
        return []
    paths = value if isinstance(value, list) else [value]
    if not all(isinstance(p, str) and p for p in paths):
        raise SkipRecord("bad_record", f"'{key}' must be a path or a list of paths")
    return list(paths)


def media_file(spec: MediaSpec, relative: str) -> Path:
    """The file of a record's item path under the spec's folder; SkipRecord('bad_<noun>_path') for a
    path that leaves it (absolute, a drive letter, or `..` parts: `relative_media_path`)."""
    return spec.path(relative_media_path(relative, spec.noun, reason=f"bad_{spec.noun}_path"))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_record(
    record: dict,
    *,
    tokenizer: Any,
    template: Any,
    media: Sequence[MediaSlots],
    slot_fill_id: int | None = None,
    conversation_key: str = "conversations",
    content_key: str = "value",
    max_length: int | None = None,
    text_only_slots: bool = False,
) -> EncodedSample:
    """Encode one LLaVA record; raises `SkipRecord` with a reason for bad records.

    `media` holds the record's items of each modality (`MediaSlots`: spec with its placeholder and
    token id, paths, feature tokens per item), in `MEDIA` order.

    - a record carries as many placeholders of each modality in its human turns as it has items
      (else `<noun>_token_mismatch`); a single one is moved to the front of its turn (LLaVA's
      `preprocess_multimodal`), several stay where they are;
    - the template tokenizes the conversation in LLaVA's layout (`tokenize_segments`); each
      placeholder id becomes its item's number of slots, filled with `slot_fill_id` (None: the
      placeholder's own id), attended, labels -100; their positions are recorded in `items`;
    - images (`SLOT_LAYOUT`) take `spec.fixed_token_count` slots each and are recorded in
      `image_starts` too. `text_only_slots`: a text-only record gets one masked image slot run
      (the seed's / Cerebras' layout). Its attended tokens are exactly the tokenization of the
      conversation without an image; the slots go where an image sample's slots would go: the
      tokens the image variant has between the common prefix and its slots (e.g. Llama's `▁` after
      `USER:`) are inserted as masked filler, so the run starts at the dataset's image start index
      and never splits a word;
    - samples longer than `max_length` raise `too_long` (never truncated).
    """
    turns = _turns(record, conversation_key, content_key)
    for slots in media:
        spec = slots.spec
        found = sum(t["value"].count(spec.placeholder) for t in turns)
        if found != len(slots.paths) or len(slots.counts) != len(slots.paths):
            raise SkipRecord(f"{spec.noun}_token_mismatch",
                             f"{found} '{spec.placeholder}' in the turns for {len(slots.paths)} {spec.item_noun}(s)")
        if any(spec.placeholder in t["value"] for t in turns if t["from"] not in ("human", "user")):
            raise SkipRecord(f"{spec.noun}_token_mismatch", f"'{spec.placeholder}' in a non-human turn")
    raw_chars = sum(len(t["value"]) for t in turns)
    raw_bytes = sum(len(t["value"].encode("utf-8")) for t in turns)
    try:
        messages = messages_from_llava(turns, move_image_to_front=True,
                                       placeholder=tuple(slots.spec.placeholder for slots in media))
    except ConversationError as exc:
        raise SkipRecord(getattr(exc, "reason", "bad_record"), str(exc)) from None

    tok = template.tokenize(tokenizer, messages)
    ids, labels = list(tok.input_ids), list(tok.labels)
    attention = [1] * len(ids)
    layout = next((slots for slots in media if slots.spec.modality == SLOT_LAYOUT), None)
    runs: list[tuple[int, int, str]] = []  # (placeholder position, slots, modality)
    images: list[str] = []
    if layout is not None:
        images, spec = layout.paths, layout.spec
        positions = [i for i, t in enumerate(ids) if t == spec.token_id]
        if images and len(positions) != len(images):
            raise SkipRecord("image_token_mismatch", f"{len(positions)} image tokens after templating")
        if not images and positions and not (text_only_slots and len(positions) == 1):
            raise SkipRecord("image_token_mismatch", "image token in a text-only sample")
        if not images and text_only_slots and not positions:  # masked slots where an image's would be
            ids, labels, attention, positions = _with_masked_slot_marker(
                tokenizer, template, messages, ids, labels, spec.placeholder, spec.token_id
            )
        runs += [(p, spec.fixed_token_count or 0, SLOT_LAYOUT) for p in positions]
    for slots in media:
        if slots is layout:
            continue
        spec = slots.spec
        positions = [i for i, t in enumerate(ids) if spec.token_id is not None and t == spec.token_id]
        if len(positions) != len(slots.paths):
            raise SkipRecord(f"{spec.noun}_token_mismatch", f"{len(positions)} {spec.noun} tokens after templating")
        runs += [(p, n, spec.modality) for p, n in zip(positions, slots.counts, strict=True)]
    fill = {slots.spec.modality: slot_fill_id if slot_fill_id is not None else slots.spec.token_id for slots in media}
    masked = not images
    out_ids: list[int] = []
    out_labels: list[int] = []
    out_attention: list[int] = []
    starts: list[int] = []
    spans: dict[str, list[tuple[int, int]]] = {}
    prev = 0
    for p, n, modality in sorted(runs):
        out_ids += ids[prev:p]
        out_labels += labels[prev:p]
        out_attention += attention[prev:p]
        if modality == SLOT_LAYOUT:
            starts.append(len(out_ids))
        spans.setdefault(modality, []).append((len(out_ids), n))
        out_ids += [fill[modality]] * n
        out_labels += [IGNORE_INDEX] * n
        out_attention += [0 if masked and modality == SLOT_LAYOUT else 1] * n
        prev = p + 1
    out_ids += ids[prev:]
    out_labels += labels[prev:]
    out_attention += attention[prev:]
    if max_length is not None and len(out_ids) > max_length:
        raise SkipRecord("too_long", f"{len(out_ids)} tokens > {max_length}")
    if not any(label != IGNORE_INDEX for label in out_labels):
        raise SkipRecord("empty_answer", "no supervised token")
    image_turn = -1
    if images:
        user_turns = [m["content"] for m in messages if m["role"] == "user"]
        image_turn = next(k for k, text in enumerate(user_turns) if layout.spec.placeholder in text)
    items = {slots.spec.modality: [(path, start, n) for path, (start, n) in
                                   zip(slots.paths, spans.get(slots.spec.modality, []), strict=True)]
             for slots in media if slots.paths}
    return EncodedSample(
        out_ids, out_labels, out_attention, starts, (layout.spec.fixed_token_count or 0) if starts else 0,
        image_turn, raw_chars, raw_bytes, items,
    )


def _with_masked_slot_marker(tokenizer, template, messages, ids, labels, image_token, image_token_id):
    """A text-only conversation's ids with one (masked) image marker where an image sample's goes.

    Returns (ids, labels, attention, [marker position]): the filler tokens the image variant has
    between the common prefix and its marker are inserted before the marker, unattended.
    """
    variant = [dict(m) for m in messages]
    first_user = next(m for m in variant if m["role"] == "user")
    first_user["content"] = image_token + "\n" + first_user["content"]
    image_ids = list(template.tokenize(tokenizer, variant).input_ids)
    if image_ids.count(image_token_id) != 1:  # the template drops user text: slots after BOS
        at = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        return ids[:at] + [image_token_id] + ids[at:], labels[:at] + [IGNORE_INDEX] + labels[at:], \
            [1] * (len(ids) + 1), [at]
    marker = image_ids.index(image_token_id)
    split = _common_prefix(ids, image_ids[:marker])
    filler = image_ids[split:marker]
    new_ids = ids[:split] + filler + [image_token_id] + ids[split:]
    new_labels = labels[:split] + [IGNORE_INDEX] * (len(filler) + 1) + labels[split:]
    attention = [1] * split + [0] * (len(filler) + 1) + [1] * (len(ids) - split)
    return new_ids, new_labels, attention, [split + len(filler)]


def to_h5_rows(sample: EncodedSample, max_sequence_length: int, pad_id: int) -> np.ndarray:
    """The seed's `[4, MSL]` int32 rows: input ids, loss mask, labels (ids shifted left), inverted attention.

    `loss_mask[t] = 1` when the token at t+1 is supervised, so the last image slot carries loss
    when the first token after the image is supervised (phase 1: the first caption token).
    Text-only samples keep their slots but mark them (and their filler) as padding (row 3 = 1, no
    loss at or just before them).
    """
    msl = max_sequence_length
    n = len(sample.input_ids)
    if n > msl:
        raise SkipRecord("too_long", f"{n} tokens > {msl}")
    rows = np.empty((4, msl), dtype=np.int32)
    ids = np.asarray(sample.input_ids, dtype=np.int32)
    sup = np.asarray(sample.labels, dtype=np.int64) != IGNORE_INDEX
    attended = np.asarray(sample.attention_mask, dtype=bool)
    rows[0].fill(pad_id)
    rows[0, :n] = ids
    rows[1].fill(0)
    rows[1, : n - 1] = sup[1:] & attended[:-1]
    rows[2].fill(pad_id)
    rows[2, : n - 1] = ids[1:]
    rows[3].fill(1)
    rows[3, :n] = ~attended
    return rows
