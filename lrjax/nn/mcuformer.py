"""MCUFormer: a ViT supernet of factorized linears, sliced into subnets for a memory-budgeted search.

Liang et al., "MCUFormer: Deploying Vision Transformers on Microcontrollers with Limited Memory"
(NeurIPS 2023); official code liangyn22/MCUFormer (``model/module/Linear_super.py``,
``model/supernet_transformer.py``, ``supernet_load_init_weight.py``, ``evolution.py``), read to
confirm the facts below, not ported.

**Factorized linear** (every query/key/value/proj/fc1/fc2 of a block; the patch embedding and the
classifier head stay dense, as official). The official layer is ``V^T [r x d_in]`` (no bias) ->
``Sigma [r x r]`` (trainable, full, initialized ``diag(S)``) -> ``U [d_out x r]`` (+ bias). In
lrjax's ``x @ kernel`` layout (``kernel [d_in, d_out]``) the factors are stored transposed::

    v [d_in, r],  s [r, r],  u [r, d_out],  bias [d_out]
    y = ((x @ v) @ s) @ u + bias          (= x (V Sigma U^T)^T + b of the paper)

initialized from the SVD of a dense kernel ``W = P diag(sigma) Q^T``: ``v = P[:, :r]``,
``s = diag(sigma[:r])``, ``u = Q^T[:r]`` (:func:`svd_factorize`), so at full rank the layer *is* the
dense one (to float rounding). The official init uses ``torch.svd_lowrank`` (a randomized
approximation of the same truncated SVD); lrjax uses the exact SVD. The rank of a subnet is
``r = floor(min(embed, ffn) * rank_ratio)`` (official ``int(...)``; at least 1) (:func:`rank_of`).

**Supernet and slicing.** One set of weights at the largest dims; a subnet uses the leading block
of every weight (``w[:d_out, :d_in]``, factors ``v[:d_in, :r]``, ``s[:r, :r]``, ``u[:r, :d_out]``),
the first ``depth`` blocks and the positional table / patch embedding of its patch size
(:func:`subnet`). This is the official weight sharing (nested, like Maestro's ordered dropout).

**The CPU model** (ours, at digits scale): images ``[B, 64]`` (8x8, one channel) cut into
``(8/p)^2`` patches of ``p x p`` pixels, a dense patch embedding per patch size (patch sizes cannot
share one kernel), learned positions, ``depth`` pre-norm blocks (LayerNorm eps 1e-6, multi-head
self-attention with head dim :data:`HEAD_DIM` = 16 so ``heads = embed / 16``, and an MLP ``embed ->
ffn -> embed`` with exact GELU), a final LayerNorm, mean pooling over tokens and a dense head.
Attention inner width = embed (AutoFormer lets heads vary separately; tied here so every linear
has ``min(d_in, d_out) >= embed >= r``). Query/key/value are three factorized linears (official: one
``qkv`` linear factorized as a whole).

**Search space** (a spec is a dict with exactly :data:`SPEC_KEYS`): ``patch`` (a patch size the
supernet has; official PATCH_SIZE {32..16} at 224 px), ``embed`` (multiple of 16, <= the supernet's),
``depth``, ``mlp_ratio`` (ffn = embed * mlp_ratio, an integer <= the supernet's ffn) and
``rank_ratio`` in (0, 1] (official RANK_RATIO 0.4..0.95). :data:`SPACE` is the experiment's space.

**Two forwards of one set of weights** (pure functions; no NNX module, because a subnet's weights
are *slices* of the supernet's, which fixed-shape NNX modules do not express):

* :func:`apply` -- the standalone net: any params tree of the layout :func:`subnet` returns (dims
  read from the shapes), e.g. a sliced subnet or a net built on its own; each linear may be
  factorized ``{v, s, u, bias}``, deployed ``{v, u, bias}`` (Sigma folded into u) or dense
  ``{kernel, bias}``.
* :func:`supernet_apply` / :func:`supernet_forward` -- the supernet with the subnet's dims as
  *masks* (zero-padding: numerically the sliced subnet, to float rounding), so training with a new
  sampled subnet at every step (sandwich rule) needs one compilation per patch size, not one per
  subnet.

:func:`deploy` turns a subnet into its serving form (Sigma folded; a linear whose factors are not
smaller than its dense kernel, ``r (d_in + d_out) >= d_in d_out``, merged into the kernel -- so at
``rank_ratio = 1`` the net is the plain ViT); :func:`subnet_memory` reads the deployed subnet's
peak memory at batch 1 from XLA's compiled memory analysis (:func:`lrjax.search.peak_memory`).
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lrjax._validation import (check_array, check_bool, check_finite, check_float, check_int, check_key, check_rank,
                                compute_dtype, is_concrete)

__all__ = ["HEAD_DIM", "SPEC_KEYS", "LINEARS", "SPACE", "rank_of", "svd_factorize", "factorized_linear",
           "init_supernet", "check_spec", "spec_dims", "subnet", "apply", "supernet_apply", "supernet_forward",
           "deploy", "subnet_memory", "num_params"]

HEAD_DIM = 16
IMAGE = 8
SPEC_KEYS = ("patch", "embed", "depth", "mlp_ratio", "rank_ratio")
LINEARS = ("query", "key", "value", "proj", "fc1", "fc2")
#: the digits experiment's search space (the supernet of :func:`init_supernet`'s defaults)
SPACE = {"patch": (2, 4), "embed": (32, 48, 64), "depth": (1, 2, 3), "mlp_ratio": (1, 2),
         "rank_ratio": (0.25, 0.375, 0.5, 0.75, 1.0)}
_LN_EPS = 1e-6


# --------------------------------------------------------------------------- the factorized linear
def rank_of(rank_ratio, embed: int, ffn: int) -> int:
    """``r = max(1, floor(min(embed, ffn) * rank_ratio))`` (official ``int(min(embed, ffn) *
    rank_ratio)``; a 1e-9 guard so 0.7 * 10 is 7). ``rank_ratio`` in (0, 1], else ``ValueError``."""
    rank_ratio = check_float(rank_ratio, "rank_ratio", low=0, high=1, low_open=True)
    embed, ffn = check_int(embed, "embed", low=1), check_int(ffn, "ffn", low=1)
    return max(1, int(math.floor(min(embed, ffn) * rank_ratio + 1e-9)))


def svd_factorize(kernel, rank: int) -> dict:
    """Factors ``{"v" [d_in, r], "s" [r, r], "u" [r, d_out]}`` of the truncated SVD of ``kernel``
    ``[d_in, d_out] = P diag(sigma) Q^T``: ``v = P[:, :r]``, ``s = diag(sigma[:r])``, ``u =
    Q^T[:r]``; ``v s u`` is the best rank-``r`` approximation (exactly ``kernel`` at full rank, to
    float rounding). Computed in float32 (``compute_dtype``), returned in the kernel's dtype.
    ``rank`` obeys lrjax's rank rule (``1 <= r <= min(d_in, d_out)``, else ``ValueError``); a
    concrete ``kernel`` holding NaN/Inf is refused (``ValueError`` naming ``kernel``: its SVD would be
    NaN factors)."""
    kernel = check_array(kernel, "kernel", ndim=2, kind="floating")
    check_finite(kernel, "kernel")
    rank = check_rank(rank, *kernel.shape)
    cd = compute_dtype(kernel.dtype)
    p, sig, qt = jnp.linalg.svd(kernel.astype(cd), full_matrices=False)
    return {"v": p[:, :rank].astype(kernel.dtype), "s": jnp.diag(sig[:rank]).astype(kernel.dtype),
            "u": qt[:rank].astype(kernel.dtype)}


def factorized_linear(x, p: Mapping):
    """``y = ((x @ v) @ s) @ u + bias`` for ``p = {v [d_in, r], s [r, r], u [r, d_out], bias
    [d_out]}``; also ``{v, u, bias}`` (deployed: ``(x @ v) @ u + bias``) and ``{kernel, bias}``
    (dense). ``x [..., d_in]``; computed in ``promote_types(x, weights, float32)``, rounded once to
    ``promote_types(x, weights)``. ``bias`` optional.

    Checked eagerly (shapes only, so also under ``jit``): ``TypeError`` naming ``p`` for a non-dict or
    a non-array entry, naming ``x`` for a non-floating ``x``; ``ValueError`` naming ``p`` for keys that
    are none of the three forms (e.g. ``{"foo": 1}``) or factor shapes that do not chain (``v [d_in,
    r]``, ``s [r, r]``, ``u [r, d_out]``, ``bias [d_out]``), naming ``x`` when ``x.shape[-1]`` is not
    ``d_in``."""
    _check_linear(x, p)
    leaves = [p[k] for k in ("kernel", "v", "s", "u", "bias") if k in p]
    out_dt = jnp.result_type(x.dtype, *[w.dtype for w in leaves])
    cd = compute_dtype(out_dt)
    h = x.astype(cd)
    if "kernel" in p:
        h = h @ p["kernel"].astype(cd)
    else:
        h = h @ p["v"].astype(cd)
        if "s" in p:
            h = h @ p["s"].astype(cd)
        h = h @ p["u"].astype(cd)
    if "bias" in p:
        h = h + p["bias"].astype(cd)
    return h.astype(out_dt)


_FORMS = ({"kernel"}, {"v", "u"}, {"v", "s", "u"})


def _check_linear(x, p):
    if not isinstance(p, Mapping):
        raise TypeError(f"p must be a dict of a linear's weights ({{v, s, u, bias}}, {{v, u, bias}} or "
                        f"{{kernel, bias}}), got {type(p).__name__}")
    keys = set(p) - {"bias"}
    if keys not in _FORMS:
        raise ValueError(f"p has keys {sorted(p)}; a linear is {{v, s, u[, bias]}} (factorized), {{v, u[, bias]}} "
                         "(deployed) or {kernel[, bias]} (dense)")
    for k in p:
        check_array(p[k], f"p[{k!r}]", ndim=1 if k == "bias" else 2, kind="floating")
    x = check_array(x, "x", min_ndim=1, kind="floating")
    if "kernel" in p:
        d_in, d_out = p["kernel"].shape
    else:
        d_in, r = p["v"].shape
        if "s" in p and p["s"].shape != (r, r):
            raise ValueError(f"p['s'] must be [r, r] = [{r}, {r}] (r from p['v'] [d_in, r]), got {tuple(p['s'].shape)}")
        if p["u"].shape[0] != r:
            raise ValueError(f"p['u'] must be [r, d_out] with r = {r} (from p['v']), got {tuple(p['u'].shape)}")
        d_out = p["u"].shape[1]
    if "bias" in p and p["bias"].shape != (d_out,):
        raise ValueError(f"p['bias'] must be [d_out] = [{d_out}], got {tuple(p['bias'].shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"x must be [..., d_in] with d_in = {d_in} (the linear's input width), got shape "
                         f"{tuple(x.shape)}")


# --------------------------------------------------------------------------- supernet params
def init_supernet(key, *, patches=(2, 4), embed: int = 64, depth: int = 3, mlp_ratio: int = 2,
                  classes: int = 10) -> dict:
    """Supernet params for 8x8 one-channel images at the largest dims.

    Weights are drawn on the host from ``numpy.random.default_rng`` seeded with the key's data (a
    jitted init would spend seconds compiling; deterministic for a key). Every block linear is
    drawn dense (``N(0, 1/d_in)``) and factorized at full rank
    ``R = min(embed, ffn)`` by the exact SVD (NumPy float64 on the host, as :func:`svd_factorize`) (official: SVD init from a pretrained dense
    supernet; here from a random one), so the supernet at ``rank_ratio = 1`` is that dense net.
    Layout: ``{"patch_embed": {"p2": {kernel [4, E], bias}, ...}, "pos": {"p2": [16, E], ...},
    "blocks": {"block_0": {ln1, query, key, value, proj, ln2, fc1, fc2}, ...}, "norm": {scale,
    bias}, "head": {kernel [E, classes], bias}}``; float32.
    """
    key = check_key(key)
    if isinstance(patches, (str, bytes)) or not isinstance(patches, (tuple, list)) or not patches:
        raise TypeError(f"patches must be a non-empty tuple of patch sizes dividing {IMAGE}, got {patches!r}")
    for p in patches:
        p = check_int(p, "patches", low=1)
        if IMAGE % p:
            raise ValueError(f"patches: {p} does not divide the image size {IMAGE}; use 1, 2, 4 or 8")
    embed = check_int(embed, "embed", low=HEAD_DIM)
    if embed % HEAD_DIM:
        raise ValueError(f"embed must be a multiple of HEAD_DIM={HEAD_DIM}, got {embed}")
    depth = check_int(depth, "depth", low=1)
    mlp_ratio = check_int(mlp_ratio, "mlp_ratio", low=1)
    classes = check_int(classes, "classes", low=1)
    ffn = embed * mlp_ratio
    rank = min(embed, ffn)
    patches = tuple(int(p) for p in patches)
    words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng([int(w) for w in np.asarray(words).ravel()])

    def dense(d_in, d_out):
        return rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)

    def fact(d_in, d_out):
        # exact SVD on the host in float64 (tiny matrices; a jitted LAPACK SVD costs seconds to compile)
        p, sig, qt = np.linalg.svd(dense(d_in, d_out), full_matrices=False)
        return {"v": jnp.asarray(p[:, :rank], jnp.float32), "s": jnp.asarray(np.diag(sig[:rank]), jnp.float32),
                "u": jnp.asarray(qt[:rank], jnp.float32), "bias": jnp.zeros((d_out,), jnp.float32)}

    ln = lambda: {"scale": jnp.ones((embed,), jnp.float32), "bias": jnp.zeros((embed,), jnp.float32)}  # noqa: E731
    params = {"patch_embed": {}, "pos": {}, "blocks": {}}
    for p in patches:
        t = (IMAGE // p) ** 2
        params["patch_embed"][f"p{p}"] = {"kernel": jnp.asarray(dense(p * p, embed), jnp.float32),
                                          "bias": jnp.zeros((embed,), jnp.float32)}
        params["pos"][f"p{p}"] = jnp.asarray(0.02 * rng.standard_normal((t, embed)), jnp.float32)
    for i in range(depth):
        params["blocks"][f"block_{i}"] = {
            "ln1": ln(), "query": fact(embed, embed), "key": fact(embed, embed),
            "value": fact(embed, embed), "proj": fact(embed, embed), "ln2": ln(),
            "fc1": fact(embed, ffn), "fc2": fact(ffn, embed)}
    params["norm"] = ln()
    params["head"] = {"kernel": jnp.asarray(dense(embed, classes), jnp.float32),
                      "bias": jnp.zeros((classes,), jnp.float32)}
    return params


def _maxima(params):
    try:
        e = params["norm"]["scale"].shape[0]
        d = len(params["blocks"])
        f = params["blocks"]["block_0"]["fc1"]["u"].shape[-1]
        patches = tuple(sorted(int(k[1:]) for k in params["pos"]))
    except (KeyError, TypeError, AttributeError, IndexError):
        raise ValueError("params must be a supernet from lrjax.nn.mcuformer.init_supernet (keys patch_embed, pos, "
                         "blocks/block_i/{ln1,query,key,value,proj,ln2,fc1,fc2}, norm, head)") from None
    return e, d, f, patches


# --------------------------------------------------------------------------- specs
def check_spec(spec, params=None, name: str = "spec") -> dict:
    """Validate a subnet spec ``{"patch", "embed", "depth", "mlp_ratio", "rank_ratio"}`` (exactly
    :data:`SPEC_KEYS`) and, given the supernet ``params``, that it fits in it. Returns a normalized
    copy (ints as int, ratios as float).

    ``TypeError``: not a dict, a bool or float where an int goes (``patch``, ``embed``, ``depth``), a
    non-number ratio. ``ValueError`` naming the key: unknown or missing keys, ``rank_ratio`` outside
    (0, 1], ``embed`` not a multiple of :data:`HEAD_DIM`, ``embed * mlp_ratio`` not an integer, a
    patch size, embed, depth or ffn the supernet does not have.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"{name} must be a dict with keys {list(SPEC_KEYS)}, got {type(spec).__name__}")
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise ValueError(f"{name} has unknown key(s) {unknown}; a spec has exactly {list(SPEC_KEYS)}")
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{name} lacks key(s) {missing}; a spec has exactly {list(SPEC_KEYS)}")
    out = {"patch": check_int(spec["patch"], f"{name}['patch']", low=1),
           "embed": check_int(spec["embed"], f"{name}['embed']", low=HEAD_DIM),
           "depth": check_int(spec["depth"], f"{name}['depth']", low=1),
           "mlp_ratio": check_float(spec["mlp_ratio"], f"{name}['mlp_ratio']", low=0, low_open=True),
           "rank_ratio": check_float(spec["rank_ratio"], f"{name}['rank_ratio']", low=0, high=1, low_open=True)}
    if isinstance(spec["mlp_ratio"], int):
        out["mlp_ratio"] = int(spec["mlp_ratio"])
    if out["embed"] % HEAD_DIM:
        raise ValueError(f"{name}['embed'] must be a multiple of HEAD_DIM={HEAD_DIM}, got {out['embed']}")
    ffn = out["embed"] * out["mlp_ratio"]
    if abs(ffn - round(ffn)) > 1e-9 or round(ffn) < 1:
        raise ValueError(f"{name}['mlp_ratio']: embed * mlp_ratio = {ffn} must be a positive integer (the ffn width)")
    if params is not None:
        e, d, f, patches = _maxima(params)
        if out["patch"] not in patches:
            raise ValueError(f"{name}['patch']={out['patch']} is not a patch size of the supernet {patches}")
        if out["embed"] > e:
            raise ValueError(f"{name}['embed']={out['embed']} exceeds the supernet's embed {e}")
        if out["depth"] > d:
            raise ValueError(f"{name}['depth']={out['depth']} exceeds the supernet's depth {d}")
        if round(ffn) > f:
            raise ValueError(f"{name}['mlp_ratio']: ffn = {round(ffn)} exceeds the supernet's ffn {f}")
    return out


