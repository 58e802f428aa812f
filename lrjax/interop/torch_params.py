"""Turn a PyTorch (or PEFT) model's weights into lrjax params: :func:`params_from_torch`.

torch and Flax store the same layers differently; this module applies the conversions so that
``import_peft(dir, params_from_torch(model))`` needs no hand-written glue:

=====================================  ==========================================================
torch (``state_dict`` key, shape)       lrjax params (nested dicts, path ``a/b/<name>``)
=====================================  ==========================================================
``Linear``: ``a.b.weight [out, in]``    ``{"a": {"b": {"kernel": [in, out]}}}`` (transposed)
``Linear``/any: ``a.b.bias``            ``... {"bias": ...}`` (unchanged)
``Embedding``: ``a.weight [n, d]``      ``{"a": {"embedding": [n, d]}}`` (unchanged, as ``nn.Embed``)
``LayerNorm``/``RMSNorm``/
``GroupNorm``/``BatchNorm``: ``weight``  ``{"scale": ...}`` (as Flax's norms)
``ConvNd``: ``weight [out, in, *k]``    ``{"kernel": [*k, in, out]}`` (as ``nn.Conv``)
anything else (buffers, custom         kept under its own name, unchanged
parameters)
=====================================  ==========================================================

Module names become the nested keys (``"layers.0.fc1.weight"`` -> ``params["layers"]["0"]["fc1"]``),
so :func:`lrjax.interop.default_module_name` of ``"layers/0/fc1/kernel"`` is ``"layers.0.fc1"``,
the torch module name PEFT uses: adapters line up with no ``module_names``.

The layer type decides the conversion. Passing the ``torch.nn.Module`` itself lets it be read from
the modules (exact). A plain ``state_dict`` (name -> tensor/array) does not say which 2-D
``weight`` is an ``Embedding``: by default (``embeddings="auto"``) a module whose last name part
contains ``embed`` or is ``wte``/``wpe`` is an embedding, every other 2-D ``weight`` a ``Linear``
and every 1-D ``weight`` a norm scale; pass ``embeddings=[...]`` (module names) to say it
exactly. A PEFT model's state dict is accepted too: the ``base_model.model.`` prefix and the
``.base_layer`` level are dropped; LoRA tensors (``lora_A``/``lora_B``/magnitude) are refused
unless ``skip_lora=True`` (load those with :func:`lrjax.interop.import_peft`).

Tensors keep their dtype (bfloat16 included) and become ``jax.Array`` s; NaN/Inf values raise
``ValueError`` naming the key.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from lrjax._validation import check_bool

__all__ = ["params_from_torch"]

_PEFT_PREFIX = "base_model.model."
_LORA_PART = re.compile(r"(^|\.)(lora_A|lora_B|lora_magnitude_vector|lora_embedding_A|lora_embedding_B)(\.|$)")
_AUTO_EMBED = re.compile(r"(?i).*embed.*|wte|wpe")
_NORMS = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
          "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LlamaRMSNorm")


def _module_kinds(model) -> dict[str, str]:
    """``{module name: "linear" | "embedding" | "norm" | "conv" | "other"}`` from a torch module."""
    kinds = {}
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls in ("Linear", "NonDynamicallyQuantizableLinear", "LazyLinear"):
            kind = "linear"
        elif cls == "Embedding":
            kind = "embedding"
        elif cls in _NORMS or cls.endswith("RMSNorm") or cls.endswith("LayerNorm"):
            kind = "norm"
        elif cls in ("Conv1d", "Conv2d", "Conv3d"):
            kind = "conv"
        else:
            kind = "other"
        kinds[name] = kind
    return kinds


def _to_numpy(v, key: str) -> np.ndarray:
    if hasattr(v, "detach") and hasattr(v, "cpu"):  # torch.Tensor, without importing torch
        t = v.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            return np.asarray(t.float().numpy()).astype(jnp.bfloat16)
        return np.asarray(t.numpy())
    if isinstance(v, np.ndarray) or hasattr(v, "__array__"):
        return np.asarray(v)
    raise TypeError(f"model_or_state_dict[{key!r}] must be a torch tensor or an array, got {type(v).__name__}")


def params_from_torch(model_or_state_dict, *, embeddings="auto", skip_lora: bool = False,
                      prefix: str = "") -> dict:
    """lrjax params (nested dicts of ``jax.Array``) from a torch ``nn.Module`` or its ``state_dict()``.

    Args:
      model_or_state_dict: a ``torch.nn.Module`` (layer types read from its modules; also a
        ``PeftModel``) or a mapping ``name -> torch.Tensor | np.ndarray`` such as
        ``model.state_dict()``.
      embeddings: for a plain state dict, which modules are ``Embedding`` s: ``"auto"`` (module
        names whose last part contains ``embed`` or is ``wte``/``wpe``) or a list of module names.
        Ignored (types are known) when a module is passed.
      skip_lora: drop PEFT LoRA tensors instead of refusing them.
      prefix: only keys starting with it are converted, with it removed (e.g. ``"model."``).

    Returns:
      nested dicts following the module names; see the module docstring for the conversions.

    Raises:
      TypeError: not a module/mapping, a key that is not a str, a value that is not a tensor/array.
      ValueError: an empty state dict, NaN/Inf values (the key is named), LoRA tensors without
        ``skip_lora``, two tensors landing on the same lrjax path, a 1-D/3-D+ ``weight`` of a
        module passed as an embedding.
    """
    skip_lora = check_bool(skip_lora, "skip_lora")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    kinds = None
    if hasattr(model_or_state_dict, "named_modules") and hasattr(model_or_state_dict, "state_dict"):
        kinds = _module_kinds(model_or_state_dict)
        sd = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        sd = model_or_state_dict
    else:
        raise TypeError("model_or_state_dict must be a torch.nn.Module or a dict name -> tensor/array "
                        f"(e.g. model.state_dict()), got {type(model_or_state_dict).__name__}")
    if kinds is None:
        if isinstance(embeddings, str):
            if embeddings != "auto":
                raise ValueError(f"embeddings must be 'auto' or a list of module names, got {embeddings!r}")
            is_embed = lambda mod: bool(_AUTO_EMBED.fullmatch(mod.rsplit(".", 1)[-1]))  # noqa: E731
        elif isinstance(embeddings, (list, tuple, set, frozenset)) and all(isinstance(e, str) for e in embeddings):
            names = set(embeddings)
            is_embed = lambda mod: mod in names  # noqa: E731
        else:
            raise TypeError(f"embeddings must be 'auto' or a list of module names, got {embeddings!r:.80}")
    keys = [k for k in sd]
    bad = [k for k in keys if not isinstance(k, str)]
    if bad:
        raise TypeError(f"model_or_state_dict: keys must be str parameter names, got {bad[0]!r:.60}")
    keys = [k for k in keys if k.startswith(prefix)]
    if not keys:
        raise ValueError(f"model_or_state_dict has no tensors{f' under prefix {prefix!r}' if prefix else ''}")

    out: dict = {}
    origin: dict[tuple, str] = {}
    lora = []
    for key in keys:
        name = key[len(prefix):]
        if name.startswith(_PEFT_PREFIX):
            name = name[len(_PEFT_PREFIX):]
        if _LORA_PART.search(name):
            lora.append(key)
            continue
        name = name.replace(".base_layer.", ".")
        parts = name.split(".")
        if len(parts) < 1 or any(not p for p in parts):
            raise ValueError(f"model_or_state_dict: key {key!r} is not a dotted parameter name")
        module, pname = ".".join(parts[:-1]), parts[-1]
        arr = _to_numpy(sd[key], key)
        if np.issubdtype(arr.dtype, np.inexact) or arr.dtype == jnp.bfloat16:
            if not np.all(np.isfinite(arr.astype(np.float32))):
                raise ValueError(f"model_or_state_dict[{key!r}] contains NaN or Inf; clean the weights first")
        # the module that owns the tensor, by its full name in the torch model (PEFT's base_layer too)
        kind = kinds.get(key.rsplit(".", 1)[0] if "." in key else "", "other") if kinds is not None else None
        if pname == "weight":
            if kind is None:  # plain state dict: decide by shape and name
                if arr.ndim == 2:
                    kind = "embedding" if is_embed(module) else "linear"
                elif arr.ndim == 1:
                    kind = "norm"
                elif arr.ndim >= 3:
                    kind = "conv"
                else:
                    kind = "other"
            if kind == "linear":
                if arr.ndim != 2:
                    raise ValueError(f"model_or_state_dict[{key!r}]: a Linear weight must be 2-D, got {arr.shape}")
                pname, arr = "kernel", arr.T
            elif kind == "embedding":
                if arr.ndim != 2:
                    raise ValueError(f"model_or_state_dict[{key!r}]: an Embedding weight must be 2-D, got "
                                     f"{arr.shape}; is {module!r} really an embedding?")
                pname = "embedding"
            elif kind == "norm":
                pname = "scale"
            elif kind == "conv":
                pname, arr = "kernel", np.transpose(arr, tuple(range(2, arr.ndim)) + (1, 0))
        path = tuple(parts[:-1]) + (pname,)
        if path in origin:
            raise ValueError(f"model_or_state_dict: keys {origin[path]!r} and {key!r} both become params "
                             f"{'/'.join(path)!r}; convert them separately")
        origin[path] = key
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"model_or_state_dict: key {key!r} nests under a tensor")
        node[path[-1]] = jnp.asarray(np.ascontiguousarray(arr))
    if lora and not skip_lora:
        raise ValueError(f"model_or_state_dict holds LoRA tensors {lora[:3]}; params are the base weights: "
                         "load the adapter with lrjax.interop.import_peft, or pass skip_lora=True to drop them")
    if not out:
        raise ValueError("model_or_state_dict holds only LoRA tensors, no base weights")
    return out
