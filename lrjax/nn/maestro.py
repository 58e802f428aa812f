"""Maestro: trainable low-rank layers with ordered dropout (Horvath et al., *Maestro: Uncovering
Low-Rank Structures via Trainable Decomposition*, ICML 2024, arXiv 2308.14929; official code
SamuelHorvath/Maestro-LoD @0003014a, ``maestro/layers/linear.py``, ``maestro/samplers/``,
``maestro/layers/utils.py``, ``cifar_mnist_main.py``, ``notebooks/linear_models.ipynb``).

**Layer.** A linear map is stored factorized with inner dimension ``d = min(d_in, d_out)``::

    W = U V^T,   U = [u_1 .. u_d]  [d_in, d],   V = [v_1 .. v_d]  [d_out, d]
    y = x W + b = (x U) V^T + b,   x [..., d_in] -> y [..., d_out]

in lrjax's ``[in, out]`` kernel orientation (``y = x @ kernel``). The official torch layer stores the
transpose: ``in_network.weight`` ``[d, d_in]`` is our ``U^T`` and ``out_network.weight`` ``[d_out, d]``
is our ``V``; its ``weight = out @ in`` ``[d_out, d_in]`` is our ``W^T``. A layer is the plain dict
``{"u": [d_in, d], "v": [d_out, d]}`` plus an optional ``"bias": [d_out]``; a network is a list (or
tuple) of such dicts.

**Nested truncation.** ``W_k = sum_{i<=k} u_i v_i^T = U[:, :k] V[:, :k]^T`` keeps the first ``k``
components (the official forward with ``p`` keeps ``ceil(d p)``). ``k`` is either a static Python
int (the factors are sliced: the cheap inference form) or an integer array (possibly traced, e.g.
drawn by :func:`sample_ranks` inside ``jax.jit``): then ``x U`` is multiplied by the 0/1 mask
``[i < k]`` (:func:`rank_mask`), one compiled program for every ``k``.

**Ordered dropout** (:func:`sample_ranks`). ``"per_layer"`` (the official ``SingleLayerSampler``,
used for the paper's results): every step truncates ONE layer ``i`` to ``j`` components and keeps
all others full; the official sampler enumerates all pairs ``(i, j)``, ``j = 1..d_i``, shuffles them
each epoch and takes one per step, so ``P(layer i) = d_i / sum_l d_l`` and ``j | i`` is uniform on
``1..d_i``. Here the pair is drawn i.i.d. from that same distribution with a JAX key (sampling with
replacement instead of per-epoch shuffling [ours]). ``"across_layers"`` (the official
``IndependentSampler``): every layer draws ``j_i`` uniformly from ``1..d_i``, independently.

**Hierarchical group lasso** (:func:`group_lasso`, the official ``_compute_lasso(hierarchical=True)``
used by ``cifar_mnist_main.py``)::

    in_k  = sqrt(sum_{j >= k} ||u_j||^2),   out_k = sqrt(sum_{j >= k} ||v_j||^2)
    lasso_k = in_k + out_k,   penalty = sum_layers sum_k lasso_k

(``hierarchical=False``: ``in_k = ||u_k||``, ``out_k = ||v_k||``). The square root has a
sub-gradient 0 at 0 here (the official code notes that zero-initialized factors give NaN
gradients; this one does not).

**Importance** (:func:`importance`): ``importance_k = in_k * out_k`` with the same norms. With
``hierarchical=False`` it is ``||u_k|| ||v_k||``, which equals ``sigma_k`` once the factors hold
the SVD with ``u_k = sqrt(sigma_k) a_k``, ``v_k = sqrt(sigma_k) b_k`` (the paper's recovery claim;
the official notebook reports this quantity). The hierarchical importance is non-increasing in
``k``, so the kept set is a prefix.

**Progressive shrinking** (:func:`shrink`): after every epoch keep the components with
``importance_k >= threshold`` (official default ``importance_threshold = 1e-5``), order preserved.
The official code masks the dropped components during training (to keep the optimizer's
buffers) and removes them at the end (``prune=True``); shapes are static under ``jax.jit``, so here
:func:`shrink` returns the smaller factors and the caller re-creates its optimizer state [ours].
At least ``min_rank`` (default 1) components are kept (the official layer may reach 0 and then
returns the bias alone; lrjax's rank rule is ``1 <= k <= min(d_in, d_out)``).

**Loss** (:func:`maestro_loss`, official ``train`` in ``cifar_mnist_main.py``)::

    L = CE(f(x), y) + CE(f_trunc(x), stop_gradient(softmax(f(x)))) + gp_lambda * penalty

(self-distillation of the sampled sub-network towards the full network; ``full_pass=False`` is the
official ``--no-full-pass``: ``CE(f_trunc(x), y) + gp_lambda * penalty``). Official defaults:
``gp_lambda = 5e-3`` (its LeNet script uses ``1e-6``), SGD momentum 0.9, weight decay 1e-4.

**Init.** :func:`init_layer` follows torch's ``nn.Linear`` default used by the official layer:
``U ~ Uniform(+-1/sqrt(d_in))``, ``V`` and ``bias ~ Uniform(+-1/sqrt(d))``. :func:`from_dense` is
the official ``decompose_linear``: ``W = A S B^T`` (thin SVD) -> ``U = A sqrt(S)``, ``V = B sqrt(S)``.

Dtypes: float32 and bfloat16 (and float16/float64) factors and inputs; the math runs in
``promote_types(x, U, V, float32)`` and is rounded once to ``result_type(x, U, V)``.

Bad input raises ``TypeError`` (wrong kind: a bool where an int goes, a non-array factor, a
non-key) or ``ValueError`` (``k`` outside ``1..d``, a negative ``threshold``, an unknown sampler
name, mismatched shapes), naming the argument, before tracing.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax._validation import (check_array, check_bool, check_choice, check_dtype, check_finite,
                               check_float, check_int, check_key, compute_dtype, is_concrete)

__all__ = ["SAMPLERS", "init_layer", "from_dense", "to_dense", "layer_rank", "truncate", "rank_mask",
           "maestro_linear", "sample_ranks", "group_lasso", "importance", "group_lasso_penalty",
           "shrink", "mlp_apply", "distillation_loss", "maestro_loss", "MaestroLinear"]

#: the ordered-dropout samplers (official ``--od-sampler`` names)
SAMPLERS = ("per_layer", "across_layers")


# ------------------------------------------------------------------------------------- checks
def _check_layer(layer, name: str = "layer") -> dict:
    if not isinstance(layer, dict) and not hasattr(layer, "keys"):
        raise TypeError(f"{name} must be a dict {{'u': [d_in, d], 'v': [d_out, d], 'bias': [d_out] (optional)}}, "
                        f"got {type(layer).__name__}")
    for k in ("u", "v"):
        if k not in layer:
            raise ValueError(f"{name} is missing the factor {k!r}; a Maestro layer is "
                             "{'u': [d_in, d], 'v': [d_out, d], 'bias': [d_out] (optional)} (see init_layer)")
    extra = sorted(set(layer.keys()) - {"u", "v", "bias"})
    if extra:
        raise ValueError(f"{name} has unknown entries {extra}; allowed: 'u', 'v', 'bias'")
    u = check_array(layer["u"], f"{name}['u']", ndim=2, kind="floating")
    v = check_array(layer["v"], f"{name}['v']", ndim=2, kind="floating")
    if u.shape[1] != v.shape[1]:
        raise ValueError(f"{name}['u'] {tuple(u.shape)} and {name}['v'] {tuple(v.shape)} must share the inner "
                         "dimension d (their last axis)")
    if u.shape[1] < 1:
        raise ValueError(f"{name} has inner dimension 0; a Maestro layer keeps at least one component")
    if u.shape[1] > min(u.shape[0], v.shape[0]):
        raise ValueError(f"{name} inner dimension d={u.shape[1]} exceeds min(d_in, d_out) = "
                         f"{min(u.shape[0], v.shape[0])}; d = min(d_in, d_out) at most")
    if "bias" in layer and layer["bias"] is not None:
        b = check_array(layer["bias"], f"{name}['bias']", ndim=1, kind="floating")
        if b.shape[0] != v.shape[0]:
            raise ValueError(f"{name}['bias'] must have shape ({v.shape[0]},) (d_out), got {tuple(b.shape)}")
    return layer


def _check_layers(layers, name: str = "layers") -> list:
    if isinstance(layers, dict) or not isinstance(layers, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of Maestro layer dicts (a single layer: wrap it as "
                        f"[layer]), got {type(layers).__name__}")
    if not layers:
        raise ValueError(f"{name} is empty; pass at least one Maestro layer")
    for i, lay in enumerate(layers):
        _check_layer(lay, f"{name}[{i}]")
    for i in range(len(layers) - 1):
        if layers[i]["v"].shape[0] != layers[i + 1]["u"].shape[0]:
            raise ValueError(f"{name}[{i}] outputs {layers[i]['v'].shape[0]} features but {name}[{i + 1}] takes "
                             f"{layers[i + 1]['u'].shape[0]}; consecutive layers must chain")
    return list(layers)


def _is_int_array(k) -> bool:
    return isinstance(k, (jax.Array, np.ndarray, jax.core.Tracer)) and not isinstance(k, np.bool_)


def _check_k(k, d: int, name: str = "k"):
    """``None``, a Python int in ``1..d`` (static) or an integer array scalar (mask form)."""
    if k is None:
        return None
    if _is_int_array(k):
        if jnp.issubdtype(k.dtype, jnp.bool_) or not jnp.issubdtype(k.dtype, jnp.integer):
            raise TypeError(f"{name} must be an int or an integer array, got an array of dtype {k.dtype}")
        if k.ndim != 0:
            raise ValueError(f"{name} must be a scalar (shape ()), got shape {tuple(k.shape)}")
        if is_concrete(k):
            kv = int(np.asarray(k))
            if not 1 <= kv <= d:
                raise ValueError(f"{name} must be in 1..{d} (the layer's inner dimension d), got {kv}")
        return k
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an int in 1..{d} or an integer jax array, got {k!r} ({type(k).__name__})")
    kv = int(k)
    if not 1 <= kv <= d:
        raise ValueError(f"{name} must be in 1..{d} (the layer's inner dimension d = min(d_in, d_out) after "
                         f"shrinking), got {kv}; lower {name}")
    return kv


def _out_dtype(*arrays):
    return jnp.result_type(*[a.dtype for a in arrays])


def _safe_sqrt(s):
    """sqrt with value 0 and gradient 0 at s = 0 (never NaN)."""
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


# ------------------------------------------------------------------------------------- layers
def init_layer(key, in_features: int, out_features: int, *, use_bias: bool = True, dtype=jnp.float32) -> dict:
    """A fresh Maestro layer ``{"u": [in, d], "v": [out, d], "bias": [out]}``, ``d = min(in, out)``.

    torch's ``nn.Linear`` default as in the official layer: ``u ~ U(+-1/sqrt(in_features))``,
    ``v, bias ~ U(+-1/sqrt(d))``. Errors: ``key`` not a PRNG key (TypeError), feature counts not
    ints >= 1, ``use_bias`` not a bool, ``dtype`` not floating."""
    key = check_key(key, "key")
    din = check_int(in_features, "in_features", low=1)
    dout = check_int(out_features, "out_features", low=1)
    use_bias = check_bool(use_bias, "use_bias")
    dtype = check_dtype(dtype, "dtype")
    d = min(din, dout)
    ku, kv, kb = jax.random.split(key, 3)
    bu, bv = 1.0 / math.sqrt(din), 1.0 / math.sqrt(d)
    layer = {"u": jax.random.uniform(ku, (din, d), jnp.float32, -bu, bu).astype(dtype),
             "v": jax.random.uniform(kv, (dout, d), jnp.float32, -bv, bv).astype(dtype)}
    if use_bias:
        layer["bias"] = jax.random.uniform(kb, (dout,), jnp.float32, -bv, bv).astype(dtype)
    return layer


def from_dense(kernel, bias=None) -> dict:
    """The official ``decompose_linear``: a Maestro layer holding the SVD of a trained kernel.

    ``kernel``: ``[d_in, d_out]`` floating (lrjax orientation, ``y = x @ kernel``), finite when
    concrete; ``kernel = A diag(S) B^T`` (thin SVD, ``S`` descending) gives ``u = A sqrt(S)``
    ``[d_in, d]``, ``v = B sqrt(S)`` ``[d_out, d]`` (so ``to_dense(from_dense(W)) == W`` and
    ``truncate(., k)`` is the best rank-``k`` approximation). The SVD runs in float32 (or wider) and
    the factors are rounded to ``kernel.dtype``; ``bias`` ``[d_out]`` is copied. Errors: ValueError
    naming ``kernel`` for an empty axis or (concrete) NaN/Inf entries."""
    kernel = check_array(kernel, "kernel", ndim=2, kind="floating")
    if min(kernel.shape) < 1:
        raise ValueError(f"kernel has shape {tuple(kernel.shape)}; a Maestro layer needs d_in >= 1 and "
                         "d_out >= 1 (it keeps d = min(d_in, d_out) >= 1 components)")
    check_finite(kernel, "kernel")
    ct = compute_dtype(kernel.dtype)
    a, s, bt = jnp.linalg.svd(kernel.astype(ct), full_matrices=False)
    r = jnp.sqrt(s)
    layer = {"u": (a * r).astype(kernel.dtype), "v": (bt.T * r).astype(kernel.dtype)}
    if bias is not None:
        bias = check_array(bias, "bias", ndim=1, kind="floating")
        if bias.shape[0] != kernel.shape[1]:
            raise ValueError(f"bias must have shape ({kernel.shape[1]},) (d_out), got {tuple(bias.shape)}")
        layer["bias"] = bias
    return layer


def layer_rank(layer) -> int:
    """The layer's current inner dimension ``d`` (the number of components; shrinks with :func:`shrink`)."""
    return int(_check_layer(layer)["u"].shape[1])


