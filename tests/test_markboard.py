"""Hot-Swap MarkBoard on a tiny MLP: 20 random signatures verify at 100% by swapping branches only;
sign = base + the selected branches' deltas (float64 check); resign equals sign; bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax.reparam.markboard import MarkBoard

D_IN, H, C = 12, 32, 4


def _mlp(p, x):
    return jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["out"]["kernel"] + p["out"]["bias"]


@pytest.fixture(scope="module")
def trained():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"fc1": {"kernel": jax.random.normal(k[0], (D_IN, H)) / np.sqrt(D_IN), "bias": jnp.zeros(H)},
              "out": {"kernel": jax.random.normal(k[1], (H, C)) / np.sqrt(H), "bias": jnp.zeros(C)}}
    x = jax.random.normal(k[2], (256, D_IN))
    y = jnp.argmax(x[:, :C], -1)  # a simple clean task
    mb = MarkBoard(bits=4, rp=lrjax.LoRA(rank=2, alpha=4.0))
    br = mb.init(jax.random.key(1), params)
    xt, lab = mb.triggers(jax.random.key(2), (D_IN,), C, size=8, low=-2.0, high=2.0, spread=0.2)
    br, losses = mb.train(jax.random.key(3), _mlp, params, br, xt, lab, x, y, steps=200, lr=1e-2, batch=64)
    return mb, params, br, xt, lab, x, y, losses


def test_twenty_random_signatures_verify(trained):
    mb, params, br, xt, lab, x, y, losses = trained
    assert float(losses[-20:].mean()) < float(losses[:20].mean())
    rng = np.random.default_rng(0)
    for _ in range(20):
        sig = rng.integers(0, 2, mb.bits)
        p = mb.sign(params, br, sig)
        bits = np.asarray(mb.verify(lambda q: _mlp(p, q), xt, lab))
        assert np.array_equal(bits, sig), (bits, sig)


def test_sign_is_base_plus_selected_deltas_and_resign_swaps(trained):
    mb, params, br, xt, lab, *_ = trained
    sig = np.array([1, 0, 0, 1])
    p = mb.sign(params, br, sig)
    rp = mb.rp
    for nm in ("fc1", "out"):
        want = np.asarray(params[nm]["kernel"], np.float64)
        for i, v in enumerate(sig):
            f = br[mb.name(i, int(v))][f"{nm}/kernel"]
            want = want + rp.scale * np.asarray(f["a"], np.float64) @ np.asarray(f["b"], np.float64)
        np.testing.assert_allclose(np.asarray(p[nm]["kernel"], np.float64), want, rtol=1e-5, atol=1e-6)
    new = np.array([0, 0, 1, 1])
    q = mb.resign(p, br, sig, new)
    direct = mb.sign(params, br, new)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(direct)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.asarray(mb.verify(lambda z: _mlp(q, z), xt, lab)), new)
    assert mb.resign(p, br, sig, sig) is p
    # jit with a traced signature: one compile for every signature
    f = jax.jit(lambda s: mb.sign(params, br, s))
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(sig))["fc1"]["kernel"]), np.asarray(p["fc1"]["kernel"]),
                               rtol=1e-5, atol=1e-6)


def test_bad_input(trained):
    mb, params, br, xt, lab, *_ = trained
    with pytest.raises(ValueError, match="signature"):
        mb.sign(params, br, [0, 1])
    with pytest.raises(ValueError, match="signature"):
        mb.sign(params, br, [0, 1, 2, 0])
    with pytest.raises(ValueError, match="branches"):
        mb.sign(params, {k: v for k, v in br.items() if k != "bit0/1"}, [0, 1, 1, 0])
    with pytest.raises(ValueError, match="bits"):
        MarkBoard(bits=0)
    with pytest.raises(TypeError, match="rp"):
        MarkBoard(rp="lora")
    with pytest.raises(ValueError, match="x_trig"):
        mb.verify(lambda z: z, xt[:2], lab[:2])
    with pytest.raises(ValueError, match="low"):
        mb.triggers(jax.random.key(0), (3,), 4, low=1.0, high=0.0)
