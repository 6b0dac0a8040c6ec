"""The argument checks the CPU FFI handlers of the row kernels share (``csrc/ffi/cpu_check.h``): a call
that bypasses the Python eligibility tests (float16 data, a channel count that is not a multiple of the
vector width) must fail with an error that names the op and the reason, not run on bad memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.ops import _ffi

pytestmark = pytest.mark.skipif(_ffi.cpu_isa() == 0, reason="native CPU kernels not built or no AVX2+FMA on this CPU")

F32 = jnp.float32


def _call(target, outs, *args, **attrs):
    return jax.block_until_ready(jax.ffi.ffi_call(target, outs)(*args, **attrs))


def _geglu(x):
    r, f2 = x.shape
    return _call("tsjax_geglu_forward", jax.ShapeDtypeStruct((r, f2 // 2), x.dtype), x, jnp.zeros(f2, F32))


def _layer_norm(x):
    c = x.shape[-1]
    outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape[:-1], F32),
            jax.ShapeDtypeStruct(x.shape[:-1], F32))
    return _call("tsjax_layer_norm_forward", outs, x, jnp.ones(c, F32), jnp.zeros(c, F32), eps=np.float32(1e-5))


def _group_norm(x):
    b, _, c = x.shape
    outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, 4), F32), jax.ShapeDtypeStruct((b, 4), F32))
    return _call("tsjax_group_norm_forward", outs, x, jnp.ones(c, F32), jnp.zeros(c, F32),
                 groups=np.int64(4), eps=np.float32(1e-6), silu=False)


def _attention(q):
    b, n, h, _ = q.shape
    outs = (jax.ShapeDtypeStruct(q.shape, F32), jax.ShapeDtypeStruct((b, h, n), F32))
    return _call("tsjax_attention_forward", outs, q, q, q, scale=np.float32(0.25))


@pytest.mark.parametrize("op,fn,shape", [("geglu", _geglu, (4, 2 * 12)), ("layer_norm", _layer_norm, (4, 12)),
                                         ("group_norm", _group_norm, (1, 4, 12)),
                                         ("attention", _attention, (1, 4, 2, 12))])
def test_channels_not_a_multiple_of_the_vector_width(op, fn, shape):
    """12 channels: not a multiple of 8 (AVX2) or 16 (AVX-512F)."""
    x = jnp.ones(shape, F32)
    with pytest.raises(Exception, match=rf"{op}: .* must be a multiple of the vector width \((8|16)\)"):
        fn(x)


@pytest.mark.parametrize("op,fn,shape", [("geglu", _geglu, (4, 64)), ("layer_norm", _layer_norm, (4, 32)),
                                         ("group_norm", _group_norm, (1, 4, 32))])
def test_float16_data_is_refused(op, fn, shape):
    with pytest.raises(Exception, match=rf"{op}: x must be float32 or bfloat16"):
        fn(jnp.ones(shape, jnp.float16))


@pytest.mark.parametrize("fn,shape", [(_geglu, (4, 64)), (_layer_norm, (4, 32)), (_group_norm, (1, 4, 32)),
                                      (_attention, (1, 4, 2, 32))])
def test_valid_calls_pass_the_checks(fn, shape):
    """The same calls with 32 channels run and give finite values (the checks do not refuse valid input)."""
    out = fn(jnp.asarray(np.random.default_rng(0).standard_normal(shape), F32))
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in jax.tree.leaves(out))
