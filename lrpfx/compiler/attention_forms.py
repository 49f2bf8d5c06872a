"""Helpers the expanded attention forms call at run time (masks built from sizes), and the registered
expansions of library attention functions that fx keeps opaque (torchvision's Swin).

The mask helpers read sizes and constant masks only: their outputs do not depend on the input's
values, so they are not on the relevance path, and a masked score (-inf) takes no relevance.
"""
from __future__ import annotations

import torch


def _additive(mask: torch.Tensor, masked_when: bool) -> torch.Tensor:
    """A boolean mask as an additive one (-inf where ``mask == masked_when``, 0 elsewhere); a float mask as is."""
    if mask.dtype != torch.bool:
        return mask
    hide = mask if masked_when else ~mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(hide, float("-inf"))


def sdpa_mask(attn_mask: torch.Tensor | None, is_causal: bool, length: int, source: int) -> torch.Tensor | None:
    """The additive mask of ``F.scaled_dot_product_attention``: a boolean ``attn_mask`` is True where a
    query may attend; ``is_causal`` masks the strict upper triangle (top-left aligned), as torch does."""
    mask = None if attn_mask is None else _additive(attn_mask, masked_when=False)
    if is_causal:
        allowed = torch.ones(length, source, dtype=torch.bool).tril()
        causal = _additive(allowed, masked_when=False)
        mask = causal if mask is None else mask + causal.to(mask.device)
    return mask


def mha_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, heads: int,
             length: int, source: int) -> torch.Tensor | None:
    """The additive mask of ``nn.MultiheadAttention``, shaped to broadcast over (batch, heads, L, S).

    Boolean masks are True where attending is *not* allowed (the module's convention); ``attn_mask``
    is (L, S) or (batch * heads, L, S), ``key_padding_mask`` is (batch, S).
    """
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, masked_when=True)
        if mask.dim() == 3:
            mask = mask.reshape(batch, heads, length, source)
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, masked_when=True).reshape(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask


__all__ = ["mha_mask", "sdpa_mask"]