def truncate(layer, k: int) -> dict:
    """The layer with its first ``k`` components, ``u[:, :k]``, ``v[:, :k]`` (static ``k`` in
    ``1..d``; the bias is kept). ``to_dense(truncate(layer, k)) = sum_{i<=k} u_i v_i^T``."""
    layer = _check_layer(layer)
    d = layer["u"].shape[1]
    if _is_int_array(k):
        raise TypeError("k must be a Python int for truncate (it slices); for a traced k use "
                        "maestro_linear(layer, x, k=k_array), which masks")
    k = _check_k(k, d)
    out = {"u": layer["u"][:, :k], "v": layer["v"][:, :k]}
    if layer.get("bias") is not None:
        out["bias"] = layer["bias"]
    return out


def to_dense(layer, k: int | None = None):
    """The dense kernel ``W_k = U[:, :k] V[:, :k]^T`` ``[d_in, d_out]`` (``k=None``: all ``d``),
    computed in float32 (or wider) and rounded to ``result_type(u, v)``."""
    layer = _check_layer(layer)
    if k is not None:
        layer = truncate(layer, k)
    u, v = layer["u"], layer["v"]
    ct = compute_dtype(u.dtype, v.dtype)
    return (u.astype(ct) @ v.astype(ct).T).astype(_out_dtype(u, v))


