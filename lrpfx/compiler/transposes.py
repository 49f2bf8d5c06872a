"""The transpose ``A^T`` of each op-table op, as a deferred call on the generated graph.

For a node of class ``routing``, ``linear_op`` or ``norm``, :func:`transpose_of` returns a function
``s -> Call`` (``routing``: ``s -> tuple of Calls``, one per input that takes relevance) that the
rules compose with their own steps: LRP-0/epsilon is ``a * A^T (R / stabilize(z))``, the ratio
form is ``A^T c``, a routing op's rule is ``A^T R``. The tensor math is in
:mod:`lrpfx.relevance.adjoints`.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lrpfx.errors import UnmatchedNodeError
from lrpfx.relevance import adjoints
from lrpfx.relevance.rules import Call

Transpose = Callable[[Any], Any]
#: identities on values (dtype and memory-layout changes): the relevance is cast back, not routed
_IDENTITY_METHODS = {"contiguous", "clone", "to", "float", "double", "half", "bfloat16", "type_as"}
_LIST_ROUTING = {torch.cat, torch.stack}
_REPLAY: dict[Any, Callable[..., Any]] = {F.pixel_shuffle: adjoints.pixel_shuffle, F.pixel_unshuffle: adjoints.pixel_unshuffle,
                                          torch.channel_shuffle: adjoints.channel_shuffle}


def transpose_of(node: fx.Node, inputs: list[fx.Node], env: dict[fx.Node, Any], gm: fx.GraphModule,
                 kind: str, param: Callable[[fx.Node, str], Any]) -> Transpose:
    """The transpose of ``node`` (whose relevance-taking inputs are ``inputs``), on emitted handles.

    ``param(node, name)`` gives the handle of a parameter of the module ``node`` calls.
    """
    if kind == "routing":
        return _routing(node, inputs, env)
    if kind == "norm":
        return _norm(node, inputs, env, gm, param)
    return _linear(node, inputs, env)


# --------------------------------------------------------------------------- routing
def _routing(node: fx.Node, inputs: list[fx.Node], env: dict[fx.Node, Any]) -> Transpose:
    if node.op == "call_method" and node.target in _IDENTITY_METHODS or (
            node.op == "call_function" and node.target is torch.clone):
        return lambda rel: (Call(adjoints.cast_like, (rel, env[inputs[0]])),)
    if node.op == "call_function" and node.target is F.interpolate:  # nearest: one map for all channels
        return _interpolate_nearest(node, inputs, env)
    dims = _static_permutation(node)
    if dims is not None:  # a bijection: the inverse permutation, no index replay
        return lambda rel: (Call(adjoints.permute_back, (rel,), {"dims": dims}),)

    def transpose(rel: Any) -> tuple[Call, ...]:
        index = {p: Call(adjoints.source_index, (env[p], *[env[q] for q in inputs[:i]]))
                 for i, p in enumerate(inputs)}

        def sub(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return index.get(a, env[a])
            return a

        args = list(fx.node.map_aggregate(node.args, sub))
        kwargs = dict(fx.node.map_aggregate(node.kwargs, sub))
        if node.op == "call_function" and node.target in _LIST_ROUTING:  # constants in the list: no source
            args[0] = [a if isinstance(a, Call) else Call(adjoints.no_source, (a,))
                       for a in args[0]]
        if node.op == "call_function" and node.target is F.pad:
            kwargs["value"] = 0.0  # the pad value is a constant: its positions have no source
            if len(args) > 3:
                args[3] = 0.0
        if node.op == "call_method":
            replay = Call(adjoints.call_method, (args[0], node.target, *args[1:]), kwargs)
        else:  # ops whose kernels some runtimes lack for integers are replayed as reshapes and permutes
            fn = _REPLAY.get(node.target, node.target)  # type: ignore[arg-type]
            replay = Call(fn, tuple(args), kwargs)
        parts = Call(adjoints.route_back, (rel, replay, *[env[p] for p in inputs]))
        return tuple(Call(operator.getitem, (parts, i)) for i in range(len(inputs)))
    return transpose


def _static_permutation(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of ``x.permute(...)`` / ``torch.permute(x, dims)`` when they are literals, else None."""
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        dims = node.kwargs.get("dims", dims)
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    else:
        return None
    if not isinstance(dims, (list, tuple)) or not dims or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(dims)


