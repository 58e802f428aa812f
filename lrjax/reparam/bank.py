"""Many LoRA adapters in one batch: an adapter bank with per-example adapter ids, at flat cost.

:class:`AdapterBank` holds ``K`` adapter *slots* at every targeted kernel. Each example of a batch
carries a slot id; the adapted product of example ``i`` (rows ``x_i``, the tokens of that example) is

.. math::  y_i = x_i W + s_{k_i}\\,(x_i A_{k_i}) B_{k_i}, \\qquad k_i = \\text{ids}[i]

-- the output of running example ``i`` alone with its own LoRA adapter ``k_i`` (Hu et al., 2021,
arXiv:2106.09685), for every example at once, in one compiled program. This is what PEFT's
mixed-adapter batch (``model(x, adapter_names=[...])``) computes; PEFT loops over the adapters in
Python inside every layer. Workflow::

    bank = AdapterBank(slots=16, rank=32, capacity=320)        # window r_max=32, 320 packed columns
    base, banked = bank.init(key, params)                      # empty slots (a zero term)
    banked = bank.load(banked, 3, lora_adapters, lrjax.LoRA(rank=8, alpha=16))
    y = lrjax.factored(model.apply, bank)(base, bank.route(banked, ids), x)   # ids: int[B]
    rp, ad = bank.select(banked, 3)                            # slot 3 as plain, mergeable LoRA

Storage (packed rank axis, no padding to the largest rank)
------------------------------------------------------------
Per targeted kernel with matrix view ``[M, N]`` (see :mod:`lrjax.axes`; a scanned ``[L, M, N]``
stack gets a leading ``L`` on everything):

* ``a: [M, C]``, ``b: [C, N]`` -- the packed columns of all slots (``C = capacity``); slot ``k`` owns
  columns ``offsets[k] ... offsets[k] + ranks[k] - 1`` of ``a`` and the same rows of ``b``;
* ``offsets, ranks, scales: [K]`` -- the slot table, as **data** (float32 arrays holding exact
  integers for offsets/ranks, so the whole dict is a floating pytree that ``jax.grad`` and
  checkpoints treat like any adapters). The table is frozen (``frozen_keys``): train only the
  trainable part, ``trainable, frozen = bank.split(banked)`` then ``optax.adamw(...)`` on
  ``trainable`` (or ``optax.masked`` with ``bank.trainable_mask(banked)``) -- an optimizer applied
  to the whole dict would move the table (weight decay does); ``ranks[k] = 0`` is an empty slot (the base model);
  ``scales[k]`` is the loaded adapter's own ``s`` (``alpha / r``, rsLoRA's ``alpha / sqrt(r)``...);
* ``ids: [B]`` -- the per-call slot id of each example, put in by :meth:`AdapterBank.route`
  (``[0]`` outside a call).

Storage is ``(M + N) C + 3K`` numbers per kernel: ``C = sum_k r_k`` suffices, so adapters of ranks
4..32 cost their own ranks, not ``K * 32``. Loading, unloading and swapping adapters of any rank
``<= rank`` write into these fixed-shape arrays (:meth:`~AdapterBank.load` finds a free range of
columns, compacting the others when the free space is fragmented), so a jitted step never
recompiles: its compile cache stays at one entry across swaps.

Compute (sorted tiles, gathered factors)
----------------------------------------
For ``n`` input rows (``B`` examples times their tokens) the branch adds the low-rank term with
**gathered** factors, without a per-adapter Python loop and without computing all ``K`` adapters
per row:

1. rows are sorted by slot id (a stable ``argsort``); each slot's rows are padded to a multiple of
   the tile size ``T`` (``tile``), giving at most ``n_t = min(n, (n + K (T-1)) // T)`` tiles of
   ``T`` rows, each tile belonging to one slot (a static upper bound: shapes never depend on ids);
2. each tile gathers its slot's window of ``r_max = rank`` columns of ``a`` (``[M, r_max]``) and
   rows of ``b`` (``[r_max, N]``) -- ``cols = offsets[k] + 0..r_max-1`` -- and runs two batched
   matmuls ``h = x_t A_t`` (``[T, r_max]``), ``y_t = (s_k h * mask_k) B_t`` where ``mask_k`` keeps the
   first ``ranks[k]`` columns (``jnp.where``, so columns owned by a neighbour slot contribute exactly
   zero and get zero gradient);
3. the tile outputs are gathered back to the rows' original order. Both row permutations are
   gathers in the forward *and* the backward (a custom VJP: the transpose of a permutation is its
   inverse), so XLA:CPU runs no row scatter-add; the factor windows' gradients are scatter-adds
   into the packed columns.

Exact (no approximation, no padding in storage). Cost per step: the base product ``x W`` plus
``2 (M + N) r_max P`` flops with ``P = n_t T <= n + K (T - 1)`` padded rows, and gathers of
``n_t (M + N) r_max`` factor entries -- the cost of *one* rank-``r_max`` adapter on the batch plus a
tile padding bounded by ``K (T - 1)`` rows, independent of how many distinct adapters the batch
uses. The tile shrinks to ``max(1, min(T, n // K))`` for small batches. Measured against one
adapter and against looping over the adapters in ``experiments/bench_multi_adapter.py``
(``docs/bench_multi_adapter.md``). Compute runs in ``promote_types(x, a, b, float32)``; the
interpreter adds the term to ``x W`` and rounds once to the product's dtype.

Example axis and ids out of range
---------------------------------
The example axis is the **leading axis of the layer input** (``x: [B, ..., M]``, e.g. ``[B, M]``
for an MLP, ``[B, T, M]`` for a transformer); a layer whose input has another leading size (a
model that flattens ``[B, T]`` to ``[B T]`` before a Dense) is refused at trace time with a
``ValueError`` naming ``ids``. :meth:`~AdapterBank.route` checks concrete ids eagerly (``ValueError``
naming ``ids``). Traced ids cannot raise inside ``jit``: an id outside ``[0, slots)`` gives that
example a **zero** low-rank term (the base model's output, no NaN), as does an empty slot.

Validation: ``load`` refuses a slot out of range (``slot``), an adapter of rank above ``rank``
(``adapters``) or that does not fit the free columns (``capacity``), adapters for another base
(``adapters``), a non-LoRA-form variant (``rp``: DoRA's column scale, activation-space variants,
PiSSA/LoRA-GA adapters whose base is their own residual). ``materialize``/``merge`` raise
:class:`lrjax.interpreter.NotMergeable` (each example has its own weight); use :meth:`select`.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax.reparam.base import Adapters, Reparam, _is_array, _is_concrete, _leaf_kind
from lrjax.reparam.lora import LoRA

__all__ = ["AdapterBank"]

_TABLE = ("offsets", "ranks", "scales")


@jax.custom_vjp
def _permute_rows(v, idx, inv):
    """``[v; 0][idx]``: rows of ``v`` (index ``len(v)`` = a zero row). ``idx`` must be injective on
    the real rows with ``inv`` its inverse (``[g; 0][inv]`` is then the exact transpose), so the
    backward pass is a gather too, not a scatter-add (slow on XLA:CPU)."""
    return jnp.concatenate([v, jnp.zeros((1,) + v.shape[1:], v.dtype)])[idx]


def _permute_fwd(v, idx, inv):
    return _permute_rows(v, idx, inv), (idx, inv)


def _permute_bwd(res, g):
    idx, inv = res
    zero = lambda i: np.zeros(i.shape, jax.dtypes.float0)  # noqa: E731 - integer inputs get float0 cotangents
    return jnp.concatenate([g, jnp.zeros((1,) + g.shape[1:], g.dtype)])[inv], zero(idx), zero(inv)


_permute_rows.defvjp(_permute_fwd, _permute_bwd)


@dataclasses.dataclass(frozen=True)
class AdapterBank(Reparam):
    """``slots`` LoRA adapters per targeted kernel, one chosen per example by an id (see the module
    docstring for storage and compute).

    Args:
      slots: ``K``, the number of adapter slots (int ``>= 1``).
      rank: ``r_max``, the compute window: the largest rank a slot may hold (int, ``1 <= rank <=
        min(M, N)`` of every targeted leaf, checked by ``init``).
      capacity: ``C``, packed rank columns per kernel (int ``>= rank``); default ``slots * rank``
        (room for every slot at full rank). Adapters of mixed ranks need only the sum of their ranks.
      tile: ``T``, rows per tile of the grouped product (int ``>= 1``, default 32).
      alpha: must be ``None``: each slot's scale is the loaded adapter's own (``scales``).
      targets, axes, dtype: as for :class:`lrjax.LoRA` (``dtype``: the packed factors' dtype).
    """

    rank: int = 32
    slots: int = 16
    capacity: int | None = None
    tile: int = 32

    activation_space = True
    factor_keys = ("a", "b", "offsets", "ranks", "scales", "ids")
    frozen_keys = ("offsets", "ranks", "scales", "ids")

    def __post_init__(self):
        super().__post_init__()
        V.check_int(self.slots, "slots", low=1)
        V.check_int(self.tile, "tile", low=1)
        V.check_int(self.capacity, "capacity", low=1, allow_none=True)
        if self.capacity is not None and self.capacity < self.rank:
            raise ValueError(f"capacity={self.capacity} is below rank={self.rank}: one adapter of the window "
                             "rank must fit; raise capacity (e.g. the sum of the ranks you load)")
        if self.alpha is not None:
            raise ValueError("alpha must be None for an AdapterBank: each slot keeps the scale of the adapter "
                             "loaded into it (pass the adapter's own config to load(..., rp))")

    @property
    def cap(self) -> int:
        """``C``, the packed columns per kernel."""
        return self.slots * self.rank if self.capacity is None else self.capacity

    @property
    def scale(self) -> float:
        """Not used (per-slot ``scales``); 1.0 for code that reads ``rp.scale``."""
        return 1.0

    # ------------------------------------------------------------------ protocol
    def init_leaf(self, key, w, path):
        """An empty bank: zero factors, every slot empty (``ranks = 0``), no ids."""
        *bs, m, n = w.shape
        dt = self.factor_dtype(w)
        z = jnp.zeros((*bs, self.slots), jnp.float32)
        return w, {"a": jnp.zeros((*bs, m, self.cap), dt), "b": jnp.zeros((*bs, self.cap, n), dt),
                   "offsets": z, "ranks": z, "scales": z, "ids": jnp.zeros((*bs, 0), jnp.float32)}

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        """``a: [*bshape, M, C]``, ``b: [*bshape, C, N]``, tables ``[*bshape, slots]``, ids ``[*bshape, B]``."""
        c = self.cap
        want = {"a": bshape + (m, c), "b": bshape + (c, n)}
        want.update({k: bshape + (self.slots,) for k in _TABLE})
        for k, shp in want.items():
            if tuple(f[k].shape) != shp:
                raise ValueError(f"{argname}[{path!r}][{k!r}] has shape {tuple(f[k].shape)}, expected {shp} "
                                 f"(matrix view {bshape + (m, n)}, slots={self.slots}, capacity={c}); a bank made "
                                 "for another base or with another config?")
        ids = f["ids"]
        if ids.ndim != len(bshape) + 1 or tuple(ids.shape[:-1]) != bshape:
            raise ValueError(f"{argname}[{path!r}]['ids'] has shape {tuple(ids.shape)}, expected {bshape + ('B',)}; "
                             "put ids in with bank.route(adapters, ids)")

    def check_leaf_rank(self, path, m, n):
        V.check_rank(self.rank, m, n, "rank", where=f"leaf {path!r}")

    # ----------------------------------------------------------------- the branch
    def branch(self, x, y, f, path):
        """``s_k (x_i A_k) B_k`` per example ``i`` with ``k = ids[i]`` (sorted tiles, gathered factors)."""
        ids = f["ids"]
        nb = ids.shape[-1]
        if ids.ndim != 1 or f["a"].ndim != 2:
            raise ValueError(f"AdapterBank at {path!r}: a batched kernel view {tuple(f['a'].shape)} is only "
                             "supported as an nn.scan stack (one layer's slice per step)")
        if nb == 0:
            raise ValueError(f"ids: AdapterBank at {path!r} has no adapter ids; call "
                             "lrjax.factored(fn, bank)(base, bank.route(adapters, ids), x)")
        if x.ndim < 2 or x.shape[0] != nb:
            raise ValueError(f"ids has {nb} entries but the layer input at {path!r} has shape {tuple(x.shape)}; "
                             "the example axis must be the leading axis of every adapted layer's input "
                             "(one id per example)")
        a, b = f["a"], f["b"]
        cd = V.compute_dtype(x.dtype, a.dtype, b.dtype)
        m, n_out = a.shape[0], b.shape[1]
        k, r, c = self.slots, self.rank, a.shape[1]
        lead = x.shape[:-1]
        n = int(np.prod(lead))
        per = n // nb
        xr = x.reshape(n, m).astype(cd)
        rid = jnp.repeat(ids.astype(jnp.int32), per)                 # [n] slot of each row
        valid = (rid >= 0) & (rid < k)
        gid = jnp.where(valid, rid, k)                               # k = the "no adapter" group
        t = max(1, min(self.tile, n // k))
        n_t = max(1, min(n, (n + k * (t - 1)) // t))
        p = n_t * t
        counts = jnp.zeros((k + 1,), jnp.int32).at[gid].add(1)
        tiles = (counts[:k] + t - 1) // t                           # tiles per slot
        tile_end = jnp.cumsum(tiles)
        pad_start = jnp.concatenate([(tile_end - tiles) * t, jnp.array([p], jnp.int32)])  # null group -> p
        row_start = jnp.cumsum(counts) - counts
        order = jnp.argsort(gid, stable=True)
        sg = gid[order]
        dest_sorted = jnp.where(sg < k, pad_start[sg] + jnp.arange(n) - row_start[sg], p)
        dest = jnp.zeros((n,), jnp.int32).at[order].set(dest_sorted.astype(jnp.int32))
        src = jnp.full((p,), n, jnp.int32).at[dest].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
        xp = _permute_rows(xr, src, dest).reshape(n_t, t, m)
        slot = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(n_t), side="right"), k - 1)  # [n_t]
        off = f["offsets"].astype(jnp.int32)[slot]
        cols = jnp.clip(off[:, None] + jnp.arange(r), 0, c - 1)      # [n_t, r]
        at = jnp.take(a.T, cols, axis=0).astype(cd)                  # [n_t, r, M] (contiguous rows)
        bt = jnp.take(b, cols, axis=0).astype(cd)                    # [n_t, r, N]
        h = jnp.einsum("tpm,trm->tpr", xp, at)
        keep = jnp.arange(r)[None, :] < f["ranks"].astype(jnp.int32)[slot][:, None]   # [n_t, r]
        h = jnp.where(keep[:, None, :], h * f["scales"].astype(cd)[slot][:, None, None], 0)
        yp = jnp.einsum("tpr,trn->tpn", h, bt).reshape(p, n_out)
        return _permute_rows(yp, dest, src).reshape(lead + (n_out,))

    # ------------------------------------------------------------------ routing
    def route(self, adapters: Adapters, ids) -> Adapters:
        """``adapters`` with ``ids`` (int ``[B]``, one slot per example) put into every leaf.

        Concrete ids outside ``[0, slots)`` raise ``ValueError`` naming ``ids``; traced ids are not
        checked (an out-of-range id gives its example a zero low-rank term, see the module docstring).
        Works inside ``jit`` (route traced ids per step; the bank's shapes stay fixed)."""
        self._check_adapters_dict(adapters, "adapters")
        ids = V.check_array(ids, "ids", ndim=1, kind="integer", convert=True)
        if ids.shape[0] == 0:
            raise ValueError("ids is empty; give one slot id per example of the batch")
        if _is_concrete(ids):
            lo, hi = int(np.min(np.asarray(ids))), int(np.max(np.asarray(ids)))
            if lo < 0 or hi >= self.slots:
                raise ValueError(f"ids must be slot indices in [0, {self.slots}), got values in [{lo}, {hi}]")
        out = {}
        for p, f in adapters.items():
            bs = tuple(f["a"].shape[:-2])
            out[p] = {**f, "ids": jnp.broadcast_to(ids.astype(jnp.float32), bs + ids.shape)}
        return out

    # ------------------------------------------------------------ load / unload
    def _bank(self, bank, argname="bank"):
        self._check_adapters_dict(bank, argname)
        if not bank:
            raise ValueError(f"{argname} is empty; make it with AdapterBank.init(key, params)")
        for p, f in bank.items():
            a = f["a"]
            if not _is_array(a) or a.ndim < 2:
                raise TypeError(f"{argname}[{p!r}]['a'] must be an array [..., M, C], got {_leaf_kind(a)}")
            bs, m, n = tuple(a.shape[:-2]), a.shape[-2], f["b"].shape[-1]
            self.check_factors(p, f, bs, m, n, argname)
            for k in _TABLE:
                if not _is_concrete(f[k]):
                    raise ValueError(f"{argname}[{p!r}][{k!r}] is traced; load/unload/select run eagerly on a "
                                     "concrete bank (outside jit)")
        return bank

    def _slot(self, slot):
        return V.check_int(slot, "slot", low=0, high=self.slots - 1)

    @staticmethod
    def _table(f):
        """``(offsets, ranks)`` as int NumPy arrays (the table is the same along batch axes)."""
        o = np.asarray(f["offsets"]).reshape(-1, f["offsets"].shape[-1])[0]
        r = np.asarray(f["ranks"]).reshape(-1, f["ranks"].shape[-1])[0]
        return o.astype(np.int64), r.astype(np.int64)

    def _place(self, f, slot, r, path):
        """``(f, offset)``: a free range of ``r`` columns for ``slot`` (first fit; compacts the
        other slots when the free space is fragmented)."""
        off, rk = self._table(f)
        rk = rk.copy()
        rk[slot] = 0
        c = f["a"].shape[-1]
        used = sorted((int(off[j]), int(off[j] + rk[j])) for j in range(self.slots) if rk[j] > 0)
        start = 0
        for lo, hi in used + [(c, c)]:
            if lo - start >= r:
                return f, start
            start = max(start, hi)
        if int(rk.sum()) + r > c:
            raise ValueError(f"capacity: leaf {path!r} has {c} packed columns, {int(rk.sum())} in use by other slots; "
                             f"an adapter of rank {r} does not fit. Unload a slot or make the bank with a larger "
                             "capacity")
        a, b = f["a"], f["b"]
        na, nb = jnp.zeros_like(a), jnp.zeros_like(b)
        new_off = np.asarray(f["offsets"]).copy()
        cur = 0
        for j in sorted(range(self.slots), key=lambda j: off[j]):
            if rk[j] > 0:
                lo, hi = int(off[j]), int(off[j] + rk[j])
                na = na.at[..., cur:cur + hi - lo].set(a[..., lo:hi])
                nb = nb.at[..., cur:cur + hi - lo, :].set(b[..., lo:hi, :])
                new_off[..., j] = cur
                cur += hi - lo
        return {**f, "a": na, "b": nb, "offsets": jnp.asarray(new_off, jnp.float32)}, cur

    def load(self, bank: Adapters, slot: int, adapters: Adapters, rp: Reparam) -> Adapters:
        """Put one adapter (``adapters`` made by ``rp``, e.g. ``lrjax.LoRA(rank=8, alpha=16)``) into
        ``slot``; returns the new bank (an array update: a jitted step does not recompile).

        ``rp`` may be any weight-space variant whose form is ``W + s A B`` without a column scale
        (LoRA, rsLoRA, NOLA, LoRA-SB/XS, Block-LoRA, CoDyRA...): its ``(A, B, s)`` are stored. Leaves
        of the bank that ``adapters`` does not cover get an empty slot (zero term). Raises
        ``ValueError`` naming ``slot`` (out of range), ``adapters`` (another base, rank above the
        window ``rank``, NaN/Inf), ``capacity`` (no room), ``rp`` (DoRA, PiSSA, activation-space)."""
        self._bank(bank)
        slot = self._slot(slot)
        if not isinstance(rp, Reparam):
            raise TypeError(f"rp must be the config the adapters were made with (e.g. lrjax.LoRA(rank=8)), "
                            f"got {_leaf_kind(rp)}")
        if rp.activation_space:
            raise ValueError(f"rp: {type(rp).__name__} is an activation-space adapter (no A, B form); only "
                             "weight-space LoRA-form adapters can be loaded into a bank")
        if rp.rewrites_base:
            raise ValueError(f"rp: {type(rp).__name__} adapters are relative to their own rewritten base, not to "
                             "the bank's base; merge them and bank others on that base")
        if not rp.axes_view:
            raise ValueError(f"rp: {type(rp).__name__} uses its own matrix view; the bank needs the lrjax.axes view")
        rp._check_adapters_dict(adapters, "adapters")
        if not adapters:
            raise ValueError("adapters is empty; pass the adapters of one adapter (rp.init(...)[1])")
        for p in adapters:
            if p not in bank:
                raise ValueError(f"adapters: {p!r} is not a kernel of this bank (bank kernels: {list(bank)[:6]}); "
                                 "adapters made for another base or other targets?")
        out = {}
        for p, f in bank.items():
            bs, m, n = tuple(f["a"].shape[:-2]), f["a"].shape[-2], f["b"].shape[-1]
            f = self._clear(f, slot)
            if p not in adapters:
                out[p] = f
                continue
            src = adapters[p]
            for nm, v in src.items():
                if not _is_array(v):
                    raise TypeError(f"adapters[{p!r}][{nm!r}] must be an array, got {_leaf_kind(v)}")
            rp.check_factors(p, src, bs, m, n, "adapters")
            w0 = jnp.zeros(bs + (m, n), f["a"].dtype)
            form = rp.factors(w0, rp.frozen_view(src))
            if form.col_scale is not None:
                raise ValueError(f"rp: {type(rp).__name__} has a per-column scale (DoRA): its delta is not s A B, "
                                 "so it cannot be banked; load LoRA-form adapters")
            r = int(form.a.shape[-1])
            if r > self.rank:
                raise ValueError(f"adapters[{p!r}] has rank {r}, above this bank's window rank={self.rank}; make the "
                                 f"bank with rank>={r}")
            s = float(np.asarray(form.scale))
            for nm, v in (("a", form.a), ("b", form.b)):
                if not bool(jnp.all(jnp.isfinite(v))):
                    raise ValueError(f"adapters[{p!r}] factor {nm!r} contains NaN or Inf")
            f, o = self._place(f, slot, r, p)
            dt = f["a"].dtype
            f = {**f, "a": f["a"].at[..., o:o + r].set(form.a.astype(dt)),
                 "b": f["b"].at[..., o:o + r, :].set(form.b.astype(dt)),
                 "offsets": f["offsets"].at[..., slot].set(o), "ranks": f["ranks"].at[..., slot].set(r),
                 "scales": f["scales"].at[..., slot].set(s)}
            out[p] = f
        return out

    def _clear(self, f, slot):
        off, rk = self._table(f)
        lo, hi = int(off[slot]), int(off[slot] + rk[slot])
        return {**f, "a": f["a"].at[..., lo:hi].set(0), "b": f["b"].at[..., lo:hi, :].set(0),
                "offsets": f["offsets"].at[..., slot].set(0), "ranks": f["ranks"].at[..., slot].set(0),
                "scales": f["scales"].at[..., slot].set(0)}

    def unload(self, bank: Adapters, slot: int) -> Adapters:
        """Empty ``slot`` (its columns zeroed, rank 0: examples routed to it get the base model)."""
        self._bank(bank)
        slot = self._slot(slot)
        return {p: self._clear(f, slot) for p, f in bank.items()}

    def loaded(self, bank: Adapters) -> dict:
        """``{slot: {path: rank}}`` of the non-empty slots."""
        self._bank(bank)
        out: dict = {}
        for p, f in bank.items():
            _, rk = self._table(f)
            for j in np.nonzero(rk)[0]:
                out.setdefault(int(j), {})[p] = int(rk[j])
        return out

    def select(self, bank: Adapters, slot: int) -> tuple[LoRA, Adapters]:
        """``(rp, adapters)``: ``slot`` as plain LoRA adapters (``A: [M, r]``, ``B: [r, N]``) with a
        ``lrjax.LoRA(rank=r, alpha=s r, targets=<those kernels>)`` config, mergeable with
        ``rp.merge(base, adapters)``. Refuses an empty slot, and one whose kernels have different
        ranks or scales (one LoRA config cannot express them)."""
        self._bank(bank)
        slot = self._slot(slot)
        ad, rs, ss = {}, set(), set()
        for p, f in bank.items():
            off, rk = self._table(f)
            r = int(rk[slot])
            if r == 0:
                continue
            o = int(off[slot])
            ad[p] = {"a": f["a"][..., o:o + r], "b": f["b"][..., o:o + r, :]}
            rs.add(r)
            ss.add(float(np.asarray(f["scales"]).reshape(-1, self.slots)[0, slot]))
        if not ad:
            raise ValueError(f"slot: slot {slot} is empty; load an adapter into it first")
        if len(rs) > 1 or len(ss) > 1:
            raise ValueError(f"slot: slot {slot} has ranks {sorted(rs)} / scales {sorted(ss)} across its kernels; "
                             "one LoRA config cannot express that (read the factors from the bank directly)")
        r, s = rs.pop(), ss.pop()
        if not s > 0:
            raise ValueError(f"slot: slot {slot} has scale {s}; a LoRA config needs alpha = s r > 0")
        rp = LoRA(rank=r, alpha=s * r, targets=tuple(re.escape(p) for p in ad), axes=self._axes_spec(),
                  dtype=self.dtype)
        return rp, ad
