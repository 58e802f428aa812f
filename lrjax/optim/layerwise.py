r"""Per-layer weight updates: each layer's update is computed and applied inside the backward pass.

GaLore's per-layer weight update (Zhao et al. 2024, arXiv:2403.03507, Sec. 4.2 "Reducing memory
further"; galore-torch's ``torchrun_main.py --optimizer galore_adamw8bit_per_layer``) runs the
optimizer on a layer's gradient as soon as backpropagation has produced it and frees it, so the
step never holds the gradient of the whole model at once. galore-torch does this with one torch
optimizer per parameter, stepped from a ``register_post_accumulate_grad_hook``. The JAX form here
has no hooks and no mutable state; it is a step function whose *dataflow* puts each update inside
the backward pass:

* Every parameter leaf ``W`` enters the loss through a tap, an identity with a custom VJP whose
  backward rule receives the leaf's finished gradient ``G`` and returns, in its place, the new
  parameter ``W + u`` with ``(u, s') = tx.update(G, s, W)`` computed on that leaf alone (and the
  leaf's new optimizer state ``s'`` as the cotangent of the state). ``jax.vjp`` of the tapped loss
  therefore returns the new parameters and the new state, and no full-size gradient outlives its
  own leaf's update.
* A stacked leaf ``[L, ...]`` (flax ``nn.scan`` stacks) is one leaf: by default its update runs
  once the backward scan has produced the whole stack's gradient of that leaf (one of the stack's
  kernels, e.g. all layers' ``fc1``), so the step holds one stacked leaf's gradient at a time,
  not the model's. With ``scan_layers=True`` a stack consumed by a top-level ``lax.scan`` is
  tapped *per layer*, inside the scan body: the loss's jaxpr is rewritten so the scan also walks
  the leaf's per-layer optimizer state, and the update of layer ``l`` runs in the backward scan's
  iteration for ``l`` (the same math, tested equal). It is not the default because JAX saves the
  tap's residuals (the layer's weight slice and state slice) as stacked copies in the forward
  scan, which on the measured ``nn.scan`` transformer cost more than the per-layer gradient saves
  (``docs/bench_optim.md``).

``tx`` is any optax transformation that acts on each leaf independently (every lrjax.optim
projection -- GaLore, Fira, DCT --, ``optax.scale_by_adam``, chains with a learning rate,
``optax.MultiSteps`` of those): the state is the tree of ``tx.init({path: leaf})`` per leaf
(:class:`LayerwiseState`), and a leaf's update is exactly ``tx.update`` on that leaf -- the same
code as the whole-tree transformation. Hence, with an exact refresh (``"svd"``, ``"eigh"``) the
trajectory equals plain ``tx`` on the whole tree up to float32 round-off (tested: the per-leaf
math on the same gradients agrees to an ulp; over several steps with refreshes the parameters
agree to ``1e-5`` relative -- the two compiled programs fuse the backward differently, and an SVD
refresh amplifies last-bit differences of the gradient). Transformations that couple leaves do not factor this way: a global-norm clip becomes a
per-leaf clip. Random refreshes (``"randomized"``, ``"subspace"``) draw their sketches from the
transformation's seed and the step per call; run per leaf (or per layer) every leaf of one shape
draws the same sketch at a step, while the whole-tree transformation draws one batch per shape
group, so those trajectories differ from plain GaLore's by the draws (same distribution per matrix).

Memory: the compiled step's temporaries hold one leaf's (stacked leaves: one layer's) gradient
and GaLore temporaries at a time, where XLA's scheduler orders the backward that way (it does for
the MLP and ``nn.scan`` stacks measured in ``docs/bench_optim.md``); the new parameters are
outputs, so donate ``params`` and the state (``jax.jit(step, donate_argnums=(0, 1))``) to reuse
their buffers.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jcore

from lrjax import tree as _tree
from lrjax._validation import check_bool
from lrjax.optim.projection import _per_leaf

__all__ = ["LayerwiseState", "layerwise_init", "layerwise_update", "layerwise_step"]


class LayerwiseState(NamedTuple):
    """State of a per-layer optimizer: ``leaves`` has the params' structure and holds, at each leaf
    path ``p``, ``tx.init({p: leaf})`` (nested dicts keyed by the path's components)."""

    leaves: Any


def _check_tx(tx, argname="tx"):
    if not (hasattr(tx, "init") and hasattr(tx, "update") and callable(tx.init) and callable(tx.update)):
        raise TypeError(f"{argname} must be an optax.GradientTransformation (e.g. lrjax.optim.galore(...) chained "
                        f"with a learning rate), got {type(tx).__name__}")


def _single(path: str, x):
    """``x`` as the only leaf of a nested dict at ``path`` (so plans, targets and axes see its path)."""
    out = x
    for k in reversed(path.split("/") if path else ["_"]):
        out = {k: out}
    return out


def _unsingle(path: str, tree):
    for k in (path.split("/") if path else ["_"]):
        tree = tree[k]
    return tree


def _check_params(params, argname="params"):
    flat = _tree.flatten(params)
    if not flat:
        raise ValueError(f"{argname} has no array leaves")
    for p, x in flat.items():
        if not isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
            raise TypeError(f"{argname}: leaf {p!r} must be an array, got {type(x).__name__}; wrap it with "
                            "jnp.asarray(...)")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{argname}: leaf {p!r} has dtype {x.dtype}; per-layer updates need floating "
                            "parameters (close over integer leaves instead of passing them as params)")
    return flat


