"""Diffusion building blocks: attention implementations, timestep features, bf16 compute vs fp32, the CPU conv
kernel gradient, the CPU dense-layer weight gradient."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.diffusion import layers
from tsjax.diffusion.layers import attention, timestep_embedding
from tsjax.diffusion.unet import UNet2DConditionModel, UNetConfig


def _qkv(seed, n=6, m=5, h=2, d=8, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (2, s, h, d), jnp.float32).astype(dtype) for k, s in zip(ks, (n, m, m))]


def _attention_np(q, k, v, causal=False):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhnm,bmhd->bnhd", w, v)


@pytest.mark.parametrize("impl", ["auto", "xla", "einsum"])
def test_attention_impls_match_reference(impl):
    q, k, v = _qkv(0)
    np.testing.assert_allclose(attention(q, k, v, impl=impl), _attention_np(q, k, v), atol=2e-6)
    q, k, v = _qkv(1, n=5, m=5)
    np.testing.assert_allclose(attention(q, k, v, impl=impl, is_causal=True), _attention_np(q, k, v, True), atol=2e-6)
    qb, kb, vb = _qkv(0, dtype=jnp.bfloat16)
    out = attention(qb, kb, vb, impl=impl)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _attention_np(qb, kb, vb), atol=2e-2)
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        attention(q, k, v, impl="flash")


@pytest.mark.torch
@pytest.mark.parametrize("dim,flip,shift", [(32, True, 0), (32, False, 1), (15, True, 0)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    torch = pytest.importorskip("torch")
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 17.5, 999], np.float32)
    ref = get_timestep_embedding(torch.tensor(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    out = np.asarray(timestep_embedding(jnp.asarray(t), dim, flip, shift))
    assert out.shape == (4, dim) and (dim % 2 == 0 or not np.any(out[:, -1]))
    # exp differs from torch's by <= 1 ulp in some frequencies: the sin/cos argument by <= t * ulp(1)
    assert np.all(np.abs(out - ref) <= 1e-6 + t[:, None] * 1.2e-7)


def test_unet_bf16_compute_tracks_fp32_with_fp32_master_params():
    cfg = UNetConfig.tiny(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                          up_block_types=("CrossAttnUpBlock2D",), attention_head_dim=4, camera_embed_dim=16)
    params = UNet2DConditionModel(cfg).init_params(jax.random.key(0))
    g = np.random.default_rng(0)
    x = jnp.asarray(g.standard_normal((2, 16, 16, 4)), jnp.float32)
    t = jnp.array([10, 800])
    ctx = jnp.asarray(g.standard_normal((2, 7, 32)), jnp.float32)
    cam = jnp.asarray(g.standard_normal((2, 16)), jnp.float32)
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

    def run(dtype):
        model = UNet2DConditionModel(cfg, dtype=dtype)

        def loss(p):
            out = model.apply({"params": p}, x, t, ctx, cam)
            return jnp.mean(out.astype(jnp.float32) ** 2), out

        f = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params).compile(fast)
        (_, out), grads = f(params)
        return out, grads

    out32, g32 = run(jnp.float32)
    out16, g16 = run(jnp.bfloat16)
    assert out32.dtype == jnp.float32 and out16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(g16))  # fp32 master grads
    o32, o16 = np.asarray(out32), np.asarray(out16, np.float32)
    rel = np.abs(o16 - o32).max() / np.abs(o32).max()
    assert 0 < rel < 3e-2, rel  # bf16 has an 8-bit mantissa: ~0.4% per op, a few % after the whole UNet
    k32 = np.asarray(g32["conv_in"]["kernel"])
    k16 = np.asarray(g16["conv_in"]["kernel"])
    assert np.corrcoef(k32.ravel(), k16.ravel())[0, 1] > 0.99


@pytest.fixture
def no_native_conv(monkeypatch):
    """The per-tap path is the fallback where tsjax's native CPU conv kernels are not available."""
    monkeypatch.setenv("TSJAX_NATIVE_CONV", "0")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv3x3_tap_kernel_gradient_matches_xla(dtype, no_native_conv):
    """Without the native kernels, large 3x3 convs take the per-tap GEMM kernel gradient on CPU: same value
    and gradients as nn.Conv."""
    x = jax.random.normal(jax.random.key(0), (1, 128, 128, 128), jnp.float32)
    fast = layers.conv(128, 3, "c", dtype)
    plain = nn.Conv(128, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, param_dtype=jnp.float32)
    p = fast.init(jax.random.key(1), x)
    w = jax.random.normal(jax.random.key(2), (1, 128, 128, 128), jnp.float32)

    def loss(m):
        return lambda p, x, w: jnp.sum(m.apply(p, x).astype(jnp.float32) * w)

    np.testing.assert_array_equal(fast.apply(p, x), plain.apply(p, x))  # the forward is XLA's conv
    g_fast = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(p, x, w)
    g_plain = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(p, x, w)
    (gb, gk), gx = jax.tree.leaves(g_fast[0]), g_fast[1]
    (pb, pk), px = jax.tree.leaves(g_plain[0]), g_plain[1]
    assert gk.dtype == jnp.float32 and gk.shape == (3, 3, 128, 128)
    # the input gradient is XLA's transposed conv on both paths (compiled in another fusion context:
    # last-bit differences); the kernel gradient sums 128*128 pixel products in another order: 1e-5 of the
    # gradient's scale in float32; bf16 operands are rounded the same way, the outputs are not: 1e-2
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for a, b in ((gx, px), (gb, pb), (gk, pk)):
        np.testing.assert_allclose(a, b, atol=tol * float(jnp.max(jnp.abs(b))))
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(fast)))(p, x, w))
    assert "branches_platforms=(('cpu',), None)" in jaxpr  # the large conv's backward took the tap path


