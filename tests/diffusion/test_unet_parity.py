"""Flax UNet vs diffusers PyTorch UNet2DConditionModel on tiny random checkpoints (fp32).

Each model is created with diffusers, randomised around its init (so no weight is trivially 0/1), saved with
``save_pretrained`` (safetensors) and loaded through ``tsjax.diffusion.convert.load_unet``. Forward outputs and
the gradient of ``sum(out * w)`` w.r.t. the input latents must agree to 1e-5 (max abs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the PyTorch reference stack")
diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")

from tsjax.diffusion.convert import load_unet  # noqa: E402
from tsjax.diffusion.unet import UNet2DConditionModel, UNetConfig  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# SD 1.x family: conv projections, 8 heads everywhere (scalar attention_head_dim), a plain DownBlock2D /
# UpBlock2D level as SD's deepest one (one resnet per level keeps compile time low; SD has 2).
SD1 = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
# SD 2.x family (the 768-v models are v-prediction, a scheduler setting; the UNet is the same function):
# linear projections, per-block head counts (attention_head_dim tuple), 2 transformer layers on level 2
# (and in the mid block), upcast_attention (a no-op in fp32).
SD2 = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
           attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
           upcast_attention=True)
# Camera-conditioned (VSD LoRA UNet): diffusers projection class embedding fed the flattened c2w. One level
# keeps it small; the blocks are covered above.
CAM = dict(sample_size=16, block_out_channels=(32,), layers_per_block=1, norm_num_groups=8,
           down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
           cross_attention_dim=24, attention_head_dim=4, use_linear_projection=True,
           class_embed_type="projection", projection_class_embeddings_input_dim=16)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: torch's intra-op thread pool only adds spin time on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make(tmp_path, cfg, seed):
    torch.manual_seed(seed)
    m = diffusers.UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "unet", safe_serialization=True)
    ucfg, params = load_unet(tmp_path / "unet")
    return m, ucfg, params


def _inputs(seed, cfg, camera):
    g = np.random.default_rng(seed)
    x = g.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([3, 742], np.int64)
    ctx = g.standard_normal((2, 7, cfg["cross_attention_dim"])).astype(np.float32)
    cam = g.standard_normal((2, 16)).astype(np.float32) if camera else None
    w = g.standard_normal((2, 4, 16, 16)).astype(np.float32)
    return x, t, ctx, cam, w


def _torch_run(m, x, t, ctx, cam, w):
    xt = torch.tensor(x, requires_grad=True)
    kw = {} if cam is None else {"class_labels": torch.tensor(cam)}
    out = m(xt, torch.tensor(t), torch.tensor(ctx), **kw).sample
    (out * torch.tensor(w)).sum().backward()
    return out.detach().numpy(), xt.grad.numpy()


def _jax_run(ucfg, params, x, t, ctx, cam, w):
    model = UNet2DConditionModel(ucfg)
    cam_j = None if cam is None else jnp.asarray(cam)
    w_j = jnp.asarray(w.transpose(0, 2, 3, 1))

    def f(xn):
        out = model.apply({"params": params}, xn, jnp.asarray(t, jnp.int32), jnp.asarray(ctx), cam_j)
        return jnp.sum(out * w_j), out

    xn = jnp.asarray(x.transpose(0, 2, 3, 1))
    # Unoptimised XLA backend: the same function, compiled ~2x faster (tests are compile-bound).
    step = jax.jit(jax.value_and_grad(f, has_aux=True)).lower(xn).compile(FAST_COMPILE)
    (_, out), g = step(xn)
    return np.asarray(out).transpose(0, 3, 1, 2), np.asarray(g).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name,cfg,camera", [("sd1", SD1, False), ("sd2", SD2, False), ("camera", CAM, True)])
def test_unet_forward_and_input_grad_match_diffusers(tmp_path, name, cfg, camera):
    m, ucfg, params = _make(tmp_path, cfg, seed=len(name))
    assert (ucfg.camera_embed_dim == 16) == camera
    assert ucfg.use_linear_projection == cfg.get("use_linear_projection", False)
    x, t, ctx, cam, w = _inputs(1, cfg, camera)
    ref_out, ref_grad = _torch_run(m, x, t, ctx, cam, w)
    out, grad = _jax_run(ucfg, params, x, t, ctx, cam, w)
    assert np.abs(ref_out).max() > 0.1 and np.abs(ref_grad).max() > 0.1  # non-trivial signals
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=TOL, err_msg=f"{name}: forward")
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=TOL, err_msg=f"{name}: d sum(out*w) / d sample")


def test_config_round_trip_through_diffusers_dict():
    cfg = UNetConfig.from_diffusers(dict(SD2, class_embed_type="projection", projection_class_embeddings_input_dim=16))
    assert cfg.camera_embed_dim == 16 and cfg.heads == (2, 4) and cfg.depths == (1, 2)
    d = cfg.to_diffusers()
    assert d["class_embed_type"] == "projection" and d["projection_class_embeddings_input_dim"] == 16
    assert UNetConfig.from_diffusers(d) == cfg
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        UNetConfig.from_diffusers(dict(SD1, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="unknown UNet config key 'bogus'"):
        UNetConfig.from_diffusers(dict(SD1, bogus=1))