def layerwise_init(tx, params) -> LayerwiseState:
    """``LayerwiseState`` with ``tx.init`` of every leaf on its own (``tx``: see module doc).

    Args:
      tx: a per-leaf optax ``GradientTransformation`` (the one given to :func:`layerwise_step`).
      params: the pytree of floating arrays to train (the params given to the step).

    Returns:
      ``LayerwiseState(leaves)``: ``leaves`` has the structure of ``params`` and holds, at each leaf
      path ``p``, ``tx.init({p: leaf})`` (nested dicts keyed by the path's components).

    Raises:
      TypeError: ``tx`` without ``init``/``update``; a non-array or integer leaf of ``params``.
      ValueError: whatever ``tx.init(params)`` refuses for the whole tree (e.g. a GaLore
        ``targets`` pattern that matches no leaf).
    """
    _check_tx(tx)
    flat = _check_params(params)
    treedef = jax.tree_util.tree_structure(params)
    jax.eval_shape(tx.init, params)      # the whole-tree checks (a `targets` pattern matching nothing, ...)
    with _per_leaf():
        return LayerwiseState(jax.tree_util.tree_unflatten(treedef, [tx.init(_single(p, x)) for p, x in flat.items()]))


def _state_leaves(state, params, argname="state"):
    if not isinstance(state, LayerwiseState):
        raise TypeError(f"{argname} must be the LayerwiseState returned by layerwise_init, got {type(state).__name__}")
    treedef = jax.tree_util.tree_structure(params)
    try:
        return treedef.flatten_up_to(state.leaves)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{argname} does not have the params' tree structure ({e}); build it with "
                         f"layerwise_init(tx, params) for these params") from e


def layerwise_update(tx, grads, state: LayerwiseState, params=None):
    """The per-leaf math without the backward pass: ``(updates, new_state)``, leaf by leaf.

    ``updates`` at ``p`` is ``tx.update({p: G_p}, state_p, {p: W_p})``'s; this is what
    :func:`layerwise_step` computes inside the backward pass, here from given gradients (e.g. to
    compare with the whole-tree ``tx.update``).

    Args:
      tx: the per-leaf transformation the state was made with.
      grads: gradients, a pytree of floating arrays with the params' structure.
      state: the ``LayerwiseState`` from :func:`layerwise_init` (or a previous update).
      params: the current params (same structure), handed to ``tx.update`` leaf by leaf; ``None``
        (default) hands ``None`` to every leaf's ``tx.update``, which is fine for transformations that
        do not read the params (Adam, GaLore) and an optax error for those that do (weight decay).

    Returns:
      ``(updates, new_state)``: updates with the structure of ``grads`` and the new ``LayerwiseState``.

    Raises:
      TypeError: ``tx`` not a transformation; a non-floating leaf of ``grads``; ``state`` not a
        ``LayerwiseState``.
      ValueError: ``state`` without the structure of ``grads``.
    """
    _check_tx(tx)
    flat_g = _check_params(grads, "grads")
    treedef = jax.tree_util.tree_structure(grads)
    states = _state_leaves(state, grads)
    flat_p = None if params is None else _tree.flatten(params)
    ups, news = [], []
    with _per_leaf():
        for (p, g), s in zip(flat_g.items(), states):
            u, s2 = tx.update(_single(p, g), s, None if flat_p is None else _single(p, flat_p[p]))
            ups.append(_unsingle(p, u))
            news.append(s2)
    un = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
    return un(ups), LayerwiseState(un(news))


