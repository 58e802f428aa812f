"""Fields, volume rendering, progressive volume distillation and separable neural architectures.

* :mod:`lrjax.nn.fields` -- the field interface (:class:`Field`, :class:`FieldOutput`), MLP and dense
  grid fields; :mod:`lrjax.nn.tensorf` -- CP / VM (TensoRF) with its L1 / TV regularisers and
  resolution upsampling; :mod:`lrjax.nn.hashgrid` -- Instant-NGP; :mod:`lrjax.nn.plenoxels` -- SH grid.
* :mod:`lrjax.nn.render` -- rays, sampling, alpha compositing; :mod:`lrjax.nn.scenes` -- procedural
  scenes and ground-truth images; :mod:`lrjax.nn.metrics` -- PSNR / SSIM.
* :mod:`lrjax.nn.train` -- photometric training of a field on images (the "from scratch" baseline).
* :mod:`lrjax.nn.pvd` -- PVD / PVD-AL any-to-any distillation (Fang et al. 2023).
* :mod:`lrjax.nn.sna` -- separable neural architectures (additive / quadratic / CP, bounded order).
"""
from lrjax.nn.fields import (Field, FieldOutput, GridField, MLPField, check_compatible, count_params,
                             init_field, param_bytes, positional_encoding, sh_encoding)
from lrjax.nn.hashgrid import HashGridField
from lrjax.nn.metrics import psnr, ssim
from lrjax.nn.render import (Rays, RenderOutput, composite, look_at, near_far, pinhole_rays,
                             render_image, render_rays, stratified_samples)
from lrjax.nn.scenes import (Scene, SceneData, Shape, dataset_rays, default_scene, fibonacci_poses,
                             make_dataset, random_poses, random_scene)
from lrjax.nn.plenoxels import SHGridField
from lrjax.nn.tensorf import (CPField, VMField, cp_dense, l1_density, resolution_schedule, tv_loss, upsample,
                              vm_dense)

__all__ = ["Field", "FieldOutput", "MLPField", "GridField", "CPField", "VMField", "HashGridField",
           "SHGridField", "cp_dense", "vm_dense", "l1_density", "tv_loss", "upsample", "resolution_schedule", "init_field", "count_params", "param_bytes", "check_compatible",
           "positional_encoding", "sh_encoding", "Rays", "RenderOutput", "composite", "look_at",
           "near_far", "pinhole_rays", "render_image", "render_rays", "stratified_samples", "Scene",
           "SceneData", "Shape", "dataset_rays", "default_scene", "fibonacci_poses", "make_dataset",
           "random_poses", "random_scene", "psnr", "ssim"]
