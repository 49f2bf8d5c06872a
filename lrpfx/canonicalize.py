"""Stage 2: graph passes that give every op one spelling and fold BatchNorm.

After these passes the matcher sees: ``operator.add`` for every residual sum,
``torch.relu`` for every ReLU (never in place), ``torch.flatten``/``torch.reshape``
for every reshape, ``F.adaptive_avg_pool2d`` for spatial means, no Dropout/Identity,
and no BatchNorm that directly follows a single-use conv/linear.
Each pass is small, rewrites the graph in place, and states its postcondition.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lrpfx.patterns import BATCHNORM_TYPES, CONV_TYPES, LINEAR_TYPES

DROP_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
DROP_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout}
RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
RESHAPE_METHODS = {"view", "reshape"}


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _replace(gm: fx.GraphModule, node: fx.Node, target: Callable, args: tuple, kwargs: dict | None = None) -> None:
    """Replace ``node`` by a call_function node, keeping its name and users."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args, kwargs or {})
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    new.name = node.name  # fx frees the name on erase; keep the trace's names readable


def _attr(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    return gm.get_parameter(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def functional_layers_to_modules(gm: fx.GraphModule) -> None:
    """``F.linear(x, w, b)`` / ``F.conv2d(x, w, b, ...)`` on parameters -> a Linear/Conv2d module call.

    The new module shares the parameters, so folding and rule binding see one kind of layer.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (F.linear, F.conv2d, torch.conv2d):
            continue
        args = list(node.args) + [None] * (7 - len(node.args))
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        bound = {k: node.kwargs.get(k, v) for k, v in zip(names, args)}
        weight, bias = _attr(gm, bound["weight"]), _attr(gm, bound["bias"])
        if weight is None or (bound["bias"] is not None and bias is None):
            continue  # computed weights: not a layer
        if node.target is F.linear:
            layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            geo = {k: bound[k] for k in ("stride", "padding", "dilation") if bound[k] is not None}
            layer = nn.Conv2d(weight.shape[1] * (bound["groups"] or 1), weight.shape[0], tuple(weight.shape[2:]),
                              groups=bound["groups"] or 1, bias=bias is not None, **geo)
        layer.weight, layer.bias = weight, bias
        name = f"{node.name}_layer"
        gm.add_submodule(name, layer)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (bound["input"],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def drop_dropout_identity(gm: fx.GraphModule) -> None:
    """Remove Dropout and Identity (modules and functions): identities in eval mode."""
    for node in list(gm.graph.nodes):
        m = _module(gm, node)
        if isinstance(m, DROP_MODULES) or (node.op == "call_function" and node.target in DROP_FUNCTIONS):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    assert not any(isinstance(_module(gm, n), DROP_MODULES) for n in gm.graph.nodes)


def unify_relu(gm: fx.GraphModule) -> None:
    """``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()`` and in-place forms -> ``torch.relu(x)``.

    In-place forms become out-of-place: the relevance pass needs the pre-activation.
    """
    for node in list(gm.graph.nodes):
        is_relu = (isinstance(_module(gm, node), nn.ReLU)
                   or (node.op == "call_function" and node.target in RELU_FUNCTIONS)
                   or (node.op == "call_method" and node.target in ("relu", "relu_")))
        if is_relu:
            _replace(gm, node, torch.relu, (node.args[0],))


def unify_add(gm: fx.GraphModule) -> None:
    """``a + b``, ``a += b``, ``torch.add(a, b)``, ``a.add(b)``, ``a.add_(b)`` -> ``operator.add(a, b)``."""
    for node in list(gm.graph.nodes):
        is_add = ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
                  or (node.op == "call_method" and node.target in ADD_METHODS))
        if is_add and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args):
            _replace(gm, node, operator.add, tuple(node.args))


def unify_reshape(gm: fx.GraphModule) -> None:
    """``nn.Flatten``, ``x.flatten()``, ``x.view()``, ``x.reshape()`` -> ``torch.flatten``/``torch.reshape``."""
    for node in list(gm.graph.nodes):
        m = _module(gm, node)
        if isinstance(m, nn.Flatten):
            _replace(gm, node, torch.flatten, (node.args[0], m.start_dim, m.end_dim))
        elif node.op == "call_method" and node.target == "flatten":
            _replace(gm, node, torch.flatten, tuple(node.args), dict(node.kwargs))
        elif node.op == "call_method" and node.target in RESHAPE_METHODS:
            shape = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]
            _replace(gm, node, torch.reshape, (node.args[0], tuple(shape)))


def _spatial_mean_dims(node: fx.Node) -> tuple[bool, bool] | None:
    """(is a mean over the last two dims of a 4-D tensor, keepdim), or None."""
    is_mean = (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean)
    if not is_mean:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if isinstance(dim, (tuple, list)) and sorted(d % 4 for d in dim) == [2, 3]:
        return True, bool(keepdim)
    return None


def spatial_mean_to_pool(gm: fx.GraphModule) -> None:
    """``x.mean((2, 3))`` -> ``adaptive_avg_pool2d(x, 1)`` (then flatten unless keepdim)."""
    for node in list(gm.graph.nodes):
        found = _spatial_mean_dims(node)
        if found is None:
            continue
        with gm.graph.inserting_before(node):
            pooled = gm.graph.call_function(F.adaptive_avg_pool2d, (node.args[0], 1))
            out = pooled if found[1] else gm.graph.call_function(torch.flatten, (pooled, 1))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)


def fold_batchnorm(gm: fx.GraphModule) -> None:
    """Fold each eval BatchNorm into the conv/linear that feeds it (METHOD_SPEC §1.3).

    Folded only where the conv's output has no other user and the conv module is called once;
    any other BatchNorm stays and gets its own (elementwise affine) rule.
    """
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, BATCHNORM_TYPES) or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        layer = _module(gm, src)
        if not isinstance(layer, CONV_TYPES + LINEAR_TYPES) or len(src.users) != 1 or calls[src.target] != 1:
            continue
        if bn.running_mean is None or bn.running_var is None:
            continue
        gm.add_submodule(src.target, fold(layer, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)


def fold(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` with eval BatchNorm ``bn`` folded in: W' = s W, b' = (b - mu) s + beta."""
    new = copy.deepcopy(layer)
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
        new.weight.copy_(layer.weight * scale.view(-1, *([1] * (layer.weight.dim() - 1))))
        bias = shift if layer.bias is None else layer.bias * scale + shift
        new.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    return new


PASSES: tuple[Callable[[fx.GraphModule], None], ...] = (
    functional_layers_to_modules, drop_dropout_identity, unify_relu, unify_add, unify_reshape, spatial_mean_to_pool, fold_batchnorm,
)


def canonicalize(gm: fx.GraphModule, fold_batchnorm_: bool = True) -> fx.GraphModule:
    """Run every pass, then dead-code elimination; ``gm`` is rewritten in place and returned.

    ``fold_batchnorm_=False`` keeps every BatchNorm as its own op (a rule set's
    ``options.batchnorm = "pass"``, as the ECCV release treats BatchNorm).
    """
    for p in PASSES:
        if p is fold_batchnorm and not fold_batchnorm_:
            continue
        p(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
