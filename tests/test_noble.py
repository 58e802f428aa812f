"""NOBLE (lrjax.nn.noble, lrjax.reparam.noble): y = x W + b + sigma(x W_down) W_up with CosNet
sigma(h) = cos(w2 * (cos(w1 * h + p1) M) + p2), ReLU and GELU, against a float64 NumPy transcription;
W_up = 0 gives the base model exactly; parameter overhead 2dr + r^2 + 4r; gradients; jit/vmap; bfloat16;
the char transformer and an nn.scan stack through lrjax.factored; bad input."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _stacks import scan_stack
import lrjax
from lrjax.interpreter import NotMergeable
from lrjax.models import char_transformer as ct
from lrjax.nn.noble import (BRANCHES, NOBLELinear, cosnet, init_noble, noble_branch, noble_linear, noble_num_params)
from lrjax.reparam.noble import NOBLE


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

try:
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover
    _erf = np.vectorize(math.erf)


def _ref_branch(x, f, kind):
    """float64 transcription of the paper's branch."""
    f = {k: np.asarray(v, np.float64) for k, v in f.items()}
    h = np.asarray(x, np.float64) @ f["w_down"]
    if kind == "cosnet":
        h1 = np.cos(f["w1"] * h + f["p1"])
        h3 = np.cos(f["w2"] * (h1 @ f["mix"]) + f["p2"])
    elif kind == "relu":
        h3 = np.maximum(h, 0.0)
    else:
        h3 = 0.5 * h * (1.0 + _erf(h / np.sqrt(2.0)))
    return h3 @ f["w_up"]


def _randomize(f, key):
    """Factors away from init: a nonzero W_up and moved frequencies/phases/mix."""
    out = dict(f)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())  # NumPy: no program per shape
    for k in sorted(f):
        v = f[k]
        out[k] = jnp.asarray(np.asarray(v, np.float32) + 0.5 * rng.normal(size=v.shape).astype(np.float32), v.dtype)
    return out


# ---------------------------------------------------------------- pure math vs float64
@pytest.mark.parametrize("kind", BRANCHES)
def test_noble_linear_matches_float64(kind):
    m, n, r = 10, 7, 3
    f = _randomize(init_noble(jax.random.key(0), m, n, r, kind), jax.random.key(1))
    x = _randn(2, (2, 5, m))
    w = _randn(3, (m, n)) / 3
    b = _randn(4, (n,))
    y = jax.jit(lambda x, w, b, f: noble_linear(x, w, f, b, kind))(x, w, b, f)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64) + _ref_branch(x, f, kind)
    assert y.dtype == jnp.float32 and y.shape == (2, 5, n)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-5, atol=2e-5)
    t = noble_branch(x, f, kind)
    np.testing.assert_allclose(np.asarray(t, np.float64), _ref_branch(x, f, kind), rtol=2e-5, atol=2e-5)
    assert float(jnp.abs(t).max()) > 0.1  # the branch matters in this check


def test_init_values():
    m, n, r = 64, 40, 8
    f = init_noble(jax.random.key(0), m, n, r)
    assert set(f) == {"w_down", "w_up", "w1", "p1", "mix", "w2", "p2"}
    assert np.array_equal(f["w_up"], np.zeros((r, n))) and f["w_up"].dtype == jnp.float32
    assert np.array_equal(f["w1"], np.ones(r)) and np.array_equal(f["w2"], np.ones(r))
    for p in ("p1", "p2"):
        assert np.all(np.abs(np.asarray(f[p])) <= np.pi) and float(np.std(f[p])) > 0.5
    assert abs(float(np.std(f["w_down"])) * np.sqrt(m) - 1) < 0.15
    assert abs(float(np.std(f["mix"])) * np.sqrt(r) - 1) < 0.3
    g = init_noble(jax.random.key(0), m, n, r, "relu", batch_shape=(3,), dtype=jnp.bfloat16, freq_init=2.0)
    assert set(g) == {"w_down", "w_up"} and g["w_down"].shape == (3, m, r) and g["w_up"].dtype == jnp.bfloat16
    assert init_noble(jax.random.key(0), m, n, r, freq_init=2.5)["w2"][0] == 2.5


