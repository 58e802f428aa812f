r"""Optimizer-side LoRA: LoRA-Pro (efficient and full), LoRA-FA and Riemannian-preconditioned LoRA.

These are optax ``GradientTransformation`` s over the adapters dict of a low-rank reparameterization
(:mod:`lrjax.reparam`): ``updates`` and ``params`` are both ``{leaf path: {"a": ..., "b": ...}}``
as returned by ``rp.init`` (and by ``jax.grad`` with respect to it)::

    rp = lrjax.LoRA(rank=8, alpha=16)
    base, adapters = rp.init(key, params)
    opt = lora_pro(2e-5, rp)                       # the efficient variant (AdamW on adjusted grads)
    state = opt.init(adapters)
    grads = jax.grad(lambda ad: loss(rp.materialize(base, ad)))(adapters)
    upd, state = opt.update(grads, state, adapters)   # params are required
    adapters = optax.apply_updates(adapters, upd)

Orientation
-----------
The papers and the official code (and PEFT) write ``W: [m = d_out, n = d_in]``, ``W + s B A`` with
``A_t: [r, n]``, ``B_t: [m, r]``. lrjax stores the Dense kernel ``K = W^T: [M = in, N = out]`` and
its adapter as ``K + s A B`` with ``A: [*batch, M, r] = A_t^T`` and ``B: [*batch, r, N] = B_t^T``
(:mod:`lrjax.reparam.base`; leading batch axes are carried through every formula below). With
``G = dL/dK = G_t^T`` the LoRA gradients are ``g_A = s G B^T`` (torch ``s B_t^T G_t``) and
``g_B = s A^T G`` (torch ``s G_t A_t^T``). The ``r x r`` Gram matrices are

.. math:: S_A = A^\top A = A_t A_t^\top,\qquad S_B = B B^\top = B_t^\top B_t

and the projectors ``P_A = A S_A^{-1} A^T`` (``[M, M]``, lrjax; torch's ``P_{A_t} = A_t^T S_A^{-1} A_t``
acts on the other side) and ``P_B = B^T S_B^{-1} B`` (``[N, N]``; torch ``P_{B_t} = B_t S_B^{-1} B_t^T``).
Inverses are ``pinv(S + eps_inv I)`` as in the official code (``eps_inv = 1e-8``; see *Degenerate
factors*).

LoRA-Pro (Wang et al., ICLR 2025, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
arXiv:2407.18242; code mrflogs/LoRA-Pro)
------------------------------------------------------------------------------------------------
One LoRA step moves ``K`` by ``s (dA B + A dB)``, an *equivalent gradient* in the tangent space of
rank-``r`` matrices. LoRA-Pro replaces ``(g_A, g_B)`` by adjusted gradients that make the equivalent
gradient the orthogonal projection of the full gradient ``G`` onto that space. For any ``X in R^{r x r}``:

torch orientation (paper, official code)::

    g~_At = (1/s^2) S_B^-1 g_At + X_t A_t
    g~_Bt = (1/s^2) (I - P_Bt) g_Bt S_A^-1 - B_t X_t
    s (B_t g~_At + g~_Bt A_t) = P_Bt G_t + (I - P_Bt) G_t P_At            (independent of X_t)
    X_t:  S_B X_t + X_t S_A = -(1/s^2) S_B^-1 g_At A_t^T                  ("sylvester")
          X_t = -1/2 (1/s^2) S_B^-1 B_t^T g_Bt S_A                        ("symmetry")
          X_t = 0                                                        ("zero")

lrjax orientation (``X = X_t^T``), what this module computes::

    g~_A = (1/s^2) g_A S_B^-1 + A X                                       [*b, M, r]
    g~_B = (1/s^2) S_A^-1 g_B (I - P_B) - X B                             [*b, r, N]
    s (g~_A B + A g~_B) = G P_B + P_A G (I - P_B)                         [*b, M, N]
    X:    S_A X + X S_B = -(1/s^2) A^T g_A S_B^-1                          ("sylvester")
          X = -1/2 (1/s^2) S_A g_B B^T S_B^-1                              ("symmetry")
          X = 0                                                          ("zero")

The Sylvester ``X`` minimizes ``||g~_A - g_A||^2 + ||g~_B - g_B||^2`` (the adjusted gradients stay
closest to LoRA's own; the paper's Theorem; checked in the tests). It is solved from the
eigendecompositions of the two symmetric PSD ``r x r`` matrices (:func:`solve_sylvester_psd`,
``O(r^3)``, batched, no ``r^2 x r^2`` Kronecker system): with ``S_A = V diag(mu) V^T`` and
``S_B = U diag(lam) U^T``, ``X = V [(V^T C U)_ij / (mu_i + lam_j)] U^T``. ``(I - P_B)`` is applied as
``g_B - (g_B B^T) S_B^-1 B`` (no ``N x N`` matrix).

* ``variant="efficient"`` (``mrflogs/LoRA-Pro peta/optim_efficient_adamw_only.py @a5de2f43``, same
  as ``hhnqqq/MyTransformers common/lora_modules/lorapro_optim.py::LoRAProAdamW``): the adjusted
  gradients ``(g~_A, g~_B)`` (``x_mode``, default Sylvester) are fed to Adam moments on ``A`` and
  ``B``: ``m = b1 m + (1-b1) g~``, ``v = b2 v + (1-b2) g~^2``, output
  ``(m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`` with ``t = 1`` at the first update (torch's AdamW
  placement of ``eps``, which equals ``optax.scale_by_adam``'s). State: two moments per factor,
  ``2 (M + N) r`` floats per adapted matrix.
* ``variant="full"`` (``mrflogs/LoRA-Pro DeepSpeed-0.15.1/deepspeed/runtime/zero/stage_1_and_2.py::
  lorapro_full_adjustment``): (1) the equivalent gradient ``G^ = s (g~_A B + A g~_B)`` with ``X = 0``
  (``[*b, M, N]``); (2) Adam moments of ``G^`` in the full ``M x N`` shape, direction
  ``U = m_hat / (sqrt(v_hat) + eps)``; (3) ``U`` is read as a full-weight gradient:
  ``g_A' = s U B^T``, ``g_B' = s A^T U``, adjusted again with ``x_mode``'s ``X``; (4) the official
  run applies the learning rate with plain SGD (HF Trainer ``optim="sgd"``), so the output of
  :func:`scale_by_lora_pro` is ``(g~_A', g~_B')`` and :func:`lora_pro` scales it by ``-lr``.
  **Memory**: the two moments are ``2 M N`` floats (float32: ``8 M N`` bytes) per adapted matrix,
  as much as full fine-tuning with Adam (a 4096 x 4096 projection: 128 MiB), against ``8 (M + N) r``
  bytes for the efficient variant.

Choices pinned here (documented differences from the official code):

* ``s = rp.scale`` (``alpha / r``; ``alpha / sqrt(r)`` for :class:`lrjax.RSLoRA`); the official full
  variant hard-codes ``scaling_factor = 16 / 8``.
* Full variant bias correction uses ``t = 1`` at the first update. The official DeepSpeed code
  increments ``global_step`` before calling the adjustment and then uses ``step + 1``, i.e.
  ``t = 2`` at the first update (its ``step == 0`` branch is never taken; it would be harmless since
  ``B = 0`` there). Its ``v`` is accumulated through bfloat16; here moments are float32.
* Weight decay (:func:`lora_pro`): decoupled, ``p <- p - lr (u + wd p)``, which is exactly the
  official efficient optimizer's ``p *= 1 - wd lr`` before the Adam step, and the HF SGD (coupled =
  decoupled for SGD) of the full variant. Default ``0.0`` (the paper's setting).
* Moments are stored in ``promote_types(factor dtype, float32)``.

LoRA-FA (Zhang et al. 2023, arXiv:2308.03303; PEFT ``create_lorafa_optimizer``)
-------------------------------------------------------------------------------
``A`` frozen (zero update), ``B`` gets LoRA-Pro's ``B`` rule with ``g_A = 0`` and no projection:
torch ``g~_Bt = (1/s^2) g_Bt (S_A + eps_inv I)^-1``; lrjax ``g~_B = (1/s^2) (S_A + eps_inv I)^-1 g_B``.
Then PEFT's ``LoraFAOptimizer`` AdamW (the HF placement of ``eps``):
``u = lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + eps)``, ``B <- B - u``, then weight decay *after* the
step, ``B <- B (1 - lr wd)``. PEFT defaults: ``b1, b2 = 0.9, 0.999``, ``eps = 1e-6``. PEFT computes
``g~_B`` under bfloat16 autocast where bfloat16 is available (CPUs included); here it is float32.

Riemannian preconditioned LoRA (Zhang & Pilanci 2024, arXiv:2402.02347; PEFT ``create_riemannian_optimizer``)
--------------------------------------------------------------------------------------------------------
torch ``g_At <- (S_B + reg I)^+ g_At``, ``g_Bt <- g_Bt (S_A + reg I)^+`` (no ``s``; ``reg = 1e-2``);
lrjax ``g_A <- g_A (S_B + reg I)^+``, ``g_B <- (S_A + reg I)^+ g_B``; then any optimizer
(:func:`riemannian_lora`: ``optax.adamw``, equal to ``torch.optim.AdamW``).

Degenerate factors (never NaN)
------------------------------
``M^+`` is the pseudo-inverse of a symmetric PSD ``r x r`` matrix from ``eigh``: eigenvalues
``<= r * eps(dtype) * max|eigenvalue|`` are dropped (torch ``pinv``'s default cutoff), so ``B = 0``
(LoRA's init) gives ``(0 + 1e-8 I)^+ = 1e8 I`` and ``g_A = s G B^T = 0``, hence
``g~_A = A X = 0`` and ``g~_B = (1/s^2) S_A^-1 g_B``: the official "step 0" rule, with no special case.
A rank-deficient ``A`` or ``B`` (zero columns, ``A = 0``) gets the pseudo-inverse on its range. The
Sylvester solve sets ``Y_ij = 0`` where ``mu_i + lam_j <= r * eps * max(mu + lam)`` (the minimum-norm
least-squares solution; the official eigen-solver divides by zero there). Inputs with NaN/Inf
propagate like any ``jax.numpy`` operation (values are not read under ``jit``).

Precision: every formula runs in ``promote_types(A, B, g_A, g_B, float32)``; outputs are rounded
once to each update leaf's dtype (bfloat16 factors are fine).

Errors (eager, naming the argument): a non-:class:`~lrjax.reparam.base.Reparam` ``rp`` (TypeError);
a variant whose form is not ``W + s A B`` (``rp.factor_keys != ('a', 'b')``, e.g. DoRA, or one that
overrides ``factors`` / freezes factors) (ValueError); a tree that is not the adapters dict, factors of
mismatched shapes or of another rank than ``rp.rank`` (TypeError/ValueError naming ``params``,
``updates`` or ``state``); bad hyper-parameters (ValueError/TypeError naming them).
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrjax import _validation as V
from lrjax.reparam.base import Reparam

__all__ = ["scale_by_lora_pro", "lora_pro", "scale_by_lora_fa", "lora_fa", "scale_by_riemannian_lora",
           "riemannian_lora", "lora_pro_adjust", "solve_sylvester_psd", "psd_pinv", "AdjustedGrads",
           "LoRAProState", "LoRAFAState", "VARIANTS", "X_MODES"]

VARIANTS = ("efficient", "full")
X_MODES = ("sylvester", "symmetry", "zero")

_NEEDS = "LoRA-Pro needs the adapters dict {path: {'a','b'}} from rp.init"


class LoRAProState(NamedTuple):
    """``count``: int32 number of updates; ``mu``/``nu``: Adam moments. Efficient variant:
    ``{path: {"a": [*b, M, r], "b": [*b, r, N]}}``; full variant: ``{path: [*b, M, N]}``."""

    count: jax.Array
    mu: Any
    nu: Any


class LoRAFAState(NamedTuple):
    """``count``: int32; ``mu``/``nu``: ``{path: [*b, r, N]}`` Adam moments of ``B`` only."""

    count: jax.Array
    mu: Any
    nu: Any


class AdjustedGrads(NamedTuple):
    """LoRA-Pro's adjusted gradients (lrjax orientation) and the ``X`` used."""

    a: jax.Array   # g~_A  [*b, M, r]
    b: jax.Array   # g~_B  [*b, r, N]
    x: jax.Array   # X     [*b, r, r]


