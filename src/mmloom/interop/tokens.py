"""Placeholder tokens in the tokenizer and a vocabulary that covers them."""

from __future__ import annotations

import torch
from tokenizers import AddedToken
from torch import nn

from mmloom.errors import MmloomError
from mmloom.model.adapters import base_module
from mmloom.processing.tokenizer import token_id  # the one single-token check; re-exported

__all__ = ["ensure_pad_token", "ensure_special_token", "prepare_tokenizer_and_vocab", "resize_to_cover", "token_id", "vocab_rows"]


def ensure_special_token(tokenizer, token: str) -> tuple[int, bool]:
    """Add `token` as a never-split special token unless it already is one; return (id, added).
    Raises MmloomError when the tokenizer still does not encode `token` as that one id."""
    existing = token_id(tokenizer, token)
    if existing is not None:
        return existing, False
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    added = token_id(tokenizer, token)
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if added is None or ids != [added]:
        raise MmloomError(f"could not add {token!r} to the tokenizer as a single token (got ids {ids})")
    return added, True


def ensure_pad_token(tokenizer) -> bool:
    """Give the tokenizer a pad token (its unk token, as LLaVA does for Vicuna, else a new `<pad>`)."""
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    ensure_special_token(tokenizer, "<pad>")
    tokenizer.pad_token = "<pad>"
    return True


def vocab_rows(language_model: nn.Module) -> int:
    """Rows of the language model's input embedding matrix (its vocabulary size as built)."""
    return language_model.get_input_embeddings().weight.shape[0]


def resize_to_cover(
    language_model: nn.Module, size: int, pad_to_multiple_of: int | None = None
) -> tuple[int, int]:
    """Grow the input/output embeddings to at least `size` rows (rounded up to a multiple when
    asked); never shrinks. New rows are the mean of the old rows, exactly (as LLaVA's
    `smart_tokenizer_and_embedding_resize` does; transformers' `mean_resizing` draws them at random
    around the mean), so a conversion written twice is the same bytes. Returns (old rows, new rows).
    Raises MmloomError when `pad_to_multiple_of` is not positive."""
    old = vocab_rows(language_model)
    target = max(old, size)
    if pad_to_multiple_of:
        if pad_to_multiple_of < 1:
            raise MmloomError(f"--pad-to-multiple-of must be positive, got {pad_to_multiple_of}")
        target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
    if target != old:
        base = base_module(language_model)
        base.resize_token_embeddings(target, mean_resizing=False)
        with torch.no_grad():
            for embedding in {id(m): m for m in (base.get_input_embeddings(), base.get_output_embeddings())
                              if m is not None}.values():
                weight = embedding.weight
                weight[old:] = weight[:old].float().mean(dim=0, keepdim=True).to(weight.dtype)
                bias = getattr(embedding, "bias", None)
                if isinstance(bias, torch.Tensor) and bias.shape[0] == target:
                    bias[old:] = bias[:old].mean()
        config = base_module(language_model).config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        text_config.vocab_size = target
    return old, target


def prepare_tokenizer_and_vocab(
    tokenizer, language_model: nn.Module, placeholders: list[str], pad_to_multiple_of: int | None = None
) -> dict[str, int]:
    """Add the placeholder tokens (and a pad token), then resize the embeddings to cover the
    tokenizer. Returns {placeholder: id}. The LLM's pad_token_id is set when it had none."""
    ids = {p: ensure_special_token(tokenizer, p)[0] for p in placeholders}
    ensure_pad_token(tokenizer)
    resize_to_cover(language_model, len(tokenizer), pad_to_multiple_of)
    base = base_module(language_model)
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if getattr(base, "generation_config", None) is not None and base.generation_config.pad_token_id is None:
        base.generation_config.pad_token_id = tokenizer.pad_token_id
    return ids
