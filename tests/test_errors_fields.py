"""Issue 10 sweep: every public function/class of lrjax.fields (all submodules), lrjax.nn.sna,
lrjax.models and lrjax.benchmark refuses each kind of bad input with lrjax's own error.

Each public callable has a *spec*: a valid call (its arguments by name) and, per argument, the bad
KINDS that apply to it (wrong kind, None, bool for a number, float for an int, NaN, Inf, out of
range, list for an array, wrong trailing size, wrong rank, integer array for a float array...).
Every (callable, argument, kind) is one test case that asserts the exception TYPE and that the
message names the argument. ``test_every_public_callable_has_a_spec`` fails when a public callable
is added without a spec, so one missed function fails CI. Degenerate-but-valid inputs (all-zero
density, empty ray batches, identical images) and the direction-length invariance of the renderer
are tested at the end.
"""
from __future__ import annotations

import collections
import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lrjax.benchmark as BM
import lrjax.fields as LF
import lrjax.fields.fields as FF
import lrjax.fields.hashgrid as HG
import lrjax.fields.metrics as ME
import lrjax.fields.plenoxels as PL
import lrjax.fields.pvd as PV
import lrjax.fields.render as RE
import lrjax.fields.scenes as SC
import lrjax.fields.tensorf as TF
import lrjax.fields.tracks as TK
import lrjax.fields.train as TR
import lrjax.models as MO
import lrjax.nn.sna as SN

MODULES = {"fields": [LF, FF, TF, HG, PL, RE, SC, ME, TR, PV, TK], "sna": [SN], "models": [MO], "benchmark": [BM]}
# NamedTuple containers and constants: no arguments to validate.
EXEMPT = {"FieldOutput", "Rays", "RenderOutput", "SceneData", "LoopResult", "ALState", "PVDState",
          "TracksOutput", "SyntheticTracks", "tracks", "FieldFeatures", "PointState",
          "MAT_MODE", "VEC_MODE", "PRIMES", "KINDS", "ADAPTER_TARGETS",
          # no arguments at all
          "default_scene", "usable_cpus", "device_info"}


# ----------------------------------------------------------------------------- tiny valid inputs
KEY = jax.random.key(0)
GRID = LF.GridField(resolution=3, geo_dim=3, color_hidden=4)
GRID_P = LF.init_field(GRID, KEY)
CP = LF.CPField(resolution=3, rank_sigma=1, rank_app=2, geo_dim=3, color_hidden=4)
CP_P = LF.init_field(CP, KEY)
VM = LF.VMField(resolution=3, rank_sigma=1, rank_app=2, geo_dim=3, color_hidden=4)
VM_P = LF.init_field(VM, KEY)
SHG = LF.SHGridField(resolution=3, sh_degree=2)
SHG_P = LF.init_field(SHG, KEY)
SNA_M = SN.SNA(in_dim=2, rank=2, num_basis=4)
SNA_P = SNA_M.init(KEY, jnp.zeros((2,)))
SNA_XS = jnp.linspace(0.0, 1.0, 16).reshape(8, 2)
SNA_YS = SNA_XS[:, :1] * SNA_XS[:, 1:]
X = jnp.array([[0.1, -0.2, 0.3], [0.0, 0.5, -0.5]])
D = jnp.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
POSE = LF.look_at((3.0, 0.2, 0.1))
RAYS = LF.pinhole_rays(POSE, 2, 2, 2.0)
NEAR, FAR = jnp.array([1.0, 1.5]), jnp.array([2.0, 2.5])
SIG, RGB, DEL, Z = jnp.ones((2, 3)), jnp.full((2, 3, 3), 0.5), jnp.full((2, 3), 0.1), jnp.ones((2, 3))
IMG = jnp.full((11, 11, 3), 0.5)
DATA = LF.SceneData(np.full((1, 2, 2, 3), 0.5, np.float32), np.asarray(POSE)[None], np.full((1, 2, 2, 3), 0.5, np.float32),
                    np.asarray(POSE)[None], 2, 2, 2.0, 1.0)
OPT = optax.sgd(1e-2)
FIELD_FN = lambda x, d: GRID.apply(GRID_P, x, d)  # noqa: E731
LAYOUT = HG.level_layout(2, 2, 4, 6)
TABLES = [jnp.zeros((rows, 2)) for (_, _, rows, _) in LAYOUT]
TM = MO.CharTransformer(7, d_model=4, n_layers=1, n_heads=2, d_ff=8, max_len=4, rngs=nnx.Rngs(0))
PVD_KW = dict(teacher=GRID, teacher_params=GRID_P, student=CP, optimizer=OPT, poses=np.asarray(POSE)[None],
              height=2, width=2, focal=2.0)
PVD_OBJ = PV.PVD(**PVD_KW, config=PV.PVDConfig(batch_rays=2, n_samples=2))
PVD_STATE = PVD_OBJ.init(KEY)
PT_CFG = PV.PointConfig(batch_points=8, occupancy_res=4, occupancy_samples=1, pool_size=16, min_pool=4)
PT_OBJ = PV.PointDistill(GRID, CP, OPT, teacher_params=GRID_P, config=PT_CFG)
PT_STATE = PT_OBJ.init(KEY)
# built by two compiled programs instead of eagerly (op by op, ~8 s of small compiles at collection)
TK_SCENE = jax.jit(TK.synthetic_tracks, static_argnums=(1, 2), static_argnames=("n_bases",))(KEY, 4, 6, n_bases=1)
TK_TRACKS = TK_SCENE.tracks
TK_OUT = nnx.jit(lambda t: TK.TracksTo4D(1, width=8, depth=1, heads=2, n_freqs=1, rngs=nnx.Rngs(0))(t))(TK_TRACKS)


class A:
    """One argument of a spec: its valid value, the bad kinds to try, and the name the error must
    mention (default: the argument's name)."""

    def __init__(self, good, kinds=(), match=None, extra=()):
        self.good, self.kinds, self.match, self.extra = good, tuple(kinds.split()) if isinstance(kinds, str) else kinds, match, extra


