"""EGGROLL (lrjax.es): factored forward, noise, estimator statistics, shaping, validation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from lrjax.es import (Eggroll, EggrollState, FactoredStats, LowRankNoise, PerturbedLinear, lowrank_dense,
                      lowrank_einsum, perturbed_call, shape_fitness)


def _mlp_params(key, dims=(5, 7, 3), stack=2):
    ks = jax.random.split(key, len(dims) + 1)
    p = {f"l{i}": {"kernel": jax.random.normal(ks[i], (a, b)) / np.sqrt(a), "bias": 0.1 * jnp.ones(b)}
         for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))}
    p["stack"] = 0.5 * jax.random.normal(ks[-1], (stack, dims[-1], dims[-1]))  # [L, m, n] batch of matrices
    p["head"] = jax.random.normal(ks[-2], (2, dims[-1])) * 0.5  # used transposed: x @ W.T
    return p


def _apply(p, x):
    h = x
    for i in range(2):
        h = jnp.tanh(h @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"])
    h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["stack"])
    return h @ p["head"].T


def _fit(p, x):
    return -jnp.mean(_apply(p, x) ** 2)


@pytest.fixture(scope="module")
def problem():
    params = _mlp_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 5))
    return params, x


@pytest.fixture(scope="module")
def es8():
    # shared so that its compiled fitness / update functions are reused across tests
    return Eggroll(8, rank=2, sigma=0.1, shaping="centered_rank")


def test_lowrank_forward_equals_materialized(problem, es8):
    params, x = problem
    es = es8
    st = es.init(jax.random.key(3))
    stats = FactoredStats()
    f = es.fitness(st, params, _fit, x, stats=stats)
    # every kernel use factored: 2 dense, the scanned stack, the transposed head; no fallback
    assert stats.factored == 4 and stats.fallback == []
    kinds = {pl.path: pl.kind for pl in es.plan(params)}
    assert kinds["stack"] == "lowrank" and kinds["l0/bias"] == "full"
    ref = jax.jit(jax.vmap(lambda i: _fit(es.member_params(st, params, i), x)))(jnp.arange(8))
    np.testing.assert_allclose(f, ref, rtol=1e-5, atol=1e-6)
    assert float(jnp.std(f)) > 1e-4  # the perturbations matter
    # perturbed_call for one member, outputs (not just fitness) agree
    nz = es.member_noise(st, params, 5)
    np.testing.assert_allclose(perturbed_call(_apply, params, nz, x), _apply(es.member_params(st, params, 5), x),
                               rtol=1e-5, atol=1e-6)


def test_linen_model_factored():
    model = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(2)])
    x = jnp.ones((3, 4))
    params = model.init(jax.random.key(0), x)
    es = Eggroll(4, rank=1, sigma=0.2)
    st = es.init(jax.random.key(1))
    stats = FactoredStats()
    fit = lambda p, x: jnp.sum(model.apply(p, x))  # noqa: E731
    f = es.fitness(st, params, fit, x, stats=stats)
    assert stats.factored == 2 and stats.fallback == []
    ref = jax.jit(jax.vmap(lambda i: fit(es.member_params(st, params, i), x)))(jnp.arange(4))
    np.testing.assert_allclose(f, ref, rtol=1e-5, atol=1e-5)


def test_noise_structure_and_reuse(problem):
    params, _ = problem
    # rank 3 exceeds min(M, N) = 2 of the [2, 3] head: it gets full-rank noise (lrjax's rank rule)
    es = Eggroll(8, rank=3, sigma=0.1, noise_reuse=2, targets=["l0/kernel", "l1/kernel", "stack"])
    st = es.init(jax.random.key(0))
    n0, n1 = es.member_noise(st, params, 2), es.member_noise(st, params, 3)
    nk = n0["l0/kernel"]
    assert isinstance(nk, LowRankNoise) and nk.a.shape == (5, 3) and nk.b.shape == (7, 3)
    assert n0["stack"].a.shape == (2, 3, 3)
    np.testing.assert_allclose(nk.scale, 0.1 / np.sqrt(3))
    # antithetic pair: same factors, opposite sign
    np.testing.assert_array_equal(n1["l0/kernel"].a, nk.a)
    np.testing.assert_array_equal(n1["l0/kernel"].dense(), -nk.dense())
    np.testing.assert_array_equal(n1["l0/bias"], -n0["l0/bias"])
    # regenerated, not stored: same (seed, generation, member) -> same bits; noise_reuse=2 keeps gen 1
    st1 = EggrollState(st.key, st.generation + 1)
    st2 = EggrollState(st.key, st.generation + 2)
    np.testing.assert_array_equal(es.member_noise(st1, params, 2)["l0/kernel"].a, nk.a)
    assert not np.array_equal(es.member_noise(st2, params, 2)["l0/kernel"].a, nk.a)
    assert not np.array_equal(es.member_noise(st, params, 4)["l0/kernel"].a, nk.a)
    # entries of E = A B^T / sqrt(r) have unit variance
    big = Eggroll(4096, rank=3, sigma=1.0)
    pw = {"w": jnp.zeros((4, 4))}
    es_ = jax.vmap(lambda i: big.member_noise(st, pw, 2 * i)["w"].dense())(jnp.arange(300))
    assert abs(float(jnp.var(es_)) - 1.0) < 0.1


def test_antithetic_symmetric_fitness_gives_zero_update():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    es = Eggroll(16, rank=2, sigma=0.3, shaping="none")
    g, _, info = es.estimate(es.init(jax.random.key(0)), params, lambda p: -jnp.sum(p["w"] ** 2) - jnp.sum(p["b"] ** 2))
    np.testing.assert_array_equal(info.fitness[0::2], info.fitness[1::2])
    assert all(float(jnp.max(jnp.abs(l))) == 0.0 for l in jax.tree.leaves(g))


def _cos(a, b):
    a, b = np.concatenate([np.ravel(x) for x in a]), np.concatenate([np.ravel(x) for x in b])
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_quadratic_cosine_rises_with_population():
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k[0], (6, 6)), "b": jax.random.normal(k[1], (6,))}
    target = jax.tree.map(lambda v: v + jax.random.normal(k[2], v.shape), params)
    loss = lambda p: sum(jnp.sum((p[n] - target[n]) ** 2) for n in p)  # noqa: E731
    true = jax.grad(loss)(params)  # Gaussian/low-rank smoothing leaves a quadratic's gradient unchanged
    # one population of 512; with shaping='none' the estimate of the first n members is the
    # update computed with every later member's fitness set to 0 (times N/n, which cosine ignores)
    es = Eggroll(512, rank=2, sigma=0.05, shaping="none", maximize=False)
    cos = {8: [], 64: [], 512: []}
    for s in range(3):
        st = es.init(jax.random.key(s))
        f = es.fitness(st, params, loss)
        for n in cos:
            g = es.tell(st, params, jnp.where(jnp.arange(512) < n, f, 0.0))[0]
            cos[n].append(_cos(jax.tree.leaves(g), jax.tree.leaves(true)))
    cos = {n: float(np.mean(c)) for n, c in cos.items()}
    assert cos[8] < cos[64] < cos[512] and cos[512] > 0.8, cos


def test_lowrank_bias_is_order_one_over_rank():
    """E[g] for f = sum (theta + sigma E)^4 equals 4 theta^3 + 4 theta sigma^2 E[e^4] with
    E[e^4] = 3 + 6/r for EGGROLL entries and 3 for Gaussian ones: the gap is 24 theta sigma^2 / r.
    The [2, 3] theta sits in the corner of a zero [16, 16] matrix (lrjax refuses rank > min(M, N));
    the zero entries change neither the corner's expected gradient nor its variance (antithetic
    differences only see the nonzero entries), and the error is measured on the corner."""
    theta = jnp.array([[1.0, -0.5, 0.8], [-1.0, 0.6, -0.7]])
    big = jnp.zeros((16, 16)).at[:2, :3].set(theta)
    sigma, n = 0.5, 2 ** 15
    fit = lambda p: jnp.sum(p["w"] ** 4)  # noqa: E731
    gauss = 4 * theta ** 3 + 12 * theta * sigma ** 2
    err = {}
    for r in (1, 4, 16, None):
        es = Eggroll(n, rank=r, sigma=sigma, shaping="none", maximize=False, update_chunk=512)
        g = np.mean([es.estimate(es.init(jax.random.key(s)), {"w": big}, fit)[0]["w"][:2, :3] for s in range(2)], 0)
        err[r] = float(np.linalg.norm(g - gauss))
    pred = {r: 24 * sigma ** 2 * float(np.linalg.norm(theta)) / r for r in (1, 4, 16)}
    assert err[1] > err[4] > err[16] > err[None], err
    for r in (1, 4):
        assert abs(err[r] - pred[r]) < 0.25 * pred[r] + 0.15, (err, pred)
    assert err[None] < 0.3 and err[16] < pred[4]


def test_full_rank_matches_open_es_in_distribution():
    """rank=None is OpenAI-ES; on a linear fitness both estimators have mean c and per-coordinate
    variance (2/N)(|c|^2 + c_k^2); compare ours and evosax's Open_ES over many seeds."""
    evosax = pytest.importorskip("evosax.algorithms")
    from evosax.core.fitness_shaping import identity_fitness_shaping_fn
    d, n, seeds, sigma = 6, 16, 300, 0.5
    c = jnp.linspace(-1.0, 1.0, d)
    f = lambda p: p["x"] @ c  # noqa: E731
    es = Eggroll(n, rank=None, sigma=sigma, shaping="none", maximize=False)
    ours = np.stack([es.estimate(es.init(jax.random.key(s)), {"x": jnp.zeros(d)}, f)[0]["x"] for s in range(seeds)])
    strat = evosax.Open_ES(n, jnp.zeros(d), optimizer=optax.sgd(1.0), std_schedule=optax.constant_schedule(sigma),
                           fitness_shaping_fn=identity_fitness_shaping_fn)

    def evo_grad(key):
        k1, k2, k3 = jax.random.split(key, 3)
        p = strat.default_params
        s = strat.init(k1, jnp.zeros(d), p)
        pop, s = strat.ask(k2, s, p)
        s2, _ = strat.tell(k3, pop, pop @ c, s, p)
        return s.mean - s2.mean  # sgd(lr=1): new_mean = mean - grad

    theirs = np.asarray(jax.vmap(evo_grad)(jax.random.split(jax.random.key(123), seeds)))
    sd_theory = np.sqrt(2 / n * (float(c @ c) + np.asarray(c) ** 2))
    for est in (ours, theirs):
        assert np.all(np.abs(est.mean(0) - np.asarray(c)) < 4 * sd_theory / np.sqrt(seeds))
        np.testing.assert_allclose(est.std(0), sd_theory, rtol=0.2)
    np.testing.assert_allclose(ours.std(0), theirs.std(0), rtol=0.25)


