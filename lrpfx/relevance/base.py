"""The types every rule is built from: :class:`Op` (one op as a rule sees it), :class:`BlockOp` (a
residual block's tensors and geometry), :class:`Call` (a deferred kernel call), :class:`Rule` (the
base class), and the rule registry. No tensor math and no fx here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from lrpfx.errors import RegistryError, RuleSetError

Geo = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]


@dataclass
class Op:
    """One op of the forward graph, as a rule sees it.

    Attributes:
        kind: the op kind (``conv``, ``linear``, ``batchnorm``, ``relu``, ``hardtanh``, ``maxpool``,
            ``avgpool``, ``adaptive_avgpool``, ``add``, ``cat``, ``gate``, ``reshape``).
        node: the name of the forward node (for messages).
        inputs: handles of the tensor inputs that take relevance, in order.
        out: handle of the op's forward output.
        rel: handle of the relevance of ``out``.
        params: handles of parameters (``weight``, ``bias``, ``running_var``, ...).
        attrs: static attributes (stride, padding, kernel_size, ...), literals.
        nonneg: per input, whether it is proven non-negative at compile time.
    """

    kind: str
    node: str
    inputs: list[Any]
    out: Any
    rel: Any
    params: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    nonneg: list[bool] = field(default_factory=list)
    block: BlockOp | None = None


@dataclass
class BlockOp:
    """A residual block (bottleneck or basic block) as its rule sees it: handles and static geometry.

    Attributes:
        acts: the ReLU outputs inside the main branch, in order.
        h_main, h_skip: the main branch's and the shortcut's outputs (the two summands).
        weights: the main branch's conv weights; ``skip_weight`` the projection's (None: identity).
        geometry: per main conv, (stride, padding, dilation, groups); ``skip_geometry`` the projection's.
        projection: whether the shortcut is a projection (a conv).
        folded: whether every BatchNorm of the block is folded into its conv.
        gate: the squeeze-and-excitation gate tensor, if the block has one.
        skip_pool: the average pooling in a ResNet-D shortcut, (kernel, stride, padding, ceil, count_pad, div).
    """

    acts: list[Any]
    h_main: Any
    h_skip: Any
    weights: list[Any]
    skip_weight: Any
    geometry: list[Geo]
    skip_geometry: Geo | None
    projection: bool
    folded: bool
    gate: Any = None
    skip_pool: tuple[Any, ...] | None = None


@dataclass
class Call:
    """A deferred kernel call; arguments may be handles or other calls."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def evaluate(self) -> Any:
        """Run the call on real tensors (used by tests and by eager helpers)."""
        def ev(v: Any) -> Any:
            return v.evaluate() if isinstance(v, Call) else v
        return self.fn(*(ev(a) for a in self.args), **self.kwargs)


@dataclass(frozen=True)
class Rule:
    """Base class of every rule. Subclasses set ``name`` and ``kinds``."""

    name: ClassVar[str] = ""
    kinds: ClassVar[frozenset[str]] = frozenset()
    #: how the relevance given to an input relates to that input's value: "proportional"
    #: (zero where the input is zero, R = a * c), "transmit" (the output's relevance, routed:
    #: zero where the input is zero if the output's is), or "other" (the safe default)
    zero_at_zero: ClassVar[str] = "other"
    #: whether the rule, bound to a residual sum ``u`` that only a ReLU reads, gives the same relevances
    #: when ``op.out`` holds relu(u) (the ReLU run in place), given that the sum's relevance is 0
    #: wherever u <= 0; then ``op.attrs["z_rectified"]`` is set and the sum is never copied
    rectified_sum: ClassVar[bool] = False

    def apply(self, op: Op) -> tuple[Call, ...]:
        """One call per entry of ``op.inputs``: the relevance of that input."""
        raise NotImplementedError

    def ratio_kinds(self) -> frozenset[str]:
        """Op kinds on which this rule has an exact *ratio form* (see :meth:`apply_ratio`)."""
        return frozenset()

    def apply_ratio(self, op: Op) -> tuple[Call, ...]:
        """The rule on ratios: ``op.rel`` holds c with R_out = out * c; returns c_i with R_i = input_i * c_i.

        Only for rules that are proportional with no stabilizer to divide by (LRP-0 and the
        routings): a network bound to them only is explained by the chain of these calls
        (the gradient, for LRP-0 on ReLU networks), with no division and no product per
        layer. Called only for kinds in :meth:`ratio_kinds`.
        """
        raise NotImplementedError

    def __str__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{type(self).__name__}({args})"



# --------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Rule]] = {}


def register_rule(cls: type[Rule] | None = None, *, replace: bool = False) -> Any:
    """Register a rule class under its ``name`` (usable as ``@register_rule`` or ``@register_rule(replace=True)``).

    A name registered twice raises :class:`RegistryError`, also for the same class: a second
    registration is almost always a name clash or a module run twice. ``replace=True`` replaces
    a rule of your own under that name (e.g. when re-running a notebook cell); the built-in
    rules cannot be replaced. :func:`unregister_rule` removes one.
    """
    if cls is None:
        return lambda c: register_rule(c, replace=replace)
    if not isinstance(cls, type) or not issubclass(cls, Rule):
        raise RegistryError(f"register_rule takes a Rule subclass, not {cls!r}.")
    if not cls.name:
        raise RegistryError(f"{cls.__name__} has no `name`. Hint: set `name: ClassVar[str] = '...'`.")
    if cls.name in _REGISTRY:
        if _is_builtin(cls.name):
            raise RegistryError(f"{cls.name!r} is a built-in rule ({_REGISTRY[cls.name].__name__}). "
                                "Hint: give your rule another name.")
        if not replace:
            same = " (the same class, registered twice)" if _REGISTRY[cls.name] is cls else ""
            raise RegistryError(f"a rule named {cls.name!r} is already registered "
                                f"({_REGISTRY[cls.name].__name__}){same}. Hint: choose another name, or pass "
                                "replace=True to replace your own rule.")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_rule(name: str) -> None:
    """Remove a rule of your own from the registry (built-in rules stay)."""
    if _is_builtin(name):
        raise RegistryError(f"{name!r} is a built-in rule and cannot be unregistered.")
    if _REGISTRY.pop(name, None) is None:
        raise RegistryError(f"no rule named {name!r} is registered.")


def _is_builtin(name: str) -> bool:
    """A rule lrpfx itself defines (in :mod:`lrpfx.relevance`): its name is reserved."""
    cls = _REGISTRY.get(name)
    return cls is not None and cls.__module__.startswith("lrpfx.relevance.")


def rule_class(name: str) -> type[Rule]:
    """The rule class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RuleSetError(f"unknown rule {name!r}. Known rules: {', '.join(sorted(_REGISTRY))}. "
                           "Hint: register your own with lrpfx.register_rule.") from None


def registered_rules() -> dict[str, type[Rule]]:
    """A copy of the registry: name -> rule class."""
    return dict(_REGISTRY)
