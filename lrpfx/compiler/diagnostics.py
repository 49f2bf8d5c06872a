"""Diagnostics of a compiled explainer, on request, without recompiling it: conservation per block
(:func:`block_leaks`) and the smallest input it takes (:func:`minimum_input_size`)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def block_leaks(explainer: fx.GraphModule, x: torch.Tensor, target: Any = None) -> dict[str, torch.Tensor]:
    """The leak of every whole-block rule application: lambda = 1 - sum R_x / sum R_O, per sample.

    Keys are the blocks' output nodes (e.g. ``layer1_0_relu_2``); values have shape (N,).
    A positive leak means the block absorbed relevance, a negative one that it added some.
    Runs the explainer once through an fx Interpreter (slower than a plain call).
    """
    shares = {n.name: n.meta["lrpfx"] for n in explainer.graph.nodes
              if n.meta.get("lrpfx", {}).get("block") and "share_of" in n.meta["lrpfx"]}
    if not shares:
        return {}
    names = set(shares) | {m["rel_out"] for m in shares.values()}
    rec = _Recorder(explainer, names)
    with torch.no_grad():
        rec.run(x, target)
    out = {}
    for name, meta in shares.items():
        r_in, r_out = rec.values[name], rec.values[meta["rel_out"]]
        out[meta["source"]] = 1 - r_in.flatten(1).sum(1) / r_out.flatten(1).sum(1)
    return out


def minimum_input_size(explainer: torch.nn.Module, example_input: torch.Tensor) -> int:
    """The smallest square side (<= the example's) at which the explainer runs, by bisection.

    One random image per try, in eager mode; a network whose feature maps would shrink to
    nothing (e.g. a VGG below 32 x 32) fails below its minimum with a shape error deep inside
    a pooling or a convolution, which this turns into a number to name. Calls ``forward``
    directly (no hooks, no fx error printout per failed try).
    """
    channels, hi = example_input.shape[1], int(min(example_input.shape[-2:]))
    g = torch.Generator().manual_seed(0)

    def runs(side: int) -> bool:
        x = torch.randn(1, channels, side, side, generator=g, dtype=example_input.dtype).to(example_input.device)
        try:
            with torch.inference_mode():
                explainer.forward(x)
        except (RuntimeError, ValueError, IndexError):
            return False
        return True

    if runs(1):
        return 1
    lo = 1  # fails at lo, and (the caller checked the example) runs at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if runs(mid) else (mid, hi)
    return hi


def smallest_side(explainer: torch.nn.Module, x: torch.Tensor) -> int | None:
    """The explainer's minimum square input side for inputs like ``x`` (N, C, H, W), or None when
    it fails at a generous size too (8 times the input's larger side, at least 256): then the
    failure is not a matter of size. Probes with the bare ``forward``."""
    if x.dim() != 4:
        return None
    side = max(int(max(x.shape[2:])), 32) * 8
    probe = x.new_zeros(1, x.shape[1], side, side)
    try:
        with torch.inference_mode():
            explainer.forward(probe)
    except (RuntimeError, IndexError, ValueError):
        return None
    return minimum_input_size(explainer, probe)
