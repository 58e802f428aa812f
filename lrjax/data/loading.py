"""Loading datasets as TFDS array_record data sources, and NumPy batching."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.registered import DatasetNotFoundError

from lrjax._validation import check_bool, check_dir, check_int
from lrjax.data.builders import Digits, StdlibChars, StdlibCharsConfig

__all__ = ["BUILDERS", "default_data_dir", "load", "as_arrays", "batches"]

#: The offline builders of this package, by short name.
BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "stdlib_chars": StdlibChars,
    "digits": Digits,
}
_BY_NAME = {**BUILDERS, **{cls.name: cls for cls in BUILDERS.values()}}


def default_data_dir() -> str:
    """``$LRJAX_DATA_DIR`` if set, else ``~/.cache/lrjax/tfds``."""
    env = os.environ.get("LRJAX_DATA_DIR")
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~"), ".cache", "lrjax", "tfds")


def _tfds_default_data_dir() -> str:
    return os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def _our_names() -> str:
    return ", ".join(repr(n) for n in _BY_NAME)


def _as_source(builder, name: str, split):
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError as e:  # Prepared in a format without random access.
        raise ValueError(
            f"dataset {name!r} in data_dir={builder.data_dir!r} is prepared in "
            f"the {builder.info.file_format.value!r} format, which has no "
            "random-access reader; prepare it again with "
            "file_format='array_record' (e.g. `tfds build "
            f"{name} --file_format=array_record`)"
        ) from e
    except ValueError as e:
        splits = sorted(builder.info.splits.keys())
        raise ValueError(
            f"invalid split={split!r} for dataset {name!r} (available splits: "
            f"{splits}; slices such as 'train[:80%]' are allowed): {e}"
        ) from e


def _check_split(split):
    if split is None or isinstance(split, str):
        if isinstance(split, str) and not split:
            raise ValueError("split must be a split name such as 'train', a slice such as 'train[:80%]', "
                             "or None for all splits; got ''")
        return split
    if isinstance(split, (list, tuple)) and split and all(isinstance(x, str) and x for x in split):
        return list(split)
    if isinstance(split, tfds.core.ReadInstruction):
        return split
    raise TypeError(f"split must be a split name such as 'train' (a str, a TFDS slice such as "
                    f"'train[:80%]', a list of them) or None, got {split!r:.60} ({type(split).__name__})")


_OUR_KWARGS = {StdlibChars: ("config", "seq_len", "max_chars"), Digits: ("config",)}


def _load_ours(cls, name, config, split, data_dir, builder_kwargs):
    unknown = sorted(set(builder_kwargs) - set(_OUR_KWARGS[cls]))
    if unknown:
        raise TypeError(f"load({name!r}): unexpected keyword argument(s) {unknown}; this builder takes "
                        f"{list(_OUR_KWARGS[cls])}")
    if config is not None and not isinstance(config, (str, tfds.core.BuilderConfig)):
        raise TypeError(f"config must be a config name (str) or a {cls.__name__} config, got {type(config).__name__}")
    if cls is StdlibChars:
        for k in ("seq_len", "max_chars"):
            if k in builder_kwargs:
                builder_kwargs[k] = check_int(builder_kwargs[k], k, low=1)
        custom = {k: builder_kwargs.pop(k) for k in ("seq_len", "max_chars") if k in builder_kwargs}
        if custom:
            if config is not None:
                raise ValueError(
                    "pass either config or seq_len/max_chars for "
                    f"{name!r}, not both (got config={config!r}, {custom})"
                )
            base = StdlibChars.BUILDER_CONFIGS[0]
            params = {"seq_len": base.seq_len, "max_chars": base.max_chars, **custom}
            config = StdlibCharsConfig(
                name=f"seq{params['seq_len']}_chars{params['max_chars']}", **params
            )
    if config is not None:
        builder_kwargs["config"] = config
    builder = cls(data_dir=data_dir, file_format="array_record", **builder_kwargs)
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return _as_source(builder, name, split)


def load(
    name: str,
    *,
    split: Any = "train",
    data_dir: str | os.PathLike | None = None,
    **builder_kwargs: Any,
):
    """Returns a random-access TFDS data source for a dataset.

    The source supports ``len(source)`` and ``source[i]`` (also iteration);
    each record is a dict of NumPy values. It reads ``array_record`` files,
    which needs no TensorFlow.

    Args:
      name: one of this package's builders, ``'stdlib_chars'`` or
        ``'digits'`` (also by their TFDS names ``'lrjax_stdlib_chars'`` and
        ``'lrjax_digits'``; ``'stdlib_chars/small'`` selects a config), or the
        name of any TFDS dataset (e.g. ``'mnist'``, ``'tiny_shakespeare'``,
        with TFDS' ``'name/config:version'`` syntax) that has already been
        prepared in ``array_record`` format in ``data_dir``.
      split: a split name such as ``'train'`` or ``'test'``, a TFDS slice such
        as ``'train[:80%]'``, or ``None`` for a dict of all splits.
      data_dir: where datasets are cached. Defaults to
        :func:`default_data_dir`. For a TFDS dataset with ``data_dir=None``,
        TFDS' own default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)
        is searched too.
      **builder_kwargs: passed to the builder, e.g. ``config='small'``; for
        ``'stdlib_chars'`` also ``seq_len=`` and ``max_chars=`` to build a
        custom config.

    Our builders are built into ``data_dir`` on first use (a few seconds,
    no network) and read from there afterwards. TFDS datasets are never
    downloaded or built here: when absent, a ``FileNotFoundError`` says how
    to prepare them.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a dataset name (str) such as 'digits', got {type(name).__name__}")
    if not name:
        raise ValueError(f"name must be a non-empty str such as 'digits', got {name!r}")
    split = _check_split(split)
    data_dir = None if data_dir is None else check_dir(data_dir, "data_dir", "a dataset cache directory", expanduser=True)
    given_dir = data_dir
    data_dir = data_dir if data_dir is not None else default_data_dir()

    base, _, config = name.partition("/")
    if base in _BY_NAME:
        if "config" in builder_kwargs:
            if config:
                raise ValueError(f"config given both in name={name!r} and config=")
            config = builder_kwargs.pop("config")
        return _load_ours(
            _BY_NAME[base], name, config or None, split, data_dir, dict(builder_kwargs)
        )

    candidates = [data_dir]
    if given_dir is None and _tfds_default_data_dir() != data_dir:
        candidates.append(_tfds_default_data_dir())
    for directory in candidates:
        try:
            builder = tfds.builder(name, data_dir=directory, **builder_kwargs)
        except DatasetNotFoundError:
            raise ValueError(
                f"unknown dataset name={name!r}: not one of lrjax's builders "
                f"({_our_names()}), not a registered TFDS dataset, and not "
                f"found in data_dir={directory!r}"
            ) from None
        if builder.is_prepared():
            return _as_source(builder, name, split)
    searched = " or ".join(repr(d) for d in candidates)
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data_dir={searched}, and "
        "lrjax.data never downloads. Prepare it once (this needs network "
        "access and, for most TFDS datasets, TensorFlow), e.g.\n"
        f"    tfds build {base} --data_dir={candidates[0]} --file_format=array_record\n"
        "or in Python: tfds.data_source("
        f"{name!r}, data_dir={candidates[0]!r}); then call load again, "
        "passing that data_dir."
    )


