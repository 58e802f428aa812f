"""lrjax.optim: the projection protocol and GaLore (exact / randomized / subspace refreshes).

Cross-checks against optax.contrib.galore and galore-torch run a tiny MLP for 25 steps with
refreshes at steps 0, 10 and 20. LAPACK returns singular vectors with arbitrary signs and GaLore
carries its moments across refreshes, so the peers' SVDs are wrapped to pin the same sign
convention as lrjax.linalg (largest-magnitude entry of each left singular vector positive).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrjax
from lrjax import linalg
from lrjax.optim import galore, nbytes, projection, theoretical_state_bytes
from lrjax.optim.galore import ExactSVD, RandomizedSVD, SubspaceIteration


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

STEPS, GAP, LR, RANK = 25, 10, 1e-2, 2


def _mlp_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {"w1": 0.4 * jax.random.normal(k[0], (6, 8)), "b1": 0.1 * jax.random.normal(k[1], (8,)),
            "w2": 0.4 * jax.random.normal(k[2], (8, 5)), "b2": jnp.zeros((5,))}


def _data(seed=1):
    k = jax.random.split(jax.random.key(seed), 2)
    return jax.random.normal(k[0], (16, 6)), jax.random.normal(k[1], (16, 5))


def _loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y) ** 2)


def _train(opt, params, steps=STEPS):
    x, y = _data()
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(_loss)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, state, losses


def _pinned_jnp_svd(orig):
    def svd(x, full_matrices=True, compute_uv=True, **kw):
        if not compute_uv:
            return orig(x, full_matrices=full_matrices, compute_uv=False, **kw)
        u, s, vt = orig(x, full_matrices=full_matrices, **kw)
        k = min(x.shape[-2:])
        u1, vt1 = linalg._fix_signs(u[..., :k], vt[..., :k, :])
        return u.at[..., :k].set(u1), s, vt.at[..., :k, :].set(vt1)
    return svd


# ----------------------------------------------------------------------------- cross-checks
@pytest.mark.parametrize("refresh", ["svd", "eigh"])
def test_matches_optax_contrib_galore(monkeypatch, refresh):
    """Both exact refreshes (LAPACK SVD, Gram eigendecomposition) follow optax's trajectory."""
    monkeypatch.setattr(jnp.linalg, "svd", _pinned_jnp_svd(jnp.linalg.svd))
    params = _mlp_params()
    ref = optax.chain(optax.contrib.scale_by_galore(rank=RANK, update_proj_gap=GAP, scale=0.5,
                                                    base_optimizer=optax.scale_by_adam()), optax.scale(-LR))
    # optax projects the larger side (left if M >= N): lrjax's side="reverse_std"
    ours = optax.chain(galore(optax.scale_by_adam(), RANK, update_proj_gap=GAP, scale=0.5,
                              side="reverse_std", targets=("w1", "w2"), refresh=refresh), optax.scale(-LR))
    p_ref, _, l_ref = _train(ref, params)
    p_our, _, l_our = _train(ours, params)
    np.testing.assert_allclose(l_our, l_ref, rtol=1e-5, atol=1e-6)
    for k in params:
        np.testing.assert_allclose(p_our[k], p_ref[k], rtol=1e-5, atol=1e-6)
    assert l_our[-1] < l_our[0]


