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
and only fitness scalars cross devices. ``store_noise=True`` (single program, no mesh) trades
that for speed: it keeps the forwards' flat draws (``N/2 x (r (m + n) per matrix + biases)``
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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax.es import noise as noise_lib
from lrjax.es.noise import FROZEN, FULL, LOWRANK, LeafPlan, LowRankNoise
from lrjax.es.perturbed import FactoredStats, perturbed_call
from lrjax.es.shaping import SHAPINGS, shape_fitness

__all__ = ["Eggroll", "EggrollState", "EstimateInfo", "default_member_chunk"]


class EggrollState(NamedTuple):
    """Seed and generation counter; everything else is regenerated."""

    key: jax.Array
    generation: jax.Array


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


def default_member_chunk(population_size: int, antithetic: bool = True) -> int:
    """Default evaluation chunk: the largest divisor of ``N`` (even with ``antithetic``) that is at
    most ``min(256, N // 8)`` (at least one pair). A function of ``N`` only, so layouts agree."""
    step = 2 if antithetic else 1
    cap = max(step, min(MAX_DEFAULT_MEMBER_CHUNK, population_size // 8))
    return step * _largest_divisor_at_most(population_size // step, cap // step)


class Eggroll:
    """Low-rank evolution strategies (EGGROLL) for any parameter pytree.

    Args:
      population_size: members ``N`` per generation. Even with ``antithetic`` (default). Any
        device count works (devices take whole chunks of ``member_chunk`` members).
      rank: rank ``r >= 1`` of each matrix perturbation (default 1, the official default);
        ``None`` gives full-rank Gaussian noise for every leaf (OpenAI-ES, same estimator).
      sigma: perturbation scale (default ``1e-3``, the official default; small models trained from
        scratch usually want ``1e-2`` to ``1e-1``).
      shaping: ``'z_score'`` (default, as HyperscaleES), ``'centered_rank'`` or ``'none'``; see
        :mod:`lrjax.es.shaping`, which also states the rule for non-finite fitness.
      maximize: ``True`` (default) if larger fitness is better. The returned gradient is always
        the gradient of the smoothed *loss* (``-fitness`` when maximizing), so it goes straight
        into ``optax`` ``update`` as ``jax.grad`` of a loss would.
      antithetic: mirrored pairs ``theta +- sigma E_j`` (default ``True``).
      targets: leaves that get low-rank noise (an :mod:`lrjax.tree` pattern); default every
        floating leaf with ``ndim >= 2``. Other floating leaves get full-rank noise.
      frozen: leaves that are never perturbed (zero gradient); non-floating leaves always are.
      axes: matrix-view spec of :mod:`lrjax.axes` (``[L, m, n]`` stacks are batches of matrices).
      noise_reuse: noise changes every ``noise_reuse`` generations (default 1).
      noise: ``'normal'`` (default; the paper's Gaussian ``A``, ``B`` and ``eps``) or
        ``'rademacher'`` (+-1 entries from packed random bits: same mean and variance, 32 entries
        per generator call; on CPUs the Gaussian generator, not the matmuls, dominates a
        generation, see ``experiments/bench_es.py``).
      mesh, axis_name: split the population over ``mesh.shape[axis_name]`` devices with
        ``jax.shard_map`` (default axis: the mesh's first). Works across processes after
        ``jax.distributed.initialize``.
      member_chunk: members evaluated together by one ``vmap`` (a global chunk of consecutive
        member ids, see "Sharding" above); a device runs its chunks with a sequential
        ``lax.map``. An even divisor of ``N`` (with ``antithetic``). Default
        ``default_member_chunk(N)``: the largest even divisor of ``N`` that is at most
        ``min(256, N // 8)``, so there are at least 8 chunks (8 devices all busy) and at most 256
        members per ``vmap``. It depends on ``N`` only, never on the device count, which keeps the
        update bit-identical across layouts; any value you fix does too. Larger chunks raise
        throughput on accelerators (fewer sequential steps) at the cost of memory and of idle
        devices when there are fewer chunks than devices.
      update_chunk: noise indices summed together per step of the update (default 128).
      store_noise: keep each noise index's flat draw from the member forwards and reuse it in the
        update instead of drawing it a second time (on CPUs the Gaussian generator is most of a
        generation's overhead over inference). Costs ``N/2 x noise_size`` floats (``N x`` with
        ``antithetic=False``) for the population. Default ``False``: the update regenerates the
        noise, nothing population-sized is stored. Not available with ``mesh`` (each device draws
        only its chunks' noise). Same values either way: the draws are the same pure functions of (seed, generation, index).

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
                 update_chunk: int = 128, store_noise: bool = False):
        if isinstance(population_size, bool) or not isinstance(population_size, (int, np.integer)) \
                or population_size <= 0:
            raise ValueError(f"population_size must be a positive int, got {population_size!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0):
            raise ValueError(f"rank must be a positive int (or None for full-rank noise), got {rank!r}")
        if not isinstance(sigma, (int, float, np.floating)) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a positive finite float, got {sigma!r}")
        if shaping not in SHAPINGS:
            raise ValueError(f"shaping must be one of {sorted(SHAPINGS)}, got {shaping!r}")
        if not isinstance(noise_reuse, (int, np.integer)) or noise_reuse < 1:
            raise ValueError(f"noise_reuse must be an int >= 1, got {noise_reuse!r}")
        if noise not in noise_lib.DISTRIBUTIONS:
            raise ValueError(f"noise must be one of {noise_lib.DISTRIBUTIONS}, got {noise!r}")
        if not isinstance(update_chunk, (int, np.integer)) or update_chunk < 1:
            raise ValueError(f"update_chunk must be an int >= 1, got {update_chunk!r}")
        if not isinstance(store_noise, (bool, np.bool_)):
            raise ValueError(f"store_noise must be True or False, got {store_noise!r}")
        if store_noise and mesh is not None:
            raise ValueError("store_noise=True needs mesh=None (with a mesh the update regenerates the noise)")
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
            raise ValueError(f"population_size={population_size} must be even with antithetic=True")
        if member_chunk is None:
            member_chunk = default_member_chunk(int(population_size), bool(antithetic))
        elif isinstance(member_chunk, bool) or not isinstance(member_chunk, (int, np.integer)) \
                or member_chunk < 1 or population_size % member_chunk or (antithetic and member_chunk % 2):
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
        key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape != (2,) or key.dtype != jnp.uint32:
                raise TypeError(f"key must be a jax.random.key (or a uint32[2] PRNGKey), got {key.dtype}{key.shape}")
            key = jax.random.wrap_key_data(key)
        return EggrollState(key, jnp.zeros((), jnp.int32))

    def plan(self, params) -> list[LeafPlan]:
        """How each leaf is perturbed (``'lowrank'``, ``'full'`` or ``'frozen'``), in flatten order."""
        flat = tree_lib.flatten(params)
        if not flat:
            raise ValueError("params: the pytree has no leaves")
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
            if not hasattr(v, "shape"):
                raise TypeError(f"params: leaf {p!r} is a {type(v).__name__}, not an array")
            if p in frozen or not isfloat[p]:
                kind, ax = FROZEN, None
            elif p in low:
                kind, ax = LOWRANK, axes_lib.resolve(p, v.shape, self.axes)
            else:
                kind, ax = FULL, None
            plans.append(LeafPlan(p, kind, tuple(v.shape), v.dtype, ax))
        return plans

    # ------------------------------------------------------------------ noise
    def _draw(self, plans, key, generation, j):
        return noise_lib.draw(plans, key, generation, j, self.rank, self.noise_reuse, self.noise)

    def _draw_flat(self, plans, key, generation, j):
        return noise_lib.draw_flat(plans, key, generation, j, self.rank, self.noise_reuse, self.noise)

    def _stores_noise(self, plans) -> bool:
        """Whether this program keeps the forwards' draws for the update (see ``store_noise``)."""
        if self.mesh is not None or not any(pl.kind != FROZEN for pl in plans):
            return False
        return bool(self.store_noise)

    def _member_noise_flat(self, plans, key, generation, member):
        sign, j = noise_lib.sign_and_index(member, self.antithetic)
        return self._scaled(plans, self._draw(plans, key, generation, j), sign)

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

    def member_noise(self, state: EggrollState, params, member) -> dict:
        """``{path: LowRankNoise | array}`` of member ``member`` (global id) this generation;
        frozen leaves are absent. Feed it to :func:`lrjax.es.perturbed_call`."""
        plans = self.plan(params)
        flat = self._member_noise_flat(plans, state.key, state.generation, member)
        return {pl.path: n for pl, n in zip(plans, flat) if n is not None}

    def member_params(self, state: EggrollState, params, member):
        """Materialized ``theta + sigma E_member`` (O(mn) per matrix: for checks and small models)."""
        plans = self.plan(params)
        nz = self.member_noise(state, params, member)
        new = {}
        flat = tree_lib.flatten(params)
        for pl in plans:
            if pl.path not in nz:
                continue
            v, n = flat[pl.path], nz[pl.path]
            if pl.kind == LOWRANK:
                d = axes_lib.from_matrix(n.dense(), pl.ax, pl.shape)
            else:
                d = n
            new[pl.path] = (v.astype(d.dtype) + d).astype(v.dtype)
        return tree_lib.replace(params, new)

    # ------------------------------------------------------------------ fitness
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
                out = jax.eval_shape(
                    lambda p, k, g, a: fitness_fn(p, jax.tree_util.tree_unflatten(
                        tree, self._member_noise_flat(plans, k, g, 0)), *a),
                    params, jax.random.key(0), jnp.zeros((), jnp.int32), args)
            else:
                out = jax.eval_shape(lambda p, a: fitness_fn(p, *a), params, args)
        except (TypeError, ValueError, IndexError) as e:
            shapes = {k: tuple(getattr(v, "shape", ())) for k, v in list(tree_lib.flatten(params).items())[:8]}
            raise TypeError(f"fitness_fn cannot take these params/args (param shapes {shapes}): "
                            f"{type(e).__name__}: {e}") from e
        if not hasattr(out, "shape") or out.shape not in ((), (1,)):
            raise ValueError(f"fitness_fn must return one scalar per member, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
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

    def _local_fitness(self, plans, fitness_fn, pass_noise, params, key, generation, ids, args,
                       keep_noise=False):
        """Fitness of members ``ids`` (global ids; pairs contiguous and starting even). Each noise
        index is drawn once: both members of an antithetic pair share it. With ``keep_noise``
        also returns the flat draws ``[noise indices, noise_size]`` in index order."""
        member = functools.partial(self._member_fitness, plans, fitness_fn, pass_noise, params)
        signs = jnp.array([1.0, -1.0], jnp.float32)
        rank = self.rank

        def chunk(m):
            js = m[0::2] // 2 if self.antithetic else m
            z = jax.vmap(lambda j: self._draw_flat(plans, key, generation, j))(js)
            units = noise_lib.split(plans, z, rank)
            if self.antithetic:
                both = jax.vmap(lambda u, s: member(u, s, args), in_axes=(None, 0))
                f = jax.vmap(lambda u: both(u, signs))(units).reshape(-1)  # [+, -, +, -, ...]
            else:
                f = jax.vmap(lambda u: member(u, jnp.float32(1.0), args))(units)
            return (f, z) if keep_noise else f

        c = self.member_chunk
        if ids.shape[0] == c:
            return chunk(ids)
        out = lax.map(chunk, ids.reshape(-1, c))
        if keep_noise:
            return out[0].reshape(-1), out[1].reshape(-1, out[1].shape[-1])
        return out.reshape(-1)

    def _device_ids(self, device):
        """Global member ids of ``device``'s whole chunks; ids ``>= N`` are dummies (discarded)."""
        n = self.chunks_per_device * self.member_chunk
        return device * n + jnp.arange(n, dtype=jnp.int32)

    # ------------------------------------------------------------------ update
    def _update(self, plans, params, key, generation, fitness, noise=None):
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
                jj = jax.vmap(lambda j: self._draw_flat(plans, key, generation, j))(jj)
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
        impl = jax.random.key_impl(jax.random.key(0))

        def run(params, kd, generation, args):
            key = jax.random.wrap_key_data(kd, impl=impl)
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

            def body(params, kd, generation, args):
                key = jax.random.wrap_key_data(kd, impl=impl)
                ids = self._device_ids(lax.axis_index(self.axis_name))
                f = self._local_fitness(plans, fitness_fn, pass_noise, params, key, generation, ids, args)
                f = lax.all_gather(f, self.axis_name, tiled=True)  # only N scalars cross devices
                f = f[:self.population_size]  # drop the dummy chunks' members
                return f if kind == "fitness" else self._update(plans, params, key, generation, f)

            out_specs = P() if kind == "fitness" else (P(), P())
            return jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(), P(), P()),
                                 out_specs=out_specs, check_vma=False)(params, kd, generation, args)

        def tell(params, kd, generation, fitness):
            key = jax.random.wrap_key_data(kd, impl=impl)
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
        if not isinstance(state, EggrollState):
            raise TypeError(f"state must be an EggrollState from Eggroll.init, got {type(state).__name__}")
        kd = jax.random.key_data(state.key)
        gen = jnp.asarray(state.generation, jnp.int32)
        return self._to_global((params, kd, gen, args))

    def lower(self, state: EggrollState, params, fitness_fn: Callable[..., Any], *args,
              pass_noise: bool = False):
        """The ``jax.stages.Lowered`` generation program of :meth:`estimate` (for
        ``.compile().memory_analysis()`` / ``cost_analysis()``)."""
        self._check_fitness_fn(params, fitness_fn, args, pass_noise)
        self._stats = FactoredStats()
        return self._compiled("estimate", fitness_fn, pass_noise, params).lower(*self._inputs(state, params, args))

    def fitness(self, state: EggrollState, params, fitness_fn: Callable[..., Any], *args,
                pass_noise: bool = False, stats: FactoredStats | None = None):
        """Raw fitness ``[N]`` of this generation's members (global order), each member evaluated
        with :func:`perturbed_call` (or ``fitness_fn(params, noise, *args)`` with ``pass_noise``)."""
        self._check_fitness_fn(params, fitness_fn, args, pass_noise)
        self._stats = stats if stats is not None else FactoredStats()
        out = self._compiled("fitness", fitness_fn, pass_noise, params)(*self._inputs(state, params, args))
        return self._to_local(out)

    def tell(self, state: EggrollState, params, fitness):
        """``(grad, next_state, info)`` from raw fitness ``[N]`` in global member order."""
        fitness = jnp.asarray(fitness)
        if fitness.shape != (self.population_size,):
            raise ValueError(f"fitness must have shape ({self.population_size},), got {fitness.shape}")
        p, kd, gen, _ = self._inputs(state, params, ())
        grad, info = self._compiled("tell", None, False, params)(p, kd, gen, fitness)
        return grad, EggrollState(state.key, state.generation + 1), info

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
        self._check_fitness_fn(params, fitness_fn, args, pass_noise)
        self._stats = stats if stats is not None else FactoredStats()
        grad, info = self._compiled("estimate", fitness_fn, pass_noise, params)(*self._inputs(state, params, args))
        grad, info = self._to_local((grad, info))
        return grad, EggrollState(state.key, state.generation + 1), info
