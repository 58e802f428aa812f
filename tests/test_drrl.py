"""DR-RL: float64 checks of the rank-change perturbation identity (Eq. 8), the output bounds (Eq. 9 and
the spectra-only chain), exact attention at full rank, REINFORCE vs the exact gradient by enumeration,
transforms and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax.nn.attention import drrl
from lrjax.nn.attention.drrl import (attention, drrl_reward, lowrank_attention, output_bound, output_bound_from_spectra,
                                     perturbation_bound, policy_init, policy_logits, rank_actions, rank_change_norm,
                                     reinforce_loss, segment_features, truncate)


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

def _np_attn(q, k, v, causal):
    s = q @ k.T / np.sqrt(q.shape[1])
    if causal:
        s = np.where(np.tril(np.ones_like(s, bool)), s, -np.inf)
    p = np.exp(s - s.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True)
    return p, p @ v


def _np_trunc(x, r):
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def test_perturbation_identity_and_bounds_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        A = rng.normal(size=(7, 5))
        _, sig = truncate(jnp.asarray(A), 5)
        for r_from in range(6):
            for r_to in range(6):
                lhs = np.linalg.norm(_np_trunc(A, r_from) - _np_trunc(A, r_to))
                np.testing.assert_allclose(rank_change_norm(sig, r_to, r_from), lhs, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(rank_change_norm(sig, 2), np.linalg.norm(A - _np_trunc(A, 2)), rtol=1e-12)
        Ar, _ = truncate(jnp.asarray(A), 3)
        np.testing.assert_allclose(Ar, _np_trunc(A, 3), atol=1e-12)

        B, S, d = 4, 8, 6
        q, k, v = (rng.normal(size=(B, S, d)) * sc for sc in (2.0, 2.0, 1.0))
        for causal in (False, True):
            o_full = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal))
            ranks = jnp.array([0, 2, 4, 6])                             # a traced-style per-batch rank array
            o_r, sq, sk = lowrank_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), ranks, causal=causal)
            bound = np.asarray(output_bound_from_spectra(sq, sk, ranks, jnp.asarray(v), d_h=d))
            for b in range(B):
                r = int(ranks[b])
                p, o = _np_attn(q[b], k[b], v[b], causal)
                np.testing.assert_allclose(o_full[b], o, rtol=1e-12, atol=1e-12)
                pr, o_ref = _np_attn(_np_trunc(q[b], r), _np_trunc(k[b], r), v[b], causal)
                np.testing.assert_allclose(o_r[b], o_ref, rtol=1e-10, atol=1e-12)
                err = np.linalg.norm(o_r[b] - o_full[b])
                eq9 = float(output_bound(np.linalg.norm(pr - p, 2), jnp.asarray(v[b])))
                assert err <= eq9 * (1 + 1e-12) + 1e-12, (causal, r, err, eq9)        # Eq. 9
                assert eq9 <= bound[b] * (1 + 1e-12) + 1e-12, (causal, r, eq9, bound[b])  # spectra-only chain
                dS = np.linalg.norm((q[b] @ k[b].T - _np_trunc(q[b], r) @ _np_trunc(k[b], r).T) / np.sqrt(d))
                assert dS <= float(perturbation_bound(sq[b], sk[b], r, d)) * (1 + 1e-12) + 1e-12
            # full rank reproduces exact attention and has zero perturbation
            np.testing.assert_allclose(o_r[-1], o_full[-1], rtol=1e-10, atol=1e-12)
            assert bound[-1] == 0.0
        # reward (Eq. 12): alpha cos - beta flops/scale - gamma pert
        rew = drrl_reward(jnp.asarray(o_full), o_r, ranks, jnp.ones(B), d_h=d, beta=0.5, gamma=0.1,
                          flops_scale=2.0 * S * d * d)
        cos = [np.dot(o_full[b].ravel(), np.asarray(o_r[b]).ravel()) / np.linalg.norm(o_full[b]) /
               np.linalg.norm(o_r[b]) for b in range(B)]
        np.testing.assert_allclose(rew, np.array(cos) - 0.5 * np.asarray(ranks) / d - 0.1, rtol=1e-12)


def test_reinforce_matches_exact_gradient_by_enumeration():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        N, F, A = 3, 4, 5
        params = jax.tree.map(lambda x: x + 0.3 * jnp.asarray(rng.normal(size=x.shape)),
                              policy_init(jax.random.key(0), F, A, 6, dtype=jnp.float64))
        feats = jnp.asarray(rng.normal(size=(N, F)))
        R = jnp.asarray(rng.normal(size=(N, A)))

        def J(p):  # exact expected reward, mean over states
            return jnp.mean(jnp.sum(jax.nn.softmax(policy_logits(p, feats)) * R, -1))

        exact = jax.grad(J)(params)
        pi = np.asarray(jax.nn.softmax(policy_logits(params, feats)))
        grad1 = jax.jit(jax.grad(reinforce_loss), static_argnums=())
        for b in (0.0, 0.7):                                     # any constant baseline keeps it unbiased
            est = jax.tree.map(jnp.zeros_like, params)
            for n in range(N):
                for a in range(A):
                    g = grad1(params, feats[n:n + 1], jnp.array([a]), R[n:n + 1, a], b)
                    est = jax.tree.map(lambda e, gi: e + pi[n, a] * gi / N, est, g)
            for key in params:
                np.testing.assert_allclose(-est[key], exact[key], rtol=1e-10, atol=1e-13)


def test_causal_attention_matches_kvcache():
    """drrl.attention(causal=True) and kvcache.causal_attention share the masked softmax: same output."""
    from lrjax.nn.attention.kvcache import causal_attention
    q, k, v = _randn(3, (3, 2, 5, 4))
    ref = causal_attention(*(x.transpose(1, 0, 2)[None] for x in (q, k, v)))[0].transpose(1, 0, 2)
    np.testing.assert_allclose(attention(q, k, v, causal=True), ref, rtol=1e-6, atol=1e-6)


def test_drrl_transforms_features_and_bad_input():
    q = _randn(0, (2, 6, 4))
    f = jax.jit(lambda q, r: lowrank_attention(q, q, q, r)[0])
    o2 = f(q, jnp.array([2, 2]))
    np.testing.assert_allclose(o2, lowrank_attention(q, q, q, 2)[0], rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda q: jnp.sum(f(q, jnp.array([1, 3]))))(q))))
    ov = jax.vmap(lambda x: lowrank_attention(x, x, x, 3)[0])(q)
    np.testing.assert_allclose(ov, lowrank_attention(q, q, q, 3)[0], rtol=1e-5, atol=1e-6)
    ob, _, _ = lowrank_attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), 4)
    assert ob.dtype == jnp.bfloat16
    # zero input: finite everything (degenerate but valid)
    oz, sz, _ = lowrank_attention(jnp.zeros((5, 3)), jnp.zeros((5, 3)), jnp.zeros((5, 3)), 1)
    assert bool(jnp.all(jnp.isfinite(oz))) and float(perturbation_bound(sz, sz, 1, 3)) == 0.0
    feats = segment_features(q, jnp.array([0, 1]), 3)
    assert feats.shape == (2, 4 + 3)
    np.testing.assert_allclose(jnp.linalg.norm(feats[:, :4], axis=-1), 1.0, rtol=1e-5)
    assert rank_actions(16, 64) == (16, 24, 32, 40, 48, 56, 64)
    with pytest.raises(ValueError, match="rank"):
        lowrank_attention(q, q, q, 5)
    with pytest.raises(ValueError, match="rank"):
        truncate(q, jnp.array([1, 9]))
    with pytest.raises(ValueError, match="q and k"):
        lowrank_attention(q, q[:, :5], q, 2)
    with pytest.raises(ValueError, match="v must have"):
        attention(q, q, q[:, :5])
    with pytest.raises(ValueError, match="r_max"):
        rank_actions(8, 4)
    with pytest.raises(ValueError, match="flops_scale"):
        drrl_reward(q, q, 2, 0.0, d_h=4, flops_scale=0.0)
    with pytest.raises(TypeError, match="causal"):
        attention(q, q, q, causal=1)
    with pytest.raises(ValueError, match="sigma_q and sigma_k"):
        perturbation_bound(jnp.ones(3), jnp.ones(4), 1, 4)


def test_reinforce_options_and_log_features():
    """Entropy bonus = minus the exact mean policy entropy; normalize divides the advantage by its std
    (so the surrogate is invariant to the reward's affine scale); a state-dependent baseline is allowed;
    log features map the normalized spectrum to log(max(s, floor)) / log(1 / floor)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        N, F, A = 6, 4, 3
        params = jax.tree.map(lambda x: x + 0.3 * jnp.asarray(rng.normal(size=x.shape)),
                              policy_init(jax.random.key(1), F, A, 5, dtype=jnp.float64))
        feats = jnp.asarray(rng.normal(size=(N, F)))
        acts = jnp.asarray(rng.integers(0, A, N))
        R = jnp.asarray(rng.normal(size=N))
        b = jnp.asarray(rng.normal(size=N))
        p = np.asarray(jax.nn.softmax(policy_logits(params, feats)))
        lp = np.log(p[np.arange(N), np.asarray(acts)])
        H = -(p * np.log(p)).sum(-1).mean()
        adv = np.asarray(R - b)
        np.testing.assert_allclose(reinforce_loss(params, feats, acts, R, b, entropy=0.3),
                                   -np.mean(adv * lp) - 0.3 * H, rtol=1e-12)
        np.testing.assert_allclose(reinforce_loss(params, feats, acts, R, normalize=True),
                                   reinforce_loss(params, feats, acts, 5.0 * R + 2.0, normalize=True), rtol=1e-6)  # up to the 1e-8 eps
        np.testing.assert_allclose(reinforce_loss(params, feats, acts, R, normalize=True),
                                   -np.mean((np.asarray(R) - np.mean(R)) / (np.std(R) + 1e-8) * lp), rtol=1e-9)
        x = jnp.asarray(rng.normal(size=(2, 5, 3)))
        lin = np.asarray(segment_features(x, jnp.array([0, 1]), 2))
        lg = np.asarray(segment_features(x, jnp.array([0, 1]), 2, log=True, floor=1e-4))
        np.testing.assert_allclose(lg[:, :3], np.log(np.maximum(lin[:, :3], 1e-4)) / np.log(1e4), rtol=1e-10)
        np.testing.assert_array_equal(lg[:, 3:], lin[:, 3:])
    with pytest.raises(ValueError, match="entropy"):
        reinforce_loss(params, feats, acts, R, entropy=-1.0)
    with pytest.raises(TypeError, match="normalize"):
        reinforce_loss(params, feats, acts, R, normalize=1)
    with pytest.raises(ValueError, match="floor"):
        segment_features(x, jnp.array([0, 1]), 2, log=True, floor=2.0)


def test_out_of_range_actions_ranks_and_bounds_are_refused():
    """Concrete out-of-range ids and negative / non-integer ranks raise instead of giving an all-zero
    one-hot, the wrong action's log-probability, NaN or a reward above alpha."""
    x = _randn(0, (2, 6, 4))
    with pytest.raises(ValueError, match="prev_action"):
        drrl.segment_features(x, jnp.array([5, 0]), 3)
    with pytest.raises(TypeError, match="prev_action"):
        drrl.segment_features(x, jnp.array([1.7, 0.0]), 3)
    f = drrl.segment_features(x, jnp.array([1, 0]), 3)
    p = drrl.policy_init(jax.random.key(0), f.shape[-1], 3)
    for bad in (jnp.array([-1, 0]), jnp.array([3, 0])):
        with pytest.raises(ValueError, match="actions"):
            drrl.reinforce_loss(p, f, bad, jnp.ones(2))
    with pytest.raises(ValueError, match="actions"):
        drrl.reinforce_loss(p, f, jnp.array([0, 0, 1]), jnp.ones(3))
    o = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="rank"):
        drrl.drrl_reward(o, o, -3, 0.0, d_h=4)
    with pytest.raises(TypeError, match="rank"):
        drrl.drrl_reward(o, o, 2.5, 0.0, d_h=4)
    with pytest.raises(ValueError, match="delta_a_2norm"):
        drrl.output_bound(-1.0, o)
    with pytest.raises(TypeError, match="delta_a_2norm"):
        drrl.output_bound("2", o)
    with pytest.raises(ValueError, match="rank"):
        drrl.attention_flops(-1, 6, 4)
    assert float(drrl.attention_flops(2, 6, 4)) == 96.0
    assert float(drrl.attention_flops(np.int64(2), 6, 4)) == 96.0  # numpy integer scalars are ranks too
