"""Synthetic scenes: 1-3 coloured shapes on a 3x3 grid, with captions and question/answer pairs,
and pairs of scenes with a question about both ("Which picture has more shapes?").

Every answer depends on the images only, so a model that ignores them falls to chance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mmloom.demo.splits import write_splits

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "One", 2: "Two", 3: "Three"}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")


@dataclass(frozen=True)
class Item:
    """One shape of a scene: colour and shape names, grid cell (`row`, `col` in 0..2)."""

    colour: str
    shape: str
    row: int
    col: int

    @property
    def name(self) -> str:
        """``"{colour} {shape}"``, e.g. ``"red circle"``."""
        return f"{self.colour} {self.shape}"


def random_scene(rng: random.Random) -> list[Item]:
    """1-3 shapes of random colour and kind in distinct cells of the 3x3 grid."""
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(1, 3))
    return [Item(rng.choice(list(COLOURS)), rng.choice(SHAPES), r, c) for r, c in cells]


def render(scene: list[Item], cell: int = 16, background=(250, 250, 250)) -> Image.Image:
    """Draw the scene: one shape per occupied cell of a 3x3 grid."""
    image = Image.new("RGB", (3 * cell, 3 * cell), background)
    draw = ImageDraw.Draw(image)
    margin = cell // 6
    for item in scene:
        x0, y0 = item.col * cell + margin, item.row * cell + margin
        x1, y1 = (item.col + 1) * cell - margin - 1, (item.row + 1) * cell - margin - 1
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif item.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def caption(scene: list[Item]) -> str:
    """One sentence naming every shape and its cell, e.g. ``"A red circle at the top left."``."""
    parts = [f"a {item.name} at the {ROWS[item.row]} {COLS[item.col]}" for item in scene]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def questions(scene: list[Item], rng: random.Random) -> list[tuple[str, str, str]]:
    """(type, question, answer) triples answerable from the scene, one per type where possible."""
    out = []
    shapes = [item.shape for item in scene]
    colours = [item.colour for item in scene]
    unique_shape = [item for item in scene if shapes.count(item.shape) == 1]
    if unique_shape:
        item = rng.choice(unique_shape)
        out.append(("colour", f"What colour is the {item.shape}?", item.colour.capitalize() + "."))
    unique_colour = [item for item in scene if colours.count(item.colour) == 1]
    if unique_colour:
        item = rng.choice(unique_colour)
        out.append(("shape", f"What shape is the {item.colour} object?", item.shape.capitalize() + "."))
    out.append(("count", "How many shapes are there?", NUMBERS[len(scene)] + "."))
    if rng.random() < 0.5:
        item = rng.choice(scene)
        out.append(("presence", f"Is there a {item.name}?", "Yes."))
    else:
        present = {item.name for item in scene}
        absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
        out.append(("presence", f"Is there a {rng.choice(absent)}?", "No."))
    pairs = [(a, b) for a in scene for b in scene if a.col != b.col and a.name != b.name]
    names = [item.name for item in scene]
    pairs = [(a, b) for a, b in pairs if names.count(a.name) == 1 and names.count(b.name) == 1]
    if pairs:
        a, b = rng.choice(pairs)
        side = "Left." if a.col < b.col else "Right."
        out.append(("position", f"Is the {a.name} left or right of the {b.name}?", side))
    return out


def random_pair(rng: random.Random) -> tuple[list[Item], list[Item]]:
    """Two random scenes with different numbers of shapes (the second is drawn again until they
    differ), so that "which has more" always has an answer."""
    first = random_scene(rng)
    second = random_scene(rng)
    while len(second) == len(first):
        second = random_scene(rng)
    return first, second


def pair_questions(first: list[Item], second: list[Item]) -> list[tuple[str, str, str]]:
    """The (type, question, answer) of a pair of scenes with different shape counts: type
    ``"two images"``, answered "The first." or "The second."."""
    if len(first) == len(second):
        raise ValueError(f"both scenes have {len(first)} shapes: no answer to which has more")
    answer = "The first." if len(first) > len(second) else "The second."
    return [("two images", "Which picture has more shapes, the first or the second?", answer)]


def write_dataset(out_dir: str | Path, num_train: int, num_eval: int, seed: int = 0,
                  num_pairs: tuple[int, int] = (0, 0)) -> dict[str, Path]:
    """Write images, phase-1 captions, phase-2 conversations and held-out questions/references
    (the layout of :mod:`mmloom.demo.splits`, media key ``image``), then `num_pairs` (training,
    held-out) two-image examples (:func:`pair_questions`) in phase 2 and the held-out files; the same
    `seed` gives the same files, and the single scenes are the same whatever `num_pairs`.

    Layout: images/{split}/NNNNNN.png (48x48 RGB), images/{split}/pair-NNNNNN-{1,2}.png,
    phase1/train.jsonl, phase2/train.jsonl, eval/questions.jsonl (question_id, image: a path or for a
    pair a list of two, text, type), eval/references.jsonl.
    """
    out = Path(out_dir)
    rng = random.Random(seed)
    for split in ("train", "eval"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)

    def make_item(split: str, index: int) -> tuple[str, str, list[tuple[str, str, str]]]:
        scene = random_scene(rng)
        image_path = f"images/{split}/{index:06d}.png"
        render(scene).save(out / image_path)
        return image_path, caption(scene), questions(scene, rng)

    def make_pair(split: str, index: int) -> tuple[list[str], list[tuple[str, str, str]]]:
        scenes = random_pair(rng)
        paths = [f"images/{split}/pair-{index:06d}-{k}.png" for k in (1, 2)]
        for scene, path in zip(scenes, paths, strict=True):
            render(scene).save(out / path)
        return paths, pair_questions(*scenes)

    return write_splits(out, num_train, num_eval, rng, "image", "Describe the image.", make_item,
                        num_multi=num_pairs, make_multi=make_pair)