class _StepState(NamedTuple):
    count: jax.Array


# --------------------------------------------------------------------------- validation
def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer))


def _kind(x) -> str:
    return f"{type(x).__name__} ({V._fmt(x)})"


def _check_rp(rp, who: str) -> float:
    if not isinstance(rp, Reparam):
        raise TypeError(f"rp must be an lrjax Reparam config such as lrjax.LoRA(rank=8, alpha=16) ({who} reads "
                        f"the scale s and the rank from it), got {_kind(rp)}")
    name = type(rp).__name__
    if tuple(rp.factor_keys) != ("a", "b") or tuple(getattr(rp, "frozen_keys", ()) or ()):
        raise ValueError(f"rp: {who} needs the form W + s A B with trainable factors 'a' and 'b' only; "
                         f"{name} has factors {list(rp.factor_keys)}"
                         + (f" (frozen {list(rp.frozen_keys)})" if getattr(rp, "frozen_keys", ()) else "")
                         + "; use lrjax.LoRA / lrjax.RSLoRA / lrjax.PiSSA adapters")
    if not getattr(rp, "axes_view", True):
        raise ValueError(f"rp: {who} needs adapters in lrjax's matrix view of the kernel; {name} factors a different "
                         "matricization (loralib's ConvLoRA reshape), which it does not support. Use lrjax.LoRA on conv "
                         "kernels (PEFT's conv convention) instead")
    if type(rp).factors is not Reparam.factors:
        raise ValueError(f"rp: {who} needs the form W + s A B, but {name} overrides factors() (its effective "
                         "weight is not W + s A B); use lrjax.LoRA / lrjax.RSLoRA / lrjax.PiSSA adapters")
    s = rp.scale
    if not isinstance(s, (int, float)) or not s > 0:
        raise ValueError(f"rp: {who} needs a positive float scale, {name}.scale is {V._fmt(s)}")
    return float(s)


