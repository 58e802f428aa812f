"""Protocol growth of issue 11: trainable vs frozen factors, seed factors, data-aware init
(``grads=``), ``estimate_grads`` and the matrix-view hook. Exercised through minimal variants
defined here, so the protocol is tested independently of any one method file."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrjax
from lrjax.reparam import estimate_grads
from lrjax.reparam.base import LowRankForm, Reparam

T, V = TypeError, ValueError


@dataclasses.dataclass(frozen=True)
class GradInit(lrjax.LoRA):
    """A = first r columns of G's matrix view transposed into [M, r]; B = 0 (output unchanged)."""
    needs_grads = True

    def init_leaf(self, key, w, path, *, g):
        a = g[..., :, : self.rank].astype(self.factor_dtype(w))
        return w, {"a": a, "b": jnp.zeros((*w.shape[:-2], self.rank, w.shape[-1]), a.dtype)}


@dataclasses.dataclass(frozen=True)
class Seeded(Reparam):
    """A regenerated from a stored seed (frozen, never stored as an array), trainable core C."""
    factor_keys = ("c", "seed")
    frozen_keys = ("seed",)
    seed_keys = ("seed",)

    def init_leaf(self, key, w, path):
        return w, {"c": jnp.zeros((self.rank, w.shape[-1]), w.dtype), "seed": jax.random.key_data(key)}

    def factors(self, w, f):
        a = jax.random.normal(jax.random.wrap_key_data(f["seed"]), (w.shape[-2], self.rank), jnp.float32)
        return LowRankForm(a.astype(w.dtype), f["c"], self.scale, None)

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        if f["c"].shape != (self.rank, n):
            raise ValueError(f"{argname}[{path!r}]['c'] must have shape {(self.rank, n)}, got {f['c'].shape}")


@dataclasses.dataclass(frozen=True)
class Transposed(lrjax.LoRA):
    """A custom matrix view (the transpose of the axes view): the factored path must materialize."""

    def view_shape(self, path, shape):
        b, m, n = super().view_shape(path, shape)
        return b, n, m

    def to_view(self, path, leaf):
        return jnp.swapaxes(super().to_view(path, leaf), -1, -2)

    def from_view(self, path, mat, shape):
        return super().from_view(path, jnp.swapaxes(mat, -1, -2), shape)


def _params():
    k = jax.random.split(jax.random.key(3), 2)
    return {"d0": {"kernel": jax.random.normal(k[0], (5, 4)), "bias": jnp.zeros(4)},
            "d1": {"kernel": jax.random.normal(k[1], (4, 3)), "bias": jnp.zeros(3)}}


def _loss(p, batch):
    x, y = batch
    h = jnp.tanh(x @ p["d0"]["kernel"] + p["d0"]["bias"])
    return jnp.mean((h @ p["d1"]["kernel"] + p["d1"]["bias"] - y) ** 2)


def _batches(n=3):
    ks = jax.random.split(jax.random.key(7), 2 * n)
    return [(jax.random.normal(ks[2 * i], (6, 5)), jax.random.normal(ks[2 * i + 1], (6, 3))) for i in range(n)]


# ------------------------------------------------------------------------------- estimate_grads
def test_estimate_grads_is_the_mean_of_full_gradients_of_the_targets_only():
    p, bs = _params(), _batches()
    g = estimate_grads(_loss, p, bs, r"d0/kernel")
    assert set(g) == {"d0/kernel"}
    ref = np.mean([np.asarray(jax.grad(_loss)(p, b)["d0"]["kernel"], np.float64) for b in bs], 0)
    np.testing.assert_allclose(np.asarray(g["d0/kernel"]), ref, rtol=1e-5, atol=1e-7)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *bs)
    g2 = estimate_grads(_loss, p, stacked, "kernel", stacked=True)
    assert set(g2) == {"d0/kernel", "d1/kernel"}
    np.testing.assert_allclose(np.asarray(g2["d0/kernel"]), ref, rtol=1e-5, atol=1e-7)
    # stacked form inside an outer jit, together with a data-aware init: one compiled program
    rp = GradInit(rank=2, targets="kernel")

    @jax.jit
    def init_from_data(params, batches):
        return rp.init(jax.random.key(0), params, grads=estimate_grads(_loss, params, batches, rp.targets,
                                                                       stacked=True))
    base, ad = init_from_data(p, stacked)
    np.testing.assert_allclose(np.asarray(ad["d0/kernel"]["a"]), ref[:, :2], rtol=1e-5, atol=1e-7)


def test_estimate_grads_keeps_bfloat16_leaves_in_float32():
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
    g = estimate_grads(lambda q, b: _loss(jax.tree.map(lambda x: x.astype(jnp.float32), q), b), p, _batches(2))
    assert all(v.dtype == jnp.float32 for v in g.values())


