"""Sharding across assets (tsjax.parallel) on 4 forced host devices.

The XLA flag must be set before jax is imported, so the checks run in a fresh interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    r"""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np, optax
    from tsjax import parallel as par

    traces = []
    opt = optax.adamw(1e-2, b1=0.9, b2=0.99, eps=1e-15)

    def step(state, batch, key, prior):
        traces.append(1)  # runs only while tracing: counts compilations
        params, opt_state = state
        noise = 0.01 * jax.random.normal(key, batch["y"].shape)
        def loss_fn(p):
            pred = jnp.tanh(batch["x"] @ prior) @ p["w"] + p["b"]
            return jnp.mean((pred - batch["y"] - noise) ** 2)
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return (optax.apply_updates(params, upd), opt_state), {"loss": loss}

    K, steps = 4, 5
    rng = np.random.default_rng(0)
    prior = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)
    def init(i):
        p = {"w": jnp.asarray(rng.normal(size=(8,)), jnp.float32), "b": jnp.zeros((), jnp.float32)}
        return (p, opt.init(p))
    states = [init(i) for i in range(K)]
    batches = [{"x": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
                "y": jnp.asarray(rng.normal(size=(16,)), jnp.float32)} for _ in range(K)]
    root = jax.random.key(0)
    def keys_at(s):
        return [jax.random.fold_in(jax.random.fold_in(root, i), s) for i in range(K)]

    # Reference: K independent single-asset runs.
    single = jax.jit(step)
    ref = []
    for i in range(K):
        st = states[i]
        for s in range(steps):
            st, m = single(st, batches[i], keys_at(s)[i], prior)
        ref.append(st)
    n_single = len(traces)

    mesh = par.make_mesh(4)
    multi = par.sharded_asset_step(step, mesh, num_shared=1)
    st = par.shard_assets(par.stack_assets(states), mesh)
    bt = par.shard_assets(par.stack_assets(batches), mesh)
    sh = par.replicate(prior, mesh)
    for s in range(steps):
        ks = par.shard_assets(jnp.stack(keys_at(s)), mesh)
        st, m = multi(st, bt, ks, sh)
    n_multi = len(traces) - n_single
    out = par.unstack_assets(st)
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for i in range(K) for a, b in zip(jax.tree.leaves(out[i]), jax.tree.leaves(ref[i])))
    w_shard = st[0]["w"].sharding
    print(json.dumps({
        "devices": jax.device_count(), "max_abs_err": err, "multi_traces": n_multi,
        "shards": len(w_shard.device_set), "spec": str(w_shard.spec),
        "per_device_rows": [int(x.data.shape[0]) for x in st[0]["w"].addressable_shards],
    }))
    """
)


def _run(script: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sharded_assets_match_single_runs_and_compile_once():
    r = _run(SCRIPT)
    assert r["devices"] == 4
    assert r["max_abs_err"] <= 1e-5, r
    assert r["multi_traces"] == 1, "the sharded step must compile exactly once over 5 steps"
    assert r["shards"] == 4 and "asset" in r["spec"]
    assert r["per_device_rows"] == [1, 1, 1, 1]


def test_mesh_errors_are_clear():
    from tsjax import parallel as par
    import jax

    n = jax.device_count()
    with pytest.raises(ValueError, match="only .* device"):
        par.make_mesh(n + 1)
    with pytest.raises(ValueError, match="must divide"):
        par.make_mesh(n, views_per_asset=n + 1)
    mesh = par.make_mesh(1)
    assert mesh.shape == {"asset": 1, "view": 1}
    with pytest.raises(ValueError, match="same leading asset axis"):
        par.shard_assets({"a": [1.0, 2.0], "b": [[1.0], [2.0], [3.0]]}, mesh)


def test_initialize_distributed_needs_all_three(monkeypatch):
    from tsjax import parallel as par

    for v in ("TSJAX_COORDINATOR", "TSJAX_NUM_PROCESSES", "TSJAX_PROCESS_ID"):
        monkeypatch.delenv(v, raising=False)
    assert par.initialize_distributed() is False
    monkeypatch.setenv("TSJAX_COORDINATOR", "localhost:1234")
    with pytest.raises(ValueError, match="TSJAX_NUM_PROCESSES"):
        par.initialize_distributed()


MULTI = textwrap.dedent(
    r"""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    from tsjax import parallel as par
    assert par.initialize_distributed()  # from the TSJAX_* variables
    import jax, jax.numpy as jnp, numpy as np

    def step(state, batch, key, shared):
        noise = jax.random.normal(key, state.shape)
        new = state * shared["scale"] + batch @ shared["m"] + 0.1 * noise
        return new, {"norm": jnp.sum(new ** 2), "key_bits": jax.random.bits(key).astype(jnp.float32)}

    K = 8
    rng = np.random.default_rng(0)
    states = [rng.normal(size=(3,)).astype(np.float32) for _ in range(K)]
    batches = [rng.normal(size=(5,)).astype(np.float32) for _ in range(K)]
    shared = {"scale": np.float32(0.9), "m": rng.normal(size=(5, 3)).astype(np.float32)}
    keys = [jax.random.fold_in(jax.random.key(0), i) for i in range(K)]

    mesh = par.make_mesh(jax.device_count())
    mine = par.process_asset_indices(mesh, K)
    multi = par.sharded_asset_step(step, mesh, num_shared=1)
    st = par.shard_local_assets([states[k] for k in mine], mesh, K)
    bt = par.shard_local_assets([batches[k] for k in mine], mesh, K)
    ks = par.shard_local_assets([keys[k] for k in mine], mesh, K)
    sh = par.replicate(shared, mesh)
    for _ in range(3):
        st, m = multi(st, bt, ks, sh)
    rows = par.local_asset_rows({"state": st, "m": m, "key": ks})
    # the same steps for this process's assets, one at a time on the local device
    single = jax.jit(step)
    err, key_ok = 0.0, True
    for k, row in zip(mine, rows):
        s = jnp.asarray(states[k])
        for _ in range(3):
            s, mk = single(s, jnp.asarray(batches[k]), keys[k], shared)
        err = max(err, float(np.max(np.abs(np.asarray(s) - row["state"]))),
                  float(abs(mk["norm"] - row["m"]["norm"])))
        key_ok &= bool(np.array_equal(jax.random.key_data(row["key"]), jax.random.key_data(keys[k])))
    par.barrier("test-done")
    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                      "local": len(jax.local_devices()), "mine": mine, "err": err, "keys": key_ok,
                      "min": par.min_over_processes(10 + jax.process_index())}))
    """
)


def test_two_processes_feed_and_read_only_their_assets(launch_processes):
    """jax.distributed on localhost, 2 processes x 2 CPU devices: each process builds the global arrays
    from its own assets, runs the sharded step and reads back exactly the single-asset results."""
    outs = []
    for p in launch_processes([sys.executable, "-c", MULTI], timeout=300):
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert [r["process"] for r in outs] == [0, 1]
    assert all(r["devices"] == 4 and r["local"] == 2 for r in outs)
    assert outs[0]["mine"] == [0, 1, 2, 3] and outs[1]["mine"] == [4, 5, 6, 7]
    assert all(r["err"] <= 1e-5 and r["keys"] for r in outs), outs
    assert all(r["min"] == 10 for r in outs)


def test_process_asset_indices_single_process():
    from tsjax import parallel as par

    mesh = par.make_mesh(1)
    assert par.process_asset_indices(mesh, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="this process holds assets"):
        par.shard_local_assets([{"a": 1.0}], mesh, 2)


def test_initialize_distributed_checks_ids(monkeypatch):
    from tsjax import parallel as par

    monkeypatch.setenv("TSJAX_COORDINATOR", "localhost:1234")
    monkeypatch.setenv("TSJAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("TSJAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"must be in \[0, TSJAX_NUM_PROCESSES=2\)"):
        par.initialize_distributed()
    monkeypatch.setenv("TSJAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="must be integers"):
        par.initialize_distributed()