def rank_mask(k, d: int, dtype=jnp.float32):
    """The ordered-dropout mask ``[i < k for i in 0..d-1]`` ``[d]`` in ``dtype``; ``k`` may be traced
    (values outside ``1..d`` are not checked under tracing: ``k <= 0`` masks everything, ``k >= d``
    nothing)."""
    d = check_int(d, "d", low=1)
    dtype = check_dtype(dtype, "dtype")
    k = _check_k(k, d, "k")
    if k is None:
        return jnp.ones((d,), dtype)
    return (jnp.arange(d) < k).astype(dtype)


def maestro_linear(layer, x, k=None):
    """``y = x U[:, :k] V[:, :k]^T + b``: ``x [..., d_in]`` -> ``[..., d_out]``.

    ``k``: ``None`` (all ``d`` components), a Python int in ``1..d`` (static: the factors are sliced,
    cost ``O(k (d_in + d_out))`` per row) or an integer scalar array, possibly traced (the
    ``[i < k]`` mask of :func:`rank_mask` multiplies ``x U``; full cost, no recompilation per ``k``).
    Math in ``promote_types(x, u, v, float32)``, output ``result_type(x, u, v)``."""
    layer = _check_layer(layer)
    x = check_array(x, "x", min_ndim=1, kind="floating")
    u, v, b = layer["u"], layer["v"], layer.get("bias")
    din, d = u.shape
    if x.shape[-1] != din:
        raise ValueError(f"x must have a trailing axis of size {din} (the layer's d_in), got shape {tuple(x.shape)}")
    k = _check_k(k, d)
    ct = compute_dtype(x.dtype, u.dtype, v.dtype)
    odt = _out_dtype(x, u, v)
    if isinstance(k, int):
        u, v = u[:, :k], v[:, :k]
    h = x.astype(ct) @ u.astype(ct)
    if k is not None and not isinstance(k, int):
        h = h * (jnp.arange(d) < k).astype(ct)
    y = h @ v.astype(ct).T
    if b is not None:
        y = y + b.astype(ct)
    return y.astype(odt)


