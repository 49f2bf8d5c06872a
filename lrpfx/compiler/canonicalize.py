"""Stage 2: graph passes that give every op one spelling and fold BatchNorm.

After these passes the matcher sees: ``operator.add`` for every residual sum,
``torch.relu`` for every ReLU (never in place), ``F.hardtanh`` for ReLU6/Hardtanh/clamp,
``torch.sigmoid``/``F.hardsigmoid`` for gate functions, ``operator.mul`` for products,
``torch.cat`` for concatenations, ``torch.flatten``/``torch.reshape``/``torch.squeeze``/
``torch.unsqueeze`` for every reshape, ``F.adaptive_avg_pool2d`` for spatial means,
modules for functional conv/linear/batch_norm/pooling calls on fixed parameters,
no Dropout/Identity/stochastic depth, and no BatchNorm that directly follows a
single-use conv/linear.
Each pass is small, rewrites the graph in place, and states its postcondition.
"""
from __future__ import annotations

import copy
import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lrpfx.compiler import attention_forms
from lrpfx.compiler.optable import ELEMENTWISE_FUNCTIONS, ELEMENTWISE_MODULES
from lrpfx.compiler.patterns import BATCHNORM_TYPES, CONV_TYPES, LINEAR_TYPES, is_shape
from lrpfx.errors import UnmatchedNodeError
from lrpfx.relevance.adjoints import split_item

DROP_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
DROP_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout}
RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
MUL_FUNCTIONS = {operator.imul, torch.mul}
MUL_METHODS = {"mul", "mul_", "__mul__", "__imul__"}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
RESHAPE_METHODS = {"view", "reshape"}
SIGMOID_FUNCTIONS = {torch.sigmoid, torch.sigmoid_, F.sigmoid}
HARDSIGMOID_FUNCTIONS = {F.hardsigmoid}
CLAMP_FUNCTIONS = {torch.clamp, torch.clip, torch.clamp_, torch.clip_}
CLAMP_METHODS = {"clamp", "clip", "clamp_", "clip_"}


class BatchNormNd(nn.modules.batchnorm._BatchNorm):
    """The module an ``F.batch_norm`` call on fixed statistics becomes (any rank, as the call itself)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _replace(gm: fx.GraphModule, node: fx.Node, target: Callable, args: tuple, kwargs: dict | None = None) -> None:
    """Replace ``node`` by a call_function node, keeping its name and users.

    If ``node`` mutated its first argument in place (``x.relu_()``, ``nn.ReLU(inplace=True)``,
    ``x += y``), the nodes after it that read that argument saw the mutated value: they are
    redirected to the new (out-of-place) node, so the function stays the same.
    """
    mutated = node.args[0] if _mutates_input(gm, node) and isinstance(node.args[0], fx.Node) else None
    later = _later_users(mutated, node) if mutated is not None else []
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args, kwargs or {})
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    for user in later:
        user.replace_input_with(mutated, new)
    gm.graph.erase_node(node)
    new.name = node.name  # fx frees the name on erase; keep the trace's names readable


_INPLACE_OPERATORS = {operator.iadd, operator.imul, operator.isub, operator.itruediv}


def _mutates_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument: a trailing-underscore op, an ``inplace=True``
    module or function, or an augmented assignment on a tensor."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or not isinstance(name, str):
        return False
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return all(isinstance(a, fx.Node) for a in node.args[:2])
    if name.startswith("__i") or (name.endswith("_") and not name.endswith("__")):
        return True
    inplace = node.kwargs.get("inplace")
    if inplace is None and node.op == "call_function" and name in _INPLACE_POSITION:
        position = _INPLACE_POSITION[name]
        inplace = node.args[position] if len(node.args) > position else False
    return bool(inplace)


#: the position of ``inplace`` in functional activations' signatures
_INPLACE_POSITION = {"relu": 1, "relu6": 1, "hardsigmoid": 1, "hardtanh": 3, "silu": 1, "elu": 2, "leaky_relu": 2,
                     "hardswish": 1, "mish": 1, "celu": 2, "selu": 1}


def _later_users(value: fx.Node, node: fx.Node) -> list[fx.Node]:
    """The users of ``value`` that come after ``node`` in the graph."""
    pending = set(value.users) - {node}
    found = []
    cursor = node.next
    while pending and cursor.op != "root":
        if cursor in pending:
            found.append(cursor)
            pending.discard(cursor)
        cursor = cursor.next
    return found


def _attr(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The parameter or buffer a get_attr node fetches, or None for anything else."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner, _, name = node.target.rpartition(".")
    value = getattr(gm.get_submodule(owner), name, None)
    return value if isinstance(value, torch.Tensor) else None


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    """``t`` as a parameter sharing its storage (a buffer may hold what a layer keeps as a parameter)."""
    if t is None or isinstance(t, nn.Parameter):
        return t
    return nn.Parameter(t, requires_grad=False)


def _bind(node: fx.Node, names: Sequence[str]) -> dict[str, Any]:
    """The call's arguments by name (positional first, then keywords); missing ones are None."""
    bound = dict(zip(names, node.args))
    bound.update({k: v for k, v in node.kwargs.items() if k in names})
    return {k: bound.get(k) for k in names}


