"""Read and write Hugging Face PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

Format (PEFT >= 0.7; checked against 0.21)
------------------------------------------
A PEFT LoRA adapter directory holds

* ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``use_rslora``,
  ``use_dora``, ``target_modules``, ``init_lora_weights``, ... ;
* ``adapter_model.safetensors`` with, for every adapted ``torch.nn.Linear`` named ``<module>``
  (its dotted path inside the base torch model)::

      base_model.model.<module>.lora_A.weight          [r, in]    = A^T
      base_model.model.<module>.lora_B.weight          [out, r]   = B^T
      base_model.model.<module>.lora_magnitude_vector  [out]      = m    (DoRA only)

Orientation: torch's ``Linear.weight`` is ``[out, in]`` and PEFT computes
``y = x W^T + b + s (x A_peft^T) B_peft^T``; lrjax's matrix view of a Dense kernel is
``[in, out] = [M, N]`` with ``y = x W + s x A B``, ``A: [M, r]``, ``B: [r, N]``. Hence
``lora_A.weight = A^T`` and ``lora_B.weight = B^T``: both are plain transposes, nothing is
reshaped. DoRA's magnitude ``m`` is one value per output in both libraries. The scale is
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), the same as lrjax's ``alpha / rank``.

Leaf path <-> module name
-------------------------
By default the module of a leaf is its path with a trailing ``/kernel`` (or ``/weight``)
dropped and ``/`` replaced by ``.``: ``"layers/0/mlp/fc1/kernel" -> "layers.0.mlp.fc1"``
(:func:`default_module_name`). When the JAX and torch models name things differently, pass
``module_names``: a dict ``{leaf_path: module_name}`` (overrides the default for the listed
leaves) or a callable ``leaf_path -> module_name`` (returning ``None`` falls back to the
default). Module names are relative to the torch model, *without* ``base_model.model.``.

Which leaves can be exchanged
-----------------------------
Leaves whose matrix view has no batch axes and keeps the axis order: 2-D Dense kernels
``[in, out]`` and the 3-D attention kernels of :mod:`lrjax.axes` (q/k/v ``[E, H, D]`` is a
torch ``Linear(E, H*D)``; ``out`` ``[H, D, E]`` is a ``Linear(H*D, E)``, head-major, as
``reshape`` flattens). Stacked (``nn.scan``) leaves have one adapter per layer in PEFT and are
rejected with a ``ValueError``.

Convolution kernels (Flax ``nn.Conv`` ``[*window, C_in, C_out]``: 4-D or 5-D leaves, or 3-D leaves
whose path contains ``conv``, in the default view ``[prod(window) C_in, C_out]``) map onto PEFT's
conv LoRA (``torch.nn.Conv1d/2d/3d``): ``lora_A.weight [r, C_in, *window]`` is ``a`` reshaped to
``[*window, C_in, r]`` with its axes moved, ``lora_B.weight [C_out, r, 1, ...]`` is ``b^T``, and
DoRA's ``lora_magnitude_vector`` is ``m`` as ``[1, C_out, 1, ...]``. lrjax's LoRA/RSLoRA/DoRA on
such a kernel *is* PEFT's conv LoRA/DoRA (see :mod:`lrjax.reparam.conv`). ``export_peft`` needs
``params=`` for conv leaves (the window shape); grouped convs (``groups > 1``, which PEFT cannot
merge) are refused on import. A :class:`~lrjax.reparam.conv.CPLoRA` (``CPDoRA``) exports as its
equivalent rank-``R`` conv LoRA (DoRA).

PiSSA
-----
PEFT saves a PiSSA adapter (``init_lora_weights="pissa"``) as its trained ``A, B`` only; when
it loads one it re-runs the PiSSA SVD on the *original* base it is given and replaces that base
with the residual ``W - s A0 B0``. The factors alone therefore never reproduce the model:

* :func:`import_peft` of such a file returns, by default (``pissa="lora"``), the equivalent
  rank-``2r`` LoRA on the original weights (``W + s [A | A0] [B ; -B0]``, the SVD re-run by
  lrjax), so ``rp.materialize(params, adapters)`` equals PEFT's model in one call;
  ``pissa="residual"`` returns ``(PiSSA rp, adapters, residual_params)`` to keep training
  PiSSA-style.
* :func:`export_peft` of a :class:`~lrjax.PiSSA` writes, by default (``pissa="lora"``), the
  same rank-``2r`` conversion (:func:`pissa_to_lora`; needs ``init_adapters``, the factors
  ``PiSSA.init`` returned), which PEFT loads onto the unmodified model with lrjax's outputs.
  ``pissa="pissa"`` writes PEFT's own form (``init_lora_weights: "pissa"``; PEFT re-runs the SVD
  on load), ``pissa="residual"`` the bare factors for the residual base only.

Checks
------
Both directions refuse (``ValueError`` naming the tensor key or adapter entry) NaN/Inf
factors, a config whose ``target_modules``/``exclude_modules`` disagree with the modules that
have tensors, transposed ``lora_A``/``lora_B`` (the message gives each tensor's shape, its
orientation and the expected one) and keys of another adapter name. Keys holding the adapter
name, as in a PEFT model's own ``state_dict()`` (``...q_proj.lora_A.default.weight``,
``...lora_magnitude_vector.default.weight``), are accepted like PEFT does.
:func:`lrjax.interop.params_from_torch` turns the torch model's ``state_dict()`` into the lrjax
params these functions take.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax._validation import check_choice, check_dir
from lrjax.interpreter import NotMergeable
from lrjax.reparam.base import Reparam
from lrjax.reparam.dora import DoRA
from lrjax.reparam.lora import LoRA, RSLoRA
from lrjax.reparam.pissa import PiSSA

__all__ = ["export_peft", "import_peft", "pissa_to_lora", "default_module_name",
           "CONFIG_NAME", "WEIGHTS_NAME", "KEY_PREFIX"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_SUFFIX_A = ".lora_A.weight"
_SUFFIX_B = ".lora_B.weight"
_SUFFIX_M = ".lora_magnitude_vector"

_PISSA_MODES = ("lora", "pissa", "residual")
_KEY_AB = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")
_KEY_M = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<name>[^.]+))?(?:\.weight)?$")
_CONV = re.compile(r"conv", re.IGNORECASE)  # as lrjax.axes: 3-D leaves named *conv* are 1-D convolutions

ModuleNames = Union[None, Mapping[str, str], Callable[[str], Union[str, None]]]

# init_lora_weights values that only change how A/B start (the base weight is untouched), so a
# saved adapter is a plain LoRA adapter on the unmodified base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Config fields whose non-empty value changes the forward pass or the saved keys in a way
# lrjax's LoRA/DoRA do not model.
_UNSUPPORTED_FIELDS = (
    "modules_to_save", "rank_pattern", "alpha_pattern", "lora_bias", "use_qalora",
    "alora_invocation_tokens", "velora_config", "monteclora_config", "kasa_config",
    "arrow_config", "use_bdlora", "layer_replication", "target_parameters",
    "trainable_token_indices", "megatron_config")


# --------------------------------------------------------------------------- names
def default_module_name(leaf_path: str) -> str:
    """``"layers/0/fc1/kernel" -> "layers.0.fc1"``: drop a trailing ``kernel``/``weight``, ``/`` -> ``.``."""
    if not isinstance(leaf_path, str):
        raise TypeError(f"leaf_path must be a str such as 'layers/0/fc1/kernel', got {type(leaf_path).__name__}")
    if not leaf_path:
        raise ValueError("leaf_path must be a non-empty leaf path such as 'layers/0/fc1/kernel'")
    parts = leaf_path.split("/")
    if len(parts) > 1 and parts[-1] in ("kernel", "weight"):
        parts = parts[:-1]
    return ".".join(parts)


def _check_module_name(name, leaf_path: str) -> str:
    if not isinstance(name, str) or not name or any(not p for p in name.split(".")):
        raise ValueError(f"module_names: {name!r} (for leaf {leaf_path!r}) is not a dotted torch module "
                         "name such as 'model.layers.0.mlp.fc1'")
    if name.startswith(KEY_PREFIX):
        raise ValueError(f"module_names: {name!r} (for leaf {leaf_path!r}) must be relative to the torch "
                         f"model; drop the {KEY_PREFIX!r} prefix (lrjax adds it)")
    return name


def _namer(module_names: ModuleNames) -> Callable[[str], str]:
    if module_names is None:
        return default_module_name
    if isinstance(module_names, Mapping):
        mapping = dict(module_names)

        def by_dict(path):
            return _check_module_name(mapping[path], path) if path in mapping else default_module_name(path)
        return by_dict
    if callable(module_names):
        def by_fn(path):
            name = module_names(path)
            return default_module_name(path) if name is None else _check_module_name(name, path)
        return by_fn
    raise TypeError("module_names must be None, a dict {leaf_path: module_name} or a callable "
                    f"leaf_path -> module_name; got {type(module_names).__name__}")


# ------------------------------------------------------------------------ helpers
def _alpha_of(rp: Reparam) -> float:
    return float(rp.rank if rp.alpha is None else rp.alpha)


def _json_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _variant(rp) -> tuple[bool, bool]:
    """``(use_dora, use_rslora)`` of a reparam exportable as PEFT LoRA; raises otherwise."""
    if not isinstance(rp, Reparam):
        raise TypeError(f"rp must be an lrjax reparam (LoRA, RSLoRA, DoRA, PiSSA), got {type(rp).__name__}")
    if isinstance(rp, DoRA):
        use_dora, use_rslora = True, bool(rp.rslora)
    elif isinstance(rp, RSLoRA):
        use_dora, use_rslora = False, True
    elif isinstance(rp, LoRA):  # LoRA and PiSSA
        use_dora, use_rslora = False, False
    else:
        raise TypeError(f"{type(rp).__name__} has no PEFT LoRA equivalent; export_peft supports "
                        "LoRA, RSLoRA, DoRA and PiSSA")
    alpha = _alpha_of(rp)
    expected = alpha / (math.sqrt(rp.rank) if use_rslora else rp.rank)
    if not math.isclose(rp.scale, expected, rel_tol=1e-12):
        raise TypeError(f"{type(rp).__name__}.scale = {rp.scale} is neither alpha/r nor alpha/sqrt(r); "
                        "PEFT cannot express it")
    return use_dora, use_rslora


def _is_conv_leaf(path: str, shape) -> bool:
    """A convolution kernel ``[*window, C_in, C_out]`` by lrjax.axes' rule: 4-D or more, or 3-D named *conv*."""
    return len(shape) >= 4 or (len(shape) == 3 and bool(_CONV.search(path)))


