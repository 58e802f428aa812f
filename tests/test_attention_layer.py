"""The KDA layer, softmax attention and the 3:1 hybrid stack (lrjax.nn.attention.kda): decode equals
the full forward, jit/grad, init facts, constant decode memory, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrjax.nn.attention import HybridStack, KimiDeltaAttention, ShortConvolution, SoftmaxAttention


def _x(B=2, T=11, d=16, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, d))


def _decode(model, x, cache, P):
    y0, cache = model(x[:, :P], cache)
    ys = [y0]
    for t in range(P, x.shape[1]):
        yt, cache = model(x[:, t:t + 1], cache)
        ys.append(yt)
    return jnp.concatenate(ys, axis=1), cache


@pytest.mark.parametrize("gate,hv", [("kda", 4), ("gdn", 2)])
def test_kda_layer_prefill_decode_equals_full(gate, hv):
    m = KimiDeltaAttention(16, num_heads=2, head_dim=4, num_v_heads=hv, gate=gate, chunk_size=4,
                           rngs=nnx.Rngs(0))
    x = _x()
    y, c = m(x)
    assert y.shape == x.shape and c["state"].shape == (2, hv, 4, 4)
    y2, c2 = _decode(m, x, m.init_cache(2), P=7)
    assert float(jnp.abs(y2 - y).max()) <= 1e-5
    assert float(jnp.abs(c2["state"] - c["state"]).max()) <= 1e-5
    yr, _ = KimiDeltaAttention(16, num_heads=2, head_dim=4, num_v_heads=hv, gate=gate, mode="recurrent",
                               rngs=nnx.Rngs(0))(x)
    assert float(jnp.abs(yr - y).max()) <= 1e-5


def test_hybrid_stack_3_to_1_decode_and_grad():
    s = HybridStack(16, 4, num_heads=2, kda_kwargs={"chunk_size": 4}, rngs=nnx.Rngs(0))
    assert s.kinds == ("kda", "kda", "kda", "attention")
    x = _x(T=9)
    y, _ = s(x)
    y2, _ = _decode(s, x, s.init_cache(2, 16), P=5)
    assert float(jnp.abs(y2 - y).max()) <= 1e-5
    gdef, state = nnx.split(s)

    @jax.jit
    def loss(st, x):
        return jnp.mean(nnx.merge(gdef, st)(x)[0] ** 2)

    val, grads = jax.value_and_grad(loss)(state, x)
    assert np.isfinite(float(val))
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert abs(float(val) - float(jnp.mean(y ** 2))) <= 1e-5


def test_init_follows_paper_and_gate_is_a_decay():
    m = KimiDeltaAttention(16, num_heads=2, head_dim=8, rngs=nnx.Rngs(3))
    A = np.exp(np.asarray(m.A_log[...]))
    assert A.shape == (2,) and np.all((A >= 1) & (A <= 16))
    dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
    assert dt.shape == (16,) and np.all((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001))
    # low-rank gates: d -> V -> HV*K (forget) and d -> V -> HV*V (output)
    assert m.f_proj1.kernel.shape == (16, 8) and m.f_proj2.kernel.shape == (8, 16)
    assert m.g_proj1.kernel.shape == (16, 8) and m.g_proj2.kernel.shape == (8, 16)
    assert (m.num_heads, m.head_dim, m.conv_size, m.chunk_size, m.norm_eps) == (2, 8, 4, 64, 1e-5)


def test_decode_cache_constant_vs_kv_cache_linear():
    m = KimiDeltaAttention(16, num_heads=2, head_dim=8, rngs=nnx.Rngs(0))
    a = SoftmaxAttention(16, num_heads=2, rngs=nnx.Rngs(0))
    assert m.cache_bytes(1) == 4 * (2 * 8 * 8 + 3 * 3 * 16)
    assert a.cache_bytes(1, 2048) == 2 * a.cache_bytes(1, 1024)


def test_short_convolution_is_causal():
    c = ShortConvolution(3, 4, rngs=nnx.Rngs(0))
    x = _x(B=1, T=8, d=3)
    y, _ = c(x)
    x2 = x.at[:, 5:].set(100.0)
    y2, _ = c(x2)
    np.testing.assert_array_equal(np.asarray(y[:, :5]), np.asarray(y2[:, :5]))


# ---------------------------------------------------------------------------------- bad input
R = nnx.Rngs(0)
CTOR_BAD = [
    (KimiDeltaAttention, dict(hidden_size=0), ValueError, "hidden_size"),
    (KimiDeltaAttention, dict(hidden_size=16.0), TypeError, "hidden_size"),
    (KimiDeltaAttention, dict(num_heads=0), ValueError, "num_heads"),
    (KimiDeltaAttention, dict(head_dim="8"), TypeError, "head_dim"),
    (KimiDeltaAttention, dict(num_heads=2, num_v_heads=3), ValueError, "num_v_heads"),
    (KimiDeltaAttention, dict(expand_v=0.3), ValueError, "expand_v"),
    (KimiDeltaAttention, dict(expand_v=-1.0), ValueError, "expand_v"),
    (KimiDeltaAttention, dict(conv_size=0), ValueError, "conv_size"),
    (KimiDeltaAttention, dict(gate="mamba"), ValueError, "gate"),
    (KimiDeltaAttention, dict(allow_neg_eigval="no"), TypeError, "allow_neg_eigval"),
    (KimiDeltaAttention, dict(norm_eps=0.0), ValueError, "norm_eps"),
    (KimiDeltaAttention, dict(mode="fast"), ValueError, "mode"),
    (KimiDeltaAttention, dict(chunk_size=0), ValueError, "chunk_size"),
    (KimiDeltaAttention, dict(chunk_size=1.5), TypeError, "chunk_size"),
    (KimiDeltaAttention, dict(rngs=0), TypeError, "rngs"),
    (SoftmaxAttention, dict(num_heads=3), ValueError, "num_heads"),
    (SoftmaxAttention, dict(head_dim=0), ValueError, "head_dim"),
    (SoftmaxAttention, dict(hidden_size=-2), ValueError, "hidden_size"),
    (SoftmaxAttention, dict(rngs=None), TypeError, "rngs"),
    (HybridStack, dict(num_layers=0), ValueError, "num_layers"),
    (HybridStack, dict(attention_every=-1), ValueError, "attention_every"),
    (HybridStack, dict(num_heads=5), ValueError, "num_heads"),
    (HybridStack, dict(mlp_ratio=0), ValueError, "mlp_ratio"),
    (HybridStack, dict(kda_kwargs=[1]), TypeError, "kda_kwargs"),
    (HybridStack, dict(kda_kwargs={"gate": "x"}), ValueError, "gate"),
    (ShortConvolution, dict(features=0), ValueError, "features"),
    (ShortConvolution, dict(kernel_size=True), TypeError, "kernel_size"),
]


def _ctor(cls, over):
    base = {KimiDeltaAttention: dict(hidden_size=16, num_heads=2, head_dim=8),
            SoftmaxAttention: dict(hidden_size=16, num_heads=2),
            HybridStack: dict(hidden_size=16, num_heads=2),
            ShortConvolution: dict(features=4)}[cls]
    kw = dict(base, rngs=R, **over)
    return cls(**kw)


@pytest.mark.parametrize("cls,over,exc,name", CTOR_BAD, ids=[f"{c.__name__}-{list(o)[0]}" for c, o, _, _ in CTOR_BAD])
def test_constructor_bad_input(cls, over, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        _ctor(cls, over)


@pytest.fixture(scope="module")
def models():
    return {"kda": _ctor(KimiDeltaAttention, {}), "attn": _ctor(SoftmaxAttention, {}),
            "hybrid": _ctor(HybridStack, {"num_layers": 1})}


CALL_BAD = [
    ("x list", lambda m: m([[0.0]]), TypeError, r"\bx must be an array"),
    ("x int", lambda m: m(jnp.zeros((1, 2, 16), jnp.int32)), TypeError, r"\bx must be a floating"),
    ("x width", lambda m: m(jnp.zeros((1, 2, 15))), ValueError, r"\bx must have shape \[B, T, 16\]"),
    ("x rank", lambda m: m(jnp.zeros((2, 16))), ValueError, r"\bx must have shape"),
    ("x empty", lambda m: m(jnp.zeros((1, 0, 16))), ValueError, r"\bx must hold at least one sequence of at least one token"),
    ("cache kind", lambda m: m(jnp.zeros((1, 2, 16)), cache=[0]), TypeError, r"\bcache must be"),
]
KDA_CACHE_BAD = [
    ("state shape", lambda m: dict(m.init_cache(1), state=jnp.zeros((1, 2, 8, 7))), ValueError, r"cache\['state'\] must have shape"),
    ("conv shape", lambda m: dict(m.init_cache(1), conv=(jnp.zeros((1, 2, 16)),) * 3), ValueError, r"cache\['conv'\]\[0\] must have shape"),
    ("conv arity", lambda m: dict(m.init_cache(1), conv=(jnp.zeros((1, 3, 16)),)), TypeError, r"cache\['conv'\] must be a tuple"),
    ("batch", lambda m: m.init_cache(2), ValueError, r"cache\['conv'\]\[0\] must have shape"),
]


@pytest.mark.parametrize("which", ["kda", "attn", "hybrid"])
@pytest.mark.parametrize("desc,call,exc,msg", CALL_BAD, ids=[c[0] for c in CALL_BAD])
def test_call_bad_input(models, which, desc, call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(models[which])


@pytest.mark.parametrize("desc,make,exc,msg", KDA_CACHE_BAD, ids=[c[0] for c in KDA_CACHE_BAD])
def test_kda_cache_bad(models, desc, make, exc, msg):
    m = models["kda"]
    with pytest.raises(exc, match=msg):
        m(jnp.zeros((1, 1, 16)), make(m))


def test_attention_cache_overflow(models):
    a = models["attn"]
    with pytest.raises(ValueError, match=r"\bcache holds max_len=4"):
        a(jnp.zeros((1, 5, 16)), a.init_cache(1, 4))
    with pytest.raises(ValueError, match=r"\bmax_len must be"):
        a.init_cache(1, 0)
    with pytest.raises(ValueError, match=r"\bbatch_size must be"):
        models["kda"].init_cache(0)


def test_layer_names_x_for_empty_batch_and_nan_and_checks_cache_dtype():
    import jax.numpy as jnp
    from flax import nnx
    import lrjax
    m = lrjax.nn.KimiDeltaAttention(8, num_heads=2, head_dim=4, conv_size=2, chunk_size=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must hold at least one sequence"):
        m(jnp.ones((0, 3, 8)))
    with pytest.raises(ValueError, match=r"^x contains NaN or Inf"):
        m(jnp.ones((1, 3, 8)).at[0, 0, 0].set(jnp.nan))
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        m.init_cache(1, dtype=jnp.int32)


def test_kda_layer_padding_mask_equals_unpadded(gate="kda"):
    """Row 0 left-padded (2 pads), row 1 right-padded (3 pads): outputs at real tokens and the final
    state equal the unpadded sequences'; padded rows give 0 and never NaN."""
    m = KimiDeltaAttention(16, num_heads=2, head_dim=4, gate=gate, chunk_size=4, rngs=nnx.Rngs(0))
    T = 9
    x = _x(B=2, T=T, seed=3)
    mask = jnp.array([[False] * 2 + [True] * 7, [True] * 6 + [False] * 3])
    y, c = m(x, mask=mask)
    ya, ca = m(x[0:1, 2:])
    yb, cb = m(x[1:2, :6])
    np.testing.assert_allclose(y[0, 2:], ya[0], atol=2e-5)
    np.testing.assert_allclose(y[1, :6], yb[0], atol=2e-5)
    np.testing.assert_allclose(c["state"][0], ca["state"][0], atol=2e-5)
    np.testing.assert_allclose(c["state"][1], cb["state"][0], atol=2e-5)
    assert float(jnp.abs(y[0, :2]).max()) == 0.0 and float(jnp.abs(y[1, 6:]).max()) == 0.0
    # the mask changes nothing when everything is real
    y1, _ = m(x, mask=jnp.ones((2, T), bool))
    np.testing.assert_allclose(y1, m(x)[0], atol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        m(x, mask=jnp.ones((2, T + 1), bool))
    with pytest.raises(TypeError, match="mask"):
        m(x, mask=jnp.ones((2, T)))
    # holes are exact too, and the returned conv windows are the unpadded sequence's (decode continues)
    hole = jnp.array([[True, True, False, True, True, True, True, True, True]])
    yh, ch = m(x[:1], mask=hole)
    yr, cr = m(x[:1, jnp.array([0, 1, 3, 4, 5, 6, 7, 8])])
    np.testing.assert_allclose(yh[0, hole[0]], yr[0], atol=2e-5)
    for a, b in zip(jax.tree_util.tree_leaves(ch), jax.tree_util.tree_leaves(cr)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_allclose(ca["conv"][0][0], c["conv"][0][0], atol=2e-5)
    np.testing.assert_allclose(cb["conv"][2][0], c["conv"][2][1], atol=2e-5)
    # a masked one-token decode step leaves the whole cache (conv windows included) unchanged
    _, c1 = m(x[:1, :1], cache=ca, mask=jnp.array([[False]]))
    for a, b in zip(jax.tree_util.tree_leaves(c1), jax.tree_util.tree_leaves(ca)):
        np.testing.assert_array_equal(a, b)
    assert m(x.astype(jnp.float16))[0].dtype == jnp.float16
