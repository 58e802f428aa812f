"""lrjax.checkpoint: adapters + reparam config round trip, training-state save/restore (incl. a
bit-identical resume in a fresh process), and the error messages."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrjax
from lrjax import checkpoint as ck
from lrjax.axes import Axes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bits(x):
    """(dtype, shape, raw bytes) of a leaf: bitwise identity, NaN- and bfloat16-safe."""
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return ("key", str(x.dtype)) + _bits(jax.random.key_data(x))
    a = np.asarray(x)
    return (a.dtype.name, a.shape, a.tobytes())


def _assert_same(t1, t2, types=True):
    """Same structure and bitwise-equal leaves (and, with ``types``, leaf types and weak types)."""
    assert jax.tree.structure(t1) == jax.tree.structure(t2)
    l1, l2 = jax.tree_util.tree_flatten_with_path(t1)[0], jax.tree.leaves(t2)
    for (p, a), b in zip(l1, l2):
        assert _bits(a) == _bits(b), jax.tree_util.keystr(p)
        if types:
            assert type(a) is type(b), (jax.tree_util.keystr(p), type(a), type(b))
            assert getattr(a, "weak_type", False) == getattr(b, "weak_type", False), jax.tree_util.keystr(p)


def _params(dtype=np.float32):
    # numpy, not jax.random: every eager jax op compiles once per shape, which dominates test time
    rng = np.random.default_rng(0)
    mk = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32).astype(dtype))
    return {
        "Dense_0": {"kernel": mk(4, 6), "bias": jnp.zeros(6, dtype)},
        "layers": [{"kernel": mk(6, 4)}],
        "blk.0": {"kernel": mk(4, 6)},  # '.' and '/' in the adapter path
    }


def _np_map(fn, tree):
    """tree_map through numpy (no jax compilation), keeping each leaf's dtype."""
    return jax.tree.map(lambda x: jnp.asarray(fn(np.asarray(x, np.float32)).astype(x.dtype)), tree)


# ------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("case", ["lora", "dora", "lora-bf16", "dora-bf16-factors"])
def test_adapters_roundtrip(tmp_path, case):
    params = _params(jnp.bfloat16 if case == "lora-bf16" else np.float32)
    rp = {"lora": lrjax.LoRA(rank=2, alpha=4.0, targets=("Dense_0/kernel", "layers/.*/kernel", "blk.0/kernel")),
          "dora": lrjax.DoRA(rank=2, rslora=True),
          "lora-bf16": lrjax.LoRA(rank=3, targets=["kernel"]),
          "dora-bf16-factors": lrjax.DoRA(rank=2, dtype=jnp.bfloat16)}[case]
    base, adapters = rp.init(jax.random.key(1), params)
    # make B nonzero so the factors are not trivially reproducible
    adapters = _np_map(lambda x: x + 0.125, adapters)
    assert set(adapters) == {"Dense_0/kernel", "layers/0/kernel", "blk.0/kernel"}

    ck.save_adapters(tmp_path / "ad", adapters, rp=rp, metadata={"epoch": 3, "tags": ["x"]})
    rp2, ad2, meta = ck.load_adapters(tmp_path / "ad", with_metadata=True)

    assert type(rp2) is type(rp) and rp2 == rp
    assert isinstance(rp2.targets, type(rp.targets))
    assert meta == {"epoch": 3, "tags": ["x"]}
    assert list(ad2) == list(adapters)  # insertion order kept
    for p in adapters:
        assert list(ad2[p]) == list(adapters[p])
    _assert_same(adapters, ad2)

    rp3, ad3 = ck.load_adapters(tmp_path / "ad")  # default: (rp, adapters)
    assert rp3 == rp
    _assert_same(adapters, ad3)


def test_adapters_without_rp(tmp_path):
    _, adapters = lrjax.LoRA(rank=2).init(jax.random.key(0), _params())
    ck.save_adapters(str(tmp_path / "ad"), adapters)
    rp, ad = ck.load_adapters(str(tmp_path / "ad"))
    assert rp is None
    _assert_same(adapters, ad)


