"""Conv adapters on Flax HWIO kernels (lrjax/reparam/conv.py): PEFT's conv LoRA/DoRA = lrjax
LoRA/DoRA in the default view (cross-checked on torch), loralib's ConvLoRA and CP-LoRA against
float64 NumPy transcriptions, the two-convolution factored path, PEFT conv import/export, bad input."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import lrjax
from lrjax.reparam.conv import ConvDoRA, ConvLoRA, CPDoRA, CPLoRA
from lrjax.reparam.factored import FactoredStats, factored

T, V = TypeError, ValueError
KEY = jax.random.key(0)


@pytest.fixture(autouse=True)
def _highest():
    with jax.default_matmul_precision("highest"):
        yield


def _kernel(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _perturb(adapters, seed=5, scale=0.2):
    """Non-zero factors (init has a zero factor, which would hide every error in the update)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), adapters)


def _conv_nhwc(x, k, stride=1, padding="SAME", dilation=1):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), padding, rhs_dilation=(dilation, dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# ------------------------------------------------------------------------- ConvLoRA
def test_convlora_matches_loralib_transcription():
    """dW_t = s reshape(B_l A_l, (C_out, C_in, k, k)) row-major (loralib), in float64 NumPy."""
    k, ci, co, r, alpha = 3, 4, 5, 2, 3.0
    p = {"conv": {"kernel": _kernel((k, k, ci, co))}}
    rp = ConvLoRA(rank=r, alpha=alpha)
    base, ad0 = rp.init(KEY, p)
    f0 = ad0["conv/kernel"]
    assert f0["a"].shape == (ci * k, r * k) and f0["b"].shape == (r * k, co * k)
    assert not np.any(np.asarray(f0["b"])) and base is p
    np.testing.assert_array_equal(rp.materialize(base, ad0)["conv"]["kernel"], p["conv"]["kernel"])
    bound = 1 / np.sqrt(ci * k)  # kaiming_uniform_(a=sqrt(5)) on lora_A [r k, C_in k]
    assert np.abs(np.asarray(f0["a"])).max() <= bound and np.abs(np.asarray(f0["a"])).max() > 0.5 * bound
    assert rp.num_params(ad0) == r * k * k * (ci + co)

    ad = _perturb(ad0)
    f = {n: np.asarray(v, np.float64) for n, v in ad["conv/kernel"].items()}
    a_l, b_l = f["a"].T, f["b"].T  # loralib's lora_A [r k, C_in k], lora_B [C_out k, r k]
    dw_t = (alpha / r) * (b_l @ a_l).reshape(co, ci, k, k)
    ref = np.asarray(p["conv"]["kernel"], np.float64) + dw_t.transpose(2, 3, 1, 0)
    got = rp.materialize(base, ad)["conv"]["kernel"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # the update has rank <= r k in loralib's [C_out k, C_in k] matricization, not in lrjax's default one
    d = np.asarray(rp.delta(base, ad)["conv/kernel"], np.float64)
    assert np.linalg.matrix_rank(d.transpose(3, 2, 0, 1).reshape(co * k, ci * k), tol=1e-4) <= r * k
    assert np.linalg.matrix_rank(d.reshape(k * k * ci, co), tol=1e-4) == co
    # merge / unmerge round trip, view round trip
    merged = rp.merge(base, ad)
    np.testing.assert_allclose(rp.unmerge(merged, ad)["conv"]["kernel"], p["conv"]["kernel"], atol=1e-5)
    w = p["conv"]["kernel"]
    np.testing.assert_array_equal(rp.from_view("conv/kernel", rp.to_view("conv/kernel", w), w.shape), w)


def test_convlora_jit_grad_vmap_bf16():
    p = {"conv": {"kernel": _kernel((3, 3, 4, 6)).astype(jnp.bfloat16)}}
    rp = ConvLoRA(rank=2)
    base, ad = rp.init(KEY, p)
    ad = _perturb(ad)
    x = jnp.ones((1, 5, 5, 4), jnp.bfloat16)

    def loss(ad):
        return jnp.sum(_conv_nhwc(x, rp.materialize(base, ad)["conv"]["kernel"]).astype(jnp.float32) ** 2)

    g = jax.jit(jax.grad(loss))(ad)
    assert g["conv/kernel"]["a"].dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g["conv/kernel"]["a"])))
    eff = rp.materialize(base, ad)["conv"]["kernel"]
    assert eff.dtype == jnp.bfloat16
    # one rounding: float32 computation rounded once to bfloat16
    ref = rp.materialize(jax.tree.map(lambda v: v.astype(jnp.float32), base), ad)["conv"]["kernel"]
    np.testing.assert_array_equal(np.asarray(eff, np.float32), np.asarray(ref.astype(jnp.bfloat16), np.float32))
    stacked = jax.tree.map(lambda v: jnp.stack([v, 2 * v]), ad)
    out = jax.vmap(lambda a: rp.materialize(base, a)["conv"]["kernel"])(stacked)
    assert out.shape == (2, 3, 3, 4, 6)


