"""Chat with a saved model: one answer, or an interactive session that keeps the conversation.

Interactive commands: `/image PATH` (new image, new conversation), `/audio PATH` (new audio clip,
new conversation), `/reset`, `/quit` (or EOF). Answers stream to stdout token by token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mmloom.data.records_io import unencodable_text
from mmloom.errors import MmloomError
from mmloom.inference.generate import answer_batch, check_media, generation_kwargs, load_model_and_processor
from mmloom.processing.audio import load_audio
from mmloom.processing.image import load_image

HELP = "commands: /image PATH (new image, new conversation), /audio PATH (new audio clip, new conversation), /reset, /quit"


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
    """A conversation about (at most) one image and one audio clip; they go with the first user
    turn (`<image>\\n<audio>\\n` + text)."""

    def __init__(self, model, processor, image=None, max_new_tokens: int = 256, temperature: float = 0.0,
                 system: str | None = None, stream: bool = True, out: TextIO | None = None, audio=None):
        self.model, self.processor = model, processor
        self.gen_kwargs = generation_kwargs(processor, max_new_tokens, temperature, model=model)
        self.system = system
        self.stream, self.out = stream, out
        self.placeholder = processor.placeholders.get("vision", "<image>")
        self.audio_placeholder = processor.placeholders.get("audio", "<audio>")
        self.image = None
        self.audio = None
        self.messages: list[dict[str, str]] = []
        self.reset()  # the system turn, with or without an image or audio clip
        if image is not None:
            self.set_image(image)
        if audio is not None:
            self.set_audio(audio)

    def set_audio(self, audio) -> None:
        """Use a new audio clip (a path, or a waveform at the extractor's rate); starts a new conversation."""
        extractor = self.processor.encoder_processors.get("audio")
        if "audio" not in self.model.encoder_names or extractor is None:
            raise MmloomError("this model has no audio encoder; chat without audio")
        self.audio = load_audio(audio, extractor.sampling_rate) if isinstance(audio, (str, Path)) else audio
        self.reset()

    def set_image(self, image) -> None:
        """Use a new image (a PIL image or a path); starts a new conversation."""
        if "vision" not in self.model.encoder_names:
            raise MmloomError("this model has no vision encoder; chat without an image")
        self.image = load_image(image) if isinstance(image, (str, Path)) else image
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
        check_media(self.processor, self.image is not None or self.audio is not None, "--image PATH (or /image PATH)")
        content = text.strip()
        if first and self.audio is not None and self.audio_placeholder not in content:
            content = f"{self.audio_placeholder}\n{content}"
        if first and self.image is not None and self.placeholder not in content:
            content = f"{self.placeholder}\n{content}"
        conversation = [*self.messages, {"role": "user", "content": content}]
        images = [self.image] if self.image is not None else [None]
        audio = [self.audio] if self.audio is not None else None
        streamer = make_streamer(self.processor.tokenizer, self.out) if self.stream else None
        answer = answer_batch(self.model, self.processor, [conversation], images, self.gen_kwargs, streamer,
                              audio=audio)[0]
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
        if line.startswith("/image") or line.startswith("/audio"):
            kind = "image" if line.startswith("/image") else "audio"
            path = line[len(kind) + 1:].strip()
            if not path:
                print(f"usage: /{kind} PATH", file=out, flush=True)
                continue
            try:
                (session.set_image if kind == "image" else session.set_audio)(path)
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


def chat(model_dir: str | Path, image: str | Path | None = None, prompt: str | None = None,
         max_new_tokens: int = 256, temperature: float = 0.0, dtype: str | None = None, device: str | None = None,
         system: str | None = None, audio: str | Path | None = None, **_: Any) -> int:
    model, processor = load_model_and_processor(model_dir, dtype, device)
    session = ChatSession(model, processor, image=image, max_new_tokens=max_new_tokens,
                          temperature=temperature, system=system, audio=audio)
    if prompt is not None:
        session.ask(prompt)
        return 0
    interactive(session)
    return 0
