"""EGGROLL ask/tell for fitness computed outside JAX (issue 10, item 8), the sign of the returned
gradient (item 9) and the degenerate-population rules (item 5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax.es import Eggroll, shape_fitness

N, CHUNK = 16, 4


def _problem():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"l0": {"kernel": jax.random.normal(k[0], (5, 6)) * 0.5, "bias": jnp.zeros(6)},
              "head": jax.random.normal(k[1], (6, 2)) * 0.5}
    return params, jax.random.normal(k[2], (8, 5)), jax.random.normal(k[3], (8, 2))


PARAMS, X, Y = _problem()


def jax_fit(p, x, y):
    h = jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"])
    return -jnp.mean((h @ p["head"] - y) ** 2)


def numpy_fitness(pop):
    """The same function in NumPy float64, one member at a time (as a simulator would)."""
    pop = jax.tree.map(lambda v: np.asarray(v, np.float64), pop)
    x, y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    out = []
    for i in range(pop["head"].shape[0]):
        h = np.tanh(x @ pop["l0"]["kernel"][i] + pop["l0"]["bias"][i])
        out.append(-np.mean((h @ pop["head"][i] - y) ** 2))
    return np.array(out, np.float64)


def _leaves_close(a, b, rtol, atol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("shaping", ["z_score", "none"])
def test_ask_tell_numpy_equals_estimate(antithetic, shaping):
    es = Eggroll(N, rank=2, sigma=0.1, antithetic=antithetic, shaping=shaping, member_chunk=CHUNK)
    st = es.init(jax.random.key(1))
    g_est, st_est, info_est = es.estimate(st, PARAMS, jax_fit, X, Y)

    pop = es.ask(st, PARAMS)
    assert jax.tree.structure(pop) == jax.tree.structure(PARAMS)
    assert all(v.shape == (N, *p.shape) for v, p in zip(jax.tree.leaves(pop), jax.tree.leaves(PARAMS)))
    # chunked ask: the same members, chunk by chunk (a chunk of member_chunk members materialized)
    chunks = [es.ask(st, PARAMS, c) for c in range(es.num_chunks)]
    assert es.num_chunks == N // CHUNK and jax.tree.leaves(chunks[0])[0].shape[0] == CHUNK
    for a, b in zip(jax.tree.leaves(pop), jax.tree.leaves(jax.tree.map(lambda *c: jnp.concatenate(c), *chunks))):
        np.testing.assert_array_equal(a, b)
    f_np = np.concatenate([numpy_fitness(c) for c in chunks])
    assert f_np.dtype == np.float64 and f_np.shape == (N,)
    np.testing.assert_allclose(f_np, info_est.fitness, rtol=1e-5, atol=1e-6)

    g_tell, st_tell, info_tell = es.tell(st, PARAMS, f_np)
    assert int(st_tell.generation) == int(st_est.generation) == 1
    scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g_est))
    _leaves_close(g_tell, g_est, rtol=1e-3, atol=1e-4 * scale)
    # the same fitness values give the bit-identical update
    g_same, _, info_same = es.tell(st, PARAMS, info_est.fitness)
    for a, b in zip(jax.tree.leaves(g_same), jax.tree.leaves(g_est)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(info_same.weights, info_est.weights)
    # a Python list of floats works as well
    g_list, _, _ = es.tell(st, PARAMS, [float(v) for v in f_np])
    _leaves_close(g_list, g_tell, rtol=1e-6, atol=1e-7)


def test_ask_members_noise_and_member_params():
    es = Eggroll(N, rank=2, sigma=0.1, member_chunk=CHUNK)
    st = es.init(jax.random.key(2))
    pop = es.ask(st, PARAMS)
    sub = es.ask(st, PARAMS, members=[7, 0, 3])
    for a, b in zip(jax.tree.leaves(pop), jax.tree.leaves(sub)):
        np.testing.assert_array_equal(a[np.array([7, 0, 3])], b)
    # the noise is the noise estimate uses: bit-identical to member_noise, antithetic mirrors
    nz = es.ask(st, PARAMS, perturbation=True)
    for i in (0, 5):
        ref = es.member_noise(st, PARAMS, i)
        for a, b in zip(jax.tree.leaves(nz), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(a[i], b)
        _leaves_close(jax.tree.map(lambda v: v[i], pop), es.member_params(st, PARAMS, i), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(nz["l0/kernel"].a[4], nz["l0/kernel"].a[5])
    np.testing.assert_array_equal(nz["l0/kernel"].scale[4], -nz["l0/kernel"].scale[5])


def test_sign_raw_estimator_and_descent_direction():
    """shaping='none', maximize=False returns exactly 1/(N sigma) sum_i f_i E_i (the paper's raw
    estimator); maximize=True returns its negative; every shaping returns a descent gradient of
    the loss (-f when maximizing): params - lr * grad raises the fitness."""
    c = jnp.arange(12.0).reshape(3, 4) / 10 - 0.5
    params = {"w": jnp.zeros((3, 4))}
    f_lin = lambda p: jnp.sum(c * p["w"])  # noqa: E731  grad f = c
    n, sigma = 64, 0.2
    es_min = Eggroll(n, rank=1, sigma=sigma, shaping="none", maximize=False)
    st = es_min.init(jax.random.key(3))
    nz = es_min.ask(st, params, perturbation=True)["w"]
    E = jax.vmap(lambda a, b, s: s * a @ b.T)(nz.a, nz.b, nz.scale) / sigma  # E_i, [n, 3, 4]
    f = np.asarray(jax.vmap(lambda e: f_lin({"w": sigma * e}))(E))
    raw = jnp.einsum("i,imn->mn", f, E) / (n * sigma)
    g_min = es_min.estimate(st, params, f_lin)[0]["w"]
    np.testing.assert_allclose(g_min, raw, rtol=1e-5, atol=1e-6)
    g_max = Eggroll(n, rank=1, sigma=sigma, shaping="none", maximize=True).estimate(st, params, f_lin)[0]["w"]
    np.testing.assert_allclose(g_max, -raw, rtol=1e-5, atol=1e-6)
    assert float(jnp.vdot(g_min, c)) > 0  # grad of f itself
    for shaping in ("z_score", "centered_rank"):
        g = Eggroll(n, rank=1, sigma=sigma, shaping=shaping).estimate(st, params, f_lin)[0]["w"]
        assert float(jnp.vdot(g, c)) < 0  # maximize=True: grad of the loss -f
        assert float(f_lin({"w": params["w"] - 0.1 * g})) > float(f_lin(params))


@pytest.mark.parametrize("shaping", ["z_score", "centered_rank", "none"])
@pytest.mark.parametrize("antithetic", [True, False])
def test_all_equal_fitness_gives_zero_update_never_nan(shaping, antithetic):
    es = Eggroll(8, rank=2, sigma=0.1, shaping=shaping, antithetic=antithetic)
    st = es.init(jax.random.key(4))
    for value in (0.1, -3.0, 0.0):
        w = shape_fitness(jnp.full(8, value), shaping)
        assert bool(jnp.all(jnp.isfinite(w)))
        if shaping != "none":
            np.testing.assert_array_equal(w, np.zeros(8))
        g, _, info = es.tell(st, PARAMS, np.full(8, value))
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))
        if shaping != "none" or antithetic:  # 'none' without pairs is the raw estimator: f * sum E_i
            assert all(float(jnp.max(jnp.abs(v))) == 0.0 for v in jax.tree.leaves(g)), (shaping, value)


def test_centered_rank_ties_share_their_mean_rank():
    w = shape_fitness(jnp.array([1.0, 2.0, 2.0, 3.0]), "centered_rank", maximize=False)
    np.testing.assert_allclose(w, [-0.5, 0.0, 0.0, 0.5], atol=1e-7)


def test_population_one():
    for shaping in ("z_score", "centered_rank"):
        with pytest.raises(ValueError, match="population_size=1 has no spread"):
            Eggroll(1, antithetic=False, shaping=shaping)
    es = Eggroll(1, antithetic=False, shaping="none", rank=1, sigma=0.1)  # the raw one-sample estimator
    st = es.init(jax.random.key(0))
    g, _, _ = es.estimate(st, PARAMS, jax_fit, X, Y)
    assert any(float(jnp.max(jnp.abs(v))) > 0 for v in jax.tree.leaves(g))


def test_tell_fitness_rules():
    es = Eggroll(8, rank=2, sigma=0.1)
    st = es.init(jax.random.key(0))
    with pytest.raises(ValueError, match="fitness has finite values beyond"):
        es.tell(st, PARAMS, np.array([1e300] + [0.0] * 7))
    # NaN / inf: the documented rule (the worst finite fitness), counted in info
    f = np.linspace(0.0, 1.0, 8)
    g, _, info = es.tell(st, PARAMS, np.where(np.arange(8) == 2, np.nan, f))
    g_ref, _, _ = es.tell(st, PARAMS, np.where(np.arange(8) == 2, 0.0, f))
    assert int(info.num_nonfinite) == 1
    _leaves_close(g, g_ref, rtol=1e-6, atol=1e-7)
    g_int, _, _ = es.tell(st, PARAMS, np.arange(8))  # integer fitness is a real fitness
    g_flt, _, _ = es.tell(st, PARAMS, np.arange(8.0))
    _leaves_close(g_int, g_flt, rtol=0, atol=0)


def test_tell_under_jit():
    es = Eggroll(8, rank=2, sigma=0.1)
    st = es.init(jax.random.key(0))
    f = jnp.linspace(0.0, 1.0, 8)
    g_jit = jax.jit(lambda s, p, f: es.tell(s, p, f)[0])(st, PARAMS, f)
    _leaves_close(g_jit, es.tell(st, PARAMS, f)[0], rtol=1e-6, atol=1e-7)