# --------------------------------------------------------------------------- CPLoRA
def test_cplora_matches_cp_einsum_and_init():
    kh, kw, ci, co, r, alpha = 3, 2, 4, 5, 3, 6.0
    p = {"Conv_0": {"kernel": _kernel((kh, kw, ci, co))}}
    rp = CPLoRA(rank=r, alpha=alpha)
    base, ad0 = rp.init(KEY, p)
    f0 = ad0["Conv_0/kernel"]
    assert {n: v.shape for n, v in f0.items()} == {"out": (co, r), "inp": (ci, r), "h": (kh, r), "w": (kw, r)}
    assert not np.any(np.asarray(f0["out"]))  # O = 0: output unchanged at init
    np.testing.assert_array_equal(rp.materialize(base, ad0)["Conv_0"]["kernel"], p["Conv_0"]["kernel"])
    assert rp.num_params(ad0) == r * (co + ci + kh + kw)

    ad = _perturb(ad0)
    f = {n: np.asarray(v, np.float64) for n, v in ad["Conv_0/kernel"].items()}
    dk = (alpha / r) * np.einsum("hq,wq,iq,oq->hwio", f["h"], f["w"], f["inp"], f["out"])
    np.testing.assert_allclose(rp.delta(base, ad)["Conv_0/kernel"], dk, rtol=1e-5, atol=1e-6)
    # factors() is the matrix-view LoRA: A = Khatri-Rao(H, W, I) in HWIO row order, B = O^T
    form = rp.factors(None, ad["Conv_0/kernel"])
    np.testing.assert_allclose(form.a, np.einsum("hq,wq,iq->hwiq", f["h"], f["w"], f["inp"]).reshape(-1, r),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(form.b, f["out"].T.astype(np.float32))

    # at init only O gets a gradient (the others multiply O = 0), as LoRA's B
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 6, ci)), jnp.float32)
    g = jax.grad(lambda a: jnp.sum(_conv_nhwc(x, rp.materialize(base, a)["Conv_0"]["kernel"]) ** 2))(ad0)
    g = g["Conv_0/kernel"]
    assert np.abs(np.asarray(g["out"])).max() > 0
    for n in ("inp", "h", "w"):
        assert not np.any(np.asarray(g[n])), n


def test_cplora_init_variance_matches_lora():
    """Every entry of the Khatri-Rao A has variance 1/(3 kh kw C_in), LoRA's A ~ U(+-1/sqrt(M))."""
    kh, kw, ci, co, r = 3, 3, 16, 8, 48
    p = {"conv": {"kernel": jnp.zeros((kh, kw, ci, co))}}
    rp = CPLoRA(rank=r)
    _, ad = rp.init(KEY, p)
    a = np.asarray(rp.factors(None, ad["conv/kernel"]).a)
    assert abs(a.var() * 3 * kh * kw * ci - 1.0) < 0.15


