"""Several images per conversation in use: `mmloom chat --image A --image B`, `/image` adding one to
the conversation, `mmloom generate` questions with a list of images, and `MultimodalModel.generate`
on prompts with several images (equal to greedy decoding by full forward passes)."""

from __future__ import annotations

import io
import json

import torch
from PIL import Image

from helpers import IMAGE_ID
from mmloom.cli.main import main
from mmloom.inference.chat import ChatSession, interactive
from mmloom.inference.generate import load_model_and_processor
from mmloom.model.batch import model_inputs
from test_inference_cli import workspace  # noqa: F401 - the tiny saved model, images and questions


def image(workspace, i):  # noqa: F811
    return workspace / "images" / f"{i}.png"


def test_chat_with_two_images(workspace, capsys):  # noqa: F811
    args = ["chat", str(workspace / "model"), "--image", str(image(workspace, 0)), "--image", str(image(workspace, 1)),
            "--prompt", "Which one is red?", "--max-new-tokens", "6"]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip()
    model, processor = load_model_and_processor(workspace / "model")
    session = ChatSession(model, processor, image=[image(workspace, 0), image(workspace, 1)], max_new_tokens=6,
                          stream=False)
    assert session.ask("Which one is red?") == printed and printed
    assert session.messages[0]["content"] == "<image>\n<image>\nWhich one is red?"
    # the second image is read: another second image gives other logits
    swapped = ChatSession(model, processor, image=[image(workspace, 0), image(workspace, 2)], max_new_tokens=6,
                          stream=False)
    logits = []
    for s in (session, swapped):
        batch = processor(conversations=[session.messages[:1]], images=[s.items["image"]], add_generation_prompt=True,
                          return_labels=False)
        assert int((batch["input_ids"] == IMAGE_ID).sum()) == 2 * model.num_feature_tokens("vision")
        with torch.no_grad():
            logits.append(model(**model_inputs(batch)).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


def test_slash_image_adds_one_to_the_conversation(workspace):  # noqa: F811
    model, processor = load_model_and_processor(workspace / "model")
    session = ChatSession(model, processor, image=image(workspace, 0), max_new_tokens=3, stream=False)
    feed = iter(["What is it?", f"/image {image(workspace, 1)}", "And this one?", "Compare them.", "/reset", "Again?"])

    def read_line(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    assert interactive(session, read_line, out=out) == 4
    assert "(new image" in out.getvalue()
    # after /reset: a new conversation about both images, their placeholders in its first turn
    assert session.messages[0]["content"] == "<image>\n<image>\nAgain?"
    # before it: the first image in turn 1, the added one in turn 2, none in turn 3
    session = ChatSession(model, processor, image=image(workspace, 0), max_new_tokens=3, stream=False)
    session.ask("What is it?")
    session.add_item("image", image(workspace, 1))
    session.ask("And this one?")
    session.ask("Compare them.")
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == ["<image>\nWhat is it?", "<image>\nAnd this one?", "Compare them."]
    assert len(session.items["image"]) == 2


def test_generate_questions_with_a_list_of_images(workspace, tmp_path):  # noqa: F811
    questions = [{"question_id": "two", "text": "Compare <image> and <image>.", "image": ["0.png", "1.png"]},
                 {"question_id": "one", "text": "What is it?", "image": "2.png"},
                 {"question_id": "three", "text": "Which differs?", "image": ["2.png", "0.png", "1.png"]}]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    outs = {}
    for size in (3, 1):
        outs[size] = tmp_path / f"a{size}.jsonl"
        assert main(["generate", str(workspace / "model"), str(path), "--output", str(outs[size]), "--image-dir",
                     str(workspace / "images"), "--max-new-tokens", "5", "--batch-size", str(size)]) == 0
    batched, single = ([json.loads(x) for x in outs[k].read_text().splitlines()] for k in (3, 1))
    assert batched == single
    # each answer is what a chat about the same images gives
    model, processor = load_model_and_processor(workspace / "model")
    for q, answer in zip(questions, batched, strict=True):
        names = q["image"] if isinstance(q["image"], list) else [q["image"]]
        session = ChatSession(model, processor, image=[workspace / "images" / n for n in names], max_new_tokens=5,
                              stream=False)
        assert session.ask(q["text"].replace("<image>", "")) == answer["text"]  # generate's prompt layout
        assert session.messages[0]["content"].count("<image>") == len(names)


def test_model_generate_with_several_images_equals_greedy_forward(workspace):  # noqa: F811
    model, processor = load_model_and_processor(workspace / "model")
    images = [Image.open(image(workspace, i)).convert("RGB") for i in range(3)]
    conversations = [[{"role": "user", "content": "<image>\n<image>\nCompare."}, {"role": "assistant", "content": "Ok."},
                      {"role": "user", "content": "<image>\nAnd this?"}],
                     [{"role": "user", "content": "<image>\nWhat?"}]]
    batch = processor(conversations=conversations, images=[images, images[1:2]], add_generation_prompt=True,
                      padding_side="left", return_labels=False)
    inputs = model_inputs(batch)
    assert inputs["vision"]["pixel_values"].shape[0] == 4
    out = model.generate(inputs.pop("input_ids"), attention_mask=inputs.pop("attention_mask"), **inputs,
                         max_new_tokens=4, do_sample=False)
    for row, (conversation, its_images) in enumerate(zip(conversations, [images, images[1:2]], strict=True)):
        one = processor(conversations=[conversation], images=[its_images], add_generation_prompt=True,
                        return_labels=False)
        ids = one["input_ids"]
        for _ in range(4):  # greedy by full forward passes, no KV cache
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), vision=one["vision"]).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        assert out[row, -4:].tolist() == ids[0, -4:].tolist()
