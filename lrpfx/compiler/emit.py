"""Stage 4: write the relevance graph and return it as a GraphModule.

The generated forward is ``forward(x, target=None)``: first the forward replay under
the trace's names, then the output relevance, then one rule application per node in
reverse graph order. ``rel_<v>`` is the relevance of forward value ``<v>``; a value with
several users gets one share per user, ``rel_<v>_from_<user>``, summed into ``rel_<v>``.
Hyperparameters are keyword literals; the math is in :mod:`lrpfx.relevance.kernels`.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from lrpfx.relevance import kernels
from lrpfx.errors import LrpfxError
from lrpfx.compiler.match import Plan, relevance_inputs
from lrpfx.compiler.patterns import gate_operands
from lrpfx.compiler.transposes import transpose_of
from lrpfx.relevance.rules import Call, Op


#: op-table kinds whose rules use the op's transpose
TABLE_KINDS = frozenset({"routing", "linear_op", "norm"})


class Emitter:
    """Builds the relevance graph for one :class:`Plan`."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.gm = plan.gm
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.shares: dict[fx.Node, list[tuple[str, fx.Node]]] = {}
        self._made: dict[int, fx.Node] = {}  # Call objects shared within one rule application
        self.pathset = pathset = set(plan.path)
        self.rel_inputs = {n: relevance_inputs(n, plan.kinds.get(n), pathset) for n in plan.path}
        self.nonneg = self._nonneg()
        self.n_rel_users = {n: 0 for n in plan.path}
        for n in plan.path:
            for i in self._inputs_of(n):
                self.n_rel_users[i] += 1
        self.rectified = self._rectifiable()
        self.ratio = plan.ratio_form()  # propagate c = R / value (LRP-0 networks) instead of R

    # ------------------------------------------------------------------ graph building
    def forward_replay(self) -> tuple[fx.Node, fx.Node]:
        """Copy the forward graph; returns (target placeholder, logits)."""
        x = self.graph.placeholder(self.plan.input.name)
        x.meta = dict(self.plan.input.meta)
        target = self.graph.placeholder("target", default_value=None)
        self.env[self.plan.input] = x
        ndim, channels = self._input_spec()
        if ndim is not None:
            self.graph.call_function(kernels.check_input, (x,), {"ndim": ndim, "channels": channels})
        for n in self.gm.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            if n.op == "call_function" and n.target is torch.relu and n.args[0] in self.rectified:
                # named through the graph's namespace: a plain rename would let a later node take the name
                self.env[n] = self.graph.create_node("call_function", torch.relu_, (self.env[n.args[0]],),
                                                     name=n.name)
                continue
            self.env[n] = self.graph.node_copy(n, lambda a: self.env[a])
        return target, self.env[self.plan.output]

    def _zero_at_zero(self) -> dict[fx.Node, bool]:
        """Values whose relevance is provably 0 wherever the value is 0 (from the consumers' rules)."""
        out: dict[fx.Node, bool] = {}
        consumers: dict[fx.Node, list[fx.Node]] = {n: [] for n in self.plan.path}
        for n in self.plan.path:
            for i in self._inputs_of(n):
                consumers[i].append(n)
        for n in reversed(self.plan.path):
            if n is self.plan.output or not consumers[n]:
                out[n] = False
                continue
            ok = True
            for u in consumers[n]:
                mode = self.plan.assignments[u].rule.zero_at_zero
                ok &= mode == "proportional" or (mode == "transmit" and out.get(u, False))
            out[n] = ok
        return out

    def _rectifiable(self) -> set[fx.Node]:
        """Conv/linear outputs whose ReLU can run in place in the forward.

        Safe where the ReLU's output gets zero relevance wherever it is zero: the layer's rule
        then sees no difference between z and relu(z), and the activation is never copied.
        """
        zero = self._zero_at_zero()
        found = set()
        for n in self.plan.path:
            src = n.args[0] if n.args else None
            if self.plan.kinds.get(n) != "relu" or not isinstance(src, fx.Node) or len(src.users) != 1 \
                    or self.plan.kinds.get(src) not in ("conv", "linear"):
                continue
            a = self.plan.assignments.get(n)
            # block rules read the ReLU outputs (and h_m, which no ReLU follows), never a conv's output
            in_block = a is not None and a.block is not None and a.anchor is not n and src in a.nodes
            if zero.get(n, False) or in_block:
                found.add(src)
        return found

    def relevance(self, target: fx.Node, logits: fx.Node) -> fx.Node:
        """Emit the relevance pass; returns the node holding the input relevance."""
        top_fn = kernels.ratio_top if self.ratio else kernels.top_relevance
        top = self._node(Call(top_fn, (logits, target), {"top": self.plan.ruleset.top}),
                         f"{self._prefix}_{self.plan.output.name}", {"rule": f"top={self.plan.ruleset.top}"})
        self.shares[self.plan.output] = [("output", top)]
        done: set[int] = set()
        for n in reversed(self.plan.path):
            if n.op == "placeholder":
                continue
            rel = self._combine(n)
            if rel is None:
                continue
            a = self.plan.assignments[n]
            if a.anchor is not n or id(a) in done:
                continue  # interior node of a block: the block's rule covers it
            done.add(id(a))
            self._apply(a, n, rel)
        rel_x = self._combine(self.plan.input)
        if rel_x is None:
            raise LrpfxError("no relevance reaches the input: the output does not depend on it.")
        if self.ratio:  # R_x = x * c_x
            rel_x = self._node(Call(operator.mul, (self.env[self.plan.input], rel_x)), None,
                               {"rule": "input times its ratio"})
        return rel_x

    @property
    def _prefix(self) -> str:
        """Name prefix of the propagated values: relevance R, or ratios c = R / value."""
        return "c" if self.ratio else "rel"

    def _apply(self, a: Any, n: fx.Node, rel: fx.Node) -> None:
        if a.block is not None:
            op = self._block_op(a, rel)
            inputs = [a.block.input]
        else:
            op = self._op(n, rel)
            inputs = self.rel_inputs[n]
        calls = a.rule.apply_ratio(op) if self.ratio else a.rule.apply(op)
        self._made.clear()
        meta = {"pattern": a.pattern, "rule": str(a.rule), "source": n.name, "rel_out": rel.name,
                "block": a.block is not None, "form": "ratio" if self.ratio else "relevance"}
        p = self._prefix
        for i, call in zip(inputs, calls):
            if not isinstance(call, Call):  # the rule passes a relevance through unchanged: no new line
                self.shares.setdefault(i, []).append((n.name, call))
                continue
            name = f"{p}_{i.name}" if self.n_rel_users[i] == 1 else f"{p}_{i.name}_from_{n.name}"
            share = self._node(call, name, meta)
            share.meta["lrpfx"]["share_of"] = i.name
            self.shares.setdefault(i, []).append((n.name, share))

    def _combine(self, n: fx.Node) -> fx.Node | None:
        shares = self.shares.pop(n, [])
        if len(shares) <= 1:
            return shares[0][1] if shares else None
        total = shares[0][1]
        for i, (_, s) in enumerate(shares[1:]):
            name = f"{self._prefix}_{n.name}" if i == len(shares) - 2 else None
            total = self._node(Call(operator.add, (total, s)), name, {"rule": "sum of shares"})
        return total

    def _node(self, call: Call, name: str | None, meta: dict[str, str]) -> fx.Node:
        args = tuple(self._materialize(a, meta) for a in call.args)
        kwargs = {k: self._materialize(v, meta) for k, v in call.kwargs.items()}
        node = self.graph.create_node("call_function", call.fn, args, kwargs, name=name)
        node.meta["lrpfx"] = dict(meta)
        return node

    def _materialize(self, v: Any, meta: dict[str, str]) -> Any:
        if isinstance(v, (list, tuple)) and any(isinstance(x, Call) for x in v):
            return type(v)(self._materialize(x, meta) for x in v)
        if not isinstance(v, Call):
            return v
        if id(v) not in self._made:
            self._made[id(v)] = self._node(v, None, meta)
        return self._made[id(v)]

    # ------------------------------------------------------------------ op descriptions
    def _inputs_of(self, n: fx.Node) -> list[fx.Node]:
        a = self.plan.assignments.get(n)
        if a is not None and a.block is not None:
            return [a.block.input] if a.anchor is n else []
        return self.rel_inputs.get(n, [])

    def _op(self, n: fx.Node, rel: fx.Node) -> Op:
        kind = self.plan.kinds[n]
        ins = self.rel_inputs[n]
        op = Op(kind=kind, node=n.name, inputs=[self.env[i] for i in ins], out=self.env[n], rel=rel,
                nonneg=[self.nonneg.get(i, False) for i in ins])
        if n.op == "call_module" and kind not in TABLE_KINDS:
            self._module_facts(op, n, self.gm.get_submodule(n.target))
        elif kind == "cat":  # the parts that take relevance, by position (cat([x, x]) gives x two shares)
            parts = list(n.args[0])
            op.attrs.update({"parts": [self.env[p] for p in parts], "dim": n.args[1],
                             "index": [k for k, p in enumerate(parts) if p in self.pathset]})
        if kind in TABLE_KINDS:
            op.attrs["transpose"] = transpose_of(n, ins, self.env, self.gm, kind, self.param)
        if n in self.rectified:
            op.attrs["z_rectified"] = True
        return op

    def _block_op(self, a: Any, rel: fx.Node) -> Op:
        b = a.block
        skip = b.roles.get("skip_conv")
        op = Op(kind=a.pattern, node=a.anchor.name, inputs=[self.env[b.input]], out=self.env[a.anchor],
                rel=rel, nonneg=[self.nonneg.get(b.input, False)])
        convs = b.chain("conv")
        op.params = {"weights": [self.param(c, "weight") for c in convs],
                     "skip_weight": None if skip is None else self.param(skip, "weight")}
        gate = b.roles.get("gate")
        pool = b.roles.get("skip_pool")
        op.attrs["gate"] = None if gate is None else self.env[gate_operands(gate)[1]]  # type: ignore[index]
        op.attrs["skip_pool"] = None if pool is None else _pool_spec(pool, self.gm.get_submodule(pool.target))
        geo = [_geometry_tuple(c, self.gm.get_submodule(c.target)) for c in convs]
        op.attrs.update({
            "acts": [self.env[r] for r in b.chain("relu")], "h_main": self.env[b.main_end],
            "h_skip": self.env[b.skip_end], "geometry": geo, "projection": b.projection,
            "skip_geometry": None if skip is None else _geometry_tuple(skip, self.gm.get_submodule(skip.target)),
            "folded": not b.chain("bn"),
        })
        return op

    def param(self, n: fx.Node, name: str) -> fx.Node | None:
        """A get_attr node for parameter/buffer ``name`` of the module called by ``n``."""
        if getattr(self.gm.get_submodule(n.target), name, None) is None:
            return None
        return self.graph.get_attr(f"{n.target}.{name}")

    def _module_facts(self, op: Op, n: fx.Node, m: nn.Module) -> None:
        if op.kind in ("conv", "linear"):
            op.params = {"weight": self.param(n, "weight"), "bias": self.param(n, "bias")}
            op.attrs["in_channels"] = m.in_channels if op.kind == "conv" else m.in_features
            if op.kind == "conv":
                op.attrs.update(_conv_geometry(n, m))
        elif op.kind == "batchnorm":
            op.params = {"running_var": self.param(n, "running_var"), "weight": self.param(n, "weight")}
            op.attrs["bn_eps"] = float(m.eps)
        elif op.kind == "maxpool" and isinstance(m, nn.AdaptiveMaxPool2d):
            op.attrs["output_size"] = _pair(m.output_size)
        elif op.kind == "maxpool":
            op.attrs.update({k: _pair(getattr(m, k) if getattr(m, k) is not None else m.kernel_size)
                             for k in ("kernel_size", "stride", "padding", "dilation")})
            op.attrs["ceil_mode"] = bool(m.ceil_mode)
        elif op.kind == "avgpool":
            kernel, stride, padding, ceil_mode, count_include_pad, divisor = _pool_spec(n, m)
            op.attrs.update({"kernel_size": kernel, "stride": stride, "padding": padding, "ceil_mode": ceil_mode,
                             "count_include_pad": count_include_pad, "divisor_override": divisor})
        elif op.kind != "adaptive_avgpool":  # a user's op: hand over the module
            op.attrs["module"] = m
            names = [k for k, _ in m.named_parameters(recurse=False)] + [k for k, _ in m.named_buffers(recurse=False)]
            op.params = {k: self.param(n, k) for k in names}

    def _nonneg(self) -> dict[fx.Node, bool]:
        """Values proven non-negative at compile time (ReLU/ReLU6 outputs, pools/sums/reshapes/gates of them)."""
        out: dict[fx.Node, bool] = {}
        for n in self.plan.path:
            kind = self.plan.kinds.get(n)
            ins = self.rel_inputs.get(n, [])
            if kind == "relu" or (kind == "hardtanh" and n.args[1] >= 0):
                out[n] = True
            elif kind == "cat":  # every part, on the path or not, must be >= 0
                out[n] = all(out.get(i, False) for i in n.args[0])
            elif kind in ("maxpool", "avgpool", "adaptive_avgpool", "reshape", "add",
                          "gate") and ins:
                out[n] = all(out.get(i, False) for i in ins)  # a gate (sigmoid, hard-sigmoid) is >= 0
            else:
                out[n] = False
        return out

    def _input_spec(self) -> tuple[int | None, int | None]:
        """(rank, channels) the first layer needs, where it reads the input directly."""
        for user in self.plan.input.users:
            if user.op == "call_module":
                m = self.gm.get_submodule(user.target)
                if isinstance(m, nn.modules.conv._ConvNd):
                    return m.weight.dim(), m.in_channels
        return None, None