def _as_module(gm: fx.GraphModule, node: fx.Node, layer: nn.Module, arg: Any) -> None:
    """Replace the call ``node`` by a call of the new submodule ``layer`` on ``arg``."""
    name = f"{node.name}_layer"
    gm.add_submodule(name, layer)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (arg,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _conv_or_linear(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """``F.linear(x, w, b)`` / ``F.conv2d(x, w, b, ...)`` on parameters as a Linear/Conv2d, or None."""
    bound = _bind(node, _CONV_ARGS)
    weight, bias = _attr(gm, bound["weight"]), _attr(gm, bound["bias"])
    if weight is None or (bound["bias"] is not None and bias is None):
        return None  # computed weights: not a layer
    if node.target is F.linear:
        layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        geo = {k: bound[k] for k in ("stride", "padding", "dilation") if bound[k] is not None}
        layer = nn.Conv2d(weight.shape[1] * (bound["groups"] or 1), weight.shape[0], tuple(weight.shape[2:]),
                          groups=bound["groups"] or 1, bias=bias is not None, **geo)
    layer.weight, layer.bias = _param(weight), _param(bias)
    return layer


_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _batchnorm(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """``F.batch_norm`` in inference (fixed running statistics, as timm's BatchNormAct2d calls it) as a module."""
    b = _bind(node, _BN_ARGS)
    mean, var = _attr(gm, b["running_mean"]), _attr(gm, b["running_var"])
    weight, bias = _attr(gm, b["weight"]), _attr(gm, b["bias"])
    if b["training"] or mean is None or var is None or (b["weight"] is not None and weight is None) \
            or (b["bias"] is not None and bias is None):
        return None  # batch statistics or computed parameters: not a fixed affine map
    bn = BatchNormNd(mean.shape[0], eps=1e-5 if b["eps"] is None else float(b["eps"]),
                     affine=weight is not None or bias is not None)
    bn.running_mean, bn.running_var = mean, var  # type: ignore[assignment]
    bn.weight = _param(weight if weight is not None else (None if bias is None else torch.ones_like(bias)))
    bn.bias = _param(bias if bias is not None else (None if weight is None else torch.zeros_like(weight)))
    return bn.eval()


def _pool(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """Functional max/avg/adaptive-max pooling as the matching module (for one kind of pooling node)."""
    if node.target in (F.max_pool2d, torch.max_pool2d):
        b = _bind(node, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"))
        if b["return_indices"]:
            return None
        return nn.MaxPool2d(b["kernel_size"], b["stride"] or None, b["padding"] or 0, b["dilation"] or 1,
                            ceil_mode=bool(b["ceil_mode"]))
    if node.target is F.avg_pool2d:
        b = _bind(node, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                         "divisor_override"))
        return nn.AvgPool2d(b["kernel_size"], b["stride"] or None, b["padding"] or 0, bool(b["ceil_mode"]),
                            True if b["count_include_pad"] is None else bool(b["count_include_pad"]),
                            b["divisor_override"])
    b = _bind(node, ("input", "output_size", "return_indices"))
    return None if b["return_indices"] else nn.AdaptiveMaxPool2d(b["output_size"])


_FUNCTIONAL_LAYERS: dict[Callable, Callable[[fx.GraphModule, fx.Node], nn.Module | None]] = {
    F.linear: _conv_or_linear, F.conv2d: _conv_or_linear, torch.conv2d: _conv_or_linear,
    F.batch_norm: _batchnorm, F.max_pool2d: _pool, torch.max_pool2d: _pool, F.avg_pool2d: _pool,
    F.adaptive_max_pool2d: _pool,
}


def functional_layers_to_modules(gm: fx.GraphModule) -> None:
    """``F.linear``/``F.conv2d``/``F.batch_norm`` on fixed parameters and functional pooling -> module calls.

    The new modules share the parameters, so folding and rule binding see one kind of layer.
    Calls on computed weights (or batch statistics) stay as they are and are reported unmatched.
    """
    for node in list(gm.graph.nodes):
        make = _FUNCTIONAL_LAYERS.get(node.target) if node.op == "call_function" else None
        layer = make(gm, node) if make is not None else None
        if layer is not None:
            _as_module(gm, node, layer, node.args[0] if node.args else node.kwargs["input"])


def _is_stochastic_depth(node: fx.Node) -> bool:
    """torchvision's ``stochastic_depth(x, p, mode, training=False)``: the identity in eval mode."""
    if node.op != "call_function" or getattr(node.target, "__name__", "") != "stochastic_depth":
        return False
    training = node.args[3] if len(node.args) > 3 else node.kwargs.get("training", True)
    return training is False


def drop_dropout_identity(gm: fx.GraphModule) -> None:
    """Remove Dropout, Identity and eval-mode stochastic depth (modules and functions): identities in eval mode."""
    for node in list(gm.graph.nodes):
        m = _module(gm, node)
        if isinstance(m, DROP_MODULES) or (node.op == "call_function" and node.target in DROP_FUNCTIONS) \
                or _is_stochastic_depth(node):
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


def _clamp_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, Any] | None:
    """(lo, hi) of a ReLU6/Hardtanh/clamp in any spelling, or None if ``node`` is none of them."""
    m = _module(gm, node)
    if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return m.min_val, m.max_val
    if node.op == "call_function" and node.target in (F.relu6,):
        return 0.0, 6.0
    if node.op == "call_function" and node.target in (F.hardtanh, F.hardtanh_):
        b = _bind(node, ("input", "min_val", "max_val"))
        return (-1.0 if b["min_val"] is None else b["min_val"]), (1.0 if b["max_val"] is None else b["max_val"])
    is_clamp = ((node.op == "call_function" and node.target in CLAMP_FUNCTIONS)
                or (node.op == "call_method" and node.target in CLAMP_METHODS))
    if is_clamp:
        b = _bind(node, ("input", "min", "max"))
        return b["min"], b["max"]
    return None


def unify_clamp(gm: fx.GraphModule) -> None:
    """ReLU6, Hardtanh and clamp with constant bounds lo <= 0 <= hi -> ``F.hardtanh(x, lo, hi)``.

    ``clamp(x, min=0)`` is a ReLU and becomes ``torch.relu``. Other bounds (a clamp that
    does not pass through 0) become ``torch.clamp`` and stay unsupported.
    """
    for node in list(gm.graph.nodes):
        bounds = _clamp_bounds(gm, node)
        if bounds is None:
            continue
        lo, hi = bounds
        if not all(v is None or isinstance(v, (int, float)) for v in bounds):
            continue  # tensor bounds: leave the call for the unmatched report
        if lo == 0 and hi is None:
            _replace(gm, node, torch.relu, (node.args[0],))
        elif lo is not None and hi is not None and lo <= 0 <= hi:
            _replace(gm, node, F.hardtanh, (node.args[0], float(lo), float(hi)))
        elif node.op != "call_module":
            _replace(gm, node, torch.clamp, (node.args[0], lo, hi))


def unify_gate_functions(gm: fx.GraphModule) -> None:
    """Sigmoid and hard-sigmoid in any spelling -> ``torch.sigmoid`` / ``F.hardsigmoid`` (gate functions)."""
    for node in list(gm.graph.nodes):
        m = _module(gm, node)
        fn = node.target if node.op == "call_function" else None
        if isinstance(m, nn.Sigmoid) or fn in SIGMOID_FUNCTIONS or (
                node.op == "call_method" and node.target in ("sigmoid", "sigmoid_")):
            _replace(gm, node, torch.sigmoid, (node.args[0],))
        elif isinstance(m, nn.Hardsigmoid) or fn in HARDSIGMOID_FUNCTIONS:
            _replace(gm, node, F.hardsigmoid, (node.args[0],))


def _unify_binary(gm: fx.GraphModule, functions: set, methods: set, canonical: Callable) -> None:
    """Every call of ``functions``/``methods`` on two tensors (no kwargs) becomes ``canonical(a, b)``."""
    for node in list(gm.graph.nodes):
        hit = ((node.op == "call_function" and node.target in functions)
               or (node.op == "call_method" and node.target in methods))
        if hit and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args):
            _replace(gm, node, canonical, tuple(node.args))


def unify_mul(gm: fx.GraphModule) -> None:
    """``a * b``, ``a *= b``, ``torch.mul(a, b)``, ``a.mul(b)``, ``a.mul_(b)`` of two tensors -> ``operator.mul``."""
    _unify_binary(gm, MUL_FUNCTIONS, MUL_METHODS, operator.mul)


def unify_cat(gm: fx.GraphModule) -> None:
    """``torch.cat``/``concat``/``concatenate`` with ``dim`` or ``axis`` -> ``torch.cat(list, dim)``."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in CAT_FUNCTIONS:
            continue
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        if isinstance(tensors, (list, tuple)) and isinstance(dim, int):
            _replace(gm, node, torch.cat, (list(tensors), dim))


def unify_add(gm: fx.GraphModule) -> None:
    """``a + b``, ``a += b``, ``torch.add(a, b)``, ``a.add(b)``, ``a.add_(b)`` -> ``operator.add(a, b)``."""
    _unify_binary(gm, ADD_FUNCTIONS, ADD_METHODS, operator.add)


def unify_reshape(gm: fx.GraphModule) -> None:
    """``nn.Flatten``, ``x.flatten()``, ``x.view()``, ``x.reshape()``, ``x.squeeze()``, ``x.unsqueeze()``
    -> ``torch.flatten``/``torch.reshape``/``torch.squeeze``/``torch.unsqueeze``."""
    for node in list(gm.graph.nodes):
        m = _module(gm, node)
        if isinstance(m, nn.Flatten):
            _replace(gm, node, torch.flatten, (node.args[0], m.start_dim, m.end_dim))
        elif node.op == "call_method" and node.target == "flatten":
            _replace(gm, node, torch.flatten, tuple(node.args), dict(node.kwargs))
        elif node.op == "call_method" and node.target in RESHAPE_METHODS:
            one = len(node.args) == 2 and (isinstance(node.args[1], (tuple, list)) or _is_size(node.args[1]))
            shape = node.args[1] if one else tuple(node.args[1:])  # x.view(n, c), x.view((n, c)), x.view(y.shape)
            _replace(gm, node, torch.reshape, (node.args[0], shape if _is_size(shape) else tuple(shape)))
        elif node.op == "call_method" and node.target in ("squeeze", "unsqueeze"):
            fn = torch.squeeze if node.target == "squeeze" else torch.unsqueeze
            _replace(gm, node, fn, tuple(node.args), dict(node.kwargs))


def _is_size(arg: Any) -> bool:
    """Whether ``arg`` is a whole ``torch.Size`` node (``y.shape``, ``y.size()``), not one of its items."""
    return isinstance(arg, fx.Node) and (
        (arg.op == "call_function" and arg.target is getattr and arg.args[1] == "shape")
        or (arg.op == "call_method" and arg.target == "size" and len(arg.args) == 1 and not arg.kwargs))


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

    Folded only where the conv's output has no other user (shape reads, as timm's
    ``_assert(x.ndim == 4)``, do not count) and the conv module is called once; any other
    BatchNorm stays and gets its own (elementwise affine) rule.
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
        value_users = [u for u in src.users if not is_shape(u)]
        if not isinstance(layer, CONV_TYPES + LINEAR_TYPES) or len(value_users) != 1 or calls[src.target] != 1:
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

# --------------------------------------------------------------------------- the op table's passes
_IMPURE = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.bernoulli,
           torch.multinomial, torch.normal}


def fold_constants(gm: fx.GraphModule) -> None:
    """Parameter-only subgraphs (weight standardization, gains, ``cls_token`` arithmetic) -> constants.

    A node whose inputs are all parameters, buffers or literals does not depend on the model
    input: it is evaluated once, here, and becomes a buffer of the graph (``_folded_<name>``).
    Only the frontier is stored (constants that a non-constant node reads).
    """
    const: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            const[node] = _fetch(gm, node.target)
        elif node.op in ("call_function", "call_method", "call_module") and node.target not in _IMPURE \
                and node.all_input_nodes and all(a in const for a in node.all_input_nodes):
            try:
                const[node] = _evaluate(gm, node, const)
            except Exception:  # noqa: BLE001 - leave what cannot be evaluated to the later stages
                continue
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" or node not in const or not isinstance(const[node], torch.Tensor):
            continue
        if all(u in const for u in node.users):
            continue
        name = f"_folded_{node.name}"
        gm.register_buffer(name, const[node].detach().clone())
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(name)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
    # no dead-code elimination here: an in-place statement whose result is dropped is still live


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _evaluate(gm: fx.GraphModule, node: fx.Node, const: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, lambda a: const[a])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: const[a])
    with torch.no_grad():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return gm.get_submodule(node.target)(*args, **kwargs)


def _norm_layer(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """``F.layer_norm``/``F.group_norm``/``F.rms_norm`` on fixed parameters as the matching module."""
    names = {F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
             F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
             F.rms_norm: ("input", "normalized_shape", "weight", "eps")}[node.target]
    b = _bind(node, names)
    weight, bias = _attr(gm, b["weight"]), _attr(gm, b.get("bias"))
    if (b["weight"] is not None and weight is None) or (b.get("bias") is not None and bias is None):
        return None
    if node.target is F.group_norm:
        known = weight if weight is not None else bias
        if not isinstance(b["num_groups"], int) or known is None:
            return None  # no parameter tells the channel count: left for the unmatched report
        channels = known.shape[0]
        layer: nn.Module = nn.GroupNorm(b["num_groups"], channels, eps=1e-5 if b["eps"] is None else b["eps"],
                                        affine=weight is not None)
    else:
        shape = b["normalized_shape"]
        if not isinstance(shape, (int, list, tuple)) or any(isinstance(v, fx.Node) for v in
                                                              (shape if isinstance(shape, (list, tuple)) else [])):
            return None
        eps = b["eps"]
        cls = nn.LayerNorm if node.target is F.layer_norm else nn.RMSNorm
        layer = cls(shape, eps=eps if eps is not None else (1e-5 if cls is nn.LayerNorm else None),
                    elementwise_affine=weight is not None, **({"bias": bias is not None} if cls is nn.LayerNorm
                                                              else {}))
    if weight is not None:
        layer.weight = _param(weight)
    if bias is not None:
        layer.bias = _param(bias)
    elif getattr(layer, "bias", None) is not None:  # GroupNorm(affine=True) always has a bias
        layer.bias = nn.Parameter(torch.zeros_like(layer.bias), requires_grad=False)
    return layer


_FUNCTIONAL_LAYERS.update({F.layer_norm: _norm_layer, F.group_norm: _norm_layer, F.rms_norm: _norm_layer})


def unify_routing_modules(gm: fx.GraphModule) -> None:
    """Padding, Upsample, PixelShuffle, ChannelShuffle and Unflatten modules -> their functions.

    Routing ops are replayed on index tensors to find their adjoint; a function call can be
    replayed from the generated code, a module call would need the module.
    """
    for node in list(gm.graph.nodes):
        m = _module(gm, node)
        if isinstance(m, (nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
                          nn.modules.padding._ReplicationPadNd, nn.modules.padding.CircularPad2d)):
            mode = {nn.modules.padding._ConstantPadNd: "constant", nn.modules.padding._ReflectionPadNd: "reflect",
                    nn.modules.padding._ReplicationPadNd: "replicate"}
            kind = next((v for k, v in mode.items() if isinstance(m, k)), "circular")
            kwargs = {"mode": kind, **({"value": float(m.value)} if kind == "constant" else {})}
            _replace(gm, node, F.pad, (node.args[0], tuple(m.padding)), kwargs)
        elif isinstance(m, nn.Upsample):
            _replace(gm, node, F.interpolate, (node.args[0],),
                     {"size": m.size, "scale_factor": m.scale_factor, "mode": m.mode,
                      "align_corners": m.align_corners, "recompute_scale_factor": m.recompute_scale_factor})
        elif isinstance(m, nn.PixelShuffle):
            _replace(gm, node, F.pixel_shuffle, (node.args[0], m.upscale_factor))
        elif isinstance(m, nn.PixelUnshuffle):
            _replace(gm, node, F.pixel_unshuffle, (node.args[0], m.downscale_factor))
        elif isinstance(m, nn.ChannelShuffle):
            _replace(gm, node, torch.channel_shuffle, (node.args[0], m.groups))
        elif isinstance(m, nn.Unflatten):
            _replace(gm, node, torch.unflatten, (node.args[0], m.dim, tuple(m.unflattened_size)))
        elif isinstance(m, nn.Softmax):
            _replace(gm, node, torch.softmax, (node.args[0], m.dim))


_SPLITS = {torch.split: "split", torch.chunk: "chunk", torch.tensor_split: "tensor_split", torch.unbind: "unbind"}


def _split_call(node: fx.Node) -> tuple[str, fx.Node, Any, int] | None:
    """(how, tensor, spec, dim) of a split/chunk/tensor_split/unbind call in any spelling, or None."""
    if node.op == "call_function" and node.target in _SPLITS:
        how = _SPLITS[node.target]
    elif node.op == "call_method" and node.target in _SPLITS.values():
        how = node.target
    else:
        return None
    if how == "unbind":
        b = _bind(node, ("input", "dim"))
        return how, b["input"], None, b["dim"] or 0
    names = {"split": ("input", "split_size_or_sections", "dim"), "chunk": ("input", "chunks", "dim"),
             "tensor_split": ("input", "indices_or_sections", "dim")}[how]
    if node.op == "call_method" and how == "split":
        names = ("input", "split_size", "dim")
    b = _bind(node, names)
    return how, b["input"], b[names[1]], b["dim"] or 0


def unify_split(gm: fx.GraphModule) -> None:
    """``x.split(...)[i]``, ``chunk``, ``tensor_split``, ``unbind`` -> ``split_item(x, how, spec, dim, i)``.

    Every part becomes one tensor op (a routing op); only splits whose parts are all taken by
    constant indices are rewritten.
    """
    for node in list(gm.graph.nodes):
        found = _split_call(node)
        if found is None or not node.users:
            continue
        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                   for u in users):
            continue
        how, x, spec, dim = found
        for u in users:
            _replace(gm, u, split_item, (x, how, spec, dim, u.args[1]))
        gm.graph.erase_node(node)


_SUB = {operator.sub, torch.sub, operator.isub}


def unify_arithmetic(gm: fx.GraphModule) -> None:
    """One spelling for linear arithmetic: ``a - b`` -> ``a + b * -1``, ``-a`` -> ``a * -1``, methods ->
    functions (``x.mean`` -> ``torch.mean``, ``x.matmul``/``@``/``bmm`` -> ``torch.matmul``,
    ``x.mul(c)``/``x.div(c)`` -> ``operator.mul``/``operator.truediv``), ``x * sigmoid(x)`` -> ``F.silu(x)``.
    """
    methods = {"mean": torch.mean, "sum": torch.sum, "matmul": torch.matmul, "bmm": torch.matmul,
               "__matmul__": torch.matmul, "mul": operator.mul, "mul_": operator.mul, "div": operator.truediv,
               "div_": operator.truediv, "__truediv__": operator.truediv, "neg": operator.neg}
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target in methods and not (
                node.target.startswith("div") and "rounding_mode" in node.kwargs):
            _replace(gm, node, methods[node.target], tuple(node.args), dict(node.kwargs))
        elif node.op == "call_function" and node.target in (operator.matmul, torch.bmm, torch.mm):
            _replace(gm, node, torch.matmul, tuple(node.args))
        elif node.op == "call_function" and node.target in (torch.div, operator.itruediv) and \
                "rounding_mode" not in node.kwargs and len(node.args) == 2:
            _replace(gm, node, operator.truediv, tuple(node.args))
    for node in list(gm.graph.nodes):
        if _shape_arithmetic(node):
            continue  # arithmetic on sizes stays integer arithmetic
        if node.op == "call_function" and node.target in (operator.neg, torch.neg):
            _replace(gm, node, operator.mul, (node.args[0], -1.0))
        elif node.op == "call_function" and node.target in _SUB and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if not isinstance(b, fx.Node):
                _replace(gm, node, operator.add, (a, -b))
                continue
            with gm.graph.inserting_before(node):
                negated = gm.graph.call_function(operator.mul, (b, -1.0))
            _replace(gm, node, operator.add, (a, negated))
        elif node.op == "call_function" and node.target is operator.mul and len(node.args) == 2:
            a, b = node.args
            for x, g in ((a, b), (b, a)):
                if isinstance(g, fx.Node) and g.op == "call_function" and g.target is torch.sigmoid \
                        and g.args[0] is x and len(g.users) == 1:
                    _replace(gm, node, F.silu, (x,))
                    gm.graph.erase_node(g)
                    break


def _shape_arithmetic(node: fx.Node) -> bool:
    return is_shape(node) or any(isinstance(a, fx.Node) and is_shape(a) for a in node.args)


def expand_attention(gm: fx.GraphModule) -> None:
    """``F.scaled_dot_product_attention`` -> ``softmax(q @ k^T * scale + mask) @ v`` (explicit, so the
    softmax can be held constant or take its rule and the products get theirs).

    Boolean and float ``attn_mask``, ``is_causal`` (the mask is built from the sizes at run time by
    :func:`~lrpfx.compiler.attention_forms.sdpa_mask`) and ``enable_gqa`` (k and v heads repeated) are
    expanded; ``dropout_p`` is dropped (lrpfx explains the eval-mode function).
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        b = _bind(node, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"))
        q, k, v = b["query"], b["key"], b["value"]
        g = gm.graph
        with g.inserting_before(node):
            if b["enable_gqa"]:
                groups = g.call_function(operator.floordiv, (g.call_method("size", (q, -3)),
                                                             g.call_method("size", (k, -3))))
                k, v = (g.call_method("repeat_interleave", (t, groups, -3)) for t in (k, v))
            scores = g.call_function(torch.matmul, (q, g.call_method("transpose", (k, -2, -1))))
            if b["scale"] is None:
                scale = g.call_function(operator.pow, (g.call_method("size", (q, -1)), -0.5))
            else:
                scale = b["scale"]
            scores = g.call_function(operator.mul, (scores, scale))
            if b["attn_mask"] is not None or b["is_causal"]:
                mask = g.call_function(attention_forms.sdpa_mask, (b["attn_mask"], bool(b["is_causal"]),
                                                                   g.call_method("size", (q, -2)),
                                                                   g.call_method("size", (k, -2))))
                scores = g.call_function(operator.add, (scores, mask))
            probs = g.call_function(torch.softmax, (scores, -1))
            out = g.call_function(torch.matmul, (probs, v))
        node.replace_all_uses_with(out)
        g.erase_node(node)


def expand_swin_attention(gm: fx.GraphModule) -> None:
    """torchvision's ``shifted_window_attention`` (fx-opaque) -> :func:`~lrpfx.compiler.attention_forms.swin_attention`
    traced and inlined: the window partition and its inverse are routing ops, the shift mask is built from
    sizes, and the attention is explicit (its softmax held, or taking its rule). Dropout is dropped (eval)."""
    swin = sys.modules.get("torchvision.models.swin_transformer")
    target = getattr(swin, "shifted_window_attention", None)
    for node in list(gm.graph.nodes):
        if target is None or node.op != "call_function" or node.target is not target:
            continue
        b = _bind(node, _SWIN_ARGS)
        tensors = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "qkv_bias", "proj_bias",
                   "logit_scale")
        present = [t for t in tensors if b[t] is not None]
        channels = _fetch(gm, b["qkv_weight"].target).shape[1] if b["qkv_weight"].op == "get_attr" else None
        if channels is None:
            continue  # weights that are not parameters: leave the call for the unmatched report

        def body(*args: Any, _present: list[str] = present, _b: dict = b, _c: int = channels) -> Any:
            given = dict(zip(_present, args))
            return attention_forms.swin_attention(
                given["input"], given["qkv_weight"], given["proj_weight"], given["relative_position_bias"],
                given.get("qkv_bias"), given.get("proj_bias"), given.get("logit_scale"),
                window_size=list(_b["window_size"]), num_heads=_b["num_heads"], shift_size=list(_b["shift_size"]),
                channels=_c)
        _inline(gm, node, body, [b[t] for t in present])


_SWIN_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
              "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")


def _inline(gm: fx.GraphModule, node: fx.Node, body: Callable[..., Any], args: list[fx.Node]) -> None:
    """Replace ``node`` by the graph of ``body(*args)`` traced with fx (the functions in
    ``attention_forms.WRAPPED`` kept as single calls)."""
    params = ", ".join(f"a{i}" for i in range(len(args)))
    namespace: dict[str, Any] = {"body": body}
    exec(f"def traced({params}):\n    return body({params})\n", namespace)  # fx traces a fixed signature
    sub = fx.Tracer(autowrap_functions=attention_forms.WRAPPED).trace(namespace["traced"])
    placeholders = [n for n in sub.nodes if n.op == "placeholder"]
    with gm.graph.inserting_before(node):
        out = gm.graph.graph_copy(sub, dict(zip(placeholders, args)))
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def expand_timm_masks(gm: fx.GraphModule) -> None:
    """timm's fx-wrapped mask helpers of its explicit attention path -> plain ops: ``maybe_add_mask(s, m)`` is
    ``s`` (no mask) or ``s + m``; ``resolve_self_attn_mask`` is None (no mask) or the additive SDPA mask of
    :func:`~lrpfx.compiler.attention_forms.sdpa_mask` (a boolean mask, ``is_causal``)."""
    timm_attention = sys.modules.get("timm.layers.attention")
    resolve = getattr(timm_attention, "resolve_self_attn_mask", None)
    add_mask = getattr(timm_attention, "maybe_add_mask", None)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not resolve or resolve is None:
            continue
        b = _bind(node, ("seq_len", "attn", "attn_mask", "is_causal"))
        if isinstance(b["is_causal"], fx.Node):
            continue  # decided at run time: left for the unmatched report
        if b["attn_mask"] is None and not b["is_causal"]:
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda a: None if a is node else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a: None if a is node else a)
            gm.graph.erase_node(node)
            continue
        _replace(gm, node, attention_forms.sdpa_mask, (b["attn_mask"], bool(b["is_causal"]), b["seq_len"],
                                                       b["seq_len"]))
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is add_mask and add_mask is not None:
            b = _bind(node, ("scores", "attn_mask"))
            if b["attn_mask"] is None:
                node.replace_all_uses_with(b["scores"])
                gm.graph.erase_node(node)
            else:
                _replace(gm, node, operator.add, (b["scores"], b["attn_mask"]))