def _interpolate_nearest(node: fx.Node, inputs: list[fx.Node], env: dict[fx.Node, Any]) -> Transpose:
    (a,) = inputs
    args = list(fx.node.map_aggregate(node.args, lambda v: env[v] if isinstance(v, fx.Node) else v))
    kwargs = dict(fx.node.map_aggregate(node.kwargs, lambda v: env[v] if isinstance(v, fx.Node) else v))

    def transpose(rel: Any) -> tuple[Call, ...]:
        replay = Call(F.interpolate, (Call(adjoints.spatial_index, (env[a],)), *args[1:]), kwargs)
        return (Call(adjoints.route_back_spatial, (rel, replay, env[a])),)
    return transpose


# --------------------------------------------------------------------------- linear ops in one tensor
def _bound(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    bound = dict(zip(names, node.args))
    bound.update({k: v for k, v in node.kwargs.items() if k in names})
    return bound


def _linear(node: fx.Node, inputs: list[fx.Node], env: dict[fx.Node, Any]) -> Transpose:
    (a,) = inputs
    ea = env[a]
    target = node.target

    def value(v: Any) -> Any:
        return env[v] if isinstance(v, fx.Node) else v

    if target in (operator.mul, torch.mul):
        factor = value(node.args[1] if node.args[0] is a else node.args[0])
        return lambda s: Call(adjoints.times, (s, ea, factor))
    if target is operator.truediv and node.args[0] is a:
        divisor = value(node.args[1])
        return lambda s: Call(adjoints.divided, (s, ea, divisor))
    if target is torch.matmul:
        if node.args[0] is a:
            other = value(node.args[1])
            return lambda s: Call(adjoints.matmul_right, (s, ea, other))
        other = value(node.args[0])
        return lambda s: Call(adjoints.matmul_left, (s, ea, other))
    if target is torch.einsum:
        equation, *operands = node.args
        k = operands.index(a)
        others = [value(o) for o in operands]
        return lambda s: Call(adjoints.einsum_operand, (s, equation, k, *others))
    if target in (torch.mean, torch.sum):
        b = _bound(node, ("input", "dim", "keepdim"))
        dim, keepdim = b.get("dim"), bool(b.get("keepdim", False))
        mean = target is torch.mean
        return lambda s: Call(adjoints.reduced, (s, ea, dim, keepdim), {"mean": mean})
    if target is F.interpolate:
        b = _bound(node, ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                          "antialias"))
        kw = {k: value(v) for k, v in b.items() if k != "input"}
        return lambda s: Call(adjoints.interpolate_linear, (s, ea), kw)
    raise UnmatchedNodeError(
        f"node {node.name!r} ({node.format_node()}): the op table lists it as linear in one tensor, but "
        f"{getattr(target, '__name__', target)!r} with the input-dependent operand {a.name!r} in this position is "
        "not linear in it (e.g. a constant divided by an activation). Hint: rewrite the expression, or mark the "
        "module that contains it as a leaf (leaf_modules=[...]) and bind a rule to it.", [node.name])


# --------------------------------------------------------------------------- normalizations
def _norm(node: fx.Node, inputs: list[fx.Node], env: dict[fx.Node, Any], gm: fx.GraphModule,
          param: Callable[[fx.Node, str], Any]) -> Transpose:
    m = gm.get_submodule(node.target)  # canonicalization made every normalization a module call
    ea = env[inputs[0]]
    weight = param(node, "weight")
    if isinstance(m, nn.GroupNorm):
        kw: dict[str, Any] = {"groups": m.num_groups, "eps": float(m.eps)}
        return lambda s: Call(adjoints.group_norm, (s, ea, weight), kw)
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        if m.track_running_stats:
            raise UnmatchedNodeError(
                f"node {node.name!r} ({type(m).__name__}): an InstanceNorm with running statistics is an affine "
                "map like BatchNorm, not a normalization of its input; lrpfx does not bind it. Hint: build it "
                "with track_running_stats=False, or use BatchNorm.", [node.name])
        kw = {"groups": m.num_features, "eps": float(m.eps)}
        return lambda s: Call(adjoints.group_norm, (s, ea, weight), kw)
    if isinstance(m, nn.RMSNorm):
        kw = {"ndim": len(m.normalized_shape), "eps": m.eps, "centered": False}
        return lambda s: Call(adjoints.layer_norm, (s, ea, weight), kw)
    kw = {"ndim": len(m.normalized_shape), "eps": float(m.eps)}
    return lambda s: Call(adjoints.layer_norm, (s, ea, weight), kw)
