"""lrjax.nn.mcuformer: factorized linear (SVD init), supernet slicing, masked supernet forward, memory model."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax.nn import mcuformer as M

# jitted once per patch size: eager op-by-op dispatch is slow on a loaded CPU
japply = jax.jit(M.apply, static_argnames="patch")


@pytest.fixture(scope="module")
def sup():
    return M.init_supernet(jax.random.key(0), patches=(2, 4), embed=32, depth=2, mlp_ratio=2)


@pytest.fixture(scope="module")
def x():
    return jax.random.uniform(jax.random.key(1), (3, 64), jnp.float32)


SPEC = {"patch": 4, "embed": 16, "depth": 1, "mlp_ratio": 2, "rank_ratio": 0.5}


# --------------------------------------------------------------------------- factorized linear
def test_full_rank_factorization_equals_dense():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 20)).astype(np.float32)
    b = rng.standard_normal(20).astype(np.float32)
    xx = rng.standard_normal((5, 12)).astype(np.float32)
    f = M.svd_factorize(jnp.asarray(w), M.rank_of(1.0, 12, 20))
    assert f["v"].shape == (12, 12) and f["s"].shape == (12, 12) and f["u"].shape == (12, 20)
    y = M.factorized_linear(jnp.asarray(xx), {**f, "bias": jnp.asarray(b)})
    ref = xx.astype(np.float64) @ w.astype(np.float64) + b
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    # the deployed (Sigma folded) and dense forms compute the same map
    dep = {"v": f["v"], "u": f["s"] @ f["u"], "bias": jnp.asarray(b)}
    np.testing.assert_allclose(np.asarray(M.factorized_linear(jnp.asarray(xx), dep)), ref, rtol=1e-5, atol=1e-5)


def test_truncated_factorization_is_best_rank_r():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((10, 16))
    f = M.svd_factorize(jnp.asarray(w, jnp.float32), 4)
    p, s, qt = np.linalg.svd(w, full_matrices=False)
    best = (p[:, :4] * s[:4]) @ qt[:4]
    got = np.asarray(f["v"] @ f["s"] @ f["u"], np.float64)
    np.testing.assert_allclose(got, best, atol=1e-5)
    np.testing.assert_allclose(np.diag(np.asarray(f["s"])), s[:4], rtol=1e-5)


def test_rank_of():
    assert M.rank_of(1.0, 64, 128) == 64
    assert M.rank_of(0.375, 48, 96) == 18
    assert M.rank_of(0.7, 10, 20) == 7  # floor with a guard: 0.7 * 10 is 7, not 6
    assert M.rank_of(0.01, 16, 32) == 1  # at least 1


def test_factorized_linear_bfloat16():
    f = M.svd_factorize(jnp.eye(4, 6, dtype=jnp.bfloat16), 4)
    y = M.factorized_linear(jnp.ones((2, 4), jnp.bfloat16), f)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.eye(4, 6)[None].sum(1).repeat(2, 0), atol=1e-2)


# --------------------------------------------------------------------------- slicing
def _standalone_like(sup, spec):
    """A standalone net of the spec's dims built on its own (init_supernet at those dims, factors cut to
    the spec's rank), then filled with the leading slice of each supernet leaf by its own shape."""
    e, d, f, r = M.spec_dims(spec)
    net = M.init_supernet(jax.random.key(7), patches=(spec["patch"],), embed=e, depth=d,
                          mlp_ratio=int(spec["mlp_ratio"]))
    for b in net["blocks"].values():
        for n in M.LINEARS:
            b[n] = {"v": b[n]["v"][:, :r], "s": b[n]["s"][:r, :r], "u": b[n]["u"][:r], "bias": b[n]["bias"]}
    pk = f"p{spec['patch']}"
    net["patch_embed"], net["pos"] = net["patch_embed"][pk], net["pos"][pk]
    src = {**sup, "patch_embed": sup["patch_embed"][pk], "pos": sup["pos"][pk]}
    flat_src = dict(jax.tree_util.tree_flatten_with_path(src)[0])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(net)
    return jax.tree_util.tree_unflatten(
        treedef, [flat_src[path][tuple(slice(0, n) for n in leaf.shape)] for path, leaf in leaves])


