"""Sharded training (lrjax.sharding): the FSDP rule, optimizer-state shardings that follow the params,
bad input; and one run of ``experiments/sharded_training.py --quick`` (its four workers: 1 device,
8 forced host devices, 2 processes joined by jax.distributed on 127.0.0.1) in which LoRA and every
lrjax.optim transformation train on sharded params/state and match one device to float32 tolerance.

The rule tests plan shardings on a ``jax.sharding.AbstractMesh`` of 8 devices (no devices needed)."""
import fcntl
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

import lrjax
from lrjax import sharding as S
from lrjax.optim.lora_pro import lora_pro

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_sharded_training", ROOT / "experiments" / "sharded_training.py")
_exp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_exp)          # stdlib imports only at module level
PAIR_QUICK = _exp.PAIR_QUICK
MESH = AbstractMesh((8,), ("fsdp",))
ABS = jax.ShapeDtypeStruct


def _params():
    f = lambda *s: ABS(s, jnp.float32)  # noqa: E731
    return {"inp": {"kernel": f(16, 32)}, "layers": {"0": {"kernel": f(32, 32), "bias": f(32)}},
            "head": {"kernel": f(32, 8)}, "odd": f(12, 6), "step": ABS((), jnp.int32)}


def _specs(tree):
    return {k: v.spec for k, v in lrjax.tree.flatten(tree).items()}


def test_fsdp_rule_and_rules():
    sh = _specs(S.fsdp_shardings(_params(), MESH, min_size=32))
    assert sh == {"inp/kernel": P(None, "fsdp"), "layers/0/kernel": P(None, "fsdp"),   # largest; tie -> later
                  "layers/0/bias": P("fsdp"), "head/kernel": P("fsdp"),
                  "odd": P(), "step": P()}                                             # no axis divides 8; scalar
    # default min_size (4096 entries) replicates this tiny model; explicit rules win over the rule
    assert all(s == P() for s in _specs(S.fsdp_shardings(_params(), MESH)).values())
    sh = _specs(S.fsdp_shardings(_params(), MESH, min_size=0, rules=[("head/kernel", P()), (".*bias", P())]))
    assert sh["head/kernel"] == P() and sh["layers/0/bias"] == P() and sh["inp/kernel"] == P(None, "fsdp")
    assert S.fsdp_spec((2, 8, 24), 8, ("data", "fsdp"), min_size=0) == P(None, None, ("data", "fsdp"))


def test_opt_state_follows_params():
    params = {k: v for k, v in _params().items() if k not in ("odd", "step")}
    p_sh = S.fsdp_shardings(params, MESH, min_size=32, rules=[("head/kernel", P())])
    tx = lrjax.optim.galore(optax.scale_by_adam(), rank=4, targets=["inp/kernel", "layers/0/kernel"])
    st = S.opt_state_shardings(tx, params, p_sh, min_size=32)
    flat = _specs(st)
    # inp/kernel [16, 32]: left projection P [16, 4] and moments [4, 32] shard with their leaf
    assert flat["basis/inp/kernel"] == P("fsdp") and flat["inner/mu/inp/kernel"] == P(None, "fsdp")
    assert flat["basis/layers/0/kernel"] == P("fsdp")
    # unprojected leaves: full-size moments take their parameter's spec, also an explicit replicated one
    assert flat["inner/mu/head/kernel"] == P() and flat["inner/nu/layers/0/bias"] == P("fsdp")
    assert flat["count"] == P() and flat["inner/count"] == P()
    # LoRA-Pro on adapters {path: {a, b}}: moments follow a and b
    rp = lrjax.LoRA(rank=4)
    _, ad = jax.eval_shape(lambda p: rp.init(jax.random.key(0), p), params)
    a_sh = S.fsdp_shardings(ad, MESH, min_size=32)
    st = _specs(S.opt_state_shardings(lora_pro(1e-2, rp), ad, a_sh, min_size=32))
    assert st["0/mu/layers/0/kernel/a"] == P("fsdp") and st["0/nu/inp/kernel/b"] == P(None, "fsdp")


def test_bad_input():
    params = _params()
    with pytest.raises(ValueError, match=r"axis_name: 'model' is not an axis of the mesh.*\('fsdp',\)"):
        S.fsdp_shardings(params, MESH, axis_name="model")
    with pytest.raises(ValueError, match=r"rules: spec .* for leaf 'odd' shards axis 0 \(size 12\).*does not divide"):
        S.fsdp_shardings(params, MESH, rules=[("odd", P("fsdp"))])
    with pytest.raises(ValueError, match=r"rules: spec .* for leaf 'inp/kernel' names mesh axis 'tp'"):
        S.fsdp_shardings(params, MESH, rules=[("inp/kernel", P("tp"))])
    with pytest.raises(ValueError, match=r"rules: spec .* for leaf 'step' has 1 entries"):
        S.fsdp_shardings(params, MESH, rules=[("step", P(None))])
    with pytest.raises(TypeError, match="rules: the spec of rule 'odd'"):
        S.fsdp_shardings(params, MESH, rules=[("odd", ("fsdp",))])
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        S.fsdp_shardings(params, "fsdp")
    with pytest.raises(TypeError, match="axis_name must be a mesh axis name"):
        S.fsdp_shardings(params, MESH, axis_name=0)
    with pytest.raises(ValueError, match="min_size"):
        S.fsdp_shardings(params, MESH, min_size=-1)
    with pytest.raises(ValueError, match="shape must have entries >= 0"):
        S.fsdp_spec((-16, 64), 8, min_size=1)
    for bad in ((16.0, 64), "abc"):
        with pytest.raises(TypeError, match="shape must be a tuple of ints"):
            S.fsdp_spec(bad, 8)
    for bad in (3, None):
        with pytest.raises(TypeError, match="axis_name must be a mesh axis name"):
            S.fsdp_spec((16, 64), 8, axis_name=bad, min_size=1)
    small = {"w": ABS((8, 8), jnp.float32)}
    with pytest.raises(ValueError, match="param_shardings must have the tree structure of params"):
        S.opt_state_shardings(optax.adam(1e-3), small, {"v": NamedSharding(MESH, P())})
    with pytest.raises(TypeError, match="param_shardings: leaf 'w' must be a jax.sharding.NamedSharding"):
        S.follow_shardings({}, small, {"w": P()})
    with pytest.raises(TypeError, match="tx must be an optax.GradientTransformation"):
        S.opt_state_shardings(object(), small, {"w": NamedSharding(MESH, P())})