@pytest.mark.parametrize("rp", [
    lrjax.LoRA(),
    lrjax.RSLoRA(rank=4, alpha=16.0, targets=("Dense_0/kernel", "kernel")),
    lrjax.LoRA(targets=["a", "b"]),  # list -> tuple in __post_init__
    lrjax.DoRA(rank=2, rslora=True, dtype=jnp.bfloat16),
    lrjax.LoRA(dtype=np.float16),
    lrjax.LoRA(dtype=np.dtype("float32")),
    lrjax.PiSSA(rank=2, n_iter=3),
    lrjax.LoRA(axes={"blk/kernel": Axes((0,), (1,), (2, 3)), "kernel": Axes((), (0,), (1,))}),
    lrjax.LoRA(axes=Axes((0,), (1,), (2,))),
    # issue 14: configs with renamed fields (SLTrain's delta -> density, NOBLE's branch -> kind), loaded lazily
    lrjax.SLTrain(rank=2, delta=0.2, seed=3),
    lrjax.PureLowRank(rank=2),
    lrjax.NOBLE(rank=2, branch="gelu"),
    lrjax.HGF(rank=2, warmup_steps=5),
    lrjax.HGF(pure_ternary=True),
])
def test_reparam_config_json_roundtrip(rp):
    cfg = json.loads(json.dumps(ck.reparam_to_json(rp)))  # must be real JSON
    rp2 = ck.reparam_from_json(cfg)
    assert type(rp2) is type(rp) and rp2 == rp
    for f in ("targets", "axes", "dtype"):
        assert type(getattr(rp2, f)) is type(getattr(rp, f)), f
    assert hash(rp2) == hash(rp)  # still usable as a jit static argument


def test_unserializable_rp_raises_at_save(tmp_path):
    _, adapters = lrjax.LoRA(rank=2).init(jax.random.key(0), _params())
    rp = lrjax.LoRA(rank=2, targets=lambda path, leaf: path.endswith("kernel"))
    with pytest.raises(TypeError, match=r"rp\.targets.*callable|rp\.targets.*cannot be stored"):
        ck.save_adapters(tmp_path / "ad", adapters, rp=rp)
    assert not (tmp_path / "ad").exists()

    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class MyLoRA(lrjax.LoRA):
        pass

    with pytest.raises(TypeError, match="not one of the built-in"):
        ck.save_adapters(tmp_path / "ad", adapters, rp=MyLoRA(rank=2))
    with pytest.raises(TypeError, match="JSON"):
        ck.save_adapters(tmp_path / "ad", adapters, metadata={"f": print})
    with pytest.raises(TypeError, match="non-empty dict"):
        ck.save_adapters(tmp_path / "ad", {})


def test_adapters_errors(tmp_path):
    _, adapters = lrjax.LoRA(rank=2).init(jax.random.key(0), _params())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.load_adapters(tmp_path / "missing")
    ck.save_adapters(tmp_path / "ad", adapters)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ck.save_adapters(tmp_path / "ad", adapters)
    doubled = _np_map(lambda x: 2 * x, adapters)
    ck.save_adapters(tmp_path / "ad", doubled, overwrite=True)
    _assert_same(ck.load_adapters(tmp_path / "ad")[1], doubled)
    # a training-state directory is not an adapters checkpoint, and vice versa
    ck.save_state(tmp_path / "run", 1, {"x": jnp.ones(2)})
    with pytest.raises(FileNotFoundError, match=r"restore_state"):
        ck.load_adapters(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"load_adapters"):
        ck.restore_state(tmp_path / "ad")
    with pytest.raises(ValueError, match="'state' checkpoint"):
        ck.load_adapters(tmp_path / "run" / "1")


