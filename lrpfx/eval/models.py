"""Small ResNets for the shapes benchmark, with bundled weights.

* ``bundled_resnet``: the ResNet-50 layout (torchvision ``Bottleneck``, blocks [3, 4, 6, 3])
  at a narrow width: stage widths ``w, 2w, 4w, 8w`` (outputs ``4w .. 32w``) instead of
  64 .. 512, and a stem for 64 x 64 inputs (3 x 3 stride-1 convolution, then the usual
  max-pool), so the stages run at 32, 16, 8 and 4 pixels. It *is* a torchvision ``ResNet``
  (same attribute names, same ``forward``), so every tool that handles torchvision's
  ResNet-50 handles it.
* ``bundled_resnet18``: the same with ``BasicBlock`` and blocks [2, 2, 2, 2].
* ``bundled_resnet_224``: the ResNet-50 layout for 224 x 224 inputs with torchvision's own
  stem (7 x 7 stride-2 convolution, max-pool), so the stages run at 56, 28, 14 and 7 pixels
  as in ResNet-50 on ImageNet and C3's default 28 x 28 grid is ``layer2``'s (224 / 8), as in
  the poster and the ECCV paper.
* ``ABNResNet``: an Attention Branch Network (Fukui et al., "Attention Branch Network:
  Learning of Attention Mechanism for Visual Explanation", CVPR 2019) on the same trunk.
  Its attention map is its explanation.
* ``bundled_vit``: the ViT layout (torchvision ``VisionTransformer``: 8 x 8 patches of the
  64 x 64 image, 64 tokens plus a class token, ``nn.MultiheadAttention``, LayerNorm, GELU MLP)
  at a small hidden width, for the attention rule sets (``attnlrp`` against CP-LRP).
* ``load_bundled``: a model with the weights shipped in ``lrpfx/eval/weights/``.
"""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer

Block = type[BasicBlock] | type[Bottleneck]