def _check_pairs(tree, argname: str, rp: Reparam) -> dict:
    """``{path: (a, b)}`` from an adapters dict, checked eagerly (shapes only)."""
    if tree is None:
        raise TypeError(f"{argname} is None: {_NEEDS} (pass params=adapters to update())")
    if not isinstance(tree, Mapping) or _is_array(tree):
        raise TypeError(f"{argname}: {_NEEDS}, got {_kind(tree)}")
    if not tree:
        raise ValueError(f"{argname} is empty: {_NEEDS}")
    out = {}
    for path, f in tree.items():
        if not isinstance(path, str):
            raise TypeError(f"{argname}: {_NEEDS}; keys must be leaf path strings, got {_kind(path)}")
        if not isinstance(f, Mapping) or set(f) != {"a", "b"}:
            got = sorted(f) if isinstance(f, Mapping) else _kind(f)
            raise ValueError(f"{argname}[{path!r}]: {_NEEDS}; this entry has {got} instead of exactly "
                             "{'a', 'b'} (DoRA's 'm' or other extra factors are not LoRA-Pro's form)")
        a, b = f["a"], f["b"]
        for nm, x in (("a", a), ("b", b)):
            if not _is_array(x):
                raise TypeError(f"{argname}[{path!r}][{nm!r}] must be an array, got {_kind(x)}")
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"{argname}[{path!r}][{nm!r}] has dtype {x.dtype}; factors must be floating")
        if a.ndim < 2 or b.ndim != a.ndim or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"{argname}[{path!r}]: factors a{tuple(a.shape)} b{tuple(b.shape)} do not pair as "
                             "A [*batch, M, r], B [*batch, r, N]")
        rp.check_factor_rank(path, int(a.shape[-1]), argname)
        out[path] = (a, b)
    return out


