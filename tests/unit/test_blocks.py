"""Whole-block rules (METHOD_SPEC §1.4, §2, §7.2-7.4, §7.11) and block matching."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

import lrpfx
from conftest import input_x_gradient, randomize_batchnorm, rel_err, tv_model
from lrpfx.compiler.diagnostics import block_leaks
from lrpfx.relevance.rules import DenseEpsilon, DenseZPlus, EccvSplit, Op
from lrpfx.relevance.base import BlockOp


def _blocks(plan: lrpfx.Plan) -> list:
    return sorted({a.block for a in plan.assignments.values() if a.block is not None}, key=lambda b: b.nodes[-1].name)


@pytest.mark.parametrize("arch,pattern,count,projections", [
    ("resnet18", "basic_block", 8, 3), ("resnet50", "bottleneck", 16, 4),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [  # the rest of the zoo
        ("resnet34", "basic_block", 16, 3), ("resnet101", "bottleneck", 33, 4), ("resnet152", "bottleneck", 50, 4),
        ("resnext50_32x4d", "bottleneck", 16, 4), ("wide_resnet50_2", "bottleneck", 16, 4)]),
])
def test_block_counts(arch: str, pattern: str, count: int, projections: int) -> None:
    blocks = _blocks(lrpfx.inspect(tv_model(arch, dtype=torch.float32), "c3_lrp"))
    assert len(blocks) == count and {b.pattern for b in blocks} == {pattern}
    assert sum(b.projection for b in blocks) == projections


# ------------------------------------------------------------------ a user's own ResNet
class MyBottleneck(nn.Module):
    """Other attribute names, functional relu, torch.add, an in-place += and an inline shortcut."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(cin, mid, 1, bias=False)
        self.n1 = nn.BatchNorm2d(mid)
        self.spatial = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.n2 = nn.BatchNorm2d(mid)
        self.expand = nn.Conv2d(mid, cout, 1, bias=False)
        self.n3 = nn.BatchNorm2d(cout)
        self.proj = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.n1(self.reduce(x)))
        y = torch.relu(self.n2(self.spatial(y)))
        y = self.n3(self.expand(y))
        if self.proj is not None:
            return F.relu(torch.add(y, self.proj(x)))
        y += x
        return y.relu_()


class MyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.body = nn.Sequential(MyBottleneck(8, 4, 16, 1), MyBottleneck(16, 4, 16, 1), MyBottleneck(16, 8, 32, 2))
        self.classifier = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(self.stem(x)).mean((2, 3)))


@pytest.fixture
def my_resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(MyResNet()).eval().double()


def test_handwritten_bottlenecks_match(my_resnet: nn.Module) -> None:
    blocks = _blocks(lrpfx.inspect(my_resnet, "c3_lrp"))
    assert [b.pattern for b in blocks] == ["bottleneck"] * 3
    assert [b.projection for b in sorted(blocks, key=lambda b: b.nodes[0].name)] == [True, False, True]


def test_timm_blocks_match() -> None:
    timm = pytest.importorskip("timm")
    for name, pattern, count in (("resnet18", "basic_block", 8), ("resnet50", "bottleneck", 16)):
        blocks = _blocks(lrpfx.inspect(timm.create_model(name, pretrained=False).eval(), "c3_lrp"))
        assert len(blocks) == count and {b.pattern for b in blocks} == {pattern}


