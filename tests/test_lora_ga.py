"""LoRA-GA (lrjax.reparam.lora_ga): both semantics against independent references.

* official semantics vs a float64 NumPy transcription of the official ``lora_ga_init`` (torch
  orientation, exact SVD, lrjax's documented sign rule);
* PEFT semantics vs a float64 NumPy transcription of PEFT's ``lora_ga_init`` and vs PEFT itself on
  torch (``preprocess_loraga`` + ``get_peft_model``);
* the one-step invariant ``dW_eff = -eta s^2 c^2 trunc_2r(G) + O(eta^2)``; output unchanged at init;
  jit/stacked leaves/vmap; bad input.
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax.reparam import estimate_grads
from lrjax.reparam.lora_ga import LoRAGA

T, V = TypeError, ValueError


def _params(dtype=jnp.float32):
    rng = np.random.default_rng(3)  # NumPy draws: no eager jax.random program per shape
    f = lambda s, c=1.0: jnp.asarray((c * rng.standard_normal(s)).astype(np.float32), dtype)  # noqa: E731
    return {"d0": {"kernel": f((6, 8)), "bias": jnp.zeros(8, dtype)},
            "d1": {"kernel": f((8, 4), 0.5), "bias": jnp.zeros(4, dtype)}}


def _loss(p, batch):
    x, y = batch
    p = jax.tree.map(lambda t: t.astype(jnp.float32), p)
    h = jnp.tanh(x @ p["d0"]["kernel"] + p["d0"]["bias"])
    return jnp.mean((h @ p["d1"]["kernel"] + p["d1"]["bias"] - y) ** 2)


def _batches(n=3):
    rng = np.random.default_rng(0)
    return [(jnp.asarray(rng.standard_normal((5, 6)), jnp.float32),
             jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)) for _ in range(n)]


_GRADS = {}


def _grads(dtype=jnp.float32):
    if dtype not in _GRADS:
        _GRADS[dtype] = estimate_grads(_loss, _params(dtype), _batches(), "kernel")
    return _GRADS[dtype]


def _np(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


# ------------------------------------------------------------------ float64 NumPy transcriptions
def _svd_pinned(g_t):
    """SVD of the torch-orientation gradient ``G = U S Vh`` with lrjax's sign rule: lrjax factorizes
    the view ``G^T = V S U^T`` and makes the largest-magnitude entry of each left vector (``V[:, i]``,
    i.e. ``Vh[i]``) positive, flipping ``U[:, i]`` with it."""
    u, s, vh = np.linalg.svd(g_t, full_matrices=False)
    for i in range(len(s)):
        j = np.argmax(np.abs(vh[i]))
        if vh[i, j] < 0:
            vh[i] *= -1
            u[:, i] *= -1
    return u, s, vh


def _indices(direction, r):
    ar = np.arange(r)
    return {"ArB2r": (ar, ar + r), "ArBr": (2 * ar + 1, 2 * ar), "A2rBr": (ar + r, ar)}[direction]


def _official_np(w_t, g_t, r, s, direction="ArB2r", scale="stable", gamma=16.0, norm_clip=False):
    """The official ``LoraLayer.lora_ga_init`` (Outsider565/LoRA-GA) in float64, torch orientation."""
    u, sv, vh = _svd_pinned(g_t)
    ia, ib = _indices(direction, r)
    a, b = vh[ia, :], u[:, ib]                      # A: r x n, B: m x r
    m = g_t.shape[0]
    if scale == "stable":
        c = m ** 0.25 / gamma ** 0.5
        a, b = a * c, b * c
    elif scale == "gd":
        a, b = a / s, b / s
    elif scale == "weightS":
        sw = np.linalg.svd(w_t, compute_uv=False)
        avg = np.mean(np.sqrt(sw[:r] / s))
        a, b = a * avg, b * avg
    off = s * b @ a
    if norm_clip:
        ratio = np.max(np.abs(w_t)) / np.max(np.abs(off))
        if ratio < 1:
            off, a, b = off * ratio, a * ratio ** 0.5, b * ratio ** 0.5
    return a, b, w_t - off


def _peft_np(w_t, g_t, r, s, direction="ArB2r", scale="stable", gamma=16.0):
    """PEFT 0.21.2 ``LoraLayer.lora_ga_init`` in float64, torch orientation."""
    u, sv, vh = _svd_pinned(g_t)
    ia, ib = _indices(direction, r)
    a, b = vh[ia, :], u[:, ib] * sv[ib]
    m = w_t.shape[0]
    if scale == "stable":
        b = b * m ** 0.25 / gamma ** 0.5
    elif scale == "weightS":
        sw = np.linalg.svd(w_t, compute_uv=False)
        if sv[ib][0] > 0:
            b = b * sw[0] / sv[ib][0]
    elif scale == "gd":
        a, b = a / s, b / s
    return a, b, w_t - s * b @ a


def _check_against(rp, ref, **kw):
    p, g = _params(), _grads()
    base, ad = rp.init(jax.random.key(0), p, grads=g)
    for path, (mod, leaf) in {"d0/kernel": ("d0", "kernel"), "d1/kernel": ("d1", "kernel")}.items():
        w_t, g_t = _np(p[mod][leaf]).T, _np(g[path]).T
        a_t, b_t, w_new = ref(w_t, g_t, rp.rank, rp.scale, **kw)
        np.testing.assert_allclose(_np(ad[path]["a"]), a_t.T, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(_np(ad[path]["b"]), b_t.T, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(_np(base[mod][leaf]), w_new.T, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "stable"), ("A2rBr", "stable"),
                                             ("ArB2r", "gd"), ("ArB2r", "unit"), ("ArB2r", "weightS")])
def test_official_matches_float64_transcription(direction, scale):
    rp = LoRAGA(rank=2, alpha=4.0, direction=direction, init_scale=scale)
    assert rp.semantics == "official"
    _check_against(rp, _official_np, direction=direction, scale=scale)


def test_official_norm_clip_matches_transcription():
    # gamma tiny -> huge factors, so the clip is active on both leaves
    rp = LoRAGA(rank=2, alpha=4.0, stable_gamma=1e-6, norm_clip=True)
    _check_against(rp, _official_np, gamma=1e-6, norm_clip=True)


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("A2rBr", "gd_scale"), ("ArBr", "unit"),
                                             ("ArB2r", "weight_svd")])
def test_peft_semantics_matches_float64_transcription(direction, scale):
    rp = LoRAGA(rank=2, alpha=4.0, semantics="peft", direction=direction, init_scale=scale)
    canon = {"gd_scale": "gd", "weight_svd": "weightS"}.get(scale, scale)
    assert rp.init_scale == canon
    _check_against(rp, _peft_np, direction=direction, scale=canon)


def test_random_direction_picks_disjoint_or_shared_singular_pairs():
    p, g = _params(), _grads()
    u, sv, vt = (np.asarray(x, np.float64) for x in jax.tree.map(np.asarray, _svd_view(g["d0/kernel"])))
    for sem in ("official", "peft"):
        rp = LoRAGA(rank=2, semantics=sem, direction="random", init_scale="unit")
        _, ad = rp.init(jax.random.key(5), p, grads=g)
        a, b = _np(ad["d0/kernel"]["a"]), _np(ad["d0/kernel"]["b"])
        ia = [int(np.argmax(np.abs(u.T @ a[:, i]))) for i in range(2)]
        np.testing.assert_allclose(np.abs(u[:, ia]), np.abs(a), atol=1e-5)
        bn = b / np.linalg.norm(b, axis=1, keepdims=True)
        ib = [int(np.argmax(np.abs(vt @ bn[i]))) for i in range(2)]
        np.testing.assert_allclose(np.abs(vt[ib]), np.abs(bn), atol=1e-5)
        assert set(ia) | set(ib) <= {0, 1, 2, 3}
        if sem == "official":
            assert set(ia).isdisjoint(ib) and len(set(ia)) == 2
        else:
            assert ia == ib
            np.testing.assert_allclose(np.linalg.norm(b, axis=1), sv[ib], rtol=1e-5)


def _svd_view(g):
    from lrjax import linalg
    return linalg.svd(g, 4)


# ----------------------------------------------------------------------------- the invariant
@pytest.mark.parametrize("eta", [1e-3, 1e-4])
def test_one_sgd_step_follows_the_rank_2r_gradient(eta):
    """With G the mean gradient at init (W_eff = W), one SGD step on (a, b) changes W_eff by
    -eta s^2 c^2 trunc_2r(G) + O(eta^2) (official, ArB2r, stable, alpha != r)."""
    rp = LoRAGA(rank=2, alpha=6.0, stable_gamma=4.0)
    p, g, bs = _params(), _grads(), _batches()
    base, ad = rp.init(jax.random.key(0), p, grads=g)
    mean_loss = lambda q: sum(_loss(q, b) for b in bs) / len(bs)
    ga = jax.grad(lambda f: mean_loss(rp.materialize(base, f)))(ad)
    s = rp.scale
    for path, n_out in (("d0/kernel", 8), ("d1/kernel", 4)):
        a, b = _np(ad[path]["a"]), _np(ad[path]["b"])
        da, db = _np(ga[path]["a"]), _np(ga[path]["b"])
        c2 = n_out ** 0.5 / 4.0
        u, sv, vt = np.linalg.svd(_np(g[path]), full_matrices=False)
        trunc = (u[:, :4] * sv[:4]) @ vt[:4]
        # first-order change is exactly s (a db + da b) = s^2 (a a^T G + G b^T b) = s^2 c^2 trunc_2r(G)
        np.testing.assert_allclose(s * (a @ db + da @ b), s * s * c2 * trunc, rtol=1e-4,
                                   atol=1e-5 * np.abs(trunc).max())
        step = s * ((a - eta * da) @ (b - eta * db) - a @ b)
        err = np.abs(step + eta * s * s * c2 * trunc).max()
        assert err <= 2 * eta ** 2 * s * np.abs(da).max() * np.abs(db).max() * a.shape[1] + 1e-9
        # the best rank-2r approximation, not rank-r: the trunc_r part alone is clearly different
        trunc_r = (u[:, :2] * sv[:2]) @ vt[:2]
        assert np.abs(s * (a @ db + da @ b) - s * s * c2 * trunc_r).max() > 0.1 * s * s * c2 * sv[2]


# ---------------------------------------------------------------- output unchanged, dtypes
@pytest.mark.parametrize("semantics", ["official", "peft"])
def test_output_unchanged_at_init_float32_and_bfloat16(semantics):
    for dtype, fdtype in ((jnp.float32, None), (jnp.float32, "bfloat16"), (jnp.bfloat16, None)):
        rp = LoRAGA(rank=2, alpha=16.0, semantics=semantics, dtype=fdtype)
        p = _params(dtype)
        base, ad = rp.init(jax.random.key(0), p, grads=_grads(dtype))
        assert base["d0"]["kernel"].dtype == dtype and ad["d0/kernel"]["a"].dtype == (fdtype or dtype)
        assert base["d0"]["bias"] is p["d0"]["bias"]
        eff = rp.materialize(base, ad)
        for mod in ("d0", "d1"):
            w, res, e = _np(p[mod]["kernel"]), _np(base[mod]["kernel"]), _np(eff[mod]["kernel"])
            assert np.abs(res - w).max() > 1e-3  # the base really is rewritten
            ulp = float(jnp.finfo(dtype).eps) * np.maximum(np.abs(w), np.abs(res))
            assert np.all(np.abs(e - w) <= ulp + 1e-30), (dtype, fdtype, mod)


def test_zero_gradient_is_refused_and_rank_one_gradient_is_finite():
    """An all-zero gradient means the leaf is off the loss path: refused, naming the leaf. A
    rank-deficient (rank-1) gradient has zero singular values beyond the first: finite factors,
    output unchanged."""
    p = _params()
    g0 = {k: jnp.zeros_like(v) for k, v in _grads().items()}
    with pytest.raises(ValueError, match=r"grads\['d0/kernel'\] is all zeros"):
        LoRAGA(rank=2).init(jax.random.key(0), p, grads=g0)
    g = {k: jnp.outer(jnp.arange(1.0, v.shape[0] + 1), jnp.cos(jnp.arange(v.shape[1]))) for k, v in _grads().items()}
    for sem in ("official", "peft"):
        for sc in ("stable", "weightS"):
            rp = LoRAGA(rank=2, semantics=sem, init_scale=sc)
            base, ad = rp.init(jax.random.key(0), p, grads=g)
            assert all(np.all(np.isfinite(_np(x))) for f in ad.values() for x in f.values())
            np.testing.assert_allclose(_np(rp.materialize(base, ad)["d0"]["kernel"]), _np(p["d0"]["kernel"]),
                                       atol=1e-6)


def test_randomized_svd_option_matches_exact_when_the_sketch_is_full():
    # sketch width min(4r, M, N) = min(M, N) here, so the range finder is exact
    p, g = _params(), _grads()
    _, ad0 = LoRAGA(rank=2).init(jax.random.key(0), p, grads=g)
    _, ad1 = LoRAGA(rank=2, n_iter=4).init(jax.random.key(0), p, grads=g)
    for k in ad0:
        for f in ("a", "b"):
            np.testing.assert_allclose(_np(ad1[k][f]), _np(ad0[k][f]), atol=2e-5)


# ------------------------------------------------------------------------- jit, stacks, vmap
def test_init_inside_jit_with_stacked_estimate_grads():
    rp = LoRAGA(rank=2, alpha=4.0)
    p, bs = _params(), _batches()
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *bs)

    @jax.jit
    def init_from_data(params, batches):
        return rp.init(jax.random.key(0), params, grads=estimate_grads(_loss, params, batches, rp.targets,
                                                                       stacked=True))
    base, ad = init_from_data(p, stacked)
    base0, ad0 = rp.init(jax.random.key(0), p, grads=_grads())
    for k in ad:
        for f in ("a", "b"):
            np.testing.assert_allclose(_np(ad[k][f]), _np(ad0[k][f]), atol=1e-5)
    np.testing.assert_allclose(_np(base["d1"]["kernel"]), _np(base0["d1"]["kernel"]), atol=1e-5)


@pytest.mark.parametrize("direction", ["ArB2r", "random"])
def test_stacked_leaves_equal_per_slice_init_and_vmap(direction):
    """A [L, M, N] leaf (lrjax.axes: batch axis 0) is L independent LoRA-GA inits."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((3, 8, 6)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 8, 6)), jnp.float32)
    rp = LoRAGA(rank=2, alpha=4.0, direction=direction, init_scale="weightS")
    base, ad = rp.init(jax.random.key(0), {"stack": {"kernel": w}}, grads={"stack/kernel": g})
    assert ad["stack/kernel"]["a"].shape == (3, 8, 2) and ad["stack/kernel"]["b"].shape == (3, 2, 6)
    vb, vad = jax.vmap(lambda wi, gi: rp.init(jax.random.key(0), {"kernel": wi}, grads={"kernel": gi}))(w, g)
    for i in range(3):
        bi, adi = rp.init(jax.random.key(0), {"kernel": w[i]}, grads={"kernel": g[i]})
        if direction != "random":  # the random permutation is drawn per slice from the stack's key
            np.testing.assert_allclose(_np(ad["stack/kernel"]["a"][i]), _np(adi["kernel"]["a"]), atol=1e-5)
            np.testing.assert_allclose(_np(ad["stack/kernel"]["b"][i]), _np(adi["kernel"]["b"]), atol=1e-5)
            np.testing.assert_allclose(_np(base["stack"]["kernel"][i]), _np(bi["kernel"]), atol=1e-5)
        np.testing.assert_allclose(_np(vad["kernel"]["a"][i]), _np(adi["kernel"]["a"]), atol=1e-5)
        np.testing.assert_allclose(_np(vb["kernel"][i]), _np(bi["kernel"]), atol=1e-5)
    eff = rp.materialize(base, ad)
    np.testing.assert_allclose(_np(eff["stack"]["kernel"]), _np(w), atol=1e-5)