# ---------------------------------------------------------------------------
# NumPy helpers.


def _stack(records: list, path: str):
    first = records[0]
    if isinstance(first, Mapping):
        return {k: _stack([r[k] for r in records], f"{path}/{k}") for k in first}
    try:
        return np.stack([np.asarray(r) for r in records])
    except ValueError as e:
        raise ValueError(
            f"as_arrays: cannot stack feature {path.lstrip('/')!r} (records "
            f"differ in shape?): {e}"
        ) from e


def as_arrays(source, keys=None) -> dict[str, np.ndarray]:
    """Reads every record of ``source`` into a dict of stacked NumPy arrays.

    Args:
      source: a data source (anything with ``len`` and integer indexing that
        returns dicts, e.g. the result of :func:`load`), or a dict of arrays,
        which is returned as is (restricted to ``keys``).
      keys: feature names to keep (default: all).

    Returns:
      ``{feature: array}`` with the record index as leading axis.
    """
    if isinstance(keys, str):
        keys = [keys]
    elif keys is not None:
        if not isinstance(keys, (list, tuple, set, frozenset)) or not all(isinstance(k, str) for k in keys):
            raise TypeError(f"keys must be a feature name (str), a list of names or None, got {keys!r:.60}")
        keys = list(keys)
    if isinstance(source, (str, bytes)) or source is None:
        raise TypeError(f"as_arrays: source must be a data source (len + indexing) or a dict of arrays, got "
                        f"{type(source).__name__}")
    if isinstance(source, Mapping):
        arrays = {k: np.asarray(v) for k, v in source.items()}
        available = list(arrays)
    else:
        try:
            n = len(source)
        except TypeError:
            raise TypeError(
                "as_arrays: source must be a data source (len + indexing) or a "
                f"dict of arrays, got {type(source).__name__}"
            ) from None
        if n == 0:
            raise ValueError("as_arrays: source is empty")
        first = source[0]
        if not isinstance(first, Mapping):
            raise ValueError(
                f"as_arrays: records must be dicts, got {type(first).__name__}"
            )
        available = list(first)
        _check_keys(keys, available)
        getitems = getattr(source, "__getitems__", None)
        records = list(getitems(list(range(n)))) if getitems else [source[i] for i in range(n)]
        if keys is not None:
            records = [{k: r[k] for k in keys} for r in records]
        arrays = _stack(records, "")
    if keys is None:
        return arrays
    _check_keys(keys, available)
    return {k: arrays[k] for k in keys}


