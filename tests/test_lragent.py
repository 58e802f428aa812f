"""LRAgent shared base + low-rank value cache (lrjax.nn.attention.lragent).

References: a float64 NumPy transcription of causal attention with the materialized per-agent
values ``V = X (W_v + s A_v B_v)`` (the order ``P (L B)``), and ``jax.nn.dot_product_attention``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax.nn.attention.lragent import (LRCache, cache_nbytes, init_lrcache, lragent_append, lragent_attention,
                                        lragent_cache, lragent_decode_step, lragent_prefill, materialize_values)

B, T, D, R = 2, 7, 16, 3


def _setup(h=4, hkv=4, dk=4, dv=4, seed=0, n_agents=3):
    ks = jax.random.split(jax.random.key(seed), 8)
    x = jax.random.normal(ks[0], (B, T, D))
    w_q = jax.random.normal(ks[1], (n_agents, D, h * dk)) / 3
    w_k = jax.random.normal(ks[2], (D, hkv * dk)) / 3
    w_v = jax.random.normal(ks[3], (D, hkv * dv)) / 3
    a_v = jax.random.normal(ks[4], (D, R)) / 3
    b_v = jax.random.normal(ks[5], (n_agents, R, hkv * dv))
    scale = jnp.asarray([2.0, 0.5, 1.5][:n_agents])
    q = jnp.einsum("btd,ndk->nbtk", x, w_q).reshape(n_agents, B, T, h, dk)
    return dict(x=x, q=q, w_k=w_k, w_v=w_v, a_v=a_v, b_v=b_v, scale=scale, h=h, hkv=hkv, dk=dk, dv=dv)


def _np_reference(q, x, w_k, w_v, a_v, b_v, s, hkv):
    """float64 causal attention with the per-agent value projection W_v + s A_v B_v materialized."""
    q, x, w_k, w_v, a_v, b_v = (np.asarray(t, np.float64) for t in (q, x, w_k, w_v, a_v, b_v))
    b, t, h, dk = q.shape
    k = (x @ w_k).reshape(b, t, hkv, dk)
    v = (x @ (w_v + s * a_v @ b_v)).reshape(b, t, hkv, -1)        # L B formed: the order P (L B)
    g = h // hkv
    out = np.zeros((b, t, h, v.shape[-1]))
    for hh in range(h):
        kv = hh // g
        sc = np.einsum("bqd,bkd->bqk", q[:, :, hh], k[:, :, kv]) / np.sqrt(dk)
        sc = np.where(np.tril(np.ones((t, t), bool)), sc, -np.inf)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, hh] = np.einsum("bqk,bkd->bqd", p, v[:, :, kv])
    return out


@pytest.mark.parametrize("h,hkv,dv", [(4, 4, 4), (4, 2, 4), (2, 2, 6)])
def test_reorder_matches_float64_materialized_reference(h, hkv, dv):
    """(P L) B == P (L B): LRAgent's output equals float64 attention over V_base + s L B."""
    c = _setup(h=h, hkv=hkv, dv=dv)
    for i in range(3):
        out, cache = lragent_prefill(c["q"][i], c["x"], c["w_k"], c["w_v"], c["a_v"], c["b_v"][i], c["scale"][i],
                                     num_heads=hkv)
        ref = _np_reference(c["q"][i], c["x"], c["w_k"], c["w_v"], c["a_v"], c["b_v"][i], float(c["scale"][i]), hkv)
        assert out.dtype == jnp.float32 and out.shape == (B, T, h, dv)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)
    # the materialized per-agent value cache read with b_v=None gives the same output
    vm = materialize_values(cache, c["b_v"][2], c["scale"][2])
    mat = lragent_attention(c["q"][2], cache._replace(v=vm), None, q_pos=0)
    np.testing.assert_allclose(np.asarray(mat), np.asarray(out), rtol=1e-5, atol=1e-5)


