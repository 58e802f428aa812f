"""PVD / PVD-AL: losses fall stage by stage, any-to-any conversion, active learning, errors."""
import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import fields as L
from lrjax.fields import pvd as P
from lrjax.fields.train import make_optimizer

H = W = 8
FOCAL = 0.5 * W / np.tan(np.deg2rad(20))


def _teacher():
    """A grid teacher with a few dense blobs (no training needed)."""
    t = L.GridField(resolution=6)
    p = L.init_field(t, jax.random.key(0))
    g = p["params"]["grid"]
    g = g.at[..., 0].set(jnp.where(jax.random.uniform(jax.random.key(1), g.shape[:3]) < 0.25, 3.0, -8.0))
    g = g.at[..., 1:].multiply(10.0)
    return t, {"params": {**p["params"], "grid": g}}


def _pvd(student, stage_steps, active=None, steps=60, batch=64):
    t, tp = _teacher()
    cfg = P.PVDConfig(stage_steps=stage_steps, batch_rays=batch, n_samples=16, active=active)
    return P.PVD(t, tp, student, make_optimizer(3e-2, steps), poses=L.random_poses(0, 8), height=H,
                 width=W, focal=FOCAL, config=cfg)


def _run(d, steps, key=0):
    st = d.init(jax.random.key(key))
    hist = []
    for i, k in enumerate(jax.random.split(jax.random.key(key + 1), steps)):
        st, m = d.step(st, k)
        hist.append({n: float(v) for n, v in m.items()})
    return st, hist


def test_losses_fall_stage_by_stage():
    d = _pvd(L.CPField(resolution=6, rank_sigma=4, rank_app=8), (20, 40))
    st, hist = _run(d, 60)
    assert int(st.step) == 60
    stages = {1: hist[:20], 2: hist[20:40], 3: hist[40:]}
    assert set(stages[1][0]) == {"loss", "rgb_mse", "feature"}
    assert set(stages[2][0]) == {"loss", "rgb_mse", "feature", "sigma", "color"}
    assert set(stages[3][0]) == {"loss", "rgb_mse", "feature", "sigma", "color", "rgb"}

    def mean(rows, key):
        return np.mean([r[key] for r in rows])

    # the stage's own new terms fall within the stage (first 4 vs last 4 steps)
    assert mean(stages[1][-4:], "feature") < 0.7 * mean(stages[1][:4], "feature")
    assert mean(stages[2][-4:], "sigma") < mean(stages[2][:4], "sigma")
    assert mean(stages[2][-4:], "color") < mean(stages[2][:4], "color")
    assert mean(stages[3][-4:], "rgb") < mean(stages[3][:4], "rgb")
    # and the rendered colour error has fallen overall
    assert mean(hist[-4:], "rgb_mse") < mean(hist[:4], "rgb_mse")


@pytest.mark.parametrize("student", [L.MLPField(n_freqs=2, width=16, depth=2, skip=None),
                                     L.VMField(resolution=6, rank_sigma=2, rank_app=2),
                                     L.HashGridField(levels=2, log2_table_size=8, min_res=4, max_res=8)],
                         ids=["mlp", "vm", "hash"])
def test_any_to_any(student):
    d = _pvd(student, (0, 0), steps=12)
    st, hist = _run(d, 12)
    assert all(np.isfinite(r["loss"]) for r in hist)
    assert hist[-1]["rgb_mse"] < hist[0]["rgb_mse"]
    # the colour head was inherited from the teacher before training started
    s0 = d.init(jax.random.key(0))
    np.testing.assert_array_equal(s0.params["params"]["color_out"]["kernel"],
                                  d.tparams["params"]["color_out"]["kernel"])