@pytest.mark.parametrize("spec", [SPEC, {"patch": 2, "embed": 32, "depth": 2, "mlp_ratio": 1, "rank_ratio": 0.25}])
def test_subnet_slice_equals_standalone_exactly(sup, x, spec):
    sub = M.subnet(sup, spec)
    ref = _standalone_like(sup, spec)
    assert jax.tree.structure(sub) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(sub), jax.tree.leaves(ref)):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
    ys, yr = japply(sub, x, patch=spec["patch"]), japply(ref, x, patch=spec["patch"])
    assert np.array_equal(np.asarray(ys), np.asarray(yr))
    # the masked supernet forward (training path) is the same subnet, to float rounding
    np.testing.assert_allclose(np.asarray(M.supernet_apply(sup, x, spec)), np.asarray(ys), rtol=1e-5, atol=1e-5)
    # the deployed form (Sigma folded / dense where factors do not pay) too
    np.testing.assert_allclose(np.asarray(japply(M.deploy(sub), x, patch=spec["patch"])), np.asarray(ys),
                               rtol=1e-4, atol=1e-5)


def _np_apply(sub, x, patch):
    """float64 NumPy transcription of the standalone ViT."""
    s = jax.tree.map(lambda a: np.asarray(a, np.float64), sub)
    x = np.asarray(x, np.float64)
    g = 8 // patch
    tok = x.reshape(-1, g, patch, g, patch).transpose(0, 1, 3, 2, 4).reshape(len(x), g * g, patch * patch)

    def ln(h, p):
        mu = h.mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * p["scale"] + p["bias"]

    lin = lambda h, p: h @ p["v"] @ p["s"] @ p["u"] + p["bias"]  # noqa: E731
    gelu = lambda z: 0.5 * z * (1 + np.vectorize(math.erf)(z / np.sqrt(2)))  # noqa: E731
    h = tok @ s["patch_embed"]["kernel"] + s["patch_embed"]["bias"] + s["pos"]
    e = h.shape[-1]
    nh = e // 16
    for i in range(len(s["blocks"])):
        b = s["blocks"][f"block_{i}"]
        a = ln(h, b["ln1"])
        q, k, v = (lin(a, b[n]).reshape(len(x), -1, nh, 16) for n in ("query", "key", "value"))
        lg = np.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
        att = np.exp(lg - lg.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        h = h + lin(np.einsum("bhqk,bkhd->bqhd", att, v).reshape(len(x), -1, e), b["proj"])
        h = h + lin(gelu(lin(ln(h, b["ln2"]), b["fc1"])), b["fc2"])
    return ln(h, s["norm"]).mean(1) @ s["head"]["kernel"] + s["head"]["bias"]


def test_apply_matches_float64_reference(sup, x):
    spec = {"patch": 2, "embed": 32, "depth": 2, "mlp_ratio": 2, "rank_ratio": 0.75}
    sub = M.subnet(sup, spec)
    np.testing.assert_allclose(np.asarray(japply(sub, x, patch=2)), _np_apply(sub, x, 2), rtol=1e-4, atol=1e-4)


def test_masked_gradient_is_the_subnet_gradient(sup, x):
    y = jnp.array([1, 2, 3])
    dims = jnp.asarray(M.spec_dims(SPEC), jnp.int32)

    def loss_super(p):
        return -jnp.mean(jax.nn.log_softmax(M.supernet_forward(p, x, dims, patch=4))[jnp.arange(3), y])

    def loss_sub(p):
        return -jnp.mean(jax.nn.log_softmax(M.apply(M.subnet(p, SPEC), x, patch=4))[jnp.arange(3), y])

    g1, g2 = jax.jit(jax.grad(loss_super))(sup), jax.jit(jax.grad(loss_sub))(sup)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # weights outside the subnet get exactly zero gradient (block_1 is beyond depth 1)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(g1["blocks"]["block_1"]))


# --------------------------------------------------------------------------- memory model
def test_subnet_memory_monotone_in_rank_width_and_patch(sup):
    base = {"patch": 4, "embed": 16, "depth": 1, "mlp_ratio": 2}
    m_lo = M.subnet_memory(sup, {**base, "rank_ratio": 0.25})
    m_hi = M.subnet_memory(sup, {**base, "rank_ratio": 1.0})
    m_wide = M.subnet_memory(sup, {**base, "embed": 32, "rank_ratio": 1.0})
    assert m_lo < m_hi < m_wide
    # smaller patches = more tokens = more memory (same weights but the patch embedding)
    assert M.subnet_memory(sup, {**base, "patch": 2, "rank_ratio": 1.0}) > m_hi
    full = M.subnet_memory(sup, {**base, "embed": 32, "rank_ratio": 1.0}, breakdown=True)
    # the weights are arguments: argument bytes = deployed params + the one input image
    n = M.num_params(M.deploy(M.subnet(sup, {**base, "embed": 32, "rank_ratio": 1.0})))
    assert full["argument_size_in_bytes"] == 4 * (n + 64) and full["peak"] == m_wide


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, exc, name", [
    ({"rank_ratio": 0.0}, ValueError, "rank_ratio"), ({"rank_ratio": 1.5}, ValueError, "rank_ratio"),
    ({"rank_ratio": -0.2}, ValueError, "rank_ratio"), ({"rank_ratio": "half"}, TypeError, "rank_ratio"),
    ({"embed": True}, TypeError, "embed"), ({"depth": 1.0}, TypeError, "depth"), ({"patch": False}, TypeError, "patch"),
    ({"embed": 24}, ValueError, "embed"), ({"embed": 64}, ValueError, "embed"), ({"depth": 3}, ValueError, "depth"),
    ({"patch": 8}, ValueError, "patch"), ({"mlp_ratio": 5}, ValueError, "mlp_ratio"),
    ({"mlp_ratio": 1.03}, ValueError, "mlp_ratio"), ({"heads": 2}, ValueError, "unknown"),
])
def test_bad_spec(sup, x, bad, exc, name):
    with pytest.raises(exc, match=name):
        M.subnet(sup, {**SPEC, **bad})
    with pytest.raises(exc, match=name):
        M.supernet_apply(sup, x, {**SPEC, **bad})