def test_conv3x3_tap_path_limits(no_native_conv):
    """Small maps, few channels, strides and other kernel sizes keep lax.conv_general_dilated."""
    def taken(shape, features, kernel=3, stride=1):
        m = layers.conv(features, kernel, "c", jnp.float32, stride=stride)
        x = jnp.zeros(shape)
        p = jax.eval_shape(m.init, jax.random.key(0), x)
        return "custom_vjp_call" in str(jax.make_jaxpr(m.apply)(p, x))

    assert taken((1, 128, 128, 128), 128)
    assert taken((1, 256, 256, 64), 64)          # 256*256*64 = 128^3
    assert not taken((1, 512, 512, 3), 128)      # Cin = 3 (the VAE's conv_in)
    assert not taken((4, 64, 64, 256), 256)      # 64*64*256 < 128^3 per image, whatever the batch
    assert not taken((1, 128, 128, 64), 64)
    assert not taken((1, 256, 256, 32), 128)     # Cin < 64
    assert not taken((1, 256, 256, 128), 32)     # Cout < 64
    assert not taken((1, 128, 128, 128), 128, kernel=1)
    assert not taken((1, 128, 128, 128), 128, stride=2)


def test_dense_weight_gradient_routing_and_values(monkeypatch):
    """float32 dense layers of <= 256 output features take their weight gradient from the native kernels on
    CPU (``_dense_native``): the same value and gradients as a plain ``nn.Dense``; wider layers, bf16
    and ``TSJAX_NATIVE_DENSE=0`` keep XLA's."""
    from tsjax.ops import conv as native_conv
    if not native_conv.native_available():
        pytest.skip("native CPU kernels not built or this CPU lacks AVX2+FMA")
    x = jax.random.normal(jax.random.key(0), (2, 50, 96), jnp.float32)

    def grads(m, dtype=jnp.float32):
        p = m.init(jax.random.key(1), x)
        f = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x.astype(dtype)).astype(jnp.float32))),
                             argnums=(0, 1)))
        return f(p, x), f.lower(p, x).as_text()

    (gp, gx), text = grads(layers.dense(128, "d", jnp.float32))
    assert "tsjax_conv_kernel_grad" in text
    (pp, px), plain_text = grads(nn.Dense(128, param_dtype=jnp.float32))
    assert "tsjax_conv" not in plain_text
    for a, b in ((gx, px), (gp["params"]["kernel"], pp["params"]["kernel"]), (gp["params"]["bias"], pp["params"]["bias"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(b))))
    assert "tsjax_conv" not in grads(layers.dense(512, "d", jnp.float32))[1]   # wider: XLA's is as fast
    assert "tsjax_conv" not in grads(layers.dense(120, "d", jnp.float32))[1]   # not a multiple of 16
    assert "tsjax_conv" not in grads(layers.dense(128, "d", jnp.bfloat16), jnp.bfloat16)[1]
    monkeypatch.setenv("TSJAX_NATIVE_DENSE", "0")
    assert "tsjax_conv" not in grads(layers.dense(128, "d", jnp.float32))[1]


