"""Load a model from a spec string and its weights, safely by default.

Specs: ``torchvision:resnet50``, ``timm:resnet50d`` (if timm is installed), ``bundled``
(``bundled:NAME``), or ``path/to/file.py:ClassOrFactory`` (this imports and runs the user's
file: only load files you trust).

Weights load with ``torch.load(weights_only=True)`` or safetensors; a full pickle (which can
run arbitrary code when loaded) needs ``trust_pickle=True``.
"""
from __future__ import annotations

import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrpfx.errors import LrpfxError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LoadError(LrpfxError):
    """A model spec or weights file cannot be loaded."""


@dataclass
class LoadedModel:
    """A model in eval mode with the input normalization it expects."""

    model: torch.nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int
    name: str
    classes: list[str] | None = None


def load_weights(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a torch file, refusing code-carrying pickles by default."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"weights file {str(path)!r} does not exist.")
    with path.open("rb") as f:
        head = f.read(8)
    if not head:
        raise LoadError(f"weights file {str(path)!r} is empty (0 bytes). Hint: was the download or the save "
                        "interrupted?")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError (not exported under a stable name), OSError
            looks = (" It looks like a torch checkpoint (zip or pickle), not safetensors: name it .pt."
                     if head.startswith((b"PK", b"\x80")) else " Is it truncated?")
            raise LoadError(f"weights file {str(path)!r} is not a readable .safetensors file "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}).{looks}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise _unreadable(path, e) from None
        if not trust_pickle:
            raise LoadError(
                f"refusing to unpickle {str(path)!r}: it is not a plain tensor checkpoint and loading it could run "
                f"code ({type(e).__name__}). Hint: save a state_dict (torch.save(model.state_dict(), f)) or "
                "safetensors; if you trust the file, pass --trust-pickle.") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise _unreadable(path, e2) from None
    except Exception as e:  # EOFError, RuntimeError (a broken zip), KeyError (not a pickle at all), ...
        raise _unreadable(path, e) from None
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoadError(f"{str(path)!r} holds a {type(obj).__name__}, not a state_dict.")
    return obj


def _unreadable(path: Path, e: Exception) -> LoadError:
    reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    return LoadError(f"weights file {str(path)!r} is not a readable torch checkpoint ({type(e).__name__}: "
                     f"{reason[:200]}). Hint: is it truncated, or not a .pt/.pth file?")


def load_model(spec: str, weights: str | Path | None = None, *, pretrained: bool = False,
               trust_pickle: bool = False, num_classes: int | None = None) -> LoadedModel:
    """Build the model named by ``spec``, load ``weights`` if given, and return it in eval mode."""
    kind, _, name = spec.partition(":")
    if kind == "torchvision":
        loaded = _torchvision(name, pretrained, num_classes)
    elif kind == "timm":
        loaded = _timm(name, pretrained, num_classes)
    elif kind == "bundled":
        loaded = _bundled(name or None)
    elif spec.endswith(".py") or ".py:" in spec:
        loaded = _user_file(spec)
    else:
        raise LoadError(f"unknown model spec {spec!r}. Hint: use torchvision:NAME, timm:NAME, bundled, or "
                        "path/to/file.py:ClassOrFactory.")
    if weights is not None:
        state = load_weights(weights, trust_pickle)
        try:
            loaded.model.load_state_dict(state)
        except RuntimeError as e:
            raise LoadError(f"weights {str(weights)!r} do not fit {spec}: {str(e).splitlines()[0]}") from None
    loaded.model.eval()
    return loaded


def _torchvision(name: str, pretrained: bool, num_classes: int | None) -> LoadedModel:
    import torchvision
    if name not in torchvision.models.list_models():
        raise LoadError(f"torchvision has no model {name!r}. Hint: see torchvision.models.list_models().")
    kwargs: dict[str, Any] = {"weights": "DEFAULT" if pretrained else None}
    if num_classes is not None and not pretrained:
        kwargs["num_classes"] = num_classes
    model = torchvision.models.get_model(name, **kwargs)
    return LoadedModel(model, IMAGENET_MEAN, IMAGENET_STD, 224, f"torchvision:{name}")


def _timm(name: str, pretrained: bool, num_classes: int | None) -> LoadedModel:
    try:
        import timm
    except ImportError:
        raise LoadError("timm is not installed. Hint: pip install timm.") from None
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return LoadedModel(model, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)), size,
                       f"timm:{name}")


def _bundled(name: str | None) -> LoadedModel:
    try:
        from lrpfx.eval import models
    except ImportError as e:
        raise LoadError(f"the bundled model is not available: {e}") from None
    name = name or "resnet50_w16"
    try:
        model, meta = models.load_bundled(name), models.bundled_metadata(name)
    except (FileNotFoundError, ValueError) as e:
        raise LoadError(str(e)) from None
    return LoadedModel(model, tuple(meta["mean"]), tuple(meta["std"]), int(meta.get("size", 64)),
                       f"bundled:{name}", list(meta.get("classes", [])) or None)


def _user_file(spec: str) -> LoadedModel:
    path, _, attr = spec.rpartition(":") if ".py:" in spec else (spec, "", "")
    file = Path(path)
    if not file.is_file():
        raise LoadError(f"model file {path!r} does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"lrpfx_user_{file.stem}", file)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # runs the user's code, as documented
    if not attr:
        raise LoadError(f"{spec!r} names no class or factory. Hint: write {path}:ClassOrFactory.")
    factory = getattr(module, attr, None)
    if factory is None:
        raise LoadError(f"{path} defines no {attr!r}.")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise LoadError(f"{spec} returned {type(model).__name__}, not an nn.Module.")
    return LoadedModel(model, IMAGENET_MEAN, IMAGENET_STD, 224, spec)
