"""Batched, resumable generation over LLaVA-style question files.

Questions: jsonl records with `question_id`, `text` and optionally `image` (relative to
`image_dir`) and `audio` (a path or a list of paths, relative to `audio_dir`). Each prompt is the
template's generation prompt for one user turn `"<image>\\n<audio>\\n" + question (+ "\\n" +
suffix)` (the placeholders of the items it has); decoding is greedy unless a temperature is given.
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

import numpy as np
import torch
from PIL import Image, ImageStat

from mmloom.data.records_io import read_jsonl_objects, unencodable_text
from mmloom.devices import resolve_device
from mmloom.errors import MmloomError
from mmloom.interop.common import torch_dtype
from mmloom.model.adapters import base_module
from mmloom.outputs import disk_full_as_error
from mmloom.processing.audio import load_audio
from mmloom.processing.image import load_image
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
    """Refuse a question without an image or audio clip for a phase-1 (`plain` template) model: it
    captions its input and takes no question (the template renders only the placeholders), so it
    cannot answer text alone. `how` names the option that gives one."""
    if not has_media and processor.template.name == "plain":
        raise MmloomError(
            "this model's template is 'plain' (a phase-1 model: it captions an image and reads no question); "
            f"give it {how}, or use a phase-2 (instruction-tuned) model for text-only questions"
        )


def model_inputs(batch, device) -> dict[str, Any]:
    """The processor's batch without labels, on `device` (per-modality dicts included)."""
    out = {}
    for key, value in batch.items():
        if key == "labels":
            continue
        if isinstance(value, dict):
            out[key] = {k: v.to(device) if torch.is_tensor(v) else v for k, v in value.items()}
        else:
            out[key] = value.to(device) if torch.is_tensor(value) else value
    return out


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


@torch.no_grad()
def answer_batch(model, processor, conversations: list[list[dict]], images: list, gen_kwargs: dict,
                 streamer=None, audio: list | None = None) -> list[str]:
    """Generate one assistant turn for each conversation (left-padded batch); `images` / `audio`
    hold each conversation's items (None, one, or a list)."""
    batch = processor(conversations=conversations, images=images, audio=audio, add_generation_prompt=True,
                      padding_side="left", return_labels=False)
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


def blank_like(image: Image.Image) -> Image.Image:
    """An image of the same size filled with the image's mean colour."""
    mean = tuple(int(round(c)) for c in ImageStat.Stat(image).mean[:3])
    return Image.new("RGB", image.size, mean)


def question_content(text: str, has_image: bool, suffix: str, placeholder: str = "<image>",
                     audio: int = 0, audio_placeholder: str = "<audio>") -> tuple[str, str]:
    """(user turn content, prompt recorded in the answer) for one question with an image (or not)
    and `audio` clips: the placeholders first (`<image>\\n`, one `<audio>\\n` per clip), then the
    question without any placeholder it carried."""
    prompt = text.strip()
    if suffix and not prompt.endswith(suffix):
        prompt = f"{prompt}\n{suffix}"
    markers = ([placeholder] if has_image else []) + [audio_placeholder] * audio
    if not markers:
        return prompt, prompt
    question = prompt
    for marker in set(markers):
        question = question.replace(marker, "")
    return "".join(f"{m}\n" for m in markers) + question.strip(), prompt


def question_audio(record: dict, audio_root: Path, sampling_rate: int, silence: bool = False) -> list:
    """The waveforms of a question's `audio` field (a path or a list), at `sampling_rate`; with
    `silence`, zeros of the same lengths (the silenced-audio baseline)."""
    paths = record.get("audio") or []
    clips = []
    for path in paths if isinstance(paths, list) else [paths]:
        waveform = load_audio(audio_root / path, sampling_rate)
        clips.append(np.zeros_like(waveform) if silence else waveform)
    return clips


def generate_answers(
    model,
    processor,
    questions: str | Path,
    output: str | Path,
    image_dir: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    suffix: str = "none",
    blank_images: bool = False,
    temperature: float = 0.0,
    model_id: str | None = None,
    progress: bool = True,
    audio_dir: str | Path | None = None,
    silence_audio: bool = False,
    system: str | None = None,
) -> dict[str, int]:
    """Answer every question not yet in `output`; returns counts (total, skipped, answered).
    `system`: the system text of every prompt (None: the template's default).

    Raises MmloomError for questions with audio when the model's processor has no audio
    extractor, for a question without image or audio to a phase-1 (`plain`) model, and (from
    `load_audio`) for clips that cannot be used."""
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
    placeholder = processor.placeholders.get("vision", "<image>")
    audio_placeholder = processor.placeholders.get("audio", "<audio>")
    extractor = processor.encoder_processors.get("audio")
    if extractor is None and any(record.get("audio") for record in pending):
        raise MmloomError(f"{questions} has questions with audio but the model has no audio encoder/processor")
    for record in pending:
        if not (record.get("image") or record.get("audio")):
            check_media(processor, False, f"an image (question {record['question_id']!r} of {questions} has none)")
    system_turn = [{"role": "system", "content": system}] if system is not None else []
    gen_kwargs = generation_kwargs(processor, max_new_tokens, temperature, model=model)
    model_id = model_id or "mmloom"
    image_root = Path(image_dir) if image_dir is not None else Path(questions).parent
    audio_root = Path(audio_dir) if audio_dir is not None else Path(questions).parent

    def run(advance):
        kept = "the answers before it are kept (the same command continues after them)"
        with disk_full_as_error(output, None, kept), output.open("a", encoding="utf-8") as sink:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                conversations, images, clips, prompts = [], [], [], []
                for record in chunk:
                    image = None
                    if record.get("image"):
                        image = load_image(image_root / record["image"])
                        if blank_images:
                            image = blank_like(image)
                    audio = question_audio(record, audio_root, extractor.sampling_rate, silence_audio) \
                        if record.get("audio") else []
                    content, prompt = question_content(record["text"], image is not None, SUFFIXES[suffix], placeholder,
                                                       len(audio), audio_placeholder)
                    conversations.append([*system_turn, {"role": "user", "content": content}])
                    images.append(image)
                    clips.append(audio or None)
                    prompts.append(prompt)
                audio_items = clips if any(c is not None for c in clips) else None
                answers = answer_batch(model, processor, conversations, images, gen_kwargs, audio=audio_items)
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