def expand_multihead_attention(gm: fx.GraphModule) -> None:
    """``nn.MultiheadAttention`` -> its explicit ops: in-projections as ``nn.Linear`` submodules, heads,
    ``softmax(q @ k^T / sqrt(d) + mask) @ v``, the module's own ``out_proj``.

    Self- and cross-attention, packed or separate in-projections, ``batch_first`` either way,
    ``attn_mask`` and ``key_padding_mask`` (boolean or float; built by
    :func:`~lrpfx.compiler.attention_forms.mha_mask`), and ``need_weights`` (the weights, if used,
    are the softmax output, averaged over heads or not: held values under CP-LRP). Dropout is the eval-mode identity. A module
    with ``bias_k``/``bias_v`` or ``add_zero_attn`` raises :class:`UnmatchedNodeError` naming the node.
    """
    for node in list(gm.graph.nodes):
        m = _module(gm, node)
        if not isinstance(m, nn.MultiheadAttention):
            continue
        why = _not_expandable(node, m)
        if why:
            raise UnmatchedNodeError(
                f"node {node.name!r} ({node.format_node()}): lrpfx cannot write this nn.MultiheadAttention as "
                f"explicit attention: {why}. Hint: build the module without it, or write the attention with "
                "explicit ops (q @ k.transpose(-2, -1) * scale, softmax, @ v), which lrpfx traces.", [node.name])
        b = _bind(node, _MHA_ARGS)
        g = gm.graph
        projections = _in_projections(gm, node, m)
        heads, dim = m.num_heads, m.embed_dim // m.num_heads
        with g.inserting_before(node):
            seq = [t if m.batch_first else g.call_method("transpose", (t, 0, 1))
                   for t in (b["query"], b["key"], b["value"])]
            n, length, source = (g.call_method("size", (seq[0], 0)), g.call_method("size", (seq[0], 1)),
                                 g.call_method("size", (seq[1], 1)))
            q, k, v = (g.call_method("transpose", (g.call_method("reshape", (g.call_module(name, (t,)), n, -1,
                                                                            heads, dim)), 1, 2))
                       for name, t in zip(projections, seq))
            scores = g.call_function(operator.mul, (g.call_function(torch.matmul, (
                q, g.call_method("transpose", (k, -2, -1)))), float(dim) ** -0.5))
            if b["attn_mask"] is not None or b["key_padding_mask"] is not None:
                mask = g.call_function(attention_forms.mha_mask, (b["attn_mask"], b["key_padding_mask"], n, heads,
                                                                  length, source))
                scores = g.call_function(operator.add, (scores, mask))
            probs = g.call_function(torch.softmax, (scores, -1))
            heads_out = g.call_method("transpose", (g.call_function(torch.matmul, (probs, v)), 1, 2))
            out = g.call_module(f"{node.target}.out_proj", (g.call_method("reshape", (heads_out, n, length,
                                                                                      m.embed_dim)),))
            if not m.batch_first:
                out = g.call_method("transpose", (out, 0, 1))
            average = True if b["average_attn_weights"] is None else bool(b["average_attn_weights"])
            wanted = any(u.args[1] == 1 and u.users for u in node.users)  # need_weights and the weights are read
            weights = (g.call_function(torch.mean, (probs, 1)) if average else probs) if wanted else None
        for user in list(node.users):
            user.replace_all_uses_with(out if user.args[1] == 0 else weights)
            g.erase_node(user)
        g.erase_node(node)


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")


