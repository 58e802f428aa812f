"""Post-training low-rank compression of any params pytree: one SVD toolkit with rank rules.

Every selected leaf (:mod:`lrjax.tree` patterns) is viewed as a batch of matrices ``[*batch, M, N]``
(:mod:`lrjax.axes`: ``M`` = input axes, ``N`` = output axes, ``y = x @ W``) and replaced by factors
``W ~= A @ B`` with ``A: [*batch, M, r]``, ``B: [*batch, r, N]`` (``A = U_r sqrt(S_r)``,
``B = sqrt(S_r) V_r^T``, the split used by WeLore, PELA and Palu).

Factorizations (``method=``):

* ``"svd"``: exact truncated SVD (:func:`lrjax.linalg.svd`, float32), optimal in ``||W - AB||_F``.
* ``"whitened"`` (Palu / SVD-LLM): given calibration activations ``X: [n, M]`` of the layer's
  input, minimize the *output* error ``||X W - X A B||_F``. With ``X^T X + eps I = S S^T``
  (Cholesky, ``S`` lower) that error is ``||S^T (W - AB)||_F``, so the optimum is the truncated SVD
  ``S^T W = U diag(s) V^T``, ``A = S^{-T} U_r sqrt(s_r)``, ``B = sqrt(s_r) V_r^T``, and the output
  error is exactly ``sqrt(sum_{i>r} s_i^2)`` (``s`` = singular values of ``S^T W``; Palu writes the
  same for ``W [out, in]`` as ``W S``). ``eps`` (default ``1e-4``, relative: ``eps * mean(diag
  X^T X)``, i.e. the error is measured for ``X^T X + eps mean(diag) I``) makes ``S`` exist in
  float32 for rank-deficient or ill-conditioned ``X`` (fewer samples than ``M``, dead inputs);
  a Cholesky that still fails (e.g. ``eps=0`` with rank-deficient ``X``) is refused with a
  ``ValueError``, never returned as NaN factors.
* ``"randomized"``: :func:`lrjax.linalg.randomized_svd` (Halko et al.), for rules that fix the rank
  before the SVD (``rank=`` or ``ratio=``); needs ``key``.

Rank rules (exactly one):

* ``rank=r`` (an int, or ``{path: int}``): fixed; ``1 <= r <= min(M, N)`` (lrjax's one rank rule,
  :func:`lrjax._validation.check_rank`; larger is refused).
* ``energy=e`` in ``(0, 1]``: smallest ``r`` keeping ``e`` of ``sum s_i^2`` (:func:`lrjax.linalg.energy_rank`).
* ``ratio=c > 1`` (PELA): ``r = max(1, floor(M N / (c (M + N))))``, so ``r (M + N) ~= M N / c``.
* ``reduction=f`` in ``(0, 1)`` (WeLore): normalized spectrum ``s_hat = (s - min s)/(max s - min s)``
  per matrix, ``k = #{s_hat >= tau}`` kept, one global ``tau`` for the model found by bisection so
  that the total reduction reaches ``f`` (``by="params"``: parameters of the selected matrices,
  factored ones counted as ``k (M + N)``; ``by="rank"``: the sum of ranks, as WeLore's tables).
  A matrix whose pruned fraction ``1 - k / min(M, N)`` is ``<= min_ratio`` stays dense (WeLore's
  N-LRC). See :func:`welore_keep` and :func:`welore_tau`.

Stacked leaves (``[L, M, N]`` from ``nn.scan``) are factorized in one batched call; their factors
are stacked too, so one rank serves the whole stack: the largest rank the rule gives over the
stack (a shape must be static). The report shows that rank. Their calibration activations are
per layer, ``calib[path]: [L, n, M]`` (``X[l]`` = the input of layer ``l``), which
:func:`collect_activations` returns for a kernel sliced by a ``scan``.

Output: :class:`Compressed` ``(base, factors, rp, report)``. ``factors = {path: {"a": A, "b": B}}``;
``base`` is ``params`` with every factored leaf set to zeros (a placeholder that carries the shape)
and every other leaf unchanged; ``rp`` is a :class:`lrjax.reparam.Reparam` with scale 1, so the
existing paths run it unchanged::

    c = lrjax.compress.compress(params, "kernel", ratio=2.0)
    y = lrjax.factored(apply, c.rp)(c.base, c.factors, x)   # x W_0 + (x A) B, W_0 = 0
    dense = c.materialize()                                 # base + A B as a plain params tree
    print(c.report.table())

(The factored path still runs the zero dense product ``x 0``; ``bytes_after`` counts what a deployed
model stores: the factors and the untouched leaves.)

Validation: every argument is checked eagerly (TypeError for the wrong kind, ValueError for a wrong
value, naming the argument); weights and calibration activations with NaN/Inf are refused.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from lrjax import axes as axes_lib
from lrjax import linalg
from lrjax import tree as tree_lib
from lrjax._validation import (check_array, check_choice, check_finite, check_float, check_int,
                               check_rank)
from lrjax._validation import check_key, check_params
from lrjax.reparam.base import Reparam

__all__ = ["Compressed", "LowRankParams", "LayerReport", "Report", "compress", "whitened_svd", "factorize",
           "pela_rank", "welore_keep", "welore_tau", "energy_keep", "collect_activations", "tree_bytes",
           "METHODS"]

METHODS = ("svd", "whitened", "randomized")


# ------------------------------------------------------------------------------------ reparam
@dataclasses.dataclass(frozen=True)
class LowRankParams(Reparam):
    """The :class:`~lrjax.reparam.Reparam` of a compressed tree: ``W_eff = W + A B`` (scale 1) at the
    exact paths in ``targets``; factor ranks vary per leaf (``rank`` is unused)."""

    rank: int = 1

    @property
    def scale(self) -> float:
        return 1.0

    def check_leaf_rank(self, path, m, n):  # ranks are per leaf, fixed by the factors
        return None

    def check_factor_rank(self, path, r, argname="adapters"):  # per-leaf ranks
        return None


def _rp_for(paths, axes) -> LowRankParams:
    return LowRankParams(rank=1, targets=tuple(re.escape(p) for p in paths), axes=axes)


# ------------------------------------------------------------------------------------- report
class LayerReport(NamedTuple):
    """One compressed leaf: its matrix view, kept rank, storage and relative weight error
    ``||W - AB||_F / ||W||_F`` (0 for a leaf kept dense)."""

    path: str
    batch: tuple
    m: int
    n: int
    rank: int
    full_rank: int
    bytes_before: int
    bytes_after: int
    rel_error: float
    kind: str  # "lowrank" or "dense"


@dataclasses.dataclass
class Report:
    """Per-layer report of one compression; ``table()`` prints it as markdown."""

    layers: list
    rule: str
    method: str
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def bytes_before(self) -> int:
        return int(sum(r.bytes_before for r in self.layers))

    @property
    def bytes_after(self) -> int:
        return int(sum(r.bytes_after for r in self.layers))

    @property
    def ratio(self) -> float:
        """Stored bytes after / before over the selected leaves."""
        return self.bytes_after / max(1, self.bytes_before)

    def table(self) -> str:
        head = ("| leaf | matrix | rank / full | bytes before | bytes after | rel. error | kept as |\n"
                "|---|---|---:|---:|---:|---:|---|\n")
        rows = []
        for r in self.layers:
            mat = "x".join(str(b) for b in r.batch) + (" x " if r.batch else "") + f"{r.m}x{r.n}"
            rows.append(f"| {r.path} | {mat} | {r.rank} / {r.full_rank} | {r.bytes_before} | {r.bytes_after} | "
                        f"{r.rel_error:.4f} | {r.kind} |")
        tot = (f"| **total** ({self.method}, {self.rule}) | | | {self.bytes_before} | {self.bytes_after} | "
               f"ratio {self.ratio:.3f} | |")
        return head + "\n".join(rows + [tot])

    def as_dict(self) -> dict:
        return {"rule": self.rule, "method": self.method, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "ratio": self.ratio,
                "model_bytes_before": self.model_bytes_before, "model_bytes_after": self.model_bytes_after,
                "layers": [r._asdict() for r in self.layers], **self.extra}


class Compressed(NamedTuple):
    """``(base, factors, rp, report)``; see the module docstring."""

    base: Any
    factors: dict
    rp: LowRankParams
    report: Report

    def materialize(self):
        """Dense params ``base + A B`` at every factored leaf (for evaluation or export)."""
        return self.rp.materialize(self.base, self.factors)


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of ``tree``."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
                   if hasattr(x, "dtype")))


# ---------------------------------------------------------------------------------- rank rules
def pela_rank(m: int, n: int, c: float) -> int:
    """PELA's rank for an ``[m, n]`` matrix at compression ratio ``c > 1``:
    ``max(1, floor(m n / (c (m + n))))`` (then ``r (m + n) <= m n / c``)."""
    m = check_int(m, "m", low=1)
    n = check_int(n, "n", low=1)
    c = check_float(c, "ratio", low=1.0, low_open=True)
    return max(1, int(math.floor(m * n / (c * (m + n)))))


def _check_spectrum(s, name="s"):
    s = check_array(s, name, min_ndim=1, kind="numeric", convert=True)
    check_finite(s, name)
    if s.shape[-1] < 1:
        raise ValueError(f"{name} must hold at least one singular value, got shape {tuple(s.shape)}")
    return s


def welore_keep(s, tau: float):
    """WeLore's kept rank of a spectrum ``s [..., k]``: ``#{s_hat >= tau}`` with
    ``s_hat = (s - min s) / (max s - min s)`` (a flat spectrum keeps everything). Jittable in ``s``."""
    s = _check_spectrum(s)
    tau = check_float(tau, "tau", low=0.0, high=1.0)
    s = jnp.asarray(s, jnp.float32)
    lo, hi = jnp.min(s, -1, keepdims=True), jnp.max(s, -1, keepdims=True)
    span = hi - lo
    shat = jnp.where(span > 0, (s - lo) / jnp.where(span > 0, span, 1.0), 1.0)
    return jnp.sum(shat >= tau, axis=-1)


def energy_keep(s, energy: float):
    """Smallest rank keeping ``energy`` of ``sum s^2`` (:func:`lrjax.linalg.energy_rank`), checked."""
    s = _check_spectrum(s)
    energy = check_float(energy, "energy", low=0.0, high=1.0, low_open=True)
    return linalg.energy_rank(s, energy)


def _welore_cost(keeps, shapes, by, min_ratio):
    total = 0
    for k, (m, n) in zip(keeps, shapes):
        full = min(m, n)
        pruned = 1.0 - k / full
        lrc = pruned > min_ratio
        if by == "rank":
            total += k if lrc else full
        else:
            total += k * (m + n) if lrc else m * n
    return total


def welore_tau(spectra, reduction: float, *, shapes=None, by: str = "rank",
               min_ratio: float = 0.0) -> tuple[float, list[int]]:
    """One global WeLore threshold ``tau`` for a list of spectra (one 1-D array per matrix).

    Returns ``(tau, keeps)``: the smallest threshold whose total reduction ``1 - after / before``
    is ``>= reduction``, and the kept rank per matrix. The kept ranks only change where ``tau``
    crosses one of the normalized singular values, so the search is exact over those breakpoints
    (no bisection tolerance); ``tau`` is reported as the midpoint of its interval.
    ``by="rank"`` measures the sum of ranks (``before = sum min(M, N)``); ``by="params"`` the stored
    parameters (``shapes`` ``[(M, N), ...]`` required; ``before = sum M N``, a factored matrix costs
    ``k (M + N)``, a matrix with pruned fraction ``<= min_ratio`` stays dense at ``M N``; this cost
    is not monotone in ``tau`` for small matrices, the smallest ``tau`` that reaches the target is
    taken). ``ValueError`` if no ``tau`` reaches the target.
    """
    if not isinstance(spectra, (list, tuple)) or not spectra:
        raise TypeError(f"spectra must be a non-empty list of 1-D singular-value arrays, got {type(spectra).__name__}")
    spectra = [np.asarray(_check_spectrum(s, f"spectra[{i}]"), np.float64) for i, s in enumerate(spectra)]
    for i, s in enumerate(spectra):
        if s.ndim != 1:
            raise ValueError(f"spectra[{i}] must be 1-D, got shape {s.shape}")
    reduction = check_float(reduction, "reduction", low=0.0, high=1.0, low_open=True, high_open=True)
    by = check_choice(by, "by", ("rank", "params"))
    min_ratio = check_float(min_ratio, "min_ratio", low=0.0, high=1.0, high_open=True)
    if shapes is None:
        if by == "params":
            raise ValueError("shapes must be given with by='params' (one (M, N) per spectrum)")
        shapes = [(len(s), len(s)) for s in spectra]
    if len(shapes) != len(spectra):
        raise ValueError(f"shapes must have one (M, N) per spectrum: {len(shapes)} vs {len(spectra)}")
    shat = []
    for s in spectra:
        lo, hi = s.min(), s.max()
        shat.append(np.sort((s - lo) / (hi - lo)) if hi > lo else np.ones_like(s))
    before = sum(m * n for m, n in shapes) if by == "params" else sum(min(m, n) for m, n in shapes)
    cands = np.unique(np.concatenate(shat))
    cands = cands[cands < 1.0]
    for j, v in enumerate(cands):  # tau in (v, next]: everything <= v is pruned
        keeps = [int(len(h) - np.searchsorted(h, v, side="right")) for h in shat]
        if 1.0 - _welore_cost(keeps, shapes, by, min_ratio) / before >= reduction:
            nxt = cands[j + 1] if j + 1 < len(cands) else 1.0
            return float(0.5 * (v + nxt)), keeps
    raise ValueError(f"reduction={reduction} cannot be reached by any tau" +
                     (" (factored small matrices cost more than dense ones); lower `reduction` or use by='rank'"
                      if by == "params" else "; lower `reduction`"))


# --------------------------------------------------------------------------- factorizations
@functools.partial(jax.jit, static_argnames=())
def _spectrum(w):
    return linalg.svd(w)


def _gram_chol(x, eps):
    x = x.astype(jnp.float32)
    g = jnp.swapaxes(x, -1, -2) @ x
    m = g.shape[-1]
    scale = jnp.mean(jnp.diagonal(g, axis1=-2, axis2=-1), axis=-1)[..., None, None]
    return jnp.linalg.cholesky(g + eps * scale * jnp.eye(m, dtype=g.dtype))


@jax.jit
def _whitened_spectrum(w, x, eps):
    s_low = _gram_chol(x, eps)
    return s_low, linalg.svd(jnp.swapaxes(s_low, -1, -2) @ w.astype(jnp.float32))


def _split(u, s, vt, r):
    root = jnp.sqrt(s[..., :r])
    return u[..., :, :r] * root[..., None, :], root[..., :, None] * vt[..., :r, :]


def whitened_svd(w, x, rank: int | None = None, *, eps: float = 1e-4):
    """Palu's whitened SVD of one matrix (or a stack) ``w: [*batch, M, N]`` for inputs
    ``x: [*batch, n, M]``. Returns ``(a, b, s)``: factors ``a: [*batch, M, r]``, ``b: [*batch, r, N]``
    minimizing ``||x w - x a b||_F`` and ``s``, all singular values of ``S^T w``; the output error is
    ``sqrt(sum(s[r:]**2))`` (up to the ``eps`` regularization)."""
    w = check_array(w, "w", min_ndim=2, kind="floating")
    _, m, n = w.shape[:-2], w.shape[-2], w.shape[-1]
    x = _check_calib(x, w.shape, "x")
    eps = check_float(eps, "eps", low=0.0)
    check_finite(w, "w")
    if rank is not None:
        rank = check_rank(rank, m, n)
    s_low, (u, s, vt) = _whitened_spectrum(w, x, eps)
    _check_chol(s_low, "x", eps)
    r = min(m, n) if rank is None else rank
    a, b = _split(u, s, vt, r)
    a = jax.scipy.linalg.solve_triangular(jnp.swapaxes(s_low, -1, -2), a, lower=False)
    return a, b, s


def _check_chol(s_low, name, eps):
    if not bool(jnp.all(jnp.isfinite(s_low))):
        raise ValueError(f"{name}: the Cholesky factor of X^T X + eps * mean(diag) * I failed in float32 "
                         f"(rank-deficient or ill-conditioned activations, eps={eps}); raise `eps` (default 1e-4) "
                         "or pass more samples")


def _check_calib(x, wshape, name):
    x = check_array(x, name, min_ndim=2, kind="floating")
    bshape, m = tuple(wshape[:-2]), wshape[-2]
    if x.shape[-1] != m:
        raise ValueError(f"{name} must be calibration activations [n_samples, {m}] (the layer's input width "
                         f"M={m}), got shape {tuple(x.shape)}")
    if tuple(x.shape[:-2]) != bshape:
        raise ValueError(f"{name} must have the leaf's batch axes {bshape} before [n_samples, {m}], "
                         f"got shape {tuple(x.shape)}")
    check_finite(x, name)
    return x


def factorize(w, rank: int, *, method: str = "svd", x=None, key=None, eps: float = 1e-4,
              oversample: int = 8, n_iter: int = 2):
    """Rank-``rank`` factors ``(a, b)`` of ``w: [*batch, M, N]`` by ``method`` (see module docstring)."""
    w = check_array(w, "w", min_ndim=2, kind="floating")
    method = check_choice(method, "method", METHODS)
    rank = check_rank(rank, w.shape[-2], w.shape[-1])
    check_finite(w, "w")
    if method == "whitened":
        if x is None:
            raise ValueError("x (calibration activations) is required for method='whitened'")
        a, b, _ = whitened_svd(w, x, rank, eps=eps)
        return a, b
    if method == "randomized":
        if key is None:
            raise ValueError("key is required for method='randomized' (a jax.random key)")
        check_key(key)
        u, s, vt = linalg.randomized_svd(key, w, rank, oversample=check_int(oversample, "oversample", low=0),
                                         n_iter=check_int(n_iter, "n_iter", low=0))
    else:
        u, s, vt = _spectrum(w)
    return _split(u, s, vt, rank)


# --------------------------------------------------------------------------- activations
_CALLS = {"pjit", "jit", "closed_call", "core_call"}


def collect_activations(fn: Callable, params, targets, *args, axes=None, max_rows: int | None = None) -> dict:
    """Calibration activations of the targeted kernels: ``{path: X [n, M]}``, the left operand of
    every ``x @ W`` that ``fn(params, *args)`` computes with the leaf (rows of all uses stacked).

    Works by evaluating ``fn``'s jaxpr (nested ``jit`` calls are followed, dtype casts of the kernel
    too). ``scan`` bodies are followed as well: a scan that receives a targeted leaf is unrolled
    eagerly (``reverse`` respected, results identical to the scan), and a stacked leaf
    ``[*batch, M, N]`` that the scan slices per iteration (a linen ``nn.scan`` stack ``[L, in, out]``;
    nested scans slice one batch axis each) gets **per-layer** activations stacked as
    ``X: [*batch, n, M]`` -- the layout :func:`compress` expects in ``calib`` for stacked leaves
    (``X[l]`` is the input of layer ``l``; its rows are the uses of that slice, in order). Every
    slice must be used, with the same number of rows (else ``ValueError``). A kernel used only in
    another form (a conv, a non-default axes view, a ``while``/``cond`` body, a stack used whole)
    is reported as not found (``ValueError``): pass its activations to :func:`compress` yourself.
    ``max_rows`` keeps the first rows only (per layer for stacks).
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable fn(params, *args), got {type(fn).__name__}")
    max_rows = check_int(max_rows, "max_rows", low=1, allow_none=True)
    check_params(params)
    paths = tree_lib.select(params, targets, where=lambda p, l: hasattr(l, "ndim") and l.ndim >= 2)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = [tree_lib.path_str(p) for p, _ in leaves]
    vals = [v for _, v in leaves]
    arg_leaves, arg_tree = jax.tree_util.tree_flatten(args)
    axs = {p: axes_lib.resolve(p, vals[keys.index(p)].shape, axes) for p in paths}

    def flat_fn(lv, av):
        return fn(jax.tree_util.tree_unflatten(treedef, lv), *jax.tree_util.tree_unflatten(arg_tree, av))

    closed = jax.make_jaxpr(flat_fn)(vals, arg_leaves)
    # a tag is (path, idx): the value is the leaf sliced at the leading batch index tuple idx
    found: dict = {p: [] for p in paths}  # path -> [(idx, X [rows, M])]

    def run(jaxpr, consts, ins, tags):
        env, tag = {}, {}
        read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]  # noqa: E731
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, a, t in zip(jaxpr.invars, ins, tags):
            env[v] = a
            if t is not None:
                tag[v] = t
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            itags = [None if isinstance(v, jcore.Literal) else tag.get(v) for v in eqn.invars]
            name = eqn.primitive.name
            tagged = any(t is not None for t in itags)
            if name in _CALLS and "jaxpr" in eqn.params and tagged:
                inner = eqn.params["jaxpr"]
                ij, ic = (inner.jaxpr, inner.consts) if hasattr(inner, "jaxpr") else (inner, ())
                out = run(ij, ic, invals, itags)
            elif name == "scan" and tagged:
                out = run_scan(eqn, invals, itags)
            else:
                if name == "dot_general" and itags[1] is not None and itags[0] is None:
                    p, idx = itags[1]
                    k = len(idx)
                    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
                    ax = axs[p]
                    if (not lb and not rb and len(ax.batch) == k and ax.batch == tuple(range(k))
                            and tuple(rc) == tuple(a - k for a in ax.inp)):
                        x = invals[0]
                        keep = [i for i in range(x.ndim) if i not in lc]
                        x = jnp.transpose(x, keep + list(lc)).reshape(-1, int(np.prod([x.shape[i] for i in lc])))
                        found[p].append((idx, x))
                out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                if name in ("convert_element_type", "copy", "copy_p") and itags[0] is not None:
                    tag[eqn.outvars[0]] = itags[0]
            outs = out if eqn.primitive.multiple_results else [out]
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def run_scan(eqn, invals, itags):
        # unroll: consts keep their tags, a tagged xs operand is sliced (its tag gains the index)
        prm = eqn.params
        nc, nk, length = prm["num_consts"], prm["num_carry"], prm["length"]
        body = prm["jaxpr"]
        consts, carry, xs = invals[:nc], list(invals[nc:nc + nk]), invals[nc + nk:]
        ctags, xtags = itags[:nc], itags[nc + nk:]
        ys = [None] * length
        for i in (range(length - 1, -1, -1) if prm["reverse"] else range(length)):
            xi = [x[i] for x in xs]
            xt = [None if t is None else (t[0], t[1] + (i,)) for t in xtags]
            res = run(body.jaxpr, body.consts, list(consts) + carry + xi, list(ctags) + [None] * nk + xt)
            carry, ys[i] = list(res[:nk]), res[nk:]
        nys = len(eqn.outvars) - nk
        stacked = [jnp.stack([ys[i][j] for i in range(length)]) for j in range(nys)]
        return carry + stacked

    in_tags = [(k, ()) if k in found else None for k in keys] + [None] * len(arg_leaves)
    run(closed.jaxpr, closed.consts, vals + list(arg_leaves), in_tags)
    missing = [p for p, xs in found.items() if not xs]
    if missing:
        raise ValueError(f"targets: no plain x @ W use of {missing} found in fn (a conv, a while/cond body, a "
                         "stack used whole or a non-default axes view?); pass their activations as "
                         "calib={path: X} instead")
    out = {}
    for p, uses in found.items():
        bshape = tuple(vals[keys.index(p)].shape[i] for i in axs[p].batch)
        if not bshape:
            out[p] = jnp.concatenate([x.astype(jnp.float32) for _, x in uses], 0)
            continue
        per: dict = {}
        for idx, x in uses:
            per.setdefault(idx, []).append(x.astype(jnp.float32))
        want = list(np.ndindex(*bshape))
        lacking = [i for i in want if i not in per]
        if lacking:
            raise ValueError(f"targets: the stacked leaf {p!r} {bshape} has no x @ W use for slices {lacking[:4]} "
                             "(only some layers of the scan use it?); pass calib={path: X [*batch, n, M]} yourself")
        mats = [jnp.concatenate(per[i], 0) for i in want]
        rows = {int(m.shape[0]) for m in mats}
        if len(rows) != 1:
            raise ValueError(f"targets: the slices of the stacked leaf {p!r} see different numbers of rows "
                             f"{sorted(rows)}; pass calib={{path: X [*batch, n, M]}} yourself")
        out[p] = jnp.stack(mats).reshape(bshape + mats[0].shape)
    if max_rows is not None:
        out = {p: x[..., :max_rows, :] for p, x in out.items()}
    return out