def test_shaping_and_nonfinite_rule(problem, es8):
    f = jnp.array([3.0, 1.0, 2.0, 0.0])
    np.testing.assert_allclose(shape_fitness(f, "centered_rank", maximize=False), [0.5, -1 / 6, 1 / 6, -0.5], atol=1e-6)
    np.testing.assert_allclose(shape_fitness(f, "centered_rank", maximize=True), [-0.5, 1 / 6, -1 / 6, 0.5], atol=1e-6)
    z = shape_fitness(f, "z_score", maximize=False)
    assert abs(float(jnp.mean(z))) < 1e-6 and abs(float(jnp.std(z)) - 1) < 1e-4
    # NaN / inf count as the worst finite fitness
    bad = jnp.array([3.0, jnp.nan, 2.0, -jnp.inf])
    np.testing.assert_array_equal(shape_fitness(bad, "none", maximize=True), shape_fitness(jnp.array([3.0, 2.0, 2.0, 2.0]), "none", True))
    assert float(jnp.max(jnp.abs(shape_fitness(jnp.full(4, jnp.nan), "z_score")))) == 0.0
    params, x = problem
    es = es8
    st = es.init(jax.random.key(0))
    raw = es.fitness(st, params, _fit, x)
    poisoned = raw.at[3].set(jnp.nan).at[6].set(jnp.inf)
    g, st2, info = es.tell(st, params, poisoned)
    assert int(info.num_nonfinite) == 2 and int(st2.generation) == 1
    assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(g))
    worst = jnp.min(raw.at[3].set(jnp.inf).at[6].set(jnp.inf))
    g_ref, _, _ = es.tell(st, params, raw.at[3].set(worst).at[6].set(worst))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    g0, _, _ = es.tell(st, params, jnp.full(8, jnp.nan))
    assert all(float(jnp.max(jnp.abs(l))) == 0.0 for l in jax.tree.leaves(g0))


def test_estimate_equals_fitness_then_tell(problem, es8):
    params, x = problem
    es = es8
    st = es.init(jax.random.key(4))
    g, st2, info = es.estimate(st, params, _fit, x)
    g2, _, _ = es.tell(st, params, es.fitness(st, params, _fit, x))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert jax.tree.structure(g) == jax.tree.structure(params) and int(st2.generation) == 1


@pytest.mark.parametrize("noise", ["normal", "rademacher", "table"])
def test_stored_noise_equals_regenerated(problem, noise, monkeypatch):
    """Keeping the forwards' draws for the update (store_noise='auto', the default without a
    mesh when they fit in STORE_NOISE_AUTO_BYTES) changes nothing, bit for bit: the update
    regenerating them gives the same gradient, with a lax.map over several chunks too."""
    from lrjax.es import eggroll as eggroll_lib
    params, x = problem
    kw = dict(rank=2, sigma=0.1, noise=noise, member_chunk=4, update_chunk=2, table_size=4096)
    st = Eggroll(16, **kw).init(jax.random.key(5))
    plans = Eggroll(16, **kw).plan(params)
    assert Eggroll(16, **kw)._stores_noise(plans)                           # the default: 'auto', small
    assert not Eggroll(16, store_noise=False, **kw)._stores_noise(plans)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("pop",))
    assert not Eggroll(16, mesh=mesh, **kw)._stores_noise(plans)            # a mesh regenerates
    monkeypatch.setattr(eggroll_lib, "STORE_NOISE_AUTO_BYTES", 0)
    assert not Eggroll(16, **kw)._stores_noise(plans)                       # too large: regenerate
    monkeypatch.undo()
    g1, _, i1 = Eggroll(16, **kw).estimate(st, params, _fit, x)
    g0, _, i0 = Eggroll(16, store_noise=False, **kw).estimate(st, params, _fit, x)
    np.testing.assert_array_equal(i1.fitness, i0.fitness)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_array_equal(a, b)