def test_param_overhead():
    for d, r in ((64, 8), (768, 64), (5, 1)):
        assert noble_num_params(d, d, r) == 2 * d * r + r * r + 4 * r
        assert noble_num_params(d, d, r, "relu") == noble_num_params(d, d, r, "gelu") == 2 * d * r
    assert noble_num_params(12, 20, 4) == 4 * 32 + 16 + 16
    # the layer and the reparam count the same numbers
    for kind in BRANCHES:
        lin = NOBLELinear(12, 20, rank=4, branch=kind, use_bias=False, rngs=nnx.Rngs(0))
        n_all = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(nnx.state(lin, nnx.Param)))
        assert n_all - 12 * 20 == noble_num_params(12, 20, 4, kind)
        rp = NOBLE(4, branch=kind, targets="w")
        _, ad = rp.init(jax.random.key(0), {"w": jnp.ones((12, 20))})
        assert rp.num_params(ad) == noble_num_params(12, 20, 4, kind)


# ---------------------------------------------------------------- W_up = 0: the base model exactly
@pytest.mark.parametrize("kind", BRANCHES)
def test_layer_at_init_equals_linear_bitwise(kind):
    lin = NOBLELinear(16, 12, rank=4, branch=kind, rngs=nnx.Rngs(0))
    lin.bias[...] = _randn(5, (12,))
    ref = nnx.Linear(16, 12, rngs=nnx.Rngs(1))
    ref.kernel[...], ref.bias[...] = lin.kernel[...], lin.bias[...]
    x = _randn(3, (3, 5, 16))
    assert np.array_equal(lin(x), ref(x))
    gl, sl = nnx.split(lin)
    gr, sr = nnx.split(ref)
    yl = jax.jit(lambda s, x: nnx.merge(gl, s)(x))(sl, x)
    yr = jax.jit(lambda s, x: nnx.merge(gr, s)(x))(sr, x)
    assert np.array_equal(yl, yr)


@pytest.fixture(scope="module")
def tiny_lm():
    model = ct.CharTransformer(32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=8, rngs=nnx.Rngs(0))
    _, state, apply = ct.split(model)
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
    return state, apply, ids


def test_char_transformer_at_init_equals_base(tiny_lm):
    state, apply, ids = tiny_lm
    rp = NOBLE(2, targets=ct.ADAPTER_TARGETS)
    base, ad = rp.init(jax.random.key(2), state)
    assert base is state and len(ad) == 12
    y = lrjax.factored(apply, rp)(base, ad, ids)
    assert np.array_equal(y, apply(state, ids))  # op by op: bitwise
    # in one jitted program XLA may fuse the ops around the extra branch differently (last-ulp level)
    yj = jax.jit(lrjax.factored(apply, rp))(base, ad, ids)
    np.testing.assert_allclose(yj, jax.jit(apply)(state, ids), rtol=1e-6, atol=1e-6)


