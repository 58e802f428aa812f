"""The shared jaxpr interpreter (lrjax.interpreter) and the activation-space branch of the
reparameterization protocol: a toy ReLU-gated LoRA with a rule-updated bias, checked against a
float64 NumPy transcription, on linen, NNX, plain functions and an nn.scan stack."""
import dataclasses
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _stacks import scan_stack
import lrjax
from lrjax.interpreter import Branch, FactoredStats, KernelValue, LowRank, NotMergeable, WithAux, interpret
from lrjax.reparam.base import Reparam


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

U = 0.25  # the toy bias rule's step


@dataclasses.dataclass(frozen=True)
class GatedLoRA(Reparam):
    """delta = s * (relu(x A + d) B); the bias d moves by U * sign(mean(c) - c), c = per-rank count
    of positive gates over the tokens (a FlyLoRA-like rule)."""

    activation_space = True
    factor_keys = ("a", "b", "d")
    frozen_keys = ("d",)
    state_keys = ("d",)

    def init_leaf(self, key, w, path):
        *bs, m, n = w.shape
        ka, kb = jax.random.split(key)
        a = jax.random.normal(ka, (*bs, m, self.rank), w.dtype) / np.sqrt(m)
        b = jax.random.normal(kb, (*bs, self.rank, n), w.dtype) * 0.1
        return w, {"a": a, "b": b, "d": jnp.zeros((*bs, self.rank), jnp.float32)}

    def _check_extra(self, path, f, argname):
        if tuple(f["d"].shape) != tuple(f["a"].shape[:-2]) + (f["a"].shape[-1],):
            raise ValueError(f"{argname}[{path!r}]['d'] has the wrong shape")

    def branch(self, x, y, f, path):
        cd = jnp.promote_types(jnp.promote_types(x.dtype, f["a"].dtype), jnp.float32)
        z = x.astype(cd) @ f["a"].astype(cd) + f["d"].astype(cd)
        g = jax.nn.relu(z)
        counts = (z > 0).reshape(-1, z.shape[-1]).sum(0).astype(jnp.float32)
        return WithAux(self.scale * g @ f["b"].astype(cd), counts)

    def update_state(self, f, aux, path):
        d = f["d"]
        return {"d": (d + U * jnp.sign(aux.mean(-1, keepdims=True) - aux)).astype(d.dtype)}


def _ref_branch(x, a, b, d, s):
    z = x @ a + d
    return s * np.maximum(z, 0) @ b, (z > 0).reshape(-1, z.shape[-1]).sum(0)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(16, name="fc1")(x))
        return nn.Dense(5, name="fc2")(h)


def _mlp_ref(p, f, x, s):
    """float64 forward of MLP with the gated branch on both kernels; returns (y, counts)."""
    c = {}
    x = np.asarray(x, np.float64)
    h = x @ np.asarray(p["fc1"]["kernel"], np.float64)
    k1 = {k: np.asarray(v, np.float64) for k, v in f["params/fc1/kernel"].items()}
    dh, c["params/fc1/kernel"] = _ref_branch(x, k1["a"], k1["b"], k1["d"], s)
    h = h + dh + np.asarray(p["fc1"]["bias"], np.float64)
    h = np.asarray(jax.nn.gelu(jnp.asarray(h, jnp.float32)), np.float64)
    y = h @ np.asarray(p["fc2"]["kernel"], np.float64)
    k2 = {k: np.asarray(v, np.float64) for k, v in f["params/fc2/kernel"].items()}
    dy, c["params/fc2/kernel"] = _ref_branch(h, k2["a"], k2["b"], k2["d"], s)
    return y + dy + np.asarray(p["fc2"]["bias"], np.float64), c


@pytest.fixture(scope="module")
def setup():
    model = MLP()
    x = _randn(0, (6, 8))
    params = model.init(jax.random.key(1), x)
    rp = GatedLoRA(rank=4, alpha=8.0)
    base, ad = rp.init(jax.random.key(2), params)
    ad = {k: {**f, "d": jnp.linspace(-0.3, 0.3, 4, dtype=jnp.float32)} for k, f in ad.items()}
    return model, x, params, rp, base, ad


def test_branch_matches_float64_and_returns_state(setup):
    model, x, params, rp, base, ad = setup
    g = lrjax.factored(model.apply, rp)
    y, state = jax.jit(g)(base, ad, x)
    ref, counts = _mlp_ref(params["params"], ad, x, rp.scale)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-4, atol=2e-5)
    assert set(state) == set(ad)
    for k, st in state.items():
        d = np.asarray(ad[k]["d"], np.float64)
        want = d + U * np.sign(counts[k].mean() - counts[k])
        np.testing.assert_allclose(np.asarray(st["d"]), want, atol=1e-6)
    ad2 = rp.with_state(ad, state)
    assert np.array_equal(np.asarray(ad2["params/fc1/kernel"]["d"]), np.asarray(state["params/fc1/kernel"]["d"]))
    assert ad2["params/fc1/kernel"]["a"] is ad["params/fc1/kernel"]["a"]