NUM_POS = "str none bool nan inf neg zero"          # a finite number > 0
NUM_NONNEG = "str none bool nan inf neg"            # a finite number >= 0
NUM_ANY = "str none bool nan inf"                   # any finite number
INT_POS = "str none bool float neg zero"            # an int >= 1
INT_NONNEG = "str none bool float neg"              # an int >= 0
BOOL = "str none int1"                              # True or False
ENUM = "enum enumtype"                              # one of some names
ARR = "str none list nan inf"                       # a floating array (finite)
ARR3 = ARR + " trail"                               # ... with a trailing axis of 3
VEC3 = "str none nan trail"                         # a 3-vector (lists accepted)
FIELD = "str none"                                  # an lrjax Field / object of a class
CALL = "str none int1"                              # a callable
PARAMS = "str none wrongtree"                       # a params tree of this module
KEYK = "str int1"                                   # a PRNG key


def S(_fn, /, **args):
    return _fn, args


SPECS = {
    # ---------------------------------------------------------------- fields.fields
    "GridField": S(lambda **k: LF.GridField(**k), resolution=A(3, INT_POS + " one"), init_scale=A(0.1, NUM_POS),
                   bound=A(1.0, NUM_POS), geo_dim=A(3, INT_POS), view_dependent=A(False, BOOL),
                   sh_degree=A(2, INT_POS + " big"), color_hidden=A(4, INT_POS), color_layers=A(1, INT_NONNEG),
                   density_clip=A((-10.0, 7.0), "str none", extra=[((5.0, 1.0), ValueError), ((0.0, math.nan), ValueError)]),
                   density_shift=A(0.0, NUM_ANY), density_scale=A(10.0, NUM_POS)),
    "MLPField": S(lambda **k: LF.MLPField(**k), n_freqs=A(2, INT_NONNEG + " big"), width=A(4, INT_POS),
                  depth=A(2, INT_POS), skip=A(1, "str bool float", extra=[(5, ValueError)])),
    "CPField": S(lambda **k: LF.CPField(**k), resolution=A(3, INT_POS + " one"), rank_sigma=A(1, INT_POS),
                 rank_app=A(2, INT_POS), init_scale=A(0.2, NUM_POS)),
    "VMField": S(lambda **k: LF.VMField(**k), resolution=A(3, INT_POS + " one"), rank_sigma=A(1, INT_POS),
                 rank_app=A(2, INT_POS), init_scale=A(0.1, NUM_POS)),
    "HashGridField": S(lambda **k: LF.HashGridField(**k), levels=A(2, INT_POS), features_per_level=A(2, INT_POS),
                       log2_table_size=A(6, INT_POS + " big"), min_res=A(2, INT_POS + " one"),
                       max_res=A(4, INT_POS + " one"), hidden=A(4, INT_POS), mlp_layers=A(1, INT_NONNEG)),
    "SHGridField": S(lambda **k: LF.SHGridField(**k), sh_degree=A(2, INT_POS + " big"), color_scale=A(10.0, NUM_POS),
                     view_dependent=A(True, BOOL, extra=[(False, ValueError)])),
    "Field": S(lambda **k: LF.Field(**k), bound=A(1.0, NUM_POS), geo_dim=A(3, INT_POS)),
    "Field.apply": S(lambda params, x, d: GRID.apply(params, x, d), params=A(GRID_P, PARAMS),
                     x=A(X, ARR3 + " int", extra=[(jnp.array([[0.0, 2.0, 0.0]]), ValueError)]), d=A(None)),
    "SHGridField.apply": S(lambda params, x, d: SHG.apply(params, x, d), params=A(SHG_P, PARAMS), x=A(X),
                           d=A(D, "str list trail", extra=[(jnp.zeros((2, 3)), ValueError)])),
    "positional_encoding": S(LF.positional_encoding, u=A(X, ARR3 + " int"), n_freqs=A(2, INT_NONNEG + " big"),
                             include_input=A(True, BOOL)),
    "sh_encoding": S(LF.sh_encoding, d=A(D, ARR3 + " int", extra=[(jnp.zeros((1, 3)), ValueError)]),
                     degree=A(2, INT_POS + " big")),
    "interp_line": S(FF.interp_line, line=A(jnp.ones((2, 3)), "str none list rank int"), t=A(jnp.zeros(4), ARR)),
    "interp_plane": S(FF.interp_plane, plane=A(jnp.ones((2, 3, 3)), "str none list rank int"),
                      a=A(jnp.zeros(4), ARR), b=A(jnp.zeros(4), ARR, extra=[(jnp.zeros(5), ValueError)])),
    "interp_grid": S(FF.interp_grid, grid=A(jnp.ones((3, 3, 3, 2)), "str none list rank int"), u=A(X, ARR3)),
    "init_field": S(LF.init_field, field=A(GRID, FIELD), key=A(KEY, KEYK), num=A(None, "str bool float", extra=[(-1, ValueError), (0, ValueError)])),
    "count_params": S(LF.count_params, params=A(GRID_P, "str none", extra=[({"params": [1, 2]}, TypeError)])),
    "param_bytes": S(LF.param_bytes, params=A(GRID_P, "str none", extra=[({"params": {"a": "x"}}, TypeError)])),
    "check_compatible": S(LF.check_compatible, teacher=A(GRID, FIELD), student=A(CP, FIELD,
                          extra=[(LF.CPField(geo_dim=5), ValueError), (LF.CPField(bound=2.0), ValueError)])),
    # ---------------------------------------------------------------- tensorf
    "cp_dense": S(TF.cp_dense, field=A(CP, FIELD, extra=[(VM, TypeError)]), params=A(CP_P, PARAMS)),
    "factor_list": S(TF.factor_list, field=A(VM, FIELD, extra=[(GRID, TypeError)]), params=A(VM_P, PARAMS)),
    "vm_dense": S(TF.vm_dense, field=A(VM, FIELD, extra=[(CP, TypeError)]), params=A(VM_P, PARAMS)),
    "l1_density": S(TF.l1_density, field=A(CP, FIELD, extra=[(GRID, TypeError)]), params=A(CP_P, PARAMS)),
    "total_variation": S(TF.total_variation, x=A(jnp.ones((3, 3)), "str none list int"),
                         axes=A((0, 1), "str none", extra=[((0, 5), ValueError), ((0, 0), ValueError), ((), TypeError)])),
    "tv_loss": S(TF.tv_loss, field=A(VM, FIELD), params=A(VM_P, PARAMS), part=A("sigma", ENUM)),
    "upsample": S(TF.upsample, field=A(CP, FIELD, extra=[(LF.MLPField(), TypeError)]), params=A(CP_P, PARAMS),
                  new_res=A(5, INT_POS + " one", extra=[(2, ValueError)])),
    "resolution_schedule": S(TF.resolution_schedule, start=A(4, INT_POS + " one"), final=A(8, INT_POS + " one"),
                             num_upsamples=A(2, INT_POS)),
    # ---------------------------------------------------------------- hashgrid
    "fast_hash": S(HG.fast_hash, ijk=A(jnp.ones((2, 3), jnp.int32), "str none list trail float",
                                       extra=[(-jnp.ones((2, 3), jnp.int32), ValueError)])),
    "level_layout": S(HG.level_layout, levels=A(2, INT_POS), min_res=A(2, INT_POS + " one"),
                      max_res=A(4, INT_POS + " one"), log2_table_size=A(6, INT_POS + " big")),
    "hash_encode": S(HG.hash_encode, tables=A(TABLES, "str none", extra=[(TABLES[:1], TypeError)]), u=A(X, ARR3),
                     layout=A(LAYOUT, "str none")),
    # ---------------------------------------------------------------- render
    "look_at": S(LF.look_at, eye=A((3.0, 0.0, 0.5), VEC3, extra=[((0.0, 0.0, 0.0), ValueError)]),
                 target=A((0.0, 0.0, 0.0), VEC3), up=A((0.0, 0.0, 1.0), VEC3,
                 extra=[((-3.0, 0.0, -0.5), ValueError), ((0.0, 0.0, 0.0), ValueError)])),
    "pinhole_rays": S(LF.pinhole_rays, c2w=A(POSE, "str none nan rank", extra=[(jnp.zeros((4, 4)), ValueError)]),
                      height=A(2, INT_POS), width=A(2, INT_POS), focal=A(2.0, NUM_POS)),
    "near_far": S(LF.near_far, rays=A(RAYS, "str none", extra=[(LF.Rays(RAYS.origins.at[0, 0].set(np.nan), RAYS.directions), ValueError),
                                                        (LF.Rays(RAYS.origins[:, :2], RAYS.directions[:, :2]), ValueError)]),
                  bound=A(1.0, NUM_POS), min_near=A(0.0, NUM_NONNEG)),
    "stratified_samples": S(LF.stratified_samples, key=A(KEY, "str int1"), near=A(NEAR, ARR + " rank int"),
                            far=A(FAR, ARR + " rank int", extra=[(jnp.array([0.5, 2.5]), ValueError)]),
                            n_samples=A(3, INT_POS), perturb=A(True, BOOL)),
    "composite": S(LF.composite, sigma=A(SIG, ARR + " neg rank int", extra=[(jnp.ones((2, 0)), ValueError)]),
                   rgb=A(RGB, ARR3 + " rank"), delta=A(DEL, ARR + " neg rank"), z=A(Z, "str list nan rank"),
                   bg=A(1.0, "str bool nan", extra=[(jnp.ones(4), ValueError)]),
                   far=A(None, "str", extra=[([2.0, 2.0], TypeError), (jnp.array([np.nan, 1.0]), ValueError),
                                             (jnp.ones(3), ValueError)])),
    "render_rays": S(LF.render_rays, apply_fn=A(FIELD_FN, CALL), rays=A(RAYS, "str none",
                     extra=[(LF.Rays(RAYS.origins, RAYS.directions * 0), ValueError),
                            (LF.Rays(RAYS.origins.at[0, 0].set(np.inf), RAYS.directions), ValueError)]),
                     bound=A(1.0, NUM_POS), n_samples=A(3, INT_POS), key=A(KEY, KEYK), perturb=A(True, BOOL),
                     bg=A(1.0, "str bool nan"), min_near=A(0.0, NUM_NONNEG), z_delta=A(None, "str")),
    "render_image": S(LF.render_image, apply_fn=A(FIELD_FN, CALL), c2w=A(POSE, "str none nan rank"),
                      height=A(2, INT_POS), width=A(2, INT_POS), focal=A(2.0, NUM_POS), bound=A(1.0, NUM_POS),
                      n_samples=A(2, INT_POS), chunk=A(4, INT_POS)),
    # ---------------------------------------------------------------- scenes
    "Shape": S(lambda **k: LF.Shape(**k), kind=A("sphere", ENUM), center=A((0.0, 0.0, 0.0), "str none",
               extra=[((0.0, 0.0), TypeError), ((0.0, math.nan, 0.0), ValueError)]), size=A(0.3, NUM_POS),
               albedo=A((0.5, 0.5, 0.5), "str none", extra=[((0.5, 2.0, 0.5), ValueError)])),
    "Scene": S(lambda **k: LF.Scene(**k), shapes=A((LF.Shape("sphere", (0, 0, 0), 0.3, (1, 1, 1)),), "str none",
               extra=[((), ValueError), ((1, 2), TypeError)]), peak=A(50.0, NUM_POS), sharpness=A(0.02, NUM_POS),
               light=A((0.0, 0.0, 1.0), "str none", extra=[((0.0, 0.0, 0.0), ValueError)]),
               ambient=A(0.3, NUM_NONNEG + " big"), bound=A(1.0, NUM_POS), geo_dim=A(3, INT_NONNEG)),
    "Scene.__call__": S(lambda x: LF.default_scene()(x), x=A(X, ARR3)),
    "random_scene": S(LF.random_scene, seed=A(0, INT_NONNEG), n_shapes=A(2, INT_POS)),
    "fibonacci_poses": S(LF.fibonacci_poses, n=A(2, INT_POS), radius=A(3.0, NUM_POS),
                         min_elev_deg=A(5.0, NUM_ANY + " big"), max_elev_deg=A(75.0, NUM_ANY + " big",
                         extra=[(1.0, ValueError)])),
    "random_poses": S(LF.random_poses, seed=A(0, INT_NONNEG), n=A(2, INT_POS), radius=A(3.0, NUM_POS),
                      min_elev_deg=A(5.0, NUM_ANY + " big"), max_elev_deg=A(75.0, NUM_ANY + " big")),
    "make_dataset": S(LF.make_dataset, scene=A(None, "str"), n_train=A(1, INT_POS), n_test=A(1, INT_POS),
                      height=A(2, INT_POS), width=A(2, INT_POS), fov_deg=A(40.0, NUM_POS + " big"),
                      radius=A(3.0, NUM_POS), gt_samples=A(4, INT_POS), test_seed=A(1, INT_NONNEG)),
    "dataset_rays": S(LF.dataset_rays, data=A(DATA, "str none"), test=A(False, BOOL)),
    # ---------------------------------------------------------------- metrics
    "mse": S(ME.mse, a=A(IMG, "str none list nan inf", extra=[(jnp.zeros((0,)), ValueError)]),
             b=A(IMG, "str none list nan", extra=[(jnp.zeros((11, 11, 2)), ValueError)])),
    "psnr": S(LF.psnr, a=A(IMG, "str none list nan inf"), b=A(IMG, "str none list nan",
              extra=[(jnp.zeros(3), ValueError)])),
    "ssim": S(LF.ssim, a=A(IMG, "str none list nan inf", extra=[(jnp.zeros((11, 11)), ValueError)]),
              b=A(IMG, "str none list nan"), window=A(11, INT_POS, extra=[(12, ValueError)]),
              sigma=A(1.5, NUM_POS), k1=A(0.01, NUM_POS), k2=A(0.03, NUM_POS)),
    # ---------------------------------------------------------------- train
    "make_optimizer": S(TR.make_optimizer, lr=A(1e-2, NUM_POS), steps=A(5, INT_POS),
                        final_ratio=A(0.1, NUM_POS + " big")),
    "default_lr": S(TR.default_lr, field=A(GRID, FIELD)),
    "make_photometric_step": S(TR.make_photometric_step, field=A(GRID, FIELD), optimizer=A(OPT, "str none"),
                               batch=A(4, INT_POS), n_samples=A(4, INT_POS), bg=A(1.0, "str bool nan"),
                               regularizer=A(None, "str int1")),
    "render_views": S(TR.render_views, apply_fn=A(FIELD_FN, CALL), poses=A(np.asarray(POSE)[None], "str none list nan rank",
                                                                     extra=[(np.zeros((1, 4, 4)), ValueError)]),
                      height=A(2, INT_POS), width=A(2, INT_POS), focal=A(2.0, NUM_POS), bound=A(1.0, NUM_POS),
                      n_samples=A(2, INT_POS)),
    "make_evaluator": S(TR.make_evaluator, field=A(GRID, FIELD), data=A(DATA, "str none"), n_samples=A(2, INT_POS),
                        with_ssim=A(False, BOOL)),
    "train_loop": S(TR.train_loop, step=A(lambda p, k: (p,), CALL), state=A((jnp.zeros(1),), "str none"),
                    steps=A(1, INT_POS), key=A(KEY, KEYK), evaluate=A(lambda p: {"psnr": 1.0}, CALL),
                    params_of=A(lambda s: s[0], CALL), eval_every=A(1, INT_POS), target_psnr=A(None, "str bool nan"),
                    progress=A(False, BOOL), desc=A("train", "none int1")),
    "photometric_state_step": S(TR.photometric_state_step, field=A(GRID, FIELD), optimizer=A(OPT, "str none"),
                                data=A(DATA, "str none")),
    # ---------------------------------------------------------------- pvd
    "ActiveConfig": S(lambda **k: PV.ActiveConfig(**k), ray_ratio=A(0.1, NUM_NONNEG + " big"),
                      pool_size=A(8, INT_POS), min_pool=A(4, INT_POS, extra=[(16, ValueError)]),
                      point_ratio=A(0.3, NUM_NONNEG + " big"), point_min_acc=A(0.5, NUM_NONNEG + " big"),
                      pose_ratio=A(0.1, NUM_NONNEG + " big"), pose_jitter=A(0.1, NUM_NONNEG + " big"),
                      pose_ema=A(0.9, NUM_NONNEG + " big")),
    "PVDConfig": S(lambda **k: PV.PVDConfig(**k), stage_steps=A((1, 2), "str none",
                   extra=[((2, 1), ValueError), ((1.5, 2), TypeError), ((1,), TypeError)]),
                   w_feature=A(0.1, NUM_NONNEG), feature_decay=A(0.995, NUM_POS + " big"), w_sigma=A(0.1, NUM_NONNEG),
                   w_color=A(0.1, NUM_NONNEG), w_rgb=A(1.0, NUM_NONNEG), loss=A("mse", ENUM), point_mask=A("all", ENUM),
                   weight_threshold=A(1e-4, NUM_NONNEG), density_floor=A(-4.0, NUM_ANY), density_mask=A("floor", ENUM),
                   density_space=A("log", ENUM), batch_rays=A(4, INT_POS), n_samples=A(4, INT_POS),
                   bg=A(1.0, NUM_NONNEG + " big"), inherit_head=A(True, BOOL), active=A(None, "str")),
    "PVD": S(lambda **k: PV.PVD(**k), teacher=A(GRID, FIELD), teacher_params=A(GRID_P, PARAMS),
             student=A(CP, FIELD, extra=[(LF.CPField(geo_dim=5), ValueError)]), optimizer=A(OPT, "str none"),
             poses=A(np.asarray(POSE)[None], "str none list nan", extra=[(np.zeros((0, 4, 4)), ValueError),
                                                                         (np.zeros((2, 4, 4)), ValueError)]),
             height=A(2, INT_POS), width=A(2, INT_POS), focal=A(2.0, NUM_POS), config=A(PV.PVDConfig(), "str none"),
             regularizer=A(None, "str int1")),
    "PointConfig": S(lambda **k: PV.PointConfig(**k), batch_points=A(8, INT_POS), occupied_ratio=A(0.75, "str none nan neg big"),
                     occupancy_res=A(4, INT_POS), occupancy_samples=A(1, INT_POS), occupancy_threshold=A(0.5, NUM_NONNEG),
                     w_feature=A(1.0, NUM_NONNEG), w_sigma=A(1.0, NUM_NONNEG), w_color=A(1.0, NUM_NONNEG),
                     density_floor=A(-4.0, NUM_ANY), active_ratio=A(0.0, "str none nan neg big"), pool_size=A(16, INT_POS),
                     min_pool=A(4, INT_POS, extra=[(32, ValueError)]), pool_jitter=A(0.5, NUM_NONNEG),
                     inherit_head=A(True, BOOL)),
    "PointDistill": S(lambda **k: PV.PointDistill(**k), teacher=A(GRID, "none int1"), student=A(CP, FIELD),
                      optimizer=A(OPT, "str none"), teacher_params=A(GRID_P, "str", extra=[(None, TypeError)]),
                      config=A(PT_CFG, "str none int1"), regularizer=A(None, "str int1")),
    "PointDistill.init": S(lambda key: PT_OBJ.init(key), key=A(KEY, KEYK)),
    "PointDistill.step": S(lambda state, key: PT_OBJ.step(state, key), state=A(PT_STATE, "str none", extra=[((1, 2), TypeError)]),
                           key=A(KEY, KEYK)),
    "PointDistill.sample_points": S(lambda key, num: PT_OBJ.sample_points(key, num=num), key=A(KEY, KEYK),
                                    num=A(4, "str bool float neg zero")),
    "PointDistill.point_error": S(lambda params, key, num: PT_OBJ.point_error(params, key, num), params=A(CP_P, PARAMS),
                                  key=A(KEY, KEYK), num=A(4, INT_POS)),
    "textured_scene": S(SC.textured_scene, texture_freq=A(3.0, NUM_NONNEG), texture_amp=A(0.7, NUM_NONNEG + " big")),
    "PVD.init": S(lambda key, student_params: PVD_OBJ.init(key, student_params), key=A(KEY, KEYK),
                  student_params=A(None, "str", extra=[(GRID_P, ValueError)])),
    "PVD.step": S(PVD_OBJ.step, state=A(PVD_STATE, "str none", extra=[((1, 2), TypeError)]), key=A(KEY, KEYK)),
    "PVD.compile": S(PVD_OBJ.compile, state=A(PVD_STATE, "str none"), key=A(KEY, KEYK)),
    "PVD.losses": S(PVD_OBJ.losses, params=A(CP_P), rays=A(RAYS), key=A(KEY), stage=A(1, INT_POS + " big"),
                    step=A(jnp.int32(0))),
    "inherit_head": S(PV.inherit_head, teacher_params=A(GRID_P, "str none"), student_params=A(CP_P, "str none")),
    "stage_of": S(PV.stage_of, step=A(0, INT_NONNEG), stage_steps=A((1, 2), "str none", extra=[((2, 1), ValueError)])),
    # ---------------------------------------------------------------- sna
    "SNA": S(lambda **k: SN.SNA(**k), in_dim=A(2, INT_POS), out_dim=A(1, INT_POS), rank=A(2, INT_POS),
             kind=A("cp", ENUM), order=A(None, "str bool float"), basis=A("bspline", ENUM), num_basis=A(4, INT_POS + " one"),
             init_scale=A(0.1, NUM_NONNEG), mode_mean=A(1.0, NUM_ANY), use_bias=A(True, BOOL)),
    "fit_als": S(SN.fit_als, model=A(SNA_M, "str none"), params=A(SNA_P, PARAMS),
                 xs=A(SNA_XS, "str none nan trail"),
                 ys=A(SNA_YS, "str none nan", extra=[(SNA_YS[:4], ValueError)]),
                 iters=A(2, INT_NONNEG), ridge=A(0.0, NUM_NONNEG)),
    "fit_adam": S(SN.fit_adam, model=A(SNA_M, "str none"), params=A(SNA_P, PARAMS), xs=A(SNA_XS, "str none nan trail"),
                  ys=A(SNA_YS, "str none nan", extra=[(SNA_YS[:4], ValueError)]), steps=A(2, INT_POS),
                  learning_rate=A(1e-2, NUM_POS)),
    "fit_rank_schedule": S(SN.fit_rank_schedule, model=A(SNA_M, "str none"), xs=A(SNA_XS, "str none nan trail"),
                           ys=A(SNA_YS, "str none nan"), ranks=A((1, 2), "str none", extra=[((), ValueError), ((2, 1), ValueError), ((0,), ValueError)]),
                           key=A(KEY, KEYK), method=A("als", ENUM), iters=A(2, INT_NONNEG), steps=A(2, INT_POS),
                           learning_rate=A(1e-2, NUM_POS), tol=A(0.0, NUM_NONNEG), ridge=A(0.0, NUM_NONNEG)),
    "grow_rank": S(SN.grow_rank, model=A(SNA_M, "str none"), params=A(SNA_P, PARAMS),
                   new_rank=A(3, INT_POS, extra=[(1, ValueError)]), key=A(KEY, KEYK)),
    "SNA.apply": S(lambda params, x: SNA_M.apply(params, x), params=A(SNA_P, PARAMS),
                   x=A(jnp.array([0.2, 0.4]), ARR + " trail int", extra=[(jnp.array([0.2, 1.5]), ValueError)])),
    "SNAField": S(lambda **k: SN.SNAField(**k), rank=A(2, INT_POS), num_basis=A(4, INT_POS + " one"),
                  kind=A("bounded", ENUM), order=A(3, "str bool float neg zero big")),
    "bspline_basis": S(SN.bspline_basis, x=A(jnp.array([0.1, 0.5]), ARR + " int"), num_basis=A(4, INT_POS + " one")),
    "spline_coefficients": S(SN.spline_coefficients, poly=A((1.0, 0.0, 0.5), "str none", extra=[((1.0, 2.0), TypeError)]),
                             num_basis=A(4, INT_POS + " one")),
    "elementary_symmetric": S(SN.elementary_symmetric, a=A(jnp.ones((3, 2)), "str none list", extra=[(jnp.ones(3), ValueError)]),
                              max_order=A(2, INT_POS)),
    # ---------------------------------------------------------------- models
    "CharTransformer": S(lambda **k: MO.CharTransformer(**k), vocab_size=A(7, INT_POS), d_model=A(4, INT_POS),
                         n_layers=A(1, INT_POS), n_heads=A(2, INT_POS, extra=[(3, ValueError)]), d_ff=A(8, INT_POS),
                         max_len=A(4, INT_POS), rngs=A(nnx.Rngs(0), "str none int1")),
    "CharTransformer.__call__": S(lambda ids: TM(ids), ids=A(jnp.zeros((1, 3), jnp.int32), "str none list float",
                                  extra=[(jnp.full((1, 3), 7), ValueError), (jnp.zeros((1, 5), jnp.int32), ValueError),
                                         (jnp.zeros((3,), jnp.int32), ValueError)])),
    "CausalSelfAttention": S(lambda **k: MO.CausalSelfAttention(**k), d_model=A(4, INT_POS, extra=[(5, ValueError)]),
                             n_heads=A(2, INT_POS), rngs=A(nnx.Rngs(0), "str none")),
    "MLP": S(lambda **k: MO.MLP(**k), d_model=A(4, INT_POS), d_ff=A(8, INT_POS), rngs=A(nnx.Rngs(0), "str none")),
    "Block": S(lambda **k: MO.Block(**k), d_model=A(4, INT_POS), n_heads=A(2, INT_POS), d_ff=A(8, INT_POS),
               rngs=A(nnx.Rngs(0), "str none")),
    "loss_fn": S(MO.loss_fn, logits=A(jnp.zeros((2, 3, 7)), "str none list nan int"),
                 targets=A(jnp.zeros((2, 3), jnp.int32), "str none list float", extra=[(jnp.full((2, 3), 9), ValueError),
                                                                                     (jnp.zeros((2,), jnp.int32), ValueError)]),
                 mask=A(None, "str", extra=[([[1, 1, 1], [1, 1, 1]], TypeError)] + [(jnp.ones((2, 4)), ValueError), (-jnp.ones((2, 3)), ValueError)])),
    "split": S(MO.split, model=A(TM, "str none int1")),
    "apply_fn": S(MO.apply_fn, graphdef=A(nnx.split(TM)[0], "str none int1")),
    # ---------------------------------------------------------------- fields.tracks (TracksTo4D)
    "TracksTo4D": S(lambda **k: TK.TracksTo4D(**k), n_bases=A(1, INT_NONNEG), width=A(8, INT_POS, extra=[(7, ValueError)]),
                    depth=A(1, INT_POS), heads=A(2, INT_POS), n_freqs=A(1, INT_NONNEG), init_depth=A(5.0, NUM_POS),
                    rngs=A(nnx.Rngs(0), "str none")),
    "check_tracks": S(TK.check_tracks, tracks=A(TK_TRACKS, "str none list nan int trail",
                                                extra=[(TK_TRACKS[0], ValueError), (TK_TRACKS[None, None], ValueError)])),
    "trajectories": S(TK.trajectories, bases=A(TK_OUT.bases, "str none list nan"),
                      coeffs=A(TK_OUT.coeffs, "str none list nan", extra=[(jnp.ones((4, 3)), ValueError)])),
    "trajectory_matrix": S(TK.trajectory_matrix, points=A(TK_SCENE.points, "str none list nan trail"), layout=A("frames", ENUM)),
    "rotation_6d": S(TK.rotation_6d, r6=A(jnp.ones((2, 6)) + jnp.eye(2, 6), "str none list nan trail")),
    "world_to_camera": S(TK.world_to_camera, points=A(TK_SCENE.points, "str none nan trail"),
                         rotations=A(TK_SCENE.rotations, "str none nan"), translations=A(TK_SCENE.translations, "str none nan trail")),
    "project": S(TK.project, points_cam=A(TK_SCENE.points + 5.0, "str none list nan trail"),
                 intrinsics=A(None, "str", extra=[((1.0, 1.0, 0.0), ValueError), ((0.0, 1.0, 0.0, 0.0), ValueError)]),
                 min_depth=A(1e-4, NUM_POS)),
    "predict_tracks": S(TK.predict_tracks, out=A(TK_OUT, "str none"), min_depth=A(1e-4, NUM_POS)),
    "tracks_losses": S(TK.tracks_losses, out=A(TK_OUT, "str none"), tracks=A(TK_TRACKS, "str none nan int rank trail"),
                       w_reproj=A(50.0, NUM_NONNEG), w_static=A(1.0, NUM_NONNEG), w_sparse=A(1e-3, NUM_NONNEG),
                       w_depth=A(1.0, NUM_NONNEG), min_depth=A(1e-4, NUM_POS)),
    "reprojection_error": S(TK.reprojection_error, out=A(TK_OUT, "str none"), tracks=A(TK_TRACKS, "str none nan rank trail")),
    "synthetic_tracks": S(TK.synthetic_tracks, key=A(KEY, KEYK), n_frames=A(4, INT_POS), n_points=A(6, INT_POS),
                          n_bases=A(1, INT_NONNEG), dynamic_fraction=A(0.25, "str none nan neg"),
                          motion_scale=A(0.3, NUM_NONNEG), drop_prob=A(0.1, "str none nan neg", extra=[(1.0, ValueError)]),
                          sweep=A(0.6, NUM_ANY), extent=A(1.0, NUM_POS)),
    # ---------------------------------------------------------------- benchmark
    "blocking": S(BM.blocking, fn=A(jnp.sin, "str none int1")),
    "time_round_robin": S(BM.time_round_robin, calls=A({"a": lambda: None}, "str none", extra=[({}, TypeError),
                          ({"a": 3}, TypeError)]), repeats=A(1, INT_POS), warmup=A(0, INT_NONNEG), desc=A("", "none int1"),
                          progress=A(False, BOOL)),
    "summarize": S(BM.summarize, ms=A([1.0, 2.0], "str none", extra=[([], ValueError), ([1.0, math.nan], ValueError),
                                                                   ([1.0, -1.0], ValueError), (["a"], TypeError)])),
    "describe": S(BM.describe, info=A({"platform": "cpu", "device_kind": "cpu", "usable_cpus": 1, "jax": "0"},
                                      "str none", extra=[({"platform": "cpu"}, ValueError)])),
}

