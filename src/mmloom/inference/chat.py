"""Chat with a saved model: one answer, or an interactive session that keeps the conversation.

Interactive commands: `/<noun> PATH` for each modality of `mmloom.processing.media.MEDIA` (`/image
PATH`: a new item, a new conversation), `/reset`, `/quit` (or EOF). Answers stream to stdout token
by token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mmloom.data.records_io import unencodable_text
from mmloom.errors import MmloomError
from mmloom.inference.generate import (
    answer_batch,
    check_media,
    generation_kwargs,
    load_model_and_processor,
    media_specs,
)
from mmloom.processing.media import MEDIA

HELP = "commands: " + ", ".join(
    [*(f"/{spec.noun} PATH (new {spec.item_noun}, new conversation)" for spec in MEDIA.values()), "/reset", "/quit"])


def make_streamer(tokenizer, stream: TextIO | None = None):
    """A TextStreamer that prints the answer (not the prompt, no special tokens) to `stream`."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out = stream or sys.stdout
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class ChatSession:
    """A conversation about (at most) one item of each modality (`image=`, `audio=`: a path, or the
    item itself); they go with the first user turn, their placeholders first in `MEDIA` order
    (`<image>\\n` + text)."""

    def __init__(self, model, processor, max_new_tokens: int = 256, temperature: float = 0.0,
                 system: str | None = None, stream: bool = True, out: TextIO | None = None, **items):
        self.model, self.processor = model, processor
        self.gen_kwargs = generation_kwargs(processor, max_new_tokens, temperature, model=model)
        self.system = system
        self.stream, self.out = stream, out
        nouns = [cls.noun for cls in MEDIA.values()]
        if set(items) - set(nouns):
            raise MmloomError(f"unknown item(s) {sorted(set(items) - set(nouns))}; give one of {', '.join(nouns)}")
        self.items: dict[str, Any] = {}  # noun -> the item of the conversation
        self.messages: list[dict[str, str]] = []
        self.reset()  # the system turn, with or without items
        for noun, item in items.items():
            if item is not None:
                self.set_item(noun, item)

    def set_item(self, noun: str, item) -> None:
        """Use a new item of the modality `noun` (`image`, ...: a path, or the item itself, e.g. a PIL
        image, a waveform at the extractor's rate); starts a new conversation.
        Raises MmloomError when the model has no encoder for it, and MediaError for a bad file."""
        modality = next(modality for modality, cls in MEDIA.items() if cls.noun == noun)
        spec = self.processor.media.get(modality)
        if spec is None or spec.encoder not in self.model.encoder_names or spec.encoder_processor is None:
            article = "an" if MEDIA[modality].item_noun[0] in "aeiou" else "a"
            raise MmloomError(f"this model has no {modality} encoder; chat without {article} {MEDIA[modality].item_noun}")
        self.items[noun] = spec.load(item) if isinstance(item, (str, Path)) else item
        self.reset()

    def reset(self) -> None:
        """Start a new conversation: only the system turn (`system`; None: the template's default)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []

    def ask(self, text: str) -> str:
        """Add a user turn, generate (streaming if asked) and keep the answer in the conversation.

        Raises MmloomError for text that is not UTF-8 (bytes a terminal or argv passed through as
        lone surrogates), before anything is generated."""
        bad = unencodable_text(text)
        if bad is not None:
            raise MmloomError(f"the question is {bad}; type or pass UTF-8 text")
        first = not any(m["role"] == "user" for m in self.messages)
        check_media(self.processor, bool(self.items), "--image PATH (or /image PATH)")
        content = text.strip()
        specs = [spec for spec in media_specs(self.processor) if spec.noun in self.items]
        if first:
            content = "".join(f"{spec.placeholder}\n" for spec in specs if spec.placeholder not in content) + content
        conversation = [*self.messages, {"role": "user", "content": content}]
        items = {spec.keyword: [self.items[spec.noun]] for spec in specs}
        streamer = make_streamer(self.processor.tokenizer, self.out) if self.stream else None
        answer = answer_batch(self.model, self.processor, [conversation], items.pop("images", [None]), self.gen_kwargs,
                              streamer, **items)[0]
        self.messages = [*conversation, {"role": "assistant", "content": answer}]
        return answer


def interactive(session: ChatSession, read_line: Callable[[str], str] = input, out: TextIO | None = None) -> int:
    """Read user turns until /quit or end of input; returns the number of answers given."""
    out = out or sys.stdout
    print(HELP, file=out, flush=True)
    answers = 0
    while True:
        try:
            line = read_line("USER: ")
        except EOFError:
            print(file=out)
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            print("(conversation reset)", file=out, flush=True)
            continue
        kind = next((cls.noun for cls in MEDIA.values() if line.split()[0] == f"/{cls.noun}"), None)
        if kind is not None:
            path = line[len(kind) + 1:].strip()
            if not path:
                print(f"usage: /{kind} PATH", file=out, flush=True)
                continue
            try:
                session.set_item(kind, path)
            except MmloomError as err:
                print(f"error: {err}", file=out, flush=True)
                continue
            print(f"(new {kind} {path}; conversation reset)", file=out, flush=True)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {HELP}", file=out, flush=True)
            continue
        bad = unencodable_text(line)
        if bad is not None:
            print(f"error: the question is {bad}; type UTF-8 text", file=out, flush=True)
            continue
        print("ASSISTANT:", end=" ", file=out, flush=True)
        answer = session.ask(line)
        if not session.stream:
            print(answer, file=out, flush=True)
        answers += 1
    return answers


def chat(model_dir: str | Path, prompt: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
         dtype: str | None = None, device: str | None = None, system: str | None = None,
         items: dict[str, str | Path | None] | None = None) -> int:
    """`mmloom chat`: one answer to `prompt`, else an interactive session; `items` maps a modality's
    noun (`image`, ...) to the file the conversation is about."""
    model, processor = load_model_and_processor(model_dir, dtype, device)
    session = ChatSession(model, processor, max_new_tokens=max_new_tokens, temperature=temperature, system=system,
                          **{noun: path for noun, path in (items or {}).items() if path is not None})
    if prompt is not None:
        session.ask(prompt)
        return 0
    interactive(session)
    return 0
