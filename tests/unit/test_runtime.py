"""lrpfx.keep_freed_memory: glibc keeps freed memory for reuse. Oracle: the kernel's count of
minor page faults (getrusage), which a tensor on fresh pages pays once per 4 KiB page. Each
setting runs an explainer in a fresh process (malloc's state is the whole process's)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import lrpfx
from lrpfx import runtime

CHILD = r"""
import json, resource, sys
import torch, torchvision
import lrpfx
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert lrpfx.keep_freed_memory()
elif sys.argv[1] == "keep-then-default":
    assert lrpfx.keep_freed_memory() and lrpfx.keep_freed_memory(False)
torch.manual_seed(0)
explainer = lrpfx.compile(torchvision.models.resnet18(weights=None).eval(), "epsilon_plus_flat")
x = torch.randn(4, 3, 224, 224)
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.no_grad():
        explainer(x)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _steady_faults(mode: str) -> int:
    """Page faults of calls 3 to 5 of an explainer (ResNet-18, batch 4, 224 px) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return sum(json.loads(out.stdout.strip().splitlines()[-1])[2:])


@pytest.mark.slow  # three fresh processes (~15 s)
@pytest.mark.skipif(runtime._glibc() is None, reason="the setting is glibc's mallopt")
def test_kept_memory_serves_the_next_call_without_page_faults_and_the_default_comes_back():
    default = _steady_faults("default")
    kept = _steady_faults("keep")
    restored = _steady_faults("keep-then-default")
    # by default every call puts its large tensors on fresh pages (12,512 faults per call here)
    assert default > 3 * 1000, default
    assert kept < 0.25 * default, (kept, default)
    assert restored > 0.5 * default, (restored, default)


def test_not_glibc_is_reported_not_applied(monkeypatch):
    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    assert lrpfx.keep_freed_memory() is False
    assert lrpfx.keep_freed_memory(False) is False