def spec_dims(spec, params=None) -> tuple[int, int, int, int]:
    """``(embed, depth, ffn, rank)`` of a spec (``rank = rank_of(rank_ratio, embed, ffn)``)."""
    s = check_spec(spec, params)
    ffn = int(round(s["embed"] * s["mlp_ratio"]))
    return s["embed"], s["depth"], ffn, rank_of(s["rank_ratio"], s["embed"], ffn)


# --------------------------------------------------------------------------- slicing and the standalone net
def _slice_linear(p, d_in, d_out, r):
    return {"v": p["v"][:d_in, :r], "s": p["s"][:r, :r], "u": p["u"][:r, :d_out], "bias": p["bias"][:d_out]}


def subnet(params, spec) -> dict:
    """The subnet's params: the supernet's leading slices (nested weight sharing).

    With ``(e, d, f, r) = spec_dims(spec)``: ``patch_embed`` = ``kernel[:, :e]``, ``bias[:e]`` of the
    spec's patch size; ``pos [:, :e]``; blocks ``0..d-1`` with LayerNorms ``[:e]``, query/key/value/
    proj ``v[:e, :r], s[:r, :r], u[:r, :e], bias[:e]``, fc1 ``v[:e, :r], u[:r, :f], bias[:f]``,
    fc2 ``v[:f, :r], u[:r, :e]``; ``norm [:e]``; ``head kernel[:e]``. Same layout as the supernet
    with one patch size (``{"p2": ...}`` becomes the plain dict). Slices only (no copies under jit);
    works on ``jax.ShapeDtypeStruct`` trees through ``jax.eval_shape``."""
    s = check_spec(spec, params)
    e, d, f, r = spec_dims(s)
    pk = f"p{s['patch']}"
    ln = lambda q: {"scale": q["scale"][:e], "bias": q["bias"][:e]}  # noqa: E731
    blocks = {}
    for i in range(d):
        b = params["blocks"][f"block_{i}"]
        blocks[f"block_{i}"] = {"ln1": ln(b["ln1"]), "ln2": ln(b["ln2"]),
                                **{n: _slice_linear(b[n], e, e, r) for n in ("query", "key", "value", "proj")},
                                "fc1": _slice_linear(b["fc1"], e, f, r), "fc2": _slice_linear(b["fc2"], f, e, r)}
    pe = params["patch_embed"][pk]
    return {"patch_embed": {"kernel": pe["kernel"][:, :e], "bias": pe["bias"][:e]}, "pos": params["pos"][pk][:, :e],
            "blocks": blocks, "norm": ln(params["norm"]),
            "head": {"kernel": params["head"]["kernel"][:e], "bias": params["head"]["bias"]}}


