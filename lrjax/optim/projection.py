"""The projection protocol shared by every low-rank gradient optimizer in :mod:`lrjax.optim`.

A *projected* optimizer wraps an inner optax transformation (``optax.scale_by_adam()``, ...)
and runs it on low-rank projections of the gradients of selected matrix leaves:

.. math::

    R_t = P_t^\\top G_t \\;(\\text{left})\\quad\\text{or}\\quad R_t = G_t P_t \\;(\\text{right}),\\qquad
    N_t = \\rho(R_t),\\qquad \\Delta W_t = \\alpha\\, P_t N_t \\;\\text{or}\\; \\alpha\\, N_t P_t^\\top

with ``P_t: [d, r]`` orthonormal (``d`` the projected dimension), ``rho`` the inner
transformation and ``alpha`` = ``scale``. The inner moments live at ``r x n`` instead of
``m x n``: that is the memory saving of GaLore (Zhao et al. 2024, arXiv:2403.03507).

What the protocol fixes, once for every method:

* **Which leaves.** ``targets`` (patterns or a predicate, :func:`lrjax.tree.select`) picks the
  projected leaves; default: every leaf with ``ndim >= 2`` whose path does not contain
  ``embed``. Every other leaf (biases, norms, embeddings, vectors) goes through the inner
  transformation at full size, unscaled.
* **Which axes.** A leaf is viewed as ``[*batch, M, N]`` by :func:`lrjax.axes.resolve`
  (``axes=`` overrides). ``nn.scan`` stacks ``[L, m, n]`` are projected per layer: every basis,
  refresh and projection is batched over the leading axes.
* **Which side.** ``side="std"`` (default, the paper and galore-torch): project the smaller
  dimension, ``P: [M, r]`` on the left if ``M <= N`` else ``P: [N, r]`` on the right.
  ``"reverse_std"``: the larger one (left if ``M >= N``; this is ``optax.contrib.galore``'s rule,
  which keeps the inner moments at ``r x min(M, N)``). ``"left"``/``"right"`` force a side.
  Square matrices go left under both rules. Agreement with galore-torch holds because JAX/Flax
  kernels are stored ``[in, out]`` while torch's ``nn.Linear.weight`` is ``[out, in]``: galore-torch
  sees ``W^T`` and, for a square matrix, projects *its* right side, which is the left side of the
  JAX kernel. For a kernel stored ``[out, in]`` (or a square torch weight ported as is), pass
  ``side="right"`` to reproduce galore-torch.
* **Which dtypes.** Only floating leaves are projected. With the default ``targets`` integer and
  boolean leaves are left out (they go through the inner transformation unprojected); a leaf of
  another dtype chosen explicitly by ``targets`` is refused with a ``TypeError`` naming it (an
  integer basis would silently give zero updates).
* **Which precision.** Everything of a projected leaf is computed in
  ``promote_types(leaf dtype, float32)`` (:func:`lrjax._validation.compute_dtype`) and rounded
  once to the gradient's dtype at the end: the refresh, the projection ``R``, the inner
  transformation on ``R`` (so its moments are float32 for bfloat16/float16 leaves), the variant,
  the back-projection and the weight decay. The basis is stored in that dtype too. Hence the
  update of a float16/bfloat16 leaf equals the float32 computation on the same gradient rounded
  once, and rank-deficient or zero low-precision gradients (a batch-1 ``x.T @ dy``) give finite
  updates. Leaves that are not projected run through the inner transformation at their own
  dtype, as with the inner transformation alone.
* **Degenerate gradients.** A zero or rank-deficient gradient is valid: every refresh returns an
  orthonormal, finite ``P`` (directions outside the gradient's span are completed by the
  factorization), and the update is the inner transformation's on ``R`` (zero for a zero
  gradient and zero moments with Adam).
* **When.** The basis is refreshed from the current gradient at steps
  ``count % update_proj_gap == 0`` (so at the first step) and otherwise reused; the inner
  moments are *not* reset at a refresh (as in the paper, galore-torch and optax).
* **What is stored.** :class:`ProjectionState`, a NamedTuple of arrays (checkpointable with
  orbax, shardable): the step count, the per-leaf basis state (a dense ``P`` or, for the DCT
  basis, ``r`` int32 indices), the pending-refresh flags, the inner state on projected shapes
  and the per-leaf state of a variant (Fira's residual norm). Per-leaf states have the structure
  of the parameters, with ``None`` (an empty subtree) at every leaf that is not projected.
* **Non-finite gradients never reach the basis.** A scheduled refresh of a matrix whose gradient
  has a NaN/Inf is *skipped*: the previous basis is kept and the refresh is retried at the next
  step (``pending``), so a single bad batch cannot leave a NaN projector that would poison every
  later step. The update itself is not hidden: the inner transformation sees the non-finite
  projected gradient, exactly as it would see the full one. Wrap the optimizer in
  ``optax.apply_if_finite`` to drop such steps entirely.
* **Params.** The inner transformation is called with ``params=None`` (its updates are
  ``r x n`` projections; parameters of that shape do not exist). An inner transformation that
  needs ``params`` (``optax.adamw``, ``add_decayed_weights``, LARS/LAMB) is refused at
  construction; decoupled weight decay is applied in the full space with ``weight_decay=``
  (or by ``optax.add_decayed_weights`` after this transformation in an ``optax.chain``).

A method is a small delta over this protocol: a :class:`Basis` (how ``P`` is stored and
refreshed: exact SVD, randomized SVD, warm-started subspace iteration, DCT columns) and
optionally a :class:`Variant` (how the low-rank update is mapped back; Fira adds a scaled
residual).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrjax import axes as _axes
from lrjax import tree as _tree
from lrjax._validation import check_choice, check_float, check_int, check_rank, compute_dtype

__all__ = ["ProjectionState", "Basis", "Variant", "LeafPlan", "project", "plan", "nbytes",
           "theoretical_state_bytes", "check_inner"]

_SIDES = ("std", "reverse_std", "left", "right")
_EMBED = re.compile("embed", re.IGNORECASE)


class ProjectionState(NamedTuple):
    """State of a projected optimizer (all fields pytrees of arrays).

    Attributes:
      count: int32 ``[]``, updates taken so far.
      basis: per-leaf basis state (params structure; ``None`` where not projected):
        ``P: [*batch, d, r]`` for SVD-type bases (float32, or float64 for float64 leaves), int32
        indices ``[*batch, r]`` for DCT.
      pending: per-leaf bool ``[*batch]``: a refresh was due but skipped because the gradient
        was not finite; it is retried at the next step.
      inner: the inner transformation's state, on projected shapes ``[*batch, r, N]`` /
        ``[*batch, M, r]`` (full shapes for leaves that are not projected).
      extra: per-leaf state of the :class:`Variant` (Fira: previous residual norm ``[*batch]``).
    """

    count: jax.Array
    basis: Any
    pending: Any
    inner: optax.OptState
    extra: Any


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """Static description of one projected leaf (computed from shapes; never traced)."""

    path: str
    shape: tuple
    ax: _axes.Axes
    batch: tuple
    m: int
    n: int
    left: bool
    rank: int

    @property
    def d(self) -> int:
        """The projected dimension (``M`` on the left, ``N`` on the right)."""
        return self.m if self.left else self.n

    @property
    def proj_shape(self) -> tuple:
        """Shape of the projected gradient ``R``."""
        return self.batch + ((self.rank, self.n) if self.left else (self.m, self.rank))


class Basis:
    """How a projector is stored and refreshed. Subclasses override the four methods.

    ``refresh`` receives the gradient in matrix view ``g: [*batch, M, N]`` (float32, finite),
    the previous basis state and ``left`` (which side ``P`` spans); it returns the new basis state.
    ``matrix`` turns a basis state into the dense orthonormal ``P: [*batch, d, r]``.
    """

    name = "basis"
    #: ``refresh`` ignores its key (exact factorizations): each matrix can be refreshed on its own
    #: without changing any result, so :func:`project` gives each unbatched matrix its own cond.
    deterministic = False

    def init(self, lp: LeafPlan, dtype):
        return jnp.zeros(lp.batch + (lp.d, lp.rank), dtype)

    def refresh(self, key, g, old, lp: LeafPlan):  # pragma: no cover - abstract hook
        raise TypeError(f"{type(self).__name__} must define refresh(key, g, old, lp): a Basis subclass "
                        "says how its projector is recomputed")

    def matrix(self, state, lp: LeafPlan, dtype):
        return state

    def state_bytes(self, lp: LeafPlan, itemsize: int) -> int:
        """Bytes of one leaf's basis state (for :func:`theoretical_state_bytes`)."""
        return math.prod(lp.batch) * lp.d * lp.rank * itemsize


