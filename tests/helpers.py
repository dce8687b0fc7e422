"""Builders shared by the model tests."""

import torch

from mmloom import FeatureSelect, ModalEncoderModule, MultimodalModel
from mmloom.testing import tiny_clip_vision, tiny_llm, tiny_whisper_encoder

IMAGE_ID, AUDIO_ID = 4, 5  # <image>, <audio> in tiny_tokenizer()


def vlm(llm_kind="llama", projector="mlp2x_gelu", **llm_overrides) -> MultimodalModel:
    """CLIP (layer -2, CLS dropped: 16 tokens per image) + a tiny LLM."""
    encoder = ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch"))
    return MultimodalModel(
        {"vision": encoder},
        tiny_llm(llm_kind, **llm_overrides),
        init_projector_type=projector,
        placeholder_token_ids={"vision": IMAGE_ID},
    )


def audio_vlm() -> MultimodalModel:
    """CLIP + Whisper encoder + Llama: 16 image tokens, 8 audio tokens per item."""
    return MultimodalModel(
        {
            "vision": ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch")),
            "audio": ModalEncoderModule(tiny_whisper_encoder()),
        },
        tiny_llm("llama"),
        init_projector_type="mlp",
        placeholder_token_ids={"vision": IMAGE_ID, "audio": AUDIO_ID},
    )


def sample_ids(n_placeholders: int, text=(10, 11, 12, 13), placeholder=IMAGE_ID, bos=0) -> list[int]:
    return [bos, *([placeholder] * n_placeholders), *text]


def pad_batch(rows: list[list[int]], side="right", pad=3):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


class LlavaNextStub:
    """The attributes transformers' `LlavaNextModel.pack_image_features` reads from `self`, so
    that it can run as a plain function (views of 32 px, patches of 8 px)."""

    def __init__(self, pinpoints, newline):
        from types import SimpleNamespace

        self.config = SimpleNamespace(image_grid_pinpoints=pinpoints,
                                      vision_config=SimpleNamespace(image_size=32, patch_size=8))
        self.image_newline = newline


def sp_vlm(folder, llm_kind="llama", projector="mlp2x_gelu", **llm_overrides):
    """(model, tokenizer): `vlm()` with a Llama-2-style SentencePiece tokenizer (tokenizer.model, trained
    offline in `folder`; `<image>` added after its 500 pieces), what the original LLaVA code can load
    (it opens Llama tokenizers with use_fast=False)."""
    from mmloom.interop.tokens import prepare_tokenizer_and_vocab
    from mmloom.processing.tokenizer import load_tokenizer
    from tokenizer_families import llama_sentencepiece_folder

    tokenizer = load_tokenizer(llama_sentencepiece_folder(folder))
    llm = tiny_llm(llm_kind, vocab_size=len(tokenizer), **{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                                            **llm_overrides})
    ids = prepare_tokenizer_and_vocab(tokenizer, llm, ["<image>"])
    encoder = ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch"))
    model = MultimodalModel({"vision": encoder}, llm, init_projector_type=projector,
                            placeholder_token_ids={"vision": ids["<image>"]})
    return model.eval(), tokenizer


IMAGE_PART = {"type": "image"}


def text_part(value: str) -> dict:
    return {"type": "text", "text": value}


# Prompts with several images, as transformers' chat messages and as mmloom's LLaVA record turns (the same
# conversation): the hf-llava export checks in transformers 5 and, in the client stage, transformers 4.49.
SEVERAL_IMAGE_CHATS = {
    "two images, turns 1 and 2": (
        [{"role": "user", "content": [IMAGE_PART, text_part("What is in the first picture?")]},
         {"role": "assistant", "content": [text_part("A red square.")]},
         {"role": "user", "content": [IMAGE_PART, text_part("And in the second one?")]}],
        [("human", "<image>\nWhat is in the first picture?"), ("gpt", "A red square."),
         ("human", "<image>\nAnd in the second one?")]),
    "three images, two in turn 1, one in turn 3": (
        [{"role": "user", "content": [IMAGE_PART, IMAGE_PART, text_part("Compare the two pictures.")]},
         {"role": "assistant", "content": [text_part("The first is brighter.")]},
         {"role": "user", "content": [text_part("Why?")]},
         {"role": "assistant", "content": [text_part("More light.")]},
         {"role": "user", "content": [IMAGE_PART, text_part("And this one?")]}],
        [("human", "<image>\n<image>\nCompare the two pictures."), ("gpt", "The first is brighter."),
         ("human", "Why?"), ("gpt", "More light."), ("human", "<image>\nAnd this one?")]),
}
