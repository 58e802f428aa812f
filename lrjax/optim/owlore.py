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

The layers must have identical structure (the same leaf paths and shapes after the layer
index), and must be separate leaves (``blocks/0/...``, ``blocks/1/...``); ``nn.scan`` stacks are
not supported here.
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
from lrjax.optim.projection import _EMBED, _check_int, check_inner

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


def _layout(params, layers: str):
    """``(layer_ids, rel_paths, {(layer, rel): full_path}, rest_paths)``; checks identical layers."""
    rx = re.compile(layers)
    if rx.groups < 1:
        raise ValueError(f"layers={layers!r} needs a capture group for the layer index, e.g. r'blocks/(\\d+)/'")
    flat = _tree.flatten(params)
    where, rest = {}, []
    for p, x in flat.items():
        mt = rx.search(p)
        if mt is None:
            rest.append(p)
            continue
        rel = "/".join(s.strip("/") for s in (p[:mt.start()], p[mt.end():]) if s.strip("/")) or "_"
        where[(int(mt.group(1)), rel)] = p
    ids = sorted({l for l, _ in where})
    if not ids:
        raise ValueError(f"layers={layers!r} matches no leaf path. Available paths: {list(flat)[:8]}")
    rels = sorted({r for _, r in where})
    for l in ids:
        for r in rels:
            if (l, r) not in where:
                raise ValueError(f"layers: layer {l} has no leaf {r!r}; OwLore needs identically shaped layers")
            if flat[where[(l, r)]].shape != flat[where[(ids[0], r)]].shape:
                raise ValueError(f"layers: {where[(l, r)]!r} has shape {flat[where[(l, r)]].shape}, layer "
                                 f"{ids[0]} has {flat[where[(ids[0], r)]].shape}; layers must be identical")
    return ids, rels, where, rest


def outlier_ratios(params, layers: str = DEFAULT_LAYERS, *, m: float = 13.0, input_norms=None,
                   axes=None) -> jax.Array:
    """Per-layer outlier ratio ``D_l`` in percent (module doc), float32 ``[L]``, layers in index order.

    Only matrix leaves (``ndim >= 2``, not embeddings) count. ``input_norms`` (optional):
    ``{path: [M]}`` input-feature norms per leaf (matrix view of :mod:`lrjax.axes`).
    """
    if not m > 0:
        raise ValueError(f"m (outlier multiple of the mean) must be > 0, got {m!r}")
    ids, rels, where, _ = _layout(params, layers)
    flat = _tree.flatten(params)
    out = []
    for l in ids:
        vals = []
        for r in rels:
            p = where[(l, r)]
            x = flat[p]
            if x.ndim < 2 or _EMBED.search(p):
                continue
            a = jnp.abs(_axes.to_matrix(x, _axes.resolve(p, x.shape, axes)).astype(jnp.float32))
            if input_norms is not None and p in input_norms:
                a = a * jnp.asarray(input_norms[p], jnp.float32)[..., :, None]
            vals.append(a.reshape(-1))
        if not vals:
            raise ValueError(f"layer {l} has no matrix leaf to measure outliers on")
        a = jnp.concatenate(vals)
        out.append(100.0 * jnp.mean(a > m * jnp.mean(a)))
    return jnp.stack(out)


def active_layers(state: OwLoreState) -> jax.Array:
    """The layer indices (positions in sorted layer-id order) trained in the current period."""
    return state.active


