"""Checkpointing adapters and whole training states with Orbax (never pickle).

Two formats, both plain Orbax checkpoints (OCDBT/TensorStore arrays + JSON metadata):

* **Adapters** -- :func:`save_adapters` / :func:`load_adapters`: one checkpoint directory
  holding the ``{leaf path: {"a": A, "b": B, ...}}`` dict returned by ``rp.init`` and, if given,
  the reparameterization's config (class name + dataclass fields as JSON), so that::

      lrjax.checkpoint.save_adapters("ckpt/lora", adapters, rp=rp)
      rp, adapters = lrjax.checkpoint.load_adapters("ckpt/lora")

  gives back an equal ``rp`` and bit-identical factors (dtypes included, bfloat16 too).

* **Training state** -- :func:`save_state` / :func:`restore_state`: any pytree (params,
  adapters, optax state with its NamedTuples, a step counter, PRNG keys) saved under
  ``directory/<step>`` by an ``orbax.checkpoint.CheckpointManager`` (``max_to_keep``,
  :func:`latest_step`). Restore with ``like=`` (the state built by your init code, concrete or
  ``jax.eval_shape``-abstract) to get exactly that pytree back::

      state = restore_state("ckpt/run", like=jax.eval_shape(init_state, key))

  Typed PRNG keys (``jax.random.key``) are stored as their ``key_data`` plus the PRNG impl
  name and re-wrapped on restore; raw ``uint32`` keys (``jax.random.PRNGKey``) are ordinary
  arrays. Restoring a state saved mid-run and continuing is bit-identical to never stopping.

Integrity. Every checkpoint written by this module also holds ``lrjax_manifest.json``: the size
and SHA-256 of each file Orbax wrote, written atomically after Orbax commits. Before reading, the
JSON metadata files are parsed and (when the manifest is there) every file is checked against it,
so a truncated array file, zeroed metadata or a missing item raises
:class:`CheckpointCorruptError` (a ``ValueError``) naming the step and the file, never a raw
TensorStore/JSON/Orbax error. ``restore_state(directory, fallback=True)`` restores the newest
*intact* step instead (with a warning per skipped step); :func:`latest_intact_step` says which
one that is. Steps saved by older lrjax versions (no manifest) are checked by parsing their
metadata and by the read itself.

Arguments are checked before anything is read or written: ``directory`` must be a ``str`` or
``os.PathLike`` that is not a regular file nor under one; ``step`` an ``int >= 0`` (not a
string); ``max_to_keep`` an ``int >= 1`` or ``None``; flags real ``bool`` s.

NaN/Inf values are stored and restored bit-exactly (a checkpoint is a faithful copy, e.g. of a
diverged run to debug); they are not refused.

Keys of the pytree may contain any characters. Orbax names each array by joining the key path
with ``"."``, so ``{"a.b": x, "a": {"b": y}}`` would silently share one array (observed with
orbax-checkpoint 0.12); ``"/"`` (as in adapter paths like ``"Dense_0/kernel"``) happens to work
under OCDBT but is a storage path separator elsewhere. To be safe, every key is stored
percent-encoded (only ``[A-Za-z0-9_-]`` and ``%XX`` escapes; the empty key as ``"%"``) and
decoded on load; this is invisible to the user.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import tree as tree_lib
from lrjax._validation import check_bool, check_dir, check_int

__all__ = ["save_adapters", "load_adapters", "save_state", "restore_state", "latest_step",
           "latest_intact_step", "all_steps", "reparam_to_json", "reparam_from_json",
           "CheckpointCorruptError"]

_FORMAT = "lrjax_checkpoint"
_VERSION = 1
_MANIFEST = "lrjax_manifest.json"
# Orbax's JSON files: a zeroed or truncated one must be reported by name, not as a JSON error.
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding")
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


# --------------------------------------------------------------------------- key encoding
def _encode_key(k: str) -> str:
    """Reversible encoding of one pytree key into ``[A-Za-z0-9_-%]`` (no ``.`` or ``/``)."""
    if k == "":
        return "%"
    out = []
    for ch in k:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def _decode_key(s: str) -> str:
    if s == "%":
        return ""
    buf = bytearray()
    i = 0
    while i < len(s):
        if s[i] == "%":
            buf.append(int(s[i + 1:i + 3], 16))
            i += 3
        else:
            buf.extend(s[i].encode("ascii"))
            i += 1
    return buf.decode("utf-8")


def _components(path) -> tuple[str, ...]:
    return tuple(tree_lib._key_str(k) for k in path)


def _show(comps) -> str:
    return "/".join(comps) if comps else "<root>"


def _nest(items, encode=True) -> dict:
    """``[(components, value)]`` -> nested dicts (keys encoded for Orbax unless ``encode=False``)."""
    root: dict = {}
    for comps, value in items:
        node = root
        keys = [_encode_key(c) if encode else c for c in comps]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return root


def _get_nested(tree, comps):
    for c in comps:
        tree = tree[_encode_key(c)]
    return tree


def _is_typed_key(x) -> bool:
    dt = getattr(x, "dtype", None)
    try:
        return dt is not None and jnp.issubdtype(dt, jax.dtypes.prng_key)
    except TypeError:  # pragma: no cover - exotic dtype objects
        return False


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


class CheckpointCorruptError(ValueError):
    """A checkpoint's files are damaged or incomplete; the message names the step and the file."""


