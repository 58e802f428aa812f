import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from lrjax import axes as ax_lib
from lrjax import tree
from lrjax.axes import Axes


def _params():
    return {"enc": {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
                    "attn": {"query": {"kernel": jnp.ones((8, 2, 4))}, "out": {"kernel": jnp.ones((2, 4, 8))}}},
            "layers": [{"kernel": jnp.ones((5, 6))}, {"kernel": jnp.ones((6, 2))}]}


def test_paths_and_select_regex_suffix_and_callable():
    p = _params()
    assert tree.paths(p) == ["enc/Dense_0/bias", "enc/Dense_0/kernel", "enc/attn/out/kernel",
                             "enc/attn/query/kernel", "layers/0/kernel", "layers/1/kernel"]
    assert tree.select(p, "kernel") == [x for x in tree.paths(p) if x.endswith("kernel")]
    assert tree.select(p, r"layers/\d+/kernel") == ["layers/0/kernel", "layers/1/kernel"]
    assert tree.select(p, ["query/kernel", "Dense_0/kernel"]) == ["enc/Dense_0/kernel", "enc/attn/query/kernel"]
    assert tree.select(p, lambda path, x: x.ndim == 3) == ["enc/attn/out/kernel", "enc/attn/query/kernel"]


def test_select_typo_lists_nearest():
    with pytest.raises(ValueError, match=r"'Dense_O/kernel'.*matches no leaf.*enc/Dense_0/kernel"):
        tree.select(_params(), "Dense_O/kernel")
    with pytest.raises(ValueError, match="'qery'"):  # one bad pattern among good ones
        tree.select(_params(), ["kernel", "qery"])
    with pytest.raises(TypeError, match="targets"):
        tree.select(_params(), 3)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        tree.select(_params(), "(")


def test_replace_and_get():
    p = _params()
    q = tree.replace(p, {"layers/1/kernel": jnp.zeros((6, 2))})
    assert float(tree.get(q, "layers/1/kernel").sum()) == 0.0
    assert float(tree.get(p, "layers/1/kernel").sum()) == 12.0
    with pytest.raises(KeyError, match="nearest"):
        tree.replace(p, {"layers/2/kernel": 0})


def test_linen_and_nnx_paths_agree():
    class L(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="fc")(x)

    lp = L().init(jax.random.key(0), jnp.ones((1, 4)))["params"]

    class N(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 3, rngs=rngs)

    _, st = nnx.split(N(nnx.Rngs(0)), nnx.Param)
    assert tree.paths(lp) == tree.paths(st) == ["fc/bias", "fc/kernel"]


@pytest.mark.parametrize("path,shape,want", [
    ("Dense_0/kernel", (4, 3), Axes((), (0,), (1,))),
    ("attn/query/kernel", (8, 2, 4), Axes((), (0,), (1, 2))),
    ("attn/out/kernel", (2, 4, 8), Axes((), (0, 1), (2,))),
    ("ScanLayers/kernel", (3, 4, 5), Axes((0,), (1,), (2,))),
    # torch-style names are 2-D Dense layers in Flax ports: a 3-D leaf of that name is a scanned stack
    ("layers/q/kernel", (3, 8, 8), Axes((0,), (1,), (2,))),
    ("layers/o_proj/kernel", (3, 8, 8), Axes((0,), (1,), (2,))),
    ("layers/qkv/kernel", (8, 3, 8), Axes((), (0,), (1, 2))),
    ("Conv_0/kernel", (3, 3, 2, 5), Axes((), (0, 1, 2), (3,))),
])
def test_default_axes(path, shape, want):
    assert ax_lib.resolve(path, shape) == want


def test_axes_override_and_roundtrip():
    x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
    a = Axes(batch=(1,), inp=(3, 0), out=(2,))
    m = ax_lib.to_matrix(x, a)
    assert m.shape == (3, 10, 4)
    np.testing.assert_array_equal(ax_lib.from_matrix(m, a, x.shape), x)
    # element check: m[b, i5*2 + i0, o] == x[i0, b, o, i5]
    assert m[1, 3 * 2 + 1, 2] == x[1, 1, 2, 3]
    assert ax_lib.resolve("x/kernel", (4, 3), {"x/.*": Axes((), (1,), (0,))}) == Axes((), (1,), (0,))
    with pytest.raises(ValueError, match="exactly once"):
        ax_lib.resolve("x", (4, 3), Axes((), (0,), (0,)))
    with pytest.raises(ValueError, match="needs a matrix"):
        ax_lib.resolve("fc/bias", (3,))
