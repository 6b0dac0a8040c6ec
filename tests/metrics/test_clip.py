"""CLIP and aesthetic-head parity with transformers / PyTorch on tiny random weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tsjax.metrics.clip import clip_score, load_clip, preprocess  # noqa: E402


def byte_level_vocab():
    """A character-level CLIP BPE vocabulary (no merges): every byte symbol, alone and word-final."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    toks = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(toks)}


def make_tiny_clip(folder, *, image_size=32, patch=8, proj=16, act="quick_gelu", seed=0):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab = byte_level_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=20, hidden_act=act,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                  image_size=image_size, patch_size=patch, hidden_act=act)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)).eval()
    with torch.no_grad():  # perturb LayerNorms / biases away from their trivial init
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(folder)
    return model


@pytest.mark.torch
def test_clip_matches_transformers(tmp_path):
    model = make_tiny_clip(tmp_path)
    clip = load_clip(tmp_path)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = clip.tokenize(["a red house", "tower"])
    assert ids.shape[0] == 2 and ids[0, 0] == byte_level_vocab()["<|startoftext|>"]
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    from tsjax.metrics.clip import CLIPModel, _l2

    img = np.asarray(CLIPModel(clip.cfg).apply(clip.variables, pixels, method=CLIPModel.image_embeds))
    txt = np.asarray(clip.text_embeds(ids, normalize=False))
    for got, ref in ((img, out.image_embeds.numpy()), (txt, out.text_embeds.numpy())):
        # transformers returns L2-normalised embeddings here
        np.testing.assert_allclose(np.asarray(_l2(got)), ref, rtol=1e-4, atol=1e-5)
    # Un-normalised pooled outputs against the towers directly.
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    rel = np.abs(img - ref_img).max() / np.abs(ref_img).max()
    assert rel < 1e-4
    logits = np.asarray(CLIPModel(clip.cfg).apply(clip.variables, pixels, ids))
    np.testing.assert_allclose(logits, out.logits_per_image.numpy(), rtol=1e-4, atol=1e-4)
    s = np.asarray(clip_score(img, txt))
    np.testing.assert_allclose(s, np.maximum(100 * out.image_embeds.numpy() @ out.text_embeds.numpy().T, 0),
                               atol=1e-3)
    assert s.min() >= 0 and s.max() <= 100


@pytest.mark.torch
def test_clip_preprocess_matches_image_processor(tmp_path):
    from transformers import CLIPImageProcessor

    # A smooth image (resampling filters agree closely away from noise).
    yy, xx = np.mgrid[0:48, 0:64] / 64.0
    img = np.stack([0.5 + 0.4 * np.sin(6 * xx), 0.5 + 0.4 * np.cos(5 * yy), 0.3 + 0.5 * xx * yy], -1)
    img = (np.round(img * 255) / 255).astype(np.float32)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})
    ref = proc(images=[(img * 255).astype(np.uint8)], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = np.asarray(preprocess(img[None], 32, 28))[0]
    assert got.shape == ref.shape == (28, 28, 3)
    # 1/255 rounding in HF plus filter differences: compare in [0,1] units.
    err = np.abs(got - ref) * np.asarray([0.2686, 0.2613, 0.2758])
    assert err.mean() < 4e-3 and err.max() < 3e-2


def test_clip_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP folder not found"):
        load_clip(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a CLIPModel config"):
        load_clip(tmp_path)