class NarrowResNet(ResNet):
    """torchvision's ResNet with stage widths ``width * (1, 2, 4, 8)`` and a 64-px stem.

    Args:
        block: ``Bottleneck`` or ``BasicBlock``.
        layers: blocks per stage, e.g. ``[3, 4, 6, 3]`` for the ResNet-50 layout.
        num_classes: outputs of the final ``fc``.
        width: stage-1 width (torchvision's ResNets use 64).
        zero_init_residual: start every block's last BatchNorm at zero, so that each
            residual block begins as the identity (Goyal et al. 2017); it trains faster.
    """

    def __init__(self, block: Block, layers: list[int], num_classes: int = 8, width: int = 16,
                 zero_init_residual: bool = True) -> None:
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes the widths 64 .. 512
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        _init_weights(self, zero_init_residual)


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """torchvision's ResNet initialisation (Kaiming fan-out, BN at 1/0, optional zero-init)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)


def bundled_resnet(num_classes: int = 8, width: int = 16) -> NarrowResNet:
    """The ResNet-50 layout (Bottleneck, [3, 4, 6, 3]) at stage width ``width``; about 1.5 M
    parameters at width 16."""
    return NarrowResNet(Bottleneck, [3, 4, 6, 3], num_classes, width)


def bundled_resnet_224(num_classes: int = 8, width: int = 8) -> NarrowResNet:
    """The ResNet-50 layout with torchvision's 224-px stem (7 x 7 stride-2 convolution and
    max-pool) at stage width ``width``; about 0.4 M parameters at width 8."""
    model = NarrowResNet(Bottleneck, [3, 4, 6, 3], num_classes, width)
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def bundled_resnet18(num_classes: int = 8, width: int = 16) -> NarrowResNet:
    """The ResNet-18 layout (BasicBlock, [2, 2, 2, 2]) at stage width ``width``."""
    return NarrowResNet(BasicBlock, [2, 2, 2, 2], num_classes, width)


class ABNResNet(nn.Module):
    """Attention Branch Network (Fukui et al., CVPR 2019) on a narrow ResNet trunk.

    * feature extractor: the trunk's stem and ``layer1 .. layer3``;
    * attention branch: one stride-1 residual block, BatchNorm, a 1 x 1 convolution to
      K = ``num_classes`` class maps and ReLU; from there (a) a 1 x 1 convolution, global
      average pooling and the branch's own class scores, and (b) a 1 x 1 convolution to one
      map, BatchNorm and a sigmoid: the attention map ``a`` in (0, 1);
    * perception branch: ``layer4``, average pooling and ``fc`` applied to
      ``features * (1 + a)`` (the residual attention mechanism of the paper).

    ``forward`` returns the perception branch's logits (so the model plugs into any
    classifier tool); ``forward_all`` returns ``(logits, attention_logits, attention)`` and
    training minimises the sum of both branches' cross-entropies.
    """

    def __init__(self, trunk: NarrowResNet, num_classes: int = 8) -> None:
        super().__init__()
        feat = trunk.layer3[-1].conv1.in_channels  # the trunk's layer3 output channels
        block = type(trunk.layer3[-1])
        self.conv1, self.bn1, self.relu, self.maxpool = trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool
        self.layer1, self.layer2, self.layer3 = trunk.layer1, trunk.layer2, trunk.layer3
        self.att_layer = block(feat, feat // block.expansion)  # stride 1, identity shortcut
        self.att_bn = nn.BatchNorm2d(feat)
        self.att_conv = nn.Conv2d(feat, num_classes, kernel_size=1, bias=False)
        self.att_cls = nn.Conv2d(num_classes, num_classes, kernel_size=1, bias=False)
        self.att_map = nn.Conv2d(num_classes, 1, kernel_size=1, bias=False)
        self.att_map_bn = nn.BatchNorm2d(1)
        self.layer4, self.avgpool, self.fc = trunk.layer4, trunk.avgpool, trunk.fc
        _init_weights(self.att_layer, zero_init_residual=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The shared feature extractor: stem and layer1 .. layer3."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def attention_branch(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class scores of the attention branch (N, K) and the attention map (N, 1, h, w)."""
        k = F.relu(self.att_conv(self.att_bn(self.att_layer(f))))
        att_logits = self.att_cls(k).mean((2, 3))
        return att_logits, torch.sigmoid(self.att_map_bn(self.att_map(k)))

    def perception(self, f: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """The perception branch on attention-weighted features."""
        x = self.layer4(f * (1 + att))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(perception logits, attention-branch logits, attention map (N, 1, h, w))."""
        f = self.features(x)
        att_logits, att = self.attention_branch(f)
        return self.perception(f, att), att_logits, att

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]

    def attention(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        """The attention map, the ABN's explanation: (N, H, W) bilinearly upsampled to the
        input size, or (N, h, w) at the feature resolution when ``upsample`` is False."""
        att = self.attention_branch(self.features(x))[1]
        if upsample:
            att = F.interpolate(att, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return att[:, 0]


def bundled_abn(num_classes: int = 8, width: int = 16) -> ABNResNet:
    """ABN on the ResNet-50 layout at stage width ``width``."""
    return ABNResNet(bundled_resnet(num_classes, width), num_classes)


def bundled_vit(num_classes: int = 8, width: int = 64) -> VisionTransformer:
    """The ViT layout for 64 x 64 inputs: torchvision's ``VisionTransformer`` with 8 x 8 patches
    (64 tokens and a class token), 4 encoder blocks of 4 heads, hidden width ``width``, MLP
    width ``2 * width``, no dropout; about 0.15 M parameters at width 64. Its attention is
    ``nn.MultiheadAttention``, so every rule set compiles it (``attnlrp``: the softmax and
    product rules; the others: CP-LRP, the softmax held constant)."""
    return VisionTransformer(image_size=64, patch_size=8, num_layers=4, num_heads=4, hidden_dim=width,
                             mlp_dim=2 * width, num_classes=num_classes)


ARCHITECTURES = {
    "resnet50": bundled_resnet,
    "resnet50_224": bundled_resnet_224,
    "resnet18": bundled_resnet18,
    "abn_resnet50": bundled_abn,
    "vit": bundled_vit,
}
"""Builders by architecture name; bundled names are ``<arch>_w<width>`` (``resnet50_w16``),
optionally with the training seed, ``<arch>_w<width>_seed<k>`` (``resnet50_w8_seed1``)."""

_NAME = re.compile(r"(?P<arch>.+)_w(?P<width>\d+)(?:_seed\d+)?")


def build(name: str, num_classes: int = 8) -> nn.Module:
    """An untrained model from a bundled name such as ``resnet50_w16``, ``abn_resnet50_w16`` or
    ``resnet50_224_w8_seed2`` (the seed names the weights, not the architecture)."""
    m = _NAME.fullmatch(name)
    if m is None or m["arch"] not in ARCHITECTURES:
        raise ValueError(f"unknown model name {name!r}. Hint: use <arch>_w<width>[_seed<k>] with arch in "
                         f"{sorted(ARCHITECTURES)}, e.g. 'resnet50_w16' or 'resnet50_w8_seed1'.")
    return ARCHITECTURES[m["arch"]](num_classes=num_classes, width=int(m["width"]))


def weights_dir() -> Path:
    """The package's weights folder, ``lrpfx/eval/weights/``."""
    return Path(str(resources.files("lrpfx.eval"))) / "weights"


def bundled_metadata(name: str = "resnet50_w16", directory: str | Path | None = None) -> dict[str, Any]:
    """The JSON metadata of bundled weights: classes, mean/std, accuracy, training command, seed."""
    path = Path(directory or weights_dir()) / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no metadata {path} for bundled model {name!r}. "
                                f"Hint: train it with `python -m lrpfx.eval.train --model {name} --out {path.parent}`.")
    return json.loads(path.read_text())


