"""Stage 3: bind a rule to every node on the relevance path; the result is a :class:`Plan`.

The relevance path is every tensor-valued node that depends on the model input and
feeds the output. Bindings are tried in the rule set's order (user bindings first);
the first whose pattern matches a node wins. Whole-block patterns (``bottleneck``,
``basic_block``) are matched first, longest first, as disjoint subgraphs.
Nodes nothing matched are reported, never skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from lrpfx.compiler import blocks
from lrpfx.errors import RuleSetError, TraceError
from lrpfx.compiler.optable import is_softmax
from lrpfx.compiler.patterns import describe, gate_operands, get_pattern, op_kind
from lrpfx.compiler.trace import describe_output, output_structure
from lrpfx.relevance.rules import Rule
from lrpfx.relevance.ruleset import RuleSet


@dataclass
class Assignment:
    """A rule bound to one node (single-op pattern) or to a whole block."""

    pattern: str
    rule: Rule
    nodes: tuple[fx.Node, ...]
    block: blocks.BlockMatch | None = None

    @property
    def anchor(self) -> fx.Node:
        """The node whose output relevance the rule consumes (the last node)."""
        return self.nodes[-1]


@dataclass
class Plan:
    """Which rule each node of the canonical graph got, and which nodes nothing matched."""

    gm: fx.GraphModule
    ruleset: RuleSet
    input: fx.Node
    output: fx.Node
    kinds: dict[fx.Node, str]
    path: list[fx.Node]
    assignments: dict[fx.Node, Assignment] = field(default_factory=dict)
    unmatched: list[fx.Node] = field(default_factory=list)
    near_misses: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(node, op, pattern, rule) for every node on the relevance path, in graph order."""
        out = []
        for n in self.path:
            if n.op == "placeholder":
                continue
            a = self.assignments.get(n)
            pattern = "-" if a is None else (a.pattern if a.anchor is n or a.block is None else f"({a.pattern})")
            rule = "UNMATCHED" if a is None else (str(a.rule) if a.anchor is n else f"in {a.anchor.name}")
            out.append((n.name, describe(n, self.gm), pattern, rule))
        return out

    def ratio_form(self) -> bool:
        """Whether every op's rule has an exact ratio form (LRP-0 and routings, no block rule).

        Then the explainer propagates c = R / value instead of R (docs/pipeline.md): each
        LRP-0 layer is its transposed layer alone and each ReLU a mask, and the input
        relevance is x * c at the end. It is LRP-0 exactly wherever a value is non-zero; where
        a hidden pre-activation is exactly 0, LRP-0's 0/0 takes the gradient's value, so on
        ReLU networks the result is Input x Gradient even there (an exactly-zero target logit
        still gives 0, as LRP-0 does).
        """
        for n in self.path:
            if n.op == "placeholder":
                continue
            a = self.assignments.get(n)
            if a is None or a.block is not None or self.kinds.get(n) not in a.rule.ratio_kinds():
                return False
        return True

    def __str__(self) -> str:
        rows = [("node", "op", "pattern", "rule")] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"Plan for rule set {self.ruleset.name!r} (top={self.ruleset.top})"]
        lines += ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        if self.unmatched:
            lines.append(f"unmatched: {', '.join(n.name for n in self.unmatched)}")
        lines += [f"near miss: {m}" for m in self.near_misses]
        if not self.unmatched and self.ratio_form():
            lines.append("emitted in ratio form: c = R / value is propagated (one transposed layer and one "
                         "ReLU mask per layer), R = x * c at the input")
        return "\n".join(lines)

    __repr__ = __str__


def relevance_inputs(node: fx.Node, kind: str | None, path: set[fx.Node]) -> list[fx.Node]:
    """The inputs of ``node`` that take relevance: tensor inputs on the relevance path.

    A sum gives relevance to both terms, a concatenation to each part, a gated product to
    its signal only (the gate takes none). An op of unknown kind is assumed to pass relevance
    to all its tensor inputs, so that everything upstream of it is reported too.
    """
    if kind == "add":
        args = list(node.args[:2])
    elif kind == "cat":
        args = list(node.args[0]) if isinstance(node.args[0], (list, tuple)) else []
    elif kind == "gate":
        operands = gate_operands(node)
        args = [operands[0]] if operands is not None else []
    elif kind is None or kind in ("routing", "linear_op", "product"):
        return [a for a in node.all_input_nodes if a in path]
    else:
        args = list(node.args[:1])
    return [a for a in args if isinstance(a, fx.Node) and a in path]


