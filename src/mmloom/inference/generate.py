"""Batched, resumable generation over LLaVA-style question files.

Questions: jsonl records with `question_id`, `text` and optionally the items of each modality of
the model under the modality's record key (`image`, ...: a path or a list of paths, relative to
the modality's folder, e.g. `--image-dir`). Each prompt is the template's generation prompt for one
user turn `"<image>\\n" + question (+ "\\n" + suffix)`: one placeholder per item, in `MEDIA`
order, before the question; decoding is greedy unless a temperature is given.
Answers: jsonl records `{"question_id", "prompt", "text", "model_id"}`, appended and flushed per
batch; question ids already in the output are skipped, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mmloom.data.encode import record_paths
from mmloom.data.records_io import SkipRecord, read_jsonl_objects, unencodable_text
from mmloom.devices import resolve_device
from mmloom.errors import MmloomError
from mmloom.interop.common import torch_dtype
from mmloom.model.adapters import base_module
from mmloom.model.batch import model_inputs
from mmloom.outputs import disk_full_as_error
from mmloom.processing.media import MEDIA
from mmloom.processing.media_spec import MediaSpec
from mmloom.processing.processor import PROCESSOR_CONFIG, MultimodalProcessor
from mmloom.training.model_loading import load_model

SUFFIXES = {
    "none": "",
    "short": "Answer the question using a single word or phrase.",
    "choice": "Answer with the option's letter from the given choices directly.",
}


# ------------------------------------------------------------------------------------ model
def load_model_and_processor(model_dir: str | Path, dtype: str | None = None, device: str | None = None):
    """A saved mmloom model or `checkpoint-N` folder (eval mode) and the MultimodalProcessor saved with it.

    `device` None: cuda when available, else cpu. Raises MmloomError when the folder is not a saved
    model with its processor, or `device` is not a device of this machine (`mmloom.devices.resolve_device`).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MmloomError(f"model folder not found: {model_dir}" if not model_dir.exists()
                          else f"{model_dir} is a file, not a model folder")
    dev = resolve_device(device)
    if not (model_dir / PROCESSOR_CONFIG).exists():
        raise MmloomError(
            f"{model_dir} has no {PROCESSOR_CONFIG}: save the processor with the model "
            "(MultimodalProcessor.save_pretrained) or create the folder with `mmloom convert` / `mmloom init`"
        )
    model = load_model(model_dir, dtype=torch_dtype(dtype), device=str(dev))
    return model.eval(), MultimodalProcessor.from_pretrained(model_dir)


def stop_token_ids(processor, model=None) -> list[int]:
    """Ids that end an answer: the template's end-of-turn token(s) (what closes every supervised answer,
    `mmloom.processing.templates.end_of_turn_token_ids`), the tokenizer's EOS, then the EOS ids of the
    language model's `generation_config` (e.g. Llama-3-Instruct's `[<|end_of_text|>, <|eot_id|>]`)."""
    stop = processor.template.stop_token_ids(processor.tokenizer)
    config = getattr(base_module(model.language_model), "generation_config", None) if model is not None else None
    eos = getattr(config, "eos_token_id", None)
    for tid in eos if isinstance(eos, (list, tuple)) else [eos]:
        if tid is not None and int(tid) not in stop:
            stop.append(int(tid))
    return stop