def _check_match(updates, params, rp) -> tuple[dict, dict]:
    p = _check_pairs(params, "params", rp)
    u = _check_pairs(updates, "updates", rp)
    if set(u) != set(p):
        raise ValueError(f"updates: paths {sorted(set(u) ^ set(p))} are not in both updates and params; pass the "
                         "gradient of the same adapters dict")
    for path in p:
        for nm, x, y in (("a", u[path][0], p[path][0]), ("b", u[path][1], p[path][1])):
            if x.shape != y.shape:
                raise ValueError(f"updates[{path!r}][{nm!r}] has shape {tuple(x.shape)} but params has "
                                 f"{tuple(y.shape)}")
    return u, p


def _check_state_paths(mu, p: dict, argname="state"):
    if not isinstance(mu, Mapping) or set(mu) != set(p):
        raise ValueError(f"{argname} was made by init() for other adapters (paths differ); call init(adapters) "
                         "with the adapters being trained")


def _check_lr(learning_rate):
    if callable(learning_rate):
        return learning_rate
    return V.check_float(learning_rate, "learning_rate", low=0.0)


def _check_betas(b1, b2):
    b1 = V.check_float(b1, "b1", low=0.0, high=1.0, high_open=True)
    b2 = V.check_float(b2, "b2", low=0.0, high=1.0, high_open=True)
    return b1, b2


# --------------------------------------------------------------------------- math
def _t(x):
    return jnp.swapaxes(x, -1, -2)


def _cd(*xs):
    return V.compute_dtype(*(x.dtype for x in xs))


def psd_pinv(m, eps_inv: float = 0.0):
    """``pinv(M + eps_inv I)`` of symmetric PSD ``m: [*b, r, r]`` via ``eigh``.

    Eigenvalues ``<= r * eps(dtype) * max|eigenvalue|`` count as zero (torch ``pinv``'s default
    cutoff), so an all-zero ``m`` with ``eps_inv = 0`` gives 0, never NaN. Computed in ``m``'s dtype.
    """
    r = m.shape[-1]
    m = 0.5 * (m + _t(m)) + eps_inv * jnp.eye(r, dtype=m.dtype)
    w, v = jnp.linalg.eigh(m)
    cut = r * jnp.finfo(m.dtype).eps * jnp.max(jnp.abs(w), axis=-1, keepdims=True)
    keep = w > cut
    inv = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
    return (v * inv[..., None, :]) @ _t(v)