class Variant:
    """How the inner update ``N`` (and the gradient) map back to the full space.

    Plain GaLore: ``coef = scale * N`` and no full-space term. A variant returns
    ``(coef, w, extra)`` such that the full update is ``back(P, coef) + w * G`` (``w`` broadcastable
    to ``G``'s matrix view, or ``None``), and may keep a per-leaf state ``extra``.
    """

    name = "galore"

    def init_extra(self, lp: LeafPlan):
        return None

    def combine(self, g, r, n, extra, count, lp: LeafPlan, scale):
        return scale * n, None, extra


# ----------------------------------------------------------------------------- validation
def _check_int(value, name, low=1):
    """``check_int`` with a lower bound (kept for the modules of this package)."""
    return check_int(value, name, low=low)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer))


def _check_leaves(tree, argname: str) -> None:
    """Every leaf of ``tree`` must be an array (not a list, number or string)."""
    for p, x in _tree.flatten(tree).items():
        if not _is_array(x):
            raise TypeError(f"{argname}: leaf {p!r} must be an array (jax.Array or np.ndarray), got "
                            f"{type(x).__name__}; wrap it with jnp.asarray(...)")


def _check_same_tree(a, b, aname: str, bname: str) -> None:
    """``a`` and ``b`` must have the same structure and leaf shapes."""
    da, db = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    if da != db:
        raise ValueError(f"{aname} and {bname} must have the same tree structure, got {da} and {db}; pass the "
                         f"gradients of the params given to init")
    for (p, x), y in zip(_tree.flatten(a).items(), jax.tree_util.tree_leaves(b)):
        if tuple(np.shape(x)) != tuple(np.shape(y)):
            raise ValueError(f"{aname}: leaf {p!r} has shape {tuple(np.shape(x))} but {bname} has "
                             f"{tuple(np.shape(y))}; they must match")


