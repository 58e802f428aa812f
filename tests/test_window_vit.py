"""lrjax.models.window_vit: windowed attention = dense attention with a block mask (float64 NumPy),
the gated enhanced-LoRA layer = its equation (float64 NumPy), the ViT under lrjax.LoRA/factored,
and bad input."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax.models.window_vit import (ADAPTER_TARGETS, ENHANCED_TRAINABLE, EnhancedLoRALinear, WindowViT,
                                     enhanced_lora_linear, window_attention)


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

def _np_masked_attention(q, k, v, wh, ww):
    """float64 dense attention over all H*W tokens with a block mask: token (i, j) sees (i', j') iff
    i // wh == i' // wh and j // ww == j' // ww."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, h, w, nh, dh = q.shape
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blk = (ii // wh * (w // ww) + jj // ww).reshape(-1)
    mask = blk[:, None] == blk[None, :]
    qf, kf, vf = (t.reshape(b, h * w, nh, dh) for t in (q, k, v))
    s = np.einsum("bphd,bqhd->bhpq", qf, kf) / np.sqrt(dh)
    s = np.where(mask, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhpq,bqhd->bphd", p, vf).reshape(b, h, w, nh, dh)


def _qkv(seed, shape, dtype=jnp.float32):
    rng = np.random.default_rng(seed)  # NumPy draws: no eager jax.random program per shape
    return [jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype) for _ in range(3)]


@pytest.mark.parametrize("grid,window", [((4, 6), (2, 3)), ((6, 6), 3), ((3, 3), 3), ((4, 4), 1)])
def test_window_attention_equals_block_masked_dense(grid, window):
    q, k, v = _qkv(0, (2, *grid, 2, 4))
    got = jax.jit(window_attention, static_argnums=3)(q, k, v, window)
    wh, ww = (window, window) if isinstance(window, int) else window
    np.testing.assert_allclose(np.asarray(got), _np_masked_attention(q, k, v, wh, ww), atol=2e-6, rtol=1e-5)


def test_window_attention_global_window_is_dense_and_bf16():
    q, k, v = _qkv(1, (1, 3, 3, 1, 4))
    dense = _np_masked_attention(q, k, v, 3, 3)
    np.testing.assert_allclose(np.asarray(window_attention(q, k, v, (3, 3))), dense, atol=2e-6)
    # a window-1 grid: every token sees only itself -> output = v
    np.testing.assert_allclose(np.asarray(window_attention(q, k, v, 1)), np.asarray(v), atol=1e-6)
    qb, kb, vb = (t.astype(jnp.bfloat16) for t in (q, k, v))
    out = window_attention(qb, kb, vb, 3)
    assert out.dtype == jnp.bfloat16
    ref = _np_masked_attention(*(t.astype(jnp.float32) for t in (qb, kb, vb)), 3, 3)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2)


def _np_enhanced(x, w, b, a, bb, g, r, s):
    x, w, a, bb = (np.asarray(t, np.float64) for t in (x, w, a, bb))
    y = x @ w + (0 if b is None else np.asarray(b, np.float64))
    lora = s * (x @ a @ bb)
    if g is not None:
        lora = lora / (1 + np.exp(-(x @ np.asarray(g, np.float64))))
    y = y + lora
    if r is not None:
        y = y + x @ np.asarray(r, np.float64)
    return y


