"""TracksTo4D (lrjax.fields.tracks): point-permutation equivariance, the rank bound of the trajectory
matrix, the pinhole projection against float64 NumPy, losses with invisible points, bad input, and the
experiment's --quick smoke run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrjax.fields.tracks import (TracksOutput, TracksTo4D, check_tracks, predict_tracks, project,
                                 reprojection_error, rotation_6d, synthetic_tracks, trajectories, trajectory_matrix,
                                 tracks_losses, world_to_camera)


# Everything numeric runs under jax.jit: eager op-by-op dispatch compiles every primitive once and would
# dominate this file's time.
@pytest.fixture(scope="module")
def scene():
    return jax.jit(lambda k: synthetic_tracks(k, 6, 10, n_bases=2, drop_prob=0.3))(jax.random.key(0))


@pytest.fixture(scope="module")
def net():
    graphdef, state = jax.jit(lambda: nnx.split(TracksTo4D(2, width=16, depth=1, heads=2, n_freqs=2,
                                                           rngs=nnx.Rngs(0))))()
    return nnx.merge(graphdef, state)


def test_equivariance_rank_and_losses(scene, net):
    """One forward of a batch of two scenes: (a) permuting the points permutes the per-point outputs and
    leaves the per-frame outputs unchanged; (b) the predicted trajectory matrix has rank <= K+1 as [T, 3P]
    and <= 3(K+1) as [3T, P], c_t0 == 1, and the dynamic part X - B_0 has rank <= K; (c) the losses are
    finite and their gradient too, with invisible entries holding garbage (non-finite-free) coordinates."""
    perm = np.random.default_rng(0).permutation(scene.tracks.shape[1])
    tr = scene.tracks
    # invisible entries' coordinates are ignored: scramble them in the permuted copy (after permuting)
    tp = tr[:, perm]
    tp = tp.at[..., :2].set(jnp.where(tp[..., 2:] > 0, tp[..., :2], 1e3))
    batch = jnp.stack([tr, tp])
    none = batch.at[..., 2].set(0.0)                  # a batch with no visible entry
    graphdef, state = nnx.split(net)

    @jax.jit
    def run(st):
        def loss(st):
            out = nnx.merge(graphdef, st)(batch)
            total, terms = tracks_losses(out, batch)
            return total, (terms, out)
        (total, (terms, out)), g = jax.value_and_grad(loss, has_aux=True)(st)
        t0 = tracks_losses(out, none)[1]
        return out, trajectories(out.bases, out.coeffs), total, terms, g, t0
    out, traj, total, terms, g, t0 = run(state)
    a = jax.tree.map(lambda x: np.asarray(x[0]), out)
    b = jax.tree.map(lambda x: np.asarray(x[1]), out)
    np.testing.assert_allclose(b.bases, a.bases[perm], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(b.sigma, a.sigma[perm], atol=2e-5, rtol=1e-5)
    for name in ("coeffs", "rotations", "translations"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=2e-5, rtol=1e-5, err_msg=name)
    assert np.all(a.coeffs[:, 0] == 1.0)
    np.testing.assert_allclose(np.einsum("tij,tkj->tik", a.rotations, a.rotations),
                               np.broadcast_to(np.eye(3), a.rotations.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(a.rotations), 1.0, atol=1e-5)

    k1 = a.bases.shape[1]
    x = np.einsum("tk,pkd->tpd", a.coeffs.astype(np.float64), a.bases.astype(np.float64))
    np.testing.assert_allclose(np.asarray(traj)[0], x, atol=1e-5)
    t, p = x.shape[:2]
    assert np.linalg.matrix_rank(np.asarray(trajectory_matrix(x.astype(np.float32)), np.float64), tol=1e-4) \
        == min(k1, t, 3 * p)
    m_pts = np.asarray(trajectory_matrix(x.astype(np.float32), "points"), np.float64)
    assert m_pts.shape == (3 * t, p) and np.linalg.matrix_rank(m_pts, tol=1e-4) <= 3 * k1
    assert np.linalg.matrix_rank((x - a.bases[None, :, 0]).reshape(t, 3 * p), tol=1e-4) <= k1 - 1

    # losses finite with invisible points; the gradient through the network too
    assert np.isfinite(float(total)) and all(np.isfinite(float(v)) for v in terms.values())
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))
    # a scene with no visible entry contributes 0 (no 0/0)
    assert float(t0["reproj"]) == 0.0 and float(t0["error"]) == 0.0


def test_rank_bound_exact_float64():
    """The bound is attained for generic bases/coefficients (so it is the exact bound): rank [T, 3P] = K+1
    and rank [3T, P] = 3(K+1) when T, P are large enough."""
    rng = np.random.default_rng(1)
    for k in (0, 1, 3):
        t, p = 14, 20
        bases = rng.normal(size=(p, k + 1, 3))
        coeffs = np.concatenate([np.ones((t, 1)), rng.normal(size=(t, k))], 1)
        x = np.einsum("tk,pkd->tpd", coeffs, bases)
        assert np.linalg.matrix_rank(x.reshape(t, 3 * p)) == k + 1
        assert np.linalg.matrix_rank(x.transpose(0, 2, 1).reshape(3 * t, p)) == 3 * (k + 1)


def test_projection_and_ground_truth_against_numpy(scene):
    """world_to_camera + project equal a float64 NumPy pinhole (R^T (X - c), divide by z, fx, fy, cx, cy),
    rotation_6d is Gram-Schmidt, and the synthetic scene's ground truth reprojects to its tracks (error 0)."""
    rng = np.random.default_rng(2)
    r6 = rng.normal(size=(4, 6))
    a1, a2 = r6[:, :3], r6[:, 3:]
    b1 = a1 / np.linalg.norm(a1, axis=1, keepdims=True)
    b2 = a2 - np.sum(b1 * a2, 1, keepdims=True) * b1
    b2 /= np.linalg.norm(b2, axis=1, keepdims=True)
    rot = np.stack([b1, b2, np.cross(b1, b2)], -1)
    cen = rng.normal(size=(4, 3))
    xc_ref = rng.normal(size=(4, 5, 3)) + np.array([0, 0, 4.0])                 # in front of the camera
    xw = np.einsum("tij,tpj->tpi", rot, xc_ref) + cen[:, None]
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    k = (500.0, 450.0, 320.0, 240.0)
    geo = jax.jit(lambda r6, xw, cen, xc: (rotation_6d(r6), world_to_camera(xw, rotation_6d(r6), cen),
                                          project(xc, k), project(xc), project(xc.astype(jnp.bfloat16)),
                                          project(jnp.asarray([[0.3, 0.2, -1.0], [0.1, 0.1, 0.0]]))))
    r_j, xc, uv, xy_n, bf, behind = geo(f32(r6), f32(xw), f32(cen), f32(xc_ref))
    np.testing.assert_allclose(np.asarray(r_j), rot, atol=1e-5)
    np.testing.assert_allclose(np.asarray(xc), xc_ref, atol=1e-4)
    uv_ref = np.stack([k[0] * xc_ref[..., 0] / xc_ref[..., 2] + k[2], k[1] * xc_ref[..., 1] / xc_ref[..., 2] + k[3]], -1)
    np.testing.assert_allclose(np.asarray(uv), uv_ref, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(xy_n), xc_ref[..., :2] / xc_ref[..., 2:], atol=1e-6)
    assert bf.dtype == jnp.bfloat16 and np.allclose(np.asarray(bf, np.float32), xc_ref[..., :2] / xc_ref[..., 2:],
                                                    atol=3e-2)
    assert np.all(np.isfinite(np.asarray(behind)))           # behind the camera: clamped depth, finite

    @jax.jit
    def gt_check(sc):
        gt = TracksOutput(sc.bases, sc.coeffs, sc.rotations, sc.translations, jnp.ones(sc.bases.shape[0]))
        return predict_tracks(gt) + (reprojection_error(gt, sc.tracks),)
    xy, depth, err = gt_check(scene)
    assert float(jnp.min(depth)) > 0
    np.testing.assert_allclose(np.asarray(xy), np.asarray(scene.tracks[..., :2]), atol=1e-6)
    assert float(err) < 1e-6
    assert set(np.unique(np.asarray(scene.tracks[..., 2]))) <= {0.0, 1.0} and float(scene.tracks[..., 2].mean()) < 1
    # static points have zero dynamic bases; coeffs[:, 0] == 1
    assert np.all(np.asarray(scene.bases)[~np.asarray(scene.dynamic), 1:] == 0)
    assert np.all(np.asarray(scene.coeffs)[:, 0] == 1)


