"""Full-size Stable Diffusion 2.1-base modules built with ``jax.eval_shape`` (no memory) have exactly the
parameter counts of the PyTorch models built from the same configs on the meta device."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch", reason="parameter-count parity needs torch")
diffusers = pytest.importorskip("diffusers", reason="parameter-count parity needs diffusers")
transformers = pytest.importorskip("transformers", reason="parameter-count parity needs transformers")

from flax import traverse_util  # noqa: E402

from tsjax.diffusion import clip_text as clip  # noqa: E402
from tsjax.diffusion import vae  # noqa: E402
from tsjax.diffusion.convert import flax_path  # noqa: E402
from tsjax.diffusion.unet import UNet2DConditionModel, UNetConfig  # noqa: E402

pytestmark = pytest.mark.torch

# stabilityai/stable-diffusion-2-1-base unet/config.json (the fields that matter; the rest are defaults).
SD21_BASE_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=[320, 640, 1280, 1280], attention_head_dim=[5, 10, 20, 20],
                      cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32,
                      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, flip_sin_to_cos=True,
                      freq_shift=0, center_input_sample=False, upcast_attention=False)


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _torch_meta(build):
    with torch.device("meta"):
        m = build()
    return {n: tuple(p.shape) for n, p in m.named_parameters()}


@pytest.mark.parametrize("camera", [False, True])
def test_sd21_base_unet_param_count(camera):
    cfg = dict(SD21_BASE_UNET)
    if camera:  # the VSD LoRA UNet: camera embedding 16 -> 1280 added to the time embedding
        cfg.update(class_embed_type="projection", projection_class_embeddings_input_dim=16)
    ucfg = UNetConfig.from_diffusers(cfg)
    shapes = UNet2DConditionModel(ucfg).param_shapes()
    ref = _torch_meta(lambda: diffusers.UNet2DConditionModel(**cfg))
    n = sum(math.prod(s) for s in ref.values())
    assert n == (865_910_724 + (16 * 1280 + 1280 + 1280 * 1280 + 1280 if camera else 0))
    assert _count(shapes) == n
    # and leaf by leaf: every torch tensor has a Flax leaf of the same size
    flat = {"/".join(k): math.prod(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
    for name, s in ref.items():
        mod, leaf = name.rsplit(".", 1)
        mod = mod.replace("class_embedding", "camera_embedding")
        fl = "/".join(flax_path(mod))
        cands = [f"{fl}/{x}" for x in (("bias",) if leaf == "bias" else ("kernel", "scale"))]
        assert any(flat.get(c) == math.prod(s) for c in cands), name


def test_sd21_base_vae_param_count():
    cfg = vae.VAEConfig.sd()
    shapes = jax.eval_shape(lambda k: vae.AutoencoderKL(cfg).init_params(k), jax.random.key(0))
    ref = _torch_meta(lambda: diffusers.AutoencoderKL(**cfg.to_diffusers()))
    n = sum(math.prod(s) for s in ref.values())
    assert n == 83_653_863
    assert _count(shapes) == n


def test_sd21_base_text_encoder_param_count():
    cfg = clip.CLIPTextConfig.sd2()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.hidden_act) == (1024, 23, 16, 4096, "gelu")
    shapes = jax.eval_shape(lambda k: clip.CLIPTextModel(cfg).init_params(k), jax.random.key(0))
    ref = _torch_meta(lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_transformers())))
    n = sum(math.prod(s) for s in ref.values())
    assert n == 340_387_840
    assert _count(shapes) == n
    assert jnp.dtype(jax.tree_util.tree_leaves(shapes)[0].dtype) == jnp.float32
