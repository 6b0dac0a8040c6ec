"""Flax AutoencoderKL vs diffusers PyTorch AutoencoderKL on tiny random checkpoints.

Each VAE is created with diffusers, its weights perturbed away from init (GroupNorm scales not all 1, biases
not all 0), saved with ``save_pretrained`` (safetensors) and loaded through
``tsjax.diffusion.convert.load_vae``. fp32: encode (mean, logvar), decode and the gradient of a scalar loss
through encode -> decode w.r.t. the input image agree to 1e-5 (max abs); PyTorch is NCHW, ours NHWC.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the PyTorch reference stack")
diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")

from tsjax.diffusion.convert import load_vae  # noqa: E402
from tsjax.diffusion.vae import AutoencoderKL, VAEConfig  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-5

# 3 levels (latent factor 4), 2 resnets per encoder level, channel changes (conv_shortcut), mid attention.
BASE = dict(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=4, latent_channels=4,
            sample_size=16)
# The variant without quant convs and without mid-block attention (newer VAEs have these switches).
BARE = dict(BASE, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, use_quant_conv=False,
            use_post_quant_conv=False, mid_block_add_attention=False, scaling_factor=0.13025)


def _make(tmp_path, cfg, seed):
    torch.manual_seed(seed)
    m = diffusers.AutoencoderKL(**cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "vae", safe_serialization=True)
    vcfg, params = load_vae(tmp_path / "vae")
    return m, vcfg, params


def _nhwc(a):
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name,cfg", [("sd-like", BASE), ("bare", BARE)])
def test_vae_encode_decode_and_input_grad_match_diffusers(tmp_path, name, cfg):
    m, vcfg, params = _make(tmp_path, cfg, seed=len(name))
    assert vcfg.scaling_factor == cfg.get("scaling_factor", 0.18215)
    assert vcfg.latent_factor == 2 ** (len(cfg["block_out_channels"]) - 1)
    g = np.random.default_rng(0)
    x = np.tanh(g.standard_normal((2, 3, 16, 16))).astype(np.float32)
    f = vcfg.latent_factor
    # Loss weights are scaled so that the input gradient is O(1): fp32 round-off of this ~25-layer backward
    # is ~3e-6 relative (PyTorch's own fp32 gradient differs from its fp64 one by that much).
    w_mean, w_logvar = (0.125 * g.standard_normal((2, 4, 16 // f, 16 // f)).astype(np.float32) for _ in range(2))
    w_img = 0.125 * g.standard_normal((2, 3, 16, 16)).astype(np.float32)

    def torch_run(dtype):  # loss = sum(mean * w1) + sum(logvar * w2) + sum(decode(mean) * w3)
        mm = m.to(dtype)
        xt = torch.tensor(x, dtype=dtype, requires_grad=True)
        post = mm.encode(xt).latent_dist
        dec = mm.decode(post.mean).sample
        t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
        loss = (post.mean * t(w_mean)).sum() + (post.logvar * t(w_logvar)).sum() + (dec * t(w_img)).sum()
        loss.backward()
        return dict(mean=post.mean.detach().numpy(), logvar=post.logvar.detach().numpy(), dec=dec.detach().numpy(),
                    grad=xt.grad.numpy())

    ref64 = torch_run(torch.float64)
    ref = torch_run(torch.float32)

    vae = AutoencoderKL(vcfg)

    def fwd(xn):
        mean, logvar = vae.apply({"params": params}, xn, method=vae.encode)
        img = vae.apply({"params": params}, mean, method=vae.decode)
        loss = jnp.sum(mean * _nhwc(w_mean)) + jnp.sum(logvar * _nhwc(w_logvar)) + jnp.sum(img * _nhwc(w_img))
        return loss, (mean, logvar, img)

    (_, (mean, logvar, img)), grad = jax.jit(jax.value_and_grad(fwd, has_aux=True))(_nhwc(x))
    assert mean.shape == (2, 16 // f, 16 // f, 4) and img.shape == (2, 16, 16, 3)
    assert mean.dtype == logvar.dtype == img.dtype == jnp.float32
    for k in ref:  # non-trivial signals
        assert np.abs(ref[k]).max() > 0.1, k
    np.testing.assert_allclose(_nchw(mean), ref["mean"], rtol=0, atol=TOL, err_msg=f"{name}: mean")
    np.testing.assert_allclose(_nchw(logvar), ref["logvar"], rtol=0, atol=TOL, err_msg=f"{name}: logvar")
    np.testing.assert_allclose(_nchw(img), ref["dec"], rtol=0, atol=TOL, err_msg=f"{name}: decode")
    np.testing.assert_allclose(_nchw(grad), ref["grad"], rtol=0, atol=TOL, err_msg=f"{name}: d loss / d image")
    # and against PyTorch in float64: our fp32 error is of the size of PyTorch's own fp32 error (within 4x:
    # the summation order of XLA's reductions/convolutions differs from oneDNN's; measured up to 2.3x on the
    # input gradient, 2.3e-6 vs 9.8e-7)
    for k, ours in (("mean", mean), ("logvar", logvar), ("dec", img), ("grad", grad)):
        err, err_torch = np.abs(_nchw(ours) - ref64[k]).max(), np.abs(ref[k] - ref64[k]).max()
        assert err <= max(4 * err_torch, 1e-6), (name, k, err, err_torch)


def test_logvar_is_clipped_like_diffusers(tmp_path):
    """A checkpoint whose quant_conv drives logvar far out of range: both clip to [-30, 20]."""
    m, _, _ = _make(tmp_path, BASE, seed=3)
    with torch.no_grad():
        m.quant_conv.bias[4:6] = 1e3  # logvar channels 0, 1 -> +large
        m.quant_conv.bias[6:8] = -1e3  # logvar channels 2, 3 -> -large
    m.save_pretrained(tmp_path / "vae", safe_serialization=True)
    vcfg, params = load_vae(tmp_path / "vae")
    x = np.tanh(np.random.default_rng(1).standard_normal((1, 3, 16, 16))).astype(np.float32)
    with torch.no_grad():
        ref = m.encode(torch.tensor(x)).latent_dist.logvar.numpy()
    vae = AutoencoderKL(vcfg)
    _, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, _nhwc(x))
    lv = _nchw(logvar)
    np.testing.assert_array_equal(lv[:, :2], 20.0)
    np.testing.assert_array_equal(lv[:, 2:], -30.0)
    np.testing.assert_array_equal(lv, ref)


def test_legacy_attention_names_load_to_the_same_params(tmp_path):
    """Older SD VAE files name the mid-block attention query/key/value/proj_attn (some store them as 1x1
    convs); they load to exactly the parameters of the current naming."""
    from safetensors.torch import load_file, save_file

    _, _, params = _make(tmp_path, BASE, seed=9)
    sd = load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if ".attentions.0." + new + "." in k:
                k = k.replace(new, old)
                v = v[:, :, None, None] if v.ndim == 2 and old in ("query", "value") else v  # 1x1-conv layout
        legacy[k] = v
    assert any(".query.weight" in k and v.ndim == 4 for k, v in legacy.items())
    assert any(".proj_attn.weight" in k and v.ndim == 2 for k, v in legacy.items())
    save_file(legacy, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    _, params2 = load_vae(tmp_path / "vae")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32(tmp_path):
    """bf16 compute (``dtype=jnp.bfloat16``, float32 params): encode/decode within a stated bf16 tolerance."""
    _, vcfg, params = _make(tmp_path, BASE, seed=5)
    x = jnp.tanh(jax.random.normal(jax.random.key(0), (2, 16, 16, 3)))
    out = {}
    for dt in (jnp.float32, jnp.bfloat16):
        vae = AutoencoderKL(vcfg, dtype=dt)
        shapes = jax.eval_shape(vae.init_params, jax.random.key(0))
        assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))

        @jax.jit
        def run(x, vae=vae):
            mean, logvar = vae.apply({"params": params}, x, method=vae.encode)
            return mean, logvar, vae.apply({"params": params}, mean, method=vae.decode)

        out[dt] = run(x)
    for a, b, what in zip(out[jnp.float32], out[jnp.bfloat16], ("mean", "logvar", "decode")):
        assert b.dtype == jnp.float32  # outputs are returned in float32
        scale = float(jnp.abs(a).max())
        err = float(jnp.abs(a - b).max())
        # bf16 has an 8-bit mantissa (relative step 2^-8 ~ 0.4%); measured here: mean 1.2%, logvar 1.3%, decode
        # 3.3% of the largest magnitude after ~25 layers; bound 5%.
        assert 0 < err <= 0.05 * scale, (what, err, scale)


def test_config_from_diffusers_rejects_unsupported_options():
    d = diffusers.AutoencoderKL(**BASE).config
    cfg = VAEConfig.from_diffusers(dict(d), source="vae/config.json")
    assert cfg.block_out_channels == (8, 16, 16) and cfg.layers_per_block == 2 and cfg.norm_num_groups == 4
    assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    with pytest.raises(ValueError, match=r"vae/config.json: act_fn='gelu' is not supported"):
        VAEConfig.from_diffusers(dict(d, act_fn="gelu"), source="vae/config.json")
    with pytest.raises(ValueError, match="shift_factor=0.1159 is not supported"):
        VAEConfig.from_diffusers(dict(d, shift_factor=0.1159))
    with pytest.raises(ValueError, match="unknown AutoencoderKL config key 'bogus'"):
        VAEConfig.from_diffusers(dict(d, bogus=1))
    with pytest.raises(ValueError, match="unsupported down block type 'AttnDownEncoderBlock2D'"):
        VAEConfig.from_diffusers(dict(d, down_block_types=["AttnDownEncoderBlock2D"] * 3))
    with pytest.raises(ValueError, match="not divisible by norm_num_groups=3"):
        dataclasses.replace(cfg, norm_num_groups=3)


def test_sd_vae_parameter_count_matches_pytorch():
    """The full Stable Diffusion VAE, shapes only (jax.eval_shape vs a meta-device PyTorch model)."""
    cfg = VAEConfig.sd()
    shapes = jax.eval_shape(lambda k: AutoencoderKL(cfg).init_params(k), jax.random.key(0))
    n_jax = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    with torch.device("meta"):
        m = diffusers.AutoencoderKL(**cfg.to_diffusers())
    n_torch = sum(p.numel() for p in m.parameters())
    assert n_jax == n_torch == 83_653_863
