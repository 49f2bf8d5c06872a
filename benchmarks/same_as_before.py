import sys, torch, torchvision
import lrpfx
print(lrpfx.__file__)
torch.manual_seed(0)
def randbn(m):
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1); mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5); mod.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return m
out = {}
x = torch.rand(2, 3, 112, 112, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
for arch in ["resnet50", "resnet18"]:
    m = randbn(torchvision.models.get_model(arch, weights=None)).eval().double()
    for rs in lrpfx.builtin_rulesets():
        r = lrpfx.compile(m, rs)(x, torch.tensor([3, 5]))[0]
        out[f"{arch}/{rs}"] = r
    res = lrpfx.compile(m, "c3_lrp", c3={"resize_to": [28, 28]})(x, torch.tensor([3, 5]))
    out[f"{arch}/c3_map"], out[f"{arch}/c3_mask"] = res[2], res[3]
torch.save(out, sys.argv[1])