def test_bad_input_other(sup, x):
    with pytest.raises(ValueError, match="lacks"):
        M.check_spec({k: v for k, v in SPEC.items() if k != "depth"})
    with pytest.raises(TypeError, match="spec"):
        M.check_spec([("embed", 16)])
    with pytest.raises(ValueError, match="rank_ratio"):
        M.rank_of(0, 16, 32)
    with pytest.raises(ValueError, match="rank"):
        M.svd_factorize(jnp.ones((4, 6)), 5)
    with pytest.raises(ValueError, match="x"):
        M.supernet_apply(sup, jnp.ones((2, 8, 8)), SPEC)
    with pytest.raises(ValueError, match="patch"):
        M.apply(M.subnet(sup, SPEC), x, patch=2)
    with pytest.raises(ValueError, match="embed"):
        M.init_supernet(jax.random.key(0), embed=40)
    with pytest.raises(ValueError, match="patches"):
        M.init_supernet(jax.random.key(0), patches=(3,))
    with pytest.raises(TypeError, match="key"):
        M.init_supernet(0)
    with pytest.raises(ValueError, match="params"):
        M.subnet({"blocks": {}}, SPEC)
    # bool flags are bools (a truthy 'no' was read as True)
    with pytest.raises(TypeError, match="breakdown"):
        M.subnet_memory(sup, SPEC, breakdown="no")
    with pytest.raises(TypeError, match="deployed"):
        M.subnet_memory(sup, SPEC, deployed="no")
    # factorized_linear: eager checks naming the argument (were a bare KeyError / raw dot_general errors)
    p = M.svd_factorize(jnp.ones((4, 3)), 2) | {"bias": jnp.zeros(3)}
    with pytest.raises(ValueError, match="p has keys"):
        M.factorized_linear(jnp.ones((2, 4)), {"foo": jnp.ones(1)})
    with pytest.raises(ValueError, match="x must be"):
        M.factorized_linear(jnp.ones((2, 5)), p)
    with pytest.raises(ValueError, match=r"p\['s'\]"):
        M.factorized_linear(jnp.ones((2, 4)), {**p, "s": jnp.ones((3, 3))})
    with pytest.raises(TypeError, match="x must be a floating"):
        M.factorized_linear(jnp.ones((2, 4), jnp.int32), p)
    with pytest.raises(ValueError, match="kernel"):
        M.svd_factorize(jnp.full((4, 3), jnp.nan), 2)
    # supernet_forward checks concrete dims (embed 0 gave NaN) and the patch size
    with pytest.raises(ValueError, match="dims: embed"):
        M.supernet_forward(sup, x, [0, 0, 0, 0], patch=4)
    with pytest.raises(ValueError, match="dims: rank"):
        M.supernet_forward(sup, x, [16, 1, 32, 32], patch=4)
    with pytest.raises(ValueError, match="patch"):
        M.supernet_forward(sup, x, [16, 1, 32, 8], patch=3)
