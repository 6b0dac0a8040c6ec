"""Batched row gathers with a deterministic, memory-friendly scatter-add transpose.

Per-pixel vertex lookups (``pos[tris[id]]``, ``attr[tris[id]]``) are gathers of whole rows; their
gradients are scatter-adds of rows. XLA's CPU scatter is a serial element loop and dominated the
backward pass of a render, so on the CPU both directions call the native kernels in
``csrc/kernels/rows_cpu.cc`` (one thread per output batch or row range, fixed summation order).
Elsewhere (GPU, or no compiled library) the same semantics run as plain XLA gather / scatter.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["gather_rows"]


def _native() -> bool:
    from tsjax.ops import _ffi

    return _ffi.rows_available()


def _gather_impl(table, idx):
    if _native() and table.dtype == jnp.float32:
        from tsjax.ops import _ffi

        return _ffi.gather_rows(table, idx)
    if _native() and table.dtype == jnp.int32:  # bit-exact copy of 32-bit rows
        from tsjax.ops import _ffi

        t = jax.lax.bitcast_convert_type(table, jnp.float32)
        return jax.lax.bitcast_convert_type(_ffi.gather_rows(t, idx), jnp.int32)
    tb = jnp.broadcast_to(table, (idx.shape[0],) + table.shape[1:])
    rows = table.shape[1]
    ok = (idx >= 0) & (idx < rows)
    out = jax.vmap(lambda t, i: jnp.take(t, i, axis=0, mode="clip"))(tb, jnp.clip(idx, 0, rows - 1))
    return jnp.where(ok[..., None], out, jnp.zeros((), table.dtype))


def _scatter_impl(values, idx, out_batch, rows):
    if _native() and values.dtype == jnp.float32:
        from tsjax.ops import _ffi

        return _ffi.scatter_add_rows(values, idx, out_batch, rows)
    b = idx.shape[0]
    flat = jnp.where((idx >= 0) & (idx < rows), idx, rows)  # out of range -> dropped row
    if out_batch == 1:
        flat = flat.reshape(-1)
        return jnp.zeros((rows + 1, values.shape[2]), values.dtype).at[flat].add(
            values.reshape(-1, values.shape[2]))[None, :rows]
    flat = (flat + jnp.arange(b, dtype=flat.dtype)[:, None] * (rows + 1)).reshape(-1)
    out = jnp.zeros((b * (rows + 1), values.shape[2]), values.dtype).at[flat].add(values.reshape(-1, values.shape[2]))
    return out.reshape(b, rows + 1, -1)[:, :rows]


@jax.custom_vjp
def _gather(table, idx):
    return _gather_impl(table, idx)


def _gather_fwd(table, idx):
    return _gather_impl(table, idx), (idx, table.shape[0], table.shape[1])


def _gather_bwd(res, ct):
    idx, bt, rows = res
    return _scatter_impl(ct, idx, bt, rows), None


_gather.defvjp(_gather_fwd, _gather_bwd)


def gather_rows(table, idx):
    """Rows of ``table`` picked by ``idx`` per batch entry.

    Args:
      table: [Bt, R, C] (Bt = 1: shared by every batch entry, or Bt = B) float32 or int32.
      idx: [B, N] integer row indices; indices outside [0, R) give zero rows.

    Returns:
      [B, N, C] with ``out[b, n] = table[b or 0, idx[b, n]]``. Differentiable w.r.t. a float
      ``table``: the cotangent is the (deterministic) scatter-add of ``ct`` rows into [Bt, R, C]
      (summed over the batch when Bt = 1). ``idx`` gets no gradient.
    """
    if table.ndim != 3 or idx.ndim != 2 or table.shape[0] not in (1, idx.shape[0]):
        raise ValueError(f"gather_rows: table [Bt,R,C] with Bt in (1, B) and idx [B,N] expected, got "
                         f"{tuple(table.shape)} and {tuple(idx.shape)}")
    idx = idx.astype(jnp.int32)
    if jnp.issubdtype(table.dtype, jnp.integer):
        return _gather_impl(table.astype(jnp.int32), idx)
    dt = table.dtype
    if dt != jnp.float32:  # float64 (tests under x64) etc.: XLA path with autodiff
        return _gather_impl(table, idx)
    return _gather(table, idx)
