"""LoRAM: train LoRA on a structurally pruned model, infer with the full model.

Zhang et al. 2025, *Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language
Models*, arXiv:2502.13533; official code ``junzhang-zj/LoRAM`` (``loram/``).

The four stages and what lrjax provides for each
-------------------------------------------------
1. **Prune** (official ``0_pruned_full_rank_weight_generation.py``; the kept/pruned indices come
   from LLM-Pruner-style structured pruning, stored per layer as ``pruned_idx`` for the MLP
   intermediate neurons and the KV heads). Here: a :class:`PruneGroup` per set of coupled leaves
   says which units are kept; :func:`select_group` picks them by a magnitude score (or any user
   score) at a keep ratio, and :func:`prune` gathers the kept rows/columns of every listed leaf.
2. **Align** (optional; official ``1_pruned_full_rank_weight_alignment.py``): the model publisher
   continues pretraining the *pruned* full-rank weights so the small model's knowledge matches the
   large one's. This is ordinary training of the small params; lrjax adds nothing for it.
3. **LoRA on the pruned model** (official ``2_pruned_low_rank_matrix_training.py``: r = 8,
   alpha = 16, targets q, k, v, o, gate, up, down, lm_head). Here: ``LoRA(...).init(key, small)``
   and any training loop; the full model is never in memory during training.
4. **Recover** (official ``3_recovered_low_rank_matrix_generation.py``): :func:`recover` scatters
   the factors trained on the small model into the full shapes, with zeros at the pruned units,
   and the full model infers with ``W + s A_rec B_rec`` (``rp.materialize(full_params, rec)``).

Math (lrjax orientation: a Dense kernel is ``W: [M = in, N = out]``, ``y = x W``; LoRA
``W + s A B`` with ``A: [M, r]``, ``B: [r, N]``). For a leaf whose output units are pruned to the
kept set ``K_out`` (``N' = |K_out|`` columns) and whose input units are pruned to ``K_in``
(``M' = |K_in|`` rows), let ``S_in: [M', M]`` and ``S_out: [N', N]`` be the 0/1 selection
matrices (row ``j`` is the unit vector of the ``j``-th kept index). Then

.. math::  W_{small} = S_{in} W S_{out}^T, \\qquad
           A_{rec} = S_{in}^T A_{small}, \\quad B_{rec} = B_{small} S_{out}, \\qquad
           \\Delta W_{full} = s A_{rec} B_{rec} = S_{in}^T \\Delta W_{small} S_{out}

i.e. the paper's ``P_out^T dW_small P_in`` in torch orientation (``W: [out, in]``): the recovered
update is ``dW_small`` placed at the kept rows/columns and exactly zero elsewhere. In an MLP whose
hidden units are pruned, the full model with recovered adapters therefore computes
``f_full(x) + (f_small_tuned(x) - f_small(x))``: the pruned units' activations and their
outgoing weights are untouched and the update flows only through the kept units.

Recovery modes (the official ``--lora_recover_type``):

* ``"zeroA"`` (default, as official): zeros at every pruned position, so the identity above holds
  exactly.
* ``"normA"``: the rows of ``A_rec`` at pruned *input* units (the official code: ``lora_A``
  columns of ``down_proj``/``o_proj``) are drawn from ``N(0, (1/r)^2)`` instead of 0. The official
  code hard-codes ``r = 8`` (std 1/8); here ``r`` is the adapter's rank. The recovered update then
  also has ``s N B_rec`` on the pruned input rows, so the identity holds only on the kept rows.
  ``B_rec`` is zero at pruned *output* units in both modes (as official). Needs ``key``; the
  per-leaf key is ``fold_in(key, crc32(path))``.

Units and heads. Every listed leaf has a *unit axis*: for a path in ``out`` the first (major) of
its :mod:`lrjax.axes` output axes, for a path in ``inp`` the first of its input axes. A unit is
``head_dim`` consecutive entries of that axis together with everything on the role's other
(minor) axes, so in the matrix view unit ``u`` is the contiguous block of ``head_dim * minor``
rows (``inp``) or columns (``out``) starting at ``u * head_dim * minor``. Hence:

* Dense ``[in, out]`` neurons: ``head_dim=1``;
* Flax attention ``query/key/value`` ``[embed, heads, head_size]`` (``out``) and ``out``
  ``[heads, head_size, embed]`` (``inp``): the unit axis is ``heads``, so ``head_dim=1`` and
  ``keep`` lists heads;
* LLaMA-style 2-D projections ``[embed, heads * head_size]``: ``head_dim=head_size``, ``keep``
  lists heads;
* Conv ``[h, w, in, out]``: output channels work as they are; input channels are not the major
  input axis of the default view (``h``) and are refused -- pass
  ``axes={"conv/kernel": Axes((), (2, 0, 1), (3,))}`` to :func:`prune` and to the LoRA config.

Every leaf of a group must have the same number of units. Leaves whose ``ndim`` equals
``keep.ndim`` are *vectors* (biases, norm scales; the unit axis is the last) and may only be
listed in ``out``.

Grouped-query attention: the official code keeps KV heads and expands them to query heads
(``num_heads / num_kv_heads`` query heads per KV head); express that as two groups, one for
k/v with the KV-head ``keep`` and one for q/o with the expanded
``keep_q = (keep_kv[:, None] * g + np.arange(g)).reshape(-1)``, ``g = num_heads // num_kv_heads``.

Stacked layers (``nn.scan`` kernels ``[L, in, out]``): a 1-D ``keep`` ``[k]`` prunes the same
units in every layer; a 2-D ``keep`` ``[L, k]`` (any ``[*batch, k]``) prunes different units per
layer, and every leaf of that group must have the matrix-view batch shape ``[*batch]`` (vectors
``[*batch, N]``). The number kept ``k`` is the same for every layer (shapes stay rectangular).

Paper claims (not reproduced here): LoRA training of LLaMA-3.1-70B on a 20 GB GPU; QLoRAM
(structured pruning + 4-bit quantization) cuts the parameter storage that dominates LoRA training
memory 15.81x (LLaMA-2-70B: 16.95x); the recovered 70B model beats the untuned 70B and
LoRA-trained 8B/13B models. Not provided: the alignment stage itself (ordinary training), the
paper's unstructured / semi-structured (SparseGPT, 2:4) variants (shapes do not change, so their
"recovery" is the identity) and QLoRAM's quantization.

Supported adapters: :class:`lrjax.LoRA` and :class:`lrjax.RSLoRA` (``{path: {"a", "b"}}``, scale
independent of the base weight). DoRA (its magnitude ``m`` and column norms are those of the
pruned weight), PiSSA and other variants that rewrite the base or read it are refused (``rp``).

Dtypes: :func:`prune` is a gather and :func:`recover` a scatter; both keep every leaf's dtype
(``normA`` noise is drawn in float32 and rounded once to ``A``'s dtype). Both are jit/grad/vmap
friendly when the groups are closed over (``keep`` fixes the pruned shapes, so it is always a
concrete value stored in the group).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax.reparam.base import check_axes_spec
from lrjax.reparam.lora import LoRA, RSLoRA

__all__ = ["PruneGroup", "prune", "recover", "unit_scores", "select_group"]

_MODES = ("zeroA", "normA")
_RECOVERABLE = (LoRA, RSLoRA)


# --------------------------------------------------------------------------- the spec
def _check_paths(value, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be a leaf path / regex string or a list of them (e.g. "
                        f"['Dense_0/kernel', 'Dense_0/bias']), got {V._fmt(value)} ({type(value).__name__})")
    for p in value:
        if not p:
            raise ValueError(f"{name}: empty path string; give leaf paths such as 'Dense_0/kernel'")
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{name}: {p!r} is not a valid regular expression ({e})") from None
    if len(set(value)) != len(value):
        dup = next(p for p in value if value.count(p) > 1)
        raise ValueError(f"{name} lists {dup!r} twice; list each path once")
    return tuple(value)


def _check_keep(keep, name: str = "keep") -> np.ndarray:
    if isinstance(keep, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete integer array (it fixes the pruned shapes), got a "
                        "traced value; build the PruneGroup outside jit and close over it")
    if isinstance(keep, (bool, np.bool_)) or isinstance(keep, (numbers.Number, str, bytes)) or \
            not isinstance(keep, (np.ndarray, jax.Array, list, tuple)):
        raise TypeError(f"{name} must be an integer array (or list) of kept unit indices, got "
                        f"{V._fmt(keep)} ({type(keep).__name__})")
    try:
        arr = np.asarray(keep)
    except Exception:  # noqa: BLE001 - ragged lists
        raise TypeError(f"{name} must be a rectangular integer array of kept unit indices, got "
                        f"{V._fmt(keep)}") from None
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        if arr.size == 0 and arr.dtype != object:
            raise ValueError(f"{name} is empty: keep at least one unit")
        raise TypeError(f"{name} must hold integer unit indices, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"{name} must be a 1-D array [k] (or [*layers, k] per stacked layer) of kept "
                         f"unit indices, got a scalar {arr.item()}; wrap it in a list")
    if arr.shape[-1] == 0 or arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}): keep at least one unit per layer")
    if (arr < 0).any():
        raise ValueError(f"{name} holds a negative index {int(arr.min())}; unit indices count from 0")
    rows = arr.reshape(-1, arr.shape[-1])
    for row in rows:
        d = np.diff(row)
        if (d == 0).any():
            i = int(np.flatnonzero(d == 0)[0])
            raise ValueError(f"{name} lists unit {int(row[i])} twice; each kept unit must appear once")
        if (d < 0).any():
            srt = np.sort(row)
            if (np.diff(srt) == 0).any():
                i = int(np.flatnonzero(np.diff(srt) == 0)[0])
                raise ValueError(f"{name} lists unit {int(srt[i])} twice; each kept unit must appear once")
            raise ValueError(f"{name} must be sorted ascending (small unit j is the j-th smallest kept "
                             f"full unit, as in the official code); got {V._fmt(row.tolist())}: pass "
                             "np.sort(keep, axis=-1)")
    return arr.astype(np.int64)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneGroup:
    """Which units of a set of coupled leaves survive structured pruning.

    Args:
      out: leaf paths (or regexes, matched like :func:`lrjax.tree.select`) whose OUTPUT axis
        indexes the units: the producing layer's kernel and its bias, e.g.
        ``["Dense_0/kernel", "Dense_0/bias"]`` (LLaMA: ``gate_proj``, ``up_proj``; q/k/v). Every
        matching leaf is pruned (``"Dense_0/kernel"`` also matches ``"params/Dense_0/kernel"``;
        a pattern that matches nothing is refused, listing the nearest paths).
      inp: leaf paths whose INPUT axis indexes the units: the consuming layer's kernel, e.g.
        ``["Dense_1/kernel"]`` (LLaMA: ``down_proj``; ``o_proj``).
      keep: the kept unit indices, strictly increasing, ``[k]`` (the same units in every stacked
        layer) or ``[*batch, k]`` (per stacked layer); stored as a tuple (hashable), read it back
        with :attr:`keep_array`. Unsorted or repeated indices are refused (not sorted silently:
        the small model's unit ``j`` is the ``j``-th smallest kept full unit, as in the official
        code). Range is checked against the params by :func:`prune` / :func:`recover`.
      head_dim: entries per unit along each leaf's unit axis (the major axis of its role; see
        the module docstring): 1 for neurons and for heads of Flax's 3-D attention kernels, the
        head size for heads of 2-D ``[embed, heads * head_size]`` projections.

    At least one of ``out`` / ``inp`` must be non-empty. Raises ``TypeError`` / ``ValueError``
    naming the field.
    """

    out: tuple[str, ...] = ()
    inp: tuple[str, ...] = ()
    keep: Any = None
    head_dim: int = 1

    def __post_init__(self):
        object.__setattr__(self, "out", _check_paths(self.out, "out"))
        object.__setattr__(self, "inp", _check_paths(self.inp, "inp"))
        if not self.out and not self.inp:
            raise ValueError("out and inp are both empty: a PruneGroup needs at least one leaf path whose "
                             "output (out=) or input (inp=) axis indexes the pruned units")
        if self.keep is None:
            raise TypeError("keep must be an integer array of kept unit indices, got None")
        arr = _check_keep(self.keep, "keep")
        object.__setattr__(self, "keep", _to_tuple(arr))
        object.__setattr__(self, "head_dim", V.check_int(self.head_dim, "head_dim", low=1))

    @property
    def keep_array(self) -> np.ndarray:
        """``keep`` as an int64 NumPy array ``[*batch, k]``."""
        return np.asarray(self.keep, np.int64)

    @property
    def num_kept(self) -> int:
        """``k``, the number of units kept (per layer)."""
        return int(self.keep_array.shape[-1])


def _to_tuple(arr: np.ndarray):
    if arr.ndim == 1:
        return tuple(int(i) for i in arr)
    return tuple(_to_tuple(a) for a in arr)


def _check_groups(groups, name="groups") -> tuple[PruneGroup, ...]:
    if isinstance(groups, PruneGroup):
        return (groups,)
    if not isinstance(groups, (list, tuple)) or not groups:
        raise TypeError(f"{name} must be a PruneGroup or a non-empty list of PruneGroups, got "
                        f"{V._fmt(groups)} ({type(groups).__name__})")
    for i, g in enumerate(groups):
        if not isinstance(g, PruneGroup):
            raise TypeError(f"{name}[{i}] must be a PruneGroup(out=..., inp=..., keep=...), got "
                            f"{V._fmt(g)} ({type(g).__name__})")
    return tuple(groups)


# ------------------------------------------------------------------ resolving paths
@dataclasses.dataclass(frozen=True)
class _Slot:
    """One (path, role) of a group: where the units live in the leaf and in its matrix view."""

    group: int
    role: str            # "out" | "inp"
    keep: np.ndarray     # [*kb, k]
    head_dim: int
    axis: int            # the leaf axis that is gathered (the major axis of the role)
    block: int           # leaf entries per unit along `axis` (= head_dim)
    flat: int            # matrix-view positions per unit (head_dim * product of the minor role axes)
    batch: tuple         # leaf batch axes (matrix view batch, or leading axes of a vector)
    vector: bool


def _resolve(flat: dict, params, groups: tuple[PruneGroup, ...], axes_of, argname: str):
    """``{path: [slots]}`` after every structural check (sizes, ranges, conflicts)."""
    slots: dict[str, list[_Slot]] = {}
    owner: dict[tuple[str, str], int] = {}
    is_arr = lambda p, x: hasattr(x, "ndim") and hasattr(x, "shape")  # noqa: E731
    for gi, g in enumerate(groups):
        keep = g.keep_array
        kb = keep.shape[:-1]
        n_units, first = None, None
        h = g.head_dim
        for role in ("out", "inp"):
            pats = getattr(g, role)
            if not pats:
                continue
            where = f"{argname}[{gi}].{role}"
            for path in tree_lib.select(params, list(pats), where=is_arr, argname=where):
                if (path, role) in owner:
                    raise ValueError(
                        f"{where}: {path!r} is already listed in {argname}[{owner[path, role]}].{role}; a leaf's "
                        f"{role} axis can belong to one group only (merge the groups or fix the paths)")
                owner[path, role] = gi
                shape = tuple(flat[path].shape)
                if len(shape) == keep.ndim:  # a vector (bias, norm scale), possibly stacked
                    if role == "inp":
                        raise ValueError(
                            f"{where}: {path!r} has shape {shape}, a vector (ndim == keep.ndim = {keep.ndim}); "
                            "vectors (biases, norm scales) have no input axis: list them under out=")
                    axis, sub, batch, vec = len(shape) - 1, 1, tuple(range(len(shape) - 1)), True
                    bshape = shape[:-1]
                else:
                    if len(shape) < keep.ndim:
                        raise ValueError(
                            f"{where}: {path!r} has shape {shape}, fewer axes than keep {keep.shape} "
                            f"({argname}[{gi}].keep is per stacked layer but this leaf is not stacked)")
                    try:
                        ax = axes_of(path, shape)
                    except (TypeError, ValueError) as e:
                        raise type(e)(f"{where}: {path!r}: {e}") from None
                    role_axes = ax.out if role == "out" else ax.inp
                    axis, batch, vec = role_axes[0], ax.batch, False
                    sub = math.prod(shape[i] for i in role_axes[1:])
                    bshape = tuple(shape[i] for i in ax.batch)
                if not vec and role == "inp" and len(role_axes) > 1 and axes_lib._CONV.search(path) and \
                        role_axes == tuple(range(len(shape) - 1)):
                    raise ValueError(
                        f"{where}: {path!r} (shape {shape}) is a Conv kernel whose input axes {role_axes} start with "
                        "the window, not the input channels; pass axes={path: Axes((), (C, *window), (out,))} with "
                        "the channel axis C first (e.g. Axes((), (2, 0, 1), (3,))) to prune and to the LoRA config")
                size = shape[axis]
                if size % h:
                    raise ValueError(f"{where}: {path!r} has {size} entries on its {role} unit axis {axis} "
                                     f"(shape {shape}), not a multiple of {argname}[{gi}].head_dim={h}")
                n = size // h
                if n_units is None:
                    n_units, first = n, (path, role)
                elif n != n_units:
                    raise ValueError(
                        f"{where}: {path!r} has {n} units on its {role} axis (size {size}) but "
                        f"{first[0]!r} ({first[1]}) has {n_units}; every leaf of a group must index the same "
                        "units (wrong path or wrong axis?)")
                if keep.ndim > 1 and tuple(bshape) != tuple(kb):
                    raise ValueError(
                        f"{argname}[{gi}].keep has per-layer shape {keep.shape}, but {path!r} has batch shape "
                        f"{tuple(bshape)}; give keep shape [{', '.join(map(str, bshape)) or ''}, k] or a 1-D keep")
                slots.setdefault(path, []).append(
                    _Slot(gi, role, keep, h, axis, h, h * sub, tuple(batch), vec))
        if int(keep.max()) >= n_units:
            raise ValueError(f"{argname}[{gi}].keep holds index {int(keep.max())}, out of range for {n_units} "
                             f"units (valid 0..{n_units - 1})")
        if keep.shape[-1] > n_units:  # pragma: no cover - implied by sorted + in range
            raise ValueError(f"{argname}[{gi}].keep keeps more units than exist")
    return slots


def _expand(keep: np.ndarray, block: int) -> np.ndarray:
    """Unit indices ``[*kb, k]`` -> position indices ``[*kb, k * block]``."""
    idx = keep[..., :, None] * block + np.arange(block)
    return idx.reshape(*keep.shape[:-1], keep.shape[-1] * block)


def _gather(x, s: _Slot):
    idx = _expand(s.keep, s.block)
    if idx.ndim == 1:
        return jnp.take(x, jnp.asarray(idx), axis=s.axis)
    nb = len(s.batch)
    front = list(s.batch) + [s.axis]
    y = jnp.moveaxis(x, front, list(range(nb + 1)))
    ii = jnp.asarray(idx).reshape(idx.shape + (1,) * (y.ndim - nb - 1))
    ii = jnp.broadcast_to(ii, idx.shape + y.shape[nb + 1:])
    y = jnp.take_along_axis(y, ii, axis=nb)
    return jnp.moveaxis(y, list(range(nb + 1)), front)


def _axes_fn(axes):
    spec = check_axes_spec(axes, "axes")
    if isinstance(spec, tuple) and spec and not isinstance(spec, axes_lib.Axes):
        spec = dict(spec)
    return lambda path, shape: axes_lib.resolve(path, shape, spec)


# ----------------------------------------------------------------------- prune
def prune(params, groups, *, axes=None):
    """The pruned (small) params: every listed leaf keeps only the kept units' positions.

    For a path in ``out`` the unit axis (see the module docstring) is gathered at the kept units,
    for a path in ``inp`` likewise; a leaf may be in ``out`` of one group and ``inp`` of another
    (the middle kernel of a deeper MLP) and then shrinks on both axes. Leaves in no group are
    returned unchanged (the same objects). The pytree structure is unchanged.

    Args:
      params: any params pytree (dict, linen params, ``nnx.State`` pure dict).
      groups: a :class:`PruneGroup` or a list of them.
      axes: matrix-view override (:mod:`lrjax.axes`), the same spec the LoRA config will use.

    Returns: params with, for a Dense kernel ``[M, N]`` in ``out`` of a group keeping ``k`` units,
    shape ``[M, k * head_dim]`` (generally: the unit axis shrinks to ``k * head_dim``) (``S_in W S_out^T`` in the module docstring's notation).
    Same dtypes. Works under ``jit`` / ``grad`` / ``vmap`` (close over ``groups``).

    Raises ``TypeError`` / ``ValueError`` naming ``params``, ``groups[i].out|inp|keep|head_dim``
    or ``axes``: paths that match no leaf, a path listed in the same role by two groups, leaves of
    one group with different unit counts (wrong path or axis), an axis size not a multiple of
    ``head_dim``, ``keep`` out of range, a per-layer ``keep`` whose batch shape differs from a leaf's.
    """
    flat = V.check_params(params, "params")
    groups = _check_groups(groups)
    slots = _resolve(flat, params, groups, _axes_fn(axes), "groups")
    new = {}
    for path, ss in slots.items():
        x = flat[path]
        for s in ss:
            x = _gather(x, s)
        new[path] = x
    return tree_lib.replace(params, new)


# --------------------------------------------------------------------- recover
def _scatter_rows(x, idx: np.ndarray, rows: int, base):
    """``base`` ``[*b, rows, c]`` with rows ``idx`` (``[k']`` or ``[*b, k']``) set to ``x`` ``[*b, k', c]``."""
    if idx.ndim == 1:
        return base.at[..., jnp.asarray(idx), :].set(x)
    *b, _, c = base.shape
    bt = math.prod(b)
    flat_base = base.reshape(bt, rows, c)
    flat_x = x.reshape(bt, idx.shape[-1], c)
    ii = jnp.asarray(idx.reshape(bt, idx.shape[-1]))
    out = flat_base.at[jnp.arange(bt)[:, None], ii].set(flat_x)
    return out.reshape(base.shape)


def recover(adapters, groups, full_params, rp, *, mode: str = "zeroA", key=None):
    """Scatter LoRA factors trained on the pruned model into the full model's shapes.

    For every adapted leaf: ``B_rec = B_small S_out`` (zero columns at pruned output units) when the
    leaf is in ``out`` of a group; ``A_rec = S_in^T A_small`` (zero rows at pruned input units, or
    ``N(0, (1/r)^2)`` rows with ``mode="normA"``) when it is in ``inp``; factors of leaves in no
    group are returned unchanged. With ``mode="zeroA"``
    ``s A_rec B_rec = S_in^T (s A_small B_small) S_out`` exactly (the paper's
    ``P_out^T dW_small P_in``), so ``rp.materialize(full_params, recovered)`` is the full model
    with the small model's update on the kept units only.

    Args:
      adapters: ``{path: {"a": A [*batch, M', r], "b": B [*batch, r, N']}}`` from
        ``rp.init(key, prune(full_params, groups))`` after training.
      groups: the :class:`PruneGroup` (s) the small model was pruned with.
      full_params: the full (unpruned) params; only shapes are read.
      rp: the :class:`lrjax.LoRA` / :class:`lrjax.RSLoRA` config the adapters were trained with
        (its ``axes`` locate the units, so :func:`prune` must have had the same ``axes``).
      mode: ``"zeroA"`` (default, official default) or ``"normA"``.
      key: a PRNG key, required by ``"normA"`` and refused otherwise.

    Returns: ``{path: {"a": A_rec [*batch, M, r], "b": B_rec [*batch, r, N]}}`` with the factors'
    dtypes. Works under ``jit`` (close over ``groups`` and ``rp``).

    Raises: ``TypeError`` naming ``rp`` for a variant that cannot be recovered (DoRA: its magnitude
    and column norms belong to the pruned weight; PiSSA and other variants that rewrite or read the
    base); ``TypeError`` / ``ValueError`` naming ``adapters`` (unknown path, missing/extra factors,
    shapes that do not fit the pruned leaf), ``groups[i]...`` (as :func:`prune`), ``full_params``,
    ``mode`` or ``key``.
    """
    from lrjax.reparam.base import Reparam
    if not isinstance(rp, Reparam):
        raise TypeError(f"rp must be the lrjax.LoRA or lrjax.RSLoRA config the adapters were trained with, "
                        f"got {V._fmt(rp)} ({type(rp).__name__})")
    if type(rp) not in _RECOVERABLE:
        raise TypeError(
            f"rp: LoRAM recovery supports lrjax.LoRA and lrjax.RSLoRA adapters only (the official code's scope), got "
            f"{type(rp).__name__}. Recovery zero-pads the factors a [M, r] and b [r, N] of a delta s A B; other "
            "variants either read the pruned base (DoRA's norms, PiSSA's/LoRA-GA's rewritten base), have factors of "
            "other shapes (LoRA-SB's core, NOLA's coefficients, CoDyRA's gate, Block-LoRA's shared block), or are "
            "not linear in the weight. Train LoRA/RSLoRA on the pruned model, or recover "
            "rp.delta(small_base, adapters) yourself")
    V.check_choice(mode, "mode", _MODES)
    if mode == "normA":
        if key is None:
            raise TypeError("key: mode='normA' draws the pruned rows of A from N(0, (1/r)^2); pass key=jax.random.key(0)")
        V.check_key(key, "key")
    elif key is not None:
        raise ValueError("key is only used by mode='normA'; mode='zeroA' is deterministic: drop key=")
    flat = V.check_params(full_params, "full_params")
    groups = _check_groups(groups)
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must be the dict {{leaf path: {{'a': A, 'b': B}}}} trained on the pruned model, "
                        f"got {V._fmt(adapters)} ({type(adapters).__name__})")
    if not adapters:
        raise ValueError("adapters is empty; pass the LoRA adapters trained on the pruned model")
    slots = _resolve(flat, full_params, groups, rp.leaf_axes, "groups")
    out = {}
    for path, f in adapters.items():
        if not isinstance(path, str):
            raise TypeError(f"adapters: keys must be leaf path strings such as 'Dense_0/kernel', got "
                            f"{V._fmt(path)} ({type(path).__name__})")
        if path not in flat:
            raise ValueError(f"adapters: {path!r} has no leaf in full_params; nearest: "
                             f"{tree_lib._nearest(path, flat)}")
        if not isinstance(f, Mapping):
            raise TypeError(f"adapters[{path!r}] must be a dict {{'a': A, 'b': B}}, got {V._fmt(f)}")
        extra = sorted(set(f) - {"a", "b"})
        if extra:
            raise ValueError(f"adapters[{path!r}] has factor(s) {extra}: only plain LoRA factors 'a', 'b' can be "
                             "recovered (a DoRA 'm' belongs to the pruned weight's column norms); train "
                             "lrjax.LoRA/RSLoRA on the pruned model")
        for nm in ("a", "b"):
            if nm not in f:
                raise ValueError(f"adapters[{path!r}] has no factor {nm!r}; LoRA adapters are {{'a': A, 'b': B}}")
            x = f[nm]
            if not isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
                raise TypeError(f"adapters[{path!r}][{nm!r}] must be an array, got {V._fmt(x)}; wrap it with jnp.asarray")
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"adapters[{path!r}][{nm!r}] has dtype {x.dtype}; factors must be floating")
        leaf = flat[path]
        try:
            ax = rp.leaf_axes(path, tuple(leaf.shape))
        except (TypeError, ValueError) as e:
            raise type(e)(f"adapters[{path!r}]: {e}") from None
        bshape, m, n = axes_lib.matrix_shape(tuple(leaf.shape), ax)
        s_in = s_out = None
        for s in slots.get(path, []):
            if s.vector:
                raise ValueError(f"adapters[{path!r}]: groups[{s.group}] treats this leaf as a (stacked) vector "
                                 "(ndim == keep.ndim); a LoRA-adapted kernel needs a keep per layer of its batch shape")
            if s.role == "out":
                s_out = s
            else:
                s_in = s
        m_s = m if s_in is None else s_in.keep.shape[-1] * s_in.flat
        n_s = n if s_out is None else s_out.keep.shape[-1] * s_out.flat
        a, b = f["a"], f["b"]
        r = a.shape[-1] if a.ndim else 0
        if a.ndim != len(bshape) + 2 or b.ndim != len(bshape) + 2 or \
                tuple(a.shape) != (*bshape, m_s, r) or tuple(b.shape) != (*bshape, r, n_s):
            raise ValueError(
                f"adapters[{path!r}]: factors a{tuple(a.shape)} b{tuple(b.shape)} do not fit the pruned leaf "
                f"(matrix view {(*bshape, m_s, n_s)}: expected a{(*bshape, m_s, 'r')} b{(*bshape, 'r', n_s)}); "
                "adapters trained on another pruning, or different groups/axes")
        rp.check_factor_rank(path, r, "adapters")
        a_rec, b_rec = a, b
        if s_out is not None:
            idx = _expand(s_out.keep, s_out.flat)
            bt = jnp.swapaxes(b, -1, -2)
            base = jnp.zeros((*bshape, n, r), b.dtype)
            b_rec = jnp.swapaxes(_scatter_rows(bt, idx, n, base), -1, -2)
        if s_in is not None:
            idx = _expand(s_in.keep, s_in.flat)
            if mode == "normA":
                noise = jax.random.normal(rp.leaf_key(key, path), (*bshape, m, r), jnp.float32) / r
                base = noise.astype(a.dtype)
            else:
                base = jnp.zeros((*bshape, m, r), a.dtype)
            a_rec = _scatter_rows(a, idx, m, base)
        out[path] = {"a": a_rec, "b": b_rec}
    return out