# ------------------------------------------------------------------ DoRA variants
@pytest.mark.parametrize("cls", [ConvDoRA, CPDoRA])
def test_conv_dora_variants_match_transcription(cls):
    """W'_t = m (W_t + dW_t) / ||W_t + dW_t|| per output channel over (C_in, kh, kw), float64 NumPy."""
    k, ci, co = 3, 4, 5
    w = np.array(_kernel((k, k, ci, co)))
    w[..., 1] = 0.0  # a zero (pruned) channel: zero direction, finite
    p = {"conv": {"kernel": jnp.asarray(w)}}
    rp = cls(rank=2, alpha=3.0)
    base, ad0 = rp.init(KEY, p)
    wt = w.transpose(3, 2, 0, 1).astype(np.float64)
    np.testing.assert_allclose(ad0["conv/kernel"]["m"], np.linalg.norm(wt.reshape(co, -1), axis=1), rtol=1e-6)
    np.testing.assert_array_equal(rp.materialize(base, ad0)["conv"]["kernel"], w)  # unchanged at init
    ad = _perturb(ad0)
    f = {n: np.asarray(v, np.float64) for n, v in ad["conv/kernel"].items()}
    if cls is ConvDoRA:
        dwt = rp.scale * (f["b"].T @ f["a"].T).reshape(co, ci, k, k)
    else:
        dwt = rp.scale * np.einsum("hq,wq,iq,oq->oihw", f["h"], f["w"], f["inp"], f["out"])
    v = wt + dwt
    ref = f["m"][:, None, None, None] * v / np.linalg.norm(v.reshape(co, -1), axis=1)[:, None, None, None]
    got = rp.materialize(base, ad)["conv"]["kernel"]
    np.testing.assert_allclose(got, ref.transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-6)
    # the norm is detached: d/dm of sum(W') is sum(direction), no gradient through the norm into m
    g = jax.grad(lambda a: jnp.sum(rp.materialize(base, a)["conv"]["kernel"]))(ad)["conv/kernel"]["m"]
    np.testing.assert_allclose(g, (v / np.linalg.norm(v.reshape(co, -1), axis=1)[:, None, None, None]).sum((1, 2, 3)),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(V, match=r"adapters\['conv/kernel'\]\['m'\].*expected \(5,\)"):
        rp.materialize(base, {"conv/kernel": {**ad["conv/kernel"], "m": jnp.ones((4,))}})
    with pytest.raises(V, match="cannot be inverted"):
        rp.unmerge(rp.merge(base, ad), ad)


# ------------------------------------------------------------------ factored path
class ConvNet(nn.Module):
    dtype: object = jnp.float32
    groups: int = 1

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), strides=2, padding="SAME", name="conv_a", dtype=self.dtype)(x)
        x = nn.Conv(6, (3, 3), padding="VALID", kernel_dilation=2, feature_group_count=self.groups, name="conv_b",
                    dtype=self.dtype)(jnp.tanh(x))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return nn.Conv(4, (2,), padding="SAME", name="conv_c", dtype=self.dtype)(x)  # a 1-D conv


@pytest.mark.parametrize("kind,dtype", [(k, jnp.float32) for k in ("lora", "dora", "cp", "cpdora", "convlora")]
                         + [(k, jnp.bfloat16) for k in ("lora", "dora", "cp")],
                         ids=["lora-f32", "dora-f32", "cp-f32", "cpdora-f32", "convlora-f32", "lora-bf16", "dora-bf16",
                              "cp-bf16"])
def test_factored_equals_materialize(kind, dtype):
    model = ConvNet(dtype)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 12, 12, 3)), dtype)
    params = jax.tree.map(lambda v: v.astype(dtype), model.init(KEY, x))
    conv2d = r"conv_[ab]/kernel"
    rp = {"lora": lrjax.LoRA(rank=2, alpha=3.0), "dora": lrjax.DoRA(rank=2), "cp": CPLoRA(rank=3, targets=conv2d),
          "cpdora": CPDoRA(rank=2, targets=conv2d), "convlora": ConvLoRA(rank=1, targets=conv2d)}[kind]
    base, ad = rp.init(KEY, params)
    ad = _perturb(ad)
    st = FactoredStats()
    y = jax.jit(factored(model.apply, rp, stats=st))(base, ad, x)
    y0 = model.apply(rp.materialize(base, ad), x)
    assert y.dtype == y0.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=0.03, atol=0.03)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y0, np.float32), **tol)
    if kind == "convlora":  # its own matricization: the dense kernel is used
        assert st.factored == 0 and sorted(st.fallback) == ["view:params/conv_a/kernel", "view:params/conv_b/kernel"]
    else:
        assert st.factored == len(ad) and st.fallback == []