def generation_kwargs(processor, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float | None = None,
                      num_beams: int = 1, model=None) -> dict[str, Any]:
    """`model.generate` settings: greedy when `temperature` is 0, sampling at that temperature
    (and `top_p`) when it is > 0; stops at the template's end-of-turn token, the tokenizer's EOS and
    the EOS ids of `model`'s generation_config (:func:`stop_token_ids`).

    Raises MmloomError for `max_new_tokens` < 1, a negative or non-finite `temperature`, `top_p`
    outside (0, 1] or `num_beams` < 1 (never silently greedy).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise MmloomError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
    if temperature is None or not math.isfinite(temperature) or temperature < 0:
        raise MmloomError(f"temperature must be 0 (greedy) or more (sampling), got {temperature!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise MmloomError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise MmloomError(f"num_beams must be an integer of at least 1, got {num_beams!r}")
    tokenizer = processor.tokenizer
    stop = stop_token_ids(processor, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": stop or None, "pad_token_id": pad,
                              "num_beams": num_beams}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
        if top_p is not None:
            kwargs["top_p"] = top_p
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def check_media(processor, has_media: bool, how: str) -> None:
    """Refuse a question without any media item for a phase-1 (`plain` template) model: it captions
    its input and takes no question (the template renders only the placeholders), so it cannot
    answer text alone. `how` names the option that gives one."""
    if not has_media and processor.template.name == "plain":
        raise MmloomError(
            "this model's template is 'plain' (a phase-1 model: it captions an image and reads no question); "
            f"give it {how}, or use a phase-2 (instruction-tuned) model for text-only questions"
        )


def cut_at_stop(ids: list[int], stop_ids: Iterable[int]) -> list[int]:
    stop = set(stop_ids)
    for i, token in enumerate(ids):
        if token in stop:
            return ids[:i]
    return ids


def decode_new_tokens(processor, sequences: torch.Tensor, prompt_length: int, stop_ids) -> list[str]:
    texts = []
    for row in sequences[:, prompt_length:].tolist():
        texts.append(processor.tokenizer.decode(cut_at_stop(row, stop_ids), skip_special_tokens=True).strip())
    return texts


def media_specs(processor) -> list[MediaSpec]:
    """The processor's media specs in `MEDIA` order (other encoders after them): the order of the
    placeholders in a prompt."""
    order = list(MEDIA)
    return sorted(processor.media.values(), key=lambda spec: order.index(spec.modality) if spec.modality in order
                  else len(order))


@torch.no_grad()
def answer_batch(model, processor, conversations: list[list[dict]], images: list | None, gen_kwargs: dict,
                 streamer=None, **items) -> list[str]:
    """Generate one assistant turn for each conversation (left-padded batch); `images` and the other
    modalities' `items` (under their processor keywords, `MediaSpec.keyword`) hold each conversation's
    items (None, one, or a list)."""
    batch = processor(conversations=conversations, images=images, add_generation_prompt=True,
                      padding_side="left", return_labels=False, **items)
    inputs = model_inputs(batch, model.device)
    input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    extra = {"streamer": streamer} if streamer is not None else {}
    sequences = model.generate(input_ids, attention_mask=attention_mask, **inputs, **gen_kwargs, **extra)
    stop = gen_kwargs.get("eos_token_id") or []
    return decode_new_tokens(processor, sequences, input_ids.shape[1], stop if isinstance(stop, list) else [stop])


# ------------------------------------------------------------------------------------ files
def read_jsonl(path: str | Path, what: str = "file") -> list[dict]:
    """The JSON objects of a jsonl file, one per non-blank line; raises as `read_jsonl_objects`."""
    return [record for _, record in read_jsonl_objects(path, what)]


def done_question_ids(output: Path) -> set[str]:
    """Question ids already answered in `output`; a torn last line (killed run) is cut off."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    done: set[str] = set()
    position = 0
    for number, raw in enumerate(data.splitlines(keepends=True), 1):
        if raw.strip():
            try:
                question_id = json.loads(raw)["question_id"] if raw.endswith(b"\n") else None
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
                question_id = None
            if question_id is None:
                if position + len(raw) == len(data):  # the last line, torn by a killed run
                    with output.open("r+b") as f:
                        f.truncate(position)
                    break
                raise MmloomError(f"{output}:{number}: not an answer record; refusing to append to it")
            done.add(str(question_id))
        position += len(raw)
    return done


def question_content(text: str, suffix: str, placeholders: list[str]) -> tuple[str, str]:
    """(user turn content, prompt recorded in the answer) for one question with items: the
    `placeholders` first (one `<image>\\n` per item, in order), then the question without any
    placeholder it carried."""
    prompt = text.strip()
    if suffix and not prompt.endswith(suffix):
        prompt = f"{prompt}\n{suffix}"
    if not placeholders:
        return prompt, prompt
    question = prompt
    for marker in set(placeholders):
        question = question.replace(marker, "")
    return "".join(f"{m}\n" for m in placeholders) + question.strip(), prompt


def question_items(record: dict, spec: MediaSpec, root: Path, blank: bool = False) -> list:
    """The items of a question under the spec's record key (a path or a list), read from `root`;
    with `blank`, the spec's baseline of each (`MediaSpec.blank`: mean colour, silence)."""
    try:
        paths = record_paths(record, spec.record_key)
    except SkipRecord as skip:
        raise MmloomError(f"question {record.get('question_id')!r}: {skip.detail}") from None
    items = [spec.load(root / path) for path in paths]
    return [spec.blank(item) for item in items] if blank else items


