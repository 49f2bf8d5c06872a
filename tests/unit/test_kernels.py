"""Each rule against its slow float64 matrix form (as zennit's tests/unit/test_rules.py does).

A conv is a linear map; its dense matrix M (out x in) is built by applying it to basis
vectors, and every rule is then written with explicit contributions z_jk = a_j M_kj.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrpfx.relevance import kernels, rules
from lrpfx.relevance.rules import Op

torch.manual_seed(0)
EPS = 1e-6


def stab(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)


def dense(fn, in_shape) -> torch.Tensor:
    """The (out, in) matrix of the linear map fn (without bias), built from basis vectors."""
    n = int(torch.tensor(in_shape).prod())
    basis = torch.eye(n, dtype=torch.float64).view(n, *in_shape)
    return fn(basis).reshape(n, -1).t()


def reference(rule: str, a: torch.Tensor, m: torch.Tensor, b: torch.Tensor, r: torch.Tensor, **kw) -> torch.Tensor:
    """R_j for one sample: a (in,), m (out, in), b (out,), r (out,)."""
    ap, an, mp, mn = a.clamp(min=0), a.clamp(max=0), m.clamp(min=0), m.clamp(max=0)
    if rule == "epsilon":
        z = m * a  # z_kj
        return (z / stab(z.sum(1) + b)[:, None] * r[:, None]).sum(0)
    if rule == "zplus":
        zp = mp * ap + mn * an
        return (zp / stab(zp.sum(1) + b.clamp(min=0))[:, None] * r[:, None]).sum(0)
    if rule == "alpha_beta":
        al, be = kw["alpha"], kw["beta"]
        zp, zn = mp * ap + mn * an, mn * ap + mp * an
        return (al * zp / stab(zp.sum(1) + b.clamp(min=0))[:, None] * r[:, None]
                - be * zn / stab(zn.sum(1) + b.clamp(max=0))[:, None] * r[:, None]).sum(0)
    if rule == "gamma":
        g = kw["gamma"]
        z = (m * a).sum(1) + b
        up = (m + g * mp) * ap + (m + g * mn) * an
        dn = (m + g * mn) * ap + (m + g * mp) * an
        e = kw.get("eps", EPS)
        rp = torch.where(z > 0, r / stab(up.sum(1) + b + g * b.clamp(min=0), e), 0)
        rn = torch.where(z < 0, r / stab(dn.sum(1) + b + g * b.clamp(max=0), e), 0)
        return (up * rp[:, None] + dn * rn[:, None]).sum(0)
    if rule == "zbox":
        lo, hi = kw["lo"], kw["hi"]
        z = m * a - mp * lo - mn * hi
        return (z / stab(z.sum(1))[:, None] * r[:, None]).sum(0)
    if rule == "flat":
        z = (m != 0).to(m)  # structural ones: the receptive field
        return (z / stab(z.sum(1))[:, None] * r[:, None]).sum(0)
    if rule == "wsquare":
        z = m * m
        return (z / stab(z.sum(1) + b * b)[:, None] * r[:, None]).sum(0)
    raise AssertionError(rule)


RULES = {
    "epsilon": rules.Epsilon(eps=EPS), "zplus": rules.ZPlus(stabilizer=EPS),
    "alpha_beta": rules.AlphaBeta(alpha=2.0, beta=1.0, stabilizer=EPS), "gamma": rules.Gamma(gamma=0.25, stabilizer=EPS),
    "flat": rules.Flat(stabilizer=EPS), "wsquare": rules.WSquare(stabilizer=EPS),
}
CONVS = [dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1),
         dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=1),
         dict(stride=(2, 1), padding=(2, 1), dilation=(2, 1), groups=1),
         dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2)]


def _apply(rule: rules.Rule, kind: str, a, z, r, w, b, geo, nonneg=False) -> torch.Tensor:
    op = Op(kind=kind, node="n", inputs=[a], out=z, rel=r, params={"weight": w, "bias": b}, attrs=geo, nonneg=[nonneg])
    return rule.apply(op)[0].evaluate()


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("geo", CONVS, ids=["plain", "stride2pad1", "dilated", "groups2"])
def test_conv_rules_match_matrix_form(name: str, geo: dict) -> None:
    cin, cout, k = 4, 6, 3
    # even input sizes with stride 2 exercise the transposed conv's output_padding
    a = torch.randn(2, cin, 8, 7, dtype=torch.float64)
    w = torch.randn(cout, cin // geo["groups"], k, k, dtype=torch.float64)
    b = torch.randn(cout, dtype=torch.float64) * 0.1
    conv = lambda t, w=w: F.conv2d(t, w, None, **geo)  # noqa: E731
    z = conv(a) + b.view(1, -1, 1, 1)
    r = torch.randn_like(z)
    ours = _apply(RULES[name], "conv", a, z, r, w, b, geo)
    m = dense(lambda t: conv(t), a.shape[1:])
    if name == "flat":
        m = dense(lambda t: F.conv2d(t, torch.ones_like(w), None, **geo), a.shape[1:])
    for i in range(2):
        expected = reference(name, a[i].flatten(), m, b.repeat_interleave(z.shape[2] * z.shape[3]), r[i].flatten(),
                             alpha=2.0, beta=1.0, gamma=0.25)
        assert torch.allclose(ours[i].flatten(), expected, rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("name", list(RULES))
def test_linear_rules_match_matrix_form(name: str) -> None:
    a, w, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    z = F.linear(a, w, b)
    r = torch.randn_like(z)
    ours = _apply(RULES[name], "linear", a, z, r, w, b, {})
    m = torch.ones_like(w) if name == "flat" else w
    for i in range(3):
        expected = reference(name, a[i], m, b, r[i], alpha=2.0, beta=1.0, gamma=0.25)
        assert torch.allclose(ours[i], expected, rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("name", ["zplus", "alpha_beta", "gamma"])
def test_nonneg_shortcut_equals_general_form(name: str) -> None:
    a = torch.rand(2, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    geo = CONVS[1]
    z = F.conv2d(a, w, b, **geo)
    r = torch.randn_like(z)
    general = _apply(RULES[name], "conv", a, z, r, w, b, geo, nonneg=False)
    short = _apply(RULES[name], "conv", a, z, r, w, b, geo, nonneg=True)
    assert torch.allclose(general, short, rtol=1e-12, atol=1e-14)


def test_zbox_matches_matrix_form_with_zero_padded_bounds() -> None:
    geo = CONVS[1]
    a = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    low, high = (-2.0, -1.5, -1.0), (2.0, 2.5, 3.0)
    z = F.conv2d(a, w, None, **geo)
    r = torch.randn_like(z)
    ours = _apply(rules.ZBox(low=low, high=high, stabilizer=EPS), "conv", a, z, r, w, None, geo)
    lo = torch.tensor(low, dtype=torch.float64).view(3, 1, 1).expand(3, 6, 6).flatten()
    hi = torch.tensor(high, dtype=torch.float64).view(3, 1, 1).expand(3, 6, 6).flatten()
    m = dense(lambda t: F.conv2d(t, w, None, **geo), a.shape[1:])
    expected = reference("zbox", a[0].flatten(), m, torch.zeros(m.shape[0], dtype=torch.float64), r[0].flatten(),
                         lo=lo, hi=hi)
    assert torch.allclose(ours[0].flatten(), expected, rtol=1e-9, atol=1e-12)


def test_zbox_with_zero_bounds_is_bias_free_lrp0() -> None:  # METHOD_SPEC §7.9
    a, w = torch.randn(2, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    z = F.linear(a, w)
    r = torch.randn_like(z)
    box = _apply(rules.ZBox(low=0.0, high=0.0, stabilizer=0.0), "linear", a, z, r, w, None, {})
    zero = _apply(rules.Zero(), "linear", a, z, r, w, None, {})
    assert torch.allclose(box, zero, rtol=1e-12)


def test_single_linear_layer_lrp0_is_a_times_w() -> None:  # METHOD_SPEC §7.7
    a, w = torch.randn(4, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    z = F.linear(a, w)
    ours = _apply(rules.Zero(), "linear", a, z, z, w, None, {})
    assert torch.allclose(ours, a * w, rtol=1e-12)


def test_input_independent_rules_ignore_the_input() -> None:  # METHOD_SPEC §7.8
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    geo = CONVS[1]
    r = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    for rule in (rules.Flat(), rules.WSquare()):
        outs = [_apply(rule, "conv", torch.randn(1, 3, 8, 8, dtype=torch.float64), None, r, w, None, geo) for _ in range(2)]
        assert torch.equal(outs[0], outs[1])


def test_epsilon_tends_to_lrp0_and_gamma_to_zplus() -> None:  # METHOD_SPEC §7.6
    a = torch.rand(2, 6, dtype=torch.float64)
    w, b = torch.randn(3, 6, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    z = F.linear(a, w)
    r = torch.rand_like(z)
    zero = _apply(rules.Zero(), "linear", a, z, r, w, b, {})
    small = _apply(rules.Epsilon(eps=1e-12), "linear", a, z, r, w, b, {})
    assert torch.allclose(zero, small, rtol=1e-8)
    zp = _apply(rules.ZPlus(stabilizer=0.0), "linear", a, z, r, w, None, {})
    zp = zp / zp.sum(1, keepdim=True)
    gm = _apply(rules.Gamma(gamma=1e9, stabilizer=0.0), "linear", a, z, r, w, None, {}, nonneg=True)
    gm = gm / gm.sum(1, keepdim=True)
    mask = (z > 0).all(1)  # only outputs with z > 0 take the gamma-up path for every unit
    assert torch.allclose(zp[mask], gm[mask], atol=1e-6)


def test_avgpool_rule_and_count_include_pad() -> None:  # METHOD_SPEC §7.10
    a = torch.rand(1, 2, 5, 5, dtype=torch.float64)
    for cip in (True, False):
        z = F.avg_pool2d(a, 3, 2, 1, count_include_pad=cip)
        r = torch.rand_like(z)
        op = Op("avgpool", "p", [a], z, r, attrs=dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1),
                                                        count_include_pad=cip))
        ours = rules.Zero().apply(op)[0].evaluate()
        # R_j = sum_k a_j / sum_{win(k)} a * R_k, independent of count_include_pad
        win = dense(lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=False) > -1, a.shape[1:])
        windows = dense(lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=True) * 9, a.shape[1:])
        zz = windows * a[0].flatten()
        expected = (zz / zz.sum(1, keepdim=True) * r[0].flatten()[:, None]).sum(0)
        assert torch.allclose(ours.flatten(), expected, rtol=1e-9), win.shape


def test_maxpool_wta_supported_only_on_argmax() -> None:  # METHOD_SPEC §7.10
    a = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    out, idx = F.max_pool2d(a, 3, 2, 1, return_indices=True)
    r = torch.rand_like(out)
    op = Op("maxpool", "p", [a], out, r, attrs=dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1),
                                                     dilation=(1, 1), ceil_mode=False))
    ours = rules.WinnerTakesAll().apply(op)[0].evaluate()
    support = torch.zeros_like(a).flatten(2).scatter(2, idx.flatten(2), 1.0).view_as(a)
    assert (ours[support == 0] == 0).all()
    assert torch.allclose(ours.sum(), r.sum())


def test_adaptive_avgpool_non_divisible_matches_matrix_form() -> None:
    a = torch.rand(1, 2, 5, 7, dtype=torch.float64)
    z = F.adaptive_avg_pool2d(a, (3, 4))
    r = torch.rand_like(z)
    ours = rules.Zero().apply(Op("adaptive_avgpool", "p", [a], z, r))[0].evaluate()
    m = dense(lambda t: F.adaptive_avg_pool2d(t, (3, 4)), a.shape[1:])
    zz = m * a[0].flatten()
    expected = (zz / zz.sum(1, keepdim=True) * r[0].flatten()[:, None]).sum(0)
    assert torch.allclose(ours.flatten(), expected, rtol=1e-9)


@pytest.mark.parametrize("kernel,stride,padding,ceil_mode,count_include_pad,divisor", [
    (2, 2, 0, True, False, None),   # ResNet-D's shortcut pooling, odd input: partial last windows
    (3, 2, 1, True, True, None),    # ceil_mode windows that reach past the padding
    (3, 2, 1, False, False, None),
    (3, 1, 1, False, True, 5),      # divisor_override
    (2, 3, 1, True, True, None),    # stride > kernel
])
def test_avgpool_any_geometry_is_lrp0_on_its_own_linear_map(kernel, stride, padding, ceil_mode, count_include_pad,
                                                            divisor) -> None:
    """R_j = a_j * sum_k (dz_k/da_j) R_k / z_k: the VJP of the pooling itself is the reference."""
    a = torch.rand(2, 3, 7, 9, dtype=torch.float64)
    geo = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode,
               count_include_pad=count_include_pad, divisor_override=divisor)
    z = F.avg_pool2d(a, **geo)
    r = torch.rand_like(z)
    pair = lambda v: (v, v)  # noqa: E731
    op = Op("avgpool", "p", [a], z, r, attrs=dict(kernel_size=pair(kernel), stride=pair(stride),
                                                  padding=pair(padding), ceil_mode=ceil_mode,
                                                  count_include_pad=count_include_pad, divisor_override=divisor))
    ours = rules.Zero().apply(op)[0].evaluate()
    ag = a.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.avg_pool2d(ag, **geo), ag, r / z)
    assert torch.allclose(ours, a * grad, rtol=1e-12, atol=1e-15)


def test_adaptive_maxpool_wta_routes_as_the_gradient() -> None:
    a = torch.rand(2, 3, 7, 5, dtype=torch.float64)
    r = torch.rand(2, 3, 3, 2, dtype=torch.float64)
    op = Op("maxpool", "p", [a], None, r, attrs={"output_size": (3, 2)})
    ours = rules.WinnerTakesAll().apply(op)[0].evaluate()
    ag = a.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.adaptive_max_pool2d(ag, (3, 2)), ag, r)
    assert torch.equal(ours, grad)


def test_concatenation_gives_each_part_its_slice() -> None:
    parts = [torch.rand(2, c, 4, 4, dtype=torch.float64) for c in (3, 1, 2)]
    r = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    op = Op("cat", "c", [parts[0], parts[2]], torch.cat(parts, 1), r, attrs={"parts": parts, "dim": 1, "index": [0, 2]})
    first, last = (c.evaluate() for c in rules.Slice().apply(op))
    assert torch.equal(first, r[:, :3]) and torch.equal(last, r[:, 4:])
    op = Op("cat", "c", [parts[1], parts[1]], None, r[:, :2], attrs={"parts": [parts[1]] * 2, "dim": -3,
                                                                     "index": [0, 1]})
    shares = [c.evaluate() for c in rules.Slice().apply(op)]  # cat([x, x]): one share per position
    assert torch.equal(shares[0] + shares[1], r[:, :1] + r[:, 1:2])


def test_gate_passes_all_relevance_to_the_signal() -> None:
    x, r = torch.rand(2, 4, 3, 3, dtype=torch.float64), torch.rand(2, 4, 3, 3, dtype=torch.float64)
    out = rules.SignalTakesAll().apply(Op("gate", "g", [x], None, r))[0].evaluate()
    assert torch.equal(out, r)
    # a signal broadcast against a larger gate (N, C, 1, 1) * (N, C, H, W): its relevance is summed back
    out = rules.SignalTakesAll().apply(Op("gate", "g", [x[:, :, :1, :1]], None, r))[0].evaluate()
    assert torch.allclose(out, r.sum((2, 3), keepdim=True))


@pytest.mark.parametrize("name,rule", [("gamma", rules.Gamma(gamma=0.25, stabilizer=EPS)),
                                       ("epsilon", rules.Epsilon(eps=EPS)),
                                       ("epsilon", rules.Epsilon(eps=0.0))])
def test_rectified_fast_path_matches_matrix_form(name: str, rule: rules.Rule) -> None:
    """The forward ran its ReLU in place on z (z_rectified) and no relevance sits where z <= 0."""
    geo = CONVS[1]
    a = torch.rand(2, 4, 8, 7, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64) * 0.3
    z = F.conv2d(a, w, b, **geo)
    r = torch.rand_like(z) * (z > 0)
    op = Op(kind="conv", node="n", inputs=[a], out=z.clamp(min=0), rel=r, params={"weight": w, "bias": b},
            attrs={**geo, "z_rectified": True}, nonneg=[True])
    ours = rule.apply(op)[0].evaluate()
    assert "z_rectified" in rule.apply(op)[0].kwargs
    m = dense(lambda t: F.conv2d(t, w, None, **geo), a.shape[1:])
    eps = getattr(rule, "eps", EPS)
    for i in range(2):
        bb = b.repeat_interleave(z.shape[2] * z.shape[3])
        if eps == 0.0:  # LRP-0: z_kj / z_k, with no relevance at z_k = 0
            zk = (m * a[i].flatten()).sum(1) + bb
            expected = (m * a[i].flatten() / torch.where(zk == 0, 1.0, zk)[:, None] * r[i].flatten()[:, None]).sum(0)
        else:
            expected = reference(name, a[i].flatten(), m, bb, r[i].flatten(), gamma=0.25)
        assert torch.allclose(ours[i].flatten(), expected, rtol=1e-9, atol=1e-12), rule


def test_gamma_gives_nothing_through_outputs_that_are_exactly_zero() -> None:
    """An output with z == 0 takes neither gamma branch, also where the relevance there is not 0;
    without a stabilizer its denominators are 0 there too (0 / 0), which must not leak a NaN."""
    a = torch.rand(3, 6, dtype=torch.float64)
    w, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    w[1], b[1] = 0.0, 0.0  # z[:, 1] == 0 exactly
    w[2], b[2] = -w[2].abs(), 0.0  # z < 0 everywhere on output 2
    z = F.linear(a, w, b)
    r = torch.randn_like(z)
    for nonneg in (True, False):
        for eps in (EPS, 0.0):
            ours = _apply(rules.Gamma(gamma=0.25, stabilizer=eps), "linear", a, z, r, w, b, {}, nonneg=nonneg)
            assert torch.isfinite(ours).all(), (nonneg, eps)
            for i in range(3):
                expected = reference("gamma", a[i], w, b, r[i], gamma=0.25, eps=eps)
                assert torch.allclose(ours[i], expected, rtol=1e-9, atol=1e-12), (nonneg, eps)


def _zbox_three_terms(a, r, w, low, high, geo, eps=EPS):
    """z^B with its three terms written out (three convolutions of full-batch bound maps and their
    transposes by autograd's conv2d_input): the form the one-weight rewrite must reproduce."""
    lo = torch.tensor(low, dtype=a.dtype).view(1, -1, 1, 1).expand_as(a)
    hi = torch.tensor(high, dtype=a.dtype).view(1, -1, 1, 1).expand_as(a)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    z = F.conv2d(a, w, None, **geo) - F.conv2d(lo, wp, None, **geo) - F.conv2d(hi, wn, None, **geo)
    s = r / stab(z, eps)
    t = lambda v: torch.nn.grad.conv2d_input(a.shape, v, s, **geo)  # noqa: E731
    return a * t(w) - lo * t(wp) - hi * t(wn)


@pytest.mark.parametrize("geo", CONVS, ids=["plain", "stride2pad1", "dilated", "groups2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zbox_one_weight_rewrite_equals_the_three_term_form(geo: dict, dtype: torch.dtype) -> None:
    """One batch-1 convolution for the bounds and one transposed layer of [W, W_box] (METHOD_SPEC's
    z^B): equal to the three-term form to 1e-12 in float64 and 1e-6 in float32 (relative)."""
    cin = 4
    low, high = (-2.1, -2.0, -1.8, -1.5), (2.2, 2.4, 2.6, 1.9)
    a = (torch.rand(3, cin, 9, 8, dtype=torch.float64) * 4 - 2).to(dtype)
    w = torch.randn(6, cin // geo["groups"], 3, 3, dtype=torch.float64).to(dtype)
    r = torch.randn_like(F.conv2d(a, w, None, **geo))
    ours = _apply(rules.ZBox(low=low, high=high, stabilizer=EPS), "conv", a, None, r, w, None, geo)
    expected = _zbox_three_terms(a.double(), r.double(), w.double(), low, high, geo)
    err = ((ours.double() - expected).abs().max() / expected.abs().max()).item()
    assert err < (1e-12 if dtype == torch.float64 else 1e-6), err


@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
@pytest.mark.parametrize("stride,groups", [((2, 2), 1), ((3, 2), 1), ((2, 2), 2), ((1, 1), 1), ((1, 1), 2)])
def test_pointwise_transpose_is_the_vjp(size: tuple, stride: tuple, groups: int) -> None:
    """A 1x1 convolution's transpose (a matrix product over the channels on the CPU; strided: computed at
    low resolution and scattered) is its VJP."""
    a = torch.randn(2, 4, *size, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, 1, 1, dtype=torch.float64)
    geo = dict(stride=stride, padding=(0, 0), dilation=(1, 1), groups=groups)
    s = torch.randn_like(F.conv2d(a, w, None, **geo))
    from lrpfx.relevance import kernels
    ours = kernels._transpose(s, w, a.shape, geo["stride"], geo["padding"], geo["dilation"], groups)
    assert torch.allclose(ours, torch.nn.grad.conv2d_input(a.shape, w, s, **geo), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("factor_shape", [(2, 3, 4, 4), (1, 3, 1, 1)], ids=["same_shape", "broadcast"])
def test_plus_times_is_the_sum_of_the_share_and_the_product(factor_shape: tuple) -> None:
    """A residual sum's skip share folded into the sum of shares (one addcmul) equals the two steps."""
    from lrpfx.relevance import adjoints
    total, s, a = (torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in range(3))
    factor = torch.randn(*factor_shape, dtype=torch.float64)
    expected = total + adjoints.times(s, a, factor)
    assert torch.allclose(adjoints.plus_times(total, s, a, factor), expected, rtol=1e-14, atol=1e-15)


def test_maxpool_wta_at_the_forward_indices_is_the_gradient() -> None:
    """Routing by the indices the forward kept equals autograd's max-pool backward."""
    a = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    geo = dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), ceil_mode=False)
    out, idx = kernels.max_pool_with_indices(a, **geo)
    r = torch.randn_like(out)
    grad, = torch.autograd.grad(F.max_pool2d(a, **geo), a, r)
    assert torch.equal(kernels.maxpool_wta_indexed(a.detach(), r, idx), grad)


@pytest.mark.parametrize("eps", [EPS, 0.0])
def test_rectified_sum_split_matches_the_split_of_the_sum_itself(eps: float) -> None:
    """A residual sum u = h1 + h2 whose ReLU ran in place (op.out holds relu(u)) and whose relevance
    is 0 wherever u <= 0: each share is h_i R / (u + eps sign(u)), computed from u itself."""
    h1, h2 = torch.randn(2, 5, 6, 6, dtype=torch.float64), torch.randn(2, 5, 6, 6, dtype=torch.float64)
    u = h1 + h2
    r = torch.rand_like(u) * (u > 0)
    rule = rules.Epsilon(eps=eps)
    op = Op(kind="add", node="add", inputs=[h1, h2], out=u.clamp(min=0), rel=r, attrs={"z_rectified": True})
    calls = rule.apply(op)
    shares = [c.evaluate() for c in calls]
    assert calls[0].args[0].kwargs.get("rectified") is True  # the factor took the one-pass stabilizer
    one = u.new_ones(())
    den = u + eps * torch.where(u >= 0, one, -one) if eps else torch.where(u == 0, one, u)
    for h, share in zip((h1, h2), shares):
        assert torch.allclose(share, h * (r / den), rtol=1e-15, atol=0)
    assert torch.equal(shares[0][u <= 0], torch.zeros_like(u[u <= 0]))