def test_factored_conv_gradients():
    """Gradients through the two-convolution form equal those through the materialized kernel."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 7, 7, 3)), jnp.float32)
    params = {"conv": {"kernel": _kernel((3, 3, 3, 4))}}

    def fn(p, x):
        return _conv_nhwc(x, p["conv"]["kernel"], stride=2, padding="VALID", dilation=1)

    for rp in (lrjax.DoRA(rank=2), CPLoRA(rank=2)):
        base, ad = rp.init(KEY, params)
        ad = _perturb(ad)
        st = FactoredStats()
        g1 = jax.grad(lambda a: jnp.sum(factored(fn, rp, stats=st, mode="factored")(base, a, x) ** 2))(ad)
        g0 = jax.grad(lambda a: jnp.sum(fn(rp.materialize(base, a), x) ** 2))(ad)
        assert st.factored == 1
        for n in g0["conv/kernel"]:
            ref = np.asarray(g0["conv/kernel"][n])
            np.testing.assert_allclose(g1["conv/kernel"][n], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_factored_conv_transpose():
    """lhs dilation (nn.ConvTranspose, stride 2): still two convolutions, still exact."""
    model = nn.ConvTranspose(4, (3, 3), strides=(2, 2), padding="SAME")
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5, 5, 3)), jnp.float32)
    params = model.init(KEY, x)
    rp = lrjax.LoRA(rank=2)
    base, ad = rp.init(KEY, params)
    ad = _perturb(ad)
    st = FactoredStats()
    y = factored(model.apply, rp, stats=st)(base, ad, x)
    np.testing.assert_allclose(y, model.apply(rp.materialize(base, ad), x), rtol=1e-5, atol=1e-5)
    assert st.factored == 1 and st.fallback == []


def test_factored_grouped_conv_falls_back():
    model = ConvNet(groups=2)
    x = jnp.ones((1, 12, 12, 3))
    params = model.init(KEY, x)
    rp = lrjax.LoRA(rank=2)
    base, ad = rp.init(KEY, params)
    ad = _perturb(ad)
    st = FactoredStats()
    y = factored(model.apply, rp, stats=st)(base, ad, x)
    np.testing.assert_allclose(y, model.apply(rp.materialize(base, ad), x), rtol=1e-5, atol=1e-5)
    assert st.factored == 2 and st.fallback == ["conv_general_dilated"]


# ----------------------------------------------------------------------- bad input
def test_bad_input():
    dense = {"Dense_0": {"kernel": jnp.ones((4, 6))}}
    for cls in (ConvLoRA, CPLoRA):
        with pytest.raises(V, match=r"'Dense_0/kernel'.*Dense kernel.*lrjax\.LoRA"):
            cls(rank=1).init(KEY, dense)
        with pytest.raises(V, match=r"'c/kernel'.*4-D"):
            cls(rank=1).init(KEY, {"c": {"kernel": jnp.ones((3, 4, 6))}})
        with pytest.raises(V, match="axes"):
            cls(rank=1, axes=lrjax.axes.Axes((), (0, 1, 2), (3,)))
    with pytest.raises(V, match=r"'conv/kernel'.*non-square 3x1"):
        ConvLoRA(rank=1).init(KEY, {"conv": {"kernel": jnp.ones((3, 1, 4, 6))}})
    conv = {"conv": {"kernel": _kernel((3, 3, 4, 6))}}
    with pytest.raises(V, match=r"rank=5.*'conv/kernel'.*r\*k = 15.*rank <= min\(C_in, C_out\) = 4"):
        ConvLoRA(rank=5).init(KEY, conv)
    ConvLoRA(rank=4).init(KEY, conv)  # the largest valid rank
    with pytest.raises(V, match=r"rank=37.*'conv/kernel'.*at most.*36"):
        CPLoRA(rank=37).init(KEY, conv)  # 3*3*4*6 / max(...) = 36
    CPLoRA(rank=36).init(KEY, conv)  # above min(M, N) = 6: CP ranks may exceed it
    rp = ConvLoRA(rank=2)
    base, ad = rp.init(KEY, conv)
    bad = {"conv/kernel": {"a": ad["conv/kernel"]["a"].T, "b": ad["conv/kernel"]["b"].T}}
    with pytest.raises(V, match=r"adapters\['conv/kernel'\].*loralib's own orientation"):
        rp.materialize(base, bad)
    with pytest.raises(V, match=r"adapters\['conv/kernel'\].*rank=1"):
        ConvLoRA(rank=1).materialize(base, ad)
    cp = CPLoRA(rank=2)
    base, ad = cp.init(KEY, conv)
    f = dict(ad["conv/kernel"])
    with pytest.raises(V, match=r"adapters\['conv/kernel'\]\['inp'\].*expected \[4, R\]"):
        cp.materialize(base, {"conv/kernel": {**f, "inp": jnp.ones((5, 2))}})
    with pytest.raises(V, match="disagree on the CP rank"):
        cp.materialize(base, {"conv/kernel": {**f, "h": jnp.ones((3, 3))}})
    with pytest.raises(V, match=r"adapters\['conv/kernel'\].*rank 3.*rank=2"):
        cp.materialize(base, {"conv/kernel": {n: jnp.ones((v.shape[0], 3)) for n, v in f.items()}})
    with pytest.raises(V, match="unknown factor 'a'"):
        cp.materialize(base, {"conv/kernel": {**f, "a": jnp.ones((2, 2))}})


# --------------------------------------------------------------- PEFT on torch
CONVS = {"conv1": dict(cin=3, cout=6, k=3, stride=2, padding=1, dilation=1),
         "conv2": dict(cin=6, cout=4, k=2, stride=1, padding=0, dilation=1)}
PR, PALPHA = 2, 3


@pytest.fixture
def tp():
    """(torch, peft) or skip; float32 torch."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.set_default_dtype(torch.float32)
    return torch, peft


