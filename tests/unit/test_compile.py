"""compile() as a user meets it: conservation, the untouched model, errors, the plan, the code."""
from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import lrpfx
from conftest import assert_snapshot, input_x_gradient, randomize_batchnorm, rel_err, tv_model
from lrpfx.relevance.kernels import reshape_as
from lrpfx.relevance.rules import Call, Op, Rule

def _bias_free() -> lrpfx.RuleSet:
    return lrpfx.RuleSet.from_toml("""
name = "bias_free"
bind = [
  { pattern = "first_layer", rule = "flat", stabilizer = 1e-9 },
  { pattern = "conv", rule = "zplus", stabilizer = 1e-9, zero_bias = true },
  { pattern = "linear", rule = "epsilon", eps = 1e-9, zero_bias = true },
  { pattern = "avgpool", rule = "norm", eps = 1e-9 },
  { pattern = "add", rule = "norm", eps = 1e-9 },
  { pattern = "maxpool", rule = "wta" },
  { pattern = "relu", rule = "pass" },
  { pattern = "reshape", rule = "pass" },
]""")


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_bias_free_rules_conserve_relevance(arch: str) -> None:  # METHOD_SPEC §7.3
    model = tv_model(arch)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    relevance, logits = lrpfx.compile(model, rules=_bias_free())(x, torch.tensor([0, 1]))
    top = logits[torch.arange(2), torch.tensor([0, 1])]
    assert torch.allclose(relevance.sum((1, 2, 3)), top, rtol=1e-6)


