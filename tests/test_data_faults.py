"""Data faults left from #17 item 8: text that is not UTF-8 reaching a tokenizer.

JSON can carry bytes that were not UTF-8 as lone-surrogate escapes (`"caf\\udce9"`: what
`json.dumps` writes for text read with `surrogateescape`). They are no characters: the record is a
counted `bad_encoding` skip in `data build` (never a traceback, never U+FFFD), and a question file
holding one is refused with its line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mmloom.cli.main import main
from mmloom.data.records_io import unencodable_text
from tokenizer_families import LLAMA2_TOKENIZER_MODEL, stock_vicuna_folder

ESCAPED = '{"id": "bad", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, ' \
          '{"from": "gpt", "value": "caf\\udce9 au lait"}]}'


def good(i: int) -> str:
    return json.dumps({"id": str(i), "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": f"A cup of coffee {i}."}]})


def test_unencodable_text_names_the_byte():
    assert unencodable_text(json.loads('"caf\\udce9"')) == "not UTF-8 text (byte 0xe9, escaped as \\udce9)"
    assert unencodable_text(json.loads('"x\\ud83d y"')) == "not UTF-8 text (lone surrogate \\ud83d)"
    assert unencodable_text("café \U0001F600 \ufffd") is None  # real characters, U+FFFD included


@pytest.mark.parametrize("family", ["byte-level-bpe", "llama2-sentencepiece"])
def test_escaped_non_utf8_answer_is_a_counted_skip(tmp_path, tokenizer, family, capsys):
    if family == "byte-level-bpe":
        tokenizer.save_pretrained(tmp_path / "tok")
    else:
        assert LLAMA2_TOKENIZER_MODEL.is_file(), "CI has ../shared/assets/llama2-tokenizer"
        stock_vicuna_folder(tmp_path / "tok")
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "in.jsonl").write_text("\n".join([good(0), ESCAPED, good(1)]) + "\n")
    cfg = {"setup": {"input_dir": str(tmp_path / "in.jsonl"), "output_dir": str(tmp_path / "h5"), "processes": 1},
           "processor": {"tokenizer_type": str(tmp_path / "tok"), "max_sequence_length": 256},
           "dataset": {"num_patches": 4, "image_dir": str(tmp_path), "system_prompt_style": "vicuna_v1"}}
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "build", str(tmp_path / "build.yaml"), "--quiet"]) == 0
    params = json.loads((tmp_path / "h5" / "data_params.json").read_text())
    assert params["post-process"]["skipped"] == {"bad_encoding": 1}
    assert params["post-process"]["n_examples"] == 2
    capsys.readouterr()
    assert main(["data", "build", str(tmp_path / "build.yaml"), "--quiet", "--strict", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mmloom data: error: {tmp_path / 'in.jsonl'}:2: bad_encoding "
                   "(turn 1: not UTF-8 text (byte 0xe9, escaped as \\udce9))")


def test_question_file_with_escaped_non_utf8_text_is_refused(tmp_path):
    from transformers import CLIPImageProcessor

    from helpers import vlm
    from mmloom.errors import MmloomError
    from mmloom.inference.generate import generate_answers
    from mmloom.processing.processor import MultimodalProcessor
    from mmloom.testing import tiny_tokenizer

    model = vlm().eval()
    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = MultimodalProcessor.from_model(model, tiny_tokenizer(), {"vision": clip})
    questions = Path(tmp_path / "q.jsonl")
    questions.write_text('{"question_id": 1, "text": "fine"}\n{"question_id": 2, "text": "caf\\udce9"}\n')
    with pytest.raises(MmloomError, match=r"q.jsonl: record 2: 'text' is not UTF-8 text \(byte 0xe9"):
        generate_answers(model, processor, questions, tmp_path / "a.jsonl")
    assert not (tmp_path / "a.jsonl").exists()


def test_chat_refuses_non_utf8_questions(tmp_path):
    """Bytes that are not UTF-8 typed at the chat prompt (or passed in argv) reach Python as lone
    surrogates: one error line and the session goes on (it was a tokenizer TypeError traceback)."""
    import io

    from transformers import CLIPImageProcessor

    from helpers import vlm
    from mmloom.errors import MmloomError
    from mmloom.inference.chat import ChatSession, interactive
    from mmloom.processing.processor import MultimodalProcessor
    from mmloom.testing import tiny_tokenizer

    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model = vlm().eval()
    session = ChatSession(model, MultimodalProcessor.from_model(model, tiny_tokenizer(), {"vision": clip}),
                          max_new_tokens=2, stream=False)
    with pytest.raises(MmloomError, match=r"the question is not UTF-8 text \(byte 0xe9"):
        session.ask("caf\udce9")
    lines = iter(["caf\udce9", "What is it?"])

    def read_line(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    assert interactive(session, read_line, out=out) == 1
    assert "error: the question is not UTF-8 text (byte 0xe9" in out.getvalue()