def check_inner(inner, argname: str = "inner") -> None:
    """Refuse, at construction, an inner transformation that is not one or that needs ``params``.

    The check runs the inner ``update`` abstractly (``jax.eval_shape``) on a 2x2 dummy with
    ``params=None``; optax raises its "requires the current value of parameters" error there.
    """
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(f"{argname} must be an optax.GradientTransformation (e.g. optax.scale_by_adam()), "
                        f"got {inner!r}")
    dummy = {"w": jnp.zeros((2, 2), jnp.float32)}
    try:
        jax.eval_shape(lambda: inner.update(dummy, inner.init(dummy), None))
    except ValueError as e:
        if "requires the current value of parameters" in str(e):
            raise TypeError(
                f"{argname} needs `params` (e.g. optax.adamw, optax.add_decayed_weights, lamb, lars), but "
                "it runs on low-rank projections of the gradients where full-size parameters do not "
                "exist. Pass a params-free transformation such as optax.scale_by_adam() and apply "
                "decoupled weight decay in the full space: weight_decay=... on this optimizer, or "
                "optax.chain(<this optimizer>, optax.add_decayed_weights(wd), "
                "optax.scale_by_learning_rate(lr))") from None
    except Exception:  # noqa: BLE001 - a transform that cannot run on the dummy is checked later
        pass


def _check_axes_spec(spec):
    if spec is None or isinstance(spec, _axes.Axes) or callable(spec):
        return
    if isinstance(spec, dict):
        for k, v in spec.items():
            if not isinstance(k, str) or not isinstance(v, _axes.Axes):
                raise TypeError(f"axes: a dict must map path patterns (str) to lrjax.Axes, got {k!r}: {v!r}")
        return
    raise TypeError(f"axes must be None, an lrjax.Axes, a dict pattern -> Axes, or a callable "
                    f"(path, shape) -> Axes; got {spec!r}")


