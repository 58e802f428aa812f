"""Per-layer GaLore (lrjax.optim.layerwise): equal to plain GaLore, lower compiled memory, MultiSteps, resume."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrjax.optim as lo
from lrjax import checkpoint
from lrjax.optim.layerwise import (LayerwiseState, _scan_leaves, layerwise_init, layerwise_step,
                                   layerwise_update)

from _stacks import scan_stack


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

TOL = dict(rtol=1e-5, atol=1e-6)   # float32 round-off of differently fused programs (amplified by the SVD)


def _mlp(width=32, layers=3, batch=4, seed=0):
    k = jax.random.split(jax.random.key(seed), layers + 2)
    params = {"layers": {str(i): {"kernel": jax.random.normal(k[i], (width, width)) / np.sqrt(width),
                                  "bias": jnp.zeros((width,))} for i in range(layers)}}
    x = jax.random.normal(k[-2], (batch, width))
    y = jax.random.normal(k[-1], (batch, width))

    def loss(p, x, y):
        h = x
        for i in range(layers):
            h = h @ p["layers"][str(i)]["kernel"] + p["layers"][str(i)]["bias"]
            if i < layers - 1:
                h = jax.nn.gelu(h)
        return jnp.mean((h - y) ** 2)
    return params, (x, y), loss


def _plain_step(loss, tx):
    def step(p, s, *a):
        l, g = jax.value_and_grad(loss)(p, *a)
        u, s = tx.update(g, s, p)
        return l, optax.apply_updates(p, u), s
    return step


def _galore(rank=4, gap=2, **kw):
    return optax.chain(lo.galore(optax.scale_by_adam(), rank, update_proj_gap=gap, targets="kernel", **kw),
                       optax.scale(-1e-2))


def _close(a, b, **tol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL))


def test_layerwise_equals_plain_galore_mlp_and_lower_compiled_memory():
    params, batch, loss = _mlp(width=16, layers=3, batch=8)
    tx = _galore(rank=2, gap=2)                          # refreshes at steps 0 and 2
    plain = jax.jit(_plain_step(loss, tx)).lower(params, tx.init(params), *batch).compile()
    s_lw = layerwise_init(tx, params)
    lw = jax.jit(layerwise_step(loss, tx)).lower(params, s_lw, *batch).compile()
    # memory: a refresh with one cond over all leaves (the random refreshes) holds every gradient
    # until the cond; per layer, the compiled step holds one layer's gradient at a time. (With an
    # exact refresh plain GaLore has one cond per matrix and XLA frees each gradient early too.)
    tx_sub = _galore(rank=2, gap=2, refresh="subspace")
    t_plain = jax.jit(_plain_step(loss, tx_sub)).lower(params, tx_sub.init(params), *batch).compile() \
        .memory_analysis().temp_size_in_bytes
    t_lw = jax.jit(layerwise_step(loss, tx_sub)).lower(params, layerwise_init(tx_sub, params), *batch).compile() \
        .memory_analysis().temp_size_in_bytes
    assert t_lw < t_plain - 16 * 16 * 4, (t_lw, t_plain)
    p1, s1, p2, s2 = params, tx.init(params), params, s_lw
    for _ in range(3):
        l1, p1, s1 = plain(p1, s1, *batch)
        l2, p2, s2 = lw(p2, s2, *batch)
        np.testing.assert_allclose(float(l1), float(l2), **TOL)
        _close(p1, p2)
    # the state of each leaf is the whole-tree state restricted to that leaf (bases, moments, count)
    g0 = s1[0]
    for i in range(3):
        leaf = s2.leaves["layers"][str(i)]["kernel"][0]
        np.testing.assert_allclose(np.asarray(leaf.basis["layers"][str(i)]["kernel"]),
                                   np.asarray(g0.basis["layers"][str(i)]["kernel"]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(leaf.inner.mu["layers"][str(i)]["kernel"]),
                                   np.asarray(g0.inner.mu["layers"][str(i)]["kernel"]), rtol=1e-4, atol=1e-5)
        assert int(leaf.count) == int(g0.count) == 3
    # the per-leaf math on given gradients is plain GaLore's (no backward involved; a refresh step:
    # the batched SVD of the plain path equals the per-leaf ones) up to an ulp
    g = jax.grad(loss)(params, *batch)
    u1, _ = jax.jit(tx.update)(g, tx.init(params), params)
    u2, _ = jax.jit(lambda g, s, p: layerwise_update(tx, g, s, p))(g, s_lw, params)
    _close(u1, u2, rtol=1e-6, atol=1e-9)


def test_layerwise_scan_stack_per_layer_equals_plain():
    m = scan_stack(16, length=3)
    x = _randn(1, (16, 16))
    y = _randn(2, (16, 16))
    params = m.init(jax.random.key(0), x)

    def loss(p, x, y):
        h = m.apply(p, x)
        return jnp.mean((h - y) ** 2), {"out_norm": jnp.linalg.norm(h)}
    # the [3, 16, 16] kernel is scanned over: it is tapped per layer inside the scan body
    flat = jax.tree_util.tree_leaves(params)
    closed = jax.make_jaxpr(lambda *ls: loss(jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params), ls), x, y)[0])(*flat)
    assert sorted(_scan_leaves(closed.jaxpr, len(flat))) == [0, 1]     # bias and kernel
    tx = _galore(rank=4, gap=2)
    plain = jax.jit(_plain_step(lambda p, x, y: loss(p, x, y)[0], tx))
    lw = jax.jit(layerwise_step(loss, tx, has_aux=True, scan_layers=True))
    p1, s1, p2, s2 = params, tx.init(params), params, layerwise_init(tx, params)
    for _ in range(3):
        l1, p1, s1 = plain(p1, s1, x, y)
        (l2, aux), p2, s2 = lw(p2, s2, x, y)
        np.testing.assert_allclose(float(l1), float(l2), **TOL)
        assert np.isfinite(float(aux["out_norm"]))
        _close(p1, p2)
    k_state = s2.leaves["params"]["blocks"]["fc"]["kernel"][0]
    assert k_state.basis["params"]["blocks"]["fc"]["kernel"].shape == (3, 16, 4) and int(k_state.count) == 3


def test_layerwise_multisteps_and_orbax_resume_exact(tmp_path):
    params, batch, loss = _mlp(width=16, layers=2, batch=8)
    tx = optax.MultiSteps(_galore(rank=2, gap=2), every_k_schedule=2).gradient_transformation()
    plain = jax.jit(_plain_step(loss, tx))
    lw = jax.jit(layerwise_step(loss, tx))
    p1, s1, p2, s2 = params, tx.init(params), params, layerwise_init(tx, params)
    saved = None
    for t in range(6):                        # 3 real updates, 2 refreshes (of accumulated gradients)
        _, p1, s1 = plain(p1, s1, *batch)
        _, p2, s2 = lw(p2, s2, *batch)
        _close(p1, p2)
        if t == 2:
            checkpoint.save_state(str(tmp_path / "ck"), 3, {"params": p2, "opt": s2})
            saved = (p2, s2)
    assert float(jnp.max(jnp.abs(p1["layers"]["0"]["kernel"] - params["layers"]["0"]["kernel"]))) > 0
    like = {"params": saved[0], "opt": saved[1]}
    back = checkpoint.restore_state(str(tmp_path / "ck"), 3, like=like)
    assert isinstance(back["opt"], LayerwiseState)
    p3, s3 = back["params"], back["opt"]
    for _ in range(3):
        _, p3, s3 = lw(p3, s3, *batch)
    for a, b in zip(jax.tree_util.tree_leaves((p2, s2)), jax.tree_util.tree_leaves((p3, s3))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))      # resume is bit-exact


def test_layerwise_bad_input():
    params, batch, loss = _mlp(width=8, layers=1)
    tx = _galore(rank=2)
    with pytest.raises(TypeError, match="loss_fn"):
        layerwise_step(3, tx)
    with pytest.raises(TypeError, match="tx"):
        layerwise_step(loss, None)
    with pytest.raises(TypeError, match="tx"):
        layerwise_init("adam", params)
    with pytest.raises(TypeError, match="has_aux"):
        layerwise_step(loss, tx, has_aux="yes")
    with pytest.raises(TypeError, match="scan_layers"):
        layerwise_step(loss, tx, scan_layers=1)
    with pytest.raises(TypeError, match="params"):
        layerwise_init(tx, {"n": jnp.arange(3)})
    with pytest.raises(ValueError, match="targets"):          # a pattern matching no leaf of the whole tree
        layerwise_init(optax.chain(lo.galore(optax.scale_by_adam(), 2, targets="nope")), params)
    step = layerwise_step(loss, tx)
    with pytest.raises(TypeError, match="state"):
        step(params, tx.init(params), *batch)
    with pytest.raises(TypeError, match="loss_fn"):
        layerwise_step(lambda p, x, y: jnp.zeros(3), tx)(params, layerwise_init(tx, params), *batch)
    with pytest.raises(TypeError, match=r"pair \(loss, aux\) with has_aux=True"):
        layerwise_step(loss, tx, has_aux=True)(params, layerwise_init(tx, params), *batch)
