"""HGF as a reparameterization: every targeted kernel of an existing params pytree becomes a BitNet
b1.58 ternary projection with a gated low-rank float correction (arXiv:2602.05269; the math and the
choices marked [ours] are in :mod:`lrjax.nn.hgf`).

At each use ``x W`` of a targeted kernel (``W: [M, N]`` in the :mod:`lrjax.axes` matrix view),
:func:`lrjax.factored` computes::

    y = Q_a(x) Q_w(W) + (w(t) g) (x A) B        (HGF)
    y = Q_a(x) Q_w(W)                           (pure_ternary=True: the BitNet arm)

with the straight-through estimator on both quantizers, so for pretraining the base ``W`` (the
latent float weight) *and* the adapters ``a``, ``b``, ``g`` are trained: differentiate
``factored(fn, rp)(base, adapters, x)`` with respect to both. Per leaf the adapter holds ``a [*b,
M, r]`` (``U(-1/sqrt(M), 1/sqrt(M))``), ``b [*b, r, N]`` (zeros), ``g [*b]`` float32
(``gate_init``, 0.1) and ``warm [*b]`` float32 (frozen: the gate warmup multiplier ``w(t)``, set
with :meth:`HGF.with_gate_scale` each step; ``gate_warmup(warmup_steps)(0)`` at init). In
``pure_ternary`` mode every leaf's adapter is the empty dict ``{}`` and ``rank`` is not used.

Usage with the char transformer (``lrjax.models.char_transformer``)::

    from lrjax.reparam.hgf import HGF
    rp = HGF(8, targets=ADAPTER_TARGETS, warmup_steps=200)          # or HGF(pure_ternary=True, ...)
    base, adapters = rp.init(key, state_dict)
    g = lrjax.factored(apply, rp)                                   # g(base, adapters, ids) -> logits
    # each step: adapters = rp.with_gate_scale(adapters, step); grads w.r.t. (base, rp.split(adapters)[0])

Weights: the output depends on ``Q_a(x)``, which is not linear in ``x``, so no dense weight
reproduces it: ``materialize``/``merge``/``unmerge``/``delta`` raise
:class:`lrjax.interpreter.NotMergeable` (HGF is an activation-space variant). The inference form is
:meth:`HGF.pack` (2-bit packed ternary weights + the float correction, :func:`lrjax.nn.hgf.packed_forward`);
:meth:`HGF.dequantized` gives the dequantized ternary weights ``Q_w(W)`` of the targeted leaves (what
the packed codes decode to; a model run on them *without* activation quantization and without the
correction equals the ``quantize_activations=False, pure_ternary=True`` forward).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax.interpreter import KernelValue, dot_views, shift_axes
from lrjax.nn import hgf as H
from lrjax.reparam.base import Reparam

__all__ = ["HGF", "HGFKernel"]


class HGFKernel(KernelValue):
    """The kernel value :meth:`HGF.kernel_value` hands :mod:`lrjax.interpreter`: ``w`` the latent leaf,
    ``f`` the leaf's factors (``{}`` for pure ternary), ``cfg`` the :class:`HGF` config. Follows
    ``dot_general`` contracting the kernel's input axes (any einsum/Dense form), casts and
    ``lax.scan`` stacks; any other use raises :class:`~lrjax.interpreter.NotMergeable`."""

    __slots__ = ("w", "ax", "f", "cfg", "path")

    def __init__(self, w, ax, f, cfg, path=""):
        self.w, self.ax, self.f, self.cfg, self.path = w, ax, f, cfg, path

    def astype(self, dtype):
        return HGFKernel(self.w.astype(dtype), self.ax, self.f, self.cfg, self.path)

    def scan_slices(self):
        n = self.w.shape[0] if self.w.ndim else None
        leaves = jax.tree_util.tree_leaves(self.f)
        if self.ax.batch[:1] != (0,) or any(x.ndim < 1 or x.shape[0] != n for x in leaves):
            return None
        return (self.w, self.f), lambda sl: HGFKernel(sl[0], shift_axes(self.ax), sl[1], self.cfg, self.path)

    def dot(self, x, params, out_aval):
        views = dot_views(x, self.ax, self.w.shape, params)
        if views is None:
            return None
        lc, in_shape, out_shape = views
        free = tuple(i for i in range(x.ndim) if i not in lc)
        lead = tuple(x.shape[i] for i in free)
        m = int(np.prod(in_shape))
        xm = jnp.transpose(x, free + lc).reshape(lead + (m,))
        wm = axes_lib.to_matrix(self.w, self.ax)
        cfg = self.cfg
        if cfg.pure_ternary:
            y = H._bitlinear_cd(xm, wm, cfg.eps, cfg.quantize_activations)
        else:
            f = self.f
            y = H._hgf_cd(xm, wm, f["a"], f["b"], f["warm"] * f["g"], cfg.eps, cfg.quantize_activations)
        return y.astype(out_aval.dtype).reshape(lead + out_shape)


@dataclasses.dataclass(frozen=True)
class HGF(Reparam):
    """HGF (ternary backbone + gated low-rank correction) at every targeted kernel; see the module docstring.

    Args:
      rank: rank ``r`` of the correction, ``1 <= r <= min(M, N)`` of every targeted leaf (not used
        with ``pure_ternary=True``).
      targets, axes, dtype: as for every :class:`~lrjax.reparam.Reparam` (``dtype``: the dtype of
        ``a``/``b``; ``g`` and ``warm`` are float32).
      gate_init: initial learned gate ``g`` (0.1 [ours: the paper's reported equilibrium]); finite.
      warmup_steps: gate warmup length (0: none); the multiplier is
        :func:`lrjax.nn.hgf.gate_warmup` ``(warmup_steps)``, an optax linear schedule 0 -> 1.
      eps: BitNet's epsilon (1e-5).
      quantize_activations: per-token absmax int8 activations (True, BitNet b1.58) or float ``x``.
      pure_ternary: no correction (the BitNet b1.58 arm): adapters are ``{}`` per leaf.

    ``alpha`` must stay ``None`` (the gate plays its role). Errors: TypeError/ValueError naming the
    field at construction; ``rank`` above ``min(M, N)`` of a leaf in :meth:`init`.
    """

    gate_init: float = 0.1
    warmup_steps: int = 0
    eps: float = H.EPS
    quantize_activations: bool = True
    pure_ternary: bool = False

    activation_space = True
    factor_keys = ("a", "b", "g", "warm")
    frozen_keys = ("warm",)
    optional_groups = (("a", "b", "g", "warm"),)

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is not None:
            raise ValueError(f"alpha must be None for HGF (the learned gate g scales the correction), got "
                             f"{self.alpha!r}; set gate_init instead")
        V.check_float(self.gate_init, "gate_init")
        V.check_int(self.warmup_steps, "warmup_steps", low=0)
        V.check_float(self.eps, "eps", low=0.0, low_open=True)
        V.check_bool(self.quantize_activations, "quantize_activations")
        V.check_bool(self.pure_ternary, "pure_ternary")

    @property
    def gate_schedule(self):
        """``w(step)``: :func:`lrjax.nn.hgf.gate_warmup` ``(warmup_steps)`` (an optax schedule)."""
        return H.gate_warmup(self.warmup_steps)

    # ------------------------------------------------------------------ hooks
    def init_leaf(self, key, w, path):
        if self.pure_ternary:
            return w, {}
        *bs, m, n = w.shape
        bs = tuple(bs)
        dt = self.factor_dtype(w)
        bound = 1.0 / np.sqrt(m)
        a = jax.random.uniform(key, (*bs, m, self.rank), jnp.float32, -bound, bound).astype(dt)
        b = jnp.zeros((*bs, self.rank, n), dt)
        g = jnp.full(bs, self.gate_init, jnp.float32)
        warm = jnp.full(bs, self.gate_schedule(0), jnp.float32)
        return w, {"a": a, "b": b, "g": g, "warm": warm}

    def check_leaf_rank(self, path, m, n):
        if not self.pure_ternary:
            super().check_leaf_rank(path, m, n)

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        if self.pure_ternary:
            if f:
                raise ValueError(f"{argname}[{path!r}] holds factors {sorted(f)}, but this HGF is pure_ternary "
                                 "(no correction, adapters are {}); use the config the adapters were made with")
            return
        if not f:
            raise ValueError(f"{argname}[{path!r}] is empty (pure-ternary adapters?), but this HGF has a rank-"
                             f"{self.rank} correction; use HGF(pure_ternary=True, ...) for those adapters")
        super().check_factors(path, f, bshape, m, n, argname, shape)
        for k in ("g", "warm"):
            if tuple(f[k].shape) != tuple(bshape):
                raise ValueError(f"{argname}[{path!r}][{k!r}] must have shape {tuple(bshape)} (one scalar per "
                                 f"matrix), got {tuple(f[k].shape)}")

    def kernel_value(self, path, leaf, f, *, mode="auto"):
        return HGFKernel(leaf, self.leaf_axes(path, leaf.shape), self.frozen_view(f), self, path)

    # ------------------------------------------------------------------ extras
    def with_gate_scale(self, adapters, step):
        """``adapters`` with every leaf's ``warm`` set to ``gate_schedule(step)`` (``step``: an int >= 0
        or an integer scalar array, e.g. the optimizer's step count under ``jit``). No-op for pure
        ternary. Raises TypeError (bool, float, non-integer array ``step``) / ValueError (non-scalar or
        concrete negative ``step``)."""
        self._check_adapters_dict(adapters, "adapters")
        step = H.check_step(step)
        if self.pure_ternary:
            return dict(adapters)
        v = jnp.asarray(self.gate_schedule(step), jnp.float32)
        return {p: {**f, "warm": jnp.broadcast_to(v, f["warm"].shape).astype(jnp.float32)}
                for p, f in adapters.items()}

    def _leaves(self, base, adapters):
        flat = self._check(base, adapters, basename="base")
        self._check_finite(flat, adapters, basename="base")
        return flat

    def dequantized(self, base, adapters):
        """``base`` with every adapted leaf replaced by its dequantized ternary weight ``Q_w(W)`` (leaf
        layout and dtype, no gradient)."""
        flat = self._leaves(base, adapters)
        new = {}
        for path in adapters:
            leaf = flat[path]
            wm = self.to_view(path, jax.lax.stop_gradient(leaf))
            new[path] = self.from_view(path, H._ternary_value(wm, self.eps).astype(leaf.dtype), leaf.shape)
        return tree_lib.replace(base, new)

    def pack(self, base, adapters) -> dict:
        """``{path: lrjax.nn.hgf.PackedHGF}``: the inference form of every adapted (2-D matrix view) leaf,
        with the gate folded to ``warm * g``; run one with :func:`lrjax.nn.hgf.packed_forward` on the
        layer's input ``[..., M]``. Stacked ``[L, ...]`` leaves are refused (pack each layer's slice)."""
        flat = self._leaves(base, adapters)
        out = {}
        for path, f in adapters.items():
            wm = self.to_view(path, flat[path])
            if wm.ndim != 2:
                raise ValueError(f"adapters[{path!r}]: the leaf's matrix view is stacked {tuple(wm.shape)}; pack "
                                 "works per [M, N] matrix: slice the stack and call lrjax.nn.hgf.pack_hgf")
            if self.pure_ternary:
                out[path] = H.pack_hgf(wm, eps=self.eps, quantize_activations=self.quantize_activations)
            else:
                out[path] = H.pack_hgf(wm, f["a"], f["b"], f["warm"] * f["g"], eps=self.eps,
                                       quantize_activations=self.quantize_activations)
        return out
