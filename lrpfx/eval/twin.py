"""The *linearized twin* of a model, as a plain torch.fx transform: the oracle of LRP-0 on any network.

Every elementwise nonlinearity f becomes ``x * stopgrad(f(x) / x)`` (the secant through 0),
every normalization's std and every softmax output are detached, and so is a gate (a sigmoid
or hard-sigmoid whose output multiplies another tensor). Input x Gradient of the twin (autograd)
then equals LRP-0 with the identity rule on activations, the std and softmax held constant
(CP-LRP; Ali et al., 2022) and signal-takes-all gates; ReLU, max-pooling and gates are the
special cases where the twin's gradient is the model's own.

This module uses torch.fx and autograd only, none of the compiler's code, so that the tests
and ``python -m lrpfx.eval.zoo`` compare the compiler against something it did not build.
"""
from __future__ import annotations

import copy
import operator
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


def secant(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x * stopgrad(f(x) / x)``, with ratio 0 where x == 0 and f(0) kept there as a constant (sigmoid(0) = 0.5)."""
    y = f(x.clone())  # f may work in place (nn.SiLU(inplace=True))
    ratio = torch.where(x != 0, y / torch.where(x != 0, x, torch.ones_like(x)), torch.zeros_like(x)).detach()
    return x * ratio + torch.where(x != 0, torch.zeros_like(y), y).detach()


def _std(x: torch.Tensor, dims: tuple[int, ...], eps: float, centered: bool = True) -> torch.Tensor:
    var = x.var(dim=dims, keepdim=True, unbiased=False) if centered else x.pow(2).mean(dim=dims, keepdim=True)
    return (var + eps).sqrt().detach()


def layer_norm(x: torch.Tensor, shape: Any, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """LayerNorm with its std detached."""
    n = 1 if isinstance(shape, int) else len(shape)
    dims = tuple(range(x.dim() - n, x.dim()))
    y = (x - x.mean(dims, keepdim=True)) / _std(x, dims, eps)
    return y * (weight if weight is not None else 1) + (bias if bias is not None else 0)


def rms_norm(x: torch.Tensor, shape: Any, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """RMSNorm with its root mean square detached."""
    n = 1 if isinstance(shape, int) else len(shape)
    dims = tuple(range(x.dim() - n, x.dim()))
    y = x / _std(x, dims, torch.finfo(x.dtype).eps if eps is None else eps, centered=False)
    return y * (weight if weight is not None else 1)


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """GroupNorm (InstanceNorm: groups = channels) with its std detached."""
    g = x.reshape(x.shape[0], groups, -1)
    y = ((g - g.mean(-1, keepdim=True)) / _std(g, (2,), eps)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    return y + bias.view(shape) if bias is not None else y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, **_: Any) -> torch.Tensor:
    """Scaled dot-product attention with the softmax output detached."""
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(-1).detach() @ v


def multihead_attention(m: nn.MultiheadAttention, query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
    """Self-attention of ``nn.MultiheadAttention`` (packed, no masks), softmax detached; returns (out, None)."""
    x = query if m.batch_first else query.transpose(0, 1)
    n, length, e = x.shape
    q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, -1)
    q, k, v = (t.reshape(n, length, m.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = m.out_proj(attention(q, k, v).transpose(1, 2).reshape(n, length, e))
    return (out if m.batch_first else out.transpose(0, 1)), None


_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.LeakyReLU,
                nn.Tanh, nn.Softplus, nn.SELU, nn.CELU, nn.PReLU, nn.Sigmoid, nn.Hardsigmoid)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.gelu, F.silu, F.hardswish, F.mish, F.elu,
                  F.leaky_relu, torch.tanh, F.softplus, F.selu, F.celu, torch.sigmoid, F.sigmoid,
                  F.hardsigmoid, torch.clamp, torch.clip}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "clip"}
_GATES = {torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid", "sigmoid_"}
_SOFTMAX = {F.softmax, torch.softmax, "softmax"}


_LEAVES = (nn.MultiheadAttention, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm) + _ACT_MODULES


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        padding = sys.modules.get("timm.layers.padding")  # timm's size-dependent padding: one call
        super().__init__(autowrap_functions=(padding.pad_same,) if padding is not None else ())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) in _LEAVES or isinstance(m, nn.modules.instancenorm._InstanceNorm):
            return True  # exact types: a subclass (torchvision's LayerNorm2d) may permute around the norm
        return super().is_leaf_module(m, qualname)


def _is_gate(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A sigmoid/hard-sigmoid whose output (through reshapes) is multiplied with another tensor."""
    stack, seen = list(node.users), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        if u.target in (operator.mul, torch.mul, "mul", "__mul__", "mul_") and len(u.all_input_nodes) == 2:
            return True
        if u.target in ("expand", "expand_as", "view", "reshape", "unsqueeze", "flatten", torch.flatten,
                        torch.reshape, torch.unsqueeze):
            stack.extend(u.users)
    return False


def _target_key(node: fx.Node, gm: fx.GraphModule) -> Any:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    return node.target


class _TwinInterpreter(fx.Interpreter):
    """Runs the traced model, applying each op's twin in place of the op."""

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(n)
        new = _replacement(n, _target_key(n, self.module), self.module)
        if new is None:
            return super().run_node(n)
        fn, args, kwargs = new
        args, kwargs = self.fetch_args_kwargs_from_env(_Shim(n, args, kwargs))
        return fn(*args, **kwargs)


class _Shim:
    """What ``fetch_args_kwargs_from_env`` needs of a node: its args and kwargs."""

    def __init__(self, node: fx.Node, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs, self.name, self.op, self.target = args, kwargs, node.name, node.op, node.target


class LinearizedTwin(nn.Module):
    """The linearized twin of ``model`` (a deep copy; the model is not modified)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        root = copy.deepcopy(model)
        self.gm = fx.GraphModule(root, _Tracer().trace(root))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TwinInterpreter(self.gm).run(x)


def linearized_twin(model: nn.Module) -> LinearizedTwin:
    """The linearized twin of ``model``: Input x Gradient of it is what LRP-0 must equal."""
    return LinearizedTwin(model)


def _call(node: fx.Node, gm: fx.GraphModule) -> Callable:
    """The original op as a function of its first argument (other arguments bound)."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if node.op == "call_method":
        name = node.target.rstrip("_") if node.target.endswith("_") and not node.target.endswith("__") \
            else node.target
        return _Method(name, rest, kwargs)
    return _Bound(node.target, rest, kwargs)


class _Bound:
    def __init__(self, fn: Callable, rest: tuple, kwargs: dict) -> None:
        self.fn, self.rest, self.kwargs = fn, rest, {k: v for k, v in kwargs.items() if k != "inplace"}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.rest, **self.kwargs)


class _Method(_Bound):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(x, self.fn)(*self.rest, **self.kwargs)


def _apply_secant(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    return secant(fn, x)


def _apply_detached(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    return fn(x).detach()


def _with_held_softmax(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn`` with every ``F.softmax`` inside it held (its output detached): for functions that
    fx keeps as one call (torchvision wraps Swin's window attention with ``torch.fx.wrap``)."""
    original = F.softmax

    def held(*a: Any, **k: Any) -> torch.Tensor:
        return original(*a, **k).detach()

    F.softmax = held
    try:
        return fn(*args, **kwargs)
    finally:
        F.softmax = original


#: fx-wrapped library functions that compute attention inside: run with the softmax held
_WRAPPED_ATTENTION = {("torchvision.models.swin_transformer", "shifted_window_attention")}


def _replacement(node: fx.Node, key: Any, gm: fx.GraphModule) -> tuple[Callable, tuple, dict] | None:
    x = node.args[0] if node.args else None
    if node.op == "call_function" and (getattr(key, "__module__", None), getattr(key, "__name__", None)) \
            in _WRAPPED_ATTENTION:
        return _with_held_softmax, (key, *node.args), dict(node.kwargs)
    if isinstance(key, nn.MultiheadAttention):
        return multihead_attention, (key, *node.args[1:]), dict(node.kwargs)
    if key is F.scaled_dot_product_attention:
        return attention, tuple(node.args), dict(node.kwargs)
    if type(key) is nn.LayerNorm:
        return layer_norm, (x, key.normalized_shape, key.weight, key.bias, key.eps), {}
    if isinstance(key, nn.RMSNorm):
        return rms_norm, (x, key.normalized_shape, key.weight, key.eps), {}
    if isinstance(key, nn.GroupNorm):
        return group_norm, (x, key.num_groups, key.weight, key.bias, key.eps), {}
    if isinstance(key, nn.modules.instancenorm._InstanceNorm):
        return group_norm, (x, key.num_features, key.weight, key.bias, key.eps), {}
    if key is F.layer_norm:
        b = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args), **node.kwargs)
        return layer_norm, (b["input"], b["normalized_shape"], b.get("weight"), b.get("bias"), b.get("eps", 1e-5)), {}
    if key is F.group_norm:
        b = dict(zip(("input", "num_groups", "weight", "bias", "eps"), node.args), **node.kwargs)
        return group_norm, (b["input"], b["num_groups"], b.get("weight"), b.get("bias"), b.get("eps", 1e-5)), {}
    if key in _SOFTMAX or isinstance(key, nn.Softmax):
        return _apply_detached, (_call(node, gm), x), {}
    gate = key in _GATES or isinstance(key, (nn.Sigmoid, nn.Hardsigmoid))
    if gate and _is_gate(node, gm):
        return _apply_detached, (_call(node, gm), x), {}
    if isinstance(key, _ACT_MODULES) or key in _ACT_FUNCTIONS or (node.op == "call_method" and key in _ACT_METHODS):
        return _apply_secant, (_call(node, gm), x), {}
    return None


def input_x_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Input x Gradient of ``model`` for ``target`` (autograd)."""
    xg = x.detach().clone().requires_grad_(True)
    out = model(xg)
    grad, = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xg)
    return (xg * grad).detach()
