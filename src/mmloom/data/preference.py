"""Preference pairs: records with a prompt, a chosen and a rejected answer, for the recipe's third phase (DPO).

Records (one JSON object per jsonl line; `mmloom data build` with `dataset.preference`) come in the layouts the
field publishes, told apart by their keys (or fixed with `dataset.preference.format`):

- **TRL** (`trl`, TRL's vision preference format): `images` (a list of paths; `image`, one path, also works),
  `prompt`, `chosen`, `rejected`. Each is a string, or a list of chat messages (`{"role", "content"}` with
  content a string or parts `[{"type": "image"}, {"type": "text", "text": ...}]`; an image part becomes
  `<image>` where it stands). A prompt may hold several turns; `chosen` / `rejected` are the final assistant
  answer. TRL's implicit-prompt form (no `prompt`: `chosen` and `rejected` are whole conversations sharing
  their first messages) is read too.
- **LLaVA** (`llava`, LLaVA-NeXT's `llava/train/train_dpo.py` json): `id`, `image` (a path), `prompt`,
  `chosen`, `rejected` strings; as that code does, `<image>` is moved to the front of the prompt (with
  `image` a list of paths, one `<image>` per image there, in order).
- **RLAIF-V** (`rlaif_v`, openbmb/RLAIF-V-Dataset's fields): `question`, `chosen`, `rejected`, the image as
  `image_path` (or `image`: a path or `{"path": ...}`); `ds_name`, `origin_dataset`, `origin_split`, `idx`
  are carried along unread.

A record with images but no `<image>` in its prompt gets one per image at the front of its first user turn
(LLaVA's rule). Each pair is encoded twice with the build's template and tokenizer (`encode_record`): prompt + chosen
answer and prompt + rejected answer, supervised on the final answer only. Bad pairs are counted skips:
`empty_answer` (an empty answer), `identical_answers`, `too_long` (either side over max_sequence_length),
`missing_image` / `bad_image` (the image), `prompt_mismatch` (the two sides do not share their prompt tokens,
e.g. a template that renders an answer into its prompt), `bad_record` (a missing or malformed field).

The HDF5 layout (`mmloom.data.h5_format`: `data` = prompt + chosen, `rejected`, `prompt_length`) is read by
`PreferencePairs`, and `PreferenceCollator` turns its pairs into one batch of 2P sequences (all chosen, then all
rejected: TRL's order), padded or packed, so that chosen and rejected share one forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmloom.data.encode import EncodedSample
from mmloom.data.h5_format import REJECTED, read_prompt_lengths
from mmloom.data.records_io import SkipRecord
from mmloom.errors import MmloomError
from mmloom.model.merge import IGNORE_INDEX

FORMATS = ("trl", "llava", "rlaif_v")
# Skip reasons of preference builds, listed after encode.SKIP_REASONS in the build summary.
PREFERENCE_SKIP_REASONS = ("identical_answers", "prompt_mismatch")


@dataclass
class PreferenceRecord:
    """One pair in LLaVA terms: images (relative paths), the prompt as LLaVA turns (`{"from", "value"}`, ending
    with a human turn), and the two answers."""

    images: list[str]
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


def record_format(record: dict, fixed: str | None = None) -> str:
    """Which layout `record` is in (`fixed` when given and the record has its keys). Raises
    SkipRecord('bad_record') when it has no chosen / rejected pair."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise SkipRecord("bad_record", "a preference record needs 'chosen' and 'rejected'")
    found = "rlaif_v" if "question" in record else "trl" if ("images" in record or "prompt" not in record or
                                                              not isinstance(record.get("prompt"), str)) else "llava"
    if fixed is not None and fixed != found and not (fixed == "trl" and found == "llava"):
        raise SkipRecord("bad_record", f"a {found} record in a build of dataset.preference.format {fixed}")
    return fixed or found


