"""Property tests over randomly built residual CNNs (hypothesis).

A strategy draws a network spec (stem, residual units, pooling, head) and the spec builds an
``nn.Module`` written in one of the spellings users write (modules or functions, in-place
ops, several ways to add, flatten and pool). For every drawn network:

* ``compile`` succeeds under every built-in rule set, with every node covered;
* the block patterns match exactly the basic blocks and bottlenecks the spec built;
* LRP-0, and block-epsilon at eps = 0 on the blocks, equal Input x Gradient (float64,
  squeeze-and-excitation gates detached in the oracle: the gate takes no relevance);
* bias-free rule sets conserve relevance (on the network with its biases and BatchNorm
  shifts set to zero: with a bias, z+ may see a zero positive part where relevance arrives);
* z+ rule sets give non-negative relevance for a non-negative input and a positive output relevance;
* the relevance of a sample does not depend on the rest of the batch, and results are deterministic.

Bounded and seeded by default (``derandomize``, 25 examples, the profile ``ci``); the fast run
(``pytest tests/unit -m "not slow"``) takes the profile ``fast`` (4 examples plus the explicit ones,
see tests/conftest.py); a larger, randomized run:
``LRPFX_HYPOTHESIS_PROFILE=nightly pytest tests/unit/test_properties.py``.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lrpfx  # noqa: E402
from conftest import input_x_gradient, randomize_batchnorm  # noqa: E402
from lrpfx.relevance.rules import DenseEpsilon, DenseZPlus, EccvSplit  # noqa: E402

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
PROFILES = {
    "fast": settings(max_examples=4, derandomize=True, database=None, **_COMMON),  # the fast run (-m "not slow")
    "ci": settings(max_examples=25, derandomize=True, database=None, **_COMMON),
    "nightly": settings(max_examples=300, **_COMMON),
}
SETTINGS = PROFILES[os.environ.get("LRPFX_HYPOTHESIS_PROFILE", "ci")]

RELU = ("module", "module_inplace", "functional", "functional_inplace", "torch", "method", "method_inplace",
        "statement_inplace")
ADD = ("plus", "plus_swapped", "iadd", "torch_add", "method_add")
GATE = ("module", "torch", "method", "hard")
PRODUCT = ("times", "times_swapped", "method_mul")
STEM_POOL = (None, "max3s2", "max2ceil", "avg2", "avg3_nopad_count", "functional_max", "functional_avg")
GLOBAL_POOL = ("adaptive_avg", "mean", "mean_keepdim", "functional_adaptive", "adaptive_max", "adaptive_avg2", None)
FLATTEN = ("module", "torch", "view", "reshape", "method")


# ---------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class UnitSpec:
    """A residual unit: a basic block, a bottleneck, or a plain sum ``x + relu(conv(x))`` (not a block)."""

    kind: str
    cout: int
    mid: int
    stride: int
    shortcut: str  # identity | conv | pool_conv
    kernel: int
    dilation: int
    groups: int
    batchnorm: bool
    bias: bool
    se: str | None  # gate spelling, or None
    product: str
    relu: str
    add: str
    functional: bool  # F.conv2d / F.batch_norm on the module's parameters


@dataclass(frozen=True)
class NetSpec:
    cin: int
    size: int
    batch: int
    stem: tuple[int, int, int, int, int, bool, bool]  # cout, kernel, stride, padding, dilation, bias, batchnorm
    stem_relu: str
    stem_pool: str | None
    units: tuple[UnitSpec, ...]
    global_pool: str | None
    flatten: str
    head: tuple[int, ...]
    head_batchnorm: bool
    classes: int
    seed: int

    @property
    def blocks(self) -> int:
        return sum(u.kind in ("basic", "bottleneck") for u in self.units)


def _conv_out(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _pool_out(n: int, pool: str | None) -> int:
    if pool in ("max3s2", "functional_max"):
        return _conv_out(n, 3, 2, 1)
    if pool == "max2ceil":
        return -(-(n - 2) // 2) + 1
    if pool in ("avg2", "functional_avg"):
        return n // 2
    if pool == "avg3_nopad_count":
        return _conv_out(n, 3, 2, 1)
    return n


@st.composite
def unit_specs(draw: st.DrawFn, cin: int, size: int) -> UnitSpec:
    kind = draw(st.sampled_from(("basic", "bottleneck", "plain")))
    stride = draw(st.sampled_from((1, 2))) if size >= 4 and kind != "plain" else 1
    cout = cin if kind == "plain" else draw(st.sampled_from((4, 6, 8)))
    groups = draw(st.sampled_from([g for g in (1, 2) if cin % g == 0 and cout % g == 0]))
    shortcuts = ["conv", "pool_conv"] + (["identity"] if stride == 1 and cin == cout else [])
    shortcut = "identity" if kind == "plain" else draw(st.sampled_from(shortcuts))
    return UnitSpec(
        kind=kind, cout=cout, mid=draw(st.sampled_from((2, 4))) * groups, stride=stride, shortcut=shortcut,
        kernel=draw(st.sampled_from((1, 3, 5))), dilation=draw(st.sampled_from((1, 2))), groups=groups,
        batchnorm=draw(st.booleans()), bias=draw(st.booleans()),
        se=None if kind == "plain" else draw(st.sampled_from((None, None) + GATE)),
        product=draw(st.sampled_from(PRODUCT)), relu=draw(st.sampled_from(RELU)), add=draw(st.sampled_from(ADD)),
        functional=draw(st.booleans()))


@st.composite
def net_specs(draw: st.DrawFn) -> NetSpec:
    cin, size = draw(st.sampled_from((1, 3))), draw(st.integers(8, 17))
    c0, k = draw(st.sampled_from((4, 6))), draw(st.sampled_from((1, 3, 5)))
    stride, dilation = draw(st.sampled_from((1, 2))), draw(st.sampled_from((1, 2)))
    padding = draw(st.integers(0, k // 2))
    if _conv_out(size, k, stride, padding, dilation) < 2:
        dilation = 1  # a dilated stem wider than the input
    n = _conv_out(size, k, stride, padding, dilation)
    pool = draw(st.sampled_from(STEM_POOL)) if n >= 4 else None
    n = _pool_out(n, pool)
    units, c = [], c0
    for _ in range(draw(st.integers(1, 3))):
        u = draw(unit_specs(c, n))
        units.append(u)
        c, n = u.cout, -(-n // u.stride)
    return NetSpec(
        cin=cin, size=size, batch=draw(st.integers(2, 3)),
        stem=(c0, k, stride, padding, dilation, draw(st.booleans()), draw(st.booleans())),
        stem_relu=draw(st.sampled_from(RELU)), stem_pool=pool, units=tuple(units),
        global_pool=draw(st.sampled_from(GLOBAL_POOL)), flatten=draw(st.sampled_from(FLATTEN)),
        head=tuple(draw(st.lists(st.sampled_from((5, 8)), max_size=2))), head_batchnorm=draw(st.booleans()),
        classes=draw(st.integers(2, 5)), seed=draw(st.integers(0, 2**16)))


# ---------------------------------------------------------------------------------------- the network
def _relu(x: torch.Tensor, spelling: str, module: nn.Module) -> torch.Tensor:
    """ReLU in one of its spellings; the in-place ones only ever see a value nobody else reads."""
    if spelling.startswith("module"):
        return module(x)
    if spelling == "statement_inplace":  # the result is dropped: later code reads the mutated x
        x.relu_()
        return x
    return {"functional": lambda: F.relu(x), "functional_inplace": lambda: F.relu(x, inplace=True),
            "torch": lambda: torch.relu(x), "method": lambda: x.relu(), "method_inplace": lambda: x.relu_()}[spelling]()


def _add(h: torch.Tensor, s: torch.Tensor, spelling: str) -> torch.Tensor:
    if spelling == "plus":
        return h + s
    if spelling == "plus_swapped":
        return s + h
    if spelling == "iadd":
        h += s
        return h
    return torch.add(h, s) if spelling == "torch_add" else h.add(s)


class Conv(nn.Module):
    """A conv (and BatchNorm) called as modules, or as F.conv2d / F.batch_norm on their parameters."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, padding: int, dilation: int, groups: int,
                 bias: bool, batchnorm: bool, functional: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout) if batchnorm else None
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if not self.functional:
            return c(x) if self.bn is None else self.bn(c(x))
        y = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        if self.bn is not None:
            y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                             False, 0.0, self.bn.eps)
        return y


