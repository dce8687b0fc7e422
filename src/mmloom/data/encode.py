"""Per-record encoding shared by `mmloom data build` (HDF5) and `JsonlLlavaDataset`.

`encode_record` turns one LLaVA record into the expanded token layout:

    template tokens before <image>  +  [slot_fill_id x num_feature_tokens]  +  tokens after <image>

(the ids of LLaVA's `tokenizer_image_token` + conversation template, each image id expanded to
its slots) with HF-convention labels (unshifted, -100 = not supervised, -100 on every image slot)
and the positions of the slots, which every later stage reads instead of looking for token values.
`to_h5_rows` turns that layout into the seed's four int32 rows of length MSL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmloom.data.records_io import SkipRecord, parse_json_line, relative_image_path, unencodable_text
from mmloom.model.merge import IGNORE_INDEX
from mmloom.processing.templates import ConversationError, messages_from_llava
from mmloom.processing.tokenizer import token_id

# Reasons a record is skipped, in the order the build summary lists them.
SKIP_REASONS = (
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
    "bad_audio_path",
    "missing_audio",
    "bad_audio",
    "empty_audio",
    "audio_too_long",
    "bad_sample_rate",
    "audio_token_mismatch",
    "too_long",
)


@dataclass
class EncodedSample:
    """One record in the expanded token layout (LLaVA's `tokenizer_image_token` layout, each
    image's single placeholder replaced by `num_feature_tokens` slot tokens).

    `image_starts` holds the first slot of each image; a text-only sample built with
    `text_only_slots` has one (masked) slot run too, so `image_starts` is not empty for it while
    `images` is. `attention_mask` is 0 exactly on the masked run of a text-only sample (its slots
    and the filler before them, see `encode_record`).
    """

    input_ids: list[int]  # expanded; the image slots hold slot_fill_id
    labels: list[int]  # HF convention (unshifted); -100 on the slots
    attention_mask: list[int]  # 1 = attended; 0 on the masked slots of text-only samples
    image_starts: list[int]  # first slot of each slot run, in order
    num_feature_tokens: int  # slots per run (0 when none)
    images: list[str]  # relative image paths, in placeholder order ([] = text-only)
    image_turn: int  # index of the user turn holding the first image (-1: no image)
    raw_chars: int  # characters / UTF-8 bytes of the record's turn texts
    raw_bytes: int
    audio: list[str] = field(default_factory=list)  # relative audio paths, in placeholder order
    audio_spans: list[tuple[int, int]] = field(default_factory=list)  # (first slot, slots) per clip

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
    """The record's relative media paths under `key` (`image`, `audio`; [] when absent): a string or
    a list of strings (LLaVA's form). Raises SkipRecord("bad_record") for anything else."""
    value = record.get(key)
    if value is None or value == "" or value == []:
        return []
    paths = value if isinstance(value, list) else [value]
    if not all(isinstance(p, str) and p for p in paths):
        raise SkipRecord("bad_record", f"'{key}' must be a path or a list of paths")
    return list(paths)


def audio_file(audio_dir: str | Path | None, relative: str) -> Path:
    """The file of a record's audio path under `audio_dir`; SkipRecord('bad_audio_path') for a
    path that leaves it (absolute, a drive letter, or `..` parts)."""
    return Path(audio_dir or ".") / relative_image_path(relative, "audio", reason="bad_audio_path")


def image_file(image_dir: str | Path | None, relative: str) -> Path:
    """The file of a record's image path under `image_dir`; SkipRecord('bad_image_path') for a
    path that leaves it (absolute, a drive letter, or `..` parts: `relative_image_path`)."""
    return Path(image_dir or ".") / relative_image_path(relative)


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
    num_feature_tokens: int,
    slot_fill_id: int,
    image_token: str = "<image>",
    image_token_id: int | None = None,
    image_key: str = "image",
    conversation_key: str = "conversations",
    content_key: str = "value",
    max_length: int | None = None,
    text_only_slots: bool = False,
    audio: tuple[str, int, list[str], list[int]] | None = None,
) -> EncodedSample:
    """Encode one LLaVA record; raises `SkipRecord` with a reason for bad records.

    - a record carries as many `image_token` placeholders in its human turns as it has images
      (else `image_token_mismatch`); a single one is moved to the front of its turn (LLaVA's
      `preprocess_multimodal`), several stay where they are;
    - the template tokenizes the conversation in LLaVA's layout (`tokenize_segments`); each
      placeholder id (`image_token_id`, default the tokenizer's id of `image_token`) becomes
      `num_feature_tokens` copies of `slot_fill_id` (labels -100);
    - `text_only_slots`: a text-only record gets one masked slot run too (the seed's / Cerebras'
      layout). Its attended tokens are exactly the tokenization of the conversation without an
      image; the slots go where an image sample's slots would go: the tokens the image variant has
      between the common prefix and its slots (e.g. Llama's `▁` after `USER:`) are inserted as
      masked filler, so the run starts at the dataset's image start index and never splits a word;
    - `audio = (placeholder, placeholder_id, clips, tokens per clip)`: each of the record's
      audio placeholders (as many as clips, else `audio_token_mismatch`) becomes its clip's
      number of slots (attended, labels -100), recorded in `audio_spans`;
    - samples longer than `max_length` raise `too_long` (never truncated).
    """
    if image_token_id is None:
        image_token_id = token_id(tokenizer, image_token)
    images = record_paths(record, image_key)
    turns = _turns(record, conversation_key, content_key)
    n_placeholders = sum(t["value"].count(image_token) for t in turns)
    if n_placeholders != len(images):
        raise SkipRecord(
            "image_token_mismatch", f"{n_placeholders} '{image_token}' in the turns for {len(images)} image(s)"
        )
    if any(image_token in t["value"] for t in turns if t["from"] not in ("human", "user")):
        raise SkipRecord("image_token_mismatch", f"'{image_token}' in a non-human turn")
    audio_token, audio_id, clips, clip_tokens = audio if audio is not None else ("", None, [], [])
    if audio is not None:
        n_audio = sum(t["value"].count(audio_token) for t in turns)
        if n_audio != len(clips) or len(clip_tokens) != len(clips):
            raise SkipRecord("audio_token_mismatch", f"{n_audio} '{audio_token}' in the turns for {len(clips)} clip(s)")
        if any(audio_token in t["value"] for t in turns if t["from"] not in ("human", "user")):
            raise SkipRecord("audio_token_mismatch", f"'{audio_token}' in a non-human turn")
    raw_chars = sum(len(t["value"]) for t in turns)
    raw_bytes = sum(len(t["value"].encode("utf-8")) for t in turns)
    placeholders = (image_token, audio_token) if audio is not None else image_token
    try:
        messages = messages_from_llava(turns, move_image_to_front=True, placeholder=placeholders)
    except ConversationError as exc:
        raise SkipRecord(getattr(exc, "reason", "bad_record"), str(exc)) from None

    tok = template.tokenize(tokenizer, messages)
    ids, labels = list(tok.input_ids), list(tok.labels)
    attention = [1] * len(ids)
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if images and len(positions) != len(images):
        raise SkipRecord("image_token_mismatch", f"{len(positions)} image tokens after templating")
    if not images and positions and not (text_only_slots and len(positions) == 1):
        raise SkipRecord("image_token_mismatch", "image token in a text-only sample")
    if not images and text_only_slots and not positions:  # masked slots where an image's would be
        ids, labels, attention, positions = _with_masked_slot_marker(
            tokenizer, template, messages, ids, labels, image_token, image_token_id
        )
    audio_positions = [i for i, t in enumerate(ids) if audio_id is not None and t == audio_id]
    if len(audio_positions) != len(clips):
        raise SkipRecord("audio_token_mismatch", f"{len(audio_positions)} audio tokens after templating")
    masked = not images
    out_ids: list[int] = []
    out_labels: list[int] = []
    out_attention: list[int] = []
    starts: list[int] = []
    spans: list[tuple[int, int]] = []
    runs = sorted([(p, num_feature_tokens, False) for p in positions] +
                  [(p, n, True) for p, n in zip(audio_positions, clip_tokens, strict=True)])
    prev = 0
    for p, n, is_audio in runs:
        out_ids += ids[prev:p]
        out_labels += labels[prev:p]
        out_attention += attention[prev:p]
        if is_audio:
            spans.append((len(out_ids), n))
        else:
            starts.append(len(out_ids))
        out_ids += [slot_fill_id] * n
        out_labels += [IGNORE_INDEX] * n
        out_attention += [0 if masked and not is_audio else 1] * n
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
        image_turn = next(k for k, text in enumerate(user_turns) if image_token in text)
    return EncodedSample(
        out_ids, out_labels, out_attention, starts, num_feature_tokens if starts else 0, images, image_turn,
        raw_chars, raw_bytes, list(clips), spans,
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