# ----------------------------------------------------------------------------- planning
def _side_is_left(side: str, m: int, n: int) -> bool:
    if side == "std":
        return m <= n
    if side == "reverse_std":
        return m >= n
    return side == "left"


def plan(tree, *, rank: int, targets=None, axes=None, side: str = "std",
         rank_fits: Callable[[LeafPlan], int] | None = None) -> dict[str, LeafPlan]:
    """``{path: LeafPlan}`` of the leaves that are projected (static; raises on bad shapes).

    ``rank_fits(lp)`` (optional) returns the largest rank a basis supports for the leaf; by
    default ``min(M, N)``.
    """
    rank = check_int(rank, "rank", low=1)
    check_choice(side, "side", _SIDES)
    _check_axes_spec(axes)
    _check_leaves(tree, "tree")
    flat = _tree.flatten(tree)
    if targets is None:
        chosen = [p for p, x in flat.items() if getattr(x, "ndim", 0) >= 2 and not _EMBED.search(p)
                  and jnp.issubdtype(x.dtype, jnp.floating)]
    elif _PER_LEAF.get():
        # one leaf of a larger tree (lrjax.optim.layerwise): a pattern may match none of it
        match = _tree._matcher(targets)
        chosen = [p for p, x in flat.items() if match(p, x)]
    else:
        chosen = _tree.select(tree, targets, argname="targets")
    out = {}
    for p in chosen:
        if not jnp.issubdtype(flat[p].dtype, jnp.floating):
            raise TypeError(f"targets selects leaf {p!r} of dtype {flat[p].dtype}, but only floating leaves can be "
                            f"projected (an integer or boolean basis would give zero updates); leave it out "
                            f"of `targets` or cast the parameter to a floating dtype")
        shape = tuple(flat[p].shape)
        ax = _axes.resolve(p, shape, axes)
        b, m, n = _axes.matrix_shape(shape, ax)
        left = _side_is_left(side, m, n)
        lp = LeafPlan(p, shape, ax, b, m, n, left, rank)
        limit = rank_fits(lp) if rank_fits else min(m, n)
        check_rank(rank, m, n, "rank", where=f"leaf {p!r} (shape {shape})")
        if rank > limit:
            raise ValueError(f"rank={rank} exceeds {limit}, the largest rank this basis supports for leaf {p!r} "
                             f"(shape {shape}, matrix view [{m}, {n}]); lower `rank` or leave this leaf out "
                             f"with `targets=`")
        out[p] = lp
    return out


_PER_LEAF = contextvars.ContextVar("lrjax_projection_per_leaf", default=False)


@contextlib.contextmanager
def _per_leaf():
    """Within this context :func:`plan` is applied to single-leaf trees (lrjax.optim.layerwise): a
    ``targets`` pattern that matches no leaf of the tree selects nothing instead of raising (the whole
    tree was checked once, at ``layerwise_init``)."""
    tok = _PER_LEAF.set(True)
    try:
        yield
    finally:
        _PER_LEAF.reset(tok)


def _mask_to(mask, x):
    """Broadcast a per-matrix mask ``[*batch]`` against a leaf ``[*batch, ...]``."""
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def _placeholder():
    return None


def _leaves(tree):
    """Leaves of a per-leaf state tree, keeping the ``None`` placeholders (one per parameter)."""
    return jax.tree_util.tree_leaves(tree, is_leaf=lambda x: x is None)


