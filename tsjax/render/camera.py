"""Cameras: look-at, projections, orbit parameterisation and sampling.

Conventions (docs/conventions.md):
  * World frame glTF: right-handed, +Y up.
  * ``c2w [..., 4, 4]`` camera-to-world, OpenGL camera frame: the camera looks down its -Z axis,
    +Y is up and +X right in the image.
  * Projections map camera space to OpenGL clip space; NDC x, y, z in [-1, 1] (z = -1 at near).
  * Orbit: elevation in degrees (> 0: camera above the XZ plane, looking down), azimuth in degrees
    (0: camera on +Z looking towards -Z; 90: camera on +X), distance from the origin.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = [
    "Cameras",
    "look_at",
    "perspective",
    "orthographic",
    "orbit_c2w",
    "make_cameras",
    "sample_orbit_cameras",
    "world_to_clip",
    "camera_condition",
]


class Cameras(NamedTuple):
    """A batch of B cameras (a pytree, so it passes through jit/vmap).

    Attributes:
      c2w:  [B, 4, 4] camera-to-world (OpenGL camera frame, -Z forward).
      proj: [B, 4, 4] camera -> clip projection.
    """

    c2w: Float[Array, "b 4 4"]
    proj: Float[Array, "b 4 4"]

    @property
    def mvp(self) -> Float[Array, "b 4 4"]:
        """World -> clip matrices ``proj @ inverse(c2w)``, [B, 4, 4]."""
        return self.proj @ jnp.linalg.inv(self.c2w)

    @property
    def position(self) -> Float[Array, "b 3"]:
        """Camera centres in world space, [B, 3]."""
        return self.c2w[..., :3, 3]

    def __len__(self) -> int:  # number of views
        return int(self.c2w.shape[0])


def _normalize(v: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), eps)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> Float[Array, "... 4 4"]:
    """Camera-to-world matrix of a camera at ``eye`` [..., 3] looking at ``target`` [..., 3].

    The camera's -Z axis points from eye to target; +Y is as close to ``up`` as possible. When the
    view direction is parallel to ``up`` (looking straight down/up) a fallback up axis (+Z) is used, so
    the result is always a proper rotation.
    """
    eye = jnp.asarray(eye, jnp.float32)
    target = jnp.broadcast_to(jnp.asarray(target, jnp.float32), eye.shape)
    up = jnp.broadcast_to(jnp.asarray(up, jnp.float32), eye.shape)
    fwd = _normalize(target - eye)  # camera -Z in world
    right = jnp.cross(fwd, up)
    alt = jnp.cross(fwd, jnp.broadcast_to(jnp.asarray([0.0, 0.0, 1.0], jnp.float32), eye.shape))
    degenerate = jnp.linalg.norm(right, axis=-1, keepdims=True) < 1e-6
    right = _normalize(jnp.where(degenerate, alt, right))
    cam_up = jnp.cross(right, fwd)
    rot = jnp.stack([right, cam_up, -fwd], axis=-1)  # columns: camera x, y, z axes in world
    top = jnp.concatenate([rot, eye[..., :, None]], axis=-1)
    bottom = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.0, 1.0], jnp.float32), eye.shape[:-1] + (1, 4))
    return jnp.concatenate([top, bottom], axis=-2)


def perspective(fovy_deg, aspect=1.0, near=0.01, far=100.0) -> Float[Array, "... 4 4"]:
    """OpenGL perspective projection [..., 4, 4] (vertical field of view in degrees, aspect = W/H)."""
    fovy = jnp.deg2rad(jnp.asarray(fovy_deg, jnp.float32))
    f = 1.0 / jnp.tan(fovy / 2.0)
    aspect = jnp.broadcast_to(jnp.asarray(aspect, jnp.float32), f.shape)
    z = jnp.zeros_like(f)
    o = jnp.ones_like(f)
    a = (far + near) / (near - far) * o
    b = 2.0 * far * near / (near - far) * o
    rows = [
        jnp.stack([f / aspect, z, z, z], -1),
        jnp.stack([z, f, z, z], -1),
        jnp.stack([z, z, a, b], -1),
        jnp.stack([z, z, -o, z], -1),
    ]
    return jnp.stack(rows, -2)


def orthographic(half_height, aspect=1.0, near=0.01, far=100.0) -> Float[Array, "... 4 4"]:
    """OpenGL orthographic projection [..., 4, 4] of a view volume ``2*half_height`` tall."""
    h = jnp.asarray(half_height, jnp.float32)
    w = h * jnp.asarray(aspect, jnp.float32)
    z = jnp.zeros_like(h)
    o = jnp.ones_like(h)
    rows = [
        jnp.stack([1.0 / w, z, z, z], -1),
        jnp.stack([z, 1.0 / h, z, z], -1),
        jnp.stack([z, z, -2.0 / (far - near) * o, -(far + near) / (far - near) * o], -1),
        jnp.stack([z, z, z, o], -1),
    ]
    return jnp.stack(rows, -2)


def orbit_c2w(elevation_deg, azimuth_deg, distance) -> Float[Array, "... 4 4"]:
    """Camera-to-world of a camera on a sphere around the origin, looking at the origin.

    azimuth 0 puts the camera on +Z, 90 on +X; elevation > 0 lifts it above the XZ plane.
    Arguments broadcast together; returns [..., 4, 4].
    """
    el = jnp.deg2rad(jnp.asarray(elevation_deg, jnp.float32))
    az = jnp.deg2rad(jnp.asarray(azimuth_deg, jnp.float32))
    d = jnp.asarray(distance, jnp.float32)
    el, az, d = jnp.broadcast_arrays(el, az, d)
    eye = jnp.stack([d * jnp.cos(el) * jnp.sin(az), d * jnp.sin(el), d * jnp.cos(el) * jnp.cos(az)], -1)
    return look_at(eye)


def make_cameras(elevation, azimuth, distance, fovy=None, *, ortho_half_height=None, aspect=1.0,
                 near=0.01, far=100.0) -> Cameras:
    """Orbit cameras from per-view parameters (scalars or [B] arrays, broadcast to [B]).

    Exactly one of ``fovy`` (degrees, perspective) or ``ortho_half_height`` (orthographic) is given.
    """
    if (fovy is None) == (ortho_half_height is None):
        raise ValueError("make_cameras: give exactly one of fovy (perspective) or ortho_half_height (orthographic)")
    el, az, d = (jnp.atleast_1d(jnp.asarray(x, jnp.float32)) for x in (elevation, azimuth, distance))
    el, az, d = jnp.broadcast_arrays(el, az, d)
    c2w = orbit_c2w(el, az, d)
    if fovy is not None:
        proj = perspective(jnp.broadcast_to(jnp.asarray(fovy, jnp.float32), el.shape), aspect, near, far)
    else:
        proj = orthographic(jnp.broadcast_to(jnp.asarray(ortho_half_height, jnp.float32), el.shape),
                            aspect, near, far)
    return Cameras(c2w=c2w, proj=proj)


def sample_orbit_cameras(key, n: int, *, elevation=(-5.0, 30.0), azimuth=(-180.0, 180.0),
                         distance=(1.4, 1.8), fovy=(70.0, 80.0), aspect=1.0, near=0.01,
                         far=100.0) -> tuple[Cameras, dict]:
    """Sample ``n`` perspective orbit cameras uniformly in the given ranges (defaults: method notes).

    Returns ``(Cameras, params)`` where params holds [n] arrays ``elevation, azimuth, distance, fovy``.
    Jittable (``n`` static).
    """
    ks = jax.random.split(key, 4)

    def u(k, rng):
        lo, hi = rng
        return jax.random.uniform(k, (n,), jnp.float32, lo, hi)

    params = {"elevation": u(ks[0], elevation), "azimuth": u(ks[1], azimuth),
              "distance": u(ks[2], distance), "fovy": u(ks[3], fovy)}
    cams = make_cameras(params["elevation"], params["azimuth"], params["distance"], params["fovy"],
                        aspect=aspect, near=near, far=far)
    return cams, params


def world_to_clip(verts, cams: Cameras) -> Float[Array, "b v 4"]:
    """Project world points [V, 3] (shared) or [B, V, 3] (per view) to clip space [B, V, 4]."""
    verts = jnp.asarray(verts, jnp.float32)
    hom = jnp.concatenate([verts, jnp.ones(verts.shape[:-1] + (1,), verts.dtype)], -1)
    mvp = cams.mvp
    if hom.ndim == 2:
        return jnp.einsum("bij,vj->bvi", mvp, hom)
    return jnp.einsum("bij,bvj->bvi", mvp, hom)


def camera_condition(cams: Cameras) -> Float[Array, "b 16"]:
    """Diffusion camera condition: the flattened (row-major) camera-to-world matrix, [B, 16]."""
    return cams.c2w.reshape(cams.c2w.shape[0], 16)


def view_direction_names(elevation, azimuth, *, overhead_threshold: float = 60.0) -> list[str]:
    """View-dependent prompt suffix names ("front", "side", "back", "overhead") per camera.

    front: |azimuth| <= 45; back: |azimuth| >= 135; side otherwise; overhead when elevation exceeds
    ``overhead_threshold`` degrees. Host-side helper (numpy), used to build prompts.
    """
    el = np.asarray(elevation, np.float32).reshape(-1)
    az = (np.asarray(azimuth, np.float32).reshape(-1) + 180.0) % 360.0 - 180.0
    out = []
    for e, a in zip(el, az):
        if e > overhead_threshold:
            out.append("overhead")
        elif abs(a) <= 45.0:
            out.append("front")
        elif abs(a) >= 135.0:
            out.append("back")
        else:
            out.append("side")
    return out