def _text_of(content: Any, what: str) -> str:
    """Message content (a string, or TRL / HF parts) as text; image parts become `<image>` where they stand."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                out.append("<image>\n")
            elif kind == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise SkipRecord("bad_record", f"{what}: a content part must be {{'type': 'image'}} or "
                                 "{'type': 'text', 'text': ...}")
        return "".join(out)
    raise SkipRecord("bad_record", f"{what} must be a string or a list of content parts")


def _turns(messages: Any, what: str) -> list[dict[str, str]]:
    if isinstance(messages, str):
        return [{"from": "human", "value": messages}]
    if not isinstance(messages, list) or not messages:
        raise SkipRecord("bad_record", f"'{what}' must be a string or a non-empty list of messages")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise SkipRecord("bad_record", f"'{what}' message {i} needs a 'role'")
        role = {"user": "human", "assistant": "gpt"}.get(message["role"], message["role"])
        turns.append({"from": role, "value": _text_of(message.get("content"), f"'{what}' message {i}")})
    return turns


def _answer(value: Any, what: str) -> str:
    """The final answer of `chosen` / `rejected`: a string, or the last (assistant) message of a list."""
    if isinstance(value, str):
        return value
    turns = _turns(value, what)
    if turns[-1]["from"] != "gpt":
        raise SkipRecord("bad_record", f"'{what}' must end with an assistant message")
    return turns[-1]["value"]


def _paths(value: Any, key: str) -> list[str]:
    if value is None or value == "" or value == []:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            item = item["path"]
        if not isinstance(item, str) or not item:
            raise SkipRecord("bad_record", f"'{key}' must be a path, a list of paths or {{'path': ...}} (image bytes "
                             "are not read: write the images to files)")
        out.append(item)
    return out


def parse_preference(record: dict, fixed: str | None = None, image_token: str = "<image>") -> PreferenceRecord:
    """A `PreferenceRecord` from a record in any of the module docstring's layouts. Raises SkipRecord
    ('bad_record', 'empty_answer', 'identical_answers')."""
    kind = record_format(record, fixed)
    if kind == "rlaif_v":
        images = _paths(record.get("image_path") or record.get("image"), "image_path")
        prompt = _turns(record.get("question"), "question")
        chosen, rejected = _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")
    elif kind == "trl" and "prompt" not in record:  # implicit prompt: the conversations' shared first messages
        full_c, full_r = _turns(record["chosen"], "chosen"), _turns(record["rejected"], "rejected")
        if len(full_c) < 2 or full_c[:-1] != full_r[:-1] or full_c[-1]["from"] != "gpt" or full_r[-1]["from"] != "gpt":
            raise SkipRecord("bad_record", "without 'prompt', 'chosen' and 'rejected' must be conversations that "
                             "differ in their final assistant message only")
        images = _paths(record.get("images", record.get("image")), "images")
        prompt, chosen, rejected = full_c[:-1], full_c[-1]["value"], full_r[-1]["value"]
    else:
        images = _paths(record.get("images", record.get("image")), "images" if "images" in record else "image")
        prompt = _turns(record.get("prompt"), "prompt")
        chosen, rejected = _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")
        if kind == "llava" and images:  # train_dpo.py: the placeholder moved to the front of the prompt
            text = prompt[0]["value"].replace(image_token, "").strip()
            prompt[0]["value"] = (image_token + "\n") * len(images) + text
    if not prompt or prompt[-1]["from"] != "human":
        raise SkipRecord("bad_record", "the prompt must end with a user turn")
    if images and not any(image_token in t["value"] for t in prompt):
        first = next(t for t in prompt if t["from"] == "human")
        first["value"] = (image_token + "\n") * len(images) + first["value"]
    if not chosen.strip() or not rejected.strip():
        raise SkipRecord("empty_answer", f"an empty {'chosen' if not chosen.strip() else 'rejected'} answer")
    if chosen.strip() == rejected.strip():
        raise SkipRecord("identical_answers", "the chosen and the rejected answers are the same text")
    return PreferenceRecord(images, prompt, chosen, rejected)


@dataclass
class PreferencePair:
    """A pair encoded for the HDF5 build: both sides laid out as `encode_record` lays out a sample (the same
    prompt tokens and image slots), supervised on the final answer only; `prompt_length` tokens are shared."""

    chosen: EncodedSample
    rejected: EncodedSample
    prompt_length: int


def _answer_start(labels: list[int]) -> int:
    """The first position of the last run of supervised labels: where the final answer starts."""
    i = len(labels)
    while i > 0 and labels[i - 1] == IGNORE_INDEX:
        i -= 1
    while i > 0 and labels[i - 1] != IGNORE_INDEX:
        i -= 1
    return i


def encode_pair(pair: PreferenceRecord, encode) -> PreferencePair:
    """Encode both sides with `encode(turns) -> EncodedSample` (LLaVA turns `{"from", "value"}` encoded by the
    build's `encode_record` with its settings and the pair's items; raises SkipRecord, e.g. too_long), keep the
    final answer's labels only, and check the shared prompt."""
    sides = []
    for answer in (pair.chosen, pair.rejected):
        sample = encode([*pair.prompt, {"from": "gpt", "value": answer}])
        start = _answer_start(sample.labels)
        sample.labels = [IGNORE_INDEX] * start + sample.labels[start:]
        sides.append((sample, start))
    (chosen, start_c), (rejected, start_r) = sides
    if start_c != start_r or chosen.input_ids[:start_c] != rejected.input_ids[:start_r] \
            or chosen.image_starts != rejected.image_starts:
        raise SkipRecord("prompt_mismatch", "the chosen and rejected sequences do not share their prompt tokens")
    if chosen.input_ids == rejected.input_ids:
        raise SkipRecord("identical_answers", "the chosen and the rejected answers tokenize the same")
    return PreferencePair(chosen, rejected, start_c)


