"""Architectures beyond torchvision's ResNets: timm's ResNet family, VGG, MobileNetV2, DenseNet, EfficientNet.

Each either compiles with every node covered under every built-in rule set and passes the
oracles that apply to its ops, or raises one UnmatchedNodeError that lists exactly the ops
lrpfx does not support. The oracles (METHOD_SPEC §7.1, float64, autograd):

* ReLU networks (ResNet, ResNet-D, pre-activation ResNetV2, VGG, DenseNet): LRP-0 is Input x Gradient.
* Squeeze-and-excitation: the gate takes no relevance ("signal takes all"), so LRP-0 is
  Input x Gradient of the same model with its gates detached.
* ReLU6 (MobileNetV2) passes relevance like ReLU, i.e. LRP-0 uses the secant slope
  relu6(z)/z where autograd uses the derivative: LRP-0 is Input x Gradient of the model with
  each ReLU6 replaced by z * (relu6(z)/z).detach(), and plain Input x Gradient while no unit clips at 6.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import lrpfx
from conftest import input_x_gradient, randomize_batchnorm, rel_err
from lrpfx.compiler.canonicalize import canonicalize
from lrpfx.compiler.match import plan
from lrpfx.relevance.ruleset import RuleSet
from lrpfx.compiler.trace import trace

pytestmark = pytest.mark.slow  # a sweep over published architectures (torchvision and timm)

timm = pytest.importorskip("timm")

X_SHAPE = (1, 3, 64, 64)


def _timm(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(timm.create_model(name, pretrained=False, num_classes=10)).eval().double()


def _tv(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    return randomize_batchnorm(model).eval().double()


def _vgg11_bn() -> nn.Module:
    """torchvision's vgg11_bn with a narrow classifier (the 4096-wide one is 0.5 GB in float64)."""
    model = _tv("vgg11_bn")
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10)).double()
    return model.eval()


def _covered_under_every_builtin_ruleset(model: nn.Module) -> None:
    gm = canonicalize(trace(model))
    for name in lrpfx.builtin_rulesets():
        p = plan(gm, RuleSet.builtin(name))
        assert not p.unmatched, (name, p.unmatched)


def _blocks(model: nn.Module) -> list:
    p = lrpfx.inspect(model, "c3_lrp")
    return list({id(a.block): a.block for a in p.assignments.values() if a.block is not None}.values())


