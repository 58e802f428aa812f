"""Sharded training: LoRA (``lrjax.factored``) and every ``lrjax.optim`` transformation on params and
optimizer state sharded FSDP-style over a ``jax.sharding.Mesh`` (:mod:`lrjax.sharding`), run on
1 device, 8 devices and 2 processes, with the loss curves and the largest difference to 1 device.

Each layout runs in its own subprocess (this script doubles as the worker):

* ``one``: 1 device (the reference);
* ``eight``: 8 devices (``--xla_force_host_platform_device_count=8`` on CPU; on a multi-GPU host or
  a TPU VM the real devices);
* ``p0``/``p1``: 2 processes joined by ``jax.distributed.initialize`` on 127.0.0.1, each with 2
  forced host devices (a 4-device mesh across the processes; gloo collectives on CPU).

In every layout the mesh is ``Mesh(jax.devices(), ("fsdp",))``; params, adapters, the frozen LoRA
base and every optimizer state leaf get :func:`lrjax.sharding.fsdp_shardings` /
:func:`lrjax.sharding.opt_state_shardings`, the batch is sharded over the same axis (data parallel),
and ``tx.init`` and the train step are ``jax.jit`` ted with those ``in_shardings``/``out_shardings``.
The worker checks that the returned state really has the requested shardings.

Model: a tanh MLP (``16 -> W``, two ``W -> W`` layers, ``W -> 8``, MSE regression) trained ``--steps`` steps from the
same init in every layout. ``--quick``: width 32, 3 steps (the test suite's run,
``tests/test_sharded_training.py``); default: width 256, 20 steps.

Run on real hardware (each process sees its local accelerators; ``jax.devices()`` is global)::

    python experiments/sharded_training.py --worker OUT.npz                 # all local GPUs/TPU cores
    # TPU pod slice / several hosts: the same command on every host, plus
    #   --coordinator HOST0:PORT --num-processes N --process-id I
    # (on Cloud TPU, jax.distributed.initialize() finds these itself: pass --coordinator auto)
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"one": 1, "eight": 8}           # name -> forced host devices; plus the 2-process pair p0/p1
# --quick: the 2-process pair runs one transformation per code path (plain optax, exact-SVD / randomized-QR
# / DCT refreshes, Fira's residual, OwLore's layer slots, 8-bit states, LoRA through lrjax.factored and an
# r x r optimizer-side LoRA) to keep the test suite's run short; 8 devices run all of them
PAIR_QUICK = ("adam", "galore_svd", "galore_subspace", "fira", "dct", "owlore", "adam_8bit", "lora_adam",
              "lora_pro")


# ----------------------------------------------------------------------------- the worker
def transformations(rp, rank: int, gap: int):
    """``{name: (kind, tx)}``: kind ``"full"`` trains the params, ``"lora"`` the LoRA adapters."""
    import optax

    import lrjax.optim as lo
    from lrjax.optim import prox, quant
    from lrjax.optim.galore import scale_by_adam_torch

    adam = optax.scale_by_adam
    lr = optax.scale_by_learning_rate(1e-2)
    g = dict(rank=rank, update_proj_gap=gap)
    # exact-SVD refreshes with the default targets: every kernel projected, same-shaped ones together
    # (jaxlib 0.10.2's batched CPU LAPACK SVD deadlocked XLA:CPU's intra-op pool on forced host devices;
    # lrjax.optim.galore now refreshes one matrix per LAPACK call there, docs/sharded_training.md);
    # Fira / torch-Adam / 8-bit leave layers/1/kernel to the inner optimizer unprojected, which exercises
    # that path of the protocol too
    s = dict(g, targets=["inp/kernel", "layers/0/kernel", "head/kernel"])
    full = {
        "adam": optax.adam(1e-2),
        "galore_svd": optax.chain(lo.galore(adam(), refresh="svd", **g), lr),
        "galore_eigh": optax.chain(lo.galore(adam(), refresh="eigh", **g), lr),
        "galore_randomized": optax.chain(lo.galore(adam(), refresh="randomized", **g), lr),
        "galore_subspace": optax.chain(lo.galore(adam(), refresh="subspace", **g), lr),
        "galore_adam_torch_wd": optax.chain(lo.galore(scale_by_adam_torch(eps=1e-6), weight_decay=0.1, **s), lr),
        "galore_8bit": optax.chain(lo.galore(quant.scale_by_adam_8bit(block_size=16, min_size=0), **s), lr),
        "adam_8bit": optax.chain(quant.scale_by_adam_8bit(block_size=16, min_size=0), lr),
        "fira": optax.chain(lo.fira(adam(), **s), lr),
        "dct": optax.chain(lo.dct(adam(), **g), lr),
        "owlore": optax.chain(lo.owlore(adam(), gamma=1, period=2, **g), lr),
    }
    lora = {
        "lora_adam": optax.adam(1e-2),
        "lora_pro": lo.lora_pro(1e-2, rp),
        "lora_pro_full": lo.lora_pro(1e-2, rp, variant="full"),
        "lora_fa": lo.lora_fa(1e-2, rp, weight_decay=0.01),
        "riemannian_lora": lo.riemannian_lora(1e-2, rp),
        "lora_prox": optax.chain(optax.adam(1e-2), prox.prox_soft_threshold(1e-3)),
    }
    return {**{k: ("full", v) for k, v in full.items()}, **{k: ("lora", v) for k, v in lora.items()}}


def worker(out: str, width: int, steps: int, port=None, pid=None, nproc: int = 2, coordinator=None,
           only=None, data: str = "sharded") -> None:
    import jax
    if coordinator is not None or port is not None:
        # CPU collectives across processes (ignored by GPU/TPU backends); set before any backend starts
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if coordinator == "auto":
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(coordinator_address=coordinator or f"127.0.0.1:{port}",
                                       num_processes=nproc, process_id=int(pid))
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import lrjax
    from lrjax import sharding as S

    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    # host (NumPy) values, identical in every process and layout; no eager JAX ops (each would compile)
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    params = {"inp": {"kernel": f32(16, width) * 0.25},
              "layers": {i: {"kernel": f32(width, width) * width ** -0.5, "bias": f32(width) * 0.1}
                         for i in "01"},
              "head": {"kernel": f32(width, 8) * width ** -0.5}}
    x = f32(32, 16)
    y = np.sin(x[:, :8] * 2.0) + 0.1 * f32(32, 8)
    rp = lrjax.LoRA(rank=4, alpha=8.0)
    base = params                                          # LoRA keeps the base; its adapters {path: {a, b}}:
    _, shapes = jax.eval_shape(lambda: rp.init(jax.random.key(0), params))
    # a non-zero B (LoRA's init is B = 0) so that every LoRA optimizer moves both factors
    adapters = {k: {"a": f32(*v["a"].shape) * 0.3, "b": f32(*v["b"].shape) * 0.05} for k, v in shapes.items()}

    def apply(p, x):
        h = jnp.tanh(x @ p["inp"]["kernel"])
        for i in ("0", "1"):
            h = jnp.tanh(h @ p["layers"][i]["kernel"] + p["layers"][i]["bias"])
        return h @ p["head"]["kernel"]

    fast = lrjax.factored(apply, rp)
    losses = {"full": lambda p, b, x, y: jnp.mean((apply(p, x) - y) ** 2),
              "lora": lambda a, b, x, y: jnp.mean((fast(b, a, x) - y) ** 2)}
    min_size = 32                                          # tiny model: shard biases too
    b_sh = S.fsdp_shardings(base, mesh, min_size=min_size)
    base_g = S.shard(base, b_sh)
    # the batch: data parallel over the same axis (FSDP), or replicated (params/state sharding only)
    data_sh = NamedSharding(mesh, P("fsdp") if data == "sharded" else P())
    xg, yg = S.shard((x, y), (data_sh, data_sh))
    res = {}
    rank, gap = 4, 2
    for name, (kind, tx) in transformations(rp, rank, gap).items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        p0 = params if kind == "full" else adapters
        p_sh = S.fsdp_shardings(p0, mesh, min_size=min_size)
        s_sh = S.opt_state_shardings(tx, p0, p_sh, min_size=min_size)
        loss_fn = losses[kind]

        def step(p, s, b, x, y, tx=tx, loss_fn=loss_fn):
            loss, g = jax.value_and_grad(loss_fn)(p, b, x, y)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        init = jax.jit(tx.init, out_shardings=s_sh)
        jstep = jax.jit(step, in_shardings=(p_sh, s_sh, b_sh, data_sh, data_sh),
                        out_shardings=(p_sh, s_sh, NamedSharding(mesh, P())), donate_argnums=(0, 1))
        p = S.shard(p0, p_sh)
        s = init(p)
        curve = []
        for _ in range(steps):
            p, s, loss = jstep(p, s, base_g, xg, yg)
            curve.append(loss)
        # the state keeps the requested layout (not silently replicated)
        for got, want in zip(jax.tree_util.tree_leaves(s), jax.tree_util.tree_leaves(s_sh)):
            assert got.sharding.is_equivalent_to(want, got.ndim), (name, got.sharding, want)
        n_sharded = sum(not w.is_fully_replicated for w in jax.tree_util.tree_leaves(s_sh))
        res[f"{name}/loss"] = np.array([float(np.asarray(S.gather(c))) for c in curve])
        for path, v in lrjax.tree.flatten(S.gather(p)).items():
            res[f"{name}/p/{path}"] = v
        res[f"{name}/n_sharded_state"] = np.array(n_sharded)
        res[f"{name}/seconds"] = np.array(time.perf_counter() - t0)
        print(f"{name}: {time.perf_counter() - t0:.1f}s", flush=True)
    res["devices"] = np.array([jax.device_count(), jax.process_count()])
    if jax.process_index() == 0 or port is not None:
        np.savez(out, **res)


# ----------------------------------------------------------------------------- the driver
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(ndev):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")     # XLA's SPMD "involuntary rematerialization" notes
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ndev}").strip()
    return env


def run_layouts(d: Path, width: int, steps: int, timeout: float = 900, pair_only=None) -> dict:
    """Run the four workers at once (one, eight, p0, p1) into ``d``; returns ``{layout: npz dict}``.
    ``pair_only``: the transformations the 2-process pair runs (default all)."""
    import numpy as np
    port = _free_port()
    me = [sys.executable, __file__, "--width", str(width), "--steps", str(steps), "--worker"]
    jobs = [(n, me + [str(d / f"{n}.npz")], c) for n, c in LAYOUTS.items()]
    pair = ["--only", *pair_only] if pair_only else []
    jobs += [(f"p{i}", me + [str(d / f"p{i}.npz"), "--port", str(port), "--process-id", str(i)] + pair, 2)
             for i in range(2)]
    # logs go to files: a full pipe would stall a worker (and its partner process in a collective)
    procs = []
    for n, cmd, c in jobs:
        with open(d / f"{n}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(c), stdout=log, stderr=subprocess.STDOUT))
    try:
        for (n, _, _), pr in zip(jobs, procs):
            pr.wait(timeout=timeout)
            if pr.returncode != 0:
                raise RuntimeError(f"worker {n} failed:\n{(d / f'{n}.log').read_text()[-4000:]}")
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
    return {n: dict(np.load(d / f"{n}.npz")) for n in ("one", "eight", "p0", "p1")}


def compare(runs: dict) -> dict:
    """Per transformation and layout: the largest |difference| to ``one`` over losses and params."""
    import numpy as np
    ref = runs["one"]
    names = sorted({k.split("/")[0] for k in ref if "/" in k})
    out = {}
    for name in names:
        keys = [k for k in ref if k.startswith(name + "/loss") or k.startswith(name + "/p/")]
        row = {"loss": ref[f"{name}/loss"].tolist(), "n_sharded_state": int(ref[f"{name}/n_sharded_state"])}
        for lay in ("eight", "p0", "p1"):
            got = runs[lay]
            if f"{name}/loss" not in got:
                row[f"max_diff_{lay}"], row[f"exact_{lay}"], row[f"n_sharded_state_{lay}"] = None, None, None
                continue
            row[f"max_diff_{lay}"] = max(float(np.max(np.abs(got[k].astype(np.float64) - ref[k]))) for k in keys)
            row[f"exact_{lay}"] = all(np.array_equal(got[k], ref[k]) for k in keys)
            row[f"n_sharded_state_{lay}"] = int(got[f"{name}/n_sharded_state"])
        out[name] = row
    return out


def _tables(out):
    rows = ["| transformation | loss, 1 device (per step) | max diff 8 dev | max diff 2 proc | bit-exact 8 / 2 proc |"
            " sharded state leaves (8 dev) |", "|---|---|---|---|---|---|"]
    for name, r in out["results"].items():
        curve = " ".join(f"{v:.4f}" for v in r["loss"])
        two = (f"{max(r['max_diff_p0'], r['max_diff_p1']):.2e}" if r["max_diff_p0"] is not None else "not run")
        ex2 = ("-" if r["exact_p0"] is None else "yes" if r["exact_p0"] and r["exact_p1"] else "no")
        rows.append(f"| {name} | {curve} | {r['max_diff_eight']:.2e} | {two} | "
                    f"{'yes' if r['exact_eight'] else 'no'} / {ex2} | {r['n_sharded_state_eight']} |")
    return (f"## Sharded training: 1 device vs 8 devices vs 2 processes (width {out['config']['width']}, "
            f"{out['config']['steps']} steps)\n\n" + "\n".join(rows))


def _plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in out["results"].items():
        ax.plot(range(1, len(r["loss"]) + 1), r["loss"], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (1 device; 8 dev / 2 proc overlap)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="width 32, 3 steps (the test suite's run)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=None, help="output dir (default results/sharded_training; --quick: a temp dir)")
    ap.add_argument("--worker", default=None, metavar="OUT.npz", help="run one layout in this process")
    ap.add_argument("--port", type=int, default=None, help="worker: join 2 processes on 127.0.0.1:PORT")
    ap.add_argument("--process-id", type=int, default=None)
    ap.add_argument("--coordinator", default=None, help="worker: HOST:PORT of process 0, or 'auto' (Cloud TPU)")
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--data", choices=("sharded", "replicated"), default="sharded",
                    help="the batch: sharded over the mesh (FSDP = data parallel + sharded params/state, default) or "
                         "replicated (only params/state sharded)")
    ap.add_argument("--only", nargs="*", default=None, help="worker: run only these transformations")
    args = ap.parse_args(argv)
    width = args.width or (32 if args.quick else 256)
    steps = args.steps or (3 if args.quick else 20)
    if args.worker:
        worker(args.worker, width, steps, port=args.port, pid=args.process_id, nproc=args.num_processes,
               coordinator=args.coordinator, only=args.only, data=args.data)
        return None
    if args.out is None:
        args.out = (tempfile.mkdtemp(prefix="sharded_training_") if args.quick
                    else str(ROOT / "results" / "sharded_training"))
    args.width, args.steps = width, steps
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _report as R
    out = R.start(__file__, argv, args)
    d = Path(args.out)
    runs = run_layouts(d, width, steps, pair_only=PAIR_QUICK if args.quick else None)
    out["results"] = compare(runs)
    out["devices"] = {k: runs[k]["devices"].tolist() for k in runs}
    out["worker_seconds"] = {k: {n: float(v) for n, v in runs[k].items() if n.endswith("/seconds")} for k in runs}
    return R.finish(out, args, "sharded_training", _tables, _plot)


if __name__ == "__main__":
    main()