def test_single_agent_equals_ordinary_attention_with_merged_lora():
    c = _setup()
    s = 2.0
    out, _ = lragent_prefill(c["q"][0], c["x"], c["w_k"], c["w_v"], c["a_v"], c["b_v"][0], s, num_heads=4)
    k = (c["x"] @ c["w_k"]).reshape(B, T, 4, 4)
    v = (c["x"] @ (c["w_v"] + s * c["a_v"] @ c["b_v"][0])).reshape(B, T, 4, 4)
    ref = jax.nn.dot_product_attention(c["q"][0], k, v, is_causal=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # the adapter term matters: dropping it (base-only read) changes the output
    base, _ = lragent_prefill(c["q"][0], c["x"], c["w_k"], c["w_v"], c["a_v"], None, num_heads=4)
    assert float(jnp.max(jnp.abs(base - out))) > 1e-2


def test_decode_steps_equal_prefill_with_one_compile():
    c = _setup(h=4, hkv=2)
    args = (c["w_k"], c["w_v"], c["a_v"], c["b_v"][1], c["scale"][1])
    full, pcache = lragent_prefill(c["q"][1], c["x"], *args, num_heads=2, capacity=T + 2)
    cache = init_lrcache(B, T + 2, num_heads=2, head_dim=4, rank=R)
    traces = []

    def traced_step(*a):
        traces.append(1)  # runs once per trace, i.e. once per compiled program
        return lragent_decode_step(*a)

    step = jax.jit(traced_step)
    outs = []
    for t in range(T):
        o, cache = step(c["q"][1][:, t:t + 1], c["x"][:, t:t + 1], cache, *args)
        outs.append(o)
    assert len(traces) == 1  # one compiled step for every position
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert int(cache.pos) == T
    for name in ("k", "v", "l"):
        np.testing.assert_allclose(np.asarray(getattr(cache, name)), np.asarray(getattr(pcache, name)), atol=1e-6)


def test_chunked_append_and_unread_padding():
    c = _setup()
    args = (c["w_k"], c["w_v"], c["a_v"])
    full, _ = lragent_prefill(c["q"][0], c["x"], *args, c["b_v"][0], 2.0, num_heads=4)
    cache = lragent_cache(c["x"][:, :4], *args, num_heads=4, capacity=T + 3)
    # garbage in unfilled positions is never read
    cache = cache._replace(k=cache.k.at[:, 4:].set(7.0), v=cache.v.at[:, 4:].set(-5.0), l=cache.l.at[:, 4:].set(3.0))
    cache = lragent_append(cache, c["x"][:, 4:], *args)
    out = lragent_attention(c["q"][0][:, 4:], cache, c["b_v"][0], 2.0)  # q_pos defaults to pos - Tq = 4
    np.testing.assert_allclose(np.asarray(out), np.asarray(full[:, 4:]), rtol=1e-5, atol=1e-5)
    first = lragent_attention(c["q"][0][:, :4], cache, c["b_v"][0], 2.0, q_pos=0)
    np.testing.assert_allclose(np.asarray(first), np.asarray(full[:, :4]), rtol=1e-5, atol=1e-5)


def test_vmap_over_agents_with_shared_cache_and_grad():
    c = _setup()
    cache = lragent_cache(c["x"], c["w_k"], c["w_v"], c["a_v"], num_heads=4)
    attend = jax.jit(jax.vmap(lambda q, b, s: lragent_attention(q, cache, b, s, q_pos=0)))
    out = attend(c["q"], c["b_v"], c["scale"])
    for i in range(3):
        one = lragent_attention(c["q"][i], cache, c["b_v"][i], float(c["scale"][i]), q_pos=0)
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(one), rtol=1e-5, atol=1e-5)

    # gradients through the reordered product equal those of the materialized form
    def loss_lr(b, s, q):
        o = lragent_attention(q, cache, b, s, q_pos=0)
        return jnp.sum(jnp.sin(o))

    def loss_ref(b, s, q):
        k = (c["x"] @ c["w_k"]).reshape(B, T, 4, 4)
        v = (c["x"] @ (c["w_v"] + s * c["a_v"] @ b)).reshape(B, T, 4, 4)
        return jnp.sum(jnp.sin(jax.nn.dot_product_attention(q, k, v, is_causal=True)))

    g1 = jax.grad(loss_lr, argnums=(0, 1, 2))(c["b_v"][0], c["scale"][0], c["q"][0])
    g2 = jax.grad(loss_ref, argnums=(0, 1, 2))(c["b_v"][0], c["scale"][0], c["q"][0])
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_bfloat16_computes_in_float32_and_rounds_once():
    c = _setup()
    bf = {k: (v.astype(jnp.bfloat16) if isinstance(v, jax.Array) and k != "scale" else v) for k, v in c.items()}
    out, cache = lragent_prefill(bf["q"][0], bf["x"], bf["w_k"], bf["w_v"], bf["a_v"], bf["b_v"][0], 2.0,
                                 num_heads=4)
    assert out.dtype == jnp.bfloat16 and cache.k.dtype == cache.l.dtype == jnp.bfloat16
    # same float32 math on the bfloat16 cache, rounded once, is bitwise the bfloat16 result
    up = LRCache(cache.k.astype(jnp.float32), cache.v.astype(jnp.float32), cache.l.astype(jnp.float32), cache.pos)
    ref = lragent_attention(bf["q"][0].astype(jnp.float32), up, bf["b_v"][0].astype(jnp.float32), 2.0, q_pos=0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref.astype(jnp.bfloat16)))
    ref64 = _np_reference(c["q"][0], c["x"], c["w_k"], c["w_v"], c["a_v"], c["b_v"][0], 2.0, 4)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref64, rtol=0.05, atol=0.05)
    # a float32 LoRA B (as the official code keeps it) does not widen the output
    o32b = lragent_attention(bf["q"][0], cache, c["b_v"][0], 2.0, q_pos=0)
    assert o32b.dtype == jnp.bfloat16


