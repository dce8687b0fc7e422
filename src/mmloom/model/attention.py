"""Packed (padding-free) attention for any HF decoder, through transformers' attention interface.

A packed micro-batch (`mmloom.data.collate.PackedCollator`) is one row holding several samples
back to back, each with its own restarting `position_ids`; a sample must attend to itself only.
No (T, T) block mask is built: the sample boundaries travel with the batch, once per forward, as
the keyword arguments transformers hands to every attention layer (its `FlashAttentionKwargs`
names, see `varlen_kwargs`):

- `cu_seq_lens_q` / `cu_seq_lens_k`: (S + 1,) int32, the cumulative sample lengths
  `[0, L_0, L_0 + L_1, ..., T]` (the row's T positions are exactly the S segments);
- `max_length_q` / `max_length_k`: the longest segment, a Python int.

Two attention implementations take them:

- `flash_attention_2` / `flash_attention_3` (GPU): transformers' own varlen path
  (`modeling_flash_attention_utils._flash_attention_forward`) uses the given boundaries as they
  are: nothing is recomputed from `position_ids` in each layer and no per-layer host sync;
- `VARLEN_ATTENTION` (`"mmloom_sdpa_varlen"`, registered here with `AttentionInterface` and
  `AttentionMaskInterface`): PyTorch SDPA run once per sample, causal, so neither the masked
  blocks between samples nor those above each sample's diagonal are computed (the CPU and GPU
  SDPA kernels skip them under `is_causal`). It reads the boundaries back to the host once per
  forward (a sync on GPU, where flash attention needs none). Without boundaries it is
  transformers' `sdpa` exactly (padding masks, bidirectional encoders, generation with a
  cache), so a model switched to it trains and evaluates unpacked batches as before.

Sliding windows are honoured through the `sliding_window` argument transformers' attention
modules pass (Mistral, Qwen2, Gemma, ...): a segment longer than the window gets a banded mask of
its own length. Masks built from `or_mask_function` / `and_mask_function` (e.g. bidirectional
image tokens) are materialised by transformers as for `sdpa`, and such a mask cannot be combined
with packed boundaries (MmloomError).

`use_packed_attention(model)` switches a model to the implementation that takes packed rows;
the trainer calls it when `train_input.packing` is on. No model code is forked.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from mmloom.errors import MmloomError
from mmloom.model.adapters import base_module

VARLEN_ATTENTION = "mmloom_sdpa_varlen"
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def varlen_kwargs(lengths: Sequence[int]) -> dict:
    """The boundary arguments of a packed row whose segments have `lengths` (in row order).

    Returns `cu_seq_lens_q` and `cu_seq_lens_k` ((S + 1,) int32, the same tensor) and
    `max_length_q` / `max_length_k` (int). Raises ValueError for no segment or a length < 1.
    """
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"a packed row needs segments of at least one token, got lengths {lengths}")
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    longest = max(lengths)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _segment_attention(query, key, value, scaling, dropout: float, window: int | None) -> torch.Tensor:
    """Causal SDPA of one segment (1, H, L, d); a banded mask only when L exceeds `window`."""
    n = query.shape[2]
    if window is None or n <= window:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True)
    i = torch.arange(n, device=query.device)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)  # transformers' sliding_window_overlay
    return F.scaled_dot_product_attention(query, key, value, attn_mask=band, dropout_p=dropout, scale=scaling)


_last_bounds: tuple[weakref.ref | None, list[int]] = (None, [])


def _bounds_of(cu: torch.Tensor) -> list[int]:
    """`cu.tolist()`, remembered for the last tensor seen: every layer of a forward (and its
    recomputation under gradient checkpointing) gets the batch's same tensor, so a GPU tensor is
    read back once per forward, not once per layer."""
    global _last_bounds
    ref, bounds = _last_bounds
    if ref is None or ref() is not cu:
        bounds = [int(x) for x in cu.tolist()]
        _last_bounds = (weakref.ref(cu), bounds)
    return bounds


def _row_bounds(kwargs: dict, batch: int, length: int) -> list[list[int]] | None:
    """Per row, the segment boundaries [0, ..., length]: from `cu_seq_lens_q` (one row), else from
    restarting `position_ids` (a position 0 starts a segment, as transformers' flash path reads
    them); None when no row is packed."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if batch != 1:
            raise MmloomError(f"packed boundaries (cu_seq_lens_q) are given for a batch of {batch} rows; a packed "
                              "batch is one row")
        bounds = _bounds_of(cu)  # self-attention: cu_seq_lens_k holds the same boundaries
        if bounds[0] != 0 or bounds[-1] != length or any(b < a for a, b in zip(bounds, bounds[1:], strict=False)):
            raise MmloomError(f"cu_seq_lens_q {bounds} does not cover the row's {length} positions")
        return [bounds]
    positions = kwargs.get("position_ids")
    if positions is None or positions.dim() != 2 or positions.shape[-1] != length:
        return None
    rows = []
    for row in positions.expand(batch, -1):
        starts = (row == 0).nonzero().flatten().tolist()
        rows.append(sorted({0, *starts, length}))
    return rows if any(len(b) > 2 for b in rows) else None


