"""EGGROLL: Evolution Guided General Optimization via Low-rank Learning.

Sarkar et al. 2025, "Evolution Strategies at the Hyperscale" (official JAX code:
ESHyperscale/HyperscaleES). Gaussian ES estimates the gradient of the smoothed objective
``J(theta) = E_eps[f(theta + sigma eps)]`` by ``g = 1/(N sigma) sum_i f_i eps_i`` (Salimans et al.
2017). Materializing ``eps_i`` for every matrix costs ``O(N m n)`` memory and a batched matmul per
member. EGGROLL replaces a matrix's ``eps_i`` by the rank-``r`` direction

    E_i = s_i A_i B_i^T / sqrt(r),      A_i ~ N(0, I) in R^{m x r},  B_i ~ N(0, I) in R^{n x r},

whose entries have unit variance, so the member's forward is
``x (W + sigma E_i) = x W + (sigma s_i / sqrt(r)) (x A_i) B_i^T``: one shared ``x W`` for the whole
population plus ``O(r (m + n))`` per member and row. The update

    g = 1/(N sigma) sum_i w_i E_i = 1/(N sigma sqrt(r)) sum_j c_j A_j B_j^T

(``w`` the shaped fitness, ``c_j = w_{2j} - w_{2j+1}`` for antithetic pairs) is a sum of many
rank-``r`` terms, hence high rank; the paper shows it approaches the full-rank Gaussian ES update at
rate ``O(1/r)``. Vectors and biases (and every leaf when ``rank=None``) get full-rank Gaussian
``eps_i``. Perturbations are pure functions of ``(seed, generation, noise index)``
(:mod:`lrjax.es.noise`): each index is drawn once for its antithetic pair's forwards and drawn
again, chunk by chunk, by the update, so no perturbation is ever stored for the whole population
and only fitness scalars cross devices. ``store_noise`` (default ``'auto'``: single program, no
mesh, draws up to 64 MiB) trades that for speed: it keeps the forwards' flat draws (``N/2 x (r (m + n) per matrix + biases)``
floats, small next to the ``N x D`` population of full-rank ES) for the update.

Scaling versus the official code: HyperscaleES hands optax ``-sqrt(N) sigma^2 g`` (its ``sigma``
folded into ``A``); this module returns ``g`` itself (the ES gradient of the smoothed *loss*, like
evosax's ``Open_ES``), so HyperscaleES' learning rate ``alpha`` corresponds to
``alpha sigma^2 sqrt(N)`` here.

Sharding: with ``mesh=``, the population is split over one mesh axis inside ``jax.shard_map``;
only the ``N`` fitness scalars are all-gathered, and every device computes the same update by
regenerating all noise in a fixed chunked order. The update is bit-identical for any device or
process count, default settings included, by this rule: the population is cut into *global*
chunks of ``member_chunk`` consecutive member ids (a number that depends on ``N`` only), each
chunk is evaluated by the same ``vmap`` program whichever device runs it, devices take whole
chunks in order (padded with discarded dummy chunks when the chunk count is not a multiple of the
device count), and the update sums the noise in chunks of ``update_chunk`` indices in global
order. So no floating-point result depends on how many members a device holds (a matmul's
rounding may depend on its batch size: on XLA:CPU a ``vmap`` over 64 members and over 8 members
give member fitnesses that differ in the last bits).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lrjax import _validation as V
from lrjax._validation import check_key
from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax.es import noise as noise_lib
from lrjax.es.noise import FROZEN, FULL, LOWRANK, LeafPlan, LowRankNoise
from lrjax.es.perturbed import FactoredStats, perturbed_call
from lrjax.es.shaping import SHAPINGS, check_fitness, shape_fitness

__all__ = ["Eggroll", "EggrollState", "EstimateInfo", "default_member_chunk"]


class EggrollState(NamedTuple):
    """Seed and generation counter; everything else is regenerated."""

    key: jax.Array
    generation: jax.Array


class _Src(NamedTuple):
    """Where a generation's noise comes from: the seed key and (``noise='table'``) the table."""

    key: jax.Array
    table: jax.Array | None


class EstimateInfo(NamedTuple):
    """Per-generation diagnostics (global member order)."""

    fitness: jax.Array  # raw fitness [N] (non-finite values kept as they came)
    weights: jax.Array  # shaped weights [N] that entered the update
    num_nonfinite: jax.Array  # how many members had NaN / inf fitness


def _largest_divisor_at_most(n: int, k: int) -> int:
    k = max(1, min(n, k))
    while n % k:
        k -= 1
    return k


MAX_DEFAULT_MEMBER_CHUNK = 256
STORE_NOISE_AUTO_BYTES = 64 * 2**20  # store_noise='auto' keeps one generation's draws up to this size


