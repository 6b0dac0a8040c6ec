"""LAION aesthetic heads vs PyTorch (the published module layouts, tiny random weights)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tsjax.metrics.aesthetic import load_aesthetic_head  # noqa: E402


def improved_mlp(d):
    """The improved-aesthetic-predictor MLP layout (Dropout between Linear layers, no activation)."""
    from torch import nn

    return nn.Sequential(nn.Linear(d, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)).eval()


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_aesthetic_matches_torch(tmp_path, kind):
    from torch import nn

    torch.manual_seed(0)
    d = 768
    if kind == "linear":
        head = nn.Linear(d, 1).eval()
        sd = head.state_dict()
    else:
        head = improved_mlp(d)
        sd = {"layers." + k: v for k, v in head.state_dict().items()}
    torch.save(sd, tmp_path / "head.pth")
    model = load_aesthetic_head(tmp_path / "head.pth")
    assert model.kind == kind and model.in_dim == d
    emb = np.random.default_rng(0).normal(size=(3, d)).astype(np.float32)
    got = np.asarray(model(emb))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    with torch.no_grad():
        ref = head(torch.from_numpy(unit)).numpy()[:, 0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, 768\]"):
        model(emb[:, :16])


def test_aesthetic_bad_file(tmp_path):
    torch.save({"foo": torch.zeros(3)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        load_aesthetic_head(tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError):
        load_aesthetic_head(tmp_path / "missing.pth")
