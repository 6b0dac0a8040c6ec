"""Whole pipeline (stages 1-5, outputs, resume) on a duck-typed toy diffusion bundle.

The toy bundle has the interface of :class:`tsjax.diffusion.sampling.DiffusionModel` (tokenize,
encode_text, unet_apply, vae_encode/decode, scheduler, ...) but tiny hand-written Flax modules, so the
orchestration, caching, checkpointing and output files are exercised in seconds; the real tiny models
are covered by tests/test_optimize.py.
"""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.diffusion.sampling import TINY_SCHEDULER
from tsjax.diffusion.schedulers import scheduler_from_config
from toy_models import ToyUNet, toy_lora_apply

L, D = 16, 8


class ToyVAE(nn.Module):
    def setup(self):
        self.enc = nn.Conv(4, (3, 3))
        self.dec = nn.Conv(3, (3, 3))

    def encode(self, x):
        h = nn.avg_pool(x, (4, 4), (4, 4))
        return self.enc(h), jnp.full(h.shape[:-1] + (4,), -6.0)

    def decode(self, z):
        return jnp.tanh(self.dec(jnp.repeat(jnp.repeat(z, 4, 1), 4, 2)))

    def __call__(self, x):
        return self.decode(self.encode(x)[0])


@dataclasses.dataclass(frozen=True)
class ToyBundle:
    params: dict
    scheduler_config: dict = dataclasses.field(default_factory=lambda: dict(TINY_SCHEDULER))
    scaling_factor: float = 1.0
    latent_factor: int = 4
    latent_channels: int = 4
    sample_size: int = 8
    max_length: int = L

    @property
    def scheduler(self):
        return scheduler_from_config(self.scheduler_config)

    def tokenize(self, prompts):
        ids = np.zeros((len(prompts), L), np.int32)
        for i, p in enumerate(prompts):
            b = list(p.encode())[:L]
            ids[i, :len(b)] = b
        return jnp.asarray(ids)

    def encode_text(self, p, ids):
        return p["table"][ids]

    def unet_apply(self, p, x, t, ctx, camera=None):
        return ToyUNet().apply({"params": p}, x, t, ctx, camera)

    def vae_encode(self, p, x):
        return ToyVAE().apply({"params": p}, x, method=ToyVAE.encode)

    def vae_decode(self, p, z):
        return ToyVAE().apply({"params": p}, z, method=ToyVAE.decode)


def toy_bundle(*_a, **_k):
    u = ToyUNet().init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, L, D)),
                       jnp.zeros((1, 16)))["params"]
    v = ToyVAE().init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
    t = {"table": jax.random.normal(jax.random.key(2), (256, D))}
    return ToyBundle(params={"unet": u, "vae": v, "text_encoder": t})


def toy_lora_parts(model, base_unet, rank, key):
    train = {"camera_embed": base_unet["camera_embed"], "delta": jnp.zeros(())}
    return train, toy_lora_apply(model.unet_apply)


SMALL = ["render.resolution=32", "theme_prior.n_views=4", "theme_prior.train.steps=10", "theme_prior.steps_single=10",
         "theme_prior.steps_group=10", "theme_prior.train.vae_steps=5", "theme_prior.n_concepts=2",
         "theme_prior.sample_steps=3", "concept_prior.train.steps=6", "concept_prior.steps_before_aug=3",
         "concept_prior.n_init_views=3", "concept_prior.img2img_steps=4", "reference_prior.train.steps=5",
         "reference_prior.n_color=4", "reference_prior.n_normal=4", "init.sdf_fit_steps=30",
         "init.sdf_fit_points=1024", "init.albedo_fit_steps=20", "geometry.grid_resolution=12",
         "render.turntable_views=4", "render.turntable_resolution=32", "checkpoint_every=3"]


@pytest.fixture
def toy(monkeypatch):
    from tsjax.theme import pipeline, priors
    monkeypatch.setattr(priors, "load_base", toy_bundle)
    monkeypatch.setattr(pipeline, "_lora_parts", toy_lora_parts)


def _run(out, extra=(), steps=6):
    from tsjax.optimize import main
    args = ["--out", str(out), "--steps", str(steps), "--no-progress", "--exemplars", "builtin:toy-houses"]
    for s in SMALL:
        args += ["--set", s]
    return main(args + list(extra))


def test_toy_pipeline_outputs_and_resume(tmp_path, toy):
    import trimesh
    out = tmp_path / "run"
    assert _run(out, ["--evaluate"]) == 0
    ev = json.loads((out / "evaluation" / "metrics.json").read_text())  # --evaluate: weight-free metrics
    row = ev["methods"]["run"]["assets"]["asset_0/model"]
    assert 0.0 < row["chamfer_to_exemplars"] < 1.0 and 0.0 <= row["novelty_iou"] <= 1.0
    assert isinstance(row["palette_distance"], float) and "not computed" in row["contextual_distance"]
    man = json.loads((out / "manifest.json").read_text())
    a = man["assets"][0]
    for k in ("glb", "obj", "turntable_color", "turntable_normal", "turntable_gif", "loss_curve", "concept",
              "init_png", "pseudo_views"):
        assert (out / a[k]).is_file(), k
    assert (out / "index.html").read_text().count("<img") >= 6
    g = trimesh.load(out / a["glb"], force="mesh")
    assert len(g.faces) == a["num_faces"] > 0
    recs = [json.loads(x) for x in (out / a["dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(6))
    assert a["stage2_steps"] == 6 and len(a["chamfer_to_exemplars"]) == man["num_exemplars"] == 4
    # resume after "stopping" at step 3: delete the final checkpoint (step 6) and the later metrics
    ck = out / a["dir"] / "ckpt"
    import shutil
    shutil.rmtree(ck / "6")
    def records():
        rs = [json.loads(x) for x in (out / a["dir"] / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rs]

    full = records()
    assert _run(out, ["--resume"]) == 0
    assert records() == full  # bit-identical continuation (same losses at steps 3..5)
