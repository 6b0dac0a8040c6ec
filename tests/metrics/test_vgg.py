"""VGG (torchvision layout) parity with a PyTorch reference, and contextual-loss properties."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tsjax.metrics.vgg import (VGG_CFGS, contextual_loss, contextual_similarity, conv_layout,
                               load_vgg)


def torch_vgg_features(arch: str, seed: int = 0):
    """torchvision's ``vgg*().features`` layout as a plain Sequential (torchvision is not importable)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers, c = [], 3
    for v in VGG_CFGS[arch]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            conv = nn.Conv2d(c, v, 3, padding=1)
            # He-style init keeps activations O(1) through 16 layers so the parity check is meaningful.
            nn.init.normal_(conv.weight, std=(2.0 / (9 * c)) ** 0.5)
            nn.init.uniform_(conv.bias, -0.1, 0.1)
            layers += [conv, nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers).eval()


def save_features(model, path):
    import torch

    torch.save({"features." + k: v for k, v in model.state_dict().items()}, path)


def test_conv_layout_matches_torchvision_indices():
    idx = {n: i for n, i, _ in conv_layout("vgg19")}
    assert (idx["conv1_1"], idx["conv1_2"], idx["conv3_4"], idx["conv5_4"]) == (0, 2, 16, 34)
    idx16 = {n: i for n, i, _ in conv_layout("vgg16")}
    assert (idx16["conv3_3"], idx16["conv5_3"]) == (14, 28)


@pytest.mark.torch
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_vgg19_matches_torch(tmp_path, fmt):
    import torch

    model = torch_vgg_features("vgg19")
    path = tmp_path / f"vgg19-test.{fmt}"
    if fmt == "pth":
        save_features(model, path)
    else:
        from safetensors.torch import save_file

        save_file({"features." + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    taps = ("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4")
    module, variables = load_vgg(path, "vgg19", taps)
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    out = jax.jit(module.apply)(variables, img)
    x = torch.from_numpy(img).permute(0, 3, 1, 2)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    tap_idx = {"relu1_2": 3, "relu2_2": 8, "relu3_4": 17, "relu4_4": 26, "relu5_4": 35}
    ref = {}
    with torch.no_grad():
        for i, layer in enumerate(model):
            x = layer(x)
            for t, j in tap_idx.items():
                if i == j:
                    ref[t] = x.permute(0, 2, 3, 1).numpy()
    for t in taps:
        a, b = np.asarray(out[t]), ref[t]
        assert a.shape == b.shape, t
        assert np.abs(b).max() > 1e-3, t  # non-degenerate activations
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel < 1e-4, (t, rel)


def test_vgg_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vgg(tmp_path / "nope.pth")
    from safetensors.numpy import save_file

    save_file({"features.0.weight": np.zeros((64, 3, 3, 3), np.float32)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing key 'features.0.bias'"):
        load_vgg(tmp_path / "bad.safetensors")


def _np_contextual_loss(x, y, h=0.5, eps=1e-5):
    """Direct transcription of the paper's formulas (one batch element, float64)."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    y = y.reshape(-1, y.shape[-1]).astype(np.float64)
    mu = y.mean(0)
    x, y = x - mu, y - mu
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    d = 1 - x @ y.T
    d_rel = d / (d.min(1, keepdims=True) + eps)
    w = np.exp((1 - d_rel) / h)
    cx = w / w.sum(1, keepdims=True)
    return -np.log(cx.max(0).mean() + eps)


def test_contextual_loss_matches_formula():
    rng = np.random.default_rng(1)
    fx = rng.normal(size=(2, 5, 6, 8)).astype(np.float32)
    fy = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
    got = np.asarray(contextual_loss(fx, fy, h=0.5))
    want = np.array([_np_contextual_loss(fx[b], fy[b]) for b in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_contextual_loss_properties():
    rng = np.random.default_rng(2)
    fy = rng.normal(size=(1, 6, 6, 16)).astype(np.float32)
    other = rng.normal(size=(1, 6, 6, 16)).astype(np.float32)
    same = float(contextual_loss(fy, fy)[0])
    assert abs(same) < 1e-3  # every target feature has an exact match
    diff = float(contextual_loss(other, fy)[0])
    assert diff > same + 0.5
    # Spatial permutations of either input leave the loss unchanged.
    perm = rng.permutation(36)
    fx_shuf = other.reshape(1, 36, 16)[:, perm].reshape(1, 6, 6, 16)
    fy_shuf = fy.reshape(1, 36, 16)[:, rng.permutation(36)].reshape(1, 6, 6, 16)
    np.testing.assert_allclose(float(contextual_loss(fx_shuf, fy_shuf)[0]), diff, rtol=1e-5)
    # Shuffled identical features still match perfectly.
    assert float(contextual_loss(fy.reshape(1, 36, 16)[:, perm].reshape(1, 6, 6, 16), fy)[0]) < 1e-3
    # A blend towards the target lowers the loss monotonically.
    mids = [float(contextual_loss(a * fy + (1 - a) * other, fy)[0]) for a in (0.0, 0.5, 0.9)]
    assert mids[0] > mids[1] > mids[2]
    sim = np.asarray(contextual_similarity(other, fy))
    assert sim.shape == (1,) and 0 < sim[0] <= 1


def test_contextual_loss_gradients_and_determinism():
    rng = np.random.default_rng(3)
    fx = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
    fy = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
    f = lambda a, b: jnp.sum(contextual_loss(a, b, h=0.5))
    check_grads(f, (fx, fy), order=1, modes=("rev",), eps=1e-3, atol=2e-2, rtol=2e-2)
    g1 = jax.jit(jax.grad(f))(fx, fy)
    g2 = jax.jit(jax.grad(f))(fx, fy)
    assert np.all(np.isfinite(np.asarray(g1)))
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
    np.testing.assert_array_equal(np.asarray(contextual_loss(fx, fy)), np.asarray(contextual_loss(fx, fy)))
    # Degenerate inputs (all-equal features, e.g. blank renders) keep finite gradients.
    z = jnp.zeros((1, 3, 3, 4))
    gz = jax.grad(f)(z, z)
    assert np.all(np.isfinite(np.asarray(gz))) and np.isfinite(float(f(z, z)))


def test_contextual_loss_shape_errors():
    with pytest.raises(ValueError, match="disagree"):
        contextual_loss(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="must be"):
        contextual_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)))


@pytest.mark.torch
def test_image_contextual_loss_gradients(tmp_path):
    from tsjax.metrics.vgg import image_contextual_loss

    save_features(torch_vgg_features("vgg19"), tmp_path / "vgg19.pth")
    module, variables = load_vgg(tmp_path / "vgg19.pth", "vgg19", ("relu3_4",))
    assert set(variables["params"]) == {f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 4)) for i in range(1, n + 1)}
    rng = np.random.default_rng(4)
    y = jnp.asarray(rng.uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
    x = jnp.asarray(rng.uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
    loss_fn = jax.jit(lambda a: jnp.sum(image_contextual_loss(module, variables, a, y)))
    same = np.asarray(image_contextual_loss(module, variables, y, y))
    assert np.all(np.abs(same) < 1e-3) and float(loss_fn(x)) > 2 * 1e-3
    g = jax.grad(loss_fn)(x)
    assert g.shape == x.shape and np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0
    # Descending the gradient lowers the loss.
    assert float(loss_fn(x - 0.05 * g / jnp.abs(g).max())) < float(loss_fn(x))