def _lrp0_vs(oracle_model: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    target = model(x).argmax(1)
    relevance, logits = lrpfx.compile(model, "lrp0")(x, target)
    assert rel_err(logits, model(x)) < 1e-12
    return rel_err(relevance, input_x_gradient(oracle_model, x, target))


def _run(model: nn.Module, rules: str, x: torch.Tensor) -> torch.Tensor:
    relevance, _ = lrpfx.compile(model, rules)(x)
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()
    return relevance


# ------------------------------------------------------------------ ReLU networks: LRP-0 == Input x Gradient
RELU_NETS = {
    "timm_resnet18": lambda: _timm("resnet18"),
    "timm_resnet50": lambda: _timm("resnet50"),
    "timm_resnet50d": lambda: _timm("resnet50d"),  # deep stem, average-pool-then-conv shortcuts
    "timm_resnetv2_50": lambda: _timm("resnetv2_50"),  # pre-activation, F.batch_norm
    "vgg11_bn": _vgg11_bn,
    "densenet121": lambda: _tv("densenet121"),  # concatenation, BatchNorm before ReLU before conv
}
BLOCKS = {"timm_resnet18": ("basic_block", 8), "timm_resnet50": ("bottleneck", 16),
          "timm_resnet50d": ("bottleneck", 16), "timm_resnetv2_50": (None, 0), "vgg11_bn": (None, 0),
          "densenet121": (None, 0)}


@pytest.mark.parametrize("arch", sorted(RELU_NETS))
def test_relu_networks_compile_and_lrp0_is_input_x_gradient(arch: str) -> None:
    model = RELU_NETS[arch]()
    _covered_under_every_builtin_ruleset(model)
    pattern, count = BLOCKS[arch]
    blocks = _blocks(model)
    assert len(blocks) == count and {b.pattern for b in blocks} <= {pattern}
    x = torch.randn(*X_SHAPE, dtype=torch.float64)
    assert _lrp0_vs(model, model, x) < 1e-6
    _run(model, "c3_lrp", x)


def test_resnet50d_average_pool_shortcuts_are_blocks_and_keep_their_pooling() -> None:
    model = _timm("resnet50d")
    pooled = [b for b in _blocks(model) if "skip_pool" in b.roles]
    assert len(pooled) == 3  # layer2..layer4: stride 2 through AvgPool2d(2, ceil_mode=True, count_include_pad=False)
    x = torch.rand(*X_SHAPE, dtype=torch.float64)
    target = model(x).argmax(1)
    r_top = torch.nn.functional.one_hot(target, 10).double() * model(x).softmax(1)
    relevance, _ = lrpfx.compile(model, "c3_lrp", bindings={"linear": lrpfx.ZPlus()})(x, r_top)
    assert (relevance >= 0).all()  # dense_zplus through pooled shortcuts keeps relevance positive
    # block-epsilon at eps = 0 on every block (the pooled ones included) is Input x Gradient (§7.2)
    zero = lrpfx.relevance.rules.DenseEpsilon(eps=0.0)
    relevance, _ = lrpfx.compile(model, "lrp0", bindings={"bottleneck": zero})(x, target)
    assert rel_err(relevance, input_x_gradient(model, x, target)) < 1e-6


def test_resnet50d_with_odd_input_uses_ceil_mode_windows() -> None:
    """65x65: the shortcut's AvgPool2d(2, ceil_mode=True, count_include_pad=False) has partial windows."""
    model = _timm("resnet50d")
    x = torch.randn(1, 3, 65, 65, dtype=torch.float64)
    assert _lrp0_vs(model, model, x) < 1e-6


def test_resnetv2_keeps_preactivation_batchnorm_with_its_own_rule() -> None:
    p = lrpfx.inspect(_timm("resnetv2_50"), "lrp0")
    bns = [n for n in p.path if p.kinds.get(n) == "batchnorm"]
    # BatchNorm before ReLU before conv cannot fold backwards: the blocks' norm1 and the final norm stay
    assert len(bns) == 17 and {p.assignments[n].rule.name for n in bns} == {"zero"}
    # the ones after a conv (norm2, norm3, written as F.batch_norm) are folded
    assert not any("norm2" in n.name or "norm3" in n.name for n in bns)


# ------------------------------------------------------------------ squeeze-and-excitation
def _detach_gates(model: nn.Module) -> nn.Module:
    """The oracle model: every sigmoid module's output detached (the gate is a constant)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if "sigmoid" in type(m).__name__.lower():
            m.register_forward_hook(lambda mod, args, out: out.detach())
    return model


def test_seresnet50_gates_take_no_relevance() -> None:
    model = _timm("seresnet50")
    _covered_under_every_builtin_ruleset(model)
    blocks = _blocks(model)
    assert len(blocks) == 16 and all(b.gated for b in blocks)
    p = lrpfx.inspect(model, "lrp0")
    gates = [n for n in p.path if p.kinds.get(n) == "gate"]
    assert len(gates) == 16 and {p.assignments[n].rule.name for n in gates} == {"signal_takes_all"}
    assert not any("se_fc" in n.name for n in p.path)  # the excitation branch is off the relevance path
    x = torch.randn(*X_SHAPE, dtype=torch.float64)
    assert _lrp0_vs(_detach_gates(model), model, x) < 1e-6
    assert _lrp0_vs(model, model, x) > 1e-3  # the plain gradient also flows through the gates: not the oracle
    target = model(x).argmax(1)
    zero = lrpfx.relevance.rules.DenseEpsilon(eps=0.0)
    relevance, _ = lrpfx.compile(model, "lrp0", bindings={"bottleneck": zero})(x, target)
    assert rel_err(relevance, input_x_gradient(_detach_gates(model), x, target)) < 1e-6
    _run(model, "eccv2024", x.abs())


# ------------------------------------------------------------------ ReLU6: piecewise linear, not a ReLU
class _Secant(nn.Module):
    """relu6(z) written as z * (relu6(z) / z) with the slope detached: its gradient is the secant slope."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = torch.nn.functional.relu6(z)
        slope = torch.where(z == 0, torch.zeros_like(z), a / torch.where(z == 0, torch.ones_like(z), z))
        return z * slope.detach()


def _secant_model(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, _Secant())
    return model


def _max_relu6_input(model: nn.Module, x: torch.Tensor) -> float:
    seen: list[float] = []  # a pre-hook: the ReLU6 modules run in place
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(float(args[0].detach().max())))
             for m in model.modules() if isinstance(m, nn.ReLU6)]
    model(x)
    for h in hooks:
        h.remove()
    return max(seen)