# ------------------------------------------------------------------------------------ sampler
def sample_ranks(key, ranks: Sequence[int], sampler: str = "per_layer"):
    """Draw the per-layer widths of one ordered-dropout step: ``int32 [L]``.

    ``ranks``: the layers' current inner dimensions ``(d_1, ..., d_L)`` (Python ints >= 1, e.g.
    ``[layer_rank(l) for l in layers]``). ``sampler``:

    * ``"per_layer"`` (official ``SingleLayerSampler``): a pair ``(i, j)`` uniform over all
      ``sum_l d_l`` pairs ``j in 1..d_i``: layer ``i`` gets ``j``, every other layer ``d_l``;
      ``P(i) = d_i / sum d``, ``j | i ~ U{1..d_i}``;
    * ``"across_layers"`` (official ``IndependentSampler``): ``j_l ~ U{1..d_l}`` independently.

    Works under ``jax.jit`` (``key`` may be traced; ``ranks`` and ``sampler`` are static)."""
    key = check_key(key, "key")
    sampler = check_choice(sampler, "sampler", SAMPLERS)
    if isinstance(ranks, (str, bytes, dict)) or not isinstance(ranks, (list, tuple)):
        raise TypeError(f"ranks must be a list/tuple of ints (the layers' inner dimensions), got {type(ranks).__name__}")
    if not ranks:
        raise ValueError("ranks is empty; pass one inner dimension per layer")
    ranks = [check_int(r, f"ranks[{i}]", low=1) for i, r in enumerate(ranks)]
    full = jnp.asarray(ranks, jnp.int32)
    if sampler == "across_layers":
        u = jax.random.uniform(key, (len(ranks),))
        return jnp.minimum((u * full).astype(jnp.int32) + 1, full)
    total = sum(ranks)
    idx = jax.random.randint(key, (), 0, total)
    starts = jnp.asarray(np.cumsum([0] + ranks[:-1]), jnp.int32)
    layer = jnp.sum(idx >= starts) - 1
    width = idx - starts[layer] + 1
    return jnp.where(jnp.arange(len(ranks)) == layer, width, full).astype(jnp.int32)


