"""AttnLRP (rule sets ``attnlrp``/``attnlrp_gamma``) and the attention forms, against oracles nobody here wrote.

* LXT 2.1 itself: the tiny transformer of tests/attn_models.py under ``lxt.explicit.functional``
  (tests/reference/*.npz, written by benchmarks/lxt_reference.py in a venv of its own).
* The matrix form of each rule: the softmax rule as x * J^T (R / s) with J the softmax's Jacobian
  (autograd), the uniform rule as each operand's share of autograd's vector-Jacobian product.
* LXT's "efficient" form of AttnLRP, rebuilt here with autograd: Input x Gradient with the LayerNorm
  std detached, the gradients of q and k divided by 4 and of v by 2 (``divide_gradient``), the
  softmax differentiated as it is. It equals the explicit rules when every epsilon is 0, so the
  attention forms (``nn.MultiheadAttention`` with masks, ``F.scaled_dot_product_attention``, the
  explicit ``q @ k^T`` form) are checked against it.
* CP-LRP: LRP-0 equals Input x Gradient of the linearized twin (softmax detached).
* Conservation: with every bias zero and every epsilon 0, the softmax rule's bias term
  sum_j R_j (1 - x_j + <x, s>) is exactly what the network absorbs.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator
from unittest import mock

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import lrpfx
from attn_models import TinyTransformer, load_reference, tiny_reference_model
from lrpfx.eval.twin import input_x_gradient, linearized_twin
from lrpfx.relevance import attention as A

#: attnlrp with every epsilon 0: the explicit rules then equal LXT's efficient (gradient) form
NO_EPS = {"conv": lrpfx.Zero(), "linear": lrpfx.Zero(), "add": lrpfx.Zero(), "norm": lrpfx.Zero(),
          "product": A.Uniform(eps=0.0)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- LXT's references
@pytest.mark.parametrize("name, zero_bias", [("tiny_transformer_attnlrp", False),
                                             ("tiny_transformer_attnlrp_zero_bias", True)])
def test_tiny_transformer_equals_lxt_attnlrp(name: str, zero_bias: bool) -> None:
    ref = load_reference(name)
    model, x = tiny_reference_model(zero_bias=zero_bias)
    assert np.array_equal(x.numpy(), ref["x"])
    target = torch.tensor([int(ref["target"])])
    relevance, logits = lrpfx.compile(model, "attnlrp")(x, target)
    assert np.allclose(logits.numpy(), ref["logits"], rtol=1e-12, atol=1e-12), "the model was not rebuilt exactly"
    expected = torch.from_numpy(ref["relevance"])
    assert rel_err(relevance, expected) < 1e-6
    # the reference discriminates: CP-LRP (softmax held) is far from it
    assert rel_err(lrpfx.compile(model, "lrp0")(x, target)[0], expected) > 1e-2


# --------------------------------------------------------------------------- the rules in matrix form
@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax_rule_equals_its_matrix_form_and_leaks_its_bias_term(dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, dtype=torch.float64, generator=g) * 2
    rel = torch.randn(2, 4, 5, dtype=torch.float64, generator=g)
    s = x.softmax(dim)
    out = A.softmax_taylor(x, s, rel, dim=dim)
    jac = torch.autograd.functional.jacobian(lambda t: t.softmax(dim), x).reshape(x.numel(), x.numel())  # ds/dx
    expected = x.flatten() * (jac.T @ (rel / s).flatten())  # R_i = sum_j x_i ds_j/dx_i R_j / s_j
    assert torch.allclose(out.flatten(), expected, rtol=1e-12, atol=1e-13)
    bias_term = (rel * (1 - x + (x * s).sum(dim, keepdim=True))).sum()  # sum_j R_j b_j / s_j, Proposition 3.1
    assert math.isclose((rel.sum() - out.sum()).item(), bias_term.item(), rel_tol=1e-12, abs_tol=1e-12)


def test_softmax_rule_gives_masked_scores_nothing() -> None:
    x = torch.tensor([[0.5, float("-inf"), -1.0, 2.0]], dtype=torch.float64)
    s = x.softmax(-1)
    out = A.softmax_taylor(x, s, torch.tensor([[1.0, 0.0, 0.5, -0.3]], dtype=torch.float64), dim=-1)
    assert torch.isfinite(out).all() and out[0, 1] == 0


def _vjp_share(f: Any, operands: list[torch.Tensor], k: int, s: torch.Tensor) -> torch.Tensor:
    """x_k * d<f(operands), s>/dx_k by autograd."""
    xs = [t.clone().requires_grad_(i == k) for i, t in enumerate(operands)]
    grad, = torch.autograd.grad(f(*xs), xs[k], s)
    return operands[k] * grad


@pytest.mark.parametrize("shapes", [((2, 3, 4, 5), (2, 3, 5, 6)), ((2, 3, 4, 5), (5, 6)), ((4, 5), (2, 5, 3))])
def test_uniform_rule_on_matmul_is_the_epsilon_rule_on_each_half(shapes: tuple) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(*sh, dtype=torch.float64, generator=g) for sh in shapes)
    z = a @ b
    rel = torch.randn(z.shape, dtype=torch.float64, generator=g)
    eps = 1e-8
    ra, rb = A.uniform_matmul(a, b, z, rel, eps=eps)
    s = rel / (2 * z + eps)
    assert torch.allclose(ra, _vjp_share(torch.matmul, [a, b], 0, s), rtol=1e-12, atol=1e-12)
    assert torch.allclose(rb, _vjp_share(torch.matmul, [a, b], 1, s), rtol=1e-12, atol=1e-12)
    ra0, rb0 = A.uniform_matmul(a, b, z, rel, eps=0.0)  # without eps: half each, conserved
    assert math.isclose(ra0.sum().item(), rel.sum().item() / 2, rel_tol=1e-9)
    assert math.isclose(rb0.sum().item(), rel.sum().item() / 2, rel_tol=1e-9)


def test_uniform_rule_on_einsum_and_on_elementwise_products() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, w = (torch.randn(*sh, dtype=torch.float64, generator=g) for sh in ((2, 3, 4), (2, 5, 4), (4,)))
    eq = "bqd,bkd,d->bqk"
    z = torch.einsum(eq, q, k, w)
    rel = torch.randn(z.shape, dtype=torch.float64, generator=g)
    rq, rk = A.uniform_einsum(eq, z, rel, q, k, w, which=[0, 1], eps=0.0)  # w is a constant
    s = rel / (2 * z)
    f = lambda *t: torch.einsum(eq, *t)  # noqa: E731
    assert torch.allclose(rq, _vjp_share(f, [q, k, w], 0, s), rtol=1e-10, atol=1e-12)
    assert torch.allclose(rk, _vjp_share(f, [q, k, w], 1, s), rtol=1e-10, atol=1e-12)
    a, b = torch.randn(2, 3, 1, 1, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    rel = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ra, rb = A.uniform_mul(a, b, rel)  # LXT's mul2: R / 2 each, the broadcast operand summed
    assert torch.equal(rb, rel / 2) and torch.allclose(ra, (rel / 2).sum((2, 3), keepdim=True))


def test_uniform_rule_refuses_a_quotient_of_activations() -> None:
    class Quotient(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x / (x * x + 1.0)).sum(1, keepdim=True)
    with pytest.raises(lrpfx.RuleSetError, match=r"'truediv' of two input-dependent values is not a product.*Hint"):
        lrpfx.compile(Quotient().eval(), "attnlrp")


# --------------------------------------------------------------------------- conservation
def test_softmax_bias_term_is_the_only_leak_of_a_bias_free_network() -> None:
    """z = W1 x, s = softmax(z), f = W2 s, no biases: R_s = s * W2[c] (LRP-0), and sum R_x = f_c - sum_j R_s_j b_j / s_j."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Softmax(-1), nn.Linear(5, 3, bias=False)).double().eval()
    x = torch.randn(2, 6, dtype=torch.float64)
    target = torch.tensor([0, 2])
    relevance, logits = lrpfx.compile(model, "attnlrp", bindings={"linear": lrpfx.Zero()})(x, target)
    z = model[0](x)
    s = z.softmax(-1)
    r_s = s * model[2].weight[target]
    leak = (r_s * (1 - z + (z * s).sum(-1, keepdim=True))).sum(-1)
    f = logits.gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(relevance.sum(-1), f - leak, rtol=1e-10, atol=1e-12)
    assert (leak.abs() > 1e-3).all()  # the bias term is not negligible: the check has teeth


