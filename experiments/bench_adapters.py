"""The one-command LoRA study: every lrjax adapter variant, a learning-rate sweep each, side by side.

    python experiments/bench_adapters.py            # < 30 min on 2 CPU cores
    python experiments/bench_adapters.py --quick    # smoke test, tiny, well under a minute

Fixture (``experiments/_digits_bench.py``): the digits MLP 64-256-256-10 (exact GELU), pretrained
on the original task, then fine-tuned on shifted tasks (``--tasks``; default ``rot90`` and
``permute``; all of ``rot90 rot180 rot270 permute invert noise`` are available). Every variant
adapts the three kernels (``targets="kernel"``); biases stay frozen.

Protocol (the unified LoRA study's, research note section 21): for every method, a learning-rate
sweep of ``--n-lrs`` (7) points log-spaced over ``[--lr-min, --lr-max]`` (1e-4..1e-1) and
``--seeds`` (3) seeds, ``--steps`` (200) steps of batch ``--batch`` (64), a constant learning
rate, Adam (b1 0.9, b2 0.999, eps 1e-8) unless the variant *is* an optimizer. The seeds change
the adapter init and the batch order; the pretrained weights are the same. One compiled program
per method runs the whole grid: ``jit(vmap_seeds(vmap_lrs(train)))`` with the learning rate a
traced scalar (the optimizer is the variant's lr-free direction, then ``optax.scale(-lr)``),
the steps a ``lax.scan``. Trainable/frozen parts come from ``rp.split``/``rp.join``: ``grad`` and
the optimizer only ever see the trainable factors (frozen bases, seeds never move).

Registry (:func:`registry`; a variant whose module is not importable is skipped with a note):
``full`` (full fine-tuning, Adam on every parameter, the reference), ``lora``, ``rslora``,
``dora``, ``pissa`` (r=8, alpha=16), ``lora_ga`` (needs gradients: ``estimate_grads`` on
``--grad-batches`` training batches per seed), ``lora_sb`` (gradients), ``lora_xs``, ``nola``,
``block_lora``, ``codyra`` (Adam + the proximal gate step on CoDyRA's lambda schedule), and the
optimizer-side variants over LoRA adapters: ``lora_pro`` (efficient), ``lora_pro_full``,
``lora_fa``, ``riemannian`` (``lrjax.optim.lora_pro``).

Outputs per task and method: test accuracy and loss (mean +- std over seeds) at every learning
rate, the best learning rate (highest mean test accuracy), trainable parameters, and the step time
of one (non-vmapped) jitted training step at batch ``--batch`` (median over ``--repeats``
round-robin calls). The study's statistic: the spread across learning rates (per method, best
minus median and best minus worst over the grid) against the spread across methods (the range and
std of the methods' best-LR accuracies).

PEFT side by side (``torch`` + ``peft`` from the reference extra; ``--no-peft`` skips): the same
MLP built by hand in ``torch.nn`` with the same pretrained weights (checked by mapping it back with
:func:`lrjax.interop.params_from_torch`), the same batches, ``torch.optim.Adam`` at the method's best
the whole learning-rate grid on the first task and the method's best lrjax learning rate on the
others (``--peft-sweep``: the grid everywhere), for LoRA, rsLoRA, DoRA, PiSSA, LoRA-GA
(``preprocess_loraga``; same rank as lrjax's, PEFT's own semantics), LoRA-FA
(``create_lorafa_optimizer``) and Riemannian LoRA (``create_riemannian_optimizer`` over
``torch.optim.Adam``). For the randomly initialized ones (LoRA, rsLoRA, DoRA, LoRA-FA, Riemannian)
PEFT's ``lora_A``/``lora_B`` are overwritten with lrjax's initial factors of the same seed, so both
start from the same adapters; PiSSA's init is deterministic; LoRA-GA uses PEFT's own semantics
(which differ from the official ones lrjax's row uses). torch runs single-threaded by default (``--torch-threads``).

Second fixture (``--no-tf`` skips): the quickstart char transformer (:class:`lrjax.models.CharTransformer`,
d_model 128, 2 layers), pretrained on ``stdlib_chars`` ``train[:60%]`` and fine-tuned on
``train[60%:]`` by ``full``, ``lora``, ``dora``, ``pissa``, ``lora_ga``, ``lora_sb`` and ``lora_pro``
(attention q/k/v/o and MLP kernels), each at three learning rates around its best digits learning
rate, one seed; metric: held-out loss on both slices.

Writes ``<out>/bench_adapters.json``, ``<out>/bench_adapters.md``, ``<out>/pareto.png`` and
``<out>/lr_sensitivity.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from typing import Any, Callable

import numpy as np

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _digits_bench as D  # noqa: E402

import lrjax  # noqa: E402
from lrjax.benchmark import blocking, describe, device_info, summarize, time_round_robin, usable_cpus  # noqa: E402

REPRODUCE = "python experiments/bench_adapters.py --no-progress --out runs/bench_adapters"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke-test settings")
    p.add_argument("--out", default="runs/bench_adapters")
    p.add_argument("--tasks", nargs="+", default=None, help="default rot90 permute (quick: rot90)")
    p.add_argument("--methods", nargs="+", default=None, help="subset of the registry (default: all)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps, default 200 (quick: 4)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (quick: 16)")
    p.add_argument("--seeds", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--n-lrs", type=int, default=None, help="default 7 (quick: 2)")
    p.add_argument("--lr-min", type=float, default=1e-4)
    p.add_argument("--lr-max", type=float, default=1e-1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--pretrain-steps", type=int, default=None, help="default 200 (quick: 10)")
    p.add_argument("--grad-batches", type=int, default=4, help="batches for data-aware inits (estimate_grads)")
    p.add_argument("--repeats", type=int, default=None, help="timed step calls per method, default 20 (quick: 2)")
    p.add_argument("--no-peft", action="store_true", help="skip the torch/PEFT side-by-side runs")
    p.add_argument("--no-timing", action="store_true", help="skip the per-method step timing (implied by --quick)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch.set_num_threads for the PEFT runs (on a shared 2-core machine 2 threads were ~20x "
                        "slower per step than 1: OpenMP barriers under load)")
    p.add_argument("--peft-sweep", action="store_true",
                   help="PEFT over the whole LR grid on every task (default: the grid on the first task, the best "
                        "lrjax LR on the others)")
    p.add_argument("--no-tf", action="store_true", help="skip the quickstart-transformer fixture")
    p.add_argument("--tf-steps", type=int, default=None, help="transformer fine-tuning steps, default 100 (quick: 3)")
    p.add_argument("--tf-pretrain-steps", type=int, default=None, help="default 200 (quick: 3)")
    p.add_argument("--tf-batch", type=int, default=None, help="windows per step, default 16 (quick: 4)")
    p.add_argument("--tf-eval", type=int, default=64, help="held-out windows per slice")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for k, (q, full) in dict(steps=(4, 200), batch=(16, 64), seeds=(1, 3), n_lrs=(2, 7), pretrain_steps=(10, 200),
                             repeats=(2, 20), tasks=(["rot90"], ["rot90", "permute"]), tf_steps=(3, 100),
                             tf_pretrain_steps=(3, 200), tf_batch=(4, 16)).items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    a.dims = (64, 32, 32, 10) if a.quick else D.DIMS
    a.no_timing = a.no_timing or a.quick
    if a.quick:
        a.rank = min(a.rank, 4)
    bad = [t for t in a.tasks if t not in D.TASKS]
    if bad:
        p.error(f"--tasks: unknown {bad}; choose from {D.TASKS}")
    a.lrs = [float(x) for x in np.logspace(math.log10(a.lr_min), math.log10(a.lr_max), a.n_lrs)]
    return a


# ------------------------------------------------------------------------------ registry
@dataclasses.dataclass
class Method:
    """One row of the study.

    ``build(args) -> rp`` makes the reparameterization config (``None`` for full fine-tuning);
    ``direction(rp, adapters, args) -> optax.GradientTransformation`` is the lr-free update direction
    (the trainer appends ``optax.scale(-lr)`` with a traced ``lr``, then ``post``);
    ``post(rp, adapters, args)`` optional transformations after the learning rate (CoDyRA's prox step);
    ``count(rp, adapters)`` the trainable parameter count when the optimizer freezes more than ``rp``
    says (LoRA-FA); ``peft``: the PEFT method to run side by side.
    """

    name: str
    paper: str
    build: Callable[[Any], Any]
    direction: Callable[[Any, Any, Any], Any] = lambda rp, ad, args: optax.scale_by_adam()
    post: Callable[[Any, Any, Any], list] | None = None
    count: Callable[[Any, Any], int] | None = None
    peft: str | None = None
    note: str = ""
    lr_init: Callable[[Any, Any], Any] | None = None  # (trainable init, traced lr) -> trainable init


def _adam(rp, ad, args):
    return optax.scale_by_adam()


def registry(args) -> tuple[list[Method], dict[str, str]]:
    """``(methods, skipped)``: every variant whose module imports; ``skipped[name]`` says why not."""
    r, al = args.rank, args.alpha
    m: list[Method] = [
        Method("full", "full fine-tuning (reference)", lambda a: None, note="Adam on every parameter"),
        Method("lora", "Hu et al. 2021", lambda a: lrjax.LoRA(rank=r, alpha=al), peft="lora"),
        Method("rslora", "Kalajdzievski 2023", lambda a: lrjax.RSLoRA(rank=r, alpha=al), peft="rslora"),
        Method("dora", "Liu et al. 2024", lambda a: lrjax.DoRA(rank=r, alpha=al), peft="dora"),
        Method("pissa", "Meng et al. 2024", lambda a: lrjax.PiSSA(rank=r, alpha=al), peft="pissa"),
    ]
    skipped: dict[str, str] = {}

    def optional(name, fn):
        try:
            m.extend(fn())
        except ImportError as e:
            skipped[name] = f"module not importable ({e})"

    def lora_ga():
        from lrjax.reparam.lora_ga import LoRAGA
        r_ga = min(r, min(args.dims) // 2)  # 2r <= min(M, N): the 256 x 10 head allows r <= 5
        return [Method("lora_ga", "Wang et al. 2024 (official semantics)", lambda a: LoRAGA(rank=r_ga, alpha=al),
                       peft="lora_ga", note=f"rank {r_ga} (2r <= min(M, N) = {min(args.dims)} on the head); "
                       "official semantics, stable scale, gamma 16")]

    def lora_sb():
        SB = importlib.import_module("lrjax.reparam.lora_sb")

        def first_step(tr, lr):  # official eta1 = the first step's lr; trunc_r(-eta1 sign G) is linear in eta1
            return {p: {**f, "r": f["r"] * lr} for p, f in tr.items()}
        out = [Method("lora_sb", "Ponkshe et al. 2024", lambda a: SB.LoRASB(rank=r, eta1=1.0), lr_init=first_step,
                      note="s=1 (official alpha=r); eta1 = the swept lr (constant schedule: the first step's lr)")]
        if hasattr(SB, "LoRAXS"):
            out.append(Method("lora_xs", "Balazy et al. 2024", lambda a: SB.LoRAXS(rank=r),
                              note="s=1 (official alpha=r); R ~ N(0, 1e-5^2)"))
        return out

    def nola():
        from lrjax.reparam.nola import NOLA
        k = 16 if args.quick else 256
        return [Method("nola", "Koohpayegani et al. 2024", lambda a: NOLA(rank=r, alpha=al, num_basis=k),
                       note=f"GPT convention, k_a = k_b = {k} bases, bases regenerated every step")]

    def block_lora():
        from lrjax.reparam.block_lora import BlockLoRA
        return [Method("block_lora", "One Head Eight Arms (2025)", lambda a: BlockLoRA(rank=r, alpha=al, blocks=4),
                       note="blocks=4 (UNVERIFIED reading of the paper; see lrjax.reparam.block_lora)")]

    def hypelora():
        from lrjax.reparam.hypelora import HypeLoRA
        hid, emb = ((16,), 8) if args.quick else ((64,), 32)
        return [Method("hypelora", "Trojan & Gebala 2026 (MLP generator)",
                       lambda a: _HypeShim(HypeLoRA(rank=r, alpha=al, kind="mlp", hidden=hid, embed_dim=emb)),
                       note=f"MLP generator hidden {hid}, embed {emb}, fixed A, no noise blending; one slot per "
                            "kernel, each shape its own head, so the generator is larger than the LoRA it makes")]

    def codyra():
        from lrjax.optim.prox import codyra_lambda_schedule, factor_mask, prox_soft_threshold
        from lrjax.reparam.codyra import CoDyRA

        def post(rp, ad, a):
            levels = max(2, min(50, a.steps // 4))
            return [prox_soft_threshold(codyra_lambda_schedule(a.steps, 0.005, n_levels=levels),
                                        mask=factor_mask(ad, "g"))]
        return [Method("codyra", "CoDyRA (2025)", lambda a: CoDyRA(rank=r), post=post,
                       note="s=1 (official); prox threshold 0.005 after a dense half")]

    def optim_side():
        LP = importlib.import_module("lrjax.optim.lora_pro")  # `lrjax.optim.lora_pro` the attribute is the function

        def b_only(rp, ad):
            return int(sum(np.prod(f["b"].shape) for f in ad.values()))
        mk = lambda a: lrjax.LoRA(rank=r, alpha=al)  # noqa: E731
        return [
            Method("lora_pro", "Wang et al. 2025 (efficient)", mk,
                   direction=lambda rp, ad, a: LP.scale_by_lora_pro(rp, variant="efficient")),
            Method("lora_pro_full", "Wang et al. 2025 (full, M x N moments)", mk,
                   direction=lambda rp, ad, a: LP.scale_by_lora_pro(rp, variant="full"),
                   note="Adam moments of the full M x N equivalent gradient"),
            Method("lora_fa", "Zhang et al. 2023", mk, direction=lambda rp, ad, a: LP.scale_by_lora_fa(rp),
                   count=b_only, peft="lora_fa", note="A frozen by the optimizer; trainable = B"),
            Method("riemannian", "Zhang & Pilanci 2024", mk, peft="riemannian",
                   direction=lambda rp, ad, a: optax.chain(LP.scale_by_riemannian_lora(rp), optax.scale_by_adam())),
        ]

    optional("lora_ga", lora_ga)
    optional("lora_sb", lora_sb)
    optional("nola", nola)
    optional("block_lora", block_lora)
    optional("hypelora", hypelora)
    optional("codyra", codyra)
    optional("lora_pro", optim_side)
    if args.methods:
        unknown = [n for n in args.methods if n not in {x.name for x in m} | set(skipped)]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; registry: {[x.name for x in m]}")
        m = [x for x in m if x.name in args.methods]
    return m, skipped


class _HypeShim:
    """HypeLoRA behind the few ``Reparam`` calls the trainer makes: the adapters are
    ``{"hyper": hypernetwork params (trainable), "frozen": fixed factors}``."""

    needs_grads = False

    def __init__(self, hl):
        self.hl, self.targets, self.rank, self.alpha = hl, hl.targets, hl.rank, hl.alpha

    def init(self, key, params):
        hp, fr = self.hl.init(key, params)
        return params, {"hyper": hp, "frozen": fr}

    def split(self, ad):
        return ad["hyper"], ad["frozen"]

    def join(self, tr, fr):
        return {"hyper": tr, "frozen": fr}

    def materialize(self, base, ad):
        return self.hl.materialize(base, ad["hyper"], ad["frozen"])

    def num_params(self, ad):
        return self.hl.num_params(ad["hyper"])


# ------------------------------------------------------------------------------ training
def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def stack(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


class Setup:
    """One method: its config, optimizer factory, the (vmapped, jitted once) training sweep, and
    :meth:`init` of the stacked per-seed initial trainable/frozen parts and bases for a task's data.
    The data are arguments of the compiled sweep, so every task (same shapes) reuses one compile."""

    def __init__(self, method, args, params):
        self.method, self.args, self.params = method, args, params
        self.rp = method.build(args)
        self.note = method.note
        self.adapters0 = None
        self._sweep = None

    def init(self, data):
        """Per-seed inits for ``data = ((xtr, ytr), (xte, yte))``; sets ``tr0, fr0, base, idx``,
        the unstacked seed-0 parts ``one_*``, ``trainable`` and ``init_s``."""
        args, rp, params = self.args, self.rp, self.params
        (xtr, ytr), (xte, yte) = data
        self.data = tuple(map(jnp.asarray, (xtr, ytr, xte, yte)))
        xtr_j, ytr_j = self.data[:2]
        trs, frs, bases = [], [], []
        self.init_s = 0.0
        for s in range(args.seeds):
            if rp is None:
                trs.append(params), frs.append({}), bases.append({})
                continue
            t0 = time.perf_counter()
            kw = {}
            if rp.needs_grads:
                idx = np.random.default_rng(10_000 + s).choice(len(xtr), (args.grad_batches, args.batch))
                batches = [(xtr_j[i], ytr_j[i]) for i in idx]
                kw["grads"] = lrjax.reparam.estimate_grads(lambda p, b: D.loss(p, *b), params, batches,
                                                           targets=rp.targets)
            base, ad = rp.init(jax.random.key(1000 + s), params, **kw)
            jax.block_until_ready(ad)
            self.init_s += time.perf_counter() - t0
            tr, fr = rp.split(ad)
            trs.append(tr), frs.append(fr), bases.append(base)
            if s == 0:
                self.adapters0 = ad
        self.tr0, self.fr0, self.base = stack(trs), stack(frs), stack(bases)
        if rp is None:
            self.trainable = count(params)
        elif self.method.count is not None:
            self.trainable = self.method.count(rp, self.adapters0)
        else:
            self.trainable = rp.num_params(self.adapters0)
        first = lambda t: jax.tree_util.tree_map(lambda x: x[0], t)  # noqa: E731
        self.one_tr, self.one_fr, self.one_base = first(self.tr0), first(self.fr0), first(self.base)
        # batch indices per seed [S, steps, batch] (seed s: the same order for every method)
        self.idx = jnp.asarray(np.stack([batch_order(s, len(xtr), args) for s in range(args.seeds)]), jnp.int32)
        return self

    def model_params(self, tr, fr, base):
        if self.rp is None:
            return tr
        return self.rp.materialize(base, self.rp.join(tr, fr))

    def optimizer(self, lr):
        m, a = self.method, self.args
        parts = [m.direction(self.rp, self.adapters0, a), optax.scale(-lr)]
        if m.post is not None:
            parts += m.post(self.rp, self.adapters0, a)
        return optax.chain(*parts)

    def step_fn(self):
        def step(tr, st, fr, base, x, y, lr):
            opt = self.optimizer(lr)
            l, g = jax.value_and_grad(lambda t: D.loss(self.model_params(t, fr, base), x, y))(tr)
            u, st = opt.update(g, st, tr)
            return optax.apply_updates(tr, u), st, l
        return step

    def sweep(self):
        """``jit(vmap_seeds(vmap_lrs(run)))``, built once per method."""
        if self._sweep is not None:
            return self._sweep
        step = self.step_fn()
        n_curve = math.gcd(self.args.steps, 20)

        def run(tr0, fr, base, idx, lr, xtr, ytr, xte, yte):
            if self.method.lr_init is not None:
                tr0 = self.method.lr_init(tr0, lr)
            st0 = self.optimizer(lr).init(tr0)

            def body(c, i):
                tr, st = c
                tr, st, l = step(tr, st, fr, base, xtr[i], ytr[i], lr)
                return (tr, st), l
            (tr, _), losses = jax.lax.scan(body, (tr0, st0), idx)
            p = self.model_params(tr, fr, base)
            curve = losses.reshape(n_curve, -1).mean(-1)
            return D.accuracy(p, xte, yte), D.loss(p, xte, yte), curve

        inner = jax.vmap(run, in_axes=(None, None, None, None, 0) + (None,) * 4)
        self._sweep = jax.jit(jax.vmap(inner, in_axes=(0, 0, 0, 0, None) + (None,) * 4))
        return self._sweep


def batch_order(seed, n, args):
    """``[steps, batch]`` training indices of seed ``seed`` (shared by every method and by PEFT)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(n, args.batch, replace=False) for _ in range(args.steps)])


