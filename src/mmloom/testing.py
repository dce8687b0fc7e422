"""Tiny random HF models and tokenizers built from configs, for tests, examples and the demo.

Nothing here touches a model hub: every model is initialised from a small config.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    WhisperConfig,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmloom.tokenization import train_bpe_tokenizer

SAMPLE_TEXTS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A red circle on the left and a blue square.",
    "Describe the picture. There are two green triangles and one yellow star.",
    "What colour is the shape? Red. Blue. Green. Yellow. How many shapes? One. Two. Three.",
    "Is there a circle? Yes. No. Where is the square? Left of the circle, above the star.",
    "system user assistant Answer the question using a single word or phrase.",
    "The quick brown fox jumps over the lazy dog 0123456789 !?.,:;'\"()[]{}",
]

CHAT_SPECIAL_TOKENS = (
    "<image>",
    "<audio>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "[INST]",
    "[/INST]",
)


def tiny_tokenizer(vocab_size: int = 400, texts: list[str] | None = None):
    """A byte-level BPE tokenizer with Llama specials and the chat templates' special tokens."""
    return train_bpe_tokenizer(
        (texts or SAMPLE_TEXTS) * 4, vocab_size=vocab_size, extra_special_tokens=CHAT_SPECIAL_TOKENS
    )


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_clip_vision(image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, seed: int = 0):
    _seeded(seed)
    cfg = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=hidden_size,
    )
    return CLIPVisionModel(cfg).eval()


def tiny_siglip_vision(image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, seed: int = 0):
    _seeded(seed)
    cfg = SiglipVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    return SiglipVisionModel(cfg).eval()


def tiny_whisper_encoder(num_mel_bins: int = 16, max_source_positions: int = 8, d_model: int = 32, seed: int = 0):
    """Whisper encoder; its input_features are (B, num_mel_bins, 2 * max_source_positions)."""
    _seeded(seed)
    cfg = WhisperConfig(
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=d_model * 2,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=d_model * 2,
        max_source_positions=max_source_positions,
        max_target_positions=16,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )
    return WhisperEncoder(cfg).eval()


_LLMS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
}


def tiny_llm(kind: str = "llama", vocab_size: int = 400, hidden_size: int = 48, seed: int = 0, **overrides):
    """A 2-layer causal LM of the given family with random weights."""
    _seeded(seed)
    config_cls, model_cls = _LLMS[kind]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,  # ids of tiny_tokenizer(): <s>=0 </s>=1 <unk>=2 <pad>=3
        eos_token_id=1,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    if kind == "gemma":
        kwargs["head_dim"] = hidden_size // 4
    kwargs.update(overrides)
    return model_cls(config_cls(**kwargs)).eval()


def tiny_llama(**kw):
    return tiny_llm("llama", **kw)
