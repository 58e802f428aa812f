"""Which axes of a parameter leaf form the matrix that a low-rank method acts on.

A leaf of any rank is viewed as a batch of matrices ``[*batch, M, N]`` with ``M`` the
product of its *input* (contracted) axes and ``N`` the product of its *output* axes,
so ``y = x @ W`` for a Dense kernel reads ``y = x_flat @ W_mat``. Low-rank factors live in
that view: ``A: [*batch, M, r]``, ``B: [*batch, r, N]``.

Defaults, following Flax's layouts:

=====================================  ==========================  =====================
leaf                                   shape                       (batch, in, out)
=====================================  ==========================  =====================
Dense / nnx.Linear kernel              ``[in, out]``               ``((), (0,), (1,))``
q/k/v DenseGeneral kernel (path ends   ``[embed, heads, head_dim]``  ``((), (0,), (1, 2))``
``query|key|value|qkv/kernel``)
attention ``out/kernel`` (3-D)         ``[heads, head_dim, embed]``  ``((), (0, 1), (2,))``
Conv kernel (path contains ``conv``)  ``[*window, in, out]``      ``((), (0, .., n-2), (n-1,))``
other 3-D leaf (``nn.scan`` stacks)    ``[L, in, out]``            ``((0,), (1,), (2,))``
other 4-D+ leaf (Conv without name)    ``[h, w, in, out]``         ``((), (0, 1, 2), (3,))``
=====================================  ==========================  =====================

The attention rows use the names of Flax's ``MultiHeadDotProductAttention`` (``query``, ``key``,
``value``, ``out``) and ``qkv``, and nothing else: a 3-D leaf named ``q``/``k``/``v``/``o`` or
``q_proj``/``o_proj``/... (Flax ports of torch models use these names for 2-D ``Dense`` layers) is read
as an ``nn.scan`` stack ``[L, in, out]``. The shape alone cannot tell the two apart: a *scanned*
``Dense`` named ``query``/``key``/``value``/``out`` needs ``axes=Axes((0,), (1,), (2,))``, and a
``DenseGeneral`` attention kernel with another name needs its ``Axes`` as well.

Anything else, or any leaf where the default is wrong, takes a per-leaf override:
``axes={"pattern": Axes(batch=(0,), inp=(1, 2), out=(3,))}`` or a callable
``(path, shape) -> Axes``. Optimizers and ES transforms use the same convention.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Callable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Axes", "AxesSpec", "default_axes", "resolve", "to_matrix", "from_matrix", "matrix_shape",
           "check_axes_value", "check_pattern"]


def _is_int(i) -> bool:
    return isinstance(i, (numbers.Integral, np.integer)) and not isinstance(i, (bool, np.bool_))


def check_axes_value(ax, argname: str = "axes") -> "Axes":
    """``ax`` must be an :class:`Axes` whose ``batch``/``inp``/``out`` are tuples of distinct
    non-negative ints, with at least one ``inp`` and one ``out`` axis."""
    if not isinstance(ax, Axes):
        raise TypeError(f"{argname} must be an lrjax.axes.Axes(batch=..., inp=..., out=...), got "
                        f"{type(ax).__name__} {ax!r:.60}")
    for role in ("batch", "inp", "out"):
        t = getattr(ax, role)
        if not isinstance(t, tuple) or not all(_is_int(i) for i in t):
            raise TypeError(f"{argname}.{role} must be a tuple of ints (axis numbers), got {t!r:.60}")
        if any(i < 0 for i in t):
            raise ValueError(f"{argname}.{role} must hold non-negative axis numbers, got {t}")
    allax = ax.batch + ax.inp + ax.out
    if len(set(allax)) != len(allax):
        raise ValueError(f"{argname}: {ax} uses an axis twice; each axis must be used exactly once")
    if not ax.inp or not ax.out:
        raise ValueError(f"{argname}: both `inp` and `out` need at least one axis, got {ax}")
    return ax


def _check_path(path, argname="path") -> str:
    if not isinstance(path, str):
        raise TypeError(f"{argname} must be a leaf path string such as 'Dense_0/kernel', got "
                        f"{type(path).__name__} {path!r:.60}")
    return path


def _check_shape(shape, argname="shape") -> tuple:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list)) or \
            not all(_is_int(d) for d in shape):
        raise TypeError(f"{argname} must be a tuple of ints (an array's .shape), got {shape!r:.60}")
    if any(d < 0 for d in shape):
        raise ValueError(f"{argname} must have non-negative sizes, got {tuple(shape)}")
    return tuple(int(d) for d in shape)


def _check_x(x, argname="x"):
    if not isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
        raise TypeError(f"{argname} must be an array (jax.Array or np.ndarray), got {type(x).__name__}; "
                        "wrap it with jnp.asarray")
    return x


class Axes(NamedTuple):
    """Axis roles of one leaf: leading ``batch`` axes, contracted ``inp`` axes, ``out`` axes."""

    batch: tuple[int, ...]
    inp: tuple[int, ...]
    out: tuple[int, ...]

    def check(self, shape, path: str = "<leaf>") -> "Axes":
        shape = _check_shape(shape)
        check_axes_value(self, f"axes for {path!r}")
        n = len(shape)
        allax = self.batch + self.inp + self.out
        if sorted(allax) != list(range(n)):
            raise ValueError(
                f"axes for {path!r} (shape {tuple(shape)}): {self} must use each of the {n} axes "
                "exactly once; pass a corrected Axes(batch=..., inp=..., out=...) in `axes=`")
        if not self.inp or not self.out:
            raise ValueError(f"axes for {path!r}: both `inp` and `out` need at least one axis, got {self}")
        return self


AxesSpec = Union[None, Axes, Mapping[str, Axes], Callable[[str, tuple], Axes]]

_QKV = re.compile(r"(^|.*/)(query|key|value|qkv)/kernel$")
_CONV = re.compile(r"conv", re.IGNORECASE)
_OUT = re.compile(r"(^|.*/)out/kernel$")


def default_axes(path: str, shape) -> Axes:
    """The default matrix view of a leaf (see the module docstring)."""
    _check_path(path)
    n = len(_check_shape(shape))
    if n < 2:
        raise ValueError(
            f"leaf {path!r} has shape {tuple(shape)}: a low-rank method needs a matrix (ndim >= 2). "
            "Narrow `targets` so it selects kernels only (e.g. 'kernel'), not biases or scales")
    if n == 2:
        return Axes((), (0,), (1,))
    if _CONV.search(path):
        return Axes((), tuple(range(n - 1)), (n - 1,))
    if n == 3:
        if _QKV.match(path):
            return Axes((), (0,), (1, 2))
        if _OUT.match(path):
            return Axes((), (0, 1), (2,))
        return Axes((0,), (1,), (2,))
    return Axes((), tuple(range(n - 1)), (n - 1,))


def check_pattern(pat, argname: str = "axes") -> str:
    """A key of an ``{regex: Axes}`` spec must be a valid regular expression string."""
    if not isinstance(pat, str):
        raise TypeError(f"{argname}: keys must be regex strings matching leaf paths, got "
                        f"{type(pat).__name__} {pat!r:.60}")
    try:
        re.compile(pat)
    except re.error as e:
        raise ValueError(f"{argname}: {pat!r} is not a valid regular expression ({e})") from None
    return pat


def resolve(path: str, shape, spec: AxesSpec = None) -> Axes:
    """The :class:`Axes` for one leaf under a user ``spec`` (override) or the defaults."""
    _check_path(path)
    shape = _check_shape(shape)
    if spec is None:
        ax = default_axes(path, shape)
    elif isinstance(spec, Axes):
        ax = spec
    elif callable(spec):
        ax = spec(path, tuple(shape))
        if ax is None:
            ax = default_axes(path, shape)
    elif isinstance(spec, Mapping):
        ax = None
        for pat, a in spec.items():
            check_pattern(pat)
            if re.fullmatch(pat, path) or any(re.fullmatch(pat, "/".join(path.split("/")[i:]))
                                              for i in range(1, path.count("/") + 1)):
                ax = a
                break
        if ax is None:
            ax = default_axes(path, shape)
    else:
        raise TypeError(f"axes must be None, an Axes, a dict pattern -> Axes, or a callable; got {spec!r}")
    if not isinstance(ax, Axes):
        raise TypeError(f"axes for {path!r} must be an lrjax.axes.Axes, got {ax!r}")
    return ax.check(shape, path)


def matrix_shape(shape, ax: Axes) -> tuple[tuple[int, ...], int, int]:
    """``(batch_shape, M, N)`` of the matrix view."""
    shape = _check_shape(shape)
    check_axes_value(ax, "ax").check(shape)
    return (tuple(shape[i] for i in ax.batch), math.prod(shape[i] for i in ax.inp),
            math.prod(shape[i] for i in ax.out))


def to_matrix(x, ax: Axes):
    """View a leaf as ``[*batch, M, N]`` (a transpose only when the axes are not in order)."""
    _check_x(x)
    b, m, n = matrix_shape(x.shape, ax)
    perm = ax.batch + ax.inp + ax.out
    if perm != tuple(range(x.ndim)):
        x = jnp.transpose(x, perm)
    return x.reshape(*b, m, n)


def from_matrix(m, ax: Axes, shape):
    """Inverse of :func:`to_matrix`: ``[*batch, M, N]`` back to a leaf of ``shape``."""
    _check_x(m, "m")
    shape = _check_shape(shape)
    b, mm, nn = matrix_shape(shape, ax)
    if tuple(m.shape) != b + (mm, nn):
        raise ValueError(f"m has shape {tuple(m.shape)}, but the matrix view of a leaf of shape {shape} "
                         f"under {ax} is {b + (mm, nn)}")
    perm = ax.batch + ax.inp + ax.out
    x = m.reshape(tuple(shape[i] for i in perm))
    if perm != tuple(range(len(shape))):
        x = jnp.transpose(x, tuple(perm.index(i) for i in range(len(shape))))
    return x
