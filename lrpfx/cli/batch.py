"""``lrpfx explain``: the batch job.

- **Outputs keyed by path.** Every image is keyed by its path relative to its input folder,
  extension included (``a/good.png``); its outputs are ``OUT/a/good.png.relevance.npy``,
  ``.overlay.png``, ``.c3mask.npy`` and the record ``.json``. With several inputs, each folder's
  keys are prefixed by the folder's name. Two images with one key are refused up front.
- **A run manifest.** ``OUT/lrpfx-run.json`` holds the settings that decide the results (model,
  hashes of the weights and rule files, rule set, target, size, mean/std, C3, lrpfx version). A
  rerun with other settings is refused, naming the keys; ``--overwrite`` starts over. Each record
  carries the fingerprint of those settings, the source file's size and mtime and the byte size of
  every output; resume skips an image only when all of these match.
- **Fault isolation.** An image that cannot be read (truncated, empty, not an image, over
  ``--max-pixels``) gets an error record and the run goes on; failed images are retried on the next run.
- **Durable writes.** Each file is encoded in memory, written to a unique temporary file in its
  folder (``mkstemp``), flushed, fsynced, its size checked, then renamed into place with
  ``os.replace``; the record comes last. A lock file keeps a second run off the same folder.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lrpfx
from lrpfx.errors import LrpfxError

#: the file name suffixes searched for in input folders (case-insensitive)
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
#: images with more pixels than this are refused (decompression bombs); ``--max-pixels`` changes it
DEFAULT_MAX_PIXELS = 100_000_000
MANIFEST = "lrpfx-run.json"
LOCK = ".lrpfx.lock"
TMP_SUFFIX = ".lrpfx-tmp"
#: settings that decide the results; the manifest and every record carry their fingerprint
EXIT_OK, EXIT_FAILED_IMAGES, EXIT_ERROR = 0, 1, 2


class UserError(LrpfxError):
    """A mistake on the command line or in the environment: reported in one line, exit code 2."""


class ImageReadError(LrpfxError):
    """One image cannot be read: recorded as a failure, the run goes on."""


# ------------------------------------------------------------------ finding images
@dataclass(frozen=True)
class Item:
    """An input image: the file as found, and its key (the output path below ``--out``, in POSIX form)."""

    file: Path
    key: str


def _walk(root: Path, exclude: set[Path]) -> Iterator[Path]:
    """Files below ``root``, following directory symlinks; a folder reached twice (a cycle) is entered once."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen or Path(dirpath).resolve() in exclude:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def find_images(inputs: Sequence[str], exclude: Path | None = None) -> list[Item]:
    """Every image given, or found below a given folder, with its key; sorted by key.

    One folder: keys are paths relative to it. Several inputs: each folder's keys start with the
    folder's name; a file given by itself is keyed by its name. ``exclude`` (the output folder)
    is not searched.
    """
    excluded = {exclude.resolve()} if exclude is not None else set()
    items: list[Item] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            if p.resolve() in excluded:
                raise UserError(f"--out {exclude} is the input folder {item}: choose another --out.")
            prefix = (p.resolve().name + "/") if len(inputs) > 1 else ""
            for f in _walk(p, excluded):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    items.append(Item(f, prefix + f.relative_to(p).as_posix()))
        elif p.exists() or p.is_symlink():
            items.append(Item(p, p.name))
        else:
            raise UserError(f"{item}: no such file or directory")
    if not items:
        raise UserError(f"no images found in {' '.join(inputs)} (looked for {', '.join(IMAGE_SUFFIXES)})")
    items.sort(key=lambda it: it.key)
    for a, b in zip(items, items[1:]):
        if a.key == b.key:
            raise UserError(f"{a.file} and {b.file} would both be written as {a.key}. Hint: give their common "
                            "folder instead, or rename one.")
    return items


