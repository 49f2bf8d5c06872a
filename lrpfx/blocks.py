"""Whole-block patterns (residual blocks) as small dataflow graphs, matched with networkx.

Filled in by the block-rule work (issue 3); until then no block pattern is registered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

BLOCK_PATTERNS: dict[str, object] = {}


@dataclass(frozen=True)
class BlockMatch:
    """One matched block: its pattern, its nodes in graph order, and its input node."""

    pattern: str
    nodes: tuple[fx.Node, ...]
    input: fx.Node


def find_blocks(gm: fx.GraphModule, kinds: dict[fx.Node, str], path: set[fx.Node],
                names: list[str]) -> tuple[list[BlockMatch], list[str]]:
    """Disjoint matches of the named block patterns, and a note per near miss."""
    return [], []
