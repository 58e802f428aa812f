"""TFDS dataset builders for two small datasets that need no download.

Both builders are ordinary :class:`tfds.core.GeneratorBasedBuilder` subclasses,
registered with TFDS under the names ``lrjax_stdlib_chars`` and
``lrjax_digits``. They write ``array_record`` files, which TFDS reads back as
random-access data sources (``builder.as_data_source(split)``) returning plain
NumPy records. Neither writing nor reading these files imports TensorFlow: the
records are serialized with the protobuf definitions bundled in
``tensorflow_datasets`` and stored with the ``array_record`` package. (The
``tfrecord`` format, TFDS' default, would need TensorFlow to read.)

To stay on TFDS' TensorFlow-free path the features are only
``tfds.features.Tensor`` and ``tfds.features.ClassLabel``; for example,
``tfds.features.Image`` would need TensorFlow to encode PNG images from arrays.

``lrjax_stdlib_chars``
    A character-level language-modelling corpus made from a fixed list of
    source files of the Python standard library (:data:`STDLIB_FILES`), so the
    text is available on every machine that runs Python. Characters outside
    :data:`VOCAB` (the 95 printable ASCII characters plus ``'\\n'``) are
    dropped, tabs become four spaces, and the files are joined in the order
    of :data:`STDLIB_FILES` and cut to ``max_chars`` characters. The first 90%
    of that stream is the ``train`` split, the last 10% the ``test`` split.
    Each split is cut into windows of ``seq_len + 1`` ids with a stride of
    ``seq_len`` (window ``k`` starts at character ``k * seq_len``), so
    ``tokens[:-1]`` / ``tokens[1:]`` are the inputs / targets and every
    character after the first is a target exactly once. Records keep that
    order: ``source[k]`` is window ``k``. The text depends on the Python
    version whose standard library is read, so the corpus is deterministic
    for a given Python version, not across versions.

``lrjax_digits``
    scikit-learn's copy of the UCI handwritten digits (1797 images of 8x8
    pixels with values 0..16), from ``sklearn.datasets.load_digits``, which
    ships with scikit-learn. Record fields: ``image`` (uint8, shape (8, 8),
    the exact sklearn values), ``label`` (ClassLabel, 10 classes) and
    ``index`` (int64, the row in ``load_digits()``). Rows with
    ``index % 5 == 4`` form the ``test`` split (359 images), all other rows
    the ``train`` split (1438 images); within each split records keep
    increasing ``index`` order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

from lrjax._validation import check_choice, check_int

__all__ = [
    "VOCAB",
    "VOCAB_SIZE",
    "STDLIB_FILES",
    "encode",
    "decode",
    "stdlib_text",
    "StdlibCharsConfig",
    "StdlibChars",
    "Digits",
]

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Character vocabulary.

#: The character vocabulary: ``'\n'`` (id 0) followed by the 95 printable
#: ASCII characters from ``' '`` (id 1) to ``'~'`` (id 95), i.e. ids follow
#: the order of the character codes.
VOCAB: str = "\n" + "".join(chr(c) for c in range(32, 127))
#: Number of symbols in :data:`VOCAB` (96).
VOCAB_SIZE: int = len(VOCAB)

_CHAR_TO_ID = np.full(128, -1, dtype=np.int32)
for _i, _ch in enumerate(VOCAB):
    _CHAR_TO_ID[ord(_ch)] = _i
del _i, _ch
_ID_TO_BYTE = np.frombuffer(VOCAB.encode("ascii"), dtype=np.uint8)


def encode(text: str, *, errors: str = "strict") -> np.ndarray:
    """Maps a string to an int32 array of ids in ``[0, VOCAB_SIZE)``.

    Args:
      text: the string to encode.
      errors: ``'strict'`` raises ``ValueError`` on a character outside
        :data:`VOCAB`; ``'ignore'`` drops such characters.

    Returns:
      A 1-D ``np.int32`` array with one id per kept character.
    """
    if not isinstance(text, str):
        raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
    check_choice(errors, "errors", ("strict", "ignore"))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    ids = np.where(codes < 128, _CHAR_TO_ID[np.minimum(codes, 127)], -1)
    bad = ids < 0
    if bad.any():
        if errors == "strict":
            pos = int(np.argmax(bad))
            raise ValueError(
                f"encode: character {text[pos]!r} at position {pos} is not in "
                "the vocabulary (printable ASCII and '\\n'); pass "
                "errors='ignore' to drop such characters"
            )
        ids = ids[~bad]
    return ids.astype(np.int32)


def decode(ids) -> str:
    """Maps a 1-D sequence of ids in ``[0, VOCAB_SIZE)`` back to a string.

    ``ids``: a 1-D integer array (NumPy or JAX) or a list/tuple of ints; anything else raises
    ``TypeError``, ids outside ``[0, VOCAB_SIZE)`` or another rank ``ValueError``.
    """
    if isinstance(ids, (str, bytes, dict, set)) or ids is None or np.isscalar(ids):
        raise TypeError(f"decode: ids must be a 1-D array or list of ints, got {type(ids).__name__}")
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError):
        raise TypeError(f"decode: ids must be a 1-D array or list of ints, got {type(ids).__name__} "
                        "that is not a regular array") from None
    if arr.ndim != 1:
        raise ValueError(f"decode: ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return ""
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"decode: ids must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= VOCAB_SIZE:
        raise ValueError(
            f"decode: ids must lie in [0, {VOCAB_SIZE}), got values in "
            f"[{arr.min()}, {arr.max()}]"
        )
    return _ID_TO_BYTE[arr].tobytes().decode("ascii")


# ---------------------------------------------------------------------------
# Character corpus from the standard library.

#: Standard-library source files (relative to ``sysconfig``'s ``stdlib``
#: directory) that make up the character corpus, in corpus order. All of them
#: are plain modules in every CPython from 3.11 on.
STDLIB_FILES: tuple[str, ...] = tuple(
    sorted(
        [
            "argparse.py",
            "ast.py",
            "bisect.py",
            "calendar.py",
            "collections/__init__.py",
            "configparser.py",
            "contextlib.py",
            "copy.py",
            "csv.py",
            "dataclasses.py",
            "difflib.py",
            "enum.py",
            "fractions.py",
            "functools.py",
            "heapq.py",
            "inspect.py",
            "json/__init__.py",
            "json/decoder.py",
            "json/encoder.py",
            "locale.py",
            "logging/__init__.py",
            "optparse.py",
            "pprint.py",
            "random.py",
            "shlex.py",
            "shutil.py",
            "statistics.py",
            "subprocess.py",
            "tempfile.py",
            "textwrap.py",
            "threading.py",
            "tokenize.py",
            "typing.py",
        ]
    )
)


def stdlib_text(max_chars: int | None = None) -> str:
    """Returns the character corpus text (already restricted to :data:`VOCAB`).

    The files in :data:`STDLIB_FILES` are read from this interpreter's
    standard library, tabs are replaced by four spaces, characters outside
    :data:`VOCAB` are dropped, and the files are concatenated (each ending in
    ``'\\n'``). The result is cut to ``max_chars`` characters when given.
    """
    max_chars = check_int(max_chars, "max_chars", low=1, allow_none=True)
    root = sysconfig.get_paths()["stdlib"]
    parts: list[str] = []
    total = 0
    missing = []
    for rel in STDLIB_FILES:
        path = os.path.join(root, *rel.split("/"))
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                raw = f.read()
        except FileNotFoundError:
            missing.append(rel)
            continue
        ids = encode(raw.replace("\t", "    "), errors="ignore")
        text = decode(ids)
        if not text.endswith("\n"):
            text += "\n"
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    if missing:
        _log.warning("lrjax.data: standard-library files not found in %s: %s", root, missing)
    if not parts:
        raise FileNotFoundError(
            f"none of the standard-library source files {list(STDLIB_FILES)} "
            f"were found under {root!r}; this Python installation ships no "
            "stdlib sources"
        )
    text = "".join(parts)
    return text if max_chars is None else text[:max_chars]


@dataclasses.dataclass(eq=False)
class StdlibCharsConfig(tfds.core.BuilderConfig):
    """Config of :class:`StdlibChars`.

    Attributes:
      seq_len: number of input positions per example; records hold
        ``seq_len + 1`` ids.
      max_chars: the corpus is cut to this many characters before splitting.

    The config ``name`` names the directory the data is cached under, so a
    name must always be used with the same ``seq_len`` and ``max_chars``.
    """

    seq_len: int = 128
    max_chars: int = 1_000_000

    def __post_init__(self):
        for field in ("seq_len", "max_chars"):
            object.__setattr__(self, field, check_int(getattr(self, field), field, low=1))
        # 10% of the characters go to the test split, which needs a window.
        min_chars = 10 * (self.seq_len + 1) + 10
        if self.max_chars < min_chars:
            raise ValueError(
                f"max_chars={self.max_chars} is too small for seq_len="
                f"{self.seq_len}: need at least {min_chars} so the test split "
                "(last 10%) holds one window"
            )


class StdlibChars(tfds.core.GeneratorBasedBuilder):
    """Character windows of Python standard-library source (see module doc)."""

    name = "lrjax_stdlib_chars"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        StdlibCharsConfig(
            name="default",
            seq_len=128,
            max_chars=1_000_000,
            description="128 + 1 ids per record, first 1,000,000 characters.",
        ),
        StdlibCharsConfig(
            name="small",
            seq_len=32,
            max_chars=20_000,
            description="32 + 1 ids per record, first 20,000 characters (tests).",
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"
    # TFDS would otherwise locate this file through the `importlib_resources`
    # backport (not installed, not needed) to look for download checksums.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Character-level corpus from Python standard-library source "
                f"files; vocabulary of {VOCAB_SIZE} symbols ('\\n' and printable "
                f"ASCII). Records: 'tokens', int32[{cfg.seq_len + 1}]. Train: "
                "first 90% of the text, test: last 10%."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "tokens": tfds.features.Tensor(
                        shape=(cfg.seq_len + 1,), dtype=np.int32
                    )
                }
            ),
            homepage="https://docs.python.org/3/library/",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        cfg = self.builder_config
        ids = encode(stdlib_text(cfg.max_chars))
        n_train = int(len(ids) * 0.9)
        parts = {"train": ids[:n_train], "test": ids[n_train:]}
        for split, part in parts.items():
            if len(part) < cfg.seq_len + 1:
                raise ValueError(
                    f"the {split} split has only {len(part)} characters, fewer "
                    f"than seq_len + 1 = {cfg.seq_len + 1}; increase max_chars"
                )
        return {
            split: self._generate_examples(part, cfg.seq_len)
            for split, part in parts.items()
        }

    def _generate_examples(self, ids: np.ndarray, seq_len: int):
        num = (len(ids) - 1) // seq_len
        for k in range(num):
            yield k, {"tokens": ids[k * seq_len : k * seq_len + seq_len + 1]}


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (see module doc)."""

    name = "lrjax_digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    code_path = None  # See StdlibChars.code_path.

    #: Rows of ``load_digits()`` with ``index % TEST_EVERY == TEST_EVERY - 1``
    #: are test rows.
    TEST_EVERY = 5

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Handwritten digits from sklearn.datasets.load_digits: 8x8 "
                "images with pixel values 0..16 (uint8), labels 0..9, and the "
                "row index in load_digits(). Rows with index % 5 == 4 are the "
                "test split, the others the train split."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(
                        names=[str(i) for i in range(10)]
                    ),
                    "index": tfds.features.Tensor(shape=(), dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            citation=(
                "E. Alpaydin and C. Kaynak. Optical Recognition of Handwritten "
                "Digits. UCI Machine Learning Repository, 1998."
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships with sklearn.
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images
        labels = digits.target
        index = np.arange(len(labels))
        is_test = index % self.TEST_EVERY == self.TEST_EVERY - 1
        return {
            "train": self._generate_examples(images, labels, index[~is_test]),
            "test": self._generate_examples(images, labels, index[is_test]),
        }

    def _generate_examples(self, images, labels, rows):
        for row in rows:
            image = images[row]
            if not np.array_equal(image, np.round(image)) or image.min() < 0 or image.max() > 255:
                raise ValueError(f"digits row {row}: pixel values are not uint8 integers")
            yield int(row), {
                "image": image.astype(np.uint8),
                "label": int(labels[row]),
                "index": np.int64(row),
            }