# ----------------------------------------------------------------------------- transformation
def project(inner: optax.GradientTransformation, basis: Basis, variant: Optional[Variant] = None, *,
            rank: int, update_proj_gap: int = 200, scale: float = 1.0, side: str = "std",
            targets=None, axes=None, seed: int = 0, weight_decay: float = 0.0,
            weight_decay_mask=None, rank_fits=None) -> optax.GradientTransformation:
    """Run ``inner`` on low-rank projections of the selected leaves' gradients (see module doc).

    Args:
      inner: params-free optax transformation run in the projected space (e.g.
        ``optax.scale_by_adam()``); it also runs, at full size, on every leaf not projected.
      basis: the :class:`Basis` (what ``P`` is and how it is refreshed).
      variant: optional :class:`Variant` (how the update maps back; default plain GaLore).
      rank: ``r``, the projection rank (``1 <= r <= min(M, N)`` of every projected leaf).
      update_proj_gap: refresh the basis every this many steps (paper ``T``; default 200).
      scale: ``alpha > 0`` multiplying the back-projected update of projected leaves (default 1.0;
        a negative scale would turn descent into ascent and is refused).
      side: ``"std"``, ``"reverse_std"``, ``"left"`` or ``"right"`` (module doc).
      targets: which leaves are projected (:func:`lrjax.tree.select` patterns or predicate).
      axes: matrix view override (:func:`lrjax.axes.resolve`).
      seed: seed of the random sketches (randomized refreshes), folded with the step and the
        shape group; the ``"rbg"`` PRNG is used (fast to compile; streams may differ by backend).
      weight_decay: decoupled weight decay ``lambda`` added in the full space after the projected
        update: ``u <- u + lambda * w`` (then the learning rate of a later transform applies, as
        in AdamW). Needs ``params`` in ``update``.
      weight_decay_mask: optional mask (pytree of bools or callable) for the weight decay.
    """
    check_inner(inner)
    if not isinstance(basis, Basis):
        raise TypeError(f"basis must be an lrjax.optim.projection.Basis, got {basis!r}")
    variant = Variant() if variant is None else variant
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be an lrjax.optim.projection.Variant, got {variant!r}")
    rank = check_int(rank, "rank", low=1)
    gap = check_int(update_proj_gap, "update_proj_gap", low=1)
    seed = check_int(seed, "seed", low=0, high=2**31 - 1)
    check_choice(side, "side", _SIDES)
    scale = check_float(scale, "scale", low=0.0, low_open=True)
    weight_decay = check_float(weight_decay, "weight_decay", low=0.0)
    if weight_decay_mask is not None and not callable(weight_decay_mask) and \
            not isinstance(weight_decay_mask, (dict, list, tuple)) and not hasattr(weight_decay_mask, "_fields"):
        raise TypeError(f"weight_decay_mask must be None, a pytree of bools or a callable params -> mask, got "
                        f"{type(weight_decay_mask).__name__}")
    if targets is not None:
        _tree._matcher(targets)  # type/regex errors now, not at init
    _check_axes_spec(axes)
    scale = float(scale)

    def _plans(tree):
        return plan(tree, rank=rank, targets=targets, axes=axes, side=side, rank_fits=rank_fits)

    def init_fn(params):
        _check_leaves(params, "params")
        flat = _tree.flatten(params)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        plans = _plans(params)
        bases, pend, extra, proxies = [], [], [], []
        for p, x in flat.items():
            lp = plans.get(p)
            if lp is None:
                bases.append(_placeholder()), pend.append(_placeholder()), extra.append(_placeholder())
                proxies.append(x)
            else:
                cdt = compute_dtype(x.dtype)
                bases.append(basis.init(lp, cdt))
                pend.append(jnp.zeros(lp.batch, bool))
                extra.append(variant.init_extra(lp))
                proxies.append(jnp.zeros(lp.proj_shape, cdt))
        un = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return ProjectionState(jnp.zeros([], jnp.int32), un(bases), un(pend), inner.init(un(proxies)),
                               un(extra))

    def _check_state(updates, state, params, plans):
        if not isinstance(state, ProjectionState):
            raise TypeError(f"state must be the ProjectionState returned by this optimizer's init, got "
                            f"{type(state).__name__}")
        s_def = jax.tree_util.tree_structure(state.pending, is_leaf=lambda x: x is None)
        u_def = jax.tree_util.tree_structure(updates)
        if s_def != u_def:
            raise ValueError(f"updates must have the tree structure of the params given to init: the state has "
                             f"{s_def}, the updates {u_def}")
        if params is not None:
            _check_leaves(params, "params")
            _check_same_tree(updates, params, "updates", "params")
        for p, pend in zip(_tree.paths(updates), _leaves(state.pending)):
            lp = plans.get(p)
            if (pend is None) != (lp is None):
                what = "projected" if pend is not None else "not projected"
                raise ValueError(f"updates: leaf {p!r} (shape {tuple(_tree.flatten(updates)[p].shape)}) was {what} "
                                 f"at init but not now; the gradients must have the params' shapes and dtypes")
            if lp is not None and tuple(pend.shape) != lp.batch:
                raise ValueError(f"updates: leaf {p!r} has shape {lp.shape} but the optimizer state was "
                                 f"initialized for a leaf with {len(pend.shape)} batch axes {tuple(pend.shape)}; "
                                 f"pass gradients with the params' shapes")
        for p, b in zip(_tree.paths(updates), _leaves(state.basis)):
            lp = plans.get(p)
            if lp is not None:
                want = jax.eval_shape(lambda lp=lp: basis.init(lp, jnp.float32)).shape
                if tuple(b.shape) != tuple(want):
                    raise ValueError(f"updates: leaf {p!r} has shape {lp.shape} (matrix view [{lp.m}, {lp.n}]) but "
                                     f"the optimizer state's basis has shape {tuple(b.shape)}, for another shape; "
                                     f"pass gradients with the params' shapes")

    def update_fn(updates, state, params=None):
        if weight_decay and params is None:
            raise ValueError("params: weight_decay=... needs the parameters; call update(grads, state, params)")
        _check_leaves(updates, "updates")
        flat = _tree.flatten(updates)
        paths = list(flat)
        treedef = jax.tree_util.tree_structure(updates)
        plans = _plans(updates)
        _check_state(updates, state, params, plans)
        idx = [i for i, p in enumerate(paths) if p in plans]
        b_leaves = _leaves(state.basis)
        pend_leaves = _leaves(state.pending)
        x_leaves = _leaves(state.extra)
        count = state.count
        gs = {i: _axes.to_matrix(flat[paths[i]], plans[paths[i]].ax).astype(compute_dtype(flat[paths[i]].dtype))
              for i in idx}

        # 1. refresh the bases where due (no factorization on the other steps)
        due = count % gap == 0
        b_leaves = list(b_leaves)
        pend_leaves = list(pend_leaves)

        def refresh_set(sel, single):
            """One ``lax.cond`` refreshing the leaves ``sel`` (positions in ``idx``-order leaf indices)."""
            pred = due | jnp.any(jnp.stack([jnp.any(pend_leaves[i]) for i in sel]))

            # Matrices of the same shape, side and basis layout are refreshed as one batch: one
            # (batched) factorization per group instead of one per leaf, which keeps the compiled
            # program small for models with many same-shaped layers.
            groups: dict = {}
            for j, i in enumerate(sel):
                lp = plans[paths[i]]
                gk = (lp.m, lp.n, lp.left, b_leaves[i].dtype, gs[i].dtype, b_leaves[i].shape[len(lp.batch):])
                groups.setdefault(gk, []).append(j)

            def do_refresh(operands):
                olds, pends, g_in = operands
                # "rbg" keys: XLA's RngBitGenerator compiles ~5x faster than threefry on CPU
                key = jax.random.fold_in(jax.random.key(seed, impl="rbg"), count)
                new_b, new_p = [None] * len(sel), [None] * len(sel)
                if single:
                    # one matrix without batch axes: the factorization runs on the 2-D matrix (an
                    # unbatched LAPACK call, the same routine on the same numbers as in a batch)
                    lp = plans[paths[sel[0]]]
                    g = g_in[0]
                    finite = jnp.all(jnp.isfinite(g))
                    g = jnp.where(finite, g, 0.0)
                    cand = basis.refresh(key, g, olds[0], lp).astype(olds[0].dtype)
                    need = due | pends[0]
                    ok = need & finite
                    return [jnp.where(ok, cand, olds[0])], [need & ~finite]
                prev = None
                for k, ((m, n, left, _, _, tail), members) in enumerate(groups.items()):
                    sizes = [math.prod(plans[paths[sel[j]]].batch) for j in members]
                    g = jnp.concatenate([g_in[j].reshape(-1, m, n) for j in members])
                    old = jnp.concatenate([olds[j].reshape((-1,) + tail) for j in members])
                    if prev is not None:
                        # Run the groups one after another. jaxlib's batched CPU LAPACK kernels
                        # (geqrf, ...) split the batch over XLA's intra-op pool and block until it is
                        # done; two of them running concurrently on a 2-thread pool deadlock (seen with
                        # jaxlib 0.10 on 2 cores). XLA's CPU pipeline drops optimization barriers, so
                        # the order is enforced with a data dependency that is always exactly zero
                        # (``x > inf`` is false for every x, NaN included) and that XLA cannot fold.
                        g = g + (jnp.max(prev) > jnp.inf).astype(g.dtype)
                    need = due | jnp.concatenate([pends[j].reshape(-1) for j in members])
                    finite = jnp.all(jnp.isfinite(g), axis=(-2, -1))                 # [B]
                    g = jnp.where(_mask_to(finite, g), g, 0.0)
                    lp = LeafPlan("<group>", g.shape, _axes.Axes((0,), (1,), (2,)), (g.shape[0],), m, n, left,
                                  rank)
                    cand = basis.refresh(jax.random.fold_in(key, k), g, old, lp).astype(old.dtype)
                    ok = need & finite
                    upd = jnp.where(_mask_to(ok, cand), cand, old)
                    prev = upd
                    bad = need & ~finite
                    off = 0
                    for j, sz in zip(members, sizes):
                        new_b[j] = upd[off:off + sz].reshape(olds[j].shape)
                        new_p[j] = bad[off:off + sz].reshape(pends[j].shape)
                        off += sz
                return new_b, new_p

            def keep(operands):
                olds, pends, _ = operands
                return list(olds), [jnp.zeros_like(q) for q in pends]

            new_b, new_p = jax.lax.cond(
                pred, do_refresh, keep,
                ([b_leaves[i] for i in sel], [pend_leaves[i] for i in sel], [gs[i] for i in sel]))
            for j, i in enumerate(sel):
                b_leaves[i], pend_leaves[i] = new_b[j], new_p[j]

        # A deterministic basis (exact SVD, Gram eigh) refreshes each matrix without batch axes in its own
        # cond, as optax.contrib.galore does: the projection, inner update and back-projection of a
        # layer then depend on that layer's gradient only, so XLA runs them while the backward pass
        # of the other layers is still going and frees each gradient early (one cond over all
        # leaves waits for every gradient: a barrier that cost ~4-10% of the step and held all
        # gradients at once, see docs/bench_optim.md). Randomized bases keep one cond and one
        # batched draw per shape group (their random streams are unchanged), as do stacks.
        own = [i for i in idx if basis.deterministic and plans[paths[i]].batch == ()]
        for i in own:
            refresh_set([i], True)
        rest = [i for i in idx if i not in own]
        if rest:
            refresh_set(rest, False)

        # 2. project, 3. inner transformation on the projected tree (compute dtype: float32 or wider)
        leaves = [flat[p] for p in paths]
        Ps, low = {}, list(leaves)
        for i in idx:
            lp = plans[paths[i]]
            P = basis.matrix(b_leaves[i], lp, gs[i].dtype)
            Ps[i] = P
            low[i] = (jnp.einsum("...dr,...dn->...rn", P, gs[i]) if lp.left
                      else jnp.einsum("...md,...dr->...mr", gs[i], P))
        try:
            inner_out, inner_state = inner.update(jax.tree_util.tree_unflatten(treedef, low), state.inner, None)
        except (TypeError, ValueError) as e:
            raise ValueError(f"updates: the inner transformation failed on the (projected) gradients; the usual "
                             f"cause is gradients whose shapes differ from the params given to init "
                             f"({type(e).__name__}: {e})") from e
        inner_out = _leaves(inner_out)
        _check_inner_shapes(paths, low, inner_out, state.inner, inner_state)

        # 4. map back (compute dtype), weight decay, then one rounding to the gradient's dtype
        out = list(inner_out)
        x_leaves = list(x_leaves)
        for i in idx:
            lp = plans[paths[i]]
            coef, w, x_leaves[i] = variant.combine(gs[i], low[i], inner_out[i], x_leaves[i], count, lp, scale)
            full = (jnp.einsum("...dr,...rn->...dn", Ps[i], coef) if lp.left
                    else jnp.einsum("...mr,...dr->...md", coef, Ps[i]))
            if w is not None:
                full = full + w * gs[i]
            out[i] = _axes.from_matrix(full, lp.ax, lp.shape)
        out = jax.tree_util.tree_unflatten(treedef, out)
        if weight_decay:
            out, _ = optax.add_decayed_weights(weight_decay, weight_decay_mask).update(out, optax.EmptyState(), params)
        out = jax.tree_util.tree_map(lambda u, g: u.astype(g.dtype), out, updates)
        un = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        new_state = ProjectionState(optax.safe_int32_increment(count), un(b_leaves), un(pend_leaves),
                                    inner_state, un(x_leaves))
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _check_inner_shapes(paths, low, inner_out, old_state, new_state):
    """The inner transformation must keep shapes: a broadcast means the gradients do not fit the state."""
    for p, a, b in zip(paths, low, inner_out):
        if tuple(np.shape(a)) != tuple(np.shape(b)):
            raise ValueError(f"updates: leaf {p!r} (inner input shape {tuple(np.shape(a))}) came back from the inner "
                             f"transformation with shape {tuple(np.shape(b))}: the gradients do not match the "
                             f"optimizer state; pass gradients with the params' shapes")
    old_l, new_l = jax.tree_util.tree_leaves(old_state), jax.tree_util.tree_leaves(new_state)
    if len(old_l) != len(new_l) or any(tuple(np.shape(a)) != tuple(np.shape(b)) for a, b in zip(old_l, new_l)):
        raise ValueError("updates: the inner transformation's state changed shape on these gradients (e.g. a moment "
                         "of shape (5,) broadcast against a gradient of shape (6, 5)); the gradients must have the "
                         "shapes of the params given to init")


