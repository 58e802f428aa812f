"""Argument checks and input preparation shared by the delta-rule kernels (private).

Every public kernel of :mod:`lrjax.nn.attention` calls :func:`prepare` first: it checks shapes,
dtypes and values eagerly (values only on concrete arrays), then returns the inputs cast to the
static facts of the call; :func:`cast` (inside the jitted cores) turns the arrays into the
compute dtype, with ``q``/``k`` repeated over the value heads (grouped value heads) and the gate
``[B, T, HV, K]`` or per head ``[B, T, HV, 1]`` (the GDN case).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lrjax._validation import check_array, check_finite, check_float, compute_dtype, is_concrete

__all__ = ["Prepared", "prepare", "cast", "check_log_decay"]


def check_log_decay(g, name: str = "g"):
    """Refuse a positive log-decay (``exp(g) > 1`` would grow the state); concrete arrays only."""
    if not is_concrete(g):
        return g
    with jax.ensure_compile_time_eval():
        gmax = float(jnp.max(jnp.asarray(g, jnp.float32))) if np.size(g) else 0.0
    if gmax > 0:
        raise ValueError(f"{name} is a log-decay and must be <= 0 everywhere (alpha = exp({name}) <= 1), "
                         f"got max {gmax:.4g}; pass e.g. -softplus(x) or log(sigmoid(x))")
    return g


class Prepared:
    """A kernel call after the checks: ``raw`` = the checked arrays ``(q, k, v, g, beta, state,
    lengths)`` and the static facts (sizes, ``dtype`` to compute in, ``out_dtype`` = ``v``'s dtype,
    ``scalar_gate``, ``step``, ``scale``). Hashable by its static facts, so it can be a static
    argument of a jitted core."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def key(self):
        return (str(self.dtype), str(self.out_dtype), self.scalar_gate, self.step, self.scale,
                self.B, self.T, self.H, self.HV, self.K, self.V)

    def static(self):
        s = Prepared(**{n: v for n, v in self.__dict__.items() if n != "raw"})
        return s

    def __hash__(self):
        return hash(self.key())

    def __eq__(self, other):
        return isinstance(other, Prepared) and self.key() == other.key()


def _shape_err(name, want, got):
    return ValueError(f"{name} must have shape {want}, got {tuple(got)}")