def _relevance_path(gm: fx.GraphModule, kinds: dict[fx.Node, str]) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """(input, output, path): the nodes that receive relevance, walking back from the output.

    A node is on the path when it depends on the input and relevance reaches it through
    :func:`relevance_inputs`; a squeeze-and-excitation gate's branch is not on it.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TraceError(f"lrpfx explains models with one tensor input; this forward takes "
                         f"{[p.name for p in placeholders]}. Hint: wrap the model so that forward(x) takes one tensor.")
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    result = out_node.args[0]
    if not isinstance(result, fx.Node):
        raise TraceError(
            f"the model returns {output_structure(result)} ({describe_output(result, gm)}); lrpfx explains a model "
            "that returns one tensor of class scores. Hint: wrap it so that it returns the class scores, or select "
            "them with lrpfx.compile(model, output=<index or key>).")
    depends = _depends_on_input(gm, kinds)
    feeds: set[fx.Node] = set()
    stack = [result]
    while stack:
        n = stack.pop()
        if n in feeds or n not in depends:
            continue
        feeds.add(n)
        stack.extend(relevance_inputs(n, kinds.get(n), depends))
    return placeholders[0], result, [n for n in gm.graph.nodes if n in feeds]


#: kinds through which a held value stays held (a reshaped or scaled softmax is still held)
_HELD_THROUGH = frozenset({"routing", "reshape", "linear_op", "elementwise", "cat", "add", "held"})


def _depends_on_input(gm: fx.GraphModule, kinds: dict[fx.Node, str]) -> set[fx.Node]:
    """The nodes whose *value* depends on the input, excluding held values.

    Shape arithmetic depends on the input's shape only. A held value (a softmax, and what only
    reshapes, scales or routes held values) is a constant under the rule (CP-LRP): its kind
    becomes ``held`` in ``kinds`` and it takes no relevance. A linear op on two input-dependent,
    non-held values is a product of two activations: its kind becomes ``product``.
    """
    depends: set[fx.Node] = set()
    held: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            depends.add(n)
            continue
        live = [a for a in n.all_input_nodes if a in depends or a in held]
        kind = kinds.get(n)
        if not live or kind == "shape":
            continue
        if kind == "held" or (kind in _HELD_THROUGH and all(a in held for a in live)):
            held.add(n)
            kinds[n] = "held"
            continue
        operands = [*n.args, *n.kwargs.values()]
        if kind == "linear_op" and sum(isinstance(a, fx.Node) and a in depends for a in operands) > 1:
            kinds[n] = "product"
        depends.add(n)
    return depends


def plan(gm: fx.GraphModule, ruleset: RuleSet) -> Plan:
    """Bind rules to the nodes of a canonical graph."""
    kinds = {n: k for n in gm.graph.nodes if (k := op_kind(n, gm)) is not None}
    if any(b.pattern == "softmax" for b in ruleset.bindings):
        _release_softmax(gm, kinds)
    inp, result, path = _relevance_path(gm, kinds)
    p = Plan(gm, ruleset, inp, result, kinds, path)
    _bind_blocks(p)
    for node in path:
        if node.op == "placeholder" or node in p.assignments:
            continue
        for b in ruleset.bindings:
            pattern = get_pattern(b.pattern)
            if pattern is not None and pattern.matches(node, kinds, gm):
                kind = pattern.kind_of(node, kinds, gm)
                assert kind is not None
                _check_applies(b.rule, kind, node, b.pattern)
                kinds[node] = kind
                p.assignments[node] = Assignment(b.pattern, b.rule, (node,))
                break
        else:
            p.unmatched.append(node)
    return p


def _release_softmax(gm: fx.GraphModule, kinds: dict[fx.Node, str]) -> None:
    """Softmax nodes take relevance (kind ``softmax``) instead of being held: the rule set binds the
    ``softmax`` pattern (AttnLRP). The products with their outputs then become ``product`` nodes."""
    for n in gm.graph.nodes:
        if kinds.get(n) == "held" and is_softmax(n, gm.get_submodule(n.target) if n.op == "call_module" else None):
            kinds[n] = "softmax"


def _bind_blocks(p: Plan) -> None:
    """Bind block rules: for each block binding, in order, its disjoint matches."""
    wanted = [b for b in p.ruleset.bindings if b.pattern in blocks.BLOCK_PATTERNS]
    if not wanted:
        return
    found, misses = blocks.find_blocks(p.gm, p.kinds, set(p.path), [b.pattern for b in wanted])
    p.near_misses.extend(misses)
    for match in found:
        binding = next(b for b in wanted if b.pattern == match.pattern)
        for n in match.nodes:
            p.assignments[n] = Assignment(binding.pattern, binding.rule, match.nodes, match)


def _check_applies(rule: Rule, kind: str, node: fx.Node, pattern: str) -> None:
    if kind not in rule.kinds:
        raise RuleSetError(f"binding {pattern!r} -> {rule} matched node {node.name!r} of kind {kind!r}, but "
                           f"rule {rule.name!r} applies to {sorted(rule.kinds)}. Hint: bind another rule to "
                           f"{pattern!r}.")
