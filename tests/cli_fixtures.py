"""Fixtures and helpers shared by the CLI tests (tests/unit/test_cli.py, test_batch_job.py and
tests/integration/test_cli_processes.py): a tiny CNN given as a user's model file with saved weights,
torchvision ResNet-18 weights, and folders of small generated images. Import the fixtures by name."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image


TINY = """
import torch
import torch.nn as nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(model spec, weights .pt) of a tiny CNN written as a user's model file."""
    root = tmp_path_factory.mktemp("model")
    (root / "tiny.py").write_text(TINY)
    torch.manual_seed(1)
    spec = importlib.util.spec_from_file_location("tiny_for_weights", root / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.make().state_dict(), root / "tiny.pt")
    return f"{root / 'tiny.py'}:make", root / "tiny.pt"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=1000).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    for i in range(5):
        mode = ("RGB", "L", "RGBA")[i % 3]  # grayscale and RGBA are converted
        shape = (40, 48, 4) if mode == "RGBA" else (40, 48) if mode == "L" else (40, 48, 3)
        img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)
        img.save(root / ("sub" if i >= 3 else ".") / f"img{i}.png")
    return root


def _image(path: Path, seed: int = 0, size: tuple[int, int] = (40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path