def test_pretraining_grads_at_init_and_steps(tiny_lm):
    """At init only W_up gets a gradient (the branch trains from step one) and the base gets the base
    model's gradient; then a few SGD steps on base AND branch lower the loss and move both."""
    state, apply, ids = tiny_lm
    rp = NOBLE(2, targets=ct.ADAPTER_TARGETS)
    base, ad = rp.init(jax.random.key(2), state)
    g = lrjax.factored(apply, rp)

    def nll(logits):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))

    vg = jax.jit(jax.value_and_grad(lambda params: nll(g(*params, ids))))
    l0, (gb, ga) = vg((base, ad))
    gref = jax.jit(jax.grad(lambda s: nll(apply(s, ids))))(state)
    for p, f in ga.items():
        assert float(jnp.abs(f["w_up"]).max()) > 1e-6, p
        for k in ("w_down", "w1", "p1", "mix", "w2", "p2"):
            assert float(jnp.abs(f[k]).max()) == 0.0, (p, k)
    for a, b in zip(jax.tree_util.tree_leaves(gb), jax.tree_util.tree_leaves(gref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    params = (base, ad)
    for _ in range(4):
        l, gr = vg(params)
        params = jax.tree_util.tree_map(lambda p, d: p - 0.5 * d, params, gr)
    assert float(vg(params)[0]) < float(l0)
    k = "blocks/0/mlp/fc1/kernel"  # (q/k gradients are tiny at this init: near-uniform attention)
    assert float(jnp.abs(params[1][k]["w_down"] - ad[k]["w_down"]).max()) > 0
    assert float(jnp.abs(params[1][k]["p1"] - ad[k]["p1"]).max()) > 0
    assert not np.array_equal(lrjax.tree.flatten(params[0])[k], lrjax.tree.flatten(base)[k])


# ---------------------------------------------------------------- reparam on linen / nn.scan
def ScanMLP():
    return scan_stack(6)


def test_scan_stack_matches_float64():
    model = ScanMLP()
    x = _randn(0, (4, 6))
    params = model.init(jax.random.key(1), x)
    rp = NOBLE(2)
    base, ad = rp.init(jax.random.key(2), params)
    (k,) = ad
    assert ad[k]["w_down"].shape == (3, 6, 2) and ad[k]["mix"].shape == (3, 2, 2)
    ad = {k: _randomize(ad[k], jax.random.key(3))}
    y = jax.jit(lrjax.factored(model.apply, rp))(base, ad, x)
    p = params["params"]["blocks"]["fc"]
    h = np.asarray(x, np.float64)
    for layer in range(3):
        f = {n: ad[k][n][layer] for n in ad[k]}
        h = h + h @ np.asarray(p["kernel"][layer], np.float64) + np.asarray(p["bias"][layer], np.float64) \
            + _ref_branch(h, f, "cosnet")
    np.testing.assert_allclose(np.asarray(y, np.float64), h, rtol=1e-4, atol=1e-4)


def test_grad_matches_finite_differences_and_vmap():
    m, n, r = 5, 4, 2
    f = _randomize(init_noble(jax.random.key(0), m, n, r), jax.random.key(1))
    x = _randn(2, (3, m))
    w = _randn(3, (m, n))

    def ref_loss(ff):
        return np.sum((np.asarray(x, np.float64) @ np.asarray(w, np.float64) + _ref_branch(x, ff, "cosnet")) ** 2)

    grads = jax.jit(jax.grad(lambda f: jnp.sum(noble_linear(x, w, f) ** 2)))(f)
    for nm, idx in (("w1", (1,)), ("p2", (0,)), ("mix", (1, 0)), ("w_down", (2, 1)), ("w_up", (1, 3))):
        def at(d):
            v = np.asarray(f[nm], np.float64).copy()
            v[idx] += d
            return ref_loss({**f, nm: v})
        fd = (at(1e-5) - at(-1e-5)) / 2e-5
        np.testing.assert_allclose(float(grads[nm][idx]), fd, rtol=2e-3, atol=2e-4)
    yv = jax.vmap(lambda xi: noble_linear(xi, w, f))(x)
    np.testing.assert_allclose(yv, noble_linear(x, w, f), rtol=1e-6, atol=1e-6)
    fs = jax.tree_util.tree_map(lambda v: jnp.stack([v, 2 * v]), f)
    yb = jax.vmap(lambda ff: noble_branch(x, ff))(fs)
    np.testing.assert_allclose(yb[1], noble_branch(x, jax.tree_util.tree_map(lambda v: 2 * v, f)), rtol=1e-6, atol=1e-6)


def test_bfloat16():
    lin = NOBLELinear(16, 8, rank=4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    f = _randomize(lin.factors(), jax.random.key(1))
    for k, v in f.items():
        getattr(lin, k)[...] = v
    x = _randn(2, (3, 16), jnp.bfloat16)
    y = jax.jit(lambda x: lin(x))(x)
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x, np.float64) @ np.asarray(lin.kernel[...], np.float64) + _ref_branch(x, f, "cosnet")
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=3e-2, atol=3e-2)
    lin16 = NOBLELinear(16, 8, rank=4, branch="relu", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert lin16(jnp.ones((2, 16))).dtype == jnp.bfloat16 and lin16.kernel[...].dtype == jnp.float32
    # bfloat16 factors on a float32 base: float32 output; the branch is computed in float32
    rp = NOBLE(2, dtype=jnp.bfloat16, targets="w")
    p = {"w": _randn(3, (16, 8))}
    base, ad = rp.init(jax.random.key(4), p)
    assert ad["w"]["w_down"].dtype == jnp.bfloat16
    x32 = _randn(5, (3, 16))
    y32 = lrjax.factored(lambda p, x: x @ p["w"], rp)(base, ad, x32)
    assert y32.dtype == jnp.float32 and np.array_equal(y32, x32 @ p["w"])


# ---------------------------------------------------------------- config, protocol, bad input
def test_config_and_not_mergeable():
    rp = NOBLE(4, branch="gelu", targets="w")
    assert rp.kind == "gelu" and rp.scale == 1.0 and rp.activation_space
    assert dataclasses.replace(rp, rank=2) == NOBLE(2, branch="gelu", targets="w")
    fields = {fl.name: getattr(rp, fl.name) for fl in dataclasses.fields(rp) if fl.init}
    assert NOBLE(**fields) == rp and hash(NOBLE(**fields)) == hash(rp)
    p = {"w": jnp.ones((8, 8))}
    base, ad = rp.init(jax.random.key(0), p)
    tr, fr = rp.split(ad)  # nothing is frozen: pretraining trains the whole branch
    assert set(tr["w"]) == {"w_down", "w_up"} and fr == {"w": {}} and rp.join(tr, fr).keys() == ad.keys()
    for op in (rp.materialize, rp.merge, rp.unmerge, rp.delta):
        with pytest.raises(NotMergeable, match="activation-space"):
            op(base, ad)
    # adapters of another branch kind are refused, naming the mismatch
    _, ad_cos = NOBLE(4, targets="w").init(jax.random.key(0), p)
    with pytest.raises(ValueError, match="branch='gelu'"):
        lrjax.factored(lambda p, x: x @ p["w"], rp)(base, ad_cos, jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="w_down"):
        lrjax.factored(lambda p, x: x @ p["w"], NOBLE(2, branch="gelu", targets="w"))(base, ad, jnp.ones((2, 8)))


def test_bad_input():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="rank"):
        init_noble(key, 8, 4, 5)
    with pytest.raises(ValueError, match="rank"):
        NOBLELinear(8, 4, rank=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
        NOBLE(5, targets="w").init(key, {"w": jnp.ones((8, 4))})
    with pytest.raises(ValueError, match="rank"):
        noble_num_params(8, 4, 5)
    for bad in (True, 2.0, "4"):
        with pytest.raises(TypeError, match="rank"):
            NOBLE(bad)
        with pytest.raises(TypeError, match="rank"):
            NOBLELinear(8, 4, rank=bad, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="in_features"):
        NOBLELinear(True, 4, rank=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"branch.*'cosnet', 'relu', 'gelu'.*'siren'"):
        NOBLE(2, branch="siren")
    with pytest.raises(ValueError, match=r"branch.*'cosnet', 'relu', 'gelu'"):
        NOBLELinear(8, 4, rank=2, branch="tanh", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="branch"):
        noble_num_params(8, 8, 2, branch=None)
    with pytest.raises(ValueError, match="branch"):
        NOBLE(2, branch="relu", kind="gelu")
    with pytest.raises(ValueError, match="alpha"):
        NOBLE(2, alpha=4.0)
    with pytest.raises(ValueError, match="freq_init"):
        NOBLE(2, freq_init=0.0)
    with pytest.raises(TypeError, match="use_bias"):
        NOBLELinear(8, 4, rank=2, use_bias=1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rngs"):
        NOBLELinear(8, 4, rank=2, rngs=0)
    f = init_noble(key, 8, 4, 2)
    with pytest.raises(ValueError, match="x"):
        noble_branch(jnp.ones((3, 5)), f)
    with pytest.raises(TypeError, match="x"):
        noble_branch(jnp.ones((3, 8), jnp.int32), f)
    with pytest.raises(ValueError, match="factors"):
        noble_branch(jnp.ones((3, 8)), {k: v for k, v in f.items() if k != "mix"})
    with pytest.raises(ValueError, match="factors"):
        noble_branch(jnp.ones((3, 8)), f, "relu")
    with pytest.raises(ValueError, match="bias"):
        noble_linear(jnp.ones((3, 8)), jnp.ones((8, 4)), f, jnp.ones(3))
    with pytest.raises(ValueError, match="factors"):
        noble_linear(jnp.ones((3, 8)), jnp.ones((8, 5)), f)
    # mismatched factor shapes name the factor and the expected shape
    with pytest.raises(ValueError, match=r"factors\['w_up'\] must have shape \(2, 4\)"):
        noble_linear(jnp.ones((3, 8)), jnp.ones((8, 4)), {**f, "w_up": jnp.ones((3, 4))})
    with pytest.raises(ValueError, match=r"factors\['w_down'\] must have shape \(8, r\)"):
        noble_linear(jnp.ones((3, 8)), jnp.ones((8, 4)), {**f, "w_down": jnp.ones((6, 2))})
    with pytest.raises(ValueError, match=r"factors\['mix'\].*expected \(2, 2\)"):
        noble_branch(jnp.ones((3, 8)), {**f, "mix": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match=r"w1 must have shape \(2,\)"):
        cosnet(jnp.ones((3, 2)), jnp.ones(3), f["p1"], f["mix"], f["w2"], f["p2"])
    with pytest.raises(ValueError, match=r"mix must have shape \(2, 2\)"):
        cosnet(jnp.ones((3, 2)), f["w1"], f["p1"], jnp.ones((2, 3)), f["w2"], f["p2"])
    with pytest.raises(TypeError, match="h"):
        cosnet(jnp.ones((3, 2), jnp.int32), f["w1"], f["p1"], f["mix"], f["w2"], f["p2"])
