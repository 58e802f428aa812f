"""Tests of lrjax.data: real TFDS builds into temporary directories, no mocks."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lrjax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_SEQ, SMALL_CHARS = 32, 20_000


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both datasets built once per module (per xdist worker) in a private dir."""
    root = tmp_path_factory.mktemp("lrjax_data")
    return {
        "dir": root,
        "chars_train": data.load("stdlib_chars", config="small", split="train", data_dir=root),
        "chars_test": data.load("stdlib_chars/small", split="test", data_dir=root),
        "digits_train": data.load("digits", split="train", data_dir=root),
        "digits_test": data.load("lrjax_digits", split="test", data_dir=root),
    }


# ---------------------------------------------------------------------------
# Vocabulary.


def test_vocab_layout():
    assert data.VOCAB_SIZE == len(data.VOCAB) == 96
    assert data.VOCAB[0] == "\n" and data.VOCAB[1] == " " and data.VOCAB[-1] == "~"
    assert list(data.VOCAB) == sorted(data.VOCAB)
    np.testing.assert_array_equal(data.encode(data.VOCAB), np.arange(96))


@given(st.text(alphabet=data.VOCAB, max_size=200))
def test_encode_decode_round_trip(s):
    ids = data.encode(s)
    assert ids.dtype == np.int32 and ids.shape == (len(s),)
    assert data.decode(ids) == s
    assert data.decode(list(ids)) == s


def test_encode_decode_errors():
    with pytest.raises(ValueError, match=r"'\\t' at position 1"):
        data.encode("a\tb")
    assert data.decode(data.encode("a\tbé\r\nc", errors="ignore")) == "ab\nc"
    with pytest.raises(ValueError, match="errors"):
        data.encode("a", errors="replace")
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        data.decode([0, 96])
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        data.decode([-1])
    with pytest.raises(ValueError, match="1-D"):
        data.decode(np.zeros((2, 2), np.int32))
    with pytest.raises(TypeError, match="ids must be integers"):  # wrong kind: TypeError (issue 10)
        data.decode([1.0])
    assert data.decode([]) == ""


# ---------------------------------------------------------------------------
# The character corpus.


def test_stdlib_chars_records(built):
    train, test = built["chars_train"], built["chars_test"]
    ids = data.encode(data.stdlib_text(SMALL_CHARS))
    assert len(ids) == SMALL_CHARS
    n_train = int(0.9 * SMALL_CHARS)
    assert len(train) == (n_train - 1) // SMALL_SEQ
    assert len(test) == (SMALL_CHARS - n_train - 1) // SMALL_SEQ
    for source, part in ((train, ids[:n_train]), (test, ids[n_train:])):
        arrays = data.as_arrays(source)
        assert list(arrays) == ["tokens"]
        tokens = arrays["tokens"]
        assert tokens.dtype == np.int32 and tokens.shape == (len(source), SMALL_SEQ + 1)
        assert tokens.min() >= 0 and tokens.max() < data.VOCAB_SIZE
        # Window k starts at character k * seq_len: consecutive windows share one id.
        expected = np.stack(
            [part[k * SMALL_SEQ : k * SMALL_SEQ + SMALL_SEQ + 1] for k in range(len(source))]
        )
        np.testing.assert_array_equal(tokens, expected)
        np.testing.assert_array_equal(source[1]["tokens"], expected[1])
    # The text is the beginning of the first file of the corpus.
    first_file = data.STDLIB_FILES[0]
    import sysconfig

    with open(os.path.join(sysconfig.get_paths()["stdlib"], first_file), encoding="utf-8") as f:
        head = f.read(SMALL_SEQ + 1)
    if all(c in data.VOCAB for c in head):
        assert data.decode(train[0]["tokens"]) == head


def test_stdlib_chars_build_is_deterministic(built, tmp_path):
    again = data.load("stdlib_chars/small", split="train", data_dir=tmp_path)
    np.testing.assert_array_equal(
        data.as_arrays(again)["tokens"], data.as_arrays(built["chars_train"])["tokens"]
    )
    name = "lrjax_stdlib_chars-train.array_record-00000-of-00001"
    rel = os.path.join("lrjax_stdlib_chars", "small", "1.0.0", name)
    with open(tmp_path / rel, "rb") as a, open(built["dir"] / rel, "rb") as b:
        assert a.read() == b.read()


def test_stdlib_chars_custom_config_is_cached(tmp_path):
    src = data.load("stdlib_chars", seq_len=8, max_chars=1_000, data_dir=tmp_path)
    prepared = tmp_path / "lrjax_stdlib_chars" / "seq8_chars1000" / "1.0.0"
    assert (prepared / "dataset_info.json").exists()
    assert len(src) == (900 - 1) // 8 and src[0]["tokens"].shape == (9,)
    mtime = os.path.getmtime(prepared / "dataset_info.json")
    again = data.load("lrjax_stdlib_chars", seq_len=8, max_chars=1_000, data_dir=tmp_path, split="test")
    assert os.path.getmtime(prepared / "dataset_info.json") == mtime  # Not rebuilt.
    assert len(again) == (100 - 1) // 8