def _in_projections(gm: fx.GraphModule, node: fx.Node, m: nn.MultiheadAttention) -> list[str]:
    """Register the q, k, v in-projections of ``m`` as ``nn.Linear`` submodules; returns their names."""
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        weights = [m.in_proj_weight.detach()[i * e:(i + 1) * e] for i in range(3)]
    else:
        weights = [m.q_proj_weight.detach(), m.k_proj_weight.detach(), m.v_proj_weight.detach()]
    names = []
    for i, (part, w) in enumerate(zip("qkv", weights)):
        lin = nn.Linear(w.shape[1], e, bias=m.in_proj_bias is not None, device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w.clone(), requires_grad=False)
        if m.in_proj_bias is not None:
            lin.bias = nn.Parameter(m.in_proj_bias.detach()[i * e:(i + 1) * e].clone(), requires_grad=False)
        names.append(f"{node.target}.{part}_proj")
        gm.add_submodule(names[-1], lin)
    return names


def _not_expandable(node: fx.Node, m: nn.MultiheadAttention) -> str:
    """Why ``m`` cannot be expanded (empty if it can)."""
    b = _bind(node, _MHA_ARGS)
    if m.bias_k is not None or m.bias_v is not None:
        return "bias_k/bias_v (add_bias_kv=True) append learned keys and values"
    if m.add_zero_attn:
        return "add_zero_attn=True appends a zero key and value"
    if bool(b["is_causal"]) and b["attn_mask"] is None:
        return "is_causal=True without an attn_mask (torch itself refuses it)"
    if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1) for u in node.users):
        return "its output tuple is used as a whole, not as out, weights = mha(...)"
    return ""


