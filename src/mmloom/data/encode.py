"""Per-record encoding shared by `mmloom data build` (HDF5) and `JsonlLlavaDataset`.

`encode_record` turns one LLaVA record into the expanded token layout:

    template tokens before <image>  +  [slot_token_id x num_image_tokens]  +  tokens after <image>

with HF-convention labels (unshifted, -100 = not supervised, -100 on every image slot).
`to_h5_rows` turns that layout into the seed's four int32 rows of length MSL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmloom.errors import MmloomError

IGNORE_INDEX = -100

# Reasons a record is skipped, in the order the build summary lists them.
SKIP_REASONS = (
    "bad_json",
    "bad_record",
    "missing_image",
    "bad_image",
    "no_human_turn",
    "roles_not_alternating",
    "empty_answer",
    "unknown_role",
    "image_token_mismatch",
    "too_long",
)


class RecordSkipped(MmloomError):
    """A record that cannot be turned into a training sample; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class EncodedSample:
    input_ids: list[int]  # expanded; the image slots hold slot_token_id
    labels: list[int]  # HF convention (unshifted); -100 on the slots
    image_start: int  # first slot (or -1 when the sample has no slots)
    num_slots: int  # 0 when no slots were inserted
    image: str | None  # relative image path or None (text-only)
    raw_chars: int  # characters / UTF-8 bytes of the record's turn texts
    raw_bytes: int

    @property
    def has_image(self) -> bool:
        return self.image is not None


def parse_record_line(line: str) -> dict:
    """One jsonl line as a record dict, or RecordSkipped('bad_json')."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordSkipped("bad_json", str(exc)) from None
    if not isinstance(record, dict):
        raise RecordSkipped("bad_json", "the line is not a JSON object")
    return record


def _turns(record: dict, conversation_key: str, content_key: str) -> list[dict]:
    conv = record.get(conversation_key)
    if not isinstance(conv, list) or not conv:
        raise RecordSkipped("bad_record", f"'{conversation_key}' must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RecordSkipped("bad_record", f"turn {i} is not an object")
        value = turn.get(content_key)
        if not isinstance(value, str):
            raise RecordSkipped("bad_record", f"turn {i} has no string '{content_key}'")
        role = turn.get("from", turn.get("role"))  # unknown / missing roles: messages_from_llava decides
        turns.append({"from": role, "value": value})
    return turns


def record_image(record: dict, image_key: str = "image") -> str | None:
    """The record's relative image path, None for text-only; a list of paths is an error."""
    image = record.get(image_key)
    if image is None or image == "":
        return None
    if isinstance(image, list):
        if len(image) == 1 and isinstance(image[0], str):
            return image[0]
        raise RecordSkipped("image_token_mismatch", f"{len(image)} images; the format holds one per sample")
    if not isinstance(image, str):
        raise RecordSkipped("bad_record", f"'{image_key}' must be a string path")
    return image


