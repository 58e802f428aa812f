"""Bad and degenerate inputs across the public API of lrjax.optim and lrjax.linalg (issue 10).

Each bad-input KIND is swept over every public function or factory that takes such an argument,
so a function added without validation fails here. Every case asserts the exception TYPE and
that the message names the argument. The second half checks degenerate but valid inputs (zero
and rank-deficient gradients, all-zero quantization blocks, float16/bfloat16 leaves): finite
results equal to a float32/float64 reference.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrjax import linalg
from lrjax.optim import (dct, fira, galore, nbytes, outlier_ratios, owlore, projection, quant, scale_by_adam_8bit,
                         scale_by_adam_torch, theoretical_state_bytes)
from lrjax.optim.dct import DCTBasis, dct_matrix
from lrjax.optim.fira import FiraResidual
from lrjax.optim.layerwise import layerwise_step
from lrjax.optim.galore import ExactSVD, RandomizedSVD, SubspaceIteration, make_basis

ADAM = optax.scale_by_adam()
P = {"w": jnp.ones((6, 8)), "b": jnp.ones(8)}
X = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float32)
KEY = jax.random.key(0)
LAYERED = {"blocks": {"0": {"w": jnp.ones((6, 8))}, "1": {"w": jnp.ones((6, 8))}}, "head": jnp.ones((8,))}


def _ids(table):
    return [t[0] for t in table]


# ----------------------------------------------------------------------------- integers
# (id, call(value), argname, lowest valid value)
INT_ARGS = [
    ("galore.rank", lambda v: galore(ADAM, v), "rank", 1),
    ("galore.update_proj_gap", lambda v: galore(ADAM, 2, update_proj_gap=v), "update_proj_gap", 1),
    ("galore.seed", lambda v: galore(ADAM, 2, seed=v), "seed", 0),
    ("galore.oversample", lambda v: galore(ADAM, 2, refresh="randomized", oversample=v), "oversample", 0),
    ("galore.n_iter", lambda v: galore(ADAM, 2, refresh="subspace", n_iter=v), "n_iter", 0),
    ("fira.rank", lambda v: fira(ADAM, v), "rank", 1),
    ("fira.update_proj_gap", lambda v: fira(ADAM, 2, update_proj_gap=v), "update_proj_gap", 1),
    ("fira.oversample", lambda v: fira(ADAM, 2, refresh="randomized", oversample=v), "oversample", 0),
    ("fira.n_iter", lambda v: fira(ADAM, 2, refresh="subspace", n_iter=v), "n_iter", 0),
    ("fira.seed", lambda v: fira(ADAM, 2, seed=v), "seed", 0),
    ("dct.rank", lambda v: dct(ADAM, v), "rank", 1),
    ("dct.ell", lambda v: dct(ADAM, 2, ell=v), "ell", 1),
    ("dct.update_proj_gap", lambda v: dct(ADAM, 2, update_proj_gap=v), "update_proj_gap", 1),
    ("dct.seed", lambda v: dct(ADAM, 2, seed=v), "seed", 0),
    ("owlore.rank", lambda v: owlore(ADAM, v), "rank", 1),
    ("owlore.gamma", lambda v: owlore(ADAM, 2, gamma=v), "gamma", 1),
    ("owlore.period", lambda v: owlore(ADAM, 2, period=v), "period", 1),
    ("owlore.update_proj_gap", lambda v: owlore(ADAM, 2, update_proj_gap=v), "update_proj_gap", 1),
    ("owlore.seed", lambda v: owlore(ADAM, 2, seed=v), "seed", 0),
    ("owlore.oversample", lambda v: owlore(ADAM, 2, refresh="randomized", oversample=v), "oversample", 0),
    ("scale_by_adam_8bit.block_size", lambda v: scale_by_adam_8bit(block_size=v), "block_size", 1),
    ("scale_by_adam_8bit.min_size", lambda v: scale_by_adam_8bit(min_size=v), "min_size", 0),
    ("quantize.block_size", lambda v: quant.quantize(X, signed=True, block_size=v), "block_size", 1),
    ("project.rank", lambda v: projection.project(ADAM, ExactSVD(), rank=v), "rank", 1),
    ("project.update_proj_gap", lambda v: projection.project(ADAM, ExactSVD(), rank=2, update_proj_gap=v),
     "update_proj_gap", 1),
    ("plan.rank", lambda v: projection.plan(P, rank=v), "rank", 1),
    ("theoretical_state_bytes.rank", lambda v: theoretical_state_bytes(P, rank=v, basis=ExactSVD()), "rank", 1),
    ("theoretical_state_bytes.moments", lambda v: theoretical_state_bytes(P, rank=2, basis=ExactSVD(), moments=v),
     "moments", 0),
    ("make_basis.oversample", lambda v: make_basis("randomized", oversample=v), "oversample", 0),
    ("make_basis.n_iter", lambda v: make_basis("subspace", n_iter=v), "n_iter", 0),
    ("RandomizedSVD.oversample", lambda v: RandomizedSVD(oversample=v), "oversample", 0),
    ("SubspaceIteration.n_iter", lambda v: SubspaceIteration(n_iter=v), "n_iter", 0),
    ("DCTBasis.ell", lambda v: DCTBasis(v), "ell", 1),
    ("dct_matrix.d", lambda v: dct_matrix(v), r"d \(the matrix size\)", 1),
    ("svd.rank", lambda v: linalg.svd(X, v), "rank", 1),
    ("gram_svd.rank", lambda v: linalg.gram_svd(X, v), "rank", 1),
    ("randomized_svd.rank", lambda v: linalg.randomized_svd(KEY, X, v), "rank", 1),
    ("randomized_svd.oversample", lambda v: linalg.randomized_svd(KEY, X, 2, oversample=v), "oversample", 0),
    ("randomized_svd.n_iter", lambda v: linalg.randomized_svd(KEY, X, 2, n_iter=v), "n_iter", 0),
    ("subspace_iteration.n_iter", lambda v: linalg.subspace_iteration(X, X[:, :2], v), "n_iter", 0),
    ("select_rank.rank", lambda v: linalg.select_rank(X, rank=v), "rank", 1),
    ("select_rank.max_rank", lambda v: linalg.select_rank(X, rank=2, max_rank=v), "max_rank", 1),
]
INT_BAD_TYPE = [True, False, 2.5, "3", [2], jnp.float32(2.0)]


@pytest.mark.parametrize("bad", INT_BAD_TYPE, ids=repr)
@pytest.mark.parametrize("case", INT_ARGS, ids=_ids(INT_ARGS))
def test_int_arguments_refuse_non_ints(case, bad):
    _, call, name, _ = case
    with pytest.raises(TypeError, match=name.split(".")[-1]):
        call(bad)


@pytest.mark.parametrize("case", INT_ARGS, ids=_ids(INT_ARGS))
def test_int_arguments_refuse_values_below_range(case):
    _, call, name, low = case
    for bad in (low - 1, -3):
        with pytest.raises(ValueError, match=name):
            call(bad)


def test_int_arguments_above_range():
    with pytest.raises(ValueError, match="ell"):
        dct(ADAM, 2, ell=3)
    with pytest.raises(ValueError, match="seed"):
        galore(ADAM, 2, seed=2**40)


# ----------------------------------------------------------------------------- floats
# (id, call(value), argname, extra out-of-range values)
FLOAT_ARGS = [
    ("galore.scale", lambda v: galore(ADAM, 2, scale=v), "scale", []),
    ("galore.weight_decay", lambda v: galore(ADAM, 2, weight_decay=v), "weight_decay", [-1e-3]),
    ("fira.scale", lambda v: fira(ADAM, 2, scale=v), "scale", []),
    ("fira.gamma", lambda v: fira(ADAM, 2, gamma=v), "gamma", [0.5, 0.0]),
    ("fira.eps", lambda v: fira(ADAM, 2, eps=v), "eps", [0.0, -1e-8]),
    ("fira.weight_decay", lambda v: fira(ADAM, 2, weight_decay=v), "weight_decay", [-1.0]),
    ("dct.scale", lambda v: dct(ADAM, 2, scale=v), "scale", []),
    ("dct.weight_decay", lambda v: dct(ADAM, 2, weight_decay=v), "weight_decay", [-1.0]),
    ("owlore.scale", lambda v: owlore(ADAM, 2, scale=v), "scale", []),
    ("owlore.m", lambda v: owlore(ADAM, 2, m=v), r"m \(outlier", [0.0, -2.0]),
    ("owlore.weight_decay", lambda v: owlore(ADAM, 2, weight_decay=v), "weight_decay", [-1.0]),
    ("outlier_ratios.m", lambda v: outlier_ratios(LAYERED, m=v), r"m \(outlier", [0.0]),
    ("project.scale", lambda v: projection.project(ADAM, ExactSVD(), rank=2, scale=v), "scale", []),
    ("scale_by_adam_8bit.b1", lambda v: scale_by_adam_8bit(b1=v), "b1", [1.0, -0.1]),
    ("scale_by_adam_8bit.b2", lambda v: scale_by_adam_8bit(b2=v), "b2", [1.0, 1.5]),
    ("scale_by_adam_8bit.eps", lambda v: scale_by_adam_8bit(eps=v), "eps", [0.0, -1.0]),
    ("scale_by_adam_torch.b1", lambda v: scale_by_adam_torch(b1=v), "b1", [1.0, -0.1]),
    ("scale_by_adam_torch.b2", lambda v: scale_by_adam_torch(b2=v), "b2", [1.0]),
    ("scale_by_adam_torch.eps", lambda v: scale_by_adam_torch(eps=v), "eps", [0.0]),
    ("FiraResidual.gamma", lambda v: FiraResidual(gamma=v), "gamma", [0.99]),
    ("FiraResidual.eps", lambda v: FiraResidual(eps=v), "eps", [0.0]),
    ("energy_rank.energy", lambda v: linalg.energy_rank(jnp.ones(3), v), "energy", [0.0, 1.5, -0.5]),
    ("select_rank.energy", lambda v: linalg.select_rank(X, energy=v), "energy", [0.0, 1.01]),
]
FLOAT_BAD_TYPE = [True, "0.1", None, [0.1], {"v": 0.1}]


@pytest.mark.parametrize("bad", FLOAT_BAD_TYPE, ids=repr)
@pytest.mark.parametrize("case", FLOAT_ARGS, ids=_ids(FLOAT_ARGS))
def test_float_arguments_refuse_non_numbers(case, bad):
    _, call, name, _ = case
    if bad is None and name == "energy":
        pytest.skip("energy=None selects the fixed-rank mode / is checked by the mode rule")
    with pytest.raises(TypeError, match=name):
        call(bad)


@pytest.mark.parametrize("case", FLOAT_ARGS, ids=_ids(FLOAT_ARGS))
def test_float_arguments_refuse_non_finite_and_out_of_range(case):
    _, call, name, extra = case
    for bad in [math.nan, math.inf, -math.inf] + extra:
        with pytest.raises(ValueError, match=name):
            call(bad)


# ----------------------------------------------------------------------------- enums and bools
ENUM_ARGS = [
    ("galore.refresh", lambda v: galore(ADAM, 2, refresh=v), "refresh"),
    ("galore.side", lambda v: galore(ADAM, 2, side=v), "side"),
    ("fira.refresh", lambda v: fira(ADAM, 2, refresh=v), "refresh"),
    ("fira.side", lambda v: fira(ADAM, 2, side=v), "side"),
    ("dct.side", lambda v: dct(ADAM, 2, side=v), "side"),
    ("owlore.refresh", lambda v: owlore(ADAM, 2, refresh=v), "refresh"),
    ("owlore.side", lambda v: owlore(ADAM, 2, side=v), "side"),
    ("project.side", lambda v: projection.project(ADAM, ExactSVD(), rank=2, side=v), "side"),
    ("plan.side", lambda v: projection.plan(P, rank=2, side=v), "side"),
    ("theoretical_state_bytes.side", lambda v: theoretical_state_bytes(P, rank=2, basis=ExactSVD(), side=v), "side"),
    ("make_basis.refresh", lambda v: make_basis(v), "refresh"),
    ("gram_svd.side", lambda v: linalg.gram_svd(X, 2, side=v), "side"),
]


@pytest.mark.parametrize("case", ENUM_ARGS, ids=_ids(ENUM_ARGS))
def test_enum_arguments_by_name(case):
    _, call, name = case
    with pytest.raises(ValueError, match=name):
        call("middle")
    with pytest.raises(ValueError, match=name):
        call("SVD ")
    for bad in (1, None, True):
        with pytest.raises(TypeError, match=name):
            call(bad)


BOOL_ARGS = [
    ("fira.residual", lambda v: fira(ADAM, 2, residual=v), "residual"),
    ("FiraResidual.residual", lambda v: FiraResidual(residual=v), "residual"),
    ("owlore.train_rest", lambda v: owlore(ADAM, 2, train_rest=v), "train_rest"),
    ("quantize.signed", lambda v: quant.quantize(X, signed=v), "signed"),
    ("dequantize.signed", lambda v: quant.dequantize(quant.quantize(X, signed=True), X.shape, signed=v), "signed"),
    ("layerwise_step.has_aux", lambda v: layerwise_step(lambda p: 0.0, ADAM, has_aux=v), "has_aux"),
    ("layerwise_step.scan_layers", lambda v: layerwise_step(lambda p: 0.0, ADAM, scan_layers=v), "scan_layers"),
]


@pytest.mark.parametrize("bad", ["no", "False", 1, 0, None, 1.0])
@pytest.mark.parametrize("case", BOOL_ARGS, ids=_ids(BOOL_ARGS))
def test_bool_arguments_must_be_bools(case, bad):
    _, call, name = case
    with pytest.raises(TypeError, match=name):
        call(bad)


# ----------------------------------------------------------------------------- inner / basis objects
FACTORIES = [
    ("galore", lambda inner: galore(inner, 2)),
    ("fira", lambda inner: fira(inner, 2)),
    ("dct", lambda inner: dct(inner, 2)),
    ("owlore", lambda inner: owlore(inner, 2)),
    ("project", lambda inner: projection.project(inner, ExactSVD(), rank=2)),
    ("check_inner", lambda inner: projection.check_inner(inner)),
]


@pytest.mark.parametrize("case", FACTORIES, ids=_ids(FACTORIES))
def test_inner_must_be_a_params_free_transformation(case):
    _, make = case
    for bad in ("adam", None, optax.scale_by_adam):
        with pytest.raises(TypeError, match="inner must be an optax"):
            make(bad)
    with pytest.raises(TypeError, match="inner needs `params`"):
        make(optax.adamw(1e-3))


def test_basis_and_variant_objects():
    with pytest.raises(TypeError, match="basis"):
        projection.project(ADAM, "svd", rank=2)
    with pytest.raises(TypeError, match="variant"):
        projection.project(ADAM, ExactSVD(), "fira", rank=2)
    with pytest.raises(TypeError, match="basis"):
        theoretical_state_bytes(P, rank=2, basis="svd")
    with pytest.raises(TypeError, match="weight_decay_mask"):
        galore(ADAM, 2, weight_decay=0.1, weight_decay_mask="b")
    with pytest.raises(TypeError, match="layers"):
        owlore(ADAM, 2, layers=3)
    with pytest.raises(ValueError, match="layers"):
        owlore(ADAM, 2, layers="blocks/\\d+")            # no capture group
    with pytest.raises(TypeError, match="ratios"):
        owlore(ADAM, 2, ratios="abc")
    with pytest.raises(ValueError, match="ratios"):
        owlore(ADAM, 2, ratios=[1.0, math.nan])
    with pytest.raises(ValueError, match="ratios"):
        owlore(ADAM, 2, ratios=[1.0, -1.0])
    with pytest.raises(TypeError, match="input_norms"):
        outlier_ratios(LAYERED, input_norms=[1.0])
    with pytest.raises(TypeError, match="dtype"):
        dct_matrix(4, "float77")
    with pytest.raises(TypeError, match="q must be a Quantized"):
        quant.dequantize("abc", (2, 2), signed=True)
    with pytest.raises(ValueError, match="shape"):
        quant.dequantize(quant.quantize(X, signed=True, block_size=4), (100, 100), signed=True)
    assert nbytes({"a": jnp.zeros((2, 3)), "n": None}) == 24


# ----------------------------------------------------------------------------- arrays (linalg, quant)
MATRIX_ARGS = [
    ("svd.x", lambda v: linalg.svd(v), "x"),
    ("gram_svd.x", lambda v: linalg.gram_svd(v), "x"),
    ("randomized_svd.x", lambda v: linalg.randomized_svd(KEY, v, 1), "x"),
    ("orthonormalize.x", lambda v: linalg.orthonormalize(v), "x"),
    ("subspace_iteration.x", lambda v: linalg.subspace_iteration(v, jnp.eye(5, 1)), "x"),
    ("subspace_iteration.q", lambda v: linalg.subspace_iteration(jnp.ones((5, 4)), v), "q"),
    ("select_rank.x_or_s", lambda v: linalg.select_rank(v, rank=1), "x_or_s"),
]
NOT_ARRAYS = ["abc", None, {"a": 1.0}, object()]


@pytest.mark.parametrize("bad", NOT_ARRAYS, ids=lambda b: type(b).__name__)
@pytest.mark.parametrize("case", MATRIX_ARGS + [("energy_rank.s", lambda v: linalg.energy_rank(v, 0.5), "s"),
                                                ("quantize.x", lambda v: quant.quantize(v, signed=True), "x")],
                         ids=_ids(MATRIX_ARGS) + ["energy_rank.s", "quantize.x"])
def test_array_arguments_refuse_non_arrays(case, bad):
    _, call, name = case
    with pytest.raises(TypeError, match=name):
        call(bad)


@pytest.mark.parametrize("case", MATRIX_ARGS, ids=_ids(MATRIX_ARGS))
def test_matrix_arguments_refuse_wrong_rank_dtype_empty_and_nan(case):
    _, call, name = case
    if name != "x_or_s":                                   # select_rank also takes singular values (1-D)
        with pytest.raises(ValueError, match=f"{name} must have ndim >= 2"):
            call(jnp.ones(5))
        with pytest.raises(ValueError, match=f"{name} must have ndim >= 2"):
            call(jnp.float32(1.0))
    with pytest.raises(ValueError, match=name):
        call(jnp.zeros((0, 4)) if name != "q" else jnp.zeros((5, 0)))
    kind = "floating-point" if name != "x_or_s" else "real numeric"
    with pytest.raises(TypeError, match=f"{name} must be a {kind} array"):
        call(jnp.ones((5, 4), jnp.int32) if name != "x_or_s" else jnp.ones((5, 4), bool))
    if name != "x_or_s":
        with pytest.raises(ValueError, match=f"{name} contains NaN"):
            call(jnp.full((5, 4), jnp.nan) if name != "q" else jnp.full((5, 1), jnp.inf))


def test_lists_are_converted_like_arrays():
    a = [[3.0, 0.0], [0.0, 1.0]]
    np.testing.assert_allclose(linalg.svd(a).s, [3.0, 1.0])
    assert linalg.select_rank([3.0, 2.0, 1.0], energy=0.5) == 1


def test_empty_matrix_is_a_clear_error():
    """Documented rule: an empty matrix view [0, n] or [m, 0] is refused (no empty factors)."""
    for f in (linalg.svd, linalg.gram_svd, linalg.orthonormalize):
        with pytest.raises(ValueError, match=r"empty matrix view \[0, 3\]"):
            f(jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"empty matrix view \[3, 0\]"):
        linalg.randomized_svd(KEY, jnp.zeros((3, 0)), 1)
    with pytest.raises(ValueError, match="s must hold at least one"):
        linalg.energy_rank(jnp.zeros((0,)), 0.5)
    # an empty *batch* of valid matrices is fine
    assert linalg.svd(jnp.zeros((0, 3, 4))).u.shape == (0, 3, 3)


RANK_ARGS = [
    ("svd", lambda r: linalg.svd(X, r)),
    ("gram_svd", lambda r: linalg.gram_svd(X, r)),
    ("randomized_svd", lambda r: linalg.randomized_svd(KEY, X, r)),
    ("select_rank", lambda r: linalg.select_rank(X, rank=r)),
    ("subspace_iteration", lambda r: linalg.subspace_iteration(X, jnp.ones((5, r)))),
    ("galore", lambda r: galore(ADAM, r).init(P)),
    ("fira", lambda r: fira(ADAM, r).init(P)),
    ("dct", lambda r: dct(ADAM, r).init(P)),
    ("owlore", lambda r: owlore(ADAM, r, gamma=1).init(LAYERED)),
    ("plan", lambda r: projection.plan(P, rank=r)),
    ("theoretical_state_bytes", lambda r: theoretical_state_bytes(P, rank=r, basis=ExactSVD())),
]


@pytest.mark.parametrize("case", RANK_ARGS, ids=_ids(RANK_ARGS))
def test_one_rank_rule_everywhere(case):
    """check_rank: 1 <= rank <= min(M, N); the message is the same everywhere and names the leaf."""
    name, call = case
    big = 5 if name in ("svd", "gram_svd", "randomized_svd", "select_rank", "subspace_iteration") else 7
    with pytest.raises(ValueError, match=r"exceeds min\(M, N\)"):
        call(big)
    if name in ("galore", "fira", "dct", "plan", "theoretical_state_bytes", "owlore"):
        with pytest.raises(ValueError, match=r"rank=7 exceeds min\(M, N\) = 6 for leaf '.*w'"):
            call(7)


def test_randomized_svd_key():
    for bad in (0, "key", None, jnp.zeros(3, jnp.uint32)):
        with pytest.raises(TypeError, match="key"):
            linalg.randomized_svd(bad, X, 2)


def test_subspace_iteration_q_must_match_x():
    with pytest.raises(ValueError, match="q must have shape"):
        linalg.subspace_iteration(jnp.ones((5, 4)), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="q must have shape"):
        linalg.subspace_iteration(jnp.ones((2, 5, 4)), jnp.ones((3, 5, 2)))
    with pytest.raises(ValueError, match="k <= m"):
        linalg.orthonormalize(jnp.ones((2, 3)))


# ----------------------------------------------------------------------------- update-time inputs
OPTS = [
    ("galore-svd", lambda: galore(ADAM, 2), P),
    ("galore-eigh", lambda: galore(ADAM, 2, refresh="eigh"), P),
    ("galore-randomized", lambda: galore(ADAM, 2, refresh="randomized"), P),
    ("galore-subspace", lambda: galore(ADAM, 2, refresh="subspace"), P),
    ("fira", lambda: fira(ADAM, 2), P),
    ("dct", lambda: dct(ADAM, 2), P),
    ("owlore", lambda: owlore(ADAM, 2, gamma=1), LAYERED),
]


def _bad_updates(params):
    """(label, updates, exception type, message pattern) of gradients that do not fit the state."""
    flat = jax.tree_util.tree_leaves_with_path(params)
    one_mat = [p for p, x in flat if x.ndim == 2][0]
    one_vec = [p for p, x in flat if x.ndim == 1][0]
    setl = lambda path, v: jax.tree_util.tree_map_with_path(lambda p, x: v if p == path else x, params)  # noqa
    drop = {k: v for k, v in params.items() if k != list(params)[-1]}
    extra = dict(params, extra=jnp.ones((3,)))
    return [
        ("missing leaf", drop, ValueError, "updates"),
        ("extra leaf", extra, ValueError, "updates"),
        ("matrix transposed", setl(one_mat, jnp.ones((8, 6))), ValueError, "updates"),
        ("vector broadcastable", setl(one_vec, jnp.ones((6, 8))), ValueError, "updates"),
        ("vector too short", setl(one_vec, jnp.ones((3,))), ValueError, "updates"),
        ("list leaf", setl(one_vec, [1.0] * 8), (TypeError, ValueError), "updates"),
        ("string leaf", setl(one_vec, "grad"), TypeError, "updates"),
        ("None leaf", setl(one_vec, None), ValueError, "updates"),
    ]


@pytest.mark.parametrize("case", OPTS, ids=_ids(OPTS))
def test_updates_must_fit_the_state(case):
    _, make, params = case
    opt = make()
    state = opt.init(params)
    for label, bad, exc, pat in _bad_updates(params):
        with pytest.raises(exc, match=pat):
            opt.update(bad, state, None)
    with pytest.raises(TypeError, match="state"):
        opt.update(params, "state", None)
    wrong_params = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape + (1,)), params)
    with pytest.raises(ValueError, match="updates"):
        opt.update(params, state, wrong_params)
    with pytest.raises(TypeError, match="params"):
        opt.init({"w": "abc"})


@pytest.mark.parametrize("make", [lambda t: galore(ADAM, 2, targets=t), lambda t: fira(ADAM, 2, targets=t),
                                  lambda t: dct(ADAM, 2, targets=t)], ids=["galore", "fira", "dct"])
def test_integer_leaves_are_refused_or_left_out(make):
    params = {"w": jnp.ones((6, 8)), "i": jnp.ones((6, 8), jnp.int32), "m": jnp.ones((6, 8), bool)}
    for leaf in ("i", "m"):
        with pytest.raises(TypeError, match=f"'{leaf}'.*floating"):
            make((leaf,)).init(params)
    state = make(None).init(params)         # default targets: only floating leaves are projected
    assert state.basis["i"] is None and state.basis["m"] is None and state.basis["w"] is not None


# ============================================================================= degenerate but valid inputs
def _rank_k(m, n, k, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    a = np.linalg.qr(rng.standard_normal((m, k)))[0]
    b = np.linalg.qr(rng.standard_normal((n, k)))[0].T
    return scale * (a * np.arange(k, 0, -1.0)) @ b            # singular values k, k-1, ..., 1


DEGENERATE = {
    "zero": np.zeros((6, 8)),
    "rank1": _rank_k(6, 8, 1, 1),
    "rank2_tall": _rank_k(8, 5, 2, 2),
}


@pytest.mark.parametrize("name", list(DEGENERATE))
def test_linalg_on_zero_and_rank_deficient_matrices(name):
    """Finite, orthonormal factors; singular values and the nonzero singular subspace equal float64."""
    x64 = DEGENERATE[name]
    x = jnp.asarray(x64, jnp.float32)
    m, n = x64.shape
    r = 3
    u64, s64, vt64 = np.linalg.svd(x64, full_matrices=False)
    k = int((s64 > 1e-9).sum())                              # the true rank

    def orthonormal(q):
        q = np.asarray(q, np.float64)
        assert np.isfinite(q).all()
        np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=2e-5)

    def same_span(q, ref):                                   # projectors onto the nonzero part agree
        q = np.asarray(q, np.float64)[:, :k]
        np.testing.assert_allclose(q @ q.T, ref[:, :k] @ ref[:, :k].T, atol=2e-5)

    f = linalg.svd(x, r)
    orthonormal(f.u), orthonormal(f.vt.T)
    np.testing.assert_allclose(f.s, s64[:r], atol=1e-5)
    same_span(f.u, u64)
    for side, ref in (("left", u64), ("right", vt64.T)):
        vec, s = linalg.gram_svd(x, r, side=side)
        orthonormal(vec)
        assert np.isfinite(np.asarray(s)).all() and (np.asarray(s) >= 0).all()
        np.testing.assert_allclose(s, s64[:r], atol=1e-3 * max(1.0, s64[0]))
        same_span(vec, ref)
    rs = linalg.randomized_svd(KEY, x, r)
    orthonormal(rs.u)
    np.testing.assert_allclose(rs.s, s64[:r], atol=1e-5)
    same_span(rs.u, u64)
    q = linalg.subspace_iteration(x, linalg.orthonormalize(jax.random.normal(KEY, (m, r))), 2)
    orthonormal(q)
    same_span(q, u64)
    orthonormal(linalg.orthonormalize(x[:, :r]))
    assert linalg.select_rank(x, energy=0.99) == max(k, 1)


METHODS = [
    ("galore-svd", lambda: galore(ADAM, 3, update_proj_gap=1)),
    ("galore-eigh", lambda: galore(ADAM, 3, update_proj_gap=1, refresh="eigh")),
    ("galore-randomized", lambda: galore(ADAM, 3, update_proj_gap=1, refresh="randomized")),
    ("galore-subspace", lambda: galore(ADAM, 3, update_proj_gap=1, refresh="subspace")),
    ("fira", lambda: fira(ADAM, 3, update_proj_gap=1, scale=0.5)),
    ("dct", lambda: dct(ADAM, 3, update_proj_gap=1)),
]


def _degenerate_grads(t, dtype):
    """A zero gradient, a batch-1 ``x.T @ dy`` (rank 1) and a rank-2 right-side one."""
    rng = np.random.default_rng(t)
    x, dy = rng.standard_normal((1, 6)), rng.standard_normal((1, 8))
    g = {"z": np.zeros((6, 8)), "r1": 1e-2 * x.T @ dy, "r2": _rank_k(8, 5, 2, t, 1e-2)}
    return {k: jnp.asarray(v, dtype) for k, v in g.items()}


@pytest.mark.parametrize("case", METHODS, ids=_ids(METHODS))
def test_low_precision_rank_deficient_gradients_equal_float32_rounded(case):
    """Refresh, projection, inner and back-projection run in float32 and are rounded once: float16 and
    bfloat16 leaves (one tree) get finite updates equal to the float32 computation rounded."""
    _, make = case
    opt = make()
    dts = {"f16": jnp.float16, "bf16": jnp.bfloat16}

    def grads(t):
        g = _degenerate_grads(t, jnp.float32)
        return {f"{k}_{d}": v.astype(dt) for d, dt in dts.items() for k, v in g.items()}

    low = grads(0)
    s_low, s_32 = opt.init(low), opt.init({k: v.astype(jnp.float32) for k, v in low.items()})
    upd = jax.jit(opt.update)
    for t in range(2):
        g = grads(t)
        u_low, s_low = upd(g, s_low)
        u_32, s_32 = upd({k: v.astype(jnp.float32) for k, v in g.items()}, s_32)
        for k in g:
            assert u_low[k].dtype == g[k].dtype
            assert np.isfinite(np.asarray(u_low[k], np.float32)).all(), k
            np.testing.assert_array_equal(np.asarray(u_low[k], np.float32),
                                          np.asarray(u_32[k].astype(g[k].dtype), np.float32), err_msg=k)
        for d in dts:                                                   # zero gradient: zero update
            np.testing.assert_array_equal(np.asarray(u_low[f"z_{d}"], np.float32), 0.0)
        for k, p in s_low.basis.items():
            if p.dtype != jnp.int32:
                assert p.dtype == jnp.float32
                np.testing.assert_allclose(np.asarray(p).T @ np.asarray(p), np.eye(3), atol=2e-5, err_msg=k)


def _fira_reference64(gs, rank, scale, gamma=1.01, b1=0.9, b2=0.999, eps=1e-8):
    """The paper's equations in float64 for one [M, N] matrix (left side), basis from the first G."""
    P = np.linalg.svd(gs[0], full_matrices=False)[0][:, :rank]
    m = v = np.zeros((rank, gs[0].shape[1]))
    prev, out = None, []
    for t, g in enumerate(gs, 1):
        R = P.T @ g
        m = b1 * m + (1 - b1) * R
        v = b2 * v + (1 - b2) * R * R
        N = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        phi = np.linalg.norm(N, axis=0) / (np.linalg.norm(R, axis=0) + 1e-8)
        S = (g - P @ R) * phi[None, :]
        ns = np.linalg.norm(S)
        if prev is not None:
            lam = max(ns / (prev + 1e-8), gamma) / gamma
            S, ns = S / lam, ns / lam
        prev = ns
        out.append(scale * P @ N + S)
    return out