def default_member_chunk(population_size: int, antithetic: bool = True, *, sharded: bool = True) -> int:
    """Default evaluation chunk: the largest divisor of ``N`` (even with ``antithetic``) that is at
    most ``min(256, N // 8)`` (at least one pair) with ``sharded=True`` (the rule of every ``mesh``:
    at least 8 chunks, so 8 devices are all busy; a function of ``N`` only, so every mesh layout
    agrees bit for bit; ``Eggroll``'s default with or without a mesh), and at most ``256`` with
    ``sharded=False`` (as few sequential chunks as possible: faster on one device when each
    member's work is small, slower when it is large; see ``Eggroll``'s ``member_chunk``). Being a divisor, it is small when ``N`` (or
    ``N / 2``) has no divisor near the cap -- ``N = 514`` gives chunks of 2 members, 257 of
    them: choose such an ``N``, or pass ``member_chunk``. Errors: ``ValueError`` for an odd ``N``
    with ``antithetic``."""
    population_size = V.check_int(population_size, "population_size", low=1)
    step = 2 if V.check_bool(antithetic, "antithetic") else 1
    sharded = V.check_bool(sharded, "sharded")
    if population_size % step:
        raise ValueError(f"population_size must be even with antithetic=True (mirrored pairs), got {population_size}")
    cap = max(step, min(MAX_DEFAULT_MEMBER_CHUNK, population_size // 8 if sharded else population_size))
    return step * _largest_divisor_at_most(population_size // step, cap // step)


# ------------------------------------------------------------------ argument checks
def _check_key(key, name="key"):
    """One threefry PRNG key (:func:`lrjax._validation.check_key`), legacy ``uint32[2]`` keys wrapped
    as typed keys. Other implementations (``impl='rbg'``) are refused: the counter-based noise
    hashes threefry key words."""
    key = check_key(key, name)
    key = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(
        jnp.asarray(key), impl="threefry2x32")
    if str(jax.random.key_impl(key)) != "threefry2x32":
        raise TypeError(f"{name} must be a threefry key (jax.random.key(seed), the default implementation), got "
                        f"impl={jax.random.key_impl(key)}: the ES noise is a threefry hash of (seed, generation, index)")
    return key


def _check_params(params, name="params") -> dict:
    """``{path: leaf}`` of a non-empty pytree whose leaves are arrays (:func:`lrjax._validation.check_params`)."""
    return V.check_params(params, name)


@jax.jit
def _finite_flags(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves])


def _check_params_finite(flat: dict, name="params"):
    """Refuse NaN/Inf in concrete floating params (one fused reduction; skipped under tracing)."""
    items = [(p, v) for p, v in flat.items() if jnp.issubdtype(v.dtype, jnp.inexact)]
    if not items or not all(V.is_concrete(v) for _, v in items):
        return
    if isinstance(items[0][1], jax.Array) and not all(v.is_fully_addressable for _, v in items
                                                       if isinstance(v, jax.Array)):
        return
    with jax.ensure_compile_time_eval():
        flags = np.asarray(_finite_flags([v for _, v in items]))
    if not flags.all():
        p = items[int(np.argmin(flags))][0]
        raise ValueError(f"{name}: leaf {p!r} contains NaN or Inf; every member would inherit it "
                         "(lrjax does not propagate non-finite inputs silently): clean the params first")


def _check_member(member, n, name="member"):
    """A member id: a Python/NumPy int in ``[0, n)``, or an integer scalar array (traced ones too)."""
    if isinstance(member, (jax.Array, np.ndarray, jax.core.Tracer)) and not isinstance(member, np.generic):
        if member.ndim != 0 or not jnp.issubdtype(member.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer member id (scalar), got {member.dtype}"
                            f"{tuple(member.shape)}; vmap over ids for several members, or use Eggroll.ask")
        if V.is_concrete(member):
            V.check_int(int(member), name, low=0, high=n - 1)
        return member
    return V.check_int(member, name, low=0, high=n - 1)


class Eggroll:
    """Low-rank evolution strategies (EGGROLL) for any parameter pytree.

    Args:
      population_size: members ``N`` per generation. Even with ``antithetic`` (default). Any
        device count works (devices take whole chunks of ``member_chunk`` members). ``N = 1``
        (``antithetic=False``) only with ``shaping='none'``: one member has no spread to shape.
      rank: rank ``r >= 1`` of each matrix perturbation (default 1, the official default);
        ``None`` gives full-rank Gaussian noise for every leaf (OpenAI-ES, same estimator). lrjax's
        one rank rule holds: ``r <= min(M, N)`` of every low-rank leaf's matrix view, else the
        leaf is named in a ``ValueError`` (leave small leaves out of ``targets`` to give them
        full-rank noise).
      sigma: perturbation scale (default ``1e-3``, the official default; small models trained from
        scratch usually want ``1e-2`` to ``1e-1``).
      shaping: ``'z_score'`` (default, as HyperscaleES), ``'centered_rank'`` or ``'none'``; see
        :mod:`lrjax.es.shaping`, which also states the rule for non-finite fitness.
      maximize: ``True`` (default) if larger fitness is better. The returned gradient is always
        the gradient of the smoothed *loss* (``-fitness`` when maximizing), so it goes straight
        into ``optax`` ``update`` as ``jax.grad`` of a loss would (see "Sign" below).
      antithetic: mirrored pairs ``theta +- sigma E_j`` (default ``True``).
      targets: leaves that get low-rank noise (an :mod:`lrjax.tree` pattern); default every
        floating leaf with ``ndim >= 2``. Other floating leaves get full-rank noise.
      frozen: leaves that are never perturbed (zero gradient); non-floating leaves always are.
      axes: matrix-view spec of :mod:`lrjax.axes` (``[L, m, n]`` stacks are batches of matrices).
      noise_reuse: noise changes every ``noise_reuse`` generations (default 1).
      noise: ``'normal'`` (default; the paper's Gaussian ``A``, ``B`` and ``eps``),
        ``'rademacher'`` (+-1 entries from packed random bits: same mean and variance, 32 entries
        per generator call; on CPUs the Gaussian generator, not the matmuls, dominates a
        generation, see ``experiments/bench_es.py``) or ``'table'`` (Gaussian entries read as one
        window of a pre-drawn table per noise index, at an offset hashed from ``(seed,
        generation, index)``: one generator word per index; the scheme of the paper's int8 code,
        see :mod:`lrjax.es.noise` for the math and the overlap caveat).
      table_size: entries of the ``noise='table'`` table (default ``2^22``, 16 MiB of float32, at
        most ``2^30``; ignored by the other noises). With a window of ``s`` entries per noise index
        (``noise_size``, fixed by the params and rank) and ``n`` noise indices per generation, a
        generation has about ``n^2 s / table_size`` pairs of partly overlapping windows and
        ``n^2 / (2 (table_size - s + 1))`` pairs of identical ones (identical noise for two
        members). Refused (``ValueError``, checked per params before tracing) unless
        ``table_size >= 4 s`` and ``table_size - s + 1 >= n``; keep it far larger (the default
        gives 0.002 identical and ~27 partly overlapping pairs for a 3-layer 256-wide MLP at rank
        4, N = 256).
      mesh, axis_name: split the population over ``mesh.shape[axis_name]`` devices with
        ``jax.shard_map`` (default axis: the mesh's first). Works across processes after
        ``jax.distributed.initialize``.
      member_chunk: members evaluated together by one ``vmap`` (a global chunk of consecutive
        member ids, see "Sharding" above); a device runs its chunks with a sequential
        ``lax.map``. An even divisor of ``N`` (with ``antithetic``). Default
        ``default_member_chunk(N, antithetic)``: the largest divisor of ``N`` (even with
        ``antithetic``) that is at most ``min(256, N // 8)``, so there are at least 8 chunks (8
        devices all busy) and at most 256 members per ``vmap``. It depends on ``N`` only, never on
        the device count or the mesh, which keeps the update bit-identical across layouts; any
        value you fix does too. The best chunk on one device depends on the work per member:
        small per-member work (a few input rows) runs faster in one large chunk,
        ``default_member_chunk(N, antithetic, sharded=False)`` (``experiments/bench_es.py``'s MLP
        at width 256, N 256: 2.1x instead of ~3x of its limit), large per-member work in small
        chunks (the quickstart's 2-layer transformer on 4 x 128 tokens per member, N 32: 259 ms
        per generation at chunk 4, 441 ms at 32, measured on 2 CPU cores).
      update_chunk: noise indices summed together per step of the update (default 128).
      store_noise: keep each noise index's flat draw from the member forwards and reuse it in the
        update instead of drawing it a second time (on CPUs the Gaussian generator is most of a
        generation's overhead over inference). Costs ``N/2 x noise_size`` floats (``N x`` with
        ``antithetic=False``) for the population. ``False``: the update regenerates the noise,
        nothing population-sized is stored. Default ``'auto'``: store when there is no ``mesh``
        and the draws take at most ``STORE_NOISE_AUTO_BYTES`` (64 MiB), else regenerate.
        ``True`` is not available with ``mesh`` (each device draws only its chunks' noise). Same
        values either way, bit for bit: the draws are the same pure functions of (seed,
        generation, index) and the update sums them in the same chunks.

    Sign of the returned gradient: ``estimate`` and ``tell`` return an estimate of the gradient
    of the smoothed *loss* ``L``, with ``L = -fitness`` when ``maximize=True`` and ``L = fitness``
    when ``maximize=False``: a *descent* gradient in optax's convention, meant for
    ``params - lr * grad`` (what ``optax.sgd(lr)`` / ``optax.adam`` do with it), which raises the
    fitness when maximizing and lowers it when minimizing. Do not negate it. With
    ``maximize=True`` it is thus minus an estimate of the ascent direction ``grad f``. Shapings
    ``'z_score'`` and ``'centered_rank'`` keep this sign but rescale (the weights are shaped
    fitness, not ``f``). The paper's raw estimator ``1/(N sigma) sum_i f_i eps_i`` (an estimate of
    ``grad E[f]``) is returned exactly by ``shaping='none', maximize=False``; with
    ``shaping='none', maximize=True`` the result is its negative.

    Fitness outside JAX (simulators, environments, external evaluators): :meth:`ask` gives the
    members' perturbed params (or noise) chunk by chunk, :meth:`tell` takes the fitness vector; the
    update is the one :meth:`estimate` computes from the same fitness values.

    Argument rules (checked at construction, before anything is traced): ``population_size``,
    ``rank``, ``noise_reuse``, ``member_chunk``, ``update_chunk`` are ints in range, ``sigma`` a
    finite float ``> 0``, ``maximize``/``antithetic`` real bools, ``store_noise`` a real bool or
    ``'auto'``, ``table_size`` an int in ``[1, 2^30]``, ``shaping`` and
    ``noise`` one of their names; a population of 1 (``antithetic=False``) is refused with
    ``'z_score'`` and ``'centered_rank'`` (no spread); ``rank > min(M, N)`` of a targeted leaf is
    refused naming the leaf (lrjax's one rank rule). Params must be a pytree of arrays with at
    least one perturbed leaf and (when concrete) no NaN/Inf.

    Example::

        es = Eggroll(population_size=256, rank=4, sigma=0.05)
        state = es.init(jax.random.key(0))
        opt = optax.adam(1e-2); opt_state = opt.init(params)
        for _ in range(100):
            grad, state, info = es.estimate(state, params, fitness_fn, batch)
            updates, opt_state = opt.update(grad, opt_state, params)
            params = optax.apply_updates(params, updates)
    """

    def __init__(self, population_size: int, *, rank: int | None = 1, sigma: float = 1e-3,
                 shaping: str = "z_score", maximize: bool = True, antithetic: bool = True,
                 targets: tree_lib.Targets | None = None, frozen: tree_lib.Targets | None = None,
                 axes: axes_lib.AxesSpec = None, noise_reuse: int = 1, noise: str = "normal",
                 mesh: Mesh | None = None,
                 axis_name: str | None = None, member_chunk: int | None = None,
                 update_chunk: int = 128, store_noise: bool | str = "auto",
                 table_size: int = noise_lib.DEFAULT_TABLE_SIZE):
        population_size = V.check_int(population_size, "population_size", low=1)
        rank = V.check_int(rank, "rank", low=1, allow_none=True)
        sigma = V.check_float(sigma, "sigma", low=0.0, low_open=True)
        V.check_choice(shaping, "shaping", SHAPINGS)
        maximize = V.check_bool(maximize, "maximize")
        antithetic = V.check_bool(antithetic, "antithetic")
        noise_reuse = V.check_int(noise_reuse, "noise_reuse", low=1)
        V.check_choice(noise, "noise", noise_lib.DISTRIBUTIONS)
        table_size = V.check_int(table_size, "table_size", low=1, high=noise_lib.MAX_TABLE_SIZE)
        update_chunk = V.check_int(update_chunk, "update_chunk", low=1)
        if not (isinstance(store_noise, str) and store_noise == "auto"):
            try:
                store_noise = V.check_bool(store_noise, "store_noise")
            except TypeError:
                raise TypeError(f"store_noise must be True, False or 'auto' (the default), got {store_noise!r}") from None
        member_chunk = V.check_int(member_chunk, "member_chunk", low=1, allow_none=True)
        for name, t in (("targets", targets), ("frozen", frozen)):
            if isinstance(t, (bool, numbers.Number)):
                raise TypeError(f"{name} must be an lrjax.tree pattern (a regex string, a list of "
                                f"them, or a callable (path, leaf) -> bool), or None; got {t!r}")
        if store_noise is True and mesh is not None:
            raise ValueError("store_noise=True needs mesh=None (with a mesh the update regenerates the noise)")
        if axis_name is not None and not isinstance(axis_name, str):
            raise TypeError(f"axis_name must be a mesh axis name (str) or None, got {axis_name!r}")
        n_dev = 1
        if mesh is not None:
            if not isinstance(mesh, Mesh):
                raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
            axis_name = mesh.axis_names[0] if axis_name is None else axis_name
            if axis_name not in mesh.axis_names:
                raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
            n_dev = mesh.shape[axis_name]
        elif axis_name is not None:
            raise ValueError("axis_name is given but mesh is None; pass mesh= as well")
        if antithetic and population_size % 2:
            raise ValueError(f"population_size={population_size} must be even with antithetic=True "
                             f"(members come in mirrored pairs); use {population_size + 1} or antithetic=False")
        if population_size == 1 and shaping != "none":
            raise ValueError(f"population_size=1 has no spread: with shaping={shaping!r} the single "
                             "member's weight carries no information (z-score gives 0, an all-zero "
                             "update; a centered rank is a constant), so the estimate would be "
                             "meaningless. Use population_size >= 2 (2 with antithetic=True is one "
                             "mirrored pair), or shaping='none' for the raw one-sample estimator")
        if member_chunk is None:
            member_chunk = default_member_chunk(population_size, antithetic)
        elif population_size % member_chunk or (antithetic and member_chunk % 2):
            raise ValueError(f"member_chunk must be a positive divisor of population_size "
                             f"({population_size}){', and even (antithetic pairs)' if antithetic else ''}, "
                             f"got {member_chunk!r}")
        self.population_size = int(population_size)
        self.rank = None if rank is None else int(rank)
        self.sigma = float(sigma)
        self.shaping = shaping
        self.maximize = bool(maximize)
        self.antithetic = bool(antithetic)
        self.targets, self.frozen, self.axes = targets, frozen, axes
        self.noise_reuse = int(noise_reuse)
        self.noise = noise
        self.table_size = int(table_size)
        self._placed_table = None
        self.mesh, self.axis_name, self.num_devices = mesh, axis_name, n_dev
        self.member_chunk = int(member_chunk)
        num_chunks = population_size // self.member_chunk
        self.chunks_per_device = -(-num_chunks // n_dev)  # the last devices may get dummy chunks
        self.num_noise = population_size // 2 if antithetic else population_size
        self.update_chunk = _largest_divisor_at_most(self.num_noise, int(update_chunk))
        self.store_noise = store_noise
        self._cache: dict = {}

    # ------------------------------------------------------------------ setup
    def init(self, key) -> EggrollState:
        """State for seed ``key`` (a ``jax.random.key`` or legacy ``PRNGKey``), generation 0."""
        return EggrollState(_check_key(key, "key"), jnp.zeros((), jnp.int32))

    @property
    def table(self):
        """The ``noise='table'`` table (:func:`lrjax.es.noise.make_table` of ``table_size``; built
        once per process and size), ``None`` for the other noises."""
        return noise_lib.make_table(self.table_size) if self.noise == "table" else None

    def _table_input(self):
        """The table as the generation programs take it (replicated over the mesh), or ``None``."""
        if self.noise != "table":
            return None
        if self.mesh is None:
            return self.table
        if self._placed_table is None:
            with jax.ensure_compile_time_eval():  # a concrete array even when first asked inside a trace
                self._placed_table = self._to_global(self.table)
        return self._placed_table

    def plan(self, params) -> list[LeafPlan]:
        """How each leaf is perturbed (``'lowrank'``, ``'full'`` or ``'frozen'``), in flatten order."""
        flat = _check_params(params)
        isfloat = {p: hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating) for p, v in flat.items()}
        frozen = set(tree_lib.select(params, self.frozen, argname="frozen")) if self.frozen is not None else set()
        if self.rank is None:
            low = set()
        elif self.targets is None:
            low = {p for p, v in flat.items() if isfloat[p] and v.ndim >= 2}
        else:
            low = set(tree_lib.select(params, self.targets, argname="targets"))
        plans = []
        for p, v in flat.items():
            if p in frozen or not isfloat[p]:
                kind, ax = FROZEN, None
            elif p in low:
                kind, ax = LOWRANK, axes_lib.resolve(p, v.shape, self.axes)
                _, m, n = axes_lib.matrix_shape(tuple(v.shape), ax)
                V.check_rank(self.rank, m, n, "rank", where=f"leaf {p!r} (shape {tuple(v.shape)}); or give "
                             f"it full-rank noise by leaving it out of `targets`")
            else:
                kind, ax = FULL, None
            plans.append(LeafPlan(p, kind, tuple(v.shape), v.dtype, ax))
        return plans

    # ------------------------------------------------------------------ noise
    def _draw(self, plans, src, generation, j):
        return noise_lib.draw(plans, src.key, generation, j, self.rank, self.noise_reuse, self.noise, src.table)

    def _draw_flat(self, plans, src, generation, j):
        return noise_lib.draw_flat(plans, src.key, generation, j, self.rank, self.noise_reuse, self.noise, src.table)

    def _stores_noise(self, plans) -> bool:
        """Whether this program keeps the forwards' draws for the update (see ``store_noise``)."""
        if self.mesh is not None or not any(pl.kind != FROZEN for pl in plans):
            return False
        if self.store_noise == "auto":
            size = noise_lib.noise_size(plans, self.rank) * self.num_noise
            dt = functools.reduce(jnp.promote_types, [noise_lib.noise_dtype(p.dtype) for p in plans if p.kind != FROZEN])
            return size * jnp.dtype(dt).itemsize <= STORE_NOISE_AUTO_BYTES
        return bool(self.store_noise)

    def _member_noise_flat(self, plans, src, generation, member):
        sign, j = noise_lib.sign_and_index(member, self.antithetic)
        return self._scaled(plans, self._draw(plans, src, generation, j), sign)

    def _scaled(self, plans, unit, sign):
        out = []
        for pl, z in zip(plans, unit):
            if pl.kind == FROZEN:
                out.append(None)
            elif pl.kind == LOWRANK:
                out.append(LowRankNoise(z[0], z[1], (self.sigma / math.sqrt(self.rank)) * sign))
            else:
                out.append((self.sigma * sign) * z)
        return out

    def _plans(self, params) -> list[LeafPlan]:
        """:meth:`plan` for a generation: refuses params with nothing to perturb or (concrete)
        NaN/Inf values. The plan is cached per tree structure, shapes and dtypes."""
        flat = _check_params(params)
        sig = ("plan", jax.tree_util.tree_structure(params),
               tuple((tuple(np.shape(v)), str(v.dtype)) for v in flat.values()))
        plans = self._cache.get(sig)
        if plans is None:
            plans = self._cache[sig] = self.plan(params)
        if all(pl.kind == FROZEN for pl in plans):
            raise ValueError("params: no leaf is perturbed (every leaf is frozen or not floating), so the "
                             "ES update would be identically zero; pass floating params or loosen `frozen`")
        if self.noise == "table":
            size = noise_lib.noise_size(plans, self.rank)
            if self.table_size < 4 * size or self.table_size - size + 1 < self.num_noise:
                raise ValueError(
                    f"table_size={self.table_size} is too small for these params: one noise index reads a "
                    f"window of {size} entries (rank {self.rank}) and a generation draws {self.num_noise} "
                    f"windows; table_size must be >= 4 x window ({4 * size}) and leave >= {self.num_noise} "
                    f"offsets, and far larger in practice (about n^2 window / table_size windows overlap): "
                    f"raise table_size")
        _check_params_finite(flat)
        return plans

    def _check_state(self, state, name="state"):
        if not isinstance(state, EggrollState):
            raise TypeError(f"{name} must be an EggrollState from Eggroll.init, got {type(state).__name__}")
        key, gen = state.key, state.generation
        if not isinstance(key, (jax.Array, jax.core.Tracer)) or not jnp.issubdtype(key.dtype, jax.dtypes.prng_key) \
                or key.shape != ():
            raise TypeError(f"{name}.key must be one typed key (jax.random.key), got "
                            f"{getattr(key, 'dtype', type(key).__name__)}; build the state with Eggroll.init")
        if str(jax.random.key_impl(key)) != "threefry2x32":
            raise TypeError(f"{name}.key must be a threefry key (jax.random.key(seed), the default implementation), "
                            f"got impl={jax.random.key_impl(key)}; build the state with Eggroll.init")
        g = gen if isinstance(gen, (jax.Array, np.ndarray, jax.core.Tracer)) else None
        if g is None:
            V.check_int(gen, f"{name}.generation", low=0)
        elif g.ndim != 0 or not jnp.issubdtype(g.dtype, jnp.integer):
            raise TypeError(f"{name}.generation must be an integer scalar, got {g.dtype}{tuple(g.shape)}")
        elif V.is_concrete(g) and int(g) < 0:
            raise ValueError(f"{name}.generation must be >= 0, got {int(g)}")
        return state

    def member_noise(self, state: EggrollState, params, member) -> dict:
        """``{path: LowRankNoise | array}`` of member ``member`` (global id in ``[0, N)``) this
        generation; frozen leaves are absent. Feed it to :func:`lrjax.es.perturbed_call`."""
        self._check_state(state)
        plans = self._plans(params)
        member = _check_member(member, self.population_size)
        flat = self._member_fn(plans, params, False)(params, *self._member_inputs(state, member))
        return {pl.path: n for pl, n in zip(plans, flat) if n is not None}

    def _member_inputs(self, state, member):
        return (jax.random.key_data(state.key), self.table, jnp.asarray(state.generation, jnp.int32),
                jnp.asarray(member, jnp.int32))

    def _member_fn(self, plans, params, materialize: bool):
        """One member's noise (or materialized params) as one compiled program per tree, shapes and
        dtypes (eager op-by-op the counter-based hash alone dispatches ~150 small programs)."""
        treedef = jax.tree_util.tree_structure(params)
        ck = ("member", materialize, treedef, tuple((pl.shape, str(pl.dtype)) for pl in plans))
        if ck not in self._cache:
            def run(params, kd, table, generation, member):
                src = _Src(jax.random.wrap_key_data(kd, impl="threefry2x32"), table)
                nz = self._member_noise_flat(plans, src, generation, member)
                return self._materialize(plans, params, nz) if materialize else nz
            self._cache[ck] = jax.jit(run)
        return self._cache[ck]

    def _materialize(self, plans, params, nz_flat):
        new = {}
        flat = tree_lib.flatten(params)
        for pl, n in zip(plans, nz_flat):
            if n is None:
                continue
            v = flat[pl.path]
            d = axes_lib.from_matrix(n.dense(), pl.ax, pl.shape) if pl.kind == LOWRANK else n
            new[pl.path] = (v.astype(d.dtype) + d).astype(v.dtype)
        return tree_lib.replace(params, new)

    def member_params(self, state: EggrollState, params, member):
        """Materialized ``theta + sigma E_member`` (O(mn) per matrix: for checks, small models and
        fitness outside JAX; :meth:`ask` gives a whole chunk of members at once)."""
        self._check_state(state)
        plans = self._plans(params)
        member = _check_member(member, self.population_size)
        return self._member_fn(plans, params, True)(params, *self._member_inputs(state, member))

    # ------------------------------------------------------------------ ask / tell
    @property
    def num_chunks(self) -> int:
        """Number of global member chunks (``population_size // member_chunk``), see :meth:`ask`."""
        return self.population_size // self.member_chunk

    def ask(self, state: EggrollState, params, chunk: int | None = None, *, members=None,
            perturbation: bool = False):
        """This generation's members, batched along a new leading axis, for fitness computed
        outside JAX (simulators, RL environments, external evaluators); pair with :meth:`tell`.

        Args:
          state, params: as for :meth:`estimate`.
          chunk: ``None`` (default) for the whole population, or a chunk index ``c`` in
            ``[0, num_chunks)``: members ``c * member_chunk ... (c + 1) * member_chunk - 1``.
          members: instead of ``chunk``, explicit global member ids (1-D ints in ``[0, N)``).
          perturbation: ``False`` (default) returns the perturbed params ``theta + sigma E_i``, a
            pytree shaped like ``params`` whose leaves have a leading member axis ``[C, *shape]``
            (member ``k`` of the batch is ``member_params(state, params, ids[k])``). ``True``
            returns the members' noise instead, as :meth:`member_noise` batched: ``{path:
            LowRankNoise(a [C, *batch, M, r], b [C, *batch, N, r], scale [C]) | array [C, *shape]}``
            (the perturbation is ``scale * a @ b^T`` in the leaf's matrix view, or the array).

        Member ``i`` has exactly the noise (same bits) that :meth:`estimate` gives it:
        antithetic members ``2j`` and ``2j+1`` are ``theta +- sigma E_j``. So ``tell`` with the
        fitness of every member (in member order) gives the update ``estimate`` would give for the
        same fitness values -- bit-identical for identical values; a fitness computed another way
        (NumPy in float64, a simulator) moves the update only as much as it moves the fitness.

        Memory: the perturbed params of ``C`` members are materialized at once (``C`` copies of
        the params; ``perturbation=True`` needs ``C (r (M + N))`` per matrix instead). Bound it by
        asking chunk by chunk (``member_chunk=`` in the constructor sets the chunk size).

        Example (fitness in NumPy)::

            es = Eggroll(64, rank=2, sigma=0.05, member_chunk=16)
            state = es.init(jax.random.key(0))
            for _ in range(100):
                fit = np.concatenate([simulate(es.ask(state, params, c)) for c in range(es.num_chunks)])
                grad, state, info = es.tell(state, params, fit)     # fit: float [64], member order
                updates, opt_state = opt.update(grad, opt_state, params)
                params = optax.apply_updates(params, updates)

        ``ask`` runs in the calling process (no ``shard_map``): with a ``mesh``, ask each
        process's chunks there and gather the fitness before ``tell``.
        """
        self._check_state(state)
        perturbation = V.check_bool(perturbation, "perturbation")
        plans = self._plans(params)
        n = self.population_size
        if members is not None:
            if chunk is not None:
                raise ValueError("give either chunk or members, not both")
            if isinstance(members, (list, tuple)):
                if not members or not all(isinstance(m, (int, np.integer)) and not isinstance(m, bool)
                                          for m in members):
                    raise TypeError(f"members must be a non-empty 1-D list/array of int member ids, got {members!r}")
                members = np.asarray(members, np.int64)
            ids = V.check_array(members, "members", ndim=1, kind="integer")
            if ids.shape[0] == 0:
                raise ValueError("members is empty: give at least one member id")
            if V.is_concrete(ids):
                lo, hi = int(jnp.min(ids)), int(jnp.max(ids))
                if lo < 0 or hi >= n:
                    raise ValueError(f"members must be ids in [0, {n}) (population_size={n}), got min {lo}, max {hi}")
            ids = jnp.asarray(ids, jnp.int32)
        elif chunk is None:
            ids = jnp.arange(n, dtype=jnp.int32)
        else:
            c = V.check_int(chunk, "chunk", low=0, high=self.num_chunks - 1)
            ids = c * self.member_chunk + jnp.arange(self.member_chunk, dtype=jnp.int32)
        fn = self._ask_fn(plans, params, perturbation)
        return fn(params, jax.random.key_data(state.key), self.table, jnp.asarray(state.generation, jnp.int32), ids)

    def _ask_fn(self, plans, params, perturbation):
        treedef = jax.tree_util.tree_structure(params)
        ck = ("ask", perturbation, treedef, tuple((pl.shape, str(pl.dtype)) for pl in plans))
        if ck in self._cache:
            return self._cache[ck]
        impl = "threefry2x32"  # _check_key refuses other implementations

        def run(params, kd, table, generation, ids):
            src = _Src(jax.random.wrap_key_data(kd, impl=impl), table)

            def one(m):
                nz = self._member_noise_flat(plans, src, generation, m)
                if perturbation:
                    return {pl.path: z for pl, z in zip(plans, nz) if z is not None}
                return self._materialize(plans, params, nz)
            return jax.vmap(one)(ids)

        fn = jax.jit(run)
        self._cache[ck] = fn
        return fn

    # ------------------------------------------------------------------ fitness
    def _check_call(self, state, params, fitness_fn, args, pass_noise, stats=None):
        """Every check of estimate/fitness/lower, before anything is traced."""
        self._check_state(state)
        pass_noise = V.check_bool(pass_noise, "pass_noise")
        if stats is not None and not isinstance(stats, FactoredStats):
            raise TypeError(f"stats must be a lrjax.es.FactoredStats or None, got {type(stats).__name__}")
        self._plans(params)
        self._check_fitness_fn(params, fitness_fn, args, pass_noise)
        return pass_noise

    def _check_fitness_fn(self, params, fitness_fn, args, pass_noise):
        if not callable(fitness_fn):
            raise TypeError(f"fitness_fn must be callable, got {type(fitness_fn).__name__}")
        leaves, tdef = jax.tree_util.tree_flatten((params, args))
        sig = ("checked", fitness_fn, pass_noise, tdef,
               tuple((tuple(getattr(v, "shape", ())), str(getattr(v, "dtype", type(v)))) for v in leaves))
        if sig in self._cache:
            return
        try:
            if pass_noise:
                plans = self.plan(params)
                tree = jax.tree_util.tree_structure(params)
                table = (jax.ShapeDtypeStruct((self.table_size,), jnp.float32) if self.noise == "table"
                         else None)
                out = jax.eval_shape(
                    lambda p, k, t, g, a: fitness_fn(p, jax.tree_util.tree_unflatten(
                        tree, self._member_noise_flat(plans, _Src(k, t), g, 0)), *a),
                    params, jax.random.key(0), table, jnp.zeros((), jnp.int32), args)
            else:
                out = jax.eval_shape(lambda p, a: fitness_fn(p, *a), params, args)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
            shapes = {k: tuple(getattr(v, "shape", ())) for k, v in list(tree_lib.flatten(params).items())[:8]}
            raise TypeError(f"fitness_fn cannot take these params/args (param shapes {shapes}): "
                            f"{type(e).__name__}: {e}") from e
        if not hasattr(out, "shape") or out.shape not in ((), (1,)):
            raise ValueError(f"fitness_fn must return one scalar per member (shape () or (1,)), got "
                             f"{getattr(out, 'shape', type(out).__name__)}; reduce it (e.g. jnp.mean) "
                             f"inside fitness_fn")
        if not (jnp.issubdtype(out.dtype, jnp.floating) or jnp.issubdtype(out.dtype, jnp.integer)):
            raise TypeError(f"fitness_fn must return a real number, got dtype {out.dtype}")
        self._cache[sig] = True

    def _member_fitness(self, plans, fitness_fn, pass_noise, params, unit, sign, args):
        nz = self._scaled(plans, unit, sign)
        if pass_noise:
            tree = jax.tree_util.tree_structure(params)
            f = fitness_fn(params, jax.tree_util.tree_unflatten(tree, nz), *args)
        else:
            noise = {pl.path: n for pl, n in zip(plans, nz) if n is not None}
            f = perturbed_call(fitness_fn, params, noise, *args, axes=self.axes, stats=self._stats)
        return jnp.reshape(f, ()).astype(jnp.float32)

    def _local_fitness(self, plans, fitness_fn, pass_noise, params, src, generation, ids, args,
                       keep_noise=False):
        """Fitness of members ``ids`` (global ids; pairs contiguous and starting even). Each noise
        index is drawn once: both members of an antithetic pair share it. With ``keep_noise``
        also returns the flat draws ``[noise indices, noise_size]`` in index order; then all of
        them are drawn first, in one batched generator call (one large elementwise program
        instead of one per chunk), and the chunks' forwards read them. The draws are the same
        pure functions of ``(key, generation, index)`` either way, so is every fitness."""
        member = functools.partial(self._member_fitness, plans, fitness_fn, pass_noise, params)
        signs = jnp.array([1.0, -1.0], jnp.float32)
        rank = self.rank

        def draw(m):
            js = m[0::2] // 2 if self.antithetic else m
            return jax.vmap(lambda j: self._draw_flat(plans, src, generation, j))(js)

        def forward(z):
            units = noise_lib.split(plans, z, rank)
            if self.antithetic:
                both = jax.vmap(lambda u, s: member(u, s, args), in_axes=(None, 0))
                return jax.vmap(lambda u: both(u, signs))(units).reshape(-1)  # [+, -, +, -, ...]
            return jax.vmap(lambda u: member(u, jnp.float32(1.0), args))(units)

        c = self.member_chunk
        if keep_noise:
            z = draw(ids)
            if ids.shape[0] == c:
                return forward(z), z
            f = lax.map(forward, z.reshape(-1, z.shape[0] * c // ids.shape[0], z.shape[-1]))
            return f.reshape(-1), z
        if ids.shape[0] == c:
            return forward(draw(ids))
        return lax.map(lambda m: forward(draw(m)), ids.reshape(-1, c)).reshape(-1)

    def _device_ids(self, device):
        """Global member ids of ``device``'s whole chunks; ids ``>= N`` are dummies (discarded)."""
        n = self.chunks_per_device * self.member_chunk
        return device * n + jnp.arange(n, dtype=jnp.int32)

    # ------------------------------------------------------------------ update
    def _update(self, plans, params, src, generation, fitness, noise=None):
        """Gradient from raw fitness; ``noise``: the flat draws of every index (``[num_noise,
        noise_size]``, from the forwards) or ``None`` to regenerate them chunk by chunk."""
        n = self.population_size
        w = shape_fitness(fitness, self.shaping, self.maximize)
        coef = (w[0::2] - w[1::2]) if self.antithetic else w
        active = [pl for pl in plans if pl.kind != FROZEN]
        k = self.update_chunk
        if noise is None:
            js = jnp.arange(self.num_noise, dtype=jnp.int32).reshape(-1, k)
        else:
            js = noise.reshape(-1, k, noise.shape[-1])
        cs = coef.reshape(-1, k)

        def zeros(pl):
            if pl.kind == LOWRANK:
                b, m, nn = axes_lib.matrix_shape(pl.shape, pl.ax)
                return jnp.zeros((*b, m, nn), noise_lib.noise_dtype(pl.dtype))
            return jnp.zeros(pl.shape, noise_lib.noise_dtype(pl.dtype))

        def body(acc, xs):
            jj, cc = xs
            if noise is None:
                jj = jax.vmap(lambda j: self._draw_flat(plans, src, generation, j))(jj)
            zs = [z for pl, z in zip(plans, noise_lib.split(plans, jj, self.rank)) if pl.kind != FROZEN]
            new = []
            for pl, a, z in zip(active, acc, zs):
                if pl.kind == LOWRANK:
                    A, B = z
                    cA = A * cc.reshape((-1,) + (1,) * (A.ndim - 1)).astype(A.dtype)
                    new.append(a + jnp.einsum("c...mr,c...nr->...mn", cA, B))
                else:
                    new.append(a + jnp.tensordot(cc.astype(z.dtype), z, axes=1))
            return new, None

        acc, _ = lax.scan(body, [zeros(pl) for pl in active], (js, cs))
        out = {}
        for pl, a in zip(active, acc):
            if pl.kind == LOWRANK:
                g = a / (n * self.sigma * math.sqrt(self.rank))
                g = axes_lib.from_matrix(g, pl.ax, pl.shape)
            else:
                g = a / (n * self.sigma)
            out[pl.path] = g.astype(pl.dtype)
        leaves = [out[pl.path] if pl.kind != FROZEN else jnp.zeros(pl.shape, pl.dtype) for pl in plans]
        grad = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)
        nonfinite = jnp.sum(~jnp.isfinite(fitness)).astype(jnp.int32)
        return grad, EstimateInfo(fitness, w, nonfinite)

    # ------------------------------------------------------------------ drivers
    def _compiled(self, kind, fitness_fn, pass_noise, params):
        treedef = jax.tree_util.tree_structure(params)
        ck = (kind, fitness_fn, pass_noise, treedef)
        if ck in self._cache:
            return self._cache[ck]
        plans = self.plan(params)
        impl = "threefry2x32"  # _check_key refuses other implementations

        def run(params, kd, table, generation, args):
            key = _Src(jax.random.wrap_key_data(kd, impl=impl), table)
            if self.mesh is None:
                ids = jnp.arange(self.population_size, dtype=jnp.int32)
                if kind == "fitness":
                    return self._local_fitness(plans, fitness_fn, pass_noise, params, key, generation, ids, args)
                if self._stores_noise(plans):
                    f, z = self._local_fitness(plans, fitness_fn, pass_noise, params, key, generation, ids,
                                               args, keep_noise=True)
                    return self._update(plans, params, key, generation, f, z)
                f = self._local_fitness(plans, fitness_fn, pass_noise, params, key, generation, ids, args)
                return self._update(plans, params, key, generation, f)

            def body(params, kd, table, generation, args):
                key = _Src(jax.random.wrap_key_data(kd, impl=impl), table)
                ids = self._device_ids(lax.axis_index(self.axis_name))
                f = self._local_fitness(plans, fitness_fn, pass_noise, params, key, generation, ids, args)
                f = lax.all_gather(f, self.axis_name, tiled=True)  # only N scalars cross devices
                f = f[:self.population_size]  # drop the dummy chunks' members
                return f if kind == "fitness" else self._update(plans, params, key, generation, f)

            out_specs = P() if kind == "fitness" else (P(), P())
            return jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(), P(), P(), P()),
                                 out_specs=out_specs, check_vma=False)(params, kd, table, generation, args)

        def tell(params, kd, table, generation, fitness):
            key = _Src(jax.random.wrap_key_data(kd, impl=impl), table)
            return self._update(plans, params, key, generation, fitness)

        fn = jax.jit(tell if kind == "tell" else run)
        self._cache[ck] = fn
        return fn

    def _to_global(self, tree):
        if self.mesh is None:
            return tree
        if all(d.process_index == jax.process_index() for d in self.mesh.devices.flat):
            return jax.device_put(tree, NamedSharding(self.mesh, P()))
        from jax.experimental import multihost_utils
        return multihost_utils.host_local_array_to_global_array(tree, self.mesh, P())

    def _to_local(self, tree):
        if self.mesh is None or all(d.process_index == jax.process_index() for d in self.mesh.devices.flat):
            return tree
        from jax.experimental import multihost_utils
        return multihost_utils.global_array_to_host_local_array(tree, self.mesh, P())

    def _inputs(self, state, params, args):
        self._check_state(state)
        kd = jax.random.key_data(state.key)
        gen = jnp.asarray(state.generation, jnp.int32)
        return (*self._to_global((params, kd)), self._table_input(), *self._to_global((gen, args)))

    def lower(self, state: EggrollState, params, fitness_fn: Callable[..., Any], *args,
              pass_noise: bool = False):
        """The ``jax.stages.Lowered`` generation program of :meth:`estimate` (for
        ``.compile().memory_analysis()`` / ``cost_analysis()``)."""
        pass_noise = self._check_call(state, params, fitness_fn, args, pass_noise)
        self._stats = FactoredStats()
        return self._compiled("estimate", fitness_fn, pass_noise, params).lower(*self._inputs(state, params, args))

    def fitness(self, state: EggrollState, params, fitness_fn: Callable[..., Any], *args,
                pass_noise: bool = False, stats: FactoredStats | None = None):
        """Raw fitness ``[N]`` of this generation's members (global order), each member evaluated
        with :func:`perturbed_call` (or ``fitness_fn(params, noise, *args)`` with ``pass_noise``)."""
        pass_noise = self._check_call(state, params, fitness_fn, args, pass_noise, stats)
        self._stats = stats if stats is not None else FactoredStats()
        out = self._compiled("fitness", fitness_fn, pass_noise, params)(*self._inputs(state, params, args))
        return self._to_local(out)

    def tell(self, state: EggrollState, params, fitness):
        """``(grad, next_state, info)`` from raw fitness ``[N]`` in global member order.

        ``params`` must be the same pytree (structure, shapes, dtypes) that :meth:`ask` perturbed for
        this generation: the state holds only the key and the generation, so other params would
        silently pair the fitness with noise that was never evaluated.

        ``fitness``: a 1-D real vector of length ``population_size`` (NumPy, JAX or a list; any
        float or int dtype, computed inside or outside JAX), entry ``i`` the fitness of member
        ``i`` as given by :meth:`ask` / :meth:`member_params` / :meth:`fitness`. Shaping,
        antithetic pairing and the non-finite rule (:mod:`lrjax.es.shaping`) are those of
        :meth:`estimate`, which equals ``tell(state, params, fitness(state, params, ...))``. The
        fitness is shaped in float32 (float64 with x64 enabled); finite values beyond that range
        are refused. ``grad`` has the sign of :meth:`estimate`'s (see the class docstring).
        """
        self._check_state(state)
        self._plans(params)
        fitness = jnp.asarray(check_fitness(fitness, "fitness", self.population_size))
        p, kd, table, gen, _ = self._inputs(state, params, ())
        grad, info = self._compiled("tell", None, False, params)(p, kd, table, gen, fitness)
        return grad, state._replace(generation=state.generation + 1), info

    def estimate(self, state: EggrollState, params, fitness_fn: Callable[..., Any], *args,
                 pass_noise: bool = False, stats: FactoredStats | None = None):
        """One generation: evaluate every member and return ``(grad, next_state, info)``.

        ``fitness_fn(params, *args) -> scalar`` is an ordinary function of unperturbed-looking
        params (each member sees ``theta + sigma E_i``, low-rank leaves factored); ``args`` are
        shared by all members. With ``pass_noise=True`` it is called as
        ``fitness_fn(params, noise, *args)`` with unperturbed params and the member's noise tree
        (for models built from :class:`~lrjax.es.PerturbedLinear` / :func:`lowrank_dense`).

        ``grad`` is shaped like ``params``: the ES gradient of the smoothed loss (see the class
        docstring), ready for ``optax``.
        """
        pass_noise = self._check_call(state, params, fitness_fn, args, pass_noise, stats)
        self._stats = stats if stats is not None else FactoredStats()
        grad, info = self._compiled("estimate", fitness_fn, pass_noise, params)(*self._inputs(state, params, args))
        grad, info = self._to_local((grad, info))
        return grad, state._replace(generation=state.generation + 1), info
