"""Build the typed op a rule sees (:class:`~lrpfx.relevance.base.Op`, :class:`~lrpfx.relevance.base.BlockOp`)
from a node of the plan: its handles in the graph being emitted, its module's parameters and geometry,
and the facts the analyses wrote (:mod:`lrpfx.compiler.analysis`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx
import torch.nn as nn

from lrpfx.compiler.analysis import facts
from lrpfx.compiler.match import Assignment, Plan
from lrpfx.compiler.patterns import attention_attrs, gate_operands
from lrpfx.compiler.transposes import transpose_of
from lrpfx.errors import LrpfxError
from lrpfx.relevance.base import BlockOp, Op

#: op-table kinds whose rules use the op's transpose
TABLE_KINDS = frozenset({"routing", "linear_op", "norm"})


class OpBuilder:
    """Builds ops for one plan; ``env`` maps forward nodes to their handles in the emitted graph,
    ``param(node, name)`` gives the handle of a parameter of the module ``node`` calls."""

    def __init__(self, plan: Plan, env: dict[fx.Node, Any], param: Callable[[fx.Node, str], Any]) -> None:
        self.plan, self.gm, self.env, self.param = plan, plan.gm, env, param
        self.pathset = set(plan.path)
        self.kept: dict[fx.Node, dict[str, Any]] = {}  # values the forward replay kept for a rule (attrs)

    def op(self, n: fx.Node, rel: Any) -> Op:
        """The op of a node bound by a single-op pattern."""
        kind = self.plan.kinds[n]
        ins = facts(n)["rel_inputs"]
        op = Op(kind=kind, node=n.name, inputs=[self.env[i] for i in ins], out=self.env[n], rel=rel,
                nonneg=[facts(i)["nonneg"] for i in ins])
        if n.op == "call_module" and kind not in TABLE_KINDS:
            self._module_facts(op, n, self.gm.get_submodule(n.target))
        elif kind == "cat":  # the parts that take relevance, by position (cat([x, x]) gives x two shares)
            parts = list(n.args[0])
            op.attrs.update({"parts": [self.env[p] for p in parts], "dim": n.args[1],
                             "index": [k for k, p in enumerate(parts) if p in self.pathset]})
        elif kind in ("softmax", "product"):  # the attention rules read the function and its operands
            op.attrs.update(attention_attrs(n, self.env))
        if kind in TABLE_KINDS:
            op.attrs["transpose"] = transpose_of(n, ins, self.env, self.gm, kind, self.param)
        if facts(n)["rectified"]:
            op.attrs["z_rectified"] = True
        op.attrs.update(self.kept.get(n, {}))
        return op

    def block_op(self, a: Assignment, rel: Any) -> Op:
        """The op of a whole residual block: its input, output and :class:`BlockOp`."""
        b = a.block
        assert b is not None
        skip, gate, pool = b.roles.get("skip_conv"), b.roles.get("gate"), b.roles.get("skip_pool")
        convs = b.chain("conv")
        block = BlockOp(
            acts=[self.env[r] for r in b.chain("relu")], h_main=self.env[b.main_end], h_skip=self.env[b.skip_end],
            weights=[self.param(c, "weight") for c in convs],
            skip_weight=None if skip is None else self.param(skip, "weight"),
            geometry=[geometry_tuple(c, self.gm.get_submodule(c.target)) for c in convs],
            skip_geometry=None if skip is None else geometry_tuple(skip, self.gm.get_submodule(skip.target)),
            projection=b.projection, folded=not b.chain("bn"),
            gate=None if gate is None else self.env[gate_operands(gate)[1]],  # type: ignore[index]
            skip_pool=None if pool is None else pool_spec(pool, self.gm.get_submodule(pool.target)))
        return Op(kind=a.pattern, node=a.anchor.name, inputs=[self.env[b.input]], out=self.env[a.anchor], rel=rel,
                  nonneg=[facts(b.input)["nonneg"]], block=block)

    def _module_facts(self, op: Op, n: fx.Node, m: nn.Module) -> None:
        if op.kind in ("conv", "linear"):
            op.params = {"weight": self.param(n, "weight"), "bias": self.param(n, "bias")}
            op.attrs["in_channels"] = m.in_channels if op.kind == "conv" else m.in_features
            if op.kind == "conv":
                op.attrs.update(conv_geometry(n, m))
        elif op.kind == "batchnorm":
            op.params = {"running_var": self.param(n, "running_var"), "weight": self.param(n, "weight")}
            op.attrs["bn_eps"] = float(m.eps)
        elif op.kind == "maxpool" and isinstance(m, nn.AdaptiveMaxPool2d):
            op.attrs["output_size"] = pair(m.output_size)
        elif op.kind == "maxpool":
            op.attrs.update({k: pair(getattr(m, k) if getattr(m, k) is not None else m.kernel_size)
                             for k in ("kernel_size", "stride", "padding", "dilation")})
            op.attrs["ceil_mode"] = bool(m.ceil_mode)
        elif op.kind == "avgpool":
            kernel, stride, padding, ceil_mode, count_include_pad, divisor = pool_spec(n, m)
            op.attrs.update({"kernel_size": kernel, "stride": stride, "padding": padding, "ceil_mode": ceil_mode,
                             "count_include_pad": count_include_pad, "divisor_override": divisor})
        elif op.kind != "adaptive_avgpool":  # a user's op: hand over the module
            op.attrs["module"] = m
            names = [k for k, _ in m.named_parameters(recurse=False)] + [k for k, _ in m.named_buffers(recurse=False)]
            op.params = {k: self.param(n, k) for k in names}


def input_spec(plan: Plan) -> tuple[int | None, int | None]:
    """(rank, channels) the first layer needs, where it reads the input directly."""
    for user in plan.input.users:
        if user.op == "call_module":
            m = plan.gm.get_submodule(user.target)
            if isinstance(m, nn.modules.conv._ConvNd):
                return m.weight.dim(), m.in_channels
    return None, None


def pair(v: Any) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def pool_spec(n: fx.Node, m: nn.Module) -> tuple[Any, ...]:
    """An AvgPool2d's (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)."""
    kernel = pair(m.kernel_size)
    stride = pair(m.stride) if m.stride is not None else kernel
    return (kernel, stride, pair(m.padding), bool(m.ceil_mode), bool(m.count_include_pad), m.divisor_override)


def conv_geometry(n: fx.Node, m: nn.Module) -> dict[str, Any]:
    if m.padding_mode != "zeros":
        raise LrpfxError(f"node {n.name!r} ({type(m).__name__}): padding_mode={m.padding_mode!r} is not supported "
                         "(relevance is routed as with zero padding). Hint: use padding_mode='zeros'.")
    padding = m.padding
    if isinstance(padding, str):
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if padding == "valid":
            padding = tuple(0 for _ in total)
        elif all(t % 2 == 0 for t in total) and all(s == 1 for s in m.stride):
            padding = tuple(t // 2 for t in total)
        else:
            raise LrpfxError(f"node {n.name!r}: padding='same' with an even receptive field pads asymmetrically, "
                             "which lrpfx does not support. Hint: pad explicitly with F.pad before the conv.")
    return {"stride": tuple(m.stride), "padding": tuple(padding), "dilation": tuple(m.dilation),
            "groups": int(m.groups)}


def geometry_tuple(n: fx.Node, m: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
    g = conv_geometry(n, m)
    return g["stride"], g["padding"], g["dilation"], g["groups"]