# ----------------------------------------------------------------------------- PEFT on torch
@pytest.mark.filterwarnings("ignore:Full backward hook")  # PEFT's gradient-count hook on an input without grad
@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "gd_scale"), ("A2rBr", "unit"),
                                             ("ArB2r", "weight_svd")])
def test_peft_semantics_matches_peft_on_torch(direction, scale):
    """PEFT's preprocess_loraga + get_peft_model(init_lora_weights="lora_ga") on a tiny torch MLP with
    the same data. PEFT's SVD is torch.svd_lowrank(G, q=min(4r, m, n), niter=4); with r=2 and these
    shapes q = min(m, n), so its range finder spans the whole range and the SVD is exact up to
    rounding. Singular-vector signs are backend choices: factors are compared per column/row up to
    sign, and each code's rewritten base against W - s B A with its own factors. ``weight_svd`` uses
    svd_lowrank(W, q=r, niter=4) for W's top singular value, a randomized estimate (not exact at
    q=r): B is compared to 1e-2 relative there."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga
    from lrjax.interop import params_from_torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.d0, self.d1 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.d1(torch.tanh(self.d0(x)))

    torch.manual_seed(0)
    net = Net()
    params = params_from_torch(net)
    bs = _batches()
    r, alpha = 2, 8
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["d0", "d1"], init_lora_weights="lora_ga",
                          lora_ga_config=LoraGAConfig(direction=direction, scale=scale, stable_gamma=16))
    model = copy.deepcopy(net)

    def train_step():
        for x, y in bs:
            loss = ((model(torch.from_numpy(np.array(x))) - torch.from_numpy(np.array(y))) ** 2).mean()
            loss.backward()
    preprocess_loraga(model, cfg, train_step)
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, cfg)
    rp = LoRAGA(rank=r, alpha=alpha, semantics="peft", direction=direction, init_scale=scale)
    g = estimate_grads(_loss, params, bs, rp.targets)
    base, ad = rp.init(jax.random.key(0), params, grads=g)
    s = rp.scale
    btol = 1e-2 if scale == "weight_svd" else 1e-5
    for name in ("d0", "d1"):
        mod = getattr(pm.base_model.model, name)
        a_t = mod.lora_A["default"].weight.detach().double().numpy()   # r x in
        b_t = mod.lora_B["default"].weight.detach().double().numpy()   # out x r
        w_t = mod.base_layer.weight.detach().double().numpy()          # rewritten base, out x in
        a, b = _np(ad[f"{name}/kernel"]["a"]), _np(ad[f"{name}/kernel"]["b"])
        sa, sb = np.sign(np.sum(a * a_t.T, 0)), np.sign(np.sum(b * b_t.T, 1))
        np.testing.assert_allclose(a * sa, a_t.T, atol=1e-5)
        np.testing.assert_allclose(b * sb[:, None], b_t.T, atol=btol * np.abs(b).max())
        w0 = _np(params[name]["kernel"])
        np.testing.assert_allclose(w_t.T, w0 - s * a_t.T @ b_t.T, atol=1e-5)      # PEFT's own rewrite rule
        np.testing.assert_allclose(_np(base[name]["kernel"]), w0 - s * a @ b, atol=1e-5)
        # the same rewritten base once lrjax's factors take PEFT's singular-vector signs
        np.testing.assert_allclose(w0 - s * (a * sa) @ (b * sb[:, None]), w_t.T, atol=btol * np.abs(w0).max())


# -------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make,exc,match", [
    (lambda: LoRAGA(semantics="torch"), V, "semantics"),
    (lambda: LoRAGA(semantics=1), T, "semantics"),
    (lambda: LoRAGA(direction="BA"), V, "direction"),
    (lambda: LoRAGA(init_scale="big"), V, "init_scale"),
    (lambda: LoRAGA(init_scale=None), T, "init_scale"),
    (lambda: LoRAGA(stable_gamma=0.0), V, "stable_gamma"),
    (lambda: LoRAGA(stable_gamma="16"), T, "stable_gamma"),
    (lambda: LoRAGA(n_iter=-1), V, "n_iter"),
    (lambda: LoRAGA(n_iter=2.0), T, "n_iter"),
    (lambda: LoRAGA(norm_clip="yes"), T, "norm_clip"),
    (lambda: LoRAGA(norm_clip=True, semantics="peft"), V, "norm_clip"),
])
def test_bad_config(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bad_init_input():
    p, g = _params(), _grads()
    with pytest.raises(V, match="grads: LoRAGA is a data-aware init"):
        LoRAGA(rank=2).init(jax.random.key(0), p)
    with pytest.raises(V, match=r"grads: 'd0/bias' is not targeted"):
        LoRAGA(rank=2).init(jax.random.key(0), p, grads={**g, "d0/bias": jnp.zeros(8)})
    with pytest.raises(V, match=r"grads has no entry for the targeted leaf 'd1/kernel'"):
        LoRAGA(rank=2).init(jax.random.key(0), p, grads={"d0/kernel": g["d0/kernel"]})
    # 2r singular vectors: rank 3 fits min(M, N) = 4 of d1 by lrjax's rule but not LoRA-GA's 2r <= 4
    with pytest.raises(V, match=r"rank=3: LoRA-GA needs 2\*rank = 6 .* 'd1/kernel' .* rank <= 2"):
        LoRAGA(rank=3).init(jax.random.key(0), p, grads=g)
    with pytest.raises(V, match=r"rank=7 exceeds min\(M, N\) = 6 for leaf 'd0/kernel'"):
        LoRAGA(rank=7).init(jax.random.key(0), p, grads=g)


# ------------------------------------------------------------------ factored path, export math
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_factored_equals_materialized(dtype):
    import lrjax
    rp = LoRAGA(rank=2, alpha=4.0)
    p = _params(dtype)
    base, ad = rp.init(jax.random.key(0), p, grads=_grads(dtype))
    ad = {k: {"a": (f["a"].astype(jnp.float32) * 1.5).astype(dtype), "b": f["b"]} for k, f in ad.items()}

    def fwd(q, x):
        h = jnp.tanh(x.astype(dtype) @ q["d0"]["kernel"] + q["d0"]["bias"])
        return h @ q["d1"]["kernel"] + q["d1"]["bias"]
    x = jnp.asarray(np.random.default_rng(3).standard_normal((7, 6)), dtype)
    stats = lrjax.reparam.FactoredStats()
    y_f = lrjax.factored(fwd, rp, stats=stats)(base, ad, x)
    y_m = fwd(rp.materialize(base, ad), x)
    assert stats.factored == 2 and not stats.fallback
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(_np(y_f), _np(y_m), rtol=tol, atol=tol)


def test_rank_2r_conversion_gives_a_lora_on_the_original_weights():
    """What a PEFT export of LoRA-GA must write (rewrites_base): W_res + s A B = W + s [A | A0][B ; -B0]."""
    from lrjax.interop import pissa_to_lora
    rp = LoRAGA(rank=2, alpha=4.0)
    p = _params()
    base, ad0 = rp.init(jax.random.key(0), p, grads=_grads())
    ad = {k: {"a": f["a"] + 0.1, "b": f["b"] - 0.2} for k, f in ad0.items()}   # "trained"
    lora, conv = pissa_to_lora(rp, ad, ad0)
    assert lora.rank == 4 and lora.scale == rp.scale
    np.testing.assert_allclose(_np(lora.materialize(p, conv)["d0"]["kernel"]),
                               _np(rp.materialize(base, ad)["d0"]["kernel"]), atol=1e-5)
