"""The op table (issue #15): one principled rule per op class, checked against oracles nobody here wrote.

* LRP-0 of every op class equals Input x Gradient (autograd) of the model's *linearized twin*
  (:mod:`lrpfx.eval.twin`: each activation as x * stopgrad(f(x)/x), norm stds and softmax outputs
  detached), in float64, to 1e-6 -- one small model per class, and random compositions.
* The adjoints of routing and linear ops equal the transposed Jacobian computed by autograd.
* Bias-free networks conserve relevance exactly under LRP-0.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfx
from lrpfx.eval.twin import input_x_gradient, linearized_twin
from lrpfx.relevance import adjoints



@pytest.fixture(autouse=True)
def float64():
    """Exactness is claimed in float64: every model and input of this module is built in it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def twin_error(model: nn.Module, x: torch.Tensor, target: torch.Tensor, rules: str = "lrp0") -> float:
    relevance = lrpfx.compile(model, rules)(x, target)[0]
    reference = input_x_gradient(linearized_twin(model), x, target)
    assert reference.abs().sum() > 0, "the oracle is trivially zero: the test would prove nothing"
    return ((relevance - reference).norm() / reference.norm()).item()


from opclass_models import ACTIVATIONS, MODELS, Elementwise  # noqa: E402 - one small model per op class



@pytest.mark.parametrize("name", list(MODELS))
def test_lrp0_equals_the_linearized_twin(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(2, 3, 8, 8)
    assert twin_error(model, x, torch.tensor([0, 2])) < 1e-6


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: repr(m))
def test_every_activation_takes_the_identity_rule(act: nn.Module) -> None:
    torch.manual_seed(0)
    model = Elementwise(act).eval()
    assert twin_error(model, torch.randn(2, 3, 8, 8), torch.tensor([1, 3])) < 1e-6
    assert "elementwise" in lrpfx.inspect(model, "lrp0").kinds.values()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("rules", ["epsilon_plus_flat", "c3_lrp", "epsilon_gamma_box", "eccv2024"])
