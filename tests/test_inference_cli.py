"""`mmloom chat` (one-shot and interactive) and `mmloom generate` (batched == one by one, resumable)."""

import io
import json

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from helpers import vlm
from mmloom.cli.main import main
from mmloom.inference.chat import ChatSession, interactive
from mmloom.inference.generate import load_model_and_processor
from mmloom.interop.common import Bundle, write_mmloom
from mmloom.processing.image import blank_like
from mmloom.testing import tiny_tokenizer

CLIP_PROC = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
QUESTIONS = ["What is it?", "What colour is the shape?", "How many shapes?", "Is there a circle?",
             "Describe the picture.", "Where is the square?", "Red?"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny saved model with its processor, three images and a question file."""
    root = tmp_path_factory.mktemp("infer")
    torch.manual_seed(0)
    # a larger init spread makes the random model's answers depend on the prompt and the image
    write_mmloom(Bundle(vlm(initializer_range=0.1).eval(), tiny_tokenizer(), {"vision": CLIP_PROC}), root / "model")
    images = root / "images"
    images.mkdir()
    colours = [(220, 20, 20), (20, 200, 40), (30, 30, 230)]
    for i, colour in enumerate(colours):
        image = Image.new("RGB", (40 + 8 * i, 32), colour)
        image.paste((255, 255, 0), (4, 4, 16, 16 + 2 * i))
        image.save(images / f"{i}.png")
    records = []
    for i, text in enumerate(QUESTIONS):
        record = {"question_id": i, "text": text, "category": "even" if i % 2 == 0 else "odd"}
        if i != 4:  # one text-only question in the batch
            record["image"] = f"{i % 3}.png"
        records.append(record)
    (root / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_chat_one_shot_prints_the_answer(workspace, capsys):
    args = ["chat", str(workspace / "model"), "--image", str(workspace / "images" / "0.png"),
            "--prompt", "What is it?", "--max-new-tokens", "6"]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip()
    model, processor = load_model_and_processor(workspace / "model")
    session = ChatSession(model, processor, image=workspace / "images" / "0.png", max_new_tokens=6, stream=False)
    expected = session.ask("What is it?")
    assert printed == expected and printed


def test_chat_interactive_keeps_the_conversation(workspace, capsys, monkeypatch):
    lines = ["What is it?", "And the colour?", f"/image {workspace / 'images' / '1.png'}", "What now?",
             "/reset", "/bogus", "Hello", "/quit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert main(["chat", str(workspace / "model"), "--image", str(workspace / "images" / "0.png"),
                 "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("ASSISTANT:") == 4 and "(conversation reset)" in out and "unknown command '/bogus'" in out
    assert "new image" in out

    model, processor = load_model_and_processor(workspace / "model")
    session = ChatSession(model, processor, image=workspace / "images" / "0.png", max_new_tokens=4, stream=False)
    feed = iter(["What is it?", "And the colour?"])

    def read_line(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    assert interactive(session, read_line, out=io.StringIO()) == 2
    roles = [m["role"] for m in session.messages]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert session.messages[0]["content"] == "<image>\nWhat is it?" and session.messages[2]["content"] == "And the colour?"


def run_generate(workspace, output, *extra):
    return main(["generate", str(workspace / "model"), str(workspace / "questions.jsonl"), "--output", str(output),
                 "--image-dir", str(workspace / "images"), "--max-new-tokens", "5", *extra])


def test_generate_batched_equals_one_by_one(workspace, tmp_path):
    assert run_generate(workspace, tmp_path / "batched.jsonl", "--batch-size", "4") == 0
    assert run_generate(workspace, tmp_path / "single.jsonl", "--batch-size", "1") == 0
    batched = [json.loads(line) for line in (tmp_path / "batched.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (tmp_path / "single.jsonl").read_text().splitlines()]
    assert batched == single and [r["question_id"] for r in batched] == list(range(len(QUESTIONS)))
    assert set(batched[0]) == {"question_id", "prompt", "text", "model_id"} and batched[0]["model_id"] == "model"
    assert batched[1]["prompt"] == "What colour is the shape?"
    assert len({r["text"] for r in batched}) >= 3  # answers differ, so the comparison means something

    assert run_generate(workspace, tmp_path / "short.jsonl", "--suffix", "short", "--blank-images") == 0
    first = json.loads((tmp_path / "short.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == "What is it?\nAnswer the question using a single word or phrase."


def test_generate_resumes(workspace, tmp_path):
    output = tmp_path / "answers.jsonl"
    assert run_generate(workspace, output, "--batch-size", "3") == 0
    full = output.read_text()
    lines = full.splitlines(keepends=True)
    output.write_text("".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:10])  # + a torn line
    assert run_generate(workspace, output, "--batch-size", "3") == 0
    assert output.read_text() == full
    assert run_generate(workspace, output) == 0  # nothing left to do
    assert output.read_text() == full


def test_blank_image_keeps_size_and_mean_colour():
    image = Image.new("RGB", (10, 6), (0, 0, 0))
    image.paste((200, 100, 50), (0, 0, 5, 6))
    blank = blank_like(image)
    assert blank.size == (10, 6) and blank.getpixel((9, 5)) == (100, 50, 25) == blank.getpixel((0, 0))