def encode_record(
    record: dict,
    *,
    tokenizer: Any,
    template: Any,
    num_image_tokens: int,
    slot_token_id: int,
    image_token: str = "<image>",
    image_token_id: int | None = None,
    image_key: str = "image",
    conversation_key: str = "conversations",
    content_key: str = "value",
    max_length: int | None = None,
    text_only_slots: bool = False,
) -> EncodedSample:
    """Encode one LLaVA record; raises `RecordSkipped` with a reason for bad records.

    - a record with an image must carry exactly one `image_token` in its turns, one without
      an image none (else `image_token_mismatch`); LLaVA's move-to-front is applied;
    - the single `<image>` id of the template's tokens becomes `num_image_tokens` copies of
      `slot_token_id` (labels -100 there);
    - `text_only_slots`: text-only records also get the slots, placed where the first user
      content starts (the HDF5 format always has them; they are masked out there);
    - samples longer than `max_length` raise `too_long` (never truncated).
    """
    from mmloom.processing.templates import ConversationError, messages_from_llava

    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    image = record_image(record, image_key)
    turns = _turns(record, conversation_key, content_key)
    n_placeholders = sum(t["value"].count(image_token) for t in turns)
    if n_placeholders != (1 if image is not None else 0):
        what = f"image {image!r}" if image is not None else "no image"
        raise RecordSkipped("image_token_mismatch", f"{n_placeholders} '{image_token}' in the turns, {what}")
    if any(image_token in t["value"] for t in turns if t["from"] not in ("human", "user")):
        raise RecordSkipped("image_token_mismatch", f"'{image_token}' in a non-human turn")
    raw_chars = sum(len(t["value"]) for t in turns)
    raw_bytes = sum(len(t["value"].encode("utf-8")) for t in turns)
    try:
        messages = messages_from_llava(turns, move_image_to_front=True, placeholder=image_token)
    except ConversationError as exc:
        raise RecordSkipped(getattr(exc, "reason", "bad_record"), str(exc)) from None

    add_slots = image is not None or text_only_slots
    if image is None and text_only_slots:
        messages = [dict(m) for m in messages]
        for m in messages:
            if m["role"] == "user":
                m["content"] = image_token + m["content"]
                break

    tok = template.tokenize(tokenizer, messages)
    ids, labels = list(tok.input_ids), list(tok.labels)
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if image is not None and len(positions) != 1:
        raise RecordSkipped("image_token_mismatch", f"{len(positions)} image tokens after templating")
    if add_slots:
        if positions:
            if len(positions) != 1:
                raise RecordSkipped("image_token_mismatch", f"{len(positions)} image tokens after templating")
            p = positions[0]
            del ids[p], labels[p]
        else:  # the template dropped the user text of a text-only sample: slots after BOS
            p = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        ids[p:p] = [slot_token_id] * num_image_tokens
        labels[p:p] = [IGNORE_INDEX] * num_image_tokens
        start, n_slots = p, num_image_tokens
    else:
        if positions:
            raise RecordSkipped("image_token_mismatch", "image token in a text-only sample")
        start, n_slots = -1, 0
    if max_length is not None and len(ids) > max_length:
        raise RecordSkipped("too_long", f"{len(ids)} tokens > {max_length}")
    if not any(label != IGNORE_INDEX for label in labels):
        raise RecordSkipped("empty_answer", "no supervised token")
    return EncodedSample(ids, labels, start, n_slots, image, raw_chars, raw_bytes)


def to_h5_rows(sample: EncodedSample, max_sequence_length: int, pad_id: int) -> np.ndarray:
    """The seed's `[4, MSL]` int32 rows: input ids, loss mask, labels (ids shifted left), inverted attention.

    `loss_mask[t] = 1` when the token at t+1 is supervised, so the last image slot carries loss
    when the first token after the image is supervised (phase 1: the first caption token).
    Text-only samples keep their slots but mark them as padding (row 3 = 1, no loss).
    """
    msl = max_sequence_length
    n = len(sample.input_ids)
    if n > msl:
        raise RecordSkipped("too_long", f"{n} tokens > {msl}")
    rows = np.empty((4, msl), dtype=np.int32)
    ids = np.asarray(sample.input_ids, dtype=np.int32)
    sup = np.asarray(sample.labels, dtype=np.int64) != IGNORE_INDEX
    rows[0].fill(pad_id)
    rows[0, :n] = ids
    rows[1].fill(0)
    rows[1, : n - 1] = sup[1:]
    rows[2].fill(pad_id)
    rows[2, : n - 1] = ids[1:]
    rows[3].fill(1)
    rows[3, :n] = 0
    if sample.num_slots and not sample.has_image:
        s, e = sample.image_start, sample.image_start + sample.num_slots
        rows[3, s:e] = 1
        rows[1, max(s - 1, 0) : e] = 0
    return rows