def load_state(stem: Path) -> dict[str, torch.Tensor]:
    """Tensors from ``<stem>.safetensors`` (preferred) or ``<stem>.pt`` (``weights_only``)."""
    st, pt = stem.with_suffix(".safetensors"), stem.with_suffix(".pt")
    if st.exists():
        try:
            from safetensors.torch import load_file
        except ImportError:
            if not pt.exists():
                raise ImportError(f"{st} needs the safetensors package. Hint: pip install safetensors.") from None
        else:
            return load_file(str(st))
    if pt.exists():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no weights {st} or {pt}. Hint: train them with "
                            f"`python -m lrpfx.eval.train --model {stem.name} --out {stem.parent}`.")


def save_state(model: nn.Module, stem: Path) -> Path:
    """Write the model's state dict as ``<stem>.safetensors`` (or ``.pt`` without safetensors)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(state, stem.with_suffix(".pt"))
        return stem.with_suffix(".pt")
    save_file(state, str(stem.with_suffix(".safetensors")))
    return stem.with_suffix(".safetensors")


def load_bundled(name: str = "resnet50_w16", directory: str | Path | None = None) -> nn.Module:
    """A bundled model with its trained weights, in eval mode and float32.

    Args:
        name: ``resnet50_w16`` (the ResNet-50 layout), ``resnet18_w16``, ``abn_resnet50_w16`` or
            ``vit_w64`` (the ViT layout)
            (whichever ``lrpfx/eval/weights/`` holds; ``bundled_metadata`` gives their accuracy).
        directory: another folder holding ``<name>.safetensors`` and ``<name>.json``.

    Inputs are 64 x 64 RGB images normalised with the metadata's ``mean``/``std``
    (``lrpfx.eval.datasets.normalize``).
    """
    meta = bundled_metadata(name, directory)
    model = build(name, num_classes=len(meta["classes"]))
    state = load_state(Path(directory or weights_dir()) / name)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()
