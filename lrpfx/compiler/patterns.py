"""Op kinds and patterns: what a rule binding can name.

Type groups follow zennit's ``types.py``: a subclass of ``nn.Conv2d`` is a conv.
Every canonical fx node gets one *kind*; a single-op pattern names kinds (``conv``),
or kinds plus a graph condition (``first_layer``: a conv/linear with no conv/linear
upstream). Whole-block patterns are small dataflow graphs (see :mod:`lrpfx.compiler.blocks`).
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lrpfx.compiler.blocks import BLOCK_PATTERNS
from lrpfx.compiler.optable import table_kind
from lrpfx.errors import RegistryError, RuleSetError

CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_TYPES: tuple[type, ...] = (nn.Linear,)
#: every BatchNorm (1d/2d/3d, SyncBatchNorm, and the module made from an ``F.batch_norm`` call)
BATCHNORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)
MAXPOOL_TYPES: tuple[type, ...] = (nn.MaxPool2d,)
ADAPTIVE_MAXPOOL_TYPES: tuple[type, ...] = (nn.AdaptiveMaxPool2d,)
AVGPOOL_TYPES: tuple[type, ...] = (nn.AvgPool2d,)
ADAPTIVE_AVGPOOL_TYPES: tuple[type, ...] = (nn.AdaptiveAvgPool2d,)

_MODULE_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    (CONV_TYPES, "conv"), (LINEAR_TYPES, "linear"), (BATCHNORM_TYPES, "batchnorm"),
    (MAXPOOL_TYPES + ADAPTIVE_MAXPOOL_TYPES, "maxpool"), (AVGPOOL_TYPES, "avgpool"),
    (ADAPTIVE_AVGPOOL_TYPES, "adaptive_avgpool"),
)
_FUNCTION_KINDS: dict[Callable, str] = {
    torch.relu: "relu", F.hardtanh: "hardtanh", operator.add: "add", torch.cat: "cat",
    torch.flatten: "reshape", torch.reshape: "reshape", torch.squeeze: "reshape", torch.unsqueeze: "reshape",
    F.adaptive_avg_pool2d: "adaptive_avgpool",
}
#: canonical gate functions (a gate takes values in [0, 1]); see :func:`gate_operands`
GATE_FUNCTIONS: frozenset[Callable] = frozenset({torch.sigmoid, F.hardsigmoid})
#: ops that only move a gate's values around between the gate function and the product
_GATE_PLUMBING_FUNCTIONS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze}
_GATE_PLUMBING_METHODS = {"expand", "expand_as", "view", "reshape", "squeeze", "unsqueeze", "flatten"}
#: nodes that compute shapes, not tensors: they never carry relevance
_SHAPE_METHODS = {"size", "dim", "numel"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}


def op_kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The kind of a canonical node, ``"shape"`` for shape arithmetic, ``None`` if unknown."""
    m = gm.get_submodule(node.target) if node.op == "call_module" else None
    if m is not None:
        kind = next((kind for types, kind in _MODULE_KINDS if isinstance(m, types)), None)
        return kind if kind is not None else table_kind(node, m)
    if node.op == "call_function" and node.target in _FUNCTION_KINDS:
        return _FUNCTION_KINDS[node.target]
    if node.op == "call_function" and node.target is operator.mul and gate_operands(node) is not None:
        return "gate"
    if is_shape(node):
        return "shape"
    return table_kind(node, None)


def is_shape(node: fx.Node) -> bool:
    """Whether ``node`` computes a shape (``x.shape``, ``x.size(1)``, ``x.ndim == 4``), not a tensor."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS:
        return True
    tensor_args = [a for a in node.all_input_nodes]
    return (node.op == "call_function" and bool(tensor_args)
            and node.target in (operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub,
                                operator.pow, operator.truediv, operator.mod, operator.neg)
            and all(is_shape(a) for a in tensor_args))


def _gate_function(node: object) -> fx.Node | None:
    """The gate function (sigmoid, hard-sigmoid) that ``node`` is a reshaped or expanded view of, or None."""
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target in GATE_FUNCTIONS:
            return node
        plumbing = ((node.op == "call_function" and node.target in _GATE_PLUMBING_FUNCTIONS)
                    or (node.op == "call_method" and node.target in _GATE_PLUMBING_METHODS))
        node = node.args[0] if plumbing and node.args else None
    return None


def gate_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(signal, gate)`` of a gated product ``signal * gate``, or None if ``node`` is not one.

    A product is a gate when exactly one factor is a sigmoid or hard-sigmoid (possibly
    reshaped or expanded), as in squeeze-and-excitation, and that gate is not computed
    from the other factor directly: ``x * sigmoid(x)`` is SiLU, an activation, not a gate.
    """
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    gates = [_gate_function(a) for a in node.args]
    if (gates[0] is None) == (gates[1] is None):
        return None
    i = 0 if gates[1] is not None else 1
    signal, gate = node.args[i], node.args[1 - i]
    if gates[1 - i].args[0] is signal:  # type: ignore[union-attr]
        return None
    return signal, gate  # type: ignore[return-value]


