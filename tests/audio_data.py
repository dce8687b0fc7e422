"""Audio test data: WAV clips (numpy + soundfile), LLaVA records with `audio` fields (and images),
and their HDF5 build through the CLI, for the tiny Whisper of configs/tiny/audio*.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from mmloom.cli.main import main

RATE = 1600  # Hz, the tiny extractor's rate: 1 s window, 16 frames of 100 samples
EXTRACTOR = {"feature_size": 16, "sampling_rate": RATE, "hop_length": 100, "chunk_length": 1, "n_fft": 200}
AUDIO_SECTION = {"feature_extractor": EXTRACTOR, "stride": 2}
PITCH_WORDS = {200.0: "low", 500.0: "high"}


def tone(seconds: float, freq: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_clip(path: Path, wave: np.ndarray, rate: int = RATE, fmt: str | None = None) -> None:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, rate, format=fmt)


def write_image(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((32, 32, 3), 255, np.uint8)
    arr[8:24, 8:24] = colour
    Image.fromarray(arr).save(path)


def make_audio_data(root: Path, n: int = 16, with_images: bool = False, extra_records=(), msl: int = 160) -> Path:
    """n records with one or two clips (0.2-1 s) each, some text-only ones, with an image each when
    `with_images` (`<image>\\n<audio>\\n...`); built into root/h5 (vicuna_v1). Returns root."""
    from mmloom.testing import tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save_pretrained(root / "tok")
    records = []
    for i in range(n):
        freq = (200.0, 500.0)[i % 2]
        seconds = 0.2 + 0.8 * ((i * 7) % 10) / 10
        write_clip(root / "audio" / f"clip{i}.wav", tone(seconds, freq))
        if i % 5 == 4:  # text-only sample (a dummy clip keeps the audio encoder in the graph)
            records.append({"id": str(i), "conversations": [
                {"from": "human", "value": "Is it loud?"}, {"from": "gpt", "value": "Yes." * (1 + i % 2)}]})
            continue
        record = {"id": str(i), "audio": f"clip{i}.wav"}
        question = "<audio>\nIs the tone low or high?"
        if i % 3 == 2:  # two clips
            write_clip(root / "audio" / f"clip{i}b.wav", tone(0.5, 700.0))
            record["audio"] = [f"clip{i}.wav", f"clip{i}b.wav"]
            question = "<audio> then <audio>: is the first tone low or high?"
        if with_images:
            write_image(root / "images" / f"img{i}.png", ((220, 30, 30), (30, 60, 220))[i % 2])
            record["image"] = f"img{i}.png"
            question = "<image>\n" + question
        record["conversations"] = [
            {"from": "human", "value": question}, {"from": "gpt", "value": PITCH_WORDS[freq].capitalize() + "."},
            {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": ("Red.", "Blue.")[i % 2]}]
        records.append(record)
    records.extend(extra_records)
    (root / "jsonl").mkdir(exist_ok=True)
    (root / "jsonl" / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = {"system_prompt_style": "vicuna_v1", "audio": {**AUDIO_SECTION, "audio_dir": str(root / "audio")}}
    if with_images:
        dataset |= {"num_patches": 16, "image_dir": str(root / "images")}
    cfg = {"setup": {"input_dir": str(root / "jsonl"), "output_dir": str(root / "h5"), "processes": 1,
                     "samples_per_file": 6},
           "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": msl},
           "dataset": dataset}
    (root / "build.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "build", str(root / "build.yaml"), "--quiet", "--overwrite"]) == 0
    return root


def data_params(root: Path) -> dict:
    return json.loads((root / "h5" / "data_params.json").read_text())