def _torch_net(torch, dilation=1, seed=0):
    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            c1, c2 = CONVS["conv1"], CONVS["conv2"]
            self.conv1 = torch.nn.Conv2d(c1["cin"], c1["cout"], c1["k"], stride=c1["stride"], padding=c1["padding"])
            self.conv2 = torch.nn.Conv2d(c2["cin"], c2["cout"], c2["k"], dilation=dilation)

        def forward(self, x):
            return self.conv2(torch.tanh(self.conv1(x)))

    return Net()


def _jax_net(params, x, dilation=1):
    """The same network on NHWC inputs with HWIO kernels."""
    h = _conv_nhwc(x, params["conv1"]["kernel"], stride=2, padding=((1, 1), (1, 1))) + params["conv1"]["bias"]
    return _conv_nhwc(jnp.tanh(h), params["conv2"]["kernel"], padding="VALID", dilation=dilation) + \
        params["conv2"]["bias"]


def _xin(seed=7):
    return np.random.default_rng(seed).standard_normal((2, 3, 9, 9)).astype(np.float32)  # NCHW


def _t2n(t):
    return t.detach().cpu().numpy().astype(np.float32)


def _torch_out(torch, model, x):
    model.eval()
    with torch.no_grad():
        return _t2n(model(torch.from_numpy(x))).transpose(0, 2, 3, 1)  # -> NHWC


def _peft_model(torch, peft, base, dora, rslora=False, seed=1):
    cfg = peft.LoraConfig(r=PR, lora_alpha=PALPHA, target_modules=list(CONVS), use_dora=dora, use_rslora=rslora)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in CONVS:
            lay = getattr(pm.base_model.model, n)
            for p in (lay.lora_A["default"].weight, lay.lora_B["default"].weight):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if dora:
                m = lay.lora_magnitude_vector["default"].weight
                m.mul_(1.0 + 0.2 * torch.rand(m.shape, generator=g))
    return pm


def _factors_from_peft(pm, dora):
    """Independent transcription of the orientation map: A[(h, w, i), j] = A_t[j, i, h, w],
    B[j, o] = B_t[o, j, 0, 0], m = magnitude[0, :, 0, 0]."""
    out = {}
    for n in CONVS:
        lay = getattr(pm.base_model.model, n)
        at = _t2n(lay.lora_A["default"].weight)
        bt = _t2n(lay.lora_B["default"].weight)
        r, ci, kh, kw = at.shape
        f = {"a": jnp.asarray(at.transpose(2, 3, 1, 0).reshape(kh * kw * ci, r)), "b": jnp.asarray(bt[:, :, 0, 0].T)}
        if dora:
            f["m"] = jnp.asarray(_t2n(lay.lora_magnitude_vector["default"].weight)[0, :, 0, 0])
        out[f"{n}/kernel"] = f
    return out


