"""Conversation templates: render chat messages to text and tokenize them with a loss mask.

A template turns ``messages`` (``[{"role": "system"|"user"|"assistant", "content": str}, ...]``)
into a list of *segments* ``(text, supervised)``. :meth:`ConversationTemplate.tokenize` tokenizes
every segment on its own and concatenates the token ids, so the loss mask is exact by
construction: labels are ``-100`` on the ids of masked segments and equal to ``input_ids`` on
the ids of supervised segments. Nothing is re-tokenized and compared afterwards (the original
LLaVA code recomputes lengths per round and silently masks whole samples when they disagree).

Conventions (documented because tests and other modules rely on them):

* Placeholders (``PLACEHOLDERS``: ``<image>`` and those of the other modalities of
  `mmloom.processing.media.MEDIA`) stay in the text; when they are special tokens
  of the tokenizer they become their single special id. Literal end tokens in the text
  (``</s>``, ``<|eot_id|>``, ``<|im_end|>``...) become their special ids the same way.
* Templates with ``add_bos`` (``plain``, ``vicuna_v1``, ``llama2``) prepend the tokenizer's BOS
  *id*; ``TokenizedConversation.text`` is then ``tokenizer.bos_token + render(...)``, i.e. exactly
  what ``input_ids`` decode to. ``llama3`` and ``mistral`` carry their BOS in the text itself.
* Token layout = LLaVA's ``tokenizer_image_token``: the rendered conversation is cut at every
  placeholder (``<image>``, ...); each piece is tokenized as a text of its own (the first
  with BOS, the others without) and the placeholders become their single ids. So with a
  SentencePiece tokenizer (Llama-2 / Vicuna, dummy prefix ``"▁"``) the piece after an image starts
  with its prefix: ``... USER: ▁ <image> ▁ \n What`` and phase-1 captions start ``▁an``, exactly
  as the original LLaVA training code, its evaluation scripts and Cerebras' HDF5 files have it.
* Inside a piece, the first text segment is tokenized as the start of a text; every later
  segment as a *continuation* (after a special-token sentinel whose ids are then dropped), which
  gives the ids of the whole piece tokenized at once, while the loss mask stays exact.
  Consequences for a SentencePiece tokenizer: ``decode(input_ids)`` shows ``"<s> A chat"``; a
  supervised span that starts with a space (vicuna_v1 / llama2 answers) starts with a
  ``"▁word"`` token which ``decode`` of that span alone prints without its leading space
  (joining the span's token strings and mapping ``"▁"`` to ``" "`` gives the span text exactly).
* vicuna_v1 and llama2 put the single space between the assistant tag and the answer into the
  supervised answer span (``" " + answer + "</s>"`` / ``" " + answer + " </s>"``): the generation
  prompt ends with ``"ASSISTANT:"`` / ``"[/INST]"`` and the model generates ``" answer"``, which is
  how LLaVA's own Llama tokenization splits it (``"▁answer"``). :attr:`answer_prefix` holds it.
* User content is not escaped: a literal ``</s>`` typed by a user becomes the EOS id, as in LLaVA.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any

from mmloom.errors import MmloomError
from mmloom.model.merge import IGNORE_INDEX
from mmloom.processing.media import PLACEHOLDERS
from mmloom.processing.tokenizer import token_id

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)


class ConversationError(MmloomError):
    """A conversation that cannot be used; ``reason`` is a short machine-readable code.

    Reasons: ``no_human_turn``, ``roles_not_alternating``, ``empty_answer``, ``unknown_role``.
    """

    REASONS = ("no_human_turn", "roles_not_alternating", "empty_answer", "unknown_role")

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class TokenizedConversation:
    """A conversation's ids and labels (LLaVA's layout, see the module docstring)."""

    input_ids: list[int]
    labels: list[int]  # same length; -100 where not supervised, else == input_ids
    text: str  # the text that input_ids decode to (rendered text, with the BOS string if one was prepended)


# --------------------------------------------------------------------------------------------
# LLaVA records -> messages
# --------------------------------------------------------------------------------------------

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def messages_from_llava(
    conversations: list[dict], *, move_image_to_front: bool = True, placeholder: str | tuple[str, ...] = "<image>"
) -> list[dict]:
    """Map LLaVA ``{"from": "human"|"gpt", "value": str}`` turns to chat messages.

    A leading assistant turn is skipped (as the original loader does); ``user``/``assistant`` are
    accepted as ``human``/``gpt``. With
    ``move_image_to_front``, a record with exactly one ``placeholder`` has its turn rewritten to
    ``placeholder + "\\n" + text_without_placeholder.strip()`` (then stripped), exactly like
    LLaVA's ``preprocess_multimodal``; records with several placeholders (interleaved,
    LLaVA-OneVision style) keep every placeholder where it is. A tuple of placeholders (e.g.
    ``PLACEHOLDERS``) applies the rule to each one: those found exactly once are moved to the
    front of their turn in the tuple's order (``<image>\\n<other>\\ntext``). A trailing
    unanswered human turn is kept.
    Raises :class:`ConversationError` with ``reason`` in ``ConversationError.REASONS``.
    """
    if not isinstance(conversations, (list, tuple)):
        raise ConversationError(
            "no_human_turn", f"conversations must be a list of turns, got {type(conversations).__name__}"
        )
    turns = list(conversations)
    if turns and isinstance(turns[0], dict) and _LLAVA_ROLES.get(turns[0].get("from")) == "assistant":
        turns = turns[1:]  # LLaVA drops a leading gpt turn; "user"/"human" both start a conversation
    if not turns:
        raise ConversationError(
            "no_human_turn",
            "conversation has no human turn (it is empty after skipping a leading non-human turn)",
        )
    candidates = (placeholder,) if isinstance(placeholder, str) else tuple(placeholder)
    movable = [
        p for p in candidates
        if move_image_to_front and p
        and sum(str(t.get("value") or "").count(p) for t in turns if isinstance(t, dict)) == 1
    ]
    messages: list[dict] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ConversationError(
                "unknown_role", f"turn {i} is not a mapping with 'from' and 'value': {turn!r}"
            )
        src = turn.get("from")
        role = _LLAVA_ROLES.get(src) if isinstance(src, str) else None
        if role is None:
            raise ConversationError(
                "unknown_role", f"turn {i} has unknown role {src!r}; expected one of 'human', 'gpt'"
            )
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            want = "human" if expected == "user" else "gpt"
            raise ConversationError(
                "roles_not_alternating",
                f"turn {i} is from {src!r} but a {want!r} turn was expected (turns must alternate human/gpt, starting with human)",
            )
        value = turn.get("value")
        if value is None:
            value = ""
        if not isinstance(value, str):
            value = str(value)
        if role == "assistant" and not value.strip():
            raise ConversationError("empty_answer", f"turn {i} (gpt) has an empty answer")
        moved = [p for p in movable if p in value]
        if moved:
            for p in moved:
                value = value.replace(p, "")
            value = ("".join(p + "\n" for p in moved) + value.strip()).strip()
        messages.append({"role": role, "content": value})
    return messages


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _split_turns(messages: list[dict], system: str | None, template: str):
    """Validate ``messages`` -> (system text or None, [(user, assistant or None), ...])."""
    msgs = list(messages)
    sys_text = None
    if msgs and msgs[0].get("role") == "system":
        sys_text = msgs[0].get("content") or ""
        msgs = msgs[1:]
    if system is not None:
        sys_text = system
    if not msgs:
        raise ConversationError("no_human_turn", f"template {template!r}: messages contain no user turn")
    turns: list[tuple[str, str | None]] = []
    for i, m in enumerate(msgs):
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise ConversationError(
                "unknown_role",
                f"template {template!r}: message {i} has role {role!r}; expected 'user' or 'assistant' (a 'system' message may only come first)",
            )
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError(
                "roles_not_alternating",
                f"template {template!r}: message {i} has role {role!r}, expected {expected!r} (user/assistant must alternate, starting with user)",
            )
        content = m.get("content")
        if not isinstance(content, str):
            raise MmloomError(
                f"template {template!r}: message {i} content must be a string, got {type(content).__name__}"
            )
        if role == "user":
            turns.append((content, None))
        else:
            turns[-1] = (turns[-1][0], content)
    return sys_text, turns


def _check_generation(turns, add_generation_prompt: bool, template: str):
    if add_generation_prompt and turns[-1][1] is not None:
        raise MmloomError(
            f"template {template!r}: add_generation_prompt needs the last message to be a user message"
        )


def _merge(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for text, sup in segments:
        if not text:
            continue
        if out and out[-1][1] == sup:
            out[-1] = (out[-1][0] + text, sup)
        else:
            out.append((text, sup))
    return out


_SENTINELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sentinel(tokenizer) -> tuple[str, list[int]] | None:
    """A special token after which text is tokenized as a continuation (no prefix space)."""
    try:
        return _SENTINELS[tokenizer]
    except (KeyError, TypeError):
        pass
    result = None
    candidates = [tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token, tokenizer.pad_token]
    candidates += list(getattr(tokenizer, "all_special_tokens", []))
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for tok in candidates:
        if not tok:
            continue
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            continue
        added = decoder.get(ids[0])
        if added is not None and (getattr(added, "rstrip", False) or getattr(added, "lstrip", False)):
            continue  # would eat neighbouring whitespace
        result = (tok, ids)
        break
    try:
        _SENTINELS[tokenizer] = result
    except TypeError:  # pragma: no cover - not weak-referenceable
        pass
    return result


def encode_segment(tokenizer, text: str, at_start: bool) -> list[int]:
    """Token ids of ``text`` as the start of a sequence or as a continuation of one.

    Never adds special tokens (BOS/EOS) itself; special-token strings inside ``text`` become
    their ids.
    """
    if not text:
        return []
    if at_start:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    sentinel = _sentinel(tokenizer)
    if sentinel is not None:
        s_text, s_ids = sentinel
        ids = list(tokenizer(s_text + text, add_special_tokens=False)["input_ids"])
        if ids[: len(s_ids)] == s_ids:
            return ids[len(s_ids) :]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def placeholder_ids(tokenizer, placeholders=PLACEHOLDERS) -> dict[str, int]:
    """``{placeholder: id}`` for the placeholders that are single tokens of ``tokenizer``."""
    out = {}
    for placeholder in placeholders:
        tid = token_id(tokenizer, placeholder)
        if tid is not None:
            out[placeholder] = tid
    return out


def _split_placeholders(text: str, found: dict[str, int]) -> list[str]:
    if not found:
        return [text]
    return [piece for piece in re.split("(" + "|".join(map(re.escape, found)) + ")", text) if piece]


def tokenize_segments(
    tokenizer, segments: list[tuple[str, bool]], add_bos: bool, placeholders=PLACEHOLDERS
) -> TokenizedConversation:
    """Tokenize ``(text, supervised)`` segments and concatenate ids and labels.

    The layout of LLaVA's ``tokenizer_image_token`` (see the module docstring): text after a
    placeholder is tokenized as the start of a new text, other segment boundaries as
    continuations. Placeholders (those of ``placeholders`` that are tokens of ``tokenizer``) become
    their single id, with label -100.
    """
    ids: list[int] = []
    labels: list[int] = []
    text = ""
    if add_bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
        text = tokenizer.bos_token
    found = placeholder_ids(tokenizer, placeholders)
    at_start = True
    for seg, sup in _merge(segments):
        text += seg
        for piece in _split_placeholders(seg, found):
            if piece in found:
                ids.append(found[piece])
                labels.append(IGNORE_INDEX)
                at_start = True  # LLaVA tokenizes the text after a placeholder on its own
                continue
            piece_ids = encode_segment(tokenizer, piece, at_start=at_start)
            at_start = False
            ids.extend(piece_ids)
            labels.extend(piece_ids if sup else [IGNORE_INDEX] * len(piece_ids))
    return TokenizedConversation(input_ids=ids, labels=labels, text=text)


def tokenize_prompt(tokenizer, prompt: str, placeholders=PLACEHOLDERS) -> list[int]:
    """Ids of a raw prompt, LLaVA's ``tokenizer_image_token`` generalised to every placeholder:
    the prompt is cut at the placeholders, each piece tokenized with ``tokenizer(piece)`` (so with
    the tokenizer's own BOS/EOS settings), the BOS of every piece but the first dropped, and the
    placeholders inserted as their ids."""
    found = placeholder_ids(tokenizer, placeholders)
    pattern = "(" + "|".join(map(re.escape, found)) + ")" if found else None
    pieces = re.split(pattern, prompt) if pattern else [prompt]  # text, placeholder, text, ...
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if k % 2:
            ids.append(found[piece])
            continue
        piece_ids = list(tokenizer(piece)["input_ids"])
        if k and bos is not None and piece_ids[:1] == [bos]:
            piece_ids = piece_ids[1:]
        ids.extend(piece_ids)
    return ids


# --------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------


class ConversationTemplate:
    """Base class. Subclasses implement :meth:`segments`.

    Options common to all templates: ``system`` (default system text; ``None`` keeps the
    template's default, ``""`` removes it where the format allows) and ``add_bos`` (prepend the
    tokenizer's BOS id).

    Unknown options raise MmloomError.
    """

    name: str = ""
    source: str = ""  # where the format comes from, one line (docs, --help)
    default_system: str | None = None
    add_bos: bool = False
    answer_prefix: str = ""  # text between the generation prompt and the answer, supervised
    end: str = "</s>"  # end-of-turn token string, supervised after each answer

    def __init__(self, system: str | None = None, add_bos: bool | None = None, **options: Any):
        if options:
            raise MmloomError(
                f"template {self.name!r} got unknown option(s) {sorted(options)}; "
                f"valid: {sorted(self.valid_options())}"
            )
        if system is not None:
            self.default_system = system
        if add_bos is not None:
            self.add_bos = bool(add_bos)

    @classmethod
    def valid_options(cls) -> tuple[str, ...]:
        """The constructor options this template accepts."""
        return ("system", "add_bos")

    # -- to implement ------------------------------------------------------------------------
    def segments(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        system: str | None = None,
        tokenizer=None,
    ) -> list[tuple[str, bool]]:
        """The rendered conversation as `(text, supervised)` segments, in order (their texts joined
        are `render(...)`). Raises ConversationError (reason `no_human_turn`, `roles_not_alternating`,
        `unknown_role`) for messages the template cannot render, MmloomError for
        `add_generation_prompt` after an assistant message."""
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------
    def render(
        self, messages: list[dict], add_generation_prompt: bool = False, system: str | None = None
    ) -> str:
        """The conversation as text (without a BOS that the tokenizer adds as an id)."""
        return "".join(t for t, _ in self.segments(messages, add_generation_prompt, system))

    def tokenize(
        self, tokenizer, messages: list[dict], add_generation_prompt: bool = False, system: str | None = None,
        placeholders=PLACEHOLDERS,
    ) -> TokenizedConversation:
        """Ids and labels of ``messages`` in LLaVA's layout (see the module docstring); the
        ``placeholders`` that are tokens of ``tokenizer`` become their single ids."""
        segs = self.segments(messages, add_generation_prompt, system, tokenizer=tokenizer)
        return tokenize_segments(tokenizer, segs, self.add_bos, placeholders)

    def generation_prompt(
        self, tokenizer, messages: list[dict], system: str | None = None, placeholders=PLACEHOLDERS
    ) -> list[int]:
        """Ids of the prompt for generating the next assistant turn (same ids as in training)."""
        return self.tokenize(
            tokenizer, messages, add_generation_prompt=True, system=system, placeholders=placeholders
        ).input_ids

    @property
    def stop_strings(self) -> list[str]:
        """Strings that end an assistant turn in generation (the template's end token)."""
        return [self.end] if self.end else []

    def end_of_turn_strings(self, tokenizer=None) -> list[str]:
        """The text that closes every supervised assistant turn (after the answer), as strings that
        end generation: the template's end token (`stop_strings`)."""
        return list(self.stop_strings)

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Ids that end an assistant turn: the template's end-of-turn token(s)
        (:func:`end_of_turn_token_ids`), then the tokenizer's EOS."""
        out = end_of_turn_token_ids(self, tokenizer)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
            out.append(tokenizer.eos_token_id)
        return out

    def _system(self, sys_text: str | None) -> str | None:
        return self.default_system if sys_text is None else sys_text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PlainTemplate(ConversationTemplate):
    """Phase-1 captions: ``<image>`` + caption + terminator; the human text is dropped.

    The placeholders found in a user turn are kept in order (``<image>`` when there are none);
    every user/assistant pair gives one ``placeholders + caption + terminator`` block. Only
    caption + terminator are supervised. ``terminator="eos"`` (Cerebras, default) ends with the
    end token ``eos`` (default ``"</s>"``); ``"newline"`` ends with ``"\\n"`` (original LLaVA).
    """

    name = "plain"
    source = "LLaVA phase-1 captions (conv_llava_plain): the image, then the caption and EOS; no question, no system"
    add_bos = True

    def __init__(self, terminator: str = "eos", eos: str = "</s>", placeholder: str = "<image>", **kw):
        super().__init__(**kw)
        if terminator not in ("eos", "newline"):
            raise MmloomError(f"template 'plain': terminator must be 'eos' or 'newline', got {terminator!r}")
        self.terminator = terminator
        self.end = eos if terminator == "eos" else "\n"
        self.placeholder = placeholder

    @classmethod
    def valid_options(cls):
        return ("system", "add_bos", "terminator", "eos", "placeholder")

    def _placeholders(self, text: str) -> str:
        found = re.findall("|".join(re.escape(p) for p in PLACEHOLDERS), text)
        return "".join(found) if found else self.placeholder

    def segments(self, messages, add_generation_prompt=False, system=None, tokenizer=None):
        _, turns = _split_turns(messages, system, self.name)
        _check_generation(turns, add_generation_prompt, self.name)
        segs: list[tuple[str, bool]] = []
        for user, answer in turns:
            segs.append((self._placeholders(user), False))
            if answer is not None:
                segs.append((answer + self.end, True))
        return segs

    @property
    def stop_strings(self):
        return [self.end]


class VicunaV1Template(ConversationTemplate):
    """LLaVA-1.5 ``vicuna_v1``: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``; BOS id first."""

    name = "vicuna_v1"
    source = "LLaVA-1.5 (conv_vicuna_v1 / llava_v1): Vicuna v1.1 turns, LLaVA's system prompt"
    default_system = VICUNA_SYSTEM
    add_bos = True
    answer_prefix = " "

    def segments(self, messages, add_generation_prompt=False, system=None, tokenizer=None):
        sys_text, turns = _split_turns(messages, system, self.name)
        _check_generation(turns, add_generation_prompt, self.name)
        sys_text = self._system(sys_text)
        segs: list[tuple[str, bool]] = []
        prefix = sys_text + " " if sys_text else ""
        for k, (user, answer) in enumerate(turns):
            last = k == len(turns) - 1
            segs.append((prefix + "USER: " + user + " ", False))
            prefix = ""
            if answer is not None:
                segs.append(("ASSISTANT:", False))
                segs.append((self.answer_prefix + answer + self.end, True))
            elif last and add_generation_prompt:
                segs.append(("ASSISTANT:", False))
        return segs


class Llama2Template(ConversationTemplate):
    """LLaVA ``llava_llama_2``: ``[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ...``."""

    name = "llama2"
    source = "LLaVA's llava_llama_2 (Llama-2-chat [INST] blocks with LLaVA's system prompt)"
    default_system = LLAVA_LLAMA2_SYSTEM
    add_bos = True
    answer_prefix = " "
    end = " </s>"

    @property
    def stop_strings(self):
        return ["</s>"]

    def segments(self, messages, add_generation_prompt=False, system=None, tokenizer=None):
        sys_text, turns = _split_turns(messages, system, self.name)
        _check_generation(turns, add_generation_prompt, self.name)
        sys_text = self._system(sys_text)
        segs: list[tuple[str, bool]] = []
        for k, (user, answer) in enumerate(turns):
            if k == 0 and sys_text:
                user = f"<<SYS>>\n{sys_text}\n<</SYS>>\n\n" + user
            segs.append((("<s>" if k else "") + f"[INST] {user} [/INST]", False))
            if answer is not None:
                segs.append((self.answer_prefix + answer + self.end, True))
        return segs


class RoleBlockTemplate(ConversationTemplate):
    """Templates made of role blocks: ``prefix`` then ``header(role) + content + end + separator``
    per message; the assistant's content and end token are supervised."""

    prefix = ""  # text before the first block
    separator = ""  # text after each block's end token

    def header(self, role: str) -> str:
        """The text that opens a block of `role` ("system", "user" or "assistant")."""
        raise NotImplementedError

    def segments(self, messages, add_generation_prompt=False, system=None, tokenizer=None):
        sys_text, turns = _split_turns(messages, system, self.name)
        _check_generation(turns, add_generation_prompt, self.name)
        sys_text = self._system(sys_text)
        segs: list[tuple[str, bool]] = [(self.prefix, False)] if self.prefix else []
        if sys_text:
            segs.append((self.header("system") + sys_text + self.end + self.separator, False))
        for user, answer in turns:
            segs.append((self.header("user") + user + self.end + self.separator, False))
            if answer is not None:
                segs.append((self.header("assistant"), False))
                segs.append((answer + self.end, True))
                if self.separator:
                    segs.append((self.separator, False))
        if add_generation_prompt:
            segs.append((self.header("assistant"), False))
        return segs


class Llama3Template(RoleBlockTemplate):
    """Llama-3 instruct: header blocks ended by ``<|eot_id|>``; ``<|begin_of_text|>`` in the text."""

    name = "llama3"
    source = "Meta Llama-3 Instruct header blocks, no default system prompt"
    end = "<|eot_id|>"
    prefix = "<|begin_of_text|>"

    def header(self, role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


class ZephyrTemplate(RoleBlockTemplate):
    """Zephyr: ``<|system|>\\n{sys}</s>\\n<|user|>\\n{q}</s>\\n<|assistant|>\\n{a}</s>\\n``."""

    name = "zephyr"
    source = "HuggingFaceH4 Zephyr (<|user|> / <|assistant|> blocks ended by </s>)"
    separator = "\n"

    def header(self, role: str) -> str:
        return f"<|{role}|>\n"


class ChatMLTemplate(RoleBlockTemplate):
    """ChatML (Qwen, Hermes...): ``<|im_start|>role\\n{content}<|im_end|>\\n``."""

    name = "chatml"
    source = "ChatML (Qwen, Hermes, SmolLM): <|im_start|>role blocks, no default system prompt"
    end = "<|im_end|>"
    separator = "\n"

    def header(self, role: str) -> str:
        return f"<|im_start|>{role}\n"


class MistralTemplate(ConversationTemplate):
    """Mistral instruct: ``<s>[INST] {q} [/INST]{a}</s>[INST] ...``; system text + ``"\\n\\n"`` before the first question."""

    name = "mistral"
    source = "Mistral Instruct v0.1 ([INST] blocks, system text before the first question)"

    def segments(self, messages, add_generation_prompt=False, system=None, tokenizer=None):
        sys_text, turns = _split_turns(messages, system, self.name)
        _check_generation(turns, add_generation_prompt, self.name)
        sys_text = self._system(sys_text)
        segs: list[tuple[str, bool]] = [("<s>", False)]
        for k, (user, answer) in enumerate(turns):
            if k == 0 and sys_text:
                user = sys_text + "\n\n" + user
            segs.append((f"[INST] {user} [/INST]", False))
            if answer is not None:
                segs.append((answer + self.end, True))
        return segs


class TokenizerTemplate(ConversationTemplate):
    """The tokenizer's own ``chat_template`` (``apply_chat_template``).

    Supervised spans are found by rendering prefixes: for assistant message ``i`` the span starts
    after ``render(messages[:i], add_generation_prompt=True)`` and ends at the end of
    ``render(messages[:i+1])`` minus trailing whitespace (so ``"answer<|im_end|>"`` is supervised,
    the following ``"\\n"`` is not). Templates that rewrite earlier turns (not prefix-stable)
    are rejected with an MmloomError. ``tokenizer=`` binds a tokenizer for :meth:`render`.
    """

    name = "tokenizer"
    source = ("the LLM tokenizer's own chat_template (apply_chat_template), its default system prompt "
              "included: the model's native format")

    def __init__(self, tokenizer=None, **kw):
        super().__init__(**kw)
        self.tokenizer = tokenizer

    @classmethod
    def valid_options(cls):
        return ("system", "add_bos", "tokenizer")

    def _tok(self, tokenizer):
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is None:
            raise MmloomError(
                "template 'tokenizer' needs a tokenizer: get_template('tokenizer', tokenizer=tok)"
            )
        if not getattr(tok, "chat_template", None):
            raise MmloomError(
                f"template 'tokenizer': tokenizer {type(tok).__name__} (name_or_path={getattr(tok, 'name_or_path', '')!r}) "
                f"has no chat_template; choose one of the built-in templates: {', '.join(n for n in TEMPLATE_NAMES if n != 'tokenizer')}"
            )
        return tok

    def segments(self, messages, add_generation_prompt=False, system=None, tokenizer=None):
        tok = self._tok(tokenizer)
        sys_text, turns = _split_turns(messages, system, self.name)
        _check_generation(turns, add_generation_prompt, self.name)
        sys_text = self._system(sys_text)
        msgs: list[dict] = []
        if sys_text is not None:
            msgs.append({"role": "system", "content": sys_text})
        for user, answer in turns:
            msgs.append({"role": "user", "content": user})
            if answer is not None:
                msgs.append({"role": "assistant", "content": answer})

        def apply(ms, gen):
            try:
                return tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)
            except Exception as e:  # jinja errors, raise_exception() in templates
                raise MmloomError(f"template 'tokenizer': the tokenizer's chat_template failed: {e}") from e

        full = apply(msgs, add_generation_prompt)
        segs: list[tuple[str, bool]] = []
        pos = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = apply(msgs[:i], True)
            upto = apply(msgs[: i + 1], False)
            if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
                raise MmloomError(
                    "template 'tokenizer': the chat_template is not prefix-stable (rendering a conversation "
                    "does not start with the rendering of its earlier turns), so the assistant spans cannot be "
                    "located; use a built-in template instead"
                )
            start, stop = len(before), len(upto.rstrip())
            if stop <= start or m["content"].strip() not in upto[start:stop]:
                raise MmloomError(
                    f"template 'tokenizer': cannot locate assistant message {i} in the chat_template output"
                )
            segs.append((full[pos:start], False))
            segs.append((full[start:stop], True))
            pos = stop
        segs.append((full[pos:], False))
        return segs

    @property
    def stop_strings(self):
        return self.end_of_turn_strings(self.tokenizer) if self.tokenizer is not None else []

    def end_of_turn_strings(self, tokenizer=None) -> list[str]:
        """The special tokens that the chat template writes right after an assistant answer
        (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>`` ...), found by
        rendering ``[user, assistant]`` and reading what follows the answer: exactly the tokens
        that close each supervised span. [] when the template ends a turn with plain text only."""
        tok = self._tok(tokenizer)
        probe = "mmloom-probe-answer"
        messages = [{"role": "user", "content": "mmloom-probe-question"}, {"role": "assistant", "content": probe}]
        try:
            text = tok.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template that refuses a bare user/assistant pair: no end token known
            return []
        at = text.rfind(probe)
        if at < 0:
            return []
        ids = list(tok(text[at + len(probe):].strip(), add_special_tokens=False)["input_ids"])
        specials = set(getattr(tok, "all_special_ids", []) or []) | set(getattr(tok, "added_tokens_decoder", {}) or {})
        out: list[str] = []
        for tid in ids:  # the special tokens that open the tail: the end-of-turn marker(s)
            if tid not in specials:
                break
            out.append(tok.convert_ids_to_tokens(tid))
        return out


def end_of_turn_token_ids(template: ConversationTemplate | str, tokenizer) -> list[int]:
    """Token ids that close an assistant turn of `template` with `tokenizer`: what every supervised
    answer ends with, so what generation stops at. `template` is a ConversationTemplate or its
    name. Built-in templates give their end token (``</s>`` for vicuna_v1 / llama2 / mistral /
    zephyr / plain, ``<|im_end|>`` for chatml, ``<|eot_id|>`` for llama3; a ``"\n"`` plain
    terminator gives the newline's id); the ``tokenizer`` template gives the special tokens its
    chat template writes after an answer (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``,
    ``<|end|>`` ...). Strings that are not one token of `tokenizer` are left out; the tokenizer's
    EOS is not added (see :meth:`ConversationTemplate.stop_token_ids`). Raises MmloomError for an
    unknown template name, or the `tokenizer` template with a tokenizer without a chat template."""
    if isinstance(template, str):
        template = get_template(template)
    out: list[int] = []
    for text in template.end_of_turn_strings(tokenizer):
        tid = token_id(tokenizer, text)
        if tid is not None and tid not in out:
            out.append(tid)
    return out


_TEMPLATES: dict[str, type[ConversationTemplate]] = {
    cls.name: cls
    for cls in (
        PlainTemplate,
        VicunaV1Template,
        Llama2Template,
        Llama3Template,
        ZephyrTemplate,
        ChatMLTemplate,
        MistralTemplate,
        TokenizerTemplate,
    )
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(_TEMPLATES)


DEFAULT_WITHOUT_CHAT_TEMPLATE = "vicuna_v1"


def default_template_name(tokenizer) -> str:
    """The template to use when none is given: ``tokenizer`` (the LLM's own format) when `tokenizer`
    ships a ``chat_template``, else LLaVA-1.5's ``vicuna_v1``."""
    return "tokenizer" if getattr(tokenizer, "chat_template", None) else DEFAULT_WITHOUT_CHAT_TEMPLATE


def template_choice(name: str | None, tokenizer) -> tuple[str, str]:
    """(template name, why) for a `--template` / `system_prompt_style` that may be unset: the given
    name, else :func:`default_template_name`; `why` is the one line that `init`, `convert` and
    `data build` print about it."""
    if name is not None:
        return name, f"template {name}"
    chosen = default_template_name(tokenizer)
    if chosen == "tokenizer":
        return chosen, ("template tokenizer: the LLM tokenizer's own chat_template (none was given; "
                        "another: " + ", ".join(n for n in TEMPLATE_NAMES if n != "tokenizer") + ")")
    return chosen, (f"template {chosen}: LLaVA-1.5's (none was given and the tokenizer has no chat_template; "
                    "another: " + ", ".join(n for n in TEMPLATE_NAMES if n != chosen) + ")")


def templates_help() -> str:
    """One line per template (name: source), for `--help` texts."""
    return "; ".join(f"{cls.name}: {cls.source}" for cls in _TEMPLATES.values())


def get_template(name: str, **options: Any) -> ConversationTemplate:
    """A template by name; ``options`` go to its constructor (e.g. ``terminator="newline"``).
    Raises MmloomError for an unknown name or option."""
    cls = _TEMPLATES.get(name)
    if cls is None:
        raise MmloomError(
            f"unknown conversation template {name!r}; valid templates: {', '.join(TEMPLATE_NAMES)}"
        )
    return cls(**options)



# --------------------------------------------------------------------------------------------
# the text around each turn (for serving stacks with their own template languages)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnLayout:
    """The fixed text a template puts around each turn, found by rendering probe conversations.

    A conversation with system text ``S`` and turns ``(u1, a1), ..., (un, None)`` renders, with the
    generation prompt, as::

        system_prefix + S + system_suffix + u1 + user_end + generation_prompt + answer_prefix + a1
        + answer_end + next_user + u2 + user_end + ... + un + user_end + generation_prompt

    and without system text (``""``, or no system message for a tokenizer's own template, which
    may add a default of its own) ``no_system_prefix`` stands in place of
    ``system_prefix + S + system_suffix``. ``default_system`` is the template's default system
    text (None: none); ``add_bos`` whether the tokenizer's BOS id comes before the text. Serving
    stacks that render prompts in their own template language (llama.cpp's Jinja chat templates,
    Ollama's Go templates) are written from these pieces, so they give the text mmloom trains on.
    """

    system_prefix: str
    system_suffix: str
    no_system_prefix: str
    user_end: str
    generation_prompt: str
    answer_prefix: str
    answer_end: str
    next_user: str
    default_system: str | None
    add_bos: bool

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """`messages` (an optional leading system message, then alternating user / assistant
        messages) rendered from the pieces; equal to the template's own rendering."""
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        text = self.system_prefix + system + self.system_suffix if system else self.no_system_prefix
        for k, message in enumerate(messages):
            if message["role"] == "user":
                text += (self.next_user if k else "") + message["content"] + self.user_end
            else:
                text += self.generation_prompt + self.answer_prefix + message["content"] + self.answer_end
        return text + (self.generation_prompt if add_generation_prompt else "")


_PROBES = {"system": "@@mmloom-system@@", "u1": "@@mmloom-user-1@@", "a1": "@@mmloom-answer-1@@",
           "u2": "@@mmloom-user-2@@", "a2": "@@mmloom-answer-2@@"}


def turn_layout(template: ConversationTemplate, tokenizer=None) -> TurnLayout:
    """The :class:`TurnLayout` of `template` (`tokenizer` renders a ``tokenizer`` template).

    Raises MmloomError when the template has no such layout: it drops or rewrites the user text
    (``plain``, phase-1 captions), or its turns are not the same text each time (checked by
    rebuilding probe conversations of one to three turns, with and without system text)."""
    p = _PROBES
    no_system = None if isinstance(template, TokenizerTemplate) else ""

    def render(messages, gen, system=p["system"]):
        return "".join(t for t, _ in template.segments(messages, gen, system, tokenizer=tokenizer))

    def fail(why: str) -> MmloomError:
        return MmloomError(f"template {template.name!r} has no fixed text around its turns ({why}); serving "
                           "stacks cannot render its prompts from a chat template")

    one = [{"role": "user", "content": p["u1"]}]
    two = one + [{"role": "assistant", "content": p["a1"]}]
    three = two + [{"role": "user", "content": p["u2"]}]
    r0, r1, r2, r3 = render(one, False), render(one, True), render(two, False), render(three, True)
    if r0.count(p["u1"]) != 1 or r0.count(p["system"]) != 1:
        raise fail("the user or system text does not appear as written")
    system_prefix, rest = r0.split(p["system"])
    system_suffix, user_end = rest.split(p["u1"])
    if not r1.startswith(r0) or not r2.startswith(r1) or r2.count(p["a1"]) != 1:
        raise fail("a turn is rewritten when the next one is added")
    generation_prompt = r1[len(r0):]
    answer_prefix, answer_end = r2[len(r1):].split(p["a1"])
    if not r3.startswith(r2) or not r3.endswith(p["u2"] + user_end + generation_prompt):
        raise fail("the second turn is not laid out like the first")
    next_user = r3[len(r2):-len(p["u2"] + user_end + generation_prompt)]
    bare = render(one, True, no_system)
    if not bare.endswith(p["u1"] + user_end + generation_prompt):
        raise fail("the turn changes without system text")
    layout = TurnLayout(system_prefix, system_suffix, bare[:-len(p["u1"] + user_end + generation_prompt)],
                        user_end, generation_prompt, answer_prefix, answer_end, next_user,
                        template.default_system or None, bool(template.add_bos))
    four = three + [{"role": "assistant", "content": p["a2"]}]
    for messages, gen, system in ((four, False, p["system"]), (three, True, no_system), (four, False, no_system)):
        given = [{"role": "system", "content": system}] if system is not None else []
        if layout.render(given + messages, gen) != render(messages, gen, system):
            raise fail("a probe conversation renders differently")
    return layout

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATE_NAMES",
    "default_template_name",
    "template_choice",
    "templates_help",
    "ConversationError",
    "ConversationTemplate",
    "TokenizedConversation",
    "TurnLayout",
    "encode_segment",
    "end_of_turn_token_ids",
    "get_template",
    "messages_from_llava",
    "placeholder_ids",
    "tokenize_prompt",
    "tokenize_segments",
    "turn_layout",
]
