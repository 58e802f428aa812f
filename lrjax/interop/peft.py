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
``reshape`` flattens). Stacked (``nn.scan``) leaves have one adapter per layer in PEFT and
convolution kernels use PEFT's Conv LoRA layout; both are rejected with a ``ValueError``.

PiSSA
-----
PEFT's ``init_lora_weights="pissa"`` re-runs the SVD on whatever base it is loaded onto and
overwrites that base with the residual. :func:`export_peft` therefore writes PiSSA factors with
``init_lora_weights: true`` (plain LoRA semantics): the exported adapter is correct only on the
*residual* base returned by ``PiSSA.init`` (save that base too). To get an adapter that applies
to the original weights, convert first with :func:`pissa_to_lora` (rank doubles, alpha
doubles; the same conversion as PEFT's ``path_initial_model_for_weight_conversion``).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Callable, Union

import jax.numpy as jnp
import numpy as np

from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
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


def _leaf_matrix_shape(path: str, shape, ax: axes_lib.Axes, argname: str) -> tuple[int, int]:
    """``(M, N)`` of a leaf that maps onto one torch ``Linear``; ``ValueError`` otherwise."""
    shape = tuple(shape)
    if ax.batch:
        raise ValueError(
            f"{argname}: leaf {path!r} (shape {shape}) has batch axes {ax.batch} (a stacked / nn.scan "
            "leaf); PEFT stores one adapter per torch Linear, so unstack the layers first")
    if len(shape) >= 4 or (len(shape) == 3 and _CONV.search(path)):
        raise ValueError(
            f"{argname}: leaf {path!r} (shape {shape}) is not a Dense/attention kernel (a convolution?); "
            "PEFT's Conv LoRA layout is not supported by lrjax.interop.peft")
    if ax.inp + ax.out != tuple(range(len(shape))):
        raise ValueError(
            f"{argname}: leaf {path!r} uses a transposed matrix view {ax}; only views that keep the axis "
            "order ([in..., out...]) equal a torch Linear weight^T")
    _, m, n = axes_lib.matrix_shape(shape, ax)
    return m, n


# ---------------------------------------------------------------------------- export
def export_peft(path_dir, rp: Reparam, adapters: dict, *, module_names: ModuleNames = None,
                base_model_name_or_path: str | None = None, params=None) -> dict:
    """Write ``adapters`` as a PEFT LoRA adapter directory that ``PeftModel.from_pretrained`` loads.

    Args:
      path_dir: output directory (created if needed); receives ``adapter_config.json`` and
        ``adapter_model.safetensors`` (float32, metadata ``{"format": "pt"}``, keys
        ``base_model.model.<module>.lora_A.weight`` = ``A^T`` ``[r, in]``,
        ``...lora_B.weight`` = ``B^T`` ``[out, r]``, DoRA ``...lora_magnitude_vector`` = ``m``).
      rp: the :class:`~lrjax.LoRA`, :class:`~lrjax.RSLoRA`, :class:`~lrjax.DoRA` or
        :class:`~lrjax.PiSSA` that made ``adapters`` (sets ``r``, ``lora_alpha``, ``use_rslora``,
        ``use_dora``). PiSSA is written as plain LoRA (``init_lora_weights: true``): load it onto
        the residual base, or convert with :func:`pissa_to_lora` first (a warning says so).
      adapters: ``{leaf_path: {"a": [M, r], "b": [r, N](, "m": [N])}}`` without batch axes.
      module_names: leaf path -> torch module name override (see the module docstring); the default
        drops ``/kernel`` and joins with dots.
      base_model_name_or_path: written to the config (e.g. a Hub id); ``None`` by default.
      params: optional base params; when given, every adapted leaf is checked to be a Dense or
        attention kernel (convolutions and stacked leaves raise ``ValueError``) and the factors are
        validated against it. Without it only the factor shapes are checked.

    Returns:
      the config dict written to ``adapter_config.json``.
    """
    from safetensors.numpy import save_file

    use_dora, use_rslora = _variant(rp)
    if not isinstance(adapters, dict) or not adapters:
        raise TypeError(f"adapters must be the non-empty dict returned by rp.init(), got {type(adapters).__name__}")
    if isinstance(rp, PiSSA):
        warnings.warn(
            "export_peft: PiSSA factors are written as a plain LoRA adapter (init_lora_weights=true). It is "
            "only correct on the residual base returned by PiSSA.init, not on the original weights; use "
            "lrjax.interop.pissa_to_lora(rp, adapters, init_adapters) for an adapter on the original model.",
            UserWarning, stacklevel=2)
    if params is not None:
        flat = rp._check(params, adapters)
        for path in adapters:
            _leaf_matrix_shape(path, flat[path].shape, rp.leaf_axes(path, flat[path].shape), "export_peft")
    namer = _namer(module_names)
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, str] = {}
    for path, f in adapters.items():
        if not isinstance(f, dict) or "a" not in f or "b" not in f:
            raise TypeError(f"adapters[{path!r}] must be a dict with 'a' and 'b' factors")
        extra = set(f) - ({"a", "b", "m"} if use_dora else {"a", "b"})
        if extra:
            raise ValueError(f"adapters[{path!r}] has entries {sorted(extra)} that a "
                             f"{type(rp).__name__} adapter does not have; wrong `rp` for these adapters?")
        a, b = np.asarray(f["a"], np.float32), np.asarray(f["b"], np.float32)
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(
                f"export_peft: adapters[{path!r}] has factors a{a.shape} b{b.shape} with batch axes (a "
                "stacked / nn.scan leaf); PEFT stores one adapter per torch Linear, so unstack first")
        if a.shape[1] != rp.rank or b.shape[0] != rp.rank:
            raise ValueError(f"export_peft: adapters[{path!r}] has rank {a.shape[1]}/{b.shape[0]} but "
                             f"rp.rank = {rp.rank}; PEFT's `r` must match every factor")
        name = namer(path)
        if name in modules:
            raise ValueError(f"module_names: leaves {modules[name]!r} and {path!r} both map to module {name!r}")
        modules[name] = path
        key = KEY_PREFIX + name
        tensors[key + _SUFFIX_A] = np.ascontiguousarray(a.T)
        tensors[key + _SUFFIX_B] = np.ascontiguousarray(b.T)
        if use_dora:
            if "m" not in f:
                raise ValueError(f"adapters[{path!r}] has no DoRA magnitude 'm'")
            m = np.asarray(f["m"], np.float32)
            if m.shape != (b.shape[1],):
                raise ValueError(f"adapters[{path!r}]['m'] has shape {m.shape}, expected {(b.shape[1],)}")
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
        "init_lora_weights": True,
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
    return tensors


