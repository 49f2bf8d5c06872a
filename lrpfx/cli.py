"""The ``lrpfx`` command: demo, explain, inspect, export, bench, eval.

User errors end with a one-line message and exit code 2 (a traceback only with ``--debug``).
``lrpfx explain`` is a batch job: a DataLoader with worker processes, batched explanation,
resumable (finished images are skipped), atomic writes, and sharded across processes when
run under ``torchrun``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lrpfx
from lrpfx.errors import LrpfxError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class UserError(LrpfxError):
    """A mistake on the command line: reported in one line, exit code 2."""


# ------------------------------------------------------------------ images
def find_images(inputs: Sequence[str]) -> list[tuple[Path, Path]]:
    """(file, path relative to its root) for every image given or found below a directory, sorted."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += [(f, f.relative_to(p)) for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        elif p.is_file():
            found.append((p, Path(p.name)))
        else:
            raise UserError(f"{item}: no such file or directory")
    if not found:
        raise UserError(f"no images found in {' '.join(inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


class ImageFiles(torch.utils.data.Dataset):
    """Images resized and normalized like the model's training data (grayscale/RGBA become RGB)."""

    def __init__(self, files: list[tuple[Path, Path]], size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.files, self.size, self.mean, self.std = files, size, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image
        from torchvision.transforms import functional as TF
        with Image.open(self.files[i][0]) as im:
            im = im.convert("RGB")
            im = TF.resize(im, round(self.size * 256 / 224) if self.size >= 128 else self.size)
            im = TF.center_crop(im, self.size)
            x = TF.to_tensor(im)
        return TF.normalize(x, self.mean, self.std), i


# ------------------------------------------------------------------ atomic outputs
def _atomic_save(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def _outputs(out: Path, rel: Path) -> dict[str, Path]:
    base = out / rel.parent / rel.stem
    return {k: base.with_name(f"{base.name}.{k}") for k in ("relevance.npy", "c3mask.npy", "overlay.png", "json")}


def _save_one(paths: dict[str, Path], image: torch.Tensor, rel: torch.Tensor, c3: Any, record: dict[str, Any],
              mean: Sequence[float], std: Sequence[float]) -> None:
    from lrpfx.postprocess.render import overlay, save_png
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(paths["relevance.npy"], lambda p: np.save(p, rel.numpy()))
    if c3 is not None:
        _atomic_save(paths["c3mask.npy"], lambda p: np.save(p, c3.numpy()))
    picture = overlay(image.numpy(), rel.numpy(), mean=mean, std=std)
    _atomic_save(paths["overlay.png"], lambda p: save_png(p, picture))
    # the JSON record is written last: its presence marks the image as done (resume)
    _atomic_save(paths["json"], lambda p: p.write_text(json.dumps(record)))


# ------------------------------------------------------------------ distributed
def _dist() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1); initializes the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # the only collective is a barrier: gloo serves CPU and GPU jobs
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


# ------------------------------------------------------------------ commands
def cmd_explain(args: argparse.Namespace) -> int:
    from lrpfx.loading import load_model
    loaded = load_model(args.model, args.weights, pretrained=args.pretrained, trust_pickle=args.trust_pickle)
    rank, world = _dist()
    mean = tuple(args.mean) if args.mean else loaded.mean
    std = tuple(args.std) if args.std else loaded.std
    size = args.size or loaded.size
    files = find_images(args.inputs)[rank::world]  # each rank a disjoint shard
    out = Path(args.out)
    todo = [i for i, (_, rel) in enumerate(files) if not _outputs(out, rel)["json"].exists()]
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None and world > 1:  # one GPU per torchrun process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    explainer = lrpfx.compile(loaded.model, args.rules, **({"c3": True} if args.c3 else {})).to(device)
    dataset = torch.utils.data.Subset(ImageFiles(files, size, mean, std), todo)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    target = None if args.target == "auto" else int(args.target)
    progress = _progress(len(todo), disable=rank != 0 or args.quiet)
    for x, index in loader:
        with torch.inference_mode():
            outs = explainer(x.to(device), target)
        rel, logits = outs[0].cpu(), outs[1].cpu()
        c3_mask = outs[3].cpu() if args.c3 else None
        pred = logits.argmax(1)
        for j, i in enumerate(index.tolist()):
            t = int(pred[j]) if target is None else target
            record = {"image": str(files[i][0]), "predicted": int(pred[j]), "target": t,
                      "logit": float(logits[j, t]), "relevance_sum": float(rel[j].sum())}
            if c3_mask is not None:
                record["c3_region_pixels"] = int(c3_mask[j].sum())
            _save_one(_outputs(out, files[i][1]), x[j], rel[j], None if c3_mask is None else c3_mask[j], record,
                      mean, std)
        progress.update(len(index))
    progress.close()
    _barrier(world)
    if rank == 0:
        _merge_records(out)
    if not args.quiet and rank == 0:
        print(f"explained {len(todo)} image(s) ({len(files) - len(todo)} already done) -> {out}/results.jsonl")
    return 0


def _merge_records(out: Path) -> None:
    records = sorted((json.loads(p.read_text()) for p in out.rglob("*.json")), key=lambda r: r["image"])
    _atomic_save(out / "results.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in records)))


def _progress(total: int, disable: bool) -> Any:
    try:
        from tqdm import tqdm
        return tqdm(total=total, disable=disable, unit="img")
    except ImportError:  # tqdm is optional: a silent stand-in
        class _Quiet:
            def update(self, n: int) -> None: ...
            def close(self) -> None: ...
        return _Quiet()


def cmd_inspect(args: argparse.Namespace) -> int:
    from lrpfx.loading import load_model
    loaded = load_model(args.model, args.weights, trust_pickle=args.trust_pickle)
    plan = lrpfx.inspect(loaded.model, args.rules)
    print(plan)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lrpfx.loading import load_model
    loaded = load_model(args.model, args.weights, pretrained=args.pretrained, trust_pickle=args.trust_pickle)
    explainer = lrpfx.compile(loaded.model, args.rules, **({"c3": True} if args.c3 else {}))
    size = args.size or loaded.size
    example = torch.randn(2, 3, size, size)
    if args.format == "onnx":
        lrpfx.export_onnx(explainer, args.out, example)
    else:
        torch.export.save(lrpfx.export_program(explainer, example), args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    from lrpfx import bench
    return bench.main(rest)


def cmd_demo(args: argparse.Namespace) -> int:
    from lrpfx import demo
    path = demo.run(Path(args.out), n_images=args.images, seed=args.seed)
    print(f"wrote the comparison figure: {path}")
    return 0


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from lrpfx import evaluate
    except ImportError:
        raise UserError("the evaluation harness is not part of this version yet") from None
    return evaluate.main(rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrpfx", description="Compile CNNs into relevance networks and explain images.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="offline demo on the bundled model: writes the comparison figure")
    d.add_argument("--out", default="lrpfx-demo", help="output directory (default: %(default)s)")
    d.add_argument("--images", type=int, default=4, help="number of generated images (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0)

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", required=True, help="torchvision:NAME | timm:NAME | bundled | file.py:Factory")
        q.add_argument("--weights", help="state_dict file (.pt/.pth, loaded with weights_only=True) or .safetensors")
        q.add_argument("--trust-pickle", action="store_true", help="allow full pickles (can run code!)")
        q.add_argument("--rules", default="epsilon_plus_flat", help="rule-set name or .toml file (default: %(default)s)")

    e = sub.add_parser("explain", help="explain images or folders of images (a batch job)")
    e.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    model_args(e)
    e.add_argument("--pretrained", action="store_true", help="the library's own pretrained weights (needs internet)")
    e.add_argument("--target", default="auto", help="class index, or 'auto' for the predicted class")
    e.add_argument("--c3", action="store_true", help="append the C3 stage (writes the C3 mask)")
    e.add_argument("--out", default="lrpfx-out")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default: %(default)s)")
    e.add_argument("--size", type=int, help="input size (default: the model's)")
    e.add_argument("--mean", type=float, nargs=3, help="normalization mean (default: the model's)")
    e.add_argument("--std", type=float, nargs=3, help="normalization std (default: the model's)")
    e.add_argument("--quiet", action="store_true")

    i = sub.add_parser("inspect", help="print the plan: which rule each node gets")
    i.add_argument("model", metavar="SPEC")
    i.add_argument("--weights")
    i.add_argument("--trust-pickle", action="store_true")
    i.add_argument("--rules", default="epsilon_plus_flat")

    x = sub.add_parser("export", help="export the explainer (ONNX or torch.export)")
    x.add_argument("model", metavar="SPEC")
    x.add_argument("--weights")
    x.add_argument("--pretrained", action="store_true")
    x.add_argument("--trust-pickle", action="store_true")
    x.add_argument("--rules", default="epsilon_plus_flat")
    x.add_argument("--format", choices=["onnx", "torch-export"], default="onnx")
    x.add_argument("--out", required=True)
    x.add_argument("--c3", action="store_true")
    x.add_argument("--size", type=int)

    sub.add_parser("bench", help="speed and memory against zennit and captum (see lrpfx bench --help)", add_help=False)
    sub.add_parser("eval", help="the ground-truth evaluation (see lrpfx eval --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    debug = "--debug" in argv
    try:
        if argv and argv[0] in ("bench", "eval"):  # their own parsers take the rest
            run = cmd_bench if argv[0] == "bench" else cmd_eval
            return run(argparse.Namespace(), argv[1:])
        args = p.parse_args(argv)
        commands = {"explain": cmd_explain, "inspect": cmd_inspect, "export": cmd_export, "demo": cmd_demo}
        return commands[args.command](args)
    except (LrpfxError, FileNotFoundError, ValueError) as e:
        if debug:
            raise
        print(f"lrpfx: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