# ----------------------------------------------------------------------------- state smuggling
# The new optimizer state leaves the backward pass as the cotangent of the old one. Cotangents are
# floating, so integer/bool state (counts, flags, 8-bit codes) is carried exactly as float32:
# 8/16-bit integers and bools by value, 32-bit integers as two 16-bit halves (no denormals, no
# arithmetic ever touches them: they are only copied).
def _enc(x):
    x = jnp.asarray(x)
    dt = x.dtype
    if jnp.issubdtype(dt, jnp.floating):
        return x
    if dt == jnp.bool_ or (jnp.issubdtype(dt, jnp.integer) and dt.itemsize <= 2):
        return x.astype(jnp.float32)
    if jnp.issubdtype(dt, jnp.integer) and dt.itemsize == 4:
        u = jax.lax.bitcast_convert_type(x, jnp.uint32)
        return jnp.stack([(u >> 16).astype(jnp.float32), (u & 0xFFFF).astype(jnp.float32)], axis=-1)
    raise TypeError(f"tx: optimizer state leaf of dtype {dt} cannot be carried through the backward pass "
                    "(floating, bool and integers up to 32 bits can)")


def _dec(e, like):
    dt = like.dtype
    if jnp.issubdtype(dt, jnp.floating):
        return e
    if dt == jnp.bool_:
        return e != 0
    if dt.itemsize <= 2:
        return e.astype(dt)
    u = (e[..., 0].astype(jnp.uint32) << 16) | e[..., 1].astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(u, dt)


def _make_tap(tx, path, s_def, s_like):
    """``tap(w, enc_state) -> (w, 0.0)``; its VJP maps the gradient ``G`` of ``w`` to the new ``w`` and the new
    encoded state. The scalar zero is added to the loss so the backward rule always runs, even for a
    leaf the loss does not use (whose update, e.g. Adam's momentum, is still due)."""

    @jax.custom_vjp
    def tap(w, enc):
        return w, jnp.zeros((), jnp.float32)

    def fwd(w, enc):
        return tap(w, enc), (w, enc)

    def bwd(res, cts):
        w, enc = res
        g = cts[0]
        s = jax.tree_util.tree_unflatten(s_def, [_dec(e, lk) for e, lk in zip(enc, s_like)])
        u, s2 = tx.update(_single(path, g.astype(w.dtype)), s, _single(path, w))
        new_w = optax.apply_updates(w, _unsingle(path, u))
        return new_w, [_enc(x) for x in jax.tree_util.tree_leaves(s2)]

    tap.defvjp(fwd, bwd)
    return tap


# ----------------------------------------------------------------------------- the jaxpr walk
def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _eval_eqn(eqn, invals):
    r = eqn.primitive.get_bind_params(eqn.params)
    # jax < 0.7 returns (subfuns, params); newer jax the params alone
    subfuns, bind_params = r if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], dict) else ((), r)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return out if eqn.primitive.multiple_results else [out]


def _scan_leaves(jaxpr, n_params):
    """Param invars consumed only as ``xs`` of top-level scans whose length is the leaf's leading axis:
    ``{param index: (eqn index, operand index)}`` (one use only)."""
    uses: dict = {}
    invars = {v: i for i, v in enumerate(jaxpr.invars[:n_params])}
    for k, eqn in enumerate(jaxpr.eqns):
        for j, v in enumerate(eqn.invars):
            if isinstance(v, jcore.Var) and v in invars:
                uses.setdefault(invars[v], []).append((k, j))
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var) and v in invars:
            uses.setdefault(invars[v], []).append((-1, -1))
    out = {}
    for i, us in uses.items():
        if len(us) != 1 or us[0][0] < 0:
            continue
        k, j = us[0]
        eqn = jaxpr.eqns[k]
        if eqn.primitive.name != "scan":
            continue
        pr = eqn.params
        first_xs = pr["num_consts"] + pr["num_carry"]
        if j >= first_xs and jaxpr.invars[i].aval.shape[:1] == (pr["length"],):
            out[i] = (k, j)
    return out