@pytest.mark.parametrize("call,exc,name", [
    (lambda: estimate_grads("loss", _params(), _batches()), T, "loss_fn"),
    (lambda: estimate_grads(_loss, _params(), tuple(_batches())), T, "batches"),
    (lambda: estimate_grads(_loss, _params(), jnp.ones((3, 5))), T, "batches"),
    (lambda: estimate_grads(_loss, _params(), []), V, "batches"),
    (lambda: estimate_grads(_loss, _params(), _batches(), "zz"), V, "targets"),
    (lambda: estimate_grads(_loss, _params(), _batches(), 3), T, "targets"),
    (lambda: estimate_grads(_loss, "params", _batches()), T, "params"),
    (lambda: estimate_grads(_loss, _params(), _batches(), stacked="yes"), T, "stacked"),
    (lambda: estimate_grads(_loss, _params(), (jnp.ones((2, 6, 5)), jnp.ones((3, 6, 3))), stacked=True), V, "batches"),
    (lambda: estimate_grads(_loss, _params(), (jnp.ones((0, 6, 5)), jnp.ones((0, 6, 3))), stacked=True), V, "batches"),
    (lambda: estimate_grads(lambda p, b: jnp.ones(2) * _loss(p, b), _params(), _batches()), T, "loss_fn"),
    (lambda: estimate_grads(lambda p, b: _loss(p, b) * jnp.nan, _params(), _batches()), V, "loss_fn"),
])
def test_estimate_grads_bad_input(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


# ----------------------------------------------------------------------------- init(grads=...)
def _grads(p=None):
    return estimate_grads(_loss, p or _params(), _batches(), "kernel")


def test_data_aware_init_reads_grads_and_leaves_output_unchanged():
    p = _params()
    g = _grads(p)
    base, ad = GradInit(rank=2).init(jax.random.key(0), p, grads=g)
    np.testing.assert_array_equal(np.asarray(ad["d1/kernel"]["a"]), np.asarray(g["d1/kernel"][:, :2]))
    eff = GradInit(rank=2).materialize(base, ad)
    np.testing.assert_array_equal(np.asarray(eff["d0"]["kernel"]), np.asarray(p["d0"]["kernel"]))


@pytest.mark.parametrize("make,exc,match", [
    (lambda g: None, V, "grads: GradInit is a data-aware init"),
    (lambda g: [g["d0/kernel"]], T, "grads must be the dict"),
    (lambda g: {**g, "d0/bias": jnp.zeros(4)}, V, r"grads: 'd0/bias' is not targeted"),
    (lambda g: {**g, "zz": jnp.zeros(4)}, V, r"grads: 'zz' is not a leaf"),
    (lambda g: {"d0/kernel": g["d0/kernel"]}, V, r"grads has no entry for the targeted leaf 'd1/kernel'"),
    (lambda g: {**g, "d0/kernel": g["d0/kernel"].T}, V, r"grads\['d0/kernel'\] has shape"),
    (lambda g: {**g, "d0/kernel": g["d0/kernel"].astype(jnp.int32)}, T, r"grads\['d0/kernel'\] has dtype"),
    (lambda g: {**g, "d0/kernel": np.asarray(g["d0/kernel"]).tolist()}, T, r"grads\['d0/kernel'\] must be an array"),
    (lambda g: {**g, "d0/kernel": g["d0/kernel"].at[0, 0].set(jnp.inf)}, V, r"grads\['d0/kernel'\] contains NaN"),
    (lambda g: {3: g["d0/kernel"]}, T, "grads: keys must be leaf path strings"),
])
def test_init_grads_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        GradInit(rank=2).init(jax.random.key(0), _params(), grads=make(_grads()))


@pytest.mark.parametrize("cls", [lrjax.LoRA, lrjax.RSLoRA, lrjax.DoRA, lrjax.PiSSA])
def test_data_free_init_refuses_grads(cls):
    with pytest.raises(V, match="grads: .* does not use gradients"):
        cls(rank=2).init(jax.random.key(0), _params(), grads=_grads())


# -------------------------------------------------------------------- trainable vs frozen, seeds
def test_split_join_mask_and_grad_through_the_trainable_part():
    rp = Seeded(rank=2)
    p = _params()
    base, ad = rp.init(jax.random.key(1), p)
    assert ad["d0/kernel"]["seed"].dtype == jnp.uint32
    tr, fr = rp.split(ad)
    assert set(tr["d0/kernel"]) == {"c"} and set(fr["d0/kernel"]) == {"seed"}
    assert rp.join(tr, fr) == ad
    assert rp.trainable_keys == ("c",)
    assert rp.num_params(ad) == 2 * 4 + 2 * 3  # the seed is not a parameter
    assert rp.trainable_mask(ad) == {k: {"c": True, "seed": False} for k in ad}
    x = jnp.ones((2, 5))

    def loss(t):
        q = rp.materialize(base, rp.join(t, fr))
        return jnp.sum(jnp.tanh(x @ q["d0"]["kernel"]) @ q["d1"]["kernel"])
    g = jax.jit(jax.grad(loss))(tr)
    # dL/dC = s A^T dL/dW with A regenerated from the seed: compare with a dense computation
    a = jax.random.normal(jax.random.wrap_key_data(fr["d1/kernel"]["seed"]), (4, 2))
    gw = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ p["d0"]["kernel"]) @ w))(p["d1"]["kernel"])
    np.testing.assert_allclose(np.asarray(g["d1/kernel"]["c"]), np.asarray(a.T @ gw), rtol=1e-5)
    # multi_transform labels from the mask: the optimizer over the whole dict never moves the seed
    labels = jax.tree.map(lambda t: "train" if t else "freeze", rp.trainable_mask(ad))
    opt = optax.multi_transform({"train": optax.sgd(0.1), "freeze": optax.set_to_zero()}, labels)
    st = opt.init(ad)
    upd, _ = opt.update({k: {"c": jnp.ones_like(v["c"]), "seed": v["seed"]} for k, v in ad.items()}, st, ad)
    new = optax.apply_updates(ad, upd)
    np.testing.assert_array_equal(np.asarray(new["d0/kernel"]["seed"]), np.asarray(ad["d0/kernel"]["seed"]))
    # factored path: seeded factors followed symbolically, equal to materialize
    fwd = lambda q, x: jnp.tanh(x @ q["d0"]["kernel"]) @ q["d1"]["kernel"]
    ad2 = {k: {**v, "c": jnp.ones_like(v["c"])} for k, v in ad.items()}
    np.testing.assert_allclose(np.asarray(lrjax.factored(fwd, rp)(base, ad2, x)),
                               np.asarray(fwd(rp.materialize(base, ad2), x)), rtol=1e-5, atol=1e-5)
    # seeds are never floating: a float seed is refused; merge with seeds works (finite check skips them)
    with pytest.raises(T, match=r"\['seed'\] must be raw PRNG key data"):
        rp.materialize(base, {k: {**v, "seed": v["seed"].astype(jnp.float32)} for k, v in ad.items()})
    rp.merge(base, ad2)