@pytest.mark.parametrize("use_bias", [False, True])
def test_enhanced_lora_layer_equals_its_equation(use_bias):
    layer = EnhancedLoRALinear(6, 5, rank=2, use_bias=use_bias, rngs=nnx.Rngs(0))
    assert layer.scale == 2.0  # alpha defaults to 2 r (the paper's 32 / 16)
    # B = 0 at init (official), so give every factor a non-trivial value
    layer.lora_b[...] = _randn(1, (2, 5))
    if use_bias:
        layer.bias[...] = _randn(2, (5,))
    x = _randn(3, (3, 4, 6))
    got = layer(x)
    ref = _np_enhanced(x, layer.kernel[...], layer.bias[...] if use_bias else None, layer.lora_a[...],
                       layer.lora_b[...], layer.gate[...], layer.residual[...], 2.0)
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=1e-5)
    # official init: A, G, R ~ U(+-1/sqrt(in)) (G, R full rank), B = 0
    for name in ("lora_a", "gate", "residual"):
        p = np.asarray(getattr(layer, name)[...])
        assert np.all(np.abs(p) <= 1 / np.sqrt(6)) and np.std(p) > 0.1
    assert np.linalg.matrix_rank(np.asarray(layer.gate[...])) == 5
    # trainable parts of the option: r (in + out) + 2 in out
    n = sum(getattr(layer, k)[...].size for k in ("lora_a", "lora_b", "gate", "residual"))
    assert n == 2 * (6 + 5) + 2 * 6 * 5


def test_enhanced_pure_function_reduces_to_lora_and_grads():
    ks = jax.random.split(jax.random.key(4), 6)
    x, w = jax.random.normal(ks[0], (7, 4)), jax.random.normal(ks[1], (4, 3))
    a, b = jax.random.normal(ks[2], (4, 2)), jax.random.normal(ks[3], (2, 3))
    g, r = jax.random.normal(ks[4], (4, 3)), jax.random.normal(ks[5], (4, 3))
    plain = enhanced_lora_linear(x, w, None, a, b, None, None, 0.5)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(x) @ (np.asarray(w) + 0.5 * np.asarray(a @ b)),
                               atol=1e-5)
    # d y / d R = x (the full-rank residual is an ordinary linear map)
    f = lambda r_: jnp.sum(enhanced_lora_linear(x, w, None, a, b, g, r_, 0.5))  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.grad(f)(r)), np.tile(np.asarray(x).sum(0)[:, None], (1, 3)), atol=1e-5)
    yb = enhanced_lora_linear(x.astype(jnp.bfloat16), w, None, a, b, g, r, 0.5)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32),
                               _np_enhanced(x.astype(jnp.bfloat16).astype(jnp.float32), w, None, a, b, g, r, 0.5),
                               rtol=2e-2, atol=5e-2)


def test_residual_zeros_starts_at_base_and_gated_false_is_lora():
    layer = EnhancedLoRALinear(4, 4, rank=1, residual_init="zeros", rngs=nnx.Rngs(1))
    x = _randn(5, (2, 4))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x @ layer.kernel[...]), atol=1e-6)
    plain = EnhancedLoRALinear(4, 4, rank=1, gated=False, rngs=nnx.Rngs(1))
    assert plain.gate is None and plain.residual is None


def _jitted(model):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    return lambda x: f(state, x)


def _vit(windows=(3, (2, 6), 6), **kw):
    return WindowViT(5, patch=6, d_model=8, n_heads=2, d_ff=12, windows=windows, **kw, rngs=nnx.Rngs(0))