def test_fira_norms_on_degenerate_gradients_match_float64():
    """Rank-deficient G, columns whose projected gradient is exactly 0 (with Adam momentum left),
    an all-zero gradient (zero residual, limiter restarts from eps), then a normal step."""
    g1 = _rank_k(6, 10, 3, 0)                                       # rank 3 < 6, r = 2
    g2 = g1 * 1.3
    g2[:, [3, 7]] = 0.0                                             # R_{:, j} = 0, N_{:, j} != 0
    gs = [g1, g2, np.zeros((6, 10)), _rank_k(6, 10, 3, 0) * 0.7]
    ref = _fira_reference64(gs, 2, 0.25)
    opt = fira(ADAM, 2, update_proj_gap=100, scale=0.25)
    s = opt.init({"w": jnp.zeros((6, 10))})
    for t, (g, r) in enumerate(zip(gs, ref)):
        u, s = opt.update({"w": jnp.asarray(g, jnp.float32)}, s)
        assert np.isfinite(np.asarray(u["w"])).all() and np.isfinite(float(s.extra["w"]))
        np.testing.assert_allclose(u["w"], r, rtol=1e-4, atol=1e-5, err_msg=f"step {t}")


def test_quantized_moments_of_all_zero_blocks():
    x = jnp.zeros((5, 64)).at[2, :].set(jnp.linspace(-1.0, 1.0, 64))
    for signed in (True, False):
        q = quant.quantize(x if signed else jnp.abs(x), signed=signed, block_size=64)
        zero = np.array([0, 1, 3, 4])
        np.testing.assert_array_equal(np.asarray(q.scale)[zero], 0.0)
        np.testing.assert_array_equal(np.asarray(q.codes)[zero], 0)
        back = np.asarray(quant.dequantize(q, x.shape, signed=signed))
        assert np.isfinite(back).all()
        np.testing.assert_array_equal(back[zero], 0.0)
    opt = scale_by_adam_8bit(block_size=64, min_size=16)
    p = {"w": jnp.zeros((8, 32))}
    u, s = opt.update(p, opt.init(p))                               # a zero gradient: 0 / (0 + eps)
    np.testing.assert_array_equal(u["w"], 0.0)
    assert all(np.isfinite(np.asarray(a, np.float32)).all() for a in jax.tree_util.tree_leaves(s))


