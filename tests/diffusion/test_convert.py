"""diffusers/transformers checkpoints -> Flax params: file formats, name/layout mapping, errors, whole pipelines."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from tsjax.diffusion import convert as C


class _Toy(nn.Module):
    """One of each parameter kind, named like torch modules (``blocks.0.lin`` -> ``blocks_0/lin``)."""

    @nn.compact
    def __call__(self, ids, x):
        e = nn.Embed(10, 4, name="tok")(ids)  # [B, N, 4]
        h = nn.Dense(3, name="blocks_0")(e)  # torch Linear(4, 3)
        h = nn.LayerNorm(name="norm")(h)
        img = nn.Conv(5, (3, 2), name="conv_in")(x)  # torch Conv2d(2, 5, (3, 2))
        return h, nn.Dense(6, use_bias=False, name="out")(img)


def _toy_template():
    return jax.eval_shape(lambda k: _Toy().init(k, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 4, 4, 2)))["params"],
                          jax.random.key(0))


def _toy_torch_sd(seed=0):
    g = np.random.default_rng(seed)
    f = lambda *s: g.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"tok.weight": f(10, 4), "blocks.0.weight": f(3, 4), "blocks.0.bias": f(3), "norm.weight": f(3),
            "norm.bias": f(3), "conv_in.weight": f(5, 2, 3, 2), "conv_in.bias": f(5), "out.weight": f(6, 5)}


def test_names():
    assert C.flax_path("down_blocks.0.attentions.1.to_out.0") == ("down_blocks_0", "attentions_1", "to_out_0")
    assert C.torch_key(("down_blocks_0", "attentions_1", "to_out_0")) == "down_blocks.0.attentions.1.to_out.0"
    assert C.torch_key(("conv_norm_out",)) == "conv_norm_out" and C.torch_key(("time_embedding", "linear_1")) == \
        "time_embedding.linear_1"


def test_state_dict_to_flax_layouts_prefix_buffers_and_dtype():
    sd = _toy_torch_sd()
    wrapped = {f"model.{k}": v for k, v in sd.items()} | {"model.position_ids": np.arange(7)}
    p = C.state_dict_to_flax(wrapped, _toy_template())  # "model." prefix absent from the template: stripped
    np.testing.assert_array_equal(p["tok"]["embedding"], sd["tok.weight"])
    np.testing.assert_array_equal(p["blocks_0"]["kernel"], sd["blocks.0.weight"].T)
    np.testing.assert_array_equal(p["norm"]["scale"], sd["norm.weight"])
    np.testing.assert_array_equal(p["conv_in"]["kernel"], sd["conv_in.weight"].transpose(2, 3, 1, 0))
    assert set(p["out"]) == {"kernel"}
    # the converted module computes what torch computes
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((1, 4, 4, 2)).astype(np.float32)
    conv = torch.nn.Conv2d(2, 5, (3, 2), padding=(1, 0))
    conv.weight.data, conv.bias.data = torch.tensor(sd["conv_in.weight"]), torch.tensor(sd["conv_in.bias"])
    ref = conv(torch.tensor(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
    out = nn.Conv(5, (3, 2), padding=((1, 1), (0, 0))).apply({"params": p["conv_in"]}, x)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    pb = C.state_dict_to_flax(sd, _toy_template(), dtype=jnp.bfloat16)
    assert pb["conv_in"]["kernel"].dtype == jnp.bfloat16


def test_state_dict_errors_name_file_tensor_and_shapes():
    sd = _toy_torch_sd()
    bad = dict(sd, **{"blocks.0.weight": np.zeros((4, 3), np.float32)})
    with pytest.raises(ValueError, match=r"w\.safetensors: tensor 'blocks\.0\.weight' has shape \(4, 3\), "
                                         r"expected \(3, 4\)"):
        C.state_dict_to_flax(bad, _toy_template(), source="w.safetensors")
    with pytest.raises(ValueError, match=r"expected \(5, 2, 3, 2\)"):
        C.state_dict_to_flax(dict(sd, **{"conv_in.weight": np.zeros((5, 2, 2, 3), np.float32)}), _toy_template())
    with pytest.raises(ValueError, match=r"1 unexpected tensor\(s\) not in the Flax model: extra\.weight"):
        C.state_dict_to_flax(dict(sd, **{"extra.weight": np.zeros(3)}), _toy_template())
    with pytest.raises(ValueError, match="unexpected tensor.*out.bias"):
        C.state_dict_to_flax(dict(sd, **{"out.bias": np.zeros(6)}), _toy_template())
    partial = {k: v for k, v in sd.items() if not k.startswith("norm")}
    with pytest.raises(ValueError, match=r"2 parameter\(s\) missing from the checkpoint: norm/bias, norm/scale"):
        C.state_dict_to_flax(partial, _toy_template())


def test_file_formats_sharding_and_hf_cache(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    sd = _toy_torch_sd()
    tsd = {k: torch.tensor(v) for k, v in sd.items()}
    (tmp_path / "st").mkdir()
    save_torch(dict(tsd, **{"half": tsd["norm.weight"].half(), "bf": tsd["norm.weight"].bfloat16()}),
               str(tmp_path / "st" / "model.safetensors"))
    got = C.read_state_dict(tmp_path / "st")
    np.testing.assert_array_equal(got["conv_in.weight"], sd["conv_in.weight"])
    np.testing.assert_array_equal(got["half"].astype(np.float32), tsd["norm.weight"].half().float().numpy())
    np.testing.assert_array_equal(got["bf"].astype(np.float32), tsd["norm.weight"].bfloat16().float().numpy())
    # .bin (torch.load weights_only) when no safetensors exists
    (tmp_path / "bin").mkdir()
    torch.save(tsd, tmp_path / "bin" / "diffusion_pytorch_model.bin")
    assert C.find_weights(tmp_path / "bin").name == "diffusion_pytorch_model.bin"
    np.testing.assert_array_equal(C.read_state_dict(tmp_path / "bin")["out.weight"], sd["out.weight"])
    # sharded safetensors via the index
    sh = tmp_path / "sharded"
    sh.mkdir()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:3]}, str(sh / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[3:]}, str(sh / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    wmap = {k: f"diffusion_pytorch_model-0000{1 if i < 3 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (sh / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    got = C.read_state_dict(sh)
    assert set(got) == set(sd)
    p = C.state_dict_to_flax(got, _toy_template())
    np.testing.assert_array_equal(p["blocks_0"]["bias"], sd["blocks.0.bias"])
    # a local HF cache repo folder resolves to its refs/main snapshot
    repo = tmp_path / "hub" / "models--org--toy"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    save_file(sd, str(snap / "model.safetensors"))
    assert C.resolve_model_dir(repo) == snap
    assert set(C.read_state_dict(repo)) == set(sd)
    with pytest.raises(FileNotFoundError, match="no weight file"):
        C.find_weights(tmp_path / "hub")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: no such model folder"):
        C.read_state_dict(tmp_path / "nope")


def _tiny_pipeline(root, camera=False):
    """A complete tiny diffusers Stable Diffusion folder written with ``save_pretrained``."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from tsjax.diffusion.sampling import tiny_tokenizer

    torch.manual_seed(0)
    ucfg = dict(sample_size=8, block_out_channels=(32,), layers_per_block=1, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                cross_attention_dim=32, attention_head_dim=4, use_linear_projection=True)
    if camera:
        ucfg.update(class_embed_type="projection", projection_class_embeddings_input_dim=16)
    unet = diffusers.UNet2DConditionModel(**ucfg)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=8, sample_size=16)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", pad_token_id=513, bos_token_id=512, eos_token_id=513))
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tiny_tokenizer(), unet=unet,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=True)
    return pipe


