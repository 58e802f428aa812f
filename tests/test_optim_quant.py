"""lrjax.optim.quant: 8-bit block-wise quantized Adam moments (GaLore's inner optimizer)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrjax.optim import galore, nbytes
from lrjax.optim.quant import Quantized, dequantize, quantize, scale_by_adam_8bit


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def test_quantize_roundtrip_relative_error():
    x = _randn(0, (3, 300)) * jnp.logspace(-4, 0, 300)
    for signed, xx in ((True, x), (False, x * x)):
        q = jax.jit(quantize, static_argnames=("signed", "block_size"))(xx, signed=signed, block_size=128)
        assert q.codes.dtype == (jnp.int8 if signed else jnp.uint8) and q.codes.shape == (8, 128)
        back = jax.jit(dequantize, static_argnames=("shape", "signed"))(q, xx.shape, signed=signed)
        blockmax = jnp.pad(jnp.abs(xx).reshape(-1), (0, 124)).reshape(8, 128).max(1)
        rel = jnp.abs(back - xx) / jnp.abs(xx)
        in_range = (jnp.abs(xx).reshape(-1) > 1e-6 * jnp.repeat(blockmax, 128)[:900]).reshape(xx.shape)
        assert float(jnp.max(jnp.where(in_range, rel, 0.0))) < 0.07
        assert bool(jnp.all((jnp.sign(back) == jnp.sign(xx)) | (back == 0)))
    assert float(jnp.abs(dequantize(quantize(jnp.zeros(10), signed=True), (10,), signed=True)).max()) == 0.0


def test_8bit_galore_tracks_fp32_and_uses_a_quarter_of_the_bytes():
    k = jax.random.split(jax.random.key(1), 3)
    params = {"w": 0.3 * jax.random.normal(k[0], (64, 128)), "b": jnp.zeros(128)}
    x = jax.random.normal(k[1], (32, 64))
    y = jax.random.normal(k[2], (32, 128))
    loss = lambda p: jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2)  # noqa: E731

    def run(inner):
        opt = optax.chain(galore(inner, 16, update_proj_gap=10), optax.scale(-1e-2))
        p, s = params, opt.init(params)

        @jax.jit
        def step(p, s):
            l, g = jax.value_and_grad(loss)(p)
            u, s = opt.update(g, s)
            return optax.apply_updates(p, u), s, l
        ls = []
        for _ in range(20):
            p, s, l = step(p, s)
            ls.append(float(l))
        return np.array(ls), s

    l32, s32 = run(optax.scale_by_adam())
    l8, s8 = run(scale_by_adam_8bit(block_size=256, min_size=1024))
    assert l8[-1] < 0.9 * l8[0]
    np.testing.assert_allclose(l8, l32, rtol=0.03)
    mu = s8[0].inner.mu["w"]
    assert isinstance(mu, Quantized) and mu.codes.dtype == jnp.int8          # r x n = 16 x 128 quantized
    assert s8[0].inner.mu["b"].dtype == jnp.float32                          # small leaf kept in fp32
    q_bytes = nbytes(s8[0].inner.mu["w"]) + nbytes(s8[0].inner.nu["w"])
    assert q_bytes == 2 * (16 * 128 + 4 * (16 * 128 // 256))
    assert q_bytes / (nbytes(s32[0].inner.mu["w"]) + nbytes(s32[0].inner.nu["w"])) < 0.26


def test_8bit_argument_errors():
    with pytest.raises(ValueError, match="b1"):
        scale_by_adam_8bit(b1=1.0)
    with pytest.raises(ValueError, match="block_size"):
        scale_by_adam_8bit(block_size=0)