# ------------------------------------------------------------------------------------- training side
ROWS = ("text_input_ids", "loss_mask", "labels", "key_padding_mask")  # the seed's rows 0, 1, 2, 3


class PreferencePairs(torch.utils.data.Dataset):
    """The pairs of a preference build over a sample dataset (`HDF5LlavaDataset`, or `CachedFeatureDataset` for
    cached features): item i is sample i (prompt + chosen answer, with its image or features) plus
    `rejected` (the four rows of prompt + rejected answer) and `prompt_length`.

    `max_sequence_length` is twice the data's (a pair is packed as one unit); `sample_lengths` gives each
    pair's two lengths added. Raises MmloomError when the data holds no pairs."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.prompt_lengths = []
        import h5py

        for path in dataset.files:
            with h5py.File(path, "r") as f:
                if REJECTED not in f:
                    raise MmloomError(f"{path} holds no preference pairs ({REJECTED} dataset): the preference section "
                                      "trains on data built with dataset.preference")
                self.prompt_lengths.append(read_prompt_lengths(f, path))

    def __getattr__(self, name):  # files, counts, h5, image_starts, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    @property
    def max_sequence_length(self) -> int:
        return 2 * self.dataset.max_sequence_length

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_lengths(self, attended_only: bool = False) -> np.ndarray:
        """Per pair, the lengths of its two sequences added (`mmloom.data.sampling.sample_lengths`' measures)."""
        import h5py

        from mmloom.data.sampling import _attended, _span

        measure = _attended if attended_only else _span
        out = []
        for path in self.dataset.files:
            with h5py.File(path, "r") as f:
                for a in range(0, f["data"].shape[0], 4096):
                    out.append(measure(np.asarray(f["data"][a:a + 4096, 3, :]))
                               + measure(np.asarray(f[REJECTED][a:a + 4096, 3, :])))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        file_idx, local = self.dataset.locate(item["index"])
        rows = np.asarray(self.dataset.h5[file_idx][REJECTED][local], dtype=np.int32)
        if getattr(self.dataset, "vocab_size", None) is not None:
            self.dataset._check_ids(rows, file_idx, local)
        item["rejected"] = {name: torch.from_numpy(rows[k].copy()) for k, name in enumerate(ROWS)}
        item["prompt_length"] = int(self.prompt_lengths[file_idx][local])
        return item


class PreferenceCollator:
    """Pairs -> one batch of 2P sequences through `collator` (the run's collator: padded rows, packing, cached
    features, dummy images all as for instruction tuning): the P chosen sequences first, then the P rejected
    ones (each with the pair's image). The batch also carries `pairs` (P), `pair_weights` (P,) float (0 for the
    loss-free padding pairs of `PaddedDataset`), `pair_index` (P,) long (dataset indices, for precomputed
    reference log-probabilities) and `sequence_spans` (packed rows: per sequence `(row, start, end)`; None for
    padded rows, where sequence i is row i)."""

    def __init__(self, collator):
        self.collator = collator

    def __getattr__(self, name):
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, items: list[dict]) -> dict:
        weights = torch.tensor([float(bool(item["loss_mask"].any())) for item in items])
        rejected = []
        for item, w in zip(items, weights.tolist(), strict=True):
            side = {k: v for k, v in item.items() if k not in ("rejected", "prompt_length")}
            side.update(item["rejected"])
            if not w:
                side["loss_mask"] = torch.zeros_like(side["loss_mask"])
            rejected.append(side)
        chosen = [{k: v for k, v in item.items() if k not in ("rejected", "prompt_length")} for item in items]
        batch = self.collator(chosen + rejected)
        spans = batch.get("spans")
        batch["pairs"] = len(items)
        batch["pair_weights"] = weights
        batch["pair_index"] = torch.tensor([int(item.get("index", -1)) for item in items], dtype=torch.long)
        batch["sequence_spans"] = list(spans) if spans is not None else None
        return batch
