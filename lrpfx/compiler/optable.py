"""The op table: every op the compiler knows, declared once, by its *class*.

The class decides how relevance passes through an op (one principled rule per class):

=============  =====================================================================  ====================
class (kind)   ops                                                                    relevance
=============  =====================================================================  ====================
routing        slice, pad, permute, transpose, expand, repeat, roll, flip, stack,     exact adjoint (0/1
               split/chunk/unbind items, nearest upsampling, pixel/channel shuffle     Jacobian), conserved
linear_op      mul/div by a constant, parameter, buffer or held value; sum, mean;     the LRP rule family
               matmul with a constant or held operand; bilinear interpolation         through A^T
elementwise    GELU, SiLU, Hardswish, Mish, ELU, LeakyReLU, Tanh, Softplus, SELU,     identity (AttnLRP)
               CELU, PReLU, sigmoid/hard-sigmoid used as activations
norm           LayerNorm (any trailing dims), GroupNorm, InstanceNorm, RMSNorm        std held constant
held           softmax (and what only reshapes it): a factor held constant (CP-LRP)   none (cut)
shape          size, shape, dim, arithmetic on shapes                                 none
=============  =====================================================================  ====================

The kinds the compiler knew before (conv, linear, batchnorm, relu, hardtanh, maxpool, avgpool,
adaptive_avgpool, add, cat, gate, reshape) keep their dedicated rules and fast kernels; they
are the special cases of these classes that ResNets are made of. Parameter-only subgraphs
(weight standardization, gains) are folded into constants by canonicalization and never
reach the table.

A user declares their own op in one line::

    lrpfx.register_op(my_activation, kind="elementwise")   # a function
    lrpfx.register_op(MyGELU, kind="elementwise")           # a module type
    lrpfx.register_op("my_method", kind="routing")          # a tensor method
"""
from __future__ import annotations

import operator
import sys
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lrpfx.compiler import attention_forms
from lrpfx.errors import RegistryError
from lrpfx.relevance.adjoints import split_item

#: the op classes a user can declare an op as
OP_CLASSES: tuple[str, ...] = ("routing", "linear_op", "elementwise", "norm", "held", "shape")

ROUTING_FUNCTIONS: set[Callable] = {
    torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.roll, torch.flip, torch.narrow,
    torch.select, torch.stack, torch.t, torch.unflatten, torch.tile, torch.index_select, torch.gather,
    torch.take_along_dim, torch.repeat_interleave, torch.squeeze, torch.unsqueeze, F.pad, F.pixel_shuffle,
    F.pixel_unshuffle, torch.channel_shuffle, operator.getitem, split_item, torch.clone,
    attention_forms.swin_windows, attention_forms.swin_unwindows,
}
ROUTING_METHODS: set[str] = {
    "permute", "transpose", "swapaxes", "movedim", "contiguous", "expand", "expand_as", "repeat", "roll", "flip",
    "narrow", "select", "unflatten", "t", "view_as", "reshape_as", "tile", "repeat_interleave", "index_select",
    "gather", "clone", "unfold", "to", "float", "double", "half", "bfloat16", "type_as", "__getitem__",
}
LINEAR_FUNCTIONS: set[Callable] = {
    operator.mul, torch.mul, operator.truediv, torch.div, operator.neg, torch.neg, operator.matmul,
    torch.matmul, torch.bmm, torch.mm, torch.mean, torch.sum, torch.einsum,
}
ELEMENTWISE_FUNCTIONS: set[Callable] = {
    F.gelu, F.silu, F.hardswish, F.mish, F.elu, F.leaky_relu, torch.tanh, F.tanh, F.softplus, F.selu, F.celu,
    F.prelu, torch.sigmoid, F.hardsigmoid, F.logsigmoid,
}
ELEMENTWISE_METHODS: set[str] = {"tanh", "sigmoid"}
ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.LeakyReLU, nn.Tanh, nn.Softplus, nn.SELU, nn.CELU,
    nn.PReLU, nn.Sigmoid, nn.Hardsigmoid, nn.LogSigmoid,
)
NORM_MODULES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.RMSNorm)
HELD_FUNCTIONS: set[Callable] = {F.softmax, torch.softmax, attention_forms.inverse_norm}
HELD_METHODS: set[str] = {"softmax"}
HELD_MODULES: tuple[type, ...] = (nn.Softmax,)
#: the softmax spellings: held (CP-LRP) unless the rule set binds the ``softmax`` pattern (AttnLRP)
SOFTMAX_FUNCTIONS: frozenset[Callable] = frozenset({F.softmax, torch.softmax})

_USER_FUNCTIONS: dict[Callable, str] = {}
_USER_METHODS: dict[str, str] = {}
_USER_MODULES: dict[type, str] = {}


