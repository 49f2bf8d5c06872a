"""`lrpfx explain` as a batch job (issue #17): keys, resume, fault isolation, durable writes, decoding, errors.

Every case runs the command in-process (``main(argv)``) on a tiny user-file model and generated
images of 32-48 px. The kill -9 and concurrent-run tests need real processes: they are in
tests/integration/test_cli_processes.py.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_fixtures import _image, model  # noqa: F401 - fixtures, by name
from lrpfx.cli import batch
from lrpfx.cli import commands as cli

def _explain(model: tuple[str, Path], inputs: list[Path] | Path, out: Path, *extra: str) -> int:
    inputs = [inputs] if isinstance(inputs, Path) else inputs
    return cli.main(["explain", *map(str, inputs), "--model", model[0], "--weights", str(model[1]),
                     "--out", str(out), "--size", "32", "--batch-size", "3", "--workers", "0", "--quiet", *extra])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(batch.TMP_SUFFIX)]


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrpfx: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ keys
def test_outputs_are_keyed_by_relative_path_with_extension(model, tmp_path: Path) -> None:
    src = tmp_path / "in"
    for i, name in enumerate(["a/good.png", "a/good.jpg", "b/good.png", "c.PNG"]):
        _image(src / name, seed=i)
    (src / "notes.txt").write_text("not an image suffix: not searched")
    out = tmp_path / "out"
    assert _explain(model, src, out) == 0
    records = _records(out)
    assert [r["key"] for r in records] == ["a/good.jpg", "a/good.png", "b/good.png", "c.PNG"]
    assert [r["image"] for r in records] == [str(src / r["key"]) for r in records]
    assert len({r["relevance_sum"] for r in records}) == 4  # four different images, none overwritten
    for r in records:
        assert r["status"] == "ok" and np.load(out / f"{r['key']}.relevance.npy").shape == (40, 48)
        assert (out / f"{r['key']}.overlay.png").stat().st_size == r["outputs"]["overlay.png"]
    assert not _temporaries(out) and not list(out.rglob(".*.tmp*"))


def test_several_roots_are_prefixed_and_duplicate_keys_refused(model, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    _image(tmp_path / "x" / "good.png", 0)
    _image(tmp_path / "y" / "good.png", 1)
    out = tmp_path / "out"
    assert _explain(model, [tmp_path / "x", tmp_path / "y"], out) == 0
    assert [r["key"] for r in _records(out)] == ["x/good.png", "y/good.png"]
    # two files given by themselves with one name: refused, naming both, before anything is written
    assert _explain(model, [tmp_path / "x" / "good.png", tmp_path / "y" / "good.png"], tmp_path / "o2") == 2
    err = _one_error_line(capsys)
    assert "x/good.png" in err and "y/good.png" in err and "both" in err
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------ manifest and resume
def test_rerun_with_other_settings_is_refused_and_overwrite_redoes(model, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in"
    for i in range(3):
        _image(src / f"{i}.png", i)
    out = tmp_path / "out"
    assert _explain(model, src, out) == 0
    manifest = json.loads((out / batch.MANIFEST).read_text())
    assert {"model", "weights_sha256", "rules", "rules_file_sha256", "rule_set", "target", "size", "mean", "std",
            "c3", "c3_options", "lrpfx"} <= set(manifest["config"])
    capsys.readouterr()
    for extra, key in [(["--rules", "lrp0"], "rules"), (["--target", "1"], "target"), (["--size", "16"], "size"),
                       (["--mean", "0", "0", "0"], "mean")]:  # (a second --size wins over _explain's)
        assert _explain(model, src, out, *extra) == 2
        err = _one_error_line(capsys)
        assert "other settings" in err and key in err and "--overwrite" in err
    other = tmp_path / "other.pt"  # other weights, same architecture
    torch.save({k: v + 1 for k, v in torch.load(model[1]).items()}, other)
    assert _explain((model[0], other), src, out) == 2
    assert "weights_sha256" in _one_error_line(capsys)
    rules = tmp_path / "mine.toml"
    rules.write_text('bind = [{ pattern = "conv", rule = "epsilon", eps = 1e-3 }, '
                     '{ pattern = "linear", rule = "epsilon", eps = 1e-3 }, { pattern = "relu", rule = "pass" }, '
                     '{ pattern = "avgpool", rule = "norm" }, { pattern = "reshape", rule = "pass" }]\n')
    assert _explain(model, src, out, "--rules", str(rules)) == 2
    err = _one_error_line(capsys)
    assert "rules_file_sha256" in err and "rule_set" in err
    before = {r["key"]: r for r in _records(out)}
    assert _explain(model, src, out, "--target", "1", "--overwrite") == 0
    after = _records(out)
    assert {r["target"] for r in after} == {1} and len(after) == 3
    assert all(r["fingerprint"] != before[r["key"]]["fingerprint"] for r in after)
    assert _explain(model, src, out, "--target", "1") == 0  # now the folder's settings: resumes


def test_resume_skips_only_complete_matching_results(model, tmp_path: Path) -> None:
    src = tmp_path / "in"
    for i in range(5):
        _image(src / f"{i}.png", i)
    out = tmp_path / "out"
    assert _explain(model, src, out) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png.json")}
    time.sleep(0.01)
    _image(src / "0.png", seed=99)                                   # the source changed
    (out / "1.png.overlay.png").unlink()                             # an output is missing
    (out / "2.png.relevance.npy").write_bytes(b"\x93NUMPY")          # an output is not the one recorded
    (out / "3.png.json").write_text('{"status": "ok", "key": "3.pn')  # a broken record
    assert _explain(model, src, out) == 0
    redone = {n for n, t in stamps.items() if (out / n).stat().st_mtime_ns != t}
    assert redone == {"0.png.json", "1.png.json", "2.png.json", "3.png.json"}
    assert (out / "1.png.overlay.png").exists() and np.load(out / "2.png.relevance.npy").shape == (40, 48)
    # a record of other settings (say, the manifest was deleted) is redone, not kept
    (out / batch.MANIFEST).unlink()
    record = json.loads((out / "4.png.json").read_text())
    (out / "4.png.json").write_text(json.dumps({**record, "fingerprint": "0" * 16}))
    assert _explain(model, src, out) == 0
    assert json.loads((out / "4.png.json").read_text())["fingerprint"] == record["fingerprint"]


def test_manifest_names_the_c3_options(model, tmp_path: Path) -> None:
    import argparse
    from lrpfx.relevance.ruleset import RuleSet
    args = argparse.Namespace(model=model[0], weights=str(model[1]), pretrained=False, rules="c3_lrp", target="auto",
                              c3=False)
    rs = RuleSet.ensure("c3_lrp")
    plain = batch.run_config(args, rs, 32, (0, 0, 0), (1, 1, 1))
    args.c3 = True
    with_c3 = batch.run_config(args, rs, 32, (0, 0, 0), (1, 1, 1))
    assert with_c3["c3_options"] == dict(rs.c3) and batch.fingerprint(plain) != batch.fingerprint(with_c3)
    out = tmp_path / "out"
    out.mkdir()
    (out / batch.MANIFEST).write_text(json.dumps({"config": plain}))
    with pytest.raises(batch.UserError, match=r"c3, c3_options differ"):
        batch.check_manifest(out, with_c3)


# ------------------------------------------------------------------ one bad file never stops the run
def _bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A small PNG whose header claims width x height pixels (a decompression bomb as PIL sees it)."""
    _image(path, size=(8, 8))
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _bad_files(src: Path) -> dict[str, str]:
    """Bad images by key -> a word their error reason contains."""
    good = _image(src / "tmp.png", 5, size=(64, 64)).read_bytes()
    src.joinpath("tmp.png").unlink()
    (src / "truncated.png").write_bytes(good[: len(good) // 2])
    buf = src / "j.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, quality=95)
    (src / "truncated.jpg").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    buf.unlink()
    (src / "zero.png").write_bytes(b"")
    (src / "text.png").write_text("this is not a PNG\n")
    _bomb_png(src / "bomb.png")
    return {"truncated.png": "truncated", "truncated.jpg": "truncated", "zero.png": "empty",
            "text.png": "not an image", "bomb.png": "max-pixels"}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images_are_recorded_and_the_run_goes_on(model, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     workers: int) -> None:
    src = tmp_path / "in"
    for i in range(4):
        _image(src / f"good{i}.png", i)
    bad = _bad_files(src)
    out = tmp_path / "out"
    code = _explain(model, src, out, "--workers", str(workers))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "explained 4 image(s), 0 already done, 5 failed" in err and "results.jsonl" in err
    records = {r["key"]: r for r in _records(out)}
    assert len(records) == 9
    for key, word in bad.items():
        assert records[key]["status"] == "error" and word in records[key]["error"], records[key]
        assert f"cannot read {src / key}" in err
        assert not (out / f"{key}.relevance.npy").exists()
    assert all(records[f"good{i}.png"]["status"] == "ok" for i in range(4))
    # a rerun retries only the failed images; --allow-failures exits 0 with the same records
    assert _explain(model, src, out, "--allow-failures") == 0
    assert "explained 0 image(s), 4 already done, 5 failed" in capsys.readouterr().err
    # a failed file that is fixed is explained on the next run
    _image(src / "zero.png", 7)
    assert _explain(model, src, out) == 1
    assert {r["key"]: r["status"] for r in _records(out)}["zero.png"] == "ok"


def test_max_pixels_is_configurable(model, tmp_path: Path) -> None:
    _image(tmp_path / "in" / "a.png", 0, size=(40, 48))
    out = tmp_path / "out"
    assert _explain(model, tmp_path / "in", out, "--max-pixels", "1000") == 1
    assert "1920 pixels, over the limit of 1000" in _records(out)[0]["error"]


# ------------------------------------------------------------------ decoding
def test_16bit_integer_and_float_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 40 * 48).reshape(40, 48)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "g16.tif")
    Image.fromarray((ramp * 1e6).astype(np.int32)).save(tmp_path / "i32.tif")  # beyond 16 bits: [min, max]
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f01.tif")          # float in [0, 1]: kept
    Image.fromarray((ramp * 40 - 7).astype(np.float32)).save(tmp_path / "f.tif")  # other floats: [min, max]
    for name in ("g16.png", "g16.tif", "i32.tif", "f01.tif", "f.tif"):
        a = batch.read_image(tmp_path / name)
        assert a.shape == (40, 48, 3) and a.dtype == np.float32
        np.testing.assert_allclose(a[..., 0], ramp, atol=1e-4, err_msg=name)
        assert (a[..., 0] == a[..., 2]).all()
    rgb16 = np.zeros((4, 4, 3), np.uint16)
    rgb16[..., 0] = 65535
    import cv2
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16)  # BGR: blue at full scale
    np.testing.assert_allclose(batch.read_image(tmp_path / "rgb16.png")[0, 0], [0, 0, 1])
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(batch.ImageReadError, match="NaN"):
        batch.read_image(tmp_path / "nan.tif")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path: Path, suffix: str) -> None:
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255  # left half white
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / f"o{suffix}", exif=exif.tobytes())
    a = batch.read_image(tmp_path / f"o{suffix}")
    assert a.shape == (40, 20, 3)
    assert a[:10].mean() > 0.9 and a[-10:].mean() < 0.1  # the white half is now on top