class _SoftmaxRecorder(fx.Interpreter):
    """Runs an explainer and records the arguments of every softmax-rule call (x, s, R_out)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target is A.softmax_taylor:
            self.calls.append((*args, kwargs["dim"]))
        return super().call_function(target, args, kwargs)


def test_tiny_transformer_leaks_exactly_the_softmax_bias_terms() -> None:
    model, x = tiny_reference_model(zero_bias=True)
    explainer = lrpfx.compile(model, "attnlrp", bindings=NO_EPS)
    recorder = _SoftmaxRecorder(explainer)
    relevance, logits = recorder.run(x, None)
    assert len(recorder.calls) == 2  # one softmax per block
    terms = sum((rel * (1 - sx + (sx * s).sum(dim, keepdim=True))).sum() for sx, s, rel, dim in recorder.calls)
    leak = logits.max() - relevance.sum()
    assert math.isclose(leak.item(), terms.item(), rel_tol=1e-9, abs_tol=1e-12)
    assert abs(terms.item()) > 1e-3 * logits.max().item()


# --------------------------------------------------------------------------- oracles by autograd
class _DivideGradient(torch.autograd.Function):
    """LXT's ``divide_gradient``: identity forward, gradient divided by ``factor``."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad / ctx.factor, None


def _scores(q: torch.Tensor, k: torch.Tensor, attn_mask: Any, is_causal: bool, scale: Any,
            enable_gqa: bool) -> torch.Tensor:
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores


def _values(v: torch.Tensor, q: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
    return v.repeat_interleave(q.shape[-3] // v.shape[-3], -3) if enable_gqa else v


def attnlrp_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
                 is_causal: bool = False, scale: Any = None, enable_gqa: bool = False) -> torch.Tensor:
    """AttnLRP as LXT's efficient patches compute it: q, k gradients / 4, v / 2, softmax differentiated."""
    q, k, v = _DivideGradient.apply(q, 4.0), _DivideGradient.apply(k, 4.0), _DivideGradient.apply(v, 2.0)
    return _scores(q, k, attn_mask, is_causal, scale, enable_gqa).softmax(-1) @ _values(v, q, enable_gqa)


def cplrp_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: Any = None, enable_gqa: bool = False) -> torch.Tensor:
    """CP-LRP (LXT's ``cp_multi_head_attention_forward``): the softmax output detached."""
    return _scores(q, k, attn_mask, is_causal, scale, enable_gqa).softmax(-1).detach() @ _values(v, q, enable_gqa)


@contextmanager
def sdpa_as(fn: Any) -> Iterator[None]:
    """Every ``F.scaled_dot_product_attention`` call (``nn.MultiheadAttention``'s too) computed by ``fn``."""
    with mock.patch.object(F, "scaled_dot_product_attention", fn):
        yield


def oracle(model: nn.Module, x: torch.Tensor, target: torch.Tensor, attention: Any) -> torch.Tensor:
    with sdpa_as(attention):
        return input_x_gradient(model, x, target)


class MHANet(nn.Module):
    """Tokens (N, T, 4) -> embedding -> ``nn.MultiheadAttention`` in one configuration -> mean -> head."""

    def __init__(self, batch_first: bool = True, need_weights: bool = False, mask: str | None = None,
                 cross: bool = False, kdim: int | None = None, tokens: int = 5, use_weights: bool = False) -> None:
        super().__init__()
        self.batch_first, self.need_weights, self.cross, self.use_weights = batch_first, need_weights, cross, use_weights
        self.embed = nn.Linear(4, 8)
        self.context = nn.Linear(4, kdim or 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, dropout=0.3)
        self.head = nn.Linear(8, 3)
        g = torch.Generator().manual_seed(5)
        attn = torch.rand(tokens, tokens, generator=g) < 0.3
        attn.fill_diagonal_(False)
        padding = torch.zeros(2, tokens, dtype=torch.bool)
        padding[1, -2:] = True
        self.masks = {"bool": (attn, None), "float": (torch.randn(tokens, tokens, generator=g), None),
                      "padding": (None, padding), "both": (attn, padding), None: (None, None)}[mask]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        kv = self.context(x) if self.cross else h
        if not self.batch_first:
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)
        attn_mask, padding = self.masks
        out, weights = self.mha(h, kv, kv, need_weights=self.need_weights, attn_mask=attn_mask,
                                key_padding_mask=padding)
        if not self.batch_first:
            out = out.transpose(0, 1)
        logits = self.head(out.mean(1))
        return logits + weights.sum((1, 2))[:, None] if self.use_weights else logits