def test_bad_input(scene, net):
    tr = scene.tracks
    with pytest.raises(ValueError, match="tracks"):
        net(tr[0])                                              # rank 2
    with pytest.raises(ValueError, match="tracks"):
        net(tr[None, None])                                     # rank 5
    with pytest.raises(ValueError, match="tracks"):
        net(tr[..., :2])                                        # last dim 2
    with pytest.raises(ValueError, match=r"tracks\[\.\.\., 2\]"):
        net(tr.at[0, 0, 2].set(0.5))                            # soft visibility
    with pytest.raises(TypeError, match="tracks"):
        net(tr.astype(jnp.int32))
    with pytest.raises(TypeError, match="tracks"):
        net(np.asarray(tr).tolist())
    with pytest.raises(ValueError, match="tracks"):
        check_tracks(tr.at[0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="n_bases"):
        TracksTo4D(-1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="n_bases"):
        TracksTo4D(1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="width"):
        TracksTo4D(1, width=10, heads=4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rngs"):
        TracksTo4D(1, rngs=0)
    with pytest.raises(ValueError, match="n_bases"):
        synthetic_tracks(jax.random.key(0), n_bases=-1)
    with pytest.raises(TypeError, match="key"):
        synthetic_tracks(0)
    with pytest.raises(ValueError, match="drop_prob"):
        synthetic_tracks(jax.random.key(0), drop_prob=1.0)
    with pytest.raises(ValueError, match="coeffs"):
        trajectories(jnp.zeros((4, 3, 3)), jnp.zeros((5, 2)))
    with pytest.raises(ValueError, match="intrinsics"):
        project(jnp.ones((2, 3)), (0.0, 1.0, 0.0, 0.0))
    with pytest.raises(TypeError, match="intrinsics"):
        project(jnp.ones((2, 3)), 500.0)
    with pytest.raises(ValueError, match="layout"):
        trajectory_matrix(jnp.ones((2, 3, 3)), "time")
    out = jax.jit(lambda t: net(t))(tr)
    with pytest.raises(ValueError, match="w_sparse"):
        tracks_losses(out, tr, w_sparse=-1.0)
    with pytest.raises(ValueError, match="out"):
        tracks_losses(out, tr[:, :5])
    with pytest.raises(TypeError, match="out"):
        tracks_losses(tuple(out), tr)
    # a scene with no visible entry: the data terms are 0, the sparsity prior still counts (all points)
    hidden = tr.at[..., 2].set(0.0)
    _, terms = jax.jit(lambda o, t: tracks_losses(o, t))(out, hidden)
    for name in ("reproj", "static", "depth", "error"):
        assert float(terms[name]) == 0.0, name
    b, sg = np.asarray(out.bases, np.float64), np.asarray(out.sigma, np.float64)
    np.testing.assert_allclose(float(terms["sparse"]), np.mean(np.abs(b[:, 1:]) / sg[:, None, None]), rtol=1e-5)
    # float64 NumPy tracks: converted explicitly, no JAX dtype-truncation warning from inside lrjax
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o64 = jax.jit(lambda: net(np.asarray(tr, np.float64)))()
    assert o64.bases.dtype == jnp.float32


def test_tracks4d_quick(tmp_path):
    """Smoke run of experiments/tracks4d.py --quick: JSON, PNG and table are written."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(root / "experiments" / "tracks4d.py"), "--quick", "--out",
                           str(tmp_path), "--no-progress"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| model / baseline |" in proc.stdout
    res = json.loads((tmp_path / "tracks4d.json").read_text())
    assert (tmp_path / "tracks4d.png").stat().st_size > 0
    assert res["ground_truth"]["all"] < 1e-6
    r = res["models"]["tracks4d"]
    for k in ("untrained", "trained", "finetuned"):
        assert np.isfinite(r[k]["all"]), k
    assert res["timing_ms"]["forward_per_scene"] > 0 and np.isfinite(res["direct"]["after"]["all"])
