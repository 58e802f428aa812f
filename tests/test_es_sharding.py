"""EGGROLL over a device mesh: the same script on 1 device, 8 forced host devices and 2 processes
joined by jax.distributed gives bit-identical updates with the DEFAULT settings (the default
``member_chunk`` depends on the population only), and with a fixed ``member_chunk`` whose chunk
count is not a multiple of the device count (dummy chunks). Each layout runs in a subprocess (this
file doubles as the worker: ``python tests/test_es_sharding.py OUT [PORT PROCESS_ID]``)."""
import fcntl
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
POP = 64  # default member_chunk 8: 8 chunks, evaluated 8 / 1 / 2 per device on 1 / 8 / 4 devices
POP_PAD, CHUNK_PAD = 24, 4  # 6 chunks: 2 dummy chunks on 8 devices and on 4
WIDTH = 48


def _worker(out, port=None, pid=None):
    import jax
    if port is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                   process_id=int(pid))
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh

    from lrjax.es import Eggroll

    k = jax.random.split(jax.random.key(0), 4)
    params = {"l0": {"kernel": jax.random.normal(k[0], (6, WIDTH)) * 0.4, "bias": jnp.zeros(WIDTH)},
              "stack": jax.random.normal(k[1], (2, WIDTH, WIDTH)) * WIDTH ** -0.5,
              "head": {"kernel": jax.random.normal(k[2], (WIDTH, 3)) * 0.3}}
    x = jax.random.normal(k[3], (16, 6))

    def fit(p, x):
        h = jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"])
        h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["stack"])
        return -jnp.mean((h @ p["head"]["kernel"]) ** 2)

    mesh = Mesh(np.array(jax.devices()), ("pop",))
    res = {}
    for tag, es in (("", Eggroll(POP, rank=2, sigma=0.1, mesh=mesh)),  # defaults
                    ("pad_", Eggroll(POP_PAD, rank=2, sigma=0.1, mesh=mesh, member_chunk=CHUNK_PAD))):
        st = es.init(jax.random.key(1))
        opt = optax.adam(1e-2)
        p, os_ = params, opt.init(params)
        for gen in range(2):
            g, st, info = es.estimate(st, p, fit, x)
            for name, leaf in zip(["l0b", "l0k", "head", "stack"], jax.tree.leaves(g)):
                res[f"{tag}g{gen}_{name}"] = np.asarray(leaf)
            res[f"{tag}fit{gen}"] = np.asarray(info.fitness)
            u, os_ = opt.update(g, os_, p)
            p = optax.apply_updates(p, u)
    res["devices"] = np.array([jax.device_count(), jax.process_count()])
    np.savez(out, **res)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(ndev):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # keep the conftest's XLA flags (compile options), add the device count
    env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ndev}").strip()
    return env


def _launch(args, ndev):
    return subprocess.Popen([sys.executable, __file__, *map(str, args)], cwd=ROOT, env=_env(ndev),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]


def _run_layouts(d):
    port = _free_port()
    # launch everything at once; the 2-process pair (2 forced devices each -> a 4-device mesh)
    procs = [_launch([d / "one.npz"], 1), _launch([d / "eight.npz"], 8),
             _launch([d / "p0.npz", port, 0], 2), _launch([d / "p1.npz", port, 1], 2)]
    try:
        for p in procs:
            _wait(p)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid is None:
        d = tmp_path_factory.mktemp("es_shard")
        _run_layouts(d)
    else:
        # under pytest-xdist the tests below may land on different workers: the first one runs the four
        # layouts (~25 s of subprocesses), the others wait for it and read the same files
        d = tmp_path_factory.getbasetemp().parent / f"es_shard_{uid}"
        with open(f"{d}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (d / "done").exists():
                d.mkdir(exist_ok=True)
                _run_layouts(d)
                (d / "done").write_text("ok")
    return {k: dict(np.load(d / f"{k}.npz")) for k in ("one", "eight", "p0", "p1")}


def test_device_counts(layouts):
    assert list(layouts["one"]["devices"]) == [1, 1]
    assert list(layouts["eight"]["devices"]) == [8, 1]
    assert list(layouts["p0"]["devices"]) == [4, 2] and list(layouts["p1"]["devices"]) == [4, 2]


@pytest.mark.parametrize("other", ["eight", "p0", "p1"])
def test_bit_identical_updates(layouts, other):
    ref, got = layouts["one"], layouts[other]
    keys = [k for k in ref if k != "devices"]
    assert len(keys) == 20
    for k in keys:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{other}: {k}")
    for tag in ("", "pad_"):
        assert float(np.abs(ref[f"{tag}g0_stack"]).max()) > 0 and float(np.abs(ref[f"{tag}g0_l0b"]).max()) > 0
        assert not np.array_equal(ref[f"{tag}g0_l0k"], ref[f"{tag}g1_l0k"])
    assert ref["fit0"].shape == (POP,) and ref["pad_fit0"].shape == (POP_PAD,)


def test_default_member_chunk_depends_on_population_only():
    from lrjax.es import Eggroll
    from lrjax.es.eggroll import default_member_chunk
    assert [default_member_chunk(n) for n in (2, 16, 64, 96, 4096, 8192)] == [2, 2, 8, 12, 256, 256]
    assert Eggroll(POP).member_chunk == default_member_chunk(POP) == 8


if __name__ == "__main__":
    _worker(*sys.argv[1:])