def test_every_builtin_ruleset_compiles_every_class_to_finite_relevance(name: str, rules: str) -> None:
    torch.manual_seed(0)
    relevance, logits = lrpfx.compile(MODELS[name]().eval(), rules)(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0


# ----------------------------------------------------------------- random compositions
def _random_net(seed: int) -> nn.Module:
    """A random stack of blocks drawn from every op class."""
    g = torch.Generator().manual_seed(seed)
    choices = ["gelu", "ln", "gn", "scale", "shuffle", "attn", "pad_slice", "silu_res", "roll"]
    picks = [choices[i] for i in torch.randint(len(choices), (4,), generator=g)]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in picks)
            self.lns, self.gns = nn.ModuleList(nn.LayerNorm(8) for _ in picks), nn.ModuleList(
                nn.GroupNorm(4, 8) for _ in picks)
            self.scale = nn.Parameter(torch.rand(len(picks), 8, 1, 1) + 0.5)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            for i, kind in enumerate(picks):
                c = self.convs[i](h)
                if kind == "gelu":
                    h = F.gelu(c)
                elif kind == "ln":
                    h = self.lns[i](c.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                elif kind == "gn":
                    h = F.relu(self.gns[i](c))
                elif kind == "scale":
                    h = h + c * self.scale[i]
                elif kind == "shuffle":
                    h = torch.channel_shuffle(F.hardswish(c), 2)
                elif kind == "attn":
                    t = c.flatten(2)
                    h = h + (t @ (t.transpose(1, 2) @ t).softmax(-1)).view_as(c)
                elif kind == "pad_slice":
                    h = F.pad(c[:, :, 1:, 1:], (1, 0, 1, 0))
                elif kind == "silu_res":
                    h = h + F.silu(c)
                else:
                    h = c.roll((1, -1), (2, 3)).tanh()
            return self.fc(h.mean((2, 3)))
    return Net()


@pytest.mark.parametrize("seed", range(8))
def test_random_nets_equal_their_twin(seed: int) -> None:
    torch.manual_seed(seed)
    model = _random_net(seed).eval()
    assert twin_error(model, torch.randn(2, 3, 6, 6), torch.tensor([0, 3])) < 1e-6


class BiasFree(nn.Module):
    """Every class without a bias: LRP-0 must conserve relevance exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.ln = nn.LayerNorm(8, bias=False)
        self.w = nn.Parameter(torch.randn(8, 8) / 3)
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.a(x))
        h = F.pad(h[:, :, ::2, ::2], (1, 1, 1, 1)).permute(0, 2, 3, 1)
        h = self.ln(h) @ self.w
        t = h.flatten(1, 2)
        t = (t @ t.transpose(1, 2)).softmax(-1) @ t
        return self.fc(F.silu(t).mean(1) * 3.0)


def test_bias_free_networks_conserve_relevance_exactly() -> None:
    torch.manual_seed(0)
    model = BiasFree().eval()
    x, target = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 3])
    relevance, logits = lrpfx.compile(model, "lrp0")(x, target)
    top = logits.gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(relevance.flatten(1).sum(1), top, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------- the adjoints, against autograd's Jacobian
def _jacobian_transpose(f, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    jac = torch.autograd.functional.jacobian(f, a)                  # out.shape + a.shape
    return (jac.reshape(s.numel(), a.numel()).T @ s.reshape(-1)).reshape(a.shape)


ROUTES = {
    "strided slice": lambda t: t[:, :, ::2, 1:],
    "pad reflect": lambda t: F.pad(t, (1, 2, 0, 1), mode="reflect"),
    "permute": lambda t: t.permute(0, 2, 3, 1),
    "expand": lambda t: t[:, :1].expand(-1, 3, -1, -1),
    "roll": lambda t: t.roll(2, 3),
    "pixel_shuffle": lambda t: F.pixel_shuffle(t, 2),
    "repeat": lambda t: t.repeat(1, 2, 1, 1),
    "unfold": lambda t: t.unfold(2, 2, 1),
}


@pytest.mark.parametrize("name", list(ROUTES))
def test_route_back_is_the_transposed_jacobian(name: str) -> None:
    f = ROUTES[name]
    a = torch.randn(2, 4, 4, 6)
    s = torch.randn_like(f(a))
    index = f(adjoints.source_index(a))
    got, = adjoints.route_back(s, index, a)
    assert torch.allclose(got, _jacobian_transpose(f, a, s), atol=1e-12)


LINEAR = {
    "times": (lambda t: t * W4, lambda s, a: adjoints.times(s, a, W4)),
    "matmul_right": (lambda t: t @ M, lambda s, a: adjoints.matmul_right(s, a, M)),
    "matmul_left": (lambda t: M[:5].T @ t, lambda s, a: adjoints.matmul_left(s, a, M[:5].T)),
    "mean": (lambda t: t.mean((1, 3)), lambda s, a: adjoints.reduced(s, a, (1, 3), False, mean=True)),
    "sum keepdim": (lambda t: t.sum(-1, keepdim=True), lambda s, a: adjoints.reduced(s, a, -1, True, mean=False)),
    "bilinear": (lambda t: F.interpolate(t, scale_factor=1.7, mode="bilinear"),
                 lambda s, a: adjoints.interpolate_linear(s, a, None, 1.7, "bilinear", False)),
    "einsum": (lambda t: torch.einsum("nchw,cd->ndhw", t, M[:4, :3]),
               lambda s, a: adjoints.einsum_operand(s, "nchw,cd->ndhw", 0, a, M[:4, :3])),
}
W4 = torch.randn(1, 4, 1, 6, dtype=torch.float64)
M = torch.randn(6, 6, dtype=torch.float64)


def test_nearest_interpolation_routes_back_by_its_spatial_map() -> None:
    a = torch.randn(2, 3, 5, 4)
    f = lambda t: F.interpolate(t, scale_factor=(1.7, 2.0), mode="nearest")  # noqa: E731
    s = torch.randn_like(f(a))
    index = F.interpolate(adjoints.spatial_index(a), scale_factor=(1.7, 2.0), mode="nearest")
    assert torch.allclose(adjoints.route_back_spatial(s, index, a), _jacobian_transpose(f, a, s), atol=1e-12)


@pytest.mark.parametrize("name", list(LINEAR))
def test_linear_transposes_are_the_transposed_jacobian(name: str) -> None:
    f, transpose = LINEAR[name]
    a = torch.randn(2, 4, 5, 6)
    s = torch.randn_like(f(a))
    assert torch.allclose(transpose(s, a), _jacobian_transpose(f, a, s), atol=1e-12)


@pytest.mark.parametrize("norm,call", [
    (nn.LayerNorm(6), lambda s, a, m: adjoints.layer_norm(s, a, m.weight, ndim=1, eps=m.eps)),
    (nn.GroupNorm(2, 4), lambda s, a, m: adjoints.group_norm(s, a, m.weight, groups=2, eps=m.eps)),
    (nn.RMSNorm(6, eps=1e-5), lambda s, a, m: adjoints.layer_norm(s, a, m.weight, ndim=1, eps=m.eps,
                                                                  centered=False)),
])
def test_norm_transposes_hold_the_std(norm: nn.Module, call) -> None:
    """Against the Jacobian of the twin norm (std detached), by autograd."""
    from lrpfx.eval import twin
    with torch.no_grad():
        norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
    a = torch.randn(2, 4, 5, 6)
    held = {nn.LayerNorm: lambda t: twin.layer_norm(t, 6, norm.weight, None, norm.eps),
            nn.GroupNorm: lambda t: twin.group_norm(t, 2, norm.weight, None, norm.eps),
            nn.RMSNorm: lambda t: twin.rms_norm(t, 6, norm.weight, norm.eps)}[type(norm)]
    s = torch.randn_like(a)
    assert torch.allclose(call(s, a, norm), _jacobian_transpose(held, a, s), atol=1e-10)


# ----------------------------------------------------------------- declaring ops, binding by type, errors
def my_act(x: torch.Tensor) -> torch.Tensor:
    """A user's activation that fx would trace into a product of two activations."""
    return x * torch.tanh(F.softplus(x))


class UsesMyAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(my_act(self.a(x)).mean((2, 3)))


def test_a_user_declares_an_activation_in_one_line() -> None:
    torch.manual_seed(0)
    model = UsesMyAct().eval()
    with pytest.raises(lrpfx.UnmatchedNodeError, match=r"(?s)mul.*a product of two input-dependent values"):
        lrpfx.compile(model, "lrp0")
    lrpfx.register_op(my_act, kind="elementwise")
    try:
        with pytest.raises(lrpfx.RegistryError, match=r"'my_act' is already declared as 'elementwise'"):
            lrpfx.register_op(my_act, kind="elementwise")
        x, target = torch.randn(2, 3, 6, 6), torch.tensor([0, 1])
        relevance = lrpfx.compile(model, "lrp0")(x, target)[0]
        z = model.a(x)
        ratio = (my_act(z) / z).detach()
        twin_fc = lambda t: model.fc((model.a(t) * ratio).mean((2, 3)))  # noqa: E731 - the hand-made twin
        xg = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(twin_fc(xg).gather(1, target[:, None]).sum(), xg)
        reference = x * grad
        assert ((relevance - reference).norm() / reference.norm()).item() < 1e-6
    finally:
        lrpfx.unregister_op(my_act)


def test_register_op_refuses_unknown_classes() -> None:
    with pytest.raises(lrpfx.RegistryError, match=r"kind='activation' is not one of \('routing'"):
        lrpfx.register_op(torch.exp, kind="activation")


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s.view(1, -1, 1, 1)


def test_bindings_by_module_type() -> None:
    """``bindings={MyLayer: rule}``: the module stays one call and takes the bound rule."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Scale(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    plan = lrpfx.inspect(model, "epsilon", bindings={Scale: lrpfx.Identity()})
    row = next(r for r in plan.rows() if r[1] == "Scale")
    assert row[2].startswith("module:") and row[3] == "Identity()"
    # a per-channel scale is linear: the identity on it is LRP-0, and on this ReLU net LRP-0 is Input x Gradient
    x, target = torch.randn(2, 3, 6, 6), torch.tensor([0, 1])
    relevance = lrpfx.compile(model, "lrp0", bindings={Scale: lrpfx.Identity()})(x, target)[0]
    reference = input_x_gradient(model, x, target)
    assert ((relevance - reference).norm() / reference.norm()).item() < 1e-6


def test_swin_window_attention_is_expanded() -> None:
    """Swin's fx-opaque ``shifted_window_attention`` has a registered expansion (issue #21; its exactness is
    tested in tests/unit/test_attnlrp.py): the windows become routing ops, the softmax is held."""
    torchvision = pytest.importorskip("torchvision")
    plan = lrpfx.inspect(torchvision.models.swin_t(weights=None).eval(), "lrp0")
    assert not plan.unmatched
    ops = {r[1] for r in plan.rows()}
    assert {"swin_windows", "swin_unwindows"} <= ops and "shifted_window_attention" not in ops


def test_a_pass_that_leaves_an_uncanonical_node_fails_loudly() -> None:
    """Each canonicalization pass states its postcondition (fx's PassBase.ensures): checked after it runs."""
    from lrpfx.compiler import canonicalize as canon
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(AssertionError, match=r"pass unify_relu left un-canonical node\(s\): .*call_module\[target=1\]"):
        canon.check(canon.unify_relu, gm)
    canon.unify_relu(gm)
    canon.check(canon.unify_relu, gm)


def test_the_table_does_not_change_the_forward() -> None:
    torch.manual_seed(0)
    for cls in MODELS.values():
        model = cls().eval()
        x = torch.randn(2, 3, 8, 8)
        assert torch.allclose(lrpfx.compile(model, "c3_lrp")(x)[1], model(x), atol=1e-12)


def test_the_users_model_is_not_modified() -> None:
    torch.manual_seed(0)
    model = Elementwise(nn.SiLU(inplace=True)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lrpfx.compile(model, "lrp0")
    assert model.act.inplace is True
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


_ = operator  # the module is imported for readers who follow the canonical spellings