@pytest.mark.torch
def test_load_pipeline_tiny_folder(tmp_path):
    pipe = _tiny_pipeline(tmp_path / "sd", camera=True)
    sd = C.load_pipeline(tmp_path / "sd")
    assert sd.unet_config.camera_embed_dim == 16 and sd.unet_config.use_linear_projection
    assert sd.scheduler_config["prediction_type"] == "v_prediction"
    assert sd.tokenizer("a b").input_ids[0] == 512
    assert set(sd.params) == {"unet", "vae", "text_encoder"}
    w = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.detach().numpy()
    np.testing.assert_array_equal(
        sd.params["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"], w.T)
    np.testing.assert_array_equal(sd.params["unet"]["camera_embedding"]["linear_1"]["kernel"],
                                  pipe.unet.class_embedding.linear_1.weight.detach().numpy().T)
    n_torch = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert sum(x.size for x in jax.tree_util.tree_leaves(sd.params)) == n_torch
    # the sampling CLI's loader adapts the bundle
    from tsjax.diffusion.sampling import load_model

    model = load_model(str(tmp_path / "sd"))
    assert model.params["unet"] is not None
    # bf16 copies, component loaders on a pipeline root, and errors naming the missing path
    cfg, pb = C.load_unet(tmp_path / "sd", dtype=jnp.bfloat16)
    assert cfg == sd.unet_config and pb["conv_in"]["kernel"].dtype == jnp.bfloat16
    (tmp_path / "sd" / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"scheduler[/\\]scheduler_config\.json: missing"):
        C.load_pipeline(tmp_path / "sd")
    (tmp_path / "sd" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"vae: no weight file"):
        C.load_vae(tmp_path / "sd")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        C.load_unet(tmp_path)


@pytest.mark.torch
def test_load_unet_rejects_a_checkpoint_of_another_architecture(tmp_path):
    _tiny_pipeline(tmp_path / "sd")
    cfg = json.loads((tmp_path / "sd" / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] = 24  # config no longer matches the stored weights
    (tmp_path / "sd" / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: tensor "
                                         r"'down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight' "
                                         r"has shape \(32, 32\), expected \(32, 24\)"):
        C.load_unet(tmp_path / "sd" / "unet")
