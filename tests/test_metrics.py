"""lrjax.metrics against a float64 NumPy transcription of the HypeLoRA calibration formulas,
hand-computed cases, invariants, jit/x64, and bad input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import metrics as M


# ------------------------------------------------ float64 NumPy transcription (loops over bins)
def _eq_width_members(x, b, n_bins):
    lo, hi = np.linspace(0, 1, n_bins + 1)[b], np.linspace(0, 1, n_bins + 1)[b + 1]
    return ((x >= lo) if b == 0 else (x > lo)) & (x <= hi)


def np_ece(p, y, n_bins=10, worst=False):
    p = np.asarray(p, np.float64)
    conf, acc = p.max(1), (p.argmax(1) == y).astype(float)
    out = []
    for b in range(n_bins):
        m = _eq_width_members(conf, b, n_bins)
        if m.any():
            out.append((abs(conf[m].mean() - acc[m].mean()), m.mean()))
    if worst:
        return max([g for g, _ in out], default=0.0)
    return sum(g * w for g, w in out)


def np_cece(p, y, n_bins=10):
    p = np.asarray(p, np.float64)
    n, c = p.shape
    tot = 0.0
    for k in range(c):
        x, t = p[:, k], (y == k).astype(float)
        for b in range(n_bins):
            m = _eq_width_members(x, b, n_bins)
            if m.any():
                tot += m.sum() / (n * c) * abs(t[m].mean() - x[m].mean())
    return tot


def _np_adaptive(v, a, n_bins):
    o = np.argsort(v, kind="stable")
    v, a = v[o], a[o]
    n = len(v)
    if n == 0:
        return 0.0
    per = n // n_bins
    tot = 0.0
    for b in range(n_bins):
        s, e = b * per, (n if b == n_bins - 1 else (b + 1) * per)
        if e > s:
            tot += abs(v[s:e].mean() - a[s:e].mean()) * (e - s) / n
    return tot


def np_ace(p, y, n_bins=10):
    p = np.asarray(p, np.float64)
    return _np_adaptive(p.max(1), (p.argmax(1) == y).astype(float), n_bins)


def np_tace(p, y, thr, n_bins=10, official=False):
    p = np.asarray(p, np.float64)
    n, c = p.shape
    if official:  # the official layout: row-major probabilities, class-major labels
        v = p.reshape(-1)
        acc = (np.repeat(np.arange(c), n) == np.tile(y, c)).astype(float)
    else:
        v = p.reshape(-1)
        acc = (np.tile(np.arange(c), n) == np.repeat(y, c)).astype(float)
    keep = v >= thr
    return _np_adaptive(v[keep], acc[keep], n_bins)


def np_brier(p, y):
    p = np.asarray(p, np.float64)
    oh = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - oh) ** 2, 1)))


def _data(n, c, seed, conc=1.0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(c, conc), size=n).astype(np.float32)
    p = p / p.sum(1, keepdims=True)
    y = rng.integers(0, c, n).astype(np.int32)
    return p, y


CASES = [(1, 2, 0, 10, "sample_class"), (9, 3, 1, 3, "official"), (203, 10, 3, 10, "official"),
         (57, 4, 2, 4, "sample_class")]


@pytest.mark.parametrize("n,c,seed,nb,pairing", CASES)
def test_against_numpy_transcription(n, c, seed, nb, pairing):
    p, y = _data(n, c, seed, conc=0.3)
    r = M.calibration(p, y, n_bins=nb, pairing=pairing)  # one compiled kernel for every metric
    off = pairing == "official"
    want = {"ece": np_ece(p, y, nb), "mce": np_ece(p, y, nb, worst=True), "classwise_ece": np_cece(p, y, nb),
            "ace": np_ace(p, y, nb), "brier_score": np_brier(p, y),
            "thresholded_ace_01": np_tace(p, y, 0.01, nb, off), "thresholded_ace_001": np_tace(p, y, 0.001, nb, off),
            "thresholded_ace_0001": np_tace(p, y, 0.0001, nb, off)}
    assert set(r) == set(want)
    for k in want:
        np.testing.assert_allclose(r[k], want[k], atol=2e-6, err_msg=k)
    # the single-metric entry points agree with the report
    np.testing.assert_allclose(M.ece(p, y, n_bins=nb), r["ece"], atol=1e-7)
    np.testing.assert_allclose(M.thresholded_ace(p, y, threshold=0.3, n_bins=nb, pairing=pairing),
                               np_tace(p, y, 0.3, nb, off), atol=2e-6)


def test_x64_matches_numpy_tightly():
    p, y = _data(120, 4, 7)
    with jax.enable_x64(True):
        p64 = jnp.asarray(p.astype(np.float64) / p.astype(np.float64).sum(1, keepdims=True))
        y64 = jnp.asarray(y)
        r = M.calibration(p64, y64)
        assert all(v.dtype == jnp.float64 for v in r.values())
        np.testing.assert_allclose(r["ece"], np_ece(np.asarray(p64), y), rtol=1e-12)
        np.testing.assert_allclose(r["classwise_ece"], np_cece(np.asarray(p64), y), rtol=1e-12)
        np.testing.assert_allclose(r["ace"], np_ace(np.asarray(p64), y), rtol=1e-12)
        np.testing.assert_allclose(r["thresholded_ace_001"], np_tace(np.asarray(p64), y, 0.001), rtol=1e-12)
        np.testing.assert_allclose(r["brier_score"], np_brier(np.asarray(p64), y), rtol=1e-12)


def test_hand_computed_cases():
    # confidences .95, .55, .75, all right; bins (.9, 1], (.5, .6], (.7, .8]: gaps .05, .45, .25
    p = np.array([[0.95, 0.05], [0.55, 0.45], [0.25, 0.75]], np.float32)
    y = np.array([0, 0, 1], np.int32)
    np.testing.assert_allclose(M.ece(p, y), (0.05 + 0.45 + 0.25) / 3, atol=1e-6)
    np.testing.assert_allclose(M.mce(p, y), 0.45, atol=1e-6)
    np.testing.assert_allclose(M.brier(p, y), 2 * (0.05**2 + 0.45**2 + 0.25**2) / 3, atol=1e-6)
    # 3 samples, 10 bins: n // B = 0, every sample in the last bin: |mean conf - 1|
    np.testing.assert_allclose(M.ace(p, y), 1 - (0.95 + 0.55 + 0.75) / 3, atol=1e-6)
    # classwise: class 0 values .95 (y=0), .55 (y=0), .25 (y=1); class 1 the complements
    np.testing.assert_allclose(M.classwise_ece(p, y), 2 * (0.05 + 0.45 + 0.25) / 6, atol=1e-6)
    # the official docstring example: float32(0.6) > 0.6 (float64), so 0.6 shares bin (.6, .7]
    # with 0.7 as the official float64 comparison decides: MCE = |0.65 - 1| = .35, not .4
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], np.float32)
    np.testing.assert_allclose(M.mce(p, y), 0.35, atol=1e-6)
    np.testing.assert_allclose(M.mce(p, y), np_ece(p, y, worst=True), atol=1e-6)


def test_perfect_calibration_is_zero():
    # one-hot correct predictions: conf 1, acc 1 everywhere
    y = np.array([0, 2, 1, 1, 0], np.int32)
    p = np.eye(3, dtype=np.float32)[y]
    r = M.calibration(p, y)
    for k, v in r.items():
        assert float(v) == 0.0, k
    # conf 0.75 in one bin with exactly 3 of 4 right: ECE = MCE = ACE(n_bins=1) = 0
    # (a constant prediction equal to the class frequencies is also classwise calibrated)
    p = np.array([[0.75, 0.25]] * 4, np.float32)
    y = np.array([0, 0, 0, 1], np.int32)
    r = M.calibration(p, y, n_bins=1)
    for k in ("ece", "mce", "ace", "classwise_ece"):
        assert abs(float(r[k])) < 1e-7, k


def test_bin_edges_follow_float64_comparison():
    # float32(0.1) > 0.1 (float64): NumPy puts it in bin 1, not bin 0. Confidence 0.3 exactly-ish
    # values straddle bounds; the result must match the float64 transcription bin for bin.
    edges = np.linspace(0, 1, 11).astype(np.float32)
    conf = np.concatenate([edges, np.nextafter(edges, 1), np.nextafter(edges, 0)])
    conf = np.clip(conf, 0.5, 1.0).astype(np.float32)  # keep a valid top-label of 2 classes
    p = np.stack([conf, 1 - conf], 1).astype(np.float32)
    y = (np.arange(len(conf)) % 3 == 0).astype(np.int32)
    np.testing.assert_allclose(M.ece(p, y), np_ece(p, y), atol=1e-6)
    np.testing.assert_allclose(M.mce(p, y), np_ece(p, y, worst=True), atol=1e-6)
    np.testing.assert_allclose(M.classwise_ece(p, y), np_cece(p, y), atol=1e-6)
    # first bin is closed at 0
    p0 = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    np.testing.assert_allclose(M.classwise_ece(p0, np.array([0, 0], np.int32)),
                               np_cece(p0, np.array([0, 0])), atol=1e-7)


def test_official_tace_pairing_differs_and_matches_official_layout():
    p, y = _data(30, 3, 11)
    a = float(M.thresholded_ace(p, y, threshold=0.01))
    b = float(M.thresholded_ace(p, y, threshold=0.01, pairing="official"))
    assert abs(a - b) > 1e-3  # the two pairings are different statistics
    # threshold 0 and n_bins=1: |mean(p) - mean(acc)| over all n*C entries; the intended pairing has
    # mean acc = 1/C (one right class per sample), mean p = 1/C, so TACE = 0 exactly in exact math
    assert abs(float(M.thresholded_ace(p, y, threshold=0.0, n_bins=1))) < 1e-6
    # nothing above the threshold -> 0
    assert float(M.thresholded_ace(np.full((4, 2), 0.5, np.float32), np.zeros(4, np.int32),
                                   threshold=0.9)) == 0.0


def test_jit_and_bfloat16():
    p, y = _data(64, 5, 3)
    for fn in (M.ece, M.ace):
        j = jax.jit(functools.partial(fn, n_bins=7))
        np.testing.assert_allclose(j(jnp.asarray(p), jnp.asarray(y)), fn(p, y, n_bins=7), atol=1e-6)
    j = jax.jit(functools.partial(M.thresholded_ace, threshold=0.01, n_bins=4))
    np.testing.assert_allclose(j(p, y), np_tace(p, y, 0.01, 4), atol=2e-6)
    np.testing.assert_allclose(jax.jit(M.brier)(p, y), np_brier(p, y), atol=1e-6)
    pb = jnp.asarray(p, jnp.bfloat16)
    r = M.ece(pb, y)
    assert r.dtype == jnp.float32
    np.testing.assert_allclose(r, np_ece(np.asarray(pb.astype(jnp.float32)), y), atol=2e-6)


def test_bad_inputs():
    p, y = _data(6, 3, 0)
    with pytest.raises(TypeError, match="probs"):
        M.ece(p.tolist(), y)
    with pytest.raises(TypeError, match="probs"):
        M.ece(p.astype(np.int32), y)
    with pytest.raises(ValueError, match="probs"):
        M.ece(p[0], y)
    with pytest.raises(TypeError, match="labels"):
        M.ece(p, y.astype(np.float32))
    with pytest.raises(ValueError, match="labels"):
        M.ece(p, y[:5])
    with pytest.raises(ValueError, match="labels"):
        M.brier(p, np.array([0, 1, 2, 3, 0, 0], np.int32))
    with pytest.raises(ValueError, match="labels"):
        M.ace(p, np.array([0, 1, -1, 0, 0, 0], np.int32))
    q = p.copy()
    q[1, 1] = np.nan
    with pytest.raises(ValueError, match="probs.*NaN"):
        M.mce(q, y)
    with pytest.raises(ValueError, match="probs.*sum to 1"):
        M.ece(p * 1.01, y)
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\]"):
        M.ece(np.array([[1.5, -0.5]], np.float32), np.array([0], np.int32))
    M.ece(p * 1.01, y, atol=0.05)  # a looser tolerance admits it
    with pytest.raises(ValueError, match="atol"):
        M.ece(p, y, atol=0.0)
    with pytest.raises(ValueError, match="n_bins"):
        M.ece(p, y, n_bins=0)
    with pytest.raises(TypeError, match="n_bins"):
        M.ace(p, y, n_bins=2.0)
    with pytest.raises(ValueError, match="threshold"):
        M.thresholded_ace(p, y, threshold=1.5)
    with pytest.raises(ValueError, match="pairing"):
        M.thresholded_ace(p, y, pairing="transposed")
    with pytest.raises(ValueError, match="probs"):
        M.ece(np.zeros((0, 3), np.float32), np.zeros(0, np.int32))