def test_shard_gather_roundtrip():
    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    tree = {"a": np.arange(24, dtype=np.float32).reshape(8, 3), "b": np.ones(3, np.float32)}
    g = S.shard(tree, S.fsdp_shardings(tree, mesh, min_size=0))
    back = S.gather(g)
    assert all(np.array_equal(back[k], tree[k]) for k in tree)
    assert S.gather({"n": np.ones(2), "f": 1.5})["f"] == np.float64(1.5)
    with pytest.raises(ValueError, match="shardings must have the tree structure of tree"):
        S.shard(tree, {"a": None})
    with pytest.raises(ValueError, match=r"mesh: .*Explicit.*axis_types=\(jax.sharding.AxisType.Auto"):
        S.fsdp_shardings(tree, jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,)))
    with pytest.raises(ValueError, match=r"shardings: the sharding .* of leaf 'a' does not divide"):
        S.shard({"a": np.ones(3)}, {"a": NamedSharding(MESH, P("fsdp"))})
    # the module docstring's recipe, on this process's devices
    params = {"w1": jnp.full((16, 64), 0.1), "w2": jnp.full((64, 8), 0.1)}
    tx = optax.adam(1e-2)
    p_sh = S.fsdp_shardings(params, mesh, min_size=64)
    s_sh = S.opt_state_shardings(tx, params, p_sh)
    params = S.shard(params, p_sh)
    state = jax.jit(tx.init, out_shardings=s_sh)(params)

    def step(p, s, x):
        g = jax.grad(lambda p: jnp.mean(jnp.tanh(x @ p["w1"]) @ p["w2"]))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, None

    x_sh = NamedSharding(mesh, P())
    out = jax.jit(step, in_shardings=(p_sh, s_sh, x_sh), out_shardings=(p_sh, s_sh, None),
                  donate_argnums=(0, 1))(params, state, jnp.ones((4, 16)))
    assert np.isfinite(S.gather(out[0])["w1"]).all()


# ----------------------------------------------------------------------------- the multi-device run
NAMES = {"adam", "galore_svd", "galore_eigh", "galore_randomized", "galore_subspace", "galore_adam_torch_wd",
         "galore_8bit", "adam_8bit", "fira", "dct", "owlore", "lora_adam", "lora_pro", "lora_pro_full", "lora_fa",
         "riemannian_lora", "lora_prox"}


def _run(d: Path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "sharded_training.py"), "--quick", "--out",
                           str(d)], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid is None:
        d = tmp_path_factory.mktemp("sharded_training")
        _run(d)
    else:  # one run per session even if the tests below land on different xdist workers
        d = tmp_path_factory.getbasetemp().parent / f"sharded_training_{uid}"
        with open(f"{d}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (d / "done").exists():
                d.mkdir(exist_ok=True)
                _run(d)
                (d / "done").write_text("ok")
    return d


def test_sharded_training_matches_one_device(layouts):
    runs = {k: dict(np.load(layouts / f"{k}.npz")) for k in ("one", "eight", "p0", "p1")}
    assert list(runs["one"]["devices"]) == [1, 1] and list(runs["eight"]["devices"]) == [8, 1]
    assert list(runs["p0"]["devices"]) == [4, 2] and list(runs["p1"]["devices"]) == [4, 2]
    ref = runs["one"]
    names = {k.split("/")[0] for k in ref if "/" in k}
    assert names == NAMES and {k.split("/")[0] for k in runs["eight"] if "/" in k} == NAMES
    assert {k.split("/")[0] for k in runs["p0"] if "/" in k} == set(PAIR_QUICK)
    for name in sorted(names):
        keys = [k for k in ref if k.startswith(name + "/loss") or k.startswith(name + "/p/")]
        loss = ref[f"{name}/loss"]
        assert loss.shape == (3,) and loss[-1] < loss[0], (name, loss)           # it trains
        for lay in ("eight", "p0", "p1"):
            got = runs[lay]
            if lay != "eight" and name not in PAIR_QUICK:
                continue
            assert int(got[f"{name}/n_sharded_state"]) > 0, (name, lay)        # the state really is sharded
            for k in keys:
                np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=f"{lay}: {k}")
            # the first loss (same params, same batch) equals one device's to float32 rounding
            np.testing.assert_allclose(got[f"{name}/loss"][0], loss[0], rtol=1e-6)
    # the two processes computed one global result
    for k in runs["p0"]:
        np.testing.assert_array_equal(runs["p0"][k], runs["p1"][k]) if not k.endswith("seconds") else None
    # the experiment's report
    for ext in ("json", "md", "png"):
        assert (layouts / f"sharded_training.{ext}").stat().st_size > 0

