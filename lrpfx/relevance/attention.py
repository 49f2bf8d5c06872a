"""AttnLRP: the rules of Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation
for Transformers" (ICML 2024), as LXT 2.1 (``lxt.explicit.functional``) computes them.

* :class:`SoftmaxTaylor` (``softmax_taylor``): the softmax rule of Proposition 3.1, a Taylor
  decomposition at x with a bias term: R_in = x * (R_out - s * sum(R_out)), s the softmax output.
* :class:`Uniform` (``uniform``): a product of two input-dependent values (``a @ b``, ``a * b``,
  ``einsum``) splits its relevance evenly between them (Proposition 3.3): for ``a @ b``, the
  epsilon rule on each half, R_a = a * ((R / (2 z + eps)) @ b^T), R_b = b * (a^T @ (R / (2 z + eps)));
  for ``a * b``, R_a = R_b = R / 2 (LXT's ``mul2``).
* :class:`EpsilonShift` (``epsilon_shift``): LRP-epsilon with LXT's stabilizer ``z + eps`` (added,
  not signed), on linear layers (``linear_epsilon``, eps 1e-6), sums (``add2``, eps 1e-8), and the
  normalizations with the std held (``layer_norm``, eps 1e-6).

With the softmax held instead (every other built-in rule set), relevance flows through the values
only: CP-LRP (Ali et al., 2022, "XAI for Transformers: Better Explanations through Conservative
Propagation", ICML). The kernels (no fx) come first, then the rules.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lrpfx.errors import RuleSetError
from lrpfx.relevance import adjoints, kernels
from lrpfx.relevance.base import Call, Op, Rule, register_rule


# --------------------------------------------------------------------------- kernels
def shifted_divide(rel: torch.Tensor, z: torch.Tensor, *, eps: float) -> torch.Tensor:
    """``R / (z + eps)``: LXT's stabilizer (``_stabilize``), eps added whatever the sign of z."""
    return rel / (z + eps)


def softmax_taylor(x: torch.Tensor, s: torch.Tensor, rel: torch.Tensor, *, dim: int) -> torch.Tensor:
    """AttnLRP's softmax rule (Proposition 3.1): R_x = x * (R - s * sum_dim R).

    Masked scores (-inf) hold no relevance: they count as 0 (LXT does the same), and their
    probabilities are 0.
    """
    x = torch.where(torch.isneginf(x), torch.zeros_like(x), x)
    return x * (rel - s * rel.sum(dim, keepdim=True))


