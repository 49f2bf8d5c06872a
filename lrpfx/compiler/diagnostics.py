"""Conservation diagnostics of a compiled explainer, on request, without recompiling it."""
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
