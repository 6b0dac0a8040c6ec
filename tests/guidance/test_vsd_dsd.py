"""VSD / DSD maths on hand-written toy denoisers (exact, no network models needed)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.diffusion.sampling import TINY_SCHEDULER
from tsjax.diffusion.schedulers import DDIMScheduler
from tsjax.guidance.dsd import DSDSettings, PriorPrompts, dsd_loss
from tsjax.guidance.vsd import Denoiser, cfg_prediction, lora_loss, sample_timesteps, vsd_term

jax.config.update("jax_default_matmul_precision", "highest")


def toy_apply(p, x, t, ctx, camera):
    """out = a*x + b*mean(ctx) + c*t/1000 + d*sum(camera); nonlinear enough to distinguish inputs."""
    out = p["a"] * x + p["b"] * jnp.mean(ctx, axis=(1, 2))[:, None, None, None] + p["c"] * (t / 1000.0)[:, None, None, None]
    if camera is not None:
        out = out + p["d"] * jnp.sum(camera, -1)[:, None, None, None]
    return out + 0.1 * jnp.tanh(x) * p["a"]


def params(seed):
    k = jax.random.split(jax.random.key(seed), 4)
    return {n: jax.random.normal(kk, ()) for n, kk in zip("abcd", k)}


def sched(pred="epsilon"):
    return DDIMScheduler.from_config({**TINY_SCHEDULER, "prediction_type": pred})


B, H, C, L, D = 2, 4, 4, 5, 3


def inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    z = jax.random.normal(ks[0], (B, H, H, C))
    cond = jax.random.normal(ks[1], (B, L, D))
    uncond = jnp.zeros((B, L, D))
    cam = jax.random.normal(ks[2], (B, 16))
    return z, cond, uncond, cam


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_vsd_gradient_is_weighted_score_difference(pred):
    s = sched(pred)
    z, cond, uncond, cam = inputs()
    prior, lora = Denoiser(toy_apply, params(1)), Denoiser(toy_apply, params(2))
    scale = 7.5
    key = jax.random.key(3)

    def loss(z):
        return vsd_term(key, z, prior=prior, lora=lora, scheduler=s, cond=cond, uncond=uncond, camera=cam,
                        t_range=(0.5, 0.75), guidance_scale=scale).loss

    g = jax.grad(loss)(z)
    o = vsd_term(key, z, prior=prior, lora=lora, scheduler=s, cond=cond, uncond=uncond, camera=cam,
                 t_range=(0.5, 0.75), guidance_scale=scale)
    # independent recomputation from t and noise
    a = np.asarray(s.alphas_cumprod)[np.asarray(o.t)][:, None, None, None]
    x_t = np.sqrt(a) * np.asarray(z) + np.sqrt(1 - a) * np.asarray(o.noise)
    np.testing.assert_allclose(o.x_t, x_t, rtol=1e-5, atol=1e-5)

    def eps(out):
        out = np.asarray(out)
        return out if pred == "epsilon" else np.sqrt(a) * out + np.sqrt(1 - a) * x_t

    c = toy_apply(prior.params, jnp.asarray(x_t), o.t, cond, cam)
    u = toy_apply(prior.params, jnp.asarray(x_t), o.t, uncond, cam)
    eps_prior = eps(np.asarray(u) + scale * (np.asarray(c) - np.asarray(u)))
    eps_lora = eps(toy_apply(lora.params, jnp.asarray(x_t), o.t, cond, cam))
    expected = (1 - a) * (eps_prior - eps_lora)
    np.testing.assert_allclose(o.grad, expected, rtol=1e-4, atol=1e-5)
    # loss = 0.5 * sum / B  ->  dL/dz = grad / B
    np.testing.assert_allclose(g, expected / B, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(o.loss, 0.5 * np.sum(expected ** 2) / B, rtol=1e-4)
    assert np.abs(expected).max() > 1e-2  # non-trivial


def test_vsd_no_gradient_to_lora_or_prior_and_lora_loss_only_to_lora():
    s = sched()
    z, cond, uncond, cam = inputs(1)
    pp, lp = params(1), params(2)

    def vsd(lp, pp, z):
        return vsd_term(jax.random.key(0), z, prior=Denoiser(toy_apply, pp), lora=Denoiser(toy_apply, lp),
                        scheduler=s, cond=cond, uncond=uncond, camera=cam, t_range=(0.1, 0.9),
                        guidance_scale=2.0).loss

    g_l, g_p = jax.grad(vsd, argnums=(0, 1))(lp, pp, z)
    assert all(float(v) == 0.0 for v in jax.tree_util.tree_leaves((g_l, g_p)))

    def ll(lp, z):
        return lora_loss(jax.random.key(1), z, lora=Denoiser(toy_apply, lp), scheduler=s, cond=cond, camera=cam)

    g_l, g_z = jax.grad(ll, argnums=(0, 1))(lp, z)
    assert float(jnp.abs(g_z).max()) == 0.0
    assert float(jnp.abs(g_l["a"])) > 0 and float(jnp.abs(g_l["d"])) > 0


def test_lora_loss_camera_dropout_and_target():
    s = sched("v_prediction")
    z, cond, _, cam = inputs(2)
    lp = params(4)
    # dropout 1.0: camera always zeroed -> equals the loss without camera
    a = lora_loss(jax.random.key(5), z, lora=Denoiser(toy_apply, lp), scheduler=s, cond=cond, camera=cam,
                  camera_dropout=1.0)
    b = lora_loss(jax.random.key(5), z, lora=Denoiser(toy_apply, lp), scheduler=s, cond=cond, camera=None)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # explicit v-target recomputation
    k_t, k_n, _ = jax.random.split(jax.random.key(5), 3)
    t = jax.random.randint(k_t, (B,), 0, 1000, jnp.int32)
    n = jax.random.normal(k_n, z.shape)
    ab = s.alphas_cumprod[t][:, None, None, None]
    x_t = jnp.sqrt(ab) * z + jnp.sqrt(1 - ab) * n
    v = jnp.sqrt(ab) * n - jnp.sqrt(1 - ab) * z
    ref = jnp.mean((toy_apply(lp, x_t, t, cond, None) - v) ** 2)
    np.testing.assert_allclose(b, ref, rtol=1e-5)


def test_cfg_formula_and_single_call():
    calls = []

    def counting(p, x, t, ctx, cam):
        calls.append(x.shape[0])
        return toy_apply(p, x, t, ctx, cam)

    z, cond, uncond, cam = inputs(3)
    t = jnp.array([10, 500])
    d = Denoiser(counting, params(6))
    out = cfg_prediction(d, z, t, cond, uncond, cam, 4.0)
    assert calls == [2 * B]  # cond and uncond batched in one call
    c, u = toy_apply(d.params, z, t, cond, cam), toy_apply(d.params, z, t, uncond, cam)
    np.testing.assert_allclose(out, u + 4.0 * (c - u), rtol=1e-5, atol=1e-6)
    calls.clear()
    np.testing.assert_allclose(cfg_prediction(d, z, t, cond, uncond, cam, 1.0), c, rtol=1e-6)
    assert calls == [B]


@pytest.mark.parametrize("rng", [(0.5, 0.75), (0.1, 0.25), (0.02, 0.98), (0.3, 0.3)])
def test_sample_timesteps_inclusive_range(rng):
    t = np.asarray(sample_timesteps(jax.random.key(0), 20000, rng, 1000))
    lo = int(np.ceil(rng[0] * 999))
    hi = max(int(np.floor(rng[1] * 999)), lo)  # a degenerate range collapses to its lower end
    assert t.min() == lo and t.max() == hi


MODES = {"concept_only": ((0.02, 0.98), None), "naive": ((0.02, 0.98), (0.02, 0.98)),
         "dsd": ((0.5, 0.75), (0.1, 0.25)), "reverse": ((0.1, 0.25), (0.5, 0.75)),
         "ref_dominated": ((0.5, 0.75), (0.02, 0.98))}


def _dsd_setup(seed=0):
    z, cond, uncond, cam = inputs(seed)
    nz = jnp.flip(z, 1)
    tbl = jax.random.normal(jax.random.key(seed + 10), (4, L, D))
    mk = lambda p: PriorPrompts(Denoiser(toy_apply, p), tbl, tbl * 0.5, jnp.zeros((L, D)))
    return z, nz, cam, mk(params(1)), mk(params(2)), mk(params(3))


@pytest.mark.parametrize("mode", list(MODES))
def test_dsd_modes_t_ranges(mode):
    from tsjax.config import GuidanceConfig, guidance_t_ranges
    import dataclasses
    r = guidance_t_ranges(dataclasses.replace(GuidanceConfig(), mode=mode))
    assert (r["concept"], r["reference"]) == MODES[mode]
    z, nz, cam, concept, reference, lora = _dsd_setup()
    st = DSDSettings(concept_t=r["concept"], reference_t=r["reference"])
    direction = jnp.array([0, 2])
    f = jax.jit(lambda k: dsd_loss(k, color_latents=z[:1], normal_latents=nz[:1], camera=cam[:1],
                                   direction=direction[:1], concept=concept, reference=reference, lora=lora,
                                   scheduler=sched(), settings=st)[1])
    ts_c, ts_r = [], []
    for i in range(200):
        m = f(jax.random.key(i))
        ts_c.append(float(m["t_concept"])); ts_r.append(float(m["t_reference"]))
        if r["reference"] is None:
            assert float(m["loss_ref_color"]) == 0.0 and float(m["loss_ref_normal"]) == 0.0
    lo, hi = r["concept"]
    assert min(ts_c) >= np.ceil(lo * 999) and max(ts_c) <= hi * 999
    assert max(ts_c) - min(ts_c) > 0.5 * (hi - lo) * 999  # spans the range
    if r["reference"] is not None:
        lo, hi = r["reference"]
        assert min(ts_r) >= np.ceil(lo * 999) and max(ts_r) <= hi * 999


def test_dsd_gradient_is_weighted_sum_of_terms():
    s = sched()
    z, nz, cam, concept, reference, lora = _dsd_setup(1)
    st = DSDSettings(alpha=0.2, beta=1.0, guidance_scale=7.5)
    direction = jnp.array([1, 3])
    key = jax.random.key(7)

    def dsd_only(z, nz):
        return dsd_loss(key, color_latents=z, normal_latents=nz, camera=cam, direction=direction, concept=concept,
                        reference=reference, lora=lora, scheduler=s, settings=st)[1]["loss_dsd"]

    gz, gn = jax.grad(dsd_only, argnums=(0, 1))(z, nz)
    ks = jax.random.split(key, 5)
    kw = dict(lora=lora.denoiser, scheduler=s, uncond=jnp.zeros((B, L, D)), camera=cam, guidance_scale=7.5)
    oc = vsd_term(ks[0], z, prior=concept.denoiser, cond=concept.color[direction], t_range=(0.5, 0.75),
                  lora_cond=lora.color[direction], **kw)
    orc = vsd_term(ks[1], z, prior=reference.denoiser, cond=reference.color[direction], t_range=(0.1, 0.25),
                   lora_cond=lora.color[direction], **kw)
    orn = vsd_term(ks[2], nz, prior=reference.denoiser, cond=reference.normal[direction], t_range=(0.1, 0.25),
                   lora_cond=lora.normal[direction], **kw)
    np.testing.assert_allclose(gz, (0.2 * oc.grad + 1.0 * orc.grad) / B, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gn, orn.grad / B, rtol=1e-4, atol=1e-6)
    # normal distillation off -> no gradient to the normal latents
    st2 = DSDSettings(normal_distillation=False)
    g2 = jax.grad(lambda nz: dsd_loss(key, color_latents=z, normal_latents=nz, camera=cam, direction=direction,
                                      concept=concept, reference=reference, lora=lora, scheduler=s,
                                      settings=st2)[0])(nz)
    assert float(jnp.abs(g2).max()) == 0.0