@pytest.mark.reference
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_peft_conv_lora_is_lrjax_lora(tp, variant):
    """PEFT's conv LoRA/DoRA == lrjax LoRA/RSLoRA/DoRA on the HWIO kernel in the default view:
    same effective kernel, same outputs (materialized and factored)."""
    torch, peft = tp
    from lrjax.interop import params_from_torch
    dora, rslora = variant == "dora", variant == "rslora"
    base = _torch_net(torch)
    pm = _peft_model(torch, peft, base, dora, rslora)
    params = params_from_torch(base)
    ad = _factors_from_peft(pm, dora)
    rp = lrjax.DoRA(rank=PR, alpha=PALPHA) if dora else (lrjax.RSLoRA if rslora else lrjax.LoRA)(rank=PR, alpha=PALPHA)
    x = _xin()
    y_peft = _torch_out(torch, pm, x)
    eff = rp.materialize(params, ad)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(_jax_net(eff, xj), y_peft, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(factored(_jax_net, rp)(params, ad, xj), y_peft, rtol=1e-5, atol=1e-5)
    merged = pm.merge_and_unload()
    for n in CONVS:
        k_peft = _t2n(getattr(merged, n).weight).transpose(2, 3, 1, 0)  # OIHW -> HWIO
        np.testing.assert_allclose(eff[n]["kernel"], k_peft, rtol=1e-5, atol=1e-6)
    if dora:  # PEFT's per-output-channel norm over (C_in, kh, kw) == lrjax's column norm of the view
        from lrjax.reparam.dora import column_norm
        for n in CONVS:
            w = base.state_dict()[f"{n}.weight"]
            ref = _t2n(w.norm(p=2, dim=(1, 2, 3)))
            got = column_norm(lrjax.axes.to_matrix(params[n]["kernel"], lrjax.axes.default_axes(n, w.shape[::-1])))
            np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.mark.reference
def test_peft_dilated_conv_lora_differs_unmerged(tp):
    """PEFT's lora_A ignores the base's dilation, so its unmerged forward is not its merged model
    (here it fails on a shape mismatch); lrjax adds the update to the kernel, i.e. equals PEFT's
    merged model (documented in conv.py)."""
    torch, peft = tp
    from lrjax.interop import params_from_torch
    base = _torch_net(torch, dilation=2)
    pm = _peft_model(torch, peft, base, dora=False)
    params = params_from_torch(base)
    rp = lrjax.LoRA(rank=PR, alpha=PALPHA)
    ad = _factors_from_peft(pm, False)
    x = _xin()
    with pytest.raises(RuntimeError, match="size of tensor"):  # PEFT's undilated lora_A: another output size
        _torch_out(torch, pm, x)
    y_merged = _torch_out(torch, pm.merge_and_unload(), x)
    y = _jax_net(rp.materialize(params, ad), jnp.asarray(x.transpose(0, 2, 3, 1)), dilation=2)
    np.testing.assert_allclose(y, y_merged, rtol=1e-5, atol=1e-5)


@pytest.mark.reference
@pytest.mark.parametrize("variant", ["lora", "dora", "cp", "cpdora"])
def test_conv_export_then_peft_load(tp, tmp_path, variant):
    torch, peft = tp
    from lrjax.interop import export_peft, params_from_torch
    base = _torch_net(torch)
    params = params_from_torch(base)
    rp = {"lora": lrjax.LoRA(rank=PR, alpha=PALPHA), "dora": lrjax.DoRA(rank=PR, alpha=PALPHA),
          "cp": CPLoRA(rank=PR, alpha=PALPHA), "cpdora": CPDoRA(rank=PR, alpha=PALPHA)}[variant]
    _, ad = rp.init(KEY, params)
    ad = _perturb(ad, scale=0.3)
    cfg = export_peft(tmp_path, rp, ad, params=params)
    assert cfg["use_dora"] is variant.endswith("dora") and cfg["r"] == PR and cfg["target_modules"] == ["conv1", "conv2"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    x = _xin()
    y = _jax_net(rp.materialize(params, ad), jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(_torch_out(torch, pm, x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(V, match="'conv1/kernel'.*params="):
        export_peft(tmp_path / "x", lrjax.LoRA(rank=PR, alpha=PALPHA), _perturb(lrjax.LoRA(rank=PR).init(KEY, params)[1]))


@pytest.mark.reference
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_conv_save_then_import(tp, tmp_path, dora):
    torch, peft = tp
    from lrjax.interop import import_peft, params_from_torch
    base = _torch_net(torch)
    pm = _peft_model(torch, peft, base, dora)
    pm.save_pretrained(str(tmp_path))
    params = params_from_torch(base)
    rp, ad = import_peft(tmp_path, params)
    assert type(rp) is (lrjax.DoRA if dora else lrjax.LoRA) and set(ad) == {"conv1/kernel", "conv2/kernel"}
    x = _xin()
    y = _jax_net(rp.materialize(params, ad), jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(y, _torch_out(torch, pm, x), rtol=1e-5, atol=1e-5)
    ref = _factors_from_peft(pm, dora)
    for p in ad:
        for n in ad[p]:
            np.testing.assert_array_equal(ad[p][n], ref[p][n])


@pytest.mark.reference
@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups")
def test_peft_conv_bad_files(tp, tmp_path):
    torch, peft = tp
    from safetensors.numpy import load_file, save_file
    from lrjax.interop import export_peft, import_peft, params_from_torch
    base = _torch_net(torch)
    params = params_from_torch(base)
    # grouped conv in PEFT: lora_B has r / groups input channels
    torch.manual_seed(0)
    g = torch.nn.Sequential()
    g.add_module("conv", torch.nn.Conv2d(4, 4, 3, groups=2))
    gp = params_from_torch(g)
    pm = peft.get_peft_model(g, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["conv"]))
    pm.save_pretrained(str(tmp_path / "g"))
    with pytest.raises(V, match=r"module 'conv'.*grouped conv, groups=2"):
        import_peft(tmp_path / "g", gp)
    # Linear-shaped tensors for a conv leaf
    pm = _peft_model(torch, peft, base, dora=False)
    pm.save_pretrained(str(tmp_path / "l"))
    f = tmp_path / "l" / "adapter_model.safetensors"
    t = load_file(str(f))
    key = "base_model.model.conv1.lora_A.weight"
    t[key] = t[key].reshape(t[key].shape[0], -1)
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(V, match=r"module 'conv1'.*'conv1/kernel'.*expected lora_A \[r, C_in, \*window\] = \(2, 3, 3, 3\)"):
        import_peft(tmp_path / "l", params)
    # loralib's ConvLoRA has no PEFT form
    for crp in (ConvLoRA(rank=1, targets="conv1/kernel"), ConvDoRA(rank=1, targets="conv1/kernel")):
        with pytest.raises(T, match="ConvLoRA.*no PEFT equivalent"):
            export_peft(tmp_path / "c", crp, crp.init(KEY, params)[1], params=params)


@pytest.mark.reference
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_conv1d_conv3d_round_trip_with_peft(tp, tmp_path, dora):
    """1-D and 3-D convolutions ([k, C_in, C_out] named *conv*, [kd, kh, kw, C_in, C_out]) export to
    PEFT's Conv1d/Conv3d LoRA and import back."""
    torch, peft = tp
    from lrjax.interop import export_peft, import_peft, params_from_torch
    torch.manual_seed(0)
    net = torch.nn.Module()
    net.conv1d = torch.nn.Conv1d(3, 4, 3)
    net.c3d = torch.nn.Conv3d(2, 3, (2, 3, 2))
    params = params_from_torch(net)
    assert params["conv1d"]["kernel"].shape == (3, 3, 4) and params["c3d"]["kernel"].shape == (2, 3, 2, 2, 3)
    rp = (lrjax.DoRA if dora else lrjax.LoRA)(rank=2, alpha=3.0)
    _, ad = rp.init(KEY, params)
    ad = _perturb(ad, scale=0.3)
    export_peft(tmp_path, rp, ad, params=params)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(net), str(tmp_path))
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((2, 3, 7)).astype(np.float32)  # NCW
    x3 = rng.standard_normal((1, 2, 4, 5, 4)).astype(np.float32)  # NCDHW
    eff = rp.materialize(params, ad)
    y1 = jax.lax.conv_general_dilated(jnp.asarray(x1.transpose(0, 2, 1)), eff["conv1d"]["kernel"], (1,), "VALID",
                                      dimension_numbers=("NWC", "WIO", "NWC")) + eff["conv1d"]["bias"]
    y3 = jax.lax.conv_general_dilated(jnp.asarray(x3.transpose(0, 2, 3, 4, 1)), eff["c3d"]["kernel"], (1, 1, 1),
                                      "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")) + eff["c3d"]["bias"]
    m = pm.base_model.model
    m.eval()
    with torch.no_grad():
        t1 = _t2n(m.conv1d(torch.from_numpy(x1))).transpose(0, 2, 1)
        t3 = _t2n(m.c3d(torch.from_numpy(x3))).transpose(0, 2, 3, 4, 1)
    np.testing.assert_allclose(y1, t1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y3, t3, rtol=1e-5, atol=1e-5)
    rp2, ad2 = import_peft(tmp_path, params)
    assert type(rp2) is type(rp)
    for p in ad:
        for n in ad[p]:
            np.testing.assert_allclose(ad2[p][n], ad[p][n], rtol=0, atol=0)