def test_stdlib_chars_config_errors(tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        data.load("stdlib_chars", seq_len=0, data_dir=tmp_path)
    with pytest.raises(ValueError, match="max_chars"):
        data.load("stdlib_chars", seq_len=64, max_chars=100, data_dir=tmp_path)
    with pytest.raises(ValueError, match="not both"):
        data.load("stdlib_chars", config="small", seq_len=8, data_dir=tmp_path)
    with pytest.raises(ValueError, match="max_chars"):
        data.stdlib_text(0)


# ---------------------------------------------------------------------------
# Digits.


def test_digits_match_sklearn(built):
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = np.arange(len(digits.target))
    for split, mask in (("train", rows % 5 != 4), ("test", rows % 5 == 4)):
        source = built[f"digits_{split}"]
        assert len(source) == mask.sum()
        arrays = data.as_arrays(source)
        assert arrays["image"].dtype == np.uint8 and arrays["image"].shape == (len(source), 8, 8)
        np.testing.assert_array_equal(arrays["index"], rows[mask])
        np.testing.assert_array_equal(arrays["image"], digits.images[mask])
        np.testing.assert_array_equal(arrays["label"], digits.target[mask])
    assert len(built["digits_train"]) == 1438 and len(built["digits_test"]) == 359
    record = built["digits_test"][0]
    assert int(record["index"]) == 4 and int(record["label"]) == digits.target[4]


def test_as_arrays_keys(built):
    arrays = data.as_arrays(built["digits_test"], keys=("image", "label"))
    assert list(arrays) == ["image", "label"]
    assert data.as_arrays(built["digits_test"], keys="label")["label"].shape == (359,)
    with pytest.raises(ValueError, match="keys.*'pixels'"):
        data.as_arrays(built["digits_test"], keys=["pixels"])
    assert list(data.as_arrays(arrays, keys=["label"])) == ["label"]
    with pytest.raises(TypeError, match="source"):  # wrong kind: TypeError (issue 10)
        data.as_arrays(42)


# ---------------------------------------------------------------------------
# load(): names, splits, TFDS datasets.


def test_load_bad_name_and_split(built, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset.*'stdlib_chars'.*'digits'"):
        data.load("no_such_dataset_xyz", data_dir=tmp_path)
    with pytest.raises(ValueError, match="name"):
        data.load("", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"split='validation'.*'digits'.*\['test', 'train'\]"):
        data.load("digits", split="validation", data_dir=built["dir"])
    # TFDS slicing and split=None pass through.
    assert len(data.load("digits", split="train[:10]", data_dir=built["dir"])) == 10
    both = data.load("digits", split=None, data_dir=built["dir"])
    assert sorted(both) == ["test", "train"] and len(both["test"]) == 359


@pytest.mark.parametrize("name", ["mnist", "tiny_shakespeare"])
def test_load_absent_tfds_dataset_raises(name, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.load(name, data_dir=tmp_path)
    message = str(info.value)
    assert repr(name) in message and str(tmp_path) in message
    assert "array_record" in message and "never downloads" in message
    assert not (tmp_path / name).exists() or not any((tmp_path / name).rglob("*.array_record*"))


def test_default_data_dirs(tmp_path, monkeypatch):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    monkeypatch.setenv("LRJAX_DATA_DIR", str(ours))
    monkeypatch.setenv("TFDS_DATA_DIR", str(theirs))
    assert data.default_data_dir() == str(ours)
    with pytest.raises(FileNotFoundError, match=f"{ours}.*{theirs}"):
        data.load("mnist")
    monkeypatch.delenv("LRJAX_DATA_DIR")
    assert data.default_data_dir() == os.path.join(os.path.expanduser("~"), ".cache", "lrjax", "tfds")


_EXTERNAL = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow_datasets as tfds

    out, ours = sys.argv[1], sys.argv[2]

    class LrjaxTestExternal(tfds.core.GeneratorBasedBuilder):
        # A dataset prepared outside lrjax; the test process reads it by name.
        VERSION = tfds.core.Version("2.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"x": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                     "y": tfds.features.ClassLabel(num_classes=4)}),
                disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12), "validation": self._generate_examples(5)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"x": np.full(3, i, np.float32), "y": i % 4}

    LrjaxTestExternal(data_dir=out, file_format="array_record").download_and_prepare()

    from lrjax import data

    chars = data.load("stdlib_chars", seq_len=16, max_chars=2000, data_dir=ours)
    digits = data.load("digits", split="test", data_dir=ours)
    batch = next(data.batches(digits, 7, seed=1))
    ext = data.load("lrjax_test_external", split="validation", data_dir=out)
    print(json.dumps({
        "tensorflow": sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")),
        "chars": [len(chars), list(chars[0]["tokens"].shape)],
        "digits": list(batch["image"].shape),
        "ext": len(ext),
    }))
    """
)


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """Runs _EXTERNAL in a fresh interpreter: prepares a non-lrjax dataset, loads ours."""
    root = tmp_path_factory.mktemp("external")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-c", _EXTERNAL, str(root / "ext"), str(root / "ours")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_tensorflow_needed(external):
    _, report = external
    assert report["tensorflow"] == []
    assert report["chars"] == [(1800 - 1) // 16, [17]]
    assert report["digits"] == [7, 8, 8]
    assert report["ext"] == 5


def test_load_prepared_tfds_dataset_by_name(external):
    root, _ = external
    source = data.load("lrjax_test_external", split="train", data_dir=root / "ext")
    assert len(source) == 12
    arrays = data.as_arrays(source)
    np.testing.assert_array_equal(arrays["x"], np.repeat(np.arange(12, dtype=np.float32), 3).reshape(12, 3))
    np.testing.assert_array_equal(arrays["y"], np.arange(12) % 4)
    with pytest.raises(ValueError, match="split='test'.*'lrjax_test_external'"):
        data.load("lrjax_test_external", split="test", data_dir=root / "ext")


# ---------------------------------------------------------------------------
# batches().


def _toy(n=10):
    return {"x": np.arange(n * 2).reshape(n, 2), "y": np.arange(n)}


def test_batches_shapes_and_epochs():
    out = list(data.batches(_toy(), 3, seed=0, epochs=2))
    assert len(out) == 6  # 3 full batches per epoch, remainder dropped.
    assert all(b["x"].shape == (3, 2) and b["y"].shape == (3,) for b in out)
    for epoch in (out[:3], out[3:]):
        ys = np.concatenate([b["y"] for b in epoch])
        assert len(set(ys.tolist())) == 9  # No repeats within an epoch.
    for b in out:
        np.testing.assert_array_equal(b["x"], np.stack([2 * b["y"], 2 * b["y"] + 1], 1))
    keep = list(data.batches(_toy(), 3, shuffle=False, drop_remainder=False))
    assert [b["y"].tolist() for b in keep] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert len(list(data.batches(_toy(), 4, num_steps=7))) == 7
    assert len(list(data.batches(_toy(), 4, num_steps=7, epochs=2))) == 4
    assert len(list(data.batches(_toy(), 4, num_steps=0))) == 0


def test_batches_deterministic_by_seed(built):
    def ys(seed):
        return [b["y"].tolist() for b in data.batches(_toy(50), 8, seed=seed, epochs=3)]

    assert ys(0) == ys(0)
    assert ys(0) != ys(1)
    a = [b["label"] for b in data.batches(built["digits_test"], 32, seed=5, num_steps=20)]
    b = [b["label"] for b in data.batches(data.as_arrays(built["digits_test"]), 32, seed=5, num_steps=20)]
    assert len(a) == 20 and all(np.array_equal(u, v) for u, v in zip(a, b))
    import jax

    k1 = [b["y"].tolist() for b in data.batches(_toy(50), 8, seed=jax.random.key(3))]
    k2 = [b["y"].tolist() for b in data.batches(_toy(50), 8, seed=jax.random.PRNGKey(3))]
    assert k1 == k2 and len(k1) == 6


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": -2}, ValueError, "batch_size"),
        ({"batch_size": 2.0}, TypeError, "batch_size"),  # wrong kinds are TypeErrors (issue 10)
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"batch_size": 11}, ValueError, "batch_size=11"),
        ({"batch_size": 2, "epochs": -1}, ValueError, "epochs"),
        ({"batch_size": 2, "num_steps": 1.5}, TypeError, "num_steps"),
        ({"batch_size": 2, "seed": -1}, ValueError, "seed"),
        ({"batch_size": 2, "seed": "abc"}, TypeError, "seed"),
        ({"batch_size": 2, "shuffle": "no"}, TypeError, "shuffle must be True or False"),
        ({"batch_size": 2, "drop_remainder": 0}, TypeError, "drop_remainder must be True or False"),
    ],
)
def test_batches_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        data.batches(_toy(), **kwargs)  # Raised eagerly, before iterating.


def test_batches_mismatched_arrays():
    with pytest.raises(ValueError, match="leading dimension"):
        data.batches({"x": np.zeros(4), "y": np.zeros(5)}, 2)
    assert len(list(data.batches(_toy(), 11, drop_remainder=False))) == 1