def test_grad_reaches_trainable_factors_only(setup):
    model, x, params, rp, base, ad = setup
    g = lrjax.factored(model.apply, rp)
    grads = jax.grad(lambda a: jnp.sum(g(base, a, x)[0] ** 2))(ad)
    for k, gr in grads.items():
        assert float(jnp.abs(gr["a"]).sum()) > 0 and float(jnp.abs(gr["b"]).sum()) > 0
        assert float(jnp.abs(gr["d"]).sum()) == 0.0
    # finite differences on one entry of B against the float64 reference
    k = "params/fc2/kernel"
    eps = 1e-3
    bump = lambda e: {**ad, k: {**ad[k], "b": ad[k]["b"].at[0, 1].add(e)}}  # noqa: E731
    loss = lambda a: float(np.sum(_mlp_ref(params["params"], a, x, rp.scale)[0] ** 2))  # noqa: E731
    fd = (loss(bump(eps)) - loss(bump(-eps))) / (2 * eps)
    np.testing.assert_allclose(float(grads[k]["b"][0, 1]), fd, rtol=2e-3)


def test_weight_space_operations_refuse(setup):
    _, _, params, rp, base, ad = setup
    for op, args in (("materialize", (base, ad)), ("merge", (base, ad)), ("unmerge", (base, ad)),
                     ("delta", (base, ad))):
        with pytest.raises(NotMergeable, match=f"{op}.*activation-space.*lrjax.factored"):
            getattr(rp, op)(*args)
    assert issubclass(NotMergeable, TypeError)
    with pytest.raises(NotMergeable):
        lrjax.reparam.multi.combine(base, {"x": ad}, rp, {"x": 1.0})
    with pytest.raises(NotMergeable):
        lrjax.interop.export_peft("/tmp/nm_peft", rp, ad, params=base)


def test_unfollowable_use_raises_naming_the_primitive():
    w = {"emb": _randn(0, (7, 7))}
    rp = GatedLoRA(rank=2, targets="emb")
    base, ad = rp.init(jax.random.key(1), w)
    ids = jnp.array([0, 3, 5])
    g = lrjax.factored(lambda p, i: jnp.take(p["emb"], i, axis=0), rp)
    with pytest.raises(NotMergeable, match="gather.*emb|emb.*gather"):
        g(base, ad, ids)


def test_nnx_and_plain_function_agree(setup):
    rp = GatedLoRA(rank=3)
    lin = nnx.Linear(8, 5, rngs=nnx.Rngs(0))
    gdef, state = nnx.split(lin)
    x = _randn(3, (2, 4, 8))
    base, ad = rp.init(jax.random.key(4), state)
    (k,) = ad
    y_nnx, st = lrjax.factored(lambda s, x: nnx.merge(gdef, s)(x), rp)(base, ad, x)
    f = ad[k]
    w = np.asarray(state["kernel"].value, np.float64)
    xr = np.asarray(x, np.float64)
    dref, cref = _ref_branch(xr, *(np.asarray(f[n], np.float64) for n in "abd"), rp.scale)
    ref = xr @ w + dref + np.asarray(state["bias"].value, np.float64)
    np.testing.assert_allclose(np.asarray(y_nnx, np.float64), ref, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(st[k]["d"]),
                               np.asarray(f["d"]) + U * np.sign(cref.mean() - cref), atol=1e-6)
    # a plain function with an einsum over two input axes (heads x head_dim -> out)
    p = {"w": _randn(5, (2, 3, 4))}
    rp2 = GatedLoRA(rank=2, targets="w", axes=lrjax.axes.Axes((), (0, 1), (2,)))
    b2, a2 = rp2.init(jax.random.key(6), p)
    xx = _randn(7, (5, 2, 3))
    y2, _ = lrjax.factored(lambda p, x: jnp.einsum("thd,hdo->to", x, p["w"]), rp2)(b2, a2, xx)
    f2 = {n: np.asarray(v, np.float64) for n, v in a2["w"].items()}
    xm = np.asarray(xx, np.float64).reshape(5, 6)
    ref2 = xm @ np.asarray(p["w"], np.float64).reshape(6, 4) + _ref_branch(xm, f2["a"], f2["b"], f2["d"],
                                                                           rp2.scale)[0]
    np.testing.assert_allclose(np.asarray(y2, np.float64), ref2, rtol=2e-4, atol=2e-5)


