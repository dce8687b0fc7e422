"""Chat with a saved model: one answer, or an interactive session that keeps the conversation.

Interactive commands: `/<noun> PATH` for each modality of `mmloom.processing.media.MEDIA` (`/image
PATH`: one more item in the conversation, asked about in the next question), `/reset` (a new
conversation about the same items), `/quit` (or EOF). Answers stream to stdout token by token.
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
    [*(f"/{spec.noun} PATH (one more {spec.item_noun}, with the next question)" for spec in MEDIA.values()),
     "/reset (new conversation, same items)", "/quit"])


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
    """A conversation about any number of items of each modality (`image=`, `audio=`: a path or the
    item itself, or a list of them), in any turns: items given to the constructor go with the first
    user turn, each added item (:meth:`add_item`, `/image PATH`) with the next one; a turn's new
    placeholders come first, in `MEDIA` order and then in the order the items were given
    (`<image>\n<image>\n` + text), where LLaVA's and transformers' chat templates put them."""

    def __init__(self, model, processor, max_new_tokens: int = 256, temperature: float = 0.0,
                 system: str | None = None, stream: bool = True, out: TextIO | None = None, **items):
        self.model, self.processor = model, processor
        self.gen_kwargs = generation_kwargs(processor, max_new_tokens, temperature, model=model)
        self.system = system
        self.stream, self.out = stream, out
        nouns = [cls.noun for cls in MEDIA.values()]
        if set(items) - set(nouns):
            raise MmloomError(f"unknown item(s) {sorted(set(items) - set(nouns))}; give one of {', '.join(nouns)}")
        self.items: dict[str, list[Any]] = {}  # noun -> the items of the conversation, in order
        self.pending: dict[str, int] = {}  # noun -> items whose placeholders go with the next user turn
        self.messages: list[dict[str, str]] = []
        self.reset()  # the system turn, with or without items
        for noun, given in items.items():
            for item in given if isinstance(given, (list, tuple)) else [given]:
                if item is not None:
                    self.add_item(noun, item)

    def add_item(self, noun: str, item) -> None:
        """One more item of the modality `noun` (`image`, ...: a path, or the item itself, e.g. a PIL
        image, a waveform at the extractor's rate) in the conversation; its placeholder goes with the
        next user turn. Raises MmloomError when the model has no encoder for it, and MediaError for a
        bad file."""
        modality = next(modality for modality, cls in MEDIA.items() if cls.noun == noun)
        spec = self.processor.media.get(modality)
        if spec is None or modality not in self.model.modalities or spec.encoder_processor is None:
            article = "an" if MEDIA[modality].item_noun[0] in "aeiou" else "a"
            raise MmloomError(f"this model takes no {MEDIA[modality].noun} input; chat without {article} "
                              f"{MEDIA[modality].item_noun}")
        self.items.setdefault(noun, []).append(spec.load(item) if isinstance(item, (str, Path)) else item)
        self.pending[noun] = self.pending.get(noun, 0) + 1

    def reset(self) -> None:
        """Start a new conversation about the same items (they go with its first user turn): only the
        system turn (`system`; None: the template's default)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.pending = {noun: len(items) for noun, items in self.items.items()}

    def ask(self, text: str) -> str:
        """Add a user turn (with the placeholders of the items added since the last one, unless the
        text holds them already), generate (streaming if asked) and keep the answer in the conversation.

        Raises MmloomError for text that is not UTF-8 (bytes a terminal or argv passed through as
        lone surrogates), before anything is generated."""
        bad = unencodable_text(text)
        if bad is not None:
            raise MmloomError(f"the question is {bad}; type or pass UTF-8 text")
        check_media(self.processor, any(self.items.values()), "--image PATH (or /image PATH)")
        content = text.strip()
        specs = [spec for spec in media_specs(self.processor) if self.items.get(spec.noun)]
        missing = {spec.noun: max(0, self.pending.get(spec.noun, 0) - content.count(spec.placeholder)) for spec in specs}
        content = "".join(f"{spec.placeholder}\n" * missing[spec.noun] for spec in specs) + content
        conversation = [*self.messages, {"role": "user", "content": content}]
        items = {spec.keyword: [list(self.items[spec.noun])] for spec in specs}
        streamer = make_streamer(self.processor.tokenizer, self.out) if self.stream else None
        answer = answer_batch(self.model, self.processor, [conversation], items.pop("images", [None]), self.gen_kwargs,
                              streamer, **items)[0]
        self.messages = [*conversation, {"role": "assistant", "content": answer}]
        self.pending = {}
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
                session.add_item(kind, path)
            except MmloomError as err:
                print(f"error: {err}", file=out, flush=True)
                continue
            print(f"(new {kind} {path}: it goes with the next question)", file=out, flush=True)
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
         items: dict[str, str | Path | list[str | Path] | None] | None = None) -> int:
    """`mmloom chat`: one answer to `prompt`, else an interactive session; `items` maps a modality's
    noun (`image`, ...) to the file(s) the conversation starts with."""
    model, processor = load_model_and_processor(model_dir, dtype, device)
    session = ChatSession(model, processor, max_new_tokens=max_new_tokens, temperature=temperature, system=system,
                          **{noun: path for noun, path in (items or {}).items() if path is not None})
    if prompt is not None:
        session.ask(prompt)
        return 0
    interactive(session)
    return 0