class SkipExtra(nn.Module):
    """A near miss: a bottleneck whose shortcut has an extra op (a max-pool)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        y = self.c3(F.relu(self.c2(F.relu(self.c1(x)))))
        return self.fc(F.relu(y + self.pool(x)).mean((2, 3)))


def test_near_miss_falls_back_to_per_op_rules_and_is_reported() -> None:
    plan = lrpfx.inspect(SkipExtra().eval(), "c3_lrp")
    assert not _blocks(plan) and not plan.unmatched
    assert any(m.startswith("add: a sum not matched as bottleneck or basic_block") and "maxpool" in m
               for m in plan.near_misses)
    assert "near miss: add" in str(plan)
    assert {plan.assignments[n].rule.name for n in plan.path if plan.kinds.get(n) == "conv"} == {"flat", "zplus"}


# ------------------------------------------------------------------ dense_eps (Formulation A)
@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_dense_eps_at_zero_composed_is_input_x_gradient(arch: str) -> None:  # §7.2
    model = tv_model(arch)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    t = torch.tensor([2, 6])
    zero = DenseEpsilon(eps=0.0)
    explainer = lrpfx.compile(model, "lrp0", bindings={"bottleneck": zero, "basic_block": zero})
    assert rel_err(explainer(x, t)[0], input_x_gradient(model, x, t)) < 1e-6


def test_dense_eps_at_zero_on_handwritten_resnet(my_resnet: nn.Module) -> None:
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    t = torch.tensor([0, 3, 4])
    explainer = lrpfx.compile(my_resnet, "lrp0", bindings={"bottleneck": DenseEpsilon(eps=0.0)})
    assert rel_err(explainer(x, t)[0], input_x_gradient(my_resnet, x, t)) < 1e-6


def _block_model(block: nn.Module) -> nn.Module:
    """The block alone, its output flattened: 'logits' = O, so a float target is R_O itself."""
    return nn.Sequential(block, nn.Flatten()).eval().double()


@pytest.mark.parametrize("kind", ["bottleneck_projection", "bottleneck_identity", "basic_projection"])
def test_dense_eps_blockwise_matches_autograd_and_its_leak_is_the_effective_bias(kind: str) -> None:
    torch.manual_seed(1)
    if kind == "basic_projection":
        block = BasicBlock(8, 8, 2, downsample=nn.Sequential(nn.Conv2d(8, 8, 1, 2, bias=False), nn.BatchNorm2d(8)))
        rules = {"basic_block": DenseEpsilon(eps=1e-3)}
    elif kind == "bottleneck_identity":
        block, rules = Bottleneck(16, 4), {"bottleneck": DenseEpsilon(eps=1e-3)}
    else:
        block = Bottleneck(8, 4, 2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16)))
        rules = {"bottleneck": DenseEpsilon(eps=1e-3)}
    model = _block_model(randomize_batchnorm(block))
    cin = block.conv1.in_channels
    x = torch.rand(2, cin, 8, 8, dtype=torch.float64)  # a block input is a ReLU output: >= 0
    out = model(x)
    r_out = torch.rand_like(out) * (out > 0)
    explainer = lrpfx.compile(model, "lrp0", bindings=rules)
    r_x, _ = explainer(x, r_out)
    # oracle: x * (dO/dx)^T (R / (O + eps)) by autograd on the block alone
    xg = x.clone().requires_grad_(True)
    o = model(xg)
    s = (r_out / (o.detach() + 1e-3)).where(o.detach() > 0, torch.zeros_like(o))
    grad, = torch.autograd.grad(o, xg, s)
    assert rel_err(r_x, x * grad) < 1e-10
    # the leak is carried by the effective bias b_eff = O - J x (METHOD_SPEC §2 A)
    _, jx = torch.func.jvp(model, (x,), (x,))
    b_eff = out - jx
    leak = ((b_eff + 1e-3) / (out + 1e-3) * r_out).where(out > 0, torch.zeros_like(out)).sum(1)
    assert torch.allclose(r_out.sum(1) - r_x.flatten(1).sum(1), leak, rtol=1e-8)
    lam = block_leaks(explainer, x, r_out)
    assert len(lam) == 1
    assert torch.allclose(next(iter(lam.values())), leak / r_out.sum(1), rtol=1e-8)


# ------------------------------------------------------------------ dense_zplus (Formulation B)
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    return conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)


def test_dense_zplus_equals_explicit_jacobian_of_positive_twin() -> None:
    torch.manual_seed(2)
    block = randomize_batchnorm(Bottleneck(8, 4, 2, downsample=nn.Sequential(
        nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))))
    model = _block_model(block)
    x = torch.rand(1, 8, 6, 6, dtype=torch.float64)
    out = model(x)
    r_out = torch.rand_like(out)
    eps = 1e-6
    r_x, _ = lrpfx.compile(model, "lrp0", bindings={"bottleneck": DenseZPlus(stabilizer=eps)})(x, r_out)
    b = block
    with torch.no_grad():  # the real forward's ReLU masks
        m1 = (b.bn1(b.conv1(x)) > 0).double()
        m2 = (b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x))))) > 0).double()
        mo = (out > 0).double().view(1, 16, 3, 3)
    w1, w2, w3 = (_fold(c, n).clamp(min=0).detach() for c, n in ((b.conv1, b.bn1), (b.conv2, b.bn2), (b.conv3, b.bn3)))
    wd = _fold(b.downsample[0], b.downsample[1]).clamp(min=0).detach()

    def twin(v: torch.Tensor) -> torch.Tensor:
        h = m1 * F.conv2d(v, w1)
        h = m2 * F.conv2d(h, w2, stride=2, padding=1)
        return (F.conv2d(h, w3) + F.conv2d(v, wd, stride=2)).flatten()

    jac = torch.autograd.functional.jacobian(twin, x).reshape(-1, x.numel())  # (out, in)
    u_plus = jac @ x.flatten()
    expected = x.flatten() * (jac.t() @ (r_out.flatten() * mo.flatten() / (u_plus + eps)))
    assert torch.allclose(r_x.flatten(), expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_c3_lrp_is_non_negative_and_conserves_per_block(arch: str) -> None:  # §7.3, §7.4
    model = tv_model(arch)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)  # non-negative input
    target = model(x).argmax(1)
    explainer = lrpfx.compile(model, "c3_lrp")
    # a positive output relevance (the target's probability) keeps every block's relevance >= 0
    r_top = torch.nn.functional.one_hot(target, 10).double() * model(x).softmax(1)
    relevance, _ = explainer(x, r_top)
    assert (relevance >= 0).all()
    leaks = block_leaks(explainer, x, r_top)
    assert len(leaks) == (8 if arch == "resnet18" else 16)
    assert all(v.abs().max() < 1e-5 for v in leaks.values())


def test_c3_lrp_plan_applies_block_rule_to_all_bottlenecks() -> None:
    plan = lrpfx.inspect(tv_model("resnet50", dtype=torch.float32), "c3_lrp")
    anchors = [a for n, a in plan.assignments.items() if a.block is not None and a.anchor is n]
    assert len(anchors) == 16 and {a.rule.name for a in anchors} == {"dense_zplus"}
    assert str(plan).count("DenseZPlus(stabilizer=1e-06)") == 16


# ------------------------------------------------------------------ ECCV splitting (§1.4, §7.11)
def test_split_ratio_properties() -> None:
    from lrpfx.relevance.kernels import split_ratio
    torch.manual_seed(3)
    hm, hs = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    hm[:10] = 0
    hs[:5] = 0
    r = split_ratio(hm, hs, split="ratio", eps=1e-5)
    assert ((r >= 0) & (r <= 1)).all() and (r[:5] == 0.5).all()
    rel = torch.randn(1000, dtype=torch.float64)
    r_main = r * rel
    assert torch.allclose(r_main + (rel - r_main), rel, rtol=0, atol=1e-15)
    assert (split_ratio(hm, hs, split="symmetric", eps=1e-5) == 0.5).all()


@pytest.mark.parametrize("mode,s_split,d_split", [
    ("simple", "main", "symmetric"), ("flows_skip_simple", "symmetric", "symmetric"),
    ("latest", "main", "ratio"), ("flows_skip", "ratio", "ratio")])
def test_eccv_mode_table(mode: str, s_split: str, d_split: str) -> None:
    rule = EccvSplit(mode=mode)

    def block(projection: bool) -> Op:
        return Op("bottleneck", "b", [], None, None, block=BlockOp(
            acts=[], h_main=None, h_skip=None, weights=[], skip_weight=None, geometry=[], skip_geometry=None,
            projection=projection, folded=True))
    assert rule.block_split(block(False)) == s_split
    assert rule.block_split(block(True)) == d_split


@pytest.mark.slow  # ResNet-50
def test_eccv_split_shares_sum_to_the_block_relevance() -> None:
    """Per block, R_x = R_m-path + R_s-path and both paths conserve (z+ without bias): sum R_x = sum R_O."""
    model = tv_model("resnet50")
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    for mode in ("simple", "flows_skip_simple", "latest", "flows_skip"):
        rule = EccvSplit(mode=mode, stabilizer=1e-12)
        explainer = lrpfx.compile(model, "eccv2024", bindings={"bottleneck": rule})
        leaks = block_leaks(explainer, x)
        assert all(v.abs().max() < 1e-6 for v in leaks.values()), mode


# ------------------------------------------------------------------ eccv2024 against an independent implementation
def _zplus_autograd(layer, a: torch.Tensor, rel: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """z+ by the generic 4-step recipe with autograd (Montavon et al., 2019), bias dropped."""
    a = a.detach().requires_grad_(True)
    z = layer(a) + eps
    grad, = torch.autograd.grad(z, a, (rel / z).detach())
    return (a * grad).detach()


def _reference_eccv(model: nn.Module, x: torch.Tensor, fold: bool) -> torch.Tensor:
    """The ECCV equations on a torchvision ResNet-50, written from METHOD_SPEC §1.4, not from lrpfx."""
    def w(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
        return (_fold(conv, bn) if fold else conv.weight).detach().clamp(min=0)

    def conv_plus(conv, bn):
        return lambda a: F.conv2d(a, w(conv, bn), None, conv.stride, conv.padding, conv.dilation, conv.groups)

    acts = {}
    with torch.no_grad():
        h0 = model.relu(model.bn1(model.conv1(x)))
        h = model.maxpool(h0)
        blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
        for i, b in enumerate(blocks):
            acts[i] = h
            h = b(h)
        pooled = model.avgpool(h).flatten(1)
        logits = model.fc(pooled)
    p = logits.softmax(1)
    target = logits.argmax(1)
    rel = torch.nn.functional.one_hot(target, logits.shape[1]).double() * p
    rel = _zplus_autograd(lambda a: F.linear(a, model.fc.weight.detach().clamp(min=0)), pooled, rel)
    rel = rel.view(*rel.shape, 1, 1)
    rel = _zplus_autograd(lambda a: a.mean((2, 3), keepdim=True), h, rel)  # z = mean + 1e-5
    for i in reversed(range(len(blocks))):
        b, xin = blocks[i], acts[i]
        with torch.no_grad():
            a1 = b.relu(b.bn1(b.conv1(xin)))
            a2 = b.relu(b.bn2(b.conv2(a1)))
            hm = b.bn3(b.conv3(a2))
            hs = xin if b.downsample is None else b.downsample(xin)
        ratio = torch.where((hm == 0) & (hs == 0), 0.5, hm.abs() / (hm.abs() + hs.abs() + 1e-5))
        rm, rs = ratio * rel, rel - ratio * rel
        rm = _zplus_autograd(conv_plus(b.conv3, b.bn3), a2, rm)
        rm = _zplus_autograd(conv_plus(b.conv2, b.bn2), a1, rm)
        rm = _zplus_autograd(conv_plus(b.conv1, b.bn1), xin, rm)
        if b.downsample is not None:
            rs = _zplus_autograd(conv_plus(b.downsample[0], b.downsample[1]), xin, rs)
        rel = rm + rs
    h0g = h0.detach().requires_grad_(True)
    rel, = torch.autograd.grad(model.maxpool(h0g), h0g, rel)  # winner takes all
    ones = torch.ones_like(x)
    return _zplus_autograd(conv_plus(model.conv1, model.bn1), ones, rel)  # the all-ones first layer


@pytest.mark.slow  # ResNet-50
@pytest.mark.parametrize("batchnorm", ["fold", "pass"])
def test_eccv2024_matches_independent_reference(batchnorm: str) -> None:
    model = tv_model("resnet50")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    rs = lrpfx.RuleSet.builtin("eccv2024")
    rs = lrpfx.RuleSet(rs.name, rs.bindings, rs.top, rs.description, {"batchnorm": batchnorm})
    relevance, logits = lrpfx.compile(model, rs)(x)
    expected = _reference_eccv(model, x, fold=batchnorm == "fold")
    assert rel_err(relevance, expected) < 1e-8
    # conservation: the map sums to p(predicted class) (paper Fig. 5), up to the 1e-5 stabilizers
    assert torch.allclose(relevance.sum((1, 2, 3)), logits.softmax(1).max(1).values, rtol=1e-3)
    assert (relevance >= 0).all()


@pytest.mark.slow  # ResNet-50
@pytest.mark.parametrize("inner", ["eccv", "dense_eps"])
def test_renorm_conserves_every_block(inner: str) -> None:  # METHOD_SPEC §2 C
    from lrpfx.relevance.rules import Renormalize
    model = tv_model("resnet50")
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    rule = Renormalize(inner=inner, split="symmetric", identity_skip=False)
    explainer = lrpfx.compile(model, "c3_lrp", bindings={"bottleneck": rule})
    leaks = block_leaks(explainer, x)
    # conserving up to the stabilizer: lambda = eps / (sum R_x + eps), here ~3e-7
    assert len(leaks) == 16 and all(v.abs().max() < 1e-5 for v in leaks.values())
    with pytest.raises(lrpfx.RuleSetError, match="inner='nope'"):
        lrpfx.compile(model, "c3_lrp", bindings={"bottleneck": Renormalize(inner="nope")})(x)


def test_avg_substitute_routes_like_avgpool2d() -> None:
    """The ECCV release's max-pool rule: R_j = a_j / sum_{2x2 window} a * R_k (windows of AvgPool2d(2))."""
    from lrpfx.relevance.rules import AvgSubstitute
    a = torch.rand(1, 2, 8, 8, dtype=torch.float64)
    pooled = F.max_pool2d(a, 3, 2, 1)
    r = torch.rand_like(pooled)
    ours = AvgSubstitute(stabilizer=0.0).apply(Op("maxpool", "m", [a], pooled, r))[0].evaluate()
    window_sums = F.avg_pool2d(a, 2) * 4
    expected = a * F.interpolate(r / window_sums, scale_factor=2, mode="nearest")
    assert torch.allclose(ours, expected, rtol=1e-12)