# ------------------------------------------------------------------- lasso, importance, shrink
def _norms(layer, hierarchical: bool):
    u, v = layer["u"], layer["v"]
    ct = compute_dtype(u.dtype, v.dtype)
    su = jnp.sum(jnp.square(u.astype(ct)), axis=0)   # ||u_k||^2  [d]
    sv = jnp.sum(jnp.square(v.astype(ct)), axis=0)
    if hierarchical:  # suffix sums: sum_{j >= k}
        su = jnp.cumsum(su[::-1])[::-1]
        sv = jnp.cumsum(sv[::-1])[::-1]
    return _safe_sqrt(su), _safe_sqrt(sv)


def group_lasso(layer, *, hierarchical: bool = True):
    """Per-component group lasso ``lasso_k = in_k + out_k`` ``[d]`` (float32 or wider).

    ``hierarchical=True`` (official training default): ``in_k = sqrt(sum_{j>=k} ||u_j||^2)``,
    ``out_k = sqrt(sum_{j>=k} ||v_j||^2)``; ``False``: ``||u_k||``, ``||v_k||``. Differentiable
    everywhere (gradient 0 for an all-zero suffix)."""
    layer = _check_layer(layer)
    hierarchical = check_bool(hierarchical, "hierarchical")
    a, b = _norms(layer, hierarchical)
    return a + b