# --------------------------------------------------------------------------------- compress
def compress(params, targets="kernel", *, rank=None, energy: float | None = None, ratio: float | None = None,
             reduction: float | None = None, method: str = "svd", calib: dict | None = None, key=None,
             axes=None, eps: float = 1e-4, by: str = "params", min_ratio: float = 0.0,
             oversample: int = 8, n_iter: int = 2) -> Compressed:
    """Compress the leaves of ``params`` selected by ``targets``; see the module docstring.

    Args:
      params: any pytree of arrays.
      targets: :mod:`lrjax.tree` pattern(s) (default every ``kernel``); leaves must have ndim >= 2.
      rank / energy / ratio / reduction: the rank rule (exactly one).
      method: ``"svd"``, ``"whitened"`` (needs ``calib``) or ``"randomized"`` (needs ``key``).
      calib: ``{path: X [*batch, n, M]}`` calibration activations (:func:`collect_activations`).
      axes: matrix-view override (:mod:`lrjax.axes`).
      eps: whitening regularization (relative, ``>= 0``).
      by, min_ratio: WeLore's reduction measure and LRC threshold (``reduction=`` only).
      oversample, n_iter: randomized SVD settings.
    """
    check_params(params)
    rules = {"rank": rank, "energy": energy, "ratio": ratio, "reduction": reduction}
    given = [k for k, v in rules.items() if v is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one rank rule of rank=, energy=, ratio=, reduction=; got {given or 'none'}")
    rule = given[0]
    method = check_choice(method, "method", METHODS)
    eps = check_float(eps, "eps", low=0.0)
    by = check_choice(by, "by", ("rank", "params"))
    min_ratio = check_float(min_ratio, "min_ratio", low=0.0, high=1.0, high_open=True)
    oversample = check_int(oversample, "oversample", low=0)
    n_iter = check_int(n_iter, "n_iter", low=0)
    if energy is not None:
        energy = check_float(energy, "energy", low=0.0, high=1.0, low_open=True)
    if ratio is not None:
        ratio = check_float(ratio, "ratio", low=1.0, low_open=True)
    if reduction is not None:
        reduction = check_float(reduction, "reduction", low=0.0, high=1.0, low_open=True, high_open=True)
    if rank is not None and not isinstance(rank, dict):
        rank = check_int(rank, "rank", low=1)
    if method == "randomized":
        if rule in ("energy", "reduction"):
            raise ValueError(f"method='randomized' computes only the top singular values; {rule}= needs the full "
                             "spectrum: use method='svd' or 'whitened', or a rank=/ratio= rule")
        if key is None:
            raise ValueError("key is required for method='randomized' (e.g. jax.random.key(0))")
        check_key(key)
    if method == "whitened" and calib is None:
        raise ValueError("calib is required for method='whitened': {path: activations [n_samples, M]} "
                         "(see lrjax.compress.collect_activations)")
    if calib is not None and not isinstance(calib, dict):
        raise TypeError(f"calib must be a dict {{path: activations [n_samples, M]}}, got {type(calib).__name__}")

    flat = tree_lib.flatten(params)
    paths = tree_lib.select(params, targets, where=lambda p, l: hasattr(l, "ndim") and hasattr(l, "dtype"))
    if isinstance(rank, dict):
        unknown = sorted(set(rank) - set(paths))
        if unknown:
            raise ValueError(f"rank: paths {unknown} are not among the selected leaves {paths}")
        missing = [p for p in paths if p not in rank]
        if missing:
            raise ValueError(f"rank: a dict of ranks needs one entry per selected leaf; missing {missing}")
    views = {}
    for p in paths:
        leaf = flat[p]
        check_array(leaf, f"params[{p!r}]", min_ndim=2, kind="floating")
        ax = axes_lib.resolve(p, leaf.shape, axes)
        bshape, m, n = axes_lib.matrix_shape(leaf.shape, ax)
        if rule == "rank":
            check_rank(rank[p] if isinstance(rank, dict) else rank, m, n, where=f"leaf {p!r}")
        check_finite(leaf, f"params[{p!r}]")
        views[p] = (ax, bshape, m, n, axes_lib.to_matrix(leaf, ax))
    if method == "whitened":
        missing = [p for p in paths if p not in calib]
        if missing:
            raise ValueError(f"calib: no activations for {missing}; give one [n_samples, M] array per selected leaf")
        for p in paths:
            _check_calib(calib[p], views[p][4].shape, f"calib[{p!r}]")

    # spectra (and whitening factors) of every selected leaf
    spec = {}
    for p in paths:
        w = views[p][4]
        if method == "whitened":
            s_low, usv = _whitened_spectrum(w, calib[p], eps)
            _check_chol(s_low, f"calib[{p!r}]", eps)
            spec[p] = (usv, s_low)
        elif method == "svd":
            spec[p] = (_spectrum(w), None)
        else:
            spec[p] = (None, None)

    # ranks
    extra = {}
    ranks, dense = {}, set()
    if rule == "rank":
        ranks = {p: (rank[p] if isinstance(rank, dict) else rank) for p in paths}
    elif rule == "ratio":
        ranks = {p: pela_rank(views[p][2], views[p][3], ratio) for p in paths}
    elif rule == "energy":
        ranks = {p: int(jnp.max(linalg.energy_rank(spec[p][0].s, energy))) for p in paths}
    else:
        slist, shapes, owner = [], [], []
        for p in paths:
            s = np.asarray(spec[p][0].s).reshape(-1, spec[p][0].s.shape[-1])
            for row in s:
                slist.append(row)
                shapes.append((views[p][2], views[p][3]))
                owner.append(p)
        tau, keeps = welore_tau(slist, reduction, shapes=shapes, by=by, min_ratio=min_ratio)
        extra = {"tau": tau, "by": by, "min_ratio": min_ratio, "keeps": keeps}
        for p in paths:
            ks = [k for k, o in zip(keeps, owner) if o == p]
            full = min(views[p][2], views[p][3])
            if all(1.0 - k / full <= min_ratio for k in ks):
                dense.add(p)
            else:
                ranks[p] = max(1, max(ks))

    factors, new_base, layers = {}, {}, []
    for i, p in enumerate(paths):
        ax, bshape, m, n, w = views[p]
        leaf = flat[p]
        isz = jnp.dtype(leaf.dtype).itemsize
        nb = int(np.prod(bshape)) if bshape else 1
        before = leaf.size * isz
        if p in dense:
            layers.append(LayerReport(p, bshape, m, n, min(m, n), min(m, n), before, before, 0.0, "dense"))
            continue
        r = ranks[p]
        if method == "randomized":
            a, b = factorize(w, r, method="randomized", key=jax.random.fold_in(key, i), oversample=oversample,
                             n_iter=n_iter)
        else:
            (u, s, vt), s_low = spec[p]
            a, b = _split(u, s, vt, r)
            if s_low is not None:
                a = jax.scipy.linalg.solve_triangular(jnp.swapaxes(s_low, -1, -2), a, lower=False)
        a, b = a.astype(leaf.dtype), b.astype(leaf.dtype)
        err = float(jnp.linalg.norm((w.astype(jnp.float32) - a.astype(jnp.float32) @ b.astype(jnp.float32)).ravel())
                    / jnp.maximum(jnp.linalg.norm(w.astype(jnp.float32).ravel()), 1e-30))
        factors[p] = {"a": a, "b": b}
        new_base[p] = jnp.zeros_like(leaf)
        layers.append(LayerReport(p, bshape, m, n, r, min(m, n), before, nb * r * (m + n) * isz, err, "lowrank"))
    base = tree_lib.replace(params, new_base) if new_base else params
    if not factors:
        raise ValueError("reduction: every selected leaf stays dense at this target (min_ratio too high?); "
                         "nothing was factored")
    rp = _rp_for(list(factors), axes)
    total = tree_bytes(params)
    rep = Report(layers, rule=f"{rule}={rules[rule] if not isinstance(rank, dict) else 'per-leaf'}", method=method,
                 model_bytes_before=total,
                 model_bytes_after=total - sum(l.bytes_before - l.bytes_after for l in layers), extra=extra)
    return Compressed(base, factors, rp, rep)
