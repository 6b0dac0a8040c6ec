"""Flax CLIP text encoder vs transformers' PyTorch CLIPTextModel on tiny random checkpoints; local tokenizer.

Models are created with transformers, weights perturbed away from init, saved with ``save_pretrained``
(safetensors) and loaded through ``tsjax.diffusion.convert.load_text_encoder``. fp32 ``last_hidden_state``
and ``pooled`` agree to 1e-5 (max abs) for SD1-style (``quick_gelu``, legacy ``eos_token_id=2``: pooled at
the largest id) and SD2-style (``gelu``, pooled at the first eos) encoders.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the PyTorch reference stack")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")

from tsjax.diffusion.clip_text import CLIPTextConfig, CLIPTextModel, load_tokenizer  # noqa: E402
from tsjax.diffusion.convert import load_text_encoder  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-5
VOCAB, L = 100, 16
# SD1.x-like (CLIP ViT-L text tower: quick_gelu; its config carries the legacy eos_token_id=2).
SD1 = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=L, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
# SD2.x-like (OpenCLIP ViT-H text tower: gelu) with a post-#24773 eos id (pooled at the first eos).
SD2 = dict(SD1, hidden_act="gelu", num_hidden_layers=3, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
           layer_norm_eps=1e-6)
# tanh-approximate GELU (some CLIP towers scored by tsjax.metrics.clip, which shares this module).
TANH = dict(SD2, hidden_act="gelu_pytorch_tanh", num_hidden_layers=1)


def _make(tmp_path, cfg, seed):
    torch.manual_seed(seed)
    m = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    tcfg, params = load_text_encoder(tmp_path / "text_encoder")
    return m, tcfg, params


def _ids(seed, lengths, bos, eos, pad):
    """``[bos, random tokens..., eos, pad...]`` rows (tokens in [3, VOCAB - 2), so eos = VOCAB - 1 is the max)."""
    g = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        body = g.integers(3, VOCAB - 2, n).tolist()
        rows.append(([bos] + body + [eos] + [pad] * L)[:L])
    return np.array(rows, np.int64)


@pytest.mark.parametrize("name,cfg", [("sd1", SD1), ("sd2", SD2), ("tanh", TANH)])
def test_clip_text_matches_transformers(tmp_path, name, cfg):
    m, tcfg, params = _make(tmp_path, cfg, seed=len(name))
    assert tcfg.hidden_act == cfg["hidden_act"] and tcfg.eos_token_id == cfg["eos_token_id"]
    eos = VOCAB - 1  # SD tokenizers: end-of-text is the largest id and also pads
    ids = _ids(1, [3, 9, L - 2, 0], bos=VOCAB - 2, eos=eos, pad=eos)
    with torch.no_grad():
        ref = m(torch.tensor(ids))
    ref_h, ref_p = ref.last_hidden_state.numpy(), ref.pooler_output.numpy()
    model = CLIPTextModel(tcfg)
    h, pooled = jax.jit(lambda p, i: model.apply({"params": p}, i))(params, jnp.asarray(ids, jnp.int32))
    assert h.shape == (4, L, 32) and pooled.shape == (4, 32)
    assert np.abs(ref_h).max() > 0.5
    np.testing.assert_allclose(np.asarray(h), ref_h, rtol=0, atol=TOL, err_msg=f"{name}: last_hidden_state")
    np.testing.assert_allclose(np.asarray(pooled), ref_p, rtol=0, atol=TOL, err_msg=f"{name}: pooled")
    # pooled is the hidden state at the end-of-text token (first eos; for the legacy id 2 the largest id)
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(h)[np.arange(4), [4, 10, L - 1, 1]])

    # causal: changing a later token leaves earlier positions unchanged
    ids2 = ids.copy()
    ids2[:, 8] = 5
    h2, _ = jax.jit(lambda p, i: model.apply({"params": p}, i))(params, jnp.asarray(ids2, jnp.int32))
    np.testing.assert_array_equal(np.asarray(h2)[:, :8], np.asarray(h)[:, :8])
    assert np.abs(np.asarray(h2)[:, 8:] - np.asarray(h)[:, 8:]).max() > 1e-3


def test_clip_text_padding_mask_matches_transformers(tmp_path):
    """With an ``attention_mask`` (padding keys masked on top of the causal mask)."""
    m, tcfg, params = _make(tmp_path, SD2, seed=7)
    ids = _ids(2, [4, 11], bos=VOCAB - 2, eos=VOCAB - 1, pad=1)
    mask = (np.arange(L)[None] <= np.array([[5], [12]])).astype(np.int64)
    with torch.no_grad():
        ref = m(torch.tensor(ids), attention_mask=torch.tensor(mask))
    model = CLIPTextModel(tcfg)
    h, pooled = jax.jit(lambda p, i, a: model.apply({"params": p}, i, a))(params, jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)  # outputs at padded query positions are not meaningful
    np.testing.assert_allclose(np.asarray(h)[valid], ref.last_hidden_state.numpy()[valid], rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), rtol=0, atol=TOL)


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32(tmp_path):
    _, tcfg, params = _make(tmp_path, SD1, seed=11)
    ids = jnp.asarray(_ids(3, [5, 12], bos=VOCAB - 2, eos=VOCAB - 1, pad=VOCAB - 1), jnp.int32)
    out = {}
    for dt in (jnp.float32, jnp.bfloat16):
        model = CLIPTextModel(tcfg, dtype=dt)
        shapes = jax.eval_shape(model.init_params, jax.random.key(0))
        assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
        out[dt] = jax.jit(lambda p, i, model=model: model.apply({"params": p}, i))(params, ids)
    assert out[jnp.bfloat16][0].dtype == jnp.bfloat16
    for a, b in zip(out[jnp.float32], out[jnp.bfloat16]):
        err = float(jnp.abs(a - b.astype(jnp.float32)).max())
        # outputs are LayerNorm-ed (unit scale): measured 0.032 (hidden) and 0.022 (pooled); bound 0.06.
        assert 0 < err <= 0.06, err


def test_config_from_transformers(tmp_path):
    m = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD2))
    m.save_pretrained(tmp_path / "te", safe_serialization=True)
    d = json.loads((tmp_path / "te" / "config.json").read_text())
    cfg = CLIPTextConfig.from_transformers(d, source="te/config.json")
    assert cfg == CLIPTextConfig(**{k: v for k, v in SD2.items()})
    assert CLIPTextConfig.from_transformers(cfg.to_transformers()) == cfg
    with pytest.raises(ValueError, match="te/config.json: .*hidden_act='relu' is not supported"):
        CLIPTextConfig.from_transformers(dict(d, hidden_act="relu"), source="te/config.json")
    with pytest.raises(ValueError, match="unknown CLIPTextModel config key 'bogus'"):
        CLIPTextConfig.from_transformers(dict(d, bogus=1))
    with pytest.raises(ValueError, match="full CLIPConfig"):
        CLIPTextConfig.from_transformers({"model_type": "clip", "text_config": d})


def test_sd2_text_encoder_parameter_count_matches_pytorch():
    """The full SD 2.x text encoder, shapes only (jax.eval_shape vs a meta-device PyTorch model)."""
    cfg = CLIPTextConfig.sd2()
    shapes = jax.eval_shape(lambda k: CLIPTextModel(cfg).init_params(k), jax.random.key(0))
    n_jax = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    with torch.device("meta"):
        m = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_transformers()))
    assert n_jax == sum(p.numel() for p in m.parameters()) == 340_387_840


def _write_tiny_bpe(folder):
    """A 60-token CLIP BPE vocabulary: letters, letters + '</w>', a few merges, and the special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    merged = ["he", "ll", "hell", "lo</w>"]
    vocab = letters + [c + "</w>" for c in letters] + merged + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\nh e\nl l\nhe ll\nl o</w>\n")
    return {t: i for i, t in enumerate(vocab)}


