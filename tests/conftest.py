"""Shared helpers: models with randomized BatchNorm statistics and the autograd oracle."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision

torch.set_num_threads(int(os.environ.get("LRPFX_TEST_THREADS", "2")))


def pytest_configure(config: pytest.Config) -> None:
    """The fast run (``-m "not slow"``) draws fewer hypothesis examples (profile ``fast`` in
    tests/unit/test_properties.py); the full run keeps ``ci``. LRPFX_HYPOTHESIS_PROFILE overrides both."""
    if config.getoption("markexpr", "").replace(" ", "") == "notslow":
        os.environ.setdefault("LRPFX_HYPOTHESIS_PROFILE", "fast")


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _resident_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:  # not Linux: no check
        return 0.0


@pytest.fixture(autouse=True)
def _bounded_memory():
    """Keep one pytest process under ~2 GB resident between tests.

    A compiled explainer is a reference cycle (an fx GraphModule and its graph point at each
    other), freed only by Python's cyclic collector, which counts objects, not bytes: without
    this, the fast suite's one process grew past 3 GB. When a test leaves more than 1.5 GB
    resident, collect and hand the freed memory back to the system (glibc's ``malloc_trim``).
    """
    yield
    if _resident_mb() > 1500:
        import ctypes
        import gc
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (no weights here)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def tv_model(name: str, num_classes: int = 10, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    """A torchvision model without weights, seeded, BN randomized, eval mode."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return randomize_batchnorm(model, seed).eval().to(dtype)


def input_x_gradient(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, top: str = "logit") -> torch.Tensor:
    """The oracle: x * d f_c / dx by autograd (scaled by p_c / f_c for a softmax top)."""
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    f = logits.gather(1, target[:, None]).squeeze(1)
    grad, = torch.autograd.grad(f.sum(), xg)
    out = xg.detach() * grad
    if top == "softmax":
        p = logits.softmax(1).gather(1, target[:, None]).squeeze(1)
        out = out * (p / f).detach().view(-1, *([1] * (x.dim() - 1)))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b."""
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def resnet18_f64() -> torch.nn.Module:
    return tv_model("resnet18")


SNAPSHOTS = Path(__file__).parent / "snapshots"


def assert_snapshot(name: str, text: str) -> None:
    """``text`` equals the stored snapshot ``tests/snapshots/<name>``; a missing snapshot fails.

    Write or rewrite snapshots only on purpose, with LRPFX_UPDATE_SNAPSHOTS=1, and read the diff.
    """
    path = SNAPSHOTS / name
    if os.environ.get("LRPFX_UPDATE_SNAPSHOTS", "") not in ("", "0"):
        path.write_text(text)
    assert path.exists(), f"no snapshot {path}: write it with LRPFX_UPDATE_SNAPSHOTS=1 and review it"
    assert text == path.read_text(), f"the text differs from {path} (LRPFX_UPDATE_SNAPSHOTS=1 rewrites it)"
