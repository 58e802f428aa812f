"""LRAgent on the quickstart character transformer: shared-A LoRA agents over one long context.

    python experiments/lragent.py --out results/lragent   # minutes on 2 CPU cores
    python experiments/lragent.py --quick                 # smoke test, tiny model, seconds

What it does (seeded, deterministic up to timing):

1. Text: the embedded ``stdlib_chars`` corpus (:func:`lrjax.data.stdlib_text`, Python standard-library
   source, offline). The first 60% pretrains the base; the rest is cut into ``--agents`` slices (one
   per agent: different files), each cut into blocks of ``2 (max_len + 1)`` chars with every 5th
   block held out (evaluation text from the files the agent trained on).
2. Base: :class:`lrjax.models.CharTransformer` (quickstart sizes: d_model 128, 2 layers, 4 heads,
   d_ff 512) with ``max_len = --context + --cont``, pretrained on windows of ``--train-len`` chars at
   random position offsets (half the batches end at the last position, where the chars after the
   long context are scored; the rest uniform), so every position's embedding is trained without
   training on 2k-char sequences. The model never sees a context longer than ``--train-len`` in
   training; the absolute loss after a 2k context is therefore higher than the training loss.
3. Agents (the official LRAgent recipe, ``Self_Plan/Train/train_lora.py::load_lora_A_weights``):
   LoRA r=8, alpha=16 on ``q, v, o, fc1, fc2`` (no LoRA on ``k``: keys stay the base projection, as
   in the official serving code). Agent 0 trains all its factors on slice 0; agents 1.. load agent
   0's value ``A_v`` (every layer), keep it frozen, and train the rest on their own slices.
4. Serving a shared ``--context``-char prefix (held-out text of the scoring agent's slice, written
   into the cache by agent 0, "the first agent") and scoring each agent's next-char loss on the
   ``--cont`` chars after it (teacher-forced chunk through the cache = the decode steps), four ways:

   * ``per_agent``: every agent prefills the context itself and keeps its own K and V (exact);
   * ``lragent``: one shared cache from agent 0's hidden states, ``K``, ``V_base`` and ``L = X A_v``;
     each agent reads ``P V_base + s (P L) B_v`` with its own ``B_v``
     (:func:`lrjax.nn.attention.lragent.lragent_attention`, ``L B_v`` never formed);
   * ``fully_shared``: agent 0's full K and V (its own ``B_v`` baked in) read by every agent;
   * ``base_only``: the shared K and ``V_base`` only (the adapter's value term dropped on the context).

   In every shared scheme each agent's own continuation tokens are written with its own adapter.
   The context cache at depth > 0 holds agent 0's hidden states: that is the LRAgent approximation
   (exact at depth 0 and for agent 0 itself -- checked).
5. Reports cache bytes of the context (all layers, all agents), the loss gap against per-agent caches,
   context prefill time for all agents, and decode time per token (one agent, one token, context
   ``--context``; jit, warmed, round-robin medians) next to the limit: the plain base model's decode
   step. Writes ``<out>/lragent.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

import lrjax
from lrjax import data
from lrjax.benchmark import describe, device_info, summarize, time_round_robin
from lrjax.models import CharTransformer, loss_fn
from lrjax.nn.attention.lragent import (cache_nbytes, lragent_append, lragent_attention, lragent_decode_step,
                                        lragent_prefill, materialize_values)

SCHEMES = ("per_agent", "lragent", "fully_shared", "base_only")
LABELS = {"per_agent": "per-agent caches (exact)", "lragent": "LRAgent (shared base + shared L)",
          "fully_shared": "fully shared (agent 0's K, V)", "base_only": "base-only sharing (K, V_base)",
          "base_model": "plain base model, no adapter (reference)"}
TARGETS = (r"blocks/\d+/attn/(q|v|o)/kernel", r"blocks/\d+/mlp/(fc1|fc2)/kernel")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and context (smoke test)")
    p.add_argument("--out", default="runs/lragent", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--context", type=int, default=None, help="shared context chars, default 2048 (quick 64)")
    p.add_argument("--cont", type=int, default=None, help="scored chars after it, default 128 (quick 16)")
    p.add_argument("--d-model", type=int, default=None, help="default 128 (quick 32)")
    p.add_argument("--n-layers", type=int, default=None, help="default 2 (quick 1)")
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=None, help="default 512 (quick 64)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--train-len", type=int, default=None, help="training window, default 256 (quick 32)")
    p.add_argument("--batch", type=int, default=None, help="default 8 (quick 4)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default 300 (quick 10)")
    p.add_argument("--agent-steps", type=int, default=None, help="per agent, default 100 (quick 6)")
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--agent-lr", type=float, default=1e-2)
    p.add_argument("--eval-windows", type=int, default=None, help="held-out windows per agent, default 6 (quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method, default 30 (quick 3)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(context=(64, 2048), cont=(16, 128), d_model=(32, 128), n_layers=(1, 2), d_ff=(64, 512),
                train_len=(32, 256), batch=(4, 8), pretrain_steps=(10, 300), agent_steps=(6, 100),
                eval_windows=(1, 6), repeats=(3, 30))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    if a.agents < 2:
        p.error("--agents must be >= 2")
    if a.cont < 2 * a.repeats + 2:
        p.error("--cont must be >= 2 * --repeats + 2 (the cache also holds the timed decode steps)")
    return a


# ---------------------------------------------------------------------------- model, functional
def _ln(x, s, b):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-6) * s + b


def _embed(P, ids, pos0):
    t = ids.shape[1]
    return P["tok_embed/embedding"][ids] + jax.lax.dynamic_slice_in_dim(P["pos_embed"], pos0, t, 0)[None]


def _mlp(P, i, h):
    x = _ln(h, P[f"blocks/{i}/ln2/scale"], P[f"blocks/{i}/ln2/bias"])
    u = jax.nn.gelu(x @ P[f"blocks/{i}/mlp/fc1/kernel"] + P[f"blocks/{i}/mlp/fc1/bias"])
    return h + u @ P[f"blocks/{i}/mlp/fc2/kernel"] + P[f"blocks/{i}/mlp/fc2/bias"]


def _head(P, h):
    return _ln(h, P["ln_f/scale"], P["ln_f/bias"]) @ P["head/kernel"] + P["head/bias"]


def forward(P, ids, pos0, n_layers, n_heads):
    """The CharTransformer forward on a flat param dict, tokens at positions ``pos0..pos0+T-1``."""
    h = _embed(P, ids, pos0)
    b, t, d = h.shape
    for i in range(n_layers):
        x = _ln(h, P[f"blocks/{i}/ln1/scale"], P[f"blocks/{i}/ln1/bias"])
        q, k, v = (jnp.reshape(x @ P[f"blocks/{i}/attn/{n}/kernel"], (b, t, n_heads, -1)) for n in "qkv")
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
        h = _mlp(P, i, h + o @ P[f"blocks/{i}/attn/o/kernel"])
    return _head(P, h)


def merged(base, ad, s):
    """Flat params with ``W + s A B`` on the adapted kernels."""
    out = dict(base)
    for path, f in ad.items():
        out[path] = base[path] + s * f["a"] @ f["b"]
    return out


# ---------------------------------------------------------------------------- LRAgent serving
def agent_prefill(P, Wv, av, bv, s, ids, capacity, n_layers, n_heads):
    """Agent with merged params ``P`` prefills ``ids`` at positions 0..; returns (logits, [LRCache per layer]).

    Exact for this agent: its value is ``V_base + s L B_v`` with its own ``B_v``."""
    h = _embed(P, ids, 0)
    b, t, d = h.shape
    caches = []
    for i in range(n_layers):
        x = _ln(h, P[f"blocks/{i}/ln1/scale"], P[f"blocks/{i}/ln1/bias"])
        q = (x @ P[f"blocks/{i}/attn/q/kernel"]).reshape(b, t, n_heads, -1)
        o, c = lragent_prefill(q, x, P[f"blocks/{i}/attn/k/kernel"], Wv[i], av[i], bv[i], s,
                               num_heads=n_heads, capacity=capacity)
        caches.append(c)
        h = _mlp(P, i, h + o.reshape(b, t, d) @ P[f"blocks/{i}/attn/o/kernel"])
    return _head(P, h), caches


def agent_chunk(P, Wv, av, bv, s, ids, caches, ctx_values, n_layers, n_heads):
    """Agent continues with ``ids`` after the cached context (append, then attend).

    ``ctx_values`` None: read the cache with the agent's own ``B_v`` (per-agent / LRAgent).
    Otherwise a list (per layer) of ``[B, S, H, Dv]`` values used for the context positions
    (fully shared: agent 0's ``V_base + s L B_0``; base-only: ``V_base``); the agent's own new
    positions always get its own ``V_base + s L B_v``."""
    b, t = ids.shape
    pos0 = caches[0].pos
    h = _embed(P, ids, pos0)
    d = h.shape[-1]
    new = []
    for i in range(n_layers):
        x = _ln(h, P[f"blocks/{i}/ln1/scale"], P[f"blocks/{i}/ln1/bias"])
        q = (x @ P[f"blocks/{i}/attn/q/kernel"]).reshape(b, t, n_heads, -1)
        c = lragent_append(caches[i], x, P[f"blocks/{i}/attn/k/kernel"], Wv[i], av[i])
        if ctx_values is None:
            o = lragent_attention(q, c, bv[i], s)
        else:
            own = materialize_values(c, bv[i], s)
            j = jnp.arange(own.shape[1])[None, :, None, None]
            o = lragent_attention(q, c._replace(v=jnp.where(j < pos0, ctx_values[i], own)), None)
        new.append(c)
        h = _mlp(P, i, h + o.reshape(b, t, d) @ P[f"blocks/{i}/attn/o/kernel"])
    return _head(P, h), new


def plain_prefill(P, ids, capacity, n_layers, n_heads):
    """An ordinary K/V cache of a merged model (per-agent serving, and the base limit)."""
    h = _embed(P, ids, 0)
    b, t, d = h.shape
    kv = []
    for i in range(n_layers):
        x = _ln(h, P[f"blocks/{i}/ln1/scale"], P[f"blocks/{i}/ln1/bias"])
        q, k, v = (jnp.reshape(x @ P[f"blocks/{i}/attn/{n}/kernel"], (b, t, n_heads, -1)) for n in "qkv")
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
        pad = ((0, 0), (0, capacity - t), (0, 0), (0, 0))
        kv.append({"k": jnp.pad(k, pad), "v": jnp.pad(v, pad)})
        h = _mlp(P, i, h + o @ P[f"blocks/{i}/attn/o/kernel"])
    return _head(P, h), kv, jnp.asarray(t, jnp.int32)


def plain_step(P, kv, pos, tok, n_layers, n_heads):
    """One decode step with an ordinary K/V cache: returns (logits [B, V], kv, pos + 1)."""
    h = _embed(P, tok, pos)
    b, _, d = h.shape
    new = []
    for i in range(n_layers):
        x = _ln(h, P[f"blocks/{i}/ln1/scale"], P[f"blocks/{i}/ln1/bias"])
        q, k, v = (jnp.reshape(x @ P[f"blocks/{i}/attn/{n}/kernel"], (b, 1, n_heads, -1)) for n in "qkv")
        kc = jax.lax.dynamic_update_slice(kv[i]["k"], k, (0, pos, 0, 0))
        vc = jax.lax.dynamic_update_slice(kv[i]["v"], v, (0, pos, 0, 0))
        mask = (jnp.arange(kc.shape[1]) <= pos)[None, None, None, :]
        o = jax.nn.dot_product_attention(q, kc, vc, mask=mask).reshape(b, 1, d)
        new.append({"k": kc, "v": vc})
        h = _mlp(P, i, h + o @ P[f"blocks/{i}/attn/o/kernel"])
    return _head(P, h)[:, 0], new, pos + 1


def lragent_step(P, Wv, av, bv, s, caches, tok, n_layers, n_heads):
    """One LRAgent decode step of one agent over the shared cache: returns (logits [B, V], caches)."""
    h = _embed(P, tok, caches[0].pos)
    b, _, d = h.shape
    new = []
    for i in range(n_layers):
        x = _ln(h, P[f"blocks/{i}/ln1/scale"], P[f"blocks/{i}/ln1/bias"])
        q = (x @ P[f"blocks/{i}/attn/q/kernel"]).reshape(b, 1, n_heads, -1)
        o, c = lragent_decode_step(q, x, caches[i], P[f"blocks/{i}/attn/k/kernel"], Wv[i], av[i], bv[i], s)
        new.append(c)
        h = _mlp(P, i, h + o.reshape(b, 1, d) @ P[f"blocks/{i}/attn/o/kernel"])
    return _head(P, h)[:, 0], new


# ---------------------------------------------------------------------------- data and training
def load_text(args, max_len):
    """Pretraining stream (first 60%) and one slice per agent (the rest, cut in ``--agents`` parts).

    Each slice is cut into blocks of ``2 (max_len + 1)`` chars; every 5th block is held out (so the
    held-out text comes from the same files the agent trains on), the others form its training stream.
    Returns ``(pretrain_ids, [{"train": ids, "held": [block, ...], "range": [lo, hi]}, ...])``."""
    ids = data.encode(data.stdlib_text(max_chars=400_000 if args.quick else None))
    n = len(ids)
    cut = int(0.6 * n)
    edges = np.linspace(cut, n, args.agents + 1).astype(int)
    blk = 2 * (max_len + 1)
    slices = []
    for i in range(args.agents):
        s = ids[edges[i]:edges[i + 1]]
        blocks = [s[j:j + blk] for j in range(0, len(s) - blk + 1, blk)]
        held = blocks[4::5]
        if len(held) < args.eval_windows:
            raise SystemExit(f"slice {i} has {len(held)} held-out blocks < --eval-windows {args.eval_windows}; "
                             "use a shorter --context or fewer agents")
        train = np.concatenate([b for j, b in enumerate(blocks) if j % 5 != 4])
        slices.append({"train": train, "held": held, "range": [int(edges[i]), int(edges[i + 1])]})
    return ids[:cut], slices


def sample_batch(rng, stream, args, max_len):
    """``--batch`` windows of ``--train-len + 1`` chars at random text offsets, placed at a random
    position offset: half the batches end at the last position (where the chars after the long
    context are scored), the others are uniform over the position table."""
    t = args.train_len
    starts = rng.integers(0, len(stream) - t - 1, size=args.batch)
    pos0 = max_len - t if rng.random() < 0.5 else int(rng.integers(0, max_len - t + 1))
    return np.stack([stream[s:s + t + 1] for s in starts]), pos0


def make_step(loss_of, opt):
    """Jitted ``step(params, opt_state, frozen, tok, pos0)`` for ``loss_of(params, frozen, tok, pos0)``."""
    @jax.jit
    def step(p, st, frozen, tok, pos0):
        loss, g = jax.value_and_grad(loss_of)(p, frozen, tok, pos0)
        u, st = opt.update(g, st, p)
        return optax.apply_updates(p, u), st, loss
    return step


def train(name, step, opt, params, frozen, stream, steps, args, max_len, seed, progress):
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"{name:8s}", leave=False, disable=not progress, file=sys.stdout, dynamic_ncols=True)
    for _ in bar:
        tok, pos0 = sample_batch(rng, stream, args, max_len)
        params, state, loss = step(params, state, frozen, jnp.asarray(tok), jnp.asarray(pos0, jnp.int32))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return params, {"train_loss": losses, "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    t_start = time.perf_counter()
    info = device_info()
    print(f"device: {describe(info)}")
    L, H, N, T, C = args.n_layers, args.n_heads, args.agents, args.context, args.cont
    max_len = T + C
    pre, slices = load_text(args, max_len)

    model = CharTransformer(data.VOCAB_SIZE, d_model=args.d_model, n_layers=L, n_heads=H, d_ff=args.d_ff,
                            max_len=max_len, rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)
    base = dict(lrjax.tree.flatten(state))
    n_params = int(sum(np.prod(v.shape) for v in base.values()))
    print(f"CharTransformer d_model={args.d_model} layers={L} heads={H} d_ff={args.d_ff} max_len={max_len}: "
          f"{n_params:,} parameters; {N} agents, context {T} + {C} scored chars")

    # ---- 1. pretraining (full) on random windows at random position offsets
    def lm_loss(P, tok, pos0):
        return loss_fn(forward(P, tok[:, :-1], pos0, L, H), tok[:, 1:])

    def opt_for(lr, steps):
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, steps // 10 + 2), lr * 0.1)
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))

    opt = opt_for(args.pretrain_lr, args.pretrain_steps)
    base, pre_hist = train("pretrain", make_step(lambda P, _, tok, pos0: lm_loss(P, tok, pos0), opt), opt, base, None,
                           pre, args.pretrain_steps, args, max_len, args.seed, progress)
    print(f"pretrain: {args.pretrain_steps} steps in {pre_hist['wall_s']:.1f}s, "
          f"final train loss {np.mean(pre_hist['train_loss'][-10:]):.3f}")

    # ---- 2. agents: LoRA on q, v, o, fc1, fc2; agent 0 trains A_v, the others load it frozen
    rp = lrjax.LoRA(rank=args.rank, alpha=args.alpha, targets=TARGETS)
    s = float(rp.scale)
    vpaths = [f"blocks/{i}/attn/v/kernel" for i in range(L)]

    def join(tr, fa):  # the frozen shared A_v (if any) back into the adapter dict
        return {p: ({"a": fa[p], "b": f["b"]} if fa and p in fa else f) for p, f in tr.items()}

    opt = opt_for(args.agent_lr, args.agent_steps)
    agent_step = make_step(lambda tr, fa, tok, pos0: lm_loss(merged(base, join(tr, fa), s), tok, pos0), opt)
    agents, agent_hist = [], []
    for a in range(N):
        _, ad = rp.init(jax.random.key(args.seed + 10 + a), state)
        ad = {p: {"a": jnp.asarray(f["a"]), "b": jnp.asarray(f["b"])} for p, f in ad.items()}
        if a == 0:
            trainable, frozen_av = ad, None
        else:
            frozen_av = {p: agents[0][p]["a"] for p in vpaths}                  # shared, frozen A_v
            trainable = {p: ({"b": f["b"]} if p in frozen_av else f) for p, f in ad.items()}
        trained, hist = train(f"agent{a}", agent_step, opt, trainable, frozen_av, slices[a]["train"],
                              args.agent_steps, args, max_len, args.seed + 100 + a, progress)
        agents.append(join(trained, frozen_av))
        agent_hist.append(hist)
        print(f"agent {a}: {args.agent_steps} steps on slice {a} in {hist['wall_s']:.1f}s, "
              f"final train loss {np.mean(hist['train_loss'][-10:]):.3f}")
    shared_ok = all(bool(jnp.array_equal(agents[a][p]["a"], agents[0][p]["a"])) for a in range(N) for p in vpaths)
    Pm = [merged(base, ad, s) for ad in agents]                       # each agent's merged weights
    Wv = [base[p] for p in vpaths]                                    # base value kernels
    av = [agents[0][p]["a"] for p in vpaths]                          # shared A_v
    bvs = [[ad[p]["b"] for p in vpaths] for ad in agents]             # per-agent B_v

    # ---- 3. quality: each agent's continuation loss under the four cache schemes
    prefill = jax.jit(lambda P, bv, ids: agent_prefill(P, Wv, av, bv, s, ids, max_len, L, H))
    chunk = jax.jit(lambda P, bv, ids, caches, ctx: agent_chunk(P, Wv, av, bv, s, ids, caches, ctx, L, H))
    chunk_own = jax.jit(lambda P, bv, ids, caches: agent_chunk(P, Wv, av, bv, s, ids, caches, None, L, H))
    full_fwd = jax.jit(lambda P, ids: forward(P, ids, 0, L, H))
    ce = lambda logits, tgt: float(loss_fn(logits, tgt))  # noqa: E731
    losses = {k: np.zeros((N, args.eval_windows)) for k in (*SCHEMES, "base_model")}
    checks = {"shared_A_v_identical": shared_ok, "max_abs_logit_diff_per_agent_vs_model": 0.0,
              "max_abs_logit_diff_lragent_vs_per_agent_agent0": 0.0}
    bar = tqdm(total=N * args.eval_windows, desc="eval", leave=False, disable=not progress, file=sys.stdout)
    for a in range(N):
        held = slices[a]["held"]
        for w, j in enumerate(np.linspace(0, len(held) - 1, args.eval_windows).astype(int)):
            win = jnp.asarray(held[j][:max_len + 1])[None]
            ctx, cont, tgt = win[:, :T], win[:, T:T + C], win[:, T + 1:T + C + 1]
            _, own_caches = prefill(Pm[a], bvs[a], ctx)               # per-agent: its own prefill
            _, c0 = prefill(Pm[0], bvs[0], ctx)                       # shared: agent 0 wrote the context
            lg = {"per_agent": chunk_own(Pm[a], bvs[a], cont, own_caches),
                  "lragent": chunk_own(Pm[a], bvs[a], cont, c0),
                  "fully_shared": chunk(Pm[a], bvs[a], cont, c0,
                                        [materialize_values(c, b, s) for c, b in zip(c0, bvs[0])]),
                  "base_only": chunk(Pm[a], bvs[a], cont, c0, [c.v for c in c0])}
            for k, v in lg.items():
                losses[k][a, w] = ce(v[0], tgt)
            losses["base_model"][a, w] = ce(full_fwd(base, win[:, :-1])[:, T:], tgt)
            ref = full_fwd(Pm[a], win[:, :-1])[:, T:]                  # the agent's whole forward
            checks["max_abs_logit_diff_per_agent_vs_model"] = max(
                checks["max_abs_logit_diff_per_agent_vs_model"], float(jnp.max(jnp.abs(ref - lg["per_agent"][0]))))
            if a == 0:
                checks["max_abs_logit_diff_lragent_vs_per_agent_agent0"] = max(
                    checks["max_abs_logit_diff_lragent_vs_per_agent_agent0"],
                    float(jnp.max(jnp.abs(lg["lragent"][0] - lg["per_agent"][0]))))
            bar.update()
    bar.close()
    # the functional forward is the library model's forward (agent 1's merged weights in the nnx model)
    ids0 = jnp.asarray(slices[1]["held"][0][:max_len])[None]
    model_logits = nnx.merge(graphdef, lrjax.tree.replace(state, Pm[1]))(ids0)
    checks["max_abs_logit_diff_functional_vs_CharTransformer"] = float(jnp.max(jnp.abs(
        model_logits - full_fwd(Pm[1], ids0))))

    # ---- 4. cache bytes of the context (all layers)
    ctx = jnp.asarray(slices[0]["held"][0][:T])[None]
    _, c_ctx = prefill(Pm[0], bvs[0], ctx)
    c_ctx = [jax.tree.map(lambda x: x[:, :T], (c.k, c.v, c.l)) for c in c_ctx]   # the T context positions
    kv_one = sum(cache_nbytes(c[:2]) for c in c_ctx)
    bytes_ = {"per_agent": N * kv_one, "lragent": sum(cache_nbytes(c) for c in c_ctx),
              "fully_shared": kv_one, "base_only": kv_one}

    # ---- 5. timing: context prefill for all agents, and one decode step (one agent, one token)
    cap = max_len  # room for the 2 warm-up + 2 * repeats timed decode steps (checked in parse_args)
    a1 = 1
    pre_plain = jax.jit(lambda P, ids: plain_prefill(P, ids, cap, L, H))
    pre_lr = prefill
    Pstack = jax.tree.map(lambda *x: jnp.stack(x), *Pm)
    pre_all = jax.jit(jax.vmap(lambda P, ids: plain_prefill(P, ids, cap, L, H), in_axes=(0, None)))
    pf = time_round_robin({"per_agent": lambda: jax.block_until_ready(pre_all(Pstack, ctx)),
                           "lragent": lambda: jax.block_until_ready(pre_lr(Pm[0], bvs[0], ctx)),
                           "shared_plain": lambda: jax.block_until_ready(pre_plain(Pm[0], ctx)),
                           "base_limit": lambda: jax.block_until_ready(pre_plain(base, ctx))},
                          max(2, args.repeats // 3), warmup=1, desc="prefill", progress=progress)

    step_plain = jax.jit(lambda P, kv, pos, tok: plain_step(P, kv, pos, tok, L, H), donate_argnums=(1,))
    step_lr = jax.jit(lambda P, bv, caches, tok: lragent_step(P, Wv, av, bv, s, caches, tok, L, H),
                      donate_argnums=(2,))
    tok = ctx[:, -1:]
    box = {"base_limit": list(pre_plain(base, ctx)[1:]), "per_agent": list(pre_plain(Pm[a1], ctx)[1:]),
           "lragent": pre_lr(Pm[0], bvs[0], ctx)[1], "lragent_base_read": pre_lr(Pm[0], bvs[0], ctx)[1]}

    def call_plain(name, P):
        def f():
            _, box[name][0], box[name][1] = step_plain(P, box[name][0], box[name][1], tok)
            jax.block_until_ready(box[name][0])
        return f

    def call_lr(name, bv):
        def f():
            _, box[name] = step_lr(Pm[a1], bv, box[name], tok)
            jax.block_until_ready(box[name])
        return f

    dec = time_round_robin({"base_limit": call_plain("base_limit", base), "per_agent": call_plain("per_agent", Pm[a1]),
                            "lragent": call_lr("lragent", bvs[a1]),
                            "lragent_base_read": call_lr("lragent_base_read", [None] * L)}, 2 * args.repeats, warmup=2, desc="decode", progress=progress)
    dec = {k: summarize(v) for k, v in dec.items()}
    pf = {k: summarize(v) for k, v in pf.items()}

    # ---- 6. report
    mean = {k: float(v.mean()) for k, v in losses.items()}
    per_agent_loss = {k: [float(x) for x in v.mean(1)] for k, v in losses.items()}
    gap = {k: mean[k] - mean["per_agent"] for k in losses}
    lim_dec, lim_pf = dec["base_limit"]["median_ms"], pf["base_limit"]["median_ms"]
    rows = ["| scheme | context cache (KiB) | vs per-agent | next-char loss | gap vs per-agent | "
            "per-agent loss gap (agent 0..) | prefill all agents (ms) | decode / token (ms) | decode vs limit |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for k in SCHEMES:
        pfk = pf[{"per_agent": "per_agent", "lragent": "lragent"}.get(k, "shared_plain")]
        deck = dec["lragent"] if k == "lragent" else dec["per_agent"]
        ga = ", ".join(f"{x - y:+.4f}" for x, y in zip(per_agent_loss[k], per_agent_loss["per_agent"]))
        rows.append(f"| {LABELS[k]} | {bytes_[k] / 1024:.0f} | {bytes_[k] / bytes_['per_agent']:.3f} | "
                    f"{mean[k]:.4f} | {gap[k]:+.4f} | {ga} | {pfk['median_ms']:.1f} ({pfk['median_ms'] / lim_pf:.2f}x) | "
                    f"{deck['median_ms']:.3f} | {deck['median_ms'] / lim_dec:.2f}x |")
    ga = ", ".join(f"{x - y:+.4f}" for x, y in zip(per_agent_loss["base_model"], per_agent_loss["per_agent"]))
    rows.append(f"| {LABELS['base_model']} | - | - | {mean['base_model']:.4f} | {gap['base_model']:+.4f} | {ga} | "
                f"{lim_pf:.1f} (limit) | {lim_dec:.3f} | 1.00x (limit) |")
    table = "\n".join(rows)
    header = (f"LRAgent on CharTransformer (d_model {args.d_model}, {L} layers, {H} heads), {N} agents sharing A_v "
              f"(LoRA r={args.rank}, alpha={args.alpha:g} on q,v,o,fc1,fc2), context {T} chars written by agent 0, "
              f"{C} scored chars per window, {args.eval_windows} held-out windows per agent; float32 caches; "
              f"{describe(info)}")
    notes = ("Cache bytes: the context's K and V (plus L for LRAgent) over all layers, all agents. Prefill: the "
             "shared context for all agents (per-agent: every agent prefills; shared schemes: agent 0 once); limit = "
             "one plain base-model prefill. Decode: one agent, one token at context "
             f"{T}, donated caches, medians of {2 * args.repeats} round-robin calls; limit = the plain base model's "
             "decode step (fully shared and base-only decode like per-agent: an ordinary K/V read); the same "
             f"LRAgent step with B_v = None (V_base read only) takes {dec['lragent_base_read']['median_ms']:.3f} ms, so "
             "the low-rank term's own cost is the difference to the LRAgent row. "
             "Loss: mean next-char cross-entropy (nats) of the scored chars; agent 0's gap is 0 for LRAgent by "
             "construction (it wrote the cache).")
    print("\n" + header + "\n" + table + "\n" + notes)
    print("checks:", json.dumps(checks))
    total = time.perf_counter() - t_start
    out = {"command": "python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))),
           "device": info, "config": vars(args), "model_params": n_params, "scale": s,
           "pretrain": pre_hist, "agents": agent_hist,
           "loss": {"mean": mean, "per_agent_mean": per_agent_loss, "gap_vs_per_agent": gap,
                    "windows": {k: v.tolist() for k, v in losses.items()}},
           "cache_bytes": bytes_, "cache_bytes_ratio": {k: v / bytes_["per_agent"] for k, v in bytes_.items()},
           "prefill": pf, "decode": dec,
           "ratios": {"decode_lragent_vs_limit": dec["lragent"]["median_ms"] / lim_dec,
                      "decode_per_agent_vs_limit": dec["per_agent"]["median_ms"] / lim_dec,
                      "decode_lragent_base_read_vs_limit": dec["lragent_base_read"]["median_ms"] / lim_dec,
                      "prefill_per_agent_vs_limit": pf["per_agent"]["median_ms"] / lim_pf,
                      "prefill_lragent_vs_limit": pf["lragent"]["median_ms"] / lim_pf},
           "checks": checks, "table_markdown": table, "header": header, "notes": notes, "total_time_s": total}
    with open(os.path.join(args.out, "lragent.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(args.out, "lragent.md"), "w") as f:
        f.write(f"# LRAgent ({'quick' if args.quick else 'full'} run)\n\n{header}\n\n{table}\n\n{notes}\n\n"
                f"reproduce: `{out['command']}` ({total:.0f} s)\n")
    plot(out, os.path.join(args.out, "lragent.png"))
    print(f"reproduce: {out['command']}  ({total:.1f}s total); wrote {args.out}/lragent.{{json,md,png}}")
    return out


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 3, figsize=(13, 3.8))
    names = list(SCHEMES)
    cols = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    axs[0].bar(range(4), [out["cache_bytes"][k] / 1024 for k in names], color=cols)
    axs[0].set(title="context cache (KiB, all layers/agents)", xticks=range(4))
    axs[0].set_xticklabels(["per-agent", "LRAgent", "fully\nshared", "base\nonly"], fontsize=8)
    gaps = out["loss"]["per_agent_mean"]
    n = len(gaps["per_agent"])
    for j, k in enumerate(names[1:] + ["base_model"]):
        axs[1].bar(np.arange(n) + 0.2 * j, [x - y for x, y in zip(gaps[k], gaps["per_agent"])], width=0.2,
                   label=LABELS[k], color=(cols[1:] + ["0.5"])[j])
    axs[1].axhline(0, color="k", lw=0.5)
    axs[1].set(title="next-char loss gap vs per-agent caches", ylabel="nats")
    axs[1].set_xticks(np.arange(n) + 0.3)
    axs[1].set_xticklabels([f"agent {i}" for i in range(n)])
    axs[1].legend(fontsize=6)
    d = out["decode"]
    keys = ["base_limit", "per_agent", "lragent_base_read", "lragent"]
    axs[2].bar(range(4), [d[k]["median_ms"] for k in keys], yerr=[d[k]["iqr_ms"] / 2 for k in keys],
               color=["0.5", "tab:blue", "navajowhite", "tab:orange"])
    axs[2].set(title="decode step, one token (ms, median)", xticks=range(4))
    axs[2].set_xticklabels(["base\n(limit)", "per-agent", "LRAgent\nB_v=None", "LRAgent"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