# ----------------------------------------------------------------------------- accounting
def nbytes(tree) -> int:
    """Total bytes of the arrays in a pytree (e.g. an optimizer state)."""
    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)
                   if hasattr(x, "shape")))


def theoretical_state_bytes(params, *, rank: int, basis: Basis, moments: int = 2, targets=None,
                            axes=None, side: str = "std", extra_per_matrix: int = 0) -> dict:
    """Theoretical optimizer-state bytes of a projected optimizer with a ``moments``-slot inner
    transformation (Adam: 2), as ``{"projected": ..., "basis": ..., "full": ..., "total": ...}``.

    A projected leaf ``[*batch, M, N]`` holds ``moments * |batch| * r * N`` (left) or
    ``moments * |batch| * M * r`` (right) moment entries plus its basis, both in
    ``promote_types(dtype, float32)`` (the compute dtype of projected leaves); a leaf that is not projected
    holds ``moments * size``. Bookkeeping scalars (step counts, flags) are excluded.
    """
    if not isinstance(basis, Basis):
        raise TypeError(f"basis must be an lrjax.optim.projection.Basis (e.g. lrjax.optim.galore.ExactSVD()), "
                        f"got {type(basis).__name__}")
    moments = check_int(moments, "moments", low=0)
    extra_per_matrix = check_int(extra_per_matrix, "extra_per_matrix", low=0)
    plans = plan(params, rank=rank, targets=targets, axes=axes, side=side)
    proj = bas = full = 0
    for p, x in _tree.flatten(params).items():
        isz = np.dtype(x.dtype).itemsize
        if p in plans:
            lp = plans[p]
            csz = np.dtype(compute_dtype(x.dtype)).itemsize   # projected moments and basis: float32 or wider
            proj += moments * math.prod(lp.proj_shape) * csz
            bas += basis.state_bytes(lp, csz) + extra_per_matrix * math.prod(lp.batch)
        else:
            full += moments * math.prod(x.shape) * isz
    return {"projected": proj, "basis": bas, "full": full, "total": proj + bas + full}
