"""Radiance fields, volume rendering and progressive volume distillation (PVD).

* :mod:`lrjax.fields.fields` -- the field interface (:class:`Field`, :class:`FieldOutput`), MLP and dense
  grid fields; :mod:`lrjax.fields.tensorf` -- CP / VM (TensoRF) with its L1 / TV regularisers and
  resolution upsampling; :mod:`lrjax.fields.hashgrid` -- Instant-NGP; :mod:`lrjax.fields.plenoxels` -- SH grid.
* :mod:`lrjax.fields.render` -- rays, sampling, alpha compositing; :mod:`lrjax.fields.scenes` -- procedural
  scenes and ground-truth images; :mod:`lrjax.fields.metrics` -- PSNR / SSIM.
* :mod:`lrjax.fields.train` -- photometric training of a field on images (the "from scratch" baseline).
* :mod:`lrjax.fields.pvd` -- PVD / PVD-AL any-to-any distillation (Fang et al. 2023), by rays
  (:class:`PVD`) or by querying points of the teacher's occupied volume (:class:`PointDistill`, which
  also takes any callable teacher ``f(x, d) -> (sigma, rgb)``).
* :mod:`lrjax.fields.tracks` -- TracksTo4D (Kasten et al. 2024): 2-D point tracks to 3-D trajectories in a
  low-rank motion basis plus per-frame cameras (:class:`TracksTo4D`, :func:`tracks_losses`,
  :func:`synthetic_tracks`; geometry helpers in the submodule).
"""
from lrjax.fields.fields import (Field, FieldFeatures, FieldOutput, GridField, MLPField, check_compatible, count_params,
                             init_field, param_bytes, positional_encoding, sh_encoding)
from lrjax.fields.hashgrid import HashGridField
from lrjax.fields.metrics import psnr, ssim
from lrjax.fields.render import (Rays, RenderOutput, composite, look_at, near_far, pinhole_rays,
                             render_image, render_rays, stratified_samples)
from lrjax.fields.pvd import PVD, PointConfig, PointDistill, PointState, PVDConfig
from lrjax.fields.scenes import (Scene, SceneData, Shape, dataset_rays, default_scene, fibonacci_poses,
                             make_dataset, random_poses, random_scene, textured_scene)
from lrjax.fields.plenoxels import SHGridField
from lrjax.fields import tracks
from lrjax.fields.tracks import (SyntheticTracks, TracksOutput, TracksTo4D, reprojection_error, synthetic_tracks,
                                 tracks_losses)
from lrjax.fields.tensorf import (CPField, VMField, cp_dense, factor_list, l1_density, resolution_schedule, tv_loss, upsample,
                              vm_dense)

__all__ = ["Field", "FieldOutput", "FieldFeatures", "factor_list", "MLPField", "GridField", "CPField", "VMField", "HashGridField",
           "SHGridField", "cp_dense", "vm_dense", "l1_density", "tv_loss", "upsample", "resolution_schedule", "init_field", "count_params", "param_bytes", "check_compatible",
           "positional_encoding", "sh_encoding", "Rays", "RenderOutput", "composite", "look_at",
           "near_far", "pinhole_rays", "render_image", "render_rays", "stratified_samples", "Scene",
           "SceneData", "Shape", "dataset_rays", "default_scene", "fibonacci_poses", "make_dataset",
           "random_poses", "random_scene", "textured_scene", "psnr", "ssim", "PVD", "PVDConfig", "PointDistill",
           "PointConfig", "PointState", "tracks", "TracksTo4D", "TracksOutput", "SyntheticTracks",
           "synthetic_tracks", "tracks_losses", "reprojection_error"]
