"""Argument checks shared by every public function of lrjax: one place for its error messages.

Every public constructor and function checks its arguments eagerly, before anything is traced,
with these helpers, so that the rules and the wording are the same across the library:

* booleans must be real ``bool`` (``"no"`` or ``1`` are refused, never read as truthy);
* numbers must be real numbers (``True`` is not a number), finite, and in their documented range;
* enums must be one of their names;
* dtypes must be dtypes (``jnp.float32``, ``"bfloat16"``) of the required kind;
* arrays must be arrays (``jax.Array``/``np.ndarray``; lists only where a function says so) of the
  documented rank, kind and trailing size;
* ranks follow one rule everywhere (:func:`check_rank`).

Each helper raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for a value of the
right kind that is out of range, with a message that names the argument and says how to fix it.
Checks that read array *values* (:func:`check_finite`) run only on concrete arrays; under ``jit``
they are skipped (the value is not known before tracing).
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_bool", "check_int", "check_float", "check_choice", "check_dtype", "check_array",
           "check_finite", "check_rank", "check_dir", "check_key", "check_params", "is_concrete", "compute_dtype", "RANK_RULE"]

RANK_RULE = ("1 <= rank <= min(M, N) of every targeted matrix view; a larger rank is refused "
             "everywhere in lrjax (it adds no expressivity and admits no orthonormal basis)")


def is_concrete(x) -> bool:
    """True for a value whose contents are known now (not a tracer under jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def _fmt(value) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def _static_hint(value) -> str:
    """For a traced value where a Python number is needed: why, and the fix."""
    if isinstance(value, jax.core.Tracer):
        return ("; it is a traced value (an argument of a jax.jit / grad / vmap'd function), but this "
                "setting must be static: pass it as a Python number from outside the transform (close over "
                "it, or mark it with jax.jit(..., static_argnames=...))")
    return ""


def check_bool(value, name: str) -> bool:
    """``value`` must be a ``bool`` (or ``np.bool_``); strings, ints and None are refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {_fmt(value)} ({type(value).__name__}){_static_hint(value)}")


def check_int(value, name: str, *, low: int | None = None, high: int | None = None,
              allow_none: bool = False) -> int | None:
    """``value`` must be an integer (not a bool, not a float) with ``low <= value <= high``."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        rng = _range_text(low, high, False, False)
        raise TypeError(f"{name} must be an int{rng}, got {_fmt(value)} ({type(value).__name__})"
                        f"{_static_hint(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int{_range_text(low, high, False, False)}, got {value}")
    return value


def _range_text(low, high, low_open, high_open) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return (" " + " and ".join(parts)) if parts else ""


def check_float(value, name: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, allow_none: bool = False,
                allow_inf: bool = False) -> float | None:
    """``value`` must be a finite real number (int or float, not bool) in the given range.

    ``low_open``/``high_open`` make the bound strict. A 0-d concrete array is accepted.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0 and is_concrete(value) \
            and np.issubdtype(np.asarray(value).dtype, np.number):
        value = np.asarray(value).item()
    rng = _range_text(low, high, low_open, high_open)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number{rng}, got {_fmt(value)} ({type(value).__name__})"
                        f"{_static_hint(value)}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a finite number{rng}, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be{rng}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be{rng}, got {value}")
    return value


def check_choice(value, name: str, choices: Iterable[str]) -> str:
    """``value`` must be one of the strings in ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(choices)}, got {_fmt(value)} ({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_dtype(value, name: str, *, kind: str = "floating", allow_none: bool = False):
    """``value`` must name a dtype (``jnp.float32``, ``np.dtype('bfloat16')``, ``"float16"``).

    ``kind``: ``"floating"`` (default), ``"integer"`` or ``"any"``. Returns a ``np.dtype`` (or
    ``None`` when ``allow_none`` and ``value is None``).
    """
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a dtype such as jnp.float32, got None")
    if isinstance(value, (bool, numbers.Number)) or value is Any:
        raise TypeError(f"{name} must be a dtype such as jnp.float32, got {_fmt(value)}")
    try:
        dt = jnp.dtype(value)
    except Exception:  # noqa: BLE001 - numpy raises TypeError/ValueError/KeyError depending on input
        raise TypeError(f"{name} must be a dtype such as jnp.float32 or jnp.bfloat16, got {_fmt(value)}") from None
    if kind == "floating" and not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype (float32, bfloat16, float16, float64), got {dt}")
    if kind == "integer" and not jnp.issubdtype(dt, jnp.integer):
        raise TypeError(f"{name} must be an integer dtype (e.g. int8, int32), got {dt}")
    return dt


def check_array(x, name: str, *, ndim: int | None = None, min_ndim: int | None = None,
                last: int | None = None, kind: str = "any", convert: bool = False):
    """``x`` must be an array (``jax.Array``, ``np.ndarray`` or a tracer) of the given rank and kind.

    ``convert=True`` also accepts Python numbers and (nested) lists/tuples of numbers, converted
    with ``jnp.asarray``. ``kind``: ``"any"``, ``"floating"``, ``"numeric"`` (integer or floating)
    or ``"integer"``. ``last``: required size of the trailing axis. Returns the array.
    """
    if isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
        arr = x
    elif convert and isinstance(x, (numbers.Number, list, tuple)) and not isinstance(x, bool):
        try:
            arr = jnp.asarray(x)
        except Exception:  # noqa: BLE001
            raise TypeError(f"{name} must be an array or a nested list of numbers, got {_fmt(x)}") from None
    else:
        what = "an array (jax.Array or np.ndarray)" + (" or a list of numbers" if convert else "")
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}; wrap it with jnp.asarray(...)")
    dt = arr.dtype
    if kind == "floating" and not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {dt}; cast with .astype(jnp.float32)")
    if kind == "numeric" and not (jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.integer)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {dt}")
    if kind == "integer" and not jnp.issubdtype(dt, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {dt}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have ndim {ndim}, got shape {tuple(arr.shape)}")
    if min_ndim is not None and arr.ndim < min_ndim:
        raise ValueError(f"{name} must have ndim >= {min_ndim}, got shape {tuple(arr.shape)}")
    if last is not None and (arr.ndim == 0 or arr.shape[-1] != last):
        raise ValueError(f"{name} must have a trailing axis of size {last}, got shape {tuple(arr.shape)}")
    return arr


def check_finite(x, name: str):
    """Refuse NaN/Inf in a concrete array (skipped for tracers: values are unknown under jit)."""
    if not is_concrete(x):
        return x
    with jax.ensure_compile_time_eval():
        ok = bool(jnp.all(jnp.isfinite(x))) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) else True
    if not ok:
        raise ValueError(f"{name} contains NaN or Inf; lrjax does not propagate non-finite inputs "
                         "silently: clean the input first")
    return x


def _leaf_kind(x) -> str:
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__}"
    return f"a {type(x).__name__} ({_fmt(x)})"


