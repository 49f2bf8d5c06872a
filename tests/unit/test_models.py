"""Bundled models: architecture, the ABN variant, weight files, and the shipped weights' accuracy."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from lrpfx.eval.datasets import CLASSES, generate_batch
from lrpfx.eval.models import ABNResNet, build, bundled_abn, bundled_metadata, bundled_resnet, bundled_resnet18, load_bundled, load_state, save_state

torch.set_num_threads(1)


def test_resnet50_layout_shapes_and_size() -> None:
    model = bundled_resnet(num_classes=8, width=16).eval()
    assert isinstance(model, ResNet)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert all(isinstance(b, Bottleneck) for i in range(1, 5) for b in getattr(model, f"layer{i}"))
    x = torch.randn(2, 3, 64, 64)
    feats = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))))
    assert feats.shape == (2, 512, 4, 4) and model(x).shape == (2, 8)
    assert sum(p.numel() for p in model.parameters()) * 4 <= 10 * 2 ** 20  # <= 10 MB as float32


def test_resnet18_variant() -> None:
    model = bundled_resnet18(num_classes=10, width=16).eval()
    assert all(isinstance(b, BasicBlock) for b in model.layer1) and model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_abn_branches_and_attention() -> None:
    torch.manual_seed(0)
    model = bundled_abn(num_classes=8, width=8)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    logits, att_logits, att = model.forward_all(x)
    assert logits.shape == att_logits.shape == (4, 8) and att.shape == (4, 1, 8, 8)
    (F.cross_entropy(logits, y) + F.cross_entropy(att_logits, y)).backward()
    assert model.att_map.weight.grad.abs().sum() > 0 and model.fc.weight.grad.abs().sum() > 0
    model.eval()
    a = model.attention(x)
    assert a.shape == (4, 64, 64) and ((a > 0) & (a < 1)).all()
    assert model.attention(x, upsample=False).shape == (4, 8, 8)
    assert torch.equal(model(x), model.forward_all(x)[0])


def test_build_names_and_errors() -> None:
    assert isinstance(build("abn_resnet50_w8"), ABNResNet)
    assert build("resnet50_w8").fc.in_features == 256
    with pytest.raises(ValueError, match="unknown model name 'vgg_w16'.*Hint"):
        build("vgg_w16")


def test_weight_files_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    model = bundled_resnet18(width=8).eval()
    path = save_state(model, tmp_path / "resnet18_w8")
    assert path.suffix == ".safetensors"
    (tmp_path / "resnet18_w8.json").write_text(json.dumps({"classes": list(CLASSES)}))
    loaded = load_bundled("resnet18_w8", directory=tmp_path)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
    torch.save(model.state_dict(), tmp_path / "other.pt")  # the fallback format, read with weights_only
    assert torch.equal(load_state(tmp_path / "other")["fc.weight"], model.fc.weight)


def test_missing_weights_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no metadata.*Hint: train it"):
        load_bundled("resnet50_w16", directory=tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights.*Hint"):
        load_state(tmp_path / "resnet50_w16")


@pytest.mark.parametrize("name", ["resnet50_w16", "abn_resnet50_w16", "resnet18_w16"])
def test_bundled_weights_accuracy(name: str) -> None:
    meta = bundled_metadata(name)
    assert meta["classes"] == list(CLASSES) and meta["test_accuracy"] >= 0.9
    model = load_bundled(name)
    x, y, _ = generate_batch(0, 200, split="test", seed=meta["seed"])
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.9


def test_bundled_basic_block_model_compiles_with_its_blocks_matched() -> None:
    """The ResNet-18-layout model: 8 basic blocks under c3_lrp, relevance near the logit."""
    import lrpfx
    model = load_bundled("resnet18_w16")
    plan = lrpfx.inspect(model, "c3_lrp")
    assert len({a.block.nodes[0] for a in plan.assignments.values() if a.block is not None}) == 8
    x, y, _ = generate_batch(0, 4, split="test")
    with torch.inference_mode():
        rel, logits = lrpfx.compile(model, "c3_lrp")(x, y)[:2]
    ratio = rel.flatten(1).sum(1) / logits.gather(1, y[:, None]).squeeze(1)
    assert ((ratio > 0.9) & (ratio < 1.1)).all()
