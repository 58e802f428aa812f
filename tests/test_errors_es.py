"""Bad-input sweep over the whole public API of lrjax.es (issue 10, items 3-5).

Each KIND of bad input (a non-bool flag, a number of the wrong type or out of range, an unknown
enum name, a bad dtype, a malformed fitness vector, params that are not a pytree of arrays, a bad
state / key / member id / fitness function, malformed explicit-layer inputs, degenerate configs)
is tried on EVERY public function and constructor that takes it. Every case must raise lrjax's own
error: the exact exception type (TypeError for the wrong kind, ValueError for a wrong value) with a
message naming the argument. All checks run eagerly, before anything is traced."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrjax.es import (Eggroll, EggrollState, FactoredStats, LowRankNoise, PerturbedLinear, lowrank_dense,
                      lowrank_einsum, perturbed_call, shape_fitness)
from lrjax.es import noise as noise_lib
from lrjax.es import shaping as shaping_lib
from lrjax.es.eggroll import default_member_chunk

N = 8
ES = Eggroll(N, rank=2, sigma=0.1, member_chunk=4)
ST = ES.init(jax.random.key(0))
P = {"w": jnp.full((3, 4), 0.1), "b": jnp.zeros(4)}
FIT = lambda p: -jnp.sum(p["w"] ** 2)  # noqa: E731
FVEC = np.linspace(0.0, 1.0, N)
NZ = ES.member_noise(ST, P, 0)
X = jnp.ones((2, 3))

CASES = []


def case(kind, site, bad, call, exc, match):
    CASES.append(pytest.param(call, exc, match, id=f"{kind}-{site}-{bad}"))


# ---------------------------------------------------------------- bool flags
BOOL_SITES = {
    "Eggroll.maximize": (lambda v: Eggroll(N, maximize=v), "maximize"),
    "Eggroll.antithetic": (lambda v: Eggroll(N, antithetic=v), "antithetic"),
    "Eggroll.store_noise": (lambda v: Eggroll(N, store_noise=v), "store_noise"),
    "default_member_chunk.antithetic": (lambda v: default_member_chunk(N, v), "antithetic"),
    "default_member_chunk.sharded": (lambda v: default_member_chunk(N, sharded=v), "sharded"),
    "shape_fitness.maximize": (lambda v: shape_fitness(FVEC, "z_score", v), "maximize"),
    "sanitize.maximize": (lambda v: shaping_lib.sanitize(jnp.asarray(FVEC), v), "maximize"),
    "estimate.pass_noise": (lambda v: ES.estimate(ST, P, FIT, pass_noise=v), "pass_noise"),
    "fitness.pass_noise": (lambda v: ES.fitness(ST, P, FIT, pass_noise=v), "pass_noise"),
    "lower.pass_noise": (lambda v: ES.lower(ST, P, FIT, pass_noise=v), "pass_noise"),
    "ask.perturbation": (lambda v: ES.ask(ST, P, perturbation=v), "perturbation"),
    "PerturbedLinear.use_bias": (lambda v: PerturbedLinear(3, 4, use_bias=v, rngs=nnx.Rngs(0)), "use_bias"),
    "sign_and_index.antithetic": (lambda v: noise_lib.sign_and_index(3, v), "antithetic"),
}
for site, (call, arg) in BOOL_SITES.items():
    for bad in ("no", "yes", 1, 0, None, 1.0):
        case("bool", site, repr(bad), lambda call=call, bad=bad: call(bad), TypeError, arg)

# ---------------------------------------------------------------- integers
INT_SITES = {  # site: (call, argname, lowest valid value, None allowed)
    "Eggroll.population_size": (lambda v: Eggroll(v, antithetic=False), "population_size", 1, False),
    "Eggroll.rank": (lambda v: Eggroll(N, rank=v), "rank", 1, True),
    "Eggroll.noise_reuse": (lambda v: Eggroll(N, noise_reuse=v), "noise_reuse", 1, False),
    "Eggroll.member_chunk": (lambda v: Eggroll(N, member_chunk=v), "member_chunk", 1, True),
    "Eggroll.update_chunk": (lambda v: Eggroll(N, update_chunk=v), "update_chunk", 1, False),
    "Eggroll.table_size": (lambda v: Eggroll(N, noise="table", table_size=v), "table_size", 1, False),
    "make_table.table_size": (lambda v: noise_lib.make_table(v), "table_size", 1, False),
    "default_member_chunk.population_size": (lambda v: default_member_chunk(v), "population_size", 1, False),
    "PerturbedLinear.in_features": (lambda v: PerturbedLinear(v, 4, rngs=nnx.Rngs(0)), "in_features", 1, False),
    "PerturbedLinear.out_features": (lambda v: PerturbedLinear(3, v, rngs=nnx.Rngs(0)), "out_features", 1, False),
    "ask.chunk": (lambda v: ES.ask(ST, P, v if v is not None else "none"), "chunk", 0, False),
    "member_noise.member": (lambda v: ES.member_noise(ST, P, v), "member", 0, False),
    "member_params.member": (lambda v: ES.member_params(ST, P, v), "member", 0, False),
    "noise_key.noise_reuse": (lambda v: noise_lib.noise_key(jax.random.key(0), 0, 0, v), "noise_reuse", 1, False),
}
for site, (call, arg, low, none_ok) in INT_SITES.items():
    bads = [(True, TypeError), (2.5, TypeError), ("8", TypeError), (float("nan"), TypeError),
            (low - 1, ValueError), (-7, ValueError)]
    if not none_ok:
        bads.append((None, TypeError))
    for bad, exc in bads:
        case("int", site, repr(bad), lambda call=call, bad=bad: call(bad), exc, arg)
# upper bounds: member ids and chunk indices past the population
for site, call, arg in (("ask.chunk", lambda: ES.ask(ST, P, ES.num_chunks), "chunk"),
                        ("member_noise.member", lambda: ES.member_noise(ST, P, N), "member"),
                        ("member_params.member", lambda: ES.member_params(ST, P, jnp.int32(N)), "member"),
                        ("member_noise.member_vector", lambda: ES.member_noise(ST, P, jnp.arange(2)), "member"),
                        ("member_params.member_float", lambda: ES.member_params(ST, P, jnp.float32(1)), "member")):
    case("int", site, "out_of_range", call, TypeError if "vector" in site or "float" in site else ValueError, arg)

# ---------------------------------------------------------------- floats
for bad, exc in ((True, TypeError), ("0.1", TypeError), (None, TypeError), (0.0, ValueError), (-0.1, ValueError),
                 (float("nan"), ValueError), (float("inf"), ValueError), (jnp.float32(-1.0), ValueError)):
    case("float", "Eggroll.sigma", repr(bad), lambda bad=bad: Eggroll(N, sigma=bad), exc, "sigma")

# ---------------------------------------------------------------- enums
ENUM_SITES = {
    "Eggroll.shaping": (lambda v: Eggroll(N, shaping=v), "shaping"),
    "Eggroll.noise": (lambda v: Eggroll(N, noise=v), "noise"),
    "shape_fitness.method": (lambda v: shape_fitness(FVEC, v), "method"),
    "draw_flat.distribution": (lambda v: noise_lib.draw_flat(ES.plan(P), ST.key, 0, 0, 2, 1, v), "distribution"),
}
for site, (call, arg) in ENUM_SITES.items():
    for bad, exc in (("bad", ValueError), ("Z_SCORE", ValueError), ("", ValueError), (3, TypeError),
                     (None, TypeError), (["z_score"], TypeError)):
        case("enum", site, repr(bad), lambda call=call, bad=bad: call(bad), exc, arg)

# ---------------------------------------------------------------- dtypes
for bad in ("floatx", 3, None, jnp.int32, "int8", object, 1.5):
    case("dtype", "PerturbedLinear.dtype", repr(bad),
         lambda bad=bad: PerturbedLinear(3, 4, dtype=bad, rngs=nnx.Rngs(0)), TypeError, "dtype")

# ---------------------------------------------------------------- fitness vectors
FITNESS_SITES = {
    "tell.fitness": lambda f: ES.tell(ST, P, f),
    "shape_fitness.fitness": lambda f: shape_fitness(f),
    "sanitize.fitness": lambda f: shaping_lib.sanitize(f, True),
}
BAD_FITNESS = [("str", "abc", TypeError), ("None", None, TypeError), ("bool", True, TypeError),
               ("dict", {"f": 1.0}, TypeError), ("empty", np.zeros(0), ValueError), ("empty_list", [], ValueError),
               ("2d", np.zeros((2, N)), ValueError), ("np_scalar", np.float32(1.0), TypeError),
               ("0d", jnp.float32(1.0), ValueError), ("float", 1.0, TypeError),
               ("complex", np.ones(N, np.complex64), TypeError), ("boolarray", np.ones(N, bool), TypeError),
               ("strarray", np.array(["a"] * N), TypeError), ("ragged", [[1.0], [1.0, 2.0]], TypeError),
               ("overflow", np.array([1e300] + [0.0] * (N - 1)), ValueError)]
for site, call in FITNESS_SITES.items():
    for name, bad, exc in BAD_FITNESS:
        case("fitness", site, name, lambda call=call, bad=bad: call(bad), exc, "fitness")
for bad in (np.zeros(N - 1), np.zeros(N + 2), np.zeros((N, 1)), [1.0] * 3):
    case("fitness", "tell.fitness", f"len{np.shape(bad)}", lambda bad=bad: ES.tell(ST, P, bad), ValueError, "fitness")
for fn in ("centered_rank", "z_score", "identity"):
    for name, bad, exc in (("list", [1.0, 2.0], TypeError), ("int", jnp.arange(3), TypeError),
                           ("2d", jnp.zeros((2, 2)), ValueError), ("empty", jnp.zeros(0), ValueError)):
        case("fitness", f"{fn}.loss", name, lambda fn=fn, bad=bad: getattr(shaping_lib, fn)(bad), exc, "loss")

# ---------------------------------------------------------------- params
PARAM_SITES = {
    "plan": lambda p: ES.plan(p),
    "member_noise": lambda p: ES.member_noise(ST, p, 0),
    "member_params": lambda p: ES.member_params(ST, p, 0),
    "ask": lambda p: ES.ask(ST, p),
    "tell": lambda p: ES.tell(ST, p, FVEC),
    "fitness": lambda p: ES.fitness(ST, p, FIT),
    "estimate": lambda p: ES.estimate(ST, p, FIT),
    "lower": lambda p: ES.lower(ST, p, FIT),
}
BAD_PARAMS = [("None", None, TypeError, "params"), ("str", "abc", TypeError, "params"),
              ("number", 1.5, TypeError, "params"), ("empty", {}, ValueError, "params"),
              ("list_leaf", {"w": [0.1, 0.2]}, TypeError, "params"), ("float_leaf", {"w": 1.0}, TypeError, "params"),
              ("str_leaf", {"w": "abc"}, TypeError, "params"),
              ("rank_gt_min", {"w": jnp.zeros((1, 4))}, ValueError, "rank=2 exceeds.*leaf 'w'")]
GEN_ONLY = [("nan", {"w": jnp.full((3, 4), jnp.nan)}, ValueError, "params: leaf 'w'"),
            ("inf", {"w": jnp.zeros((3, 4)).at[0, 0].set(jnp.inf)}, ValueError, "params: leaf 'w'"),
            ("all_frozen", {"w": jnp.zeros((3, 4), jnp.int32)}, ValueError, "params: no leaf is perturbed")]
for site, call in PARAM_SITES.items():
    for name, bad, exc, match in BAD_PARAMS + (GEN_ONLY if site != "plan" else []):
        case("params", site, name, lambda call=call, bad=bad: call(bad), exc, match)
for name, bad, exc in (("None", None, TypeError), ("str", "abc", TypeError), ("float_leaf", {"w": 1.0}, TypeError)):
    case("params", "perturbed_call", name, lambda bad=bad: perturbed_call(FIT, bad, {"w": NZ["w"]}), exc, "params")

# ---------------------------------------------------------------- state and key
STATE_SITES = {
    "member_noise": lambda s: ES.member_noise(s, P, 0),
    "member_params": lambda s: ES.member_params(s, P, 0),
    "ask": lambda s: ES.ask(s, P),
    "tell": lambda s: ES.tell(s, P, FVEC),
    "fitness": lambda s: ES.fitness(s, P, FIT),
    "estimate": lambda s: ES.estimate(s, P, FIT),
    "lower": lambda s: ES.lower(s, P, FIT),
}
BAD_STATES = [("None", None, TypeError), ("tuple", (ST.key, 0), TypeError),
              ("raw_key", EggrollState(jnp.zeros(2, jnp.uint32), jnp.int32(0)), TypeError),
              ("key_batch", EggrollState(jax.random.split(jax.random.key(0), 2), jnp.int32(0)), TypeError),
              ("float_gen", EggrollState(ST.key, 1.5), TypeError),
              ("float_gen_array", EggrollState(ST.key, jnp.float32(1.0)), TypeError),
              ("neg_gen", EggrollState(ST.key, jnp.int32(-1)), ValueError),
              ("neg_gen_int", EggrollState(ST.key, -3), ValueError)]
for site, call in STATE_SITES.items():
    for name, bad, exc in BAD_STATES:
        case("state", site, name, lambda call=call, bad=bad: call(bad), exc, "state")
for name, bad, exc in (("None", None, TypeError), ("str", "abc", TypeError), ("int", 3, TypeError),
                       ("uint3", jnp.zeros(3, jnp.uint32), TypeError), ("float2", jnp.zeros(2), TypeError),
                       ("batch", jax.random.split(jax.random.key(0), 2), ValueError)):
    case("key", "init", name, lambda bad=bad: ES.init(bad), exc, "key")

# ---------------------------------------------------------------- fitness functions
FN_SITES = {"estimate": lambda f: ES.estimate(ST, P, f), "fitness": lambda f: ES.fitness(ST, P, f),
            "lower": lambda f: ES.lower(ST, P, f)}
BAD_FNS = [("str", "not a function", TypeError), ("None", None, TypeError),
           ("vector", lambda p: p["w"].sum(0), ValueError), ("matrix", lambda p: p["w"], ValueError),
           ("tuple_out", lambda p: (1.0, 2.0), ValueError), ("complex", lambda p: jnp.sum(p["w"]) * 1j, TypeError),
           ("wrong_args", lambda p, x: jnp.sum(p["w"] @ x), TypeError), ("bad_leaf", lambda p: p["nope"].sum(), TypeError)]
for site, call in FN_SITES.items():
    for name, bad, exc in BAD_FNS:
        case("fitness_fn", site, name, lambda call=call, bad=bad: call(bad), exc, "fitness_fn")
    case("stats", site, "str", lambda site=site: getattr(ES, site)(ST, P, FIT, stats="x") if site != "lower"
         else ES.lower(ST, P, FIT, pass_noise="x"), TypeError, "stats" if site != "lower" else "pass_noise")
case("fn", "perturbed_call", "str", lambda: perturbed_call("f", P, {}), TypeError, "fn")

# ---------------------------------------------------------------- ask: members / chunk
for name, bad, exc in (("empty", [], TypeError), ("past_end", [N], ValueError), ("negative", [-1], ValueError),
                       ("float", [1.5], TypeError), ("str", "a", TypeError), ("bool", [True], TypeError),
                       ("2d", np.zeros((2, 2), np.int32), ValueError), ("float_array", np.zeros(2), TypeError),
                       ("empty_array", np.zeros(0, np.int32), ValueError)):
    case("members", "ask", name, lambda bad=bad: ES.ask(ST, P, members=bad), exc, "members")
case("members", "ask", "both", lambda: ES.ask(ST, P, 0, members=[0]), ValueError, "chunk or members")

# ---------------------------------------------------------------- explicit layers and perturbed_call inputs
W = jnp.ones((3, 4))
LN = LowRankNoise(jnp.ones((3, 1)), jnp.ones((4, 1)), jnp.float32(0.1))
for name, call, exc, match in [
    ("x_str", lambda: lowrank_dense("x", W), TypeError, "x"),
    ("x_list", lambda: lowrank_dense([[1.0, 2.0, 3.0]], W), TypeError, "x"),
    ("x_width", lambda: lowrank_dense(jnp.ones((2, 5)), W), ValueError, "x"),
    ("x_bool", lambda: lowrank_dense(jnp.ones((2, 3), bool), W), TypeError, "x"),
    ("kernel_3d", lambda: lowrank_dense(X, jnp.ones((3, 4, 1))), ValueError, "kernel"),
    ("kernel_int", lambda: lowrank_dense(X, jnp.ones((3, 4), jnp.int32)), TypeError, "kernel"),
    ("noise_str", lambda: lowrank_dense(X, W, "noise"), TypeError, "noise"),
    ("noise_shape", lambda: lowrank_dense(X, W, LowRankNoise(jnp.ones((4, 1)), jnp.ones((3, 1)), 0.1)), ValueError, "noise.a"),
    ("noise_rank", lambda: lowrank_dense(X, W, LowRankNoise(jnp.ones((3, 1)), jnp.ones((4, 2)), 0.1)), ValueError, "same rank"),
    ("noise_scale", lambda: lowrank_dense(X, W, LowRankNoise(LN.a, LN.b, "s")), TypeError, "noise.scale"),
    ("bias_shape", lambda: lowrank_dense(X, W, LN, jnp.ones(3)), ValueError, "bias"),
    ("bias_noise_alone", lambda: lowrank_dense(X, W, LN, None, jnp.ones(4)), ValueError, "bias_noise"),
    ("bias_noise_shape", lambda: lowrank_dense(X, W, LN, jnp.ones(4), jnp.ones(3)), ValueError, "bias_noise"),
]:
    case("layer", "lowrank_dense", name, call, exc, match)
for name, call, exc, match in [
    ("spec_int", lambda: lowrank_einsum(3, X, W, LN), TypeError, "spec"),
    ("x_str", lambda: lowrank_einsum("bd,dk->bk", "x", W, LN), TypeError, "x"),
    ("kernel_1d", lambda: lowrank_einsum("bd,d->b", X, jnp.ones(3), LN), ValueError, "kernel"),
    ("noise_str", lambda: lowrank_einsum("bd,dk->bk", X, W, "n"), TypeError, "noise"),
    ("path_int", lambda: lowrank_einsum("bd,dk->bk", X, W, LN, path=3), TypeError, "path"),
]:
    case("layer", "lowrank_einsum", name, call, exc, match)
for name, call, exc, match in [
    ("noise_list", lambda: perturbed_call(FIT, P, [NZ["w"]]), TypeError, "noise"),
    ("noise_path", lambda: perturbed_call(FIT, P, {"nope": NZ["w"]}), ValueError, "noise"),
    ("noise_value_str", lambda: perturbed_call(FIT, P, {"w": "x"}), TypeError, "noise\\['w'\\]"),
    ("noise_value_shape", lambda: perturbed_call(FIT, P, {"b": jnp.ones(3)}), ValueError, "noise\\['b'\\]"),
    ("noise_lowrank_shape", lambda: perturbed_call(FIT, P, {"w": LowRankNoise(jnp.ones((4, 1)), jnp.ones((3, 1)), 0.1)}),
     ValueError, "noise\\['w'\\].a"),
    ("stats_str", lambda: perturbed_call(FIT, P, {}, stats="s"), TypeError, "stats"),
]:
    case("layer", "perturbed_call", name, call, exc, match)
LAYER = PerturbedLinear(3, 4, rngs=nnx.Rngs(0))
case("layer", "PerturbedLinear", "rngs_none", lambda: PerturbedLinear(3, 4, rngs=None), TypeError, "rngs")
case("layer", "PerturbedLinear", "rngs_int", lambda: PerturbedLinear(3, 4, rngs=0), TypeError, "rngs")
case("layer", "PerturbedLinear.__call__", "noise_str", lambda: LAYER(X, "n"), TypeError, "noise")
case("layer", "PerturbedLinear.__call__", "noise_kernel_str", lambda: LAYER(X, {"kernel": "n"}), TypeError, "noise")
case("layer", "PerturbedLinear.__call__", "x_width", lambda: LAYER(jnp.ones((2, 5))), ValueError, "x")

# ---------------------------------------------------------------- other constructor arguments, degenerate configs
MESH = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("pop",))
for name, call, exc, match in [
    ("targets_int", lambda: Eggroll(N, targets=3), TypeError, "targets"),
    ("frozen_bool", lambda: Eggroll(N, frozen=True), TypeError, "frozen"),
    ("targets_nomatch", lambda: Eggroll(N, targets="kernal").plan(P), ValueError, "targets"),
    ("mesh_str", lambda: Eggroll(N, mesh="mesh"), TypeError, "mesh"),
    ("axis_name_int", lambda: Eggroll(N, mesh=MESH, axis_name=3), TypeError, "axis_name"),
    ("axis_name_unknown", lambda: Eggroll(N, mesh=MESH, axis_name="data"), ValueError, "axis_name"),
    ("axis_name_no_mesh", lambda: Eggroll(N, axis_name="pop"), ValueError, "axis_name"),
    ("store_noise_mesh", lambda: Eggroll(N, mesh=MESH, store_noise=True), ValueError, "store_noise"),
    ("odd_antithetic", lambda: Eggroll(7), ValueError, "population_size"),
    ("chunk_not_divisor", lambda: Eggroll(N, member_chunk=3), ValueError, "member_chunk"),
    ("chunk_odd_pairs", lambda: Eggroll(12, member_chunk=3), ValueError, "member_chunk"),
    ("pop1_z_score", lambda: Eggroll(1, antithetic=False), ValueError, "population_size=1"),
    ("pop1_centered_rank", lambda: Eggroll(1, antithetic=False, shaping="centered_rank"), ValueError, "population_size=1"),
    ("rank_gt_min_stack", lambda: Eggroll(N, rank=4).plan({"s": jnp.zeros((5, 3, 8))}), ValueError, "rank=4 exceeds.*leaf 's'"),
    # noise='table': the table must hold one index's window (3 x 4 kernel at rank 2: 14 + bias 4 = 18)
    ("table_too_small", lambda: Eggroll(N, rank=2, noise="table", table_size=17).estimate(
        Eggroll(N, rank=2, noise="table", table_size=17).init(jax.random.key(0)), P, FIT), ValueError, "table_size=17"),
    ("draw_flat_no_table", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, 0, 0, 2, 1, "table"), ValueError, "table"),
    ("draw_flat_short_table", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, 0, 0, 2, 1, "table", jnp.zeros(5)),
     ValueError, "table"),
    ("make_table_too_large", lambda: noise_lib.make_table(2 ** 30 + 1), ValueError, "table_size"),
    # a table barely larger than one window would repeat noise: >= 4 windows and >= N/2 offsets
    ("table_under_4_windows", lambda: Eggroll(N, rank=2, noise="table", table_size=71).plan(P) and
     Eggroll(N, rank=2, noise="table", table_size=71).member_noise(ST, P, 0), ValueError, "table_size=71"),
    ("table_few_offsets", lambda: Eggroll(256, rank=2, noise="table", table_size=100).fitness(ST, P, FIT),
     ValueError, "table_size=100"),
    ("draw_flat_bf16_table", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, 0, 0, 2, 1, "table",
                                                         jnp.zeros(64, jnp.bfloat16)), TypeError, "table"),
    ("draw_flat_nan_table", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, 0, 0, 2, 1, "table",
                                                        jnp.zeros(64).at[3].set(jnp.nan)), ValueError, "table"),
    ("draw_flat_table_wrong_dist", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, 0, 0, 2, 1, "normal",
                                                               jnp.zeros(64)), ValueError, "table"),
    ("draw_flat_rank_none", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, 0, 0, None), ValueError, "rank"),
    ("draw_flat_plans_str", lambda: noise_lib.draw_flat("plans", ST.key, 0, 0, 2), TypeError, "plans"),
    ("draw_flat_index_float", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, 0, 1.9, 2), TypeError, "index"),
    ("draw_flat_index_str", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, 0, "0", 2), TypeError, "index"),
    ("draw_flat_index_neg", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, 0, -1, 2), ValueError, "index"),
    ("draw_flat_index_2_32", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, 0, 2 ** 32, 2), ValueError, "index"),
    ("draw_flat_gen_bool", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, True, 0, 2), TypeError, "generation"),
    ("draw_flat_gen_float", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, 1.5, 0, 2), TypeError, "generation"),
    ("draw_flat_gen_neg_array", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, jnp.int32(-1), 0, 2), ValueError,
     "generation"),
    ("draw_flat_gen_float_array", lambda: noise_lib.draw_flat(ES.plan(P), ST.key, jnp.float32(1), 0, 2), TypeError,
     "generation"),
    ("default_chunk_odd_antithetic", lambda: default_member_chunk(7, True), ValueError, "population_size"),
    ("init_rbg_key", lambda: ES.init(jax.random.key(0, impl="rbg")), TypeError, "threefry"),
    ("state_rbg_key", lambda: ES.estimate(EggrollState(jax.random.key(0, impl="rbg"), jnp.int32(0)), P, FIT),
     TypeError, "state.key"),
]:
    case("config", "Eggroll", name, call, exc, match)


# ---------------------------------------------------------------- integer EGGROLL (lrjax.es.integer)
from lrjax.es import IntEggroll, dequantize, int_dense, int_embed, quantize  # noqa: E402

IES = IntEggroll(N, rank=1, member_chunk=4)
IST = IES.init(jax.random.key(0))
I8 = jnp.ones((3, 4), jnp.int8)
IP = {"w": I8}
IFIT = lambda p, nz: 0.0  # noqa: E731
for bad in ("no", 1, None):
    case("bool", "IntEggroll.maximize", repr(bad), lambda bad=bad: IntEggroll(N, maximize=bad), TypeError, "maximize")
for site, call, arg in (("IntEggroll.population_size", lambda v: IntEggroll(v), "population_size"),
                        ("IntEggroll.rank", lambda v: IntEggroll(N, rank=v), "rank"),
                        ("IntEggroll.sigma_shift", lambda v: IntEggroll(N, sigma_shift=v), "sigma_shift"),
                        ("quantize.bits", lambda v: quantize(P, bits=v), "bits"),
                        ("int_dense.out_shift", lambda v: int_dense(jnp.ones((2, 3), jnp.int8), I8, out_shift=v),
                         "out_shift")):
    for bad, exc in ((True, TypeError), (2.5, TypeError), ("8", TypeError), (-1, ValueError)):
        case("int", site, repr(bad), lambda call=call, bad=bad: call(bad), exc, arg)
case("config", "IntEggroll", "odd_population", lambda: IntEggroll(5), ValueError, "population_size")
case("config", "IntEggroll", "chunk_not_divisor", lambda: IntEggroll(N, member_chunk=3), ValueError, "member_chunk")
for bad, exc in ((0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("0.1", TypeError), (None, TypeError)):
    case("float", "IntEggroll.alpha", repr(bad), lambda bad=bad: IntEggroll(N, alpha=bad), exc, "alpha")
    if bad is not None:  # thresholds(None) uses the estimator's own alpha
        case("float", "IntEggroll.thresholds", repr(bad), lambda bad=bad: IES.thresholds(bad), exc, "alpha")
for name, params, exc, match in (("float_leaf", {"w": jnp.ones((3, 4))}, TypeError, "quantize"),
                                 ("int32_leaf", {"w": jnp.ones((3, 4), jnp.int32)}, TypeError, "int8"),
                                 ("minus128", {"w": jnp.full((3, 4), -128, jnp.int8)}, ValueError, "-128"),
                                 ("str", "abc", TypeError, "params")):
    case("params", "IntEggroll.step", name, lambda params=params: IES.step(IST, params, IFIT), exc, match)
    if name != "minus128":  # plan reads shapes and dtypes only; step checks the values
        case("params", "IntEggroll.plan", name, lambda params=params: IES.plan(params), exc, match)
case("params", "quantize", "str", lambda: quantize("abc"), TypeError, "params")
case("params", "quantize", "nan", lambda: quantize({"w": jnp.array([jnp.nan])}), ValueError, "leaf 'w'")
case("params", "dequantize", "str", lambda: dequantize("a", "b"), TypeError, "qparams")
case("params", "dequantize", "mismatch", lambda: dequantize(IP, {"v": jnp.ones(())}), ValueError, "scales")
case("params", "dequantize", "vector_scale", lambda: dequantize(IP, {"w": jnp.ones(3)}), ValueError, "scales")
for name, f, exc, match in (("len", jnp.ones(5), ValueError, "fitness"), ("str", "abc", TypeError, "fitness")):
    case("fitness", "IntEggroll.tell", name, lambda f=f: IES.tell(IST, IP, f), exc, match)
case("key", "IntEggroll.init", "int", lambda: IES.init(3), TypeError, "key")
case("members", "IntEggroll.member_noise", "past_end", lambda: IES.member_noise(IST, IP, N), ValueError, "member")
case("members", "IntEggroll.member_inputs", "past_end", lambda: IES.member_inputs(IST, IP, N), ValueError, "member")
for name, call, exc, match in (
        ("float_x", lambda: int_dense(jnp.ones((2, 3)), I8), TypeError, "x must be int8"),
        ("float_kernel", lambda: int_dense(jnp.ones((2, 3), jnp.int8), jnp.ones((3, 4))), TypeError, "kernel"),
        ("width", lambda: int_dense(jnp.ones((2, 5), jnp.int8), I8), ValueError, "x must have a trailing axis"),
        ("str_x", lambda: int_dense("x", I8), TypeError, "x must be an array")):
    case("layer", "int_dense", name, call, exc, match)
for name, call, exc, match in (
        ("float_ids", lambda: int_embed(jnp.ones(3), I8), TypeError, "ids"),
        ("float_table", lambda: int_embed(jnp.ones(3, jnp.int32), jnp.ones((3, 4))), TypeError, "table"),
        ("ids_out_of_range", lambda: int_embed(jnp.array([5]), I8), ValueError, "ids"),
        ("ids_negative", lambda: int_embed(jnp.array([-1]), I8), ValueError, "ids"),
        ("table_1d", lambda: int_embed(jnp.array([0]), jnp.ones(4, jnp.int8)), ValueError, "table")):
    case("layer", "int_embed", name, call, exc, match)


@pytest.mark.parametrize("call,exc,match", CASES)
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    assert type(info.value) is exc  # the exact type: not a subclass from deep inside JAX/NumPy


def test_sweep_size():
    """The sweep tries every kind on every public entry point (counted for the issue's note)."""
    assert len(CASES) >= 400, len(CASES)
    kinds = {c.id.split("-")[0] for c in CASES}
    assert kinds == {"bool", "int", "float", "enum", "dtype", "fitness", "params", "state", "key",
                     "fitness_fn", "stats", "fn", "members", "layer", "config"}


def test_public_api_is_swept():
    """Every public callable of lrjax.es and every public Eggroll method appears in the sweep, so
    a new entry point without a bad-input case fails here."""
    import lrjax.es as es_mod
    sites = {c.id.split("-")[1].split(".")[0] for c in CASES}
    public = {n for n in es_mod.__all__ if callable(getattr(es_mod, n)) and n not in
              ("EggrollState", "EstimateInfo", "LowRankNoise", "FactoredStats", "IntLowRankNoise", "IntStepInfo")}
    methods = {n for n in dir(Eggroll) if not n.startswith("_") and callable(getattr(Eggroll, n))}
    missing = (public | methods) - sites - {"Eggroll"}
    assert not missing, f"no bad-input case for {sorted(missing)}"
    assert "Eggroll" in sites
    assert not math.isnan(len(CASES))
