"""Block-LoRA (lrjax.reparam.block_lora): the tiled shared down-projection against dense NumPy,
the "multiplication becomes addition" identity, factored == materialize, and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax.axes import Axes
from lrjax.reparam.block_lora import BlockLoRA


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

T, V = TypeError, ValueError


def _params(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(3), 2)
    return {"d0": {"kernel": jax.random.normal(k[0], (8, 6)).astype(dtype), "bias": jnp.zeros(6, dtype)},
            "d1": {"kernel": jax.random.normal(k[1], (6, 4)).astype(dtype), "bias": jnp.zeros(4, dtype)}}


def _fwd(p, x):
    return jnp.tanh(x @ p["d0"]["kernel"] + p["d0"]["bias"]) @ p["d1"]["kernel"] + p["d1"]["bias"]


def _trained(ad, key=5):
    return {p: {"a": f["a"], "b": jax.random.normal(jax.random.fold_in(jax.random.key(key), j), f["b"].shape)
                .astype(f["b"].dtype)} for j, (p, f) in enumerate(ad.items())}


def test_materialize_matches_dense_numpy_and_shapes():
    rp = BlockLoRA(rank=2, blocks=2, alpha=4.0)
    p = _params()
    base, ad = rp.init(jax.random.key(0), p)
    assert ad["d0/kernel"]["a"].shape == (4, 2) and ad["d1/kernel"]["a"].shape == (3, 2)
    np.testing.assert_array_equal(np.asarray(rp.materialize(base, ad)["d0"]["kernel"]),
                                  np.asarray(p["d0"]["kernel"]))  # B = 0: unchanged at init
    assert np.abs(np.asarray(ad["d0/kernel"]["a"])).max() <= 1 / np.sqrt(8)
    ad = _trained(ad)
    for path, (m, n), leaf in [("d0/kernel", (8, 6), p["d0"]["kernel"]), ("d1/kernel", (6, 4), p["d1"]["kernel"])]:
        a_s = np.asarray(ad[path]["a"], np.float64)
        a_full = np.concatenate([a_s, a_s], axis=0)  # [A_s; A_s]
        want = np.asarray(leaf, np.float64) + 2.0 * a_full @ np.asarray(ad[path]["b"], np.float64)
        got = rp.materialize(base, ad)[path.split("/")[0]]["kernel"]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert rp.num_params(ad) == (8 * 2 // 2 + 2 * 6) + (6 * 2 // 2 + 2 * 4)


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_tiled_product_is_the_sum_of_input_blocks_times_the_shared_block(blocks):
    rp = BlockLoRA(rank=2, blocks=blocks, targets="d0/kernel")
    base, ad = rp.init(jax.random.key(1), _params())
    f = ad["d0/kernel"]
    form = rp.factors(base["d0"]["kernel"], f)
    x = np.asarray(_randn(2, (5, 8)), np.float64)
    a_s = np.asarray(f["a"], np.float64)
    xsum = sum(x[:, j * (8 // blocks):(j + 1) * (8 // blocks)] for j in range(blocks))
    np.testing.assert_allclose(x @ np.asarray(form.a, np.float64), xsum @ a_s, rtol=1e-6, atol=1e-7)
    if blocks == 1:  # one block is plain LoRA (same init for the same key)
        _, ad_l = lrjax.LoRA(rank=2, targets="d0/kernel").init(jax.random.key(1), _params())
        np.testing.assert_array_equal(np.asarray(f["a"]), np.asarray(ad_l["d0/kernel"]["a"]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_factored_equals_materialize_and_grads_reach_the_shared_block(dtype):
    rp = BlockLoRA(rank=2, blocks=2)
    p = _params(dtype)
    base, ad = rp.init(jax.random.key(0), p)
    ad = _trained(ad)
    x = _randn(1, (3, 8)).astype(dtype)
    want = np.asarray(_fwd(rp.materialize(base, ad), x), np.float32)
    got = np.asarray(jax.jit(lrjax.factored(_fwd, rp))(base, ad, x), np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    if dtype == jnp.float32:
        g = jax.grad(lambda a: jnp.sum(lrjax.factored(_fwd, rp)(base, a, x)))(ad)
        gm = jax.grad(lambda a: jnp.sum(_fwd(rp.materialize(base, a), x)))(ad)
        assert g["d0/kernel"]["a"].shape == (4, 2)
        np.testing.assert_allclose(np.asarray(g["d0/kernel"]["a"]), np.asarray(gm["d0/kernel"]["a"]), rtol=1e-4,
                                   atol=1e-5)
        merged = rp.merge(base, ad)
        np.testing.assert_allclose(np.asarray(rp.unmerge(merged, ad)["d0"]["kernel"]), np.asarray(p["d0"]["kernel"]),
                                   atol=1e-5)


def test_stacked_leaf():
    rp = BlockLoRA(rank=2, blocks=3, targets="w", axes={"w": Axes(batch=(0,), inp=(1,), out=(2,))})
    p = {"w": _randn(0, (2, 6, 4))}
    base, ad = rp.init(jax.random.key(1), p)
    assert ad["w"]["a"].shape == (2, 2, 2)
    ad = _trained(ad)
    eff = np.asarray(rp.materialize(base, ad)["w"])
    for l in range(2):
        a = np.tile(np.asarray(ad["w"]["a"][l]), (3, 1))
        np.testing.assert_allclose(eff[l], np.asarray(p["w"][l]) + a @ np.asarray(ad["w"]["b"][l]), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(blocks=0), V, "blocks"),
    (dict(blocks=2.0), T, "blocks"),
    (dict(blocks="2"), T, "blocks"),
    (dict(blocks=True), T, "blocks"),
])
def test_bad_config(kw, exc, name):
    with pytest.raises(exc, match=name):
        BlockLoRA(**kw)


def test_indivisible_input_and_rank_above_block_refused():
    with pytest.raises(V, match=r"blocks=3 does not divide .* 'd0/kernel'"):
        BlockLoRA(rank=1, blocks=3).init(jax.random.key(0), _params())
    with pytest.raises(V, match=r"rank=4 exceeds .*'d1/kernel' with blocks=2"):
        BlockLoRA(rank=4, blocks=2).init(jax.random.key(0), _params())


def test_adapters_of_another_shape_refused():
    rp = BlockLoRA(rank=2, blocks=2)
    base, ad = rp.init(jax.random.key(0), _params())
    _, lora = lrjax.LoRA(rank=2).init(jax.random.key(0), _params())
    with pytest.raises(V, match=r"adapters\['d0/kernel'\].*blocks=2"):
        rp.materialize(base, lora)
    with pytest.raises(V, match=r"adapters\['d0/kernel'\].*rank"):
        BlockLoRA(rank=1, blocks=2).materialize(base, {k: {"a": v["a"][..., :1], "b": v["b"]} for k, v in ad.items()})
    with pytest.raises(V, match=r"adapters\['d0/kernel'\].*blocks=4"):
        BlockLoRA(rank=2, blocks=4).materialize(base, ad)