# public callables reached through a class (methods) are listed above as "Class.method"; the sweep
# over module __all__ lists must be a subset of SPECS + EXEMPT.


def _public():
    out = {}
    for group, mods in MODULES.items():
        for m in mods:
            for name in m.__all__:
                out.setdefault(name, group)
    return out


def test_every_public_callable_has_a_spec():
    missing = sorted(n for n in _public() if n not in SPECS and n not in EXEMPT)
    assert not missing, f"public callables without a bad-input spec in tests/test_errors_fields.py: {missing}"


# ----------------------------------------------------------------------------- bad values per kind
def _bad(kind, good):
    """(value, expected exception type) for a bad-input KIND derived from the valid value."""
    if kind == "str":
        return "bad", TypeError
    if kind == "none":
        return None, TypeError
    if kind == "bool":
        return True, TypeError
    if kind == "int1":
        return 1, TypeError
    if kind == "float":
        if isinstance(good, (jax.Array, np.ndarray)):
            return jnp.asarray(good, jnp.float32) + 0.5, TypeError
        return 2.5, TypeError
    if kind == "int":
        return jnp.ones(np.shape(good), jnp.int32), TypeError
    if kind == "enum":
        return "no-such-name", ValueError
    if kind == "enumtype":
        return 3, TypeError
    if kind in ("nan", "inf"):
        v = math.nan if kind == "nan" else math.inf
        if isinstance(good, (jax.Array, np.ndarray, tuple)) and np.size(good):
            arr = np.array(good, np.float32)
            arr.reshape(-1)[0] = v
            return (tuple(arr.tolist()) if isinstance(good, tuple) else jnp.asarray(arr)), ValueError
        return v, ValueError
    if kind == "neg":
        if isinstance(good, (jax.Array, np.ndarray)):
            return -jnp.abs(jnp.asarray(good)) - 1.0, ValueError
        return (-1 if isinstance(good, int) else -1.0), ValueError
    if kind == "zero":
        return (0 if isinstance(good, int) else 0.0), ValueError
    if kind == "one":
        return 1, ValueError
    if kind == "big":
        return (10 ** 6 if isinstance(good, int) else 1e6), ValueError
    if kind == "list":
        return np.asarray(good).tolist(), TypeError
    if kind == "trail":
        g = np.asarray(good)
        return jnp.asarray(np.concatenate([g, g[..., :1]], axis=-1)), ValueError
    if kind == "rank":
        return jnp.asarray(good)[None], ValueError
    if kind == "wrongtree":
        return {"params": {"nope": jnp.zeros(2)}}, ValueError
    raise AssertionError(kind)