# --------------------------------------------------------------------------- arguments
def _check_directory(directory, name: str = "directory") -> str:
    """Absolute path of ``directory``: a str/PathLike that is not a file and not under a file."""
    return os.path.abspath(check_dir(directory, name, "a checkpoint directory"))


def _check_step(step, name: str = "step") -> int:
    if isinstance(step, str):
        raise TypeError(f"{name} must be an int >= 0, got the string {step!r}; pass int({step!r})")
    return check_int(step, name, low=0)


# --------------------------------------------------------------------------- integrity
def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ckpt_files(ckpt_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(ckpt_dir):
        for n in names:
            if n == _MANIFEST or n.startswith("." + _MANIFEST):
                continue
            out.append(os.path.relpath(os.path.join(root, n), ckpt_dir).replace(os.sep, "/"))
    return sorted(out)


def _write_manifest(ckpt_dir: str) -> None:
    """Record size and SHA-256 of every file of a committed checkpoint (atomic write)."""
    files = {rel: [os.path.getsize(os.path.join(ckpt_dir, rel)), _digest(os.path.join(ckpt_dir, rel))]
             for rel in _ckpt_files(ckpt_dir)}
    tmp = os.path.join(ckpt_dir, f".{_MANIFEST}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as fh:
        json.dump({"format": "lrjax_manifest", "version": 1, "files": files}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, _MANIFEST))


def _verify(ckpt_dir: str, label: str) -> None:
    """Raise :class:`CheckpointCorruptError` naming ``label`` and the file if ``ckpt_dir`` is damaged."""
    hint = ("; restore an older step with restore_state(directory, fallback=True) or "
            "latest_intact_step(directory)") if label.startswith("step") else ""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointCorruptError(f"{label} is corrupt: {ckpt_dir} is not a directory{hint}")
    if not os.path.isfile(os.path.join(ckpt_dir, "_CHECKPOINT_METADATA")):
        raise CheckpointCorruptError(f"{label} is corrupt: file {os.path.join(ckpt_dir, '_CHECKPOINT_METADATA')} "
                                     f"is missing (an incomplete or damaged step){hint}")
    present = _ckpt_files(ckpt_dir)
    for rel in present:
        if rel.rsplit("/", 1)[-1] in _JSON_FILES:
            fpath = os.path.join(ckpt_dir, rel)
            try:
                with open(fpath, "rb") as fh:
                    json.loads(fh.read().decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointCorruptError(f"{label} is corrupt: file {fpath} is not valid JSON "
                                             f"({type(e).__name__}: {str(e)[:100]}){hint}") from None
    man_path = os.path.join(ckpt_dir, _MANIFEST)
    if not os.path.isfile(man_path):
        return  # written by an older lrjax: the read itself is the check
    try:
        with open(man_path, "rb") as fh:
            files = json.loads(fh.read().decode("utf-8"))["files"]
        files = {str(k): (int(v[0]), str(v[1])) for k, v in files.items()}
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
        raise CheckpointCorruptError(f"{label} is corrupt: file {man_path} is not a valid lrjax manifest "
                                     f"({type(e).__name__}){hint}") from None
    present_set = set(present)
    for rel, (size, digest) in sorted(files.items()):
        fpath = os.path.join(ckpt_dir, rel)
        if rel not in present_set:
            raise CheckpointCorruptError(f"{label} is corrupt: file {fpath} is missing{hint}")
        actual = os.path.getsize(fpath)
        if actual != size:
            raise CheckpointCorruptError(f"{label} is corrupt: file {fpath} has {actual} bytes, {size} were "
                                         f"written (truncated or overwritten){hint}")
        if _digest(fpath) != digest:
            raise CheckpointCorruptError(f"{label} is corrupt: file {fpath} does not match the SHA-256 "
                                         f"recorded when it was written{hint}")


def _corrupt_from(e: Exception, label: str, ckpt_dir: str) -> CheckpointCorruptError:
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    hint = ("; restore an older step with restore_state(directory, fallback=True)"
            if label.startswith("step") else "")
    return CheckpointCorruptError(f"{label} could not be read: the files under {ckpt_dir} are damaged or "
                                  f"incomplete ({type(e).__name__}: {msg}){hint}")


# --------------------------------------------------------------------------- orbax helpers
def _ocp():
    import orbax.checkpoint as ocp  # deferred: importing orbax is not free
    return ocp


def _has_ckpt_metadata(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA"))


def _lrjax_meta(custom: Any, directory, expected: str) -> dict:
    if not isinstance(custom, dict) or _FORMAT not in custom:
        raise ValueError(f"{directory!s} is an Orbax checkpoint but was not written by "
                         f"lrjax.checkpoint (no '{_FORMAT}' metadata)")
    meta = custom[_FORMAT]
    if meta.get("format") != expected:
        hint = {"state": "restore_state", "adapters": "load_adapters"}.get(meta.get("format"), "?")
        raise ValueError(f"{directory!s} holds an lrjax '{meta.get('format')}' checkpoint, not "
                         f"'{expected}'; read it with lrjax.checkpoint.{hint}()")
    if meta.get("version", 0) > _VERSION:
        raise ValueError(f"{directory!s}: checkpoint format version {meta['version']} is newer than "
                         f"this lrjax understands ({_VERSION}); upgrade lrjax")
    return meta


# --------------------------------------------------------------------------- reparam config
def _value_to_json(v, where: str):
    from lrjax.axes import Axes

    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, Axes):
        return {"__axes__": [list(v.batch), list(v.inp), list(v.out)]}
    if isinstance(v, np.dtype):
        return {"__dtype__": v.name, "as": "np.dtype"}
    if isinstance(v, type):
        try:
            name = np.dtype(v).name
        except TypeError:
            name = None
        if name is not None:
            as_ = "jnp" if getattr(jnp, name, None) is v else ("np" if getattr(np, name, None) is v else "np.dtype")
            return {"__dtype__": name, "as": as_}
    if isinstance(v, tuple):
        return {"__tuple__": [_value_to_json(x, f"{where}[{i}]") for i, x in enumerate(v)]}
    if isinstance(v, list):
        return [_value_to_json(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, dict):
        return {"__dict__": [[_value_to_json(k, f"{where} key"), _value_to_json(x, f"{where}[{k!r}]")]
                             for k, x in v.items()]}
    raise TypeError(
        f"{where} = {v!r} cannot be stored as JSON (only None, bool, int, float, str, dtypes, Axes "
        "and tuples/lists/dicts of these). Callables such as a `targets` predicate or an `axes` "
        "function cannot be checkpointed: save without `rp=` (or with an equivalent regex/Axes "
        "config) and rebuild the reparameterization in code")


def _value_from_json(v):
    from lrjax.axes import Axes

    if isinstance(v, list):
        return [_value_from_json(x) for x in v]
    if isinstance(v, dict):
        if "__axes__" in v:
            return Axes(*(tuple(int(i) for i in part) for part in v["__axes__"]))
        if "__dtype__" in v:
            name, as_ = v["__dtype__"], v.get("as")
            if as_ == "jnp" and hasattr(jnp, name):
                return getattr(jnp, name)
            if as_ == "np" and hasattr(np, name):
                return getattr(np, name)
            return jnp.dtype(name)
        if "__tuple__" in v:
            return tuple(_value_from_json(x) for x in v["__tuple__"])
        if "__dict__" in v:
            return {_value_from_json(k): _value_from_json(x) for k, x in v["__dict__"]}
    return v


def _reparam_classes() -> dict:
    from lrjax import reparam
    from lrjax.reparam.base import Reparam

    return {n: c for n in reparam.__all__ if isinstance(c := getattr(reparam, n), type)
            and issubclass(c, Reparam)}


def reparam_to_json(rp) -> dict:
    """``{"class": name, "fields": {...}}`` for a built-in :mod:`lrjax.reparam` config.

    Raises ``TypeError`` for a class not exported by :mod:`lrjax.reparam` (it could not be
    rebuilt by name) or a field value that has no JSON form (e.g. a callable ``targets``).
    """
    from lrjax.reparam.base import Reparam

    if not isinstance(rp, Reparam) or not dataclasses.is_dataclass(rp):
        raise TypeError(f"rp must be an lrjax reparameterization (e.g. lrjax.LoRA(rank=8)), got {rp!r:.80}")
    name = type(rp).__name__
    if _reparam_classes().get(name) is not type(rp):
        raise TypeError(
            f"rp: {type(rp).__module__}.{name} is not one of the built-in lrjax.reparam classes "
            f"({', '.join(sorted(_reparam_classes()))}), so it could not be rebuilt by name on load; "
            "save without `rp=` and keep its config in `metadata=`")
    fields = {f.name: _value_to_json(getattr(rp, f.name), f"rp.{f.name}")
              for f in dataclasses.fields(rp) if f.init}
    return {"class": name, "fields": fields}


def reparam_from_json(cfg: dict):
    """Inverse of :func:`reparam_to_json`."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("fields"), dict):
        raise TypeError("cfg must be the dict returned by reparam_to_json ({'class': ..., 'fields': {...}}), "
                        f"got {cfg!r:.80}")
    classes = _reparam_classes()
    name = cfg.get("class")
    if name not in classes:
        raise ValueError(f"checkpoint names reparameterization class {name!r}, which this lrjax does not "
                         f"have (known: {sorted(classes)})")
    return classes[name](**{k: _value_from_json(v) for k, v in cfg["fields"].items()})


# --------------------------------------------------------------------------- adapters
def save_adapters(directory, adapters: dict, *, rp=None, metadata: dict | None = None,
                  overwrite: bool = False) -> None:
    """Save an adapters dict (``{leaf path: {factor name: array}}``) to ``directory``.

    Args:
      directory: the checkpoint directory to create (must not exist unless ``overwrite``).
      adapters: the dict returned by ``rp.init`` (keys may contain ``/`` or any character;
        factors keep their dtype, bfloat16 included).
      rp: optional reparameterization config (a built-in :mod:`lrjax.reparam` class); its class
        name and dataclass fields are stored as JSON so :func:`load_adapters` rebuilds it.
        Tuple fields round-trip as tuples, dtypes and :class:`lrjax.axes.Axes` are supported; a
        callable field (``targets``/``axes`` function) raises ``TypeError`` here.
      metadata: optional JSON-serializable dict stored alongside (read back with
        ``load_adapters(..., with_metadata=True)``).
      overwrite: replace an existing checkpoint at ``directory``.

    The write is synchronous and atomic (Orbax writes to a temporary directory and renames).
    Variants whose ``init`` rewrites the base (``rp.rewrites_base``: PiSSA's residual
    ``W - sAB``, LoRA-GA's ``W - s A0 B0``): the adapters alone do not determine the model;
    checkpoint the base too (e.g. with :func:`save_state`) or recompute it with the same
    ``rp.init`` key (and, for LoRA-GA, the same ``grads``). Saving such adapters with ``rp=``
    warns (``UserWarning``). With ``rp=``, the adapters are checked against it (factor names,
    and the rank of ``a``/``b`` pairs) before anything is written. Zero-size factors (a CoDyRA
    leaf whose ranks were all pruned) are refused: Orbax cannot store empty arrays; save before
    pruning or after ``CoDyRA.next_task``.
    """
    directory = _check_directory(directory)
    overwrite = check_bool(overwrite, "overwrite")
    if not isinstance(adapters, dict) or not adapters:
        raise TypeError(f"adapters must be the non-empty dict returned by rp.init(), got {type(adapters).__name__}")
    for path, f in adapters.items():
        if not isinstance(path, str):
            raise TypeError(f"adapters: keys must be leaf path strings, got {path!r}")
        if not isinstance(f, dict) or not f:
            raise TypeError(f"adapters[{path!r}] must be a dict of factors like {{'a': A, 'b': B}}, got {f!r:.80}")
        for nm, x in f.items():
            if not isinstance(nm, str) or not (hasattr(x, "shape") and hasattr(x, "dtype")):
                raise TypeError(f"adapters[{path!r}][{nm!r}] must be an array under a string name, got {type(x).__name__}")
            if isinstance(x, jax.ShapeDtypeStruct) or isinstance(x, jax.core.Tracer):
                raise TypeError(f"adapters[{path!r}][{nm!r}] is abstract (ShapeDtypeStruct/tracer); save concrete arrays")
            if 0 in tuple(x.shape):
                raise ValueError(f"adapters[{path!r}][{nm!r}] has zero size (shape {tuple(x.shape)}); Orbax cannot "
                                 "store empty arrays (a CoDyRA leaf with every rank pruned?): save before pruning, "
                                 "after CoDyRA.next_task, or merge that leaf and drop it")
    rp_cfg = reparam_to_json(rp) if rp is not None else None
    if rp is not None:
        rp._check_adapters_dict(adapters, "adapters")
        if tuple(rp.factor_keys[:2]) == ("a", "b"):
            for path, f in adapters.items():
                if f["a"].ndim >= 2:
                    rp.check_factor_rank(path, int(f["a"].shape[-1]), "adapters")
        if rp.rewrites_base:
            warnings.warn(
                f"save_adapters: {type(rp).__name__}.init rewrote the base (rp.rewrites_base), so these adapters "
                "reproduce the model only on that rewritten base; save the base too (lrjax.checkpoint.save_state) "
                "or re-run rp.init with the same key (and grads) before loading", UserWarning, stacklevel=2)
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a JSON-serializable dict or None, got {type(metadata).__name__}")
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metadata must be JSON-serializable: {e}") from None
    target = directory
    if os.path.exists(directory):
        if not overwrite:
            raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
        # write next to it and swap only once the new checkpoint is complete
        target = f"{directory}.lrjax-tmp-{uuid.uuid4().hex[:8]}"
    meta = {"format": "adapters", "version": _VERSION,
            "paths": [[p, list(f)] for p, f in adapters.items()],
            "reparam": rp_cfg, "metadata": metadata}
    tree = {_encode_key(p): {_encode_key(n): x for n, x in f.items()} for p, f in adapters.items()}
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, tree, custom_metadata={_FORMAT: meta})
        ckptr.wait_until_finished()
    _write_manifest(target)
    if target != directory:
        shutil.rmtree(directory)
        os.rename(target, directory)


def load_adapters(directory, *, with_metadata: bool = False):
    """Load what :func:`save_adapters` wrote.

    Returns ``(rp, adapters)`` -- ``rp`` is the rebuilt reparameterization (``None`` if it was
    saved without ``rp=``), ``adapters`` the dict with the original key and factor order, as
    ``jax.Array`` on the default device with the saved dtypes. With ``with_metadata=True``
    returns ``(rp, adapters, metadata)``.

    Raises ``FileNotFoundError`` if ``directory`` holds no adapters checkpoint (for a
    :func:`save_state` directory the message says to use :func:`restore_state`) and ``ValueError``
    if it holds another kind of lrjax checkpoint.
    """
    directory = _check_directory(directory)
    with_metadata = check_bool(with_metadata, "with_metadata")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no adapters checkpoint at {directory}: the directory does not exist")
    if not _has_ckpt_metadata(directory):
        steps = _steps_in(directory)
        hint = (f"; it holds training-state steps {steps} -- use lrjax.checkpoint.restore_state()"
                if steps else "")
        raise FileNotFoundError(f"no adapters checkpoint in {directory} (no Orbax checkpoint metadata){hint}")
    label = f"adapters checkpoint {directory}"
    _verify(directory, label)
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckptr:
        try:
            md = ckptr.metadata(directory)
            custom = md.custom_metadata
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore/JSON errors all mean damaged files
            raise _corrupt_from(e, label, directory) from e
        meta = _lrjax_meta(custom, directory, "adapters")
        shd = _default_sharding()
        try:
            tree_meta = md.item_metadata.tree
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=shd), tree_meta)
            raw = ckptr.restore(directory, target)
        except Exception as e:  # noqa: BLE001
            raise _corrupt_from(e, label, directory) from e
    adapters = {p: {n: raw[_encode_key(p)][_encode_key(n)] for n in names} for p, names in meta["paths"]}
    rp = reparam_from_json(meta["reparam"]) if meta.get("reparam") is not None else None
    return (rp, adapters, meta.get("metadata")) if with_metadata else (rp, adapters)


# --------------------------------------------------------------------------- training state
def _steps_in(directory) -> list[int]:
    """Steps as Orbax lists them: every digit-named subdirectory (also one whose metadata is lost:
    such a step is reported as corrupt, never skipped silently)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _manager(directory, max_to_keep=None, read_only=False):
    # One unnamed item with an explicit handler: no "default item could not be restored" warnings.
    # (`read_only=True` would log two warnings per call, so readers just do not create the dir.)
    ocp = _ocp()
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                        create=not read_only)
    return ocp.CheckpointManager(os.fspath(directory), options=opts,
                                 item_handlers=ocp.StandardCheckpointHandler())


def all_steps(directory) -> list[int]:
    """Sorted steps saved by :func:`save_state` in ``directory`` (``[]`` if none / missing)."""
    directory = _check_directory(directory)
    return _steps_in(directory)


def latest_step(directory) -> int | None:
    """The newest step in ``directory`` (``None`` if there is none), intact or not.

    See :func:`latest_intact_step` for the newest step that passes the integrity checks.
    """
    steps = all_steps(directory)
    return steps[-1] if steps else None


def latest_intact_step(directory) -> int | None:
    """The newest step of ``directory`` whose files are intact (``None`` if there is none).

    A step is intact when its JSON metadata parses and every file matches the size and SHA-256
    recorded in its manifest when it was saved; a step saved by an older lrjax (no manifest) must
    also have readable Orbax metadata. This reads every file of the steps it checks.
    """
    directory = _check_directory(directory)
    for step in reversed(_steps_in(directory)):
        try:
            _verify_step_readable(directory, step)
        except CheckpointCorruptError:
            continue
        return step
    return None


def _verify_step_readable(directory: str, step: int) -> None:
    step_dir = os.path.join(directory, str(step))
    label = f"step {step} in {directory}"
    _verify(step_dir, label)
    if not os.path.isfile(os.path.join(step_dir, _MANIFEST)):
        with _manager(directory, read_only=True) as m:
            try:
                _lrjax_meta(m.metadata(step).custom_metadata, step_dir, "state")
            except CheckpointCorruptError:
                raise
            except Exception as e:  # noqa: BLE001
                raise _corrupt_from(e, label, step_dir) from e


def _leaf_record(comps, x) -> tuple[dict, Any]:
    """(JSON record, array to store) for one state leaf."""
    where = _show(comps)
    if isinstance(x, jax.ShapeDtypeStruct):
        raise TypeError(f"state leaf {where!r} is abstract (ShapeDtypeStruct); save_state needs concrete arrays")
    if hasattr(x, "shape") and hasattr(x, "dtype") and 0 in tuple(x.shape):
        raise ValueError(f"state leaf {where!r} has zero size (shape {tuple(x.shape)}); orbax cannot store empty "
                         "arrays: drop the leaf from the state or rebuild it after restore")
    if _is_typed_key(x):
        data = jax.random.key_data(x)
        return {"kind": "key", "shape": list(x.shape), "dtype": str(x.dtype),
                "impl": str(jax.random.key_impl(x)), "data_shape": list(data.shape)}, data
    if isinstance(x, bool):
        return {"kind": "py_bool", "shape": [], "dtype": "bool"}, np.asarray(x)
    if isinstance(x, int):
        arr = np.asarray(x)
        return {"kind": "py_int", "shape": [], "dtype": arr.dtype.name}, arr
    if isinstance(x, float):
        return {"kind": "py_float", "shape": [], "dtype": "float64"}, np.asarray(x)
    if isinstance(x, (np.ndarray, np.generic)):
        arr = np.asarray(x)
        if arr.dtype == object:
            raise TypeError(f"state leaf {where!r} is an object array; only numeric arrays can be saved")
        return {"kind": "numpy", "shape": list(arr.shape), "dtype": arr.dtype.name}, arr
    if isinstance(x, jax.Array):
        rec = {"kind": "array", "shape": list(x.shape), "dtype": x.dtype.name}
        if getattr(x, "weak_type", False):
            rec["weak_type"] = True
        return rec, x
    raise TypeError(f"state leaf {where!r} has type {type(x).__name__}; save_state stores arrays, "
                    "PRNG keys and Python scalars only (make other values static or drop them)")


def save_state(directory, step: int, state, *, max_to_keep: int | None = None,
               overwrite: bool = False) -> None:
    """Save a training-state pytree as ``directory/<step>`` with an Orbax ``CheckpointManager``.

    Args:
      directory: the run's checkpoint root (created if needed); each step is a subdirectory.
      step: non-negative int; must be new and greater than the latest saved step (Orbax keeps
        steps increasing); ``overwrite=True`` replaces an existing step.
      state: any pytree of ``jax.Array`` / ``numpy`` arrays / Python scalars: params, adapters,
        optax state (NamedTuples), counters, PRNG keys (typed ``jax.random.key`` or raw
        ``uint32``). ``None`` leaves are empty subtrees and are not stored.
      max_to_keep: keep only the newest ``max_to_keep`` steps (older ones are deleted after this
        save); ``None`` keeps all.

    Synchronous: the checkpoint is complete (and committed atomically) when this returns.
    """
    directory = _check_directory(directory)
    step = _check_step(step)
    max_to_keep = check_int(max_to_keep, "max_to_keep", low=1, allow_none=True)
    overwrite = check_bool(overwrite, "overwrite")
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    if not leaves:
        raise ValueError("state has no array leaves to save")
    records, items, seen = [], [], {}
    for path, x in leaves:
        comps = _components(path)
        enc = tuple(_encode_key(c) for c in comps)
        if enc in seen:
            raise ValueError(f"state: two leaves share the key path {_show(comps)!r} (keys that print "
                             "alike in a custom pytree node); rename one")  # pragma: no cover
        seen[enc] = True
        rec, arr = _leaf_record(comps, x)
        records.append({"path": list(comps), **rec})
        items.append((comps, arr))
    ocp = _ocp()
    with _manager(directory, max_to_keep=max_to_keep) as m:
        existing = sorted(m.all_steps())
        if step in existing and not overwrite:
            raise FileExistsError(f"step {step} already exists in {directory} (steps: {existing}); "
                                  "pass overwrite=True to replace it")
        others = [s for s in existing if s != step]
        if others and step < others[-1]:
            raise ValueError(f"step {step} is older than the latest step {others[-1]} in {directory}; "
                             "Orbax's CheckpointManager only saves increasing steps (use a new directory "
                             "or delete the later steps)")
        if step in existing:
            m.delete(step)
        meta = {"format": "state", "version": _VERSION, "leaves": records}
        ok = m.save(step, args=ocp.args.StandardSave(_nest(items)), custom_metadata={_FORMAT: meta})
        m.wait_until_finished()
        if not ok:  # pragma: no cover - guarded above
            raise RuntimeError(f"orbax declined to save step {step} in {directory}")
    _write_manifest(os.path.join(directory, str(step)))


def _no_ckpt(directory, what: str):
    steps = _steps_in(directory) if os.path.isdir(directory) else []
    hint = ""
    if not os.path.isdir(directory):
        hint = " (the directory does not exist)"
    elif _has_ckpt_metadata(directory):
        hint = (" (it holds a single checkpoint: an adapters checkpoint -- use load_adapters() -- or "
                "one step of a run -- pass the run's root directory)")
    return FileNotFoundError(f"{what} in {directory}{hint}; available steps: {steps or 'none'}")


def _template_info(x):
    """(kind, shape, dtype str) of a template leaf."""
    if isinstance(x, (bool, int, float)):
        return "py", (), None
    shape = tuple(getattr(x, "shape", ()))
    dt = getattr(x, "dtype", None)
    if dt is None:
        raise TypeError(f"like: leaf of type {type(x).__name__} is not an array, ShapeDtypeStruct or scalar")
    if _is_typed_key(x):
        return "key", shape, str(dt)
    return ("numpy" if isinstance(x, (np.ndarray, np.generic)) else "jax"), shape, jnp.dtype(dt).name


def _check_template(like_items, records, directory, step):
    saved = {tuple(r["path"]): r for r in records}
    tpl = [c for c, _ in like_items]
    tset = set(tpl)
    where = f"checkpoint {directory} step {step}"
    for c in tpl:
        if c not in saved:
            raise ValueError(f"like: template leaf {_show(c)!r} is not in the {where} "
                             f"(saved leaves start {[_show(r['path']) for r in records[:5]]})")
    for r in records:
        if tuple(r["path"]) not in tset:
            raise ValueError(f"like: the {where} has leaf {_show(r['path'])!r} that the template lacks")
    for c, x in like_items:
        r = saved[c]
        kind, shape, dt = _template_info(x)
        sshape = tuple(r["shape"])
        if (kind == "key") != (r["kind"] == "key"):
            mine = "a typed PRNG key" if kind == "key" else ("a Python scalar" if kind == "py" else f"a {dt} array")
            theirs = "a typed PRNG key" if r["kind"] == "key" else f"a {r['dtype']} array"
            raise ValueError(f"like: leaf {_show(c)!r} is {mine} in the template but {theirs} in the {where}")
        if kind == "py" or r["kind"].startswith("py_"):
            # A Python scalar on either side (``jax.eval_shape`` turns a template's Python scalar
            # into a weakly typed 0-d array): only the shape must agree; the value is cast.
            if sshape != () or shape != ():
                raise ValueError(f"like: leaf {_show(c)!r} mismatch: a Python scalar on one side, template "
                                 f"shape {shape}, the {where} has shape {sshape}")
            continue
        if shape != sshape or dt != r["dtype"]:
            raise ValueError(f"like: leaf {_show(c)!r} mismatch: template has shape {shape} {dt}, the "
                             f"{where} has shape {sshape} {r['dtype']}")


def _restore_target(rec, tleaf=None):
    """Orbax restore target for one stored leaf (np array -> numpy, SDS with sharding -> jax)."""
    shape, kind = tuple(rec["shape"]), rec["kind"]
    if kind == "key":
        return np.zeros(tuple(rec["data_shape"]), np.uint32)
    if kind.startswith("py_"):
        return np.zeros(shape, rec["dtype"])
    if tleaf is None:
        if kind == "numpy":
            return np.zeros(shape, rec["dtype"])
        return jax.ShapeDtypeStruct(shape, jnp.dtype(rec["dtype"]), sharding=_default_sharding())
    if isinstance(tleaf, (bool, int, float, np.ndarray, np.generic)):
        return np.zeros(shape, rec["dtype"])
    sharding = getattr(tleaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
        sharding = _default_sharding()
    return jax.ShapeDtypeStruct(shape, jnp.dtype(rec["dtype"]), sharding=sharding)


def _make_weak(x):
    """``x`` as a weakly typed array (what ``jnp.asarray(1.0)`` or a jitted ``step + 1`` gives).

    Weak typing changes type promotion (weak f32 * bf16 -> bf16, strong f32 * bf16 -> f32) and
    the jit cache key, so it is part of "the same state". JAX has no public constructor for it.
    """
    try:
        from jax._src.lax.lax import _convert_element_type
    except ImportError:  # pragma: no cover - private API moved; fall back to a strong type
        return x
    return _convert_element_type(x, x.dtype, weak_type=True)


def _finish_leaf(rec, value, tleaf=None):
    value = _finish_leaf_inner(rec, value, tleaf)
    want_weak = getattr(tleaf, "weak_type", False) if tleaf is not None else rec.get("weak_type", False)
    if want_weak and isinstance(value, jax.Array) and not value.weak_type and not _is_typed_key(value):
        value = _make_weak(value)
    return value


def _finish_leaf_inner(rec, value, tleaf):
    kind = rec["kind"]
    if kind == "key":
        key = jax.random.wrap_key_data(value, impl=rec["impl"])
        sharding = getattr(tleaf, "sharding", None)
        if isinstance(sharding, jax.sharding.Sharding):
            key = jax.device_put(key, sharding)
        return key
    if tleaf is not None:
        if isinstance(tleaf, (bool, int, float)):
            return type(tleaf)(np.asarray(value).item())
        if isinstance(tleaf, np.generic):
            return np.asarray(value, tleaf.dtype)[()]
        if kind.startswith("py_") and not isinstance(tleaf, np.ndarray):  # Python scalar -> 0-d array
            sharding = getattr(tleaf, "sharding", None)
            return jax.device_put(np.asarray(value).astype(jnp.dtype(tleaf.dtype)),
                                  sharding if isinstance(sharding, jax.sharding.Sharding) else None)
        if kind.startswith("py_"):
            return np.asarray(value, tleaf.dtype)
        return value
    if kind == "py_int":
        return int(np.asarray(value).item())
    if kind == "py_float":
        return float(np.asarray(value).item())
    if kind == "py_bool":
        return bool(np.asarray(value).item())
    return value


def restore_state(directory, step: int | None = None, *, like=None, fallback: bool = False):
    """Restore a state saved by :func:`save_state`.

    Args:
      directory: the checkpoint root given to :func:`save_state`.
      step: which step, an ``int >= 0``; ``None`` = the latest (``latest_step(directory)``).
      like: a template of the state -- the pytree your init code builds, concrete or abstract
        (``jax.eval_shape(init_fn, ...)``). The result then has exactly its structure:
        NamedTuples, typed PRNG keys (re-wrapped with the saved impl), dtypes (bfloat16 too),
        leaf types (``numpy`` template leaves come back as numpy, Python scalars as Python
        scalars, ``jax.Array`` / ``ShapeDtypeStruct`` leaves as ``jax.Array`` on the template
        leaf's sharding, or the default device if it has none). Every template leaf must match
        a saved leaf in path, shape and dtype (no casting), else ``ValueError`` names the first
        differing path.
      fallback: with ``step=None``, restore the newest *intact* step: a damaged newer step is
        skipped with a ``UserWarning`` naming it and the damaged file (the restored state is
        bit-identical to what that older step saved). ``False`` (default): a damaged latest
        step raises :class:`CheckpointCorruptError`.

    Without ``like`` the *raw* form is returned: nested plain ``dict`` s keyed by the path
    components as strings (sequence indices ``"0"``, ``"1"``..., NamedTuple fields by name,
    so an optax state reads ``{"0": {"count": ..., "mu": {...}, "nu": {...}}}``); leaves saved
    from ``jax.Array`` come back as ``jax.Array`` on the default device, numpy leaves as numpy,
    Python scalars as Python scalars, typed PRNG keys as typed keys. Empty containers (e.g.
    optax's ``EmptyState()``) and ``None`` leaves are not stored and do not appear.

    Raises:
      FileNotFoundError: no checkpoint in ``directory``, or ``step`` not saved (the message
        lists the available steps).
      CheckpointCorruptError: (a ``ValueError``) the step's files are damaged (truncated, zeroed,
        missing); the message names the step and the file. With ``fallback=True``: every step is.
      ValueError: the template does not match the checkpoint.
      TypeError: ``directory`` is not a path, ``step`` not an int (e.g. the string ``"4"``).
    """
    directory = _check_directory(directory)
    if step is not None:
        step = _check_step(step)
    fallback = check_bool(fallback, "fallback")
    if fallback and step is not None:
        raise ValueError(f"fallback=True restores the newest intact step and needs step=None, got step={step}; "
                         "drop `step` (or fallback)")
    like_items = treedef = None
    if like is not None:
        like_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
        like_items = [(_components(p), x) for p, x in like_leaves]
    steps = _steps_in(directory) if os.path.isdir(directory) else []
    if not steps:
        raise _no_ckpt(directory, "no training-state checkpoint")
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"step {step} not found in {directory}; available steps: {steps}")
        return _restore_step(directory, step, like_items, treedef)
    if not fallback:
        return _restore_step(directory, steps[-1], like_items, treedef)
    errors = []
    for s in reversed(steps):
        try:
            return _restore_step(directory, s, like_items, treedef)
        except CheckpointCorruptError as e:
            errors.append(str(e))
            warnings.warn(f"restore_state(fallback=True): skipping {e}", UserWarning, stacklevel=2)
    raise CheckpointCorruptError(f"no intact step in {directory} (steps {steps}): " + " | ".join(errors))


def _restore_step(directory: str, step: int, like_items, treedef):
    step_dir = os.path.join(directory, str(step))
    label = f"step {step} in {directory}"
    _verify(step_dir, label)
    ocp = _ocp()
    with _manager(directory, read_only=True) as m:
        try:
            custom = m.metadata(step).custom_metadata
        except Exception as e:  # noqa: BLE001 - orbax/JSON errors here mean damaged files
            raise _corrupt_from(e, label, step_dir) from e
        if not custom:
            raise CheckpointCorruptError(f"{label} is corrupt: file {os.path.join(step_dir, '_CHECKPOINT_METADATA')} "
                                         "holds no lrjax metadata; restore an older step with "
                                         "restore_state(directory, fallback=True)")
        meta = _lrjax_meta(custom, step_dir, "state")
        records = meta["leaves"]
        if like_items is not None:
            _check_template(like_items, records, directory, step)
            tmap = dict(like_items)
        else:
            tmap = {}
        target = _nest([(tuple(r["path"]), _restore_target(r, tmap.get(tuple(r["path"]))))
                        for r in records])
        try:
            raw = m.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # noqa: BLE001 - TensorStore/orbax errors: damaged or missing array files
            raise _corrupt_from(e, label, step_dir) from e
    if like_items is not None:
        rmap = {tuple(r["path"]): r for r in records}
        out = [_finish_leaf(rmap[c], _get_nested(raw, c), x) for c, x in like_items]
        return jax.tree_util.tree_unflatten(treedef, out)
    return _nest([(tuple(r["path"]), _finish_leaf(r, _get_nested(raw, tuple(r["path"]))))
                  for r in records], encode=False)
