"""Fused (batched weight-sharing UNet passes) DSD equals the per-term DSD: same terms, same gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.diffusion.sampling import TINY_SCHEDULER
from tsjax.diffusion.schedulers import DDIMScheduler
from tsjax.guidance.dsd import DSDSettings, PriorPrompts, dsd_loss
from tsjax.guidance.vsd import Denoiser

B, H, C, L, D = 2, 4, 4, 5, 3


def make_apply(calls):
    def apply(p, x, t, ctx, camera):
        calls.append(x.shape[0])  # one entry per UNet call (rows = batch)
        out = (p["a"] * x + p["b"] * jnp.mean(ctx, axis=(1, 2))[:, None, None, None]
               + p["c"] * (t / 1000.0)[:, None, None, None])
        if camera is not None:
            out = out + p["d"] * jnp.sum(camera, -1)[:, None, None, None]
        return out + 0.1 * jnp.tanh(x) * p["a"]
    return apply


def params(seed):
    k = jax.random.split(jax.random.key(seed), 4)
    return {n: jax.random.normal(kk, ()) for n, kk in zip("abcd", k)}


def setup(calls, normal=True):
    ap = make_apply(calls)
    tbl = lambda s: jax.random.normal(jax.random.key(s), (4, L, D))  # noqa: E731
    concept = PriorPrompts(Denoiser(ap, params(1)), tbl(10), None, jnp.zeros((L, D)))
    ref = PriorPrompts(Denoiser(ap, params(2)), tbl(11), tbl(12), 0.1 * jnp.ones((L, D)))
    lora = PriorPrompts(Denoiser(ap, params(3)), tbl(13), tbl(14) if normal else None)
    zc = jax.random.normal(jax.random.key(20), (B, H, H, C))
    zn = jax.random.normal(jax.random.key(21), (B, H, H, C))
    cam = jax.random.normal(jax.random.key(22), (B, 16))
    return concept, ref, lora, zc, zn, cam


@pytest.mark.parametrize("scale,normal,mode,ref_scale", [(7.5, True, "dsd", None), (1.0, True, "dsd", None),
                                                         (7.5, False, "dsd", None), (7.5, True, "concept_only", None),
                                                         (7.5, True, "dsd", 1.0), (1.0, False, "dsd", 3.0)])
def test_fused_matches_per_term(scale, normal, mode, ref_scale):
    calls = []
    concept, ref, lora, zc, zn, cam = setup(calls, normal)
    direction = jnp.array([0, 2], jnp.int32)
    ref_t = None if mode == "concept_only" else (0.1, 0.25)

    def run(fuse):
        st = DSDSettings(guidance_scale=scale, reference_guidance_scale=ref_scale, reference_t=ref_t,
                         normal_distillation=normal, fuse_passes=fuse)

        def f(zc, zn, lp):
            lo = PriorPrompts(Denoiser(lora.denoiser.apply, lp), lora.color, lora.normal)
            return dsd_loss(jax.random.key(5), color_latents=zc, normal_latents=zn if normal else None,
                            camera=cam, direction=direction, concept=concept, reference=ref, lora=lo,
                            scheduler=DDIMScheduler.from_config(TINY_SCHEDULER), settings=st)

        del calls[:]
        (tot, m), g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(zc, zn, lora.denoiser.params)
        return tot, m, g, list(calls)

    t0, m0, g0, c0 = run(False)
    t1, m1, g1, c1 = run(True)
    np.testing.assert_allclose(float(t1), float(t0), rtol=1e-5)
    for k in m0:
        np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert float(m0["loss_concept"]) > 0 and float(m0["loss_lora"]) > 0
    if mode == "dsd":
        assert float(m0["loss_ref_color"]) > 0
        assert (float(m0["loss_ref_normal"]) > 0) == normal
    # fewer, larger calls: at most one per prior + one LoRA inference + one LoRA training call
    n_priors = 1 if mode == "concept_only" else 2
    assert len(c1) == n_priors + 2, (c0, c1)
    assert len(c1) < len(c0) if mode == "dsd" else len(c1) == len(c0)
    assert sum(c1) == sum(c0)  # the same rows are evaluated


def test_reference_guidance_scale_applies_to_the_reference_terms_only():
    """``reference_guidance_scale`` sets the reference prior's CFG; the concept term keeps ``guidance_scale``:
    each term equals the one computed with that scale for every prior, on both paths."""
    concept, ref, lora, zc, zn, cam = setup([])
    direction = jnp.array([1, 3], jnp.int32)

    def terms(fuse, **kw):
        st = DSDSettings(fuse_passes=fuse, **kw)
        return dsd_loss(jax.random.key(7), color_latents=zc, normal_latents=zn, camera=cam, direction=direction,
                        concept=concept, reference=ref, lora=lora,
                        scheduler=DDIMScheduler.from_config(TINY_SCHEDULER), settings=st)[1]

    for fuse in (False, True):
        mixed = terms(fuse, guidance_scale=7.5, reference_guidance_scale=1.0)
        all75, all1 = terms(fuse, guidance_scale=7.5), terms(fuse, guidance_scale=1.0)
        np.testing.assert_allclose(float(mixed["loss_concept"]), float(all75["loss_concept"]), rtol=1e-6)
        for k in ("loss_ref_color", "loss_ref_normal"):
            np.testing.assert_allclose(float(mixed[k]), float(all1[k]), rtol=1e-6)
            assert abs(float(all75[k]) - float(all1[k])) > 1e-3 * abs(float(all1[k]))  # CFG matters here
