"""AdapterBank: many LoRA adapters in one batch (per-example ids, packed heterogeneous ranks).

Reference: each example run alone through its own materialized LoRA (``rp.materialize``), and a
float64 NumPy transcription of the same per-example math."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax.interpreter import NotMergeable
from lrjax.reparam.bank import AdapterBank


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

RANKS = (2, 6, 3)  # slots 0..2; slot 3 stays empty (the base model)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(7, name="fc2")(nn.gelu(nn.Dense(16, name="fc1")(x)))


def _np_like(tree, rng, scale=1.0, dtype=None):
    """NumPy normal draws (times ``scale / sqrt(fan-in)`` for matrices) shaped like ``tree``'s leaves:
    test data without compiling one eager jax.random program per shape."""
    def one(s):
        fan = s.shape[-2] if len(s.shape) >= 2 else 1
        return jnp.asarray(scale * rng.normal(size=s.shape) / np.sqrt(fan), dtype or s.dtype)
    return jax.tree.map(one, tree)


def _loras(params, dtype=jnp.float32, seed=10):
    out = []
    for j, r in enumerate(RANKS):
        rp = lrjax.LoRA(rank=r, alpha=2.0 * r + 1, dtype=dtype)
        _, ad = jax.eval_shape(lambda p: rp.init(jax.random.key(seed + j), p), params)
        rng = np.random.default_rng(seed + j)
        ad = {p: {"a": _np_like(f["a"], rng), "b": jnp.asarray(0.3 * rng.normal(size=f["b"].shape), dtype)}
              for p, f in ad.items()}
        out.append((rp, ad))
    return out


def _setup(dtype=jnp.float32, n=24, tile=32):
    model = MLP()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, 8)), dtype)
    params = _np_like(jax.eval_shape(model.init, jax.random.key(1), x), rng, dtype=dtype)
    bank = AdapterBank(slots=4, rank=6, capacity=sum(RANKS), tile=tile)
    base, bk = bank.init(jax.random.key(2), params)
    loras = _loras(params, dtype)
    for j, (rp, ad) in enumerate(loras):
        bk = bank.load(bk, j, ad, rp)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 4, n), jnp.int32)
    return model, x, params, bank, base, bk, loras, ids


def _per_example(model, params, loras, x, ids):
    """Row i of model(W + s_k A_k B_k, x) with k = ids[i] (rows of an MLP are independent)."""
    outs = [model.apply(params if l is None else l[0].materialize(params, l[1]), x) for l in loras]
    outs.append(model.apply(params, x))
    k = np.minimum(np.asarray(ids), len(loras))
    return jnp.stack(outs)[k, np.arange(len(k))]


def _ref64(params, loras, x, ids):
    """float64: y_i = MLP with W + s_k A_k B_k at both kernels, k = ids[i]."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)["params"]
    out = []
    for i, k in enumerate(np.asarray(ids)):
        h = np.asarray(x[i], np.float64)
        for j, nm in enumerate(("fc1", "fc2")):
            w = p[nm]["kernel"]
            if k < len(loras):
                rp, ad = loras[k]
                f = ad[f"params/{nm}/kernel"]
                w = w + rp.scale * np.asarray(f["a"], np.float64) @ np.asarray(f["b"], np.float64)
            h = h @ w + p[nm]["bias"]
            if j == 0:
                h = np.asarray(jax.nn.gelu(jnp.asarray(h, jnp.float32)), np.float64)
        out.append(h)
    return np.stack(out)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bank_equals_each_example_with_its_own_adapter(dtype):
    model, x, params, bank, base, bk, loras, ids = _setup(dtype)
    y = jax.jit(lrjax.factored(model.apply, bank))(base, bank.route(bk, ids), x)
    assert y.dtype == dtype and y.shape == (24, 7)
    want = _per_example(model, params, loras, x, ids)
    ref = _ref64(params, loras, x, ids)
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-4, atol=1e-4)
    else:  # both round to bfloat16; each within bfloat16 rounding of the float64 reference
        err_bank = np.abs(np.asarray(y, np.float64) - ref).max()
        err_each = np.abs(np.asarray(want, np.float64) - ref).max()
        scale = np.abs(ref).max()
        assert err_bank <= 0.03 * scale and err_bank <= 2 * err_each + 0.01 * scale, (err_bank, err_each)
    # a different slot assignment changes exactly the reassigned examples
    ids2 = ids.at[0].set((int(ids[0]) + 1) % 4)
    y2 = jax.jit(lrjax.factored(model.apply, bank))(base, bank.route(bk, ids2), x)
    assert np.array_equal(np.asarray(y2[1:]), np.asarray(y[1:]))


