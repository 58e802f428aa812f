"""NOLA (lrjax.reparam.nola): the generator against a NumPy transcription, A_eff/B_eff and the
coefficient gradients against float64 NumPy, both official conventions, chunking, factored path,
seed regeneration in a fresh process on 8 devices, and bad input."""
import hashlib
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax.axes import Axes
from lrjax.reparam.nola import NOLA, nola_uniform

T, V = TypeError, ValueError
MASK = 0xFFFFFFFF


# ------------------------------------------------------------------ NumPy transcription
def _fmix(x):
    x = np.asarray(x, np.uint64) & MASK
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & MASK
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & MASK
    return x ^ (x >> 16)


def np_basis(seed, stream, p, q, i):
    """Basis ``i`` of stream ``stream``, shape ``[p, q]``, transcribed from the module docstring."""
    s0, s1 = int(seed[0]), int(seed[1])
    G = 0x9E3779B9
    h = int(_fmix((int(_fmix((p * G + q) & MASK)) + stream * G) & MASK))
    sa = int(_fmix((s0 + h) & MASK))
    sb = int(_fmix(s1 ^ sa))
    ka = int(_fmix((i * G + sa) & MASK))
    kb = int(_fmix((ka + sb) & MASK))
    e = np.arange(p * q, dtype=np.uint64)
    x = _fmix(((e ^ ka) + kb) & MASK)
    v = (x >> 9).astype(np.float64)
    return ((2 * v + 1) / 2.0 ** 23 - 1).reshape(p, q)


def np_factors(rp, seed, alpha, beta, m, n):
    """float64 ``A_eff [M, r]``, ``B_eff [r, N]`` and the scaled bases, from the paper's equations."""
    r = rp.rank
    ka, kb = len(alpha), len(beta)
    if rp.convention == "gpt":
        sa, sb = 1 / np.sqrt(ka), 1 / np.sqrt(kb)
        a0 = np_basis(seed, 0, m, r, 0) / np.sqrt(m)
    else:
        sa, sb = 1 / np.sqrt(m * r), 1 / np.sqrt(r * n)
        a0 = np.zeros((m, r))
    abar = np.stack([np_basis(seed, 1, m, r, i) * sa for i in range(ka)])
    bbar = np.stack([np_basis(seed, 2, r, n, j) * sb for j in range(kb)])
    a = a0 + np.einsum("i,imr->mr", np.asarray(alpha, np.float64), abar)
    b = np.einsum("j,jrn->rn", np.asarray(beta, np.float64), bbar)
    return a, b, abar, bbar


def _params(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(3), 2)
    return {"d0": {"kernel": jax.random.normal(k[0], (6, 5)).astype(dtype), "bias": jnp.zeros(5, dtype)},
            "d1": {"kernel": jax.random.normal(k[1], (5, 4)).astype(dtype), "bias": jnp.zeros(4, dtype)}}


def _fwd(p, x):
    return jnp.tanh(x @ p["d0"]["kernel"] + p["d0"]["bias"]) @ p["d1"]["kernel"] + p["d1"]["bias"]


def _randomize(ad, key=5, dtype=None):
    out = {}
    rng = np.random.default_rng(key)  # NumPy draws: no eager jax.random program per shape
    for p, f in ad.items():
        dt = dtype or f["alpha"].dtype
        out[p] = {"alpha": jnp.asarray(rng.standard_normal(f["alpha"].shape).astype(np.float32), dt),
                  "beta": jnp.asarray(rng.standard_normal(f["beta"].shape).astype(np.float32), dt), "seed": f["seed"]}
    return out


# ---------------------------------------------------------------------------- the generator
def test_generator_matches_numpy_transcription_bit_for_bit():
    seed = np.array([123456789, 3735928559], np.uint32)
    for stream, (p, q) in [(0, (6, 2)), (1, (7, 3)), (2, (2, 5))]:
        got = np.asarray(nola_uniform(seed, stream, (p, q), jnp.arange(4, dtype=jnp.uint32)))
        for i in range(4):
            np.testing.assert_array_equal(got[i], np_basis(seed, stream, p, q, i).astype(np.float32))
    u = np.asarray(nola_uniform(seed, 1, (64, 64), jnp.arange(4, dtype=jnp.uint32))).ravel()
    assert -1 < u.min() and u.max() < 1 and abs(u.mean()) < 0.02 and abs(u.var() - 1 / 3) < 0.01


# ----------------------------------------------------------------------- math vs float64 NumPy
@pytest.mark.parametrize("convention", ["gpt", "vit"])
def test_effective_factors_and_weight_match_float64_numpy(convention):
    rp = NOLA(rank=2, num_basis=(7, 5), convention=convention, chunk_size=3, alpha=3.0)
    p = _params()
    base, ad = rp.init(jax.random.key(0), p)
    ad = _randomize(ad)
    f = ad["d0/kernel"]
    a, b = jax.jit(lambda f: rp.effective_factors(6, 5, f))(f)
    ra, rb, _, _ = np_factors(rp, np.asarray(f["seed"]), np.asarray(f["alpha"]), np.asarray(f["beta"]), 6, 5)
    np.testing.assert_allclose(np.asarray(a), ra, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(b), rb, rtol=1e-5, atol=1e-6)
    eff = jax.jit(rp.materialize)(base, ad)["d0"]["kernel"]
    np.testing.assert_allclose(np.asarray(eff), np.asarray(p["d0"]["kernel"], np.float64) + 1.5 * ra @ rb,
                               rtol=1e-5, atol=1e-5)
    assert rp.scale == 1.5


def test_coefficient_gradients_are_frobenius_inner_products_with_the_bases():
    """dL/dalpha_i = <dL/dA_eff, Abar_i>_F, dL/dbeta_j = <dL/dB_eff, Bbar_j>_F, with dL/dW = R."""
    rp = NOLA(rank=2, num_basis=(6, 4), chunk_size=4)
    p = _params()
    base, ad = rp.init(jax.random.key(1), p)
    ad = _randomize(ad, 2)
    tr, fr = rp.split(ad)
    R = np.asarray(jax.random.normal(jax.random.key(9), (6, 5)), np.float64)
    g = jax.jit(jax.grad(lambda t: jnp.sum(rp.materialize(base, rp.join(t, fr))["d0"]["kernel"] * R)))(tr)
    g = g["d0/kernel"]
    f = ad["d0/kernel"]
    a, b, abar, bbar = np_factors(rp, np.asarray(f["seed"]), np.asarray(f["alpha"]), np.asarray(f["beta"]), 6, 5)
    s = rp.scale
    ga, gb = s * R @ b.T, s * a.T @ R  # dL/dA_eff, dL/dB_eff
    np.testing.assert_allclose(np.asarray(g["alpha"]), [np.sum(ga * x) for x in abar], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g["beta"]), [np.sum(gb * x) for x in bbar], rtol=1e-4, atol=1e-5)


def test_init_gpt_output_unchanged_vit_changed_as_official():
    p = _params()
    base, ad = NOLA(rank=2, num_basis=4).init(jax.random.key(0), p)
    eff = jax.jit(NOLA(rank=2, num_basis=4).materialize)(base, ad)
    np.testing.assert_array_equal(np.asarray(eff["d0"]["kernel"]), np.asarray(p["d0"]["kernel"]))
    assert float(jnp.abs(ad["d0/kernel"]["alpha"]).max()) == 0.0
    rp = NOLA(rank=2, num_basis=(4, 8), convention="vit")
    base, ad = rp.init(jax.random.key(0), p)
    np.testing.assert_allclose(np.asarray(ad["d1/kernel"]["alpha"]), 0.25)
    np.testing.assert_allclose(np.asarray(ad["d1/kernel"]["beta"]), 0.125)
    assert rp.scale == 0.5  # official NOLA2: 1 / rank
    d = np.asarray(jax.jit(rp.materialize)(base, ad)["d0"]["kernel"]) - np.asarray(p["d0"]["kernel"])
    assert np.abs(d).max() > 1e-4  # dW != 0 at init (documented)


def test_seeds_per_leaf_gpt_shared_vit_and_never_stored_bases():
    p = _params()
    key = jax.random.key(4)
    _, ad = NOLA(rank=2, num_basis=3).init(key, p)
    want = jax.random.key_data(jax.random.fold_in(key, zlib.crc32(b"d1/kernel") & 0x7FFFFFFF))
    np.testing.assert_array_equal(np.asarray(ad["d1/kernel"]["seed"]), np.asarray(want))
    assert set(ad["d0/kernel"]) == {"alpha", "beta", "seed"}  # no basis arrays
    _, adv = NOLA(rank=2, num_basis=3, convention="vit").init(key, p)
    for f in adv.values():
        np.testing.assert_array_equal(np.asarray(f["seed"]), np.asarray(jax.random.key_data(key)))
    # a raw uint32[2] key works too
    _, adr = NOLA(rank=2, num_basis=3).init(jax.random.PRNGKey(4), p)
    assert adr["d0/kernel"]["seed"].dtype == jnp.uint32


def test_chunked_equals_unchunked_values_and_grads():
    p = _params()
    # chunk 1: a scan of 11; 4: a scan of 2 plus a remainder of 3; 7: one chunk plus 4; 64: one chunk
    rps = [NOLA(rank=2, num_basis=(11, 7), chunk_size=c) for c in (1, 4, 7, 64)]
    base, ad = rps[0].init(jax.random.key(0), p)
    ad = _randomize(ad)
    tr, fr = rps[0].split(ad)

    def run(rp):
        def loss(t):
            q = rp.materialize(base, rp.join(t, fr))
            return jnp.sum(jnp.sin(q["d1"]["kernel"])), q["d0"]["kernel"]
        return jax.jit(jax.grad(loss, has_aux=True))(tr)
    res = [run(rp) for rp in rps]
    for g, o in res[1:]:
        np.testing.assert_allclose(np.asarray(o), np.asarray(res[0][1]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(g["d1/kernel"]["alpha"]), np.asarray(res[0][0]["d1/kernel"]["alpha"]),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_factored_path_equals_materialize(dtype):
    rp = NOLA(rank=2, num_basis=5, chunk_size=2)
    p = _params(dtype)
    base, ad = rp.init(jax.random.key(0), p)
    ad = _randomize(ad)
    assert ad["d0/kernel"]["alpha"].dtype == dtype
    x = jax.random.normal(jax.random.key(1), (3, 6)).astype(dtype)
    want = np.asarray(jax.jit(lambda b, a, x: _fwd(rp.materialize(b, a), x))(base, ad, x), np.float32)
    got = np.asarray(jax.jit(lrjax.factored(_fwd, rp))(base, ad, x), np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert jax.eval_shape(rp.materialize, base, ad)["d0"]["kernel"].dtype == dtype


def test_split_grad_sees_only_coefficients_and_num_params():
    rp = NOLA(rank=2, num_basis=(6, 3))
    p = _params()
    base, ad = rp.init(jax.random.key(0), p)
    tr, fr = rp.split(ad)
    assert rp.trainable_keys == ("alpha", "beta")
    assert all(set(t) == {"alpha", "beta"} for t in tr.values()) and all(set(f) == {"seed"} for f in fr.values())
    x = jnp.ones((2, 6))
    g = jax.jit(jax.grad(lambda t: jnp.sum(lrjax.factored(_fwd, rp)(base, rp.join(t, fr), x))))(tr)
    assert jax.tree.structure(g) == jax.tree.structure(tr)
    assert float(jnp.abs(g["d1/kernel"]["beta"]).max()) > 0  # A_0 != 0 carries the gradient into beta
    assert rp.num_params(ad) == 2 * (6 + 3)
    np.testing.assert_array_equal(np.asarray(jax.jit(rp.merge)(base, ad)["d0"]["kernel"]), np.asarray(p["d0"]["kernel"]))


def test_stacked_leaf_has_one_seed_per_layer_and_matches_per_matrix():
    ax = {"w": Axes(batch=(0,), inp=(1,), out=(2,))}
    rp = NOLA(rank=2, num_basis=4, targets="w", axes=ax, chunk_size=3)
    p = {"w": jax.random.normal(jax.random.key(0), (3, 5, 4))}
    base, ad = rp.init(jax.random.key(1), p)
    assert ad["w"]["seed"].shape == (3, 2) and ad["w"]["alpha"].shape == (3, 4)
    assert len({tuple(np.asarray(s)) for s in ad["w"]["seed"]}) == 3
    ad = _randomize(ad)
    eff = np.asarray(jax.jit(rp.materialize)(base, ad)["w"])
    one = jax.jit(lambda f: rp.effective_factors(5, 4, f))
    for l in range(3):
        a, b = one({k: v[l] for k, v in ad["w"].items()})
        np.testing.assert_allclose(eff[l], np.asarray(p["w"][l]) + np.asarray(a @ b), rtol=1e-5, atol=1e-5)
    assert rp.num_params(ad) == 3 * 8
    _, adv = NOLA(rank=2, num_basis=4, targets="w", axes=ax, convention="vit").init(jax.random.key(1), p)
    assert len({tuple(np.asarray(s)) for s in adv["w"]["seed"]}) == 1  # official: shared bases


def test_memory_is_bounded_by_the_chunk_not_by_k():
    """XLA's temporaries of a value-and-grad of one leaf: with chunked, rematerialized generation they
    stay far below the k x M x r bases (which a scan without jax.checkpoint would keep for the backward)."""
    m, n, r, k = 256, 256, 4, 512
    full = k * m * r * 4  # bytes of all A bases in float32 (2 MiB)
    p = {"w": jnp.zeros((m, n))}

    def temp(chunk):
        rp = NOLA(rank=r, num_basis=k, targets="w", chunk_size=chunk)
        base, ad = rp.init(jax.random.key(0), p)
        tr, fr = rp.split(ad)
        f = jax.value_and_grad(lambda t: jnp.sum(rp.materialize(base, rp.join(t, fr))["w"] ** 2))
        mem = jax.jit(f).lower(tr).compile().memory_analysis()
        if mem is None:  # pragma: no cover - backend without memory analysis
            pytest.skip("no memory_analysis on this backend")
        return mem.temp_size_in_bytes
    small, one = temp(8), temp(k)
    assert small < full / 3  # the dense [m, n] weight and its gradient are most of it
    assert one > full  # one chunk of all k bases holds them all


_CHILD = textwrap.dedent("""
    import hashlib, sys, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lrjax.axes import Axes
    from lrjax.reparam.nola import NOLA
    rp = NOLA(rank=2, num_basis=6, targets="w", axes={"w": Axes(batch=(0,), inp=(1,), out=(2,))}, chunk_size=4)
    params = {"w": jnp.zeros((8, 6, 5))}
    base, ad = rp.init(jax.random.key(7), params)
    f = {k: v.at[..., 0].set(1.0) if k != "seed" else v for k, v in ad["w"].items()}
    if len(jax.devices()) > 1:
        sh = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d"))
        f = jax.device_put(f, sh)
    a, b = jax.jit(lambda f: rp.effective_factors(6, 5, f))(f)
    print(len(jax.devices()), hashlib.sha256(np.asarray(f["seed"]).tobytes() + np.asarray(a).tobytes()
                                             + np.asarray(b).tobytes()).hexdigest())
    np.save(sys.argv[1], np.concatenate([np.asarray(a).ravel(), np.asarray(b).ravel()]))
""")


def test_bases_regenerate_identically_in_a_new_process_on_8_devices(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "c.npy")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ndev, digest = out.stdout.split()[-2:]
    assert ndev == "8"
    # the same computation here (one device, this process)
    rp = NOLA(rank=2, num_basis=6, targets="w", axes={"w": Axes(batch=(0,), inp=(1,), out=(2,))}, chunk_size=4)
    _, ad = rp.init(jax.random.key(7), {"w": jnp.zeros((8, 6, 5))})
    f = {k: v.at[..., 0].set(1.0) if k != "seed" else v for k, v in ad["w"].items()}
    a, b = jax.jit(lambda f: rp.effective_factors(6, 5, f))(f)
    # with alpha = beta = e_0, A_eff - A_0 and B_eff are single scaled bases: exact uint32 arithmetic
    here = np.concatenate([np.asarray(a).ravel(), np.asarray(b).ravel()])
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), here)
    mine = hashlib.sha256(np.asarray(f["seed"]).tobytes() + np.asarray(a).tobytes() + np.asarray(b).tobytes())
    assert mine.hexdigest() == digest


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,exc,name", [
    (dict(num_basis=0), V, "num_basis"),
    (dict(num_basis="8"), T, "num_basis"),
    (dict(num_basis=(4, 0)), V, r"num_basis\[1\]"),
    (dict(num_basis=(4, 2, 1)), V, "num_basis"),
    (dict(num_basis=2.0), T, "num_basis"),
    (dict(chunk_size=0), V, "chunk_size"),
    (dict(chunk_size=2.5), T, "chunk_size"),
    (dict(chunk_size=True), T, "chunk_size"),
    (dict(convention="bert"), V, "convention"),
    (dict(convention=None), T, "convention"),
    (dict(rank=0), V, "rank"),
])
def test_bad_config(kw, exc, name):
    with pytest.raises(exc, match=name):
        NOLA(**kw)


@pytest.mark.parametrize("edit,exc,match", [
    (lambda f: {**f, "seed": f["seed"].astype(jnp.float32)}, T, r"\['seed'\] must be raw PRNG key data"),
    (lambda f: {**f, "seed": f["seed"].astype(jnp.int32)}, T, r"\['seed'\] must be raw PRNG key data"),
    (lambda f: {**f, "seed": jnp.zeros((3,), jnp.uint32)}, T, r"\['seed'\] must be raw PRNG key data"),
    (lambda f: {**f, "seed": jnp.zeros((2, 2), jnp.uint32)}, V, r"\['seed'\] has shape"),
    (lambda f: {**f, "alpha": jnp.zeros(5)}, V, r"\['alpha'\] has shape .* k_a"),
    (lambda f: {**f, "beta": jnp.zeros((1, 3))}, V, r"\['beta'\] has shape"),
    (lambda f: {**f, "alpha": f["alpha"].astype(jnp.int32)}, T, r"\['alpha'\] has dtype"),
    (lambda f: {k: v for k, v in f.items() if k != "seed"}, V, "has no factor 'seed'"),
    (lambda f: {**f, "a": f["alpha"]}, V, "unknown factor 'a'"),
])
def test_bad_adapters(edit, exc, match):
    rp = NOLA(rank=2, num_basis=(4, 3))
    base, ad = rp.init(jax.random.key(0), _params())
    with pytest.raises(exc, match=match):
        rp.materialize(base, {**ad, "d0/kernel": edit(ad["d0/kernel"])})