# ------------------------------------------------------------------ reading images
def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image as float32 (H, W, 3) in [0, 1], turned upright by its EXIF orientation.

    8-bit images are divided by 255 and 16-bit ones by 65535. 32-bit integer images whose values
    fit in [0, 65535] are taken as 16-bit, others are scaled from their [min, max]. Float images
    already in [0, 1] are kept, others are scaled from their [min, max]. Grayscale becomes RGB,
    the alpha channel is dropped. Raises :class:`ImageReadError` with the reason.
    """
    from PIL import Image, ImageOps
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # checked here, with this job's limit, before decoding
        with warnings.catch_warnings(), Image.open(path) as im:
            warnings.simplefilter("ignore")  # e.g. "truncated EXIF": the pixels decide
            w, h = im.size
            if w * h > max_pixels:
                raise ImageReadError(f"{w}x{h} is {w * h} pixels, over the limit of {max_pixels} (--max-pixels)")
            im.load()
            im = ImageOps.exif_transpose(im)
            a = _to_float(im)
    except ImageReadError:
        raise
    except Exception as e:  # PIL raises many types: OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageReadError(_reason(path, e)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a, dtype=np.float32)


def _reason(path: Path, e: Exception) -> str:
    from PIL import UnidentifiedImageError
    with contextlib.suppress(OSError):
        if os.stat(path).st_size == 0:
            return "empty file (0 bytes)"
    if isinstance(e, UnidentifiedImageError):
        return "not an image in a format Pillow can read (or its header is corrupt)"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.replace(repr(str(path)), "").replace(str(path), "").strip(" :")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _to_float(im: Any) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32) / 65535
    if mode == "I":
        a = np.asarray(im).astype(np.float64)
        if a.min() >= 0 and a.max() <= 65535:
            return a / 65535
        return _min_max(a)
    if mode == "F":
        a = np.asarray(im).astype(np.float64)
        if not np.isfinite(a).all():
            raise ImageReadError("the float image holds NaN or infinite values")
        return a if a.min() >= 0 and a.max() <= 1 else _min_max(a)
    return np.asarray(im.convert("RGB")).astype(np.float32) / 255


def _min_max(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


@dataclass(frozen=True)
class Geometry:
    """Where the model's input came from in the photo: model pixel (v, u) is photo pixel
    ((v + top + 0.5) / scale_y - 0.5, (u + left + 0.5) / scale_x - 0.5).

    ``scale_y``, ``scale_x``: the resize factors (resized size / photo size); ``top``, ``left``:
    the centre crop's offset in the resized image (negative where the crop padded it).
    """

    height: int
    width: int
    size: int
    scale_y: float
    scale_x: float
    top: int
    left: int

    def crop_box(self) -> list[float]:
        """The model input's square in photo pixels: [top, left, height, width]."""
        return [round(self.top / self.scale_y, 2), round(self.left / self.scale_x, 2),
                round(self.size / self.scale_y, 2), round(self.size / self.scale_x, 2)]

    def _inverse(self) -> np.ndarray:
        # photo pixel centre -> model pixel centre, the affine map cv2.warpAffine takes with WARP_INVERSE_MAP
        sy, sx = self.scale_y, self.scale_x
        return np.array([[sx, 0.0, 0.5 * sx - 0.5 - self.left], [0.0, sy, 0.5 * sy - 0.5 - self.top]])

    def to_photo(self, a: np.ndarray, *, nearest: bool = False) -> np.ndarray:
        """A model-resolution map (h, w) at the photo's size (H, W): 0 outside the crop.

        Bilinear for relevance, scaled by the area of a photo pixel in model pixels so that
        sums are kept (up to interpolation); nearest neighbour for masks (``nearest``).
        """
        import cv2
        flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
        src = a.astype(np.uint8) if a.dtype == bool else np.ascontiguousarray(a, dtype=np.float32)
        out = cv2.warpAffine(src, self._inverse(), (self.width, self.height), flags=flags,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if a.dtype == bool:
            return out.astype(bool)
        return out if nearest else out * np.float32(self.scale_y * self.scale_x)


def _crop_offset(resized: int, size: int) -> int:
    # torchvision's center_crop: round((resized - size) / 2); a smaller image is padded first
    return int(round((resized - size) / 2.0)) if resized >= size else -((size - resized) // 2)


class ImageFiles(torch.utils.data.Dataset):
    """Images resized and normalized like the model's training data; a bad file yields its error.

    Each item also carries the photo (uint8, for the overlays at its own size) and its
    :class:`Geometry`.
    """

    def __init__(self, items: list[Item], size: int, mean: Sequence[float], std: Sequence[float],
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.items, self.size, self.mean, self.std = items, size, tuple(mean), tuple(std)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None, Any]:
        from torchvision.transforms import functional as TF
        try:
            a = read_image(self.items[i].file, self.max_pixels)
        except ImageReadError as e:
            return None, i, str(e), None
        x = torch.from_numpy(a).permute(2, 0, 1)
        h, w = x.shape[-2:]
        x = TF.resize(x, [round(self.size * 256 / 224) if self.size >= 128 else self.size], antialias=True)
        rh, rw = x.shape[-2:]
        geometry = Geometry(int(h), int(w), self.size, rh / h, rw / w, _crop_offset(rh, self.size),
                            _crop_offset(rw, self.size))
        x = TF.center_crop(x, [self.size, self.size])
        photo = torch.from_numpy(np.round(a * 255).astype(np.uint8))
        return TF.normalize(x, self.mean, self.std), i, None, (photo, geometry)


def collate(batch: list[tuple[torch.Tensor | None, int, str | None, Any]]) -> tuple[
        torch.Tensor | None, list[int], list[tuple[int, str]], list[Any]]:
    """(the stacked readable images, their indices, [(index, reason)] of the unreadable ones,
    [(photo, geometry)] of the readable ones)."""
    good = [(x, i, extra) for x, i, err, extra in batch if err is None]
    bad = [(i, err) for _, i, err, _ in batch if err is not None]
    x = torch.stack([x for x, _, _ in good]) if good else None
    return x, [i for _, i, _ in good], bad, [extra for _, _, extra in good]


# ------------------------------------------------------------------ durable outputs
def _write_all(f: Any, data: bytes) -> None:
    f.write(data)


def write_atomic(path: Path, data: bytes, *, sync_dir: bool = False) -> None:
    """Write ``data`` to a unique temporary file next to ``path``, fsync, check its size, rename into place.

    A reader sees the old file or the complete new one; a failure leaves no temporary behind and
    raises :class:`UserError` naming the file.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
            if os.fstat(f.fileno()).st_size != len(data):
                raise OSError(errno.EIO, f"short write ({os.fstat(f.fileno()).st_size} of {len(data)} bytes)")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise
    if sync_dir:
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _write_error(path: Path, e: OSError) -> UserError:
    hint = " Hint: free some space." if e.errno in (errno.ENOSPC, errno.EDQUOT) else \
        " Hint: check that --out is a writable folder." if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
    return UserError(f"cannot write {path}: {e.strerror or e}.{hint}")


def encode_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB image (float in [0, 1] or uint8), decoded back to check them."""
    import cv2
    if rgb.dtype != np.uint8:
        rgb = np.round(np.clip(rgb.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    back = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else None
    if back is None or back.shape != rgb.shape:
        raise OSError(errno.EIO, "the PNG encoder failed")
    return buf.tobytes()


def output_paths(out: Path, key: str, c3: bool) -> dict[str, Path]:
    """The files of one image, the record (``json``) last.

    ``relevance.npy``: (H, W) float32 at the photo's size, channels summed; ``input_relevance.npy``:
    (C, size, size), the relevance of the model's input, exact; ``overlay.png`` at the photo's
    size; with C3 ``c3mask.npy`` (H, W) bool and ``c3.png`` (the region's outline on the photo).
    """
    kinds = ("relevance.npy", "input_relevance.npy", "overlay.png")
    kinds += ("c3mask.npy", "c3.png", "json") if c3 else ("json",)
    return {k: out / f"{key}.{k}" for k in kinds}


def _source(file: Path) -> dict[str, int]:
    st = os.stat(file)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_record(path: Path) -> dict[str, Any] | None:
    """A record, or None when it is missing or unreadable (then the image is redone)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_done(out: Path, item: Item, fingerprint: str, c3: bool) -> bool:
    """Whether the image's outputs are complete and were made from this file with these settings."""
    paths = output_paths(out, item.key, c3)
    record = read_record(paths["json"])
    if not record or record.get("status") != "ok" or record.get("fingerprint") != fingerprint:
        return False
    try:
        if record.get("source") != _source(item.file):
            return False
        sizes = record.get("outputs", {})
        return all(sizes.get(k) == p.stat().st_size for k, p in paths.items() if k != "json")
    except OSError:
        return False


# ------------------------------------------------------------------ run manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_config(args: argparse.Namespace, ruleset: Any, size: int, mean: Sequence[float],
               std: Sequence[float]) -> dict[str, Any]:
    """The settings that decide the results (paths of files are replaced by their hashes)."""
    model_file = args.model.rpartition(":")[0] if ".py:" in args.model else args.model if \
        args.model.endswith(".py") else None
    rules_file = args.rules if str(args.rules).endswith(".toml") else None
    return {
        "lrpfx": lrpfx.__version__,
        "model": args.model if model_file is None else f"{Path(model_file).name}:{args.model.rpartition(':')[2]}",
        "model_file_sha256": _sha256(Path(model_file)) if model_file else None,
        "pretrained": bool(args.pretrained),
        "weights_sha256": _sha256(Path(args.weights)) if args.weights else None,
        "classes_sha256": _sha256(Path(args.classes)) if getattr(args, "classes", None) else None,
        "rules": ruleset.name,
        "rules_file_sha256": _sha256(Path(rules_file)) if rules_file else None,
        "rule_set": {"top": ruleset.top, "options": dict(ruleset.options),
                     "bindings": [[b.pattern, repr(b.rule)] for b in ruleset.bindings]},
        "target": args.target,
        "size": size,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "c3": bool(args.c3),
        "c3_options": dict(ruleset.c3) if args.c3 else None,
    }


def fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_manifest(out: Path, config: dict[str, Any]) -> None:
    """Refuse to mix results of other settings into ``out`` (names the differing keys)."""
    path = out / MANIFEST
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}). Hint: pass --overwrite to start over.") from None
    differ = sorted(k for k in set(old) | set(config) if json.dumps(old.get(k), sort_keys=True, default=str) !=
                    json.dumps(config.get(k), sort_keys=True, default=str))
    if differ:
        raise UserError(f"{out} holds results made with other settings ({', '.join(differ)} differ; see {path}). "
                        "Hint: pass --overwrite to redo them with these settings, or choose another --out.")


# ------------------------------------------------------------------ the lock
@contextlib.contextmanager
def output_lock(out: Path, take: bool) -> Iterator[None]:
    """Hold ``OUT/.lrpfx.lock`` (an flock, released when the process ends, even by kill -9)."""
    if not take:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"another `lrpfx explain` (pid {holder}) is writing to {out}. Hint: wait for it to "
                            "finish, then rerun to resume; or choose another --out.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def remove_stale_temporaries(out: Path) -> int:
    """Delete temporary files left by killed runs (only under the lock)."""
    n = 0
    for dirpath, _, filenames in os.walk(out):
        for name in filenames:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(dirpath, name))
                    n += 1
    return n


# ------------------------------------------------------------------ distributed
def _dist() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1); initializes the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # barriers and one sum of counts: gloo serves CPU and GPU jobs
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def _sum(counts: list[int], world: int) -> list[int]:
    if world <= 1:
        return counts
    import torch.distributed as dist
    t = torch.tensor(counts, dtype=torch.int64)
    dist.all_reduce(t)
    return [int(v) for v in t]


# ------------------------------------------------------------------ the job
def _device(name: str, world: int) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device. Hint: use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available to PyTorch here. Hint: use --device cpu.")
        if device.index is None and world > 1:  # one GPU per torchrun process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here. Hint: use --device cpu.")
    return device


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value, low in (("--size", args.size, 1), ("--batch-size", args.batch_size, 1),
                             ("--workers", args.workers, 0), ("--max-pixels", args.max_pixels, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: must be >= {low}.")
    for flag, values in (("--mean", args.mean), ("--std", args.std)):
        if values and not all(math.isfinite(v) for v in values):
            raise UserError(f"{flag} {' '.join(map(str, values))}: must be finite numbers.")
    if args.std and any(v <= 0 for v in args.std):
        raise UserError(f"--std {' '.join(map(str, args.std))}: must be > 0.")
    if args.target != "auto":
        try:
            if int(args.target) < 0:
                raise ValueError
        except ValueError:
            raise UserError(f"--target {args.target!r}: must be a class index >= 0 or 'auto'.") from None


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror or e}.") from None


def run(args: argparse.Namespace) -> int:
    """Run ``lrpfx explain``; returns the exit code (0, 1 if an image failed, see docs/cli.md)."""
    from lrpfx.cli.loading import RANDOM_WEIGHTS_WARNING, load_model
    from lrpfx.relevance.ruleset import RuleSet
    _check_numbers(args)
    rank, world = _dist()
    device = _device(args.device, world)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder.")
    items = find_images(args.inputs, exclude=out)
    ruleset = RuleSet.ensure(args.rules)  # a bad rule file fails here, before the model is built
    loaded = load_model(args.model, args.weights, pretrained=args.pretrained, trust_pickle=args.trust_pickle,
                        classes=getattr(args, "classes", None))
    if loaded.random_weights and rank == 0:
        print(f"lrpfx: warning: {RANDOM_WEIGHTS_WARNING}", file=sys.stderr)
    mean = tuple(args.mean) if args.mean else loaded.mean
    std = tuple(args.std) if args.std else loaded.std
    size = args.size or loaded.size
    config = run_config(args, ruleset, size, mean, std)
    fp = fingerprint(config)
    _prepare_out(out)
    if not args.overwrite:
        check_manifest(out, config)  # every rank: all of them stop on a mismatch
    with output_lock(out, take=rank == 0):
        if rank == 0:
            remove_stale_temporaries(out)
            if args.overwrite or not (out / MANIFEST).exists():  # else it was checked: it holds these settings
                manifest = {"config": config, "fingerprint": fp, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), sync_dir=True)
        _barrier(world)
        shard = items[rank::world]  # each rank a disjoint shard
        todo = [i for i, it in enumerate(shard) if args.overwrite or not is_done(out, it, fp, args.c3)]
        done_now, failed = _explain(args, loaded, ruleset, shard, todo, out, fp, size, mean, std, device, rank)
        done_now, failed, skipped = _sum([done_now, failed, len(shard) - len(todo)], world)
        _barrier(world)
        if rank == 0:
            merge_records(out, items, fp)
    if rank == 0 and (failed or not args.quiet):
        line = (f"explained {done_now} image(s), {skipped} already done, {failed} failed"
                + (f": see the records with \"status\": \"error\" in {out / 'results.jsonl'}" if failed else
                   f" -> {out / 'results.jsonl'}"))
        print(line, file=sys.stderr if failed else sys.stdout)
    return EXIT_FAILED_IMAGES if failed and not args.allow_failures else EXIT_OK


def _explain(args: argparse.Namespace, loaded: Any, ruleset: Any, shard: list[Item], todo: list[int],
             out: Path, fp: str, size: int, mean: Sequence[float], std: Sequence[float], device: torch.device,
             rank: int) -> tuple[int, int]:
    if not todo:
        return 0, 0
    explainer = lrpfx.compile(loaded.model, ruleset, **({"c3": True} if args.c3 else {})).to(device)
    dataset = torch.utils.data.Subset(ImageFiles(shard, size, mean, std, args.max_pixels), todo)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=collate)
    target = None if args.target == "auto" else int(args.target)
    progress = _progress(len(todo), disable=rank != 0 or args.quiet)
    done = failed = 0
    for x, index, bad, photos in loader:
        for i, reason in bad:
            item = shard[i]
            _warn(progress, f"lrpfx: warning: cannot read {item.file}: {reason}")
            _save_failure(out, item, reason, fp, args.c3)
            failed += 1
        if x is not None:
            try:
                with torch.inference_mode():
                    outs = explainer(x.to(device), target)
            except (RuntimeError, ValueError) as e:  # a size the model cannot take, out of memory, ...
                if isinstance(e, LrpfxError):
                    raise
                reason = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
                raise UserError(f"the model failed on a batch of shape {tuple(x.shape)}: {reason}. Hint: check "
                                "--size; lower --batch-size if memory ran out.") from e
            rel, logits = outs[0].cpu(), outs[1].cpu()
            c3_mask = outs[3].cpu() if args.c3 else None
            pred = logits.argmax(1)
            for j, i in enumerate(index):
                t = int(pred[j]) if target is None else target
                if not 0 <= t < logits.shape[1]:
                    raise UserError(f"--target {t}: the model has {logits.shape[1]} classes.")
                record: dict[str, Any] = {"predicted": int(pred[j]), "target": t}
                if loaded.classes is not None:
                    record.update(predicted_class=loaded.class_name(int(pred[j])), target_class=loaded.class_name(t))
                record.update(logit=float(logits[j, t]), relevance_sum=float(rel[j].sum()))
                if c3_mask is not None:
                    record["c3_region_pixels"] = int(c3_mask[j].sum())
                photo, geometry = photos[j]
                _save_one(out, shard[i], photo.numpy(), geometry, rel[j], None if c3_mask is None else c3_mask[j],
                          record, fp)
                done += 1
        progress.update(len(index) + len(bad))
    progress.close()
    return done, failed


def _save_one(out: Path, item: Item, photo: np.ndarray, geometry: Geometry, rel: torch.Tensor,
              c3: torch.Tensor | None, values: dict[str, Any], fp: str) -> None:
    from lrpfx.postprocess.render import overlay
    paths = output_paths(out, item.key, c3 is not None)
    _mkdir(paths["json"].parent)
    on_photo = geometry.to_photo(rel.sum(0).numpy())
    data = {"relevance.npy": encode_npy(on_photo), "input_relevance.npy": encode_npy(rel.numpy()),
            "overlay.png": encode_png(overlay(photo, on_photo))}
    if c3 is not None:
        mask = geometry.to_photo(c3.numpy().astype(bool), nearest=True)
        data["c3mask.npy"] = encode_npy(mask)
        data["c3.png"] = encode_png(outline(photo, mask))
    for kind, blob in data.items():
        write_atomic(paths[kind], blob)
    sizes = {"image_size": [geometry.height, geometry.width], "model_size": [geometry.size, geometry.size],
             "crop_box": geometry.crop_box(), "relevance_sum_on_photo": float(on_photo.sum(dtype=np.float64))}
    record = {"image": str(item.file), "key": item.key, "status": "ok", **values, **sizes,
              "source": _source(item.file), "outputs": {k: len(v) for k, v in sorted(data.items())},
              "fingerprint": fp}
    # the record is written last: with matching sizes and fingerprint it marks the image as done (resume)
    write_atomic(paths["json"], (json.dumps(record) + "\n").encode(), sync_dir=True)