def _leaf_matrix_shape(path: str, shape, ax: axes_lib.Axes, argname: str) -> tuple[int, int]:
    """``(M, N)`` of a leaf that maps onto one torch ``Linear`` or ``ConvNd``; ``ValueError`` otherwise."""
    shape = tuple(shape)
    if ax.batch:
        raise ValueError(
            f"{argname}: leaf {path!r} (shape {shape}) has batch axes {ax.batch} (a stacked / nn.scan "
            "leaf); PEFT stores one adapter per torch Linear, so unstack the layers first")
    if _is_conv_leaf(path, shape):
        n = len(shape)
        if ax != axes_lib.Axes((), tuple(range(n - 1)), (n - 1,)):
            raise ValueError(
                f"{argname}: leaf {path!r} (shape {shape}) is a convolution kernel [*window, C_in, C_out] with the "
                f"matrix view {ax}; PEFT's conv LoRA layout is the default view [prod(window) C_in, C_out] "
                "(drop the axes override for this leaf)")
    if ax.inp + ax.out != tuple(range(len(shape))):
        raise ValueError(
            f"{argname}: leaf {path!r} uses a transposed matrix view {ax}; only views that keep the axis "
            "order ([in..., out...]) equal a torch Linear weight^T")
    _, m, n = axes_lib.matrix_shape(shape, ax)
    return m, n


def _check_path(path_dir, name: str = "path_dir") -> str:
    return check_dir(path_dir, name, f"a PEFT adapter directory ({CONFIG_NAME} + {WEIGHTS_NAME})")


def _check_params(params, name: str = "params") -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"{name} must be the model's params (a nested dict of arrays, e.g. from "
                        f"params_from_torch), got {type(params).__name__}")
    if not params:
        raise ValueError(f"{name} is empty; pass the model's params (a nested dict of arrays)")


def _finite_or_raise(x: np.ndarray, what: str) -> None:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
        n = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{what} contains {n} NaN/Inf value(s); lrjax neither writes nor reads non-finite "
                         "adapter weights (PEFT would load them and every output would be NaN): fix or "
                         "re-train the adapter")


def _factor_np(x, what: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer) or isinstance(x, jax.ShapeDtypeStruct):
        raise TypeError(f"{what} is abstract (a tracer or ShapeDtypeStruct); export concrete arrays, outside jit")
    if not isinstance(x, (jax.Array, np.ndarray)):
        raise TypeError(f"{what} must be an array (jax.Array or np.ndarray), got {type(x).__name__}")
    if not (jnp.issubdtype(x.dtype, jnp.floating)):
        raise TypeError(f"{what} must be a floating-point array, got dtype {x.dtype}")
    a = np.asarray(x, np.float32)
    _finite_or_raise(a, what)
    return a


def _check_adapters(adapters, name: str = "adapters") -> None:
    if not isinstance(adapters, Mapping) or not adapters:
        raise TypeError(f"{name} must be the non-empty dict {{leaf_path: {{'a': A, 'b': B}}}} returned by "
                        f"rp.init(), got {type(adapters).__name__}"
                        + (" (empty)" if isinstance(adapters, Mapping) else ""))
    for path, f in adapters.items():
        if not isinstance(path, str):
            raise TypeError(f"{name}: keys must be leaf path strings such as 'fc1/kernel', got {path!r:.60}")
        if not isinstance(f, Mapping) or "a" not in f or "b" not in f:
            raise TypeError(f"{name}[{path!r}] must be a dict with 'a' and 'b' factors, got {f!r:.60}")


def _native(rp) -> bool:
    """LoRA/RSLoRA/PiSSA/LoRA-GA/DoRA: factors that are PEFT's ``lora_A``/``lora_B`` (and ``m``) as is."""
    return isinstance(rp, (LoRA, DoRA)) and type(rp).factors in (Reparam.factors, DoRA.factors) \
        and tuple(rp.factor_keys) in (("a", "b"), ("a", "b", "m"))


