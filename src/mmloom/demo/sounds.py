"""Synthetic sounds: 1-4 beeps of different pitches and lengths, rising or falling sweeps, or noise,
generated with numpy, with captions and question/answer pairs about them.

Every answer depends on the sound only (the questions of a type are the same text for every clip),
so a model that ignores the audio falls to the majority answer of each question type.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SAMPLE_RATE = 8000  # Hz
PITCHES = {"low": 400.0, "middle": 900.0, "high": 2000.0}  # Hz
KINDS = ("beeps", "rising", "falling", "noise")
NUMBERS = {1: "One", 2: "Two", 3: "Three", 4: "Four"}
KIND_ANSWERS = {"beeps": "Beeps.", "rising": "A rising sweep.", "falling": "A falling sweep.", "noise": "Noise."}


@dataclass
class Sound:
    kind: str
    pitches: list[str] = field(default_factory=list)  # beeps: the pitch name of each beep, in order

    @property
    def count(self) -> int:
        return len(self.pitches)


def random_sound(rng: random.Random) -> Sound:
    """Beeps half of the time (1-4, each low/middle/high), else a rising sweep, a falling sweep or noise."""
    if rng.random() < 0.5:
        return Sound("beeps", [rng.choice(list(PITCHES)) for _ in range(rng.randint(1, 4))])
    return Sound(rng.choice(KINDS[1:]))


def synthesize(sound: Sound, rng: random.Random, rate: int = SAMPLE_RATE) -> np.ndarray:
    """The waveform (T,) float32 of a sound: beeps of 0.06-0.12 s with 0.05-0.1 s gaps, sweeps and
    noise of 0.3-0.8 s, placed at a random offset in a clip of 1-2 s whose length is drawn
    independently of the sound (so that a clip's length, which sets its number of audio tokens,
    tells nothing about the answers); random amplitude and a faint noise floor."""
    nprng = np.random.default_rng(rng.randrange(1 << 30))
    parts = []
    amplitude = rng.uniform(0.3, 0.8)
    if sound.kind == "beeps":
        for k, pitch in enumerate(sound.pitches):
            n = int(rate * rng.uniform(0.06, 0.12))
            t = np.arange(n) / rate
            envelope = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * rate))
            freq = PITCHES[pitch] * rng.uniform(0.95, 1.05)
            parts.append(amplitude * envelope * np.sin(2 * np.pi * freq * t))
            if k + 1 < sound.count:
                parts.append(np.zeros(int(rate * rng.uniform(0.05, 0.1))))
    elif sound.kind in ("rising", "falling"):
        n = int(rate * rng.uniform(0.3, 0.8))
        low, high = rng.uniform(300, 500), rng.uniform(1500, 2500)
        f0, f1 = (low, high) if sound.kind == "rising" else (high, low)
        freq = f0 * (f1 / f0) ** (np.arange(n) / n)  # exponential sweep
        phase = 2 * np.pi * np.cumsum(freq) / rate
        envelope = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.02 * rate))
        parts.append(amplitude * envelope * np.sin(phase))
    else:
        n = int(rate * rng.uniform(0.3, 0.8))
        parts.append(amplitude * 0.5 * nprng.standard_normal(n))
    content = np.concatenate(parts)
    total = max(int(rate * rng.uniform(1.0, 2.0)), content.shape[0] + 1)
    wave = np.zeros(total)
    offset = rng.randrange(total - content.shape[0])
    wave[offset:offset + content.shape[0]] = content
    wave += 0.005 * nprng.standard_normal(total)  # noise floor
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def caption(sound: Sound) -> str:
    if sound.kind != "beeps":
        return KIND_ANSWERS[sound.kind]
    word = "beep" if sound.count == 1 else "beeps"
    return f"{NUMBERS[sound.count]} {word}: {', '.join(sound.pitches)}."


def questions(sound: Sound, rng: random.Random) -> list[tuple[str, str, str]]:
    """(type, question, answer) triples about the sound: kind (shape of the sound) always; count and
    first pitch for beeps; pitch order (first vs last beep) when they differ."""
    out = [("kind", "What kind of sound is it?", KIND_ANSWERS[sound.kind])]
    if sound.kind == "beeps":
        out.append(("count", "How many beeps are there?", NUMBERS[sound.count] + "."))
        out.append(("pitch", "Is the first beep low, middle or high?", sound.pitches[0].capitalize() + "."))
        first, last = PITCHES[sound.pitches[0]], PITCHES[sound.pitches[-1]]
        if sound.count > 1 and first != last:
            out.append(("order", "Is the last beep higher or lower than the first?",
                        "Higher." if last > first else "Lower."))
    return out


def write_dataset(out_dir: str | Path, num_train: int, num_eval: int, seed: int = 0) -> dict[str, Path]:
    """Write WAV clips, phase-1 captions, phase-2 conversations and held-out questions/references.

    Layout: audio/{split}/NNNNNN.wav, phase1/train.jsonl, phase2/train.jsonl,
    eval/questions.jsonl (question_id, audio, text, type), eval/references.jsonl.
    """
    import soundfile

    out = Path(out_dir)
    rng = random.Random(seed)
    paths = {name: out / name for name in ("phase1", "phase2", "eval")}
    for folder in [*paths.values(), out / "audio" / "train", out / "audio" / "eval"]:
        folder.mkdir(parents=True, exist_ok=True)
    phase1, phase2, held_questions, references = [], [], [], []
    for split, count in (("train", num_train), ("eval", num_eval)):
        for index in range(count):
            sound = random_sound(rng)
            clip = f"audio/{split}/{index:06d}.wav"
            soundfile.write(out / clip, synthesize(sound, rng), SAMPLE_RATE, subtype="PCM_16")
            qa = questions(sound, rng)
            if split == "train":
                phase1.append({"id": f"cap-{index}", "audio": clip, "conversations": [
                    {"from": "human", "value": "<audio>\nDescribe the sound."},
                    {"from": "gpt", "value": caption(sound)}]})
                turns = []
                for turn, (_, question, answer) in enumerate(rng.sample(qa, len(qa))):
                    prefix = "<audio>\n" if turn == 0 else ""
                    turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
                phase2.append({"id": f"qa-{index}", "audio": clip, "conversations": turns})
            else:
                for kind, question, answer in qa:
                    qid = f"{index}-{kind}"
                    held_questions.append({"question_id": qid, "audio": clip, "text": question, "type": kind})
                    references.append({"question_id": qid, "answer": answer, "type": kind})
    for name, records in (("phase1/train.jsonl", phase1), ("phase2/train.jsonl", phase2),
                          ("eval/questions.jsonl", held_questions), ("eval/references.jsonl", references)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths
