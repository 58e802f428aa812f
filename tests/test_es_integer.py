"""Integer EGGROLL (lrjax.es.integer): the perturbed int8 forward and the integer update equal NumPy
integer references exactly; the noise is the documented pure function of (seed, generation, member,
leaf path); the threshold has its stated null rate; bad input is refused. (Bit-identity across 1 / 8
devices and 2 processes: tests/test_es_sharding.py, same child processes as the float checks.)"""
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from lrjax.es import integer as I
from lrjax.es.integer import IntEggroll, IntLowRankNoise, int_dense, int_embed, quantize, dequantize

ROOT = Path(__file__).resolve().parents[1]
V_, D, H = 10, 8, 12  # vocab, embedding, hidden


def _params():
    rng = np.random.default_rng(0)
    w = lambda *s: np.clip(np.round(rng.normal(size=s) * 16), -127, 127).astype(np.int8)  # noqa: E731
    return {"emb": w(V_, D), "l1": {"kernel": w(D, H), "bias": w(H)}, "out": {"kernel": w(H, V_)}}


def _model(p, nz, ids):
    """embed -> int_dense (bias) -> gated update of the embedding stream -> readout; int8 logits."""
    x = int_embed(ids, p["emb"], nz["emb"])
    h = int_dense(x, p["l1"]["kernel"], nz["l1"]["kernel"], p["l1"]["bias"])
    g = I.clip_int8(I.rshift((h[..., :D].astype(jnp.int32) + 127) * (x.astype(jnp.int32) - 3), 8))
    return int_dense(jnp.concatenate([g, h[..., D:]], -1), p["out"]["kernel"], nz["out"]["kernel"], out_shift=5)


# ------------------------------------------------------------------ NumPy reference (int64, checked in int32 range)
def _np_rshift(v, s):
    return v if s == 0 else (v + (1 << (s - 1))) >> s


def _np_clip(v):
    return np.clip(v, -127, 127)


def _i32(v):
    assert np.abs(v).max() < 2 ** 31, "int32 accumulator would overflow"
    return v


def _np_dense(x, w, nz, b=None, out_shift=None):
    m = w.shape[0]
    out_shift = 4 + int(round(np.log2(m) / 2)) if out_shift is None else out_shift
    acc = _i32(x.astype(np.int64) @ w.astype(np.int64))
    if nz is not None:
        a, bb, s = (np.asarray(t, np.int64) for t in nz)
        acc = _i32(acc + _np_rshift(_i32((x.astype(np.int64) @ a) @ bb.T), int(s)))
    y = _np_rshift(acc, out_shift)
    return _np_clip(y + (0 if b is None else b.astype(np.int64)))


def _np_model(p, nz, ids):
    a, b, s = (np.asarray(t, np.int64) for t in nz["emb"])
    x = _np_clip(p["emb"][ids].astype(np.int64) + _np_rshift(a[ids] @ b.T, int(s)))
    h = _np_dense(x, p["l1"]["kernel"], nz["l1"]["kernel"], p["l1"]["bias"])
    g = _np_clip(_np_rshift((h[..., :D] + 127) * (x - 3), 8))
    return _np_dense(np.concatenate([g, h[..., D:]], -1), p["out"]["kernel"], nz["out"]["kernel"], out_shift=5)


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def test_perturbed_forward_equals_numpy_integer_reference():
    p = _params()
    es = IntEggroll(8, rank=2, sigma_shift=5)
    st = es.init(jax.random.key(7))._replace(generation=jnp.int32(3))
    ids = np.array([[1, 4, 9, 0], [3, 3, 7, 2]])
    fwd = jax.jit(_model)
    for m in (4, 5):  # a mirrored pair
        p_i, n_i = es.member_inputs(st, p, m)
        got = fwd(p_i, n_i, ids)
        assert got.dtype == jnp.int8
        p_i, n_i = _np(p_i), _np(n_i)
        np.testing.assert_array_equal(np.asarray(got), _np_model(p_i, n_i, ids))
        # the full leaf (bias) is perturbed by rshift(s e1 e2, sigma_shift), inside [-127, 127]
        d = p_i["l1"]["bias"].astype(np.int64) - p["l1"]["bias"]
        assert 0 < np.abs(d).max() <= (46 * 46 + 16) >> 5 and np.abs(p_i["l1"]["bias"]).max() <= 127
        if m == 4:
            first = n_i
    # mirrored member: a negated, b shared; every entry comes from the noise table
    for k in ("emb",):
        np.testing.assert_array_equal(first[k].a, -n_i[k].a)
        np.testing.assert_array_equal(first[k].b, n_i[k].b)
        assert set(np.unique(first[k].b)) <= set(I.noise_table().tolist())
    # unperturbed forward (noise None everywhere) is the plain int8 network
    none = jax.tree.map(lambda _: None, p)
    np.testing.assert_array_equal(np.asarray(_model(p, none, ids)),
                                  _np_model(p, {"emb": (np.zeros((V_, 1)), np.zeros((D, 1)), 0),
                                                "l1": {"kernel": None}, "out": {"kernel": None}}, ids))


def test_noise_is_the_documented_function_of_seed_generation_member_path():
    """Bytes of threefry-2x32 (low byte first) under fold_in(fold_in(fold_in(seed, crc32(path)),
    generation), j) mapped through the table; the rows are A [M, r] then B [N, r]."""
    p = _params()
    es = IntEggroll(8, rank=2)
    st = es.init(jax.random.key(11))._replace(generation=jnp.int32(5))
    m, path = 7, "l1/kernel"
    k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(11), zlib.crc32(path.encode())), 5), m // 2)
    kd = np.asarray(jax.random.key_data(k))
    size = (D + H) * 2
    words = np.asarray(threefry_2x32((kd[0], kd[1]), jnp.arange(-(-size // 4), dtype=jnp.uint32)))
    u = ((words[:, None] >> np.array([0, 8, 16, 24], np.uint32)) & 255).reshape(-1)[:size]
    blk = I.noise_table()[u].reshape(D + H, 2)
    nz = es.member_noise(st, p, m)[path]
    np.testing.assert_array_equal(np.asarray(nz.a), -blk[:D])  # odd member: sign -1
    np.testing.assert_array_equal(np.asarray(nz.b), blk[D:])
    assert int(nz.shift) == 8
    # one member's noise does not depend on the other leaves (path-keyed): a bigger model, same leaf
    p2 = dict(p, extra=np.ones((5, 5), np.int8))
    np.testing.assert_array_equal(np.asarray(es.member_noise(st, p2, m)[path].a), np.asarray(nz.a))


def test_table_and_threshold_null_rate():
    t = I.noise_table().astype(np.int64)
    assert t.sum() == 0 and np.abs(t).max() == 46 and abs(np.mean(t * t) - 16 ** 2) < 10
    # under the null (random pair signs) a fraction ~alpha of the entries passes |Z| >= tau
    rng = np.random.default_rng(0)
    r, n, ent = 2, 64, 4000
    tab = I.noise_table().astype(np.int64)
    a = tab[rng.integers(0, 256, (n, ent, r))]
    b = tab[rng.integers(0, 256, (n, ent, r))]
    c = rng.choice([-1, 1], n)
    z = np.einsum("j,jer,jer->e", c, a, b)
    for alpha in (0.5, 0.1):
        rate = np.mean(np.abs(z) >= I.threshold(alpha, r, n))
        assert abs(rate - alpha) < 0.25 * alpha + 0.01, (alpha, rate)


def test_update_equals_numpy_integer_reference():
    p = _params()
    es = IntEggroll(8, rank=2, alpha=0.6, update_chunk=2, maximize=False)
    st = es.init(jax.random.key(2))
    fit = np.array([0.5, 0.2, 1.0, 1.0, np.nan, 0.1, -3.0, 2.0], np.float32)
    new, st2, info = es.tell(st, p, fit)
    assert int(st2.generation) == 1
    c = np.array([-1, 0, -1, 1])  # +1 where member 2j (+E) wins; minimizing: the smaller wins; NaN loses
    np.testing.assert_array_equal(np.asarray(info.pair_signs), c)
    tau_low, tau_full = es.thresholds()
    plans = es.plan(p)
    changed = 0
    for pl in plans:
        draw = jax.jit(lambda key, pl=pl: jax.vmap(lambda j: I._leaf_noise(pl, key, 0, j, 2, 1))(jnp.arange(4)))
        u1, u2 = (np.asarray(u) for u in draw(st.key))
        units = [(u1[j], u2[j]) for j in range(4)]
        if pl.kind == "lowrank":
            z = sum(c[j] * (units[j][0].astype(np.int64) @ units[j][1].astype(np.int64).T) for j in range(4))
            tau = tau_low
        else:
            z = sum(c[j] * units[j][0].astype(np.int64) * units[j][1] for j in range(4))
            tau = tau_full
        old = np.asarray(I.V.check_params(p)[pl.path]).astype(np.int64)
        want = _np_clip(old + np.where(np.abs(z) >= tau, np.sign(z), 0))
        got = np.asarray(I.V.check_params(new)[pl.path])
        assert got.dtype == np.int8
        np.testing.assert_array_equal(got, want, err_msg=pl.path)
        changed += int((want != old).sum())
    assert int(info.num_changed) == changed > 0 and int(info.num_nonfinite) == 1


def test_quantize_roundtrip_and_bad_input():
    w = {"k": jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)), jnp.float32), "b": jnp.zeros(5)}
    q, s = quantize(w)
    assert q["k"].dtype == jnp.int8 and int(jnp.abs(q["k"]).max()) == 127 and float(s["b"]) == 1.0
    assert float(jnp.abs(dequantize(q, s)["k"] - w["k"]).max()) <= float(s["k"]) / 2 + 1e-6
    es = IntEggroll(4)
    st = es.init(jax.random.key(0))
    fit = lambda p, n, x: jnp.float32(0)  # noqa: E731
    with pytest.raises(TypeError, match=r"params: leaf '[kb]' is float32.*quantize"):
        es.step(st, w, fit, 0)
    with pytest.raises(TypeError, match=r"params: leaf 'k' has dtype int32.*clip"):
        es.plan({"k": jnp.zeros((3, 3), jnp.int32)})
    with pytest.raises(ValueError, match=r"params: int8 leaf 'k' holds -128"):
        es.step(st, {"k": jnp.full((3, 3), -128, jnp.int8)}, fit, 0)
    with pytest.raises(ValueError, match="population_size"):
        IntEggroll(5)
    with pytest.raises(ValueError, match="alpha"):
        IntEggroll(4, alpha=0.0)
    with pytest.raises(ValueError, match=r"rank=8: leaf 'k'.*int32"):
        IntEggroll(4, rank=8).plan({"k": jnp.zeros((2048, 16), jnp.int8)})
    with pytest.raises(TypeError, match=r"^x must be int8.*quantize"):
        int_dense(jnp.zeros((2, 3)), jnp.zeros((3, 4), jnp.int8))
    with pytest.raises(TypeError, match="noise must be an IntLowRankNoise"):
        int_dense(jnp.zeros((2, 3), jnp.int8), jnp.zeros((3, 4), jnp.int8), (1, 2))
    bad = IntLowRankNoise(jnp.zeros((4, 1), jnp.int8), jnp.zeros((4, 1), jnp.int8), jnp.int32(0))
    with pytest.raises(ValueError, match=r"noise: a must be \[3, r\]"):
        int_dense(jnp.zeros((2, 3), jnp.int8), jnp.zeros((3, 4), jnp.int8), bad)
    with pytest.raises(ValueError, match="NaN"):
        quantize({"k": jnp.array([1.0, jnp.nan])})
    with pytest.raises(ValueError, match="fitness must have length"):
        es.tell(st, q, np.zeros(3))
    # -128 is refused on every call, also after a call on valid params compiled and cached the plan
    good, m128 = {"k": jnp.ones((3, 3), jnp.int8)}, {"k": jnp.ones((3, 3), jnp.int8).at[0, 0].set(-128)}
    es.step(st, good, fit, 0)
    for call in (lambda: es.step(st, m128, fit, 0), lambda: es.tell(st, m128, np.zeros(4)), lambda: es.plan(m128)):
        with pytest.raises(ValueError, match=r"params: int8 leaf 'k' holds -128"):
            call()
    with pytest.raises(ValueError, match=r"^frozen: pattern 'l1' matches no leaf"):
        IntEggroll(4, frozen="l1").plan({"l1": good})
    # int_dense / int_embed: a negative shift (the perturbation would vanish) and -128 inputs are refused
    x3, k34 = jnp.ones((2, 3), jnp.int8), jnp.ones((3, 4), jnp.int8)
    nz = IntLowRankNoise(jnp.ones((3, 1), jnp.int8), jnp.ones((4, 1), jnp.int8), jnp.int32(-2))
    with pytest.raises(ValueError, match=r"noise.shift must be in \[0, 30\].*-2"):
        int_dense(x3, k34, nz)
    with pytest.raises(TypeError, match="noise.shift must be an integer"):
        int_dense(x3, k34, nz._replace(shift=jnp.float32(2)))
    with pytest.raises(ValueError, match="^x holds -128"):
        int_dense(x3.at[0, 0].set(-128), k34)
    with pytest.raises(ValueError, match="^table holds -128"):
        int_embed(jnp.array([0]), k34.at[1, 1].set(-128))
    # documented: under jit the ids cannot be checked and JAX clamps them to the nearest row
    np.testing.assert_array_equal(np.asarray(jax.jit(int_embed)(jnp.array([7]), jnp.arange(12, dtype=jnp.int8).reshape(3, 4))),
                                  [[8, 9, 10, 11]])
    with pytest.raises(ValueError, match="^m must be an int >= 1"):
        I.default_out_shift(0)
    with pytest.raises(TypeError, match=r"^qparams: leaf '[kb]' is float32"):
        dequantize(w, s)
    with pytest.raises(ValueError, match=r"leaf 'k' has max\|w\| = 1e-40.*subnormal"):
        quantize({"k": np.array([1e-40, -1e-40], np.float32)})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float64 NumPy input: cast explicitly, no JAX truncation warning
        q64, s64 = quantize({"k": np.array([0.5, -1.0])})
    np.testing.assert_array_equal(np.asarray(q64["k"]), [64, -127])


def test_es_int8_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "es_int8.py"), "--quick", "--out", str(out),
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    res = json.loads((out / "es_int8.json").read_text())
    assert (out / "es_int8.png").stat().st_size > 0 and (out / "es_int8.md").stat().st_size > 0
    assert set(res["methods"]) == {"int8_eggroll", "float_eggroll", "backprop_adam"}
    for name, r in res["methods"].items():
        h = r["history"]
        assert len(h["wall_s"]) >= 2 and all(np.isfinite(h["heldout_bpc"])), name
        assert r["steps"] >= 1, name
    assert res["baselines"]["unigram_bpc"] < res["baselines"]["uniform_bpc"]
