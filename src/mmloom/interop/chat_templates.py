"""mmloom's conversation templates as HF chat templates (Jinja), for exports that transformers serves.

`hf_chat_template(template, tokenizer)` writes the Jinja text of any mmloom template for HF's chat API:
message contents are strings or lists of parts (`{"type": "image"}`, `{"type": "text", "text": ...}`);
each image part becomes `image_text` (``"<image>\\n"`` by default) before the message's text, as LLaVA's
`preprocess_multimodal` puts the image first. The `tokenizer` template wraps the tokenizer's own chat
template: the parts are joined into string contents first, then that template renders them. Built-in
templates mark each assistant answer and its end token with ``{% generation %}`` (transformers'
`return_assistant_tokens_mask`).

Every such template starts with a comment naming the mmloom template and its options
(:func:`mmloom_template_of` reads it back), so that importing an export records the template it was
trained with.

Whether the text reproduces mmloom's token ids is checked by the writer on a probe conversation
(`mmloom.interop.hf_llava.chat_template_for`), since it depends on the tokenizer.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mmloom.errors import MmloomError
from mmloom.processing.templates import (
    ChatMLTemplate,
    ConversationTemplate,
    Llama2Template,
    Llama3Template,
    MistralTemplate,
    PlainTemplate,
    RoleBlockTemplate,
    TokenizerTemplate,
    VicunaV1Template,
    ZephyrTemplate,
    get_template,
)

MARKER = "{{#- mmloom template: {spec} -#}}"
_MARKER_RE = re.compile(r"\{#- mmloom template: (\{.*?\}) -#\}")


def lit(text: str) -> str:
    """`text` as a Jinja string literal (JSON escapes, which Jinja reads back)."""
    return json.dumps(text)


def _normalise(image_text: str) -> str:
    """Jinja that turns every message's content into a string (image parts -> `image_text`, first;
    then the text parts) and rebinds `messages` to the result."""
    return (
        "{%- set mm = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- set part = namespace(text='') -%}"
        "{%- if message['content'] is string -%}{%- set part.text = message['content'] -%}"
        "{%- else -%}"
        "{%- for item in message['content'] if item['type'] == 'image' -%}"
        "{%- set part.text = part.text + " + lit(image_text) + " -%}{%- endfor -%}"
        "{%- for item in message['content'] if item['type'] == 'text' -%}"
        "{%- set part.text = part.text + item['text'] -%}{%- endfor -%}"
        "{%- endif -%}"
        "{%- set mm.messages = mm.messages + [{'role': message['role'], 'content': part.text}] -%}"
        "{%- endfor -%}"
        "{%- set messages = mm.messages %}"
    )


def _system(default: str | None) -> str:
    """Jinja setting `sy.text` (the system text: the first message's if it is a system one, else the
    template's default) and `sy.start` (index of the first user message)."""
    return (
        "{%- set sy = namespace(text=" + (lit(default) if default else "''") + ", start=0) -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set sy.text = messages[0]['content'] -%}{%- set sy.start = 1 -%}{%- endif -%}"
    )


def _answer(before: str, after: str) -> str:
    """The assistant answer (`message['content']`) between literals, inside a generation block."""
    return ("{% generation %}{{ " + lit(before) + " + message['content'] + " + lit(after) + " }}"
            "{% endgeneration %}")


def _vicuna(t: VicunaV1Template) -> str:
    return (
        _system(t.default_system)
        + "{%- if sy.text -%}{{ sy.text + ' ' }}{%- endif -%}"
        "{%- for message in messages[sy.start:] -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
        "{%- else -%}{{ 'ASSISTANT:' }}" + _answer(t.answer_prefix, t.end) + "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


def _llama2(t: Llama2Template) -> str:
    return (
        _system(t.default_system)
        + "{%- set turn = namespace(k=0) -%}"
        "{%- for message in messages[sy.start:] -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set text = message['content'] -%}"
        "{%- if turn.k == 0 and sy.text -%}"
        "{%- set text = '<<SYS>>\\n' + sy.text + '\\n<</SYS>>\\n\\n' + text -%}{%- endif -%}"
        "{{ ('<s>' if turn.k else '') + '[INST] ' + text + ' [/INST]' }}"
        "{%- set turn.k = turn.k + 1 -%}"
        "{%- else -%}" + _answer(t.answer_prefix, t.end) + "{%- endif -%}"
        "{%- endfor -%}"
    )


def _mistral(t: MistralTemplate) -> str:
    return (
        _system(t.default_system)
        + "{{ '<s>' }}{%- set turn = namespace(k=0) -%}"
        "{%- for message in messages[sy.start:] -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set text = message['content'] -%}"
        "{%- if turn.k == 0 and sy.text -%}{%- set text = sy.text + '\\n\\n' + text -%}{%- endif -%}"
        "{{ '[INST] ' + text + ' [/INST]' }}{%- set turn.k = turn.k + 1 -%}"
        "{%- else -%}" + _answer("", t.end) + "{%- endif -%}"
        "{%- endfor -%}"
    )


def _role_blocks(t: RoleBlockTemplate) -> str:
    header = {role: lit(t.header(role)) for role in ("system", "user", "assistant")}
    block_end = lit(t.end + t.separator)
    return (
        _system(t.default_system)
        + ("{{ " + lit(t.prefix) + " }}" if t.prefix else "")
        + "{%- if sy.text -%}{{ " + header["system"] + " + sy.text + " + block_end + " }}{%- endif -%}"
        "{%- for message in messages[sy.start:] -%}"
        "{%- if message['role'] == 'user' -%}{{ " + header["user"] + " + message['content'] + " + block_end + " }}"
        "{%- else -%}{{ " + header["assistant"] + " }}" + _answer("", t.end)
        + ("{{ " + lit(t.separator) + " }}" if t.separator else "") + "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + header["assistant"] + " }}{%- endif -%}"
    )


