"""Tiny random HF models and tokenizers built from configs, for tests, examples and the demo.

Nothing here touches a model hub: every model is initialised from a small config.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PixtralVisionConfig,
    PixtralVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    WhisperConfig,
)
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
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
    """A 3-layer random `CLIPVisionModel` (eval mode): (N, 3, image_size, image_size) pixels ->
    1 + (image_size / patch_size)^2 positions of `hidden_size` (CLS first)."""
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
    """A 2-layer random `SiglipVisionModel` (eval mode): (N, 3, image_size, image_size) pixels ->
    (image_size / patch_size)^2 positions of `hidden_size` (no CLS)."""
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
    """``tiny_llm("llama", **kw)``."""
    return tiny_llm("llama", **kw)


def tiny_opt(vocab_size: int = 400, hidden_size: int = 48, word_embed_proj_dim: int = 24, seed: int = 0):
    """A 2-layer OPT whose input embeddings (`word_embed_proj_dim`) are narrower than its hidden size."""
    _seeded(seed)
    cfg = OPTConfig(vocab_size=vocab_size, hidden_size=hidden_size, ffn_dim=hidden_size * 2, num_hidden_layers=2,
                    num_attention_heads=4, word_embed_proj_dim=word_embed_proj_dim, max_position_embeddings=512,
                    bos_token_id=0, eos_token_id=1, pad_token_id=3, tie_word_embeddings=False)
    return OPTForCausalLM(cfg).eval()


def tiny_pixtral_vision(image_size: int = 64, patch_size: int = 8, hidden_size: int = 32, seed: int = 0):
    """Pixtral vision tower: one token per patch of each image's own size (variable resolution)."""
    _seeded(seed)
    cfg = PixtralVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                              intermediate_size=hidden_size * 2, num_hidden_layers=2, num_attention_heads=4,
                              head_dim=hidden_size // 4)
    return PixtralVisionModel(cfg).eval()


def tiny_pixtral_processor(image_size: int = 64, patch_size: int = 8):
    """Pixtral's image processor (PIL backend): longest edge `image_size`, returns `image_sizes`."""
    from transformers import PixtralImageProcessorPil

    return PixtralImageProcessorPil(size={"longest_edge": image_size},
                                    patch_size={"height": patch_size, "width": patch_size})


def tiny_qwen2_vl_vision(out_hidden_size: int = 40, embed_dim: int = 32, patch_size: int = 4, seed: int = 0):
    """Qwen2-VL vision tower: 2x2 patches merged into `out_hidden_size`-wide tokens."""
    _seeded(seed)
    cfg = Qwen2VLVisionConfig(depth=2, embed_dim=embed_dim, hidden_size=out_hidden_size, num_heads=4,
                              patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2)
    return Qwen2VisionTransformerPretrainedModel(cfg).eval()


def tiny_qwen2_vl_processor(patch_size: int = 4, max_side: int = 64):
    """Qwen2-VL's image processor (PIL backend): returns flattened patches and `image_grid_thw`."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                    min_pixels=(4 * patch_size) ** 2, max_pixels=max_side * max_side)


class TinyConvConfig(PretrainedConfig):
    """Config of `TinyConvEncoder`; `output` is the form its forward returns."""

    model_type = "mmloom_tiny_conv"

    def __init__(self, hidden_size: int = 32, patch_size: int = 8, output: str = "tensor", **kwargs):
        self.hidden_size, self.patch_size, self.output = hidden_size, patch_size, output
        super().__init__(**kwargs)


class TinyConvEncoder(PreTrainedModel):
    """A one-conv image encoder returning its (N, L, D) features as a bare tensor (`output=
    "tensor"`, like custom or timm-style towers), a tuple, a BaseModelOutput, or a list of
    per-item (L, D) tensors."""

    config_class = TinyConvConfig
    main_input_name = "pixel_values"

    def __init__(self, config: TinyConvConfig):
        super().__init__(config)
        self.conv = nn.Conv2d(3, config.hidden_size, config.patch_size, config.patch_size)
        self.post_init()

    def forward(self, pixel_values):
        features = self.conv(pixel_values).flatten(2).transpose(1, 2)  # (N, L, D)
        return {"tensor": lambda: features, "tuple": lambda: (features,), "list": lambda: list(features),
                "output": lambda: BaseModelOutput(last_hidden_state=features)}[self.config.output]()


def tiny_conv_encoder(output: str = "tensor", hidden_size: int = 32, seed: int = 0) -> TinyConvEncoder:
    """A random :class:`TinyConvEncoder` (eval mode) returning its features in the form `output`."""
    _seeded(seed)
    return TinyConvEncoder(TinyConvConfig(hidden_size=hidden_size, output=output)).eval()
