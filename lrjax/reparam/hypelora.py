"""HypeLoRA: a hypernetwork generates the LoRA factors of every targeted weight.

HypeLoRA (Trojan & Gebala, 2026, *HypeLoRA: Hypernetwork-Generated LoRA Adapters for Calibrated
Language Model Fine-Tuning*, arXiv:2603.19278; official code ``btrojan-official/HypeLoRA``
@aff4460428c2, ``models/hypernet.py``, ``models/dynamic_lora_layer.py``, ``models/get_roberta.py``,
``utils/alpha_callback.py``, ``params/**``). Every targeted weight ("slot" ``i``, e.g. the query
and value kernels of every layer) gets a learned embedding ``e_i``; one shared hypernetwork
``H`` maps the embeddings to LoRA factors, and the model is the ordinary LoRA model

.. math::  W_i^{\\text{eff}} = W_i + s\\,A_i B_i,\\qquad B_i = H(e)_i \\in \\mathbb{R}^{r\\times N},
           \\quad A_i \\in \\mathbb{R}^{M\\times r},\\quad s = \\alpha / r,

so the adapters that :meth:`HypeLoRA.generate` returns, ``{path: {'a': A [*batch, M, r],
'b': B [*batch, r, N]}}``, are used with :class:`lrjax.LoRA` (``hl.lora.materialize(base,
adapters)``, or :meth:`HypeLoRA.materialize`), and gradients flow through ``materialize`` into the
hypernetwork parameters. The trainable state is one pytree of arrays (``hyper_params``) for optax;
the frozen factors live in a separate pytree (``frozen``) that gradients never reach
(``stop_gradient``) and that :meth:`~HypeLoRA.frozen_factors` regenerates from the key.

Slots. The targeted leaves of ``params`` (``targets``, matrix views of :mod:`lrjax.axes`), in
the order of :func:`lrjax.tree.select`; a leaf with batch axes ``[*batch, M, N]`` (an ``nn.scan``
stack) is ``prod(batch)`` slots, row-major. Slots are grouped by their matrix shape ``(M, N)``;
each group has its own output head (the official code has one head because every RoBERTa q/v
slot is ``d x d``), and the per-slot generator is ``jax.vmap``-ed over the slots of a group.

Generators (``kind``):

* ``"mlp"`` (official ``LoRAHyperNet`` with ``large_model=True``): ``h = gelu(L_k(... gelu(L_1(e_i))))``
  over ``hidden`` (default ``(2048, 2048, 2048)``, i.e. 4 linears), ``out_i = L_head(h)``; exact
  (erf) GELU as torch's ``nn.GELU``. ``out_i`` has ``r N`` entries, ``B_i = out_i[:rN].reshape(r, N)``,
  and with ``a_mode="generated"`` another ``M r``: ``A_i = out_i[rN:].reshape(M, r)`` (official order).
* ``"transformer"`` (official ``LoRAHyperNetTransformer``): tokens ``t_i = L_proj(e_i)`` of width
  ``hidden`` (default 256), ``num_layers`` (2) post-LN encoder layers over all tokens (torch's
  ``nn.TransformerEncoderLayer``: ``x = LN(x + MHA(x)); x = LN(x + W_2 relu(W_1 x))``, ``num_heads``
  (16) heads, ``ff_dim`` (2048, torch's default) feed-forward width, LayerNorm eps 1e-5, no mask),
  then ``out_i = L_head(h_i)`` with ``r N`` entries. With ``a_mode="generated"`` there are two
  tokens per slot (official): tokens ``0..S-1`` give ``A_i`` (head of ``M r``), tokens ``S..2S-1``
  give ``B_i``. Dropout (torch's default 0.1 in training) is not applied: the generator is
  deterministic.

Embedding width ``embed_dim`` (default 128 for ``"mlp"``, 64 for ``"transformer"``). Initialization
follows torch's defaults in distribution (not bit for bit): linears ``U(+-1/sqrt(fan_in))`` for
weight and bias, embeddings ``N(0, 1)``, attention in-projection Xavier-uniform with zero bias,
out-projection bias 0, LayerNorm ``(1, 0)``; every encoder layer draws its own values.

``A`` (``a_mode``):

* ``"fixed"`` (default): per-slot ``A_i ~ U(-1/sqrt(r), 1/sqrt(r))``, frozen, in ``frozen[path]['a']``.
  The bound is the official ``kaiming_uniform_(a=sqrt(5))`` of a ``[d, r]`` tensor, whose torch
  fan-in is ``r`` (not PEFT's ``1/sqrt(M)`` of ``lora_A``). Drawn from the per-leaf key
  ``k = fold_in(key, crc32(path))`` of :meth:`lrjax.reparam.base.Reparam.leaf_key`:
  ``u = uniform(k, [2, *batch, M, r], -1, 1)``, ``A = u[0] / sqrt(r)`` (and ``A_init = u[1] /
  sqrt(M)``), so the same key gives bit-identical ``A`` in any process, whatever else is targeted.
* ``"random"``: the same distribution, re-sampled at every :meth:`~HypeLoRA.generate` from its
  ``key`` (pass a fresh key per step, e.g. ``fold_in(key, step)``), per-leaf keys as above. The
  official trainer re-samples at every training step and every evaluation batch.
* ``"generated"``: produced by the hypernetwork as described under ``kind``.

The official option of conditioning the generator on ``A`` (``embedding_input_only=False``) is not
implemented: every shipped official config uses embedding-only input.

Noise blending (``noise_type``): ``"replace"`` (default; ``A, B`` as generated) or ``"add"``
(official ``DynamicLoRALayer``):

.. math::  A = (1-\\lambda) A_{\\text{gen}} + \\lambda A_{\\text{init}},\\qquad
           B = (1-\\lambda) B_{\\text{gen}} + \\lambda\\cdot 0,

with ``A_init ~ U(-1/sqrt(M), 1/sqrt(M))`` (PEFT's / :class:`~lrjax.LoRA`'s init of ``lora_A``;
``u[1] / sqrt(M)`` of the per-leaf draw above, frozen in ``frozen[path]['a_init']``),
``B_init = 0`` (PEFT's ``lora_B``) and
``lambda = noise_alpha`` passed to :meth:`~HypeLoRA.generate` (a float or a traced 0-d array in
``[0, 1]``). The official schedule is linear from ``lambda_0`` (0.99 in the transformer configs)
to 0 over the training steps, i.e. ``optax.linear_schedule(0.99, 0.0, total_steps)(step)``. At
``lambda = 1`` the model is exactly the base model. (The official ``"multiply"`` mode gives
``B = B_gen * 0 = 0`` and is not offered.) Without blending the generated ``B`` is not 0 at
init, so the model changes at step 0, as in the official code.

Defaults of the official configs: transformer / fixed, random or generated A / CoLA: ``rank=8, alpha=16``,
``hidden=256, num_heads=16, num_layers=2, embed_dim=64``, ``noise_type="add"`` from 0.99, AdamW lr
4e-4, weight decay 0.1; MLP / fixed or generated A: ``rank=8, alpha=8``, ``hidden=(2048,)*3,
embed_dim=128``, lr 1e-5.

Precision: hypernetwork parameters have ``dtype`` (default float32); the generator computes in
``promote_types(dtype, float32)`` and returns factors in that dtype; :class:`~lrjax.LoRA` then
materializes ``W + s A B`` in ``promote_types(W, A, B, float32)`` rounded once to ``W.dtype``.

Errors: unknown ``kind`` / ``a_mode`` / ``noise_type`` strings, bad sizes (``ValueError``, or
``TypeError`` for a wrong kind), ``rank > min(M, N)`` of a targeted leaf (``ValueError`` naming
the leaf), ``targets`` matching nothing (``ValueError`` naming ``targets``), ``hyper_params`` or
``frozen`` that do not fit the targeted leaves, a missing or superfluous ``key`` / ``noise_alpha``,
and ``noise_alpha`` outside ``[0, 1]`` (``ValueError``), all raised eagerly before tracing.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax.reparam.lora import LoRA

__all__ = ["HypeLoRA"]

_KINDS = ("mlp", "transformer")
_A_MODES = ("fixed", "random", "generated")
_NOISE = ("replace", "add")
_LN_EPS = 1e-5


class _Init(NamedTuple):
    kind: str  # "u": U(-bound, bound), "n": N(0, 1), "0"/"1": constant
    shape: tuple
    bound: float


@dataclasses.dataclass(frozen=True)
class _Group:
    m: int
    n: int
    leaves: tuple  # ((path, batch_shape, first_slot, count), ...)

    @property
    def name(self) -> str:
        return f"{self.m}x{self.n}"

    @property
    def slots(self) -> np.ndarray:
        return np.concatenate([np.arange(s, s + c) for _, _, s, c in self.leaves])


@dataclasses.dataclass(frozen=True)
class HypeLoRA:
    """HypeLoRA config (a frozen, hashable dataclass; see the module docstring for the math).

    Args:
      rank: LoRA rank ``r`` (int ``>= 1``, ``<= min(M, N)`` of every targeted leaf).
      alpha: LoRA scale numerator, ``s = alpha / r`` (``None``: ``alpha = r``).
      targets, axes: which leaves and their matrix views (as :class:`lrjax.LoRA`).
      kind: ``"mlp"`` (default) or ``"transformer"``.
      a_mode: ``"fixed"`` (default), ``"random"`` or ``"generated"``.
      noise_type: ``"replace"`` (default) or ``"add"`` (blend with the LoRA init by ``noise_alpha``).
      hidden: ``"mlp"``: tuple of hidden widths, one GELU linear each (default ``(2048, 2048, 2048)``;
        an int ``h`` means ``(h, h, h)`` as in the official code); ``"transformer"``: the model width
        (default 256, divisible by ``num_heads``).
      embed_dim: slot-embedding width (default 128 for ``"mlp"``, 64 for ``"transformer"``).
      num_heads, num_layers, ff_dim: transformer encoder sizes (16, 2, 2048); not read by ``"mlp"``.
      dtype: hypernetwork parameter dtype (default float32).

    HypeLoRA is a generator, not a :class:`~lrjax.reparam.Reparam`: its trainable state is
    ``hyper_params`` (shared by all slots), and :meth:`generate` emits ordinary LoRA adapters.
    So merging and PEFT export go through the generated adapters and :attr:`lora`
    (``hp.lora.merge(base, hp.generate(base, hyper_params, frozen))``,
    ``export_peft(dir, hp.lora, hp.generate(...))``), and there is no ``split``: ``hyper_params``
    is already the trainable part, ``frozen`` (the fixed ``A``) is rebuilt exactly by
    :meth:`frozen_factors` from the key. Checkpoint ``hyper_params`` with
    :func:`lrjax.checkpoint.save_state` and restore it with ``like=hp.init(key, params)[0]``
    (without ``like=`` lists come back as dicts); ``save_adapters`` is for adapter dicts.
    """

    rank: int = 8
    alpha: float | None = None
    targets: Any = "kernel"
    axes: Any = None
    kind: str = "mlp"
    a_mode: str = "fixed"
    noise_type: str = "replace"
    hidden: Any = None
    embed_dim: int | None = None
    num_heads: int = 16
    num_layers: int = 2
    ff_dim: int = 2048
    dtype: Any = jnp.float32

    def __post_init__(self):
        V.check_choice(self.kind, "kind", _KINDS)
        V.check_choice(self.a_mode, "a_mode", _A_MODES)
        V.check_choice(self.noise_type, "noise_type", _NOISE)
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.axes, Mapping):
            object.__setattr__(self, "axes", tuple(self.axes.items()))
        LoRA(rank=self.rank, alpha=self.alpha, targets=self.targets, axes=self._axes_arg())  # validates
        object.__setattr__(self, "dtype", V.check_dtype(self.dtype, "dtype"))
        V.check_int(self.num_heads, "num_heads", low=1)
        V.check_int(self.num_layers, "num_layers", low=1)
        V.check_int(self.ff_dim, "ff_dim", low=1)
        V.check_int(self.embed_dim, "embed_dim", low=1, allow_none=True)
        if self.kind == "mlp":
            h = 2048 if self.hidden is None else self.hidden
            if isinstance(h, (numbers.Integral, np.integer)) and not isinstance(h, (bool, np.bool_)):
                h = (V.check_int(h, "hidden", low=1),) * 3  # the official int -> [h] * 3
            if isinstance(h, list):
                h = tuple(h)
            if not isinstance(h, tuple) or not h:
                raise TypeError(f"hidden must be an int or a non-empty tuple of widths for kind='mlp' (e.g. "
                                f"(2048, 2048, 2048)), got {V._fmt(self.hidden)}")
            for i, w in enumerate(h):
                V.check_int(w, f"hidden[{i}]", low=1)
            object.__setattr__(self, "hidden", tuple(int(w) for w in h))
        else:
            h = 256 if self.hidden is None else self.hidden
            V.check_int(h, "hidden", low=1)
            if int(h) % self.num_heads:
                raise ValueError(f"hidden={h} (the transformer width) must be divisible by "
                                 f"num_heads={self.num_heads}")
            object.__setattr__(self, "hidden", int(h))
        if self.embed_dim is None:
            object.__setattr__(self, "embed_dim", 128 if self.kind == "mlp" else 64)

    def _axes_arg(self):
        if isinstance(self.axes, tuple) and not isinstance(self.axes, axes_lib.Axes) and self.axes:
            return dict(self.axes)
        return self.axes

    @property
    def lora(self) -> LoRA:
        """The :class:`lrjax.LoRA` config whose ``materialize`` consumes the generated adapters."""
        return LoRA(rank=self.rank, alpha=self.alpha, targets=self.targets, axes=self._axes_arg())

    @property
    def scale(self) -> float:
        return self.lora.scale

    # ------------------------------------------------------------------ layout
    def _layout(self, params, basename="params"):
        """Groups of slots by matrix shape ``(M, N)``, in target order; validates the leaves."""
        lora = self.lora
        flat = V.check_params(params, basename)
        groups: dict = {}
        slot = 0
        for path in lora._targets(params):
            leaf = flat[path]
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(f"targets: leaf {path!r} has dtype {leaf.dtype}; only floating leaves can "
                                "be adapted")
            bshape, m, n = axes_lib.matrix_shape(leaf.shape, lora.leaf_axes(path, leaf.shape))
            lora.check_leaf_rank(path, m, n)
            count = int(np.prod(bshape, dtype=np.int64))
            groups.setdefault((m, n), []).append((path, tuple(bshape), slot, count))
            slot += count
        return [_Group(m, n, tuple(v)) for (m, n), v in groups.items()], slot

    def _tokens(self, n_slots: int) -> int:
        return 2 * n_slots if (self.kind == "transformer" and self.a_mode == "generated") else n_slots

    # --------------------------------------------------------------------- init
    def init(self, key, params) -> tuple[dict, dict]:
        """Return ``(hyper_params, frozen)`` for the targeted leaves of ``params``.

        ``hyper_params`` (trainable, dtype ``dtype``): ``{'embed': [T, E], 'trunk'|'proj'/'layers':
        ..., 'heads': {'MxN': ...}}`` with ``T`` = number of slots (twice that for a generated-A
        transformer). ``frozen`` = :meth:`frozen_factors` ``(key, params)``. The network draws from
        ``jax.random.split(key)[1]`` (one ``U(-1, 1)`` stream scaled per leaf and one ``N(0, 1)``
        stream, in pytree order); the frozen factors from the per-leaf keys of ``key``.
        """
        V.check_key(key, "key")
        groups, n_slots = self._layout(params)
        net = _init_net(self, tuple(groups), n_slots, jax.random.split(key)[1])
        return net, self.frozen_factors(key, params)

    def frozen_factors(self, key, params) -> dict:
        """The frozen factors, regenerated bit-identically from ``key``: ``{path: {'a': A_fixed}}``
        for ``a_mode="fixed"`` and/or ``{'a_init': A_init}`` for ``noise_type="add"`` (see the module
        docstring); ``{}`` when neither applies."""
        V.check_key(key, "key")
        groups, _ = self._layout(params)
        return _frozen(self, tuple(groups), key)

    def _frozen_impl(self, groups, key) -> dict:
        if self.a_mode != "fixed" and self.noise_type != "add":
            return {}
        out = {}
        for path, u, m in self._leaf_uniforms(groups, key):
            f = {}
            if self.a_mode == "fixed":
                f["a"] = (u[0] * (1.0 / math.sqrt(self.rank))).astype(self.dtype)
            if self.noise_type == "add":
                f["a_init"] = (u[1] * (1.0 / math.sqrt(m))).astype(self.dtype)
            out[path] = f
        return out

    def _leaf_uniforms(self, groups, key):
        """``[(path, u, M)]`` with ``u = U(-1, 1)`` of shape ``[2, *batch, M, r]`` drawn from the per-leaf
        key ``fold_in(key, crc32(path))``: row 0 scaled by ``1/sqrt(r)`` is the fixed/random ``A``, row 1
        by ``1/sqrt(M)`` is ``A_init``. Leaves of one shape share one vmapped draw (same values)."""
        by_shape: dict = {}
        for g in groups:
            for path, bshape, _, _ in g.leaves:
                by_shape.setdefault((bshape, g.m), []).append(path)
        out = []
        for (bshape, m), paths in by_shape.items():
            keys = jnp.stack([self.lora.leaf_key(key, p) for p in paths])
            u = jax.vmap(lambda k: jax.random.uniform(k, (2, *bshape, m, self.rank), jnp.float32,
                                                      -1.0, 1.0))(keys)
            out += [(p, u[i], m) for i, p in enumerate(paths)]
        return out

    def _head_sizes(self, g: _Group) -> dict:
        r = self.rank
        if self.a_mode != "generated":
            return {"b": r * g.n}
        if self.kind == "mlp":
            return {"ba": r * g.n + g.m * r}  # one head: B first, then A (official order)
        return {"a": g.m * r, "b": r * g.n}  # one token kind each

    def _net_spec(self, groups, n_slots) -> dict:
        """The parameter pytree with an :class:`_Init` (how to draw it) at every leaf."""
        def linear(fan_in, fan_out):  # torch nn.Linear: weight and bias U(+-1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(fan_in)
            return {"w": _Init("u", (fan_in, fan_out), bound), "b": _Init("u", (fan_out,), bound)}

        e = self.embed_dim
        net = {"embed": _Init("n", (self._tokens(n_slots), e), 1.0)}
        if self.kind == "mlp":
            widths = (e,) + self.hidden
            net["trunk"] = [linear(widths[i], widths[i + 1]) for i in range(len(self.hidden))]
            last = self.hidden[-1]
        else:
            d, f = self.hidden, self.ff_dim
            net["proj"] = linear(e, d)
            ln = {"scale": _Init("1", (d,), 1.0), "bias": _Init("0", (d,), 0.0)}
            net["layers"] = [{
                "attn": {"wqkv": _Init("u", (d, 3 * d), math.sqrt(6.0 / (d + 3 * d))),  # xavier, [3d, d]
                         "bqkv": _Init("0", (3 * d,), 0.0), "wo": _Init("u", (d, d), 1.0 / math.sqrt(d)),
                         "bo": _Init("0", (d,), 0.0)},
                "ln1": dict(ln), "ff1": linear(d, f), "ff2": linear(f, d), "ln2": dict(ln)}
                for _ in range(self.num_layers)]
            last = d
        net["heads"] = {g.name: {nm: linear(last, sz) for nm, sz in self._head_sizes(g).items()}
                        for g in groups}
        return net

    def _init_net(self, key, groups, n_slots) -> dict:
        """Draw every parameter: one ``U(-1, 1)`` stream scaled per leaf, one ``N(0, 1)`` stream."""
        spec = self._net_spec(groups, n_slots)
        leaves, tdef = jax.tree_util.tree_flatten(spec, is_leaf=lambda x: isinstance(x, _Init))
        k_u, k_n = jax.random.split(key)
        size = lambda kind: sum(int(np.prod(x.shape)) for x in leaves if x.kind == kind)  # noqa: E731
        streams = {"u": jax.random.uniform(k_u, (size("u"),), jnp.float32, -1.0, 1.0),
                   "n": jax.random.normal(k_n, (size("n"),), jnp.float32)}
        offs = {"u": 0, "n": 0}
        out = []
        for x in leaves:
            if x.kind in streams:
                k = int(np.prod(x.shape))
                v = streams[x.kind][offs[x.kind]:offs[x.kind] + k].reshape(x.shape) * x.bound
                offs[x.kind] += k
            else:
                v = jnp.full(x.shape, 1.0 if x.kind == "1" else 0.0, jnp.float32)
            out.append(v.astype(self.dtype))
        return jax.tree_util.tree_unflatten(tdef, out)

    # ----------------------------------------------------------------- checks
    def _check_net(self, hyper_params, groups, n_slots):
        want = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, self.dtype),
                                      self._net_spec(groups, n_slots), is_leaf=lambda x: isinstance(x, _Init))
        if not isinstance(hyper_params, Mapping):
            raise TypeError(f"hyper_params must be the dict returned by HypeLoRA.init, got "
                            f"{type(hyper_params).__name__}")
        got_flat = V.check_params(hyper_params, "hyper_params")
        want_flat = tree_lib.flatten(want)
        if set(got_flat) != set(want_flat):
            missing = sorted(set(want_flat) - set(got_flat))
            extra = sorted(set(got_flat) - set(want_flat))
            raise ValueError(f"hyper_params do not fit this config and these targets (missing "
                             f"{missing[:4]}, unexpected {extra[:4]}); made for other targets or another "
                             "kind/a_mode/rank? Re-run HypeLoRA.init")
        for p, w in want_flat.items():
            x = got_flat[p]
            if tuple(x.shape) != tuple(w.shape):
                raise ValueError(f"hyper_params[{p!r}] has shape {tuple(x.shape)}, expected "
                                 f"{tuple(w.shape)} for this config and these targets; re-run HypeLoRA.init")
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"hyper_params[{p!r}] has dtype {x.dtype}; expected floating")

    def _check_frozen(self, frozen, groups):
        if not isinstance(frozen, Mapping):
            raise TypeError(f"frozen must be the dict returned by HypeLoRA.init / frozen_factors, got "
                            f"{type(frozen).__name__}")
        need = (("a",) if self.a_mode == "fixed" else ()) + (("a_init",) if self.noise_type == "add" else ())
        paths = {p: (bshape, g.m) for g in groups for p, bshape, _, _ in g.leaves}
        for p in frozen:
            if p not in paths:
                raise ValueError(f"frozen has an entry for {p!r}, which is not a targeted leaf; frozen "
                                 "factors made for other targets?")
        if not need:
            return
        for p, (bshape, m) in paths.items():
            if p not in frozen or not isinstance(frozen[p], Mapping):
                raise ValueError(f"frozen has no factors for leaf {p!r}; pass the frozen dict of "
                                 "HypeLoRA.init (or frozen_factors(key, params))")
            f = frozen[p]
            for nm in need:
                if nm not in f:
                    raise ValueError(f"frozen[{p!r}] has no {nm!r} (needed by a_mode={self.a_mode!r}, "
                                     f"noise_type={self.noise_type!r})")
                x = f[nm]
                if not isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)) or \
                        not jnp.issubdtype(x.dtype, jnp.floating):
                    raise TypeError(f"frozen[{p!r}][{nm!r}] must be a floating array, got "
                                    f"{type(x).__name__} {getattr(x, 'dtype', '')}")
                if tuple(x.shape) != (*bshape, m, self.rank):
                    raise ValueError(f"frozen[{p!r}][{nm!r}] has shape {tuple(x.shape)}, expected "
                                     f"{(*bshape, m, self.rank)}")
            for nm in f:
                if nm not in need:
                    raise ValueError(f"frozen[{p!r}] has an unexpected factor {nm!r} for a_mode="
                                     f"{self.a_mode!r}, noise_type={self.noise_type!r}")

    def _check_noise(self, noise_alpha):
        if self.noise_type != "add":
            if noise_alpha is not None:
                raise ValueError(f"noise_alpha is only used with noise_type='add' (this config has "
                                 f"noise_type={self.noise_type!r}); drop it or change noise_type")
            return None
        if noise_alpha is None:
            raise ValueError("noise_alpha is required with noise_type='add': the blend weight lambda in "
                             "[0, 1] (e.g. optax.linear_schedule(0.99, 0.0, steps)(step))")
        if isinstance(noise_alpha, jax.core.Tracer):
            if noise_alpha.ndim != 0 or not jnp.issubdtype(noise_alpha.dtype, jnp.floating):
                raise TypeError(f"noise_alpha must be a 0-d floating array or a float, got "
                                f"{noise_alpha.dtype}{tuple(noise_alpha.shape)}")
            return noise_alpha
        return V.check_float(noise_alpha, "noise_alpha", low=0.0, high=1.0)

    # -------------------------------------------------------------- generator
    @staticmethod
    def _apply_linear(p, x, cd):
        return x @ p["w"].astype(cd) + p["b"].astype(cd)

    def _mlp_trunk(self, net, e, cd):
        """One slot: ``gelu(... gelu(L_1(e)))`` (exact GELU) -> ``[hidden[-1]]``."""
        h = e
        for lin in net["trunk"]:
            h = jax.nn.gelu(self._apply_linear(lin, h, cd), approximate=False)
        return h

    @staticmethod
    def _layer_norm(p, x, cd):
        mu = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + _LN_EPS) * p["scale"].astype(cd) + p["bias"].astype(cd)

    def _encoder(self, net, tokens, cd):
        """Post-LN transformer encoder over all tokens ``[T, D]`` (torch's defaults, no dropout)."""
        t, d = tokens.shape
        nh = self.num_heads
        dh = d // nh
        x = tokens
        for lay in net["layers"]:
            a = lay["attn"]
            qkv = x @ a["wqkv"].astype(cd) + a["bqkv"].astype(cd)
            q, k, v = (qkv[:, i * d:(i + 1) * d].reshape(t, nh, dh) for i in range(3))
            s = jnp.einsum("thd,uhd->htu", q, k) / math.sqrt(dh)
            o = jnp.einsum("htu,uhd->thd", jax.nn.softmax(s, axis=-1), v).reshape(t, d)
            x = self._layer_norm(lay["ln1"], x + o @ a["wo"].astype(cd) + a["bo"].astype(cd), cd)
            ff = self._apply_linear(lay["ff2"], jax.nn.relu(self._apply_linear(lay["ff1"], x, cd)), cd)
            x = self._layer_norm(lay["ln2"], x + ff, cd)
        return x

    def _generate_groups(self, net, groups, n_slots, cd):
        """``{group name: (A [S_g, M, r] or None, B [S_g, r, N])}`` from the network."""
        r = self.rank
        emb = net["embed"].astype(cd)
        out = {}
        if self.kind == "transformer":
            h = self._encoder(net, self._apply_linear(net["proj"], emb, cd), cd)
        for g in groups:
            idx = jnp.asarray(g.slots)
            heads = net["heads"][g.name]
            if self.kind == "mlp":
                head = heads["ba"] if self.a_mode == "generated" else heads["b"]
                o = jax.vmap(lambda e: self._apply_linear(head, self._mlp_trunk(net, e, cd), cd))(emb[idx])
                b = o[:, :r * g.n].reshape(-1, r, g.n)
                a = o[:, r * g.n:].reshape(-1, g.m, r) if self.a_mode == "generated" else None
            else:
                if self.a_mode == "generated":
                    a = jax.vmap(lambda x: self._apply_linear(heads["a"], x, cd))(h[idx]).reshape(-1, g.m, r)
                    hb = h[idx + n_slots]
                else:
                    a, hb = None, h[idx]
                b = jax.vmap(lambda x: self._apply_linear(heads["b"], x, cd))(hb).reshape(-1, r, g.n)
            out[g.name] = (a, b)
        return out

    def generate(self, base, hyper_params, frozen, *, key=None, noise_alpha=None) -> dict:
        """LoRA adapters ``{path: {'a': A [*batch, M, r], 'b': B [*batch, r, N]}}`` from the
        hypernetwork, in ``promote_types(dtype, float32)``; use them with :attr:`lora`.

        ``base``: the params whose targeted leaves define the slots (shapes only). ``key``: a PRNG
        key, required for ``a_mode="random"`` and refused otherwise. ``noise_alpha``: ``lambda`` in
        ``[0, 1]`` (float or 0-d array; may be traced), required for ``noise_type="add"`` and refused
        otherwise. Differentiable in ``hyper_params``; ``frozen`` is behind ``stop_gradient``.
        """
        groups, n_slots = self._layout(base, "base")
        self._check_net(hyper_params, groups, n_slots)
        self._check_frozen(frozen, groups)
        lam = self._check_noise(noise_alpha)
        if self.a_mode == "random":
            if key is None:
                raise ValueError("key is required with a_mode='random' (A is re-sampled from it at every "
                                 "call; pass e.g. jax.random.fold_in(key, step))")
            V.check_key(key, "key")
        elif key is not None:
            raise ValueError(f"key is only used with a_mode='random' (this config has a_mode="
                             f"{self.a_mode!r}); drop it")
        frozen_used = {p: dict(f) for p, f in frozen.items()}
        return _generate(self, tuple(groups), n_slots, hyper_params, frozen_used, key, lam)

    def _generate_impl(self, groups, n_slots, hyper_params, frozen, key, lam) -> dict:
        cd = V.compute_dtype(*(x.dtype for x in jax.tree_util.tree_leaves(hyper_params)))
        gen = self._generate_groups(hyper_params, groups, n_slots, cd)
        rand = ({p: u[0] for p, u, _ in self._leaf_uniforms(groups, key)} if self.a_mode == "random" else {})
        adapters = {}
        for g in groups:
            a_g, b_g = gen[g.name]
            off = 0
            for path, bshape, _, count in g.leaves:
                b = b_g[off:off + count].reshape(*bshape, self.rank, g.n)
                if self.a_mode == "generated":
                    a = a_g[off:off + count].reshape(*bshape, g.m, self.rank)
                elif self.a_mode == "fixed":
                    a = jax.lax.stop_gradient(jnp.asarray(frozen[path]["a"]).astype(cd))
                else:
                    a = (rand[path] * (1.0 / math.sqrt(self.rank))).astype(self.dtype).astype(cd)
                if lam is not None:
                    a_init = jax.lax.stop_gradient(jnp.asarray(frozen[path]["a_init"]).astype(cd))
                    lam_c = jnp.asarray(lam, cd)
                    a = (1 - lam_c) * a + lam_c * a_init
                    b = (1 - lam_c) * b
                adapters[path] = {"a": a, "b": b}
                off += count
        return adapters

    def materialize(self, base, hyper_params, frozen, *, key=None, noise_alpha=None):
        """``lora.materialize(base, generate(base, hyper_params, frozen, ...))``: ``base`` with every
        targeted leaf replaced by ``W + s A B`` (rounded once to the leaf's dtype)."""
        return self.lora.materialize(base, self.generate(base, hyper_params, frozen, key=key,
                                                         noise_alpha=noise_alpha))

    def num_params(self, hyper_params) -> int:
        """Number of trainable scalars in ``hyper_params``."""
        flat = V.check_params(hyper_params, "hyper_params")
        return int(sum(np.prod(x.shape) for x in flat.values()))


def _generate_fn(cfg, groups, n_slots, hyper_params, frozen, key, lam):
    return cfg._generate_impl(groups, n_slots, hyper_params, frozen, key, lam)


# One compiled generator per (config, slot layout): eager calls do not dispatch op by op, and
# under an outer jit/grad it is inlined. ``lam`` is a traced value (or None).
_generate = jax.jit(_generate_fn, static_argnums=(0, 1, 2))
_init_net = jax.jit(lambda cfg, groups, n_slots, key: cfg._init_net(key, groups, n_slots),
                    static_argnums=(0, 1, 2))
_frozen = jax.jit(lambda cfg, groups, key: cfg._frozen_impl(groups, key), static_argnums=(0, 1))