def test_directory_symlinks_are_followed_without_looping_and_out_is_excluded(model, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    _image(elsewhere / "linked.png", 1)
    src = tmp_path / "in"
    _image(src / "a.png", 0)
    (src / "sub").mkdir()
    (src / "sub" / "link").symlink_to(elsewhere, target_is_directory=True)
    (src / "sub" / "loop").symlink_to(src, target_is_directory=True)  # a cycle
    keys = [it.key for it in batch.find_images([str(src)])]
    assert keys == ["a.png", "sub/link/linked.png"]
    out = src / "results"  # --out inside the input folder: not searched
    assert _explain(model, src, out) == 0
    assert _explain(model, src, out) == 0
    assert [r["key"] for r in _records(out)] == ["a.png", "sub/link/linked.png"]
    assert batch.find_images([str(src)], exclude=out) == batch.find_images([str(src)], exclude=out)
    assert all("results" not in it.key for it in batch.find_images([str(src)], exclude=out))


# ------------------------------------------------------------------ durable writes
def test_disk_full_is_one_line_leaves_no_partial_file_and_resumes(model, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in"
    for i in range(4):
        _image(src / f"{i}.png", i)
    out = tmp_path / "out"
    calls = {"n": 0}

    def full_disk(f, data: bytes) -> None:  # the 5th file written: half of it, then ENOSPC
        calls["n"] += 1
        if calls["n"] == 5:
            f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(data)

    monkeypatch.setattr(batch, "_write_all", full_disk)
    assert _explain(model, src, out) == 2
    err = _one_error_line(capsys)
    assert "No space left on device" in err and "cannot write" in err
    assert not _temporaries(out)
    monkeypatch.undo()
    assert _explain(model, src, out) == 0
    assert len([r for r in _records(out) if r["status"] == "ok"]) == 4


def test_a_silently_short_write_is_caught(model, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What cv2.imwrite did on a full disk: report success after writing part of the file."""
    _image(tmp_path / "in" / "a.png")
    monkeypatch.setattr(batch, "_write_all", lambda f, data: f.write(data[:-10]))
    assert _explain(model, tmp_path / "in", tmp_path / "out") == 2
    assert "short write" in _one_error_line(capsys)
    assert not (tmp_path / "out" / "a.png.relevance.npy").exists() and not _temporaries(tmp_path / "out")


def test_stale_temporaries_are_removed_and_the_merge_reads_only_this_runs_records(model, tmp_path: Path) -> None:
    src = tmp_path / "in"
    _image(src / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".a.png.json.x1y2z3{batch.TMP_SUFFIX}"
    stale.write_text('{"broken')
    (out / ".a.tmp.json").write_text('{"broken')      # the old fixed temporary name: ignored
    (out / "other.png.json").write_text('{"broken')   # not an image of this run: ignored
    assert _explain(model, src, out) == 0
    assert not stale.exists() and [r["key"] for r in _records(out)] == ["a.png"]
    (out / "a.png.json").write_text("{not json")
    with pytest.raises(batch.UserError, match=r"a\.png\.json"):
        batch.merge_records(out, batch.find_images([str(src)]), "x")


def test_write_atomic_never_exposes_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    batch.write_atomic(target, b"old")

    def crash(f, data: bytes) -> None:
        f.write(data[:3])
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "_write_all", crash)
    with pytest.raises(KeyboardInterrupt):
        batch.write_atomic(target, b"new content")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_a_second_run_on_the_same_folder_is_refused(model, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / batch.LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `lrpfx explain` holds it
        os.write(fd, b"4242\n")
        assert _explain(model, tmp_path / "in", out) == 2
        err = _one_error_line(capsys)
        assert "another `lrpfx explain` (pid 4242) is writing to" in err
    finally:
        os.close(fd)
    assert _explain(model, tmp_path / "in", out) == 0  # the lock is gone with its holder


# ------------------------------------------------------------------ environment errors: one line, exit 2
def _safetensors_that_is_a_pickle(tmp: Path) -> Path:
    p = tmp / "w.safetensors"
    torch.save({"w": torch.zeros(2)}, p)
    return p


def _truncated_safetensors(tmp: Path) -> Path:
    from safetensors.torch import save_file
    p = tmp / "t.safetensors"
    save_file({"w": torch.zeros(100)}, str(p))
    p.write_bytes(p.read_bytes()[:-50])
    return p


def _empty_pt(tmp: Path) -> Path:
    (tmp / "empty.pt").write_bytes(b"")
    return tmp / "empty.pt"


def _truncated_pt(tmp: Path) -> Path:
    p = tmp / "t.pt"
    torch.save({"w": torch.zeros(1000)}, p)
    p.write_bytes(p.read_bytes()[:500])
    return p


@pytest.mark.parametrize("make,message", [
    (_safetensors_that_is_a_pickle, "not a readable .safetensors file"),
    (_truncated_safetensors, "not a readable .safetensors file"),
    (_empty_pt, "is empty (0 bytes)"),
    (_truncated_pt, "not a readable torch checkpoint"),
])
def test_broken_weights_files_are_one_line(model, tmp_path: Path, capsys: pytest.CaptureFixture, make,
                                           message: str) -> None:
    _image(tmp_path / "in" / "a.png")
    weights = make(tmp_path)
    assert _explain((model[0], weights), tmp_path / "in", tmp_path / "out") == 2
    err = _one_error_line(capsys)
    assert message in err and str(weights) in err and "refusing to unpickle" not in err


@pytest.mark.parametrize("extra,message", [
    (["--size", "0"], "--size 0: must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--std", "1", "0", "1"], "--std 1.0 0.0 1.0: must be > 0"),
    (["--target", "cat"], "--target 'cat'"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
])
def test_bad_options_are_one_line(model, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str],
                                  message: str) -> None:
    _image(tmp_path / "in" / "a.png")
    assert _explain(model, tmp_path / "in", tmp_path / "out", *extra) == 2
    assert message in _one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_says_so(model, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _image(tmp_path / "in" / "a.png")
    assert _explain(model, tmp_path / "in", tmp_path / "out", "--device", "cuda") == 2
    err = _one_error_line(capsys)
    assert "no CUDA GPU" in err and "--device cpu" in err


def test_out_that_is_a_file_is_one_line(model, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _image(tmp_path / "in" / "a.png")
    (tmp_path / "out").write_text("a file")
    assert _explain(model, tmp_path / "in", tmp_path / "out") == 2
    assert "is a file, not a folder" in _one_error_line(capsys)


def test_unwritable_out_is_one_line_injected(model, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only folder, simulated (works as root too): creating any file in it fails with EROFS."""
    _image(tmp_path / "in" / "a.png")
    real_mkstemp = batch.tempfile.mkstemp

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(batch.tempfile, "mkstemp", read_only)
    assert _explain(model, tmp_path / "in", tmp_path / "out") == 2
    err = _one_error_line(capsys)
    assert "Read-only file system" in err and "writable" in err
    monkeypatch.setattr(batch.tempfile, "mkstemp", real_mkstemp)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only folder; "
                    "test_unwritable_out_is_one_line_injected covers this case")
def test_read_only_out_is_one_line(model, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert _explain(model, tmp_path / "in", out) == 2
        assert "Permission denied" in _one_error_line(capsys)
    finally:
        out.chmod(0o755)


def test_debug_shows_the_traceback(model, tmp_path: Path) -> None:
    _image(tmp_path / "in" / "a.png")
    (tmp_path / "out").write_text("a file")
    with pytest.raises(batch.UserError, match="is a file"):
        cli.main(["--debug", "explain", str(tmp_path / "in"), "--model", model[0], "--out", str(tmp_path / "out")])


def test_a_model_that_cannot_take_the_size_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "net.py").write_text("import torch.nn as nn\n"
                                     "def make():\n"
                                     "    return nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.AdaptiveAvgPool2d(1),"
                                     " nn.Flatten(), nn.Linear(4, 2))\n")
    _image(tmp_path / "in" / "a.png")
    assert cli.main(["explain", str(tmp_path / "in"), "--model", f"{tmp_path / 'net.py'}:make", "--rules", "lrp0",
                     "--size", "2", "--workers", "0", "--quiet", "--out", str(tmp_path / "out")]) == 2
    # a 5 x 5 convolution: the explainer names the smallest input the network takes
    assert "the input is 2 x 2, smaller than the smallest input this network takes (5 x 5)" in _one_error_line(capsys)