@pytest.mark.parametrize("call,exc,match", [
    (lambda rp, ad, tr, fr: rp.split([ad]), T, "adapters must be the dict"),
    (lambda rp, ad, tr, fr: rp.split({3: ad["d0/kernel"]}), T, "adapters: keys must be"),
    (lambda rp, ad, tr, fr: rp.split({"d0/kernel": [1]}), T, r"adapters\['d0/kernel'\] must be a dict"),
    (lambda rp, ad, tr, fr: rp.split({"d0/kernel": {"zz": 1}}), V, r"unknown factor 'zz'"),
    (lambda rp, ad, tr, fr: rp.trainable_mask("x"), T, "adapters must be the dict"),
    (lambda rp, ad, tr, fr: rp.join(tr, {}), V, "trainable and frozen name different leaves"),
    (lambda rp, ad, tr, fr: rp.join(fr, tr), V, "holds the frozen factor"),
    (lambda rp, ad, tr, fr: rp.join(tr, tr), V, "frozen.*holds the trainable factor"),
    (lambda rp, ad, tr, fr: rp.join(tr, "x"), T, "frozen must be the dict"),
    (lambda rp, ad, tr, fr: rp.join(None, fr), T, "trainable must be the dict"),
])
def test_split_join_bad_input(call, exc, match):
    rp = Seeded(rank=2)
    _, ad = rp.init(jax.random.key(1), _params())
    tr, fr = rp.split(ad)
    with pytest.raises(exc, match=match):
        call(rp, ad, tr, fr)


def test_seeded_factors_are_regenerated_identically_from_the_leaf_key():
    """Per-leaf keys are fold_in(key, crc32(path)): independent of other targets and of the process."""
    rp = Seeded(rank=2)
    _, ad = rp.init(jax.random.key(1), _params())
    _, ad1 = Seeded(rank=2, targets=r"d1/kernel").init(jax.random.key(1), _params())
    np.testing.assert_array_equal(np.asarray(ad["d1/kernel"]["seed"]), np.asarray(ad1["d1/kernel"]["seed"]))
    # pinned value: a change of the per-leaf key derivation breaks saved NOLA-style adapters
    import zlib
    want = jax.random.key_data(jax.random.fold_in(jax.random.key(1), zlib.crc32(b"d1/kernel") & 0x7FFFFFFF))
    np.testing.assert_array_equal(np.asarray(ad1["d1/kernel"]["seed"]), np.asarray(want))