MHA_CASES = {
    "self": {}, "seq_first": {"batch_first": False}, "need_weights": {"need_weights": True},
    "bool_mask": {"mask": "bool"}, "float_mask": {"mask": "float", "batch_first": False},
    "key_padding": {"mask": "padding"}, "both_masks_weights": {"mask": "both", "need_weights": True},
    "cross": {"cross": True}, "cross_kdim": {"cross": True, "kdim": 6, "mask": "padding"},
}


def _mha(case: str, **extra: Any) -> tuple[nn.Module, nn.Module]:
    """(model, the same model with need_weights=False: the oracle's, whose attention is one SDPA call)."""
    torch.manual_seed(7)
    model = MHANet(**MHA_CASES[case], **extra).double().eval()
    plain = MHANet(**{**MHA_CASES[case], "need_weights": False}).double().eval()
    plain.load_state_dict(model.state_dict())
    return model, plain


@pytest.mark.parametrize("case", sorted(MHA_CASES))
def test_multihead_attention_forms_equal_the_autograd_oracles(case: str) -> None:
    model, plain = _mha(case)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    target = torch.tensor([0, 2])
    relevance, logits = lrpfx.compile(model, "attnlrp", bindings=NO_EPS)(x, target)
    assert torch.allclose(logits, model(x), rtol=1e-12, atol=1e-12)
    assert rel_err(relevance, oracle(plain, x, target, attnlrp_sdpa)) < 1e-9
    cp = lrpfx.compile(model, "lrp0")(x, target)[0]
    assert rel_err(cp, oracle(plain, x, target, cplrp_sdpa)) < 1e-9
    assert rel_err(cp, relevance) > 1e-3  # the two conventions differ on this model
    default = lrpfx.compile(model, "attnlrp")(x, target)[0]  # with LXT's epsilons: close to the eps-free rules
    assert rel_err(default, relevance) < 1e-2


def test_multihead_attention_weights_are_replayed() -> None:
    """need_weights=True and the weights used in the output: the expansion returns them (mean over heads)."""
    model, _ = _mha("both_masks_weights", use_weights=True)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    for rules in ("lrp0", "attnlrp"):
        relevance, logits = lrpfx.compile(model, rules)(x)
        assert torch.allclose(logits, model(x), rtol=1e-12, atol=1e-12) and torch.isfinite(relevance).all()


@pytest.mark.parametrize(("kwargs", "why"), [({"add_bias_kv": True}, "bias_k/bias_v"),
                                             ({"add_zero_attn": True}, "add_zero_attn")])
def test_multihead_attention_that_cannot_be_expanded_is_named(kwargs: dict, why: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True, **kwargs)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0].mean(1)
    with pytest.raises(lrpfx.UnmatchedNodeError, match=rf"node 'mha' .*{why}.*Hint: build the module without it"):
        lrpfx.compile(Net().eval(), "attnlrp")


class SDPANet(nn.Module):
    """Tokens -> q, k, v projections -> ``F.scaled_dot_product_attention`` (one configuration) -> head."""

    def __init__(self, attn_mask: str | None = None, is_causal: bool = False, scale: float | None = None,
                 gqa: bool = False, explicit: bool = False) -> None:
        super().__init__()
        self.is_causal, self.scale, self.gqa, self.explicit = is_causal, scale, gqa, explicit
        self.q, self.k, self.v = nn.Linear(4, 8), nn.Linear(4, 4 if gqa else 8), nn.Linear(4, 4 if gqa else 8)
        self.head = nn.Linear(8, 3)
        self.drop = nn.Dropout(0.5)
        g = torch.Generator().manual_seed(9)
        self.attn_mask = {"bool": torch.rand(5, 5, generator=g) > 0.3, "float": torch.randn(5, 5, generator=g),
                          None: None}[attn_mask]
        if attn_mask == "bool":
            self.attn_mask.fill_diagonal_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q = self.q(x).reshape(n, t, 4, 2).transpose(1, 2)
        k, v = (p(x).reshape(n, t, -1, 2).transpose(1, 2) for p in (self.k, self.v))
        if self.explicit:  # timm's fallback: scale q, q @ k^T, softmax, dropout (eval: identity), @ v
            q = q * (q.shape[-1] ** -0.5)
            attn = self.drop((q @ k.transpose(-2, -1)).softmax(dim=-1))
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask, dropout_p=0.0,
                                                 is_causal=self.is_causal, scale=self.scale, enable_gqa=self.gqa)
        return self.head(self.drop(out.transpose(1, 2).reshape(n, t, 8)[:, 0]))


