"""The file layout both synthetic demo datasets (scenes, sounds) are written in: LLaVA records.

``phase1/train.jsonl`` (one captioning record per training item), ``phase2/train.jsonl`` (the item's
question/answer pairs as one conversation, in random order, the placeholder in the first turn),
``eval/questions.jsonl`` (``question_id``, the media key, ``text``, ``type``: what `mmloom generate`
reads) and ``eval/references.jsonl`` (``question_id``, ``answer``, ``type``: what `mmloom score` reads).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from mmloom.files import write_text

# what a dataset makes of item `index` of `split`: (media path relative to the dataset folder,
# caption, [(question type, question, answer)])
MakeItem = Callable[[str, int], tuple[str, str, list[tuple[str, str, str]]]]


def write_splits(out: Path, num_train: int, num_eval: int, rng: random.Random, media_key: str,
                 describe: str, make_item: MakeItem) -> dict[str, Path]:
    """Make `num_train` training and `num_eval` held-out items with `make_item` (which writes the media
    file) and write the four record files of the layout above; `media_key` is the records' media field
    (``image``, ``audio``, also the placeholder ``<media_key>``), `describe` the captioning question.
    Returns the folders {"phase1", "phase2", "eval"}."""
    paths = {name: out / name for name in ("phase1", "phase2", "eval")}
    placeholder = f"<{media_key}>\n"
    phase1, phase2, held_questions, references = [], [], [], []
    for split, count in (("train", num_train), ("eval", num_eval)):
        for index in range(count):
            media, caption, qa = make_item(split, index)
            if split == "train":
                phase1.append({"id": f"cap-{index}", media_key: media, "conversations": [
                    {"from": "human", "value": placeholder + describe},
                    {"from": "gpt", "value": caption}]})
                turns = []
                for turn, (_, question, answer) in enumerate(rng.sample(qa, len(qa))):
                    prefix = placeholder if turn == 0 else ""
                    turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
                phase2.append({"id": f"qa-{index}", media_key: media, "conversations": turns})
            else:
                for kind, question, answer in qa:
                    qid = f"{index}-{kind}"
                    held_questions.append({"question_id": qid, media_key: media, "text": question, "type": kind})
                    references.append({"question_id": qid, "answer": answer, "type": kind})
    for name, records in (("phase1/train.jsonl", phase1), ("phase2/train.jsonl", phase2),
                          ("eval/questions.jsonl", held_questions), ("eval/references.jsonl", references)):
        write_text(out / name, "".join(json.dumps(r) + "\n" for r in records))
    return paths