def test_vit_lora_factored_equals_materialized_and_targets():
    model = _vit(n_classes=4)
    graphdef, state = nnx.split(model)
    apply = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
    x = _randn(6, (3, 6, 6, 5))
    assert jax.eval_shape(apply, state, x).shape == (3, 4)
    rp = lrjax.LoRA(rank=2, targets=ADAPTER_TARGETS)
    base, ad = rp.init(jax.random.key(7), state)
    assert len(ad) == 3 * 6  # q, k, v, o, fc1, fc2 per block
    ad = jax.tree.map(lambda t: t + 0.05, ad)
    stats = lrjax.reparam.FactoredStats()
    got = jax.jit(lrjax.factored(apply, rp, stats=stats))(base, ad, x)
    want = jax.jit(lambda b, a, x: apply(rp.materialize(b, a), x))(base, ad, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert stats.factored == 18 and not stats.fallback


def test_vit_pooling_and_window_locality():
    model = _jitted(_vit(windows=(2,), pool="center"))  # one block of 2x2 windows: the centre token (3, 3) sees (2..3, 2..3)
    x = _randn(8, (1, 6, 6, 5))
    y = model(x)
    assert y.shape == (1, 8)
    far = x.at[0, 0, 0].add(5.0)  # outside the centre token's window: no effect
    np.testing.assert_allclose(np.asarray(model(far)), np.asarray(y), atol=1e-6)
    near = x.at[0, 2, 2].add(5.0)  # inside it
    assert float(jnp.max(jnp.abs(model(near) - y))) > 1e-3
    mean_model = _jitted(_vit(windows=(2,), pool="mean"))
    assert float(jnp.max(jnp.abs(mean_model(far) - mean_model(x)))) > 1e-4


def test_enhanced_vit_loads_plain_state_and_counts():
    plain = _vit()
    enh = _vit(enhanced_rank=2, enhanced_residual_init="zeros")
    _, ps = nnx.split(plain)
    g2, es = nnx.split(enh)
    pflat, eflat = lrjax.tree.flatten(ps), lrjax.tree.flatten(es)
    es = lrjax.tree.replace(es, {p: v for p, v in pflat.items() if p in eflat})
    x = _randn(9, (2, 6, 6, 5))
    # B = 0 and R = 0: the enhanced model starts at the plain model's function
    enh_out = jax.jit(lambda st, x: nnx.merge(g2, st)(x))(es, x)
    np.testing.assert_allclose(np.asarray(enh_out), np.asarray(_jitted(plain)(x)), atol=1e-5)
    trainable = {p: v for p, v in eflat.items() if re.fullmatch(ENHANCED_TRAINABLE, p)}
    per_block = 4 * (2 * (8 + 8) + 2 * 8 * 8) + 2 * (8 + 12) + 2 * 8 * 12 + 2 * (12 + 8) + 2 * 12 * 8
    assert sum(v.size for v in trainable.values()) == 3 * per_block


def test_bad_input():
    q, k, v = _qkv(2, (1, 4, 4, 1, 2))
    with pytest.raises(ValueError, match="window"):
        window_attention(q, k, v, 3)
    with pytest.raises(ValueError, match="k must"):
        window_attention(q, k[:, :2], v, 2)
    with pytest.raises(TypeError, match="q"):
        window_attention(np.ones((1, 4, 4, 1, 2), np.int32), k, v, 2)
    with pytest.raises(ValueError, match="q"):
        window_attention(q[0], k, v, 2)
    with pytest.raises(TypeError, match="window"):
        window_attention(q, k, v, 2.5)
    with pytest.raises(ValueError, match="windows"):
        WindowViT(5, patch=6, windows=(4,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_heads"):
        WindowViT(5, patch=6, d_model=9, n_heads=2, windows=(3,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pool"):
        WindowViT(5, patch=6, windows=(3,), pool="max", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="enhanced_rank"):
        WindowViT(5, patch=6, d_model=8, n_heads=2, windows=(3,), enhanced_rank=9, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must"):
        _vit()(jnp.ones((1, 6, 6, 4)))
    with pytest.raises(ValueError, match="residual_init"):
        EnhancedLoRALinear(4, 4, 1, residual_init="ones", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="gate"):
        enhanced_lora_linear(jnp.ones((2, 4)), jnp.ones((4, 3)), None, jnp.ones((4, 1)), jnp.ones((1, 3)),
                             jnp.ones((4, 1)), None, 1.0)
    with pytest.raises(ValueError, match="x must"):
        enhanced_lora_linear(jnp.ones((2, 5)), jnp.ones((4, 3)), None, jnp.ones((4, 1)), jnp.ones((1, 3)),
                             None, None, 1.0)
    with pytest.raises(TypeError, match="rngs"):
        WindowViT(5, patch=6, windows=(3,), rngs=0)
