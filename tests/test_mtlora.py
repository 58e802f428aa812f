"""MTLoRA (lrjax.reparam.mtlora): shared + task-specific adapters with a leading task axis.

References: a float64 NumPy transcription of the official ``MTLoRALinear.forward`` equations
(scale-lab/MTLoRA models/lora.py) and of the per-task stream weights; invariants (per-task merge =
stream, vmap over tasks = per-task loop, gradients reach only the task's own factors)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax.reparam.mtlora import MTLoRA

T, V = TypeError, ValueError
NT = 3


def _params(dtype=jnp.float32, stacked=False):
    rng = np.random.default_rng(0)  # NumPy draws: no eager jax.random program per shape
    w2 = (4, 8, 5) if stacked else (8, 5)
    f = lambda s: jnp.asarray((rng.standard_normal(s) / 3).astype(np.float32), dtype)  # noqa: E731
    return {"fc1": {"kernel": f((6, 8)), "bias": jnp.zeros(8, dtype)},
            "fc2": {"kernel": f(w2), "bias": jnp.full(5, 0.1, dtype)}}


def _rp(**kw):
    cfg = dict(rank=2, task_rank=3, num_tasks=NT, targets="kernel", task_targets="fc2/kernel",
               shared_scale=4.0, task_scale=(1.0, 2.0, 0.5))
    cfg.update(kw)
    return MTLoRA(**cfg)


def _random_adapters(rp, params, seed=1, dtype=None):
    """init, then every B (shared and per task) random so every term is non-zero."""
    base, ad = rp.init(jax.random.key(0), params)
    rng = np.random.default_rng(seed)
    out = {}
    for p, f in ad.items():
        out[p] = {}
        for n, x in f.items():
            v = x if n in ("a", "ta") else jnp.asarray(rng.standard_normal(x.shape) / 3, x.dtype)
            out[p][n] = v.astype(dtype) if dtype is not None else v
    return base, out


def _np(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _official(x, w, bias, f, s_sh, s_t, mode, x_tasks=None):
    """float64 transcription of MTLoRALinear.forward (torch orientation transposed to x @ W)."""
    x, w, bias = _np(x), _np(w), _np(bias)
    a, b, ta, tb = (_np(f[k]) for k in ("a", "b", "ta", "tb"))
    pre = x @ w + bias
    lora = s_sh * (x @ a @ b)
    y_sh = pre + lora
    ys = []
    for t in range(ta.shape[0]):
        xt = x if x_tasks is None else _np(x_tasks)[t]
        y = pre + s_t[t] * (xt @ ta[t] @ tb[t])
        ys.append(y + lora if mode == "matrixv2" else y)
    return y_sh, np.stack(ys)


def _w_task(w, f, t, s_sh, s_t, mode):
    """float64 per-task stream weight W_t (matrix view)."""
    w = _np(w) + s_t[t] * (_np(f["ta"])[t] @ _np(f["tb"])[t])
    return w + s_sh * (_np(f["a"]) @ _np(f["b"])) if mode == "matrixv2" else w


# ------------------------------------------------------------------------------------- equations
@pytest.mark.parametrize("mode", ["matrix", "matrixv2"])
@pytest.mark.parametrize("own_inputs", [False, True])
def test_linear_is_the_official_layer(mode, own_inputs):
    rp = _rp(shared_mode=mode)
    params = _params()
    base, ad = _random_adapters(rp, params)
    f, w, bias = ad["fc2/kernel"], params["fc2"]["kernel"], params["fc2"]["bias"]
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)  # leading batch dims [..., M]
    xt = jnp.asarray(rng.standard_normal((NT, 2, 4, 8)), jnp.float32) if own_inputs else None
    y_sh, y_t = rp.linear(w, f, x, x_tasks=xt, bias=bias)
    r_sh, r_t = _official(x, w, bias, f, 4.0, (1.0, 2.0, 0.5), mode, xt)
    np.testing.assert_allclose(np.asarray(y_sh), r_sh, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y_t), r_t, rtol=1e-5, atol=1e-5)
    assert y_sh.shape == (2, 4, 5) and y_t.shape == (NT, 2, 4, 5)


@pytest.mark.parametrize("mode", ["matrix", "matrixv2"])
def test_streams_equal_numpy_and_per_task_merge(mode):
    rp = _rp(shared_mode=mode)
    params = _params()
    base, ad = _random_adapters(rp, params)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((7, 8)), jnp.float32)
    pt = rp.materialize_tasks(base, ad)
    f = ad["fc2/kernel"]
    s_t = (1.0, 2.0, 0.5)
    assert pt["fc2"]["kernel"].shape == (NT, 8, 5)
    # the non-TS target carries the shared weight, no task axis
    np.testing.assert_allclose(_np(pt["fc1"]["kernel"]), _np(params["fc1"]["kernel"]) + 4.0 * _np(
        ad["fc1/kernel"]["a"]) @ _np(ad["fc1/kernel"]["b"]), rtol=1e-5, atol=1e-6)
    # shared stream: W + s_sh A B
    sh = rp.materialize_shared(base, ad)["fc2"]["kernel"]
    np.testing.assert_allclose(_np(sh), _np(params["fc2"]["kernel"]) + 4.0 * _np(f["a"]) @ _np(f["b"]), rtol=1e-5,
                               atol=1e-6)
    _, r_t = _official(x, params["fc2"]["kernel"], params["fc2"]["bias"], f, 4.0, s_t, mode)
    for t in range(NT):
        np.testing.assert_allclose(_np(pt["fc2"]["kernel"][t]), _w_task(params["fc2"]["kernel"], f, t, 4.0, s_t, mode),
                                   rtol=1e-5, atol=1e-6)
        merged = rp.merge_task(base, ad, t)
        np.testing.assert_array_equal(np.asarray(merged["fc2"]["kernel"]), np.asarray(pt["fc2"]["kernel"][t]))
        np.testing.assert_array_equal(np.asarray(merged["fc1"]["kernel"]), np.asarray(pt["fc1"]["kernel"]))
        # merged stream on the shared input = the official layer's task output
        y = x @ merged["fc2"]["kernel"] + merged["fc2"]["bias"]
        np.testing.assert_allclose(np.asarray(y), r_t[t], rtol=1e-5, atol=1e-5)


def test_task_scale_and_mode_matter():
    """Invariants that fail if the scales or the modes were mixed up."""
    params = _params()
    rp1 = _rp(task_scale=1.0)
    base, ad = _random_adapters(rp1, params)
    w1 = rp1.materialize_tasks(base, ad)["fc2"]["kernel"]
    w2 = _rp(task_scale=2.0).materialize_tasks(base, ad)["fc2"]["kernel"]
    w0 = params["fc2"]["kernel"]
    np.testing.assert_allclose(_np(w2 - w0), 2 * _np(w1 - w0), rtol=1e-5, atol=1e-6)
    wv2 = _rp(task_scale=1.0, shared_mode="matrixv2").materialize_tasks(base, ad)["fc2"]["kernel"]
    sh = rp1.materialize(base, ad)["fc2"]["kernel"]
    np.testing.assert_allclose(_np(wv2 - w1), np.broadcast_to(_np(sh - w0), (NT, 8, 5)), rtol=1e-5, atol=1e-6)


def test_init_every_stream_is_the_base():
    params = _params()
    rp = _rp()
    base, ad = rp.init(jax.random.key(4), params)
    assert base is params
    f = ad["fc2/kernel"]
    assert set(ad["fc1/kernel"]) == {"a", "b"} and set(f) == {"a", "b", "ta", "tb"}
    assert f["ta"].shape == (NT, 8, 3) and f["tb"].shape == (NT, 3, 5)
    assert not np.any(np.asarray(f["tb"])) and not np.any(np.asarray(f["b"]))
    bound = 1 / np.sqrt(8)
    assert np.all(np.abs(np.asarray(f["ta"])) <= bound) and np.abs(np.asarray(f["ta"])).max() > bound / 2
    assert not np.allclose(np.asarray(f["ta"][0]), np.asarray(f["ta"][1]))  # a fresh A per task
    lora_a = lrjax.LoRA(rank=2).init(jax.random.key(4), params)[1]["fc2/kernel"]["a"]
    np.testing.assert_array_equal(np.asarray(f["a"]), np.asarray(lora_a))  # shared A = LoRA's for the same key
    pt = rp.materialize_tasks(base, ad)
    for t in range(NT):
        np.testing.assert_array_equal(np.asarray(pt["fc2"]["kernel"][t]), np.asarray(params["fc2"]["kernel"]))
    assert rp.num_params(ad) == (6 * 2 + 2 * 8) + (8 * 2 + 2 * 5) + NT * (8 * 3 + 3 * 5)
    assert MTLoRA(num_tasks=2).scale == 4.0 and MTLoRA(num_tasks=2).task_scales == (4.0, 4.0)


# ------------------------------------------------------------------------ streams in a model
def _model(rp, base, heads, ad, x):
    """Reference pattern: shared fc1, the last block (fc2) as T streams via vmap, per-task heads."""
    p = rp.materialize_tasks(base, ad)
    h = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    ax = rp.task_axes(base, ad)["fc2"]
    hs = jax.vmap(lambda q: jax.nn.gelu(h @ q["kernel"] + q["bias"]), in_axes=(ax,))(p["fc2"])
    return jnp.einsum("tbh,thc->tbc", hs, heads)


def test_vmap_over_tasks_equals_a_per_task_loop_and_jit_grad():
    rp = _rp()
    params = _params()
    base, ad = _random_adapters(rp, params)
    heads = jnp.asarray(np.random.default_rng(5).standard_normal((NT, 5, 4)), jnp.float32)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((7, 6)), jnp.float32)
    out = jax.jit(lambda a: _model(rp, base, heads, a, x))(ad)
    assert rp.task_axes(base, ad) == {"fc1": {"kernel": None, "bias": None}, "fc2": {"kernel": 0, "bias": None}}
    for t in range(NT):
        p = rp.materialize_task(base, ad, t)
        h = jax.nn.gelu(jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"])
        np.testing.assert_allclose(np.asarray(out[t]), np.asarray(h @ heads[t]), rtol=1e-5, atol=1e-5)
    # grad of task 1's loss: only task 1's TS factors (and the shared pair below) move
    loss = lambda a: jnp.sum(_model(rp, base, heads, a, x)[1] ** 2)
    g = jax.jit(jax.grad(loss))(ad)
    g_eager = jax.grad(loss)(ad)
    gt = g["fc2/kernel"]
    for n in ("ta", "tb"):
        assert np.all(np.asarray(gt[n][0]) == 0) and np.all(np.asarray(gt[n][2]) == 0)
        assert np.any(np.asarray(gt[n][1]) != 0)
        np.testing.assert_allclose(np.asarray(gt[n]), np.asarray(g_eager["fc2/kernel"][n]), rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(gt["a"]) == 0) and np.all(np.asarray(gt["b"]) == 0)  # "matrix": no shared term
    assert np.any(np.asarray(g["fc1/kernel"]["b"]) != 0)  # the backbone's shared pair
    gv2 = jax.grad(lambda a: jnp.sum(_model(_rp(shared_mode="matrixv2"), base, heads, a, x)[1] ** 2))(ad)
    assert np.any(np.asarray(gv2["fc2/kernel"]["b"]) != 0)  # "matrixv2": the task stream uses the shared pair


def test_grads_equal_float64_analytic():
    """L = sum(R * (x W_t)) for every t: dL/dta_t = s_t x^T R tb_t^T, dL/dtb_t = s_t ta_t^T x^T R."""
    rp = _rp()
    params = _params()
    base, ad = _random_adapters(rp, params)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((7, 8))
    r = rng.standard_normal((NT, 7, 5))
    loss = lambda a: jnp.sum(jnp.asarray(r, jnp.float32) * jnp.einsum(
        "bm,tmn->tbn", jnp.asarray(x, jnp.float32), rp.materialize_tasks(base, a)["fc2"]["kernel"]))
    g = jax.grad(loss)(ad)["fc2/kernel"]
    f = {k: _np(v) for k, v in ad["fc2/kernel"].items()}
    for t, s in enumerate((1.0, 2.0, 0.5)):
        gw = x.T @ r[t]
        np.testing.assert_allclose(np.asarray(g["ta"][t]), s * gw @ f["tb"][t].T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(g["tb"][t]), s * f["ta"][t].T @ gw, rtol=1e-4, atol=1e-5)


def test_vmap_over_adapter_sets_and_stacked_leaves():
    """jax.vmap over a batch of adapter sets; an nn.scan-style [L, in, out] leaf gets [T, L, ...]."""
    rp = _rp()
    params = _params()
    base, ad = _random_adapters(rp, params)
    two = jax.tree.map(lambda u: jnp.stack([u, 2 * u]), ad)
    out = jax.vmap(lambda a: rp.materialize_tasks(base, a)["fc2"]["kernel"])(two)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(rp.materialize_tasks(base, ad)["fc2"]["kernel"]),
                               rtol=1e-6)
    ps = _params(stacked=True)
    bs, ads = _random_adapters(rp, ps)
    f = ads["fc2/kernel"]
    assert f["ta"].shape == (NT, 4, 8, 3) and f["tb"].shape == (NT, 4, 3, 5)
    wt = rp.materialize_tasks(bs, ads)["fc2"]["kernel"]
    assert wt.shape == (NT, 4, 8, 5)
    for t in range(NT):
        for l in range(4):
            want = _np(ps["fc2"]["kernel"][l]) + (1.0, 2.0, 0.5)[t] * _np(f["ta"][t, l]) @ _np(f["tb"][t, l])
            np.testing.assert_allclose(_np(wt[t, l]), want, rtol=1e-5, atol=1e-6)


def test_shared_stream_protocol_factored_merge_unmerge_split():
    rp = _rp()
    params = _params()
    base, ad = _random_adapters(rp, params)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((3, 6)), jnp.float32)
    fwd = lambda p, x: jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(np.asarray(lrjax.factored(fwd, rp)(base, ad, x)),
                               np.asarray(fwd(rp.materialize(base, ad), x)), rtol=1e-5, atol=1e-5)
    merged = rp.merge(base, ad)
    back = rp.unmerge(merged, ad)
    np.testing.assert_allclose(np.asarray(back["fc2"]["kernel"]), np.asarray(params["fc2"]["kernel"]), atol=1e-5)
    tr, fr = rp.split(ad)
    assert set(tr["fc2/kernel"]) == {"a", "b", "ta", "tb"} and fr == {"fc1/kernel": {}, "fc2/kernel": {}}
    assert rp.join(tr, fr).keys() == ad.keys()
    assert rp.trainable_mask(ad)["fc2/kernel"] == {"a": True, "b": True, "ta": True, "tb": True}


# ------------------------------------------------------------------------------------ precision
def test_bfloat16_one_rounding():
    rp = _rp()
    p16 = _params(jnp.bfloat16)
    base, ad = _random_adapters(rp, p16, dtype=jnp.bfloat16)
    pt = rp.materialize_tasks(base, ad)
    assert pt["fc2"]["kernel"].dtype == jnp.bfloat16 and pt["fc1"]["kernel"].dtype == jnp.bfloat16
    f = ad["fc2/kernel"]
    for t in range(NT):
        want = _w_task(p16["fc2"]["kernel"], f, t, 4.0, (1.0, 2.0, 0.5), "matrix")
        got = np.asarray(pt["fc2"]["kernel"][t].astype(jnp.float32), np.float64)
        once = np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
        np.testing.assert_allclose(got, once, rtol=2 ** -7, atol=1e-6)  # one bf16 rounding (<= 1 ulp apart)
        np.testing.assert_array_equal(np.asarray(rp.merge_task(base, ad, t)["fc2"]["kernel"]),
                                      np.asarray(pt["fc2"]["kernel"][t]))
    # float32 base with bfloat16 factors: every stream is exactly the base at init
    p32 = _params()
    rp16 = _rp(dtype=jnp.bfloat16)
    b32, a16 = rp16.init(jax.random.key(0), p32)
    assert a16["fc2/kernel"]["ta"].dtype == jnp.bfloat16
    w = rp16.materialize_tasks(b32, a16)["fc2"]["kernel"]
    assert w.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(w[2]), np.asarray(p32["fc2"]["kernel"]))
    x16 = jnp.ones((2, 8), jnp.bfloat16)
    y_sh, y_t = rp.linear(p16["fc2"]["kernel"], f, x16)
    assert y_sh.dtype == y_t.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------ bad input
@functools.cache
def _made():
    rp = _rp()
    params = _params()
    base, ad = _random_adapters(rp, params)
    return rp, params, base, ad


def _with(ad, path, **kw):
    out = {p: dict(f) for p, f in ad.items()}
    for k, v in kw.items():
        if v is None:
            out[path].pop(k)
        else:
            out[path][k] = v
    return out


@functools.cache
def _bad_adapter_cases():
    rp, params, base, ad = _made()
    f = ad["fc2/kernel"]
    ta, tb = f["ta"], f["tb"]
    return [
        ("task axis mismatch", _with(ad, "fc2/kernel", tb=tb[:2]), V, "adapters.*task axis differs"),
        ("wrong num_tasks", _with(ad, "fc2/kernel", ta=ta[:2], tb=tb[:2]), V, "adapters.*num_tasks=3"),
        ("wrong task rank", _with(ad, "fc2/kernel", ta=ta[..., :2], tb=tb[:, :2]), V, "adapters.*task_rank=3"),
        ("ranks differ", _with(ad, "fc2/kernel", ta=ta[..., :2]), V, "adapters"),
        ("no task axis", _with(ad, "fc2/kernel", ta=ta[0], tb=tb[0]), V, "adapters.*leading task axis"),
        ("ta without tb", _with(ad, "fc2/kernel", tb=None), V, "adapters.*'ta' but no 'tb'"),
        ("wrong M", _with(ad, "fc2/kernel", ta=ta[:, :4], tb=tb), V, "adapters"),
        ("integer ta", _with(ad, "fc2/kernel", ta=ta.astype(jnp.int32)), T, "adapters"),
        ("list ta", _with(ad, "fc2/kernel", ta=np.asarray(ta).tolist()), T, "adapters"),
        ("unknown factor", _with(ad, "fc2/kernel", m=ta), V, "adapters.*unknown factor"),
        ("no shared pair", _with(ad, "fc1/kernel", a=None), V, "adapters.*no factor 'a'"),
        ("shared rank", _with(ad, "fc1/kernel", a=ad["fc1/kernel"]["a"][:, :1], b=ad["fc1/kernel"]["b"][:1]), V,
         "adapters.*rank=2"),
        ("not a dict", [f], T, "adapters"),
        ("empty", {}, V, "adapters"),
    ]


@pytest.mark.parametrize("i", range(14))
@pytest.mark.parametrize("meth", ["materialize", "materialize_tasks", "merge_task", "task_axes"])
def test_bad_adapters(i, meth):
    rp, params, base, ad = _made()
    what, bad, exc, match = _bad_adapter_cases()[i]
    call = {"materialize": lambda: rp.materialize(base, bad),
            "materialize_tasks": lambda: rp.materialize_tasks(base, bad),
            "merge_task": lambda: rp.merge_task(base, bad, 0),
            "task_axes": lambda: rp.task_axes(base, bad)}[meth]
    if meth == "materialize" and what == "empty":
        match = "adapters"
    with pytest.raises(exc, match=match):
        call()


def test_bad_task_index_nonfinite_and_no_task_factors():
    rp, params, base, ad = _made()
    for bad, exc in [(3, V), (-1, V), (1.0, T), ("0", T), (True, T), (jnp.int32(5), V)]:
        with pytest.raises(exc, match="task"):
            rp.merge_task(base, ad, bad)
    with pytest.raises(T, match="task"):
        jax.jit(lambda t: rp.materialize_task(base, ad, t))(1)
    assert rp.merge_task(base, ad, jnp.int32(2))["fc2"]["kernel"].shape == (8, 5)
    nan = _with(ad, "fc2/kernel", tb=ad["fc2/kernel"]["tb"].at[1, 0, 0].set(jnp.nan))
    with pytest.raises(V, match=r"adapters\['fc2/kernel'\]\['tb'\].*NaN"):
        rp.merge_task(base, nan, 0)
    with pytest.raises(V, match="adapters.*NaN"):
        rp.merge(base, nan)
    shared_only = {p: {k: f[k] for k in ("a", "b")} for p, f in ad.items()}
    rp.materialize(base, shared_only)  # the shared stream alone is fine
    with pytest.raises(V, match="adapters has no task-specific factors"):
        rp.materialize_tasks(base, shared_only)


def test_bad_config():
    params = _params()
    cases = [
        (dict(num_tasks=None), T, "num_tasks"), (dict(num_tasks=0), V, "num_tasks"),
        (dict(task_rank=0), V, "task_rank"), (dict(task_rank=2.0), T, "task_rank"),
        (dict(shared_scale=float("nan")), V, "shared_scale"), (dict(shared_scale=0.0), V, "shared_scale"),
        (dict(task_scale=(1.0, 2.0)), V, "task_scale"), (dict(task_scale="4"), T, "task_scale"),
        (dict(task_scale=(1.0, -1.0, 1.0)), V, r"task_scale\[1\]"),
        (dict(shared_mode="addition"), V, "shared_mode"), (dict(shared_mode="mat"), V, "shared_mode"),
        (dict(shared_mode=1), T, "shared_mode"), (dict(alpha=8.0), V, "alpha"),
        (dict(task_targets="("), V, "task_targets"), (dict(task_targets=3), T, "task_targets"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            _rp(**kw)
    with pytest.raises(V, match="task_targets.*subset of targets"):
        _rp(targets="fc1/kernel", task_targets="fc2/kernel").init(jax.random.key(0), params)
    with pytest.raises(V, match="task_targets.*selects none"):
        _rp(targets="fc1/kernel", task_targets="zz").init(jax.random.key(0), params)
    with pytest.raises(V, match="task_rank.*fc2/kernel"):
        _rp(task_rank=6).init(jax.random.key(0), params)
    with pytest.raises(V, match="grads"):
        _rp().init(jax.random.key(0), params, grads={})
    assert hash(_rp(task_scale=[1.0, 2.0, 3.0], task_targets=["fc2/kernel"]))  # lists frozen to tuples


def test_bad_linear_args():
    rp, params, base, ad = _made()
    f, w = ad["fc2/kernel"], params["fc2"]["kernel"]
    x = jnp.ones((2, 8))
    cases = [
        (lambda: rp.linear(w[None], f, x), T, "w"),
        (lambda: rp.linear(w, ad["fc1/kernel"], x), V, "f"),
        (lambda: rp.linear(w, {**f, "tb": f["tb"][:2]}, x), V, "f.*task axis"),
        (lambda: rp.linear(w, f, jnp.ones((2, 7))), V, "x must"),
        (lambda: rp.linear(w, f, x, x_tasks=jnp.ones((2, 2, 8))), V, "x_tasks"),
        (lambda: rp.linear(w, f, x, bias=jnp.ones(4)), V, "bias"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