def _cases():
    cases = []
    for fname, (fn, args) in SPECS.items():
        for aname, a in args.items():
            for kind in a.kinds:
                cases.append(pytest.param(fname, aname, kind, None, id=f"{fname}-{aname}-{kind}"))
            for i, (val, exc) in enumerate(a.extra):
                cases.append(pytest.param(fname, aname, f"extra{i}", (val, exc), id=f"{fname}-{aname}-extra{i}"))
    return cases


def _name_pattern(name):
    """The argument's name as a word; a one-letter name must be the subject of the message."""
    n = re.escape(name)
    if len(name) <= 2:
        return rf"(?<![\w.]){n}(?=( must| and| has| contains| of|:|\[| is|\.|=))"
    return rf"(?<![\w]){n}(?!\w)"


CASES = _cases()
RESULTS = collections.Counter()


def _group(fname):
    return _public().get(fname.split(".")[0], {"Field": "fields", "SHGridField": "fields", "Scene": "fields",
                                               "PVD": "fields", "SNA": "sna",
                                               "CharTransformer": "models"}.get(fname.split(".")[0], "fields"))


@pytest.mark.parametrize("fname,aname,kind,extra", CASES)
def test_bad_input_raises_clear_error(fname, aname, kind, extra):
    fn, args = SPECS[fname]
    a = args[aname]
    val, exc = extra if extra is not None else _bad(kind, a.good)
    kwargs = {k: v.good for k, v in args.items()}
    kwargs[aname] = val
    match = _name_pattern(a.match or aname)
    RESULTS[(_group(fname), "tried")] += 1
    with pytest.raises(exc, match=match):
        fn(**kwargs)
    RESULTS[(_group(fname), "clear")] += 1


