"""OwLore: outlier-weighted layerwise sampled low-rank training (Li et al. 2024, arXiv:2405.18380).

Every ``period`` steps, ``gamma`` of the ``L`` layers are sampled (without replacement) with
probability proportional to their *outlier ratio*; only they are trained, with GaLore inside, for
the period. The rest of the model outside the layers (embeddings, final norm, head) is trained
every step with the inner optimizer at full size, as in LISA/OwLore.

Outlier ratio of layer ``l`` (OWL, Yin et al. 2024), over all matrices of the layer concatenated:

.. math::

    D_l = 100\\cdot\\frac{\\#\\{(i, j):\\ A_{ij} > M\\, \\overline{A}\\}}{\\#A},\\qquad
    A_{ij} = |W_{ij}|\\,\\lVert X_i\\rVert_2 ,\\qquad p_l = D_l / \\textstyle\\sum_k D_k

with ``||X_i||`` the norm of input feature ``i`` over calibration data when ``input_norms`` is
given, else 1 (weight magnitudes only). Defaults follow the official scripts: ``M = 13``
(``metric_cache/*_ratio_13``), ``gamma = 5`` active layers, ``period = 50`` steps, GaLore
rank 256 with ``update_proj_gap = 100`` and scale 1. If every ratio is 0 (e.g. a randomly
initialized model, where no weight exceeds 13x the mean), sampling is uniform.

Frozen layers keep no optimizer state: the state holds ``gamma`` *slots*, each shaped like one
layer (the GaLore state of a ``[gamma, ...]`` stack, projected per slot with batched linear
algebra). At every period boundary the slots are reassigned to the newly sampled layers and
their state is reset (moments zeroed, projector refreshed from the first gradient), since a
new layer's moments do not exist. (The official torch code keeps the states of previously
active layers alive in the optimizer; this implementation does not, which is the memory
saving the method is meant to have.) Frozen layers get a zero update. Their gradients are still
computed by the caller; stop them in the loss with :func:`active_layers` to save that compute.

Layers are found two ways, which can be mixed: separate leaves whose path holds the layer index
(``blocks/0/...``, ``blocks/1/...``; the ``layers`` regex with one capture group), and stacked
leaves (``nn.scan`` / ``nnx.scan`` / vmapped stacks) whose axis 0 is the layer index
(``scan_layers=``, patterns as in :func:`lrjax.tree.select`). Layers must have identical
structure (the same leaf paths and shapes after the layer index). A stacked leaf is projected per
layer with the matrix view that :mod:`lrjax.axes` gives the whole stack, which must list axis 0
among its batch axes (the default for ``[L, m, n]``; pass ``axes=`` for stacked attention
kernels ``[L, d, h, k]``).

Weight decay (``weight_decay=``, decoupled, AdamW-style ``u += lambda * w`` before the
learning rate) is applied to the leaves that are trained this step only: the active layers and,
with ``train_rest``, the rest. Frozen layers get exactly zero update, as in LISA/OwLore where
they have no gradient; ``update`` then needs ``params``.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrjax import axes as _axes
from lrjax import tree as _tree
from lrjax.optim.galore import galore
from lrjax._validation import check_array, check_bool, check_finite, check_float, check_int, is_concrete
from lrjax.optim.projection import (_EMBED, _check_inner_shapes, _check_int, _check_leaves, _check_same_tree,
                                   check_inner)

__all__ = ["owlore", "OwLoreState", "outlier_ratios", "active_layers", "DEFAULT_LAYERS"]

#: Default layer pattern: the capture group is the layer index.
DEFAULT_LAYERS = r"(?:^|/)(?:blocks|layers|layer|h)/(\d+)(?=/|$)"


class OwLoreState(NamedTuple):
    """State of :func:`owlore`.

    Attributes:
      count: int32 ``[]`` steps taken.
      probs: float32 ``[L]`` layer sampling probabilities.
      active: int32 ``[gamma]`` the layers trained in the current period (slot order).
      slots: GaLore state (:class:`~lrjax.optim.projection.ProjectionState`) of the ``gamma`` slots.
      rest: inner state of the leaves outside the layers (``None`` at layer leaves).
    """

    count: jax.Array
    probs: jax.Array
    active: jax.Array
    slots: Any
    rest: Any


def _nest(items: dict) -> dict:
    out: dict = {}
    for path, x in items.items():
        d = out
        parts = path.split("/")
        for k in parts[:-1]:
            d = d.setdefault(k, {})
        d[parts[-1]] = x
    return out


class _Layout(NamedTuple):
    """Where the layers live: ``members[rel]`` is ``[(path, index_or_None), ...]`` in layer order
    (``None``: a separate leaf per layer; an int: row of a stacked leaf)."""

    n_layers: int
    members: dict
    rest: list

    def paths(self):
        return {p for ms in self.members.values() for p, _ in ms}

    def stacked(self, rel):
        return self.members[rel][0][1] is not None

    def stack(self, flat, rel):
        """``[L, *layer_shape]`` values of ``rel`` for every layer."""
        ms = self.members[rel]
        if self.stacked(rel):
            return flat[ms[0][0]]
        return jnp.stack([flat[p] for p, _ in ms])

    def unstack(self, rel, full):
        """``{path: value}`` from a ``[L, *layer_shape]`` array."""
        ms = self.members[rel]
        if self.stacked(rel):
            return {ms[0][0]: full}
        return {p: full[j] for j, (p, _) in enumerate(ms)}

    def layer_shape(self, flat, rel):
        p, i = self.members[rel][0]
        return flat[p].shape[1:] if i is not None else flat[p].shape


def _layout(params, layers: str, scan_layers=None) -> _Layout:
    """Find the layers (module doc) and check they are identical."""
    rx = re.compile(layers)
    if rx.groups < 1:
        raise ValueError(f"layers={layers!r} needs a capture group for the layer index, e.g. r'blocks/(\\d+)/'")
    flat = _tree.flatten(params)
    scanned = set(_tree.select(params, scan_layers, argname="scan_layers")) if scan_layers is not None else set()
    where, rest = {}, []
    for p, x in flat.items():
        mt = None if p in scanned else rx.search(p)
        if mt is None:
            if p not in scanned:
                rest.append(p)
            continue
        rel = "/".join(s.strip("/") for s in (p[:mt.start()], p[mt.end():]) if s.strip("/")) or "_"
        where[(int(mt.group(1)), rel)] = p
    ids = sorted({l for l, _ in where})
    if not ids and not scanned:
        raise ValueError(f"layers={layers!r} matches no leaf path (and no scan_layers given). Available paths: "
                         f"{list(flat)[:8]}; for nn.scan stacks pass scan_layers=")
    members: dict = {}
    for r in sorted({r for _, r in where}):
        for l in ids:
            if (l, r) not in where:
                raise ValueError(f"layers: layer {l} has no leaf {r!r}; OwLore needs identically shaped layers")
            if flat[where[(l, r)]].shape != flat[where[(ids[0], r)]].shape:
                raise ValueError(f"layers: {where[(l, r)]!r} has shape {flat[where[(l, r)]].shape}, layer "
                                 f"{ids[0]} has {flat[where[(ids[0], r)]].shape}; layers must be identical")
        members[r] = [(where[(l, r)], None) for l in ids]
    sizes = {p: jnp.shape(flat[p])[0] if jnp.ndim(flat[p]) else None for p in scanned}
    order = sorted(scanned)  # deterministic: sets iterate in a per-process hash order
    if ids or not order:
        L, ref = len(ids), None
    else:  # the layer count most stacked leaves agree on (ties: the first path in sorted order)
        counts = [sizes[p] for p in order]
        L = max(counts, key=lambda c: (counts.count(c), -counts.index(c)))
        ref = next(p for p in order if sizes[p] == L)
    for p in order:
        if sizes[p] != L:
            what = f"{len(ids)} separate layers match layers={layers!r}" if ids else \
                f"{ref!r} (like most stacked leaves) has {L}"
            raise ValueError(f"scan_layers: {p!r} has shape {jnp.shape(flat[p])}, so axis 0 (the layer axis) "
                             f"has {sizes[p]} layers, but {what}; every layer leaf must describe the same layers")
        members[p] = [(p, l) for l in range(L)]
    return _Layout(L, members, rest)


def _layer_matrix_axes(lay: _Layout, flat, rel, axes):
    """Axes of the ``[gamma, *layer_shape]`` slot array of ``rel`` (layer axis 0 batched)."""
    p = lay.members[rel][0][0]
    if lay.stacked(rel):
        ax = _axes.resolve(p, flat[p].shape, axes)
        if 0 not in ax.batch:
            raise ValueError(f"scan_layers: the matrix view of stacked leaf {p!r} (shape {flat[p].shape}) is {ax}, "
                             "which does not batch axis 0 (the layer axis); pass axes={pattern: "
                             "Axes(batch=(0,), inp=..., out=...)} for this leaf")
        return ax
    ax = _axes.resolve(p, flat[p].shape, axes)
    sh = lambda t: tuple(i + 1 for i in t)  # noqa: E731
    return _axes.Axes((0,) + sh(ax.batch), sh(ax.inp), sh(ax.out))


def _is_matrix(lay, flat, rel):
    p = lay.members[rel][0][0]
    return len(lay.layer_shape(flat, rel)) >= 2 and not _EMBED.search(p)


def outlier_ratios(params, layers: str = DEFAULT_LAYERS, *, m: float = 13.0, input_norms=None,
                   axes=None, scan_layers=None) -> jax.Array:
    """Per-layer outlier ratio ``D_l`` in percent (module doc), float32 ``[L]``, layers in index order.

    Only matrix leaves (per layer ``ndim >= 2``, not embeddings) count. ``input_norms``
    (optional): ``{path: [M]}`` (``[L, M]`` for a stacked leaf) input-feature norms per leaf, in
    the matrix view of :mod:`lrjax.axes`. ``scan_layers``: stacked layer leaves (module doc).
    """
    m = check_float(m, "m (outlier multiple of the mean)", low=0.0, low_open=True)
    _check_layers(layers)
    _check_leaves(params, "params")
    if input_norms is not None and not isinstance(input_norms, dict):
        raise TypeError(f"input_norms must be None or a dict {{path: [M] array}}, got {type(input_norms).__name__}")
    lay = _layout(params, layers, scan_layers)
    flat = _tree.flatten(params)
    per_layer = [[] for _ in range(lay.n_layers)]
    for rel in lay.members:
        if not _is_matrix(lay, flat, rel):
            continue
        ax = _layer_matrix_axes(lay, flat, rel, axes)
        a = jnp.abs(_axes.to_matrix(lay.stack(flat, rel), ax).astype(jnp.float32))   # [L, *b, M, N]
        a = a.reshape((lay.n_layers, -1) + a.shape[-2:])
        if input_norms is not None:
            norms = [input_norms.get(p) for p, _ in lay.members[rel]] if not lay.stacked(rel) else \
                ([input_norms[lay.members[rel][0][0]]] if lay.members[rel][0][0] in input_norms else [None])
            if all(v is not None for v in norms):
                nv = jnp.asarray(norms[0] if lay.stacked(rel) else jnp.stack(norms), jnp.float32)
                a = a * nv.reshape((lay.n_layers, 1, -1, 1))
        for l in range(lay.n_layers):
            per_layer[l].append(a[l].reshape(-1))
    out = []
    for l, vals in enumerate(per_layer):
        if not vals:
            raise ValueError(f"layer {l} has no matrix leaf to measure outliers on")
        v = jnp.concatenate(vals)
        out.append(100.0 * jnp.mean(v > m * jnp.mean(v)))
    return jnp.stack(out)


def _check_layers(layers):
    if not isinstance(layers, str):
        raise TypeError(f"layers must be a regular expression (str) with one capture group, got "
                        f"{type(layers).__name__}")
    try:
        rx = re.compile(layers)
    except re.error as e:
        raise ValueError(f"layers must be a regular expression with one capture group, got {layers!r} ({e})") from None
    if rx.groups < 1:
        raise ValueError(f"layers={layers!r} needs a capture group for the layer index, e.g. r'blocks/(\\d+)/'")


def active_layers(state: OwLoreState) -> jax.Array:
    """The layer indices (positions in sorted layer-id order) trained in the current period."""
    if not isinstance(state, OwLoreState):
        raise TypeError(f"state must be the OwLoreState of an owlore optimizer, got {type(state).__name__}")
    return state.active


def owlore(inner, rank: int = 256, *, gamma: int = 5, period: int = 50, update_proj_gap: int = 100,
           scale: float = 1.0, m: float = 13.0, ratios=None, layers: str = DEFAULT_LAYERS,
           train_rest: bool = True, targets=None, axes=None, seed: int = 0, refresh: str = "svd",
           scan_layers=None, weight_decay: float = 0.0, weight_decay_mask=None,
           **galore_kwargs) -> optax.GradientTransformation:
    """OwLore around an inner optax transformation (module doc).

    Args:
      inner: params-free optax transformation (``optax.scale_by_adam()``).
      rank, update_proj_gap, scale, refresh: GaLore inside the active layers (defaults 256, 100, 1,
        exact SVD; :func:`lrjax.optim.galore`).
      gamma: active layers per period (default 5); ``1 <= gamma <= L``.
      period: steps between resamplings (default 50).
      m: outlier multiple ``M`` of the layer mean (default 13).
      ratios: optional precomputed ``[L]`` outlier ratios (e.g. :func:`outlier_ratios` with
        activation norms); default: computed from the parameters at ``init``.
      layers: regex with one capture group (the layer index), searched in leaf paths.
      train_rest: train the leaves outside the layers every step (default True) or freeze them.
      targets, axes: which in-layer leaves GaLore projects, and their matrix view, resolved on the
        full paths of the first layer (default: every matrix leaf).
      seed: seed of the layer sampling and of randomized refreshes.
      scan_layers: patterns (:func:`lrjax.tree.select`) of stacked leaves whose axis 0 is the
        layer index (``nn.scan`` stacks); may be combined with separate ``layers`` leaves.
      weight_decay: decoupled weight decay on the trained leaves only (module doc; default 0).
      weight_decay_mask: optional pytree of bools (params structure) or callable
        ``params -> mask`` excluding leaves from the decay (e.g. biases and norms).
      **galore_kwargs: ``side``, ``oversample``, ``n_iter`` for the inner GaLore.
    """
    check_inner(inner)
    gamma = _check_int(gamma, "gamma")
    period = _check_int(period, "period")
    seed = check_int(seed, "seed", low=0, high=2**31 - 1)
    _check_int(rank, "rank")
    m = check_float(m, "m (outlier multiple of the mean)", low=0.0, low_open=True)
    _check_layers(layers)
    train_rest = check_bool(train_rest, "train_rest")
    weight_decay = check_float(weight_decay, "weight_decay", low=0.0)
    if ratios is not None:
        ratios = check_array(ratios, "ratios", kind="numeric", convert=True, ndim=1)
        check_finite(ratios, "ratios")
        if is_concrete(ratios) and bool(jnp.any(ratios < 0)):
            raise ValueError("ratios must be >= 0 (outlier ratios in percent)")
    if weight_decay_mask is not None and not callable(weight_decay_mask) and \
            not isinstance(weight_decay_mask, (dict, list, tuple)):
        raise TypeError(f"weight_decay_mask must be None, a pytree of bools or a callable params -> mask, got "
                        f"{type(weight_decay_mask).__name__}")
    galore(inner, rank, update_proj_gap=update_proj_gap, scale=scale, refresh=refresh, seed=seed,
           **galore_kwargs)   # validates the shared arguments now

    def _setup(params):
        lay = _layout(params, layers, scan_layers)
        L = lay.n_layers
        if gamma > L:
            raise ValueError(f"gamma={gamma} active layers requested but the model has L={L} layers "
                             f"(pattern {layers!r}, scan_layers {scan_layers!r}); use gamma <= {L}")
        flat = _tree.flatten(params)
        if targets is None:
            proj = {r for r in lay.members if _is_matrix(lay, flat, r)}
        else:
            chosen = set(_tree.select(params, targets, argname="targets"))
            proj = {r for r, ms in lay.members.items() if ms[0][0] in chosen}
        if not proj:
            raise ValueError("owlore: no matrix leaf inside the layers to project; check `layers`, `scan_layers` "
                             "and `targets`")
        slot_axes = {r: _layer_matrix_axes(lay, flat, r, axes) for r in proj}
        tx = galore(inner, rank, update_proj_gap=update_proj_gap, scale=scale, refresh=refresh, seed=seed,
                    targets=lambda path, leaf: path in proj,
                    axes=lambda path, shape: slot_axes.get(path), **galore_kwargs)
        return lay, tx, flat

    def _slot_tree(rels, fn):
        return _nest({r: fn(r) for r in rels})

    def _rest_tree(tree, lay):
        layer_paths = lay.paths()
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        paths = _tree.paths(tree)
        return jax.tree_util.tree_unflatten(
            treedef, [None if p in layer_paths else x for p, x in zip(paths, leaves)])

    def init_fn(params):
        _check_leaves(params, "params")
        lay, tx, flat = _setup(params)
        L = lay.n_layers
        if ratios is None:
            d = outlier_ratios(params, layers, m=m, axes=axes, scan_layers=scan_layers)
        else:
            d = jnp.asarray(ratios, jnp.float32)
            if d.shape != (L,):
                raise ValueError(f"ratios must have shape ({L},) (one per layer), got {d.shape}")
        tot = jnp.sum(d)
        probs = jnp.where(tot > 0, d / jnp.where(tot > 0, tot, 1.0), jnp.full((L,), 1.0 / L))
        proxies = _slot_tree(lay.members, lambda r: jnp.zeros((gamma,) + lay.layer_shape(flat, r),
                                                                flat[lay.members[r][0][0]].dtype))
        rest_state = inner.init(_rest_tree(params, lay)) if train_rest else optax.EmptyState()
        return OwLoreState(jnp.zeros([], jnp.int32), probs, jnp.arange(gamma, dtype=jnp.int32),
                           tx.init(proxies), rest_state)

    def update_fn(updates, state, params=None):
        if weight_decay and params is None:
            raise ValueError("params: owlore(weight_decay=...) needs the parameters: call update(grads, state, params)")
        _check_leaves(updates, "updates")
        if not isinstance(state, OwLoreState):
            raise TypeError(f"state must be the OwLoreState returned by this optimizer's init, got {type(state).__name__}")
        if params is not None:
            _check_leaves(params, "params")
            _check_same_tree(updates, params, "updates", "params")
        try:
            lay, tx, flat = _setup(updates)
        except ValueError as e:
            raise ValueError(f"updates do not have the layer structure of the params given to init: {e}") from e
        L = lay.n_layers
        if state.probs.shape != (L,):
            raise ValueError(f"updates have {L} layers but the optimizer state was initialized for "
                             f"{state.probs.shape[0]}; pass gradients with the params' structure")
        count = state.count
        new_period = count % period == 0
        key = jax.random.fold_in(jax.random.key(seed, impl="rbg"), count // period)
        drawn = jax.random.choice(key, L, (gamma,), replace=False, p=state.probs).astype(jnp.int32)
        active = jnp.where(new_period, drawn, state.active)

        stacks = {r: lay.stack(flat, r) for r in lay.members}
        slot_g = _slot_tree(lay.members, lambda r: stacks[r][active])
        fresh = tx.init(jax.tree_util.tree_map(jnp.zeros_like, slot_g))
        slots = jax.tree_util.tree_map(lambda a, b: jnp.where(new_period, a, b), fresh, state.slots)
        slot_u, slots = tx.update(slot_g, slots, None)
        slot_u = _tree.flatten(slot_u)

        out = {}
        for r in lay.members:
            out.update(lay.unstack(r, jnp.zeros_like(stacks[r]).at[active].set(slot_u[r])))
        if train_rest:
            rest_in = _rest_tree(updates, lay)
            try:
                rest_u, rest_state = inner.update(rest_in, state.rest, None)
            except (TypeError, ValueError) as e:
                raise ValueError(f"updates: the inner transformation failed on the leaves outside the layers; the "
                                 f"usual cause is gradients whose structure or shapes differ from the params given "
                                 f"to init ({type(e).__name__}: {e})") from e
            _check_inner_shapes(_tree.paths(rest_in), jax.tree_util.tree_leaves(rest_in),
                                jax.tree_util.tree_leaves(rest_u), state.rest, rest_state)
            rest_flat = _tree.flatten(rest_u)
            for p in lay.rest:
                out[p] = rest_flat[p]
        else:
            rest_state = state.rest
            for p in lay.rest:
                out[p] = jnp.zeros_like(flat[p])
        new = _tree.replace(updates, out)
        if weight_decay:
            new = _decay_trained(new, params, lay, active, train_rest, weight_decay, weight_decay_mask)
        return new, OwLoreState(optax.safe_int32_increment(count), state.probs, active, slots, rest_state)

    return optax.GradientTransformation(init_fn, update_fn)


def _decay_trained(updates, params, lay: _Layout, active, train_rest, wd, mask):
    """``u += wd * w`` on the trained leaves: the active layers' rows and (``train_rest``) the rest."""
    decayed, _ = optax.add_decayed_weights(wd, mask).update(
        jax.tree_util.tree_map(jnp.zeros_like, updates), optax.EmptyState(), params)
    dflat, uflat = _tree.flatten(decayed), _tree.flatten(updates)
    on = jnp.zeros((lay.n_layers,), bool).at[active].set(True)
    out = {}
    for rel, ms in lay.members.items():
        for j, (p, i) in enumerate(ms):
            if i is None:
                out[p] = uflat[p] + jnp.where(on[j], dflat[p], 0).astype(uflat[p].dtype)
        if lay.stacked(rel):
            p = ms[0][0]
            gate = on.reshape((-1,) + (1,) * (uflat[p].ndim - 1))
            out[p] = uflat[p] + jnp.where(gate, dflat[p], 0).astype(uflat[p].dtype)
    if train_rest:
        for p in lay.rest:
            out[p] = uflat[p] + dflat[p].astype(uflat[p].dtype)
    return _tree.replace(updates, out)
