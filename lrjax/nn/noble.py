"""NOBLE: a permanent nonlinear low-rank branch on a linear layer, ``y = x W + sigma(x W_down) W_up``.

Smith (Canva), "NOBLE: Accelerating Transformers with Nonlinear Low-Rank Branches", arXiv 2603.06492.
Paper only: no official code was found, and the stored copy of the paper available to us is its
abstract (``/work/shared/seed/``) plus the research note's quotes. What the paper fixes:

* NOBLE is for *pretraining from scratch*: the branch is part of the architecture (not a PEFT adapter
  on frozen weights); base ``W`` and the branch train together.
* The branch computes ``sigma(x W_down) W_up`` with a low-rank bottleneck (e.g. 768 -> 64) and a
  learnable nonlinearity ``sigma``; the best one is **CosNet**, "a two-layer cosine nonlinearity with
  learnable frequency and phase with a linear projection in between them in the bottleneck space".
  ReLU/GELU branches are the paper's comparisons. It is applied to every linear projection (Q, K, V,
  O and both FFN layers).
* Parameter overhead per ``d x d`` layer of CosNet: ``2 d r + r^2 + 4 r`` (``W_down``, ``W_up``, the
  ``r x r`` mix, and ``w1, p1, w2, p2``): no biases inside the branch.

Math, for a token ``x in R^M`` (``M = in_features``, ``N = out_features``, ``r = rank``)::

    h  = x W_down                          W_down [M, r]
    cosnet:  h1 = cos(w1 * h + p1)         w1, p1 [r]   (per-channel frequency and phase)
             h2 = h1 M                     M [r, r]     (the "mix")
             h3 = cos(w2 * h2 + p2)        w2, p2 [r]
    relu:    h3 = max(h, 0)
    gelu:    h3 = GELU(h)                  (exact, erf form)
    y  = x W + b + h3 W_up                 W_up [r, N]

Initialization (the paper is silent on all of it except that the branch must not disturb the base at
the start; every choice below is **[ours]**):

* ``W_up = 0``: the branch starts at exactly 0, so a NOBLE model at init computes the base model
  bitwise (float32) while ``dL/dW_up = h3^T dL/dy`` is nonzero, so it trains from step one;
* ``W_down ~ N(0, 1/M)`` (variance preserving: ``h`` has the scale of ``x``, so the cosines see
  about one radian of spread for LayerNorm-ed inputs);
* ``w1 = w2 = freq_init`` (default ``1.0``);
* ``p1, p2 ~ U(-pi, pi)`` independently per channel (random phases, as in random Fourier features:
  with ``p = 0`` every channel would start at the flat top of its cosine, ``h3 ~ 1``, and the first
  ``W_up`` update would be nearly rank one);
* ``M ~ N(0, 1/r)`` (variance preserving in the bottleneck).

No learning-rate multipliers are applied (the paper's are unknown to us); the branch parameters are
plain parameters for the optimizer.

Precision: the branch is computed in ``promote_types(x, factors, float32)``; :func:`noble_linear`
adds ``x W`` (the input/kernel dtype's product, as ``nnx.Linear`` computes it), the branch and the
bias in that compute dtype and rounds once to ``result_type(x, W, b)``.

Cost: two thin matmuls (``[T, M] x [M, r]`` and ``[T, r] x [r, N]``), one ``r x r`` matmul and
elementwise cosines on ``[T, r]``: ``r (M + N) + r^2`` multiply-adds per token next to ``M N``
(about 20% of the linear layers' FLOPs at ``r = d / 8`` in a GPT block; the backward adds four thin
matmuls). Measured on CPU (XLA, one thread, process time; char transformer d=128, 2 layers, d_ff=512,
16 x 64 tokens, Adam on base and branch, ``r = 16``): dense step 57.8 ms, NOBLE-CosNet 84.5 ms
(1.46x), NOBLE-GELU 77.0 ms (1.33x), LoRA at the same rank trained with its base 74.7 ms (1.29x);
the same model built from :class:`NOBLELinear` costs the same as through :func:`lrjax.factored`
(1.48x / 1.33x), so the overhead is the thin matmuls on CPU, not the interpreter; d=256, r=32:
1.47x / 1.34x (LoRA 1.34x). The paper's +7% is a GPU figure at larger widths.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lrjax import _validation as V

__all__ = ["BRANCHES", "COSNET_KEYS", "NOBLELinear", "check_branch", "cosnet", "init_noble", "noble_branch",
           "noble_linear", "noble_num_params"]

#: the branch nonlinearities ``sigma``
BRANCHES = ("cosnet", "relu", "gelu")
#: CosNet's own parameters (present only for ``branch="cosnet"``)
COSNET_KEYS = ("w1", "p1", "mix", "w2", "p2")
#: every factor name, in order
FACTOR_KEYS = ("w_down", "w_up") + COSNET_KEYS


def check_branch(branch, name: str = "branch") -> str:
    """``branch`` must be one of :data:`BRANCHES` (``TypeError`` for a non-string, ``ValueError``
    naming ``name`` and the choices otherwise)."""
    return V.check_choice(branch, name, BRANCHES)


def branch_keys(branch: str) -> tuple:
    """The factor names of a ``branch`` kind: ``w_down, w_up`` (+ :data:`COSNET_KEYS` for CosNet)."""
    return FACTOR_KEYS if check_branch(branch) == "cosnet" else FACTOR_KEYS[:2]


def noble_num_params(in_features: int, out_features: int, rank: int, branch: str = "cosnet") -> int:
    """Parameters the branch adds to one ``in_features x out_features`` linear layer:
    ``r (M + N) + r^2 + 4 r`` for CosNet (``2 d r + r^2 + 4 r`` for ``d x d``), ``r (M + N)`` for
    ReLU/GELU. Raises ``TypeError``/``ValueError`` naming the argument (``rank`` must satisfy
    ``1 <= rank <= min(M, N)``; ``branch`` one of :data:`BRANCHES`)."""
    m = V.check_int(in_features, "in_features", low=1)
    n = V.check_int(out_features, "out_features", low=1)
    r = V.check_rank(rank, m, n, "rank")
    check_branch(branch)
    return r * (m + n) + (r * r + 4 * r if branch == "cosnet" else 0)


def init_noble(key, in_features: int, out_features: int, rank: int, branch: str = "cosnet", *,
               batch_shape: tuple = (), dtype=jnp.float32, freq_init: float = 1.0) -> dict:
    """The initial branch factors (see the module docstring for the [ours] inits).

    Returns ``{"w_down": [*batch, M, r], "w_up": [*batch, r, N]}`` plus, for CosNet,
    ``"w1", "p1", "w2", "p2": [*batch, r]`` and ``"mix": [*batch, r, r]``, all of ``dtype`` (random
    draws in float32, rounded once). ``batch_shape`` stacks independent layers (an ``nn.scan``
    stack). Raises ``TypeError``/``ValueError`` naming ``key``, ``in_features``, ``out_features``,
    ``rank`` (``1 <= rank <= min(M, N)``), ``branch``, ``batch_shape``, ``dtype`` or ``freq_init``
    (finite, > 0)."""
    V.check_key(key, "key")
    m = V.check_int(in_features, "in_features", low=1)
    n = V.check_int(out_features, "out_features", low=1)
    r = V.check_rank(rank, m, n, "rank")
    check_branch(branch)
    dt = V.check_dtype(dtype, "dtype")
    freq = V.check_float(freq_init, "freq_init", low=0.0, low_open=True)
    if not isinstance(batch_shape, tuple):
        raise TypeError(f"batch_shape must be a tuple of ints, got {type(batch_shape).__name__}")
    bs = tuple(V.check_int(b, "batch_shape", low=1) for b in batch_shape)
    kd, kp1, km, kp2 = jax.random.split(key, 4)
    f = {"w_down": (jax.random.normal(kd, (*bs, m, r), jnp.float32) / np.sqrt(m)).astype(dt),
         "w_up": jnp.zeros((*bs, r, n), dt)}
    if branch == "cosnet":
        f["w1"] = jnp.full((*bs, r), freq, dt)
        f["p1"] = jax.random.uniform(kp1, (*bs, r), jnp.float32, -math.pi, math.pi).astype(dt)
        f["mix"] = (jax.random.normal(km, (*bs, r, r), jnp.float32) / np.sqrt(r)).astype(dt)
        f["w2"] = jnp.full((*bs, r), freq, dt)
        f["p2"] = jax.random.uniform(kp2, (*bs, r), jnp.float32, -math.pi, math.pi).astype(dt)
    return f


def check_factors(factors, branch: str, name: str = "factors", m: int | None = None, n: int | None = None):
    """Structure and shapes of one layer's branch factors (no batch axes); returns ``(M, r, N)``."""
    check_branch(branch)
    if not isinstance(factors, Mapping):
        raise TypeError(f"{name} must be a dict of the branch factors {list(branch_keys(branch))}, got "
                        f"{type(factors).__name__}")
    want = branch_keys(branch)
    extra = [k for k in factors if k not in want]
    if extra:
        raise ValueError(f"{name} has {extra[0]!r}, which a branch={branch!r} NOBLE does not use (it reads "
                         f"{list(want)}); factors made for another branch kind?")
    for k in want:
        if k not in factors:
            raise ValueError(f"{name} has no {k!r}; a branch={branch!r} NOBLE needs {list(want)}")
        V.check_array(factors[k], f"{name}[{k!r}]", kind="floating")
    d, u = factors["w_down"], factors["w_up"]
    if d.ndim != 2:
        raise ValueError(f"{name}['w_down'] must be a matrix [M, r] (one layer's factors), got shape {tuple(d.shape)}")
    mm, r = d.shape
    if m is not None and mm != m:
        raise ValueError(f"{name}['w_down'] must have shape ({m}, r) for a [{m}, {n}] layer, got {tuple(d.shape)}")
    want_u = (r, n if n is not None else (u.shape[-1] if u.ndim else "N"))
    if u.ndim != 2 or u.shape[0] != r or (n is not None and u.shape[1] != n):
        raise ValueError(f"{name}['w_up'] must have shape {want_u} (r from w_down{tuple(d.shape)}"
                         f"{'' if n is None else f', N={n} from the kernel'}), got {tuple(u.shape)}")
    nn_ = u.shape[1]
    if branch == "cosnet":
        for k, sh in (("w1", (r,)), ("p1", (r,)), ("w2", (r,)), ("p2", (r,)), ("mix", (r, r))):
            if tuple(factors[k].shape) != sh:
                raise ValueError(f"{name}[{k!r}] has shape {tuple(factors[k].shape)}, expected {sh} for rank {r}")
    return mm, r, nn_