def _as_lora(rp, adapters, params):
    """Variants without a PEFT form of their own, as the equivalent LoRA (exact); others unchanged.

    * :class:`~lrjax.reparam.conv.CPLoRA`/``CPDoRA``: rank-``R`` conv LoRA/DoRA (``a`` = the
      Khatri-Rao product, ``b = O^T``, same ``alpha`` and ``m``).
    * every other variant whose form is ``W + s A B`` (LoRA-SB/XS: ``A = a R``; NOLA: the
      regenerated ``A_eff``, ``B_eff``; Block-LoRA: the tiled ``A``; CoDyRA: ``A diag(g)``): a LoRA
      of rank ``r = max`` over leaves of the form's rank (smaller ranks zero-padded, which adds
      nothing) with ``lora_alpha = s r``. Needs ``params`` (some forms read the leaf's shape).
    """
    from lrjax.reparam.conv import ConvLoRA, CPDoRA, CPLoRA

    if isinstance(rp, ConvLoRA):
        raise TypeError(f"rp: {type(rp).__name__} (loralib's ConvLoRA convention: a reshape of a [C_out k, r k] x "
                        "[r k, C_in k] product) has no PEFT equivalent; PEFT's conv LoRA/DoRA is lrjax.LoRA/lrjax.DoRA "
                        "on the conv kernel")
    if isinstance(rp, CPLoRA):
        dora = isinstance(rp, CPDoRA)
        if not isinstance(adapters, Mapping) or not adapters:
            raise TypeError(f"adapters must be the non-empty dict returned by rp.init(), got {type(adapters).__name__}")
        out = {}
        for path, f in adapters.items():
            if not isinstance(f, Mapping) or set(f) != set(rp.factor_keys):
                raise TypeError(f"adapters[{path!r}] must be a CPLoRA factor dict with keys {list(rp.factor_keys)}")
            for k in rp.factor_keys:
                _factor_np(f[k], f"adapters[{path!r}][{k!r}]")
            form = CPLoRA.factors(rp, None, f)  # the update's (A, B) only: a CPDoRA's m is PEFT's magnitude
            out[path] = {"a": form.a, "b": form.b.astype(form.a.dtype)} | ({"m": f["m"]} if dora else {})
        if dora:
            return DoRA(rank=rp.rank, alpha=_alpha_of(rp), targets=rp.targets, dtype=rp.dtype), out
        return LoRA(rank=rp.rank, alpha=_alpha_of(rp), targets=rp.targets, dtype=rp.dtype), out
    if not isinstance(rp, Reparam) or _native(rp):
        return rp, adapters
    name = type(rp).__name__
    if params is None:
        raise ValueError(f"params: exporting a {name} adapter writes its equivalent LoRA (W + s A B), computed "
                         "from each leaf; pass params=... (the base params the adapters were made for)")
    flat = rp._check(params, adapters)
    rp._check_finite(flat, adapters)
    forms = {}
    for path, f in adapters.items():
        form = rp.factors(rp.to_view(path, flat[path]), f)
        if form.col_scale is not None:
            raise TypeError(f"rp: {name} scales columns (DoRA-like) in a way PEFT's LoRA/DoRA files cannot express")
        forms[path] = form
    r = max(int(fm.a.shape[-1]) for fm in forms.values())
    if r == 0:
        raise ValueError(f"adapters: every leaf of this {name} adapter has rank 0 (all ranks pruned); nothing to export")
    out = {}
    for path, fm in forms.items():
        pad = r - fm.a.shape[-1]
        a, b = jnp.asarray(fm.a, jnp.float32), jnp.asarray(fm.b, jnp.float32)
        out[path] = {"a": jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]),
                     "b": jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])}
    return LoRA(rank=r, alpha=float(rp.scale) * r, targets=rp.targets, axes=rp.axes), out


def _conv_a_to_peft(a: np.ndarray, shape) -> np.ndarray:
    """lrjax ``a: [prod(window) C_in, r]`` -> PEFT ``lora_A.weight: [r, C_in, *window]``."""
    *window, ci, _ = shape
    nd = len(window)
    x = a.reshape(tuple(window) + (ci, a.shape[-1]))
    return np.transpose(x, (nd + 1, nd) + tuple(range(nd)))


def _conv_a_from_peft(at: np.ndarray) -> np.ndarray:
    """PEFT ``lora_A.weight: [r, C_in, *window]`` -> lrjax ``a: [prod(window) C_in, r]``."""
    nd = at.ndim - 2
    x = np.transpose(at, tuple(range(2, 2 + nd)) + (1, 0))
    return x.reshape(-1, at.shape[0])