def generate_answers(
    model,
    processor,
    questions: str | Path,
    output: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    suffix: str = "none",
    temperature: float = 0.0,
    model_id: str | None = None,
    progress: bool = True,
    system: str | None = None,
    media_dirs: dict[str, str | Path | None] | None = None,
    baselines: Iterable[str] = (),
) -> dict[str, int]:
    """Answer every question not yet in `output`; returns counts (total, skipped, answered).
    `system`: the system text of every prompt (None: the template's default). `media_dirs` maps a
    modality's noun (`image`, ...) to the root of the questions' paths (default: the questions
    file's folder); `baselines` lists the nouns whose items are replaced by their baseline
    (`MediaSpec.blank`: `--blank-images`, ...).

    Raises MmloomError for questions with items of a modality the model's processor cannot take, for
    a question without any item to a phase-1 (`plain`) model, and (MediaError) for items that cannot
    be used."""
    if suffix not in SUFFIXES:
        raise MmloomError(f"unknown suffix {suffix!r}; use one of {', '.join(SUFFIXES)}")
    if batch_size < 1:
        raise MmloomError(f"--batch-size must be at least 1, got {batch_size}")
    records = read_jsonl(questions, "questions file")
    for number, record in enumerate(records, 1):
        if "question_id" not in record or "text" not in record:
            raise MmloomError(f"{questions}: record {number} lacks 'question_id' or 'text'")
        if not isinstance(record["text"], str):
            raise MmloomError(f"{questions}: record {number}: 'text' is not a string")
        bad = unencodable_text(record["text"])
        if bad is not None:
            raise MmloomError(f"{questions}: record {number}: 'text' is {bad}")
    generation_kwargs(processor, max_new_tokens, temperature, model=model)  # refuse bad settings before any work
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = done_question_ids(output)
    seen: set[str] = set()
    pending = []
    for record in records:
        key = str(record["question_id"])
        if key in seen:
            raise MmloomError(f"{questions}: question_id {record['question_id']!r} appears twice")
        seen.add(key)
        if key not in done:
            pending.append(record)
    specs = media_specs(processor)
    for modality, cls in MEDIA.items():  # items the model cannot take are refused, not dropped
        key = processor.media[modality].record_key if modality in processor.media else cls.record_key
        if modality not in processor.encoder_processors and any(record.get(key) for record in pending):
            raise MmloomError(f"{questions} has questions with {cls.noun} but the model has no {cls.noun} "
                              "encoder/processor")
    keys = [spec.record_key for spec in specs] or [cls.record_key for cls in MEDIA.values()]
    for record in pending:
        if not any(record.get(key) for key in keys):
            check_media(processor, False, f"an image (question {record['question_id']!r} of {questions} has none)")
    system_turn = [{"role": "system", "content": system}] if system is not None else []
    gen_kwargs = generation_kwargs(processor, max_new_tokens, temperature, model=model)
    model_id = model_id or "mmloom"
    roots = {spec.noun: Path((media_dirs or {}).get(spec.noun) or Path(questions).parent) for spec in specs}
    blanked = set(baselines)

    def run(advance):
        kept = "the answers before it are kept (the same command continues after them)"
        with disk_full_as_error(output, None, kept), output.open("a", encoding="utf-8") as sink:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                conversations, prompts = [], []
                items: dict[str, list] = {spec.keyword: [] for spec in specs}
                for record in chunk:
                    markers = []
                    for spec in specs:
                        loaded = question_items(record, spec, roots[spec.noun], spec.noun in blanked)
                        markers += [spec.placeholder] * len(loaded)
                        items[spec.keyword].append(loaded or None)
                    content, prompt = question_content(record["text"], SUFFIXES[suffix], markers)
                    conversations.append([*system_turn, {"role": "user", "content": content}])
                    prompts.append(prompt)
                given = {arg: per_sample for arg, per_sample in items.items() if any(x is not None for x in per_sample)}
                answers = answer_batch(model, processor, conversations, given.pop("images", None), gen_kwargs, **given)
                for record, prompt, answer in zip(chunk, prompts, answers, strict=True):
                    sink.write(json.dumps({"question_id": record["question_id"], "prompt": prompt, "text": answer,
                                           "model_id": model_id}, ensure_ascii=False) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
                advance(len(chunk))

    if progress and pending:
        from mmloom.progress import rate_progress

        with rate_progress("generating", "questions", decimals=1, remaining=True, stderr=True) as bar:
            task = bar.add_task("generate", total=len(pending))
            run(lambda n: bar.advance(task, n))
    else:
        run(lambda n: None)
    return {"total": len(records), "skipped": len(records) - len(pending), "answered": len(pending)}