def cosnet(h, w1, p1, mix, w2, p2):
    """CosNet on the bottleneck: ``cos(w2 * (cos(w1 * h + p1) M) + p2)`` for ``h [..., r]`` with
    ``w1, p1, w2, p2 [r]`` and ``mix [r, r]``, all floating (computed in the inputs' promoted dtype).
    Raises TypeError (a non-array or non-floating input) / ValueError naming the argument whose
    shape does not fit ``r = h.shape[-1]``."""
    h = V.check_array(h, "h", min_ndim=1, kind="floating")
    r = h.shape[-1]
    for nm, v, sh in (("w1", w1, (r,)), ("p1", p1, (r,)), ("mix", mix, (r, r)), ("w2", w2, (r,)), ("p2", p2, (r,))):
        V.check_array(v, nm, kind="floating")
        if tuple(v.shape) != sh:
            raise ValueError(f"{nm} must have shape {sh} (r={r} from h's last axis), got {tuple(v.shape)}")
    h1 = jnp.cos(w1 * h + p1)
    return jnp.cos(w2 * (h1 @ mix) + p2)


def _sigma(h, f, branch, cd):
    if branch == "cosnet":
        return cosnet(h, *(f[k].astype(cd) for k in COSNET_KEYS))
    if branch == "relu":
        return jax.nn.relu(h)
    return jax.nn.gelu(h, approximate=False)