def test_mobilenet_v2_relu6_oracles() -> None:
    model = _tv("mobilenet_v2")
    _covered_under_every_builtin_ruleset(model)
    x = torch.randn(*X_SHAPE, dtype=torch.float64) * 10
    assert _max_relu6_input(model, x) > 6  # some units clip
    assert _lrp0_vs(_secant_model(model), model, x) < 1e-6
    small = x * 1e-2  # no unit reaches 6: the pass-through is the gradient, LRP-0 is Input x Gradient
    assert _max_relu6_input(model, small) < 6
    assert _lrp0_vs(model, model, small) < 1e-6
    _run(model, "epsilon_plus_flat", x)


def test_timm_mobilenetv2_compiles() -> None:
    """timm's MobileNetV2: ReLU6 inside BatchNormAct2d (F.batch_norm), depthwise convs, linear bottlenecks."""
    model = _timm("mobilenetv2_100")
    _covered_under_every_builtin_ruleset(model)
    x = torch.randn(*X_SHAPE, dtype=torch.float64)
    assert _lrp0_vs(_secant_model(model), model, x) < 1e-6


# ------------------------------------------------------------------ EfficientNet's SiLU: the identity rule
@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_efficientnet_b0_equals_its_linearized_twin(source: str) -> None:
    """SiLU (in place, inside Conv2dNormActivation or timm's BatchNormAct2d) takes the identity rule, the
    squeeze-and-excitation gates are held: LRP-0 is Input x Gradient of the linearized twin."""
    from lrpfx.eval.twin import input_x_gradient as twin_ixg, linearized_twin
    model = _tv("efficientnet_b0") if source == "torchvision" else _timm("efficientnet_b0")
    _covered_under_every_builtin_ruleset(model)
    p = lrpfx.inspect(model, "c3_lrp")
    assert not p.unmatched and "elementwise" in p.kinds.values() and "gate" in p.kinds.values()
    x, target = torch.randn(*X_SHAPE, dtype=torch.float64), torch.arange(X_SHAPE[0]) % 3
    relevance = lrpfx.compile(model, "lrp0")(x, target)[0]
    assert rel_err(relevance, twin_ixg(linearized_twin(model), x, target)) < 1e-6


def test_timm_vgg_shape_dependent_head_is_a_trace_error_naming_the_submodule() -> None:
    """timm's VGG head (ConvMlp) branches on the input's spatial size, which fx cannot trace."""
    model = timm.create_model("vgg11", pretrained=False, num_classes=10, mlp_ratio=0.01).eval()
    with pytest.raises(lrpfx.TraceError, match=r"could not trace VGG \(inside 'pre_logits', a ConvMlp\): .*"
                                               r"Hint: .*leaf_modules=\[ConvMlp\]"):
        lrpfx.compile(model)


class NewOps(nn.Module):
    """Every op this file added, in one small net: F.batch_norm, ReLU6, concatenation, a squeeze-and-excitation
    gate, a ResNet-D block (ceil_mode average pooling in the shortcut) and global max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.c1, self.c2 = nn.Conv2d(16, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, 1, 1)
        self.pool, self.proj = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        x = torch.nn.functional.relu6(torch.nn.functional.batch_norm(
            self.stem(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
        y = torch.cat([self.a(x).relu(), self.b(x).relu()], 1)
        y = y * torch.sigmoid(self.fc2(self.fc1(y.mean((2, 3), keepdim=True)).relu()))
        y = (self.c2(self.c1(y).relu()) + self.proj(self.pool(y))).relu()
        return self.head(torch.nn.functional.adaptive_max_pool2d(y, 1).flatten(1))


def test_new_ops_export_to_torch_export_and_onnx(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomize_batchnorm(NewOps()).eval()
    assert len(_blocks(model)) == 1
    explainer = lrpfx.compile(model, "c3_lrp")
    x = torch.randn(2, 3, 15, 15)  # odd: the shortcut's pooling has partial windows
    relevance, _ = explainer(x)
    exported = lrpfx.export_program(explainer, x, target_input=False).module()(x)[0]
    assert torch.allclose(exported, relevance, rtol=1e-4, atol=1e-6)
    path = lrpfx.export_onnx(explainer, tmp_path / "new_ops.onnx", x, target_input=False)
    x3 = torch.randn(3, 3, 15, 15)  # another batch size
    onnx_relevance = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"x": x3.numpy()})[0])
    assert rel_err(onnx_relevance, explainer(x3)[0]) < 1e-4