# ------------------------------------------------------------------------------ state
@jax.jit
def _jax_state(params):
    _, adapters = lrjax.LoRA(rank=2).init(jax.random.key(1), params)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    return {
        "params": params,
        "adapters": jax.tree.map(lambda x: x.astype(jnp.bfloat16), adapters),
        "opt": opt.init(adapters),  # a tuple of NamedTuples (ScaleByAdamState, EmptyState, ...)
        "key": jax.random.key(42),  # typed key
        "raw_key": jax.random.PRNGKey(7),  # raw uint32 key
        "lr": jnp.asarray(0.5),  # weakly typed
        "a.b": jnp.full((2,), 1.0),  # Orbax joins key paths with '.': must not collide ...
        "a": {"b": jnp.full((2,), 2.0)},  # ... with this leaf
    }


def _state():
    return {**_jax_state(_params()), "step": 0, "np": np.arange(3, dtype=np.int32), "none": None}


def test_state_roundtrip_like(tmp_path):
    state = _state()
    ck.save_state(tmp_path, 3, state)
    _assert_same(state, ck.restore_state(tmp_path, like=state))

    out = ck.restore_state(tmp_path, 3, like=jax.eval_shape(_state))  # abstract template
    assert jax.tree.structure(out) == jax.tree.structure(state)
    assert isinstance(out["opt"][1][0], optax.ScaleByAdamState)
    assert out["key"].dtype == state["key"].dtype
    assert out["step"].weak_type and int(out["step"]) == 0  # eval_shape made `step` a weak int32
    assert out["lr"].weak_type
    for p in ("params", "adapters", "opt", "key", "raw_key", "lr", "a.b", "a"):
        _assert_same(state[p], out[p])
    _assert_same(state["np"], out["np"], types=False)  # a jax.Array now, as the template says
    np.testing.assert_array_equal(out["a.b"], 1.0)
    np.testing.assert_array_equal(out["a"]["b"], 2.0)


def test_state_raw_restore(tmp_path):
    state = _state()
    ck.save_state(tmp_path, 0, state)
    raw = ck.restore_state(tmp_path)
    assert set(raw) == {"params", "adapters", "opt", "key", "raw_key", "step", "lr", "np", "a.b", "a"}
    assert raw["step"] == 0 and type(raw["step"]) is int
    assert isinstance(raw["np"], np.ndarray)
    _assert_same(raw["key"], state["key"])
    _assert_same(raw["raw_key"], state["raw_key"])
    _assert_same(raw["lr"], state["lr"])
    # NamedTuples/tuples become dicts keyed by field name / index; EmptyState leaves nothing
    _assert_same(raw["opt"]["1"]["0"]["mu"], state["opt"][1][0].mu)
    _assert_same(raw["opt"]["1"]["0"]["count"], state["opt"][1][0].count)
    _assert_same(raw["adapters"], state["adapters"])
    _assert_same(raw["params"]["layers"]["0"], state["params"]["layers"][0])
    np.testing.assert_array_equal(raw["a.b"], 1.0)
    np.testing.assert_array_equal(raw["a"]["b"], 2.0)


def test_tricky_keys(tmp_path):
    keys = ["", "%", "%25", "a%2Eb", "a.b", "a/b", "ä x/y.z", "kernel"]
    for k in keys:
        enc = ck._encode_key(k)
        assert set(enc) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-%")
        assert ck._decode_key(enc) == k
    assert len({ck._encode_key(k) for k in keys}) == len(keys)
    state = {k: np.full((2,), i, np.float32) for i, k in enumerate(keys)}
    state["a"] = {"b": np.full((2,), 99.0, np.float32)}
    state["ints"] = {0: np.zeros(1, np.float32), 1: np.ones(1, np.float32)}
    ck.save_state(tmp_path, 0, state)
    _assert_same(ck.restore_state(tmp_path, like=state), state)
    raw = ck.restore_state(tmp_path)
    assert raw["ints"]["1"] == 1 and raw["a"]["b"][0] == 99 and raw["a.b"][0] == keys.index("a.b")