SDPA_CASES = {"plain": {}, "bool_mask": {"attn_mask": "bool"}, "float_mask": {"attn_mask": "float"},
              "causal": {"is_causal": True}, "scale": {"scale": 0.3}, "gqa": {"gqa": True}}


@pytest.mark.parametrize("case", sorted(SDPA_CASES))
def test_scaled_dot_product_attention_forms_equal_the_autograd_oracles(case: str) -> None:
    torch.manual_seed(11)
    model = SDPANet(**SDPA_CASES[case]).double().eval()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    target = torch.tensor([1, 2])
    relevance, logits = lrpfx.compile(model, "attnlrp", bindings=NO_EPS)(x, target)
    assert torch.allclose(logits, model(x), rtol=1e-12, atol=1e-12)
    assert rel_err(relevance, oracle(model, x, target, attnlrp_sdpa)) < 1e-9
    assert rel_err(lrpfx.compile(model, "lrp0")(x, target)[0], oracle(model, x, target, cplrp_sdpa)) < 1e-9


def test_explicit_timm_form_equals_the_fused_form() -> None:
    """``q * scale; (q @ k^T).softmax(-1)``, eval dropout, ``@ v``: the same relevance as the SDPA call, both conventions."""
    torch.manual_seed(11)
    fused = SDPANet().double().eval()
    explicit = SDPANet(explicit=True).double().eval()
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    target = torch.tensor([1, 2])
    rel, _ = lrpfx.compile(explicit, "attnlrp", bindings=NO_EPS)(x, target)
    assert rel_err(rel, oracle(fused, x, target, attnlrp_sdpa)) < 1e-9
    assert rel_err(lrpfx.compile(explicit, "lrp0")(x, target)[0], oracle(fused, x, target, cplrp_sdpa)) < 1e-9


# --------------------------------------------------------------------------- CP-LRP: the linearized twin
@pytest.mark.parametrize("make", ["tiny", "mha", "sdpa"])
def test_lrp0_on_attention_equals_the_linearized_twin(make: str) -> None:
    if make == "tiny":
        model, x = tiny_reference_model()
    else:
        torch.manual_seed(13)
        model = (MHANet() if make == "mha" else SDPANet(attn_mask="float")).double().eval()
        x = torch.randn(2, 5, 4, dtype=torch.float64)
    target = torch.zeros(x.shape[0], dtype=torch.long)
    relevance, _ = lrpfx.compile(model, "lrp0")(x, target)
    assert rel_err(relevance, input_x_gradient(linearized_twin(model), x, target)) < 1e-6


# --------------------------------------------------------------------------- the rule sets
def test_attnlrp_plans_the_attention_rules_and_other_sets_hold_the_softmax() -> None:
    model, _ = tiny_reference_model()
    rows = {r[0]: r for r in lrpfx.inspect(model, "attnlrp").rows()}
    assert rows["softmax"][2:] == ("softmax", "SoftmaxTaylor()")
    assert rows["matmul"][2:] == ("product", "Uniform(eps=1e-08)")
    assert rows["blocks_0_ln1"][2:] == ("norm", "EpsilonShift(eps=1e-06)")
    assert rows["gelu"][2] == "elementwise"
    gamma = {r[0]: r for r in lrpfx.inspect(model, "attnlrp_gamma").rows()}
    assert gamma["head"][3] == "Gamma(gamma=0.05, stabilizer=1e-06, zero_bias=False)"
    for name in set(lrpfx.builtin_rulesets()) - {"attnlrp", "attnlrp_gamma"}:
        plan = lrpfx.inspect(model, name)
        assert "softmax" not in {n.name for n in plan.path}, name  # CP-LRP: the softmax takes no relevance
        assert not plan.unmatched, name


def test_tiny_transformer_under_attnlrp_gamma_is_finite() -> None:
    model, x = tiny_reference_model()
    relevance, logits = lrpfx.compile(model, "attnlrp_gamma")(x)
    assert torch.isfinite(relevance).all() and torch.allclose(logits, model(x))


