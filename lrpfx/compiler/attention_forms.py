"""Helpers the expanded attention forms call at run time (masks built from sizes), and the registered
expansions of library attention functions that fx keeps opaque (torchvision's Swin).

The mask helpers read sizes and constant masks only: their outputs do not depend on the input's
values, so they are not on the relevance path, and a masked score (-inf) takes no relevance.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

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




# --------------------------------------------------------------------------- torchvision's Swin
# ``shifted_window_attention`` is registered with ``torch.fx.wrap``: fx keeps it as one opaque call, because
# its padding, shift and mask depend on the feature map's size through Python control flow. Its expansion
# (:func:`expand_swin_attention`) keeps that control flow inside three small functions that run at run time on
# real sizes (two routing ops, replayable on index tensors, and a mask built from sizes only) and writes the
# attention itself as explicit ops: the projections, q @ k^T, the biases, softmax, @ v.
def _shifts(window_size: Sequence[int], shift_size: Sequence[int], pad_h: int, pad_w: int) -> list[int]:
    """The shift torchvision applies: none along an axis that one window covers."""
    return [0 if window_size[0] >= pad_h else shift_size[0], 0 if window_size[1] >= pad_w else shift_size[1]]


def _padded(h: int, w: int, window_size: Sequence[int]) -> tuple[int, int]:
    return h + (window_size[0] - h % window_size[0]) % window_size[0], w + (window_size[1] - w % window_size[1]) % window_size[1]


def swin_windows(x: torch.Tensor, window_size: list[int], shift_size: list[int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window area, C): pad to whole windows, shift cyclically, partition (routing)."""
    b, h, w, c = x.shape
    pad_h, pad_w = _padded(h, w, window_size)
    x = torch.nn.functional.pad(x, (0, 0, 0, pad_w - w, 0, pad_h - h))
    shift = _shifts(window_size, shift_size, pad_h, pad_w)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(b, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size[0] * window_size[1], c)


def swin_unwindows(x: torch.Tensor, window_size: list[int], shift_size: list[int], h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`swin_windows` on (B * windows, window area, C) -> (B, h, w, C) (routing)."""
    pad_h, pad_w = _padded(h, w, window_size)
    c = x.shape[-1]
    x = x.view(-1, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, pad_h, pad_w, c)
    shift = _shifts(window_size, shift_size, pad_h, pad_w)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def swin_shift_mask(batch: int, h: int, w: int, window_size: list[int], shift_size: list[int],
                    like: torch.Tensor) -> torch.Tensor:
    """The additive mask of shifted windows, (batch * windows, 1, area, area): -100 between positions that the
    cyclic shift brought together from different regions (torchvision's value), 0 elsewhere and without shift."""
    pad_h, pad_w = _padded(h, w, window_size)
    shift = _shifts(window_size, shift_size, pad_h, pad_w)
    windows, area = (pad_h // window_size[0]) * (pad_w // window_size[1]), window_size[0] * window_size[1]
    if sum(shift) == 0:
        return torch.zeros(batch * windows, 1, area, area, dtype=like.dtype, device=like.device)
    region = torch.zeros(pad_h, pad_w, dtype=like.dtype, device=like.device)
    count = 0
    for hs in ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None)):
            region[hs[0]:hs[1], ws[0]:ws[1]] = count
            count += 1
    region = region.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
    region = region.permute(0, 2, 1, 3).reshape(windows, area)
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    mask = torch.zeros_like(diff).masked_fill(diff != 0, -100.0)
    return mask.unsqueeze(1).repeat(batch, 1, 1, 1)


def inverse_norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """1 / max(||x||_2, eps) along ``dim``: ``F.normalize(x) = x * inverse_norm(x)``, the norm held (AttnLRP's
    identity rule on normalization, Proposition 3.4)."""
    return 1.0 / x.norm(p=2, dim=dim, keepdim=True).clamp_min(eps)


def swin_attention(x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                   relative_position_bias: torch.Tensor, qkv_bias: torch.Tensor | None,
                   proj_bias: torch.Tensor | None, logit_scale: torch.Tensor | None, *,
                   window_size: list[int], num_heads: int, shift_size: list[int], channels: int) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` in eval mode, written so that fx traces it (the expansion)."""
    windows = swin_windows(x, window_size, shift_size)
    if logit_scale is not None and qkv_bias is not None:  # Swin V2: no key bias
        length = qkv_bias.shape[0] // 3
        qkv_bias = torch.cat([qkv_bias[:length], qkv_bias[length:2 * length] * 0, qkv_bias[2 * length:]])
    qkv = torch.nn.functional.linear(windows, qkv_weight, qkv_bias)
    n, area = windows.size(0), windows.size(1)
    qkv = qkv.reshape(n, area, 3, num_heads, channels // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # cosine attention
        attn = (q * inverse_norm(q)) @ (k * inverse_norm(k)).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (channels // num_heads) ** -0.5) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    attn = attn + swin_shift_mask(x.size(0), x.size(1), x.size(2), window_size, shift_size, relative_position_bias)
    attn = torch.softmax(attn, -1)
    out = (attn @ v).transpose(1, 2).reshape(n, area, channels)
    out = torch.nn.functional.linear(out, proj_weight, proj_bias)
    return swin_unwindows(out, window_size, shift_size, x.size(1), x.size(2))


#: functions the expansions call that fx keeps as single calls (their control flow runs on real sizes)
WRAPPED = (swin_windows, swin_unwindows, swin_shift_mask, inverse_norm)
for _fn in WRAPPED:
    torch.fx.wrap(_fn.__name__)

__all__ = ["WRAPPED", "inverse_norm", "mha_mask", "sdpa_mask", "swin_attention", "swin_shift_mask", "swin_unwindows",
           "swin_windows"]