def importance(layer, *, hierarchical: bool = True):
    """Per-component importance ``in_k * out_k`` ``[d]`` (same norms as :func:`group_lasso`).

    The paper's SVD-recovery claim (``importance_k = sigma_k`` once the factors hold the balanced
    SVD, e.g. after :func:`from_dense`) holds for the NON-hierarchical product
    ``||u_k|| ||v_k||`` (``hierarchical=False``). The default ``hierarchical=True`` gives the
    suffix-norm product ``sqrt(sum_{j>=k} ||u_j||^2) sqrt(sum_{j>=k} ||v_j||^2)`` (non-increasing in
    ``k``), which is what the official code's progressive shrinking thresholds (its
    ``_compute_lasso(hierarchical=True)`` norms in ``cifar_mnist_main.py``) and :func:`shrink`'s
    default."""
    layer = _check_layer(layer)
    hierarchical = check_bool(hierarchical, "hierarchical")
    a, b = _norms(layer, hierarchical)
    return a * b


def group_lasso_penalty(layers, *, hierarchical: bool = True):
    """``sum_layers sum_k lasso_k`` (the official ``group_lasso_criterion``), a float32 scalar."""
    layers = _check_layers(layers)
    hierarchical = check_bool(hierarchical, "hierarchical")
    return sum(jnp.sum(group_lasso(l, hierarchical=hierarchical)) for l in layers)


def shrink(layers, threshold: float = 1e-5, *, hierarchical: bool = True, min_rank: int = 1) -> list:
    """Progressive shrinking: each layer keeps the components with ``importance_k >= threshold``
    (order preserved; at least its first ``min_rank`` most important are kept, and never more than
    it has). Eager (the kept count sets shapes): call it between jitted epochs and re-create the
    optimizer state for the new shapes. Returns a new list of layers.

    Errors: ``threshold`` negative or not finite (ValueError), ``min_rank`` not an int >= 1, a
    layer whose factors hold NaN/Inf (ValueError naming ``layers[i]``), traced layers (TypeError)."""
    layers = _check_layers(layers)
    threshold = check_float(threshold, "threshold", low=0.0)
    hierarchical = check_bool(hierarchical, "hierarchical")
    min_rank = check_int(min_rank, "min_rank", low=1)
    out = []
    for i, lay in enumerate(layers):
        if not all(is_concrete(lay[k]) for k in ("u", "v")):
            raise TypeError(f"layers[{i}] is traced; shrink changes shapes, so call it outside jax.jit")
        bad = [k for k in ("u", "v") if not np.all(np.isfinite(np.asarray(lay[k], np.float64)))]
        if bad:
            raise ValueError(f"layers[{i}]['{bad[0]}'] contains NaN or Inf; shrink would rank its components "
                             "by non-finite importances (and silently keep the wrong ones): fix the "
                             "diverged layer (lower the learning rate / restore a checkpoint) first")
        imp = np.asarray(importance(lay, hierarchical=hierarchical), np.float64)
        keep = imp >= threshold
        need = min(min_rank, imp.size)
        if keep.sum() < need:
            keep[np.argsort(-imp, kind="stable")[:need]] = True
        idx = np.nonzero(keep)[0]
        new = {"u": lay["u"][:, idx], "v": lay["v"][:, idx]}
        if lay.get("bias") is not None:
            new["bias"] = lay["bias"]
        out.append(new)
    return out