def test_a_product_of_activations_names_the_attnlrp_rule_set_elsewhere() -> None:
    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) * self.b(x)
    model = Bilinear().eval()
    with pytest.raises(lrpfx.UnmatchedNodeError,
                       match=r"(?s)a product of two input-dependent values.*Hint: .*lrpfx.compile\(model, \"attnlrp\"\)"):
        lrpfx.compile(model, "epsilon")
    relevance, logits = lrpfx.compile(model, "attnlrp", bindings={"linear": lrpfx.Zero()})(torch.randn(2, 4))
    assert torch.allclose(relevance.sum(1), logits.max(1).values, rtol=1e-5)  # uniform R/2 each, then bias-free LRP-0: conserved


def test_tiny_transformer_class_is_the_reference_architecture() -> None:
    assert isinstance(tiny_reference_model()[0], TinyTransformer)


# --------------------------------------------------------------------------- torchvision's Swin, one block
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("size", [8, 6])  # 6: padded to 8; both: shifted
def test_swin_block_expansion_equals_torchvision_under_lrp0(v2: bool, size: int) -> None:
    """The expanded ``shifted_window_attention`` against torchvision's own function with its softmax detached."""
    from torchvision.models import swin_transformer as S

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(17)
            self.blk = (S.SwinTransformerBlockV2 if v2 else S.SwinTransformerBlock)(8, 2, [4, 4], [2, 2])
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.blk(x).mean((1, 2)))
    model = Block().double().eval()
    x = torch.randn(2, size, size, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([0, 2])
    relevance, logits = lrpfx.compile(model, "lrp0")(x, target)
    assert torch.allclose(logits, model(x), rtol=1e-12, atol=1e-12)
    softmax = F.softmax
    with mock.patch.object(F, "softmax", lambda *a, **k: softmax(*a, **k).detach()):
        reference = input_x_gradient(linearized_twin(model), x, target)
    assert rel_err(relevance, reference) < 1e-9


def test_swin_windows_are_a_routing_op_with_an_exact_inverse() -> None:
    from lrpfx.compiler.attention_forms import swin_unwindows, swin_windows
    for h, w, shift in ((8, 8, [2, 2]), (6, 7, [2, 2]), (4, 4, [2, 2]), (8, 8, [0, 0])):
        index = torch.arange(1, 2 * h * w * 3 + 1).reshape(2, h, w, 3)  # integers: how the adjoint replays it
        windows = swin_windows(index, [4, 4], shift)
        assert windows.shape == (2 * -(-h // 4) * -(-w // 4), 16, 3)
        assert torch.equal(swin_unwindows(windows, [4, 4], shift, h, w), index)
        values = windows[windows > 0]  # padding is 0: every element appears exactly once
        assert torch.equal(values.sort().values, index.flatten())


# --------------------------------------------------------------------------- timm's ViT, both of its attention paths
@contextmanager
def linearized_norms_and_activations() -> Iterator[None]:
    """LayerNorm stds detached, GELU as x * stopgrad(gelu(x) / x): torch's functions patched."""
    from lrpfx.eval import twin
    layer_norm, gelu = F.layer_norm, F.gelu
    with mock.patch.object(F, "layer_norm", lambda x, s, w=None, b=None, eps=1e-5: twin.layer_norm(x, s, w, b, eps)), \
         mock.patch.object(F, "gelu", lambda x, approximate="none": twin.secant(lambda t: gelu(t, approximate=approximate), x)):
        yield


@pytest.mark.parametrize("fused", [True, False])
def test_timm_vit_with_optional_forward_arguments_equals_the_oracles(fused: bool) -> None:
    """timm's ViT: ``forward(x, attn_mask=None, is_causal=False)`` is traced at its defaults; its attention
    is ``F.scaled_dot_product_attention`` (fused) or ``q * scale @ k^T, softmax, dropout, @ v`` (not fused)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(19)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=2)
    model = model.double().eval()
    oracle_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=2)
    oracle_model.load_state_dict(model.state_dict())
    oracle_model = oracle_model.double().eval()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([1, 3])
    relevance, logits = lrpfx.compile(model, "attnlrp", bindings=NO_EPS)(x, target)
    cp = lrpfx.compile(model, "lrp0")(x, target)[0]
    assert torch.allclose(logits, model(x), rtol=1e-10, atol=1e-12)
    with linearized_norms_and_activations():
        assert rel_err(relevance, oracle(oracle_model, x, target, attnlrp_sdpa)) < 1e-8
        assert rel_err(cp, oracle(oracle_model, x, target, cplrp_sdpa)) < 1e-8
