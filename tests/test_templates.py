"""Conversation templates: exact rendering, exact loss masks, generation prompts, LLaVA records."""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mmloom.errors import MmloomError
from mmloom.processing.templates import (
    IGNORE_INDEX,
    TEMPLATE_NAMES,
    VICUNA_SYSTEM,
    ConversationError,
    get_template,
    messages_from_llava,
)
from mmloom.testing import CHAT_SPECIAL_TOKENS, SAMPLE_TEXTS, tiny_tokenizer

CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Renders only the last assistant answer: earlier answers vanish, so prefixes are not stable.
UNSTABLE_JINJA = (
    "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def metaspace_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A Llama-2-like tokenizer: BPE over SentencePiece-style "▁word" pieces, Metaspace
    pre-tokenizer and decoder with prepend_scheme="first" (prefix "▁" only at the start of the
    text, not after special tokens), BOS <s> prepended, same specials as tiny_tokenizer()."""
    specials = ["<s>", "</s>", "<unk>", "<pad>", *CHAT_SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    alphabet = sorted(set("".join(SAMPLE_TEXTS).replace(" ", "▁")) | set("\n<>/|▁"))
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    # train on words (like SentencePiece: pieces never end with "▁"), tokenize like HF's Llama converter
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator([t + "\n" + t for t in SAMPLE_TEXTS] * 4, trainer=trainer)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=list(CHAT_SPECIAL_TOKENS),
    )
    if chat_template:
        hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="module")
def toks():
    return {
        "bytelevel": tiny_tokenizer(),
        "metaspace": metaspace_tokenizer(),
        "bytelevel_chat": tiny_tokenizer(),
        "metaspace_chat": metaspace_tokenizer(),
    }


ONE_TURN = [
    {"role": "user", "content": "<image>\nWhat is the shape?"},
    {"role": "assistant", "content": "A red circle."},
]
MULTI_TURN = ONE_TURN + [
    {"role": "user", "content": "Is there a star?"},
    {"role": "assistant", "content": "Yes, above the square."},
    {"role": "user", "content": "How many shapes?"},
    {"role": "assistant", "content": "Three: one red, two blue."},
]

GEN_PROMPT_ENDS = {
    "plain": "<image>",
    "vicuna_v1": "ASSISTANT:",
    "llama2": "[/INST]",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "zephyr": "<|assistant|>\n",
    "chatml": "<|im_start|>assistant\n",
    "mistral": "[/INST]",
    "tokenizer": "<|im_start|>assistant\n",
}


def _tokenizer_for(toks, name, kind):
    if name != "tokenizer":
        return toks[kind]
    tok = toks[kind + "_chat"]
    tok.chat_template = CHATML_JINJA
    return tok


def _spans(tc):
    """Contiguous runs of supervised ids."""
    spans, cur = [], []
    for i, lab in zip(tc.input_ids, tc.labels, strict=True):
        if lab == IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(i)
    if cur:
        spans.append(cur)
    return spans


def _expected_answers(name, template, messages):
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if name == "tokenizer":  # chatml jinja: answer + <|im_end|>
        return [a + "<|im_end|>" for a in answers]
    return [template.answer_prefix + a + template.end for a in answers]


def _pieces(tok, ids):
    return "".join(tok.convert_ids_to_tokens(ids)).replace("▁", " ")


def _chunk_prefixed(text: str) -> str:
    """`text` with the SentencePiece prefix space every piece after a placeholder gets (LLaVA's
    tokenizer_image_token tokenizes each piece between placeholders as a text of its own)."""
    return re.sub(r"(<image>|<audio>)(?=[^<\s]|\s)", r"\1 ", text)


def test_template_names():
    assert set(TEMPLATE_NAMES) == {
        "plain",
        "vicuna_v1",
        "llama2",
        "llama3",
        "zephyr",
        "chatml",
        "mistral",
        "tokenizer",
    }


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("messages", [ONE_TURN, MULTI_TURN], ids=["one_turn", "multi_turn"])
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_masks_and_roundtrip(toks, name, messages, kind):
    tok = _tokenizer_for(toks, name, kind)
    tpl = get_template(name)
    tc = tpl.tokenize(tok, messages)
    rendered = (
        tpl.render(messages) if name != "tokenizer" else get_template(name, tokenizer=tok).render(messages)
    )
    n_bos = 1 if tpl.add_bos else 0
    assert len(tc.input_ids) == len(tc.labels)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(tc.input_ids, tc.labels, strict=True))
    assert tok.unk_token_id not in tc.input_ids
    assert tc.text == (tok.bos_token if n_bos else "") + rendered
    assert tc.input_ids[:n_bos] == [tok.bos_token_id] * n_bos
    assert tc.labels[:n_bos] == [IGNORE_INDEX] * n_bos
    # placeholders are single special ids
    assert tc.input_ids.count(tok.convert_tokens_to_ids("<image>")) == rendered.count("<image>") >= 1

    expected = _expected_answers(name, tpl, messages)
    spans = _spans(tc)
    assert len(spans) == len(expected)
    supervised = [i for i, lab in zip(tc.input_ids, tc.labels, strict=True) if lab != IGNORE_INDEX]
    if kind == "bytelevel":
        # lossless byte-level BPE: everything decodes exactly
        assert tok.decode(tc.input_ids) == tc.text
        assert tok.decode(supervised) == "".join(expected)
        for span, exp in zip(spans, expected, strict=True):
            assert tok.decode(span) == exp
    else:
        # Metaspace (prepend_scheme="first"): the first text token of the sequence carries the
        # prefix "▁" (decode of the whole sequence shows "<s> A chat"), the decoder drops one
        # leading space from the first token it decodes; the text after each placeholder starts a
        # piece of its own (LLaVA's layout) and carries the prefix too. Exactly:
        assert tok.decode(tc.input_ids[n_bos:]) == _chunk_prefixed(rendered)
        first_is_text = not any(rendered.startswith(s) for s in tok.all_special_tokens)
        assert (
            _pieces(tok, tc.input_ids)
            == tc.text[: n_bos and len(tok.bos_token)]
            + (" " if first_is_text else "")
            + _chunk_prefixed(tc.text[len(tok.bos_token) * n_bos :])
        )
        for span, exp in zip(spans, expected, strict=True):
            if name == "plain":  # the caption is the piece right after <image>: it gets the prefix
                exp = " " + exp
            assert _pieces(tok, span) == exp  # token strings: exact, leading space included
            assert tok.decode(span) == exp.removeprefix(" ")  # decode() of a span alone drops it


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_generation_prompt(toks, name, kind):
    tok = _tokenizer_for(toks, name, kind)
    tpl = get_template(name)
    for n in (1, 3, 5):
        prompt_msgs = MULTI_TURN[:n]
        ids = tpl.generation_prompt(tok, prompt_msgs)
        text = tok.decode(ids)
        assert text.endswith(GEN_PROMPT_ENDS[name]), (name, text)
        # same ids as the training sequence up to the answer: train/inference consistency
        full = tpl.tokenize(tok, MULTI_TURN[: n + 1]).input_ids
        assert full[: len(ids)] == ids
        assert tpl.tokenize(tok, MULTI_TURN[: n + 1]).labels[len(ids) - 1] == IGNORE_INDEX
        assert tpl.tokenize(tok, MULTI_TURN[: n + 1]).labels[len(ids)] != IGNORE_INDEX
    with pytest.raises(MmloomError, match="last message to be a user"):
        tpl.tokenize(tok, ONE_TURN, add_generation_prompt=True)


def test_vicuna_literal(tokenizer):
    tpl = get_template("vicuna_v1")
    assert VICUNA_SYSTEM == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions."
    )
    assert tpl.render(MULTI_TURN[:4]) == (
        VICUNA_SYSTEM + " " + "USER: <image>\nWhat is the shape? ASSISTANT: A red circle.</s>"
        "USER: Is there a star? ASSISTANT: Yes, above the square.</s>"
    )
    prompt = tpl.render(MULTI_TURN[:3], add_generation_prompt=True)
    assert prompt.endswith("</s>USER: Is there a star? ASSISTANT:")
    tc = tpl.tokenize(tokenizer, ONE_TURN)
    assert tc.input_ids[0] == tokenizer.bos_token_id == 0
    assert (
        tc.input_ids[-1] == tokenizer.eos_token_id == 1 and tc.labels[-1] == 1
    )  # </s> is the EOS id, supervised
    # BOS, system, USER turn and the ASSISTANT: tag are masked; " A red circle.</s>" is not
    n_masked = tc.labels.index(next(lab for lab in tc.labels if lab != IGNORE_INDEX))
    assert tokenizer.decode(tc.input_ids[:n_masked]).endswith("ASSISTANT:")
    gen = tpl.generation_prompt(tokenizer, MULTI_TURN[:1])
    assert tokenizer.decode(gen).endswith(" ASSISTANT:") and not tokenizer.decode(gen).endswith(" ")
    assert (
        tpl.render(ONE_TURN, system="Be brief.")
        == "Be brief. USER: <image>\nWhat is the shape? ASSISTANT: A red circle.</s>"
    )
    assert get_template("vicuna_v1", system="S.").render(ONE_TURN).startswith("S. USER: ")
    assert tpl.stop_token_ids(tokenizer) == [1]


def test_literal_formats():
    sys = [{"role": "system", "content": "SYS"}]
    two = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert get_template("llama2").render(sys + two) == (
        "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nq1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>"
    )
    assert get_template("llama2", system="").render(two[:2]) == "[INST] q1 [/INST] a1 </s>"
    assert get_template("llama3").render(sys + two[:2]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nq1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na1<|eot_id|>"
    )
    assert (
        get_template("zephyr").render(sys + two[:2])
        == "<|system|>\nSYS</s>\n<|user|>\nq1</s>\n<|assistant|>\na1</s>\n"
    )
    assert get_template("chatml").render(sys + two[:2]) == (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
    )
    assert get_template("mistral").render(two) == "<s>[INST] q1 [/INST]a1</s>[INST] q2 [/INST]a2</s>"
    assert get_template("mistral").render(sys + two[:2]) == "<s>[INST] SYS\n\nq1 [/INST]a1</s>"
    assert get_template("plain").render(two[:2]) == "<image>a1</s>"
    assert get_template("plain", terminator="newline").render(two[:2]) == "<image>a1\n"
    assert get_template("chatml").render(two[:1], add_generation_prompt=True) == (
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n"
    )


def test_plain(tokenizer):
    msgs = [
        {"role": "user", "content": "Describe the picture.\n<image>"},
        {"role": "assistant", "content": "Two green triangles."},
    ]
    for terminator, end_text in (("eos", "</s>"), ("newline", "\n")):
        tpl = get_template("plain", terminator=terminator)
        tc = tpl.tokenize(tokenizer, msgs)
        assert tc.text == "<s><image>Two green triangles." + end_text  # human text dropped
        assert tc.input_ids[:2] == [0, tokenizer.convert_tokens_to_ids("<image>")]
        assert tc.labels[:2] == [IGNORE_INDEX, IGNORE_INDEX]
        assert tokenizer.decode(
            [i for i, lab in zip(tc.input_ids, tc.labels, strict=True) if lab != IGNORE_INDEX]
        ) == ("Two green triangles." + end_text)
    assert get_template("plain").tokenize(tokenizer, msgs).input_ids[-1] == tokenizer.eos_token_id
    audio = [{"role": "user", "content": "<audio> transcribe"}, {"role": "assistant", "content": "Hi."}]
    assert get_template("plain").render(audio) == "<audio>Hi.</s>"
    with pytest.raises(MmloomError, match="terminator"):
        get_template("plain", terminator="tab")


def test_stop_tokens(tokenizer):
    assert get_template("llama3").stop_token_ids(tokenizer) == [
        tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        1,
    ]
    assert get_template("chatml").stop_token_ids(tokenizer) == [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        1,
    ]
    assert get_template("llama2").stop_token_ids(tokenizer) == [1]
    assert get_template("chatml").stop_strings == ["<|im_end|>"]


def test_tokenizer_template(tokenizer):
    tok = tiny_tokenizer()
    with pytest.raises(MmloomError, match="no chat_template"):
        get_template("tokenizer").tokenize(tok, ONE_TURN)
    with pytest.raises(MmloomError, match="needs a tokenizer"):
        get_template("tokenizer").render(ONE_TURN)
    tok.chat_template = LLAMA3_JINJA  # bos_token in the text, content trimmed by the template
    tpl = get_template("tokenizer", tokenizer=tok)
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": " a1 "}] + MULTI_TURN[2:4]
    tc = tpl.tokenize(tok, msgs, system="SYS")
    assert (
        tc.text
        == tok.apply_chat_template([{"role": "system", "content": "SYS"}, *msgs], tokenize=False)
        == tpl.render(msgs, system="SYS")
    )
    assert tc.text.startswith("<s><|start_header_id|>system")
    assert tok.decode(tc.input_ids) == tc.text and tc.input_ids[0] == 0
    assert [tok.decode(s) for s in _spans(tc)] == ["a1<|eot_id|>", "Yes, above the square.<|eot_id|>"]
    tok.chat_template = UNSTABLE_JINJA
    with pytest.raises(MmloomError, match="not prefix-stable"):
        get_template("tokenizer").tokenize(tok, MULTI_TURN)


def test_role_validation(tokenizer):
    tpl = get_template("chatml")
    with pytest.raises(ConversationError, match="expected 'user'") as e:
        tpl.render([{"role": "assistant", "content": "x"}])
    assert e.value.reason == "roles_not_alternating"
    with pytest.raises(ConversationError) as e:
        tpl.render([{"role": "system", "content": "x"}])
    assert e.value.reason == "no_human_turn"
    with pytest.raises(ConversationError) as e:
        tpl.render([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])
    assert e.value.reason == "unknown_role"


def test_messages_from_llava():
    conv = [
        {"from": "human", "value": "What is this? <image> "},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "Orange."},
    ]
    msgs = messages_from_llava(conv)
    assert msgs == [
        {"role": "user", "content": "<image>\nWhat is this?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Orange."},
    ]
    assert messages_from_llava(conv, move_image_to_front=False)[0]["content"] == "What is this? <image> "
    assert (
        messages_from_llava([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}])[0][
            "content"
        ]
        == "<image>"
    )
    assert (
        messages_from_llava(
            [{"from": "human", "value": "<audio>hi"}, {"from": "gpt", "value": "x"}], placeholder="<audio>"
        )[0]["content"]
        == "<audio>\nhi"
    )
    # a leading assistant turn is skipped; chat-style role names are the same roles
    assert messages_from_llava([{"from": "gpt", "value": "Hello!"}, *conv]) == msgs
    chat_style = [{"from": {"human": "user", "gpt": "assistant"}[t["from"]], "value": t["value"]} for t in conv]
    assert messages_from_llava(chat_style) == msgs
    assert messages_from_llava([{"from": "assistant", "value": "Hi"}, *chat_style]) == msgs

    cases = [
        ([], "no_human_turn", "no human turn"),
        ([{"from": "gpt", "value": "only me"}], "no_human_turn", "no human turn"),
        (
            [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
            "roles_not_alternating",
            "turn 1 is from 'human'",
        ),
        (
            [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}],
            "empty_answer",
            "turn 1 \\(gpt\\) has an empty answer",
        ),
        (
            [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}],
            "unknown_role",
            "unknown role 'bot'",
        ),
    ]
    for conv_, reason, message in cases:
        with pytest.raises(ConversationError, match=message) as e:
            messages_from_llava(conv_)
        assert e.value.reason == reason
        assert isinstance(e.value, MmloomError)


def test_unknown_template():
    with pytest.raises(MmloomError) as e:
        get_template("vicuna_v2")
    msg = str(e.value)
    assert "'vicuna_v2'" in msg and all(n in msg for n in TEMPLATE_NAMES)
    with pytest.raises(MmloomError, match="unknown option"):
        get_template("chatml", terminator="eos")


def llava_reference_ids(tok, text: str, add_bos: bool, image_id: int) -> list[int]:
    """LLaVA's tokenizer_image_token, written out: cut the text at each "<image>", tokenize every
    piece as a text of its own, keep a BOS on the first piece only, join with the image id."""
    ids: list[int] = []
    for k, piece in enumerate(text.split("<image>")):
        if k:
            ids.append(image_id)
        ids += tok(piece, add_special_tokens=add_bos and k == 0)["input_ids"]
    return ids


def test_segments_match_llava_reference_layout(toks):
    """Segment-wise ids (exact masks) equal LLaVA's layout of the whole rendered conversation."""
    for kind in ("bytelevel", "metaspace"):
        tok = toks[kind]
        image_id = tok.convert_tokens_to_ids("<image>")
        for name in ("plain", "vicuna_v1", "chatml", "llama3", "mistral", "llama2"):
            tpl = get_template(name)
            for messages in (ONE_TURN, MULTI_TURN):
                tc = tpl.tokenize(tok, messages)
                reference = llava_reference_ids(tok, tpl.render(messages), tpl.add_bos, image_id)
                assert tc.input_ids == reference, (kind, name)