# -------------------------------------------------------------- choosing units
def unit_scores(params, *, out=(), inp=(), norm: str = "l2", head_dim: int = 1, axes=None) -> np.ndarray:
    """Magnitude score of every unit of a group: the ``norm`` of all weights that touch the unit.

    ``score[u] = (sum over the listed leaves of sum |w|^p over unit u's slice)^(1/p)``, ``p = 2``
    for ``"l2"`` and ``1`` for ``"l1"``: the unit's rows/columns of every ``out`` and ``inp`` leaf
    concatenated, one norm (LLM-Pruner-style element-wise magnitude importance of a coupled group;
    LLM-Pruner can also sum per-layer norms or use Taylor scores -- pass any score to
    :func:`select_group` for those). Computed in float64 on the host (a one-time, eager step).

    Returns ``[*batch, n_units]`` float64 (``batch`` = the leaves' common matrix-view batch shape,
    ``()`` for unstacked leaves). Raises like :func:`prune` (argument ``out``/``inp``/``axes``) and
    ``ValueError`` naming ``norm``.
    """
    V.check_choice(norm, "norm", ("l1", "l2"))
    flat = V.check_params(params, "params")
    probe = PruneGroup(out=out, inp=inp, keep=[0], head_dim=head_dim)
    slots = _resolve(flat, params, (probe,), _axes_fn(axes), "groups")
    p = 2.0 if norm == "l2" else 1.0
    total, bsh = None, None
    for path, ss in slots.items():
        for s in ss:
            x = np.abs(np.asarray(jax.device_get(flat[path]), np.float64)) ** p
            nb = len(s.batch)
            x = np.moveaxis(x, list(s.batch) + [s.axis], list(range(nb + 1)))
            units = x.shape[nb] // s.block
            x = x.reshape(x.shape[:nb] + (units, s.block) + x.shape[nb + 1:])
            per = x.sum(axis=tuple(range(nb + 1, x.ndim)))  # [*batch, units]
            if total is None:
                total, bsh = per, per.shape[:-1]
            elif per.shape != total.shape:
                raise ValueError(f"out/inp: {path!r} has batch shape {per.shape[:-1]} but other leaves of the group "
                                 f"have {bsh}; score stacked and unstacked leaves in separate groups")
            else:
                total = total + per
    return total ** (1.0 / p)