def ScanMLP():
    return scan_stack(8)


def test_scanned_stack_gets_per_layer_state():
    model = ScanMLP()
    x = _randn(0, (4, 8))
    params = model.init(jax.random.key(1), x)
    rp = GatedLoRA(rank=2)
    base, ad = rp.init(jax.random.key(2), params)
    (k,) = ad
    assert ad[k]["d"].shape == (3, 2)
    stats = FactoredStats()
    y, st = lrjax.factored(model.apply, rp, stats=stats)(base, ad, x)
    assert stats.fallback == [] and stats.factored >= 1
    p = params["params"]["blocks"]["fc"]
    h = np.asarray(x, np.float64)
    counts = []
    for layer in range(3):
        f = {n: np.asarray(ad[k][n][layer], np.float64) for n in "abd"}
        dh, c = _ref_branch(h, f["a"], f["b"], f["d"], rp.scale)
        h = h + h @ np.asarray(p["kernel"][layer], np.float64) + dh + np.asarray(p["bias"][layer], np.float64)
        counts.append(c)
    np.testing.assert_allclose(np.asarray(y, np.float64), h, rtol=2e-4, atol=2e-5)
    counts = np.stack(counts)
    np.testing.assert_allclose(np.asarray(st[k]["d"]),
                               np.asarray(ad[k]["d"]) + U * np.sign(counts.mean(-1, keepdims=True) - counts),
                               atol=1e-6)


def test_kernel_used_twice_sums_aux():
    p = {"w": _randn(0, (4, 4))}
    rp = GatedLoRA(rank=2, targets="w")
    base, ad = rp.init(jax.random.key(1), p)
    x = _randn(2, (3, 4))
    y, aux = interpret(lambda p, x: x @ p["w"] + (2 * x) @ p["w"], base,
                       {"w": rp.kernel_value("w", base["w"], ad["w"])}, (x,), return_aux=True)
    f = {n: np.asarray(v, np.float64) for n, v in ad["w"].items()}
    xr = np.asarray(x, np.float64)
    c1 = _ref_branch(xr, f["a"], f["b"], f["d"], rp.scale)[1]
    c2 = _ref_branch(2 * xr, f["a"], f["b"], f["d"], rp.scale)[1]
    np.testing.assert_allclose(np.asarray(aux["w"]), c1 + c2)


def test_bfloat16_rounds_once(setup):
    rp = GatedLoRA(rank=4)
    p = {"kernel": (_randn(0, (8, 8)) / 3).astype(jnp.bfloat16)}
    base, ad = rp.init(jax.random.key(1), p)
    x = _randn(2, (5, 8)).astype(jnp.bfloat16)
    y, _ = lrjax.factored(lambda p, x: x @ p["kernel"], rp)(base, ad, x)
    assert y.dtype == jnp.bfloat16
    f = ad["kernel"]
    xw = (x @ p["kernel"]).astype(jnp.float32)  # the base product in bf16, as the model computes it
    d = rp.branch(x, None, f, "kernel").y
    want = (xw + d.astype(jnp.float32)).astype(jnp.bfloat16)
    assert np.array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))


def test_vmap_over_adapters(setup):
    model, x, params, rp, base, ad = setup
    g = lrjax.factored(model.apply, rp)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), ad)
    ys, _ = jax.vmap(g, in_axes=(None, 0, None))(base, stacked, x)
    y0, _ = g(base, ad, x)
    y1, _ = g(base, jax.tree_util.tree_map(lambda a: 2 * a, ad), x)
    np.testing.assert_allclose(ys[0], y0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ys[1], y1, rtol=1e-5, atol=1e-6)


def test_with_state_refuses_bad_state(setup):
    _, _, _, rp, _, ad = setup
    k = "params/fc1/kernel"
    with pytest.raises(ValueError, match="no adapter at path"):
        rp.with_state(ad, {"nope": {"d": ad[k]["d"]}})
    with pytest.raises(ValueError, match="not state keys"):
        rp.with_state(ad, {k: {"a": ad[k]["a"]}})
    with pytest.raises(ValueError, match="shape"):
        rp.with_state(ad, {k: {"d": jnp.zeros(3)}})
    with pytest.raises(TypeError, match="state must be"):
        rp.with_state(ad, [1])


def test_state_keys_must_be_frozen():
    with pytest.raises(TypeError, match="subset of frozen_keys"):
        @dataclasses.dataclass(frozen=True)
        class Bad(Reparam):
            state_keys = ("d",)


