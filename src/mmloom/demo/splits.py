"""The file layout both synthetic demo datasets (scenes, sounds) are written in: LLaVA records.

``phase1/train.jsonl`` (one captioning record per training item), ``phase2/train.jsonl`` (the item's
question/answer pairs as one conversation, in random order, the placeholder in the first turn),
``eval/questions.jsonl`` (``question_id``, the media key, ``text``, ``type``: what `mmloom generate`
reads) and ``eval/references.jsonl`` (``question_id``, ``answer``, ``type``: what `mmloom score` reads).

A dataset may add examples about several items at once (the scenes' "Which picture has more shapes?"),
made after the single items of both splits, so that those stay the same with or without them. They
are in phase 2 and the held-out files only: the media key holds the list of paths, and the first
turn starts with one placeholder per item, in order (where `mmloom generate` puts them).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from mmloom.files import write_text

QA = list[tuple[str, str, str]]  # [(question type, question, answer)]
# what a dataset makes of item `index` of `split`: (media path relative to the dataset folder, caption, QA)
MakeItem = Callable[[str, int], tuple[str, str, QA]]
# what a dataset makes of several-item example `index` of `split`: (media paths, in order, QA)
MakeMulti = Callable[[str, int], tuple[list[str], QA]]


def write_splits(out: Path, num_train: int, num_eval: int, rng: random.Random, media_key: str,
                 describe: str, make_item: MakeItem, num_multi: tuple[int, int] = (0, 0),
                 make_multi: MakeMulti | None = None) -> dict[str, Path]:
    """Make `num_train` training and `num_eval` held-out items with `make_item` (which writes the media
    file), then `num_multi` (training, held-out) several-item examples with `make_multi` (which writes
    their files), and write the four record files of the layout above; `media_key` is the records' media
    field (``image``, ``audio``, also the placeholder ``<media_key>``), `describe` the captioning question.
    Returns the folders {"phase1", "phase2", "eval"}.

    Raises ValueError when `num_multi` asks for examples and there is no `make_multi`."""
    if any(num_multi) and make_multi is None:
        raise ValueError(f"num_multi={num_multi} needs make_multi")
    paths = {name: out / name for name in ("phase1", "phase2", "eval")}
    phase1, phase2, held_questions, references = [], [], [], []

    def conversation(media: list[str], qa: QA) -> list[dict]:
        """The pairs in random order as turns, one placeholder per item at the front of the first."""
        placeholders = f"<{media_key}>\n" * len(media)
        turns = []
        for turn, (_, question, answer) in enumerate(rng.sample(qa, len(qa))):
            prefix = placeholders if turn == 0 else ""
            turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
        return turns

    def hold_out(name: str, media: str | list[str], qa: QA) -> None:
        for kind, question, answer in qa:
            qid = f"{name}-{kind}".replace(" ", "-")
            held_questions.append({"question_id": qid, media_key: media, "text": question, "type": kind})
            references.append({"question_id": qid, "answer": answer, "type": kind})

    for split, count in (("train", num_train), ("eval", num_eval)):
        for index in range(count):
            media, caption, qa = make_item(split, index)
            if split == "train":
                phase1.append({"id": f"cap-{index}", media_key: media, "conversations": [
                    {"from": "human", "value": f"<{media_key}>\n{describe}"},
                    {"from": "gpt", "value": caption}]})
                phase2.append({"id": f"qa-{index}", media_key: media, "conversations": conversation([media], qa)})
            else:
                hold_out(str(index), media, qa)
    for split, count in (("train", num_multi[0]), ("eval", num_multi[1])):
        for index in range(count):
            items, qa = make_multi(split, index)
            if split == "train":
                phase2.append({"id": f"multi-{index}", media_key: items, "conversations": conversation(items, qa)})
            else:
                hold_out(f"multi{index}", items, qa)
    for name, records in (("phase1/train.jsonl", phase1), ("phase2/train.jsonl", phase2),
                          ("eval/questions.jsonl", held_questions), ("eval/references.jsonl", references)):
        write_text(out / name, "".join(json.dumps(r) + "\n" for r in records))
    return paths
