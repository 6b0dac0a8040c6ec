"""Orbax parameter checkpoints (tsjax.diffusion.io) and the tsjax model folder that uses them."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tsjax.diffusion.io import is_params_checkpoint, load_params, params_metadata, save_params


def _tree():
    rng = np.random.default_rng(0)
    return {
        "unet": {"conv_in": {"kernel": rng.standard_normal((3, 3, 4, 8)).astype(np.float32),
                             "bias": jnp.asarray(rng.standard_normal(8), jnp.float32)},
                 "norm": {"scale": rng.standard_normal(8).astype(ml_dtypes.bfloat16)}},
        "step": np.asarray(7, np.int32),
    }


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_round_trip_keeps_values_shapes_and_dtypes(tmp_path):
    tree = _tree()
    p = save_params(tmp_path / "ck", tree)
    assert p.is_absolute() and is_params_checkpoint(p) and not is_params_checkpoint(tmp_path)
    meta = _flat(params_metadata(p))
    assert meta["['unet']['conv_in']['kernel']"].shape == (3, 3, 4, 8)
    assert meta["['unet']['norm']['scale']"].dtype == jnp.bfloat16
    back = load_params(p)
    a, b = _flat(tree), _flat(back)
    assert a.keys() == b.keys()
    for k in a:
        assert isinstance(b[k], jax.Array) and b[k].dtype == np.asarray(a[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]))
    # with a template: same values, the template's dtypes
    tpl = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), tree)
    cast = load_params(p, target=tpl)
    assert cast["unet"]["norm"]["scale"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(cast["unet"]["norm"]["scale"]),
                                  np.asarray(tree["unet"]["norm"]["scale"], np.float32))
    assert int(cast["step"]) == 7


def test_overwrite_rules(tmp_path):
    tree = _tree()
    p = save_params(tmp_path / "ck", tree)
    tree2 = jax.tree_util.tree_map(lambda x: np.asarray(x) + 1, tree)
    save_params(p, tree2)  # replaces an existing checkpoint
    assert int(load_params(p)["step"]) == 8
    with pytest.raises(ValueError, match="overwrite=False"):
        save_params(p, tree, overwrite=False)
    other = tmp_path / "user_folder"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a parameter checkpoint; refusing"):
        save_params(other, tree)
    assert (other / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="empty"):
        save_params(tmp_path / "empty", {})


def test_errors_name_checkpoint_parameter_and_shapes(tmp_path):
    tree = _tree()
    p = save_params(tmp_path / "ck", tree)
    with pytest.raises(FileNotFoundError, match="nope: no such parameter checkpoint"):
        load_params(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a parameter checkpoint"):
        load_params(tmp_path)
    tpl = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)
    bad = jax.tree_util.tree_map(lambda x: x, tpl)
    bad["unet"]["conv_in"]["kernel"] = jax.ShapeDtypeStruct((3, 3, 4, 16), jnp.float32)
    with pytest.raises(ValueError, match=r"'unet/conv_in/kernel' has shape \(3, 3, 4, 8\) in the checkpoint, "
                                         r"expected \(3, 3, 4, 16\)"):
        load_params(p, target=bad)
    missing = {**tpl, "extra": {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}}
    with pytest.raises(ValueError, match="missing from the checkpoint: extra/w"):
        load_params(p, target=missing)
    fewer = {"unet": tpl["unet"]}
    with pytest.raises(ValueError, match="unexpected parameter.*: step"):
        load_params(p, target=fewer)


def test_model_folder_saves_orbax_and_reads_legacy_msgpack(tmp_path):
    from flax import serialization

    from tsjax.diffusion.clip_text import CLIPTextConfig
    from tsjax.diffusion.sampling import (TINY_SCHEDULER, TSJAX_PARAMS_DIR, TSJAX_PARAMS_FILE, DiffusionModel,
                                          _param_template, load_model, save_model, tiny_tokenizer)
    from tsjax.diffusion.unet import UNetConfig
    from tsjax.diffusion.vae import VAEConfig

    # the tiny preset's configs (camera-conditioned UNet) with random values of the right shapes (no slow init)
    ucfg = UNetConfig.tiny(camera_embed_dim=16)
    shell = DiffusionModel(ucfg, VAEConfig.tiny(), CLIPTextConfig.tiny(), dict(TINY_SCHEDULER), tiny_tokenizer(),
                           {}, source="test")
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map(lambda t: rng.standard_normal(t.shape).astype(np.float32),
                                    _param_template(shell))
    assert params["unet"]["conv_in"]["kernel"].shape == (3, 3, 4, 32) and "camera_embedding" in params["unet"]
    model = dataclasses.replace(shell, params=params)
    out = save_model(model, tmp_path / "m")
    assert is_params_checkpoint(out / TSJAX_PARAMS_DIR) and not (out / TSJAX_PARAMS_FILE).exists()
    back = load_model(str(out))
    assert back.unet_config == model.unet_config and back.vae_config == model.vae_config
    a, b = _flat(model.params), _flat(back.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
    # a checkpoint that does not match tsjax_model.json is reported with the parameter's path
    meta = json.loads((out / "tsjax_model.json").read_text())
    meta["text_encoder"]["hidden_size"] = 2 * meta["text_encoder"]["hidden_size"]
    (out / "tsjax_model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"params: parameter 'text_encoder/.*' has shape"):
        load_model(str(out))
    # legacy folders (flax msgpack, written before the orbax switch) still load
    legacy = save_model(model, tmp_path / "legacy")
    import shutil

    shutil.rmtree(legacy / TSJAX_PARAMS_DIR)
    host = jax.tree_util.tree_map(np.asarray, model.params)
    (legacy / TSJAX_PARAMS_FILE).write_bytes(serialization.msgpack_serialize(host))
    old = load_model(str(legacy))
    np.testing.assert_array_equal(np.asarray(old.params["unet"]["conv_in"]["kernel"]),
                                  np.asarray(model.params["unet"]["conv_in"]["kernel"]))
    (legacy / TSJAX_PARAMS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="missing parameter checkpoint"):
        load_model(str(legacy))