def test_cache_bytes():
    c = _setup()
    cache = lragent_cache(c["x"], c["w_k"], c["w_v"], c["a_v"], num_heads=4)
    assert cache_nbytes(cache) == B * T * (16 + 16 + R) * 4 + 4  # K, V_base, L, pos
    assert cache_nbytes(init_lrcache(1, 5, num_heads=2, head_dim=3, rank=2, dtype=jnp.bfloat16)) == 5 * (6 + 6 + 2) * 2 + 4


def test_bad_inputs_name_the_argument():
    c = _setup()
    x, w_k, w_v, a_v = c["x"], c["w_k"], c["w_v"], c["a_v"]
    cache = lragent_cache(x, w_k, w_v, a_v, num_heads=4, capacity=T + 1)
    q = c["q"][0]
    with pytest.raises(TypeError, match="cache"):
        lragent_attention(q, {"k": cache.k}, None)
    with pytest.raises(ValueError, match="b_v"):
        lragent_attention(q, cache, jnp.zeros((R + 1, 16)))
    with pytest.raises(ValueError, match="q"):
        lragent_attention(q[:, :, :3], cache, None)
    with pytest.raises(ValueError, match="q_pos"):
        lragent_attention(q, cache, None, q_pos=3)
    with pytest.raises(ValueError, match="scale"):
        lragent_attention(q, cache, c["b_v"][0], jnp.ones(2))
    with pytest.raises(TypeError, match="scale"):
        lragent_attention(q, cache, c["b_v"][0], "2")
    with pytest.raises(TypeError, match="x"):
        lragent_cache(x.astype(jnp.int32), w_k, w_v, a_v, num_heads=4)
    with pytest.raises(ValueError, match="w_k"):
        lragent_cache(x, w_k, w_v, a_v, num_heads=3)
    with pytest.raises(ValueError, match="a_v"):
        lragent_cache(x, w_k, w_v, a_v[:5], num_heads=4)
    with pytest.raises(ValueError, match="capacity"):
        lragent_cache(x, w_k, w_v, a_v, num_heads=4, capacity=T - 1)
    with pytest.raises(ValueError, match="num_heads"):
        lragent_cache(x, w_k, w_v, a_v, num_heads=0)
    with pytest.raises(TypeError, match="dtype"):
        lragent_cache(x, w_k, w_v, a_v, num_heads=4, dtype=jnp.int32)
    with pytest.raises(ValueError, match="capacity"):
        lragent_append(cache, x[:, :2], w_k, w_v, a_v)
    with pytest.raises(ValueError, match="x"):
        lragent_decode_step(q[:, :2], x[:, :2], cache, w_k, w_v, a_v, None)
    with pytest.raises(TypeError, match="cache"):
        lragent_append(cache._replace(l=cache.l.astype(jnp.bfloat16)), x[:, :1], w_k, w_v, a_v)
    with pytest.raises(ValueError, match="rank"):
        init_lrcache(1, 4, num_heads=1, head_dim=2, rank=0)