def check_params(params, name: str = "params") -> dict:
    """``params`` must be a non-empty pytree (dict, Flax params, ``nnx.State``) whose leaves are
    arrays; returns ``{path: leaf}`` (:func:`lrjax.tree.flatten`)."""
    from lrjax import tree as tree_lib  # lrjax.tree is imported by modules this one serves
    is_array = lambda x: isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer))  # noqa: E731
    if is_array(params) or isinstance(params, (str, bytes, numbers.Number)) or params is None:
        raise TypeError(f"{name} must be a pytree (dict / Flax params / nnx.State) of arrays, "
                        f"got {_leaf_kind(params)}")
    try:
        flat = tree_lib.flatten(params)
    except Exception as e:  # noqa: BLE001 - a custom container jax cannot flatten
        raise TypeError(f"{name} must be a pytree of arrays; it could not be flattened ({e})") from None
    if not flat:
        raise ValueError(f"{name} has no array leaves; pass the model's parameter pytree")
    for path, leaf in flat.items():
        if not is_array(leaf):
            hint = (" (a list of numbers? wrap it with jnp.asarray)"
                    if isinstance(leaf, numbers.Number) and path.rsplit("/", 1)[-1].isdigit() else
                    "; wrap arrays with jnp.asarray")
            raise TypeError(f"{name} must be a pytree of arrays; leaf {path!r} is {_leaf_kind(leaf)}{hint}")
    return flat