class SE(nn.Module):
    """Squeeze-and-excitation; ``detach`` makes the gate a constant (the oracle's model)."""

    def __init__(self, c: int, gate: str, product: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)
        self.sigmoid = nn.Sigmoid()
        self.gate, self.product, self.detach = gate, product, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        g = {"module": self.sigmoid, "torch": torch.sigmoid, "method": lambda t: t.sigmoid(),
             "hard": F.hardsigmoid}[self.gate](g)
        if self.detach:
            g = g.detach()
        if self.product == "times":
            return x * g
        return g * x if self.product == "times_swapped" else x.mul(g)


class Unit(nn.Module):
    def __init__(self, u: UnitSpec, cin: int) -> None:
        super().__init__()
        self.spec = u
        pad = u.dilation * (u.kernel - 1) // 2
        common = {"bias": u.bias, "batchnorm": u.batchnorm, "functional": u.functional}
        if u.kind == "plain":
            layers = [Conv(cin, cin, u.kernel, 1, pad, u.dilation, u.groups, **common)]
        elif u.kind == "basic":
            layers = [Conv(cin, u.cout, u.kernel, u.stride, pad, u.dilation, u.groups, **common),
                      Conv(u.cout, u.cout, u.kernel, 1, pad, u.dilation, u.groups, **common)]
        else:
            layers = [Conv(cin, u.mid, 1, 1, 0, 1, 1, **common),
                      Conv(u.mid, u.mid, u.kernel, u.stride, pad, u.dilation, u.groups, **common),
                      Conv(u.mid, u.cout, 1, 1, 0, 1, 1, **common)]
        self.layers = nn.ModuleList(layers)
        self.acts = nn.ModuleList([nn.ReLU(inplace=u.relu == "module_inplace") for _ in range(len(layers) + 1)])
        self.se = SE(u.cout, u.se, u.product) if u.se else None
        self.pool = None
        if u.shortcut == "pool_conv":  # ResNet-D: average pooling, then a 1x1 conv
            self.pool = (nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) if u.stride == 2
                         else nn.AvgPool2d(3, 1, 1, count_include_pad=False))
        self.proj = None if u.shortcut == "identity" else Conv(cin, u.cout, 1, 1 if self.pool else u.stride, 0, 1, 1,
                                                                **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.spec
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1 or u.kind == "plain":
                h = _relu(h, u.relu, self.acts[i])
        if self.se is not None:
            h = self.se(h)
        s = x if self.proj is None else self.proj(x if self.pool is None else self.pool(x))
        out = _add(h, s, u.add if u.kind != "plain" or u.add != "iadd" else "plus")  # never += into x
        return out if u.kind == "plain" else _relu(out, u.relu, self.acts[-1])


class RandomNet(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        c0, k, stride, padding, dilation, bias, batchnorm = spec.stem
        self.stem = Conv(spec.cin, c0, k, stride, padding, dilation, 1, bias, batchnorm, functional=False)
        self.stem_act = nn.ReLU(inplace=spec.stem_relu == "module_inplace")
        self.stem_pool = {None: None, "max3s2": nn.MaxPool2d(3, 2, 1), "max2ceil": nn.MaxPool2d(2, ceil_mode=True),
                          "avg2": nn.AvgPool2d(2), "avg3_nopad_count": nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                          "functional_max": None, "functional_avg": None}[spec.stem_pool]
        units, c = [], c0
        for u in spec.units:
            units.append(Unit(u, c))
            c = u.cout
        self.units = nn.Sequential(*units)
        self.global_pool = {"adaptive_avg": nn.AdaptiveAvgPool2d(1), "adaptive_max": nn.AdaptiveMaxPool2d(1),
                            "adaptive_avg2": nn.AdaptiveAvgPool2d(2)}.get(spec.global_pool)
        n = self._spatial()
        features = c * {"adaptive_avg2": 4, None: n * n}.get(spec.global_pool, 1)
        head: list[nn.Module] = []
        for width in spec.head:
            head += [nn.Linear(features, width)] + ([nn.BatchNorm1d(width)] if spec.head_batchnorm else [])
            head += [nn.ReLU(), nn.Dropout(0.3)]
            features = width
        self.head = nn.Sequential(*head, nn.Linear(features, spec.classes))
        self.flatten = nn.Flatten()

    def _spatial(self) -> int:
        s = self.spec
        _, k, stride, padding, dilation, _, _ = s.stem
        n = _pool_out(_conv_out(s.size, k, stride, padding, dilation), s.stem_pool)
        for u in s.units:
            n = -(-n // u.stride)
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        x = _relu(self.stem(x), s.stem_relu, self.stem_act)
        if s.stem_pool == "functional_max":
            x = F.max_pool2d(x, 3, 2, 1)
        elif s.stem_pool == "functional_avg":
            x = F.avg_pool2d(x, 2)
        elif self.stem_pool is not None:
            x = self.stem_pool(x)
        x = self.units(x)
        if s.global_pool == "mean":
            x = x.mean((2, 3))
        elif s.global_pool == "mean_keepdim":
            x = x.mean([-2, -1], keepdim=True)
        elif s.global_pool == "functional_adaptive":
            x = F.adaptive_avg_pool2d(x, (1, 1))
        elif self.global_pool is not None:
            x = self.global_pool(x)
        if True:  # a flatten in every spelling, also where the pooling already gave (N, C)
            x = {"module": lambda: self.flatten(x), "torch": lambda: torch.flatten(x, 1),
                 "view": lambda: x.view(x.size(0), -1), "reshape": lambda: x.reshape(x.shape[0], -1),
                 "method": lambda: x.flatten(1)}[s.flatten]()
        return self.head(x)


def build(spec: NetSpec) -> nn.Module:
    torch.manual_seed(spec.seed)
    return randomize_batchnorm(RandomNet(spec), spec.seed).eval().double()


def detached_gates(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, SE):
            m.detach = True
    return model


def without_biases(model: nn.Module) -> nn.Module:
    """The same network with every bias and BatchNorm shift zero (BatchNorm folds to a bias-free conv)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
                m.bias.zero_()
    return model


def _input(spec: NetSpec, nonneg: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.seed + 1)
    shape = (spec.batch, spec.cin, spec.size, spec.size)
    return torch.rand(shape, generator=g, dtype=torch.float64) if nonneg else \
        torch.randn(shape, generator=g, dtype=torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Relative L2 error below ``tol``, or both (numerically) zero."""
    scale = b.norm().item()
    return (a - b).norm().item() <= tol * scale if scale > 1e-12 else a.norm().item() <= 1e-12


def _bindings(spec: NetSpec, rules: str) -> dict | None:
    """epsilon_gamma_box's default z^B bounds are ImageNet's (RGB): a 1-channel model needs its own."""
    return {"first_layer": lrpfx.ZBox(low=-3.0, high=3.0)} if rules == "epsilon_gamma_box" and spec.cin != 3 else None


_BASIC = UnitSpec(kind="basic", cout=4, mid=2, stride=1, shortcut="conv", kernel=1, dilation=1, groups=1,
                  batchnorm=False, bias=False, se=None, product="times", relu="method_inplace", add="plus",
                  functional=False)
#: found by hypothesis: two blocks written with x.relu_() gave two generated nodes the same name
TWO_INPLACE_BLOCKS = NetSpec(cin=1, size=8, batch=2, stem=(4, 1, 1, 0, 1, False, False), stem_relu="module",
                             stem_pool=None, units=(_BASIC, _BASIC), global_pool="adaptive_avg", flatten="module",
                             head=(), head_batchnorm=False, classes=2, seed=0)


#: spellings the seeded examples do not reach: functional average pooling, global max pooling, a view,
#: a grouped dilated bottleneck with a pooled shortcut, a hard-sigmoid gate and in-place ReLUs written as
#: statements, a head with BatchNorm1d
RICH = NetSpec(cin=3, size=12, batch=2, stem=(4, 3, 1, 1, 1, True, True), stem_relu="functional_inplace",
               stem_pool="functional_avg",
               units=(UnitSpec(kind="bottleneck", cout=8, mid=4, stride=2, shortcut="pool_conv", kernel=3, dilation=2,
                               groups=2, batchnorm=True, bias=True, se="hard", product="method_mul", relu="statement_inplace",
                               add="torch_add", functional=True),),
               global_pool="adaptive_max", flatten="view", head=(8,), head_batchnorm=True, classes=3, seed=5)


# ---------------------------------------------------------------------------------------- the properties
@SETTINGS
@given(net_specs())
@example(TWO_INPLACE_BLOCKS)
@example(RICH)
def test_compiles_under_every_builtin_ruleset_and_matches_exactly_the_built_blocks(spec: NetSpec) -> None:
    model = build(spec)
    x = _input(spec)
    for name in lrpfx.builtin_rulesets():
        plan = lrpfx.inspect(model, name)
        assert not plan.unmatched, (name, plan.unmatched)
        bindings = _bindings(spec, name)
        if bindings is not None:
            with pytest.raises(lrpfx.RuleSetError, match=r"has 3 channel\(s\) but the layer takes 1 .*Hint: bind"):
                lrpfx.compile(model, name)
        relevance, logits = lrpfx.compile(model, name, bindings=bindings)(x)
        assert relevance.shape == x.shape and torch.isfinite(relevance).all(), name
        assert torch.allclose(logits, model(x), rtol=1e-10, atol=1e-12), name
    plan = lrpfx.inspect(model, "c3_lrp")
    blocks = {id(a.block): a.block for a in plan.assignments.values() if a.block is not None}
    assert len(blocks) == spec.blocks, (spec, plan.near_misses)
    built = [u for u in spec.units if u.kind != "plain"]
    found = sorted(blocks.values(), key=lambda b: list(plan.gm.graph.nodes).index(b.nodes[0]))
    assert [b.pattern for b in found] == [{"basic": "basic_block"}.get(u.kind, u.kind) for u in built]
    assert [b.projection for b in found] == [u.shortcut != "identity" for u in built]
    assert [b.gated for b in found] == [u.se is not None for u in built]
    assert ["skip_pool" in b.roles for b in found] == [u.shortcut == "pool_conv" for u in built]


@SETTINGS
@given(net_specs())
@example(RICH)
def test_lrp0_and_block_epsilon_at_zero_equal_input_x_gradient(spec: NetSpec) -> None:  # METHOD_SPEC §7.1, §7.2
    model = build(spec)
    x = _input(spec)
    target = model(x).argmax(1)
    oracle = input_x_gradient(detached_gates(model), x, target)
    relevance, _ = lrpfx.compile(model, "lrp0")(x, target)
    assert _close(relevance, oracle, 1e-6)
    zero = DenseEpsilon(eps=0.0)
    relevance, _ = lrpfx.compile(model, "lrp0", bindings={"bottleneck": zero, "basic_block": zero})(x, target)
    assert _close(relevance, oracle, 1e-6)


def _bias_free(conv: str, linear: str, blocks: object) -> lrpfx.RuleSet:
    """tests/test_compile.py's bias-free rule set (z+ convs, epsilon dense layers), with other layer rules
    (``epsilon`` or ``zplus``, bias dropped) and a block rule; stabilizers of 1e-12, so that the leak through
    them stays far below the tolerance even where a logit is close to 0."""
    rule = {"zplus": 'rule = "zplus", stabilizer = 1e-12', "epsilon": 'rule = "epsilon", eps = 1e-12'}
    rs = lrpfx.RuleSet.from_toml(f"""
name = "bias_free"
bind = [
  {{ pattern = "first_layer", rule = "flat", stabilizer = 1e-12 }},
  {{ pattern = "conv", {rule[conv]}, zero_bias = true }},
  {{ pattern = "linear", {rule[linear]}, zero_bias = true }},
  {{ pattern = "avgpool", rule = "norm", eps = 1e-12 }},
  {{ pattern = "add", rule = "norm", eps = 1e-12 }},
  {{ pattern = "maxpool", rule = "wta" }},
  {{ pattern = "relu", rule = "pass" }},
  {{ pattern = "gate", rule = "signal_takes_all" }},
  {{ pattern = "reshape", rule = "pass" }},
]""")
    return rs if blocks is None else rs.with_bindings({"bottleneck": blocks, "basic_block": blocks})


#: (conv rule, dense rule, block rule, exact): exact where every denominator that receives relevance is > 0
CONSERVING = [
    ("epsilon", "epsilon", None, True), ("epsilon", "epsilon", DenseEpsilon(eps=1e-12), True),
    ("zplus", "epsilon", DenseZPlus(stabilizer=1e-12), True),
    # the ECCV split hands z+ a share of R at h_m even where h_m < 0, and z+ on the classifier sees only
    # the positive weights: z+ absorbs what reaches a zero positive part
    ("zplus", "zplus", EccvSplit(stabilizer=1e-12), False),
    ("zplus", "zplus", EccvSplit(mode="simple", stabilizer=1e-12), False),
]


#: found by hypothesis: with its biases removed this network is dead (all logits 0), and a softmax top
#: relevance of 0.5 on a zero logit has nowhere to go; conservation is about the logit itself
DEAD_WITHOUT_BIASES = NetSpec(cin=1, size=8, batch=2, stem=(4, 1, 1, 0, 1, False, False), stem_relu="module",
                              stem_pool=None, units=(dataclasses.replace(_BASIC, relu="module"),),
                              global_pool="adaptive_avg", flatten="module", head=(), head_batchnorm=False, classes=2,
                              seed=77)


@SETTINGS
@given(net_specs(), st.sampled_from(CONSERVING))
@example(DEAD_WITHOUT_BIASES, CONSERVING[0])
def test_bias_free_rule_sets_conserve_relevance(spec: NetSpec, case: tuple) -> None:  # METHOD_SPEC §7.3
    """Exactly, for the combinations above; the ECCV split never creates relevance (z+ only absorbs).

    Per-op z+ on a residual sum is not in the list: the sum's proportional split gives the main
    branch's conv a (possibly negative) share where its output is negative, z+ then absorbs it
    where no input contributes positively (on small networks, often: 1x1 convs, few channels).
    """
    conv, linear, blocks, exact = case
    model = without_biases(build(spec))
    x = _input(spec, nonneg=True)
    logits = model(x)
    explainer = lrpfx.compile(model, _bias_free(conv, linear, blocks))
    if exact:  # the logit itself, the function value: a dead network explains 0 with 0
        target = logits.argmax(1)
        relevance, _ = explainer(x, target)
        top = logits.gather(1, target[:, None]).squeeze(1)
        assert torch.allclose(relevance.sum((1, 2, 3)), top, rtol=1e-6, atol=1e-12), (relevance.sum((1, 2, 3)), top)
    else:  # a positive output relevance, so that "absorbed" means "smaller"
        r_top = F.one_hot(logits.argmax(1), spec.classes).double() * logits.softmax(1)
        relevance, _ = explainer(x, r_top)
        assert (relevance >= 0).all() and (relevance.sum((1, 2, 3)) <= r_top.sum(1) * (1 + 1e-9)).all()


@SETTINGS
@given(net_specs())
@example(RICH)
def test_zplus_rule_sets_give_non_negative_relevance(spec: NetSpec) -> None:  # METHOD_SPEC §7.4
    """Non-negative everywhere, and never more in total than the output relevance (z+ only absorbs)."""
    model = build(spec)
    x = _input(spec, nonneg=True)
    logits = model(x)
    r_top = F.one_hot(logits.argmax(1), spec.classes).double() * logits.softmax(1)
    # c3_lrp's dense layers take epsilon, which is signed: bind z+ to them for the property
    relevance, _ = lrpfx.compile(model, "c3_lrp", bindings={"linear": lrpfx.ZPlus()})(x, r_top)
    assert (relevance >= 0).all() and (relevance.sum((1, 2, 3)) <= r_top.sum(1) * (1 + 1e-9)).all()
    relevance, _ = lrpfx.compile(model, "eccv2024")(x)  # z+ throughout, softmax top
    assert (relevance >= 0).all() and (relevance.sum((1, 2, 3)) <= r_top.sum(1) * (1 + 1e-9)).all()


@SETTINGS
@given(net_specs(), st.sampled_from(sorted(set(lrpfx.builtin_rulesets()) - {"lrp0"})))
def test_batch_independent_and_deterministic(spec: NetSpec, rules: str) -> None:
    model = build(spec)
    x = _input(spec)
    explainer = lrpfx.compile(model, rules, bindings=_bindings(spec, rules))
    relevance, logits = explainer(x)
    for i in range(spec.batch):
        alone, _ = explainer(x[i:i + 1])
        assert torch.allclose(alone[0], relevance[i], rtol=1e-9, atol=1e-12 * relevance.abs().max().item())
        others = torch.cat([x[i:i + 1], torch.randn_like(x)])  # sample i with different batch-mates
        assert torch.allclose(explainer(others)[0][0], relevance[i], rtol=1e-9,
                              atol=1e-12 * relevance.abs().max().item())
    again = explainer(x)
    assert torch.equal(again[0], relevance) and torch.equal(again[1], logits)
    assert torch.equal(lrpfx.compile(model, rules, bindings=_bindings(spec, rules))(x)[0], relevance)
