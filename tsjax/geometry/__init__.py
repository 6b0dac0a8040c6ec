"""tsjax.geometry: tet grids, static-shape marching tetrahedra, hash-grid SDF/material fields (DMTet),
regularisers and rendering of the extracted surface."""
from tsjax.geometry.dmtet import (DMTetConfig, DMTetModel, albedo, extract, fit_sdf, init, mesh_sdf,
                                  sdf_and_deform, sphere_sdf, winding_number)
from tsjax.geometry.hashgrid import HashGridConfig, encode, init_hashgrid, progressive_mask
from tsjax.geometry.marching import TriMesh, compact_mesh, marching_tets
from tsjax.geometry.regularizers import (laplacian_smoothness, mask_sparsity, normal_consistency,
                                         opacity_entropy, sdf_sign_change, total_variation)
from tsjax.geometry.render import render, render_trimesh
from tsjax.geometry.tets import TetGrid, build_tet_grid, tet_grid

__all__ = ["TetGrid", "build_tet_grid", "tet_grid", "TriMesh", "marching_tets", "compact_mesh",
           "HashGridConfig", "encode", "init_hashgrid", "progressive_mask", "DMTetConfig", "DMTetModel",
           "init", "sdf_and_deform", "extract", "albedo", "fit_sdf", "sphere_sdf", "mesh_sdf",
           "winding_number", "render", "render_trimesh", "sdf_sign_change", "normal_consistency",
           "laplacian_smoothness", "mask_sparsity", "opacity_entropy", "total_variation"]