# ---------------------------------------------------------------------------- export
def export_peft(path_dir, rp: Reparam, adapters: dict, *, module_names: ModuleNames = None,
                base_model_name_or_path: str | None = None, params=None, init_adapters: dict | None = None,
                pissa: str = "lora") -> dict:
    """Write ``adapters`` as a PEFT LoRA adapter directory that ``PeftModel.from_pretrained`` loads.

    Args:
      path_dir: output directory (created if needed; a ``str`` or ``os.PathLike``, not a file nor
        under one); receives ``adapter_config.json`` and ``adapter_model.safetensors`` (float32,
        metadata ``{"format": "pt"}``, keys ``base_model.model.<module>.lora_A.weight`` = ``A^T``
        ``[r, in]``, ``...lora_B.weight`` = ``B^T`` ``[out, r]``, DoRA
        ``...lora_magnitude_vector`` = ``m``).
      rp: the :class:`~lrjax.LoRA`, :class:`~lrjax.RSLoRA`, :class:`~lrjax.DoRA` or
        :class:`~lrjax.PiSSA` that made ``adapters`` (sets ``r``, ``lora_alpha``, ``use_rslora``,
        ``use_dora``), or a :class:`~lrjax.reparam.conv.CPLoRA` / :class:`~lrjax.reparam.conv.CPDoRA`,
        written as the equivalent PEFT conv LoRA / DoRA of rank ``R`` (``A`` = the Khatri-Rao product
        of its factors, ``B = O^T``, same ``m``; exact). loralib's
        :class:`~lrjax.reparam.conv.ConvLoRA` (and ``ConvDoRA``) has no PEFT equivalent (``TypeError``).
        :class:`~lrjax.LoRAGA` rewrites the base like PiSSA: written as the rank-``2r`` LoRA on the
        original weights (``init_adapters`` needed; see ``pissa``). Variants without a PEFT form
        (:class:`~lrjax.LoRASB`, :class:`~lrjax.LoRAXS`, :class:`~lrjax.NOLA`, :class:`~lrjax.BlockLoRA`,
        :class:`~lrjax.CoDyRA`) are written as their exact equivalent LoRA ``W + s A B`` of rank
        ``r`` = the largest per-leaf rank (smaller ones zero-padded), ``lora_alpha = s r``; they need
        ``params`` (NOLA regenerates its bases from the leaf shape).
      adapters: ``{leaf_path: {"a": [M, r], "b": [r, N](, "m": [N])}}`` without batch axes; NaN or
        Inf factors raise ``ValueError`` naming the entry.
      module_names: leaf path -> torch module name override (see the module docstring); the default
        drops ``/kernel`` and joins with dots.
      base_model_name_or_path: written to the config (e.g. a Hub id); ``None`` by default.
      params: optional base params; when given, every adapted leaf is checked to be a Dense,
        attention or convolution kernel (stacked leaves raise ``ValueError``) and the factors are
        validated against it. Without it only the factor shapes are checked. **Required for
        convolution kernels** (the window shape is read from it): conv leaves are written in PEFT's
        conv layout, ``lora_A.weight = a.reshape(*window, C_in, r)`` moved to ``[r, C_in, *window]``,
        ``lora_B.weight = b^T [C_out, r, 1, ...]``, DoRA ``lora_magnitude_vector = m [1, C_out, 1, ...]``
        (see :mod:`lrjax.reparam.conv`); without ``params`` a leaf whose path contains ``conv`` is
        refused.
      init_adapters: PiSSA and LoRA-GA (``rp.rewrites_base``) only: the factors ``rp.init`` returned
        before training; needed by the default ``pissa="lora"``.
      pissa: PiSSA and LoRA-GA only (``"pissa"``: PiSSA only), how to write it so that PEFT
        reproduces lrjax's model:
        ``"lora"`` (default): the rank-``2r`` LoRA of :func:`pissa_to_lora`, exact on the
        *original* (unmodified) torch model; ``"pissa"``: PEFT's own PiSSA form
        (``init_lora_weights: "pissa"`` with the trained factors; PEFT re-runs the SVD on the
        original model at load, equal to lrjax's up to float rounding; refused for a randomized
        ``n_iter`` PiSSA whose SVD PEFT cannot repeat); ``"residual"``: the bare factors as plain
        LoRA, correct only on the residual base ``PiSSA.init`` returned (a warning says so).

    Returns:
      the config dict written to ``adapter_config.json``.
    """
    from safetensors.numpy import save_file

    if isinstance(rp, Reparam) and rp.activation_space:
        raise NotMergeable(f"export_peft: {type(rp).__name__} is an activation-space adapter (its output depends "
                           "on the input x), which has no LoRA equivalent for PEFT to load; save it with "
                           "lrjax.checkpoint.save_adapters instead")
    path_dir = _check_path(path_dir)
    if params is not None:
        _check_params(params)
    rp, adapters = _as_lora(rp, adapters, params)
    use_dora, use_rslora = _variant(rp)
    _check_adapters(adapters)
    pissa = check_choice(pissa, "pissa", _PISSA_MODES)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {type(base_model_name_or_path).__name__}")
    init_lora_weights: object = True
    if rp.rewrites_base:  # PiSSA, LoRA-GA: the adapter is a delta on the rewritten base
        name = type(rp).__name__
        if pissa == "lora":
            if init_adapters is None:
                raise ValueError(
                    f"init_adapters: exporting a {name} adapter needs the factors {name}.init returned "
                    "(`base, init_adapters = rp.init(key, params, ...)`): it is written as the equivalent rank-2r "
                    "LoRA on the original weights, which PEFT loads with lrjax's outputs. Pass "
                    "init_adapters=..." + (", or pissa='pissa' (PEFT's own PiSSA form; PEFT re-runs the SVD on load)"
                                           if isinstance(rp, PiSSA) else ""))
            _check_adapters(init_adapters, "init_adapters")
            rp, adapters = pissa_to_lora(rp, adapters, init_adapters)
            use_dora, use_rslora = _variant(rp)
        elif pissa == "pissa" and not isinstance(rp, PiSSA):
            raise ValueError(f"pissa='pissa' writes PEFT's own PiSSA form; {name} has none that PEFT can rebuild "
                             "without its data (PEFT's lora_ga init re-runs only with gradients). Use pissa='lora' "
                             "and init_adapters=...")
        elif pissa == "pissa":
            if init_adapters is not None:
                raise ValueError("init_adapters is only used with pissa='lora'; drop it for pissa='pissa'")
            if rp.n_iter is not None:
                raise ValueError(
                    f"pissa='pissa': this PiSSA uses a randomized SVD (n_iter={rp.n_iter}), which PEFT's "
                    "torch.svd_lowrank cannot repeat, so PEFT would load a different residual. Export with "
                    "pissa='lora' and init_adapters=... instead")
            init_lora_weights = "pissa"
        else:
            if init_adapters is not None:
                raise ValueError("init_adapters is only used with pissa='lora'; drop it for pissa='residual'")
            warnings.warn(
                f"export_peft(pissa='residual'): the {name} factors are written as a plain LoRA adapter "
                f"(init_lora_weights=true), correct only on the rewritten base returned by {name}.init, not on "
                "the original weights; pissa='lora' (the default) writes an adapter for the original model.",
                UserWarning, stacklevel=2)
    elif init_adapters is not None:
        raise ValueError(f"init_adapters is only used to export an adapter whose init rewrote the base (PiSSA, "
                         f"LoRA-GA); rp is {type(rp).__name__}, drop init_adapters")
    conv_shapes: dict[str, tuple] = {}
    if params is not None:
        flat = rp._check(params, adapters)
        for path in adapters:
            _leaf_matrix_shape(path, flat[path].shape, rp.leaf_axes(path, flat[path].shape), "export_peft")
            if _is_conv_leaf(path, flat[path].shape):
                conv_shapes[path] = tuple(flat[path].shape)
    else:
        for path in adapters:
            if _CONV.search(path):
                raise ValueError(
                    f"export_peft: leaf {path!r} looks like a convolution kernel; pass params=... (the base params) "
                    "so its window shape is known: PEFT stores conv LoRA as lora_A.weight [r, C_in, *window] and "
                    "lora_B.weight [C_out, r, 1, ...]")
    namer = _namer(module_names)
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, str] = {}
    for path, f in adapters.items():
        extra = set(f) - ({"a", "b", "m"} if use_dora else {"a", "b"})
        if extra:
            raise ValueError(f"adapters[{path!r}] has entries {sorted(extra)} that a "
                             f"{type(rp).__name__} adapter does not have; wrong `rp` for these adapters?")
        a = _factor_np(f["a"], f"adapters[{path!r}]['a']")
        b = _factor_np(f["b"], f"adapters[{path!r}]['b']")
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(
                f"export_peft: adapters[{path!r}] has factors a{a.shape} b{b.shape} with batch axes (a "
                "stacked / nn.scan leaf); PEFT stores one adapter per torch Linear, so unstack first")
        if a.shape[1] != rp.rank or b.shape[0] != rp.rank:
            r = rp.rank
            if a.shape[0] == r and a.shape[1] != r:
                raise ValueError(f"export_peft: adapters[{path!r}]['a'] has shape {a.shape}, the transposed "
                                 f"orientation: lrjax stores a as [in, r] with r = rp.rank = {r}")
            if b.shape[1] == r and b.shape[0] != r:
                raise ValueError(f"export_peft: adapters[{path!r}]['b'] has shape {b.shape}, the transposed "
                                 f"orientation: lrjax stores b as [r, out] with r = rp.rank = {r}")
            raise ValueError(f"export_peft: adapters[{path!r}] has rank {a.shape[1]}/{b.shape[0]} but "
                             f"rp.rank = {rp.rank} (lrjax factors are a [in, r], b [r, out]; got a{a.shape}, "
                             f"b{b.shape}); PEFT's `r` must match every factor")
        name = namer(path)
        if name in modules:
            raise ValueError(f"module_names: leaves {modules[name]!r} and {path!r} both map to module {name!r}")
        modules[name] = path
        key = KEY_PREFIX + name
        cshape = conv_shapes.get(path)
        ones = (1,) * (len(cshape) - 2) if cshape else ()
        if cshape:  # PEFT's conv LoRA: a k x k conv C_in -> r, then a 1 x 1 conv r -> C_out
            tensors[key + _SUFFIX_A] = np.ascontiguousarray(_conv_a_to_peft(a, cshape))
            tensors[key + _SUFFIX_B] = np.ascontiguousarray(b.T.reshape(b.shape[1], b.shape[0], *ones))
        else:
            tensors[key + _SUFFIX_A] = np.ascontiguousarray(a.T)
            tensors[key + _SUFFIX_B] = np.ascontiguousarray(b.T)
        if use_dora:
            if "m" not in f:
                raise ValueError(f"adapters[{path!r}] has no DoRA magnitude 'm'")
            m = _factor_np(f["m"], f"adapters[{path!r}]['m']")
            if m.shape != (b.shape[1],):
                raise ValueError(f"adapters[{path!r}]['m'] has shape {m.shape}, expected {(b.shape[1],)}")
            if cshape:  # PEFT keeps a conv DoRA magnitude as [1, C_out, 1, ...]
                m = m.reshape((1, m.shape[0]) + ones)
            tensors[key + _SUFFIX_M] = np.ascontiguousarray(m)

    config = {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(rp.rank),
        "lora_alpha": _json_number(_alpha_of(rp)),
        "target_modules": sorted(modules),
        "exclude_modules": None,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "modules_to_save": None,
        "init_lora_weights": init_lora_weights,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
    }
    os.makedirs(path_dir, exist_ok=True)
    save_file(tensors, os.path.join(path_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path_dir, CONFIG_NAME), "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
    return config


# ---------------------------------------------------------------------------- import
def _read_config(path_dir) -> dict:
    cfg_path = os.path.join(path_dir, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no PEFT adapter config here (expected the directory written by "
                                "PeftModel.save_pretrained or export_peft)")
    try:
        with open(cfg_path) as fh:
            cfg = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    ptype = cfg.get("peft_type")
    if ptype != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {ptype!r} is not supported; lrjax imports LoRA adapters "
                         "(peft_type 'LORA', including use_rslora / use_dora)")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{cfg_path}: 'r' must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)  # PEFT's default
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{cfg_path}: 'lora_alpha' must be a positive number, got {alpha!r}")
    for flag in ("use_dora", "use_rslora"):
        if not isinstance(cfg.get(flag, False), bool):
            raise ValueError(f"{cfg_path}: {flag!r} must be true or false, got {cfg[flag]!r}")
    bad = [k for k in _UNSUPPORTED_FIELDS if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        bad.append("bias")
    if bad:
        raise ValueError(f"{cfg_path}: unsupported PEFT options {', '.join(f'{k}={cfg[k]!r}' for k in bad)}; "
                         "lrjax imports adapters with one rank/alpha for every module, no trained biases, "
                         "no modules_to_save and no LoRA variants other than rsLoRA/DoRA")
    init = cfg.get("init_lora_weights", True)
    if not (init in _PLAIN_INITS or (isinstance(init, str) and re.fullmatch(r"pissa(_niter_\d+)?", init))):
        raise ValueError(f"{cfg_path}: init_lora_weights={init!r} modifies the base weights (or is unknown); "
                         "lrjax cannot reproduce it. Convert it to plain LoRA in PEFT (save_pretrained with "
                         "path_initial_model_for_weight_conversion) and import that")
    if isinstance(init, str) and init.startswith("pissa") and (cfg.get("use_dora") or cfg.get("use_rslora")):
        raise ValueError(f"{cfg_path}: PiSSA with use_dora/use_rslora is not supported by lrjax.PiSSA")
    dropout = cfg.get("lora_dropout", 0.0)
    if dropout:
        warnings.warn(f"{cfg_path}: lora_dropout={dropout} is ignored (lrjax reparams have no dropout; it "
                      "does not affect inference)", UserWarning, stacklevel=3)
    return cfg


def _read_tensors(path_dir) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    st_path = os.path.join(path_dir, WEIGHTS_NAME)
    if not os.path.isfile(st_path):
        hint = (" (found adapter_model.bin: torch pickles are not read; re-save with "
                "safe_serialization=True)") if os.path.isfile(os.path.join(path_dir, "adapter_model.bin")) else ""
        raise FileNotFoundError(f"{st_path}: no adapter weights{hint}")
    try:
        with safe_open(st_path, framework="numpy") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # SafetensorError, OSError, dtype errors: all mean "not a usable file"
        raise ValueError(f"{st_path}: not a valid safetensors file ({type(e).__name__}: {e}); "
                         "truncated or corrupted download?") from None
    if not tensors:
        raise ValueError(f"{st_path}: contains no tensors")
    for k, v in tensors.items():
        if not np.issubdtype(v.dtype, np.floating) and v.dtype.name != "bfloat16":
            raise ValueError(f"{st_path}: tensor {k!r} has dtype {v.dtype}; expected floating point")
        _finite_or_raise(np.asarray(v, np.float32), f"{st_path}: tensor {k!r}")
    return tensors


def _target_matches(module: str, target: str) -> bool:
    """PEFT's rule for a list entry: the full module path, or a suffix after a dot."""
    return module == target or module.endswith("." + target)


def _layer_index(module: str, layers_pattern) -> int | None:
    """The layer index PEFT reads from a module name for ``layers_to_transform`` (first numbered level)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        m = None
        for pat in ([layers_pattern] if isinstance(layers_pattern, str) else layers_pattern):
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", module)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def _check_config_modules(cfg: dict, modules: list[str], cfg_path: str) -> None:
    """The config's ``target_modules`` / ``exclude_modules`` / ``layers_to_transform`` must select
    exactly the modules that have tensors (PEFT's matching rule), else PEFT would skip tensors or
    leave modules at their init while lrjax loads them."""
    tm = cfg.get("target_modules")
    ex = cfg.get("exclude_modules")
    ltt = cfg.get("layers_to_transform")
    if ex is not None and not isinstance(ex, (str, list)):
        raise ValueError(f"{cfg_path}: exclude_modules must be a list or a regex string, got {ex!r:.80}")
    if ltt is not None and not (isinstance(ltt, int) and not isinstance(ltt, bool)) and not (
            isinstance(ltt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ltt)):
        raise ValueError(f"{cfg_path}: layers_to_transform must be an int or a list of ints, got {ltt!r:.80}")
    if ex:
        hit = [m for m in modules if (re.fullmatch(ex, m) if isinstance(ex, str)
                                      else any(isinstance(t, str) and _target_matches(m, t) for t in ex))]
        if hit:
            raise ValueError(f"{cfg_path}: exclude_modules={ex!r} excludes modules {hit[:5]} that have tensors "
                             f"(tensors' modules: {sorted(modules)[:8]}); PEFT would not load them")
    if tm is None or tm == "all-linear":
        return  # resolved by PEFT against the torch model; nothing to compare here
    if isinstance(tm, str):
        missed, unused = [m for m in modules if not re.fullmatch(tm, m)], []
    elif isinstance(tm, list) and all(isinstance(t, str) for t in tm):
        missed = [m for m in modules if not any(_target_matches(m, t) for t in tm)]
        unused = [t for t in tm if not any(_target_matches(m, t) for m in modules)]
        using_layers = ltt is not None and (ltt != [] if isinstance(ltt, list) else True)
        if using_layers:
            wanted = [ltt] if isinstance(ltt, int) else ltt
            outside = [m for m in modules if m not in missed
                       and m not in tm and _layer_index(m, cfg.get("layers_pattern")) not in wanted]
            if outside:
                raise ValueError(
                    f"{cfg_path}: layers_to_transform={ltt!r} (layers_pattern={cfg.get('layers_pattern')!r}) "
                    f"excludes modules {outside[:5]} that have tensors; PEFT would not load them: fix the config "
                    "or re-save the adapter")
    else:
        raise ValueError(f"{cfg_path}: target_modules must be a list of module names or a regex string, "
                         f"got {tm!r:.80}")
    if unused and not missed:
        # a generic recipe list (["q_proj", "v_proj", "query", "value"]) names modules of other
        # architectures too; PEFT accepts that, so it is reported, not refused
        warnings.warn(f"{cfg_path}: target_modules entries {unused[:5]} match no module with tensors "
                      f"(tensors' modules: {sorted(modules)[:8]}); loading the tensors that are there",
                      stacklevel=3)
    if missed:
        parts = [f"modules {missed[:5]} have tensors but are not matched by target_modules"]
        if unused:
            parts.append(f"target_modules entries {unused[:5]} match no module with tensors")
        raise ValueError(
            f"{cfg_path}: target_modules={tm!r} disagrees with the tensors' modules {sorted(modules)[:8]}: "
            + "; ".join(parts) + ". PEFT would skip or leave at init what does not match, so the adapter "
            "would not be what was saved: fix target_modules in the config or re-save the adapter")


def _parse_key(key: str, adapter_name: str):
    """``(module, kind)`` of a saved key, ``kind`` in ``A``/``B``/``m``; ``None`` if not an adapter key.

    Accepts PEFT's saved form (``<module>.lora_A.weight``, ``<module>.lora_magnitude_vector``)
    and the in-memory form holding the adapter name (``<module>.lora_A.default.weight``,
    ``<module>.lora_magnitude_vector.default.weight``), as ``PeftModel.load_adapter`` does.
    Raises for another adapter name.
    """
    if not key.startswith(KEY_PREFIX):
        return None
    rest = key[len(KEY_PREFIX):]
    m = _KEY_AB.match(rest)
    if m:
        name = m.group("name")
        kind = "A" if m.group("kind") == "lora_A" else "B"
        module = m.group("module")
    else:
        if rest.endswith(".lora_magnitude_vector") or rest.endswith(".lora_magnitude_vector.weight"):
            module, name = rest[: rest.rindex(".lora_magnitude_vector")], None
        else:
            mm = re.match(r"^(?P<module>.+)\.lora_magnitude_vector\.(?P<name>[^.]+)\.weight$", rest)
            if not mm:
                return None
            module, name = mm.group("module"), mm.group("name")
        kind = "m"
    if name is not None and name != adapter_name:
        raise ValueError(f"key {key!r} holds adapter name {name!r}, not adapter_name={adapter_name!r}; pass "
                         f"adapter_name={name!r} to import that adapter")
    if not module or any(not p for p in module.split(".")):
        return None
    return module, kind


def _group_by_module(tensors: dict, st_path: str, adapter_name: str) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {}
    keys: dict[tuple, str] = {}
    unexpected = []
    for key, v in tensors.items():
        try:
            parsed = _parse_key(key, adapter_name)
        except ValueError as e:
            raise ValueError(f"{st_path}: {e}") from None
        if parsed is None:
            unexpected.append(key)
            continue
        module, kind = parsed
        if (module, kind) in keys:
            raise ValueError(f"{st_path}: keys {keys[(module, kind)]!r} and {key!r} are the same tensor (with and "
                             "without the adapter name); keep one")
        keys[(module, kind)] = key
        groups.setdefault(module, {})[kind] = v
    if unexpected:
        raise ValueError(
            f"{st_path}: unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; expected only "
            f"'{KEY_PREFIX}<module>.lora_A.weight', '.lora_B.weight' and (DoRA) '.lora_magnitude_vector' "
            f"(optionally with the adapter name, as in '.lora_A.{adapter_name}.weight')")
    for module, g in groups.items():
        missing = [k for k in ("A", "B") if k not in g]
        if missing:
            raise ValueError(f"{st_path}: module {module!r} has no lora_{missing[0]}.weight")
    return groups


def _exact_targets(params, paths: list[str], where):
    """Regex targets selecting exactly ``paths`` (escaped full paths), or a callable if suffix matching
    of :mod:`lrjax.tree` would select more."""
    pats = tuple(re.escape(p) for p in paths)
    if set(tree_lib.select(params, pats, where=where)) == set(paths):
        return pats
    return _ExactPaths(tuple(paths))


class _ExactPaths:
    """Hashable target predicate: selects exactly the given leaf paths."""

    def __init__(self, paths: tuple[str, ...]):
        self.paths = frozenset(paths)
        self._order = paths

    def __call__(self, path, leaf) -> bool:
        return path in self.paths

    def __eq__(self, other):
        return isinstance(other, _ExactPaths) and other.paths == self.paths

    def __hash__(self):
        return hash(self.paths)

    def __repr__(self):
        return f"ExactPaths({list(self._order)!r})"


def import_peft(path_dir, params, *, module_names: ModuleNames = None, pissa: str = "lora",
                adapter_name: str = "default"):
    """Load a PEFT LoRA / rsLoRA / DoRA / PiSSA adapter directory as ``(rp, adapters)`` for ``params``.

    ``rp`` is :class:`~lrjax.LoRA`, :class:`~lrjax.RSLoRA` or :class:`~lrjax.DoRA` (``rslora`` set
    from ``use_rslora``) with ``rank = r``, ``alpha = lora_alpha`` and ``targets`` selecting exactly
    the leaves found; ``adapters`` has ``a = lora_A.weight^T [M, r]``, ``b = lora_B.weight^T [r, N]``
    (and DoRA's ``m = lora_magnitude_vector``), cast to each base leaf's dtype, so
    ``rp.materialize(params, adapters)`` is the PEFT model's effective weights.

    ``params`` are the *original* base model's params (e.g. ``params_from_torch(model)``). The saved
    keys decide which modules are adapted; a module ``<module>`` is matched with the params leaf
    whose module name (see :func:`default_module_name` and ``module_names``) equals it. The config's
    ``target_modules`` / ``exclude_modules`` must agree with those modules (else ``ValueError``
    naming both). Keys may hold the adapter name (``...lora_A.default.weight``) as PEFT allows.

    PiSSA adapters (``init_lora_weights="pissa"``): PEFT re-runs the PiSSA SVD on the original
    base when it loads them and uses the residual as base, so the factors alone are not the model.

    * ``pissa="lora"`` (default): returns ``(LoRA, adapters)``, the equivalent rank-``2r`` LoRA
      (``alpha`` doubled) on the *original* ``params`` (lrjax re-runs the SVD):
      ``rp.materialize(params, adapters)`` equals PEFT's model.
    * ``pissa="residual"``: returns ``(PiSSA rp, adapters, residual_params)``; use
      ``rp.materialize(residual_params, adapters)`` (and keep training PiSSA-style).

    ``pissa`` is not used for other adapters. ``"pissa_niter_k"`` adapters warn: PEFT's
    ``torch.svd_lowrank`` residual differs from lrjax's randomized SVD by a few percent.

    Raises:
      FileNotFoundError: no ``adapter_config.json`` / ``adapter_model.safetensors``.
      TypeError: ``path_dir`` not a path, ``params`` not a dict, bad ``module_names``.
      ValueError: invalid config or unsupported option (``peft_type`` other than ``LORA``,
        ``rank_pattern``/``alpha_pattern``, trained biases, ``modules_to_save``, base-modifying
        inits other than PiSSA); a malformed or truncated safetensors file; a tensor with NaN/Inf
        (the key is named); ``target_modules`` disagreeing with the tensors; a module with no
        matching leaf (the nearest leaf paths are listed); a transposed ``lora_A``/``lora_B`` (its
        shape, orientation and the expected shape are named); a rank other than ``r``; a shape that
        does not fit the base leaf; a DoRA config without magnitude vectors (PEFT only warns and
        keeps its init; lrjax refuses).
    """
    path_dir = _check_path(path_dir)
    _check_params(params)
    pissa = check_choice(pissa, "pissa", ("lora", "residual"))
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str such as 'default', got {type(adapter_name).__name__}")
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty name without dots such as 'default', got {adapter_name!r}")
    if module_names is not None and not isinstance(module_names, Mapping) and not callable(module_names):
        raise TypeError("module_names must be None, a dict {leaf_path: module_name} or a callable "
                        f"leaf_path -> module_name; got {type(module_names).__name__}")
    cfg = _read_config(path_dir)
    cfg_path = os.path.join(path_dir, CONFIG_NAME)
    st_path = os.path.join(path_dir, WEIGHTS_NAME)
    groups = _group_by_module(_read_tensors(path_dir), st_path, adapter_name)
    _check_config_modules(cfg, list(groups), cfg_path)
    rank, alpha = cfg["r"], cfg.get("lora_alpha", 8)
    use_dora, use_rslora = cfg.get("use_dora", False), cfg.get("use_rslora", False)
    init = cfg.get("init_lora_weights", True)

    has_m = sorted(m for m, g in groups.items() if "m" in g)
    if use_dora and len(has_m) != len(groups):
        lacking = sorted(set(groups) - set(has_m))
        raise ValueError(f"{st_path}: the config says use_dora=true but modules {lacking[:5]} have no "
                         "lora_magnitude_vector (PEFT would silently keep its init magnitude; lrjax refuses)")
    if not use_dora and has_m:
        raise ValueError(f"{st_path}: modules {has_m[:5]} have a DoRA lora_magnitude_vector but the config "
                         "says use_dora=false")

    flat = tree_lib.flatten(params)

    def targetable(path, leaf):
        return hasattr(leaf, "ndim") and getattr(leaf, "ndim", 0) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)

    if isinstance(module_names, Mapping):
        unknown = [p for p in module_names if p not in flat]
        if unknown:
            raise ValueError(f"module_names: leaf {unknown[0]!r} is not in params; nearest paths: "
                             f"{tree_lib._nearest(unknown[0], flat)}")
    namer = _namer(module_names)
    by_name: dict[str, list[str]] = {}
    for path, leaf in flat.items():
        if targetable(path, leaf):
            by_name.setdefault(namer(path), []).append(path)

    adapters_by_path: dict[str, dict] = {}
    for module in groups:
        cands = by_name.get(module, [])
        if not cands:
            guess = module.replace(".", "/") + "/kernel"
            raise ValueError(
                f"{st_path}: module {module!r} (key '{KEY_PREFIX}{module}{_SUFFIX_A}') matches no leaf of params "
                f"(a leaf 'a/b/kernel' is module 'a.b' unless module_names says otherwise). Nearest paths: "
                f"{tree_lib._nearest(guess, [p for p, l in flat.items() if targetable(p, l)] or flat)}")
        if len(cands) > 1:
            raise ValueError(f"{st_path}: module {module!r} matches several leaves {cands}; disambiguate with "
                             "module_names")
        adapters_by_path[cands[0]] = groups[module] | {"_module": module}

    adapters: dict[str, dict] = {}
    for path in (p for p in flat if p in adapters_by_path):  # params order
        g = adapters_by_path[path]
        module = g.pop("_module")
        leaf = flat[path]
        m_dim, n_dim = _leaf_matrix_shape(path, leaf.shape, axes_lib.default_axes(path, leaf.shape), "import_peft")
        at, bt = g["A"], g["B"]
        where = f"{st_path}: module {module!r}"
        if _is_conv_leaf(path, leaf.shape):
            adapters[path] = _import_conv(where, path, leaf, g, rank, use_dora)
            continue
        if at.ndim > 2:
            raise ValueError(f"{where} has conv-shaped lora_A {at.shape} / lora_B {bt.shape}, but its leaf {path!r} "
                             f"{tuple(leaf.shape)} is not a convolution kernel; wrong base model or module mapping?")
        torch_shape = f"torch Linear weight [out, in] = [{n_dim}, {m_dim}] for leaf {path!r} {tuple(leaf.shape)}"
        if at.ndim != 2 or bt.ndim != 2:
            raise ValueError(f"{where} has lora_A {at.shape} / lora_B {bt.shape}; only "
                             "Linear adapters (2-D) are supported")
        want_a, want_b = (rank, m_dim), (n_dim, rank)
        if at.shape != want_a and at.shape == (m_dim, rank):
            raise ValueError(f"{where}: lora_A.weight has shape {at.shape} = [in, r], the transposed orientation; "
                             f"PEFT stores lora_A.weight as [r, in] = {want_a} ({torch_shape}, r={rank}). "
                             "Transpose it (lora_A.weight.T) when writing the file")
        if bt.shape != want_b and bt.shape == (rank, n_dim):
            raise ValueError(f"{where}: lora_B.weight has shape {bt.shape} = [r, out], the transposed orientation; "
                             f"PEFT stores lora_B.weight as [out, r] = {want_b} ({torch_shape}, r={rank}). "
                             "Transpose it (lora_B.weight.T) when writing the file")
        if at.shape[0] != rank or bt.shape[1] != rank:
            raise ValueError(
                f"{where}: lora_A.weight {at.shape} (expected [r, in] = {want_a}) and lora_B.weight {bt.shape} "
                f"(expected [out, r] = {want_b}) do not have the config's rank r={rank} on their rank axes "
                f"(lora_A axis 0 = {at.shape[0]}, lora_B axis 1 = {bt.shape[1]}); wrong 'r' in the config?")
        if at.shape != want_a or bt.shape != want_b:
            raise ValueError(
                f"{where} has lora_A {at.shape} and lora_B {bt.shape}, which do not fit leaf "
                f"{path!r} of shape {tuple(leaf.shape)} (torch Linear [out, in] = [{n_dim}, {m_dim}]: expected "
                f"lora_A {want_a}, lora_B {want_b}); wrong base model or module mapping?")
        dt = leaf.dtype
        f = {"a": jnp.asarray(at.T, dtype=dt), "b": jnp.asarray(bt.T, dtype=dt)}
        if use_dora:
            mv = g["m"]
            if mv.shape != (n_dim,):
                raise ValueError(f"{where} has lora_magnitude_vector {mv.shape}, expected "
                                 f"({n_dim},) for leaf {path!r}")
            f["m"] = jnp.asarray(mv, dtype=dt)
        adapters[path] = f

    targets = _exact_targets(params, list(adapters), lambda p, l: targetable(p, l))
    if isinstance(init, str) and init.startswith("pissa"):
        niter = int(init.split("_niter_")[1]) if "_niter_" in init else None
        if niter is not None:
            warnings.warn(f"{st_path}: {init!r} uses torch.svd_lowrank; lrjax's randomized SVD gives a different "
                          "residual. Prefer an adapter converted to plain LoRA.", UserWarning, stacklevel=2)
        prp = PiSSA(rank=rank, alpha=alpha, targets=targets, n_iter=niter)
        prp._check(params, adapters)
        residual, init_adapters = prp.init(jax.random.key(0), params)
        if pissa == "residual":
            return prp, adapters, residual
        return pissa_to_lora(prp, adapters, init_adapters)
    if use_dora:
        rp: Reparam = DoRA(rank=rank, alpha=alpha, targets=targets, rslora=use_rslora)
    elif use_rslora:
        rp = RSLoRA(rank=rank, alpha=alpha, targets=targets)
    else:
        rp = LoRA(rank=rank, alpha=alpha, targets=targets)
    rp._check(params, adapters)
    return rp, adapters


def _import_conv(where: str, path: str, leaf, g: dict, rank: int, use_dora: bool) -> dict:
    """PEFT conv LoRA tensors (``lora_A [r, C_in, *window]``, ``lora_B [C_out, r, 1, ...]``, DoRA
    ``lora_magnitude_vector [1, C_out, 1, ...]``) -> lrjax factors of the default conv view."""
    *window, ci, co = tuple(leaf.shape)
    ones = (1,) * len(window)
    at, bt = g["A"], g["B"]
    want_a, want_b = (rank, ci, *window), (co, rank, *ones)
    if tuple(at.shape) != want_a or tuple(bt.shape) != want_b:
        hint = ""
        if at.ndim == 2 or bt.ndim == 2:
            hint = " (Linear-shaped tensors for a conv leaf: wrong base model or module mapping?)"
        elif bt.ndim == len(want_b) and bt.shape[0] == co and bt.shape[1] != rank and rank % max(bt.shape[1], 1) == 0:
            hint = (f" (lora_B has {bt.shape[1]} of r={rank} input channels: a grouped conv, groups="
                    f"{rank // bt.shape[1]}; PEFT cannot merge those and lrjax does not import them)")
        elif at.ndim == len(want_a) and at.shape[0] == rank and at.shape[1] != ci:
            hint = " (C_in differs: a grouped conv, or another base?)"
        raise ValueError(
            f"{where}: conv lora_A {tuple(at.shape)} / lora_B {tuple(bt.shape)} do not fit leaf {path!r} "
            f"{tuple(leaf.shape)} [*window, C_in, C_out] with r={rank}: expected lora_A [r, C_in, *window] = {want_a} "
            f"and lora_B [C_out, r, 1, ...] = {want_b}{hint}")
    dt = leaf.dtype
    f = {"a": jnp.asarray(_conv_a_from_peft(np.asarray(at)), dtype=dt),
         "b": jnp.asarray(np.asarray(bt).reshape(co, rank).T, dtype=dt)}
    if use_dora:
        mv = np.asarray(g["m"])
        if tuple(mv.shape) not in ((1, co, *ones), (co,)):
            raise ValueError(f"{where} has lora_magnitude_vector {tuple(mv.shape)}, expected PEFT's conv layout "
                             f"{(1, co, *ones)} for leaf {path!r}")
        f["m"] = jnp.asarray(mv.reshape(co), dtype=dt)
    return f


# ------------------------------------------------------------------------ PiSSA -> LoRA
def pissa_to_lora(rp: Reparam, adapters: dict, init_adapters: dict) -> tuple[Reparam, dict]:
    """Turn trained PiSSA factors into a LoRA adapter on the *original* (pre-PiSSA) weights.

    With ``W = W_res + s A0 B0`` (PiSSA init) and trained ``A, B``:
    ``W_res + s A B = W + s [A | A0] [B ; -B0]``, a rank-``2r`` LoRA with the same scale, so
    ``alpha`` doubles (``* sqrt(2)`` for rsLoRA). This is PEFT's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)``.

    Args:
      rp: the :class:`~lrjax.PiSSA` (or any LoRA/RSLoRA whose base was replaced) config.
      adapters: the trained factors.
      init_adapters: the factors returned by ``rp.init`` (before training).

    Returns:
      ``(LoRA or RSLoRA with rank 2r, adapters)``; use it with the original params (e.g. export it
      with :func:`export_peft` and load it on the unmodified torch model).
    """
    if isinstance(rp, DoRA) or not isinstance(rp, LoRA):
        raise TypeError(f"rp: pissa_to_lora needs a PiSSA/LoRA/RSLoRA config, got {type(rp).__name__}")
    _check_adapters(adapters, "adapters")
    _check_adapters(init_adapters, "init_adapters")
    for name, ad in (("adapters", adapters), ("init_adapters", init_adapters)):
        for path, f in ad.items():
            for k in ("a", "b"):
                if not isinstance(f[k], jax.core.Tracer):  # values are checked only when known (not under jit)
                    _factor_np(f[k], f"{name}[{path!r}][{k!r}]")
    if set(adapters) != set(init_adapters):
        raise ValueError(f"adapters and init_adapters cover different leaves: "
                         f"{sorted(set(adapters) ^ set(init_adapters))[:5]}")
    out = {}
    for path, f in adapters.items():
        f0 = init_adapters[path]
        if f["a"].shape != f0["a"].shape or f["b"].shape != f0["b"].shape:
            raise ValueError(f"adapters[{path!r}] and init_adapters[{path!r}] differ in shape")
        out[path] = {"a": jnp.concatenate([f["a"], f0["a"].astype(f["a"].dtype)], axis=-1),
                     "b": jnp.concatenate([f["b"], -f0["b"].astype(f["b"].dtype)], axis=-2)}
    alpha = _alpha_of(rp)
    kw = dict(targets=rp.targets, axes=rp.axes, dtype=rp.dtype)
    if isinstance(rp, RSLoRA):
        new = RSLoRA(rank=2 * rp.rank, alpha=alpha * math.sqrt(2.0), **kw)
    else:
        new = LoRA(rank=2 * rp.rank, alpha=2.0 * alpha, **kw)
    return new, out