# valid calls (so that every error above is caused by the one bad argument)
CHEAP = [n for n in SPECS if n not in ("make_dataset", "render_image", "train_loop", "PVD.step", "PVD.compile",
                                        "PVD.losses", "time_round_robin", "render_views", "make_evaluator")]


@pytest.mark.parametrize("fname", CHEAP)
def test_valid_call_succeeds(fname):
    fn, args = SPECS[fname]
    fn(**{k: v.good for k, v in args.items()})


def test_count_report():
    """Per module: bad inputs in this suite (every one must raise lrjax's clear error)."""
    per = collections.Counter(_group(c.values[0]) for c in CASES)
    print("\nbad inputs per module:", dict(per))
    assert per["fields"] >= 1200 and per["sna"] >= 100 and per["models"] >= 110 and per["benchmark"] >= 30


# ----------------------------------------------------------------------------- traced: no value checks, no NaN
def test_traced_inputs_skip_value_checks_and_stay_finite():
    # zero direction under jit: no error possible, and no NaN in the image
    rays = LF.Rays(RAYS.origins, RAYS.directions.at[0].set(0.0))
    rgb = jax.jit(lambda o, d: LF.render_rays(FIELD_FN, LF.Rays(o, d), n_samples=4).rgb)(*rays)
    assert np.all(np.isfinite(np.asarray(rgb)))
    # look_at with up parallel to the view direction under jit: a valid rotation (fallback axis)
    m = jax.jit(LF.look_at)(jnp.array([0.0, 0.0, 3.0]), jnp.zeros(3), jnp.array([0.0, 0.0, 1.0]))
    r = np.asarray(m[:3, :3])
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-5)


