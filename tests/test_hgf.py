"""HGF (arXiv:2602.05269): BitNet b1.58 quantizers, STE, BitLinear/HGF forwards, the packed inference
form, the NNX layers and the HGF Reparam, against float64 NumPy transcriptions of the equations."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lrjax
from lrjax.interpreter import NotMergeable
from lrjax.nn import hgf as H
from lrjax.reparam.hgf import HGF

EPS = 1e-5


# ------------------------------------------------------------------ float64 NumPy references
def np_ternary(w):
    w = np.asarray(w, np.float64)
    gamma = np.mean(np.abs(w))
    c = np.clip(np.round(w / (gamma + EPS)), -1, 1)
    return c, gamma


def np_act(x):
    x = np.asarray(x, np.float64)
    s = 127.0 / np.maximum(np.max(np.abs(x), axis=-1, keepdims=True), EPS)
    return np.clip(np.round(x * s), -128, 127), s


def np_bitlinear(x, w, qa=True):
    c, gamma = np_ternary(w)
    if qa:
        cx, s = np_act(x)
        xq = cx / s
    else:
        xq = np.asarray(x, np.float64)
    return xq @ (c * gamma)


def np_hgf(x, w, a, b, g, qa=True):
    x64 = np.asarray(x, np.float64)
    return np_bitlinear(x, w, qa) + g * (x64 @ np.asarray(a, np.float64)) @ np.asarray(b, np.float64)


def _rand(seed, *shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


@pytest.fixture(scope="module")
def mats():
    m, n, r = 12, 10, 3
    return dict(x=_rand(0, 5, m), w=_rand(1, m, n), a=_rand(2, m, r) * 0.3, b=_rand(3, r, n) * 0.3, m=m, n=n, r=r)


# ------------------------------------------------------------------ quantizers
def test_ternary_codes_match_reference_and_lie_in_grid(mats):
    w = mats["w"]
    c, gamma = H.ternary_codes(w)
    rc, rg = np_ternary(w)
    assert c.dtype == jnp.int8 and set(np.unique(np.asarray(c))) <= {-1, 0, 1}
    np.testing.assert_array_equal(np.asarray(c), rc)
    np.testing.assert_allclose(float(gamma), rg, rtol=1e-6)
    q = np.asarray(H.ternary_quantize(w), np.float64)
    np.testing.assert_allclose(q, rc * rg, rtol=1e-6)
    # every value is -gamma, 0 or +gamma
    g32 = np.float32(gamma)
    assert np.all(np.isin(np.asarray(H.ternary_quantize(w)), [-g32, np.float32(0), g32]))


def test_ternary_per_matrix_of_a_stack(mats):
    w = jnp.stack([mats["w"], 3.0 * mats["w"]])
    c, gamma = H.ternary_codes(w)
    assert gamma.shape == (2,)
    np.testing.assert_array_equal(np.asarray(c[0]), np.asarray(c[1]))  # absmean is scale-invariant
    np.testing.assert_allclose(np.asarray(gamma), [np_ternary(w[0])[1], np_ternary(w[1])[1]], rtol=1e-6)


def test_activation_codes_int8_grid_and_reference(mats):
    x = mats["x"] * jnp.arange(1, 6)[:, None]  # tokens at different scales
    c, s = H.activation_codes(x)
    rc, rs = np_act(x)
    assert c.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(c), rc)
    np.testing.assert_allclose(np.asarray(s), rs, rtol=1e-6)
    # the absmax element of every token is at +-127; dequantized values are c / s on the int8 grid
    assert np.all(np.max(np.abs(np.asarray(c, np.int32)), -1) == 127)
    xq = np.asarray(H.activation_quantize(x), np.float64)
    np.testing.assert_allclose(xq * rs, np.round(xq * rs), atol=1e-3)
    np.testing.assert_allclose(xq, rc / rs, rtol=1e-6)


def test_degenerate_zero_weight_and_zero_tokens(mats):
    w0 = jnp.zeros((6, 4))
    c, gamma = H.ternary_codes(w0)
    assert float(gamma) == 0.0 and not np.any(np.asarray(c))
    assert np.all(np.asarray(H.ternary_quantize(w0)) == 0)
    x = mats["x"][:, :6].at[1].set(0.0)
    y = H.bitlinear(x, w0)
    assert np.all(np.isfinite(np.asarray(y))) and not np.any(np.asarray(y))
    gw, gx = jax.jit(jax.grad(lambda w, x: H.bitlinear(x, w).sum(), argnums=(0, 1)))(w0, x)
    assert np.all(np.isfinite(np.asarray(gw))) and np.all(np.isfinite(np.asarray(gx)))
    cx, s = H.activation_codes(x)
    assert not np.any(np.asarray(cx[1])) and np.all(np.isfinite(np.asarray(s)))
    assert not np.any(np.asarray(H.activation_quantize(x)[1]))
    y = H.bitlinear(x, mats["w"][:6])
    assert np.all(np.asarray(y[1]) == 0) and np.all(np.isfinite(np.asarray(y)))
    # zero-size feature axis / empty matrix: the empty result, never NaN
    assert H.activation_quantize(jnp.ones((3, 0))).shape == (3, 0)
    cx, s = H.activation_codes(jnp.ones((3, 0)))
    assert cx.shape == (3, 0) and s.shape == (3, 1) and np.all(np.isfinite(np.asarray(s)))
    c, gamma = H.ternary_codes(jnp.ones((2, 0, 4)))
    assert c.shape == (2, 0, 4) and np.all(np.asarray(gamma) == 0)


# ------------------------------------------------------------------ STE
@pytest.mark.parametrize("q", [H.ternary_quantize, H.activation_quantize])
def test_ste_forward_exact_gradient_identity(mats, q):
    w = mats["w"]
    c = _rand(7, *w.shape)
    np.testing.assert_array_equal(np.asarray(H.ste(w, q)), np.asarray(q(w)))
    g = jax.grad(lambda w: jnp.sum(H.ste(w, q) * c))(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(c))


# ------------------------------------------------------------------ forwards
@pytest.mark.parametrize("qa", [True, False])
def test_bitlinear_and_hgf_match_reference(mats, qa):
    x, w, a, b = mats["x"], mats["w"], mats["a"], mats["b"]
    np.testing.assert_allclose(np.asarray(H.bitlinear(x, w, quantize_activations=qa)), np_bitlinear(x, w, qa),
                               rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(H.hgf_forward(x, w, a, b, 0.37, quantize_activations=qa)),
                               np_hgf(x, w, a, b, 0.37, qa), rtol=2e-5, atol=2e-5)


def test_gradients_are_straight_through(mats):
    x, w, a, b = mats["x"], mats["w"], mats["a"], mats["b"]
    ct = np.asarray(_rand(8, x.shape[0], w.shape[1]), np.float64)
    gx, gw, ga, gg = jax.grad(lambda x, w, a, g: jnp.sum(H.hgf_forward(x, w, a, b, g) * ct),
                              argnums=(0, 1, 2, 3))(x, w, a, jnp.float32(0.5))
    c, gamma = np_ternary(w)
    cx, s = np_act(x)
    x64, a64, b64 = (np.asarray(v, np.float64) for v in (x, a, b))
    np.testing.assert_allclose(np.asarray(gw), (cx / s).T @ ct, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), ct @ (c * gamma).T + 0.5 * ct @ b64.T @ a64.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ga), 0.5 * x64.T @ (ct @ b64.T), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(gg), np.sum(ct * (x64 @ a64 @ b64)), rtol=1e-4)


def test_gate_zero_equals_pure_ternary_bitwise(mats):
    x, w, a, b = mats["x"], mats["w"], mats["a"], mats["b"]
    for dt in (jnp.float32, jnp.bfloat16):
        xd, wd = x.astype(dt), w.astype(dt)
        y0 = np.asarray(H.hgf_forward(xd, wd, a, b, 0.0))
        yb = np.asarray(H.bitlinear(xd, wd))
        assert y0.dtype == yb.dtype
        np.testing.assert_array_equal(y0.view(np.uint16 if dt == jnp.bfloat16 else np.uint32),
                                      yb.view(np.uint16 if dt == jnp.bfloat16 else np.uint32))
    f0 = jax.jit(lambda x, w, g: H.hgf_forward(x, w, a, b, g))
    np.testing.assert_array_equal(np.asarray(f0(x, w, jnp.float32(0))).view(np.uint32),
                                  np.asarray(jax.jit(H.bitlinear)(x, w)).view(np.uint32))


def test_jit_vmap_and_bfloat16(mats):
    x, w, a, b = mats["x"], mats["w"], mats["a"], mats["b"]
    y = H.hgf_forward(x, w, a, b, 0.2)
    np.testing.assert_allclose(np.asarray(jax.jit(H.hgf_forward)(x, w, a, b, 0.2)), np.asarray(y), rtol=1e-6, atol=1e-6)
    yv = jax.vmap(lambda xi: H.hgf_forward(xi, w, a, b, 0.2))(x)
    np.testing.assert_allclose(np.asarray(yv), np.asarray(y), rtol=1e-6, atol=1e-6)
    # bfloat16: computed in float32 from the bf16 inputs, rounded once to bf16
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    yb = H.hgf_forward(xb, wb, a, b, 0.2)
    assert yb.dtype == jnp.bfloat16
    ref = np_hgf(np.asarray(xb, np.float32), np.asarray(wb, np.float32), a, b, 0.2)
    np.testing.assert_allclose(np.asarray(yb, np.float64), ref, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(np.asarray(yb),
                                  np.asarray(H.hgf_forward(xb.astype(jnp.float32), wb.astype(jnp.float32), a, b,
                                                           0.2).astype(jnp.bfloat16)))


def test_gate_warmup_is_optax_linear():
    s = H.gate_warmup(10)
    assert [float(s(t)) for t in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert float(H.gate_warmup(0)(0)) == 1.0
    assert float(s(7)) == float(optax.linear_schedule(0.0, 1.0, 10)(7))


# ------------------------------------------------------------------ packing / inference form
@pytest.mark.parametrize("n", [1, 5, 10])
def test_pack_round_trip(n):
    c = jax.random.randint(jax.random.key(n), (3, n), -1, 2).astype(jnp.int8)
    p = H.pack_ternary(c)
    assert p.dtype == jnp.uint8 and p.shape == (3, -(-n // 4))
    np.testing.assert_array_equal(np.asarray(H.unpack_ternary(p, n)), np.asarray(c))
    assert H.unpack_ternary(p, n).dtype == jnp.int8


@pytest.mark.parametrize("qa", [True, False])
def test_packed_forward_equals_training_forward(mats, qa):
    x, w, a, b = mats["x"], mats["w"], mats["a"], mats["b"]
    p = H.pack_hgf(w, a, b, 0.3, quantize_activations=qa)
    np.testing.assert_allclose(np.asarray(H.packed_forward(p, x)),
                               np.asarray(H.hgf_forward(x, w, a, b, 0.3, quantize_activations=qa)), rtol=1e-5, atol=1e-5)
    p0 = H.pack_hgf(w, quantize_activations=qa)
    np.testing.assert_allclose(np.asarray(H.packed_forward(p0, x)),
                               np.asarray(H.bitlinear(x, w, quantize_activations=qa)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(H.packed_forward(p0, x)), np_bitlinear(x, w, qa), rtol=2e-5, atol=2e-5)


def test_weight_bytes_quarter_of_float32():
    # the char transformer's projections (d_model 128, d_ff 512) at rank 8, float32 factors
    for m, n in ((128, 128), (128, 512)):
        w, a, b = _rand(1, m, n), _rand(2, m, 8), _rand(3, 8, n)
        p = H.pack_hgf(w, a, b, 0.1)
        expect = m * (n // 4) + 4 + 4 * 8 * (m + n) + 4
        assert H.weight_bytes(p) == expect
        ratio = H.weight_bytes(p) / H.float32_weight_bytes(m, n)
        assert ratio <= 0.25, (m, n, ratio)
        assert H.weight_bytes(H.pack_hgf(w)) / H.float32_weight_bytes(m, n) <= 1 / 16 + 1e-3
        if (m, n) == (128, 128):
            assert round(ratio, 4) == 0.1876


# ------------------------------------------------------------------ NNX layers
def test_nnx_layers_match_pure_functions_and_gate_zero(mats):
    x = mats["x"]
    layer = H.HGFLinear(12, 10, rank=3, rngs=nnx.Rngs(0))
    layer.lora_b[...] = mats["b"]
    k, a = layer.kernel[...], layer.lora_a[...]
    np.testing.assert_allclose(np.asarray(layer(x)), np_hgf(x, k, a, mats["b"], 0.1), rtol=2e-5, atol=2e-5)
    bit = H.BitLinear(12, 10, rngs=nnx.Rngs(0))
    bit.kernel[...] = k
    layer.gate[...] = jnp.float32(0.0)
    np.testing.assert_array_equal(np.asarray(layer(x)).view(np.uint32), np.asarray(bit(x)).view(np.uint32))
    # warmup: gate_scale 0 at step 0 -> pure ternary; set_gate_scale follows the optax schedule
    wl = H.HGFLinear(12, 10, rank=3, warmup_steps=4, rngs=nnx.Rngs(0))
    wl.lora_b[...] = mats["b"]
    bit.kernel[...] = wl.kernel[...]
    np.testing.assert_array_equal(np.asarray(wl(x)), np.asarray(bit(x)))
    H.set_gate_scale(wl, 2)
    assert float(wl.gate_scale[...]) == 0.5
    np.testing.assert_allclose(np.asarray(wl(x)), np_hgf(x, wl.kernel[...], wl.lora_a[...], mats["b"], 0.05),
                               rtol=2e-5, atol=2e-5)
    # every Param trains (kernel through the STE); gate_scale is not a Param
    grads = nnx.grad(lambda m: m(x).sum())(wl)
    names = {str(p[0]) for p, _ in nnx.to_flat_state(grads)} if hasattr(nnx, "to_flat_state") else None
    assert names is None or ("gate_scale" not in names and "kernel" in names)
    lb = H.BitLinear(12, 10, use_bias=True, rngs=nnx.Rngs(1))
    assert lb(x.astype(jnp.bfloat16)).dtype == jnp.float32  # result_type(bf16 x, f32 kernel)


# ------------------------------------------------------------------ Reparam through lrjax.factored
def _mlp(params, x):
    h = jax.nn.relu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    return jnp.einsum("bi,io->bo", h, params["fc2"]["kernel"])


@pytest.fixture(scope="module")
def mlp():
    params = {"fc1": {"kernel": _rand(10, 12, 16), "bias": _rand(11, 16) * 0.1},
              "fc2": {"kernel": _rand(12, 16, 6)}}
    return params, _rand(13, 5, 12)


def test_reparam_matches_reference_and_pure_arm(mlp):
    params, x = mlp
    rp = HGF(4, targets=r"fc\d/kernel", warmup_steps=10)
    base, ad = rp.init(jax.random.key(0), params)
    assert base is params and float(ad["fc1/kernel"]["warm"]) == 0.0
    ad = {p: {**f, "b": _rand(20 + i, *f["b"].shape) * 0.2} for i, (p, f) in enumerate(ad.items())}
    ad = rp.with_gate_scale(ad, 5)
    y = jax.jit(lrjax.factored(_mlp, rp))(base, ad, x)
    f1, f2 = ad["fc1/kernel"], ad["fc2/kernel"]
    h = np.maximum(np_hgf(x, params["fc1"]["kernel"], f1["a"], f1["b"], 0.05) + np.asarray(params["fc1"]["bias"]), 0)
    ref = np_hgf(h, params["fc2"]["kernel"], f2["a"], f2["b"], 0.05)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    # gate 0 (warm = 0 at step 0) == the pure ternary arm, bitwise
    pure = HGF(targets=r"fc\d/kernel", pure_ternary=True)
    pb, pad = pure.init(jax.random.key(0), params)
    assert pad == {"fc1/kernel": {}, "fc2/kernel": {}}
    y0 = jax.jit(lrjax.factored(_mlp, rp))(base, rp.with_gate_scale(ad, 0), x)
    yp = jax.jit(lrjax.factored(_mlp, pure))(pb, pad, x)
    np.testing.assert_array_equal(np.asarray(y0).view(np.uint32), np.asarray(yp).view(np.uint32))
    # packed inference form of each layer equals the training forward
    pk = rp.pack(base, ad)
    hq = np.asarray(H.packed_forward(pk["fc1/kernel"], x)) + np.asarray(params["fc1"]["bias"])
    yq = H.packed_forward(pk["fc2/kernel"], jnp.maximum(jnp.asarray(hq), 0))
    np.testing.assert_allclose(np.asarray(yq), np.asarray(y), rtol=1e-4, atol=1e-4)
    # dequantized weights lie in {-1, 0, 1} * gamma
    dq = rp.dequantized(base, ad)["fc1"]["kernel"]
    c, g = np_ternary(params["fc1"]["kernel"])
    np.testing.assert_allclose(np.asarray(dq, np.float64), c * g, rtol=1e-6)


def test_reparam_trains_base_and_adapters_and_refuses_merge(mlp):
    params, x = mlp
    rp = HGF(4, targets=r"fc\d/kernel")
    base, ad = rp.init(jax.random.key(1), params)
    tr, fr = rp.split(ad)
    assert set(fr["fc1/kernel"]) == {"warm"}
    f = lrjax.factored(_mlp, rp)
    gb, gt = jax.jit(jax.grad(lambda b, t: jnp.sum(f(b, rp.join(t, fr), x) ** 2), argnums=(0, 1)))(base, tr)
    for leaf in jax.tree_util.tree_leaves((gb, gt)):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert np.any(np.asarray(gb["fc1"]["kernel"])) and np.any(np.asarray(gt["fc2/kernel"]["b"]))
    for op in ("materialize", "merge", "unmerge", "delta"):
        with pytest.raises(NotMergeable):
            getattr(rp, op)(base, ad)
    # vmap over a batch of inputs
    yv = jax.jit(jax.vmap(lambda xi: f(base, ad, xi[None])[0]))(x)
    np.testing.assert_allclose(np.asarray(yv), np.asarray(jax.jit(f)(base, ad, x)), rtol=1e-6, atol=1e-6)


def test_reparam_char_transformer_smoke():
    from lrjax.models import char_transformer as ct
    model = ct.CharTransformer(96, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8, rngs=nnx.Rngs(0))
    _, state, apply = ct.split(model)
    ids = jnp.arange(8, dtype=jnp.int32)[None]
    rp = HGF(2, targets=ct.ADAPTER_TARGETS)
    base, ad = rp.init(jax.random.key(0), state)
    assert len(ad) == 6
    out = jax.jit(lrjax.factored(apply, rp))(base, ad, ids)
    assert out.shape == (1, 8, 96) and np.all(np.isfinite(np.asarray(out)))


def test_reparam_bfloat16_and_stacked(mlp):
    params, x = mlp
    pb = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), params)
    rp = HGF(4, targets=r"fc\d/kernel")
    base, ad = rp.init(jax.random.key(2), pb)
    y = jax.jit(lrjax.factored(_mlp, rp))(base, ad, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and ad["fc1/kernel"]["a"].dtype == jnp.bfloat16
    assert ad["fc1/kernel"]["g"].dtype == jnp.float32
    # a stacked [L, M, N] leaf scanned by lax.scan: one gate and gamma per layer
    stack = {"w": _rand(30, 3, 12, 12)}
    ax = lrjax.axes.Axes(batch=(0,), inp=(1,), out=(2,))
    rs = HGF(2, targets="w", axes=ax)
    sb, sad = rs.init(jax.random.key(3), stack)
    assert sad["w"]["g"].shape == (3,)

    def fn(p, x):
        return jax.lax.scan(lambda h, w: (h @ w, None), x, p["w"])[0]

    ys = jax.jit(lrjax.factored(fn, rs))(sb, sad, x)
    h = x
    for i in range(3):
        h = jnp.asarray(np_hgf(h, stack["w"][i], sad["w"]["a"][i], sad["w"]["b"][i], 0.1), jnp.float32)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(h), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="stacked"):
        rs.pack(sb, sad)


# ------------------------------------------------------------------ bad input
def test_bad_input(mats, mlp):
    x, w, a, b = mats["x"], mats["w"], mats["a"], mats["b"]
    params, _ = mlp
    with pytest.raises(ValueError, match="rank"):
        H.HGFLinear(4, 3, rank=4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rank"):
        H.HGFLinear(4, 3, rank=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
        HGF(13, targets=r"fc\d/kernel").init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="rank"):
        H.hgf_forward(x, w, _rand(1, 12, 11), _rand(2, 11, 10), 0.1)
    with pytest.raises(ValueError, match="g"):
        H.hgf_forward(x, w, a, b, float("nan"))
    with pytest.raises(ValueError, match="g"):
        H.hgf_forward(x, w, a, b, jnp.array(jnp.inf))
    with pytest.raises(TypeError, match="g"):
        H.hgf_forward(x, w, a, b, True)
    with pytest.raises(ValueError, match="gate_init"):
        H.HGFLinear(4, 3, rank=1, gate_init=float("inf"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="gate_init"):
        HGF(2, gate_init=float("nan"))
    with pytest.raises(TypeError, match="warmup_steps"):
        HGF(2, warmup_steps=True)
    with pytest.raises(ValueError, match="warmup_steps"):
        H.gate_warmup(-1)
    with pytest.raises(TypeError, match="pure_ternary"):
        HGF(2, pure_ternary=1)
    with pytest.raises(ValueError, match="alpha"):
        HGF(2, alpha=4.0)
    with pytest.raises(ValueError, match="eps"):
        H.bitlinear(x, w, eps=0.0)
    with pytest.raises(TypeError, match="w"):
        H.bitlinear(x, w.astype(jnp.int32))
    with pytest.raises(TypeError, match="x"):
        H.bitlinear(x > 0, w)
    with pytest.raises(ValueError, match="x"):
        H.bitlinear(x[:, :5], w)
    with pytest.raises(TypeError, match="w"):
        H.ternary_codes(w > 0)
    with pytest.raises(TypeError, match="codes"):
        H.pack_ternary(jnp.ones((2, 4), jnp.float32))
    with pytest.raises(TypeError, match="codes"):
        H.pack_ternary(jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="codes"):
        H.pack_ternary(jnp.full((2, 4), 2, jnp.int8))
    with pytest.raises(TypeError, match="packed"):
        H.unpack_ternary(jnp.zeros((2, 1), jnp.int8), 4)
    with pytest.raises(TypeError, match="n"):
        H.unpack_ternary(jnp.zeros((2, 1), jnp.uint8), True)
    with pytest.raises(ValueError, match="n=9"):
        H.unpack_ternary(jnp.zeros((2, 1), jnp.uint8), 9)
    with pytest.raises(ValueError, match="a, b and g"):
        H.pack_hgf(w, a)
    with pytest.raises(TypeError, match="quantize"):
        H.ste(w, "ternary")
    # pack is the export step: concrete NaN/Inf refused, naming the argument
    with pytest.raises(ValueError, match="w contains NaN"):
        H.pack_hgf(w.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="a contains NaN"):
        H.pack_hgf(w, a.at[0, 0].set(jnp.inf), b, 0.1)
    with pytest.raises(ValueError, match="b contains NaN"):
        H.pack_hgf(w, a, b.at[0, 0].set(jnp.nan), 0.1)
    with pytest.raises(ValueError, match="g"):
        H.pack_hgf(w, a, b, jnp.array(jnp.nan))
    with pytest.raises(ValueError, match="g must be a scalar"):
        H.hgf_forward(x, w, a, b, jnp.ones(3))
    rp = HGF(2, targets=r"fc\d/kernel")
    base, ad = rp.init(jax.random.key(0), params)
    with pytest.raises(TypeError, match="step"):
        rp.with_gate_scale(ad, True)
    with pytest.raises(ValueError, match="step"):
        rp.with_gate_scale(ad, -1)
    with pytest.raises(TypeError, match="step"):
        H.set_gate_scale(H.HGFLinear(4, 3, rank=1, rngs=nnx.Rngs(0)), 1.5)
    with pytest.raises(ValueError, match="step must be a scalar"):
        rp.with_gate_scale(ad, jnp.array([1, 2]))
    with pytest.raises(ValueError, match="step must be a scalar"):
        H.set_gate_scale(H.HGFLinear(4, 3, rank=1, rngs=nnx.Rngs(0)), jnp.array([1, 2]))
    with pytest.raises(TypeError, match="step must be an int >= 0 or an integer scalar array"):
        rp.with_gate_scale(ad, 2.5)
    with pytest.raises(TypeError, match="step"):
        rp.with_gate_scale(ad, jnp.array(2.0))
    with pytest.raises(ValueError, match="step"):
        rp.with_gate_scale(ad, jnp.array(-1))
    nan_base = {**base, "fc1": {**base["fc1"], "kernel": base["fc1"]["kernel"].at[0, 0].set(jnp.nan)}}
    with pytest.raises(ValueError, match="NaN"):
        rp.pack(nan_base, ad)
    with pytest.raises(ValueError, match="'g'.*NaN"):
        rp.pack(base, {**ad, "fc1/kernel": {**ad["fc1/kernel"], "g": jnp.array(jnp.nan)}})
    pure = HGF(targets=r"fc\d/kernel", pure_ternary=True)
    with pytest.raises(ValueError, match="pure_ternary"):
        lrjax.factored(_mlp, pure)(base, ad, mlp[1])
    with pytest.raises(ValueError, match="pure_ternary"):
        lrjax.factored(_mlp, rp)(base, pure.init(jax.random.key(0), params)[1], mlp[1])
    bad = {**ad, "fc1/kernel": {**ad["fc1/kernel"], "g": jnp.zeros((2,), jnp.float32)}}
    with pytest.raises(ValueError, match="'g'"):
        lrjax.factored(_mlp, rp)(base, bad, mlp[1])
