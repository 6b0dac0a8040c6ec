"""tsjax.render: cameras (``camera``), shading helpers (``shading``), mesh rendering (``mesh_render``)
and the ``python -m tsjax.render`` exemplar-render CLI (``__main__``)."""
from tsjax.render.camera import Cameras, make_cameras, sample_orbit_cameras, world_to_clip
from tsjax.render.mesh_render import render_mesh

__all__ = ["Cameras", "make_cameras", "sample_orbit_cameras", "world_to_clip", "render_mesh"]