def test_steps_max_to_keep_latest(tmp_path):
    assert ck.latest_step(tmp_path / "run") is None and ck.all_steps(tmp_path / "run") == []
    for s in (1, 2, 5):
        ck.save_state(tmp_path / "run", s, {"w": jnp.full((2,), float(s))}, max_to_keep=2)
    assert ck.all_steps(tmp_path / "run") == [2, 5]
    assert ck.latest_step(tmp_path / "run") == 5
    np.testing.assert_array_equal(ck.restore_state(tmp_path / "run")["w"], 5.0)
    np.testing.assert_array_equal(ck.restore_state(tmp_path / "run", 2)["w"], 2.0)

    with pytest.raises(FileExistsError, match=r"step 5 already exists.*\[2, 5\]"):
        ck.save_state(tmp_path / "run", 5, {"w": jnp.zeros(2)})
    ck.save_state(tmp_path / "run", 5, {"w": jnp.zeros(2)}, overwrite=True)
    np.testing.assert_array_equal(ck.restore_state(tmp_path / "run", 5)["w"], 0.0)
    with pytest.raises(ValueError, match="older than the latest step 5"):
        ck.save_state(tmp_path / "run", 3, {"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="older than the latest step 5"):
        ck.save_state(tmp_path / "run", 2, {"w": jnp.zeros(2)}, overwrite=True)
    assert ck.all_steps(tmp_path / "run") == [2, 5]  # nothing deleted by the refused overwrite


def test_state_errors(tmp_path):
    d = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=rf"{d}.*does not exist.*available steps: none"):
        ck.restore_state(d)
    d.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{d}; available steps: none"):
        ck.restore_state(d)
    state = {"adapters": {"Dense_0/kernel": {"a": jnp.ones((4, 2)), "b": jnp.zeros((2, 3))}},
             "key": jax.random.key(0), "step": jnp.int32(3)}
    ck.save_state(d, 10, state)
    ck.save_state(d, 20, state)
    with pytest.raises(FileNotFoundError, match=r"step 15 not found.*\[10, 20\]"):
        ck.restore_state(d, 15)

    bad = {**state, "adapters": {"Dense_0/kernel": {"a": jnp.ones((4, 3)), "b": jnp.zeros((3, 3))}}}
    with pytest.raises(ValueError, match=r"'adapters/Dense_0/kernel/a' mismatch: template has shape \(4, 3\)"):
        ck.restore_state(d, like=bad)
    with pytest.raises(ValueError, match=r"'adapters/Dense_0/kernel/a' mismatch.*bfloat16"):
        ck.restore_state(d, like=jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim == 2 else x, state))
    with pytest.raises(ValueError, match=r"template leaf 'extra' is not in the checkpoint"):
        ck.restore_state(d, like={**state, "extra": jnp.ones(1)})
    with pytest.raises(ValueError, match=r"has leaf 'step' that the template lacks"):
        ck.restore_state(d, like={k: v for k, v in state.items() if k != "step"})
    with pytest.raises(ValueError, match=r"'key' is a uint32 array in the template but a typed PRNG key"):
        ck.restore_state(d, like={**state, "key": jax.random.PRNGKey(0)})

    with pytest.raises(ValueError, match=r"step must be an int >= 0, got -1"):
        ck.save_state(d, -1, state)
    with pytest.raises(TypeError, match="'obj' has type str"):
        ck.save_state(d, 30, {"obj": "hello"})
    with pytest.raises(TypeError, match="abstract"):
        ck.save_state(d, 30, jax.eval_shape(lambda: state))