def deploy(sub) -> dict:
    """Serving form of a subnet: every factorized linear becomes ``{v, u = s @ u, bias}`` (Sigma
    folded) if ``r (d_in + d_out) < d_in d_out``, else the dense ``{kernel = v @ s @ u, bias}``
    (the factors would not save anything; at ``rank_ratio = 1`` every block linear is dense, the
    plain ViT). Products in float32 (``compute_dtype``), stored in the factors' dtype."""
    out = dict(sub)
    blocks = {}
    for name, b in sub["blocks"].items():
        nb = dict(b)
        for n in LINEARS:
            p = b[n]
            if "s" not in p:
                continue
            d_in, r = p["v"].shape
            d_out = p["u"].shape[-1]
            cd = compute_dtype(p["v"].dtype, p["u"].dtype)
            su = (p["s"].astype(cd) @ p["u"].astype(cd)).astype(p["u"].dtype)
            if r * (d_in + d_out) < d_in * d_out:
                nb[n] = {"v": p["v"], "u": su, "bias": p["bias"]}
            else:
                nb[n] = {"kernel": (p["v"].astype(cd) @ su.astype(cd)).astype(p["u"].dtype), "bias": p["bias"]}
        blocks[name] = nb
    out["blocks"] = blocks
    return out


def _patchify(x, patch):
    b = x.shape[0]
    g = IMAGE // patch
    x = x.reshape(b, g, patch, g, patch).transpose(0, 1, 3, 2, 4)
    return x.reshape(b, g * g, patch * patch)


