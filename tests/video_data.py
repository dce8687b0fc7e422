"""Video test data: synthetic clips written with PyAV whose frames carry their own index (a 5-bit
pattern of black/white blocks plus a gray level), so that a test reads back which frames were
decoded; LLaVA records with `video` fields, built through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

SIZE = 64
BLOCK = 12  # five 12 px blocks across the top 16 rows: bit b of the frame index


def frame_of(index: int, size: int = SIZE) -> np.ndarray:
    """(size, size, 3) uint8: gray 8 * index (below the blocks), bit b of index as block b (white = 1)."""
    frame = np.full((size, size, 3), (8 * index) % 256, np.uint8)
    for bit in range(5):
        frame[:16, bit * BLOCK:(bit + 1) * BLOCK] = 255 if (index >> bit) & 1 else 0
    return frame


def index_of(frame: np.ndarray) -> int:
    """The index a decoded frame carries; its gray level must agree (lossy codecs move it a little)."""
    bits = [int(frame[2:14, b * BLOCK + 2:(b + 1) * BLOCK - 2].mean() > 127) for b in range(5)]
    index = sum(bit << b for b, bit in enumerate(bits))
    gray = float(frame[24:, :].mean())
    assert abs(gray - 8 * index) < 4, (index, gray)  # 8 levels apart: closer to its own than any other
    return index


def write_clip(path: Path, frames: int, codec: str = "ffv1", fps: int = 10, size: int = SIZE) -> Path:
    """A clip of `frames` index-carrying frames at `fps` (ffv1 lossless in .mkv, mpeg4 in .mp4)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv444p" if codec == "ffv1" else "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_of(i, size), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def build_video_data(root: Path, records: list[dict], *, msl: int = 400, num_patches: int = 16,
                     video: dict | None = None, name: str = "h5", strict: bool = False) -> int:
    """Build `records` (jsonl part0) with images from root/images and clips from root/videos into
    root/<name>; returns the CLI's exit status."""
    from mmloom.cli.main import main
    from mmloom.testing import tiny_tokenizer

    if not (root / "tok").exists():
        tiny_tokenizer().save_pretrained(root / "tok")
    (root / "jsonl").mkdir(parents=True, exist_ok=True)
    (root / "jsonl" / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "images").mkdir(exist_ok=True)
    section = {"video_dir": str(root / "videos"), "num_frames": 4, **(video or {})}
    cfg = {"setup": {"input_dir": str(root / "jsonl"), "output_dir": str(root / name), "processes": 1,
                     "samples_per_file": 4},
           "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": msl},
           "dataset": {"system_prompt_style": "vicuna_v1", "num_patches": num_patches,
                       "image_dir": str(root / "images"), "video": section}}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return main(["data", "build", str(root / f"{name}.yaml"), "--quiet", "--overwrite", *(["--strict"] * strict)])


def video_record(video, question: str = "<video>\nWhat moves?", answer: str = "A square.", **extra) -> dict:
    return {"video": video, **extra, "conversations": [{"from": "human", "value": question},
                                                      {"from": "gpt", "value": answer}]}


def data_params(root: Path, name: str = "h5") -> dict:
    return json.loads((root / name / "data_params.json").read_text())
