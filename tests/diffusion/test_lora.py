"""LoRA tree: init/merge semantics, optax mask, PEFT/diffusers file interop and parity with diffusers+PEFT."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tsjax.diffusion import lora as L
from tsjax.diffusion.convert import torch_key
from tsjax.diffusion.unet import UNet2DConditionModel, UNetConfig

# One level, both attentions, linear projections: small to compile, has every LoRA target kind.
TINY = dict(sample_size=8, block_out_channels=(32,), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            cross_attention_dim=16, attention_head_dim=4, use_linear_projection=False)


_CACHE: dict = {}


def _params():
    if not _CACHE:
        cfg = UNetConfig.from_diffusers(TINY)
        _CACHE["p"] = cfg, UNet2DConditionModel(cfg).init_params(jax.random.key(0))
    return _CACHE["p"]


def _randomise_up(lo, seed=1, std=0.2):
    g = np.random.default_rng(seed)
    return {m: {"down": f["down"], "up": jnp.asarray(std * g.standard_normal(f["up"].shape), jnp.float32)}
            for m, f in sorted(lo.items())}


def test_init_targets_shapes_and_identity_at_init():
    _, p = _params()
    lo = L.init_lora(jax.random.key(0), p, 4)
    # 4 transformers (down 1, mid 1, up 2) x 2 attentions x {q, k, v, out}
    assert len(lo) == 32 and all(m.split("/")[-1] in L.DEFAULT_TARGETS for m in lo)
    f = lo["down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k"]
    assert f["down"].shape == (16, 4) and f["up"].shape == (4, 32)
    downs = np.concatenate([np.ravel(v["down"]) for v in lo.values()])
    assert abs(downs.std() - 0.25) < 0.01 and all(not np.any(v["up"]) for v in lo.values())
    merged = jax.jit(L.merge_lora)(p, lo, 1.0)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(p)):
        np.testing.assert_array_equal(a, b)
    conv = L.init_lora(jax.random.key(0), p, 2, ["conv", "ff"])
    k = conv["down_blocks_0/resnets_0/conv1"]
    assert k["down"].shape == (3, 3, 32, 2) and k["up"].shape == (2, 32)
    assert "mid_block/attentions_0/transformer_blocks_0/ff/net_0/proj" in conv
    assert set(L.init_lora(jax.random.key(0), p, 2, ["to_out.0"])) == {m for m in lo if m.endswith("to_out_0")}
    with pytest.raises(ValueError, match="match no Dense/Conv"):
        L.init_lora(jax.random.key(0), p, 2, ["nope"])
    with pytest.raises(ValueError, match="positive integer"):
        L.init_lora(jax.random.key(0), p, 0)


def test_merge_formula_grad_and_mask():
    _, p = _params()
    lo = _randomise_up(L.init_lora(jax.random.key(0), p, 3, ["attn", "conv"]))
    merged = jax.jit(L.merge_lora)(p, lo, 0.5)
    m = "up_blocks_0/resnets_1/conv2"
    w = np.asarray(p["up_blocks_0"]["resnets_1"]["conv2"]["kernel"])
    expect = w + 0.5 * np.einsum("hwir,ro->hwio", np.asarray(lo[m]["down"]), np.asarray(lo[m]["up"]))
    np.testing.assert_allclose(merged["up_blocks_0"]["resnets_1"]["conv2"]["kernel"], expect, rtol=1e-6, atol=1e-6)
    q = "mid_block/attentions_0/transformer_blocks_0/attn1/to_q"
    wq = np.asarray(traverse_util.flatten_dict(p)[tuple(q.split("/")) + ("kernel",)])
    got = traverse_util.flatten_dict(merged)[tuple(q.split("/")) + ("kernel",)]
    np.testing.assert_allclose(got, wq + 0.5 * np.asarray(lo[q]["down"]) @ np.asarray(lo[q]["up"]), atol=1e-6)
    # d/d up of <merged W, G> = down^T G * scale
    g = jax.jit(jax.grad(lambda f: jnp.sum(L.merge_lora(p, f, 0.5)["mid_block"]["attentions_0"]["transformer_blocks_0"]
                                   ["attn1"]["to_q"]["kernel"] * 2.0)))(lo)
    np.testing.assert_allclose(g[q]["up"], 0.5 * np.asarray(lo[q]["down"]).T @ np.full(wq.shape, 2.0), rtol=1e-5)
    assert not np.any(g["mid_block/attentions_0/transformer_blocks_0/attn1/to_k"]["up"])
    mask = L.lora_mask({"unet": p, "lora": lo}, include_camera=True)
    assert all(jax.tree_util.tree_leaves(mask["lora"])) and not any(jax.tree_util.tree_leaves(mask["unet"]))
    with pytest.raises(ValueError, match="not a Dense/Conv layer"):
        L.merge_lora(p, {"mid_block/nope": lo[q]}, 1.0)


def test_file_round_trip_and_old_diffusers_naming(tmp_path):
    _, p = _params()
    lo = _randomise_up(L.init_lora(jax.random.key(2), p, 4, ["attn", "conv"]))
    f = L.save_lora_diffusers(tmp_path, lo)
    assert f.name == "pytorch_lora_weights.safetensors"
    sd = L.lora_to_peft_state_dict(lo)
    a = sd["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    assert a.shape == (4, 32) and sd["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"].shape == (4, 32, 3, 3)
    back = L.load_lora_diffusers(tmp_path, p)
    assert set(back) == set(lo)
    for m in lo:
        np.testing.assert_array_equal(back[m]["down"], lo[m]["down"])
        np.testing.assert_array_equal(back[m]["up"], lo[m]["up"])
    # Old attention-processor naming with a network alpha of 2 (rank 4): factor 0.5 folded into up.
    attn = {m: v for m, v in lo.items() if "/attn" in m}
    old = {}
    for m, v in attn.items():
        block, proj = torch_key(tuple(m.split("/"))).split(".to_")  # "...attn1", "q" / "out.0"
        pre = f"{block}.processor.to_{proj.split('.')[0]}_lora"
        old[f"{pre}.down.weight"] = np.asarray(v["down"]).T
        old[f"{pre}.up.weight"] = np.asarray(v["up"]).T
        old[f"{pre}.alpha"] = np.float32(2.0)
    got = L.lora_from_state_dict(old, p)
    assert set(got) == set(attn)
    for m in attn:
        np.testing.assert_allclose(got[m]["down"], attn[m]["down"], rtol=1e-6)
        np.testing.assert_allclose(got[m]["up"], 0.5 * np.asarray(attn[m]["up"]), rtol=1e-6)
    with pytest.raises(ValueError, match="text-encoder LoRA"):
        L.lora_from_state_dict({"text_encoder.x.lora_A.weight": np.zeros((1, 1))}, p)
    with pytest.raises(ValueError, match="incompatible with the kernel"):
        L.lora_from_state_dict({"mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
                                np.zeros((2, 7)), "mid_block.attentions.0.transformer_blocks.0.attn1.to_q."
                                "lora_B.weight": np.zeros((32, 2))}, p)
    with pytest.raises(FileNotFoundError, match="no such LoRA"):
        L.load_lora_diffusers(tmp_path / "missing.safetensors", p)


@pytest.mark.torch
def test_lora_parity_with_diffusers_peft(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    from tsjax.diffusion.convert import load_unet

    nthreads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        tm = diffusers.UNet2DConditionModel(**TINY).eval()
        with torch.no_grad():
            for q in tm.parameters():
                q.add_(0.05 * torch.randn_like(q))
        tm.save_pretrained(tmp_path / "unet")
        cfg, p = load_unet(tmp_path / "unet")
        g = np.random.default_rng(0)
        x = g.standard_normal((2, 4, 8, 8)).astype(np.float32)
        t = np.array([5, 901])
        ctx = g.standard_normal((2, 3, 16)).astype(np.float32)
        model = UNet2DConditionModel(cfg)
        fwd = jax.jit(lambda prm: model.apply({"params": prm}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                                              jnp.asarray(ctx)))
        # Unoptimised XLA backend: same function, faster compile (the test is compile-bound).
        fwd = fwd.lower(p).compile({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})

        def torch_out(m):
            with torch.no_grad():
                return m(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy().transpose(0, 2, 3, 1)

        base = np.asarray(fwd(p))
        # (1) ours -> diffusers: attention + resnet-conv LoRA saved in PEFT naming, loaded by diffusers.
        lo = _randomise_up(L.init_lora(jax.random.key(3), p, 4, ["attn", "conv"]), std=0.3)
        L.save_lora_diffusers(tmp_path / "ours", lo)
        t1 = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
        t1.load_lora_adapter(str(tmp_path / "ours" / L.LORA_WEIGHT_NAME), prefix="unet")
        ours = np.asarray(fwd(L.merge_lora(p, lo, 1.0)))
        assert np.abs(ours - base).max() > 0.05  # the LoRA matters
        np.testing.assert_allclose(ours, torch_out(t1), rtol=0, atol=1e-5)
        # (2) diffusers/PEFT -> ours: a PEFT adapter with lora_alpha != r saved by diffusers' training utility.
        tm.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        with torch.no_grad():
            for n, q in tm.named_parameters():
                if "lora_B" in n:
                    q.normal_(0.0, 0.2)
        diffusers.StableDiffusionPipeline.save_lora_weights(
            tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(tm),
            unet_lora_adapter_metadata=tm.peft_config["default"].to_dict())
        theirs = L.load_lora_diffusers(tmp_path / "peft", p)
        assert len(theirs) == 32
        np.testing.assert_allclose(np.asarray(fwd(L.merge_lora(p, theirs, 1.0))), torch_out(tm), rtol=0, atol=1e-5)
    finally:
        torch.set_num_threads(nthreads)