def noble_branch(x, factors: Mapping, branch: str = "cosnet"):
    """The branch term ``sigma(x W_down) W_up``: ``x [..., M]`` floating, ``factors`` one layer's
    dict (see :func:`init_noble`) -> ``[..., N]`` in ``promote_types(x, factors, float32)`` (not
    rounded: callers add it to ``x W`` and round once). Raises ``TypeError``/``ValueError`` naming
    ``x``, ``factors`` or ``branch`` (unknown kind, missing/extra factors, disagreeing shapes)."""
    check_branch(branch)
    x = V.check_array(x, "x", min_ndim=1, kind="floating")
    m, _, _ = check_factors(factors, branch)
    if x.shape[-1] != m:
        raise ValueError(f"x must have a trailing axis of size M={m} (w_down's rows), got shape {tuple(x.shape)}")
    cd = V.compute_dtype(x.dtype, *(factors[k].dtype for k in branch_keys(branch)))
    h = x.astype(cd) @ factors["w_down"].astype(cd)
    return _sigma(h, factors, branch, cd) @ factors["w_up"].astype(cd)


def noble_linear(x, kernel, factors: Mapping, bias=None, branch: str = "cosnet"):
    """``y = x W + b + sigma(x W_down) W_up`` for ``x [..., M]``, ``kernel W [M, N]``, ``bias [N]`` or
    ``None``. ``x W`` is ``lax.dot_general`` in ``result_type(x, W)`` (as ``nnx.Linear``); the sum is
    formed in ``promote_types(x, W, b, factors, float32)`` and rounded once to ``result_type(x, W, b)``,
    so with ``W_up = 0`` a float32 layer returns ``x W + b`` bitwise. Raises ``TypeError``/
    ``ValueError`` naming ``x``, ``kernel``, ``bias``, ``factors`` or ``branch``."""
    check_branch(branch)
    x = V.check_array(x, "x", min_ndim=1, kind="floating")
    kernel = V.check_array(kernel, "kernel", ndim=2, kind="floating")
    m, n = kernel.shape
    if x.shape[-1] != m:
        raise ValueError(f"x must have a trailing axis of size in_features={m}, got shape {tuple(x.shape)}")
    check_factors(factors, branch, m=m, n=n)
    dts = [x.dtype, kernel.dtype]
    if bias is not None:
        bias = V.check_array(bias, "bias", ndim=1, kind="floating")
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},) (out_features), got {tuple(bias.shape)}")
        dts.append(bias.dtype)
    out_dt = jnp.result_type(*dts)
    pd = jnp.result_type(x.dtype, kernel.dtype)
    y = lax.dot_general(x.astype(pd), kernel.astype(pd), (((x.ndim - 1,), (0,)), ((), ())))
    t = noble_branch(x, factors, branch)
    cd = V.compute_dtype(y.dtype, t.dtype, *(() if bias is None else (bias.dtype,)))
    out = y.astype(cd) + t.astype(cd)
    if bias is not None:
        out = out + bias.astype(cd)
    return out.astype(out_dt)


