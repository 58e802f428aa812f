"""Shared CPU fixture for the adapter studies: a digits MLP pretrained on the original task, then
fine-tuned on shifted versions of it.

* data: scikit-learn's 8x8 handwritten digits through :func:`lrjax.data.load` (``'digits'``,
  embedded, no network): 1438 training and 359 test images (every 5th row of ``load_digits()`` is
  test), pixels scaled to ``[0, 1]``, flattened to 64 features;
* model: MLP ``64-256-256-10`` with exact (erf) GELU between the layers, plain-dict params
  ``{"fc1", "fc2", "out": {"kernel": [in, out], "bias": [out]}}`` (the layout
  :func:`lrjax.interop.params_from_torch` gives for a torch model with ``Linear`` modules of these
  names; the GELU is torch's default ``nn.GELU()``, so a torch copy computes the same function);
* :func:`pretrain`: Adam 3e-3, batch 128, ``steps`` (default 200, a few seconds on 2 cores) on the
  original task; deterministic for a seed;
* :func:`task`: the shifted tasks ``TASKS``: ``rot90``/``rot180``/``rot270`` (the 8x8 image rotated
  counter-clockwise, ``np.rot90``), ``permute`` (labels mapped through a fixed derangement of 0..9),
  ``invert`` (pixel ``x -> 1 - x``), ``noise`` (additive Gaussian noise, sigma 0.5, fixed per
  image), and ``original``.

All functions are pure (the data are loaded once and cached). Used by
``experiments/bench_adapters.py``.
"""
from __future__ import annotations

import functools

import numpy as np

import jax
import jax.numpy as jnp
import optax

DIMS = (64, 256, 256, 10)
LAYERS = ("fc1", "fc2", "out")
TASKS = ("rot90", "rot180", "rot270", "permute", "invert", "noise")
#: the fixed label derangement of the ``permute`` task (no digit keeps its label)
PERMUTATION = np.array([3, 7, 0, 9, 5, 1, 8, 2, 4, 6], np.int32)
NOISE_SIGMA = 0.5


@functools.lru_cache(maxsize=None)
def _digits():
    from lrjax import data
    tr = data.as_arrays(data.load("digits", split="train"))
    te = data.as_arrays(data.load("digits", split="test"))
    return ((tr["image"].astype(np.float32) / 16.0, tr["label"].astype(np.int32)),
            (te["image"].astype(np.float32) / 16.0, te["label"].astype(np.int32)))


def _shift(name, img, lab, salt):
    if name == "original":
        x, y = img, lab
    elif name in ("rot90", "rot180", "rot270"):
        x, y = np.rot90(img, k=int(name[3:]) // 90, axes=(1, 2)), lab
    elif name == "permute":
        x, y = img, PERMUTATION[lab]
    elif name == "invert":
        x, y = 1.0 - img, lab
    elif name == "noise":
        rng = np.random.default_rng(1234 + salt)
        x, y = img + NOISE_SIGMA * rng.standard_normal(img.shape).astype(np.float32), lab
    else:
        raise ValueError(f"name: unknown task {name!r}; use one of {('original',) + TASKS}")
    return np.ascontiguousarray(x.reshape(len(x), 64), np.float32), np.asarray(y, np.int32)


@functools.lru_cache(maxsize=None)
def task(name: str):
    """``((x_train [1438, 64], y_train [1438]), (x_test [359, 64], y_test [359]))`` NumPy arrays
    (float32 pixels in ``[0, 1]`` before the shift, int32 labels) of task ``name`` (``'original'``
    or one of :data:`TASKS`)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a task name such as 'rot90', got {type(name).__name__}")
    (xtr, ytr), (xte, yte) = _digits()
    return _shift(name, xtr, ytr, 0), _shift(name, xte, yte, 1)


def init_params(seed: int = 0, dims=DIMS) -> dict:
    """Random params (``N(0, 1/fan_in)`` kernels, zero biases) of the MLP ``dims``."""
    keys = jax.random.split(jax.random.key(seed), len(dims) - 1)
    return {n: {"kernel": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a), "bias": jnp.zeros((b,), jnp.float32)}
            for n, k, a, b in zip(LAYERS, keys, dims[:-1], dims[1:])}


def forward(params, x):
    """Logits ``[B, 10]`` of the MLP on ``x: [B, 64]`` (exact GELU, as torch's ``nn.GELU()``)."""
    h = x
    for n in LAYERS[:-1]:
        h = jax.nn.gelu(h @ params[n]["kernel"] + params[n]["bias"], approximate=False)
    return h @ params[LAYERS[-1]]["kernel"] + params[LAYERS[-1]]["bias"]


def loss(params, x, y):
    """Mean softmax cross-entropy of ``forward(params, x)`` against integer labels ``y``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y))


def accuracy(params, x, y):
    """Fraction of ``argmax forward(params, x) == y``."""
    return jnp.mean(jnp.argmax(forward(params, x), -1) == y)


@functools.lru_cache(maxsize=None)
def _pretrain(seed, steps, lr, batch, dims):
    (xtr, ytr), _ = task("original")
    xtr, ytr = jnp.asarray(xtr), jnp.asarray(ytr)
    params = init_params(seed, dims)
    opt = optax.adam(lr)
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(len(xtr), batch, replace=False) for _ in range(steps)])

    @jax.jit
    def run(params, idx):
        def body(c, i):
            p, s = c
            g = jax.grad(loss)(p, xtr[i], ytr[i])
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), idx)
        return p

    return run(params, jnp.asarray(idx))


def pretrain(seed: int = 0, steps: int = 200, lr: float = 3e-3, batch: int = 128, dims=DIMS) -> dict:
    """The MLP trained on the original task (Adam ``lr``, ``steps`` minibatches of ``batch``);
    deterministic for ``seed`` (cached per argument tuple)."""
    return _pretrain(int(seed), int(steps), float(lr), int(batch), tuple(int(d) for d in dims))
