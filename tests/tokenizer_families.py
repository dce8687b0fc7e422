"""Tokenizer folders of the families LLaVA users really have, built offline for the tests.

- `llama_sentencepiece_folder`: a Llama-2-style SentencePiece BPE model trained with the
  `sentencepiece` trainer (byte fallback, dummy prefix, identity normalisation, no whitespace
  squeezing, split digits; unk/bos/eos = 0/1/2, no pad), laid out like the stock
  `lmsys/vicuna-7b-v1.5` folder (tokenizer.model + tokenizer_config.json + special_tokens_map.json,
  `legacy: false`, `pad_token: null`);
- `stock_vicuna_folder`: the same layout around the real Llama-2 `tokenizer.model` of
  `../shared/assets/llama2-tokenizer/`;
- `llama3_style_folder`: byte-level BPE with no pad and no unk token, `<|begin_of_text|>` BOS;
- `qwen2_style_folder`: byte-level BPE whose pad token is its EOS (`<|endoftext|>`), no BOS.

`llava_reference_ids` writes out LLaVA's `tokenizer_image_token` with the `sentencepiece` library
itself (not transformers), for checking mmloom's ids against the original layout.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from mmloom.testing import SAMPLE_TEXTS

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER_MODEL = ROOT.parent / "shared" / "assets" / "llama2-tokenizer" / "tokenizer.model"

EXTRA_TEXTS = [
    "an astronaut posing in a white space suit",
    "What is shown in this picture? The astronaut is holding a helmet.",
    "Tell me a story about two triangles and a circle.",
    "Describe the picture. A red circle on the left of a blue square.",
    "<unk> appears literally in this caption, and so do </s> and <pad>.",
]


def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def _write_stock_llama_folder(folder: Path, model_bytes: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model_bytes)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": _added("<s>"),
        "clean_up_tokenization_spaces": False, "eos_token": _added("</s>"), "legacy": False,
        "model_max_length": 4096, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": _added("<unk>")}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        key: {k: v for k, v in _added(tok).items() if k != "__type"}
        for key, tok in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}, indent=2))
    return folder


def llama_sentencepiece_folder(folder: Path, vocab_size: int = 500) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((SAMPLE_TEXTS + EXTRA_TEXTS) * 20), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, character_coverage=1.0, split_digits=True, byte_fallback=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    return _write_stock_llama_folder(folder, buf.getvalue())


def stock_vicuna_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(LLAMA2_TOKENIZER_MODEL, folder / "tokenizer.model")
    return _write_stock_llama_folder(folder, LLAMA2_TOKENIZER_MODEL.read_bytes())


def _byte_level(folder: Path, specials: list[str], bos: str | None, eos: str, pad: str | None, vocab_size=500):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())  # no unk token: byte-level BPE covers every byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((SAMPLE_TEXTS + EXTRA_TEXTS) * 4, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                 additional_special_tokens=[t for t in specials if t not in (bos, eos, pad)])
    hf.save_pretrained(folder)
    return folder


def llama3_style_folder(folder: Path) -> Path:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return _byte_level(folder, specials, bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None)


def qwen2_style_folder(folder: Path) -> Path:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return _byte_level(folder, specials, bos=None, eos="<|endoftext|>", pad="<|endoftext|>")


# ----------------------------------------------------------------------------- the reference
class SentencePieceReference:
    """LLaVA's tokenization of prompts with a Llama SentencePiece model and `legacy: false`,
    written with the `sentencepiece` library: `tokenizer(text)` = BOS + the text encoded with the
    dummy prefix, where the text after a special token (`</s>`) is encoded without it."""

    def __init__(self, model_file: Path, specials=("</s>", "<s>", "<unk>")):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        proto = model_pb2.ModelProto.FromString(Path(model_file).read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.specials = specials

    def __call__(self, text: str, bos: bool = True) -> list[int]:
        import re

        ids = [self.sp.bos_id()] if bos else []
        pieces = re.split("(" + "|".join(map(re.escape, self.specials)) + ")", text)
        for k, piece in enumerate(pieces):
            if k % 2:
                ids.append(self.sp.piece_to_id(piece))
            elif piece:
                ids += (self.sp if k == 0 else self.sp_no_prefix).encode(piece)
        return ids


def llava_reference_ids(encode, prompt: str, image_id: int, bos_id: int | None) -> list[int]:
    """LLaVA's `tokenizer_image_token`: the prompt cut at `<image>`, each piece encoded as a text
    of its own (`encode` adds the tokenizer's BOS, as `tokenizer(piece)` does), the BOS kept on the
    first piece only, the pieces joined with the image id."""
    ids: list[int] = []
    for k, piece in enumerate(prompt.split("<image>")):
        piece_ids = list(encode(piece))
        if k:
            if bos_id is not None and piece_ids[:1] == [bos_id]:
                piece_ids = piece_ids[1:]
            ids.append(image_id)
        ids += piece_ids
    return ids
