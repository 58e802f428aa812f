"""LoRAM (lrjax.reparam.loram): prune / recover against float64 NumPy selection matrices, the
MLP output identity, round trips, jit, hypothesis, bad inputs and a tiny end-to-end run."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrjax.axes import Axes
from lrjax.reparam.dora import DoRA
from lrjax.reparam.lora import LoRA, RSLoRA
from lrjax.reparam.loram import PruneGroup, prune, recover, select_group, unit_scores
from lrjax.reparam.pissa import PiSSA


# ----------------------------------------------------------------------------- helpers
def _sel(keep, n_units, head_dim=1):
    """0/1 selection matrix [k * head_dim, n_units * head_dim] (row j = e_{j-th kept position})."""
    pos = (np.asarray(keep)[:, None] * head_dim + np.arange(head_dim)).reshape(-1)
    s = np.zeros((pos.size, n_units * head_dim))
    s[np.arange(pos.size), pos] = 1.0
    return s


def _rand(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _mlp3(seed=0, d=(5, 7, 6, 3)):
    rng = np.random.default_rng(seed)
    return {f"Dense_{i}": {"kernel": _rand(rng, d[i], d[i + 1]), "bias": _rand(rng, d[i + 1])}
            for i in range(len(d) - 1)}


def _perturb(adapters, seed=1, scale=0.5):
    leaves, td = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        td, [x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _np_delta(f, scale):
    return scale * np.asarray(f["a"], np.float64) @ np.asarray(f["b"], np.float64)


def _forward(p, x, n_layers):
    h = x
    for i in range(n_layers):
        h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
        if i < n_layers - 1:
            h = jax.nn.relu(h)
    return h


G0 = dict(out=["Dense_0/kernel", "Dense_0/bias"], inp=["Dense_1/kernel"])
G1 = dict(out=["Dense_1/kernel", "Dense_1/bias"], inp=["Dense_2/kernel"])


# ------------------------------------------------------------------- math identities
@pytest.mark.parametrize("variant", [LoRA, RSLoRA])
def test_recovered_delta_is_selection_sandwich(variant):
    """s A_rec B_rec == S_in^T (s A_small B_small) S_out (float64 reference), exact zeros elsewhere;
    the middle kernel is pruned on both axes by two groups."""
    params = _mlp3()
    k0, k1 = np.array([0, 2, 3, 6]), np.array([1, 4])
    groups = [PruneGroup(**G0, keep=k0), PruneGroup(**G1, keep=k1)]
    small = prune(params, groups)
    # prune itself == S_in W S_out^T
    w1 = np.asarray(params["Dense_1"]["kernel"], np.float64)
    np.testing.assert_array_equal(np.asarray(small["Dense_1"]["kernel"]),
                                  (_sel(k0, 7) @ w1 @ _sel(k1, 6).T).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(small["Dense_0"]["bias"]), np.asarray(params["Dense_0"]["bias"])[k0])
    assert small["Dense_2"]["bias"] is params["Dense_2"]["bias"]
    rp = variant(rank=2, alpha=3.0)
    _, ad = rp.init(jax.random.key(0), small)
    ad = _perturb(ad)
    rec = recover(ad, groups, params, rp)
    sels = {"Dense_0/kernel": (np.eye(5), _sel(k0, 7)), "Dense_1/kernel": (_sel(k0, 7), _sel(k1, 6)),
            "Dense_2/kernel": (_sel(k1, 6), np.eye(3))}
    full_delta = rp.delta(params, rec)
    for path, (s_in, s_out) in sels.items():
        ref = s_in.T @ _np_delta(ad[path], rp.scale) @ s_out
        got = np.asarray(_np_delta(rec[path], rp.scale))
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)  # the factors are exact copies
        np.testing.assert_allclose(np.asarray(full_delta[path]), ref, rtol=1e-5, atol=1e-6)
        assert rec[path]["a"].dtype == ad[path]["a"].dtype
    # pruned positions are exactly zero
    pruned0 = np.setdiff1d(np.arange(7), k0)
    assert np.all(np.asarray(rec["Dense_0/kernel"]["b"])[:, pruned0] == 0)
    assert np.all(np.asarray(rec["Dense_1/kernel"]["a"])[pruned0] == 0)


def test_heads_and_attention_layouts():
    """Attention heads (head_dim > 1) on q [E, H, D] (out) and o [H, D, E] (inp) leaves."""
    rng = np.random.default_rng(3)
    e, h, d = 6, 4, 3
    params = {"attn": {"query": {"kernel": _rand(rng, e, h, d)}, "value": {"kernel": _rand(rng, e, h, d)},
                       "out": {"kernel": _rand(rng, h, d, e)}}}
    keep = np.array([1, 3])
    g = PruneGroup(out=["attn/query/kernel", "attn/value/kernel"], inp=["attn/out/kernel"], keep=keep)
    small = prune(params, g)
    assert small["attn"]["query"]["kernel"].shape == (e, 2, d)
    assert small["attn"]["out"]["kernel"].shape == (2, d, e)
    np.testing.assert_array_equal(np.asarray(small["attn"]["query"]["kernel"]),
                                  np.asarray(params["attn"]["query"]["kernel"])[:, keep])
    np.testing.assert_array_equal(np.asarray(small["attn"]["out"]["kernel"]),
                                  np.asarray(params["attn"]["out"]["kernel"])[keep])
    rp = LoRA(rank=2, alpha=4.0)
    _, ad = rp.init(jax.random.key(1), small)
    ad = _perturb(ad)
    rec = recover(ad, g, params, rp)
    s = _sel(keep, h, d)
    for path, (s_in, s_out) in {"attn/query/kernel": (np.eye(e), s), "attn/value/kernel": (np.eye(e), s),
                                "attn/out/kernel": (s, np.eye(e))}.items():
        np.testing.assert_allclose(_np_delta(rec[path], rp.scale), s_in.T @ _np_delta(ad[path], rp.scale) @ s_out,
                                   rtol=0, atol=1e-12)
    # the same heads in LLaMA's 2-D layout [embed, heads * head_size]: head_dim = head size
    flat2d = {"q": {"kernel": params["attn"]["query"]["kernel"].reshape(e, h * d)},
              "o": {"kernel": params["attn"]["out"]["kernel"].reshape(h * d, e)}}
    g2 = PruneGroup(out=["q/kernel"], inp=["o/kernel"], keep=keep, head_dim=d)
    small2 = prune(flat2d, g2)
    np.testing.assert_array_equal(np.asarray(small2["q"]["kernel"]),
                                  np.asarray(small["attn"]["query"]["kernel"]).reshape(e, 2 * d))
    np.testing.assert_array_equal(np.asarray(small2["o"]["kernel"]),
                                  np.asarray(small["attn"]["out"]["kernel"]).reshape(2 * d, e))
    ad2 = {"q/kernel": ad["attn/query/kernel"], "o/kernel": ad["attn/out/kernel"]}
    rec2 = recover(ad2, g2, flat2d, rp)
    for p2, p3 in (("q/kernel", "attn/query/kernel"), ("o/kernel", "attn/out/kernel")):
        for nm in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(rec2[p2][nm]), np.asarray(rec[p3][nm]))


def test_stacked_per_layer_and_shared_keep():
    """nn.scan stacks [L, M, N]: a per-layer keep [L, k] and a shared keep [k]."""
    rng = np.random.default_rng(4)
    L, m, n = 3, 4, 6
    params = {"up": {"kernel": _rand(rng, L, m, n), "bias": _rand(rng, L, n)}, "down": {"kernel": _rand(rng, L, n, m)}}
    keep = np.array([[0, 2], [1, 5], [3, 4]])
    g = PruneGroup(out=["up/kernel", "up/bias"], inp=["down/kernel"], keep=keep)
    small = prune(params, g)
    for l in range(L):
        np.testing.assert_array_equal(np.asarray(small["up"]["kernel"][l]), np.asarray(params["up"]["kernel"][l])[:, keep[l]])
        np.testing.assert_array_equal(np.asarray(small["up"]["bias"][l]), np.asarray(params["up"]["bias"][l])[keep[l]])
        np.testing.assert_array_equal(np.asarray(small["down"]["kernel"][l]), np.asarray(params["down"]["kernel"][l])[keep[l]])
    rp = LoRA(rank=2, targets="kernel")
    _, ad = rp.init(jax.random.key(2), small)
    ad = _perturb(ad)
    rec = recover(ad, g, params, rp)
    for l in range(L):
        s = _sel(keep[l], n)
        fu = {k: v[l] for k, v in ad["up/kernel"].items()}
        fd = {k: v[l] for k, v in ad["down/kernel"].items()}
        np.testing.assert_allclose(_np_delta({k: v[l] for k, v in rec["up/kernel"].items()}, 1.0),
                                   _np_delta(fu, 1.0) @ s, rtol=0, atol=1e-12)
        np.testing.assert_allclose(_np_delta({k: v[l] for k, v in rec["down/kernel"].items()}, 1.0),
                                   s.T @ _np_delta(fd, 1.0), rtol=0, atol=1e-12)
    shared = PruneGroup(out=["up/kernel"], keep=[1, 2, 5])
    np.testing.assert_array_equal(np.asarray(prune(params, shared)["up"]["kernel"]),
                                  np.asarray(params["up"]["kernel"])[:, :, [1, 2, 5]])


def test_full_model_with_recovered_adapters_changes_only_through_kept_units():
    """2-layer MLP, hidden units pruned: f_full(rec) - f_full == f_small(tuned) - f_small, and the
    pruned hidden activations of the full model are untouched."""
    params = _mlp3(seed=5, d=(5, 8, 3))
    keep = np.array([0, 3, 4, 7])
    g = PruneGroup(**G0, keep=keep)
    small = prune(params, g)
    rp = LoRA(rank=2, alpha=2.0)
    _, ad = rp.init(jax.random.key(3), small)
    ad = _perturb(ad, seed=4)
    rec = recover(ad, g, params, rp)
    x = _rand(np.random.default_rng(6), 10, 5)
    full_t = rp.materialize(params, rec)
    small_t = rp.materialize(small, ad)
    d_full = _forward(full_t, x, 2) - _forward(params, x, 2)
    d_small = _forward(small_t, x, 2) - _forward(small, x, 2)
    np.testing.assert_allclose(np.asarray(d_full), np.asarray(d_small), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(d_small).max()) > 1e-2  # the adapters do change the output
    hid = lambda p: x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]  # noqa: E731
    pruned = np.setdiff1d(np.arange(8), keep)
    np.testing.assert_array_equal(np.asarray(hid(full_t))[:, pruned], np.asarray(hid(params))[:, pruned])


def test_keep_all_round_trip_is_exact():
    params = _mlp3(seed=7)
    groups = [PruneGroup(**G0, keep=np.arange(7)), PruneGroup(**G1, keep=np.arange(6))]
    small = prune(params, groups)
    for a, b in zip(jax.tree_util.tree_leaves(small), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rp = LoRA(rank=2)
    _, ad = rp.init(jax.random.key(0), small)
    ad = _perturb(ad)
    rec = recover(ad, groups, params, rp)
    for p in ad:
        for nm in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(rec[p][nm]), np.asarray(ad[p][nm]))


def test_jit_and_dtypes():
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), _mlp3(seed=8))
    g = PruneGroup(**G0, keep=[1, 2, 6])
    small = prune(params, g)
    small_j = jax.jit(lambda p: prune(p, g))(params)
    for a, b in zip(jax.tree_util.tree_leaves(small), jax.tree_util.tree_leaves(small_j)):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # a PruneGroup is hashable: it can be a static argument
    small_s = jax.jit(prune, static_argnums=1)(params, g)
    np.testing.assert_array_equal(np.asarray(small_s["Dense_1"]["kernel"], np.float32),
                                  np.asarray(small["Dense_1"]["kernel"], np.float32))
    assert hash(g) == hash(PruneGroup(**G0, keep=np.array([1, 2, 6])))
    # grad through prune (a gather): 1 at kept positions, 0 at pruned ones; vmap over a model batch
    p32 = _mlp3(seed=8)
    gk = jax.grad(lambda p: prune(p, g)["Dense_0"]["kernel"].sum())(p32)["Dense_0"]["kernel"]
    np.testing.assert_array_equal(np.asarray(gk)[:, [1, 2, 6]], 1.0)
    np.testing.assert_array_equal(np.asarray(gk)[:, [0, 3, 4, 5]], 0.0)
    two = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), p32)
    vm = jax.vmap(lambda p: prune(p, g))(two)
    np.testing.assert_array_equal(np.asarray(vm["Dense_1"]["kernel"][1]), 2 * np.asarray(prune(p32, g)["Dense_1"]["kernel"]))
    rp = LoRA(rank=2, targets=["Dense_0/kernel", "Dense_1/kernel"], dtype=jnp.float32)
    _, ad = rp.init(jax.random.key(0), small)
    ad = _perturb(ad)
    rec = recover(ad, g, params, rp)
    rec_j = jax.jit(lambda a: recover(a, g, params, rp))(ad)
    rec_n = jax.jit(lambda a, k: recover(a, g, params, rp, mode="normA", key=k))(ad, jax.random.key(5))
    for p in rec:
        for nm in ("a", "b"):
            assert rec_j[p][nm].dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(rec[p][nm]), np.asarray(rec_j[p][nm]))
    np.testing.assert_array_equal(np.asarray(rec_n["Dense_0/kernel"]["b"]), np.asarray(rec["Dense_0/kernel"]["b"]))
    # grad flows through recover (a linear scatter): d/dA sum(A_rec) is 1 on every small entry
    gA = jax.grad(lambda a: recover({"Dense_1/kernel": {"a": a, "b": ad["Dense_1/kernel"]["b"]}}, g, params,
                                    rp)["Dense_1/kernel"]["a"].sum())(ad["Dense_1/kernel"]["a"])
    np.testing.assert_array_equal(np.asarray(gA), 1.0)


def test_normA_fills_only_pruned_input_rows():
    params = _mlp3(seed=9)
    keep = np.array([0, 1, 3, 5])
    g = PruneGroup(**G0, keep=keep)
    small = prune(params, g)
    rp = LoRA(rank=3, targets=["Dense_0/kernel", "Dense_1/kernel"])
    _, ad = rp.init(jax.random.key(0), small)
    ad = _perturb(ad)
    z = recover(ad, g, params, rp)
    n1 = recover(ad, g, params, rp, mode="normA", key=jax.random.key(1))
    n2 = recover(ad, g, params, rp, mode="normA", key=jax.random.key(1))
    pruned = np.setdiff1d(np.arange(7), keep)
    a = np.asarray(n1["Dense_1/kernel"]["a"])
    np.testing.assert_array_equal(a[keep], np.asarray(z["Dense_1/kernel"]["a"])[keep])
    assert np.all(a[pruned] != 0) and np.all(np.abs(a[pruned]) < 1.5)  # N(0, (1/3)^2)
    assert 0.1 < a[pruned].std() < 0.7
    np.testing.assert_array_equal(a, np.asarray(n2["Dense_1/kernel"]["a"]))  # deterministic per key
    for nm in ("a", "b"):  # an out-only leaf: nothing random
        np.testing.assert_array_equal(np.asarray(n1["Dense_0/kernel"][nm]), np.asarray(z["Dense_0/kernel"][nm]))
    # identity still holds on the kept rows
    ref = _sel(keep, 7).T @ _np_delta(ad["Dense_1/kernel"], rp.scale)
    np.testing.assert_allclose(_np_delta(n1["Dense_1/kernel"], rp.scale)[keep], ref[keep], rtol=0, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 5), st.integers(2, 7), st.integers(1, 4), st.integers(1, 3), st.data())
def test_property_random_keep_sets(m, hidden, n, rank, data):
    rank = min(rank, m, n)
    mask = data.draw(st.lists(st.booleans(), min_size=hidden, max_size=hidden).filter(any))
    keep = np.flatnonzero(mask)
    kept = keep.size
    rank = min(rank, kept)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    params = {"Dense_0": {"kernel": _rand(rng, m, hidden), "bias": _rand(rng, hidden)},
              "Dense_1": {"kernel": _rand(rng, hidden, n)}}
    g = PruneGroup(**G0, keep=keep)
    small = prune(params, g)
    rp = RSLoRA(rank=rank, alpha=2.0)
    ad = {"Dense_0/kernel": {"a": _rand(rng, m, rank), "b": _rand(rng, rank, kept)},
          "Dense_1/kernel": {"a": _rand(rng, kept, rank), "b": _rand(rng, rank, n)}}
    rp.materialize(small, ad)  # the small factors fit the small model
    rec = recover(ad, g, params, rp)
    s = _sel(keep, hidden)
    np.testing.assert_allclose(_np_delta(rec["Dense_0/kernel"], rp.scale), _np_delta(ad["Dense_0/kernel"], rp.scale) @ s,
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(_np_delta(rec["Dense_1/kernel"], rp.scale), s.T @ _np_delta(ad["Dense_1/kernel"], rp.scale),
                               rtol=0, atol=1e-12)


# ------------------------------------------------------------------- choosing units
def test_select_group_by_magnitude_and_user_score():
    w0 = np.zeros((3, 5), np.float32)
    w1 = np.zeros((5, 2), np.float32)
    norms = [1.0, 5.0, 2.0, 4.0, 3.0]  # unit norms split across the producing and consuming kernel
    for u, v in enumerate(norms):
        w0[0, u] = v * 0.6
        w1[u, 1] = v * 0.8
    params = {"Dense_0": {"kernel": jnp.asarray(w0)}, "Dense_1": {"kernel": jnp.asarray(w1)}}
    np.testing.assert_allclose(unit_scores(params, out="Dense_0/kernel", inp="Dense_1/kernel"), norms, rtol=1e-6)
    np.testing.assert_allclose(unit_scores(params, out="Dense_0/kernel", inp="Dense_1/kernel", norm="l1"),
                               np.array(norms) * 1.4, rtol=1e-6)
    g = select_group(params, out="Dense_0/kernel", inp="Dense_1/kernel", keep_ratio=0.4)
    assert g.keep == (1, 3) and g.num_kept == 2 and g.out == ("Dense_0/kernel",)
    assert select_group(params, out="Dense_0/kernel", keep_ratio=1.0).keep == (0, 1, 2, 3, 4)
    assert select_group(params, out="Dense_0/kernel", keep_ratio=0.01).keep == (1,)  # at least one unit
    user = select_group(params, out="Dense_0/kernel", keep_ratio=0.6, score=np.array([9.0, 0.0, 9.0, 1.0, 9.0]))
    assert user.keep == (0, 2, 4)
    ties = select_group(params, out="Dense_0/kernel", keep_ratio=0.4, score=np.ones(5))
    assert ties.keep == (0, 1)  # ties go to the lower index
    stacked = {"k": jnp.asarray(np.stack([np.diag([1.0, 2.0, 3.0]), np.diag([3.0, 2.0, 1.0])]), jnp.float32)}
    per = select_group(stacked, out="k", keep_ratio=0.34, per_layer=True)
    assert per.keep == ((2,), (0,))
    assert select_group(stacked, out="k", keep_ratio=0.34).keep == (0,)  # summed over layers: 4, 4, 4 -> lowest index


def test_linen_and_nnx_trees():
    from flax import linen as nn
    from flax import nnx

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(6)(x))
            return nn.Dense(2)(h)

    x = jnp.ones((1, 3))
    lp = MLP().init(jax.random.key(0), x)
    g = PruneGroup(**G0, keep=[0, 4])
    small = prune(lp, g)
    assert small["params"]["Dense_0"]["kernel"].shape == (3, 2)
    assert small["params"]["Dense_1"]["kernel"].shape == (2, 2)  # run it with a module of width 2
    rp = LoRA(rank=1)
    _, ad = rp.init(jax.random.key(1), small)
    rec = recover(ad, g, lp, rp)
    assert rec["params/Dense_1/kernel"]["a"].shape == (6, 1)

    model = nnx.Sequential(nnx.Linear(3, 6, rngs=nnx.Rngs(0)), nnx.Linear(6, 2, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    gs = PruneGroup(out=["layers/0/kernel", "layers/0/bias"], inp=["layers/1/kernel"], keep=[1, 2, 5])
    small_s = prune(state, gs)
    assert small_s["layers"][0]["kernel"].value.shape == (3, 3)
    assert small_s["layers"][1]["kernel"].value.shape == (3, 2)


# ------------------------------------------------------------------- end to end
def test_end_to_end_adam_on_pruned_then_recover():
    rng = np.random.default_rng(11)
    params = {"Dense_0": {"kernel": _rand(rng, 6, 12), "bias": _rand(rng, 12) * 0.1},
              "Dense_1": {"kernel": _rand(rng, 12, 2) * 0.3, "bias": jnp.zeros(2)}}
    g = select_group(params, out=["Dense_0/kernel", "Dense_0/bias"], inp=["Dense_1/kernel"], keep_ratio=0.5)
    small = prune(params, g)
    assert small["Dense_0"]["kernel"].shape == (6, 6)
    x = _rand(rng, 32, 6)
    y = jnp.sin(x[:, :2])
    rp = LoRA(rank=2, alpha=4.0)
    _, ad = rp.init(jax.random.key(0), small)
    opt = optax.adam(3e-2)
    st_ = opt.init(ad)
    loss = lambda a: jnp.mean((_forward(rp.materialize(small, a), x, 2) - y) ** 2)  # noqa: E731

    @jax.jit
    def step(a, s):
        l, gr = jax.value_and_grad(loss)(a)
        up, s = opt.update(gr, s, a)
        return optax.apply_updates(a, up), s, l

    l0 = float(loss(ad))
    for _ in range(15):
        ad, st_, _ = step(ad, st_)
    assert float(loss(ad)) < l0
    rec = recover(ad, g, params, rp)
    full_t = rp.materialize(params, rec)
    d_full = _forward(full_t, x, 2) - _forward(params, x, 2)
    d_small = _forward(rp.materialize(small, ad), x, 2) - _forward(small, x, 2)
    np.testing.assert_allclose(np.asarray(d_full), np.asarray(d_small), rtol=1e-5, atol=1e-5)
    pruned = np.setdiff1d(np.arange(12), g.keep_array)
    dw = np.asarray(rp.delta(params, rec)["Dense_0/kernel"])
    assert np.all(dw[:, pruned] == 0) and np.abs(dw[:, g.keep_array]).max() > 0
    assert np.all(np.asarray(rp.delta(params, rec)["Dense_1/kernel"])[pruned] == 0)


# ------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(out="Dense_0/kernel", keep=[2, 1]), ValueError, "keep.*sorted"),
    (dict(out="Dense_0/kernel", keep=[1, 1, 2]), ValueError, "keep.*twice"),
    (dict(out="Dense_0/kernel", keep=[2, 1, 2]), ValueError, "keep.*twice"),
    (dict(out="Dense_0/kernel", keep=[-1, 2]), ValueError, "keep.*negative"),
    (dict(out="Dense_0/kernel", keep=[]), ValueError, "keep.*empty"),
    (dict(out="Dense_0/kernel", keep=3), TypeError, "keep"),
    (dict(out="Dense_0/kernel", keep=np.array(3)), ValueError, "keep"),
    (dict(out="Dense_0/kernel", keep=[0.0, 1.0]), TypeError, "keep.*integer"),
    (dict(out="Dense_0/kernel", keep=[True, False]), TypeError, "keep"),
    (dict(out="Dense_0/kernel", keep=None), TypeError, "keep"),
    (dict(out="Dense_0/kernel", keep=[[0, 1], [1]]), TypeError, "keep"),
    (dict(out=3, keep=[0]), TypeError, "out"),
    (dict(inp=["Dense_1/kernel", 1], keep=[0]), TypeError, "inp"),
    (dict(out="Dense_(", keep=[0]), ValueError, "out"),
    (dict(out=["a", "a"], keep=[0]), ValueError, "out.*twice"),
    (dict(keep=[0]), ValueError, "out and inp"),
    (dict(out="Dense_0/kernel", keep=[0], head_dim=0), ValueError, "head_dim"),
    (dict(out="Dense_0/kernel", keep=[0], head_dim=1.0), TypeError, "head_dim"),
])
def test_bad_prune_group(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        PruneGroup(**kwargs)


def test_keep_traced_is_refused():
    with pytest.raises(TypeError, match="keep.*concrete"):
        jax.jit(lambda k: PruneGroup(out="x", keep=k))(jnp.arange(2))


@pytest.mark.parametrize("groups, exc, name", [
    (lambda: PruneGroup(out=["Dense_9/kernel"], keep=[0]), ValueError, r"groups\[0\]\.out.*Dense_9"),
    (lambda: PruneGroup(out=["Dense_0/kernel"], inp=["Dense_2/kernel"], keep=[0]), ValueError,
     r"groups\[0\]\.inp.*Dense_2/kernel.*units"),
    (lambda: PruneGroup(out=["Dense_0/kernel"], keep=[0, 7]), ValueError, r"groups\[0\]\.keep.*7.*out of range"),
    (lambda: [PruneGroup(out=["Dense_0/kernel"], keep=[0]), PruneGroup(out=["Dense_0/kernel"], keep=[1])],
     ValueError, r"groups\[1\]\.out.*already listed in groups\[0\]"),
    (lambda: PruneGroup(out=["Dense_0/kernel"], inp=["Dense_0/bias"], keep=[0]), ValueError, r"groups\[0\]\.inp.*vector"),
    (lambda: PruneGroup(out=["Dense_0/kernel"], keep=[0], head_dim=2), ValueError, r"groups\[0\].*head_dim"),
    (lambda: PruneGroup(out=["Dense_0/kernel"], keep=[[0], [1]]), ValueError, r"groups\[0\]\.keep.*batch shape"),
    (lambda: "Dense_0/kernel", TypeError, "groups"),
    (lambda: [], TypeError, "groups"),
    (lambda: [{"out": "Dense_0/kernel"}], TypeError, r"groups\[0\]"),
])
def test_bad_prune_args(groups, exc, name):
    with pytest.raises(exc, match=name):
        prune(_mlp3(), groups())


def test_bad_prune_params_axes_and_minor_unit_axis():
    g = PruneGroup(out=["Dense_0/kernel"], keep=[0])
    with pytest.raises(TypeError, match="params"):
        prune("params", g)
    with pytest.raises(TypeError, match="axes"):
        prune(_mlp3(), g, axes=3)
    conv = {"conv": {"kernel": jnp.ones((3, 3, 4, 5))}}
    with pytest.raises(ValueError, match=r"groups\[0\]\.inp.*Conv kernel.*axes"):
        prune(conv, PruneGroup(inp=["conv/kernel"], keep=[0, 2]))
    cax = {"conv/kernel": Axes((), (2, 0, 1), (3,))}
    gc = PruneGroup(inp=["conv/kernel"], keep=[0, 2])
    ok = prune(conv, gc, axes=cax)
    assert ok["conv"]["kernel"].shape == (3, 3, 2, 5)
    np.testing.assert_array_equal(np.asarray(ok["conv"]["kernel"]), np.asarray(conv["conv"]["kernel"])[:, :, [0, 2]])
    rp = LoRA(rank=2, axes=cax)
    _, ad = rp.init(jax.random.key(0), ok)
    ad = _perturb(ad)
    rec = recover(ad, gc, conv, rp)
    dfull = np.asarray(rp.delta(conv, rec)["conv/kernel"])
    np.testing.assert_allclose(dfull[:, :, [0, 2]], np.asarray(rp.delta(ok, ad)["conv/kernel"]), rtol=1e-6, atol=1e-6)
    assert np.all(dfull[:, :, [1, 3]] == 0)


def test_bad_recover_args():
    params = _mlp3()
    g = PruneGroup(**G0, keep=[0, 2, 3])
    small = prune(params, g)
    rp = LoRA(rank=2)
    _, ad = rp.init(jax.random.key(0), small)
    for bad_rp in (DoRA(rank=2), PiSSA(rank=2)):
        with pytest.raises(TypeError, match=r"rp.*LoRA and lrjax\.RSLoRA"):
            recover(ad, g, params, bad_rp)
    with pytest.raises(TypeError, match="rp"):
        recover(ad, g, params, "lora")
    _, dad = DoRA(rank=2).init(jax.random.key(0), small)
    with pytest.raises(ValueError, match=r"adapters\['Dense_0/kernel'\].*'m'"):
        recover(dad, g, params, rp)
    with pytest.raises(ValueError, match="mode"):
        recover(ad, g, params, rp, mode="zero")
    with pytest.raises(TypeError, match="key"):
        recover(ad, g, params, rp, mode="normA")
    with pytest.raises(ValueError, match="key"):
        recover(ad, g, params, rp, key=jax.random.key(0))
    with pytest.raises(TypeError, match="key"):
        recover(ad, g, params, rp, mode="normA", key=3)
    with pytest.raises(TypeError, match="full_params"):
        recover(ad, g, None, rp)
    with pytest.raises(ValueError, match="adapters.*Dense_7"):
        recover({"Dense_7/kernel": ad["Dense_0/kernel"]}, g, params, rp)
    with pytest.raises(ValueError, match="adapters is empty"):
        recover({}, g, params, rp)
    with pytest.raises(TypeError, match="adapters"):
        recover([1], g, params, rp)
    # factors of the FULL model (not the pruned one) do not fit
    _, full_ad = rp.init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"adapters\['Dense_0/kernel'\].*do not fit the pruned leaf"):
        recover(full_ad, g, params, rp)
    with pytest.raises(ValueError, match="adapters.*rank"):
        recover(ad, g, params, LoRA(rank=3))
    with pytest.raises(TypeError, match=r"adapters\['Dense_0/kernel'\]\['a'\]"):
        recover({"Dense_0/kernel": {"a": [[1.0]], "b": ad["Dense_0/kernel"]["b"]}}, g, params, rp)
    with pytest.raises(ValueError, match=r"groups\[0\]\.keep"):
        recover(ad, PruneGroup(**G0, keep=[0, 9]), params, rp)


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(keep_ratio=0.0), ValueError, "keep_ratio"),
    (dict(keep_ratio=1.5), ValueError, "keep_ratio"),
    (dict(keep_ratio=True), TypeError, "keep_ratio"),
    (dict(keep_ratio=float("nan")), ValueError, "keep_ratio"),
    (dict(keep_ratio=0.5, score="taylor"), ValueError, "score"),
    (dict(keep_ratio=0.5, score=np.ones(3)), ValueError, "score"),
    (dict(keep_ratio=0.5, score=np.array([1.0, np.nan, 0, 0, 0, 0, 0])), ValueError, "score"),
    (dict(keep_ratio=0.5, per_layer=1), TypeError, "per_layer"),
])
def test_bad_select_group(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        select_group(_mlp3(), out=["Dense_0/kernel"], **kwargs)


def test_bad_unit_scores_norm():
    with pytest.raises(ValueError, match="norm"):
        unit_scores(_mlp3(), out="Dense_0/kernel", norm="l3")
