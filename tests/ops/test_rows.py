"""Row gather / scatter-add (tsjax.ops._rows): native CPU kernels vs the XLA path, gradients,
out-of-range indices, shared tables."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.ops import _ffi, _rows
from tsjax.ops._rows import gather_rows


def _xla_only(monkeypatch):
    monkeypatch.setattr(_ffi, "rows_available", lambda: False)


@pytest.mark.parametrize("bt", [1, 3])
def test_gather_rows_values_and_gradient_native_and_xla(bt, monkeypatch):
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(bt, 50, 4)), jnp.float32)
    idx = jnp.asarray(rng.integers(-3, 53, (3, 400)), jnp.int32)  # some out of range
    ct = jnp.asarray(rng.normal(size=(3, 400, 4)), jnp.float32)
    t, i = np.asarray(table), np.asarray(idx)
    want = np.where(((i >= 0) & (i < 50))[..., None], t[np.arange(3)[:, None] % bt, np.clip(i, 0, 49)], 0.0)
    gwant = np.zeros((bt, 50, 4), np.float64)
    for b in range(3):
        for n in range(400):
            if 0 <= i[b, n] < 50:
                gwant[b % bt, i[b, n]] += np.asarray(ct)[b, n]

    def run():
        out, vjp = jax.vjp(lambda tb: gather_rows(tb, idx), table)
        return np.asarray(out), np.asarray(vjp(ct)[0])

    native = run() if _ffi.rows_available() else None
    _xla_only(monkeypatch)
    xla = run()
    for out, g in [r for r in (native, xla) if r is not None]:
        np.testing.assert_array_equal(out, want)
        np.testing.assert_allclose(g, gwant, rtol=1e-5, atol=1e-5)
    if native is not None:
        np.testing.assert_allclose(native[1], xla[1], rtol=1e-6, atol=1e-6)


def test_gather_rows_int_bit_exact_and_scatter_deterministic(monkeypatch):
    tris = jnp.asarray(np.random.default_rng(1).integers(-2**31, 2**31 - 1, (1, 30, 3)), jnp.int32)
    idx = jnp.asarray(np.random.default_rng(2).integers(0, 30, (2, 100)), jnp.int32)
    out = np.asarray(gather_rows(tris, idx))
    np.testing.assert_array_equal(out, np.asarray(tris)[0][np.asarray(idx)])
    if not _ffi.rows_available():
        pytest.skip("libtsjax_cpu.so without row kernels")
    vals = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5000, 3)), jnp.float32)
    idx = jnp.asarray(np.random.default_rng(4).integers(0, 7, (2, 5000)), jnp.int32)
    runs = []
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("TSJAX_RASTER_THREADS", threads)
        runs.append(np.asarray(_rows._scatter_impl(vals, idx, 1, 7)))
    # one thread per output row, (b, n) order: bit-identical for any thread count
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])
    want = np.zeros((7, 3))
    np.add.at(want, np.asarray(idx).reshape(-1), np.asarray(vals).reshape(-1, 3))
    np.testing.assert_allclose(runs[0][0], want, rtol=1e-5, atol=1e-4)


def test_gather_rows_bad_shapes():
    with pytest.raises(ValueError, match="gather_rows"):
        gather_rows(jnp.zeros((2, 5, 3)), jnp.zeros((3, 4), jnp.int32))