def solve_sylvester_psd(p, q, c):
    """``X`` with ``P X + X Q = C`` for symmetric PSD ``p: [*b, r, r]``, ``q: [*b, k, k]``, ``c: [*b, r, k]``.

    Eigendecompositions ``P = V diag(mu) V^T``, ``Q = U diag(lam) U^T`` (``jnp.linalg.eigh``), then
    ``X = V (V^T C U / (mu_i + lam_j)) U^T``: ``O(r^3 + k^3)``, batched over leading axes. Entries with
    ``mu_i + lam_j <= max(r, k) * eps * max(mu + lam)`` are set to 0 (minimum-norm least-squares
    solution where ``P + Q`` is singular, e.g. ``B = 0`` and a rank-deficient ``A``): never NaN.
    Computed in ``promote_types(p, q, c, float32)``.
    """
    cd = _cd(p, q, c)
    p, q, c = p.astype(cd), q.astype(cd), c.astype(cd)
    mu, v = jnp.linalg.eigh(0.5 * (p + _t(p)))
    lam, u = jnp.linalg.eigh(0.5 * (q + _t(q)))
    mu, lam = jnp.maximum(mu, 0.0), jnp.maximum(lam, 0.0)
    f = _t(v) @ c @ u
    den = mu[..., :, None] + lam[..., None, :]
    cut = max(p.shape[-1], q.shape[-1]) * jnp.finfo(cd).eps * jnp.max(den, axis=(-2, -1), keepdims=True)
    keep = den > cut
    y = jnp.where(keep, f / jnp.where(keep, den, 1.0), 0.0)
    return v @ y @ _t(u)


def _adjust(a, b, ga, gb, scale, x_mode, eps_inv) -> AdjustedGrads:
    """LoRA-Pro's adjusted gradients in the compute dtype of the inputs (module doc, lrjax orientation)."""
    cd = _cd(a, b, ga, gb)
    a, b, ga, gb = (x.astype(cd) for x in (a, b, ga, gb))
    inv_s2 = 1.0 / (scale * scale)
    s_a, s_b = _t(a) @ a, b @ _t(b)                      # A^T A, B B^T   [*b, r, r]
    ia, ib = psd_pinv(s_a, eps_inv), psd_pinv(s_b, eps_inv)
    ga_hat = inv_s2 * (ga @ ib)                          # (1/s^2) g_A S_B^-1
    gb_hat = inv_s2 * (ia @ (gb - ((gb @ _t(b)) @ ib) @ b))   # (1/s^2) S_A^-1 g_B (I - P_B)
    r = a.shape[-1]
    if x_mode == "sylvester":
        x = solve_sylvester_psd(s_a, s_b, -inv_s2 * (_t(a) @ ga @ ib))
    elif x_mode == "symmetry":
        x = -0.5 * inv_s2 * (s_a @ gb @ _t(b) @ ib)
    else:
        x = jnp.zeros(a.shape[:-2] + (r, r), cd)
    return AdjustedGrads(ga_hat + a @ x, gb_hat - x @ b, x)


def lora_pro_adjust(a, b, g_a, g_b, scale: float, *, x_mode: str = "sylvester", eps_inv: float = 1e-8) -> AdjustedGrads:
    """LoRA-Pro's adjusted gradients ``(g~_A, g~_B, X)`` for one factor pair (lrjax orientation).

    Args:
      a, b: ``A: [*batch, M, r]``, ``B: [*batch, r, N]`` (any floating dtype).
      g_a, g_b: their LoRA gradients (same shapes).
      scale: ``s`` (``rp.scale``), a finite real ``> 0``.
      x_mode: ``"sylvester"`` (optimal ``X``), ``"symmetry"`` or ``"zero"`` (module doc).
      eps_inv: the ``eps`` of ``pinv(S + eps I)`` (``>= 0``, default ``1e-8`` as the official code).

    Returns ``AdjustedGrads(a, b, x)`` in ``promote_types(inputs, float32)`` (not rounded), with
    ``s (g~_A B + A g~_B) = G P_B + P_A G (I - P_B)`` whenever ``g_A = s G B^T``, ``g_B = s A^T G``.
    """
    a = V.check_array(a, "a", min_ndim=2, kind="floating")
    b = V.check_array(b, "b", ndim=a.ndim, kind="floating")
    g_a = V.check_array(g_a, "g_a", kind="floating")
    g_b = V.check_array(g_b, "g_b", kind="floating")
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"a{tuple(a.shape)} and b{tuple(b.shape)} do not pair as A [*batch, M, r], B [*batch, r, N]")
    if g_a.shape != a.shape or g_b.shape != b.shape:
        raise ValueError(f"g_a{tuple(g_a.shape)} / g_b{tuple(g_b.shape)} must have the shapes of a{tuple(a.shape)} / "
                         f"b{tuple(b.shape)}")
    scale = V.check_float(scale, "scale", low=0.0, low_open=True)
    V.check_choice(x_mode, "x_mode", X_MODES)
    eps_inv = V.check_float(eps_inv, "eps_inv", low=0.0)
    return _adjust(a, b, g_a, g_b, scale, x_mode, eps_inv)


