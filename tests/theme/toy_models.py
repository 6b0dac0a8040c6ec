"""Toy networks with the interfaces of the real priors, shared by the stage-2 and pipeline tests.

Not a test module (no ``test_`` prefix). Tests in this folder import it as ``toy_models``: pytest puts
the folder of a rootdir-less test file on ``sys.path``, and scripts run as ``python tests/theme/x.py``
get it as ``sys.path[0]``.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp


class ToyUNet(nn.Module):
    """``(x [B,h,w,4], t [B], ctx [B,L,D], camera [B,16] | None) -> [B,h,w,4]``: one conv, text/time/camera
    embeddings added, one conv; the camera projection is the param subtree ``camera_embed``."""

    @nn.compact
    def __call__(self, x, t, ctx, camera=None):
        h = nn.Conv(8, (3, 3))(x)
        h = h + nn.Dense(8)(jnp.mean(ctx, 1))[:, None, None, :] + nn.Dense(8)(
            jnp.sin(t[:, None] / 100.0 * jnp.arange(1, 5)))[:, None, None, :]
        if camera is not None:
            h = h + nn.Dense(8, name="camera_embed")(camera)[:, None, None, :]
        return nn.Conv(4, (3, 3))(jax.nn.silu(h))


class ToyVAEEnc(nn.Module):
    """``x [B,H,W,3] -> (mean, logvar)`` latents ``[B,H/4,W/4,4]`` (4x average pool + 1x1 conv)."""

    @nn.compact
    def __call__(self, x):
        h = nn.avg_pool(x, (4, 4), (4, 4))
        return nn.Conv(4, (1, 1))(h), jnp.zeros(h.shape[:-1] + (4,))


def toy_lora_apply(unet_apply):
    """A "LoRA" for a :class:`ToyUNet`: ``p = {"base": unet params, "train": {"camera_embed", "delta"}}``,
    the trainable camera embedding replaces the base's and ``delta`` is added to the output."""

    def apply(p, x, t, ctx, camera):
        base = dict(p["base"], camera_embed=p["train"]["camera_embed"])
        return unet_apply(base, x, t, ctx, camera) + p["train"]["delta"]

    return apply