def _native_products(text: str) -> tuple[bool, bool, bool]:
    """(value, input gradient, weight gradient) of the dense layers in lowered ``text`` on the native kernels."""
    calls = [line for line in text.split("\n") if "stablehlo.custom_call @tsjax_conv" in line]
    return (any("@tsjax_conv_forward" in c and "flip = false" in c for c in calls),
            any("@tsjax_conv_forward" in c and "flip = true" in c for c in calls),
            any("@tsjax_conv_kernel_grad" in c for c in calls))


@pytest.mark.parametrize("rows,k,n,route", [
    (2048, 64, 64, (True, True, True)),       # many rows, narrow: all three products native
    (2048, 64, 1024, (False, True, False)),   # wide output (GEGLU-like): value and weight gradient XLA's
    (2048, 1024, 64, (True, False, True)),    # wide input: input gradient XLA's
    (2000, 64, 64, (False, False, True)),     # fewer rows than _NATIVE_MIN_ROWS: the weight gradient only
    (2048, 72, 64, (True, False, True)),      # K not a multiple of 16: input gradient XLA's
])
def test_dense_many_row_routing_and_values(rows, k, n, route, monkeypatch):
    """float32 dense layers over >= 2048 rows run their value (N <= 640) and input gradient (K <= 640) on the
    native 1x1-conv kernels on CPU (``_dense_native``), with the same value and gradients as a plain
    ``nn.Dense`` (float32 sums in another order: within 3e-6 of the largest entry); TSJAX_NATIVE_DENSE=0
    keeps all three on XLA."""
    from tsjax.ops import conv as native_conv
    if not native_conv.native_available():
        pytest.skip("native CPU kernels not built or this CPU lacks AVX2+FMA")
    x = jax.random.normal(jax.random.key(0), (2, rows // 2, k), jnp.float32)

    def run(m):
        p = m.init(jax.random.key(1), x)
        f = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1)))
        return f(p, x), f.lower(p, x).as_text()

    (v, (gp, gx)), text = run(layers.dense(n, "d", jnp.float32))
    assert _native_products(text) == route
    (pv, (pp, px)), _ = run(nn.Dense(n, param_dtype=jnp.float32))
    np.testing.assert_allclose(v, pv, rtol=1e-5)
    for a, b in ((gx, px), (gp["params"]["kernel"], pp["params"]["kernel"]), (gp["params"]["bias"], pp["params"]["bias"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=3e-6 * float(jnp.max(jnp.abs(b))))
    monkeypatch.setenv("TSJAX_NATIVE_DENSE", "0")
    assert _native_products(run(layers.dense(n, "d", jnp.float32))[1]) == (False, False, False)


def test_dense_bf16_backward_keeps_bf16_operands():
    """bfloat16 dense layers on CPU (``_dense_bf16``): the input gradient is a bf16 x bf16 -> f32 product
    (no float32 dot in the compiled backward), and value and gradients equal those of the plain formulation
    ``dot(x, w, preferred_element_type=f32).astype(bf16)`` differentiated by JAX: both sum bf16 products in
    float32 and round once, so they differ by at most a bf16 rounding (2^-8 relative)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the bf16 dense path is the CPU's")
    m = layers.dense(96, "d", jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 40, 64), jnp.float32).astype(jnp.bfloat16)
    p = m.init(jax.random.key(1), x)
    loss = lambda p, x: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32)))  # noqa: E731
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    hlo = f.lower(p, x).compile().as_text().split("\n")

    def dtype_of(name):
        decl = [d for d in hlo if d.strip().startswith("%" + name + " =")]
        return decl[0].split("=", 1)[1].split("[")[0].strip()

    products = {}  # output shape -> operand dtypes, of every dot in the compiled program
    for line in hlo:
        if " dot(" in line:
            args = line.split(" dot(")[1].split(")")[0].split(",")
            products[line.split("=", 1)[1].split("{")[0].strip()] = [dtype_of(a.strip().lstrip("%")) for a in args]
    # the value [80, 96] and the input gradient [80, 64] multiply bf16 operands (the weight gradient
    # x^T dy, [64, 96], XLA:CPU upcasts whatever its operands' dtype)
    assert products["f32[80,96]"] == ["bf16", "bf16"] and products["f32[80,64]"] == ["bf16", "bf16"], products

    def plain(p, x):
        w, b = p["params"]["kernel"].astype(jnp.bfloat16), p["params"]["bias"].astype(jnp.bfloat16)
        y = jax.lax.dot_general(x.reshape(-1, 64), w, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        return jnp.sum(jnp.sin((y.reshape(2, 40, 96) + b).astype(jnp.float32)))

    (v, (gp, gx)), (pv, (pp, px)) = f(p, x), jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(p, x)
    np.testing.assert_allclose(v, pv, rtol=1e-3)
    for a, b in ((gx, px), (gp["params"]["kernel"], pp["params"]["kernel"]), (gp["params"]["bias"], pp["params"]["bias"])):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 2 ** -7 * np.abs(b).max(), np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("x_dtype,dtype", [(jnp.float32, jnp.float32), (jnp.float32, jnp.bfloat16),
                                           (jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32)])
def test_layer_norm_module_matches_flax(x_dtype, dtype, monkeypatch):
    """``layers.LayerNorm`` keeps ``nn.LayerNorm``'s parameter names, init and numerics (float32
    statistics, output in the compute dtype) for every input/compute dtype pair, in value and gradient,
    and routes to the native kernels where they apply (48 channels; 20 channels fall back)."""
    from tsjax.ops import layer_norm as native_layer_norm

    rng = np.random.default_rng(7)
    for c, native in ((48, native_layer_norm.native_eligible((1, 48), jnp.float32)), (20, False)):
        x = jnp.asarray(rng.standard_normal((2, 9, c)) * 2 + 1, x_dtype)
        m = layers.LayerNorm(1e-5, "norm", dtype)
        p = m.init(jax.random.key(0), x)
        ref = nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False)
        pf = ref.init(jax.random.key(0), x)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), p) == jax.tree.map(lambda a: (a.shape, a.dtype), pf)
        p = {"params": {"scale": jnp.asarray(1 + 0.3 * rng.standard_normal(c), jnp.float32),
                        "bias": jnp.asarray(0.2 * rng.standard_normal(c), jnp.float32)}}
        ct = jnp.asarray(rng.standard_normal(x.shape), dtype)
        y, vjp = jax.vjp(lambda p, x: m.apply(p, x), p, x)
        yf, vjpf = jax.vjp(lambda p, x: ref.apply(p, x), p, x)
        assert y.dtype == yf.dtype == jnp.dtype(dtype)
        tol = 1e-5 if jnp.dtype(x_dtype) == jnp.dtype(dtype) == jnp.float32 else 2e-2
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(yf, np.float32), atol=tol, rtol=tol)
        for a, b in zip(jax.tree.leaves(vjp(ct)), jax.tree.leaves(vjpf(ct))):
            assert a.dtype == b.dtype
            b = np.asarray(b, np.float32)
            np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=tol * max(1.0, np.abs(b).max()), rtol=tol)
        hlo = jax.jit(lambda p, x: m.apply(p, x)).lower(p, x).as_text()
        assert ("tsjax_layer_norm_forward" in hlo) == native, (c, native)
    if native_layer_norm.native_eligible((1, 48), jnp.float32):
        monkeypatch.setenv("TSJAX_NATIVE_LAYER_NORM", "0")
        x = jnp.zeros((2, 3, 48), jnp.float32)
        m = layers.LayerNorm(1e-5, "norm", jnp.float32)
        assert "tsjax_layer_norm" not in jax.jit(lambda p, x: m.apply(p, x)).lower(m.init(jax.random.key(0), x), x).as_text()