def _f32(x):
    return jnp.promote_types(x.dtype, jnp.float32)


# --------------------------------------------------------------------------- LoRA-Pro
def scale_by_lora_pro(rp, *, variant: str = "efficient", x_mode: str = "sylvester", b1: float = 0.9,
                      b2: float = 0.999, eps: float = 1e-8, eps_inv: float = 1e-8) -> optax.GradientTransformation:
    """LoRA-Pro's Adam direction for LoRA factors (no learning rate; see :func:`lora_pro`).

    Args:
      rp: the :class:`~lrjax.reparam.base.Reparam` the adapters were made with (``lrjax.LoRA``,
        ``lrjax.RSLoRA``, ``lrjax.PiSSA``); ``s = rp.scale``; factor ranks must equal ``rp.rank``.
      variant: ``"efficient"`` (default; Adam on the adjusted ``A``/``B`` gradients, ``2 (M+N) r``
        state) or ``"full"`` (Adam on the ``M x N`` equivalent gradient, ``2 M N`` state, projected
        back with ``x_mode``'s ``X``). See the module doc.
      x_mode: ``"sylvester"`` (default), ``"symmetry"`` or ``"zero"``.
      b1, b2: Adam decay rates in ``[0, 1)`` (default 0.9, 0.999).
      eps: Adam's ``eps`` (``> 0``, default ``1e-8``), added to ``sqrt(v_hat)``.
      eps_inv: ``pinv(S + eps_inv I)`` regularizer (``>= 0``, default ``1e-8``).

    ``init(params)`` and ``update(updates, state, params)`` take the adapters dict
    ``{path: {"a": A, "b": B}}``; ``params`` is required. State: :class:`LoRAProState`.
    Returns updates with each gradient leaf's dtype (to be scaled by ``-lr``).
    """
    s = _check_rp(rp, "scale_by_lora_pro")
    V.check_choice(variant, "variant", VARIANTS)
    V.check_choice(x_mode, "x_mode", X_MODES)
    b1, b2 = _check_betas(b1, b2)
    eps = V.check_float(eps, "eps", low=0.0, low_open=True)
    eps_inv = V.check_float(eps_inv, "eps_inv", low=0.0)
    full = variant == "full"

    def init_fn(params):
        p = _check_pairs(params, "params", rp)
        if full:
            mu = {k: jnp.zeros(a.shape[:-1] + b.shape[-1:], V.compute_dtype(a.dtype, b.dtype)) for k, (a, b) in p.items()}
        else:
            mu = {k: {"a": jnp.zeros(a.shape, _f32(a)), "b": jnp.zeros(b.shape, _f32(b))} for k, (a, b) in p.items()}
        return LoRAProState(jnp.zeros([], jnp.int32), mu, jax.tree_util.tree_map(jnp.zeros_like, mu))

    def adam(m, v, g, t):
        m = b1 * m + (1.0 - b1) * g.astype(m.dtype)
        v = b2 * v + (1.0 - b2) * jnp.square(g.astype(v.dtype))
        d = (m / (1.0 - b1 ** t)) / (jnp.sqrt(v / (1.0 - b2 ** t)) + eps)
        return m, v, d

    def update_fn(updates, state, params=None):
        u, p = _check_match(updates, params, rp)
        if not isinstance(state, LoRAProState):
            raise TypeError(f"state must be the LoRAProState from init(), got {type(state).__name__}")
        _check_state_paths(state.mu, p)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        new_u, mu, nu = {}, {}, {}
        for k, (a, b) in p.items():
            ga, gb = u[k]
            if not full:
                if not isinstance(state.mu[k], Mapping):
                    raise ValueError(f"state.mu[{k!r}] is a full [*b, M, N] moment: state made by init() of "
                                     "variant='full'; init with the same variant")
                adj = _adjust(a, b, ga, gb, s, x_mode, eps_inv)
                ma, va, da = adam(state.mu[k]["a"], state.nu[k]["a"], adj.a, t)
                mb, vb, db = adam(state.mu[k]["b"], state.nu[k]["b"], adj.b, t)
                mu[k], nu[k] = {"a": ma, "b": mb}, {"a": va, "b": vb}
            else:
                m0 = state.mu[k]
                if not hasattr(m0, "shape") or m0.shape != a.shape[:-1] + b.shape[-1:]:
                    got = tuple(m0.shape) if hasattr(m0, "shape") else "per-factor moments"
                    raise ValueError(f"state.mu[{k!r}] holds {got}, not the full [*b, M, N] = "
                                     f"{a.shape[:-1] + b.shape[-1:]} moment: state made by init() of "
                                     "variant='efficient'; init with the same variant")
                adj0 = _adjust(a, b, ga, gb, s, "zero", eps_inv)
                cd = _cd(a, b, ga, gb)
                a_c, b_c = a.astype(cd), b.astype(cd)
                g_hat = s * (adj0.a @ b_c + a_c @ adj0.b)               # equivalent gradient [*b, M, N]
                mu[k], nu[k], d = adam(m0, state.nu[k], g_hat, t)
                d = d.astype(cd)
                adj = _adjust(a_c, b_c, s * (d @ _t(b_c)), s * (_t(a_c) @ d), s, x_mode, eps_inv)
                da, db = adj.a, adj.b
            new_u[k] = {"a": da.astype(ga.dtype), "b": db.astype(gb.dtype)}
        return new_u, LoRAProState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def lora_pro(learning_rate, rp, *, variant: str = "efficient", x_mode: str = "sylvester", b1: float = 0.9,
             b2: float = 0.999, eps: float = 1e-8, eps_inv: float = 1e-8,
             weight_decay: float = 0.0) -> optax.GradientTransformation:
    """LoRA-Pro: :func:`scale_by_lora_pro` + decoupled weight decay + ``-learning_rate``.

    ``learning_rate``: a float ``>= 0`` or an optax schedule ``count -> lr`` (the paper: 2e-5, cosine,
    3% warmup for Llama-2-7B). ``weight_decay >= 0`` (default 0, the paper's): ``p <- p - lr (u + wd p)``
    on ``A`` and ``B`` (the official efficient optimizer's AdamW decay). Other args: :func:`scale_by_lora_pro`.
    """
    learning_rate = _check_lr(learning_rate)
    weight_decay = V.check_float(weight_decay, "weight_decay", low=0.0)
    parts = [scale_by_lora_pro(rp, variant=variant, x_mode=x_mode, b1=b1, b2=b2, eps=eps, eps_inv=eps_inv)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


# --------------------------------------------------------------------------- LoRA-FA
def scale_by_lora_fa(rp, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                     eps_inv: float = 1e-8) -> optax.GradientTransformation:
    """LoRA-FA's direction: zero for ``A`` (frozen); for ``B`` PEFT's AdamW step (HF ``eps`` placement)
    on ``g~_B = (1/s^2) (A^T A + eps_inv I)^+ g_B`` (torch ``(1/s^2) g_Bt (A_t A_t^T + eps_inv I)^+``):
    ``sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + eps)``.

    Args: ``rp`` as :func:`scale_by_lora_pro`; ``b1, b2`` in ``[0, 1)``; ``eps > 0`` (PEFT's
    ``LoraFAOptimizer`` default ``1e-6``); ``eps_inv >= 0`` (PEFT's ``1e-8``). ``updates``/``params``:
    the adapters dict (the ``'a'`` gradient is ignored). State: :class:`LoRAFAState` (``B``-sized moments).
    """
    s = _check_rp(rp, "scale_by_lora_fa")
    b1, b2 = _check_betas(b1, b2)
    eps = V.check_float(eps, "eps", low=0.0, low_open=True)
    eps_inv = V.check_float(eps_inv, "eps_inv", low=0.0)

    def init_fn(params):
        p = _check_pairs(params, "params", rp)
        mu = {k: jnp.zeros(b.shape, _f32(b)) for k, (a, b) in p.items()}
        return LoRAFAState(jnp.zeros([], jnp.int32), mu, jax.tree_util.tree_map(jnp.zeros_like, mu))

    def update_fn(updates, state, params=None):
        u, p = _check_match(updates, params, rp)
        if not isinstance(state, LoRAFAState):
            raise TypeError(f"state must be the LoRAFAState from init(), got {type(state).__name__}")
        _check_state_paths(state.mu, p)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        new_u, mu, nu = {}, {}, {}
        for k, (a, b) in p.items():
            ga, gb = u[k]
            cd = _cd(a, b, gb)
            a_c = a.astype(cd)
            g = (1.0 / (s * s)) * (psd_pinv(_t(a_c) @ a_c, eps_inv) @ gb.astype(cd))
            m = b1 * state.mu[k] + (1.0 - b1) * g.astype(state.mu[k].dtype)
            v = b2 * state.nu[k] + (1.0 - b2) * jnp.square(g.astype(state.nu[k].dtype))
            d = jnp.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t) * m / (jnp.sqrt(v) + eps)
            mu[k], nu[k] = m, v
            new_u[k] = {"a": jnp.zeros_like(ga), "b": d.astype(gb.dtype)}
        return new_u, LoRAFAState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _peft_step_then_decay(learning_rate, weight_decay: float) -> optax.GradientTransformation:
    """``B <- (B - lr d)(1 - lr wd)`` (PEFT LoraFAOptimizer's order), i.e. update
    ``-lr d (1 - lr wd) - lr wd B``; ``A`` (zero direction) is not decayed."""

    def init_fn(params):
        del params
        return _StepState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        out = {}
        for k, f in updates.items():
            b = params[k]["b"]
            cd = _cd(b, f["b"])
            step = lr * f["b"].astype(cd)
            ub = -step - lr * weight_decay * (b.astype(cd) - step)
            out[k] = {"a": jnp.zeros_like(f["a"]), "b": ub.astype(f["b"].dtype)}
        return out, _StepState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def lora_fa(learning_rate, rp, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, eps_inv: float = 1e-8,
            weight_decay: float = 0.0) -> optax.GradientTransformation:
    """LoRA-FA as PEFT's ``create_lorafa_optimizer(model, r, lora_alpha, lr, weight_decay)``:
    :func:`scale_by_lora_fa`, the step ``B <- B - lr d``, then ``B <- B (1 - lr wd)`` (PEFT's order;
    ``A`` never changes). ``learning_rate``: float ``>= 0`` or optax schedule; ``weight_decay >= 0``."""
    learning_rate = _check_lr(learning_rate)
    weight_decay = V.check_float(weight_decay, "weight_decay", low=0.0)
    inner = scale_by_lora_fa(rp, b1=b1, b2=b2, eps=eps, eps_inv=eps_inv)
    if not weight_decay:
        return optax.chain(inner, optax.scale_by_learning_rate(learning_rate))
    return optax.chain(inner, _peft_step_then_decay(learning_rate, weight_decay))


