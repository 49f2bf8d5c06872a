"""The lrpfx command in real processes: the one subprocess smoke test, torchrun sharding, kill -9, concurrent runs.

Everything else about the command runs in-process (``main(argv)``) in tests/unit/test_cli.py and
tests/unit/test_batch_job.py; these cases need separate processes by what they check.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cli_fixtures import _image, images, model, weights  # noqa: F401 - fixtures, by name
from lrpfx.cli import batch
from lrpfx.cli import commands as cli

pytestmark = pytest.mark.slow

def _explain(model: tuple[str, Path], inputs: Path, out: Path, *extra: str) -> int:
    return cli.main(["explain", str(inputs), "--model", model[0], "--weights", str(model[1]),
                     "--out", str(out), "--size", "32", "--batch-size", "3", "--workers", "0", "--quiet", *extra])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(batch.TMP_SUFFIX)]


# ------------------------------------------------------------------ the subprocess smoke test
def test_python_m_lrpfx_cli_help() -> None:
    """The one smoke test of the real entry point; every command's help is tested in-process."""
    proc = subprocess.run([sys.executable, "-m", "lrpfx.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: lrpfx" in proc.stdout, proc.stderr


# ------------------------------------------------------------------ several processes by design
def _explain_resnet18(images: Path, weights: Path, out: Path) -> int:
    return cli.main(["explain", str(images), "--model", "torchvision:resnet18", "--weights", str(weights),
                     "--out", str(out), "--size", "32", "--batch-size", "2", "--workers", "0", "--quiet"])


def test_torchrun_shards_and_union_equals_single_process(images: Path, weights: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    assert _explain_resnet18(images, weights, single) == 0
    sharded = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "lrpfx.cli", "explain", str(images), "--model", "torchvision:resnet18", "--weights", str(weights),
           "--out", str(sharded), "--size", "32", "--batch-size", "2", "--workers", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = [json.loads(x) for x in (single / "results.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (sharded / "results.jsonl").read_text().splitlines()]
    assert [r["image"] for r in a] == [r["image"] for r in b]
    assert all(abs(x["relevance_sum"] - y["relevance_sum"]) <= 1e-4 * (1 + abs(x["relevance_sum"]))
               for x, y in zip(a, b))
    for f in single.rglob("*.relevance.npy"):
        assert np.allclose(np.load(f), np.load(sharded / f.relative_to(single)), atol=1e-5)


def test_kill_9_then_resume_gives_identical_results(model, tmp_path: Path) -> None:
    src = tmp_path / "in"
    for i in range(20):
        _image(src / f"{i:02d}.png", i)
    clean = tmp_path / "clean"
    assert _explain(model, src, clean, "--batch-size", "1") == 0
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lrpfx.cli", "explain", str(src), "--model", model[0], "--weights", str(model[1]),
           "--out", str(out), "--size", "32", "--batch-size", "1", "--workers", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.png.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    finished = sorted(out.glob("*.png.json"))
    assert 3 <= len(finished) < 20, "the run was not killed midway"
    items = {it.key: it for it in batch.find_images([str(src)])}
    fp = json.loads((out / batch.MANIFEST).read_text())["fingerprint"]
    for record in finished:  # whatever a reader can see under a final name is complete
        item = items[record.name[: -len(".json")]]
        assert batch.is_done(out, item, fp, c3=False)
    for f in out.glob("*.png.*"):
        if f.suffix == ".npy":
            np.load(f)
    assert _explain(model, src, out, "--batch-size", "1") == 0
    for f in sorted(clean.glob("*.png.*")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    strip = [{k: v for k, v in r.items() if k not in ("image",)} for r in _records(clean)]
    assert strip == [{k: v for k, v in r.items() if k not in ("image",)} for r in _records(out)]
    assert not _temporaries(out)


def test_two_concurrent_runs_lose_nothing(model, tmp_path: Path) -> None:
    """Two processes started at once on one output folder: one runs, the other refuses or finds it done."""
    src = tmp_path / "in"
    for i in range(20):
        _image(src / f"{i:02d}.png", i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lrpfx.cli", "explain", str(src), "--model", model[0], "--weights", str(model[1]),
           "--out", str(out), "--size", "32", "--batch-size", "1", "--workers", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(code for code, _ in results) in ([0, 0], [0, 2]), results
    for code, err in results:
        if code == 2:
            assert err.startswith("lrpfx: error: another `lrpfx explain`") and "Traceback" not in err
    records = _records(out)
    assert len(records) == 20 and all(r["status"] == "ok" for r in records)
    assert not _temporaries(out)


def test_readme_demo_command(tmp_path: Path) -> None:
    """README's first command ends in `.venv/bin/lrpfx demo`: the installed entry point, in a fresh
    process, names its stages and writes the figure (the install part is what CI itself does)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = readme.split("tests/integration/test_cli_processes.py::test_readme_demo_command -->\n```bash\n")[1]
    command = command.split("\n```")[0].strip()
    assert command.endswith("&& .venv/bin/lrpfx demo"), command
    lrpfx_bin = Path(sys.executable).parent / "lrpfx"
    start = time.perf_counter()
    proc = subprocess.run([str(lrpfx_bin), "demo"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compiling the C3-LRP explainer" in proc.stderr and "RISE, 500 masks per image" in proc.stderr
    assert "Traceback" not in proc.stderr and "warning" not in proc.stderr.lower()
    assert (tmp_path / "lrpfx-demo" / "comparison.png").stat().st_size > 10_000
    print(f"lrpfx demo: {seconds:.1f} s")  # -s shows it; the time is measured by hand, not asserted
