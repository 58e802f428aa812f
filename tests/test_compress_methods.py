"""lrjax.compress.welore and lrjax.compress.pela: rules, training partitions, losses, bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrjax
import lrjax.compress as C
from lrjax.compress import pela, welore


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def _power_law(key, m, n, a):
    k1, k2 = jax.random.split(jax.random.key(key))
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (m, m)))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (n, n)))
    r = min(m, n)
    s = jnp.arange(1, r + 1.0) ** -a
    return (u[:, :r] * s) @ v[:, :r].T


PARAMS = {"flat": {"kernel": _power_law(0, 24, 20, 0.2)}, "mid": {"kernel": _power_law(1, 24, 20, 0.8)},
          "steep": {"kernel": _power_law(2, 24, 20, 3.0)}, "head": {"kernel": _power_law(3, 20, 6, 1.0),
                                                                     "bias": jnp.zeros(6)}}


def _sum_err(c):
    return sum(r.rel_error for r in c.report.layers)


# -------------------------------------------------------------------------------- WeLore
def test_welore_nonuniform_beats_uniform_at_equal_rank_budget():
    t = ("flat/kernel", "mid/kernel", "steep/kernel")
    w = welore.compress(PARAMS, 0.5, t, by="rank")
    u = welore.uniform(PARAMS, 0.5, t, by="rank")
    assert sum(r.rank for r in w.report.layers) <= sum(r.rank for r in u.report.layers)
    assert _sum_err(w) < _sum_err(u)
    ranks = {r.path: r.rank for r in w.report.layers}
    assert ranks["flat/kernel"] > ranks["mid/kernel"] > ranks["steep/kernel"]  # heavy tails lose more


def test_welore_lrc_vs_frozen_and_mask_with_optax_masked():
    t = ("flat/kernel", "mid/kernel", "steep/kernel")
    c = welore.compress(PARAMS, 0.3, t, by="rank", min_ratio=0.3)
    kinds = {r.path: r.kind for r in c.report.layers}
    assert kinds["flat/kernel"] == "dense" and kinds["steep/kernel"] == "lowrank"  # N-LRC stays dense
    assert "flat/kernel" not in c.factors
    np.testing.assert_array_equal(c.base["flat"]["kernel"], PARAMS["flat"]["kernel"])
    tree = welore.trainable(c)
    mask = welore.trainable_mask(c)
    assert mask["factors"]["steep/kernel"]["a"] is True and mask["base"]["flat"]["kernel"] is False
    opt = welore.optimizer(c, optax.sgd(0.1))
    st = opt.init(tree)
    g = jax.tree_util.tree_map(jnp.ones_like, tree)
    upd, _ = opt.update(g, st, tree)
    new = optax.apply_updates(tree, upd)
    np.testing.assert_array_equal(new["base"]["flat"]["kernel"], tree["base"]["flat"]["kernel"])
    assert not np.allclose(new["factors"]["steep/kernel"]["a"], tree["factors"]["steep/kernel"]["a"])
    tr, fr = welore.partition(c)
    assert tr is c.factors and fr is c.base


def test_welore_lrc_only_finetune_recovers():
    x = _randn(7, (64, 24)) * jnp.linspace(3.0, 0.05, 24)  # anisotropic inputs
    p = {"mid": {"kernel": PARAMS["mid"]["kernel"]}, "steep": {"kernel": PARAMS["steep"]["kernel"]}}
    y = x @ p["mid"]["kernel"]
    c = welore.compress(p, 0.6, by="rank")
    g = lrjax.factored(lambda q, x: x @ q["mid"]["kernel"], c.rp)

    def loss(f):
        return jnp.mean((g(c.base, f, x) - y) ** 2)

    f = c.factors
    l0 = float(loss(f))
    opt = optax.adam(1e-2)
    st = opt.init(f)

    @jax.jit  # one compiled step (eagerly: every op of the grad and the update dispatched 30 times)
    def step(f, st):
        u, st = opt.update(jax.grad(loss)(f), st)
        return optax.apply_updates(f, u), st

    for _ in range(30):
        f, st = step(f, st)
    assert float(loss(f)) < 0.7 * l0  # SVD init is not output-optimal
    c2 = welore.combine(c, f)
    np.testing.assert_allclose(x @ c2.materialize()["mid"]["kernel"], g(c.base, f, x), atol=1e-4)


# ---------------------------------------------------------------------------------- PELA
def test_pela_param_count_about_one_over_c_and_skips():
    big = {"fc1": {"kernel": _randn(0, (64, 96))},
           "fc2": {"kernel": _randn(1, (96, 64))},
           "tiny": {"kernel": _randn(2, (64, 8))},
           "head": {"kernel": _randn(3, (64, 32))},
           "ln_norm": {"kernel": jnp.ones((32, 32))}}
    for c in (1.5, 2.0, 3.0):
        comp = pela.compress(big, c)
        assert set(comp.factors) == {"fc1/kernel", "fc2/kernel"}  # head, norm, <10 outputs skipped
        rep = comp.report
        assert 1 / c - 160 / 6144 <= rep.bytes_after / rep.bytes_before <= 1 / c  # floor: within (M+N)/(MN)
    assert pela.DEFAULTS == {"ratio": 2.0, "kd_alpha": 1.0, "kd_beta": 0.0, "inf_norm_weight": 0.0,
                             "inf_norm_eps": 1e-3}


def test_pela_losses():
    fs = [jnp.ones((4, 3)), jnp.zeros((4, 2))]
    ft = [jnp.zeros((4, 3)), jnp.ones((4, 2))]
    assert float(pela.feature_loss(fs, ft)) == pytest.approx(1.0)
    assert float(pela.logit_loss(jnp.ones(5) * 2, jnp.zeros(5))) == pytest.approx(4.0)
    loss, parts = pela.distill_loss(jnp.asarray(0.5), fs, ft)
    assert float(loss) == pytest.approx(1.5) and set(parts) == {"ce", "feature"}
    teacher = {"fc": {"kernel": _randn(0, (20, 16))}}
    comp = pela.compress(teacher, 2.0)
    wp = pela.weight_perturbation(comp, comp.factors, teacher, eps=1e-3)
    f = comp.factors["fc/kernel"]
    want = (np.max(np.abs(np.asarray(f["a"] @ f["b"]) - np.asarray(teacher["fc"]["kernel"]))) - 1e-3) ** 2
    assert float(wp) == pytest.approx(want, rel=1e-4)
    loss, parts = pela.distill_loss(jnp.asarray(0.0), fs, ft, jnp.ones(3), jnp.zeros(3), compressed=comp,
                                    factors=comp.factors, teacher=teacher, kd_beta=2.0, inf_norm_weight=0.5)
    assert float(loss) == pytest.approx(1.0 + 2.0 + 0.5 * want, rel=1e-4)
    gr = jax.grad(lambda fa: pela.weight_perturbation(comp, fa, teacher))(comp.factors)
    assert float(jnp.abs(gr["fc/kernel"]["a"]).sum()) > 0


# ----------------------------------------------------------------------------- bad input
COMP = pela.compress({"fc": {"kernel": jnp.ones((20, 16)) + jnp.eye(20, 16)}}, 2.0)
T3 = ("flat/kernel", "mid/kernel", "steep/kernel")


@pytest.mark.parametrize("call", [lambda v: welore.compress(PARAMS, v, T3), lambda v: welore.uniform(PARAMS, v, T3)])
@pytest.mark.parametrize("v", [0.0, 1.0, -0.5, 2.0])
def test_welore_reduction_outside_unit_interval(call, v):
    with pytest.raises(ValueError, match="reduction"):
        call(v)


@pytest.mark.parametrize("call,exc,name", [
    (lambda: welore.compress(PARAMS, "half", T3), TypeError, "reduction"),
    (lambda: welore.uniform(PARAMS, "half", T3), TypeError, "reduction"),
    (lambda: welore.compress(PARAMS, 0.5, T3, by="bytes"), ValueError, "by"),
    (lambda: welore.uniform(PARAMS, 0.5, T3, by="bytes"), ValueError, "by"),
    (lambda: welore.compress(PARAMS, 0.5, T3, min_ratio=-0.1), ValueError, "min_ratio"),
    (lambda: welore.compress(PARAMS, 0.5, T3, method="whitened", calib={"flat/kernel": jnp.ones((8, 5))}),
     ValueError, "calib"),
    (lambda: welore.compress({"k": {"kernel": jnp.full((4, 4), jnp.nan)}}, 0.5), ValueError, "params"),
    (lambda: welore.partition({"a": 1}), TypeError, "compressed"),
    (lambda: welore.trainable(None), TypeError, "compressed"),
    (lambda: welore.trainable_mask(PARAMS), TypeError, "compressed"),
    (lambda: welore.combine(COMP, {"other": {}}), ValueError, "factors"),
    (lambda: welore.labels([]), TypeError, "compressed"),
    (lambda: welore.optimizer(COMP, "adam"), TypeError, "opt"),
    (lambda: welore.optimizer("c", optax.sgd(0.1)), TypeError, "compressed"),
    (lambda: welore.combine(COMP, {"fc/kernel": {"a": jnp.ones((20, 3)), "b": jnp.ones((2, 16))}}), ValueError,
     "factors"),
    (lambda: pela.compress(PARAMS, 1.0), ValueError, "ratio"),
    (lambda: pela.compress(PARAMS, 0.5), ValueError, "ratio"),
    (lambda: pela.compress(PARAMS, "2"), TypeError, "ratio"),
    (lambda: pela.compress(PARAMS, 2.0, min_out=0), ValueError, "min_out"),
    (lambda: pela.compress(PARAMS, 2.0, skip="head"), TypeError, "skip"),
    (lambda: pela.compress(PARAMS, 2.0, "head/kernel"), ValueError, "targets"),
    (lambda: pela.compress({"k": {"kernel": jnp.full((12, 12), jnp.inf)}}, 2.0), ValueError, "params"),
    (lambda: pela.feature_loss(jnp.ones(3), [jnp.ones(3)]), TypeError, "feats_s"),
    (lambda: pela.feature_loss([jnp.ones(3)], [jnp.ones(4)]), ValueError, "feats_s"),
    (lambda: pela.feature_loss([jnp.ones(3)], []), ValueError, "feats_s"),
    (lambda: pela.logit_loss(jnp.ones(3), jnp.ones(4)), ValueError, "logits_s"),
    (lambda: pela.logit_loss([1.0], jnp.ones(1)), TypeError, "logits_s"),
    (lambda: pela.weight_perturbation(PARAMS, {}, PARAMS), TypeError, "compressed"),
    (lambda: pela.weight_perturbation(COMP, COMP.factors, {"x": jnp.ones(2)}), ValueError, "teacher"),
    (lambda: pela.weight_perturbation(COMP, COMP.factors, PARAMS, eps=-1.0), ValueError, "eps"),
    (lambda: pela.distill_loss(jnp.asarray(1.0), kd_alpha=-1.0), ValueError, "kd_alpha"),
    (lambda: pela.distill_loss(jnp.asarray(1.0), kd_beta="x"), TypeError, "kd_beta"),
    (lambda: pela.distill_loss(jnp.asarray(1.0)), ValueError, "feats_s"),
    (lambda: pela.distill_loss(jnp.asarray(1.0), kd_alpha=0.0, kd_beta=1.0), ValueError, "logits_s"),
    (lambda: pela.distill_loss(jnp.asarray(1.0), kd_alpha=0.0, inf_norm_weight=1.0), ValueError, "teacher"),
    (lambda: pela.distill_loss("ce", kd_alpha=0.0), TypeError, "ce"),
])
def test_bad_arguments_named(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


BAD_PARAMS = [None, [1.0, 2.0], "w", jnp.ones((4, 4))]


@pytest.mark.parametrize("bad", BAD_PARAMS, ids=["none", "list", "str", "array"])
@pytest.mark.parametrize("fn", [lambda p: C.compress(p, rank=1), lambda p: welore.compress(p, 0.5),
                                lambda p: welore.uniform(p, 0.5), lambda p: pela.compress(p, 2.0),
                                lambda p: C.collect_activations(lambda q, x: x, p, "kernel", jnp.ones(2))],
                         ids=["compress", "welore", "uniform", "pela", "collect"])
def test_params_not_a_pytree_of_arrays(bad, fn):
    with pytest.raises(TypeError, match="params"):
        fn(bad)


@pytest.mark.parametrize("call", [
    lambda: C.compress(PARAMS, T3, rank=1, method="randomized", key=0),
    lambda: C.factorize(PARAMS["flat"]["kernel"], 2, method="randomized", key="k")])
def test_bad_key_named(call):
    with pytest.raises(TypeError, match="key"):
        call()