def _pair(v: Any) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _pool_spec(n: fx.Node, m: nn.Module) -> tuple[Any, ...]:
    """An AvgPool2d's (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)."""
    kernel = _pair(m.kernel_size)
    stride = _pair(m.stride) if m.stride is not None else kernel
    return (kernel, stride, _pair(m.padding), bool(m.ceil_mode), bool(m.count_include_pad), m.divisor_override)


def _conv_geometry(n: fx.Node, m: nn.Module) -> dict[str, Any]:
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


def _geometry_tuple(n: fx.Node, m: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
    g = _conv_geometry(n, m)
    return g["stride"], g["padding"], g["dilation"], g["groups"]


def emit(plan: Plan, postprocess: list[tuple[Any, dict[str, Any], tuple[str, ...]]] | None = None) -> fx.GraphModule:
    """The explainer module for ``plan``: ``forward(x, target=None) -> (relevance, logits, ...)``.

    Args:
        plan: a plan with no unmatched node.
        postprocess: ``(function, kwargs, names)`` stages applied to the input relevance; each
            returns a tuple of tensors, appended to the outputs under ``names``.
    """
    e = Emitter(plan)
    target, logits = e.forward_replay()
    rel_x = e.graph.create_node("call_function", kernels.check_relevance, (e.relevance(target, logits),),
                                name="relevance")
    outputs: list[fx.Node] = [rel_x, logits]
    for fn, kwargs, names in postprocess or []:
        res = e.graph.call_function(fn, (rel_x,), kwargs)
        for i, name in enumerate(names):
            outputs.append(e.graph.create_node("call_function", operator.getitem, (res, i), name=name))
    e.graph.output(tuple(outputs))
    gm = fx.GraphModule(plan.gm, e.graph, class_name="RelevanceNetwork")
    # drop get_attr nodes a rule did not use (e.g. the bias under z+ on the flat first layer)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or n.target is kernels.check_input)
    gm.delete_all_unused_submodules()
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)  # the explainer is a pure function of its input: no autograd state
    return gm