def run_method(setup, args):
    fn = setup.sweep()
    lrs = jnp.asarray(args.lrs, jnp.float32)
    a = (setup.tr0, setup.fr0, setup.base, setup.idx, lrs) + setup.data
    t0 = time.perf_counter()
    if getattr(setup, "_compiled", None) is None:  # every task has the same shapes: one compile per method
        setup._compiled = fn.lower(*a).compile()
    compiled = setup._compiled
    t1 = time.perf_counter()
    acc, lo, curve = jax.block_until_ready(compiled(*a))
    t2 = time.perf_counter()
    acc, lo, curve = np.asarray(acc, np.float64), np.asarray(lo, np.float64), np.asarray(curve, np.float64)
    return acc.T, lo.T, curve.transpose(1, 0, 2), {"compile_s": t1 - t0, "sweep_s": t2 - t1,
                                                    "init_s": setup.init_s}


# ------------------------------------------------------------------------------ PEFT
def torch_mlp(params):
    """The fixture's MLP in ``torch.nn`` (modules ``fc1``, ``fc2``, ``out``) with the JAX weights."""
    import torch

    class MLP(torch.nn.Module):
        def __init__(self, dims):
            super().__init__()
            self.fc1 = torch.nn.Linear(dims[0], dims[1])
            self.fc2 = torch.nn.Linear(dims[1], dims[2])
            self.out = torch.nn.Linear(dims[2], dims[3])
            self.act = torch.nn.GELU()

        def forward(self, x):
            return self.out(self.act(self.fc2(self.act(self.fc1(x)))))

    dims = [params["fc1"]["kernel"].shape[0]] + [params[n]["kernel"].shape[1] for n in D.LAYERS]
    model = MLP(dims)
    with torch.no_grad():
        for n in D.LAYERS:
            getattr(model, n).weight.copy_(torch.from_numpy(np.asarray(params[n]["kernel"]).T.copy()))
            getattr(model, n).bias.copy_(torch.from_numpy(np.asarray(params[n]["bias"]).copy()))
    return model