def _plain(t: PlainTemplate) -> str:
    placeholder = lit(t.placeholder)
    return (
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set count = message['content'].count(" + placeholder + ") -%}"
        "{{ " + placeholder + " * (count if count > 0 else 1) }}"
        "{%- else -%}" + _answer("", t.end) + "{%- endif -%}"
        "{%- endfor -%}"
    )


def _tokenizer_template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise MmloomError("template 'tokenizer': the tokenizer has no chat_template to export")
    return template


_BODIES = {
    VicunaV1Template: _vicuna,
    Llama2Template: _llama2,
    MistralTemplate: _mistral,
    Llama3Template: _role_blocks,
    ZephyrTemplate: _role_blocks,
    ChatMLTemplate: _role_blocks,
    PlainTemplate: _plain,
}


def hf_chat_template(template: ConversationTemplate | str, tokenizer=None, image_text: str = "<image>\n",
                     options: dict[str, Any] | None = None) -> str:
    """The Jinja chat template of `template` (an instance, or a name with `options`) for HF's chat API
    (see the module docstring). `tokenizer` is needed for the `tokenizer` template only.
    Raises MmloomError for a template class this module cannot write."""
    options = dict(options or {})
    if isinstance(template, str):
        template = get_template(template, **options)
    spec = json.dumps({"name": template.name, "options": options}, sort_keys=True).replace("#}", "#\\u007d")
    marker = MARKER.format(spec=spec)
    if isinstance(template, TokenizerTemplate):
        return marker + _normalise(image_text) + _tokenizer_template(tokenizer if tokenizer is not None
                                                                      else template.tokenizer)
    body = _BODIES.get(type(template))
    if body is None:
        raise MmloomError(f"template {template.name!r} ({type(template).__name__}) has no HF chat template form")
    return marker + _normalise(image_text) + body(template)


def mmloom_template_of(chat_template: str | None) -> tuple[str, dict[str, Any]] | None:
    """(template name, options) recorded in a chat template written by :func:`hf_chat_template`, else None."""
    if not chat_template:
        return None
    match = _MARKER_RE.search(chat_template)
    if match is None:
        return None
    try:
        spec = json.loads(match.group(1))
        return str(spec["name"]), dict(spec.get("options") or {})
    except (ValueError, KeyError, TypeError):
        return None