# ------------------------------------------------------------------------------ network, loss
def mlp_apply(layers, x, ranks=None, *, activation: Callable = jax.nn.relu):
    """A Maestro MLP: ``h <- activation(maestro_linear(layer_i, h, ranks[i]))`` for every layer but
    the last (no activation there). ``ranks``: ``None`` (full), a list of static ints / ``None``
    per layer, or an integer array ``[L]`` (e.g. from :func:`sample_ranks`; mask form)."""
    layers = _check_layers(layers)
    if not callable(activation):
        raise TypeError(f"activation must be callable (e.g. jax.nn.relu), got {type(activation).__name__}")
    L = len(layers)
    if ranks is None:
        ks = [None] * L
    elif _is_int_array(ranks):
        if not jnp.issubdtype(ranks.dtype, jnp.integer):
            raise TypeError(f"ranks must be an integer array [L], got dtype {ranks.dtype}")
        if ranks.shape != (L,):
            raise ValueError(f"ranks must have shape ({L},) (one width per layer), got {tuple(ranks.shape)}")
        ks = [ranks[i] for i in range(L)]
    elif isinstance(ranks, (list, tuple)):
        if len(ranks) != L:
            raise ValueError(f"ranks must have one entry per layer ({L}), got {len(ranks)}")
        ks = list(ranks)
    else:
        raise TypeError(f"ranks must be None, a list of ints or an integer array [L], got {type(ranks).__name__}")
    h = x
    for i, (lay, k) in enumerate(zip(layers, ks)):
        if k is not None and not _is_int_array(k):
            _check_k(k, lay["u"].shape[1], f"ranks[{i}]")
        h = maestro_linear(lay, h, k)
        if i < L - 1:
            h = activation(h)
    return h


def _check_labels(labels, num_classes: int, batch: int, name: str = "labels"):
    """Integer ``[batch]`` labels; concrete values must lie in ``0..num_classes-1`` (traced ones are not
    checked: there an out-of-range label reads a clipped/undefined log-probability)."""
    labels = check_array(labels, name, ndim=1, kind="integer")
    if labels.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) (one label per row of the logits), got "
                         f"{tuple(labels.shape)}")
    if is_concrete(labels) and labels.size:
        with jax.ensure_compile_time_eval():
            lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must be class indices in 0..{num_classes - 1} (C = {num_classes} logits), "
                             f"got {bad}; negative labels would silently index from the end and labels >= C "
                             "give NaN: remap or drop them")
    return labels


def distillation_loss(logits_full, logits_trunc, labels):
    """``CE(full, y) + CE(trunc, stop_gradient(softmax(full)))``, means over the batch (float32).

    ``logits_*``: ``[B, C]`` floating with ``B >= 1`` (an empty batch has no mean: ValueError naming
    ``logits_full``); ``labels``: integer ``[B]`` in ``0..C-1`` (concrete labels outside it raise
    ValueError naming ``labels``; traced labels are not checked)."""
    lf = check_array(logits_full, "logits_full", ndim=2, kind="floating")
    lt = check_array(logits_trunc, "logits_trunc", ndim=2, kind="floating")
    if lf.shape != lt.shape:
        raise ValueError(f"logits_full {tuple(lf.shape)} and logits_trunc {tuple(lt.shape)} must have the same shape")
    if lf.shape[0] < 1:
        raise ValueError(f"logits_full has an empty batch (shape {tuple(lf.shape)}); the loss is a mean over "
                         "the batch, pass at least one example")
    labels = _check_labels(labels, lf.shape[1], lf.shape[0])
    ct = compute_dtype(lf.dtype, lt.dtype)
    lsf = jax.nn.log_softmax(lf.astype(ct), -1)
    lst = jax.nn.log_softmax(lt.astype(ct), -1)
    ce_full = -jnp.mean(jnp.take_along_axis(lsf, labels[:, None], -1))
    teacher = jax.lax.stop_gradient(jnp.exp(lsf))
    ce_trunc = -jnp.mean(jnp.sum(teacher * lst, -1))
    return ce_full + ce_trunc


