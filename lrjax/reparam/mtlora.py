"""MTLoRA: task-agnostic (shared) plus task-specific low-rank adapters, and per-task streams.

MTLoRA (Agiza, Neseem & Reda, *MTLoRA: A Low-Rank Adaptation Approach for Efficient Multi-Task
Learning*, CVPR 2024, arXiv:2403.20320; official code ``scale-lab/MTLoRA @333a3750568f``,
``models/lora.py::MTLoRALinear``, ``models/swin_transformer_mtlora.py``, ``configs/mtlora/``).
A multi-task model keeps one frozen backbone. Every adapted layer gets a *task-agnostic* (TA,
shared) LoRA pair; the layers of the last block (of each stage, in the official Swin) also get one
*task-specific* (TS) pair per task, and from there on the model carries ``T`` feature *streams*,
one per task, into per-task heads.

Math (matrix view of :mod:`lrjax.axes`, ``x: [..., M]``, ``W: [M, N]``, lrjax's row-vector
orientation of the paper's ``W x``)::

    shared stream      y_sh = x W + s_sh (x A) B                      (both modes)
    task stream t      y_t  = x_t W + s_t (x_t A_t) B_t               shared_mode="matrix" (default)
                       y_t  = x_t W + s_sh (x_t A) B + s_t (x_t A_t) B_t  shared_mode="matrixv2"

so each stream is an ordinary layer with a *mergeable* weight: ``W_sh = W + s_sh A B`` and
``W_t = W + s_t A_t B_t`` (``matrix``) or ``W + s_sh A B + s_t A_t B_t`` (``matrixv2``).
Factors: ``a: [*batch, M, r]``, ``b: [*batch, r, N]`` (the TA pair, ``r = rank``, official
``r_shared``) at every targeted leaf; ``ta: [T, *batch, M, r_t]``, ``tb: [T, *batch, r_t, N]``
(the TS pairs, a LEADING TASK AXIS ``T = num_tasks``, ``r_t = task_rank``) at the leaves selected by
``task_targets``. Every task is computed at once by ``jax.vmap`` over that axis (no Python loop).

Scales are constants, as in the official code (``lora_shared_scale``/``lora_task_scale``; not
``alpha / r``): ``shared_scale`` and ``task_scale`` (one number or one per task) default to
4.0, the paper's configs (``SHARED_SCALE = SCALE_PER_TASK = 4.0`` in
``configs/mtlora/tiny_448/mtlora_tiny_448_r64_scale4_pertask.yaml``; those configs use
``r_shared = 64``, ``r_t = 4``; lrjax keeps its usual ``rank=8`` default and ``task_rank=4``).
Init as the official ``reset_parameters``: every ``A`` (shared and per task) is torch's
``kaiming_uniform_(a=sqrt(5))`` on ``[r, in]``, i.e. ``U(-1/sqrt(M), 1/sqrt(M))``; every ``B = 0``, so
every stream starts as the base model. The shared ``a`` of a leaf equals :class:`lrjax.LoRA`'s
``a`` for the same key; task ``t``'s ``ta[t]`` comes from ``split(fold_in(leaf_key, 1), T)[t]``.

The official layer and lrjax's streams
--------------------------------------
The official ``MTLoRALinear.forward(x, x_tasks)`` computes the *frozen* term once, on the shared
input, and the TS term on the task input: ``y_t = x W + bias + s_t (x_t A_t) B_t`` (plus
``s_sh (x A) B`` for ``matrixv2``). Where the task input is the shared input (``x_tasks=None``: the
first TS layer of a block, e.g. the attention ``proj`` whose ``qkv`` is shared-only) this is exactly
``x W_t``, so a per-task merge reproduces it. Deeper in the same block (``fc1``/``fc2`` of the Swin
MLP) the official task stream applies ``W`` to the *shared* stream's input, which no per-task
weight reproduces. :meth:`MTLoRA.linear` is that official layer, exactly (both inputs); lrjax's
per-task streams (:meth:`~MTLoRA.materialize_tasks`) instead run ``W_t`` on the stream's own input,
so every stream is a plain network that can be merged and served per task. Both are tested against a
float64 NumPy transcription.

Not offered: ``shared_mode="addition"`` (``y_sh = x W + LN(sum_t y_t)``, a learned LayerNorm over
the task outputs: an activation-space term, not a weight; write it in the model from the task
streams if needed), LoRA dropout (0.05 in the paper configs; lrjax's weight-space adapters have no
dropout), trainable scales (``TRAINABLE_SCALE_*``, off in the paper configs) and per-task ranks (one
stacked ``ta``/``tb`` needs one ``r_t``; a smaller rank for a task is exact by zero-padding both its
``ta`` columns and ``tb`` rows: their gradients are then zero, so they stay zero).

Reference model (per-task streams)::

    rp = MTLoRA(rank=8, task_rank=4, num_tasks=3, targets=["fc1/kernel", "fc2/kernel"],
                task_targets="fc2/kernel")
    base, ad = rp.init(key, params)

    # heads: {"kernel": [T, 256, C], "bias": [T, C]}, one classifier per task (trained with ad)
    def forward(ad, x):                       # -> logits [T, B, C]
        p = rp.materialize_tasks(base, ad)   # fc2/kernel: [T, 256, 256]; fc1: shared weight
        h = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])  # backbone, shared adapter
        def last_block(k2, b2):                                      # one task stream
            return jax.nn.gelu(h @ k2 + b2)
        hs = jax.vmap(last_block, in_axes=(0, None))(p["fc2"]["kernel"], p["fc2"]["bias"])
        return jnp.einsum("tbh,thc->tbc", hs, heads["kernel"]) + heads["bias"][:, None]

Cost: the merged streams run a TS layer's dense ``x W_t`` once per task. Where the streams' input
is still shared (the first TS layer of a block, as ``fc2`` above), :meth:`MTLoRA.linear` computes
the same outputs as ``x W`` once plus ``T`` rank-``r_t`` terms, which is much cheaper to train
(``experiments/mtlora_digits.py`` trains that way; ``docs/mtlora.md`` has the numbers).

``rp.task_axes(base, ad)`` gives the ``in_axes`` pytree (``0`` at the TS leaves, ``None`` elsewhere)
for vmapping a whole block's params; ``rp.merge_task(base, ad, t)`` gives task ``t``'s dense
weights for serving; ``rp.materialize``/``rp.merge``/``lrjax.factored`` give the shared stream.
``experiments/mtlora_digits.py`` trains this model.

Precision: every effective weight (shared or per task) is computed in
``promote_types(w, a, b, ta, tb, float32)`` and rounded once to the base leaf's dtype (see
:mod:`lrjax.reparam.base`); :meth:`MTLoRA.linear` rounds once to ``promote_types(x, w)``.

Raises: ``TypeError``/``ValueError`` naming the argument (``num_tasks``, ``task_rank``,
``task_targets``, ``task_scale``, ``shared_scale``, ``shared_mode``, ``alpha``, ``adapters``,
``task``, ``x``, ``x_tasks``, ``bias``, ``w``): a task axis that differs between ``ta`` and ``tb``
or from ``num_tasks``, TS ranks other than ``task_rank``, ``ta`` without ``tb``, a task index out of
range, NaN/Inf in :meth:`~MTLoRA.merge_task` (plus every check of the protocol).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax import tree as tree_lib
from lrjax._validation import check_params
from lrjax.reparam.base import LowRankForm, Reparam, _is_array, _leaf_kind

__all__ = ["MTLoRA"]

_MODES = ("matrix", "matrixv2")
_TASK_KEYS = ("ta", "tb")


@dataclasses.dataclass(frozen=True)
class MTLoRA(Reparam):
    """MTLoRA: shared (TA) LoRA at every target, plus ``num_tasks`` task-specific (TS) pairs with a
    leading task axis at ``task_targets`` (module doc for the math and the official-code notes).

    Args:
      rank: ``r_shared``, the rank of the shared pair ``a: [*batch, M, r]``, ``b: [*batch, r, N]``
        (an int ``>= 1`` and ``<= min(M, N)`` of every target; official configs use 64).
      num_tasks: ``T``, an int ``>= 1`` (required).
      task_rank: ``r_t``, the rank of every TS pair ``ta: [T, *batch, M, r_t]``,
        ``tb: [T, *batch, r_t, N]`` (default 4, the official configs; ``<= min(M, N)``).
      task_targets: which targeted leaves also get TS pairs (a regex / list / callable as
        ``targets``; default ``None`` = every targeted leaf). Must select at least one targeted
        leaf, and only targeted leaves.
      shared_scale: ``s_sh``, a finite real ``> 0`` (default 4.0, the paper configs).
      task_scale: ``s_t``: one finite real ``> 0`` for every task, or a sequence of ``num_tasks`` of
        them (default 4.0).
      shared_mode: ``"matrix"`` (default; task streams have no shared term) or ``"matrixv2"`` (task
        streams also add ``s_sh A B``). ``"addition"`` is not offered (module doc).
      alpha: must stay ``None`` (the scales are the constants above).
      targets, axes, dtype: as for :class:`lrjax.LoRA`.
    """

    num_tasks: Any = None
    task_rank: int = 4
    task_targets: Any = None
    shared_scale: float = 4.0
    task_scale: Any = 4.0
    shared_mode: str = "matrix"

    #: ``a``, ``b`` at every targeted leaf; ``ta``, ``tb`` (leading task axis) only at TS leaves
    factor_keys = ("a", "b", "ta", "tb")
    optional_groups = (("ta", "tb"),)  # the task pair exists only at task-specific leaves

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is not None:
            raise ValueError(f"alpha: MTLoRA's scales are constants (shared_scale, task_scale), not alpha / rank; "
                             f"leave alpha=None and set shared_scale={self.alpha} instead")
        V.check_int(self.num_tasks, "num_tasks", low=1)
        V.check_int(self.task_rank, "task_rank", low=1)
        V.check_float(self.shared_scale, "shared_scale", low=0.0, low_open=True)
        ts = self.task_scale
        if isinstance(ts, (list, tuple, np.ndarray)) and not isinstance(ts, str):
            ts = tuple(ts)
            if len(ts) != self.num_tasks:
                raise ValueError(f"task_scale has {len(ts)} entries but num_tasks={self.num_tasks}; give one "
                                 "scale per task or a single number")
            ts = tuple(V.check_float(s, f"task_scale[{i}]", low=0.0, low_open=True) for i, s in enumerate(ts))
        else:
            if not isinstance(ts, numbers.Real) or isinstance(ts, bool):
                raise TypeError(f"task_scale must be a real number > 0 or a sequence of num_tasks of them, got "
                                f"{_leaf_kind(ts)}")
            V.check_float(ts, "task_scale", low=0.0, low_open=True)
        object.__setattr__(self, "task_scale", ts)
        if isinstance(self.shared_mode, str) and self.shared_mode in ("addition", "add"):
            raise ValueError("shared_mode='addition' (shared output = LayerNorm of the sum of the task outputs) is an "
                             "activation-space term, not a weight, so lrjax's MTLoRA does not offer it; use "
                             "'matrix' or 'matrixv2'")
        V.check_choice(self.shared_mode, "shared_mode", _MODES)
        if self.task_targets is not None:
            if isinstance(self.task_targets, list):
                object.__setattr__(self, "task_targets", tuple(self.task_targets))
            try:
                tree_lib._matcher(self.task_targets)
                if isinstance(self.task_targets, tuple):
                    for t in self.task_targets:
                        tree_lib._matcher(t)
            except (TypeError, ValueError) as e:
                raise type(e)(f"task_targets: {e}") from None

    # ------------------------------------------------------------------ config
    @property
    def scale(self) -> float:
        """``s_sh = shared_scale`` (a constant, as in the official code)."""
        return float(self.shared_scale)

    @property
    def task_scales(self) -> tuple:
        """``(s_0, ..., s_{T-1})``, one constant per task."""
        ts = self.task_scale
        return tuple(float(s) for s in ts) if isinstance(ts, tuple) else (float(ts),) * self.num_tasks

    def task_paths(self, params) -> list:
        """The targeted leaf paths that get task-specific pairs (``task_targets`` within ``targets``).

        Raises ``ValueError`` naming ``task_targets`` when it selects a leaf ``targets`` does not, or
        no leaf at all."""
        paths = self._targets(params)
        if self.task_targets is None:
            return paths
        flat = tree_lib.flatten(params)
        match = tree_lib._matcher(self.task_targets)
        chosen = [p for p, x in flat.items() if hasattr(x, "ndim") and match(p, x)]
        extra = [p for p in chosen if p not in paths]
        if extra:
            raise ValueError(f"task_targets selects {extra[:4]}, which `targets` does not adapt; task-specific pairs "
                             f"sit on top of the shared adapter, so task_targets must be a subset of targets "
                             f"(targeted: {paths[:6]})")
        if not chosen:
            raise ValueError(f"task_targets {self.task_targets!r} selects none of the targeted leaves {paths[:6]}; "
                             "name at least one (e.g. the last block's kernels)")
        return chosen

    # ---------------------------------------------------------------- init
    def init(self, key, params, *, grads=None):
        """``(params, adapters)``: the shared pair at every target (LoRA's init), plus ``ta``/``tb``
        with a leading task axis at every :meth:`task_paths` leaf (``A`` kaiming-uniform(sqrt 5),
        ``B = 0``: every stream starts as the base). ``grads`` is refused (data-free init)."""
        V.check_key(key, "key")
        check_params(params, "params")
        ts = self.task_paths(params)
        flat = tree_lib.flatten(params)
        for p in ts:
            _, m, n = self.view_shape(p, flat[p].shape)
            V.check_rank(self.task_rank, m, n, "task_rank", where=f"leaf {p!r}")
        base, adapters = super().init(key, params, grads=grads)
        t = self.num_tasks
        for p in ts:
            w = self.to_view(p, flat[p])
            *bs, m, n = w.shape
            dt = self.factor_dtype(w)
            bound = 1.0 / np.sqrt(m)
            keys = jax.random.split(jax.random.fold_in(self.leaf_key(key, p), 1), t)
            ta = jax.vmap(lambda k: jax.random.uniform(k, (*bs, m, self.task_rank), jnp.float32, -bound, bound))(keys)
            adapters[p] = {**adapters[p], "ta": ta.astype(dt), "tb": jnp.zeros((t, *bs, self.task_rank, n), dt)}
        return base, adapters

    # -------------------------------------------------------------- validation
    def _suggest(self, key):
        return (f"MTLoRA reads only {list(self.factor_keys)} ('ta', 'tb' only at task-specific leaves); "
                "adapters made by another variant or edited by hand?")

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        """The shared pair as the protocol checks it (rank ``rank``), then the TS pair:
        ``ta: [T, *bshape, M, r_t]``, ``tb: [T, *bshape, r_t, N]`` with ``T = num_tasks`` on both
        and ``r_t = task_rank``."""
        super().check_factors(path, f, bshape, m, n, argname, shape)
        if "ta" not in f:
            return
        ta, tb = f["ta"], f["tb"]
        nd = len(bshape) + 3
        if ta.ndim != nd or tb.ndim != nd:
            raise ValueError(f"{argname}[{path!r}]: task factors ta{tuple(ta.shape)} tb{tuple(tb.shape)} must have a "
                             f"leading task axis: ta [T, *batch, M, r_t], tb [T, *batch, r_t, N] (matrix view "
                             f"{bshape + (m, n)})")
        if ta.shape[0] != tb.shape[0]:
            raise ValueError(f"{argname}[{path!r}]: the task axis differs between 'ta' ({ta.shape[0]} tasks) and 'tb' "
                             f"({tb.shape[0]} tasks); stack both over the same tasks")
        if ta.shape[0] != self.num_tasks:
            raise ValueError(f"{argname}[{path!r}]: task factors have {ta.shape[0]} tasks on their leading axis but "
                             f"this MTLoRA has num_tasks={self.num_tasks}; use the config the adapters were made with")
        if tuple(ta.shape[1:-2]) != bshape or tuple(tb.shape[1:-2]) != bshape or ta.shape[-2] != m \
                or tb.shape[-1] != n or ta.shape[-1] != tb.shape[-2]:
            raise ValueError(f"{argname}[{path!r}]: task factors ta{tuple(ta.shape)} tb{tuple(tb.shape)} do not fit "
                             f"the matrix view {bshape + (m, n)} (want ta [T, *batch, M, r_t], tb [T, *batch, r_t, N]); "
                             "adapters made for another base or config")
        if ta.shape[-1] != self.task_rank:
            raise ValueError(f"{argname}[{path!r}]: task factors have rank {ta.shape[-1]} but this MTLoRA has "
                             f"task_rank={self.task_rank}; use the config the adapters were made with")

    def check_factor_rank(self, path, r, argname="adapters"):
        """Refuse a shared pair whose rank is not ``rank`` (``r_shared``)."""
        if r != self.rank:
            raise ValueError(f"{argname}[{path!r}]: the shared factors have rank {r} but this MTLoRA has rank={self.rank} "
                             "(r_shared); use the config the adapters were made with")

    def _check_task(self, task):
        if isinstance(task, (bool, np.bool_)) or isinstance(task, jax.core.Tracer):
            raise TypeError(f"task must be a concrete int index in [0, {self.num_tasks}), got {_leaf_kind(task)}; "
                            "under jit take a stream from materialize_tasks(...) instead")
        if _is_array(task) and np.ndim(task) == 0 and jnp.issubdtype(task.dtype, jnp.integer):
            task = int(task)
        if not isinstance(task, (numbers.Integral, np.integer)):
            raise TypeError(f"task must be an int index in [0, {self.num_tasks}), got {_leaf_kind(task)}")
        task = int(task)
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}) (num_tasks={self.num_tasks}), got {task}")
        return task

    # -------------------------------------------------------------- the math
    def factors(self, w, f) -> LowRankForm:
        """The shared stream's form ``(A, B, s_sh, None)``: what :meth:`materialize`, :meth:`merge`,
        :meth:`unmerge`, :meth:`delta` and :func:`lrjax.factored` use."""
        return LowRankForm(f["a"], f["b"], self.scale, None)

    def _task_weight(self, w, f, ta, tb, s):
        """Matrix-view ``W_t`` of one task in the compute dtype (unrounded)."""
        cd = self.compute_dtype(w, f)
        v = w.astype(cd)
        if self.shared_mode == "matrixv2":
            v = v + self.scale * (f["a"].astype(cd) @ f["b"].astype(cd))
        return v + s.astype(cd) * (ta.astype(cd) @ tb.astype(cd))

    def task_weights(self, w, f):
        """Matrix-view per-task weights ``W_t: [T, *batch, M, N]`` of one leaf (``w: [*batch, M, N]``,
        ``f`` its factors with ``ta``/``tb``), vmapped over the task axis, computed in the compute
        dtype and rounded once to ``w.dtype``."""
        s = jnp.asarray(self.task_scales, jnp.float32)
        out = jax.vmap(lambda ta, tb, st: self._task_weight(w, f, ta, tb, st))(f["ta"], f["tb"], s)
        return out.astype(w.dtype)

    def materialize_shared(self, base, adapters):
        """The shared stream's params: ``W + s_sh A B`` at every target (same as :meth:`materialize`)."""
        return self.materialize(base, adapters)

    def _ts(self, adapters, argname="adapters"):
        ts = [p for p, f in adapters.items() if "ta" in f]
        if not ts:
            raise ValueError(f"{argname} has no task-specific factors ('ta', 'tb') at any leaf: made with "
                             "task_targets selecting nothing, or only the shared part passed?")
        return ts

    def materialize_tasks(self, base, adapters):
        """The per-task streams' params (differentiable): every TS leaf becomes ``[T, *leaf.shape]``
        (``W_t`` for each task, vmapped), the other targeted leaves their shared weight
        ``W + s_sh A B`` (no task axis), untargeted leaves unchanged. vmap a block over the task axis
        with ``in_axes`` from :meth:`task_axes`. Rounded once to each leaf's dtype."""
        flat = self._check(base, adapters, basename="base")
        self._ts(adapters)
        new = {}
        for path, f in adapters.items():
            leaf = flat[path]
            w = self.to_view(path, leaf)
            if "ta" in f:
                wt = self.task_weights(w, f)
                new[path] = jax.vmap(lambda x, p=path, s=leaf.shape: self.from_view(p, x, s))(wt)
            else:
                new[path] = self.from_view(path, self.apply_leaf(w, f), leaf.shape)
        return tree_lib.replace(base, new)

    def task_axes(self, base, adapters):
        """``in_axes`` for ``jax.vmap`` over :meth:`materialize_tasks`'s output: a pytree shaped like
        ``base`` with ``0`` at the TS leaves and ``None`` elsewhere (index it like the params to
        vmap one block)."""
        self._check(base, adapters, basename="base")
        ts = set(self._ts(adapters))
        return jax.tree_util.tree_map_with_path(lambda p, _: 0 if tree_lib.path_str(p) in ts else None, base)

    def _one_task(self, base, adapters, task, finite):
        flat = self._check(base, adapters, basename="base")
        self._ts(adapters)
        task = self._check_task(task)
        if finite:
            self._check_finite(flat, adapters, basename="base")
        s = self.task_scales[task]
        new = {}
        for path, f in adapters.items():
            leaf = flat[path]
            w = self.to_view(path, leaf)
            if "ta" in f:
                v = self._task_weight(w, f, f["ta"][task], f["tb"][task], jnp.float32(s)).astype(w.dtype)
            else:
                v = self.apply_leaf(w, f)
            new[path] = self.from_view(path, v, leaf.shape)
        return tree_lib.replace(base, new)

    def materialize_task(self, base, adapters, task: int):
        """Params of stream ``task`` alone (differentiable): ``W_task`` at the TS leaves, the shared
        weight at the other targets. ``task``: a concrete int in ``[0, num_tasks)``."""
        return self._one_task(base, adapters, task, finite=False)

    def merge_task(self, base, adapters, task: int):
        """Dense weights of stream ``task`` for serving (gradients stopped; refuses NaN/Inf factors or
        base leaves). Equals :meth:`materialize_task` and slice ``task`` of :meth:`materialize_tasks`."""
        return jax.lax.stop_gradient(self._one_task(base, adapters, task, finite=True))

    def linear(self, w, f, x, *, x_tasks=None, bias=None):
        """The official ``MTLoRALinear.forward`` (no dropout) on a Dense kernel ``w: [M, N]``.

        Returns ``(y_sh [..., N], y_tasks [T, ..., N])`` with ``pre = x W + bias`` and::

            y_sh = pre + s_sh (x A) B
            y_t  = pre + s_t (x_t A_t) B_t                   ("matrix")
            y_t  = pre + s_sh (x A) B + s_t (x_t A_t) B_t    ("matrixv2")

        where ``x_t = x_tasks[t]`` (``[T, ..., M]``) or ``x`` when ``x_tasks`` is ``None``. Note the
        frozen term uses the shared ``x`` even when ``x_tasks`` is given (official code; module doc).
        ``f`` is one leaf's factors (with ``ta``/``tb``). Computed in
        ``promote_types(x, w, factors, float32)``, rounded once to ``promote_types(x, w)``.
        """
        if not _is_array(w) or not jnp.issubdtype(w.dtype, jnp.floating) or w.ndim != 2:
            raise TypeError(f"w must be a floating Dense kernel [M, N] (the matrix view), got "
                            f"{_leaf_kind(w) if not _is_array(w) else f'{w.dtype}{tuple(w.shape)}'}")
        m, n = w.shape
        self._check_adapters_dict({"w": f}, "f")
        for nm, v in f.items():
            if not _is_array(v) or not jnp.issubdtype(v.dtype, jnp.floating):
                raise TypeError(f"f[{nm!r}] must be a floating array, got {_leaf_kind(v)}")
        if "ta" not in f:
            raise ValueError("f has no task factors 'ta', 'tb'; pass the factors of a task-specific leaf")
        self.check_factors("w", f, (), m, n, "f")
        if not _is_array(x) or not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1 or x.shape[-1] != m:
            raise ValueError(f"x must be a floating array [..., M={m}], got "
                             f"{f'{x.dtype}{tuple(x.shape)}' if _is_array(x) else _leaf_kind(x)}")
        if x_tasks is not None:
            want = (self.num_tasks, *x.shape)
            if not _is_array(x_tasks) or not jnp.issubdtype(x_tasks.dtype, jnp.floating) \
                    or tuple(x_tasks.shape) != want:
                raise ValueError(f"x_tasks must be None or a floating array [T, *x.shape] = {want}, got "
                                 f"{f'{x_tasks.dtype}{tuple(x_tasks.shape)}' if _is_array(x_tasks) else _leaf_kind(x_tasks)}")
        if bias is not None and (not _is_array(bias) or not jnp.issubdtype(bias.dtype, jnp.floating)
                                 or tuple(bias.shape) != (n,)):
            raise ValueError(f"bias must be None or a floating array [N={n}], got "
                             f"{f'{bias.dtype}{tuple(bias.shape)}' if _is_array(bias) else _leaf_kind(bias)}")
        out_dt = jnp.promote_types(x.dtype, w.dtype)
        dts = [x.dtype, w.dtype, *(v.dtype for v in f.values())]
        if x_tasks is not None:
            dts.append(x_tasks.dtype)
        if bias is not None:
            dts.append(bias.dtype)
        cd = V.compute_dtype(*dts)
        xc = x.astype(cd)
        pre = xc @ w.astype(cd)
        if bias is not None:
            pre = pre + bias.astype(cd)
        sh = self.scale * ((xc @ f["a"].astype(cd)) @ f["b"].astype(cd))
        ta = f["ta"].astype(cd)
        if x_tasks is None:  # one matmul x [..., M] @ [M, T r_t] (no copy of x per task)
            u = jnp.einsum("...m,tmr->t...r", xc, ta)
        else:
            u = jax.vmap(jnp.matmul)(x_tasks.astype(cd), ta)
        s = jnp.asarray(self.task_scales, cd)

        def one(u_t, tb, st):
            y = pre + st * (u_t @ tb.astype(cd))
            return y + sh if self.shared_mode == "matrixv2" else y

        y_tasks = jax.vmap(one)(u, f["tb"], s)
        return (pre + sh).astype(out_dt), y_tasks.astype(out_dt)