def test_normal_draw_is_jax_normal_unpartitioned():
    """The noise generator is ``jax.random.normal`` on non-partitionable threefry bits (same
    distribution, half the hashing), for odd sizes too."""
    from lrjax.es import noise as noise_lib
    k = jax.random.key(3)
    for n in (1, 11, 4096):
        with jax.threefry_partitionable(False):
            ref = jax.random.normal(k, (n,), jnp.float32)
        np.testing.assert_array_equal(noise_lib._normal(k, n, jnp.float32), ref)
    # the unrolled hash is jax's threefry_2x32 on the counters 0 .. size-1, word for word
    from jax.extend.random import threefry_2x32
    for n in (1, 2, 7, 64, 1001):
        for k0, k1 in ((0, 0), (12345, 0xDEADBEEF)):
            ref = threefry_2x32((jnp.uint32(k0), jnp.uint32(k1)), jnp.arange(n, dtype=jnp.uint32))
            np.testing.assert_array_equal(noise_lib._threefry_2x32_iota(np.uint32(k0), np.uint32(k1), n), ref)
    z = noise_lib._normal(k, 200_000, jnp.float32)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    s = noise_lib._rademacher(k, 200_001, jnp.float32)
    assert set(np.unique(np.asarray(s))) == {-1.0, 1.0} and abs(float(s.mean())) < 0.01


def test_table_noise_windows_and_estimate_against_numpy(problem):
    """noise='table': the table is jax.random.normal of key(TABLE_SEED); member i's unit noise
    (every leaf's block, flatten order) is the window table[o : o + size] with o the first threefry
    word of its index's key mod (table_size - size + 1); antithetic pairs mirror it; and the estimate
    equals the float64 NumPy sum 1/(N sigma) sum_i f_i E_i over those windows (shaping='none')."""
    from jax.extend.random import threefry_2x32
    params, x = problem
    n, rank, sigma, tsize = 8, 2, 0.1, 2048
    es = Eggroll(n, rank=rank, sigma=sigma, noise="table", table_size=tsize, shaping="none", maximize=False)
    key = jax.random.key(7)
    st = es.init(key)._replace(generation=jnp.int32(3))
    with jax.threefry_partitionable(False):
        ref_table = np.asarray(jax.random.normal(jax.random.key(0x7AB1E), (tsize,)))
    np.testing.assert_array_equal(es.table, ref_table)
    assert Eggroll(n).table is None
    plans = es.plan(params)
    size = sum(int(np.prod(((np.prod(pl.shape[:-2], dtype=int),) if len(pl.shape) > 2 else ())
                            + (pl.shape[-2] + pl.shape[-1], rank))) if pl.kind == "lowrank"
               else int(np.prod(pl.shape)) for pl in plans)
    f = np.asarray(es.fitness(st, params, _fit, x), np.float64)
    grad = {pl.path: np.zeros(pl.shape) for pl in plans}
    windows = []
    for i in range(n):
        j = i // 2
        kd = jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, 3), j))
        o = int(threefry_2x32((kd[0], kd[1]), jnp.zeros(2, jnp.uint32))[0]) % (tsize - size + 1)
        win = ref_table[o:o + size].astype(np.float64)
        nz = es.member_noise(st, params, i)
        sign = 1.0 if i % 2 == 0 else -1.0
        got = []
        for pl in plans:
            v = nz[pl.path]
            if pl.kind == "lowrank":
                np.testing.assert_allclose(float(v.scale), sign * sigma / np.sqrt(rank), rtol=1e-7)
                a, b = np.asarray(v.a, np.float64), np.asarray(v.b, np.float64)
                got.append(np.concatenate([a, b], axis=-2).ravel())
                e = np.einsum("...mr,...nr->...mn", a, b) / np.sqrt(rank)  # the leaf's own layout here
            else:
                got.append(np.asarray(v, np.float64).ravel() / (sign * sigma))
                e = got[-1].reshape(pl.shape)
            grad[pl.path] += f[i] * sign * e / (n * sigma)
        np.testing.assert_allclose(np.concatenate(got), win, rtol=1e-6, atol=1e-7, err_msg=f"member {i}")
        windows.append(o)
    assert len(set(windows)) == n // 2  # four distinct windows
    g, _, _ = es.tell(st, params, f.astype(np.float32))
    flat_g = {k: np.asarray(v) for k, v in zip([pl.path for pl in plans], jax.tree.leaves(g))}
    for pl in plans:
        np.testing.assert_allclose(flat_g[pl.path], grad[pl.path], rtol=2e-5, atol=1e-6, err_msg=pl.path)


def test_explicit_layers_and_pass_noise():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = PerturbedLinear(4, 8, rngs=rngs)
            self.l2 = PerturbedLinear(8, 2, rngs=rngs)

        def __call__(self, x, noise=None):
            noise = noise or {}
            return self.l2(jnp.tanh(self.l1(x, noise.get("l1"))), noise.get("l2"))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    x = jax.random.normal(jax.random.key(1), (3, 4))

    def call(p, x, noise=None):
        s = nnx.State(jax.tree.map(lambda v: v, state))
        nnx.replace_by_pure_dict(s, p)
        return nnx.merge(graphdef, s)(x, noise)

    es = Eggroll(6, rank=2, sigma=0.2)
    st = es.init(jax.random.key(2))
    f_thread = es.fitness(st, params, lambda p, nz, x: jnp.sum(call(p, x, nz)), x, pass_noise=True)
    f_interp = es.fitness(st, params, lambda p, x: jnp.sum(call(p, x)), x)
    np.testing.assert_allclose(f_thread, f_interp, rtol=1e-5, atol=1e-5)
    # functional pieces
    nz = es.member_noise(st, params, 1)["l1/kernel"]
    w = params["l1"]["kernel"]
    np.testing.assert_allclose(lowrank_dense(x, w, nz), x @ (w + nz.dense()), rtol=1e-5, atol=1e-6)
    kq = jax.random.normal(jax.random.key(5), (4, 2, 3))  # [embed, heads, head_dim]: matrix view 4 x 6
    nq = LowRankNoise(jnp.ones((4, 1)), jnp.arange(6.0)[:, None], jnp.float32(0.1))
    ref = jnp.einsum("bd,dhk->bhk", x, kq + nq.dense().reshape(4, 2, 3))
    np.testing.assert_allclose(lowrank_einsum("bd,dhk->bhk", x, kq, nq, path="attn/query/kernel"), ref,
                               rtol=1e-5, atol=1e-5)


def test_es_trains_a_regression():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (32, 4))
    y = x @ jax.random.normal(k[1], (4, 2))
    params = {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)}
    loss = lambda p, x, y: jnp.mean((x @ p["kernel"] + p["bias"] - y) ** 2)  # noqa: E731
    es = Eggroll(32, rank=1, sigma=0.05, shaping="centered_rank", maximize=False)
    st, opt = es.init(jax.random.key(3)), optax.adam(0.05)
    os_ = opt.init(params)
    l0 = float(loss(params, x, y))
    for _ in range(60):
        g, st, _ = es.estimate(st, params, loss, x, y)
        u, os_ = opt.update(g, os_, params)
        params = optax.apply_updates(params, u)
    assert float(loss(params, x, y)) < 0.2 * l0


def test_validation_errors(problem):
    params, x = problem
    with pytest.raises(ValueError, match="rank"):
        Eggroll(8, rank=0)
    with pytest.raises(ValueError, match="rank"):
        Eggroll(8, rank=-2)
    with pytest.raises(ValueError, match="population_size"):
        Eggroll(7)
    with pytest.raises(ValueError, match="population_size"):
        Eggroll(0)
    with pytest.raises(ValueError, match="sigma"):
        Eggroll(8, sigma=0.0)
    with pytest.raises(ValueError, match="shaping"):
        Eggroll(8, shaping="ranks")
    with pytest.raises(ValueError, match="member_chunk"):
        Eggroll(8, member_chunk=3)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("pop",))
    with pytest.raises(ValueError, match="must be even"):
        Eggroll(3, mesh=mesh)
    with pytest.raises(ValueError, match="member_chunk"):
        Eggroll(8, member_chunk=6)  # not a divisor of the population
    with pytest.raises(ValueError, match="axis_name"):
        Eggroll(8, mesh=mesh, axis_name="data")
    with pytest.raises(ValueError, match="store_noise"):
        Eggroll(8, mesh=mesh, store_noise=True)
    with pytest.raises(TypeError, match="store_noise"):
        Eggroll(8, store_noise="yes")
    assert Eggroll(8, store_noise="auto").store_noise == "auto"
    es = Eggroll(8, rank=1)
    st = es.init(jax.random.key(0))
    with pytest.raises(TypeError, match="fitness_fn cannot take"):
        es.estimate(st, params, _fit, jnp.ones((4, 6)))  # wrong input width
    with pytest.raises(ValueError, match="one scalar per member"):
        es.estimate(st, params, lambda p, x: _apply(p, x), x)
    with pytest.raises(TypeError, match="callable"):
        es.estimate(st, params, "not a function")
    with pytest.raises(ValueError, match="fitness must have shape"):
        es.tell(st, params, jnp.zeros(5))
    with pytest.raises(ValueError, match="targets"):
        Eggroll(8, targets="kernal").plan(params)
