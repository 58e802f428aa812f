"""Bad-input sweep for lrjax.reparam, lrjax.factored, lrjax.tree and lrjax.axes (issue 10, items 3-5).

Each bad-input KIND is applied to EVERY public function/constructor/method that takes that
argument, so a function that misses a check fails here. Every case asserts the exception type
(``TypeError`` for the wrong kind, ``ValueError`` for a wrong value) and that the message names
the argument; none accepts "any exception". ``test_every_public_function_is_swept`` fails when
a public name is added to these modules without a row in the sweep.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax import axes as ax_lib
from lrjax import tree
from lrjax.axes import Axes
from lrjax.reparam import multi
from lrjax.reparam.dora import column_norm

CONFIGS = {"LoRA": lrjax.LoRA, "RSLoRA": lrjax.RSLoRA, "DoRA": lrjax.DoRA, "PiSSA": lrjax.PiSSA}
T, V = TypeError, ValueError


def _params():
    return {"k": {"kernel": jnp.asarray(np.arange(12.0).reshape(4, 3) / 7 - 0.5, jnp.float32),
                  "bias": jnp.zeros(3, jnp.float32)}}


@functools.cache
def _made(cls):
    rp = CONFIGS[cls](rank=2)
    base, ad = rp.init(jax.random.key(0), _params())
    return rp, base, ad


# ------------------------------------------------------------------------- config fields (item 3)
FIELD_BAD = {
    "rank": [(0, V), (-3, V), (2.5, T), (True, T), ("4", T), (None, T), (np.int64(0), V), (float("nan"), T)],
    "alpha": [(float("inf"), V), (float("nan"), V), (True, T), (-1.0, V), (0, V), ("2", T), ([1.0], T),
              (-math.inf, V)],
    "dtype": [("float33", T), (3, T), (True, T), (jnp.int8, T), ("int32", T), (object(), T), ([jnp.float32], T)],
    "targets": [(3, T), ([], T), ([3], T), ("(", V), (None, T), ((r"k/kernel", "["), V), ({"a": 1}, T)],
    "axes": [(3, T), ("x", T), ({"(": Axes((), (0,), (1,))}, V), ({"k": (0, 1)}, T), ({3: Axes((), (0,), (1,))}, T),
             (Axes((), (0,), (0,)), V), (Axes((), ("a",), (1,)), T), (Axes((), (), (0, 1)), V),
             (Axes((), (-1,), (0,)), V)],
}
EXTRA_BAD = {"DoRA": {"rslora": [("yes", T), (1, T), (None, T), (0.0, T)]},
             "PiSSA": {"n_iter": [(-1, V), (2.5, T), (True, T), ("2", T)]}}
CONFIG_CASES = [(c, f, v, e) for c in CONFIGS for f, bad in FIELD_BAD.items() for v, e in bad] + \
               [(c, f, v, e) for c, d in EXTRA_BAD.items() for f, bad in d.items() for v, e in bad]


@pytest.mark.parametrize("cls,field,value,exc", CONFIG_CASES,
                         ids=[f"{c}-{f}-{i}" for i, (c, f, _, _) in enumerate(CONFIG_CASES)])
def test_config_fields_are_validated_at_construction(cls, field, value, exc):
    with pytest.raises(exc, match=field):
        CONFIGS[cls](rank=2, **{field: value}) if field != "rank" else CONFIGS[cls](rank=value)


@pytest.mark.parametrize("cls", list(CONFIGS))
def test_good_config_values_are_accepted(cls):
    for dt in ("bfloat16", "float16", jnp.float32, np.dtype("float32")):
        rp = CONFIGS[cls](rank=2, dtype=dt)
        _, ad = rp.init(jax.random.key(0), _params())
        assert ad["k/kernel"]["a"].dtype == jnp.dtype(dt)
    CONFIGS[cls](rank=np.int32(2), alpha=16, targets=["kernel"], axes={"k/kernel": Axes((), (0,), (1,))})


@pytest.mark.parametrize("cls", list(CONFIGS))
def test_rank_rule_names_the_leaf(cls):
    with pytest.raises(V, match=r"rank=4 exceeds min\(M, N\) = 3 for leaf 'k/kernel'"):
        CONFIGS[cls](rank=4).init(jax.random.key(0), _params())


# ------------------------------------------------------------------ method arguments (items 4, 5)
def _bad_params():
    return [("abc", T), (None, T), (3, T), ([[1.0, 2.0]], T), ({"k": {"kernel": [[1.0, 2.0]]}}, T),
            ({"k": {"kernel": "x"}}, T), ({}, V), (jnp.ones((4, 3)), T)]


def _bad_adapters(cls):
    rp, base, ad = _made(cls)
    f = ad["k/kernel"]
    a, b = f["a"], f["b"]
    extra = {**f, "m": jnp.ones(3)} if cls != "DoRA" else {**f, "lora_E": jnp.ones(3)}
    out = [([f], T), ("lora", T), ({}, V), ({3: f}, T), ({"k/kernel": [a, b]}, T),
           ({"k/kernel": {**f, "a": np.asarray(a).tolist()}}, T), ({"k/kernel": extra}, V),
           ({"k/kernel": {k: v for k, v in f.items() if k != "b"}}, V), ({"zz/kernel": f}, V),
           ({"k/kernel": {**f, "a": a.astype(jnp.int32)}}, T), ({"k/kernel": {**f, "a": a[:, :1]}}, V),
           ({"k/kernel": {**f, "b": b.T}}, V), ({"k/bias": f}, V)]
    if cls == "DoRA":
        out += [({"k/kernel": {"a": a, "b": b}}, V), ({"k/kernel": {**f, "m": jnp.ones(4)}}, V)]
    return out


METHODS = {  # name -> (call(rp, base, ad, bad_base=None, bad_ad=None), base argument name)
    "materialize": (lambda rp, p, a: rp.materialize(p, a), "base"),
    "merge": (lambda rp, p, a: rp.merge(p, a), "base"),
    "unmerge": (lambda rp, p, a: rp.unmerge(p, a), "merged"),
    "delta": (lambda rp, p, a: rp.delta(p, a), "base"),
    "factored": (lambda rp, p, a: lrjax.factored(lambda q, x: x @ q["k"]["kernel"], rp)(p, a, jnp.ones((1, 4))), "base"),
    "column_norms": (lambda rp, p, a: rp.column_norms(p, a), "base"),
    "unmerge_with_norms": (lambda rp, p, a: rp.unmerge_with_norms(p, a, {"k/kernel": jnp.ones(3)}), "merged"),
    "multi.use": (lambda rp, p, a: multi.use(p, {"x": a}, rp, "x"), "base"),
    "multi.merge": (lambda rp, p, a: multi.merge(p, {"x": a}, rp, "x"), "base"),
    "multi.combine": (lambda rp, p, a: multi.combine(p, {"x": a}, rp, {"x": 0.5}), "base"),
}


def _applies(cls, meth):
    if meth in ("column_norms", "unmerge_with_norms"):
        return cls == "DoRA"
    if meth == "unmerge":
        return cls != "DoRA"  # DoRA.unmerge always refuses (tested below)
    if meth == "multi.combine":
        return cls != "PiSSA"
    return True


PARAM_CASES = [(c, m, i, e) for c in CONFIGS for m in METHODS if _applies(c, m)
               for i, (_, e) in enumerate(_bad_params())] + \
              [(c, "init", i, e) for c in CONFIGS for i, (_, e) in enumerate(_bad_params())]
ADAPTER_CASES = [(c, m, i, e) for c in CONFIGS for m in METHODS if _applies(c, m)
                 for i, (_, e) in enumerate(_bad_adapters(c))]


@pytest.mark.parametrize("cls,meth,i,exc", PARAM_CASES, ids=[f"{c}-{m}-{i}" for c, m, i, _ in PARAM_CASES])
def test_params_not_a_pytree_of_arrays(cls, meth, i, exc):
    rp, _, ad = _made(cls)
    bad = _bad_params()[i][0]
    if meth == "init":
        with pytest.raises(exc, match="params"):
            rp.init(jax.random.key(0), bad)
        return
    call, argname = METHODS[meth]
    with pytest.raises(exc, match=argname):
        call(rp, bad, ad)


@pytest.mark.parametrize("cls,meth,i,exc", ADAPTER_CASES, ids=[f"{c}-{m}-{i}" for c, m, i, _ in ADAPTER_CASES])
def test_adapters_of_the_wrong_kind_or_structure(cls, meth, i, exc):
    rp, base, _ = _made(cls)
    bad = _bad_adapters(cls)[i][0]
    call, _ = METHODS[meth]
    with pytest.raises(exc, match=r"adapters|named\["):
        call(rp, base, bad)


def test_unknown_factor_suggests_the_matching_config():
    rp, base, ad = _made("DoRA")
    for cls in ("LoRA", "RSLoRA", "PiSSA"):
        with pytest.raises(V, match=r"adapters\['k/kernel'\] has an unknown factor 'm'.*lrjax\.DoRA"):
            _made(cls)[0].materialize(base, ad)
    with pytest.raises(V, match="not DoRA adapters"):
        rp.materialize(base, _made("LoRA")[2])


@pytest.mark.parametrize("cls", list(CONFIGS))
@pytest.mark.parametrize("key", [0, "key", None, jnp.zeros(3), jnp.zeros((2, 2), jnp.uint32), 1.5])
def test_init_key_must_be_a_prng_key(cls, key):
    with pytest.raises(T, match="key"):
        CONFIGS[cls](rank=2).init(key, _params())


NONFINITE_METHODS = ["merge", "unmerge", "delta", "unmerge_with_norms", "multi.merge", "multi.combine"]
NONFINITE_CASES = [(c, m, bad) for c in CONFIGS for m in NONFINITE_METHODS if _applies(c, m)
                   for bad in (float("nan"), float("inf"))]


@pytest.mark.parametrize("cls,meth,bad", NONFINITE_CASES, ids=[f"{c}-{m}-{b}" for c, m, b in NONFINITE_CASES])
def test_nonfinite_factors_are_refused_where_weights_leave_training(cls, meth, bad):
    rp, base, ad = _made(cls)
    f = ad["k/kernel"]
    nad = {"k/kernel": {**f, "b": f["b"].at[0, 0].set(bad)}}
    call, _ = METHODS[meth]
    with pytest.raises(V, match=r"(adapters|named\['x'\])\['k/kernel'\]\['b'\] contains NaN or Inf"):
        call(rp, base, nad)
    # materialize is the training hot path: it does not read values, NaN propagates (documented)
    assert not np.all(np.isfinite(rp.materialize(base, nad)["k"]["kernel"]))


@pytest.mark.parametrize("cls", list(CONFIGS))
def test_init_refuses_nonfinite_base(cls):
    p = _params()
    p["k"]["kernel"] = p["k"]["kernel"].at[1, 1].set(jnp.inf)
    with pytest.raises(V, match="params: leaf 'k/kernel' contains NaN or Inf"):
        CONFIGS[cls](rank=2).init(jax.random.key(0), p)


def test_dora_unmerge_and_norms():
    rp, base, ad = _made("DoRA")
    merged = rp.merge(base, ad)
    with pytest.raises(V, match="cannot be inverted"):
        rp.unmerge(merged, ad)
    for norms, exc in [([jnp.ones(3)], T), ("n", T), ({}, V), ({"k/kernel": [1.0, 1.0, 1.0]}, T),
                       ({"k/kernel": jnp.ones(4)}, V), ({"k/kernel": jnp.full(3, jnp.nan)}, V)]:
        with pytest.raises(exc, match="norms"):
            rp.unmerge_with_norms(merged, ad, norms)
    zero_m = {"k/kernel": {**ad["k/kernel"], "m": jnp.zeros(3)}}
    with pytest.raises(V, match="cannot be recovered"):
        rp.unmerge_with_norms(merged, zero_m, rp.column_norms(base, ad))
    for bad, exc in [("x", T), ([[1.0]], T), (jnp.ones(3), V), (jnp.ones((2, 2), jnp.int32), T)]:
        with pytest.raises(exc, match=r"^v (must|has)"):
            column_norm(bad)


@pytest.mark.parametrize("cls", list(CONFIGS))
@pytest.mark.parametrize("bad,exc", [("x", T), ([1, 2], T), ({"k": [1.0]}, T)])
def test_num_params(cls, bad, exc):
    with pytest.raises(exc, match="adapters"):
        CONFIGS[cls](rank=2).num_params(bad)


# --------------------------------------------------------------------------------- multi (item 4)
def _multi_cases():
    rp, base, ad = _made("LoRA")
    named = {"x": ad}
    good = dict(base=base, named=named, rps=rp)
    cases = []
    for fn in ("use", "merge", "combine"):
        last = "weights" if fn == "combine" else "name"
        good_last = {"x": 1.0} if fn == "combine" else "x"
        for arg, vals in {
            "named": [("x", T), ([ad], T), ({}, V), ({3: ad}, T)],
            "rps": [("lora", T), ({"x": "lora"}, T), ({}, V), (lrjax.LoRA, T)],
            last: ([([0.5], T), ("x", T), ({}, V), ({"zz": 1.0}, V), ({"x": "a"}, T), ({"x": True}, T),
                    ({"x": math.inf}, V), ({3: 1.0}, T), ({"x": jnp.ones(2)}, V), ({"x": jnp.ones((), jnp.bool_)}, T),
                    ({"x": jnp.float32(jnp.nan)}, V)]
                   if fn == "combine" else [(3, T), (None, T), ("zz", V)]),
        }.items():
            for i, (v, e) in enumerate(vals):
                kw = dict(good, **{last: good_last})
                kw[arg] = v
                cases.append((fn, arg, i, e, kw))
    return cases


MULTI_CASES = _multi_cases()


@pytest.mark.parametrize("case", MULTI_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in MULTI_CASES])
def test_multi_arguments(case):
    fn, arg, _, exc, kw = case
    call = getattr(multi, fn)
    last = "weights" if fn == "combine" else "name"
    with pytest.raises(exc, match=arg if arg != "weights" else r"weights"):
        call(kw["base"], kw["named"], kw["rps"], kw[last])


# ------------------------------------------------------------------------------ factored (item 4)
FACTORED_CASES = [("fn", 3, T), ("fn", "model", T), ("rp", "lora", T), ("rp", None, T), ("rp", lrjax.LoRA, T),
                  ("mode", "dense", V), ("mode", 3, T), ("mode", None, T), ("stats", "x", T), ("stats", [], T)]


@pytest.mark.parametrize("arg,value,exc", FACTORED_CASES, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(FACTORED_CASES)])
def test_factored_arguments(arg, value, exc):
    kw = dict(fn=lambda p, x: x @ p["k"]["kernel"], rp=lrjax.LoRA(rank=2), mode="auto", stats=None)
    kw[arg] = value
    with pytest.raises(exc, match=arg):
        lrjax.factored(kw["fn"], kw["rp"], mode=kw["mode"], stats=kw["stats"])


@pytest.mark.parametrize("bad", ["abc", {"x": "abc"}, [None, object()]])
def test_factored_call_args_must_be_arrays(bad):
    rp, base, ad = _made("LoRA")
    with pytest.raises(T, match=r"args\[0\]"):
        lrjax.factored(lambda p, x: p["k"]["kernel"], rp)(base, ad, bad)


# ----------------------------------------------------------------------------------- tree / axes
TREE_CASES = [
    ("path_str", lambda: tree.path_str("a/b"), T, "path"),
    ("flatten", lambda: tree.flatten("abc"), T, "tree"),
    ("paths", lambda: tree.paths("abc"), T, "tree"),
    ("select", lambda: tree.select(_params(), 3), T, "targets"),
    ("select", lambda: tree.select(_params(), []), T, "targets"),
    ("select", lambda: tree.select(_params(), "("), V, "targets"),
    ("select", lambda: tree.select(_params(), "zz"), V, "targets"),
    ("select", lambda: tree.select(_params(), ["kernel", "zz"]), V, "targets"),
    ("select", lambda: tree.select(_params(), "kernel", where=3), T, "where"),
    ("select", lambda: tree.select({}, "kernel"), V, "targets"),
    ("select", lambda: tree.select("abc", "kernel"), T, "tree"),
    ("get", lambda: tree.get(_params(), 3), T, "path"),
    ("get", lambda: tree.get(_params(), "k/kernal"), V, "path"),
    ("get", lambda: tree.get("abc", "k"), T, "tree"),
    ("replace", lambda: tree.replace(_params(), [1]), T, "new_leaves"),
    ("replace", lambda: tree.replace(_params(), {3: 1}), T, "new_leaves"),
    ("replace", lambda: tree.replace(_params(), {"zz": 1}), V, "new_leaves"),
    ("replace", lambda: tree.replace("abc", {}), T, "tree"),
]
X = jnp.ones((4, 3))
A2 = Axes((), (0,), (1,))
AXES_CASES = [
    ("Axes.check", lambda: Axes((), (0,), (0,)).check((4, 3)), V, "exactly once"),
    ("Axes.check", lambda: Axes((), (0,), (1,)).check("ab"), T, "shape"),
    ("Axes.check", lambda: Axes((), (0,), (2,)).check((4, 3)), V, "exactly once"),
    ("Axes.check", lambda: Axes([], [0], [1]).check((4, 3)), T, "batch"),
    ("check_axes_value", lambda: ax_lib.check_axes_value((0, 1), "axes"), T, "axes"),
    ("check_axes_value", lambda: ax_lib.check_axes_value(Axes((), (0.0,), (1,)), "axes"), T, "axes.inp"),
    ("default_axes", lambda: ax_lib.default_axes(3, (4, 3)), T, "path"),
    ("default_axes", lambda: ax_lib.default_axes("k", "ab"), T, "shape"),
    ("default_axes", lambda: ax_lib.default_axes("k", (4, -3)), V, "shape"),
    ("default_axes", lambda: ax_lib.default_axes("k/bias", (3,)), V, "needs a matrix"),
    ("resolve", lambda: ax_lib.resolve("k", (4, 3), 3), T, "axes"),
    ("resolve", lambda: ax_lib.resolve("k", (4, 3), "x"), T, "axes"),
    ("resolve", lambda: ax_lib.resolve("k", (4, 3), {"(": A2}), V, "axes"),
    ("resolve", lambda: ax_lib.resolve("k", (4, 3), {3: A2}), T, "axes"),
    ("resolve", lambda: ax_lib.resolve("k", (4, 3), {"k": (0, 1)}), T, "axes"),
    ("resolve", lambda: ax_lib.resolve("k", (4, 3), lambda p, s: "x"), T, "axes"),
    ("resolve", lambda: ax_lib.resolve(None, (4, 3)), T, "path"),
    ("resolve", lambda: ax_lib.resolve("k", None), T, "shape"),
    ("matrix_shape", lambda: ax_lib.matrix_shape((4, 3), "ax"), T, r"^ax must"),
    ("matrix_shape", lambda: ax_lib.matrix_shape("ab", A2), T, "shape"),
    ("to_matrix", lambda: ax_lib.to_matrix([[1.0]], A2), T, r"^x must"),
    ("to_matrix", lambda: ax_lib.to_matrix(X, (0, 1)), T, r"^ax must"),
    ("to_matrix", lambda: ax_lib.to_matrix(X, Axes((), (0,), (2,))), V, "exactly once"),
    ("from_matrix", lambda: ax_lib.from_matrix([[1.0]], A2, (4, 3)), T, r"^m must"),
    ("from_matrix", lambda: ax_lib.from_matrix(jnp.ones((3, 4)), A2, (4, 3)), V, "m has shape"),
    ("from_matrix", lambda: ax_lib.from_matrix(X, A2, "ab"), T, "shape"),
]


@pytest.mark.parametrize("name,thunk,exc,match", TREE_CASES + AXES_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(TREE_CASES + AXES_CASES)])
def test_tree_and_axes_arguments(name, thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


def test_missing_paths_are_keyerror_and_valueerror():
    with pytest.raises(KeyError, match="nearest"):
        tree.get(_params(), "zz")
    with pytest.raises(KeyError, match="available"):
        multi.use(_params(), {"x": _made("LoRA")[2]}, _made("LoRA")[0], "zz")


# ------------------------------------------------------------------------------ completeness
SWEPT = {
    "lrjax.reparam": {"Reparam", "LowRankForm", "Adapters", "LoRA", "RSLoRA", "DoRA", "PiSSA", "factored",
                      "FactoredStats", "multi", "estimate_grads",  # estimate_grads: test_reparam_protocol.py
                      # the zoo of issue 11: tests/test_errors_zoo.py (Reparam subclasses), test_hypelora.py,
                      # test_loram.py
                      "LoRAGA", "LoRASB", "LoRAXS", "NOLA", "BlockLoRA", "CoDyRA", "ConvLoRA", "CPLoRA", "ConvDoRA",
                      "CPDoRA", "HypeLoRA", "loram",
                      # issue 12: the activation-space protocol, swept in tests/test_interpreter.py; the new
                      # Reparam subclasses in tests/test_errors_zoo.py; MarkBoard in tests/test_markboard.py;
                      # module-level helpers in test_flylora/test_bottleneck/test_nera/test_molora/test_bank
                      "NotMergeable", "FlyLoRA", "NeRA", "SeqBottleneck", "MoLoRA", "MTLoRA", "AdapterBank",
                      "MarkBoard", "flylora", "nera", "bottleneck", "molora", "mtlora", "bank", "markboard",
                      # issue 14: Reparam subclasses in tests/test_errors_zoo.py; module helpers in
                      # tests/test_sltrain.py, test_noble.py, test_hgf.py
                      "SLTrain", "PureLowRank", "NOBLE", "HGF", "sltrain", "noble", "hgf"},
    "lrjax.reparam.multi": {"use", "merge", "combine", "NameNotFound"},
    "lrjax.tree": {"Targets", "PathNotFound", "path_str", "flatten", "paths", "select", "get", "replace"},
    "lrjax.axes": {"Axes", "AxesSpec", "default_axes", "resolve", "to_matrix", "from_matrix", "matrix_shape",
                   "check_pattern",
                   "check_axes_value"},
    "Reparam methods": {"init", "materialize", "merge", "unmerge", "delta", "num_params", "column_norms",
                        "unmerge_with_norms", "leaf_axes", "init_leaf", "factors", "unmerge_leaf",
                        "factor_dtype", "compute_dtype", "check_leaf_rank", "check_factor_rank", "effective", "apply_leaf",
                        "delta_matrix", "scale", "factor_keys",
                        # issue 11 protocol growth, swept in tests/test_reparam_protocol.py
                        "frozen_keys", "seed_keys", "needs_grads", "rewrites_base", "trainable_keys", "split",
                        "join", "trainable_mask", "view_shape", "to_view", "from_view", "axes_view",
                        "check_factors", "leaf_key", "uses_leaf_shape", "frozen_view",
                        # issue 12 activation-space protocol, swept in tests/test_interpreter.py
                        "activation_space", "state_keys", "branch", "update_state", "next_state", "with_state",
                        "kernel_value", "optional_groups"},
}


def test_every_public_function_is_swept():
    """A public name added without a row in this sweep fails here (update SWEPT and add cases)."""
    import importlib

    for mod in ("lrjax.reparam", "lrjax.reparam.multi", "lrjax.tree", "lrjax.axes"):
        assert set(importlib.import_module(mod).__all__) == SWEPT[mod], mod
    public = {n for c in (lrjax.LoRA, lrjax.DoRA, lrjax.PiSSA) for n in dir(c) if not n.startswith("_")}
    fields = {"rank", "alpha", "targets", "axes", "dtype", "rslora", "n_iter"}
    assert public - fields == SWEPT["Reparam methods"]
    assert {m for m in METHODS if "." not in m} | {"init", "num_params"} >= \
        {"init", "materialize", "merge", "unmerge", "delta", "column_norms", "unmerge_with_norms", "num_params"}


@pytest.mark.parametrize("cls,value", [("DoRA", 4e4), ("PiSSA", 1e10)])
def test_init_refuses_factors_that_overflow_their_dtype(cls, value):
    with pytest.raises(V, match="dtype.*overflows float16"):
        CONFIGS[cls](rank=1, dtype=jnp.float16).init(jax.random.key(0), {"kernel": jnp.full((4, 3), value)})


@pytest.mark.parametrize("variant", ["LoRA", "RSLoRA", "DoRA"])
@pytest.mark.parametrize("method", ["materialize", "merge", "delta", "unmerge"])
def test_factor_rank_must_equal_config_rank(variant, method):
    """Factors of rank 3 under a rank-2 config would be scaled by alpha/2: refused, naming the leaf."""
    import jax
    import jax.numpy as jnp
    import lrjax
    rp3 = getattr(lrjax, variant)(rank=3, alpha=4)
    params = {"d": {"kernel": jax.random.normal(jax.random.key(1), (4, 6))}}
    base, ad3 = rp3.init(jax.random.key(0), params)
    rp2 = getattr(lrjax, variant)(rank=2, alpha=4)
    with pytest.raises(ValueError, match=r"adapters\['d/kernel'\]: factors have rank 3 but this \w+ has rank=2"):
        getattr(rp2, method)(base, ad3)


def test_factored_refuses_a_list_of_numbers_as_an_input():
    import jax
    import jax.numpy as jnp
    import lrjax
    rp = lrjax.LoRA(rank=2)
    b, a = rp.init(jax.random.key(0), {"dense": {"kernel": jnp.ones((4, 6))}})
    g = lrjax.factored(lambda p, x: x @ p["dense"]["kernel"], rp)
    with pytest.raises(TypeError, match=r"args\[0\] is a list of Python numbers"):
        g(b, a, [[1.0, 1.0, 1.0, 1.0]])
    assert g(b, a, jnp.ones((1, 4))).shape == (1, 6)


@pytest.mark.parametrize("bad,exc", [(3, TypeError), (None, TypeError), ("(", ValueError), ("[a-", ValueError)])
def test_axes_patterns_checked_in_one_place(bad, exc):
    """lrjax.axes.check_pattern serves both Reparam(axes=...) and axes.resolve."""
    from lrjax import axes as axes_lib
    with pytest.raises(exc, match="axes"):
        axes_lib.check_pattern(bad)
    with pytest.raises(exc, match="axes"):
        lrjax.LoRA(rank=1, axes={bad: axes_lib.Axes((), (0,), (1,))})
    with pytest.raises(exc, match="axes"):
        axes_lib.resolve("w", (2, 3), {bad: axes_lib.Axes((), (0,), (1,))})


def test_traced_value_where_a_static_number_goes_says_static():
    """A jit argument passed where a config number goes: the TypeError says it must be static and how."""
    with pytest.raises(TypeError, match=r"rank must be an int.*traced value.*static_argnames"):
        jax.jit(lambda r: lrjax.LoRA(rank=r))(3)
    with pytest.raises(TypeError, match=r"alpha must be a real number.*traced value.*static"):
        jax.jit(lambda a: lrjax.LoRA(rank=2, alpha=a))(3.0)