#: PEFT methods whose init is random: PEFT's lora_A/lora_B are set to lrjax's initial factors
SAME_INIT = ("lora", "rslora", "dora", "lora_fa", "riemannian")


def peft_run(kind, params, data, idx, lr, args, seed, rank, alpha, init=None):
    """One PEFT fine-tuning run; returns (test acc, test loss, median step ms). ``init``: lrjax
    adapters ``{"fc1/kernel": {"a": [in, r], "b": [r, out]}, ...}`` copied into PEFT's ``lora_A``
    (``a^T``) and ``lora_B`` (``b^T``) before training, so both start from the same adapters."""
    import warnings
    import torch
    import peft
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # preprocess_loraga's hooks
    torch.manual_seed(seed)
    (xtr, ytr), (xte, yte) = data
    xtr_t, ytr_t = torch.from_numpy(np.asarray(xtr)), torch.from_numpy(np.asarray(ytr)).long()
    xte_t, yte_t = torch.from_numpy(np.asarray(xte)), torch.from_numpy(np.asarray(yte)).long()
    model = torch_mlp(params)
    ce = torch.nn.functional.cross_entropy
    targets = list(D.LAYERS)
    kw = dict(r=rank, lora_alpha=alpha, target_modules=targets)
    if kind == "rslora":
        kw["use_rslora"] = True
    elif kind == "dora":
        kw["use_dora"] = True
    elif kind == "pissa":
        kw["init_lora_weights"] = "pissa"
    elif kind == "lora_ga":
        from peft import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga
        kw["init_lora_weights"] = "lora_ga"
        kw["lora_ga_config"] = LoraGAConfig()
    cfg = peft.LoraConfig(**kw)
    if kind == "lora_ga":
        rng = np.random.default_rng(10_000 + seed)
        gidx = rng.choice(len(xtr), (args.grad_batches, args.batch))

        def train_step():
            for i in gidx:
                ce(model(xtr_t[i]), ytr_t[i]).backward()
        preprocess_loraga(model, cfg, train_step)
    pm = peft.get_peft_model(model, cfg)
    if init is not None:
        with torch.no_grad():
            for n in D.LAYERS:
                mod = getattr(pm.base_model.model, n)
                mod.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(init[f"{n}/kernel"]["a"]).T.copy()))
                mod.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(init[f"{n}/kernel"]["b"]).T.copy()))
    if kind == "lora_fa":
        from peft.optimizers import create_lorafa_optimizer
        opt = create_lorafa_optimizer(pm, r=rank, lora_alpha=alpha, lr=lr)
    elif kind == "riemannian":
        from peft.optimizers import create_riemannian_optimizer
        opt = create_riemannian_optimizer(pm, torch.optim.Adam, lr=lr)  # reg 1e-2, as lrjax's default
    else:
        opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    times = []
    for t in range(args.steps):
        i = torch.from_numpy(np.asarray(idx[t])).long()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = ce(pm(xtr_t[i]), ytr_t[i])
        loss.backward()
        opt.step()
        times.append((time.perf_counter() - t0) * 1e3)
    with torch.no_grad():
        logits = pm(xte_t)
        acc = float((logits.argmax(-1) == yte_t).float().mean())
        lo = float(ce(logits, yte_t))
    warm = times[min(5, len(times) - 1):]
    return acc, lo, float(np.median(warm))