def prepare(q, k, v, g, beta, *, scale=None, initial_state=None, lengths=None, scalar_gate=None,
            step: bool = False) -> Prepared:
    """Check and cast the arguments of a delta-rule kernel.

    ``scalar_gate``: ``True`` (GDN: ``g`` must be per head), ``False`` (KDA: per key dimension) or
    ``None`` (either). ``step``: the one-token decode layout (no ``T`` axis, a state is required).
    """
    nd = 3 if step else 4
    lay = "[B, H, K]" if step else "[B, T, H, K]"
    q = check_array(q, "q", kind="floating")
    k = check_array(k, "k", kind="floating")
    v = check_array(v, "v", kind="floating")
    g = check_array(g, "g", kind="floating")
    beta = check_array(beta, "beta", kind="floating")
    if q.ndim != nd:
        raise ValueError(f"q must have shape {lay}, got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)} {lay}, got {tuple(k.shape)}")
    if v.ndim != nd:
        raise ValueError(f"v must have shape {lay.replace('H, K', 'HV, V')}, got shape {tuple(v.shape)}")
    lead = q.shape[:nd - 2]
    if v.shape[:nd - 2] != lead:
        what = "batch" if step else "batch and time"
        raise ValueError(f"v must have the {what} sizes of q {tuple(lead)}, got shape {tuple(v.shape)}")
    H, K = q.shape[-2:]
    HV, V = v.shape[-2:]
    if H < 1 or K < 1 or HV < 1 or V < 1:
        raise ValueError(f"q and v need at least one head and one feature, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if HV % H != 0:
        raise ValueError(f"v has {HV} value heads, which is not a multiple of the {H} query/key heads of q "
                         f"and k (grouped value heads need HV = m * H); change the head counts")
    gshape_vec = (*lead, HV, K)
    gshape_sca = (*lead, HV)
    if g.shape == gshape_vec and scalar_gate is not True:
        sca = False
    elif g.shape == gshape_sca and scalar_gate is not False:
        sca = True
    else:
        want = {True: f"{gshape_sca} (one log-decay per value head)",
                False: f"{gshape_vec} (one log-decay per value head and key dimension)",
                None: f"{gshape_vec} (KDA) or {gshape_sca} (GDN)"}[scalar_gate]
        raise _shape_err("g", want, g.shape)
    if beta.shape != gshape_sca:
        raise _shape_err("beta", gshape_sca, beta.shape)
    scale = check_float(scale, "scale", low=0.0, low_open=True, allow_none=True)
    if scale is None:
        scale = K ** -0.5
    B = lead[0]
    T = 1 if step else lead[1]
    if initial_state is not None:
        initial_state = check_array(initial_state, "state" if step else "initial_state", kind="floating")
        if initial_state.shape != (B, HV, K, V):
            raise _shape_err("state" if step else "initial_state", f"[B, HV, K, V] = {(B, HV, K, V)}",
                             initial_state.shape)
    elif step:
        raise TypeError("state must be an array [B, HV, K, V], got None; start from "
                        "jnp.zeros((B, HV, K, V), jnp.float32) or a prefill's final state")
    if lengths is not None:
        lengths = check_array(lengths, "lengths", kind="integer", convert=True)
        if lengths.shape != (B,):
            raise _shape_err("lengths", f"[B] = ({B},)", lengths.shape)
        if is_concrete(lengths) and lengths.size:
            with jax.ensure_compile_time_eval():
                lo, hi = int(jnp.min(lengths)), int(jnp.max(lengths))
            if lo < 0 or hi > T:
                raise ValueError(f"lengths must lie in [0, T={T}], got values in [{lo}, {hi}]")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        check_finite(x, name)
    if initial_state is not None:
        check_finite(initial_state, "state" if step else "initial_state")
    check_log_decay(g, "g")

    dts = [x.dtype for x in (q, k, v, g, beta)]
    if initial_state is not None:
        dts.append(initial_state.dtype)
    cdt = jax.dtypes.canonicalize_dtype(compute_dtype(*dts))
    return Prepared(raw=(q, k, v, g, beta, initial_state, lengths), dtype=cdt, out_dtype=v.dtype,
                    scalar_gate=sca, step=step, scale=float(scale), B=B, T=T, H=H, HV=HV, K=K, V=V)


def cast(p: Prepared, q, k, v, g, beta, state, lengths):
    """Inputs in the compute dtype (traceable; call inside the jitted core): ``q, k`` repeated over
    the value heads and ``q`` scaled, ``g`` with a trailing key axis (size 1 for GDN), ``state``
    zeros when None, steps past ``lengths`` made exact no-ops (``g = beta = 0``, ``q = k = v = 0``)."""
    cdt = p.dtype
    if p.step:
        q, k, v, g, beta = (x[:, None] for x in (q, k, v, g, beta))
    rep = p.HV // p.H
    qc = jnp.repeat(q.astype(cdt), rep, axis=2) * jnp.asarray(p.scale, cdt)
    kc = jnp.repeat(k.astype(cdt), rep, axis=2)
    gc = g.astype(cdt)
    gc = gc[..., None] if p.scalar_gate else gc
    betac = beta.astype(cdt)
    vc = v.astype(cdt)
    if lengths is not None:
        valid = jnp.arange(p.T)[None, :] < lengths.astype(jnp.int32)[:, None]  # [B, T]
        m = valid[:, :, None, None]
        qc, kc, vc, gc = (jnp.where(m, x, 0) for x in (qc, kc, vc, gc))
        betac = jnp.where(valid[:, :, None], betac, 0)
    state = jnp.zeros((p.B, p.HV, p.K, p.V), cdt) if state is None else state.astype(cdt)
    return qc, kc, vc, gc, betac, state