def out_of_place_activations(gm: fx.GraphModule) -> None:
    """Activations written in place (``nn.SiLU(inplace=True)``, ``F.hardswish(x, inplace=True)``) -> out of place.

    The rules of the layer before an activation read its output (z); an in-place activation
    would overwrite it. Later readers of the mutated tensor are redirected to the result.
    """
    for node in list(gm.graph.nodes):
        m = _module(gm, node)
        if m is not None and isinstance(m, ELEMENTWISE_MODULES) and getattr(m, "inplace", False):
            x = node.args[0]
            for user in _later_users(x, node):
                user.replace_input_with(x, node)
            m.inplace = False  # the traced copy's module, never the user's
        elif node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS and _mutates_input(gm, node):
            position = _INPLACE_POSITION.get(node.target.__name__)
            args = tuple(a for i, a in enumerate(node.args) if i != position)
            _replace(gm, node, node.target, args, {k: v for k, v in node.kwargs.items() if k != "inplace"})


PASSES: tuple[Callable[[fx.GraphModule], None], ...] = (
    expand_swin_attention, fold_constants, functional_layers_to_modules, drop_dropout_identity,
    expand_multihead_attention,
    expand_attention, expand_timm_masks, unify_routing_modules,
    out_of_place_activations, unify_relu, unify_clamp, unify_gate_functions, unify_split, unify_arithmetic, unify_mul, unify_cat, unify_add,
    unify_reshape, spatial_mean_to_pool, fold_batchnorm,
)


