"""Stage 4: write the relevance graph and return it as a GraphModule.

The generated forward is ``forward(x, target=None)``: first the forward replay under
the trace's names, then the output relevance, then one rule application per node in
reverse graph order. ``rel_<v>`` is the relevance of forward value ``<v>``; a value with
several users gets one share per user, ``rel_<v>_from_<user>``, summed into ``rel_<v>``.
Hyperparameters are keyword literals; the math is in :mod:`lrpfx.relevance.kernels`.

Constant folding: a call of a function marked :func:`lrpfx.relevance.kernels.constant` (the
weight transforms: w+, w + gamma w+, w^2, ...) whose inputs are all parameters or literals is
evaluated once, here, and its result registered as a buffer ``<parameter>_<suffix>`` of the
explainer; the generated forward reads the buffer. Any rule benefits: it only has to ask for
its modified weights as such calls.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from lrpfx.compiler.analysis import analyze, facts
from lrpfx.compiler.codegen import RelevanceNetwork
from lrpfx.compiler.match import Plan
from lrpfx.compiler.ops import OpBuilder, input_spec, pair
from lrpfx.errors import LrpfxError
from lrpfx.relevance import adjoints, kernels
from lrpfx.relevance.base import Call


class Emitter:
    """Builds the relevance graph for one :class:`Plan`."""

    def __init__(self, plan: Plan) -> None:
        self.plan = analyze(plan)
        self.gm = plan.gm
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.shares: dict[fx.Node, list[tuple[str, fx.Node]]] = {}
        self._made: dict[int, fx.Node] = {}  # Call objects shared within one rule application
        self._constants: dict[Any, fx.Node] = {}  # folded weight transforms, shared by every rule
        self.folded: list[str] = []  # names of the buffers registered by constant folding
        self.ops = OpBuilder(plan, self.env, self.param)
        self.ratio = plan.ratio_form()  # propagate c = R / value (LRP-0 networks) instead of R

    # ------------------------------------------------------------------ graph building
    def forward_replay(self) -> tuple[fx.Node, fx.Node]:
        """Copy the forward graph; returns (target placeholder, logits)."""
        x = self.graph.placeholder(self.plan.input.name)
        x.meta = dict(self.plan.input.meta)
        target = self.graph.placeholder("target", default_value=None)
        self.env[self.plan.input] = x
        ndim, channels = input_spec(self.plan)
        if ndim is not None:
            self.graph.call_function(kernels.check_input, (x,), {"ndim": ndim, "channels": channels})
        for n in self.gm.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            if n.op == "call_function" and n.target is torch.relu and isinstance(n.args[0], fx.Node) \
                    and n.args[0].meta.get("lrpfx_facts", {}).get("rectified"):
                # named through the graph's namespace: a plain rename would let a later node take the name
                self.env[n] = self.graph.create_node("call_function", torch.relu_, (self.env[n.args[0]],),
                                                     name=n.name)
                continue
            if self._keeps_indices(n):
                self._max_pool_with_indices(n)
                continue
            self.env[n] = self.graph.node_copy(n, lambda a: self.env[a])
        return target, self.env[self.plan.output]

    def _keeps_indices(self, n: fx.Node) -> bool:
        """Whether ``n`` is a 2-D max-pool whose own rule routes by its argmax (winner takes all): the
        forward then keeps the indices, which it computes anyway, instead of the rule recomputing them."""
        a = self.plan.assignments.get(n)
        if a is None or a.block is not None or a.anchor is not n or a.rule.name != "wta" or n.op != "call_module":
            return False
        m = self.gm.get_submodule(str(n.target))
        return type(m) is torch.nn.MaxPool2d and not m.return_indices

    def _max_pool_with_indices(self, n: fx.Node) -> None:
        m = self.gm.get_submodule(str(n.target))
        geo = {k: pair(getattr(m, k) if getattr(m, k) is not None else m.kernel_size)
               for k in ("kernel_size", "stride", "padding", "dilation")}
        both = self.graph.create_node("call_function", kernels.max_pool_with_indices, (self.env[n.args[0]],),
                                      {**geo, "ceil_mode": bool(m.ceil_mode)}, name=f"{n.name}_with_indices")
        self.env[n] = self.graph.create_node("call_function", operator.getitem, (both, 0), name=n.name)
        self.env[n].meta = dict(n.meta)
        indices = self.graph.create_node("call_function", operator.getitem, (both, 1), name=f"{n.name}_indices")
        self.ops.kept[n] = {"indices": indices}

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
            op = self.ops.block_op(a, rel)
            inputs = [a.block.input]
        else:
            op = self.ops.op(n, rel)
            inputs = facts(n)["rel_inputs"]
        calls = a.rule.apply_ratio(op) if self.ratio else a.rule.apply(op)
        self._made.clear()
        meta = {"pattern": a.pattern, "rule": str(a.rule), "rule_name": a.rule.name, "source": n.name,
                "where": self._where(a), "rel_out": rel.name, "block": a.block is not None,
                "form": "ratio" if self.ratio else "relevance"}
        p = self._prefix
        for i, call in zip(inputs, calls):
            if not isinstance(call, Call):  # the rule passes a relevance through unchanged: no new line
                self.shares.setdefault(i, []).append((n.name, call))
                continue
            name = f"{p}_{i.name}" if facts(i)["rel_users"] == 1 else f"{p}_{i.name}_from_{n.name}"
            share = self._node(call, name, meta)
            share.meta["lrpfx"]["share_of"] = i.name
            self.shares.setdefault(i, []).append((n.name, share))

    def _where(self, a: Any) -> str:
        """The module path of an assignment (a block's common prefix), else its node's name."""
        paths = [n.target.split(".") for n in a.nodes if n.op == "call_module"]
        if not paths:
            return a.anchor.name
        if len(a.nodes) == 1:
            return ".".join(paths[0])
        common = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        return ".".join(common) or a.anchor.name

    def param(self, n: fx.Node, name: str) -> fx.Node | None:
        """A get_attr node for parameter/buffer ``name`` of the module called by ``n``."""
        if getattr(self.gm.get_submodule(n.target), name, None) is None:
            return None
        return self.graph.get_attr(f"{n.target}.{name}")

    def _combine(self, n: fx.Node) -> fx.Node | None:
        shares = self.shares.pop(n, [])
        if len(shares) <= 1:
            return shares[0][1] if shares else None
        total = shares[0][1]
        for i, (_, s) in enumerate(shares[1:]):
            name = f"{self._prefix}_{n.name}" if i == len(shares) - 2 else None
            total = self._sum(total, s, name)
        return total

    def _sum(self, a: fx.Node, b: fx.Node, name: str | None) -> fx.Node:
        """a + b; where one of them is a product share ``times(s, h, factor)`` used by nothing else (a
        residual sum's skip share), the product and the sum become one ``plus_times`` (one pass, not two)."""
        for prod, other in ((a, b), (b, a)):
            if isinstance(prod, fx.Node) and prod.target is adjoints.times and not prod.users \
                    and isinstance(other, fx.Node):
                node = self.graph.create_node("call_function", adjoints.plus_times, (other, *prod.args), name=name)
                rule = prod.meta["lrpfx"]["rule"]
                node.meta["lrpfx"] = {**prod.meta["lrpfx"], "rule": f"{rule}, plus its other share"}
                self.graph.erase_node(prod)
                return node
        return self._node(Call(operator.add, (a, b)), name, {"rule": "sum of shares"})

    def _node(self, call: Call, name: str | None, meta: dict[str, str]) -> fx.Node:
        args = tuple(self._materialize(a, meta) for a in call.args)
        kwargs = {k: self._materialize(v, meta) for k, v in call.kwargs.items()}
        if kernels.is_constant(call.fn) and _static((args, kwargs)):
            return self._fold(call.fn, args, kwargs)
        node = self.graph.create_node("call_function", call.fn, args, kwargs, name=name)
        node.meta["lrpfx"] = dict(meta)
        return node

    def _fold(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
        """Evaluate a pure function of parameters now; its result becomes a buffer read by a get_attr node."""
        key = (fn, _key(args), _key(kwargs))
        if key not in self._constants:
            with torch.no_grad():
                value = fn(*_resolve(self.gm, args), **_resolve(self.gm, kwargs))
            first = next(a for a in _leaves(args) if isinstance(a, fx.Node))
            name = base = f"{first.target.replace('.', '_')}_{fn.lrpfx_constant}"
            i = 0
            while hasattr(self.gm, name):
                i += 1
                name = f"{base}_{i}"
            self.gm.register_buffer(name, value.detach().clone())  # never a view of the model's own tensor
            self.folded.append(name)
            self._constants[key] = self.graph.get_attr(name)
        return self._constants[key]

    def _materialize(self, v: Any, meta: dict[str, str]) -> Any:
        if isinstance(v, (list, tuple)) and any(isinstance(x, Call) for x in v):
            return type(v)(self._materialize(x, meta) for x in v)
        if not isinstance(v, Call):
            return v
        if id(v) not in self._made:
            self._made[id(v)] = self._node(v, None, meta)
        return self._made[id(v)]


def _leaves(v: Any) -> list[Any]:
    if isinstance(v, dict):
        v = list(v.values())
    if isinstance(v, (list, tuple)):
        return [x for a in v for x in _leaves(a)]
    return [v]


def _static(v: Any) -> bool:
    """Whether every input is a parameter (get_attr) or a literal: the call can be folded."""
    leaves = _leaves(v)
    return any(isinstance(a, fx.Node) for a in leaves) and \
        all(a.op == "get_attr" if isinstance(a, fx.Node) else not isinstance(a, torch.Tensor) for a in leaves)


def _key(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return ("attr", v.target)
    if isinstance(v, dict):
        return tuple((k, _key(a)) for k, a in sorted(v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_key(a) for a in v)
    return v


def _resolve(gm: fx.GraphModule, v: Any) -> Any:
    """get_attr nodes replaced by the tensors they read."""
    if isinstance(v, fx.Node):
        obj: Any = gm
        for part in str(v.target).split("."):
            obj = getattr(obj, part)
        return obj
    if isinstance(v, dict):
        return {k: _resolve(gm, a) for k, a in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_resolve(gm, a) for a in v)
    return v


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
    gm = RelevanceNetwork(plan.gm, e.graph, class_name="RelevanceNetwork")
    # drop get_attr nodes a rule did not use (e.g. the bias under z+ on the flat first layer)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or n.target is kernels.check_input)
    gm.delete_all_unused_submodules()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in e.folded:
        if name not in used and hasattr(gm, name):
            delattr(gm, name)  # a folded weight whose only user was dead code
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)  # the explainer is a pure function of its input: no autograd state
    return gm
