"""Sampling loop: determinism, CFG, img2img strength semantics (diffusers' start step), DDPM path."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.diffusion.sampling import img2img_start, make_sampler
from tsjax.diffusion.schedulers import DDIMScheduler, DDPMScheduler

SD_CFG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
SHAPE = (2, 8, 8, 4)


def toy_denoiser(params, x, t, ctx, camera):
    """Linear stand-in for a UNet: depends on x, t, the context and the camera."""
    tt = (t.astype(jnp.float32) / 1000.0)[:, None, None, None]
    c = jnp.mean(ctx, axis=(1, 2))[:, None, None, None]
    out = x @ params["w"] * (1.0 - 0.5 * tt) + params["b"] * c
    if camera is not None:
        out = out + jnp.mean(camera, axis=1)[:, None, None, None]
    return out


def _params():
    k = jax.random.key(0)
    return {"w": 0.3 * jax.random.normal(k, (4, 4)) + 0.5 * jnp.eye(4), "b": jnp.ones((4,))}


def _ctx():
    return jnp.ones((2, 5, 6)), jnp.zeros((2, 5, 6))


@pytest.mark.parametrize("n,strength,expected", [(50, 1.0, 0), (50, 0.5, 25), (50, 0.75, 13), (10, 0.33, 7),
                                                 (10, 0.0, 10), (7, 0.3, 5)])
def test_img2img_start_matches_diffusers_formula(n, strength, expected):
    assert img2img_start(n, strength) == expected


@pytest.mark.torch
def test_img2img_timesteps_match_diffusers_pipeline():
    from diffusers import DDIMScheduler as TDDIM
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = TDDIM(**SD_CFG)
    ours = DDIMScheduler.from_config(SD_CFG)
    for n, s in [(20, 0.6), (50, 0.3), (13, 0.9)]:
        ref.set_timesteps(n)
        holder = type("P", (), {"scheduler": ref})()
        ts_ref, _ = StableDiffusionImg2ImgPipeline.get_timesteps(holder, n, s, "cpu")
        sampler = make_sampler(toy_denoiser, ours, latent_shape=SHAPE, steps=n, strength=s)
        np.testing.assert_array_equal(sampler.timesteps, ts_ref.numpy())


def test_bad_strength_raises():
    with pytest.raises(ValueError, match="strength"):
        img2img_start(10, 1.5)


def test_sampling_is_deterministic_and_seed_dependent():
    s = DDIMScheduler.from_config(SD_CFG)
    run = make_sampler(toy_denoiser, s, latent_shape=SHAPE, steps=6, guidance_scale=7.5)
    cond, uncond = _ctx()
    a = run(_params(), cond, uncond, jax.random.key(1))
    b = run(_params(), cond, uncond, jax.random.key(1))
    c = run(_params(), cond, uncond, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(a - c).max()) > 1e-2
    assert np.isfinite(np.asarray(a)).all() and a.shape == SHAPE


def test_loop_matches_python_reference_with_cfg_and_camera():
    """The fori_loop sampler equals a hand-written python loop of scheduler steps with CFG."""
    s = DDIMScheduler.from_config(SD_CFG)
    p = _params()
    cond, uncond = _ctx()
    cam = jnp.full((2, 16), 0.1)
    g = 3.0
    run = make_sampler(toy_denoiser, s, latent_shape=SHAPE, steps=5, guidance_scale=g)
    got = run(p, cond, uncond, jax.random.key(3), None, cam)
    x = jax.random.normal(jax.random.split(jax.random.key(3))[0], SHAPE)
    for t in s.set_timesteps(5):
        tb = jnp.full((2,), int(t), jnp.int32)
        u = toy_denoiser(p, x, tb, uncond, cam)
        c = toy_denoiser(p, x, tb, cond, cam)
        x = s.step(u + g * (c - u), int(t), x, num_inference_steps=5).prev_sample
    np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-5, atol=1e-5)


def test_img2img_strength_semantics():
    s = DDIMScheduler.from_config(SD_CFG)
    cond, uncond = _ctx()
    init = jax.random.normal(jax.random.key(7), SHAPE)
    # strength 0: no step is run and the init latents come back unchanged
    run0 = make_sampler(toy_denoiser, s, latent_shape=SHAPE, steps=10, strength=0.0)
    assert len(run0.timesteps) == 0
    np.testing.assert_array_equal(np.asarray(run0(_params(), cond, uncond, jax.random.key(0), init)),
                                  np.asarray(init))
    # lower strength stays closer to the init latents
    dists = []
    for st in (0.2, 0.5, 1.0):
        run = make_sampler(toy_denoiser, s, latent_shape=SHAPE, steps=10, strength=st)
        assert len(run.timesteps) == min(int(10 * st), 10)
        out = run(_params(), cond, uncond, jax.random.key(0), init)
        dists.append(float(jnp.mean(jnp.abs(out - init))))
    assert dists[0] < dists[1] < dists[2], dists
    with pytest.raises(ValueError, match="init_latents"):
        make_sampler(toy_denoiser, s, latent_shape=SHAPE, steps=10, strength=0.5)(_params(), cond, uncond,
                                                                                 jax.random.key(0))


def test_ddpm_and_eta_sampling_use_the_key():
    cond, uncond = _ctx()
    for sch, eta in [(DDPMScheduler.from_config(SD_CFG), 0.0), (DDIMScheduler.from_config(SD_CFG), 1.0)]:
        run = make_sampler(toy_denoiser, sch, latent_shape=SHAPE, steps=4, guidance_scale=1.0, eta=eta)
        a = run(_params(), cond, uncond, jax.random.key(0))
        b = run(_params(), cond, uncond, jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.isfinite(np.asarray(a)).all()