def _check_images(x):
    x = check_array(x, "x", kind="floating")
    if x.ndim != 2 or x.shape[-1] != IMAGE * IMAGE:
        raise ValueError(f"x must be images [B, {IMAGE * IMAGE}] (8x8 flattened), got shape {tuple(x.shape)}")
    return x


def _ln(h, p):
    mu = jnp.mean(h, -1, keepdims=True)
    var = jnp.mean(jnp.square(h - mu), -1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(var + _LN_EPS) * p["scale"] + p["bias"]


def apply(sub, x, *, patch: int):
    """Logits ``[B, classes]`` of a standalone net (a :func:`subnet` / :func:`deploy` tree, or any
    tree of that layout) on images ``x [B, 64]``; ``patch`` is the patch size its ``patch_embed``
    was made for. Dims come from the shapes: ``embed = pos.shape[-1]``, ``heads = embed / 16``,
    ``depth = len(blocks)``, ``ffn`` and the rank from each linear. Pre-norm blocks:
    ``h += proj(MHSA(LN(h)))``; ``h += fc2(GELU(fc1(LN(h))))``; logits ``= head(mean_t LN(h))``.
    Computed in ``promote_types(x, float32)``; returned in that dtype."""
    x = _check_images(x)
    patch = check_int(patch, "patch", low=1)
    if IMAGE % patch or sub["patch_embed"]["kernel"].shape[0] != patch * patch:
        raise ValueError(f"patch={patch} does not match patch_embed kernel {tuple(sub['patch_embed']['kernel'].shape)} "
                         f"(needs [{patch * patch}, embed] and {IMAGE} % patch == 0)")
    cd = compute_dtype(x.dtype)
    f32 = lambda t: jax.tree.map(lambda a: a.astype(cd), t)  # noqa: E731
    sub = f32(sub)
    e = sub["pos"].shape[-1]
    heads = e // HEAD_DIM
    tok = _patchify(x.astype(cd), patch)
    h = tok @ sub["patch_embed"]["kernel"] + sub["patch_embed"]["bias"] + sub["pos"]
    bsz, t = h.shape[:2]
    for i in range(len(sub["blocks"])):
        b = sub["blocks"][f"block_{i}"]
        a = _ln(h, b["ln1"])
        q, k, v = (factorized_linear(a, b[n]).reshape(bsz, t, heads, HEAD_DIM) for n in ("query", "key", "value"))
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(bsz, t, e)
        h = h + factorized_linear(o, b["proj"])
        m = jax.nn.gelu(factorized_linear(_ln(h, b["ln2"]), b["fc1"]), approximate=False)
        h = h + factorized_linear(m, b["fc2"])
    pooled = jnp.mean(_ln(h, sub["norm"]), axis=1)
    return pooled @ sub["head"]["kernel"] + sub["head"]["bias"]


# --------------------------------------------------------------------------- the masked supernet forward
def _mask_linear(x, p, mr, mout):
    z = (x @ p["v"]) * mr
    z = (z @ p["s"]) * mr
    return (z @ p["u"] + p["bias"]) * mout


def _mask_ln(h, p, me, e):
    mu = jnp.sum(h * me, -1, keepdims=True) / e
    var = jnp.sum(jnp.square((h - mu) * me), -1, keepdims=True) / e
    return ((h - mu) * jax.lax.rsqrt(var + _LN_EPS) * p["scale"] + p["bias"]) * me


def supernet_forward(params, x, dims, *, patch: int):
    """The supernet run as the subnet ``dims = (embed, depth, ffn, rank)`` (int32 ``[4]``, may be
    traced: one compilation serves every subnet of a patch size) by masking: features ``>= embed``,
    ffn units ``>= ffn`` and rank components ``>= rank`` are zeroed, blocks ``>= depth`` are skipped
    (``jnp.where`` on the residual stream), LayerNorm statistics use the first ``embed`` features.
    Equals :func:`apply` of :func:`subnet` to float rounding (zero-padding), including gradients
    to the used slices (unused weights get zero gradient).

    **Mostly unchecked: call :func:`supernet_apply` (which checks ``spec`` against ``params`` and
    ``x``) unless you need traced dims.** This is the jitted inner function; when ``dims`` is traced
    nothing about its values can be checked, and dims that are no subnet give wrong numbers
    silently: ``embed = 0`` gives NaN (LayerNorm over zero features), and dims above the supernet's
    (or a rank above ``min(embed, ffn)``, an embed not a multiple of :data:`HEAD_DIM`) give a net
    that is no subnet of it. When ``dims`` is concrete (a list/tuple/NumPy/eager array) it is checked
    here (``ValueError`` naming ``dims``: shape ``[4]``, ``1 <= embed <= E`` a multiple of
    :data:`HEAD_DIM`, ``1 <= depth <= D``, ``1 <= ffn <= F``, ``1 <= rank <= min(embed, ffn, R)``);
    ``patch`` must be a patch size of the supernet (``ValueError``)."""
    if f"p{patch}" not in params["patch_embed"]:
        raise ValueError(f"patch={patch!r} is not a patch size of the supernet "
                         f"{sorted(int(k[1:]) for k in params['patch_embed'])}")
    if is_concrete(dims):
        _check_dims(dims, params)
    cd = compute_dtype(x.dtype)
    params = jax.tree.map(lambda a: a.astype(cd), params)
    dims = jnp.asarray(dims, jnp.int32)
    e, d, f, r = dims[0], dims[1], dims[2], dims[3]
    E = params["norm"]["scale"].shape[0]
    F = params["blocks"]["block_0"]["fc1"]["u"].shape[-1]
    R = params["blocks"]["block_0"]["fc1"]["v"].shape[-1]
    me = (jnp.arange(E) < e).astype(cd)
    mf = (jnp.arange(F) < f).astype(cd)
    mr = (jnp.arange(R) < r).astype(cd)
    ef = e.astype(cd)
    pk = f"p{patch}"
    tok = _patchify(x.astype(cd), patch)
    h = (tok @ params["patch_embed"][pk]["kernel"] + params["patch_embed"][pk]["bias"] + params["pos"][pk]) * me
    bsz, t = h.shape[:2]
    heads = E // HEAD_DIM
    for i in range(len(params["blocks"])):
        b = params["blocks"][f"block_{i}"]
        a = _mask_ln(h, b["ln1"], me, ef)
        q, k, v = (_mask_linear(a, b[n], mr, me).reshape(bsz, t, heads, HEAD_DIM) for n in ("query", "key", "value"))
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(bsz, t, E) * me
        h2 = h + _mask_linear(o, b["proj"], mr, me)
        m = jax.nn.gelu(_mask_linear(_mask_ln(h2, b["ln2"], me, ef), b["fc1"], mr, mf), approximate=False)
        h2 = h2 + _mask_linear(m, b["fc2"], mr, me)
        h = jnp.where(i < d, h2, h)
    pooled = jnp.mean(_mask_ln(h, params["norm"], me, ef), axis=1)
    return pooled @ params["head"]["kernel"] + params["head"]["bias"]


def _check_dims(dims, params):
    d = np.asarray(dims)
    if d.shape != (4,) or not np.issubdtype(d.dtype, np.integer):
        raise ValueError(f"dims must be 4 ints (embed, depth, ffn, rank), got {dims!r}")
    e, dep, f, r = (int(v) for v in d)
    E, D, F, _ = _maxima(params)
    R = params["blocks"]["block_0"]["fc1"]["v"].shape[-1]
    if not (1 <= e <= E and e % HEAD_DIM == 0):
        raise ValueError(f"dims: embed={e} must be a multiple of {HEAD_DIM} in [{HEAD_DIM}, {E}] (the supernet's)")
    if not 1 <= dep <= D:
        raise ValueError(f"dims: depth={dep} must be in [1, {D}] (the supernet's)")
    if not 1 <= f <= F:
        raise ValueError(f"dims: ffn={f} must be in [1, {F}] (the supernet's)")
    if not 1 <= r <= min(e, f, R):
        raise ValueError(f"dims: rank={r} must be in [1, min(embed, ffn, {R})] = [1, {min(e, f, R)}]; "
                         "use spec_dims(spec) to get a subnet's dims")


_forward_jit = jax.jit(supernet_forward, static_argnames=("patch",))


def supernet_apply(params, x, spec):
    """Logits of the subnet ``spec`` through the masked supernet (:func:`supernet_forward`, jitted
    once per patch size). Checks ``spec`` against ``params`` and ``x [B, 64]`` eagerly."""
    s = check_spec(spec, params)
    x = _check_images(x)
    return _forward_jit(params, x, jnp.asarray(spec_dims(s), jnp.int32), patch=s["patch"])


# --------------------------------------------------------------------------- memory and size
def num_params(tree) -> int:
    """Number of scalars in a params tree (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def subnet_memory(params, spec, *, batch: int = 1, deployed: bool = True, breakdown: bool = False):
    """Peak bytes of one inference of the subnet ``spec`` on ``batch`` images (default 1, the MCU
    setting), from XLA's compiled memory analysis (:func:`lrjax.search.memory_analysis`): the
    (deployed, by default) subnet's weights and the input are the call's arguments, so the number is
    ``weights + input + output + peak temporaries`` in bytes, as XLA:CPU lays them out. Shapes
    only (``jax.eval_shape``; nothing runs). ``breakdown=True`` returns the whole field dict.
    ``deployed`` and ``breakdown`` must be ``bool`` (``TypeError`` naming the flag otherwise: a
    string such as ``'no'`` is refused, not read as truthy)."""
    from lrjax.search import memory_analysis
    deployed = check_bool(deployed, "deployed")
    breakdown = check_bool(breakdown, "breakdown")
    s = check_spec(spec, params)
    batch = check_int(batch, "batch", low=1)
    shapes = jax.eval_shape(lambda p: deploy(subnet(p, s)) if deployed else subnet(p, s), params)
    xs = jax.ShapeDtypeStruct((batch, IMAGE * IMAGE), jnp.float32)
    res = memory_analysis(lambda p, x: apply(p, x, patch=s["patch"]), shapes, xs)
    return res if breakdown else res["peak"]