def uniform_matmul(a: torch.Tensor, b: torch.Tensor, z: torch.Tensor, rel: torch.Tensor, *,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform rule on z = a @ b: the epsilon rule on each half, s = R / (2 z + eps) (LXT ``matmul``)."""
    s = rel / (2 * z + eps)
    return adjoints.matmul_right(s, a, b) * a, adjoints.matmul_left(s, b, a) * b


def uniform_einsum(equation: str, z: torch.Tensor, rel: torch.Tensor, *operands: torch.Tensor,
                   which: Sequence[int], eps: float) -> tuple[torch.Tensor, ...]:
    """The uniform rule on an einsum whose operands ``which`` depend on the input: each of the n takes
    the epsilon rule on R / n, R_k = x_k * A_k^T (R / (n z + eps))."""
    s = rel / (len(which) * z + eps)
    return tuple(adjoints.einsum_operand(s, equation, k, *operands) * operands[k] for k in which)


def uniform_mul(a: torch.Tensor, b: torch.Tensor, rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform rule on the elementwise product a * b: half of R to each (summed over broadcast dims)."""
    half = rel / 2
    return adjoints.sum_like(half, a), adjoints.sum_like(half, b)


# --------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class SoftmaxTaylor(Rule):
    """The softmax rule of AttnLRP (Achtibat et al., 2024, ICML, Proposition 3.1): R_in = x (R - s sum R).

    A first-order Taylor decomposition of s = softmax(x) at x, keeping the bias term
    b_j = s_j (1 - x_j + sum_i x_i s_i): output j absorbs R_j b_j / s_j, so the rule conserves
    relevance only up to sum_j R_j (1 - x_j + <x, s>). Bound to the ``softmax`` pattern, it
    makes a rule set explain through softmax instead of holding it.
    """

    zero_at_zero: ClassVar[str] = "proportional"
    name: ClassVar[str] = "softmax_taylor"
    kinds: ClassVar[frozenset[str]] = frozenset({"softmax"})

    def apply(self, op: Op) -> tuple[Call, ...]:
        return (Call(softmax_taylor, (op.inputs[0], op.out, op.rel), {"dim": op.attrs["dim"]}),)


@dataclass(frozen=True)
class Uniform(Rule):
    """The uniform rule on products of two input-dependent values (Achtibat et al., 2024, Prop. 3.2/3.3).

    ``a @ b`` and einsum: the epsilon rule on each operand's equal share, R / (n z + eps) with n
    operands (LXT's ``matmul``, eps 1e-8). ``a * b``: R / 2 to each operand (LXT's ``mul2``).

    Args:
        eps: the stabilizer of the matrix-product form, added to n z (LXT's ``_stabilize``).
    """

    name: ClassVar[str] = "uniform"
    kinds: ClassVar[frozenset[str]] = frozenset({"product"})
    eps: float = 1e-8

    def apply(self, op: Op) -> tuple[Call, ...]:
        fn, args = op.attrs["fn"], op.attrs["args"]
        if fn is torch.matmul:
            parts, operands = Call(uniform_matmul, (args[0], args[1], op.out, op.rel), {"eps": self.eps}), args[:2]
        elif fn is operator.mul:
            parts, operands = Call(uniform_mul, (args[0], args[1], op.rel)), args[:2]
        elif fn is torch.einsum:
            operands = args[1:]
            which = [k for k, t in enumerate(operands) if any(t is h for h in op.inputs)]
            parts = Call(uniform_einsum, (args[0], op.out, op.rel, *operands), {"which": which, "eps": self.eps})
            operands = tuple(operands[k] for k in which)
        else:
            raise RuleSetError(
                f"node {op.node!r}: {getattr(fn, '__name__', fn)!r} of two input-dependent values is not a product; "
                "the uniform rule applies to a * b, a @ b and einsum. Hint: rewrite the expression so that one "
                "operand is a constant, or mark the module as a leaf and bind a rule to it.")
        return tuple(_shares(h, operands, parts) for h in op.inputs)


def _shares(h: Any, operands: Sequence[Any], parts: Call) -> Call:
    """The relevance of input ``h``: the sum of the parts of the operands that are ``h`` (``x * x``: both)."""
    mine = [Call(operator.getitem, (parts, k)) for k, t in enumerate(operands) if t is h]
    total = mine[0]
    for m in mine[1:]:
        total = Call(operator.add, (total, m))
    return total


@dataclass(frozen=True)
class EpsilonShift(Rule):
    """LRP-epsilon (Bach et al., 2015) with LXT's stabilizer: R_j = a_j sum_k w_jk R_k / (z_k + eps).

    The eps is added whatever the sign of z (LXT's ``_stabilize``), where ``epsilon`` adds
    eps * sign(z) (zennit's). On linear layers (``linear_epsilon``, eps 1e-6), normalizations with
    the std held (``layer_norm``), linear ops in one tensor, and sums (``add2``, eps 1e-8).
    """

    zero_at_zero: ClassVar[str] = "proportional"
    name: ClassVar[str] = "epsilon_shift"
    kinds: ClassVar[frozenset[str]] = frozenset({"conv", "linear", "linear_op", "norm", "add"})
    eps: float = 1e-6

    def apply(self, op: Op) -> tuple[Call, ...]:
        s = Call(shifted_divide, (op.rel, op.out), {"eps": self.eps})
        if op.kind in ("linear_op", "norm"):
            return (Call(operator.mul, (op.inputs[0], op.attrs["transpose"](s))),)
        if op.kind == "add":
            return tuple(Call(adjoints.times, (s, h, h)) for h in op.inputs)
        geometry = {} if op.kind == "linear" else {k: op.attrs[k] for k in ("stride", "padding", "dilation", "groups")}
        a = op.inputs[0]
        return (Call(operator.mul, (Call(kernels.ratio_linear, (s, a, op.params["weight"]), geometry), a)),)


for _cls in (SoftmaxTaylor, Uniform, EpsilonShift):
    register_rule(_cls)

__all__ = ["EpsilonShift", "SoftmaxTaylor", "Uniform", "shifted_divide", "softmax_taylor", "uniform_einsum",
           "uniform_matmul", "uniform_mul"]
