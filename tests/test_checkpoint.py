"""Orbax checkpointing of a whole train state; resume is bit-identical; Ctrl-C saves and exits 130."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tsjax.checkpoint import Checkpointer, save_on_interrupt, state_is_alive

OPT = optax.adamw(1e-2, b1=0.9, b2=0.99, eps=1e-15)


def fresh_state(seed=0):
    k = jax.random.key(seed)
    params = {"w": jax.random.normal(k, (8, 3)), "lora": {"a": jnp.zeros((3,))}}
    return {"params": params, "opt": OPT.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key(seed + 1)}


@jax.jit
def _step(state):
    k = jax.random.fold_in(state["rng"], state["step"])
    x = jax.random.normal(k, (16, 8))

    def loss(p):
        return jnp.mean((x @ p["w"] + p["lora"]["a"] - 1.0) ** 2)

    g = jax.grad(loss)(state["params"])
    upd, opt = OPT.update(g, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], upd), "opt": opt, "step": state["step"] + 1,
            "rng": state["rng"]}


step = jax.jit(_step, donate_argnums=0)


def run(state, n):
    for _ in range(n):
        state = step(state)
    return state


def test_resume_is_bit_identical(tmp_path):
    full = run(fresh_state(), 10)
    half = run(fresh_state(), 5)
    ck = Checkpointer(tmp_path / "ckpt")
    ck.save(5, half, meta={"config": "x"})
    assert ck.latest_step() == 5 and ck.meta() == {"config": "x"}
    restored = Checkpointer(tmp_path / "ckpt").restore(fresh_state(seed=3))  # different template values
    assert int(restored["step"]) == 5
    assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(half["rng"])
    resumed = run(restored, 5)
    for a, b in zip(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, full)),
            jax.tree_util.tree_leaves(jax.tree_util.tree_map(
                lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
                resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_newest_and_overwrites(tmp_path):
    ck = Checkpointer(tmp_path / "c", max_to_keep=2)
    s = fresh_state()
    for i in (1, 2, 3):
        ck.save(i, s)
    assert sorted(int(p.name) for p in (tmp_path / "c").iterdir() if p.name.isdigit()) == [2, 3]
    s2 = run(fresh_state(), 1)
    ck.save(3, s2)  # same step again: replaced
    np.testing.assert_array_equal(ck.restore(fresh_state())["params"]["w"], s2["params"]["w"])


def test_restore_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        Checkpointer(tmp_path / "empty").restore(fresh_state())


def test_interrupt_saves_then_exits_130(tmp_path):
    ck = Checkpointer(tmp_path / "i")
    holder = {"state": fresh_state(), "good": None}

    def save():
        ck.save(int(holder["good"]["step"]), holder["good"])

    with pytest.raises(SystemExit) as e:
        with save_on_interrupt(save):
            for i in range(4):
                holder["state"] = step(holder["state"])
                holder["good"] = holder["state"]
                if i == 2:
                    raise KeyboardInterrupt
    assert e.value.code == 130
    assert ck.latest_step() == 3


def test_state_is_alive_after_donation():
    s = fresh_state()
    s2 = step(s)
    assert state_is_alive(s2)
    assert not state_is_alive(s)  # donated