def test_rank_above_leaf_refused_naming_rank():
    with pytest.raises(V, match="rank"):
        NOLA(rank=5, num_basis=4).init(jax.random.key(0), _params())


_S = np.array([1, 2], np.uint32)


@pytest.mark.parametrize("call,exc,name", [
    (lambda: nola_uniform(np.array([1, 2], np.int32), 1, (2, 2), [0]), T, "seed"),
    (lambda: nola_uniform(np.zeros(3, np.uint32), 1, (2, 2), [0]), T, "seed"),
    (lambda: nola_uniform("seed", 1, (2, 2), [0]), T, "seed"),
    (lambda: nola_uniform(_S, -1, (2, 2), [0]), V, "stream"),
    (lambda: nola_uniform(_S, 1.0, (2, 2), [0]), T, "stream"),
    (lambda: nola_uniform(_S, 1, (2, 0), [0]), V, r"shape\[1\]"),
    (lambda: nola_uniform(_S, 1, 4, [0]), T, "shape"),
    (lambda: nola_uniform(_S, 1, (2 ** 16, 2 ** 16), [0]), V, "shape"),
    (lambda: nola_uniform(_S, 1, (2, 2), [[0]]), V, "index"),
    (lambda: nola_uniform(_S, 1, (2, 2), jnp.zeros(2)), T, "index"),
])
def test_nola_uniform_bad_input(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