def owlore(inner, rank: int = 256, *, gamma: int = 5, period: int = 50, update_proj_gap: int = 100,
           scale: float = 1.0, m: float = 13.0, ratios=None, layers: str = DEFAULT_LAYERS,
           train_rest: bool = True, targets=None, axes=None, seed: int = 0, refresh: str = "svd",
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
      **galore_kwargs: ``side``, ``oversample``, ``n_iter`` for the inner GaLore.
    """
    check_inner(inner)
    gamma = _check_int(gamma, "gamma")
    period = _check_int(period, "period")
    seed = _check_int(seed, "seed", low=0)
    _check_int(rank, "rank")
    if not isinstance(m, (int, float)) or isinstance(m, bool) or not m > 0:
        raise ValueError(f"m must be a float > 0, got {m!r}")
    try:
        rx = re.compile(layers)
    except (re.error, TypeError) as e:
        raise ValueError(f"layers must be a regular expression with one capture group, got {layers!r} ({e})") from None
    if rx.groups < 1:
        raise ValueError(f"layers={layers!r} needs a capture group for the layer index, e.g. r'blocks/(\\d+)/'")
    galore(inner, rank, update_proj_gap=update_proj_gap, scale=scale, refresh=refresh, seed=seed,
           **galore_kwargs)   # validates the shared arguments now

    def _setup(params):
        ids, rels, where, rest = _layout(params, layers)
        L = len(ids)
        if gamma > L:
            raise ValueError(f"gamma={gamma} active layers requested but the model has L={L} layers "
                             f"(pattern {layers!r}); use gamma <= {L}")
        flat = _tree.flatten(params)
        first = {r: where[(ids[0], r)] for r in rels}
        if targets is None:
            proj = {r for r, p in first.items() if flat[p].ndim >= 2 and not _EMBED.search(p)}
        else:
            chosen = set(_tree.select(params, targets, argname="targets"))
            proj = {r for r, p in first.items() if p in chosen}
        if not proj:
            raise ValueError("owlore: no matrix leaf inside the layers to project; check `layers` and `targets`")
        shifted = {}
        for r in proj:
            p = first[r]
            ax = _axes.resolve(p, flat[p].shape, axes)
            sh = lambda t: tuple(i + 1 for i in t)  # noqa: E731
            shifted[r] = _axes.Axes((0,) + sh(ax.batch), sh(ax.inp), sh(ax.out))
        tx = galore(inner, rank, update_proj_gap=update_proj_gap, scale=scale, refresh=refresh, seed=seed,
                    targets=lambda path, leaf: path in proj,
                    axes=lambda path, shape: shifted.get(path), **galore_kwargs)
        return ids, rels, where, rest, tx, flat

    def _slot_tree(rels, fn):
        return _nest({r: fn(r) for r in rels})

    def _rest_tree(tree, where):
        layer_paths = set(where.values())
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        paths = _tree.paths(tree)
        return jax.tree_util.tree_unflatten(
            treedef, [None if p in layer_paths else x for p, x in zip(paths, leaves)])

    def init_fn(params):
        ids, rels, where, rest, tx, flat = _setup(params)
        L = len(ids)
        if ratios is None:
            d = outlier_ratios(params, layers, m=m, axes=axes)
        else:
            d = jnp.asarray(ratios, jnp.float32)
            if d.shape != (L,):
                raise ValueError(f"ratios must have shape ({L},) (one per layer), got {d.shape}")
        tot = jnp.sum(d)
        probs = jnp.where(tot > 0, d / jnp.where(tot > 0, tot, 1.0), jnp.full((L,), 1.0 / L))
        proxies = _slot_tree(rels, lambda r: jnp.zeros((gamma,) + flat[where[(ids[0], r)]].shape,
                                                         flat[where[(ids[0], r)]].dtype))
        rest_state = inner.init(_rest_tree(params, where)) if train_rest else optax.EmptyState()
        return OwLoreState(jnp.zeros([], jnp.int32), probs, jnp.arange(gamma, dtype=jnp.int32),
                           tx.init(proxies), rest_state)

    def update_fn(updates, state, params=None):
        ids, rels, where, rest, tx, flat = _setup(updates)
        L = len(ids)
        count = state.count
        new_period = count % period == 0
        key = jax.random.fold_in(jax.random.key(seed, impl="rbg"), count // period)
        drawn = jax.random.choice(key, L, (gamma,), replace=False, p=state.probs).astype(jnp.int32)
        active = jnp.where(new_period, drawn, state.active)

        stacks = {r: jnp.stack([flat[where[(l, r)]] for l in ids]) for r in rels}
        slot_g = _slot_tree(rels, lambda r: stacks[r][active])
        fresh = tx.init(jax.tree_util.tree_map(jnp.zeros_like, slot_g))
        slots = jax.tree_util.tree_map(lambda a, b: jnp.where(new_period, a, b), fresh, state.slots)
        slot_u, slots = tx.update(slot_g, slots, None)
        slot_u = _tree.flatten(slot_u)

        out = {}
        for r in rels:
            full = jnp.zeros_like(stacks[r]).at[active].set(slot_u[r])
            for j, l in enumerate(ids):
                out[where[(l, r)]] = full[j]
        if train_rest:
            rest_u, rest_state = inner.update(_rest_tree(updates, where), state.rest, None)
            rest_flat = _tree.flatten(rest_u)
            for p in rest:
                out[p] = rest_flat[p]
        else:
            rest_state = state.rest
            for p in rest:
                out[p] = jnp.zeros_like(flat[p])
        new = _tree.replace(updates, out)
        return new, OwLoreState(optax.safe_int32_increment(count), state.probs, active, slots, rest_state)

    return optax.GradientTransformation(init_fn, update_fn)