def register_op(op: Callable | type | str, kind: str) -> None:
    """Declare a function, a module type or a tensor method name as an op of class ``kind``.

    ``kind`` is one of :data:`OP_CLASSES`; ``"elementwise"`` (an activation: identity rule) and
    ``"routing"`` (the op only moves, copies or drops elements; its adjoint is found by replaying
    it) are the usual ones. A function or module marked ``"routing"`` is replayed on index
    tensors, so it must accept integer tensors. Declaring the same op twice is an error.
    """
    if kind not in OP_CLASSES:
        raise RegistryError(f"register_op: kind={kind!r} is not one of {OP_CLASSES}.")
    if isinstance(op, str):
        table: dict = _USER_METHODS
    elif isinstance(op, type) and issubclass(op, nn.Module):
        table = _USER_MODULES
    elif callable(op):
        table = _USER_FUNCTIONS
    else:
        raise RegistryError(f"register_op: {op!r} is not a function, a module type or a method name.")
    if op in table:
        raise RegistryError(f"register_op: {getattr(op, '__name__', op)!r} is already declared as {table[op]!r}. "
                            "Hint: call lrpfx.unregister_op first to change it.")
    if kind == "routing" and table is _USER_MODULES:
        raise RegistryError(f"register_op: a module type cannot be 'routing' ({op.__name__}); its call cannot be "
                            "replayed on index tensors. Hint: declare the function its forward calls instead, and "
                            "let fx trace into the module.")
    table[op] = kind


def unregister_op(op: Callable | type | str) -> None:
    """Remove a declaration made with :func:`register_op` (no error if there is none)."""
    for table in (_USER_FUNCTIONS, _USER_METHODS, _USER_MODULES):
        table.pop(op, None)  # type: ignore[call-overload]


def wrapped_functions() -> tuple[Callable, ...]:
    """Functions fx should keep as single calls (not trace into): every declared function, and the
    routing helpers of libraries already imported (timm's ``pad_same``, whose padding is computed
    from the input's size with Python arithmetic fx cannot trace)."""
    found: list[Callable] = list(_USER_FUNCTIONS)
    timm_padding = sys.modules.get("timm.layers.padding")
    if timm_padding is not None and hasattr(timm_padding, "pad_same"):
        found.append(timm_padding.pad_same)
    return tuple(found)


#: routing helpers of libraries, as (module, function name): timm's size-dependent padding, and the
#: patch-merging pad of torchvision's Swin (an fx-wrapped function that only pads and slices). Looked
#: up in ``sys.modules`` only, so that ``import lrpfx`` imports neither library.
_LIBRARY_ROUTING = (("timm.layers.padding", "pad_same"), ("torchvision.models.swin_transformer", "_patch_merging_pad"))


def _library_routing(target: Callable) -> bool:
    """A routing helper of a library that is already imported."""
    return any(getattr(sys.modules.get(mod), name, None) is target for mod, name in _LIBRARY_ROUTING
               if mod in sys.modules)


def user_module_types() -> tuple[type, ...]:
    """Module types a user declared: fx keeps them as single calls (leaf modules)."""
    return tuple(_USER_MODULES)


def table_kind(node: fx.Node, module: nn.Module | None) -> str | None:
    """The op class of ``node`` from the table (user declarations first), or None."""
    if node.op == "call_module" and module is not None:
        for t, kind in _USER_MODULES.items():
            if isinstance(module, t):
                return kind
        if isinstance(module, ELEMENTWISE_MODULES):
            return "elementwise"
        if isinstance(module, NORM_MODULES):
            return "norm"
        if isinstance(module, HELD_MODULES):
            return "held"
        return None
    if node.op == "call_function":
        target = node.target
        if target in _USER_FUNCTIONS:
            return _USER_FUNCTIONS[target]
        if target is F.interpolate:
            return _interpolate_kind(node)
        if _library_routing(target):
            return "routing"
        for table, kind in ((ROUTING_FUNCTIONS, "routing"), (LINEAR_FUNCTIONS, "linear_op"),
                            (ELEMENTWISE_FUNCTIONS, "elementwise"), (HELD_FUNCTIONS, "held")):
            if target in table:
                return kind
        return None
    if node.op == "call_method":
        if node.target in _USER_METHODS:
            return _USER_METHODS[node.target]
        for table, kind in ((ROUTING_METHODS, "routing"), (ELEMENTWISE_METHODS, "elementwise"),
                            (HELD_METHODS, "held")):
            if node.target in table:
                return kind
    return None


def is_softmax(node: fx.Node, module: nn.Module | None = None) -> bool:
    """Whether ``node`` is a softmax in any spelling (function, method, ``nn.Softmax`` call)."""
    return ((node.op == "call_function" and node.target in SOFTMAX_FUNCTIONS)
            or (node.op == "call_method" and node.target == "softmax")
            or (node.op == "call_module" and isinstance(module, nn.Softmax)))


def _interpolate_kind(node: fx.Node) -> str | None:
    mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
    if mode in ("nearest", "nearest-exact"):
        return "routing"
    if mode == "bilinear" and not node.kwargs.get("antialias", False):
        return "linear_op"
    return None