def peft_side(results, methods, params, args, progress):
    try:
        import torch
        import peft  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return {"available": False, "note": f"torch/peft not importable ({e!r})"}
    torch.set_num_threads(max(1, min(args.torch_threads, usable_cpus())))
    # the torch copy computes the same function, and maps back to the same params
    model = torch_mlp(params)
    back = lrjax.interop.params_from_torch(model)
    diff = max(float(jnp.max(jnp.abs(back[n][k] - params[n][k]))) for n in D.LAYERS for k in ("kernel", "bias"))
    x = np.asarray(D.task(args.tasks[0])[1][0][:64])
    with torch.no_grad():
        yt = model(torch.from_numpy(x)).numpy()
    fdiff = float(np.max(np.abs(yt - np.asarray(D.forward(params, jnp.asarray(x))))))
    out = {"available": True, "torch": torch.__version__, "peft": peft.__version__, "threads": torch.get_num_threads(),
           "params_roundtrip_max_abs_diff": diff, "forward_max_abs_diff": fdiff, "rows": []}
    jobs = []
    for task in args.tasks:
        for m in methods:
            if m.peft is None or m.name not in results[task]:
                continue
            r = results[task][m.name]
            lrs = args.lrs if (args.peft_sweep or task == args.tasks[0]) else [r["best_lr"]]
            for lr in lrs:
                jobs.append((task, m, lr))
    for task, m, lr in tqdm(jobs, desc="peft", disable=not progress, file=sys.stdout, leave=False):
        data = D.task(task)
        accs, losses, ms = [], [], []
        for s in range(args.seeds):
            idx = batch_order(s, len(data[0][0]), args)
            rp = m.build(args)
            init = rp.init(jax.random.key(1000 + s), params)[1] if m.peft in SAME_INIT else None
            a, lo, t = peft_run(m.peft, params, data, idx, lr, args, s, rp.rank, rp.alpha, init)
            accs.append(a), losses.append(lo), ms.append(t)
        r = results[task][m.name]
        j = args.lrs.index(lr)
        out["rows"].append({"task": task, "method": m.name, "peft": m.peft, "lr": lr,
                            "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)), "accs": accs,
                            "loss_mean": _finite(np.mean(losses)), "step_ms": float(np.median(ms)),
                            "lrjax_acc_mean": r["acc_mean"][j], "lrjax_acc_std": r["acc_std"][j],
                            "lrjax_step_ms": r.get("step_ms")})
    return out


