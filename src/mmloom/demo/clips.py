"""Synthetic video clips: two coloured shapes on a plain background, one moving across the frame
(left, right, up or down), each appearing at its own frame, written as MPEG-4 clips with PyAV, with
captions and question/answer pairs about them.

Every answer depends on the frames (and the order question on their order), while the questions of
a type are the same text for every clip, so a model that ignores the video falls to the majority
answer of each type.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmloom.demo.scenes import COLOURS, SHAPES
from mmloom.demo.splits import write_splits

SIZE = 48  # frame side in pixels (the tiny CLIP's image size)
FRAMES = 16  # frames per clip, at FPS: 2 s
FPS = 8
RADIUS = 7
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ARTICLES = {"circle": "A circle.", "square": "A square.", "triangle": "A triangle."}


@dataclass(frozen=True)
class Actor:
    """One shape of a clip: colour and shape names, where it is at frame 0 (`x`, `y`: its centre in
    pixels), how it moves (a `DIRECTIONS` key, or None: it stays) and the frame it appears at."""

    colour: str
    shape: str
    x: float
    y: float
    direction: str | None
    appears: int

    def position(self, frame: int) -> tuple[float, float]:
        """Its centre at `frame`: when it moves, it crosses most of the frame between the frame it
        appears at and the last one (a late one moves faster)."""
        if self.direction is None:
            return self.x, self.y
        dx, dy = DIRECTIONS[self.direction]
        step = (SIZE - 2 * RADIUS - 4) / (FRAMES - 1 - self.appears)
        moved = step * max(0, frame - self.appears)
        return self.x + dx * moved, self.y + dy * moved


def random_clip(rng: random.Random) -> list[Actor]:
    """Two shapes of different kinds and colours: one moves (from the side it leaves), the other stays
    in the middle band; one appears at frame 0-2, the other at frame 6-9."""
    kinds, colours = rng.sample(SHAPES, 2), rng.sample(list(COLOURS), 2)
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    low, high = RADIUS + 2, SIZE - RADIUS - 2
    start = {-1: high, 1: low, 0: None}
    x = start[dx] if dx else rng.uniform(low, high)
    y = start[dy] if dy else rng.uniform(low, high)
    first, second = rng.randint(0, 2), rng.randint(6, 9)
    mover_first = rng.random() < 0.5
    mover = Actor(colours[0], kinds[0], x, y, direction, first if mover_first else second)
    still = Actor(colours[1], kinds[1], rng.uniform(low, high), rng.uniform(low, high), None,
                  second if mover_first else first)
    return [mover, still]


def render(actors: list[Actor], frame: int, background=(250, 250, 250)) -> np.ndarray:
    """Frame `frame` of a clip, (SIZE, SIZE, 3) uint8: the actors that have appeared, the still one
    drawn first."""
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    for actor in sorted(actors, key=lambda a: a.direction is not None):
        if frame < actor.appears:
            continue
        cx, cy = actor.position(frame)
        box = (cx - RADIUS, cy - RADIUS, cx + RADIUS, cy + RADIUS)
        fill = COLOURS[actor.colour]
        if actor.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif actor.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - RADIUS), (cx + RADIUS, cy + RADIUS), (cx - RADIUS, cy + RADIUS)], fill=fill)
    return np.asarray(image)


def write_clip(path: Path, actors: list[Actor]) -> None:
    """The clip as MPEG-4 video (`FRAMES` frames at `FPS`) in an .mp4 file."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}  # near-lossless: the colours survive the codec
        for frame in range(FRAMES):
            for packet in stream.encode(av.VideoFrame.from_ndarray(render(actors, frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def caption(actors: list[Actor]) -> str:
    """The clip in words: ``"A red circle moves right. A blue square appears first."``"""
    mover, still = actors
    first = min(actors, key=lambda a: a.appears)
    return (f"A {mover.colour} {mover.shape} moves {mover.direction}. The {still.colour} {still.shape} stays. "
            f"The {first.shape} appears first.")


def questions(actors: list[Actor]) -> list[tuple[str, str, str]]:
    """(type, question, answer) triples: the direction of motion, the moving shape, the shape that
    appears first."""
    mover, _ = actors
    first = min(actors, key=lambda a: a.appears)
    return [
        ("direction", "Which way does the moving shape go?", mover.direction.capitalize() + "."),
        ("mover", "What shape is moving?", ARTICLES[mover.shape]),
        ("first", "Which shape appears first?", ARTICLES[first.shape]),
    ]


def write_dataset(out_dir: str | Path, num_train: int, num_eval: int, seed: int = 0) -> dict[str, Path]:
    """Write the clips, phase-1 captions, phase-2 conversations and held-out questions/references (the
    layout of :mod:`mmloom.demo.splits`, media key ``video``); the same `seed` gives the same files.

    Layout: video/{split}/NNNNNN.mp4 (`FRAMES` frames of SIZE x SIZE at `FPS`), phase1/train.jsonl,
    phase2/train.jsonl, eval/questions.jsonl (question_id, video, text, type), eval/references.jsonl."""
    out = Path(out_dir)
    rng = random.Random(seed)
    for split in ("train", "eval"):
        (out / "video" / split).mkdir(parents=True, exist_ok=True)

    def make_item(split: str, index: int) -> tuple[str, str, list[tuple[str, str, str]]]:
        actors = random_clip(rng)
        clip = f"video/{split}/{index:06d}.mp4"
        write_clip(out / clip, actors)
        return clip, caption(actors), questions(actors)

    return write_splits(out, num_train, num_eval, rng, "video", "Describe the clip.", make_item)