class NOBLELinear(nnx.Module):
    """An ``nnx.Linear`` with a NOBLE branch: ``y = x W + b + sigma(x W_down) W_up`` (module docstring).

    Args:
      in_features, out_features: ``M``, ``N`` (ints ``>= 1``).
      rank: the bottleneck ``r``, ``1 <= r <= min(M, N)`` (the paper: e.g. ``d / 12``; the issue's
        study uses ``d / 8``).
      branch: ``"cosnet"`` (default), ``"relu"`` or ``"gelu"``.
      use_bias: add ``b`` (default ``True``, init ``bias_init``).
      freq_init: CosNet's initial frequencies ``w1 = w2`` (default ``1.0``, finite ``> 0``).
      kernel_init, bias_init: as ``nnx.Linear`` (defaults lecun-normal and zeros).
      dtype: ``None`` (compute in the promoted input/parameter dtype) or a floating dtype that input,
        kernel, bias and branch factors are cast to before the product.
      param_dtype: the parameters' dtype (default float32).
      rngs: ``nnx.Rngs``.

    Parameters (``nnx.Param``): ``kernel [M, N]``, ``bias [N]`` (when ``use_bias``), ``w_down [M, r]``,
    ``w_up [r, N]`` (zeros) and, for CosNet, ``w1, p1, w2, p2 [r]``, ``mix [r, r]``. Calling on ``x
    [..., M]`` returns ``[..., N]`` (:func:`noble_linear`). Raises ``TypeError``/``ValueError`` naming
    the argument for bad sizes, a rank above ``min(M, N)``, an unknown branch, a non-bool
    ``use_bias``, a non-``nnx.Rngs`` ``rngs``.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, branch: str = "cosnet",
                 use_bias: bool = True, freq_init: float = 1.0,
                 kernel_init=nnx.initializers.lecun_normal(), bias_init=nnx.initializers.zeros_init(),
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        m = V.check_int(in_features, "in_features", low=1)
        n = V.check_int(out_features, "out_features", low=1)
        V.check_rank(rank, m, n, "rank")
        check_branch(branch)
        V.check_bool(use_bias, "use_bias")
        V.check_float(freq_init, "freq_init", low=0.0, low_open=True)
        V.check_dtype(dtype, "dtype", allow_none=True)
        pdt = V.check_dtype(param_dtype, "param_dtype")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__}")
        self.in_features, self.out_features, self.rank = m, n, int(rank)
        self.branch, self.use_bias, self.dtype = branch, bool(use_bias), dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (m, n), pdt))
        self.bias = nnx.Param(bias_init(rngs.params(), (n,), pdt)) if use_bias else nnx.data(None)
        f = init_noble(rngs.params(), m, n, rank, branch, dtype=pdt, freq_init=freq_init)
        for k in FACTOR_KEYS:
            setattr(self, k, nnx.Param(f[k]) if k in f else nnx.data(None))

    def factors(self) -> dict:
        """The branch factors as a dict of arrays (the layout :func:`noble_branch` reads)."""
        return {k: getattr(self, k)[...] for k in branch_keys(self.branch)}

    def __call__(self, x):
        f = self.factors()
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        if self.dtype is not None:
            x = V.check_array(x, "x", min_ndim=1, kind="floating").astype(self.dtype)
            kernel = kernel.astype(self.dtype)
            bias = None if bias is None else bias.astype(self.dtype)
            f = {k: v.astype(self.dtype) for k, v in f.items()}
        return noble_linear(x, kernel, f, bias, self.branch)
