"""LPIPS-VGG parity with the lpips package's formula implemented in PyTorch (tiny random weights)."""
from __future__ import annotations

import numpy as np
import pytest

from tsjax.metrics.lpips import LPIPS_CHANNELS, load_lpips

torch = pytest.importorskip("torch")
from test_vgg import torch_vgg_features  # noqa: E402  (tests dir is on sys.path via rootdir)


def torch_lpips(features, lins, x, y):
    """lpips.LPIPS(net='vgg').forward(x, y, normalize=True) written out (lpips needs torchvision)."""
    shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
    taps = (3, 8, 15, 22, 29)

    def feats(img):
        h = ((2 * img - 1) - shift) / scale
        out = []
        for i, layer in enumerate(features):
            h = layer(h)
            if i in taps:
                out.append(h)
            if i == taps[-1]:
                break
        return out

    def unit(f, eps=1e-10):
        return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + eps)

    val = 0
    for fa, fb, lin in zip(feats(x), feats(y), lins):
        d = (unit(fa) - unit(fb)) ** 2
        val = val + lin(d).mean(dim=[2, 3], keepdim=True)
    return val.reshape(-1)


@pytest.mark.torch
@pytest.mark.parametrize("layout", ["separate", "full_state"])
def test_lpips_matches_torch(tmp_path, layout):
    from torch import nn

    feats = torch_vgg_features("vgg16", seed=1)
    torch.manual_seed(2)
    lins = [nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False)).eval() for c in LPIPS_CHANNELS]
    for lin in lins:
        nn.init.uniform_(lin[1].weight, 0.0, 0.2)  # lpips clamps lin weights to >= 0
    lin_sd = {f"lin{l}.model.1.weight": lin[1].weight.detach() for l, lin in enumerate(lins)}
    if layout == "separate":
        torch.save({"features." + k: v for k, v in feats.state_dict().items()}, tmp_path / "vgg16.pth")
        torch.save(lin_sd, tmp_path / "vgg.pth")
        model = load_lpips(tmp_path / "vgg.pth", tmp_path / "vgg16.pth")
    else:
        # A full lpips.LPIPS state dict: backbone under net.slice{s}.{N}, torchvision indices kept.
        bounds = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
        full = dict(lin_sd)
        for k, v in feats.state_dict().items():
            idx = int(k.split(".")[0])
            s = next(i for i, (a, b) in enumerate(bounds) if a <= idx < b) + 1
            if idx < 30:
                full[f"net.slice{s}.{k}"] = v
        torch.save(full, tmp_path / "lpips_full.pth")
        model = load_lpips(tmp_path / "lpips_full.pth")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1).astype(np.float32)
    got = np.asarray(model(x, y))
    with torch.no_grad():
        ref = torch_lpips(feats, lins, torch.from_numpy(x).permute(0, 3, 1, 2),
                          torch.from_numpy(y).permute(0, 3, 1, 2)).numpy()
    assert got.shape == (2,) and np.all(ref > 1e-4)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(model(x, x)), 0.0, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(model(x, y)), got)  # deterministic


def test_lpips_lin_only_needs_backbone(tmp_path):
    torch.save({f"lin{l}.model.1.weight": torch.zeros(1, c, 1, 1) for l, c in enumerate(LPIPS_CHANNELS)},
               tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="VGG16 weights"):
        load_lpips(tmp_path / "vgg.pth")
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="lin1.model.1.weight"):
        load_lpips(tmp_path / "bad.pth")
