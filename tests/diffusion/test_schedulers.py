"""Parity of tsjax.diffusion.schedulers with diffusers' PyTorch DDPM/DDIM schedulers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.diffusion.schedulers import DDIMScheduler, DDPMScheduler, scheduler_from_config

SD_CFG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              clip_sample=False, set_alpha_to_one=False, steps_offset=1)

CONFIGS = [
    dict(SD_CFG),
    dict(SD_CFG, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(beta_schedule="linear", clip_sample=True, timestep_spacing="linspace"),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False),
    dict(SD_CFG, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
]


def _rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.torch
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("n_steps", [10, 7, 50])
def test_ddim_parity(cfg, n_steps):
    import torch
    from diffusers import DDIMScheduler as TDDIM

    ref = TDDIM(**cfg)
    ours = DDIMScheduler.from_config(dict(ref.config))
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0,
                               atol=0 if not cfg.get("rescale_betas_zero_snr") else 1e-6)  # bit-identical unless rescaled
    # the zero-SNR rescale runs float32 sqrt/div chains whose rounding we match only to ~1 ulp
    tol = 4e-6 if cfg.get("rescale_betas_zero_snr") else 1e-6
    ref.set_timesteps(n_steps)
    ts = ours.set_timesteps(n_steps)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())

    x0, noise, out = _rand((2, 4, 8, 8), 0), _rand((2, 4, 8, 8), 1), _rand((2, 4, 8, 8), 2)
    t = np.array([int(ts[0]), int(ts[-1])])
    np.testing.assert_allclose(
        np.asarray(ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))),
        ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy(), atol=tol)
    np.testing.assert_allclose(
        np.asarray(ours.get_velocity(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))),
        ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy(), atol=tol)

    step = jax.jit(lambda o, t, x, vn, eta: ours.step(o, t, x, num_inference_steps=n_steps, eta=eta,
                                                     variance_noise=vn))
    for i in [0, len(ts) // 2, len(ts) - 1]:
        for eta in (0.0, 0.7):
            vn = _rand(out.shape, 10 + i)
            r = ref.step(torch.from_numpy(out), int(ts[i]), torch.from_numpy(x0), eta=eta,
                         variance_noise=torch.from_numpy(vn) if eta > 0 else None)
            o = step(jnp.asarray(out), jnp.int32(ts[i]), jnp.asarray(x0), jnp.asarray(vn), eta)
            scale = max(1.0, float(np.abs(r.prev_sample.numpy()).max()))
            np.testing.assert_allclose(np.asarray(o.prev_sample), r.prev_sample.numpy(), atol=tol * scale)
            # x0 = (x - sqrt(1-abar) out) / sqrt(abar): float32 rounding of the numerator is amplified by
            # 1/sqrt(abar) (up to ~150x at t=999), so the bound scales with it
            amp = 1.0
            if ours.prediction_type == "epsilon":
                amp = 1.0 / float(ref.alphas_cumprod[int(ts[i])]) ** 0.5
            np.testing.assert_allclose(np.asarray(o.pred_original_sample), r.pred_original_sample.numpy(),
                                       atol=tol * amp * max(1.0, float(np.abs(x0).max())))


@pytest.mark.torch
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddpm_parity(variance_type, pred):
    import torch
    from diffusers import DDPMScheduler as TDDPM

    ref = TDDPM(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, variance_type=variance_type,
                prediction_type=pred, clip_sample=pred == "epsilon")
    ours = DDPMScheduler.from_config(dict(ref.config))
    x, out = _rand((2, 4, 8, 8), 3), _rand((2, 4, 8, 8), 4)
    # full 1000-step chain (no set_timesteps): prev_t = t - 1
    for t in (999, 500, 1, 0):
        # diffusers draws its own noise; reproduce it with an identically seeded generator
        vn_t = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        r = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), generator=torch.Generator().manual_seed(0))
        o = ours.step(jnp.asarray(out), jnp.int32(t), jnp.asarray(x), variance_noise=jnp.asarray(vn_t.numpy()))
        np.testing.assert_allclose(np.asarray(o.prev_sample), r.prev_sample.numpy(), atol=2e-6)
    # 20-step leading schedule: prev_t = next entry of the table
    ref.set_timesteps(20)
    ts = ours.set_timesteps(20)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    for i in (0, 10, 19):
        vn_t = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        r = ref.step(torch.from_numpy(out), int(ts[i]), torch.from_numpy(x), generator=torch.Generator().manual_seed(1))
        o = ours.step(jnp.asarray(out), jnp.int32(ts[i]), jnp.asarray(x), num_inference_steps=20,
                      variance_noise=jnp.asarray(vn_t.numpy()))
        np.testing.assert_allclose(np.asarray(o.prev_sample), r.prev_sample.numpy(), atol=2e-6)


def test_scheduler_is_a_pytree_usable_in_jit():
    s = DDIMScheduler.from_config(SD_CFG)
    leaves = jax.tree_util.tree_leaves(s)
    assert len(leaves) == 3 and leaves[1].shape == (1000,)
    f = jax.jit(lambda sch, x, n, t: sch.add_noise(x, n, t))
    x = jnp.ones((3, 2, 2, 4))
    y = f(s, x, jnp.zeros_like(x), jnp.array([0, 500, 999]))
    acp = np.asarray(s.alphas_cumprod)
    np.testing.assert_allclose(np.asarray(y[:, 0, 0, 0]), np.sqrt(acp[[0, 500, 999]]), rtol=1e-6)


def test_eta_needs_key_and_key_is_deterministic():
    s = DDIMScheduler.from_config(SD_CFG)
    x = jnp.ones((1, 2, 2, 4))
    with pytest.raises(ValueError, match="key"):
        s.step(x, 500, x, num_inference_steps=10, eta=1.0)
    a = s.step(x, 500, x, num_inference_steps=10, eta=1.0, key=jax.random.key(0)).prev_sample
    b = s.step(x, 500, x, num_inference_steps=10, eta=1.0, key=jax.random.key(0)).prev_sample
    c = s.step(x, 500, x, num_inference_steps=10, eta=0.0).prev_sample
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(a - c).max()) > 1e-3


def test_config_errors_and_class_dispatch():
    with pytest.raises(ValueError, match="beta_schedule"):
        DDIMScheduler.from_config({"beta_schedule": "quadratic"})
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMScheduler.from_config({"prediction_type": "flow"})
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMScheduler.from_config(SD_CFG).set_timesteps(1001)
    assert isinstance(scheduler_from_config({"_class_name": "DDPMScheduler"}), DDPMScheduler)
    pndm = scheduler_from_config({"_class_name": "PNDMScheduler", **SD_CFG})
    assert isinstance(pndm, DDIMScheduler) and pndm.clip_sample is False


@pytest.mark.torch
def test_ddpm_trailing_schedule_uses_next_table_entry():
    import torch
    from diffusers import DDPMScheduler as TDDPM

    cfg = dict(SD_CFG, timestep_spacing="trailing")
    cfg.pop("set_alpha_to_one")
    ref = TDDPM(**cfg)
    ours = DDPMScheduler.from_config(dict(ref.config))
    ref.set_timesteps(7)
    ts = ours.set_timesteps(7)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    x, out = _rand((1, 4, 4, 4), 5), _rand((1, 4, 4, 4), 6)
    prev = np.concatenate([ts[1:], [-1]])
    for i in range(len(ts)):
        vn = torch.randn(out.shape, generator=torch.Generator().manual_seed(i))
        r = ref.step(torch.from_numpy(out), int(ts[i]), torch.from_numpy(x), generator=torch.Generator().manual_seed(i))
        o = ours.step(jnp.asarray(out), int(ts[i]), jnp.asarray(x), prev_t=int(prev[i]),
                      variance_noise=jnp.asarray(vn.numpy()))
        np.testing.assert_allclose(np.asarray(o.prev_sample), r.prev_sample.numpy(), atol=2e-6)