# ----------------------------------------------------------------------------- degenerate but valid input
def test_degenerate_inputs_give_no_nan():
    col, acc, depth, w = LF.composite(jnp.zeros((2, 3)), RGB, DEL, Z, bg=0.25)
    np.testing.assert_array_equal(acc, 0.0)
    np.testing.assert_allclose(col, 0.25)
    assert np.all(np.isfinite(np.asarray(depth))) and np.all(np.asarray(w) == 0)
    col, acc, depth, w = LF.composite(jnp.zeros((0, 3)), jnp.zeros((0, 3, 3)), jnp.zeros((0, 3)), jnp.zeros((0, 3)))
    assert col.shape == (0, 3) and acc.shape == (0,) and depth.shape == (0,)
    # huge but finite densities: opaque, no NaN (exclusive transmittance without inf - inf)
    col, acc, _, _ = LF.composite(jnp.full((1, 3), 1e30), RGB[:1], DEL[:1])
    np.testing.assert_allclose(acc, 1.0) and np.testing.assert_allclose(col, 0.5)
    # rays that miss the box: background, zero opacity
    miss = LF.Rays(jnp.array([[0.0, 5.0, 5.0]]), jnp.array([[1.0, 0.0, 0.0]]))
    out = LF.render_rays(FIELD_FN, miss, n_samples=4, bg=0.0)
    np.testing.assert_array_equal(out.acc, 0.0)
    np.testing.assert_array_equal(out.rgb, 0.0)
    # identical images: PSNR is +inf (documented), SSIM exactly 1, zero (not NaN) gradients
    assert float(LF.psnr(IMG, IMG)) == math.inf
    assert float(LF.ssim(IMG, IMG)) == pytest.approx(1.0, abs=1e-6)
    g = jax.grad(lambda a: LF.psnr(a, IMG))(IMG)
    assert np.all(np.asarray(g) == 0)
    g = jax.grad(lambda a: LF.ssim(a, IMG))(IMG)
    assert np.all(np.isfinite(np.asarray(g)))
    # constant images of different values: finite SSIM (variances clamped at 0)
    assert np.isfinite(float(LF.ssim(IMG, IMG * 0 + 0.2)))