def _run_galore_torch(eps):
    """25 steps of galore-torch's GaLoreAdamW on the MLP (SVD signs pinned); (losses, torch params)."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    params = _mlp_params()
    x, y = _data()

    tp = {k: torch.nn.Parameter(torch.tensor(np.asarray(v if v.ndim == 1 else v.T))) for k, v in params.items()}
    groups = [{"params": [tp["b1"], tp["b2"]]},
              {"params": [tp["w1"], tp["w2"]], "rank": RANK, "update_proj_gap": GAP, "scale": 0.5,
               "proj_type": "std"}]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gt.GaLoreAdamW(groups, lr=LR, eps=eps, weight_decay=0.0)
    orig_svd = torch.linalg.svd

    def pinned(a, full_matrices=True):
        # torch sees W^T, so its right singular vectors are lrjax's left ones: pin those.
        u, s, vh = orig_svd(a, full_matrices=full_matrices)
        idx = torch.argmax(vh.abs(), dim=1, keepdim=True)
        sign = torch.sign(torch.gather(vh, 1, idx))
        sign[sign == 0] = 1
        return u * sign.T, s, vh * sign

    tx, ty = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y))
    t_losses = []
    torch.linalg.svd = pinned
    try:
        for _ in range(STEPS):
            opt.zero_grad()
            out = torch.tanh(tx @ tp["w1"].T + tp["b1"]) @ tp["w2"].T + tp["b2"]
            loss = ((out - ty) ** 2).mean()
            loss.backward()
            opt.step()
            t_losses.append(float(loss.detach()))
    finally:
        torch.linalg.svd = orig_svd
    return t_losses, {k: v.detach().numpy() for k, v in tp.items()}


def test_matches_galore_torch():
    eps = 1e-10  # torch adds eps to sqrt(v), optax to sqrt(v_hat): negligible when tiny
    t_losses, tp = _run_galore_torch(eps)
    params = _mlp_params()
    ours = optax.chain(galore(optax.scale_by_adam(eps=eps), RANK, update_proj_gap=GAP, scale=0.5,
                              targets=("w1", "w2")), optax.scale(-LR))
    p_our, _, l_our = _train(ours, params)
    np.testing.assert_allclose(l_our, t_losses, rtol=2e-5, atol=1e-6)
    for k, t in tp.items():
        np.testing.assert_allclose(p_our[k], t if t.ndim == 1 else t.T, rtol=1e-4, atol=2e-6)


def test_torch_eps_placement_matches_galore_torch_with_large_eps():
    """scale_by_adam_torch puts eps where torch does (before bias correction): equal for any eps;
    optax.scale_by_adam(eps) visibly differs at eps = 1e-3 (the equality needs a negligible eps)."""
    eps = 1e-3
    t_losses, tp = _run_galore_torch(eps)
    params = _mlp_params()
    kw = dict(update_proj_gap=GAP, scale=0.5, targets=("w1", "w2"))
    ours = optax.chain(galore(lrjax.optim.scale_by_adam_torch(eps=eps), RANK, **kw), optax.scale(-LR))
    p_our, _, l_our = _train(ours, params)
    np.testing.assert_allclose(l_our, t_losses, rtol=2e-5, atol=1e-6)
    for k, t in tp.items():
        np.testing.assert_allclose(p_our[k], t if t.ndim == 1 else t.T, rtol=1e-4, atol=2e-6)
    p_optax, _, _ = _train(optax.chain(galore(optax.scale_by_adam(eps=eps), RANK, **kw), optax.scale(-LR)), params)
    assert max(float(np.max(np.abs(np.asarray(p_optax[k]) - (t if t.ndim == 1 else t.T)))) for k, t in tp.items()) > 1e-4


# ----------------------------------------------------------------------------- protocol
def test_sides_and_shapes():
    params = {"a": jnp.ones((4, 12)), "b": jnp.ones((12, 4)), "c": jnp.ones((5, 5)), "v": jnp.ones(3)}
    for side, lefts in [("std", (True, False, True)), ("reverse_std", (False, True, True)),
                        ("left", (True, True, True)), ("right", (False, False, False))]:
        plans = projection.plan(params, rank=2, side=side)
        assert [plans[k].left for k in "abc"] == list(lefts), side
        assert "v" not in plans
    s = galore(optax.scale_by_adam(), 2).init(params)
    assert isinstance(s, lrjax.optim.ProjectionState)
    assert s.basis["a"].shape == (4, 2) and s.basis["b"].shape == (4, 2) and s.basis["v"] is None
    assert s.inner.mu["a"].shape == (2, 12) and s.inner.mu["b"].shape == (12, 2)
    assert s.inner.mu["v"].shape == (3,)


def test_stacked_leaf_projected_per_layer():
    """A [L, m, n] scan stack is projected per layer: same updates as L separate leaves."""
    k = jax.random.split(jax.random.key(3), 6)
    stack = jax.random.normal(k[0], (3, 8, 6))
    gs = [jax.random.normal(k[i], (3, 8, 6)) for i in range(1, 5)]
    for refresh in ("subspace",):
        opt = galore(optax.scale_by_adam(), 2, update_proj_gap=2, refresh=refresh)
        s_stack = opt.init({"s": stack})
        s_sep = opt.init({f"l{i}": stack[i] for i in range(3)})
        for g in gs:
            u_stack, s_stack = jax.jit(opt.update)({"s": g}, s_stack)
            u_sep, s_sep = jax.jit(opt.update)({f"l{i}": g[i] for i in range(3)}, s_sep)
            for i in range(3):
                np.testing.assert_allclose(u_stack["s"][i], u_sep[f"l{i}"], rtol=1e-4, atol=1e-6)
        assert s_stack.basis["s"].shape == (3, 6, 2)        # 8 x 6: right side, P: [L, 6, r]


def test_axes_override_and_transposed_view():
    """A [embed, heads, head_dim] leaf with axes=((), (0,), (1, 2)) is a [embed, heads*head_dim] matrix."""
    w = _randn(0, (6, 2, 4))
    g = _randn(1, (6, 2, 4))
    opt3 = galore(optax.scale_by_adam(), 2, axes={"qkv": lrjax.Axes((), (0,), (1, 2))})
    opt2 = galore(optax.scale_by_adam(), 2)
    u3, _ = opt3.update({"qkv": g}, opt3.init({"qkv": w}))
    u2, _ = opt2.update({"qkv": g.reshape(6, 8)}, opt2.init({"qkv": w.reshape(6, 8)}))
    np.testing.assert_allclose(u3["qkv"].reshape(6, 8), u2["qkv"], rtol=1e-5, atol=1e-6)
    # an inp/out swap goes through a transpose and back
    optT = galore(optax.scale_by_adam(), 2, axes=lrjax.Axes((), (1,), (0,)))
    uT, _ = optT.update({"w": g[:, 0]}, optT.init({"w": w[:, 0]}))
    assert uT["w"].shape == (6, 4)


def test_unprojected_leaves_get_inner_at_full_size():
    params = _mlp_params()
    x, y = _data()
    g = jax.grad(_loss)(params, x, y)
    u, _ = galore(optax.scale_by_adam(), 2, targets="w1").update(g, galore(optax.scale_by_adam(), 2, targets="w1").init(params))
    ua, _ = optax.scale_by_adam().update(g, optax.scale_by_adam().init(params))
    for k in ("b1", "w2", "b2"):
        np.testing.assert_allclose(u[k], ua[k], rtol=1e-6)


def test_weight_decay_in_full_space():
    params = _mlp_params()
    wd = 0.1
    a = optax.chain(galore(optax.scale_by_adam(), 2, update_proj_gap=3, weight_decay=wd), optax.scale(-LR))
    b = optax.chain(galore(optax.scale_by_adam(), 2, update_proj_gap=3), optax.add_decayed_weights(wd),
                    optax.scale(-LR))
    pa, _, _ = _train(a, params, 6)
    pb, _, _ = _train(b, params, 6)
    for k in params:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-6, atol=1e-7)


def test_refresh_schedule_and_moments_kept():
    params = {"w": jnp.ones((6, 8))}
    opt = galore(optax.scale_by_adam(), 2, update_proj_gap=3)
    s = opt.init(params)
    bases = []
    for t in range(7):
        g = {"w": jax.random.normal(jax.random.key(t), (6, 8))}
        _, s = opt.update(g, s)
        bases.append(s.basis["w"])
    changed = [not np.allclose(bases[t], bases[t - 1]) for t in range(1, 7)]
    assert changed == [False, False, True, False, False, True]    # refreshes at t = 3, 6
    assert int(s.count) == 7 and float(jnp.abs(s.inner.nu["w"]).min()) > 0


def test_exact_refresh_has_one_cond_per_matrix_random_refresh_one_per_step():
    """Exact refreshes: each unbatched matrix is refreshed in its own cond (no barrier over all the
    gradients, as optax.contrib.galore); random refreshes and stacks: one cond for the whole step."""
    params = {"a": jnp.zeros((6, 8)), "b": jnp.zeros((6, 8)), "c": jnp.zeros((8, 5)), "s": jnp.zeros((2, 6, 8)),
              "bias": jnp.zeros((8,))}

    def conds(refresh):
        opt = galore(optax.scale_by_adam(), 2, refresh=refresh)
        jaxpr = jax.make_jaxpr(lambda g, s: opt.update(g, s))(params, opt.init(params))
        return sum(e.primitive.name == "cond" for e in jaxpr.jaxpr.eqns)
    assert conds("svd") == conds("eigh") == 4          # a, b, c on their own; the stack s in one cond
    assert conds("randomized") == conds("subspace") == 1


# ----------------------------------------------------------------------------- refreshes
def _low_rank_plus_noise(key, batch, m, n, r, noise=1e-2):
    k = jax.random.split(key, 4)
    u = linalg.orthonormalize(jax.random.normal(k[0], batch + (m, r)))
    v = linalg.orthonormalize(jax.random.normal(k[1], batch + (n, r)))
    s = jnp.linspace(10.0, 2.0, r)
    return (u * s) @ jnp.swapaxes(v, -1, -2) + noise * jax.random.normal(k[2], batch + (m, n))


def _max_principal_angle(a, b):
    sv = jnp.linalg.svd(jnp.swapaxes(a, -1, -2) @ b, compute_uv=False)
    return float(jnp.max(jnp.arccos(jnp.clip(sv, -1.0, 1.0))))


def test_randomized_refreshes_recover_exact_subspace():
    r = 6
    g = _low_rank_plus_noise(jax.random.key(0), (2,), 40, 30, r)
    g2 = g + 0.05 * jax.random.normal(jax.random.key(3), g.shape)              # drifted gradient
    sub = SubspaceIteration(8, 1)
    for left in (True, False):
        lp = projection.LeafPlan("w", g.shape, lrjax.Axes((0,), (1,), (2,)), (2,), 40, 30, left, r)
        d = 40 if left else 30

        # one jitted call per refresh: independent batched LAPACK calls in one program can run
        # concurrently, which deadlocks jaxlib 0.10's CPU kernels on 2 threads (see projection.py)
        exact_fn = jax.jit(lambda g: ExactSVD().refresh(None, g, None, lp))
        exact, exact2 = exact_fn(g), exact_fn(g2)
        start = jnp.zeros((2, d, r)) if left else exact + 0.1       # cold (left) / warm from a stale P
        warm_fn = jax.jit(lambda g, p: sub.refresh(jax.random.key(4), g, p, lp))
        cold = warm_fn(g, start)
        warm = warm_fn(g2, cold)
        pairs = [(cold, exact), (warm, exact2)]
        if left:   # the randomized SVD is side-agnostic (it returns both factors)
            pairs.append((jax.jit(lambda g: RandomizedSVD(8, 1).refresh(jax.random.key(1), g, None, lp))(g), exact))

        for p, ref in pairs:
            assert p.shape == (2, d, r)
            np.testing.assert_allclose(jnp.swapaxes(p, -1, -2) @ p, jnp.broadcast_to(jnp.eye(r), (2, r, r)),
                                       atol=1e-5)
            assert _max_principal_angle(p, ref) < 1e-2
        # the Rayleigh-Ritz step orders and signs the columns like the exact singular vectors
        np.testing.assert_allclose(jnp.abs(jnp.sum(warm * exact2, axis=-2)), 1.0, atol=1e-3)


def test_nonfinite_gradient_never_reaches_projector():
    """Rule: a refresh whose gradient is not finite is skipped (basis kept) and retried next step."""
    params = {"w": jnp.ones((6, 8)), "b": jnp.ones((8,))}
    for refresh in ("subspace",):     # the rule lives in the protocol; svd is covered below
        opt = galore(optax.scale_by_adam(), 2, update_proj_gap=4, refresh=refresh)
        s = opt.init(params)
        g = lambda t: {"w": jax.random.normal(jax.random.key(t), (6, 8)), "b": jnp.ones(8)}  # noqa: E731
        _, s = opt.update(g(0), s)
        b0 = s.basis["w"]
        s = s._replace(count=jnp.asarray(4, jnp.int32))                  # next step is a refresh
        bad = g(1)
        bad["w"] = bad["w"].at[2, 3].set(jnp.nan)
        u, s = jax.jit(opt.update)(bad, s)
        assert bool(jnp.all(jnp.isfinite(s.basis["w"]))) and np.allclose(s.basis["w"], b0)
        assert bool(s.pending["w"]) and not bool(jnp.all(jnp.isfinite(u["w"])))   # loud, not hidden
        _, s = jax.jit(opt.update)(g(2), s)                                 # retried: refreshed now
        assert not bool(s.pending["w"]) and not np.allclose(s.basis["w"], b0)
        assert bool(jnp.all(jnp.isfinite(s.basis["w"])))


def test_nonfinite_in_one_layer_of_a_stack_only_skips_that_layer():
    opt = galore(optax.scale_by_adam(), 2, update_proj_gap=1)
    s = opt.init({"s": jnp.ones((3, 6, 8))})
    g = _randn(0, (3, 6, 8))
    _, s = opt.update({"s": g}, s)
    b0 = s.basis["s"]
    _, s = opt.update({"s": (2 * g[::-1]).at[1, 0, 0].set(jnp.inf)}, s)
    assert np.allclose(s.basis["s"][1], b0[1]) and not np.allclose(s.basis["s"][0], b0[0])
    assert s.pending["s"].tolist() == [False, True, False]


# ----------------------------------------------------------------------------- memory
def test_state_bytes_equal_theoretical_count():
    params = {"w1": jnp.zeros((64, 32)), "stack": jnp.zeros((3, 16, 48)), "b": jnp.zeros((32,)),
              "emb": {"embedding": jnp.zeros((10, 16))}}
    r = 4
    for refresh in ("svd", "eigh", "subspace"):
        opt = galore(optax.scale_by_adam(), r, refresh=refresh)
        state = opt.init(params)
        th = theoretical_state_bytes(params, rank=r, basis=ExactSVD())
        # by hand: moments r x max(M, N) (std side), P: min(M, N) x r, full Adam elsewhere
        proj = 2 * 4 * (r * 64 + 3 * r * 48)
        bas = 4 * (32 * r + 3 * 16 * r)
        full = 2 * 4 * (32 + 160)
        assert th == {"projected": proj, "basis": bas, "full": full, "total": proj + bas + full}
        # the rest is bookkeeping: two int32 step counts and the pending flags (bool per matrix)
        assert nbytes(state) == th["total"] + 4 + 4 + (1 + 3)
    # r/m of Adam's moments for a square matrix
    sq = {"w": jnp.zeros((128, 128))}
    th = theoretical_state_bytes(sq, rank=16, basis=ExactSVD())
    assert th["projected"] / nbytes(optax.adam(1e-3).init(sq)[0].mu) / 2 == 16 / 128


def test_checkpoint_roundtrip(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    from lrjax import checkpoint
    params = _mlp_params()
    opt = galore(optax.scale_by_adam(), 2, update_proj_gap=3, refresh="subspace")
    _, state, _ = _train(optax.chain(opt, optax.scale(-LR)), params, 4)
    checkpoint.save_state(tmp_path / "ck", 4, state)
    back = checkpoint.restore_state(tmp_path / "ck", like=jax.eval_shape(lambda: state))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors():
    adam = optax.scale_by_adam()
    params = {"w": jnp.ones((6, 8)), "b": jnp.ones(8)}
    with pytest.raises(ValueError, match="rank"):
        galore(adam, 0)
    with pytest.raises(TypeError, match="rank"):
        galore(adam, 2.5)
    with pytest.raises(ValueError, match="rank=7.*'w'"):
        galore(adam, 7).init(params)
    with pytest.raises(ValueError, match="update_proj_gap"):
        galore(adam, 2, update_proj_gap=0)
    with pytest.raises(ValueError, match="side"):
        galore(adam, 2, side="middle")
    with pytest.raises(ValueError, match="refresh"):
        galore(adam, 2, refresh="qr")
    with pytest.raises(TypeError, match="axes"):
        galore(adam, 2, axes=[0, 1])
    with pytest.raises(ValueError, match="axes"):
        galore(adam, 2, axes=lrjax.Axes((), (0,), (2,))).init(params)      # unknown axis 2
    with pytest.raises(ValueError, match="targets"):
        galore(adam, 2, targets="kernel").init(params)                      # matches nothing
    with pytest.raises(ValueError, match="ndim >= 2"):
        galore(adam, 2, targets="b").init(params)                           # a vector
    with pytest.raises(TypeError, match="inner needs `params`.*weight_decay"):
        galore(optax.adamw(1e-3), 2)
    with pytest.raises(TypeError, match="inner needs `params`"):
        galore(optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-2)), 2)
    with pytest.raises(TypeError, match="inner must be an optax"):
        galore("adam", 2)
    with pytest.raises(ValueError, match="oversample"):
        galore(adam, 2, refresh="randomized", oversample=-1)
