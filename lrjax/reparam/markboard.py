"""Hot-Swap MarkBoard: an n-bit black-box watermark made of swappable LoRA branches.

Design (Hot-Swap MarkBoard, *An Efficient Black-box Watermarking Approach for Large-scale Model
Distribution*, arXiv:2507.20650, ACM MM 2025; no official code exists). **UNVERIFIED**: only the
abstract was available to us (``../shared/seed/``); the choices below are ours and are stated as such.

* A signature is ``sigma in {0, 1}^n``. Each bit ``i`` owns a pair of LoRA branches
  ``(Delta_i^0, Delta_i^1)`` on the same kernels (each an ordinary lrjax adapter made by ``rp``,
  default ``lrjax.LoRA(rank=4)`` on every kernel) and a trigger set ``T_i`` with two labels
  ``(y_i^0, y_i^1)``, ``y_i^0 != y_i^1``.
* The user's model is ``W_sigma = W + sum_i Delta_i^{sigma_i}`` (:meth:`MarkBoard.sign`, through
  :func:`lrjax.reparam.multi.combine`: one rounding per leaf), distributed as dense merged weights --
  the branches are entangled with the base weights, which is the simplest form of the paper's
  "parameter obfuscation" (its exact mechanism is not reproduced here).
* Re-signing swaps branches without retraining: ``W_sigma' = W_sigma + sum_{i: sigma_i !=
  sigma'_i} (Delta_i^{sigma'_i} - Delta_i^{sigma_i})`` (:meth:`MarkBoard.resign`, a low-rank update
  of the distributed weights), or :meth:`sign` again from the base.
* Black-box verification queries each ``T_i`` and reads bit ``i`` from the majority predicted label
  (:meth:`MarkBoard.verify`): ``y_i^1 -> 1``, ``y_i^0 -> 0``, anything else ``-1`` (no watermark).
* Training (our choice; the abstract says the watermarks are embedded "independently"): branch
  ``Delta_i^v`` is trained as a trigger watermark ``T_i -> y_i^v``, each bit on its own trigger set
  and label pair, while a clean loss on the task's data keeps accuracy. To make every branch work
  in *any* combination with the other bits' branches, each step samples random signatures and
  trains the composed models (:meth:`MarkBoard.loss`, :meth:`MarkBoard.train`); a branch gets
  gradient only from the signatures that select it.
* Trigger sets (our choice, :meth:`MarkBoard.triggers`): per bit a random key pattern ``u_i ~
  U(low, high)^D`` and ``size`` noisy copies ``clip(u_i + spread * N(0, 1))``; label pairs drawn
  uniformly with ``y_i^0 != y_i^1``.

Everything is a pure function of pytrees; signatures may be traced arrays (``sign`` and
``loss`` jit and differentiate). Measured on the digits MLP in
``experiments/bench_multi_adapter.py`` (bit accuracy on 20 random signatures, clean-accuracy
drop, swap time).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrjax import _validation as V
from lrjax.reparam import multi
from lrjax.reparam.base import Reparam, _leaf_kind
from lrjax.reparam.lora import LoRA

__all__ = ["MarkBoard"]


@dataclasses.dataclass(frozen=True)
class MarkBoard:
    """``bits`` swappable LoRA branch pairs (see the module docstring).

    Args:
      bits: ``n``, signature length (int ``>= 1``); ``2 n`` branches.
      rp: the config of every branch: a weight-space variant (default ``lrjax.LoRA(rank=4)`` on
        every ``kernel``).
    """

    bits: int = 8
    rp: Reparam = LoRA(rank=4)

    def __post_init__(self):
        V.check_int(self.bits, "bits", low=1)
        if not isinstance(self.rp, Reparam):
            raise TypeError(f"rp must be a reparameterization config such as lrjax.LoRA(rank=4), got "
                            f"{_leaf_kind(self.rp)}")
        if self.rp.activation_space or self.rp.rewrites_base:
            raise ValueError(f"rp: {type(self.rp).__name__} cannot be a MarkBoard branch: branches are summed "
                             "as weight deltas on one shared base")

    def name(self, bit: int, value: int) -> str:
        """The branch name ``"bit{i}/{v}"``."""
        return f"bit{bit}/{value}"

    @property
    def names(self) -> list[str]:
        return [self.name(i, v) for i in range(self.bits) for v in (0, 1)]

    # ------------------------------------------------------------------ setup
    def init(self, key, params) -> dict:
        """``{branch name: adapters}`` for the ``2 n`` branches (``rp.init`` with independent keys)."""
        V.check_key(key, "key")
        keys = jax.random.split(key, 2 * self.bits)
        out = {}
        for k, nm in zip(keys, self.names):
            base, ad = self.rp.init(k, params)
            out[nm] = ad
        return out

    def triggers(self, key, shape, num_classes: int, size: int = 16, *, low: float = 0.0, high: float = 1.0,
                 spread: float = 0.1):
        """``(x [bits, size, *shape] float32, labels [bits, 2] int32)``: per bit a key pattern
        ``u_i ~ U(low, high)`` and ``size`` copies ``clip(u_i + spread N(0, 1), low, high)``; the
        label pair of bit ``i`` is ``labels[i] = (y_i^0, y_i^1)``, distinct, uniform over classes."""
        V.check_key(key, "key")
        shape = tuple(V.check_int(s, "shape", low=1) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        num_classes = V.check_int(num_classes, "num_classes", low=2)
        size = V.check_int(size, "size", low=1)
        V.check_float(spread, "spread", low=0.0)
        if not float(low) < float(high):
            raise ValueError(f"low must be below high, got low={low}, high={high}")
        ku, kn, ky0, ky1 = jax.random.split(key, 4)
        u = jax.random.uniform(ku, (self.bits, 1) + shape, jnp.float32, low, high)
        x = jnp.clip(u + spread * jax.random.normal(kn, (self.bits, size) + shape), low, high)
        y0 = jax.random.randint(ky0, (self.bits,), 0, num_classes)
        y1 = (y0 + jax.random.randint(ky1, (self.bits,), 1, num_classes)) % num_classes
        return x, jnp.stack([y0, y1], -1).astype(jnp.int32)

    # ----------------------------------------------------------- sign / swap
    def _signature(self, signature, name="signature"):
        sig = V.check_array(signature, name, ndim=1, kind="numeric", convert=True)
        if sig.shape[0] != self.bits:
            raise ValueError(f"{name} must have {self.bits} bits, got shape {tuple(sig.shape)}")
        if V.is_concrete(sig):
            vals = set(np.unique(np.asarray(sig)).tolist())
            if not vals <= {0, 1}:
                raise ValueError(f"{name} must hold only 0/1 bits, got values {sorted(vals)}")
        return sig

    def weights(self, signature) -> dict:
        """``{branch name: weight}``: 1 for ``Delta_i^{sigma_i}``, 0 for the other branch of bit ``i``."""
        sig = self._signature(signature).astype(jnp.float32)
        out = {}
        for i in range(self.bits):
            out[self.name(i, 1)] = sig[i]
            out[self.name(i, 0)] = 1.0 - sig[i]
        return out

    def _check_branches(self, branches):
        if not isinstance(branches, Mapping):
            raise TypeError(f"branches must be the dict {{name: adapters}} from MarkBoard.init, got "
                            f"{_leaf_kind(branches)}")
        missing = [n for n in self.names if n not in branches]
        if missing:
            raise ValueError(f"branches is missing {missing[:4]}; make them with MarkBoard(bits={self.bits}).init")
        return branches

    def sign(self, base, branches, signature):
        """``W + sum_i Delta_i^{sigma_i}``: the user model for ``signature`` (dense, one rounding per
        leaf; differentiable in the branches; ``signature`` may be traced)."""
        self._check_branches(branches)
        return multi.combine(base, branches, self.rp, self.weights(signature))

    def resign(self, params, branches, old, new):
        """Swap branches of a signed model ``params`` (signed with ``old``) to signature ``new``:
        ``params + sum_{i: old_i != new_i} (Delta_i^{new_i} - Delta_i^{old_i})`` (concrete bits).
        Equals ``sign(base, branches, new)`` up to the rounding of the distributed weights."""
        self._check_branches(branches)
        old = np.asarray(self._signature(old, "old")).astype(int)
        new = np.asarray(self._signature(new, "new")).astype(int)
        w = {}
        for i in np.nonzero(old != new)[0]:
            w[self.name(int(i), int(new[i]))] = 1.0
            w[self.name(int(i), int(old[i]))] = -1.0
        return params if not w else multi.combine(params, branches, self.rp, w)

    # ----------------------------------------------------------------- verify
    def verify(self, predict: Callable, x_trig, labels):
        """Black-box decode: ``predict(x) -> logits`` (or labels ``[size]``) on each trigger set;
        bit ``i`` is 1 / 0 when the majority predicted label is ``y_i^1`` / ``y_i^0``, else ``-1``.
        Returns an int32 array ``[bits]``."""
        if not callable(predict):
            raise TypeError(f"predict must be a callable x -> logits, got {_leaf_kind(predict)}")
        x_trig = V.check_array(x_trig, "x_trig", min_ndim=2)
        labels = V.check_array(labels, "labels", ndim=2, last=2, kind="integer")
        if x_trig.shape[0] != self.bits or labels.shape[0] != self.bits:
            raise ValueError(f"x_trig and labels must have {self.bits} trigger sets, got {x_trig.shape[0]} and "
                             f"{labels.shape[0]}")
        out = []
        for i in range(self.bits):
            p = jnp.asarray(predict(x_trig[i]))
            pred = jnp.argmax(p, -1) if p.ndim == 2 else p.astype(jnp.int32)
            maj = int(np.bincount(np.asarray(pred), minlength=int(labels.max()) + 1).argmax())
            out.append(1 if maj == int(labels[i, 1]) else 0 if maj == int(labels[i, 0]) else -1)
        return jnp.asarray(out, jnp.int32)

    # ------------------------------------------------------------------ train
    def loss(self, apply: Callable, base, branches, signature, x_trig, labels, x, y, trigger_weight: float = 1.0):
        """``CE(apply(W_sigma, x), y) + trigger_weight * mean_i CE(apply(W_sigma, T_i), y_i^{sigma_i})``
        for one signature (``apply(params, x) -> logits``)."""
        sig = self._signature(signature).astype(jnp.int32)
        p = self.sign(base, branches, sig)
        clean = optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()
        n, s = x_trig.shape[:2]
        logits = apply(p, x_trig.reshape((n * s,) + x_trig.shape[2:]))
        want = jnp.repeat(jnp.take_along_axis(labels, sig[:, None], 1)[:, 0], s)
        trig = optax.softmax_cross_entropy_with_integer_labels(logits, want).mean()
        return clean + trigger_weight * trig

    def train(self, key, apply: Callable, base, branches, x_trig, labels, x, y, *, steps: int = 300,
              lr: float = 3e-3, signatures_per_step: int = 4, batch: int = 128, trigger_weight: float = 1.0):
        """Adam on every branch (the base stays frozen): each step samples ``signatures_per_step``
        random signatures and a clean batch of ``batch`` rows of ``(x, y)``, and minimizes the mean
        :meth:`loss`. Returns ``(branches, losses [steps])``."""
        V.check_key(key, "key")
        steps = V.check_int(steps, "steps", low=1)
        nsig = V.check_int(signatures_per_step, "signatures_per_step", low=1)
        batch = V.check_int(batch, "batch", low=1)
        V.check_float(lr, "lr", low=0.0, low_open=True)
        self._check_branches(branches)
        opt = optax.adam(lr)
        x, y = jnp.asarray(x), jnp.asarray(y)

        def total(br, sigs, xb, yb):
            return jnp.mean(jnp.stack([self.loss(apply, base, br, sigs[j], x_trig, labels, xb, yb, trigger_weight)
                                       for j in range(nsig)]))

        @jax.jit
        def run(br, key):
            def body(c, k):
                br, st = c
                ks, kb = jax.random.split(k)
                sigs = jax.random.bernoulli(ks, 0.5, (nsig, self.bits)).astype(jnp.int32)
                idx = jax.random.randint(kb, (min(batch, x.shape[0]),), 0, x.shape[0])
                lv, g = jax.value_and_grad(total)(br, sigs, x[idx], y[idx])
                u, st = opt.update(g, st, br)
                return (optax.apply_updates(br, u), st), lv
            (br, _), ls = jax.lax.scan(body, (br, opt.init(br)), jax.random.split(key, steps))
            return br, ls

        return run(dict(branches), key)