# --------------------------------------------------------------------------- Riemannian
def scale_by_riemannian_lora(rp, *, reg: float = 1e-2) -> optax.GradientTransformation:
    """The ``r x r`` Riemannian preconditioner of PEFT's ``create_riemannian_optimizer``:
    ``g_A <- g_A (B B^T + reg I)^+``, ``g_B <- (A^T A + reg I)^+ g_B`` (torch:
    ``g_At <- (B_t^T B_t + reg I)^+ g_At``, ``g_Bt <- g_Bt (A_t A_t^T + reg I)^+``). Stateless; chain
    any optimizer after it (:func:`riemannian_lora`). ``reg >= 0`` (default ``1e-2``, PEFT's)."""
    _check_rp(rp, "scale_by_riemannian_lora")
    reg = V.check_float(reg, "reg", low=0.0)

    def init_fn(params):
        _check_pairs(params, "params", rp)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        u, p = _check_match(updates, params, rp)
        out = {}
        for k, (a, b) in p.items():
            ga, gb = u[k]
            cd = _cd(a, b, ga, gb)
            a_c, b_c = a.astype(cd), b.astype(cd)
            na = ga.astype(cd) @ psd_pinv(b_c @ _t(b_c), reg)
            nb = psd_pinv(_t(a_c) @ a_c, reg) @ gb.astype(cd)
            out[k] = {"a": na.astype(ga.dtype), "b": nb.astype(gb.dtype)}
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def riemannian_lora(learning_rate, rp, *, reg: float = 1e-2, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-8, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Riemannian-preconditioned AdamW: :func:`scale_by_riemannian_lora` then ``optax.adamw``
    (equal to PEFT's ``create_riemannian_optimizer(model, torch.optim.AdamW, lr=, reg=, betas=, eps=,
    weight_decay=)``; torch's AdamW default ``weight_decay`` is 0.01, this one's 0.0). For SGD:
    ``optax.chain(scale_by_riemannian_lora(rp), optax.sgd(lr))``."""
    learning_rate = _check_lr(learning_rate)
    b1, b2 = _check_betas(b1, b2)
    eps = V.check_float(eps, "eps", low=0.0, low_open=True)
    weight_decay = V.check_float(weight_decay, "weight_decay", low=0.0)
    return optax.chain(scale_by_riemannian_lora(rp, reg=reg),
                       optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