def _check_keys(keys, available) -> None:
    if keys is None:
        return
    unknown = [k for k in keys if k not in available]
    if unknown or not keys:
        raise ValueError(
            f"keys: unknown or no feature(s) {unknown or list(keys)}; available: {available}"
        )


def _entropy(seed) -> list[int]:
    """Turns an int seed or a JAX PRNG key into entropy for NumPy's RNG."""
    if isinstance(seed, (bool, np.bool_)) or seed is None:
        raise TypeError(f"seed must be an int >= 0 or a JAX PRNG key, got {seed!r}")
    if isinstance(seed, (int, np.integer)):
        return [check_int(seed, "seed", low=0)]
    dtype = getattr(seed, "dtype", None)
    if dtype is None:
        raise TypeError(f"seed must be an int >= 0 or a JAX PRNG key, got {seed!r:.60} ({type(seed).__name__})")
    if "key<" in str(dtype):  # Typed JAX key.
        import jax

        seed = jax.random.key_data(seed)
    arr = np.asarray(seed)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"seed must be an int >= 0 or a JAX PRNG key, got an array of dtype {arr.dtype}")
    if arr.size == 0 or (arr < 0).any():
        raise ValueError(f"seed must be a non-negative int or a JAX PRNG key, got {seed!r}")
    return [int(x) for x in arr.ravel()]


def _check_count(value, arg: str) -> int | None:
    return check_int(value, arg, low=0, allow_none=True)


def batches(
    data,
    batch_size: int,
    *,
    seed=0,
    epochs: int | None = None,
    num_steps: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Iterates over minibatches of a dict of arrays (or a data source).

    Each epoch visits every example once, in an order drawn from
    ``numpy.random.default_rng([*seed, epoch])``, so the sequence of batches
    depends only on ``seed`` (an int or a JAX PRNG key).

    Args:
      data: dict of arrays with a common leading dimension, or a data source
        (read whole with :func:`as_arrays`).
      batch_size: examples per batch, a positive int.
      seed: int or JAX PRNG key for the shuffling.
      epochs: number of passes over the data; ``None`` means one pass
        unless ``num_steps`` is given.
      num_steps: number of batches to yield (continuing over as many epochs
        as needed); with ``epochs`` also given, stops at whichever comes first.
      shuffle: shuffle each epoch (else keep the data order).
      drop_remainder: drop the last batch of an epoch when it is smaller than
        ``batch_size``.

    Returns:
      An iterator of ``{feature: array}`` batches.
    """
    batch_size = check_int(batch_size, "batch_size", low=1)
    epochs = _check_count(epochs, "epochs")
    num_steps = _check_count(num_steps, "num_steps")
    shuffle = check_bool(shuffle, "shuffle")
    drop_remainder = check_bool(drop_remainder, "drop_remainder")
    entropy = _entropy(seed)
    if isinstance(data, (str, bytes)) or not (
        isinstance(data, Mapping) or (hasattr(data, "__len__") and hasattr(data, "__getitem__"))
    ):
        raise TypeError(f"data must be a dict of arrays or a data source (len + indexing), got "
                        f"{type(data).__name__}")
    arrays = as_arrays(data)
    if not arrays:
        raise ValueError("data has no features")
    sizes = {k: len(v) if np.ndim(v) else None for k, v in arrays.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"data: arrays must share a leading dimension, got {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError("data is empty")
    if drop_remainder and batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {n} examples, so with "
            "drop_remainder=True no batch would ever be produced"
        )
    if epochs is None and num_steps is None:
        epochs = 1

    def generate():
        step = 0
        epoch = 0
        while (epochs is None or epoch < epochs) and (num_steps is None or step < num_steps):
            if shuffle:
                order = np.random.default_rng([*entropy, epoch]).permutation(n)
            else:
                order = np.arange(n)
            stop = n - n % batch_size if drop_remainder else n
            for start in range(0, stop, batch_size):
                if num_steps is not None and step >= num_steps:
                    return
                idx = order[start : start + batch_size]
                yield {k: v[idx] for k, v in arrays.items()}
                step += 1
            epoch += 1

    return generate()
