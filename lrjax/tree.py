"""Leaf selection on any pytree: plain dicts, Flax linen params, ``nnx.State``.

Every leaf has a *path string*: the keys from the root joined by ``/``
(``"Dense_0/kernel"``, ``"layers/3/attn/query/kernel"``). NNX variables contribute
no ``value`` component, so linen and NNX versions of one model read alike.

Targets are given as

* a regex string, matched with ``re.fullmatch`` against the path string,
  or as a suffix after ``/`` (``"kernel"`` matches ``"Dense_0/kernel"``);
* a list/tuple of such strings (a leaf is selected if any matches);
* a callable ``(path: str, leaf) -> bool``.

A target that selects nothing raises ``ValueError`` listing the closest paths that exist,
so a typo is a one-line fix instead of a silently untouched model.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import jax

Targets = Union[str, Sequence[str], Callable[[str, Any], bool]]

__all__ = ["Targets", "PathNotFound", "path_str", "flatten", "paths", "select", "get", "replace"]


class PathNotFound(KeyError, ValueError):
    """No leaf at a path: a ``KeyError`` (a failed lookup) and a ``ValueError`` (a wrong value),
    whose message lists the nearest existing paths."""

    def __str__(self):  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


def _check_tree(tree, argname="tree"):
    if isinstance(tree, (str, bytes)):
        raise TypeError(f"{argname} must be a pytree (dict, Flax params, nnx.State), got a str {tree!r:.60}")
    return tree


def _check_path_arg(path, argname="path"):
    if not isinstance(path, str):
        raise TypeError(f"{argname} must be a leaf path string such as 'Dense_0/kernel', got "
                        f"{type(path).__name__} {path!r:.60}")
    return path


def _key_str(k) -> str | None:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(path) -> str:
    """Turn a ``jax.tree_util`` key path into a ``/``-joined string (NNX ``.value`` dropped)."""
    if not isinstance(path, (tuple, list)):
        raise TypeError(f"path must be a jax.tree_util key path (a tuple of keys), got {type(path).__name__}")
    parts = [_key_str(k) for k in path]
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def _is_leaf(x):
    return x is None


def flatten(tree) -> dict[str, Any]:
    """All leaves as an insertion-ordered ``{path: leaf}`` dict."""
    _check_tree(tree)
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out: dict[str, Any] = {}
    for p, leaf in leaves:
        s = path_str(p)
        if s in out:  # pragma: no cover - would need two keys that print alike
            raise ValueError(f"two leaves share the path string {s!r}; rename one of the keys")
        out[s] = leaf
    return out


def paths(tree) -> list[str]:
    """Path strings of every leaf, in flattening order."""
    return list(flatten(tree))


def _matcher(targets: Targets) -> Callable[[str, Any], bool]:
    if callable(targets) and not isinstance(targets, (str, list, tuple)):
        return targets
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
        raise TypeError(
            "targets must be a regex string, a non-empty list of regex strings, or a callable "
            f"(path, leaf) -> bool; got {targets!r}")
    compiled = []
    for t in targets:
        try:
            compiled.append(re.compile(t))
        except re.error as e:
            raise ValueError(f"targets: {t!r} is not a valid regular expression ({e})") from None

    def match(path: str, leaf) -> bool:
        for rx in compiled:
            if rx.fullmatch(path):
                return True
            parts = path.split("/")
            for i in range(1, len(parts)):
                if rx.fullmatch("/".join(parts[i:])):
                    return True
        return False

    return match


def _nearest(wanted: str, available: Iterable[str], n: int = 5) -> list[str]:
    available = list(available)
    close = difflib.get_close_matches(wanted, available, n=n, cutoff=0.3)
    if not close:  # also try matching against suffixes
        by_suffix = {}
        for a in available:
            for suf in [a] + ["/".join(a.split("/")[i:]) for i in range(1, a.count("/") + 1)]:
                by_suffix.setdefault(suf, a)
        close = [by_suffix[c] for c in difflib.get_close_matches(wanted, list(by_suffix), n=n, cutoff=0.3)]
        close = list(dict.fromkeys(close))
    return close or available[:n]


def select(tree, targets: Targets, *, where: Callable[[str, Any], bool] | None = None,
           argname: str = "targets") -> list[str]:
    """Paths of the leaves selected by ``targets`` (and the optional extra predicate ``where``).

    Raises ``ValueError`` naming ``argname`` and listing the nearest existing paths if a
    pattern (or the whole selection) matches nothing.
    """
    if not isinstance(argname, str):
        raise TypeError(f"argname must be a str, got {type(argname).__name__}")
    if where is not None and not callable(where):
        raise TypeError(f"where must be None or a callable (path, leaf) -> bool, got {type(where).__name__}")
    flat = flatten(tree)
    if not flat:
        raise ValueError(f"{argname}: the pytree has no leaves to select from")
    match = _matcher(targets)
    chosen = [p for p, leaf in flat.items() if match(p, leaf) and (where is None or where(p, leaf))]
    # Each string pattern must match something on its own: a typo in one of several is an error.
    pats = [targets] if isinstance(targets, str) else (list(targets) if isinstance(targets, (list, tuple)) else [])
    for pat in pats:
        m = _matcher(pat)
        if not any(m(p, leaf) and (where is None or where(p, leaf)) for p, leaf in flat.items()):
            near = _nearest(pat, flat)
            raise ValueError(
                f"{argname}: pattern {pat!r} matches no leaf"
                + (" that can be targeted" if where is not None and any(m(p, l) for p, l in flat.items()) else "")
                + f". Nearest available paths: {near}")
    if not chosen:
        raise ValueError(f"{argname}: the predicate selected no leaf. Available paths: {list(flat)[:10]}")
    return chosen


def get(tree, path: str):
    """The leaf at ``path``; :class:`PathNotFound` (a ``KeyError`` and ``ValueError``) listing the
    nearest paths if it does not exist."""
    _check_path_arg(path)
    flat = flatten(tree)
    if path not in flat:
        raise PathNotFound(f"path: no leaf at path {path!r}; nearest: {_nearest(path, flat)}")
    return flat[path]


def replace(tree, new_leaves: dict[str, Any]):
    """A copy of ``tree`` with the leaves at the given paths replaced (structure unchanged).

    ``new_leaves`` is a dict ``{path: leaf}``; an unknown path raises :class:`PathNotFound`."""
    _check_tree(tree)
    if not isinstance(new_leaves, Mapping):
        raise TypeError(f"new_leaves must be a dict {{path: leaf}}, got {type(new_leaves).__name__}")
    for k in new_leaves:
        _check_path_arg(k, "new_leaves keys")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = [path_str(p) for p, _ in leaves]
    missing = set(new_leaves) - set(keys)
    if missing:
        m = sorted(missing)[0]
        raise PathNotFound(f"new_leaves: no leaf at path {m!r}; nearest: {_nearest(m, keys)}")
    return jax.tree_util.tree_unflatten(treedef, [new_leaves.get(k, l) for k, (_, l) in zip(keys, leaves)])