# ----------------------------------------------------------------------------- completeness
def test_every_public_function_is_swept():
    """A public function or factory of lrjax.optim / lrjax.linalg missing from the sweeps fails here."""
    import importlib

    import lrjax.optim as lo
    from lrjax.optim.owlore import active_layers

    mods = [importlib.import_module(f"lrjax.optim.{m}") for m in ("projection", "quant", "galore", "fira", "dct",
                                                                    "owlore")]

    with pytest.raises(TypeError, match="state"):
        active_layers("state")
    covered = set()
    for table in (INT_ARGS, FLOAT_ARGS, ENUM_ARGS, BOOL_ARGS, MATRIX_ARGS, FACTORIES, RANK_ARGS, OPTS):
        covered |= {t[0].split(".")[0].split("-")[0] for t in table}
    covered |= {"energy_rank", "quantize", "dequantize", "active_layers", "outlier_ratios", "scale_by_adam_torch"}
    # swept in tests/test_lora_pro.py (test_bad_hyperparameters_named, test_bad_trees_named) and
    # tests/test_codyra.py (test_bad_prox_inputs, test_bad_schedule_inputs)
    covered |= {"lora_pro", "scale_by_lora_pro", "lora_fa", "scale_by_lora_fa", "riemannian_lora",
                "scale_by_riemannian_lora", "prox_soft_threshold", "codyra_lambda_schedule", "factor_mask"}
    # issue 12: swept in tests/test_flexmore.py (test_lowrank_delta_bad_input and the sqrt_split cases)
    covered |= {"lowrank_delta", "sqrt_split"}
    # issue 16: swept in tests/test_galore_layerwise.py (test_layerwise_bad_input; bool flags above)
    covered |= {"layerwise_init", "layerwise_update", "layerwise_step"}
    # data containers, argument-free bases, constants and nbytes (any pytree is valid) take nothing to check
    exempt = {"SVD", "ProjectionState", "OwLoreState", "ScaleByAdam8bitState", "ScaleByAdamTorchState", "Quantized",
              "LeafPlan", "Basis", "Variant", "ExactSVD", "GramEigh", "REFRESHES", "DEFAULT_LAYERS", "nbytes",
              "projection", "quant", "prox", "layerwise", "LayerwiseState"}
    public = set(linalg.__all__) | set(lo.__all__)
    for mod in mods:
        public |= set(mod.__all__)
    missing = sorted(public - covered - exempt)
    assert not missing, f"public names without a bad-input sweep: {missing}"


@pytest.mark.parametrize("factory", ["galore", "fira", "dct"])
@pytest.mark.parametrize("bad", [-1.0, 0.0, -1e-3])
def test_scale_must_be_positive(factory, bad):
    """A negative scale turns descent into ascent, zero discards every projected update."""
    import optax
    import lrjax
    with pytest.raises(ValueError, match="scale"):
        getattr(lrjax.optim, factory)(optax.sgd(1.0), rank=2, scale=bad)