def test_load_tokenizer_matches_transformers_clip_tokenizer(tmp_path):
    v = _write_tiny_bpe(tmp_path / "tokenizer")
    tok = load_tokenizer(tmp_path / "tokenizer")
    ref = transformers.CLIPTokenizer(str(tmp_path / "tokenizer" / "vocab.json"),
                                     str(tmp_path / "tokenizer" / "merges.txt"), model_max_length=12)
    texts = ["Hello world", "a hall, yellow", ""]
    kw = dict(padding="max_length", max_length=12, truncation=True, return_tensors="np")
    ids = tok(texts, **kw).input_ids
    np.testing.assert_array_equal(ids, ref(texts, **kw).input_ids)
    # hand-derived BPE: "hello" -> h e l l o</w> -> he l l o</w> -> he ll o</w> -> hell o</w>; "world" stays letters
    bos, eos = v["<|startoftext|>"], v["<|endoftext|>"]
    want = [bos, v["hell"], v["o</w>"], v["w"], v["o"], v["r"], v["l"], v["d</w>"], eos] + [eos] * 3
    np.testing.assert_array_equal(ids[0], want)
    # a tokenizer saved with save_pretrained (how tsjax model folders store it) loads back identically
    ref.save_pretrained(str(tmp_path / "saved"))
    np.testing.assert_array_equal(load_tokenizer(tmp_path / "saved")(texts, **kw).input_ids, ids)


def test_load_tokenizer_missing_files_raise_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: no such tokenizer folder"):
        load_tokenizer(tmp_path / "nope")
    _write_tiny_bpe(tmp_path / "tok")
    (tmp_path / "tok" / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt: missing tokenizer file"):
        load_tokenizer(tmp_path / "tok")