# ------------------------------------------------------------------------------ resume
_TRAIN = textwrap.dedent(r"""
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    import lrjax
    from lrjax import checkpoint as ck

    mode, ckdir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    rp = lrjax.LoRA(rank=2, alpha=4.0)
    opt = optax.adam(3e-2)
    rng = np.random.default_rng(0)  # numpy, not eager jax ops: each of those compiles (slow on CPU)
    params = {"Dense_0": {"kernel": rng.normal(size=(8, 16)).astype(np.float32), "bias": np.zeros(16, np.float32)},
              "Dense_1": {"kernel": rng.normal(size=(16, 4)).astype(np.float32), "bias": np.zeros(4, np.float32)}}

    def init(params):
        base, adapters = rp.init(jax.random.key(1), params)
        return base, {"adapters": adapters, "opt": opt.init(adapters), "step": 0,
                      "key": jax.random.key(2),          # typed key: dropout
                      "noise_key": jax.random.PRNGKey(3)}  # raw uint32 key: input noise

    base, state0 = jax.jit(init)(params)  # the frozen base is rebuilt identically by every process

    @jax.jit
    def train_step(state):
        key, kdrop = jax.random.split(state["key"])
        nkey, knoise = jax.random.split(state["noise_key"])
        t = state["step"]
        x = jnp.sin(0.1 * jnp.arange(32 * 8, dtype=jnp.float32).reshape(32, 8) + t)  # data from step
        x = x + 0.05 * jax.random.normal(knoise, x.shape)
        y = jnp.cos(x[:, :4] * (1.0 + t % 3))

        def loss(ad):
            p = rp.materialize(base, ad)
            h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
            keep = jax.random.bernoulli(kdrop, 0.8, h.shape)  # dropout
            h = jnp.where(keep, h / 0.8, 0.0)
            return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - y) ** 2)

        g = jax.grad(loss)(state["adapters"])
        upd, opt_state = opt.update(g, state["opt"], state["adapters"])
        return {"adapters": optax.apply_updates(state["adapters"], upd), "opt": opt_state,
                "step": t + 1, "key": key, "noise_key": nkey}

    def dump(state):
        flat, treedef = jax.tree_util.tree_flatten_with_path(state)
        arrs = {}
        for i, (p, x) in enumerate(flat):
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                x = jax.random.key_data(x)
            arrs[f"{i:03d}"] = np.asarray(x)
        names = [jax.tree_util.keystr(p) for p, _ in flat]
        np.savez(out, __treedef__=np.array(str(treedef)), __names__=np.array(names), **arrs)

    if mode == "straight":
        state = state0
        for _ in range(10):
            state = train_step(state)
    elif mode == "first":
        state = state0
        for i in range(1, 6):
            state = train_step(state)
            if i in (3, 5):
                ck.save_state(ckdir, i, state, max_to_keep=1)
    elif mode == "resume":
        assert ck.all_steps(ckdir) == [5], ck.all_steps(ckdir)
        state = ck.restore_state(ckdir, like=jax.eval_shape(init, params)[1])
        assert int(state["step"]) == 5
        for _ in range(5):
            state = train_step(state)
    dump(state)
""")