def maestro_loss(layers, x, labels, key, *, sampler: str = "per_layer", gp_lambda: float = 5e-3,
                 hierarchical: bool = True, full_pass: bool = True, activation: Callable = jax.nn.relu):
    """The official training loss of one step on a Maestro MLP (:func:`mlp_apply`)::

        ranks = sample_ranks(key, [d_1..d_L], sampler)
        L = CE(f(x), y) + CE(f_ranks(x), sg(softmax(f(x)))) + gp_lambda * group_lasso_penalty

    (``full_pass=False``: ``CE(f_ranks(x), y) + gp_lambda * penalty``). ``x [B, d_in]``,
    ``labels`` int ``[B]`` in ``0..C-1`` (``C`` = the last layer's ``d_out``; concrete labels
    outside it raise ValueError naming ``labels``), ``B >= 1``; ``gp_lambda >= 0`` (official default
    5e-3). A float32 scalar; differentiate with ``jax.grad`` w.r.t. ``layers``."""
    layers = _check_layers(layers)
    xa = check_array(x, "x", min_ndim=2, kind="floating")
    if xa.shape[0] < 1:
        raise ValueError(f"x has an empty batch (shape {tuple(xa.shape)}); the loss is a mean over the batch, "
                         "pass at least one example")
    _check_labels(labels, layers[-1]["v"].shape[0], xa.shape[0])
    key = check_key(key, "key")
    gp_lambda = check_float(gp_lambda, "gp_lambda", low=0.0)
    hierarchical = check_bool(hierarchical, "hierarchical")
    full_pass = check_bool(full_pass, "full_pass")
    ranks = sample_ranks(key, [l["u"].shape[1] for l in layers], sampler)
    trunc = mlp_apply(layers, x, ranks, activation=activation)
    if full_pass:
        loss = distillation_loss(mlp_apply(layers, x, activation=activation), trunc, labels)
    else:
        ls = jax.nn.log_softmax(trunc.astype(compute_dtype(trunc.dtype)), -1)
        loss = -jnp.mean(jnp.take_along_axis(ls, labels[:, None], -1))
    if gp_lambda:
        loss = loss + gp_lambda * group_lasso_penalty(layers, hierarchical=hierarchical)
    return loss


# ---------------------------------------------------------------------------------- NNX layer
class MaestroLinear(nnx.Module):
    """Flax NNX Maestro layer: ``y = x U[:, :k] V[:, :k]^T + b`` (see the module docstring).

    Args:
      in_features, out_features: ints >= 1; ``d = min(in_features, out_features)`` components.
      use_bias: add ``b [out_features]`` (default True, as the official layer).
      param_dtype: dtype of ``u``, ``v``, ``bias`` (default float32).
      rngs: ``nnx.Rngs`` (``rngs.params()`` draws the torch-default init of :func:`init_layer`).

    Params: ``self.u`` ``[in, d]``, ``self.v`` ``[out, d]``, ``self.bias`` ``[out]`` (or None).
    Call: ``layer(x, k=None)``: ``k`` None / static int / integer array as in
    :func:`maestro_linear`. :meth:`shrink` replaces the params by the kept components (eager).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__}")
        lay = init_layer(rngs.params(), in_features, out_features, use_bias=use_bias, dtype=param_dtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._set(lay)

    def _set(self, lay):
        self.u = nnx.Param(lay["u"])
        self.v = nnx.Param(lay["v"])
        self.bias = nnx.Param(lay["bias"]) if lay.get("bias") is not None else None

    @classmethod
    def from_dense(cls, kernel, bias=None, *, rngs: nnx.Rngs | None = None) -> "MaestroLinear":
        """A layer holding the SVD factors of ``kernel [in, out]`` (:func:`from_dense`)."""
        lay = from_dense(kernel, bias)
        self = cls(kernel.shape[0], kernel.shape[1], use_bias=bias is not None,
                   param_dtype=kernel.dtype, rngs=rngs if rngs is not None else nnx.Rngs(0))
        self._set(lay)
        return self

    @property
    def layer(self) -> dict:
        """The params as the plain dict of the pure functions."""
        d = {"u": self.u.value, "v": self.v.value}
        if self.bias is not None:
            d["bias"] = self.bias.value
        return d

    @property
    def rank(self) -> int:
        """The current number of components ``d``."""
        return int(self.u.value.shape[1])

    def __call__(self, x, k=None):
        return maestro_linear(self.layer, x, k)

    def importance(self, *, hierarchical: bool = True):
        return importance(self.layer, hierarchical=hierarchical)

    def group_lasso(self, *, hierarchical: bool = True):
        return group_lasso(self.layer, hierarchical=hierarchical)

    def to_dense(self, k: int | None = None):
        return to_dense(self.layer, k)

    def shrink(self, threshold: float = 1e-5, *, hierarchical: bool = True, min_rank: int = 1) -> int:
        """Keep the components with importance >= ``threshold`` (:func:`shrink`); returns the new rank."""
        self._set(shrink([self.layer], threshold, hierarchical=hierarchical, min_rank=min_rank)[0])
        return self.rank