def select_group(params, *, out=(), inp=(), keep_ratio: float, score="l2", head_dim: int = 1,
                 per_layer: bool = False, axes=None) -> PruneGroup:
    """A :class:`PruneGroup` keeping the ``k = max(1, floor(keep_ratio * n + 1/2))`` highest-scoring units.

    Args:
      params, out, inp, head_dim, axes: as :class:`PruneGroup` / :func:`prune`.
      keep_ratio: fraction of units kept, in ``(0, 1]`` (the official ``pruned_ratio`` 0.75 is
        ``keep_ratio=0.25``; 1 keeps everything).
      score: ``"l2"`` / ``"l1"`` (:func:`unit_scores`) or an array of scores ``[n_units]`` (or
        ``[*batch, n_units]`` for stacked leaves), higher = more important.
      per_layer: for stacked leaves (matrix-view batch ``[L]``), pick units per layer (``keep``
        ``[L, k]``); otherwise the scores are summed over the batch axes and one ``keep`` is shared.

    Ties are broken toward the lower index; the returned ``keep`` is sorted ascending.
    Raises ``ValueError`` naming ``keep_ratio`` (outside ``(0, 1]``), ``score`` (wrong shape,
    NaN/Inf) and like :func:`prune`.
    """
    ratio = V.check_float(keep_ratio, "keep_ratio", low=0.0, high=1.0, low_open=True)
    V.check_bool(per_layer, "per_layer")
    if isinstance(score, str):
        V.check_choice(score, "score", ("l1", "l2"))
        sc = unit_scores(params, out=out, inp=inp, norm=score, head_dim=head_dim, axes=axes)
    else:
        arr = V.check_array(score, "score", kind="numeric", min_ndim=1)
        V.check_finite(arr, "score")
        ref = unit_scores(params, out=out, inp=inp, head_dim=head_dim, axes=axes)
        sc = np.asarray(jax.device_get(arr), np.float64)
        if sc.shape[-1] != ref.shape[-1] or (sc.ndim > 1 and sc.shape != ref.shape):
            raise ValueError(f"score must have shape [{ref.shape[-1]}] (one score per unit)"
                             + (f" or {ref.shape} (per stacked layer)" if ref.ndim > 1 else "")
                             + f", got {sc.shape}")
        if sc.ndim < ref.ndim:
            sc = np.broadcast_to(sc, ref.shape)
    if not per_layer and sc.ndim > 1:
        sc = sc.reshape(-1, sc.shape[-1]).sum(axis=0)
    n = sc.shape[-1]
    k = max(1, int(math.floor(ratio * n + 0.5)))
    order = np.argsort(-sc, axis=-1, kind="stable")[..., :k]
    keep = np.sort(order, axis=-1)
    return PruneGroup(out=out, inp=inp, keep=keep, head_dim=head_dim)