def test_nnx_tokens_per_example_and_small_batch_tiles():
    """NNX model with [B, T, M] inputs: every token of example i uses adapter ids[i]; a batch
    smaller than the slot count (tile 1) and a tile of 3 give the same values."""
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 7, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jax.nn.relu(self.fc1(x)))

    gdef, state = nnx.split(Net(nnx.Rngs(0)))
    apply = lambda s, x: nnx.merge(gdef, s)(x)  # noqa: E731
    x = _randn(3, (3, 5, 8))
    ids = jnp.array([2, 0, 3])
    for tile in (1, 3, 32):
        bank = AdapterBank(slots=4, rank=6, tile=tile, targets="kernel")
        base, bk = bank.init(jax.random.key(2), state)
        loras = _loras(state)
        for j, (rp, ad) in enumerate(loras):
            bk = bank.load(bk, j, ad, rp)
        y = lrjax.factored(apply, bank)(base, bank.route(bk, ids), x)
        for i, k in enumerate(np.asarray(ids)):
            p = state if k == 3 else loras[k][0].materialize(state, loras[k][1])
            np.testing.assert_allclose(np.asarray(y[i]), np.asarray(apply(p, x[i])), rtol=1e-5, atol=1e-5)


def test_heterogeneous_ranks_are_packed_without_padding():
    _, _, params, bank, base, bk, _, _ = _setup()
    for p, f in bk.items():
        assert f["a"].shape[-1] == sum(RANKS) == f["b"].shape[0]  # not slots * max rank
        assert np.asarray(f["ranks"]).tolist() == [2, 6, 3, 0]
        offs = np.asarray(f["offsets"]).astype(int)
        cols = sorted(c for o, r in zip(offs, RANKS) for c in range(o, o + r))
        assert cols == list(range(sum(RANKS)))  # disjoint ranges covering the packed axis
    assert bank.loaded(bk) == {j: {p: r for p in bk} for j, r in enumerate(RANKS)}
    assert bank.num_params(bk) == sum((f["a"].size + f["b"].size) for f in bk.values())


def test_swaps_keep_one_compile_cache_entry():
    model, x, params, bank, base, bk, loras, ids = _setup()
    g = jax.jit(lrjax.factored(model.apply, bank))
    outs = [g(base, bank.route(bk, ids), x)]
    new = _loras(params, seed=50)
    bk = bank.unload(bk, 1)                             # free the rank-6 range in the middle
    bk = bank.load(bk, 3, new[0][1], new[0][0])         # rank 2 into the hole
    outs.append(g(base, bank.route(bk, ids), x))
    bk = bank.unload(bk, 0)                             # 6 free columns, in two pieces
    bk = bank.load(bk, 1, new[1][1], new[1][0])         # rank 6: fragmented -> compaction
    outs.append(g(base, bank.route(bk, ids[::-1]), x))
    bk = bank.load(bk, 3, loras[0][1], loras[0][0])     # replace slot 3 by another rank-2 adapter
    outs.append(g(base, bank.route(bk, ids), x))
    assert g._cache_size() == 1
    loaded = [None, new[1], loras[2], loras[0]]
    np.testing.assert_allclose(np.asarray(outs[-1]), np.asarray(_per_example(model, params, loaded, x, ids)),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[-1]))


def test_grad_trains_each_slot_on_its_own_examples():
    model, x, params, bank, base, bk, loras, ids = _setup()
    y = _randn(9, (24, 7))
    g = lrjax.factored(model.apply, bank)
    tr, fr = bank.split(bank.route(bk, ids))
    grads = jax.jit(jax.grad(lambda t: jnp.sum((g(base, bank.join(t, fr), x) - y) ** 2)))(tr)
    idn = np.asarray(ids)
    for k, (rp, ad) in enumerate(loras):
        sel = idn == k
        gk = jax.grad(lambda a: jnp.sum((model.apply(rp.materialize(params, a), x[sel]) - y[sel]) ** 2))(ad)
        for p, f in bk.items():
            o, r = int(f["offsets"][k]), int(f["ranks"][k])
            np.testing.assert_allclose(np.asarray(grads[p]["a"][:, o:o + r]), np.asarray(gk[p]["a"]), rtol=1e-4,
                                       atol=1e-5)
            np.testing.assert_allclose(np.asarray(grads[p]["b"][o:o + r]), np.asarray(gk[p]["b"]), rtol=1e-4,
                                       atol=1e-5)