def sdpa_varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function (`AttentionInterface`): query (B, H, T, d), key / value
    (B, H_kv, T_kv, d) -> output (B, T, H, d), no attention weights.

    Packed rows (boundaries from `cu_seq_lens_q`, or from restarting `position_ids`) attend per
    segment; anything else goes to transformers' `sdpa_attention_forward` unchanged. Raises
    MmloomError when boundaries come with an attention mask or do not cover the row.
    """
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    batch, _, length, _ = query.shape
    if attention_mask is not None or not causal or key.shape[2] != length:
        if attention_mask is not None and kwargs.get("cu_seq_lens_q") is not None:
            raise MmloomError("packed rows (cu_seq_lens_q) cannot take an attention mask as well: this model builds "
                              "its own mask (or_mask_function / and_mask_function), use attn_implementation sdpa "
                              "without packing")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    window = kwargs.get("sliding_window")
    bounds = _row_bounds(kwargs, batch, length)
    if bounds is None and (window is None or length <= window):
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("`sdpa` attention does not support `softcap`: use eager attention, without packing")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = bounds or [[0, length]] * batch
    rows = []
    for r, cuts in enumerate(bounds):
        q, k, v = query[r : r + 1], key[r : r + 1], value[r : r + 1]
        parts = [_segment_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scaling, dropout, window)
                 for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if batch == 1 else torch.cat(rows, dim=0)  # (B, H, T, d)
    return out.transpose(1, 2).contiguous(), None


def sdpa_varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                     use_vmap: bool = False, **kwargs):
    """transformers mask function (`AttentionMaskInterface`) of `VARLEN_ATTENTION`: no mask at all
    for rows without padding and without a cache offset (causality, packed boundaries and sliding
    windows are applied by `sdpa_varlen_attention`); otherwise transformers' `sdpa_mask`."""
    plain = attention_mask is None and not use_vmap and q_length == kv_length
    if plain and isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     use_vmap=use_vmap, **kwargs)


AttentionInterface.register(VARLEN_ATTENTION, sdpa_varlen_attention)
AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_varlen_mask)


def takes_packed_rows(model: nn.Module) -> bool:
    """Whether an HF model's attention implementation reads packed boundaries (flash or varlen)."""
    impl = getattr(getattr(base_module(model), "config", None), "_attn_implementation", None) or ""
    return impl == VARLEN_ATTENTION or impl.startswith("flash_attention")


def use_packed_attention(model: nn.Module) -> str:
    """Make an HF model (PEFT-wrapped or not) attend per sample in packed rows; returns its
    attention implementation.

    `flash_attention_*` and `VARLEN_ATTENTION` are kept; `sdpa`, `eager` (or none set) become
    `VARLEN_ATTENTION` (SDPA; unpacked batches compute what `sdpa` computes). Raises
    MmloomError for other implementations, or when the model cannot switch (no attention
    interface support).
    """
    base = base_module(model)
    impl = getattr(base.config, "_attn_implementation", None)
    if takes_packed_rows(base):
        return impl
    if impl not in (None, "sdpa", "eager"):
        raise MmloomError(f"packing needs attn_implementation sdpa, eager or flash_attention_2/3; "
                          f"{type(base).__name__} runs {impl!r}")
    base.set_attn_implementation(VARLEN_ATTENTION)
    if base.config._attn_implementation != VARLEN_ATTENTION:
        raise MmloomError(f"{type(base).__name__} cannot switch its attention to {VARLEN_ATTENTION} (it does not use "
                          "transformers' attention interface): packing is not available for it; use padded batches")
    return VARLEN_ATTENTION


def check_packed_attention(model: nn.Module) -> None:
    """Raise MmloomError when a model given packed boundaries would attend across samples."""
    if not takes_packed_rows(model):
        impl = getattr(base_module(model).config, "_attn_implementation", None)
        raise MmloomError(
            f"a packed batch (cu_seq_lens_q) needs the language model's attention to take packed rows "
            f"({VARLEN_ATTENTION} or flash_attention_2/3), but it runs {impl!r}: call "
            "mmloom.model.attention.use_packed_attention(model.language_model) first"
        )