# ------------------------------------------------------------------------------ transformer
TF_METHODS = ("full", "lora", "dora", "pissa", "lora_ga", "lora_sb", "lora_pro")


def make_optimizer(method, rp, adapters0, args, lr):
    parts = [method.direction(rp, adapters0, args), optax.scale(-lr)]
    if method.post is not None:
        parts += method.post(rp, adapters0, args)
    return optax.chain(*parts)


def transformer_study(args, methods, digits_res, progress):
    """The quickstart char transformer (pretrained on ``stdlib_chars`` ``train[:60%]``), fine-tuned on
    ``train[60%:]`` by a few methods, each at three LRs around its best digits (``--tasks[0]``) LR:
    ``best * 10^{-1/2, 0, 1/2}`` (vmapped), one seed. Metric: held-out loss on both slices."""
    from flax import nnx
    from lrjax import data
    from lrjax.models import ADAPTER_TARGETS, CharTransformer, apply_fn, loss_fn
    kw = {"config": "small"} if args.quick else {}

    def windows(split):
        toks = data.as_arrays(data.load("stdlib_chars", split=split, **kw), keys="tokens")["tokens"]
        held = np.arange(len(toks)) % 10 == 9
        return jnp.asarray(toks[~held], jnp.int32), jnp.asarray(toks[held][: args.tf_eval], jnp.int32)

    t0 = time.perf_counter()
    pre_tr, pre_ev = windows("train[:60%]")
    ft_tr, ft_ev = windows("train[60%:]")
    seq_len = int(pre_tr.shape[1] - 1)
    dm, nl, dff = (32, 1, 64) if args.quick else (128, 2, 512)
    model = CharTransformer(data.VOCAB_SIZE, d_model=dm, n_layers=nl, n_heads=4, d_ff=dff, max_len=seq_len,
                            rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    apply = apply_fn(graphdef)

    def lm_loss(p, tok):
        return loss_fn(apply(p, tok[:, :-1]), tok[:, 1:])

    def order(n, steps, seed):
        rng = np.random.default_rng(seed)
        return jnp.asarray(np.stack([rng.choice(n, args.tf_batch, replace=False) for _ in range(steps)]), jnp.int32)

    pre_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3))

    @jax.jit
    def pretrain(p, idx):
        def body(c, i):
            p, st = c
            g = jax.grad(lm_loss)(p, pre_tr[i])
            u, st = pre_opt.update(g, st, p)
            return (optax.apply_updates(p, u), st), None
        (p, _), _ = jax.lax.scan(body, (p, pre_opt.init(p)), idx)
        return p

    params = jax.block_until_ready(pretrain(state, order(len(pre_tr), args.tf_pretrain_steps, 0)))
    evl = jax.jit(lm_loss)
    out = {"model": {"d_model": dm, "n_layers": nl, "n_heads": 4, "d_ff": dff, "seq_len": seq_len,
                     "params": count(params), "pretrain_steps": args.tf_pretrain_steps},
           "steps": args.tf_steps, "batch": args.tf_batch, "eval_windows": int(ft_ev.shape[0]),
           "before": {"finetune": float(evl(params, ft_ev)), "pretrain": float(evl(params, pre_ev))},
           "pretrain_s": time.perf_counter() - t0, "rows": {}}
    idx = order(len(ft_tr), args.tf_steps, 1)
    task0 = args.tasks[0]
    by_name = {m.name: m for m in methods}
    wanted = ("lora", "lora_sb") if args.quick else TF_METHODS  # quick: a plain and a data-aware init
    for name in tqdm([n for n in wanted if n in by_name and n in digits_res[task0]], desc="transformer",
                     disable=not progress, file=sys.stdout, leave=False):
        m = by_name[name]
        t1 = time.perf_counter()
        try:
            rp = m.build(args)
            if rp is None:
                tr0, fr, base, ad0 = params, {}, {}, None
                n_train = count(params)
            else:
                rp = dataclasses.replace(rp, targets=ADAPTER_TARGETS)
                kwi = {}
                if rp.needs_grads:
                    gi = order(len(ft_tr), args.grad_batches, 10_000)
                    kwi["grads"] = lrjax.reparam.estimate_grads(lm_loss, params, [ft_tr[i] for i in gi],
                                                                targets=rp.targets)
                base, ad0 = rp.init(jax.random.key(1000), params, **kwi)
                tr0, fr = rp.split(ad0)
                n_train = m.count(rp, ad0) if m.count else rp.num_params(ad0)

            def model_params(tr, rp=rp, fr=fr, base=base):
                return tr if rp is None else rp.materialize(base, rp.join(tr, fr))

            def run(lr, tr0=tr0, rp=rp, ad0=ad0, m=m, model_params=model_params):
                if m.lr_init is not None:
                    tr0 = m.lr_init(tr0, lr)
                opt = make_optimizer(m, rp, ad0, args, lr)

                def body(c, i):
                    tr, st = c
                    g = jax.grad(lambda t: lm_loss(model_params(t), ft_tr[i]))(tr)
                    u, st = opt.update(g, st, tr)
                    return (optax.apply_updates(tr, u), st), None
                (tr, _), _ = jax.lax.scan(body, (tr0, opt.init(tr0)), idx)
                p = model_params(tr)
                return lm_loss(p, ft_ev), lm_loss(p, pre_ev)

            best = digits_res[task0][name]["best_lr"]
            lrs = [best * 10 ** -0.5, best, best * 10 ** 0.5]
            ft, pre = jax.block_until_ready(jax.jit(jax.vmap(run))(jnp.asarray(lrs, jnp.float32)))
        except Exception as e:  # noqa: BLE001
            out["rows"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"FAILED transformer/{name}: {type(e).__name__}: {e}")
            continue
        ft, pre = np.asarray(ft, np.float64), np.asarray(pre, np.float64)
        j = int(np.nanargmin(np.where(np.isfinite(ft), ft, np.nan))) if np.isfinite(ft).any() else 0
        out["rows"][name] = {"trainable": n_train, "lrs": lrs, "finetune_loss": [_finite(v) for v in ft],
                             "pretrain_loss": [_finite(v) for v in pre], "best_lr": lrs[j],
                             "best_finetune_loss": _finite(ft[j]), "pretrain_loss_at_best": _finite(pre[j]),
                             "wall_s": time.perf_counter() - t1}
    return out


