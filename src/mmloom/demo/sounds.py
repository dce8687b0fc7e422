"""Synthetic sounds: 1-4 beeps of different pitches and lengths, rising or falling sweeps, or noise,
generated with numpy, with captions and question/answer pairs about them.

Every answer depends on the sound only (the questions of a type are the same text for every clip),
so a model that ignores the audio falls to the majority answer of each question type.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmloom.demo.splits import write_splits

SAMPLE_RATE = 8000  # Hz
PITCHES = {"low": 400.0, "middle": 900.0, "high": 2000.0}  # Hz
KINDS = ("beeps", "rising", "falling", "noise")
NUMBERS = {1: "One", 2: "Two", 3: "Three", 4: "Four"}
KIND_ANSWERS = {"beeps": "Beeps.", "rising": "A rising sweep.", "falling": "A falling sweep.", "noise": "Noise."}


@dataclass
class Sound:
    """A synthetic sound: its kind (one of `KINDS`) and, for beeps, each beep's pitch name."""

    kind: str
    pitches: list[str] = field(default_factory=list)  # beeps: the pitch name of each beep, in order

    @property
    def count(self) -> int:
        """The number of beeps (0 for sweeps and noise)."""
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
    """The sound described in words: the kind's answer, or for beeps their count and pitches
    (``"Two beeps: low, high."``)."""
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
    """Write WAV clips, phase-1 captions, phase-2 conversations and held-out questions/references
    (the layout of :mod:`mmloom.demo.splits`, media key ``audio``); the same `seed` gives the same files.

    Layout: audio/{split}/NNNNNN.wav (mono 16-bit PCM at `SAMPLE_RATE` Hz, 1-2 s), phase1/train.jsonl,
    phase2/train.jsonl, eval/questions.jsonl (question_id, audio, text, type), eval/references.jsonl.
    """
    import soundfile

    out = Path(out_dir)
    rng = random.Random(seed)
    for split in ("train", "eval"):
        (out / "audio" / split).mkdir(parents=True, exist_ok=True)

    def make_item(split: str, index: int) -> tuple[str, str, list[tuple[str, str, str]]]:
        sound = random_sound(rng)
        clip = f"audio/{split}/{index:06d}.wav"
        soundfile.write(out / clip, synthesize(sound, rng), SAMPLE_RATE, subtype="PCM_16")
        return clip, caption(sound), questions(sound, rng)

    return write_splits(out, num_train, num_eval, rng, "audio", "Describe the sound.", make_item)
