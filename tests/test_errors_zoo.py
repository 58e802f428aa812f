"""Bad-input sweep over the adapter zoo of issue 11 (every Reparam subclass lrjax.reparam exports
beyond LoRA/RSLoRA/DoRA/PiSSA, which tests/test_errors_reparam.py sweeps).

Each kind of bad input is applied to every protocol method of every variant: wrong kinds raise
``TypeError``, wrong values ``ValueError``, and the message names the argument. Bad adapters are
derived from each variant's own adapters by one mutation (a factor removed, an unknown factor, a
list for an array, an integer factor, a wrong shape, an unknown path, ...), so a new variant is
swept as soon as it is listed in ``ZOO``; ``test_every_exported_variant_is_swept`` fails when a
Reparam subclass is exported without a row here.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax import reparam as R
from lrjax.interpreter import NotMergeable
from lrjax.reparam.base import Reparam

T, V = TypeError, ValueError


def _dense():
    k = jax.random.split(jax.random.key(0), 2)
    return {"d": {"kernel": jax.random.normal(k[0], (8, 6)) / 3, "bias": jnp.zeros(6)}}


def _conv():
    return {"c": {"kernel": jax.random.normal(jax.random.key(1), (3, 3, 4, 6)) / 3, "bias": jnp.zeros(6)}}


def _grads(params):
    return {p: jnp.sin(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)) for p, x in
            lrjax.tree.flatten(params).items() if p.endswith("kernel")}


#: name -> (config factory, params factory); data-aware variants get grads from ``_grads``
ZOO = {
    "LoRAGA": (lambda **k: R.LoRAGA(rank=2, **k), _dense),
    "LoRAGA-peft": (lambda **k: R.LoRAGA(rank=2, semantics="peft", **k), _dense),
    "LoRASB": (lambda **k: R.LoRASB(rank=2, **k), _dense),
    "LoRAXS": (lambda **k: R.LoRAXS(rank=2, **k), _dense),
    "NOLA": (lambda **k: R.NOLA(rank=2, num_basis=8, **k), _dense),
    "NOLA-vit": (lambda **k: R.NOLA(rank=2, num_basis=8, convention="vit", **k), _dense),
    "BlockLoRA": (lambda **k: R.BlockLoRA(rank=2, blocks=2, **k), _dense),
    "CoDyRA": (lambda **k: R.CoDyRA(rank=2, **k), _dense),
    "ConvLoRA": (lambda **k: R.ConvLoRA(rank=2, **k), _conv),
    "CPLoRA": (lambda **k: R.CPLoRA(rank=2, **k), _conv),
    "ConvDoRA": (lambda **k: R.ConvDoRA(rank=2, **k), _conv),
    "CPDoRA": (lambda **k: R.CPDoRA(rank=2, **k), _conv),
    # issue 12: activation-space adapters (weight-space operations raise NotMergeable), task axes
    "FlyLoRA": (lambda **k: R.FlyLoRA(rank=2, top_k=1, **k), _dense),
    "NeRA": (lambda **k: R.NeRA(rank=2, num_knots=3, **k), _dense),
    "SeqBottleneck": (lambda **k: R.SeqBottleneck(rank=2, **k), _dense),
    "MoLoRA": (lambda **k: R.MoLoRA(rank=2, num_experts=3, **k), _dense),
    "AdapterBank": (lambda **k: R.AdapterBank(rank=2, slots=3, **k), _dense),
    "MTLoRA": (lambda **k: R.MTLoRA(rank=2, num_tasks=2, task_rank=1, **k), _dense),
    # issue 14: pretraining layers on any model (SLTrain replaces the kernel; NOBLE, HGF are not mergeable)
    "SLTrain": (lambda **k: R.SLTrain(rank=2, delta=0.2, **k), _dense),
    "PureLowRank": (lambda **k: R.PureLowRank(rank=2, **k), _dense),
    "NOBLE": (lambda **k: R.NOBLE(rank=2, **k), _dense),
    "HGF": (lambda **k: R.HGF(rank=2, **k), _dense),
}
#: variants whose weight replaces the kernel: ``delta`` (W_eff - W) is refused with a TypeError
_NO_DELTA = ("SLTrain", "PureLowRank")
#: variants without an ``alpha / r`` scale: any ``alpha`` is refused (ValueError naming alpha)
_NO_ALPHA = ("NOBLE", "HGF")
_WEIGHT_OPS = ("materialize", "merge", "delta", "unmerge")


def _activation(name):
    return type(ZOO[name][0]()).activation_space


@functools.cache
def _made(name):
    make, pf = ZOO[name]
    rp = make()
    params = pf()
    kw = {"grads": _grads(params)} if rp.needs_grads else {}
    base, ad = rp.init(jax.random.key(0), params, **kw)
    # a non-trivial adapter (B != 0 where it starts at zero) so merge/unmerge do real work
    ad = {p: {k: (v + 0.01 if jnp.issubdtype(v.dtype, jnp.floating) and k not in rp.frozen_keys else v)
              for k, v in f.items()} for p, f in ad.items()}
    if isinstance(rp, R.AdapterBank):  # one example routed to slot 0 (an empty slot: a zero term)
        ad = rp.route(ad, jnp.array([0]))
    return rp, params, base, ad


def test_every_exported_variant_is_swept():
    exported = {n for n in R.__all__ if isinstance(getattr(R, n), type) and issubclass(getattr(R, n), Reparam)}
    swept_elsewhere = {"Reparam", "LoRA", "RSLoRA", "DoRA", "PiSSA"}  # tests/test_errors_reparam.py
    assert exported - swept_elsewhere == {n.split("-")[0] for n in ZOO}


# ------------------------------------------------------------------------------------ adapters
def _bad_adapters(name):
    rp, params, base, ad = _made(name)
    path = next(iter(ad))
    f = ad[path]
    k0 = next(k for k in rp.factor_keys if k not in rp.seed_keys)
    x = f[k0]
    out = [
        ("not a dict", [f], T), ("a string", "lora", T), ("empty", {}, V), ("int key", {3: f}, T),
        ("factors as a list", {path: list(f.values())}, T),
        ("unknown path", {"zz/kernel": f}, V),
        ("unknown factor", {path: {**f, "zz": x}}, V),
        ("missing factor", {path: {k: v for k, v in f.items() if k != k0}}, V),
        ("factor as a list", {path: {**f, k0: np.asarray(x).tolist()}}, T),
        ("integer factor", {path: {**f, k0: x.astype(jnp.int32)}}, T),
        ("wrong shape", {path: {**f, k0: jnp.concatenate([x, x[..., :1]], -1)}}, V),
    ]
    for s in rp.seed_keys:
        out.append(("float seed", {path: {**f, s: f[s].astype(jnp.float32)}}, T))
    return out


METHODS = {
    "materialize": lambda rp, b, a: rp.materialize(b, a),
    "merge": lambda rp, b, a: rp.merge(b, a),
    "delta": lambda rp, b, a: rp.delta(b, a),
    "unmerge": lambda rp, b, a: rp.unmerge(b, a),
    "factored": lambda rp, b, a: (
        lrjax.factored(lambda p, x: x @ p["d"]["kernel"], rp)(b, a, jnp.ones((1, 8))) if rp.activation_space else
        lrjax.factored(lambda p, x: jax.tree.leaves(p)[0].sum() * x, rp)(b, a, jnp.ones(2))),
    "split": lambda rp, b, a: rp.split(a),
    "trainable_mask": lambda rp, b, a: rp.trainable_mask(a),
}
_NO_UNMERGE = ("ConvDoRA", "CPDoRA")  # DoRA-style merges are not invertible (refused; tested below)
# split/trainable_mask read only the dict structure: the shape/dtype/path mutations are for the others
_STRUCTURAL = ("not a dict", "a string", "int key", "factors as a list", "unknown factor")

ADAPTER_CASES = [(n, m, i) for n in ZOO for m in METHODS
                 if not (m == "unmerge" and n in _NO_UNMERGE) and not (m in _WEIGHT_OPS and _activation(n))
                 and not (m == "delta" and n in _NO_DELTA)
                 for i, (what, _, _) in enumerate(_bad_adapters(n))
                 if m not in ("split", "trainable_mask") or what in _STRUCTURAL]


@pytest.mark.parametrize("name,meth,i", ADAPTER_CASES, ids=[f"{n}-{m}-{i}" for n, m, i in ADAPTER_CASES])
def test_bad_adapters_are_refused_naming_adapters(name, meth, i):
    rp, params, base, ad = _made(name)
    what, bad, exc = _bad_adapters(name)[i]
    with pytest.raises(exc, match="adapters"):
        METHODS[meth](rp, base, bad)


@pytest.mark.parametrize("name", list(ZOO))
def test_good_adapters_work_in_every_method(name):
    rp, params, base, ad = _made(name)
    for m, call in METHODS.items():
        if m in _WEIGHT_OPS and rp.activation_space:
            with pytest.raises(NotMergeable, match=f"{type(rp).__name__}.{m}: .*activation-space"):
                call(rp, base, ad)
            continue
        if m == "delta" and name in _NO_DELTA:
            with pytest.raises(T, match=f"{type(rp).__name__}.delta: .*no delta on a base weight"):
                call(rp, base, ad)
            continue
        if m == "unmerge" and name in _NO_UNMERGE:
            with pytest.raises(V, match="unmerge|invertible"):
                call(rp, base, ad)
            continue
        call(rp, base, ad)
    tr, fr = rp.split(ad)
    assert rp.join(tr, fr) == ad


# ---------------------------------------------------------------------------------- base params
BAD_PARAMS = [("abc", T), (None, T), (3, T), ({"d": {"kernel": [[1.0, 2.0]]}}, T), ({}, V), (jnp.ones((4, 3)), T)]
PARAM_CASES = [(n, m, i) for n in ZOO for m in ("init", "materialize", "merge", "delta", "factored")
               if not (m in _WEIGHT_OPS and _activation(n)) and not (m == "delta" and n in _NO_DELTA)
               for i in range(len(BAD_PARAMS))]


@pytest.mark.parametrize("name,meth,i", PARAM_CASES, ids=[f"{n}-{m}-{i}" for n, m, i in PARAM_CASES])
def test_bad_params_are_refused_naming_the_argument(name, meth, i):
    rp, params, base, ad = _made(name)
    bad, exc = BAD_PARAMS[i]
    if meth == "init":
        kw = {"grads": _grads(params)} if rp.needs_grads else {}
        with pytest.raises(exc, match="params"):
            rp.init(jax.random.key(0), bad, **kw)
    else:
        with pytest.raises(exc, match="base"):
            METHODS[meth](rp, bad, ad)


@pytest.mark.parametrize("name", list(ZOO))
def test_bad_key_and_nonfinite_leaf(name):
    rp, params, base, ad = _made(name)
    kw = {"grads": _grads(params)} if rp.needs_grads else {}
    with pytest.raises(T, match="key"):
        rp.init("seed", params, **kw)
    path = next(iter(ad))
    bad = lrjax.tree.replace(params, {path: lrjax.tree.get(params, path).at[(0,) * 2].set(jnp.nan)})
    with pytest.raises(V, match="NaN"):
        rp.init(jax.random.key(0), bad, **kw)
    nan_ad = {p: {k: (v.at[(0,) * v.ndim].set(jnp.nan) if jnp.issubdtype(v.dtype, jnp.floating) else v)
                  for k, v in f.items()} for p, f in ad.items()}
    if rp.activation_space:  # no weight to merge; the factored path propagates NaN like jax.numpy
        return
    with pytest.raises(V, match="NaN"):
        rp.merge(base, nan_ad)


@pytest.mark.parametrize("name", list(ZOO))
def test_grads_only_for_data_aware_variants(name):
    rp, params, base, ad = _made(name)
    if rp.needs_grads:
        with pytest.raises(V, match="grads: .* data-aware init"):
            rp.init(jax.random.key(0), params)
        with pytest.raises(V, match="grads: 'zz"):
            rp.init(jax.random.key(0), params, grads={**_grads(params), "zz/kernel": jnp.ones(3)})
    else:
        with pytest.raises(V, match="grads: .* does not use gradients"):
            rp.init(jax.random.key(0), params, grads=_grads(params))


# -------------------------------------------------------------------------------- config fields
FIELD_BAD = {
    "rank": [(0, V), (2.5, T), (True, T), ("4", T)],
    "alpha": [(float("nan"), V), (-1.0, V), ("2", T)],
    "dtype": [("float33", T), (jnp.int8, T)],
    "targets": [(3, T), ("(", V)],
}


def _zoo_class(name):
    return type(ZOO[name][0]())


CONFIG_CASES = [(n, f, i) for n in ZOO for f, bad in FIELD_BAD.items() for i in range(len(bad))
                if not (f == "alpha" and n in _NO_ALPHA)]


@pytest.mark.parametrize("name", _NO_ALPHA)
def test_alpha_is_refused_where_there_is_no_scale(name):
    for alpha in (1.0, 16, float("nan")):
        with pytest.raises(V, match="alpha"):
            _zoo_class(name)(rank=2, alpha=alpha)


@pytest.mark.parametrize("name,field,i", CONFIG_CASES, ids=[f"{n}-{f}-{i}" for n, f, i in CONFIG_CASES])
def test_config_fields_are_validated(name, field, i):
    value, exc = FIELD_BAD[field][i]
    cls = _zoo_class(name)
    kw = {"rank": 2, field: value}
    if cls is R.NOLA:
        kw["num_basis"] = 8
    if cls is R.FlyLoRA:
        kw["top_k"] = 1
    if cls is R.MTLoRA:
        kw["num_tasks"] = 2
    with pytest.raises(exc, match=field):
        cls(**kw)


def test_rank_rule_names_the_leaf():
    p = _dense()
    for make in (lambda: R.LoRASB(rank=7), lambda: R.LoRAXS(rank=7), lambda: R.NOLA(rank=7, num_basis=4),
                 lambda: R.CoDyRA(rank=7)):
        rp = make()
        kw = {"grads": _grads(p)} if rp.needs_grads else {}
        with pytest.raises(V, match=r"rank.*'d/kernel'"):
            rp.init(jax.random.key(0), p, **kw)
    with pytest.raises(V, match=r"rank.*'d/kernel'"):  # LoRA-GA needs 2r singular vectors
        R.LoRAGA(rank=4).init(jax.random.key(0), p, grads=_grads(p))


def test_conv_conventions_refuse_dense_leaves():
    for cls in (R.ConvLoRA, R.CPLoRA, R.ConvDoRA, R.CPDoRA):
        with pytest.raises(V, match=r"'d/kernel'.*Dense.*lrjax.LoRA"):
            cls(rank=2).init(jax.random.key(0), _dense())
