"""Whole-block patterns (residual blocks) as small dataflow graphs, matched with networkx.

A block pattern is data: a main branch (a chain of op kinds from the block input to the
add, optionally ending in a squeeze-and-excitation ``gate``), a skip branch (empty for an
identity shortcut, ``("conv",)`` for a projection, ``("avgpool", "conv")`` for ResNet-D's
average-pool-then-conv shortcut), an ``add`` and a closing ``relu``. Each node has a *role*
(``conv1``, ``relu1``, ..., ``gate``, ``skip_pool``, ``skip_conv``, ``add``, ``out``) so that
block rules can address its values. Matching runs on the canonical graph (BatchNorm
already folded), so torchvision's, timm's and a user's blocks, written with modules or
functions, ``torch.add`` or ``+=``, all look the same.

Conditions of a match (as fx's own ``SubgraphMatcher``): the subgraph is induced (no
extra edges among matched nodes), no interior node has a user outside the match, and
matches are disjoint; longer patterns are tried first.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx as fx
from networkx.algorithms.isomorphism import DiGraphMatcher


_ROLES = {"conv": "conv", "batchnorm": "bn", "relu": "relu"}


@dataclass(frozen=True)
class BlockPattern:
    """A residual block: main-branch kinds, skip-branch kinds, then add and relu."""

    name: str
    main: tuple[str, ...]
    skip: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.main) + len(self.skip) + 2

    def graph(self) -> nx.DiGraph:
        """The pattern as a DiGraph whose nodes carry ``kind`` and ``role``.

        Roles: ``input``; ``conv1``, ``bn1``, ``relu1``, ``conv2``, ..., ``gate`` on the main
        branch; ``skip_pool``, ``skip_conv`` and ``skip_bn`` on a projection shortcut; ``add``; ``out``.
        """
        g = nx.DiGraph()
        g.add_node("input", kind=None, role="input")
        prev, convs = "input", 0
        for kind in self.main:
            convs += kind == "conv"
            role = "gate" if kind == "gate" else _ROLES[kind] + str(convs)
            g.add_node(role, kind=kind, role=role)
            g.add_edge(prev, role)
            prev = role
        g.add_node("add", kind="add", role="add")
        g.add_edge(prev, "add")
        skip_prev = "input"
        for kind in self.skip:
            role = {"avgpool": "skip_pool", "conv": "skip_conv", "batchnorm": "skip_bn"}[kind]
            g.add_node(role, kind=kind, role=role)
            g.add_edge(skip_prev, role)
            skip_prev = role
        g.add_edge(skip_prev, "add")
        g.add_node("out", kind="relu", role="out")
        g.add_edge("add", "out")
        return g


def _with_bn(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The same chain with a BatchNorm after every conv (for rule sets that keep BatchNorm)."""
    return tuple(k for kind in kinds for k in ((kind, "batchnorm") if kind == "conv" else (kind,)))


#: the shortcuts a block may have: a projection, the identity, ResNet-D's average pooling then projection
SHORTCUTS: tuple[tuple[str, ...], ...] = (("conv",), (), ("avgpool", "conv"))


def _variants(name: str, main: tuple[str, ...]) -> tuple[BlockPattern, ...]:
    """Every shortcut, with and without a closing gate, with BatchNorm folded and kept."""
    return tuple(BlockPattern(name, bn(m), bn(skip)) for bn in (lambda k: k, _with_bn)
                 for m in (main, main + ("gate",)) for skip in SHORTCUTS)


#: block name -> its variants (shortcut, gate or not, BatchNorm folded / kept)
BLOCK_PATTERNS: dict[str, tuple[BlockPattern, ...]] = {
    "bottleneck": _variants("bottleneck", ("conv", "relu", "conv", "relu", "conv")),
    "basic_block": _variants("basic_block", ("conv", "relu", "conv")),
}


@dataclass(frozen=True)
class BlockMatch:
    """One matched block: its pattern, its nodes in graph order, input, and role -> node."""

    pattern: str
    nodes: tuple[fx.Node, ...]
    input: fx.Node
    roles: dict[str, fx.Node]

    @property
    def projection(self) -> bool:
        """Whether the shortcut is a projection (a D-block) rather than the identity (an S-block)."""
        return "skip_conv" in self.roles

    @property
    def gated(self) -> bool:
        """Whether the main branch ends in a squeeze-and-excitation gate."""
        return "gate" in self.roles

    def chain(self, prefix: str) -> list[fx.Node]:
        """The nodes whose role starts with ``prefix`` on the main branch, in order (conv1, conv2, ...)."""
        found = sorted((r, n) for r, n in self.roles.items() if r.startswith(prefix) and r[len(prefix):].isdigit())
        return [n for _, n in sorted(found, key=lambda rn: int(rn[0][len(prefix):]))]

    @property
    def main_end(self) -> fx.Node:
        """The value the main branch adds (h_m): bn3 or conv3 output."""
        return next(a for a in self.roles["add"].args if a is not self.skip_end)

    @property
    def skip_end(self) -> fx.Node:
        """The value the shortcut adds (h_s): the block input or the projection's output."""
        return self.roles.get("skip_bn", self.roles.get("skip_conv", self.input))

    def __hash__(self) -> int:
        return hash(self.nodes)