def check_key(key, name: str = "key"):
    """``key`` must be ONE JAX PRNG key: ``jax.random.key(seed)`` (a typed key of shape ``()``) or a
    legacy ``jax.random.PRNGKey(seed)`` (``uint32[2]``). Tracers of those kinds pass. Returns ``key``."""
    if isinstance(key, (jax.Array, np.ndarray, jax.core.Tracer)):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape == ():
                return key
            raise ValueError(f"{name} must be a single PRNG key (shape ()), got a batch of keys of shape "
                             f"{tuple(key.shape)}; index one key or split differently")
        if key.dtype == np.uint32 and tuple(key.shape) == (2,):
            return key
        raise TypeError(f"{name} must be a single JAX PRNG key such as jax.random.key(0), got an array "
                        f"{key.dtype}{tuple(key.shape)}")
    raise TypeError(f"{name} must be a single JAX PRNG key such as jax.random.key(0), got "
                    f"{_fmt(key)} ({type(key).__name__})")


def check_dir(path, name: str, what: str = "a directory", *, expanduser: bool = False) -> str:
    """``path`` must be a str/PathLike naming a directory that exists or can be created.

    Refused: non-paths (``TypeError``); empty paths or NUL characters; a regular file; a path under
    a regular file (nothing can be created there) (``ValueError``). ``what`` names the directory in
    the message (e.g. ``"a checkpoint directory"``). Returns the path as a str (``~`` expanded when
    ``expanduser``), not made absolute.
    """
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike) to {what}, got {_fmt(path)} "
                        f"({type(path).__name__})")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a str path, got {type(path).__name__} {_fmt(path)}; decode it first")
    if not path or "\x00" in path:
        raise ValueError(f"{name} must be a non-empty path without NUL characters, got {_fmt(path)}")
    if expanduser:
        path = os.path.expanduser(path)
    full = p = os.path.abspath(path)
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    if os.path.lexists(p) and not os.path.isdir(p):
        if p == full:
            raise ValueError(f"{name}={path!r} is a regular file, not {what}; pass a directory path")
        raise ValueError(f"{name}={path!r} lies under {p!r}, which is a regular file, so {what} cannot be "
                         "there; choose a path whose parents are directories")
    return path


def check_rank(rank, m: int, n: int, name: str = "rank", where: str = "") -> int:
    """The one rank rule of lrjax: ``1 <= rank <= min(m, n)`` for an ``[m, n]`` matrix view."""
    rank = check_int(rank, name, low=1)
    if rank > min(m, n):
        at = f" for {where}" if where else ""
        raise ValueError(f"{name}={rank} exceeds min(M, N) = {min(m, n)}{at} (matrix view [{m}, {n}]); "
                         f"lower `{name}` or narrow the targets ({RANK_RULE})")
    return rank


def compute_dtype(*dtypes):
    """The precision mixed-dtype math runs in: ``promote_types(*dtypes, float32)``.

    lrjax computes every mixed-precision expression (a float32 base with bfloat16 factors, a
    bfloat16 base with bfloat16 factors) in this dtype and rounds once to the output's dtype.
    """
    dt = jnp.dtype(jnp.float32)
    for d in dtypes:
        dt = jnp.promote_types(dt, jnp.dtype(d))
    return dt
