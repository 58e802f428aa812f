"""Offline datasets as TFDS ``array_record`` data sources, without TensorFlow.

This subpackage gives JAX code small, real datasets that need no network and
no TensorFlow:

* ``'stdlib_chars'`` (TFDS name ``lrjax_stdlib_chars``): a character-level
  language-modelling corpus made from Python standard-library source files,
  which exist on every machine that runs Python. Records are windows of
  ``seq_len + 1`` character ids (``'tokens'``, int32) over a 96-symbol
  vocabulary (:data:`VOCAB`; see :func:`encode` / :func:`decode`).
* ``'digits'`` (TFDS name ``lrjax_digits``): scikit-learn's 8x8 handwritten
  digits (``'image'`` uint8 (8, 8), ``'label'``, ``'index'``).

Both are TensorFlow Datasets (TFDS) builders that write ``array_record``
files. TFDS reads those back as random-access data sources (``len`` and
``source[i]``, records decoded to NumPy) without importing TensorFlow, unlike
TFDS' default ``tfrecord`` format and its ``tf.data`` pipelines. They are
built on first use into a cache directory (``$LRJAX_DATA_DIR`` or
``~/.cache/lrjax/tfds``) and reused afterwards.

:func:`load` also opens public TFDS datasets (e.g. ``'mnist'``,
``'tiny_shakespeare'``) that the user has already prepared in
``array_record`` format; it never downloads.

Example::

    from lrjax import data

    train = data.load("digits", split="train")
    arrays = data.as_arrays(train)            # {'image': (1438, 8, 8), ...}
    for batch in data.batches(arrays, 64, seed=0, epochs=2):
        ...

    chars = data.load("stdlib_chars", split="train")
    print(data.decode(chars[0]["tokens"]))

Every public function checks its arguments before reading or writing anything: counts
(``batch_size``, ``epochs``, ``num_steps``, ``seq_len``, ``max_chars``) must be ints in range,
flags (``shuffle``, ``drop_remainder``) real bools, ``seed`` an int >= 0 or a JAX key, ``split``
a str (or list of str, or None), ``data_dir`` a path that is not a file. A value of the wrong
kind raises ``TypeError``, a value out of range ``ValueError``; the message names the argument.
Record values (NaN included) pass through :func:`as_arrays` and :func:`batches` unchanged.
"""

from lrjax.data.builders import (
    STDLIB_FILES,
    VOCAB,
    VOCAB_SIZE,
    Digits,
    StdlibChars,
    StdlibCharsConfig,
    decode,
    encode,
    stdlib_text,
)
from lrjax.data.loading import BUILDERS, as_arrays, batches, default_data_dir, load

__all__ = [
    "BUILDERS",
    "Digits",
    "STDLIB_FILES",
    "StdlibChars",
    "StdlibCharsConfig",
    "VOCAB",
    "VOCAB_SIZE",
    "as_arrays",
    "batches",
    "decode",
    "default_data_dir",
    "encode",
    "load",
    "stdlib_text",
]