def _layer_state_spec(tx, path, x, s_full):
    """How the whole-stack state of a leaf ``[L, ...]`` maps to per-layer states: for each state leaf,
    ``True`` (sliced along axis 0) or ``False`` (shared: the same value for every layer, e.g. a step
    count); ``None`` when the per-layer state does not line up with the stack's."""
    L = x.shape[0]
    one = jax.eval_shape(lambda: tx.init(_single(path, jnp.zeros(x.shape[1:], x.dtype))))
    d_one, d_full = jax.tree_util.tree_structure(one), jax.tree_util.tree_structure(s_full)
    if d_one != d_full:
        return None
    spec = []
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(s_full)):
        if a.dtype != b.dtype:
            return None
        if tuple(b.shape) == (L,) + tuple(a.shape):
            spec.append(True)
        elif tuple(b.shape) == tuple(a.shape):
            spec.append(False)
        else:
            return None
    return spec


def layerwise_step(loss_fn: Callable, tx, *, has_aux: bool = False, scan_layers: bool = False) -> Callable:
    """A training step that applies ``tx`` to each layer inside the backward pass (module doc).

    Args:
      loss_fn: ``loss_fn(params, *args) -> loss`` (a float scalar; ``(loss, aux)`` with
        ``has_aux=True``); ``args`` are arrays or pytrees of arrays (close over anything static).
      tx: a per-leaf optax transformation *including* the learning rate and sign, e.g.
        ``optax.chain(lrjax.optim.galore(optax.scale_by_adam(), 128), optax.scale(-lr))``; its
        updates are added to the parameters (``optax.apply_updates``).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      scan_layers: tap the leaves that ``loss_fn`` scans over (``[L, ...]`` stacks fed to a
        top-level ``lax.scan`` as ``xs``, e.g. by ``flax.linen.scan``) per layer inside the scan;
        default ``False``: each stack is tapped as one leaf (module doc: measured cheaper).

    Returns:
      ``step(params, state, *args) -> (loss, new_params, new_state)`` (``((loss, aux), ...)`` with
      ``has_aux``), jittable; ``state`` from :func:`layerwise_init`. ``new_params`` equal
      ``optax.apply_updates(params, u)`` with ``(u, new_state) = layerwise_update(tx, grads,
      state, params)``.

    Note: ``tx`` is applied to each leaf alone, so a transformation that couples leaves acts per
    leaf: ``optax.clip_by_global_norm(c)`` clips each leaf's gradient to norm ``c`` (a per-leaf
    clip), not the global norm of all gradients.

    Raises:
      TypeError: ``loss_fn`` not callable, ``tx`` not a transformation, non-bool flags, integer
        params, a non-scalar / non-floating loss, or (with ``has_aux=True``) a loss that does not
        return a ``(loss, aux)`` pair (at the first call).
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable loss_fn(params, *args) -> loss, got {type(loss_fn).__name__}")
    _check_tx(tx)
    has_aux = check_bool(has_aux, "has_aux")
    scan_layers = check_bool(scan_layers, "scan_layers")

    def step(params, state, *args):
        with _per_leaf():
            return _step(params, state, *args)

    def _step(params, state, *args):
        flat = _check_params(params)
        paths = list(flat)
        leaves = list(flat.values())
        treedef = jax.tree_util.tree_structure(params)
        states = _state_leaves(state, params)
        a_leaves, a_def = jax.tree_util.tree_flatten(args)

        def fun(*xs):
            ps = jax.tree_util.tree_unflatten(treedef, xs[:len(leaves)])
            return loss_fn(ps, *jax.tree_util.tree_unflatten(a_def, xs[len(leaves):]))

        closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*leaves, *a_leaves)
        if has_aux and not (isinstance(out_shape, (tuple, list)) and len(out_shape) == 2):
            raise TypeError(f"loss_fn must return a pair (loss, aux) with has_aux=True, got "
                            f"{type(out_shape).__name__} {out_shape}; return (loss, aux) or pass has_aux=False")
        loss_shape = out_shape[0] if has_aux else out_shape
        if not hasattr(loss_shape, "shape") or loss_shape.shape != () or \
                not jnp.issubdtype(loss_shape.dtype, jnp.floating):
            raise TypeError(f"loss_fn must return a float scalar{' as the first element of (loss, aux)' if has_aux else ''}"
                            f", got {loss_shape}")
        jaxpr = closed.jaxpr

        specs = {}
        scanned = _scan_leaves(jaxpr, len(leaves)) if scan_layers else {}
        for i in list(scanned):
            try:
                specs[i] = _layer_state_spec(tx, paths[i], leaves[i], states[i])
            except (ValueError, TypeError):     # a layer's slice is not a leaf tx accepts: tap the stack
                specs[i] = None
            if specs[i] is None:
                del scanned[i]

        # encoded states; per-layer stacks for scanned leaves (shared leaves broadcast to [L])
        s_defs, s_likes, enc_in = [], [], []
        for i, (p, x) in enumerate(zip(paths, leaves)):
            sl, sd = jax.tree_util.tree_flatten(states[i])
            if i in scanned:
                L = x.shape[0]
                one = jax.eval_shape(lambda p=p, x=x: tx.init(_single(p, jnp.zeros(x.shape[1:], x.dtype))))
                s_defs.append(jax.tree_util.tree_structure(one))
                s_likes.append(jax.tree_util.tree_leaves(one))
                enc_in.append([_enc(s if sliced else jnp.broadcast_to(s, (L,) + jnp.shape(s)))
                               for s, sliced in zip(sl, specs[i])])
            else:
                s_defs.append(sd)
                s_likes.append(sl)
                enc_in.append([_enc(s) for s in sl])
        taps = [_make_tap(tx, p, s_defs[i], s_likes[i]) for i, p in enumerate(paths)]
        by_eqn: dict = {}
        for i, (k, j) in scanned.items():
            by_eqn.setdefault(k, []).append((j, i))

        def tapped_loss(ws, encs):
            env = {}
            zero = jnp.zeros((), jnp.float32)
            for i, (v, w) in enumerate(zip(jaxpr.invars[:len(leaves)], ws)):
                if i in scanned:
                    env[v] = w
                else:
                    env[v], z = taps[i](w, encs[i])
                    zero = zero + z
            for v, a in zip(jaxpr.invars[len(leaves):], a_leaves):
                env[v] = a
            for v, c in zip(jaxpr.constvars, closed.consts):
                env[v] = c
            for k, eqn in enumerate(jaxpr.eqns):
                invals = [_read(env, v) for v in eqn.invars]
                if k in by_eqn:
                    outs, z = _tapped_scan(eqn, invals, {j: (taps[i], encs[i]) for j, i in by_eqn[k]})
                    zero = zero + z
                else:
                    outs = _eval_eqn(eqn, invals)
                for v, o in zip(eqn.outvars, outs):
                    if not isinstance(v, jcore.DropVar):
                        env[v] = o
            outs = [_read(env, v) for v in jaxpr.outvars]
            out = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)
            if has_aux:
                return out[0] + zero.astype(out[0].dtype), out[1]
            return out + zero.astype(out.dtype)

        if has_aux:
            loss, vjp, aux = jax.vjp(tapped_loss, leaves, enc_in, has_aux=True)
        else:
            loss, vjp = jax.vjp(tapped_loss, leaves, enc_in)
        new_leaves, enc_out = vjp(jnp.ones((), loss.dtype))
        new_states = []
        for i in range(len(leaves)):
            if i in scanned:
                dec = [_dec(e, jax.ShapeDtypeStruct((leaves[i].shape[0],) + tuple(lk.shape), lk.dtype))
                       for e, lk in zip(enc_out[i], s_likes[i])]
                dec = [d if sliced else d[0] for d, sliced in zip(dec, specs[i])]
                new_states.append(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(states[i]), dec))
            else:
                new_states.append(jax.tree_util.tree_unflatten(
                    s_defs[i], [_dec(e, lk) for e, lk in zip(enc_out[i], s_likes[i])]))
        un = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return (loss, aux) if has_aux else loss, un(list(new_leaves)), LayerwiseState(un(new_states))

    return step


def _tapped_scan(eqn, invals, taps):
    """Re-run a scan eqn whose ``xs`` operands at ``taps`` (operand index -> (tap, encoded per-layer
    state)) are tapped per layer inside the body; returns (outputs, sum of the taps' zeros)."""
    pr = eqn.params
    nc, ncar = pr["num_consts"], pr["num_carry"]
    body = pr["jaxpr"]
    consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
    idx = sorted(taps)
    extra = [taps[j][1] for j in idx]

    def f(carry, x):
        c, z = carry
        xs_i, ex = x
        xs_i = list(xs_i)
        for j, e in zip(idx, ex):
            xs_i[j - nc - ncar], zj = taps[j][0](xs_i[j - nc - ncar], e)
            z = z + zj
        out = jcore.jaxpr_as_fun(body)(*consts, *c, *xs_i)
        return (list(out[:ncar]), z), list(out[ncar:])

    (c, z), ys = jax.lax.scan(f, (list(init), jnp.zeros((), jnp.float32)), (list(xs), extra),
                              length=pr["length"], reverse=pr["reverse"], unroll=pr["unroll"])
    return list(c) + list(ys), z
