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

All adapters must have been made for the same ``base`` (not true of PiSSA adapters, whose base
is their own residual: combining a PiSSA adapter raises).
"""
from __future__ import annotations

from typing import Mapping

from lrjax import tree as tree_lib
from lrjax.reparam.base import Adapters, Reparam
from lrjax.reparam.pissa import PiSSA

__all__ = ["use", "merge", "combine"]


def _rp(rps, name: str) -> Reparam:
    if isinstance(rps, Reparam):
        return rps
    if not isinstance(rps, Mapping) or name not in rps:
        raise KeyError(f"rps: no reparameterization config for adapter {name!r}; "
                       f"have {sorted(rps) if isinstance(rps, Mapping) else rps!r}")
    return rps[name]


def _get(named: Mapping[str, Adapters], name: str) -> Adapters:
    if name not in named:
        raise KeyError(f"no adapter named {name!r}; available: {sorted(named)}")
    return named[name]


def use(base, named: Mapping[str, Adapters], rps, name: str):
    """Effective params with only adapter ``name`` active (differentiable)."""
    ad = _get(named, name)
    return _rp(rps, name).materialize(base, ad)


def merge(base, named: Mapping[str, Adapters], rps, name: str):
    """Dense params with adapter ``name`` folded in (inference)."""
    ad = _get(named, name)
    return _rp(rps, name).merge(base, ad)


def combine(base, named: Mapping[str, Adapters], rps, weights: Mapping[str, float]):
    """``W + sum_name weights[name] * delta_name`` at every leaf any adapter touches."""
    if not weights:
        raise ValueError("weights: give at least one {adapter name: weight}")
    flat = tree_lib.flatten(base)
    acc: dict = {}
    for name, w in weights.items():
        rp = _rp(rps, name)
        if isinstance(rp, PiSSA):
            raise TypeError(f"combine: adapter {name!r} is PiSSA, whose base is its own residual; "
                            "merge it into the weights first, then combine others on that base")
        for path, d in rp.delta(base, _get(named, name)).items():
            term = w * d
            acc[path] = term if path not in acc else acc[path] + term
    return tree_lib.replace(base, {p: (flat[p] + d).astype(flat[p].dtype) for p, d in acc.items()})