def attention_attrs(node: fx.Node, env: dict[fx.Node, Any]) -> dict[str, Any]:
    """What the attention rules read off a ``softmax`` or ``product`` node: the softmax's ``dim``, or the
    product's function and its arguments as handles of the emitted graph (``env``)."""
    if node.op == "call_function" and node.target in (torch.softmax, F.softmax) or node.op == "call_method":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(dim, int):
            raise RuleSetError(f"node {node.name!r} ({node.format_node()}): a softmax without an explicit integer "
                               "dim. Hint: write softmax(x, dim=-1).")
        return {"dim": dim}
    args = fx.node.map_aggregate(node.args, lambda a: env[a] if isinstance(a, fx.Node) else a)
    return {"fn": node.target, "args": tuple(args)}


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """A short description of the op: the module type, or the function/method name."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


@dataclass(frozen=True)
class Pattern:
    """A single-op pattern: a node of one of ``kinds`` that satisfies ``condition``.

    For a user's own op, give ``module_types`` (a call of a module of these types, e.g. a
    leaf module) or ``functions`` (a call of one of these functions); the op's kind is
    then the pattern's name, and a rule for it lists that name in its ``kinds``.
    """

    name: str
    kinds: frozenset[str] = frozenset()
    condition: Callable[[fx.Node, dict[fx.Node, str]], bool] | None = None
    doc: str = ""
    module_types: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    #: the kind of a matched module call the op table does not know (default: the pattern's name)
    kind: str | None = None

    def matches(self, node: fx.Node, kinds: dict[fx.Node, str], gm: fx.GraphModule | None = None) -> bool:
        """Whether ``node`` (whose kinds are in ``kinds``) is an instance of this pattern."""
        if self.kind_of(node, kinds, gm) is None:
            return False
        return self.condition is None or self.condition(node, kinds)

    def kind_of(self, node: fx.Node, kinds: dict[fx.Node, str], gm: fx.GraphModule | None) -> str | None:
        """The kind the matched node has for its rule, or None if the pattern does not apply."""
        if kinds.get(node) in self.kinds:
            return kinds[node]
        if self.module_types and node.op == "call_module" and gm is not None \
                and isinstance(gm.get_submodule(node.target), self.module_types):
            return kinds.get(node) or self.kind or self.name
        if self.functions and node.op == "call_function" and node.target in self.functions:
            return self.name
        return None


def _no_linear_upstream(node: fx.Node, kinds: dict[fx.Node, str]) -> bool:
    """True where no conv/linear lies between the model input and ``node``."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if kinds.get(n) in ("conv", "linear"):
            return False
        stack.extend(n.all_input_nodes)
    return True


_PATTERNS: dict[str, Pattern] = {}


def known_pattern(name: str) -> bool:
    """Whether ``name`` is a registered single-op or block pattern."""
    return get_pattern(name) is not None or name in BLOCK_PATTERNS


def register_pattern(pattern: Pattern) -> Pattern:
    """Register a single-op pattern; a name registered twice is an error."""
    if pattern.name in _PATTERNS:
        raise RegistryError(f"a pattern named {pattern.name!r} is already registered. Hint: choose another name.")
    _PATTERNS[pattern.name] = pattern
    return pattern


def get_pattern(name: str) -> Pattern | None:
    """The registered single-op pattern ``name``, or None."""
    return _PATTERNS.get(name)


def registered_patterns() -> dict[str, Pattern]:
    """A copy of the single-op pattern registry."""
    return dict(_PATTERNS)


for _p in (
    Pattern("first_layer", frozenset({"conv", "linear"}), _no_linear_upstream,
            "a conv or linear layer with no conv/linear between it and the input"),
    Pattern("conv", frozenset({"conv"}), doc="Conv1d/2d/3d (after BatchNorm folding)"),
    Pattern("linear", frozenset({"linear"}), doc="Linear"),
    Pattern("batchnorm", frozenset({"batchnorm"}), doc="a BatchNorm that could not be folded"),
    Pattern("relu", frozenset({"relu"}), doc="ReLU in any spelling"),
    Pattern("hardtanh", frozenset({"hardtanh"}), doc="ReLU6, Hardtanh and clamp(x, lo, hi) with lo <= 0 <= hi: "
            "piecewise linear through 0"),
    Pattern("gate", frozenset({"gate"}), doc="a gated product x * sigmoid(...) (squeeze-and-excitation)"),
    Pattern("concat", frozenset({"cat"}), doc="torch.cat and its spellings"),
    Pattern("maxpool", frozenset({"maxpool"}), doc="MaxPool2d, AdaptiveMaxPool2d"),
    Pattern("avgpool", frozenset({"avgpool", "adaptive_avgpool"}), doc="AvgPool2d, AdaptiveAvgPool2d, spatial mean"),
    Pattern("add", frozenset({"add"}), doc="a sum of two tensors (residual add)"),
    Pattern("reshape", frozenset({"reshape"}), doc="flatten, view, reshape"),
    Pattern("routing", frozenset({"routing"}), doc="ops that move, copy or drop elements (slice, pad, permute, "
            "expand, stack, roll, split items, nearest upsampling, ...): their exact adjoint"),
    Pattern("linear_op", frozenset({"linear_op"}), doc="linear ops in one tensor: mul/div by a constant or a held "
            "factor, sum, mean, matmul with a constant or held operand, bilinear interpolation"),
    Pattern("elementwise", frozenset({"elementwise"}), doc="elementwise activations other than ReLU (GELU, SiLU, "
            "Hardswish, ...)"),
    Pattern("norm", frozenset({"norm"}), doc="LayerNorm, GroupNorm, InstanceNorm, RMSNorm (std held constant)"),
    Pattern("softmax", frozenset({"softmax"}), doc="a softmax that takes relevance: binding this pattern makes the "
            "rule set explain through softmax (AttnLRP); a rule set without it holds softmax outputs (CP-LRP)"),
    Pattern("product", frozenset({"product"}), doc="a product of two input-dependent values: a * b, a @ b, einsum "
            "(attention's q @ k^T and probabilities @ v when the softmax is not held)"),
):
    register_pattern(_p)