# --------------------------------------------------------------------------- postconditions
def _offenders(gm: fx.GraphModule, bad: Callable[[fx.Node], bool]) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if bad(n)]


def _is_call(n: fx.Node, op: str, targets: Any) -> bool:
    return n.op == op and n.target in targets


#: what each pass guarantees, in the manner of fx's ``PassBase.ensures``: a predicate naming the
#: nodes that violate it (checked after the pass; a violation is a bug in the pass, not in the model)
ENSURES: dict[Callable[[fx.GraphModule], None], Callable[[fx.GraphModule], list[fx.Node]]] = {
    drop_dropout_identity: lambda gm: _offenders(gm, lambda n: isinstance(_module(gm, n), DROP_MODULES)
                                                 or _is_call(n, "call_function", DROP_FUNCTIONS)),
    unify_relu: lambda gm: _offenders(gm, lambda n: isinstance(_module(gm, n), nn.ReLU)
                                      or _is_call(n, "call_method", ("relu", "relu_"))
                                      or _is_call(n, "call_function", RELU_FUNCTIONS - {torch.relu})),
    unify_gate_functions: lambda gm: _offenders(gm, lambda n: isinstance(_module(gm, n), (nn.Sigmoid, nn.Hardsigmoid))
                                                or _is_call(n, "call_method", ("sigmoid", "sigmoid_"))),
    unify_routing_modules: lambda gm: _offenders(gm, lambda n: isinstance(_module(gm, n), (
        nn.modules.padding._ConstantPadNd, nn.Upsample, nn.PixelShuffle, nn.ChannelShuffle, nn.Softmax))),
    expand_attention: lambda gm: _offenders(gm, lambda n: _is_call(n, "call_function",
                                                                   (F.scaled_dot_product_attention,))),
    unify_arithmetic: lambda gm: _offenders(gm, lambda n: not _shape_arithmetic(n) and (
        _is_call(n, "call_function", (operator.neg, torch.neg, operator.matmul))
        or (_is_call(n, "call_function", _SUB) and len(n.args) == 2 and not n.kwargs))),
    unify_reshape: lambda gm: _offenders(gm, lambda n: isinstance(_module(gm, n), nn.Flatten)
                                         or _is_call(n, "call_method", RESHAPE_METHODS | {"flatten"})),
    out_of_place_activations: lambda gm: _offenders(gm, lambda n: isinstance(_module(gm, n), ELEMENTWISE_MODULES)
                                                    and getattr(_module(gm, n), "inplace", False)),
}


def check(pass_: Callable[[fx.GraphModule], None], gm: fx.GraphModule) -> None:
    """Fail loudly when ``pass_`` left a node it should have rewritten (its postcondition)."""
    ensures = ENSURES.get(pass_)
    bad = ensures(gm) if ensures is not None else []
    if bad:
        raise AssertionError(f"canonicalization pass {pass_.__name__} left un-canonical node(s): "
                             f"{[n.format_node() for n in bad]}")


def canonicalize(gm: fx.GraphModule, fold_batchnorm_: bool = True) -> fx.GraphModule:
    """Run every pass, then dead-code elimination; ``gm`` is rewritten in place and returned.

    ``fold_batchnorm_=False`` keeps every BatchNorm as its own op (a rule set's
    ``options.batchnorm = "pass"``, as the ECCV release treats BatchNorm).
    """
    for p in PASSES:
        if p is fold_batchnorm and not fold_batchnorm_:
            continue
        p(gm)
        check(p, gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