def test_model_is_never_modified(resnet18_f64: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = {k: v.clone() for k, v in resnet18_f64.state_dict().items()}
    out_before = resnet18_f64(x)
    for name in lrpfx.builtin_rulesets():
        lrpfx.compile(resnet18_f64, rules=name)(x)
        gc.collect()  # an explainer is a reference cycle: free each before the next (memory of the fast suite)
    after = resnet18_f64.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(out_before, resnet18_f64(x))
    assert not resnet18_f64.training


def test_generated_forward_has_no_autograd_and_no_hooks(resnet18_f64: nn.Module) -> None:
    explainer = lrpfx.compile(resnet18_f64, rules="epsilon_plus_flat")
    assert isinstance(explainer, torch.fx.GraphModule)
    assert "grad" not in explainer.code and "backward" not in explainer.code
    assert not any(m._forward_hooks or m._backward_hooks for m in explainer.modules())
    assert not any(p.requires_grad for p in explainer.parameters())
    provenance = [n.meta["lrpfx"] for n in explainer.graph.nodes if n.name.startswith("rel_")]
    assert provenance and all("rule" in m for m in provenance)


SNAPSHOT_RULES = lrpfx.builtin_rulesets()  # one per built-in rule set: tests/snapshots/resnet18_<rules>.py.txt


@pytest.mark.parametrize("rules", SNAPSHOT_RULES)
def test_code_snapshot_resnet18(rules: str) -> None:
    """The generated code is documentation: changes to it must be deliberate.

    A missing snapshot fails. Regenerate with LRPFX_UPDATE_SNAPSHOTS=1 after a deliberate change, and read the diff.
    """
    code = lrpfx.compile(torchvision.models.resnet18(weights=None).eval(), rules=rules).code
    assert_snapshot(f"resnet18_{rules}.py.txt", code)


def test_plan_table_lists_every_node_and_rule(resnet18_f64: nn.Module) -> None:
    plan = lrpfx.inspect(resnet18_f64, "epsilon_plus_flat")
    text = str(plan)
    assert "conv1" in text and "Flat(stabilizer=1e-06)" in text
    assert "layer1_0_conv1" in text and "ZPlus(stabilizer=1e-06, zero_bias=False)" in text
    assert "fc" in text and "Epsilon(eps=1e-06, zero_bias=False)" in text
    rows = {r[0]: r for r in plan.rows()}
    assert rows["conv1"][2] == "first_layer" and rows["add"][2] == "add"


# ----------------------------------------------------------------- spellings a user writes
class Handwritten(nn.Module):
    """A residual net with functional relu, torch.add, +=, x.view, x.mean and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.stem(x)), inplace=True)
        y = self.a(x).relu()
        y = self.b(y)
        y += x
        x = torch.relu_(y)
        z = torch.add(x, F.max_pool2d(x, 3, 1, 1)) if False else torch.add(x, self.a(x))
        z = z.mean((2, 3))
        return self.head(self.drop(z.view(z.size(0), -1)))


def test_handwritten_spellings_canonicalize_and_match_ixg() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(Handwritten()).eval().double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    plan = lrpfx.inspect(model, "lrp0")
    assert not plan.unmatched
    kinds = sorted(set(plan.kinds.values()))
    assert {"add", "relu", "reshape", "adaptive_avgpool", "conv", "linear"} <= set(kinds)
    assert "batchnorm" not in kinds  # folded into the stem
    target = torch.tensor([0, 2, 4])
    relevance, _ = lrpfx.compile(model, rules="lrp0")(x, target)
    assert rel_err(relevance, input_x_gradient(model, x, target)) < 1e-6


# ----------------------------------------------------------------- a user's own op and rule
class ChannelScale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class ScaleRule(Rule):
    name = "test_channel_scale"
    kinds = frozenset({"channel_scale"})

    def apply(self, op: Op) -> tuple[Call, ...]:
        assert isinstance(op.attrs["module"], ChannelScale)
        return (Call(reshape_as, (op.rel, op.inputs[0])),)  # a positive per-channel scale: R_x = R_y


def test_user_registers_pattern_and_rule_for_own_layer() -> None:
    from dataclasses import dataclass
    rule_cls = dataclass(frozen=True)(ScaleRule)
    if "test_channel_scale" not in lrpfx.registered_rules():
        lrpfx.register_rule(rule_cls)
        lrpfx.register_pattern(lrpfx.Pattern("channel_scale", module_types=(ChannelScale,)))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), ChannelScale(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model = model.eval().double()
    # traced into, its multiplication by a parameter is a linear op of the op table: exact
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    traced, _ = lrpfx.compile(model, rules="lrp0")(x, torch.tensor([0, 1]))
    assert rel_err(traced, input_x_gradient(model, x, torch.tensor([0, 1]))) < 1e-6
    # as a leaf module it is one node without a binding
    with pytest.raises(lrpfx.UnmatchedNodeError, match=r"unsupported op\(s\): ChannelScale"):
        lrpfx.compile(model, rules="lrp0", leaf_modules=[ChannelScale])
    explainer = lrpfx.compile(model, rules="lrp0", leaf_modules=[ChannelScale],
                              bindings={"channel_scale": lrpfx.relevance.rules.rule_class("test_channel_scale")()})
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    relevance, _ = explainer(x, torch.tensor([0, 1]))
    # a positive scale after a ReLU keeps LRP-0 == Input x Gradient
    assert rel_err(relevance, input_x_gradient(model, x, torch.tensor([0, 1]))) < 1e-6
    with pytest.raises(lrpfx.RegistryError, match="already registered"):
        lrpfx.register_pattern(lrpfx.Pattern("channel_scale", module_types=(ChannelScale,)))


def test_register_rule_duplicates_raise_as_documented() -> None:
    """docs/howto.md: a name registered twice raises, the same class included; replace=True for your own."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Mine(lrpfx.Rule):
        name = "test_registry_mine"
        kinds = frozenset({"conv"})

    lrpfx.register_rule(Mine)
    try:
        with pytest.raises(lrpfx.RegistryError, match=r"'test_registry_mine' is already registered \(Mine\) "
                                                       r"\(the same class, registered twice\)"):
            lrpfx.register_rule(Mine)
        other = dataclass(frozen=True)(type("Other", (Mine,), {}))
        with pytest.raises(lrpfx.RegistryError, match="already registered"):
            lrpfx.register_rule(other)
        assert lrpfx.register_rule(replace=True)(other) is other
        assert lrpfx.registered_rules()["test_registry_mine"] is other
    finally:
        lrpfx.unregister_rule("test_registry_mine")
    assert "test_registry_mine" not in lrpfx.registered_rules()
    builtin = dataclass(frozen=True)(type("MyEpsilon", (lrpfx.Epsilon,), {"name": "epsilon"}))
    with pytest.raises(lrpfx.RegistryError, match="'epsilon' is a built-in rule"):
        lrpfx.register_rule(builtin, replace=True)
    with pytest.raises(lrpfx.RegistryError, match="built-in rule and cannot be unregistered"):
        lrpfx.unregister_rule("epsilon")
    assert lrpfx.registered_rules()["epsilon"] is lrpfx.Epsilon


# ----------------------------------------------------------------- errors, each message matched
class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_raises_trace_error_with_leaf_hint() -> None:
    with pytest.raises(lrpfx.TraceError, match=r"could not trace Branchy.*Hint: .*leaf"):
        lrpfx.compile(Branchy().eval())


class Unsupported(nn.Module):
    """A product of two activations and an op outside the table (``torch.exp``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = self.b(h * h)
        return self.fc(torch.exp(h).mean((2, 3)))


def test_unsupported_op_lists_every_unmatched_node() -> None:
    with pytest.raises(lrpfx.UnmatchedNodeError, match=r"(?s)2 node\(s\).*exp, mul.*products of two "
                                                       r"input-dependent values.*register_op\(") as info:
        lrpfx.compile(Unsupported().eval(), rules="epsilon")
    assert info.value.nodes == ["mul", "exp"]


def test_train_mode_is_refused(resnet18_f64: nn.Module) -> None:
    model = copy.deepcopy(resnet18_f64).train()
    with pytest.raises(lrpfx.TrainModeError, match=r"training mode.*Hint: call model.eval\(\)"):
        lrpfx.compile(model)


def test_unknown_ruleset_name() -> None:
    with pytest.raises(lrpfx.RuleSetError, match=r"unknown rule set 'epsilon_pluss'.*Built-in rule sets: .*lrp0"):
        lrpfx.compile(nn.Linear(2, 2).eval(), rules="epsilon_pluss")


def test_malformed_toml_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nbind = [\n  { pattern = "conv", rule = }\n]\n')
    with pytest.raises(lrpfx.RuleSetError, match=r"bad.toml: invalid TOML: .*line 3"):
        lrpfx.compile(nn.Linear(2, 2).eval(), rules=bad)


def test_toml_with_unknown_rule_or_parameter(tmp_path: Path) -> None:
    with pytest.raises(lrpfx.RuleSetError, match=r"bind\[0\].*unknown rule 'zplusplus'"):
        lrpfx.RuleSet.from_toml('bind = [{ pattern = "conv", rule = "zplusplus" }]')
    with pytest.raises(lrpfx.RuleSetError, match=r"bind\[1\].*: rule 'epsilon' does not take \['epsilon'\]"):
        lrpfx.RuleSet.from_toml('bind = [{ pattern = "conv", rule = "zplus" }, '
                                '{ pattern = "linear", rule = "epsilon", epsilon = 1 }]')
    with pytest.raises(lrpfx.RuleSetError, match=r"unknown pattern 'convv'"):
        lrpfx.RuleSet.from_toml('bind = [{ pattern = "convv", rule = "zplus" }]')


def test_rule_that_does_not_apply_to_the_op() -> None:
    rs = lrpfx.RuleSet.from_toml('name = "odd"\nbind = [{ pattern = "linear", rule = "wta" }]')
    with pytest.raises(lrpfx.RuleSetError, match=r"rule 'wta' applies to \['maxpool'\]"):
        lrpfx.compile(nn.Linear(2, 2).eval(), rules=rs)


@pytest.fixture(scope="module")
def small_explainer() -> torch.fx.GraphModule:
    return lrpfx.compile(tv_model("resnet18", dtype=torch.float32), rules="epsilon_plus_flat")


@pytest.mark.parametrize("target,message", [
    (10, r"target \[10\] out of range for a model with 10 classes \(valid: 0..9\)"),
    (torch.tensor([1, -2]), r"target \[1, -2\] out of range .*valid: -1 for the predicted class"),
    (torch.tensor([1, 2, 3]), r"target has 3 entries for a batch of 2"),
    (torch.zeros(2, 3), r"float target .* must have the logits' shape \(2, 10\)"),
    ("cat", r"target must be None, an int, a LongTensor"),
])
def test_bad_target(small_explainer: torch.fx.GraphModule, target: object, message: str) -> None:
    with pytest.raises(lrpfx.InputError, match=message):
        small_explainer(torch.randn(2, 3, 32, 32), target)


def test_wrong_input_rank_channels_and_nan(small_explainer: torch.fx.GraphModule) -> None:
    with pytest.raises(lrpfx.InputError, match=r"shape \(3, 32, 32\) but the model expects 4 dimensions.*unsqueeze"):
        small_explainer(torch.randn(3, 32, 32))
    with pytest.raises(lrpfx.InputError, match=r"has 1 channels .* first layer expects 3"):
        small_explainer(torch.randn(2, 1, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(lrpfx.InputError, match=r"NaN or inf in sample\(s\) \[1\]"):
        small_explainer(x)


def test_model_returning_a_tuple_is_refused() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(x), x

    with pytest.raises(lrpfx.TraceError, match=r"returns tuple .*Hint: wrap it"):
        lrpfx.compile(Two().eval())


class Functional(nn.Module):
    """Layers written as F.conv2d / F.linear on the module's own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.b1 = nn.Parameter(torch.randn(6) * 0.1)
        self.w2 = nn.Parameter(torch.randn(4, 6 * 4 * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.conv2d(x, self.w1, self.b1, stride=2, padding=1))
        return F.linear(torch.flatten(y, 1), self.w2)


def test_functional_layers_become_layers() -> None:
    torch.manual_seed(0)
    model = Functional().eval().double()
    plan = lrpfx.inspect(model, "epsilon_plus_flat")
    assert [plan.kinds[n] for n in plan.path if n.op != "placeholder"] == ["conv", "relu", "reshape", "linear"]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    relevance, _ = lrpfx.compile(model, rules="lrp0")(x, torch.tensor([1, 3]))
    assert rel_err(relevance, input_x_gradient(model, x, torch.tensor([1, 3]))) < 1e-6


def test_a_residual_sums_relu_runs_in_place_only_where_its_rule_allows_and_changes_nothing() -> None:
    """The epsilon family's split reads the sum only where its relevance is non-zero (u > 0), so the
    sum's ReLU runs in place (no copy of the sum); a rule that does not declare ``rectified_sum``
    keeps the ReLU out of place. Both explainers give the same relevance, bit for bit."""
    from dataclasses import dataclass
    from typing import ClassVar

    from lrpfx.relevance.rules import Norm

    @dataclass(frozen=True)
    class NormReadingTheSum(Norm):
        rectified_sum: ClassVar[bool] = False

    model = tv_model("resnet18")
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    rs = lrpfx.RuleSet.builtin("epsilon_gamma_box")
    fast = lrpfx.compile(model, rs)
    slow = lrpfx.compile(model, rs.with_bindings({"add": NormReadingTheSum(eps=1e-6)}))
    assert fast.code.count("torch.relu_(add") == 8 and "torch.relu(add" not in fast.code
    assert slow.code.count("torch.relu(add") == 8 and "torch.relu_(add" not in slow.code
    assert torch.equal(fast(x, 3)[0], slow(x, 3)[0])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
