"""The lrpfx command, driven in-process through its parser and main(argv).

The tests that need real processes (the `python -m lrpfx.cli` smoke test, torchrun) are in
tests/integration/test_cli_processes.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_fixtures import images, weights  # noqa: F401 - fixtures, by name
from lrpfx.cli import commands as cli
from lrpfx.cli.loading import LoadError, load_weights


def _explain(images: Path, weights: Path, out: Path, *extra: str) -> int:
    return cli.main(["explain", str(images), "--model", "torchvision:resnet18", "--weights", str(weights),
                     "--out", str(out), "--size", "32", "--batch-size", "2", "--workers", "0", "--quiet", *extra])


def test_explain_writes_every_output_and_resumes(images: Path, weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _explain(images, weights, out) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 5 and {"predicted", "target", "logit", "relevance_sum"} <= set(records[0])
    import cv2
    import torchvision
    names = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]  # a weights file, 1000 outputs
    for r in records:
        assert r["predicted_class"] == names[r["predicted"]] and r["target_class"] == names[r["target"]]
        assert r["image_size"] == [40, 48] and r["model_size"] == [32, 32]
    for key in ("img0.png", "img1.png", "img2.png", "sub/img3.png", "sub/img4.png"):  # keyed by relative path
        assert np.load(out / f"{key}.input_relevance.npy").shape == (3, 32, 32)  # the model's input, exact
        assert np.load(out / f"{key}.relevance.npy").shape == (40, 48)  # at the photo's own size
        assert cv2.imread(str(out / f"{key}.overlay.png")).shape == (40, 48, 3)
    assert not list(out.rglob(".*tmp*"))  # atomic writes leave no temporaries
    stamp = (out / "img0.png.json").stat().st_mtime_ns
    (out / "img1.png.json").unlink()  # as if a run was killed before img1 finished
    assert _explain(images, weights, out) == 0
    assert (out / "img0.png.json").stat().st_mtime_ns == stamp and (out / "img1.png.json").exists()


def test_explain_target_and_rules(images: Path, weights: Path, tmp_path: Path) -> None:
    assert _explain(images, weights, tmp_path, "--target", "7", "--rules", "lrp0") == 0
    assert {json.loads(x)["target"] for x in (tmp_path / "results.jsonl").read_text().splitlines()} == {7}


@pytest.mark.parametrize("argv,message", [
    (["explain", "nowhere/", "--model", "torchvision:resnet18"], "nowhere/: no such file or directory"),
    (["explain", "{images}", "--model", "torchvision:resnet1800"], "torchvision has no model 'resnet1800'"),
    (["explain", "{images}", "--model", "keras:resnet"], "unknown model spec 'keras:resnet'"),
    (["explain", "{images}", "--model", "torchvision:resnet18", "--rules", "nope"], "unknown rule set 'nope'"),
    (["inspect", "torchvision:resnet18", "--weights", "missing.pt"], "weights file 'missing.pt' does not exist"),
    (["inspect", "timm:no_such_net"], "timm has no model 'no_such_net'"),
    (["demo", "--images", "0"], "--images 0: must be >= 1"),
])
def test_user_errors_are_one_line_with_exit_code_2(images: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                                   message: str) -> None:
    argv = [a.replace("{images}", str(images)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrpfx: error: ") and message in err and "\n" not in err


class _Payload:
    def __reduce__(self):  # a pickle that runs code when loaded
        return (os.system, ("echo pwned",))


def test_code_carrying_pickle_is_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "x": _Payload()}, path)
    with pytest.raises(LoadError, match=r"refusing to unpickle .*--trust-pickle"):
        load_weights(path)


def test_inspect(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["inspect", "torchvision:resnet18", "--rules", "c3_lrp"]) == 0
    assert "basic_block" in capsys.readouterr().out


@pytest.mark.slow  # an ONNX export
def test_export(weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "r18.onnx"
    assert cli.main(["export", "torchvision:resnet18", "--weights", str(weights), "--format", "onnx",
                     "--out", str(out), "--size", "32"]) == 0
    assert out.stat().st_size > 1000


def test_user_model_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = tmp_path / "mynet.py"
    file.write_text("import torch.nn as nn\n"
                    "def make():\n"
                    "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
                    " nn.Linear(4, 2))\n")
    assert cli.main(["inspect", f"{file}:make", "--rules", "lrp0"]) == 0
    assert "AdaptiveAvgPool2d" in capsys.readouterr().out


def test_help_of_every_command(capsys: pytest.CaptureFixture) -> None:
    for command in ("demo", "explain", "inspect", "export"):
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 0 and "usage: lrpfx" in capsys.readouterr().out


def test_parser_knows_every_command_and_its_defaults() -> None:
    p = cli.parser()
    args = p.parse_args(["explain", "a.png", "b/", "--model", "torchvision:resnet18"])
    assert args.command == "explain" and args.inputs == ["a.png", "b/"] and args.rules == "epsilon_plus_flat"
    assert (args.target, args.out, args.device, args.batch_size, args.workers) == ("auto", "lrpfx-out", "cpu", 16, 2)
    args = p.parse_args(["export", "bundled", "--out", "e.onnx"])
    assert (args.format, args.c3, args.fixed_size, args.no_target_input) == ("onnx", False, False, False)
    assert p.parse_args(["inspect", "bundled"]).rules == "epsilon_plus_flat"
    with pytest.raises(SystemExit):  # a missing required option is argparse's exit 2
        p.parse_args(["explain", "a.png"])


def test_random_weights_are_named_and_class_names_come_from_a_file(images: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """A torchvision architecture without weights explains an untrained network: the CLI says so."""
    names = tmp_path / "names.txt"
    names.write_text("".join(f"class {i}\n" for i in range(1000)))
    assert cli.main(["explain", str(images), "--model", "torchvision:resnet18", "--out", str(tmp_path / "out"),
                     "--size", "32", "--batch-size", "5", "--workers", "0", "--quiet", "--classes", str(names)]) == 0
    err = capsys.readouterr().err
    assert "lrpfx: warning: random weights: the maps explain an untrained network" in err
    for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert r["predicted_class"] == f"class {r['predicted']}"
    names.write_text("a\nb\n")
    assert cli.main(["explain", str(images), "--model", "torchvision:resnet18", "--out", str(tmp_path / "o2"),
                     "--classes", str(names)]) == 2
    assert "has 2 names, but torchvision:resnet18 has 1000 outputs" in capsys.readouterr().err


def test_bundled_model_records_its_shape_names(tmp_path: Path) -> None:
    from PIL import Image
    from lrpfx.cli.loading import load_model
    from lrpfx.eval.datasets import ShapesDataset
    data = ShapesDataset("test", n=2, seed=0, normalize=False)
    (tmp_path / "in").mkdir()
    for i in range(2):
        rgb = (data[i][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(rgb).resize((96, 128)).save(tmp_path / "in" / f"{i}.png")
    assert cli.main(["explain", str(tmp_path / "in"), "--model", "bundled", "--out", str(tmp_path / "out"),
                     "--workers", "0", "--quiet"]) == 0
    classes = load_model("bundled").classes
    assert classes is not None and len(classes) == 8
    for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert r["predicted_class"] == classes[r["predicted"]] and r["image_size"] == [128, 96]


def test_demo_names_its_stages_and_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["demo", "--out", str(tmp_path), "--images", "2"]) == 0
    out, err = capsys.readouterr()
    for stage in ("loading the bundled", "compiling the C3-LRP explainer", "explaining 2 images with C3-LRP",
                  "Grad-CAM on 2 images", "RISE, 500 masks per image", "2/2", "drawing the figure"):
        assert stage in err
    assert f"wrote the comparison figure: {tmp_path / 'comparison.png'}" in out and " s in all)" in out
    assert (tmp_path / "comparison.png").stat().st_size > 1000


def test_unexpected_errors_and_warnings_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    import warnings

    def broken(args):
        warnings.warn("something to know\nover two lines")
        raise KeyError("deep inside")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    assert cli.main(["inspect", "bundled"]) == 3
    err = capsys.readouterr().err.splitlines()
    assert err == ["lrpfx: warning: something to know over two lines",
                   "lrpfx: error: KeyError: 'deep inside'. Hint: rerun with --debug for the traceback; if your input "
                   "is right, please report it."]
    with pytest.raises(KeyError):  # --debug anywhere on the line: the traceback
        cli.main(["inspect", "bundled", "--debug"])


def test_an_onnx_conversion_failure_names_the_op() -> None:
    """torch's exporter fails with pages of advice; the one line names the op ONNX lacks."""
    import torch.fx as fx
    from lrpfx.export import _onnx_failure
    inner = RuntimeError("No ONNX function found for <OpOverload(op='prims.signbit', overload='default')>. "
                         "Failure message: No decompositions registered for the real-valued input")
    middle = RuntimeError("Error when translating node %signbit : [num_users=1] = call_function[...]")
    outer = RuntimeError("Failed to convert the exported program to an ONNX model. \x1b[96mThis is step 3/3\x1b[0m "
                         "... Create an issue in the PyTorch GitHub repository")
    middle.__cause__, outer.__cause__ = inner, middle
    program = type("P", (), {"graph": fx.Graph()})()
    message = _onnx_failure(outer, program)
    assert message.startswith("cannot convert the explainer to ONNX: ONNX has no function for prims.signbit.default")
    assert "\x1b" not in message and "GitHub" not in message and "Hint: use export_program" in message