def test_resume_in_new_process_is_bit_identical(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ckdir, a, b = str(tmp_path / "run"), str(tmp_path / "a.npz"), str(tmp_path / "b.npz")

    def start(mode, out):
        return subprocess.Popen([sys.executable, "-c", _TRAIN, mode, ckdir, out], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(proc):
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, text

    straight, first = start("straight", a), start("first", str(tmp_path / "half.npz"))
    finish(first)
    resume = start("resume", b)
    finish(straight)
    finish(resume)

    with np.load(a) as za, np.load(b) as zb:
        assert str(za["__treedef__"]) == str(zb["__treedef__"])
        names = list(za["__names__"])
        assert names == list(zb["__names__"])
        assert any("mu" in n for n in names) and any("key" in n for n in names)
        arrays = [k for k in za.files if not k.startswith("__")]
        assert len(arrays) == len(names)
        for k, name in zip(sorted(arrays), names):
            x, y = za[k], zb[k]
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert np.array_equal(x, y), f"{name} differs after resume"
        # the run actually trained: the adapters' B factors moved away from zero
        b_idx = [i for i, n in enumerate(names) if "adapters" in n and "'b'" in n]
        assert b_idx and all(np.abs(za[f"{i:03d}"]).max() > 0 for i in b_idx)


# ------------------------------------------------------------------------------ corrupt steps (issue 10)
def _step_state(v):
    rng = np.random.default_rng(v)
    return {"w": jnp.asarray(rng.normal(size=(3, 5)).astype(np.float32)),
            "bf": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16),
            "key": jax.random.key(v), "n": v, "np": np.arange(3, dtype=np.int32) + v}


def _corrupt(step_dir, how) -> str:
    """Damage one step as a crash / disk fault would; returns the file the error must name."""
    if how == "truncate":
        d = os.path.join(step_dir, "default", "ocdbt.process_0", "d")
        f = max((os.path.join(d, n) for n in os.listdir(d)), key=os.path.getsize)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        return f
    if how in ("zero_json", "zero_ckpt_meta"):
        f = os.path.join(step_dir, "default/_METADATA" if how == "zero_json" else "_CHECKPOINT_METADATA")
        n = os.path.getsize(f)
        with open(f, "wb") as fh:
            fh.write(b"\0" * n)
        return f
    if how == "delete_item":
        import shutil
        shutil.rmtree(os.path.join(step_dir, "default"))
        return os.path.join(step_dir, "default") + os.sep
    if how == "delete_file":
        f = os.path.join(step_dir, "default", "manifest.ocdbt")
        os.remove(f)
        return f
    raise AssertionError(how)


CORRUPTIONS = ["truncate", "zero_json", "zero_ckpt_meta", "delete_item", "delete_file"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_latest_step_is_named_and_fallback_restores_previous(tmp_path, how):
    import re
    import warnings

    d = str(tmp_path / "run")
    s0, s4 = _step_state(0), _step_state(4)
    ck.save_state(d, 0, s0)
    ck.save_state(d, 4, s4)
    fname = _corrupt(os.path.join(d, "4"), how)
    pat = rf"step 4 in {re.escape(d)}.*{re.escape(fname)}"
    with pytest.raises(ck.CheckpointCorruptError, match=pat):
        ck.restore_state(d)
    with pytest.raises(ck.CheckpointCorruptError, match=pat):
        ck.restore_state(d, 4, like=s4)
    assert issubclass(ck.CheckpointCorruptError, ValueError)
    assert ck.latest_step(d) == 4 and ck.latest_intact_step(d) == 0
    with pytest.warns(UserWarning, match=r"skipping step 4 in .*" + re.escape(fname)):
        out = ck.restore_state(d, like=s0, fallback=True)
    _assert_same(out, s0)  # bit-identical, leaf types and weak types included
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = ck.restore_state(d, fallback=True)
    _assert_same(raw["w"], s0["w"]) and _assert_same(raw["key"], s0["key"])
    _assert_same(ck.restore_state(d, 0, like=s0), s0)  # the intact step stays readable directly


@pytest.mark.parametrize("how", ["zero_json", "zero_ckpt_meta", "delete_item", "delete_file"])
def test_corrupt_step_without_manifest(tmp_path, how):
    """Steps written before the manifest existed: still a clear error naming the step, and the fallback."""
    import warnings

    d = str(tmp_path / "run")
    s0, s4 = _step_state(0), _step_state(4)
    ck.save_state(d, 0, s0)
    ck.save_state(d, 4, s4)
    for s in ("0", "4"):
        os.remove(os.path.join(d, s, "lrjax_manifest.json"))
    _corrupt(os.path.join(d, "4"), how)
    with pytest.raises(ck.CheckpointCorruptError, match=rf"step 4 in {d}"):
        ck.restore_state(d, like=s4)
    assert ck.latest_intact_step(d) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same(ck.restore_state(d, like=s0, fallback=True), s0)


def test_every_step_corrupt_and_adapters_corrupt(tmp_path):
    import warnings

    d = str(tmp_path / "run")
    ck.save_state(d, 1, _step_state(1))
    _corrupt(os.path.join(d, "1"), "truncate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ck.CheckpointCorruptError, match=r"no intact step .*\[1\]"):
            ck.restore_state(d, fallback=True)
    assert ck.latest_intact_step(d) is None
    _, adapters = lrjax.LoRA(rank=2).init(jax.random.key(0), _params())
    ck.save_adapters(tmp_path / "ad", adapters)
    f = _corrupt(str(tmp_path / "ad"), "zero_ckpt_meta")
    with pytest.raises(ck.CheckpointCorruptError, match=rf"adapters checkpoint .*{f}"):
        ck.load_adapters(tmp_path / "ad")


def test_directory_and_step_arguments(tmp_path):
    state = {"w": np.ones(2, np.float32)}
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"directory=.*file\.txt/ckpt.*lies under .*file\.txt.*regular file"):
        ck.save_state(f / "ckpt", 0, state)
    with pytest.raises(ValueError, match=r"directory=.*file\.txt.*is a regular file"):
        ck.save_state(f, 0, state)
    with pytest.raises(ValueError, match=r"directory=.*lies under"):
        ck.save_adapters(f / "ad", {"x/kernel": {"a": np.ones((2, 1), np.float32)}})
    with pytest.raises(TypeError, match="directory must be a path"):
        ck.restore_state(3)
    d = tmp_path / "run"
    ck.save_state(d, 0, state)
    ck.save_state(d, 4, state)
    with pytest.raises(TypeError, match=r"step must be an int >= 0, got the string '4'; pass int\('4'\)"):
        ck.restore_state(d, "4")
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        ck.restore_state(d, -1)
    with pytest.raises(TypeError, match="step must be an int"):
        ck.save_state(d, 5.0, state)
    with pytest.raises(ValueError, match="fallback=True .* needs step=None"):
        ck.restore_state(d, 4, fallback=True)
    with pytest.raises(TypeError, match="fallback must be True or False"):
        ck.restore_state(d, fallback="yes")
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        ck.save_state(d, 5, state, overwrite=1)
    with pytest.raises(ValueError, match="max_to_keep must be an int >= 1"):
        ck.save_state(d, 5, state, max_to_keep=0)
    assert ck.all_steps(d) == [0, 4]


_SAVER = textwrap.dedent(r"""
    import sys
    import numpy as np
    from lrjax import checkpoint as ck

    for s in range(100000):
        ck.save_state(sys.argv[1], s, {"w": np.full((32, 32), float(s), np.float32), "s": np.int32(s)},
                      max_to_keep=3)
        print(s, flush=True)
""")


@pytest.mark.parametrize("delay", [0.0, 0.037])
def test_sigkill_during_saves_restores_an_intact_step(tmp_path, delay):
    """SIGKILL at an arbitrary moment of a save loop: restore (fallback=True) gives a step's exact state,
    and a plain restore gives the latest step or a CheckpointCorruptError, never a wrong state."""
    import signal
    import time
    import warnings

    d = str(tmp_path / "run")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, d], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        for _ in range(3):  # at least three committed steps
            assert proc.stdout.readline().strip() != ""
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ck.restore_state(d, fallback=True)
    s = int(out["s"])
    assert s >= 2 and s == ck.latest_intact_step(d)
    np.testing.assert_array_equal(out["w"], np.full((32, 32), float(s), np.float32))
    try:
        plain = ck.restore_state(d)
    except ck.CheckpointCorruptError as e:
        assert f"step {ck.latest_step(d)} in {d}" in str(e)
    else:
        t = int(plain["s"])
        np.testing.assert_array_equal(plain["w"], np.full((32, 32), float(t), np.float32))