def _dataflow(kinds: dict[fx.Node, str], path: set[fx.Node]) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in path:
        g.add_node(n, kind=kinds.get(n))
    for n in path:
        for u in n.users:
            if u in path:
                g.add_edge(n, u)
    return g


def _node_match(graph_attrs: dict, pattern_attrs: dict) -> bool:
    return pattern_attrs["kind"] is None or graph_attrs["kind"] == pattern_attrs["kind"]


def _contained(mapping: dict[fx.Node, str], path: set[fx.Node]) -> bool:
    """No interior node (all but input and out) has a user outside the match."""
    inside = set(mapping)
    return all(u in inside for n, role in mapping.items() if role not in ("input", "out") for u in n.users
               if u in path)


def _could_match(g: nx.DiGraph, add: fx.Node, pattern: BlockPattern) -> bool:
    """A cheap necessary condition, checked before VF2: a ReLU follows the add, and one of its
    inputs ends a chain whose kinds are the main branch's."""
    if not any(g.nodes[u]["kind"] == "relu" for u in g.successors(add)):
        return False
    for node in g.predecessors(add):
        for kind in reversed(pattern.main):
            if node is None or g.nodes[node]["kind"] != kind:
                break
            preds = list(g.predecessors(node))
            node = preds[0] if len(preds) == 1 else None
        else:
            return True
    return False


def _candidates(g: nx.DiGraph, pattern: BlockPattern) -> list[dict[fx.Node, str]]:
    """All contained matches of ``pattern``, searched around each add node (keeps VF2 local)."""
    pg = _pattern_graph(pattern)
    depth = max(len(pattern.main), len(pattern.skip)) + 1
    out = []
    for add in [n for n, k in g.nodes(data="kind") if k == "add" and _could_match(g, n, pattern)]:
        near = nx.single_source_shortest_path_length(g.reverse(copy=False), add, cutoff=depth)
        local = g.subgraph(set(near) | set(g.successors(add)))
        for m in DiGraphMatcher(local, pg, node_match=_node_match).subgraph_isomorphisms_iter():
            roles = {n: pg.nodes[p]["role"] for n, p in m.items()}
            if roles.get(add) == "add":
                out.append(roles)
    return out


_GRAPHS: dict[BlockPattern, nx.DiGraph] = {}


def _pattern_graph(pattern: BlockPattern) -> nx.DiGraph:
    if pattern not in _GRAPHS:
        _GRAPHS[pattern] = pattern.graph()
    return _GRAPHS[pattern]


def find_blocks(gm: fx.GraphModule, kinds: dict[fx.Node, str], path: set[fx.Node],
                names: list[str]) -> tuple[list[BlockMatch], list[str]]:
    """Disjoint matches of the named block patterns (longest first), and a note per near miss.

    A near miss is a residual add (an add followed by a ReLU) that no requested block
    pattern covers: its nodes fall back to per-op rules, and the note says why.
    """
    g = _dataflow(kinds, path)
    variants = sorted((v for n in dict.fromkeys(names) for v in BLOCK_PATTERNS[n]), key=lambda v: -v.size)
    taken: set[fx.Node] = set()
    found: list[BlockMatch] = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for variant in variants:
        for roles in _candidates(g, variant):
            interior = {n for n, r in roles.items() if r != "input"}
            if interior & taken or not _contained(roles, path):
                continue
            taken |= interior
            by_role = {r: n for n, r in roles.items()}
            nodes = tuple(sorted(interior, key=order.__getitem__))
            found.append(BlockMatch(variant.name, nodes, by_role["input"], by_role))
    found.sort(key=lambda b: order[b.nodes[-1]])
    return found, _near_misses(g, kinds, taken, names)


def _near_misses(g: nx.DiGraph, kinds: dict[fx.Node, str], taken: set[fx.Node], names: list[str]) -> list[str]:
    notes = []
    for n, kind in g.nodes(data="kind"):
        if kind != "add" or n in taken:
            continue
        branches = [" <- ".join(_chain(g, p, kinds)) for p in g.predecessors(n)]
        notes.append(f"{n.name}: a sum not matched as {' or '.join(names)} (its inputs: {'; '.join(branches)}); "
                     "per-op rules apply to it")
    return notes


def _chain(g: nx.DiGraph, node: fx.Node, kinds: dict[fx.Node, str], limit: int = 6) -> list[str]:
    out = []
    while node is not None and len(out) < limit:
        out.append(f"{node.name}[{kinds.get(node) or node.op}]")
        preds = list(g.predecessors(node))
        node = preds[0] if len(preds) == 1 else None
    return out