def test_branch_shape_error_names_the_adapter():
    @dataclasses.dataclass(frozen=True)
    class Wrong(GatedLoRA):
        def branch(self, x, y, f, path):
            return jnp.zeros(x.shape[:-1] + (1,))

    p = {"w": jnp.ones((4, 3))}
    rp = Wrong(rank=2, targets="w")
    base, ad = rp.init(jax.random.key(0), p)
    with pytest.raises(ValueError, match="Wrong at 'w'.*shape"):
        lrjax.factored(lambda p, x: x @ p["w"], rp)(base, ad, jnp.ones((2, 4)))


def test_custom_kernel_value_extension_point():
    """A variant may hand the interpreter its own KernelValue: here one that scales the product."""

    class Doubled(KernelValue):
        def __init__(self, w, path):
            self.w, self.path, self.ax = w, path, lrjax.axes.Axes((), (0,), (1,))

        def dot(self, x, params, out_aval):
            return 2 * jax.lax.dot_general(x, self.w, params["dimension_numbers"])

        def materialize(self, why=""):
            return 2 * self.w

    w = _randn(0, (3, 4))
    x = _randn(1, (2, 3))
    fn = lambda p, x: jnp.tanh(x @ p["w"]) + p["w"].sum()  # noqa: E731 -- one followed use, one fallback
    stats = FactoredStats()
    y = interpret(fn, {"w": w}, {"w": Doubled(w, "w")}, (x,), stats=stats)
    np.testing.assert_allclose(y, jnp.tanh(2 * x @ w) + 2 * w.sum(), rtol=1e-5)
    assert stats.factored == 1 and stats.fallback == ["reduce_sum"]
    assert isinstance(LowRank(w, w[:, :1], w[:1], 1.0, None, lrjax.axes.Axes((), (0,), (1,))), KernelValue)
    assert issubclass(Branch, KernelValue)


def test_es_and_reparam_use_only_public_interpreter_names():
    root = pathlib.Path(lrjax.__file__).parent
    for sub, other in (("es", "reparam"), ("reparam", "es")):
        for f in (root / sub).glob("*.py"):
            src = f.read_text()
            assert not re.search(rf"from lrjax\.{other}[.\w]* import [^\n]*\b_\w", src), f
            assert not re.search(r"from lrjax\.interpreter import [^\n]*\b_\w", src), f


def test_remat_bodies_are_followed():
    class RematMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.remat(MLP)(name="inner")(x)

    model = RematMLP()
    x = _randn(0, (6, 8))
    params = model.init(jax.random.key(1), x)
    rp = GatedLoRA(rank=4, alpha=8.0)
    base, ad = rp.init(jax.random.key(2), params)
    stats = FactoredStats()
    y, _ = lrjax.factored(model.apply, rp, stats=stats)(base, ad, x)
    ref, _ = _mlp_ref(params["params"]["inner"], {k.replace("inner/", ""): v for k, v in ad.items()}, x, rp.scale)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-4, atol=2e-5)
    assert stats.fallback == [] and stats.factored == 2
    jax.grad(lambda a: jnp.sum(lrjax.factored(model.apply, rp)(base, a, x)[0]))(ad)


def test_misuse_is_refused_clearly(setup):
    model, x, params, rp, base, ad = setup
    w = {"w": jnp.ones((3, 4))}
    with pytest.raises(ValueError, match="values: no leaf at path 'v'"):
        interpret(lambda p, x: x @ p["w"], w, {"v": jnp.zeros((3, 4))}, (jnp.ones((2, 3)),))
    g = lrjax.factored(model.apply, rp)
    with pytest.raises(TypeError, match="keyword 'train'.*close over"):
        g(base, ad, x, train=True)
    with pytest.raises(TypeError, match=r"args\[1\] is a Python bool.*close over"):
        g(base, ad, x, True)

    @dataclasses.dataclass(frozen=True)
    class NoneBranch(GatedLoRA):
        def branch(self, x, y, f, path):
            return None

    rp2 = NoneBranch(rank=2, targets="w")
    b2, a2 = rp2.init(jax.random.key(0), w)
    with pytest.raises(TypeError, match="NoneBranch at 'w'.*floating array"):
        lrjax.factored(lambda p, x: x @ p["w"], rp2)(b2, a2, jnp.ones((2, 3)))
    k = "params/fc1/kernel"
    with pytest.raises(ValueError, match="NaN"):
        rp.with_state(ad, {k: {"d": jnp.full_like(ad[k]["d"], jnp.nan)}})


def test_activation_variant_without_branch_is_refused_at_class_creation():
    with pytest.raises(TypeError, match="defines neither branch"):
        @dataclasses.dataclass(frozen=True)
        class NoBranch(Reparam):
            activation_space = True