# ----------------------------------------------------------------------------- matrix-view hook
def test_custom_view_round_trips_and_factored_falls_back_to_the_dense_weight():
    rp = Transposed(rank=2)
    assert not rp.axes_view and lrjax.LoRA(rank=2).axes_view
    p = _params()
    base, ad = rp.init(jax.random.key(0), p)
    assert ad["d0/kernel"]["a"].shape == (4, 2) and ad["d0/kernel"]["b"].shape == (2, 5)
    ad = {k: {**v, "b": jnp.ones_like(v["b"])} for k, v in ad.items()}
    eff = rp.materialize(base, ad)
    want = np.asarray(p["d0"]["kernel"]) + (np.asarray(ad["d0/kernel"]["a"]) @ np.asarray(ad["d0/kernel"]["b"])).T
    np.testing.assert_allclose(np.asarray(eff["d0"]["kernel"]), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rp.unmerge(rp.merge(base, ad), ad)["d0"]["kernel"]),
                               np.asarray(p["d0"]["kernel"]), atol=1e-5)
    st = lrjax.reparam.FactoredStats()
    fwd = lambda q, x: x @ q["d0"]["kernel"]
    x = jnp.ones((2, 5))
    np.testing.assert_allclose(np.asarray(lrjax.factored(fwd, rp, stats=st)(base, ad, x)),
                               np.asarray(fwd(eff, x)), rtol=1e-5)
    assert any(s.startswith("view:") for s in st.fallback)


# ------------------------------------------------------------------ found by the new-user trial
def test_frozen_factors_get_no_gradient_even_without_split():
    rp = lrjax.LoRASB(rank=2)
    p = _params()
    base, ad = rp.init(jax.random.key(0), p, grads=_grads(p))
    x = jnp.ones((3, 5))

    def loss(a):
        q = rp.materialize(base, a)
        return jnp.sum(jnp.tanh(x @ q["d0"]["kernel"]) @ q["d1"]["kernel"])
    g = jax.grad(loss)(ad)
    gf = jax.grad(lambda a: jnp.sum(lrjax.factored(lambda q, x: jnp.tanh(x @ q["d0"]["kernel"]) @ q["d1"]["kernel"],
                                                   rp)(base, a, x)))(ad)
    for gg in (g, gf):
        for f in gg.values():
            assert not np.any(np.asarray(f["a"])) and not np.any(np.asarray(f["b"]))
            assert np.any(np.asarray(f["r"]))


def test_split_and_num_params_refuse_another_variants_adapters():
    _, lora_ad = lrjax.LoRA(rank=2).init(jax.random.key(0), _params())
    for call in (lambda rp: rp.split(lora_ad), lambda rp: rp.num_params(lora_ad), lambda rp: rp.trainable_mask(lora_ad)):
        with pytest.raises(V, match=r"adapters\['d0/kernel'\] has no factor 'r'"):
            call(lrjax.LoRASB(rank=2))


def test_nested_grads_are_refused_with_the_fix():
    p = _params()
    g = jax.grad(_loss)(p, _batches(1)[0])
    with pytest.raises(T, match="flat dict .* nested pytree"):
        GradInit(rank=2).init(jax.random.key(0), p, grads=g)


def test_save_adapters_checks_against_rp_and_warns_for_rewritten_bases(tmp_path):
    from lrjax import checkpoint
    p = _params()
    _, lora_ad = lrjax.LoRA(rank=2).init(jax.random.key(0), p)
    with pytest.raises(V, match="has no factor 'r'"):
        checkpoint.save_adapters(tmp_path / "a", lora_ad, rp=lrjax.LoRASB(rank=2))
    with pytest.raises(V, match=r"factors have rank 2 but this LoRA has rank=1"):
        checkpoint.save_adapters(tmp_path / "b", lora_ad, rp=lrjax.LoRA(rank=1))
    ga = lrjax.LoRAGA(rank=1)
    _, ga_ad = ga.init(jax.random.key(0), p, grads=_grads(p))
    with pytest.warns(UserWarning, match="rewrote the base"):
        checkpoint.save_adapters(tmp_path / "c", ga_ad, rp=ga)
    cd = lrjax.CoDyRA(rank=2)
    _, cad = cd.init(jax.random.key(0), p)
    pruned = cd.prune({k: {**v, "g": jnp.zeros_like(v["g"])} for k, v in cad.items()})
    with pytest.raises(V, match=r"zero size .* save before pruning"):
        checkpoint.save_adapters(tmp_path / "d", pruned, rp=cd)
    assert not (tmp_path / "d").exists()
