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
    #: True for a torchvision or timm architecture built without any weights: its maps explain noise
    random_weights: bool = False
    #: where the class names come from (e.g. "torchvision weights metadata"), None without names
    classes_source: str | None = None

    def class_name(self, index: int) -> str | None:
        """The name of class ``index``, or None when the names are not known."""
        return self.classes[index] if self.classes is not None and 0 <= index < len(self.classes) else None


RANDOM_WEIGHTS_WARNING = ("random weights: the maps explain an untrained network. Hint: pass --weights FILE "
                          "(a state_dict or .safetensors), or --pretrained where the weights can be downloaded.")


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file, one per line in class-index order (blank lines are an error)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise LoadError(f"cannot read the class names file {str(path)!r}: {e.strerror or e}.") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names or any(not n for n in names):
        raise LoadError(f"class names file {str(path)!r}: write one non-empty name per line, in class-index order.")
    return names


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
               trust_pickle: bool = False, num_classes: int | None = None,
               classes: str | Path | None = None) -> LoadedModel:
    """Build the model named by ``spec``, load ``weights`` if given, and return it in eval mode.

    Class names come from ``classes`` (a text file, one name per line) when given; else from
    the weights' metadata where it is known: torchvision's ImageNet-1k categories
    (``Weights.meta["categories"]``, offline) for a torchvision model with ``pretrained`` or a
    weights file whose classifier has as many outputs, timm's ImageNet label descriptions
    likewise, and the bundled models' shape names.
    """
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
    if kind in ("torchvision", "timm"):
        loaded.random_weights = weights is None and not pretrained
        if not loaded.random_weights and loaded.classes is None:
            names = _imagenet_names(kind, name)
            if names is not None and _outputs(loaded.model) == len(names):
                loaded.classes, loaded.classes_source = names, f"{kind}'s ImageNet-1k metadata"
    if classes is not None:
        names = read_class_names(classes)
        outputs = _outputs(loaded.model)
        if outputs is not None and outputs != len(names):
            raise LoadError(f"class names file {str(classes)!r} has {len(names)} names, but {spec} has {outputs} "
                            "outputs. Hint: one name per line, one line per class.")
        loaded.classes, loaded.classes_source = names, str(classes)
    loaded.model.eval()
    return loaded


def _outputs(model: torch.nn.Module) -> int | None:
    """The classifier's number of outputs, read from its last linear (or 1x1 conv) layer."""
    last = None
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            last = m.out_features
        elif isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1):
            last = m.out_channels
    return last


def _imagenet_names(kind: str, name: str) -> list[str] | None:
    """ImageNet-1k class names shipped with torchvision (weights metadata) or timm, offline."""
    if kind == "torchvision":
        import torchvision
        try:
            meta = torchvision.models.get_model_weights(name).DEFAULT.meta
        except (ValueError, AttributeError, KeyError):
            return None
        names = meta.get("categories")
        return list(names) if names else None
    try:
        from timm.data import ImageNetInfo
        return list(ImageNetInfo().label_descriptions(as_dict=False, detailed=False))
    except Exception:  # noqa: BLE001 - an older timm without label names: indices only
        return None


def _torchvision(name: str, pretrained: bool, num_classes: int | None) -> LoadedModel:
    import torchvision
    if name not in torchvision.models.list_models():
        raise LoadError(f"torchvision has no model {name!r}. Hint: see torchvision.models.list_models().")
    kwargs: dict[str, Any] = {"weights": "DEFAULT" if pretrained else None}
    if num_classes is not None and not pretrained:
        kwargs["num_classes"] = num_classes
    model = torchvision.models.get_model(name, **kwargs)
    loaded = LoadedModel(model, IMAGENET_MEAN, IMAGENET_STD, 224, f"torchvision:{name}")
    if pretrained:
        categories = torchvision.models.get_model_weights(name).DEFAULT.meta.get("categories")
        if categories:
            loaded.classes, loaded.classes_source = list(categories), "torchvision weights metadata"
    return loaded


def _timm(name: str, pretrained: bool, num_classes: int | None) -> LoadedModel:
    try:
        import timm
    except ImportError:
        raise LoadError("timm is not installed. Hint: pip install timm.") from None
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if not timm.is_model(name):
        raise LoadError(f"timm has no model {name!r}. Hint: see timm.list_models('*{name[:6]}*').")
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
    classes = list(meta.get("classes", [])) or None
    return LoadedModel(model, tuple(meta["mean"]), tuple(meta["std"]), int(meta.get("image_size", 64)),
                       f"bundled:{name}", classes, classes_source="the bundled model's labels" if classes else None)


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
