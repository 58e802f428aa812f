"""NOLA vs LoRA training-step time and compiled memory on the bench_lora MLP (run by hand).

    python experiments/bench_nola_memory.py                  # 4 x Dense(1024 -> 1024), batch 512, r = 8, k = 1024
    python experiments/bench_nola_memory.py --quick          # tiny shapes, seconds

Each method is a jit-compiled step (loss, gradient of the trainable part only, optax.adam update)
through :func:`lrjax.factored`, timed round-robin (median of ``--repeats`` calls after warm-up).
Methods: ``lora`` (lrjax.LoRA r = 8), ``nola_c<C>`` (NOLA k_a = k_b = ``--k`` with
``chunk_size = C``) and ``nola_threefry_c<C>``, the same NOLA with its hash generator replaced by
``jax.random.uniform`` (threefry) -- the generator NOLA does *not* use, timed to show why.
Also prints XLA's temporary buffer bytes of each compiled step (``memory_analysis()``), which
grow with ``chunk_size`` but not with ``k`` (the bases are regenerated chunk by chunk).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lrjax
from lrjax.reparam import nola as nola_mod
from lrjax.reparam.nola import NOLA


def threefry_uniform(seed, stream, shape, index):
    """``nola_uniform``'s signature with threefry bits (comparison only)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(seed, jnp.uint32)), stream)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(index, jnp.uint32))
    return jax.vmap(lambda k: jax.random.uniform(k, tuple(shape), jnp.float32, -1.0, 1.0))(keys)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--threefry", action="store_true", help="also time the threefry generator (slow)")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    width, layers, batch, rank = (128, 2, 64, 4) if a.quick else (1024, 4, 512, 8)
    ks = jax.random.split(jax.random.key(0), layers + 2)
    params = {f"d{i}": {"kernel": jax.random.normal(ks[i], (width, width)) / np.sqrt(width),
                        "bias": jnp.zeros(width)} for i in range(layers)}
    x = jax.random.normal(ks[-2], (batch, width))
    y = jax.random.normal(ks[-1], (batch, width))

    def fwd(p, x):
        for i in range(layers):
            x = x @ p[f"d{i}"]["kernel"] + p[f"d{i}"]["bias"]
            if i < layers - 1:
                x = jax.nn.gelu(x)
        return x

    def make(rp):
        base, ad = rp.init(jax.random.key(1), params)
        tr, fr = rp.split(ad)
        opt = optax.adam(1e-3)
        g = lrjax.factored(fwd, rp)

        def step(tr, st):
            loss, gr = jax.value_and_grad(lambda t: jnp.mean((g(base, rp.join(t, fr), x) - y) ** 2))(tr)
            u, st = opt.update(gr, st, tr)
            return optax.apply_updates(tr, u), st, loss
        st = opt.init(tr)
        compiled = jax.jit(step).lower(tr, st).compile()
        mem = compiled.memory_analysis()
        return compiled, (tr, st), int(mem.temp_size_in_bytes) if mem is not None else -1

    methods = {"lora": lrjax.LoRA(rank=rank)}
    for c in a.chunks:
        methods[f"nola_c{c}"] = NOLA(rank=rank, num_basis=a.k, chunk_size=c)
    built = {}
    for name, rp in methods.items():
        built[name] = make(rp)
    if a.threefry:
        orig = nola_mod.nola_uniform
        nola_mod.nola_uniform = threefry_uniform
        try:
            c = a.chunks[len(a.chunks) // 2]
            built[f"nola_threefry_c{c}"] = make(NOLA(rank=rank, num_basis=a.k, chunk_size=c))
        finally:
            nola_mod.nola_uniform = orig
    for f, args, _ in built.values():
        jax.block_until_ready(f(*args))
    times = {k: [] for k in built}
    for _ in range(a.repeats):
        for k, (f, args, _) in built.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - t)
    ref = np.median(times["lora"])
    print(f"| method | step ms (median) | / lora | XLA temp MiB |  (width {width}, batch {batch}, r {rank}, k {a.k})")
    print("|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {1e3 * np.median(v):.1f} | {np.median(v) / ref:.2f} | {built[k][2] / 2 ** 20:.1f} |")


if __name__ == "__main__":
    main()
