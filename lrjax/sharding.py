r"""FSDP-style shardings for params, adapters and optimizer states over a ``jax.sharding.Mesh``.

Fully sharded data parallelism (FSDP, ZeRO-3) keeps one slice of every large array on each device
and lets the compiler gather a weight where a product needs it. In JAX that is no new code: give
``jax.jit`` the ``NamedSharding`` of every input and output leaf and the SPMD partitioner inserts
the all-gathers and reduce-scatters. This module computes those shardings with the FSDP rule of
``big_vision``'s ``fsdp`` strategy and MaxText/EasyLM-style *partition rules*, so that LoRA
(:func:`lrjax.factored`) and every :mod:`lrjax.optim` transformation run on a mesh unchanged::

    from jax.sharding import AxisType
    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(AxisType.Auto,))
    p_sh = lrjax.sharding.fsdp_shardings(params, mesh)                # NamedSharding per leaf
    s_sh = lrjax.sharding.opt_state_shardings(tx, params, p_sh)       # follows the params
    params = lrjax.sharding.shard(params, p_sh)                       # host values -> global arrays
    state = jax.jit(tx.init, out_shardings=s_sh)(params)
    step = jax.jit(step, in_shardings=(p_sh, s_sh, x_sh), out_shardings=(p_sh, s_sh, None),
                   donate_argnums=(0, 1))

The mesh axes must be ``AxisType.Auto`` (the compiler places the collectives). Since JAX 0.7
``jax.make_mesh`` makes *Explicit* axes by default, under which the sharded contractions of the step
above are ambiguous (``ShardingTypeError``); :func:`fsdp_shardings` therefore refuses a mesh with
Explicit or Manual axes -- pass ``axis_types=(AxisType.Auto,) * len(axis_names)`` to
``jax.make_mesh`` (``jax.sharding.Mesh(devices, names)`` is Auto by default).

The FSDP rule (:func:`fsdp_spec`), per leaf of shape ``(d_0, ..., d_{k-1})`` and mesh axis size ``n``:

* a leaf with fewer than ``min_size`` entries, a scalar, or one with no axis divisible by ``n`` is
  *replicated* (``PartitionSpec()``); sharding small leaves only adds collectives;
* otherwise the largest axis ``d_i`` with ``d_i % n == 0`` is sharded over the mesh axis (ties go
  to the later axis, e.g. the output axis of a square ``[in, out]`` kernel); every other axis is
  replicated.

Optimizer states (:func:`opt_state_shardings`, :func:`follow_shardings`): the state's shapes come
from ``jax.eval_shape(tx.init, params)`` (nothing is allocated). A state leaf *belongs* to the
parameter whose path (``lrjax.tree`` path string, ``"layers/0/kernel"``) appears as a run of
consecutive components in the state leaf's path (the longest such parameter wins): Adam's
``mu/layers/0/kernel``, GaLore's ``basis/layers/0/kernel`` and ``inner/0/mu/layers/0/kernel``,
8-bit Adam's ``mu/layers/0/kernel/codes``, LoRA-Pro's ``mu/layers/0/kernel/a``. Then

* a state leaf with the parameter's shape gets the parameter's spec (moments shard exactly like
  their weights, whatever rule or explicit spec the weight got);
* a state leaf of another shape (GaLore's basis ``P: [d, r]``, its projected moments
  ``[r, N]`` / ``[M, r]``, DCT indices, quantized codes ``[blocks, 256]``, LoRA-Pro-full's
  ``[M, N]`` moment of a LoRA pair) gets the FSDP rule over the mesh axes its parameter is sharded
  on, and is replicated when its parameter is replicated; so GaLore's bases and moments shard with
  their leaves;
* a leaf that belongs to no parameter (step counts, OwLore's sampling probabilities) gets the
  FSDP rule over the params' mesh axes (in practice: replicated, they are tiny).

Any sharding is numerically valid -- ``jax.jit`` computes the same function whatever the layout --
so these rules only decide memory and communication. What sharding can change is the *order of
floating-point reductions*: a contraction over a sharded axis (``x^T dy`` over a sharded batch,
``P^T G`` over a sharded ``d``) becomes per-device partial sums plus an all-reduce, which rounds
differently from one device. ``docs/sharded_training.md`` lists, per transformation, which results
are bit-identical to one device and which agree to float32 tolerance (measured by
``tests/test_sharded_training.py`` on 8 forced host devices and on 2 processes).

Multi-process (``jax.distributed.initialize``, one process per host): every process runs the same
program; :func:`shard` builds the global arrays from values that every process holds (e.g. an
``init`` from the same key), and :func:`gather` returns full NumPy copies on every process.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from lrjax import tree as _tree
from lrjax._validation import _fmt, check_int

__all__ = ["fsdp_spec", "fsdp_shardings", "follow_shardings", "opt_state_shardings", "shard", "gather",
           "DEFAULT_MIN_SIZE"]

#: Leaves with fewer entries than this are replicated by default (16 KiB of float32).
DEFAULT_MIN_SIZE = 4096

AxisName = Union[str, Sequence[str]]


# ----------------------------------------------------------------------------- validation
def _check_mesh(mesh, argname: str = "mesh") -> Mesh:
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise TypeError(f"{argname} must be a jax.sharding.Mesh (e.g. jax.make_mesh((jax.device_count(),), "
                        f"('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))) or an AbstractMesh, got "
                        f"{type(mesh).__name__}")
    types = getattr(mesh, "axis_types", None) or ()
    bad = [(n, t) for n, t in zip(mesh.axis_names, types) if t != jax.sharding.AxisType.Auto]
    if bad:
        raise ValueError(f"{argname}: the mesh axes {[n for n, _ in bad]} are {[str(t) for _, t in bad]}, but FSDP "
                         f"shardings need AxisType.Auto axes (with Explicit axes jax.jit refuses the sharded "
                         f"contractions as ambiguous); build the mesh with jax.make_mesh(shape, names, "
                         f"axis_types=(jax.sharding.AxisType.Auto,) * len(names)) or jax.sharding.Mesh(devices, names)")
    return mesh


def _check_axis_name(axis_name, mesh: Mesh, argname: str = "axis_name") -> tuple:
    """A mesh axis name or a non-empty sequence of distinct ones -> tuple of names."""
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(names, (tuple, list)) or not names or not all(isinstance(a, str) for a in names):
        raise TypeError(f"{argname} must be a mesh axis name (str) or a non-empty tuple of them, got "
                        f"{_fmt(axis_name)}")
    for a in names:
        if a not in mesh.axis_names:
            raise ValueError(f"{argname}: {a!r} is not an axis of the mesh, whose axes are {tuple(mesh.axis_names)}; "
                             f"pass one of them (or build the mesh with that axis name, e.g. "
                             f"jax.make_mesh((jax.device_count(),), ({a!r},)))")
    if len(set(names)) != len(names):
        raise ValueError(f"{argname}: mesh axes must be distinct, got {tuple(names)}")
    return tuple(names)


def _axes_size(mesh: Mesh, names) -> int:
    return math.prod(mesh.shape[a] for a in names)


def _shape_of(x, path: str, argname: str) -> Optional[tuple]:
    if x is None:
        return None
    shape = getattr(x, "shape", None)
    if shape is None or not hasattr(x, "dtype"):
        raise TypeError(f"{argname}: leaf {path!r} must be an array or jax.ShapeDtypeStruct, got "
                        f"{type(x).__name__} ({_fmt(x)})")
    return tuple(int(d) for d in shape)


def _spec_entries(spec) -> list:
    """A PartitionSpec as a list with one tuple of mesh axis names per array axis."""
    out = []
    for e in spec:
        if e is None:
            out.append(())
        elif isinstance(e, str):
            out.append((e,))
        else:
            out.append(tuple(e))
    return out


def _check_spec(spec, shape: tuple, mesh: Mesh, path: str, argname: str) -> PartitionSpec:
    """An explicit spec must fit the leaf: rank, known mesh axes, each used once, divisibility."""
    if not isinstance(spec, PartitionSpec):
        raise TypeError(f"{argname}: the spec for leaf {path!r} must be a jax.sharding.PartitionSpec, got "
                        f"{type(spec).__name__} ({_fmt(spec)})")
    entries = _spec_entries(spec)
    if len(entries) > len(shape):
        raise ValueError(f"{argname}: spec {spec} for leaf {path!r} has {len(entries)} entries but the leaf has "
                         f"shape {shape} ({len(shape)} axes); give at most one entry per axis")
    used = [a for e in entries for a in e]
    for a in used:
        if a not in mesh.axis_names:
            raise ValueError(f"{argname}: spec {spec} for leaf {path!r} names mesh axis {a!r}, but the mesh's axes "
                             f"are {tuple(mesh.axis_names)}; use one of them")
    if len(set(used)) != len(used):
        raise ValueError(f"{argname}: spec {spec} for leaf {path!r} uses a mesh axis twice; each mesh axis may "
                         f"shard at most one array axis")
    for i, e in enumerate(entries):
        n = _axes_size(mesh, e)
        if e and shape[i] % n:
            ok = [j for j, d in enumerate(shape) if d % n == 0]
            hint = (f"shard axis {ok[-1]} (size {shape[ok[-1]]}) instead" if ok else
                    "replicate it with PartitionSpec()")
            raise ValueError(f"{argname}: spec {spec} for leaf {path!r} shards axis {i} (size {shape[i]}) over mesh "
                             f"axes {e} of total size {n}, which does not divide {shape[i]}; {hint}, or use a mesh "
                             f"whose size divides {shape[i]}")
    return spec


def _check_min_size(min_size) -> int:
    return check_int(min_size, "min_size", low=0)


# ----------------------------------------------------------------------------- the FSDP rule
def fsdp_spec(shape, size: int, axis_name: AxisName = "fsdp", *, min_size: int = DEFAULT_MIN_SIZE) -> PartitionSpec:
    """The FSDP rule for one shape (module doc): shard the largest axis divisible by ``size``.

    Args:
      shape: the leaf's shape (a tuple of ints).
      size: the number of devices along ``axis_name`` (``>= 1``).
      axis_name: the mesh axis name (or tuple of names, sharded jointly) put in the spec.
      min_size: leaves with fewer entries are replicated (default :data:`DEFAULT_MIN_SIZE`).

    Returns:
      ``PartitionSpec()`` (replicated) or ``PartitionSpec(None, ..., axis_name, ...)``.

    Raises:
      TypeError: ``shape`` not a tuple/list of ints; ``size`` / ``min_size`` not an int; ``axis_name``
        not a str or a non-empty tuple of str.
      ValueError: a negative entry of ``shape``; ``size < 1``; ``min_size < 0``.
    """
    size = check_int(size, "size", low=1)
    min_size = _check_min_size(min_size)
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape):
        raise TypeError(f"shape must be a tuple of ints (an array's .shape), got {_fmt(shape)}")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must have entries >= 0, got {tuple(shape)}; pass the leaf's .shape")
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(names, (tuple, list)) or not names or not all(isinstance(a, str) for a in names):
        raise TypeError(f"axis_name must be a mesh axis name (str, e.g. 'fsdp') or a non-empty tuple of them, got "
                        f"{_fmt(axis_name)}")
    shape = tuple(int(d) for d in shape)
    if not shape or math.prod(shape) < min_size or size == 1:
        return PartitionSpec()
    best = None
    for i, d in enumerate(shape):
        if d % size == 0 and d >= size and (best is None or d >= shape[best]):
            best = i
    if best is None:
        return PartitionSpec()
    name = axis_name if isinstance(axis_name, str) else tuple(axis_name)
    return PartitionSpec(*([None] * best + [name]))


def _match_rules(rules, argname: str):
    """``rules``: a sequence of ``(pattern, PartitionSpec)``; returns ``[(matcher, pattern, spec)]``."""
    if rules is None:
        return []
    if isinstance(rules, dict):
        rules = list(rules.items())
    if not isinstance(rules, (list, tuple)):
        raise TypeError(f"{argname} must be None or a sequence of (pattern, PartitionSpec) pairs, got "
                        f"{type(rules).__name__}")
    out = []
    for item in rules:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"{argname}: each rule must be a (pattern: str, PartitionSpec) pair, got {_fmt(item)}")
        pat, spec = item
        if not isinstance(spec, PartitionSpec):
            raise TypeError(f"{argname}: the spec of rule {pat!r} must be a jax.sharding.PartitionSpec, got "
                            f"{type(spec).__name__} ({_fmt(spec)})")
        try:
            m = _tree._matcher(pat)
        except ValueError as e:
            raise ValueError(f"{argname}: {e}") from None
        out.append((m, pat, spec))
    return out


def fsdp_shardings(tree, mesh: Mesh, axis_name: AxisName = "fsdp", *, min_size: int = DEFAULT_MIN_SIZE,
                   rules=None):
    """A pytree of ``NamedSharding`` (the structure of ``tree``) for FSDP over ``mesh``.

    Args:
      tree: params, adapters, a batch or any pytree of arrays / ``jax.ShapeDtypeStruct`` (e.g. from
        ``jax.eval_shape``); ``None`` leaves stay ``None``.
      mesh: the ``jax.sharding.Mesh`` (or a ``jax.sharding.AbstractMesh((8,), ("fsdp",))`` to plan
        the layout of a larger mesh without its devices).
      axis_name: the mesh axis the large axis of each leaf is sharded over (default ``"fsdp"``), or
        a tuple of axes sharded jointly (``("data", "fsdp")``).
      min_size: leaves with fewer entries are replicated (default :data:`DEFAULT_MIN_SIZE` = 4096).
      rules: optional partition rules ``[(pattern, PartitionSpec), ...]`` (or a dict), checked in
        order before the FSDP rule; a pattern is an :mod:`lrjax.tree` regex (full path or path
        suffix: ``"head/kernel"``, ``".*bias"``). The first matching rule's spec is used as given.

    Returns:
      The pytree of ``NamedSharding`` (pass it to ``jax.jit(in_shardings=, out_shardings=)``,
      :func:`shard`, :func:`opt_state_shardings`).

    Raises:
      TypeError: ``mesh`` not a Mesh; ``axis_name`` not a str/tuple of str; a leaf that is not an
        array; a malformed rule.
      ValueError: ``axis_name`` not an axis of ``mesh``; a rule whose spec names a mesh axis that is
        not in ``mesh``, has more entries than the leaf has axes, or shards an axis whose size the
        mesh axes do not divide (the message names ``rules``, the leaf path and the fix).
    """
    mesh = _check_mesh(mesh)
    names = _check_axis_name(axis_name, mesh)
    min_size = _check_min_size(min_size)
    matchers = _match_rules(rules, "rules")
    name = names[0] if len(names) == 1 else names
    size = _axes_size(mesh, names)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    out = []
    for kp, x in leaves:
        path = _tree.path_str(kp)
        shape = _shape_of(x, path, "tree")
        if shape is None:
            out.append(None)
            continue
        spec = None
        for m, pat, s in matchers:
            if m(path, x):
                spec = _check_spec(s, shape, mesh, path, "rules")
                break
        if spec is None:
            spec = fsdp_spec(shape, size, name, min_size=min_size)
        out.append(NamedSharding(mesh, spec))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- optimizer states
def _components(kp) -> tuple:
    parts = _tree.path_str(kp)
    return tuple(parts.split("/")) if parts else ()


def _contains(hay: tuple, needle: tuple) -> bool:
    n = len(needle)
    return n > 0 and any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def follow_shardings(state, params, param_shardings, *, min_size: int = DEFAULT_MIN_SIZE):
    """Shardings for ``state`` (any pytree of arrays or ``ShapeDtypeStruct``) that follow the params'.

    The rule is the module doc's: a state leaf belongs to the parameter whose path is the longest run
    of consecutive components of its own path; same shape -> the parameter's spec; another shape ->
    the FSDP rule over the parameter's mesh axes (replicated if the parameter is); no parameter ->
    the FSDP rule over the params' mesh axes.

    Args:
      state: the optimizer state (or its ``jax.eval_shape``).
      params: the params (arrays or ``ShapeDtypeStruct``) the state was made from.
      param_shardings: a pytree of ``NamedSharding`` with the structure of ``params`` (e.g.
        :func:`fsdp_shardings`), all on one mesh.
      min_size: the FSDP rule's replication threshold for state leaves of other shapes.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``state`` (``None`` leaves kept).

    Raises:
      TypeError / ValueError: ``param_shardings`` not ``NamedSharding`` leaves of ``params``' structure,
      or on more than one mesh.
    """
    min_size = _check_min_size(min_size)
    p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
    try:
        s_leaves = p_def.flatten_up_to(param_shardings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"param_shardings must have the tree structure of params (one NamedSharding per leaf), "
                         f"e.g. fsdp_shardings(params, mesh): {e}") from None
    meshes = []
    table = []
    for (kp, x), s in zip(p_leaves, s_leaves):
        path = _tree.path_str(kp)
        if not isinstance(s, NamedSharding):
            raise TypeError(f"param_shardings: leaf {path!r} must be a jax.sharding.NamedSharding, got "
                            f"{type(s).__name__}; build them with lrjax.sharding.fsdp_shardings(params, mesh)")
        if not any(s.mesh == m for m in meshes):
            meshes.append(s.mesh)
        table.append((_components(kp), _shape_of(x, path, "params"), s))
    if len(meshes) != 1:
        raise ValueError(f"param_shardings must all be on one mesh, found {len(meshes)} meshes")
    mesh = meshes[0]
    # the default mesh axes for state leaves that belong to no parameter: the params' most used ones
    counts: dict = {}
    for _, _, s in table:
        for e in _spec_entries(s.spec):
            if e:
                counts[e] = counts.get(e, 0) + 1
    default = max(counts, key=counts.get) if counts else None

    def rule(shape, axes):
        if axes is None:
            return PartitionSpec()
        return fsdp_spec(shape, _axes_size(mesh, axes), axes[0] if len(axes) == 1 else axes, min_size=min_size)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: x is None)
    out = []
    for kp, x in leaves:
        path = _tree.path_str(kp)
        shape = _shape_of(x, path, "state")
        if shape is None:
            out.append(None)
            continue
        comps = _components(kp)
        owner = None
        for pc, pshape, s in table:
            if _contains(comps, pc) and (owner is None or len(pc) > len(owner[0])):
                owner = (pc, pshape, s)
        if owner is None:
            spec = rule(shape, default)
        elif shape == owner[1]:
            spec = owner[2].spec
        else:
            axes = [e for e in _spec_entries(owner[2].spec) if e]
            spec = rule(shape, axes[0]) if axes else PartitionSpec()
        out.append(NamedSharding(mesh, spec))
    return jax.tree_util.tree_unflatten(treedef, out)


def opt_state_shardings(tx, params, param_shardings, *, min_size: int = DEFAULT_MIN_SIZE):
    """Shardings of ``tx.init(params)`` that follow ``param_shardings`` (:func:`follow_shardings`).

    The state's shapes come from ``jax.eval_shape(tx.init, params)``: nothing is allocated or
    computed. Use the result as ``jax.jit(tx.init, out_shardings=...)`` and in the train step's
    ``in_shardings``/``out_shardings``.

    Args:
      tx: an ``optax.GradientTransformation`` (any :mod:`lrjax.optim` transformation, a chain...).
      params: the params (or adapters) the optimizer trains: arrays or ``ShapeDtypeStruct``.
      param_shardings: their shardings (:func:`fsdp_shardings`).
      min_size: see :func:`follow_shardings`.

    Raises:
      TypeError: ``tx`` has no ``init``; see :func:`follow_shardings` for the rest.
    """
    if not callable(getattr(tx, "init", None)):
        raise TypeError(f"tx must be an optax.GradientTransformation (with init/update), got {type(tx).__name__}")
    shapes = jax.eval_shape(tx.init, params)
    return follow_shardings(shapes, params, param_shardings, min_size=min_size)


# ----------------------------------------------------------------------------- host <-> mesh
def shard(tree, shardings):
    """Global ``jax.Array`` s laid out as ``shardings`` from host values every process holds.

    Works with one process (like ``jax.device_put``) and with several (each process fills its
    addressable shards from its own copy, ``jax.make_array_from_callback``): every process must pass
    the same values, e.g. an init from the same key.

    Args:
      tree: a pytree of arrays (NumPy, ``jax.Array``, Python scalars); the same values on every process.
      shardings: a pytree of ``jax.sharding.Sharding`` with the structure of ``tree`` (e.g.
        :func:`fsdp_shardings`).

    Returns:
      The pytree of global ``jax.Array`` s (dtype and shape of each leaf kept).

    Raises:
      ValueError: ``shardings`` does not have the structure of ``tree``; a sharding that does not
        divide its leaf's shape (the message names the leaf path).
      TypeError: a leaf of ``shardings`` is not a ``jax.sharding.Sharding``.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    try:
        shs = treedef.flatten_up_to(shardings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"shardings must have the tree structure of tree (one Sharding per leaf): {e}") from None
    out = []
    for (kp, x), s in zip(leaves, shs):
        if not isinstance(s, jax.sharding.Sharding):
            raise TypeError(f"shardings: leaf {_tree.path_str(kp)!r} must be a jax.sharding.Sharding, got "
                            f"{type(s).__name__}")
        host = np.asarray(x)
        try:
            s.shard_shape(host.shape)
        except ValueError:
            raise ValueError(f"shardings: the sharding {getattr(s, 'spec', s)} of leaf {_tree.path_str(kp)!r} does not "
                             f"divide its shape {host.shape}; use a spec whose mesh axes divide the sharded "
                             f"axis, or build the shardings with fsdp_shardings(tree, mesh)") from None
        out.append(jax.make_array_from_callback(host.shape, s, lambda idx, h=host: h[idx]))
    return jax.tree_util.tree_unflatten(treedef, out)


def gather(tree):
    """Full NumPy copies of (possibly sharded, multi-process) arrays, on every process.

    Args:
      tree: a pytree of ``jax.Array`` s (sharded or not, across processes or not); other leaves
        (NumPy arrays, Python scalars) are converted with ``np.asarray``; ``None`` is an empty subtree.

    Returns:
      The pytree of ``np.ndarray`` (same structure, shapes and dtypes).

    Raises:
      Nothing of its own; a leaf ``np.asarray`` cannot convert raises NumPy's error.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    out = []
    for x in leaves:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                x = x.addressable_data(0)         # every process holds the whole array
            else:
                from jax.experimental import multihost_utils
                x = multihost_utils.process_allgather(x, tiled=True)
        out.append(np.asarray(x))
    return jax.tree_util.tree_unflatten(treedef, out)
