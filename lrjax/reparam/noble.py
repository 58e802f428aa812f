"""NOBLE as a reparameterization: a nonlinear low-rank branch on every targeted linear of a model.

Smith (Canva), "NOBLE: Accelerating Transformers with Nonlinear Low-Rank Branches", arXiv 2603.06492
(paper only; no official code). The math, the CosNet nonlinearity, the inits (all [ours] where the
paper is silent) and the parameter count live in :mod:`lrjax.nn.noble`; this module applies them to
an existing params pytree by path selection, like an adapter::

    rp = NOBLE(16, branch="cosnet", targets=ADAPTER_TARGETS)
    base, adapters = rp.init(key, params)                 # base is params; W_up = 0
    logits = lrjax.factored(apply, rp)(base, adapters, ids)

Each adapted kernel ``W`` (matrix view ``[*batch, M, N]``) computes ``x W + sigma(x W_down) W_up``
(activation space: the term depends on ``x``, so there is no effective weight and
``materialize``/``merge``/``unmerge``/``delta`` raise :class:`lrjax.interpreter.NotMergeable`).
At init the model equals the base model exactly (bitwise for float32). NOBLE is a *pretraining*
architecture: differentiate the loss with respect to both ``base`` and ``adapters`` and train both
(no factor is frozen; ``num_params`` counts the branch only, see
:func:`lrjax.nn.noble.noble_num_params`). ``nn.scan`` stacks (``[L, M, N]`` kernels with
``axes`` batch ``(0,)``) get independent ``[L, ...]`` factors per layer.

Factors per leaf: ``w_down [*b, M, r]``, ``w_up [*b, r, N]`` and, for CosNet, ``w1, p1, w2, p2
[*b, r]`` and ``mix [*b, r, r]`` (an optional group: present exactly when ``kind == "cosnet"``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from lrjax import _validation as V
from lrjax.nn.noble import COSNET_KEYS, FACTOR_KEYS, branch_keys, check_branch, init_noble, noble_branch
from lrjax.reparam.base import Reparam

__all__ = ["NOBLE"]


@dataclasses.dataclass(frozen=True, init=False)
class NOBLE(Reparam):
    """NOBLE branches on the leaves selected by ``targets`` (see the module docstring).

    ``NOBLE(rank=8, *, branch="cosnet", targets="kernel", axes=None, dtype=None, freq_init=1.0)``

    Fields: ``rank`` (``r``; lrjax's rule ``1 <= r <= min(M, N)`` of every targeted leaf, checked
    in ``init``); ``kind`` (the branch nonlinearity, given as ``branch=``: one of
    ``"cosnet"``, ``"relu"``, ``"gelu"``; stored as ``kind`` because :meth:`branch` is the
    protocol's hook); ``targets``/``axes`` as every adapter; ``dtype`` of the factors (``None``: the
    base leaf's); ``freq_init`` (CosNet's initial ``w1 = w2``, finite ``> 0``). ``alpha`` is refused:
    the branch has no ``alpha / r`` scale (the paper's ``sigma(x W_down) W_up``).

    Raises: ``TypeError``/``ValueError`` naming ``rank``, ``branch``, ``freq_init``, ``alpha``,
    ``targets``, ``axes`` or ``dtype`` at construction; ``rank`` above ``min(M, N)`` of a leaf in
    ``init``; adapters whose factors do not fit (another rank, another branch kind).
    """

    rank: int = 8
    alpha: float | None = None
    targets: Any = "kernel"
    axes: Any = None
    dtype: Any = None
    kind: str = "cosnet"
    freq_init: float = 1.0

    activation_space = True
    factor_keys = FACTOR_KEYS
    optional_groups = (COSNET_KEYS,)

    def __init__(self, rank: int = 8, alpha: float | None = None, targets: Any = "kernel", axes: Any = None,
                 dtype: Any = None, *, branch: str | None = None, kind: str | None = None, freq_init: float = 1.0):
        if branch is not None and kind is not None and branch != kind:
            raise ValueError(f"branch={branch!r} and kind={kind!r} disagree; pass branch= only")
        k = branch if branch is not None else (kind if kind is not None else "cosnet")
        for nm, v in (("rank", rank), ("alpha", alpha), ("targets", targets), ("axes", axes), ("dtype", dtype),
                      ("kind", k), ("freq_init", freq_init)):
            object.__setattr__(self, nm, v)
        self.__post_init__()

    def __post_init__(self):
        check_branch(self.kind, "branch")
        if self.alpha is not None:
            raise ValueError(f"alpha={self.alpha!r}: NOBLE's branch sigma(x W_down) W_up has no alpha / rank scale; "
                             "drop alpha (W_up starts at 0 and trains)")
        super().__post_init__()
        V.check_float(self.freq_init, "freq_init", low=0.0, low_open=True)

    @property
    def scale(self) -> float:
        """``1``: NOBLE has no ``alpha / r`` scale."""
        return 1.0

    # ------------------------------------------------------------------ hooks
    def init_leaf(self, key, w, path):
        *bs, m, n = w.shape
        return w, init_noble(key, m, n, self.rank, self.kind, batch_shape=tuple(bs), dtype=self.factor_dtype(w),
                             freq_init=self.freq_init)

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        want_keys = branch_keys(self.kind)
        for nm in FACTOR_KEYS:
            if (nm in f) != (nm in want_keys):
                have = "has" if nm in f else "lacks"
                raise ValueError(f"{argname}[{path!r}] {have} {nm!r} but this NOBLE has branch={self.kind!r} "
                                 f"(factors {list(want_keys)}); adapters made with another branch kind")
        r = self.rank
        want = {"w_down": bshape + (m, r), "w_up": bshape + (r, n), "w1": bshape + (r,), "p1": bshape + (r,),
                "mix": bshape + (r, r), "w2": bshape + (r,), "p2": bshape + (r,)}
        for nm in want_keys:
            if tuple(f[nm].shape) != want[nm]:
                raise ValueError(
                    f"{argname}[{path!r}][{nm!r}] has shape {tuple(f[nm].shape)}, expected {want[nm]} for the base "
                    f"leaf {tuple(shape) if shape is not None else ''} (matrix view {bshape + (m, n)}) with "
                    f"rank={r}; adapters made for another base or rank")

    def branch(self, x, y, f, path):
        """``sigma(x W_down) W_up`` (:func:`lrjax.nn.noble.noble_branch`) in
        ``promote_types(x, factors, float32)``; ``y`` is not read."""
        return noble_branch(x, f, self.kind)


