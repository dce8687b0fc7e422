"""Offline tokenizer training: a byte-level BPE tokenizer wrapped as a HF fast tokenizer.

Used by the tests and the demo, where nothing can be downloaded from a model hub.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    extra_special_tokens: Iterable[str] = ("<image>",),
    add_bos: bool = True,
    chat_template: str | None = None,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a lossless byte-level BPE tokenizer with Llama-style special tokens.

    `<s>` is prepended when `add_bos` (like Llama's tokenizer); `extra_special_tokens`
    (e.g. `<image>`, `<|im_start|>`) are single, never-split tokens.
    """
    base = list(LLAMA_SPECIALS.values())
    extras = [t for t in extra_special_tokens if t not in base]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=base + extras,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        additional_special_tokens=extras,
        **LLAMA_SPECIALS,
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf
