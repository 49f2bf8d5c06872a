"""The ``lrpfx`` command: demo, explain, inspect, export, bench, eval.

User and environment errors end with a one-line message and exit code 2, unexpected errors
with one line and exit code 3, warnings are one line each (the hidden ``--debug`` flag, anywhere
on the line, shows tracebacks and warnings in full). ``lrpfx explain`` is a batch job (:mod:`lrpfx.cli.batch`): a DataLoader with
worker processes, batched explanation, outputs keyed by relative path, resumable against a run
manifest, one bad image recorded without stopping the run (exit code 1), durable writes, and
sharded across processes when run under ``torchrun``.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

import lrpfx
from lrpfx.errors import LrpfxError


class UserError(LrpfxError):
    """A mistake on the command line: reported in one line, exit code 2."""


# ------------------------------------------------------------------ commands
def cmd_explain(args: argparse.Namespace) -> int:
    from lrpfx.cli import batch
    lrpfx.keep_freed_memory()  # a batch job: tensors of the same sizes every batch (lrpfx.runtime)
    return batch.run(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from lrpfx.cli.loading import load_model
    loaded = load_model(args.model, args.weights, trust_pickle=args.trust_pickle)
    plan = lrpfx.inspect(loaded.model, args.rules)
    print(plan)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lrpfx.cli.loading import RANDOM_WEIGHTS_WARNING, load_model
    from lrpfx.export import output_names
    loaded = load_model(args.model, args.weights, pretrained=args.pretrained, trust_pickle=args.trust_pickle)
    if loaded.random_weights:
        print(f"lrpfx: warning: {RANDOM_WEIGHTS_WARNING}", file=sys.stderr)
    explainer = lrpfx.compile(loaded.model, args.rules, **({"c3": True} if args.c3 else {}))
    size = args.size or loaded.size
    example = torch.randn(2, 3, size, size)
    # the exported forward takes (x, target), target -1 = the predicted class; --no-target-input: x only
    options = {"target_input": not args.no_target_input, "dynamic_size": False if args.fixed_size else None}
    if args.format == "onnx":
        lrpfx.export_onnx(explainer, args.out, example, **options)
    else:
        torch.export.save(lrpfx.export_program(explainer, example, **options), args.out)
    inputs = "x" if args.no_target_input else "x, target"
    print(f"wrote {args.out} (inputs: {inputs}; outputs: {', '.join(output_names(explainer))})")
    return 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    from lrpfx.eval import bench
    return bench.main(rest)


def cmd_demo(args: argparse.Namespace) -> int:
    from lrpfx.cli import demo
    from lrpfx.cli.progress import Stages
    lrpfx.keep_freed_memory()  # (lrpfx.runtime)
    if args.images < 1:
        raise UserError(f"--images {args.images}: must be >= 1.")
    stages = Stages(quiet=args.quiet)
    stages.say(f"lrpfx demo: C3-LRP, LRP, Grad-CAM, RISE and Input x Gradient on {args.images} generated images")
    path = demo.run(Path(args.out), n_images=args.images, seed=args.seed, stages=stages)
    print(f"wrote the comparison figure: {path} ({stages.total():.1f} s in all)")
    return 0


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from lrpfx.eval import evaluate
    except ImportError:
        raise UserError("the evaluation harness is not part of this version yet") from None
    return evaluate.main(rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrpfx", description="Compile CNNs into relevance networks and explain images.")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)  # tracebacks and full warnings
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="offline demo on the bundled model: writes the comparison figure "
                                     "(measured: 10 s on 2 idle cores, 42 s with two other jobs on them)")
    d.add_argument("--out", default="lrpfx-demo", help="output directory (default: %(default)s)")
    d.add_argument("--images", type=int, default=4, help="number of generated images (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no stage lines, only the path written")

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", required=True, help="torchvision:NAME | timm:NAME | bundled | file.py:Factory")
        q.add_argument("--weights", help="state_dict file (.pt/.pth, loaded with weights_only=True) or .safetensors")
        q.add_argument("--trust-pickle", action="store_true", help="allow full pickles (can run code!)")
        q.add_argument("--rules", default="epsilon_plus_flat", help="rule-set name or .toml file (default: %(default)s)")
        q.add_argument("--classes", metavar="FILE",
                       help="class names, one per line (default: the weights' metadata where known: torchvision's "
                            "and timm's ImageNet-1k names, the bundled model's labels)")

    e = sub.add_parser("explain", help="explain images or folders of images (a batch job)",
                       epilog="exit codes: 0 done; 1 some images could not be read (see the records with "
                              "\"status\": \"error\" in OUT/results.jsonl); 2 an error in the command line, a "
                              "file or the environment. See docs/cli.md.")
    e.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    model_args(e)
    e.add_argument("--pretrained", action="store_true", help="the library's own pretrained weights (needs internet)")
    e.add_argument("--target", default="auto", help="class index, or 'auto' for the predicted class")
    e.add_argument("--c3", action="store_true", help="append the C3 stage (writes the C3 mask)")
    e.add_argument("--out", default="lrpfx-out",
                   help="output folder; outputs are keyed by path relative to the input folder (default: %(default)s)")
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default: %(default)s)")
    e.add_argument("--size", type=int, help="input size (default: the model's)")
    e.add_argument("--mean", type=float, nargs=3, help="normalization mean (default: the model's)")
    e.add_argument("--std", type=float, nargs=3, help="normalization std (default: the model's)")
    e.add_argument("--quiet", action="store_true", help="no progress bar and no summary (failures are still reported)")
    e.add_argument("--overwrite", action="store_true",
                   help="redo every image, also when --out holds results made with other settings")
    e.add_argument("--max-pixels", type=int, default=100_000_000,
                   help="images with more pixels are recorded as failed (default: %(default)s)")
    e.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even when some images could not be read (they are still recorded)")

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
    x.add_argument("--size", type=int, help="the example's size (default: the model's)")
    x.add_argument("--no-target-input", action="store_true",
                   help="one input x, explaining the predicted class (default: inputs x and target, "
                        "target -1 = the predicted class)")
    x.add_argument("--fixed-size", action="store_true",
                   help="export for --size only (default: any height and width where every op allows it)")

    sub.add_parser("bench", help="speed and memory against zennit and captum (see lrpfx bench --help)", add_help=False)
    sub.add_parser("eval", help="the ground-truth evaluation (see lrpfx eval --help)", add_help=False)
    return p


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    print(f"lrpfx: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # e.g. PermissionError, no space left
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit code.

    0: done; 1: ``explain`` finished but some images failed; 2: a user or environment error
    (one line on standard error); 3: an unexpected internal error (one line, with a hint to
    rerun with ``--debug``, which shows every traceback and warning in full); 130: interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    p = parser()
    with warnings.catch_warnings():
        if not debug:
            # Python's own defaults, made explicit (so a test runner's filters do not change what a user sees):
            # each warning once per place, library deprecations hidden
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            warnings.showwarning = _one_line_warning
        try:
            if argv and argv[0] in ("bench", "eval"):  # their own parsers take the rest
                run = cmd_bench if argv[0] == "bench" else cmd_eval
                return run(argparse.Namespace(), argv[1:])
            args = p.parse_args(argv)
            commands = {"explain": cmd_explain, "inspect": cmd_inspect, "export": cmd_export, "demo": cmd_demo}
            return commands[args.command](args)
        except (LrpfxError, OSError, ValueError) as e:
            if debug:
                raise
            print(f"lrpfx: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if debug:
                raise
            print("lrpfx: interrupted (rerun the same command to resume)", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - the command line shows one line; --debug the traceback
            if debug:
                raise
            print(f"lrpfx: error: {type(e).__name__}: {_one_line(e)}. Hint: rerun with --debug for the traceback; "
                  "if your input is right, please report it.", file=sys.stderr)
            return 3


if __name__ == "__main__":
    sys.exit(main())
