"""Several named adapters on one base: switch, combine with weights, merge one.

Named adapters are just a dict ``{name: adapters}`` (a pytree, so it jits, checkpoints and
goes through optax like any other) plus the static configs ``{name: Reparam}`` (or one
``Reparam`` shared by all). Nothing is stored on the model.

* switch: ``rps[name].materialize(base, named[name])`` -- see :func:`use`;
* combine: ``W + sum_i w_i (W_eff_i - W)`` over the named adapters -- :func:`combine`. The
  weighted sum of *deltas* is defined for every variant (for DoRA the delta includes the
  magnitude rescaling), so LoRA, rsLoRA and DoRA adapters can be mixed; ``weights`` may be
  traced arrays (learned mixing);
* merge one: :func:`merge` -- dense weights with one adapter folded in.

Precision: :func:`combine` computes every delta and the weighted sum in
``promote_types(w, every factor, every weight, float32)`` and rounds once to the base leaf's
dtype (no per-adapter rounding of the deltas).

All adapters must have been made for the same ``base`` (not true of PiSSA adapters, whose base
is their own residual: combining a PiSSA adapter raises). Unknown names raise
:class:`lrjax.tree.PathNotFound`-style errors that are both ``KeyError`` and ``ValueError``.
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from lrjax import _validation as V
from lrjax import tree as tree_lib
from lrjax.reparam.base import Adapters, Reparam, _is_array, _is_concrete, _leaf_kind
from lrjax.reparam.pissa import PiSSA

__all__ = ["use", "merge", "combine", "NameNotFound"]


class NameNotFound(KeyError, ValueError):
    """An adapter name with no adapters or no config (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _check_named(named, argname="named"):
    if not isinstance(named, Mapping):
        raise TypeError(f"{argname} must be a dict {{adapter name: adapters}}, got {_leaf_kind(named)}")
    if not named:
        raise ValueError(f"{argname} is empty; give at least one {{adapter name: adapters}}")
    for k in named:
        if not isinstance(k, str):
            raise TypeError(f"{argname}: adapter names must be str, got {_leaf_kind(k)}")
    return named


def _check_name(name, argname="name"):
    if not isinstance(name, str):
        raise TypeError(f"{argname} must be an adapter name (str), got {_leaf_kind(name)}")
    return name


def _check_rps(rps):
    if isinstance(rps, Reparam):
        return rps
    if not isinstance(rps, Mapping):
        raise TypeError(f"rps must be a Reparam (e.g. lrjax.LoRA(rank=8)) or a dict {{adapter name: Reparam}}, "
                        f"got {_leaf_kind(rps)}")
    for k, v in rps.items():
        if not isinstance(v, Reparam):
            raise TypeError(f"rps[{k!r}] must be a Reparam such as lrjax.LoRA(rank=8), got {_leaf_kind(v)}")
    return rps


def _rp(rps, name: str) -> Reparam:
    _check_rps(rps)
    if isinstance(rps, Reparam):
        return rps
    if name not in rps:
        raise NameNotFound(f"rps: no reparameterization config for adapter {name!r}; have {sorted(map(str, rps))}")
    return rps[name]


def _get(named: Mapping[str, Adapters], name: str, argname="name") -> Adapters:
    if name not in named:
        raise NameNotFound(f"{argname}: no adapter named {name!r}; available: {sorted(named)}")
    return named[name]


def use(base, named: Mapping[str, Adapters], rps, name: str):
    """Effective params with only adapter ``name`` active (differentiable)."""
    _check_named(named)
    _check_name(name)
    ad = _get(named, name)
    return _rp(rps, name).materialize(base, ad)


def merge(base, named: Mapping[str, Adapters], rps, name: str):
    """Dense params with adapter ``name`` folded in (inference)."""
    _check_named(named)
    _check_name(name)
    ad = _get(named, name)
    return _rp(rps, name).merge(base, ad)


def _check_weight(w, name):
    where = f"weights[{name!r}]"
    if _is_array(w):
        if w.ndim != 0:
            raise ValueError(f"{where} must be a scalar, got shape {tuple(w.shape)}")
        if not jnp.issubdtype(w.dtype, jnp.floating) and not jnp.issubdtype(w.dtype, jnp.integer):
            raise TypeError(f"{where} must be a real scalar, got dtype {w.dtype}")
        if _is_concrete(w):
            V.check_float(w, where)  # finite
        return w
    return V.check_float(w, where)


def combine(base, named: Mapping[str, Adapters], rps, weights: Mapping[str, float]):
    """``W + sum_name weights[name] * delta_name`` at every leaf any adapter touches.

    ``weights`` is a dict ``{adapter name: weight}`` (finite real numbers or scalar arrays, which
    may be traced). Computed in the compute dtype and rounded once to each leaf's dtype.
    """
    _check_named(named)
    _check_rps(rps)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a dict {{adapter name: weight}}, got {_leaf_kind(weights)}")
    if not weights:
        raise ValueError("weights: give at least one {adapter name: weight}")
    ws = {}
    for name, w in weights.items():
        _check_name(name, "weights keys")
        _get(named, name, "weights")
        ws[name] = _check_weight(w, name)
    flat = None
    parts: dict = {}  # path -> list of (weight, delta in its compute dtype)
    for name, w in ws.items():
        rp = _rp(rps, name)
        rp._refuse_weight("combine")
        if isinstance(rp, PiSSA):
            raise TypeError(f"combine: adapter {name!r} is PiSSA, whose base is its own residual; "
                            "merge it into the weights first, then combine others on that base")
        ad = named[name]
        flat = rp._check(base, ad, argname=f"named[{name!r}]", basename="base")
        rp._check_finite(flat, ad, argname=f"named[{name!r}]", basename="base")
        for path, f in ad.items():
            d = rp.delta_matrix(rp.to_view(path, flat[path]), f)
            parts.setdefault(path, []).append((w, rp.from_view(path, d, flat[path].shape)))
    out = {}
    for path, terms in parts.items():
        leaf = flat[path]
        cd = V.compute_dtype(leaf.dtype, *(d.dtype for _, d in terms),
                             *(w.dtype for w, _ in terms if _is_array(w) and jnp.issubdtype(w.dtype, jnp.floating)))
        acc = leaf.astype(cd)
        for w, d in terms:
            acc = acc + (jnp.asarray(w, cd) if _is_array(w) else w) * d.astype(cd)
        out[path] = acc.astype(leaf.dtype)
    return tree_lib.replace(base, out)