def outline(photo: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (255, 32, 32)) -> np.ndarray:
    """The photo (uint8 RGB) with the outline of ``mask``'s region drawn on it, lines ~0.3% of its size."""
    import cv2
    rgb = np.ascontiguousarray(photo.copy())
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(0.003 * max(mask.shape)))
    cv2.drawContours(rgb, contours, -1, colour, thickness)
    return rgb


def _save_failure(out: Path, item: Item, reason: str, fp: str, c3: bool) -> None:
    paths = output_paths(out, item.key, True)
    _mkdir(paths["json"].parent)
    try:
        source: dict[str, int] | None = _source(item.file)
    except OSError:
        source = None
    record = {"image": str(item.file), "key": item.key, "status": "error", "error": reason, "source": source,
              "fingerprint": fp}
    write_atomic(paths["json"], (json.dumps(record) + "\n").encode(), sync_dir=True)
    for kind, path in paths.items():  # outputs of an earlier version of this file are no longer its results
        if kind != "json":
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(folder, e) from None


def merge_records(out: Path, items: list[Item], fp: str) -> list[dict[str, Any]]:
    """Write ``results.jsonl``: the records of this run's images (sorted by key), nothing else."""
    records = []
    for item in items:
        path = out / f"{item.key}.json"
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the record {path}: {e}. Hint: delete it and rerun.") from None
        if isinstance(record, dict) and record.get("fingerprint") == fp:
            records.append(record)
    write_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode(), sync_dir=True)
    return records


def _warn(progress: Any, message: str) -> None:
    (getattr(progress, "write", None) or print)(message, file=sys.stderr)


def _progress(total: int, disable: bool) -> Any:
    try:
        from tqdm import tqdm
        return tqdm(total=total, disable=disable, unit="img")
    except ImportError:  # tqdm is optional: a silent stand-in
        class _Quiet:
            def update(self, n: int) -> None: ...
            def close(self) -> None: ...
        return _Quiet()