def transformer_markdown(tf):
    lines = [f"**quickstart char transformer** (d_model {tf['model']['d_model']}, {tf['model']['n_layers']} layers, "
             f"{tf['model']['params']} params, pretrained {tf['model']['pretrain_steps']} steps on stdlib_chars "
             f"train[:60%]; fine-tuned {tf['steps']} steps x {tf['batch']} windows on train[60%:]; held-out loss before "
             f"fine-tuning {tf['before']['finetune']:.4f} (fine-tune slice), {tf['before']['pretrain']:.4f} "
             "(pretrain slice); LRs = the method's best digits LR x 10^(-1/2, 0, 1/2), one seed)\n",
             "| method | trainable params | best LR | held-out loss (fine-tune slice) | held-out loss (pretrain slice) "
             "| loss at the 3 LRs |", "|---|---:|---:|---:|---:|---|"]
    for name, r in tf["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | |")
            continue
        f3 = " / ".join("nan" if v is None else f"{v:.3f}" for v in r["finetune_loss"])
        lines.append(f"| {name} | {r['trainable']} | {r['best_lr']:.1e} | {r['best_finetune_loss']:.4f} | "
                     f"{r['pretrain_loss_at_best']:.4f} | {f3} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ analysis
def _finite(x):
    x = float(x)
    return x if math.isfinite(x) else None


def summarize_method(acc, lo, curve, lrs):
    """acc, lo: [n_lrs, seeds]; curve: [n_lrs, seeds, n_curve]."""
    mean = acc.mean(1)
    j = int(np.argmax(mean))
    return {"lrs": lrs, "acc": acc.tolist(), "acc_mean": mean.tolist(), "acc_std": acc.std(1).tolist(),
            "loss_mean": [_finite(v) for v in lo.mean(1)],
            "best_lr": lrs[j], "best_acc": float(mean[j]), "best_acc_std": float(acc[j].std()),
            "best_loss": _finite(lo[j].mean()),
            "curve_best": [_finite(v) for v in curve[j].mean(0)],
            "lr_spread_best_minus_median": float(mean[j] - np.median(mean)),
            "lr_spread_best_minus_worst": float(mean[j] - mean.min()),
            "diverged_lrs": [lrs[i] for i in range(len(lrs)) if not np.all(np.isfinite(lo[i]))]}


def study_stat(task_res):
    """Spread across LRs (per method) vs spread across methods (at each method's best LR)."""
    adapters = {k: v for k, v in task_res.items() if k != "full"}
    best = np.array([v["best_acc"] for v in adapters.values()])
    med = np.array([v["lr_spread_best_minus_median"] for v in adapters.values()])
    worst = np.array([v["lr_spread_best_minus_worst"] for v in adapters.values()])
    seed_std = np.array([v["best_acc_std"] for v in adapters.values()])
    return {"methods": list(adapters),
            "across_methods_range": float(best.max() - best.min()) if len(best) else None,
            "across_methods_std": float(best.std()) if len(best) else None,
            "across_lrs_best_minus_median_mean": float(med.mean()) if len(med) else None,
            "across_lrs_best_minus_worst_mean": float(worst.mean()) if len(worst) else None,
            "seed_std_at_best_mean": float(seed_std.mean()) if len(seed_std) else None,
            "best_method": max(adapters, key=lambda k: adapters[k]["best_acc"]) if adapters else None}


def fmt_lr(x):
    return f"{x:.0e}".replace("e-0", "e-")


def markdown(res, args):
    lines = []
    for task, tr in res["tasks"].items():
        lines.append(f"**task {task}** (pretrained model before fine-tuning: test accuracy "
                     f"{res['pretrained'][task]['acc']:.3f}; {args.steps} steps, batch {args.batch}, "
                     f"{args.seeds} seeds, mean +- std over seeds)\n")
        lines.append("| method | trainable params | best LR | test acc @ best LR | test loss | step ms | "
                     "best - median over LRs | best - worst | acc at LR " + " / ".join(fmt_lr(x) for x in args.lrs) + " |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for name, r in tr.items():
            accs = " / ".join(f"{v:.2f}" for v in r["acc_mean"])
            sm = r.get("step_ms")
            lines.append(f"| {name} | {r['trainable']} | {fmt_lr(r['best_lr'])} | {r['best_acc']:.4f} +- "
                         f"{r['best_acc_std']:.4f} | {r['best_loss'] if r['best_loss'] is None else round(r['best_loss'], 4)} | "
                         f"{'' if sm is None else f'{sm:.2f}'} | {r['lr_spread_best_minus_median']:.3f} | "
                         f"{r['lr_spread_best_minus_worst']:.3f} | {accs} |")
        st = res["stats"][task]
        lines.append("")
        if st["across_methods_range"] is None:
            continue
        lines.append(f"Spread across methods (adapters only, at each one's best LR): range "
                     f"{st['across_methods_range']:.4f}, std {st['across_methods_std']:.4f}; spread across LRs "
                     f"(mean over those methods): best - median {st['across_lrs_best_minus_median_mean']:.4f}, "
                     f"best - worst {st['across_lrs_best_minus_worst_mean']:.4f}; seed std at the best LR "
                     f"{st['seed_std_at_best_mean']:.4f}.\n")
    pf = res.get("peft", {})
    if pf.get("available") and pf.get("rows"):
        lines.append(f"**PEFT side by side** (torch {pf['torch']}, peft {pf['peft']}, {pf['threads']} threads; "
                     "same data, batches and pretrained weights; LoRA/rsLoRA/DoRA/LoRA-FA start from lrjax's initial "
                     "factors; PEFT's LoRA-GA uses PEFT's semantics; torch.optim.Adam, LoRA-FA: "
                     "create_lorafa_optimizer, Riemannian: create_riemannian_optimizer over Adam)\n")
        lines.append("| task | method | LR | PEFT test acc | lrjax test acc | PEFT step ms | lrjax step ms |")
        lines.append("|---|---|---:|---:|---:|---:|---:|")
        for r in pf["rows"]:
            ls = r["lrjax_step_ms"]
            lines.append(f"| {r['task']} | {r['method']} | {fmt_lr(r['lr'])} | {r['acc_mean']:.4f} +- {r['acc_std']:.4f} | "
                         f"{r['lrjax_acc_mean']:.4f} +- {r['lrjax_acc_std']:.4f} | {r['step_ms']:.2f} | "
                         f"{'' if ls is None else f'{ls:.2f}'} |")
        lines.append("")
    elif pf:
        lines.append(f"PEFT: {pf.get('note', 'skipped')}\n")
    if res.get("transformer"):
        lines.append(transformer_markdown(res["transformer"]))
    if res["skipped"]:
        lines.append("Not in this run: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items()) + "\n")
    return "\n".join(lines)


def plot(res, args, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(res["tasks"])
    names = sorted({n for t in tasks for n in res["tasks"][t]})
    cmap = plt.get_cmap("tab20")
    color = {n: cmap(i % 20) for i, n in enumerate(names)}
    fig, axs = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, t in zip(axs[0], tasks):
        for n, r in res["tasks"][t].items():
            ax.errorbar(r["trainable"], r["best_acc"], yerr=r["best_acc_std"], fmt="o", color=color[n], label=n)
            ax.annotate(n, (r["trainable"], r["best_acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("test accuracy at the best LR")
        ax.set_title(f"digits MLP, task {t}")
        ax.grid(alpha=0.3)
    axs[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pareto.png"), dpi=120)
    plt.close(fig)
    fig, axs = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, t in zip(axs[0], tasks):
        for n, r in res["tasks"][t].items():
            m, s = np.array(r["acc_mean"]), np.array(r["acc_std"])
            ax.plot(r["lrs"], m, marker="o", color=color[n], label=n, ms=3, lw=1.2 if n != "full" else 2.2,
                    ls="-" if n != "full" else "--")
            ax.fill_between(r["lrs"], m - s, m + s, color=color[n], alpha=0.1)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.set_title(f"LR sensitivity, task {t}")
        ax.grid(alpha=0.3)
    axs[0][-1].legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lr_sensitivity.png"), dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    info_start = device_info()
    print("device:", describe(info_start))
    params = D.pretrain(0, steps=args.pretrain_steps, dims=args.dims)
    methods, skipped = registry(args)
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    res = {"config": {k: v for k, v in vars(args).items() if k not in ("out",)}, "device_start": info_start,
           "reproduce": REPRODUCE if not args.quick else REPRODUCE + " --quick", "skipped": skipped,
           "methods": {m.name: {"paper": m.paper, "note": m.note, "peft": m.peft} for m in methods},
           "pretrained": {}, "tasks": {}, "timing": {}, "stats": {}}
    orig = D.task("original")[1]
    res["pretrained"]["original"] = {"acc": float(D.accuracy(params, *map(jnp.asarray, orig)))}
    step_calls, setups = {}, {}
    bar = tqdm(total=len(args.tasks) * len(methods), desc="sweeps", disable=not progress, file=sys.stdout)
    for task in args.tasks:
        data = D.task(task)
        te = tuple(map(jnp.asarray, data[1]))
        res["pretrained"][task] = {"acc": float(D.accuracy(params, *te)), "loss": float(D.loss(params, *te))}
        res["tasks"][task] = {}
        for m in methods:
            bar.set_postfix_str(f"{task}/{m.name}")
            try:
                if m.name not in setups:
                    setups[m.name] = Setup(m, args, params)
                setup = setups[m.name].init(data)
                acc, lo, curve, tm = run_method(setup, args)
            except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not fatal
                skipped[f"{m.name}@{task}"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                print(f"FAILED {m.name} on {task}: {type(e).__name__}: {e}")
                bar.update(1)
                continue
            r = summarize_method(acc, lo, curve, args.lrs)
            r.update(trainable=setup.trainable, **tm)
            res["tasks"][task][m.name] = r
            if task == args.tasks[0] and not args.no_timing:  # step time: one config, not vmapped
                step = jax.jit(setup.step_fn())
                tr, fr, base = setup.one_tr, setup.one_fr, setup.one_base
                st = setup.optimizer(jnp.float32(1e-3)).init(tr)
                x, y = setup.data[0][: args.batch], setup.data[1][: args.batch]
                step_calls[m.name] = blocking(step, tr, st, fr, base, x, y, jnp.float32(1e-3))
            bar.update(1)
    bar.close()
    if step_calls:
        times = time_round_robin(step_calls, args.repeats, 2, "step time", progress)
        for k, ms in times.items():
            res["timing"][k] = summarize(ms)
            for task in args.tasks:
                if k in res["tasks"][task]:
                    res["tasks"][task][k]["step_ms"] = res["timing"][k]["median_ms"]
    for task in args.tasks:
        res["stats"][task] = study_stat(res["tasks"][task])
    if not args.no_peft:
        res["peft"] = peft_side(res["tasks"], methods, params, args, progress)
    if not args.no_tf:
        res["transformer"] = transformer_study(args, methods, res["tasks"], progress)
    res["device_end"] = device_info()
    res["wall_s"] = time.perf_counter() - t_start
    res["table_markdown"] = markdown(res, args)
    md = (f"# bench_adapters\n\nDevice: {describe(info_start)} (load at the end: {res['device_end']['load_avg']}); "
          f"wall {res['wall_s']:.0f} s.\n\nReproduce: `{res['reproduce']}`\n\n" + res["table_markdown"])
    with open(os.path.join(args.out, "bench_adapters.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "bench_adapters.json"), "w") as f:
        json.dump(res, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    plot(res, args, args.out)
    print(res["table_markdown"])
    print(f"wall {res['wall_s']:.1f} s; load avg {res['device_end']['load_avg']}")
    print(f"reproduce: {res['reproduce']}")
    return res


if __name__ == "__main__":
    main()
