"""Unmaterialized low-rank forward: ``x W + s (x A) B`` without forming ``W + s A B``.

``factored(fn, rp)`` turns any function ``fn(params, *args)`` -- a linen ``model.apply``, an
NNX ``lambda state, x: nnx.merge(graphdef, state)(x)``, a plain function -- into
``g(base, adapters, *args)`` that equals ``fn(rp.materialize(base, adapters), *args)`` but
computes every matrix product with a targeted kernel in factored form.

Mechanism (a jaxpr transform, :mod:`lrjax.interpreter`): ``fn`` is traced once to a jaxpr (at trace time, so under
``jit`` it costs nothing per step); an interpreter then re-evaluates it with each targeted
leaf bound to a symbolic low-rank value ``(W, A, B, s, c)``. A ``dot_general`` that contracts
exactly the leaf's input axes (see :mod:`lrjax.axes`) with the kernel on the right becomes
``(dot(x, W) + s dot(dot(x, A), B)) * c``; dtype casts of the kernel are applied to the factors;
``pjit``/``closed_call`` bodies are inlined so the value is followed through nested calls;
stacked ``[L, in, out]`` kernels are followed into ``lax.scan`` bodies (``nn.scan`` stacks) and a
transposed 2-D kernel stays low-rank. A ``conv_general_dilated`` with a conv kernel
``[*window, C_in, C_out]`` in the default view (Flax ``nn.Conv``, 1-D/2-D/3-D, any strides, padding
and dilations, ``feature_group_count == batch_group_count == 1``) becomes
``(conv(x, K) + s conv_1x1(conv_kxk(x, A), B)) * c`` (PEFT's conv LoRA form, see
:mod:`lrjax.reparam.conv`). Any other use of the kernel (a grouped conv, a kernel on the left of
an einsum, a DoRA stack inside a scan, a variant with its own matrix view such as ConvLoRA)
falls back to the materialized weight for that use only -- always correct, never silently wrong.

Precision: the fallback's materialized weight follows lrjax's one-rounding rule (computed in
``promote_types(w, factors, float32)``, rounded once to the kernel's dtype), so it equals
:meth:`Reparam.materialize` bit for bit. The factored product itself runs in the kernel's dtype
(factors cast to it), as the dense product it replaces would; its values equal the materialized
path's to the output dtype's rounding.

Why this instead of module surgery or method interception: it needs no knowledge of the model
code or the Flax API generation (linen, NNX and plain JAX all lower to ``dot_general``), and the
adapters stay the same flat pytree the rest of lrjax uses. The payoff is in the backward pass:
the frozen ``W`` gets no gradient, so XLA never forms the ``[M, N]`` ``x^T dy`` product that the
materialized path needs to push a gradient into ``A`` and ``B``; peak memory holds no per-layer
``W + sAB`` copy. DoRA still forms ``W + sAB`` once per step to take its (detached) column norm,
exactly as PEFT does; the product itself stays factored.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np

from lrjax import _validation as V
from lrjax import tree as tree_lib
from lrjax.interpreter import FactoredStats, KernelValue, interpret

__all__ = ["factored", "FactoredStats"]


def factored(fn: Callable[..., Any], rp, *, mode: str = "auto", stats: FactoredStats | None = None):
    """Wrap ``fn(params, *args)`` into ``g(base, adapters, *args)`` computing low-rank products
    factored. ``args`` must be pytrees of arrays (close over static options). Values equal
    ``fn(rp.materialize(base, adapters), *args)`` up to floating-point reassociation.

    ``mode`` picks how a matched product is computed (values are the same):

    * ``"factored"``: ``x W + s (x A) B`` forward; the backward is what autodiff gives
      (``dx = dy W^T + s (dy B^T) A^T``, ``dA``/``dB`` from the small products). Cheapest when
      the step has fewer tokens than the kernel has inputs (``tokens < M``).
    * ``"fused"``: a ``custom_vjp`` that forms ``W + sAB`` transiently in the forward and again in
      the backward (``O(MNr)``, cheap next to ``O(tokens M N)`` when ``tokens >= M``), runs one
      dense product each way, and takes ``dA = s x^T (dy B^T)``, ``dB = s (xA)^T dy`` in factored
      form. It saves the two token-sized low-rank products and adds per layer. No ``W + sAB`` is
      held across the step. Not forward-mode differentiable (``jax.jvp``); DoRA always uses
      ``"factored"``.
    * ``"auto"`` (default): ``"fused"`` where ``tokens >= M``, else ``"factored"``.

    A convolution with an adapted kernel is always computed as ``conv(x, K) + s conv_1x1(conv_kxk(x,
    A), B)`` (see the module docstring); ``mode`` applies to ``dot_general`` uses. Each factored
    convolution counts in ``stats.factored`` like a factored product.

    Pass a :class:`FactoredStats` to see how many kernel uses were factored vs fell back; it
    accumulates over every trace of ``g`` (one jitted train step and one eval step count twice).

    Activation-space adapters (``rp.activation_space``: FlyLoRA, NeRA, mixtures; see
    :meth:`lrjax.reparam.Reparam.branch`) compute ``x W + branch(x)`` at each use of their kernel;
    a use the interpreter cannot follow raises :class:`lrjax.interpreter.NotMergeable` (there is no
    dense weight to fall back on). A variant with rule-updated state (``rp.state_keys``, e.g.
    FlyLoRA's router bias) makes ``g`` return ``(output, state)``: ``state`` is ``{path: {key:
    new value}}`` after this forward's update rule (:meth:`~lrjax.reparam.Reparam.update_state`);
    put it into the adapters with ``rp.with_state(adapters, state)``. The state keys are frozen
    (no gradient reaches them).

    How each kernel is handed to the interpreter is :meth:`lrjax.reparam.Reparam.kernel_value`
    (the extension point; see :mod:`lrjax.interpreter`).
    """
    from lrjax.reparam.base import Reparam

    if not callable(fn):
        raise TypeError(f"fn must be a callable fn(params, *args) such as a linen model.apply, got "
                        f"{type(fn).__name__} {fn!r:.60}")
    if not isinstance(rp, Reparam):
        raise TypeError(f"rp must be a reparameterization config such as lrjax.LoRA(rank=8), got "
                        f"{type(rp).__name__} {rp!r:.60}" + ("; build it with lrjax.LoRA(...) rather than "
                                                              "naming it" if isinstance(rp, str) else ""))
    V.check_choice(mode, "mode", ("auto", "factored", "fused"))
    if stats is not None and not isinstance(stats, FactoredStats):
        raise TypeError(f"stats must be None or an lrjax.reparam.FactoredStats(), got {type(stats).__name__}")

    stateful = bool(rp.state_keys)

    @functools.wraps(fn)
    def g(base, adapters, *args, **kwargs):
        if kwargs:
            raise TypeError(f"the factored function takes positional pytree arguments only, got keyword "
                            f"{sorted(kwargs)[0]!r}; close over static options instead, e.g. "
                            f"lrjax.factored(lambda p, x: fn(p, x, {sorted(kwargs)[0]}=...), rp)")
        flat = rp._check(base, adapters, basename="base")
        _check_args(args)
        values = {}
        for k, f in adapters.items():
            values[k] = rp.kernel_value(k, flat[k], f, mode=mode)
            if stats is not None and not isinstance(values[k], KernelValue):
                stats.fallback.append(f"view:{k}")
        if not stateful:
            return interpret(fn, base, values, args, stats=stats)
        out, aux = interpret(fn, base, values, args, stats=stats, return_aux=True)
        return out, rp.next_state(adapters, aux)

    return g


def _check_args(args):
    """``args`` of a factored function: pytrees of arrays or numbers (no strings/objects)."""
    for i, a in enumerate(args):
        if isinstance(a, (list, tuple)) and a and all(
                isinstance(x, (bool, int, float, complex)) for x in jax.tree_util.tree_leaves(a)):
            raise TypeError(f"args[{i}] is a {type(a).__name__} of Python numbers, which fn would receive as "
                            "a list, not an array; wrap it with jnp.asarray(...)")
        for p, leaf in jax.tree_util.tree_flatten_with_path(a)[0]:
            if isinstance(leaf, (bool, np.bool_)):
                where = f"args[{i}]" + (f" at {tree_lib.path_str(p)!r}" if p else "")
                raise TypeError(f"{where} is a Python bool, which fn would receive traced (a flag such as "
                                "train=True cannot steer Python control flow there); close over it instead: "
                                "lrjax.factored(lambda p, x: fn(p, x, True), rp)")
            if isinstance(leaf, (jax.Array, np.ndarray, jax.core.Tracer, int, float, complex, np.generic)):
                continue
            where = f"args[{i}]" + (f" at {tree_lib.path_str(p)!r}" if p else "")
            raise TypeError(f"{where} must be a pytree of arrays (close over static options instead of "
                            f"passing them), got {type(leaf).__name__} {leaf!r:.40}")