def test_active_learning_pool_points_and_poses():
    ac = P.ActiveConfig(ray_ratio=0.25, pool_size=64, min_pool=32, point_ratio=0.3, pose_ratio=0.25)
    d = _pvd(L.CPField(resolution=6, rank_sigma=2, rank_app=4), (0, 0), active=ac, steps=10, batch=32)
    st = d.init(jax.random.key(0))
    st, _ = d.step(st, jax.random.key(1))
    assert int(st.al.size) == 8 and int(st.al.ptr) == 8
    assert float(jnp.sum(st.al.pose_err > 0)) > 0
    # the pooled rays are the batch's highest-error rays
    rays, pidx = d._sample_rays(jax.random.key(5), st.al)
    _, aux = d.losses(st.params, rays, jax.random.key(6), 3, st.step)
    pooled_err = aux["ray_err"][jnp.argsort(-aux["ray_err"])[:8]]
    assert float(jnp.min(pooled_err)) >= float(jnp.median(aux["ray_err"]))
    for i, k in enumerate(jax.random.split(jax.random.key(2), 4)):
        st, m = d.step(st, k)
    assert int(st.al.size) == 40 and np.isfinite(float(m["loss"]))
    # point selection: top 30 % of samples by weight on opaque rays only
    wt = jnp.array([[0.0, 0.1, 0.5, 0.3, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0], [0.01] * 10])
    mask = d._point_mask(wt, jnp.zeros_like(wt), wt.sum(-1), jnp.zeros(2))
    np.testing.assert_array_equal(mask[0], [0, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(mask[1], 0)


def test_errors():
    t, tp = _teacher()
    opt = make_optimizer(1e-2, 10)
    kw = dict(poses=L.random_poses(0, 4), height=H, width=W, focal=FOCAL)
    with pytest.raises(ValueError, match="mismatched field configs.*geo_dim"):
        P.PVD(t, tp, L.CPField(geo_dim=7), opt, **kw)
    with pytest.raises(ValueError, match="bound"):
        P.PVD(t, tp, L.CPField(bound=2.0), opt, **kw)
    with pytest.raises(ValueError, match="teacher_params do not match"):
        P.PVD(L.CPField(), tp, L.GridField(), opt, **kw)
    with pytest.raises(ValueError, match="poses"):
        P.PVD(t, tp, L.CPField(), opt, **{**kw, "poses": np.zeros((0, 4, 4))})
    with pytest.raises(ValueError, match="stage_steps"):
        P.PVDConfig(stage_steps=(5, 2))
    with pytest.raises(ValueError, match="loss"):
        P.PVDConfig(loss="l1")
    with pytest.raises(ValueError, match="min_pool"):
        P.ActiveConfig(pool_size=8, min_pool=16)
    with pytest.raises(ValueError, match="point_ratio"):
        P.ActiveConfig(point_ratio=1.5)
    assert [P.stage_of(s, (2, 5)) for s in (0, 1, 2, 4, 5, 9)] == [1, 1, 2, 2, 3, 3]


def test_bench_pvd_quick(tmp_path):
    """Smoke run of experiments/bench_pvd.py --quick: JSON, PNG and table are written. One quick run
    (from scratch + point-query PVD-AL, one grid student; the ray modes are covered by the unit tests
    above) trains and caches the teacher; a second, student-less run only restores the cached teacher
    (the rest of that run would repeat the first)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cache = tmp_path / "teacher"

    def run(*extra, out=out):
        return subprocess.run([sys.executable, str(root / "experiments" / "bench_pvd.py"), "--quick", "--out",
                               str(out), "--no-progress", "--teacher-cache", str(cache), *extra], cwd=root,
                              env=env, capture_output=True, text=True, timeout=600)
    proc = run("--students", "grid", "--modes", "point_al", "--scene", "spheres")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| student | params |" in proc.stdout and "teacher loaded from" not in proc.stdout
    res = json.loads((out / "bench_pvd.json").read_text())
    assert (out / "bench_pvd.png").stat().st_size > 0
    for k in ("command", "device", "config", "teacher", "target_psnr", "students", "table_markdown"):
        assert k in res, k
    assert res["teacher"]["forward_ms_per_step"] > 0
    assert set(res["students"]) == {"grid"}
    for name, info in res["students"].items():
        for k in ("params", "bytes", "scratch", "pvd", "speedup_time", "pvd_step_over_teacher_forward"):
            assert k in info, (name, k)
        assert set(info["modes"]) == {"scratch", "point_al"}
        assert info["modes"]["point_al"]["speedup_bound"] in ("=", ">=", "<=", "n/a")

    # a second run restores the cached teacher (orbax checkpoint + JSON), same target
    again = run("--students", "", "--scene", "spheres", out=tmp_path / "res2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher loaded from" in again.stdout
    res2 = json.loads((tmp_path / "res2" / "bench_pvd.json").read_text())
    assert res2["target_psnr"] == res["target_psnr"] and res2["students"] == {}
    assert (tmp_path / "res2" / "bench_pvd.png").stat().st_size > 0


@pytest.mark.parametrize("space,where", [("alpha", "points"), ("alpha", "floor"), ("log", "points")])
def test_density_options_train(space, where):
    """density_space / density_mask variants train: the total loss, the rendered error and the
    feature term (which holds the density channel, in the chosen space) fall."""
    t, tp = _teacher()
    cfg = P.PVDConfig(stage_steps=(0, 0), batch_rays=64, n_samples=16, density_space=space, density_mask=where)
    d = P.PVD(t, tp, L.CPField(resolution=6, rank_sigma=4, rank_app=8), make_optimizer(3e-2, 40),
              poses=L.random_poses(0, 8), height=H, width=W, focal=FOCAL, config=cfg)
    _, hist = _run(d, 40)
    assert all(np.isfinite(r["loss"]) for r in hist)
    for k in ("loss", "rgb_mse", "feature"):
        assert np.mean([r[k] for r in hist[-5:]]) < 0.9 * np.mean([r[k] for r in hist[:5]]), k


def test_density_options_refused():
    """The config's refusals (kept in the default run; the training runs above are marked slow)."""
    with pytest.raises(ValueError, match="density_space"):
        P.PVDConfig(density_space="linear")
    with pytest.raises(ValueError, match="density_mask"):
        P.PVDConfig(density_mask="all")


# ----------------------------------------------------------------------------- point-query distillation
def _exact_opt(lr=20.0):
    """SGD with momentum on the encoder, colour head frozen (it is the teacher's, inherited)."""
    import optax

    def labels(p):
        return {"params": {k: jax.tree.map(lambda _: "head" if k.startswith("color") else "enc", v)
                           for k, v in p["params"].items()}}
    return optax.multi_transform({"enc": optax.sgd(lr, momentum=0.9), "head": optax.set_to_zero()}, labels)


def test_point_distill_exact_vm_to_grid_and_callable():
    """A VM teacher and a dense grid student of the same resolution (the VM's interpolant is trilinear
    on every cell): point distillation drives the point error to float tolerance and the student's
    grid to the VM's dense reconstruction. A plain callable teacher (sigma, rgb): the log-density
    to float tolerance, the colour error falls; the occupancy probe marks the teacher's dense blob."""
    kw = dict(geo_dim=2, color_hidden=8, density_scale=1.0)
    vm = L.VMField(resolution=4, rank_sigma=2, rank_app=2, init_scale=1.0, **kw)
    tp = L.init_field(vm, jax.random.key(0))
    grid = L.GridField(resolution=4, **kw)
    cfg = P.PointConfig(batch_points=512, occupancy_res=4, density_floor=-10.0)
    d = P.PointDistill(vm, grid, _exact_opt(), teacher_params=tp, config=cfg)
    st = d.init(jax.random.key(1))
    for k in jax.random.split(jax.random.key(2), 250):
        st, m = d.step(st, k)
    err = d.point_error(st.params, jax.random.key(3))
    assert err["sigma_pre"] < 1e-4 and err["rgb"] < 1e-5, err
    dense = L.vm_dense(vm, tp)["params"]["grid"]
    np.testing.assert_allclose(st.params["params"]["grid"], dense, atol=1e-4)
    assert {"loss", "sigma", "color", "feature"} <= set(m)

    # plain callable teacher: a grid closed over its own parameters, returning (sigma, rgb)
    g = np.asarray(dense).copy()
    g[..., 0] = -6.0
    g[1:3, 1:3, 1:3, 0] = 4.0                                        # one dense blob in the middle
    gp = {"params": {**L.init_field(grid, jax.random.key(4))["params"], "grid": jnp.asarray(g)}}

    def teacher(x, d_):
        o = grid.apply(gp, x)
        return o.sigma, o.rgb
    dc = P.PointDistill(teacher, grid, _exact_opt(),
                        config=P.PointConfig(batch_points=512, occupancy_res=6, density_floor=-10.0))
    occ = dc.occupancy()
    assert occ[2:4, 2:4, 2:4].all() and not occ[0, 0, 0] and 0 < occ.sum() < occ.size
    st = dc.init(jax.random.key(1), P.inherit_head(gp, L.init_field(grid, jax.random.key(5))))
    err0 = dc.point_error(st.params, jax.random.key(3))
    for k in jax.random.split(jax.random.key(6), 300):
        st, m = dc.step(st, k)
    assert "feature" not in m
    err = dc.point_error(st.params, jax.random.key(3))
    # the log-density is linear in the grid: float tolerance; the colour only through the (frozen,
    # nonlinear) head from 2 geometry channels, which SGD reaches more slowly
    assert err["sigma_pre"] < 1e-4 and err["rgb"] < 0.6 * err0["rgb"], (err0, err)


def test_point_distill_active_and_errors():
    t, tp = _teacher()
    cfg = P.PointConfig(batch_points=64, occupancy_res=6, active_ratio=0.25, pool_size=64, min_pool=32)
    d = P.PointDistill(t, L.CPField(resolution=6, rank_sigma=2, rank_app=4), make_optimizer(3e-2, 10),
                       teacher_params=tp, config=cfg)
    st = d.init(jax.random.key(0))
    losses = []
    for k in jax.random.split(jax.random.key(1), 6):
        st, m = d.step(st, k)
        losses.append(float(m["loss"]))
    assert int(st.size) == 64 and int(st.ptr) == 32 and np.all(np.isfinite(losses))
    x, _ = d.sample_points(jax.random.key(2), st)
    assert x.shape == (64, 3) and float(jnp.max(jnp.abs(x))) <= 1.0
    # pooled points are the batch's highest-error points
    x, dd = d.sample_points(jax.random.key(3))
    _, err = d.losses(st.params, x, dd)
    assert np.isfinite(np.asarray(err)).all() and err.shape == (64,)

    opt = make_optimizer(1e-2, 10)
    s = L.GridField(resolution=4)
    with pytest.raises(TypeError, match="teacher"):
        P.PointDistill(3.0, s, opt)
    with pytest.raises(TypeError, match="teacher"):
        P.PointDistill(lambda x, d: x, s, opt)                        # not a (sigma, rgb) pair
    with pytest.raises(ValueError, match="teacher.*rgb"):
        P.PointDistill(lambda x, d: (x[:, 0], x[:, :2]), s, opt)      # rgb [N, 2]
    with pytest.raises(ValueError, match="teacher.*sigma"):
        P.PointDistill(lambda x, d: (x, x), s, opt)                   # sigma [N, 3]
    with pytest.raises(TypeError, match="teacher_params"):
        P.PointDistill(t, s, opt)
    with pytest.raises(TypeError, match="teacher_params"):
        P.PointDistill(lambda x, d: (x[:, 0], x), s, opt, teacher_params=tp)
    with pytest.raises(TypeError, match="student"):
        P.PointDistill(t, "grid", opt, teacher_params=tp)
    with pytest.raises(ValueError, match="batch_points"):
        P.PointConfig(batch_points=0)
    with pytest.raises(TypeError, match="batch_points"):
        P.PointConfig(batch_points=2.5)
    with pytest.raises(ValueError, match="occupied_ratio"):
        P.PointConfig(occupied_ratio=1.5)
    with pytest.raises(ValueError, match="min_pool"):
        P.PointConfig(pool_size=8, min_pool=16)
    with pytest.raises(TypeError, match="state"):
        d.step((st.params,), jax.random.key(0))


def test_point_distill_refuses_bad_teacher_floor_head_and_inputs():
    opt = make_optimizer(1e-2, 10)
    cs = P.PointConfig(batch_points=8, occupancy_res=2, occupancy_samples=1, pool_size=8, min_pool=4)
    s = L.GridField(resolution=2, geo_dim=2, color_hidden=4)
    fn = lambda x, d: (jnp.exp(-jnp.sum(x * x, -1)), jax.nn.sigmoid(x))  # noqa: E731
    with pytest.raises(ValueError, match="teacher returned NaN"):
        P.PointDistill(lambda x, d: (jnp.where(x[:, 0] > 0, jnp.nan, 1.0), jax.nn.sigmoid(x)), s, opt, config=cs)
    with pytest.raises(ValueError, match="density_floor"):
        P.PointDistill(fn, s, opt, config=dataclasses.replace(cs, density_floor=100.0))
    t, tp = _teacher()                                     # ray-mode PVD refuses a NaN/Inf teacher too
    for ch, bad in ((0, jnp.nan), (1, jnp.inf)):
        g = tp["params"]["grid"].at[0, 0, 0, ch].set(bad)
        with pytest.raises(ValueError, match="teacher returned NaN or Inf.*teacher_params"):
            P.PVD(t, {"params": {**tp["params"], "grid": g}}, t, opt, poses=L.random_poses(0, 2), height=H,
                  width=W, focal=FOCAL)
    t = L.GridField(resolution=2, geo_dim=2, color_hidden=8)
    tp = L.init_field(t, jax.random.key(1))
    with pytest.raises(ValueError, match="inherit_head"):
        P.PointDistill(t, s, opt, teacher_params=tp, config=cs)
    assert not P.PointDistill(t, s, opt, teacher_params=tp, config=dataclasses.replace(cs, inherit_head=False)).use_features
    d = P.PointDistill(fn, s, opt, config=cs, regularizer=lambda p: jnp.ones(3))
    with pytest.raises(TypeError, match="regularizer"):
        d.init(jax.random.key(0))
    with pytest.raises(TypeError, match="key"):
        d.sample_points(0)
    sp = L.init_field(s, jax.random.key(0))
    x = jnp.zeros((4, 3))
    with pytest.raises(TypeError, match="x"):
        d.losses(sp, x.astype(jnp.int32), x)
    for bad in (jnp.zeros(3), jnp.zeros((0, 3))):
        with pytest.raises(ValueError, match="x must have shape"):
            d.losses(sp, bad, bad)
    with pytest.raises(ValueError, match="x and d"):
        d.losses(sp, x, x[:2])