def test_select_round_trips_to_plain_lora():
    model, x, params, bank, base, bk, loras, _ = _setup()
    rp, ad = bank.select(bk, 1)
    assert rp.rank == 6 and abs(rp.scale - loras[1][0].scale) < 1e-6
    np.testing.assert_allclose(np.asarray(model.apply(rp.merge(params, ad), x)),
                               np.asarray(model.apply(loras[1][0].merge(params, loras[1][1]), x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="slot.*empty"):
        bank.select(bk, 3)


def test_ids_out_of_range_eager_raises_traced_gives_base_output():
    model, x, params, bank, base, bk, loras, ids = _setup()
    with pytest.raises(ValueError, match="ids"):
        bank.route(bk, ids.at[0].set(4))
    with pytest.raises(ValueError, match="ids"):
        bank.route(bk, ids.at[0].set(-1))
    with pytest.raises(TypeError, match="ids"):
        bank.route(bk, ids.astype(jnp.float32))
    g = lrjax.factored(model.apply, bank)
    bad = ids.at[0].set(99).at[1].set(-3)
    y = jax.jit(lambda b, i: g(base, bank.route(b, i), x))(bk, bad)
    assert np.all(np.isfinite(np.asarray(y)))
    np.testing.assert_allclose(np.asarray(y[:2]), np.asarray(model.apply(params, x[:2])), rtol=1e-5, atol=1e-6)
    good = jax.jit(lambda b, i: g(base, bank.route(b, i), x))(bk, ids)
    np.testing.assert_allclose(np.asarray(y[2:]), np.asarray(good[2:]), rtol=1e-6, atol=1e-6)


def test_bad_input():
    model, x, params, bank, base, bk, loras, ids = _setup()
    rp, ad = loras[0]
    with pytest.raises(ValueError, match="slot"):
        bank.load(bk, 4, ad, rp)
    with pytest.raises(ValueError, match="slot"):
        bank.unload(bk, -1)
    big = lrjax.LoRA(rank=7)
    rng = np.random.default_rng(1)  # refusals only: NumPy-filled adapters of the right shapes
    _, ad7 = _np_like(jax.eval_shape(lambda p: big.init(jax.random.key(0), p), params), rng)
    with pytest.raises(ValueError, match="rank"):
        bank.load(bk, 3, ad7, big)
    with pytest.raises(ValueError, match="capacity"):  # 11 columns all in use
        bank.load(bk, 3, ad, rp)
    other = _np_like(jax.eval_shape(MLP().init, jax.random.key(1), jnp.zeros((1, 9))), rng)
    _, ad_other = _np_like(jax.eval_shape(lambda p: rp.init(jax.random.key(0), p), other), rng)
    with pytest.raises(ValueError, match="adapters"):
        bank.load(bank.unload(bk, 0), 0, ad_other, rp)
    with pytest.raises(ValueError, match="adapters"):
        bank.load(bk, 0, {"params/nope/kernel": ad["params/fc1/kernel"]}, rp)
    dora = lrjax.DoRA(rank=2)
    _, add = _np_like(jax.eval_shape(lambda p: dora.init(jax.random.key(0), p), params), rng)
    with pytest.raises(ValueError, match="rp"):
        bank.load(bank.unload(bk, 0), 0, add, dora)
    with pytest.raises(TypeError, match="rp"):
        bank.load(bk, 0, ad, "lora")
    g = lrjax.factored(model.apply, bank)
    with pytest.raises(ValueError, match="ids"):  # not routed
        g(base, bk, x)
    with pytest.raises(ValueError, match="ids"):  # one id per example
        g(base, bank.route(bk, ids[:5]), x)
    with pytest.raises(ValueError, match="alpha"):
        AdapterBank(slots=2, rank=4, alpha=8.0)
    with pytest.raises(ValueError, match="capacity"):
        AdapterBank(slots=2, rank=4, capacity=3)
    with pytest.raises(ValueError, match="slots"):
        AdapterBank(slots=0, rank=4)
    with pytest.raises(NotMergeable):
        bank.merge(base, bank.route(bk, ids))
    with pytest.raises(ValueError, match="rank"):
        AdapterBank(slots=2, rank=8).init(jax.random.key(0), params)  # fc2 has 7 outputs


def test_scanned_stack_gets_per_layer_slices():
    """An [L, M, N] kernel stack scanned by lax.scan: the bank's factors, tables and ids carry the
    leading L and the branch sees one layer's slice."""
    n_layers, m = 3, 8
    params = {"w": _randn(0, (n_layers, m, m)) / 3}

    def fn(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    ax = lrjax.axes.Axes(batch=(0,), inp=(1,), out=(2,))
    bank = AdapterBank(slots=3, rank=4, capacity=6, targets="w", axes=ax)
    base, bk = bank.init(jax.random.key(1), params)
    loras = []
    for j, r in enumerate((2, 4)):
        rp = lrjax.LoRA(rank=r, targets="w", axes=ax)
        _, ad = rp.init(jax.random.key(5 + j), params)
        ad = {p: {"a": f["a"], "b": 0.3 * jax.random.normal(jax.random.key(9 + j), f["b"].shape)} for p, f in ad.items()}
        loras.append((rp, ad))
        bk = bank.load(bk, j, ad, rp)
    assert bk["w"]["a"].shape == (n_layers, m, 6) and bk["w"]["ranks"].shape == (n_layers, 3)
    x = _randn(2, (6, m))
    ids = jnp.array([0, 1, 2, 1, 0, 2])
    st = lrjax.reparam.FactoredStats()
    y = lrjax.factored(fn, bank, stats=st)(base, bank.route(bk, ids), x)
    assert st.factored == 1 and not st.fallback
    for i, k in enumerate(np.asarray(ids)):
        p = params if k == 2 else loras[k][0].materialize(params, loras[k][1])
        np.testing.assert_allclose(np.asarray(y[i]), np.asarray(fn(p, x[i:i + 1])[0]), rtol=1e-5, atol=1e-6)
