"""Dataflow analyses on a :class:`~lrpfx.compiler.match.Plan`, in the style of fx's ``ShapeProp``.

Each pass computes one fact per node of the relevance path and writes it into ``node.meta``
under ``"lrpfx_facts"``, so that building ops and emitting code read facts instead of
recomputing them:

* ``rel_inputs``: the inputs that take relevance from the node (a block's anchor: the block input);
* ``rel_users``: how many relevance shares the node's value receives;
* ``nonneg``: the value is provably >= 0 (ReLU outputs, and pools, sums, reshapes, gates of them);
* ``zero_at_zero``: the value's relevance is provably 0 wherever the value is 0 (from its consumers' rules);
* ``rectified``: a conv/linear output or residual sum whose ReLU may run in place in the forward replay.

:func:`analyze` runs them in order and checks its postcondition: every path node has every fact.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from lrpfx.compiler.match import Plan, relevance_inputs

FACTS = ("rel_inputs", "rel_users", "nonneg", "zero_at_zero", "rectified")
#: kinds whose output is >= 0 when every relevance-taking input is
_NONNEG_THROUGH = frozenset({"maxpool", "avgpool", "adaptive_avgpool", "reshape", "add", "gate", "routing"})


def facts(node: fx.Node) -> dict[str, Any]:
    """The facts the analyses wrote on ``node``."""
    return node.meta.setdefault("lrpfx_facts", {})


def relevance_edges(plan: Plan) -> None:
    """``rel_inputs`` and ``rel_users``: the relevance dataflow, with each block as one op."""
    pathset = set(plan.path)
    for n in plan.path:
        facts(n)["rel_users"] = 0
    for n in plan.path:
        a = plan.assignments.get(n)
        if a is not None and a.block is not None:
            ins = [a.block.input] if a.anchor is n else []
        else:
            ins = relevance_inputs(n, plan.kinds.get(n), pathset)
        facts(n)["rel_inputs"] = ins
    for n in plan.path:
        for i in facts(n)["rel_inputs"]:
            facts(i)["rel_users"] += 1


def nonnegativity(plan: Plan) -> None:
    """``nonneg``: values proven non-negative at compile time."""
    for n in plan.path:
        kind = plan.kinds.get(n)
        ins = relevance_inputs(n, kind, set(plan.path))
        if kind == "relu" or (kind == "hardtanh" and n.args[1] >= 0):
            value = True
        elif kind == "cat":  # every part, on the path or not, must be >= 0
            value = all(facts(i).get("nonneg", False) for i in n.args[0])
        elif kind in _NONNEG_THROUGH and ins:
            value = all(facts(i).get("nonneg", False) for i in ins)  # a gate (sigmoid, hard-sigmoid) is >= 0
        else:
            value = False
        facts(n)["nonneg"] = value


def zero_at_zero(plan: Plan) -> None:
    """``zero_at_zero``: the relevance of the value is 0 wherever the value is 0 (from its consumers' rules)."""
    consumers: dict[fx.Node, list[fx.Node]] = {n: [] for n in plan.path}
    for n in plan.path:
        for i in facts(n)["rel_inputs"]:
            consumers[i].append(n)
    for n in reversed(plan.path):
        ok = n is not plan.output and bool(consumers[n])
        for u in consumers[n] if ok else []:
            mode = plan.assignments[u].rule.zero_at_zero
            ok &= mode == "proportional" or (mode == "transmit" and facts(u)["zero_at_zero"])
        facts(n)["zero_at_zero"] = ok


def rectification(plan: Plan) -> None:
    """``rectified``: conv/linear outputs and residual sums whose ReLU can run in place in the forward.

    Safe where the ReLU's output gets zero relevance wherever it is zero: the layer's rule then
    sees no difference between z and relu(z), and the activation is never copied. Block rules
    read the ReLU outputs (and h_m, which no ReLU follows), never a conv's output. A sum
    qualifies when its own rule says it does (``Rule.rectified_sum``: the epsilon family's
    proportional split), or when one block covers the sum and its ReLU (block rules read the
    summands and the ReLU's output, never the sum).
    """
    for n in plan.path:
        facts(n)["rectified"] = False
    for n in plan.path:
        src = n.args[0] if n.args else None
        if plan.kinds.get(n) != "relu" or not isinstance(src, fx.Node) or len(src.users) != 1:
            continue
        a, src_kind = plan.assignments.get(n), plan.kinds.get(src)
        if src_kind == "add":
            sa = plan.assignments.get(src)
            # a block rule reads its summands and its ReLU's output, never the sum itself
            same_block = sa is not None and sa.block is not None and a is not None and a.block is sa.block
            own_rule = sa is not None and sa.block is None and type(sa.rule).rectified_sum
            if not (same_block or own_rule):
                continue
        elif src_kind not in ("conv", "linear"):
            continue
        in_block = a is not None and a.block is not None and a.anchor is not n and src in a.nodes
        if facts(n)["zero_at_zero"] or in_block:
            facts(src)["rectified"] = True


PASSES = (relevance_edges, nonnegativity, zero_at_zero, rectification)


def analyze(plan: Plan) -> Plan:
    """Run every analysis on ``plan`` (facts in ``node.meta["lrpfx_facts"]``); returns ``plan``."""
    for n in plan.path:
        n.meta["lrpfx_facts"] = {}
    for run in PASSES:
        run(plan)
    missing = [n.name for n in plan.path if set(FACTS) - set(facts(n))]
    assert not missing, f"analysis postcondition: nodes without every fact: {missing}"
    return plan