def test_nan_origin_is_reported_as_nan_not_out_of_box():
    with pytest.raises(ValueError, match="NaN or Inf"):
        GRID.apply(GRID_P, jnp.array([[np.nan, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"rays\.origins contains NaN"):
        LF.render_rays(FIELD_FN, LF.Rays(RAYS.origins.at[1, 2].set(np.nan), RAYS.directions))


@pytest.mark.parametrize("scale", [0.1, 10.0, 1000.0])
def test_render_is_invariant_to_direction_length(scale):
    """Directions are normalised: scaling d changes neither the image nor depth, z or delta."""
    rays = LF.pinhole_rays(LF.look_at((2.5, 0.7, 0.4)), 3, 3, 2.0)
    scaled = LF.Rays(rays.origins, rays.directions * jnp.array([scale, 1.0, 2.0 * scale, 0.5, 3.0, 1.0,
                                                              scale, 7.0, 1.0])[:, None])
    a = LF.render_rays(FIELD_FN, rays, n_samples=16)
    b = LF.render_rays(FIELD_FN, scaled, n_samples=16)
    np.testing.assert_allclose(b.rgb, a.rgb, atol=1e-5)
    np.testing.assert_allclose(b.depth, a.depth, atol=1e-4)
    np.testing.assert_allclose(b.z, a.z, atol=1e-4)


@pytest.mark.parametrize("metric", ["psnr", "ssim"])
def test_image_metrics_refuse_integer_and_out_of_range_images(metric):
    import jax.numpy as jnp
    from lrjax import fields as F
    fn = getattr(F, metric)
    u8 = jnp.full((8, 8, 3), 200, jnp.uint8)
    with pytest.raises(TypeError, match="a must be a floating"):
        fn(u8, u8)
    ok = jnp.full((8, 8, 3), 0.5)
    with pytest.raises(ValueError, match=r"b must be an image with values in \[0, 1\]"):
        fn(ok, jnp.full((8, 8, 3), -2.0))


@pytest.mark.parametrize("bg", [float("nan"), float("inf"), 5.0, -0.1, [0.2, 0.3, 1.5]])
def test_background_colour_is_finite_and_in_unit_range(bg):
    import jax
    import jax.numpy as jnp
    from lrjax import fields as F
    fld = F.GridField(resolution=4)
    p = F.init_field(fld, jax.random.key(0))
    with pytest.raises(ValueError, match="bg"):
        F.render_image(lambda x, d: fld.apply(p, x, d), F.look_at(jnp.array([0., -3., 1.])), 2, 2, 2.0, bg=bg)
    with pytest.raises(ValueError, match="bg"):
        F.composite(jnp.ones((2, 3)), jnp.full((2, 3, 3), 0.5), jnp.full((2, 3), 0.1), bg=bg)