def _group_by_module(tensors: dict, st_path: str) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {}
    unexpected = []
    for key, v in tensors.items():
        rest = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else None
        kind = None
        if rest is not None:
            for suffix, k in ((_SUFFIX_A, "A"), (_SUFFIX_B, "B"), (_SUFFIX_M, "m")):
                if rest.endswith(suffix) and len(rest) > len(suffix):
                    kind, module = k, rest[: -len(suffix)]
                    break
        if kind is None:
            unexpected.append(key)
            continue
        groups.setdefault(module, {})[kind] = v
    if unexpected:
        raise ValueError(
            f"{st_path}: unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; expected only "
            f"'{KEY_PREFIX}<module>.lora_A.weight', '.lora_B.weight' and (DoRA) '.lora_magnitude_vector'")
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


def import_peft(path_dir, params, *, module_names: ModuleNames = None) -> tuple[Reparam, dict]:
    """Load a PEFT LoRA / rsLoRA / DoRA adapter directory as ``(rp, adapters)`` for ``params``.

    ``rp`` is :class:`~lrjax.LoRA`, :class:`~lrjax.RSLoRA` or :class:`~lrjax.DoRA` (``rslora`` set
    from ``use_rslora``) with ``rank = r``, ``alpha = lora_alpha`` and ``targets`` selecting exactly
    the leaves found; ``adapters`` has ``a = lora_A.weight^T [M, r]``, ``b = lora_B.weight^T [r, N]``
    (and DoRA's ``m = lora_magnitude_vector``), cast to each base leaf's dtype, so
    ``rp.materialize(params, adapters)`` is the PEFT model's effective weights.

    The saved keys (not ``target_modules`` / ``layers_to_transform`` / ``exclude_modules``) decide
    which modules are adapted. A module ``<module>`` is matched with the params leaf whose module name
    (see :func:`default_module_name` and ``module_names``) equals it.

    ``init_lora_weights="pissa"`` adapters are returned with a :class:`~lrjax.PiSSA` ``rp``: PEFT
    re-runs the PiSSA SVD on the base when it loads them, so use ``base = rp.init(key, params)[0]``
    (the residual of the *original* weights) with the returned adapters.

    Raises:
      FileNotFoundError: no ``adapter_config.json`` / ``adapter_model.safetensors``.
      ValueError: invalid config or unsupported option (``peft_type`` other than ``LORA``,
        ``rank_pattern``/``alpha_pattern``, trained biases, ``modules_to_save``, base-modifying
        inits other than PiSSA); a malformed or truncated safetensors file; a module with no
        matching leaf (the nearest leaf paths are listed); a shape that does not fit the base leaf;
        a DoRA config without magnitude vectors (PEFT only warns and keeps its init; lrjax refuses).
    """
    cfg = _read_config(path_dir)
    st_path = os.path.join(path_dir, WEIGHTS_NAME)
    groups = _group_by_module(_read_tensors(path_dir), st_path)
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
        if at.ndim != 2 or bt.ndim != 2:
            raise ValueError(f"{st_path}: module {module!r} has lora_A {at.shape} / lora_B {bt.shape}; only "
                             "Linear adapters (2-D) are supported")
        if at.shape[0] != rank or bt.shape[1] != rank:
            raise ValueError(f"{st_path}: module {module!r} has rank {at.shape[0]}/{bt.shape[1]} but the config "
                             f"says r={rank}")
        if at.shape != (rank, m_dim) or bt.shape != (n_dim, rank):
            raise ValueError(
                f"{st_path}: module {module!r} has lora_A {at.shape} and lora_B {bt.shape}, which do not fit leaf "
                f"{path!r} of shape {tuple(leaf.shape)} (torch Linear [out, in] = [{n_dim}, {m_dim}]: expected "
                f"lora_A {(rank, m_dim)}, lora_B {(n_dim, rank)}); wrong base model or module mapping?")
        dt = leaf.dtype
        f = {"a": jnp.asarray(at.T, dtype=dt), "b": jnp.asarray(bt.T, dtype=dt)}
        if use_dora:
            mv = g["m"]
            if mv.shape != (n_dim,):
                raise ValueError(f"{st_path}: module {module!r} has lora_magnitude_vector {mv.shape}, expected "
                                 f"({n_dim},) for leaf {path!r}")
            f["m"] = jnp.asarray(mv, dtype=dt)
        adapters[path] = f

    targets = _exact_targets(params, list(adapters), lambda p, l: targetable(p, l))
    if isinstance(init, str) and init.startswith("pissa"):
        niter = int(init.split("_niter_")[1]) if "_niter_" in init else None
        if niter is not None:
            warnings.warn(f"{st_path}: {init!r} uses torch.svd_lowrank; lrjax's randomized SVD gives a different "
                          "residual. Prefer an adapter converted to plain LoRA.", UserWarning, stacklevel=2)
        rp: Reparam = PiSSA(rank=rank, alpha=alpha, targets=targets, n_iter=niter)
    elif use_dora:
        rp = DoRA(rank=rank, alpha=alpha, targets=targets, rslora=use_rslora)
    elif use_rslora:
        rp = RSLoRA(rank=rank, alpha=alpha, targets=targets)
    else:
        rp = LoRA(rank=rank, alpha=alpha, targets=targets)
    rp._check(params, adapters)
    return rp, adapters


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
        raise TypeError(f"pissa_to_lora needs a PiSSA/LoRA/RSLoRA config, got {type(rp).__name__}")
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
