"""HypeLoRA: the generator against a float64 NumPy transcription (per-slot loops), torch's
TransformerEncoder, the key convention of the frozen A, noise blending, gradients, jit, bfloat16,
and bad input."""
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from lrjax.reparam.hypelora import HypeLoRA
from lrjax.reparam.lora import LoRA


def _params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    return {"l0": {"q": {"kernel": f(6, 6), "bias": f(6)}, "v": {"kernel": f(6, 6)}},
            "out": {"kernel": f(6, 4)}, "stack": {"kernel": f(3, 6, 6)}}


# slot order = sorted target paths, batch rows of a stack row-major (the documented layout)
SLOTS = [("l0/q/kernel", None), ("l0/v/kernel", None), ("out/kernel", None),
         ("stack/kernel", 0), ("stack/kernel", 1), ("stack/kernel", 2)]
SHAPE = {"l0/q/kernel": (6, 6), "l0/v/kernel": (6, 6), "out/kernel": (6, 4), "stack/kernel": (6, 6)}
R, ALPHA = 2, 3.0


def _cfg(kind="mlp", a_mode="fixed", noise_type="replace", **kw):
    size = dict(hidden=(5, 7, 5), embed_dim=3) if kind == "mlp" else \
        dict(hidden=8, embed_dim=3, num_heads=2, num_layers=2, ff_dim=6)
    size.update(kw)
    return HypeLoRA(rank=R, alpha=ALPHA, targets="kernel", kind=kind, a_mode=a_mode,
                    noise_type=noise_type, **size)


def _np(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


# ------------------------------------------------------- float64 NumPy transcription
def _gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _lin(p, x):
    return x @ p["w"] + p["b"]


def _ln(p, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def np_encoder(net, x, nh):
    t, d = x.shape
    dh = d // nh
    for L in net["layers"]:
        a = L["attn"]
        qkv = x @ a["wqkv"] + a["bqkv"]
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        heads = []
        for h in range(nh):
            sl = slice(h * dh, (h + 1) * dh)
            s = q[:, sl] @ k[:, sl].T / math.sqrt(dh)
            p = np.exp(s - s.max(1, keepdims=True))
            heads.append((p / p.sum(1, keepdims=True)) @ v[:, sl])
        x = _ln(L["ln1"], x + np.concatenate(heads, 1) @ a["wo"] + a["bo"])
        x = _ln(L["ln2"], x + _lin(L["ff2"], np.maximum(_lin(L["ff1"], x), 0)))
    return x


def np_generate(hl, net, frozen, key=None, lam=None):
    """Per-slot loop: {path: (A, B)} in float64 (A for 'random' must come from `key` outside)."""
    net = _np(net)
    fr = _np(frozen)
    S = len(SLOTS)
    if hl.kind == "transformer":
        h = np_encoder(net, _lin(net["proj"], net["embed"]), hl.num_heads)
    out = {}
    for i, (path, row) in enumerate(SLOTS):
        m, n = SHAPE[path]
        heads = net["heads"][f"{m}x{n}"]
        if hl.kind == "mlp":
            z = net["embed"][i]
            for lin in net["trunk"]:
                z = _gelu(_lin(lin, z))
            if hl.a_mode == "generated":
                o = _lin(heads["ba"], z)
                b, a = o[:R * n].reshape(R, n), o[R * n:].reshape(m, R)
            else:
                b, a = _lin(heads["b"], z).reshape(R, n), None
        else:
            if hl.a_mode == "generated":
                a = _lin(heads["a"], h[i]).reshape(m, R)
                b = _lin(heads["b"], h[S + i]).reshape(R, n)
            else:
                a, b = None, _lin(heads["b"], h[i]).reshape(R, n)
        if hl.a_mode == "fixed":
            a = fr[path]["a"] if row is None else fr[path]["a"][row]
        if lam is not None:
            ai = fr[path]["a_init"] if row is None else fr[path]["a_init"][row]
            if a is not None:
                a = (1 - lam) * a + lam * ai
            b = (1 - lam) * b
        out.setdefault(path, []).append((a, b))
    return {p: (v[0] if len(v) == 1 else (None if v[0][0] is None else np.stack([x[0] for x in v]),
                                          np.stack([x[1] for x in v]))) for p, v in out.items()}


def _leaf_a(key, path, bshape, m, row):  # the documented convention, written out independently
    k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    u = jax.random.uniform(k, (2, *bshape, m, R), jnp.float32, -1.0, 1.0)[row]
    return u * (1.0 / math.sqrt(R if row == 0 else m))


# configs shared with the other tests (the jitted generator is compiled once per config)
@pytest.mark.parametrize("kind,a_mode,noise", [("mlp", "fixed", 0.6), ("mlp", "generated", None),
                                               ("mlp", "random", 0.3), ("transformer", "fixed", 0.3),
                                               ("transformer", "generated", None),
                                               ("transformer", "random", None)])
def test_generate_and_materialize_match_numpy(kind, a_mode, noise):
    params = _params()
    hl = _cfg(kind, a_mode, "add" if noise is not None else "replace")
    hp, fr = hl.init(jax.random.key(0), params)
    key = jax.random.key(5) if a_mode == "random" else None
    ad = hl.generate(params, hp, fr, key=key, noise_alpha=noise)
    ref = np_generate(hl, hp, fr, lam=noise)
    assert list(ad) and set(ad) == set(SHAPE)
    for path, (a_ref, b_ref) in ref.items():
        np.testing.assert_allclose(ad[path]["b"], b_ref, rtol=1e-5, atol=1e-5, err_msg=path)
        if a_mode == "random":  # A_rand from the per-leaf key, bound 1/sqrt(r), blended with A_init
            bsh = (3,) if path == "stack/kernel" else ()
            a_rand = _leaf_a(key, path, bsh, 6, 0)
            a_ref = np.asarray(a_rand, np.float64)
            if noise is not None:
                a_ref = (1 - noise) * a_ref + noise * np.asarray(fr[path]["a_init"], np.float64)
        np.testing.assert_allclose(ad[path]["a"], a_ref, rtol=1e-5, atol=1e-5, err_msg=path)
    # materialize = W + (alpha / r) A B with these factors, densely
    out = hl.materialize(params, hp, fr, key=key, noise_alpha=noise)
    for path in SHAPE:
        w = np.asarray(_flat(params)[path], np.float64)
        a, b = np.asarray(ad[path]["a"], np.float64), np.asarray(ad[path]["b"], np.float64)
        np.testing.assert_allclose(_flat(out)[path], w + ALPHA / R * (a @ b), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["l0"]["q"]["bias"], params["l0"]["q"]["bias"])


def _flat(t):
    from lrjax import tree
    return tree.flatten(t)


def test_vmapped_generation_equals_per_slot_loop():
    params = _params()
    for hl in (_cfg("mlp", "generated"), _cfg("mlp", "fixed", "add")):
        hp, fr = hl.init(jax.random.key(1), params)
        ad = hl.generate(params, hp, fr, noise_alpha=0.0 if hl.noise_type == "add" else None)
        emb = hp["embed"]
        for i, (path, row) in enumerate(SLOTS):
            m, n = SHAPE[path]
            heads = hp["heads"][f"{m}x{n}"]
            z = hl._mlp_trunk(hp, emb[i], jnp.float32)  # one slot, no vmap
            o = hl._apply_linear(heads["ba" if hl.a_mode == "generated" else "b"], z, jnp.float32)
            b = ad[path]["b"] if row is None else ad[path]["b"][row]
            np.testing.assert_allclose(b, o[:R * n].reshape(R, n), rtol=1e-6, atol=1e-6)
            if hl.a_mode == "generated":
                a = ad[path]["a"] if row is None else ad[path]["a"][row]
                np.testing.assert_allclose(a, o[R * n:].reshape(m, R), rtol=1e-6, atol=1e-6)


def test_transformer_encoder_matches_torch():
    torch = pytest.importorskip("torch")
    hl = _cfg("transformer", "fixed", "add")
    hp, _ = hl.init(jax.random.key(2), _params())
    d, nh = hl.hidden, hl.num_heads
    layer = torch.nn.TransformerEncoderLayer(d, nh, dim_feedforward=hl.ff_dim, dropout=0.0,
                                             batch_first=True, dtype=torch.float64)
    enc = torch.nn.TransformerEncoder(layer, hl.num_layers, enable_nested_tensor=False).eval()
    t = lambda x: torch.tensor(np.asarray(x, np.float64))  # noqa: E731
    with torch.no_grad():
        for tl, L in zip(enc.layers, hp["layers"]):
            tl.self_attn.in_proj_weight.copy_(t(L["attn"]["wqkv"]).T)
            tl.self_attn.in_proj_bias.copy_(t(L["attn"]["bqkv"]))
            tl.self_attn.out_proj.weight.copy_(t(L["attn"]["wo"]).T)
            tl.self_attn.out_proj.bias.copy_(t(L["attn"]["bo"]))
            tl.linear1.weight.copy_(t(L["ff1"]["w"]).T)
            tl.linear1.bias.copy_(t(L["ff1"]["b"]))
            tl.linear2.weight.copy_(t(L["ff2"]["w"]).T)
            tl.linear2.bias.copy_(t(L["ff2"]["b"]))
            for nm in ("norm1", "norm2"):
                ln = L["ln1" if nm == "norm1" else "ln2"]
                getattr(tl, nm).weight.copy_(t(ln["scale"]))
                getattr(tl, nm).bias.copy_(t(ln["bias"]))
        x = np.asarray(hl._apply_linear(hp["proj"], hp["embed"], jnp.float32), np.float64)
        want = enc(torch.tensor(x)[None])[0].numpy()
    got = hl._encoder(hp, jnp.asarray(x, jnp.float32), jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np_encoder(_np(hp), x, nh), want, rtol=1e-10, atol=1e-10)


def test_fixed_a_key_convention_and_determinism():
    params = _params()
    hl = _cfg("mlp", "fixed", "add")
    hp1, fr1 = hl.init(jax.random.key(3), params)
    hp2, fr2 = hl.init(jax.random.key(3), params)
    fr3 = hl.frozen_factors(jax.random.key(3), params)
    for p in SHAPE:
        for nm in ("a", "a_init"):
            np.testing.assert_array_equal(fr1[p][nm], fr2[p][nm])
            np.testing.assert_array_equal(fr1[p][nm], fr3[p][nm])
    jax.tree_util.tree_map(np.testing.assert_array_equal, hp1, hp2)
    # the per-leaf key fold_in(key, crc32(path)), sub-key 0 (A, bound 1/sqrt(r)) / 1 (A_init, 1/sqrt(M))
    np.testing.assert_array_equal(fr1["out/kernel"]["a"], _leaf_a(jax.random.key(3), "out/kernel", (), 6, 0))
    np.testing.assert_array_equal(fr1["out/kernel"]["a_init"], _leaf_a(jax.random.key(3), "out/kernel", (), 6, 1))
    np.testing.assert_array_equal(fr1["stack/kernel"]["a"], _leaf_a(jax.random.key(3), "stack/kernel", (3,), 6, 0))
    assert np.abs(np.asarray(fr1["out/kernel"]["a"])).max() <= 1 / math.sqrt(R)
    assert np.abs(np.asarray(fr1["out/kernel"]["a_init"])).max() <= 1 / math.sqrt(6)
    # a leaf's frozen A does not depend on which other leaves are targeted
    sub = HypeLoRA(rank=R, targets="out/kernel", hidden=(4,), embed_dim=2, noise_type="add")
    np.testing.assert_array_equal(sub.frozen_factors(jax.random.key(3), params)["out/kernel"]["a"],
                                  fr1["out/kernel"]["a"])
    # a different key gives different A
    assert not np.array_equal(hl.frozen_factors(jax.random.key(4), params)["out/kernel"]["a"], fr1["out/kernel"]["a"])


def test_random_a_resampled_per_key():
    params = _params()
    hl = _cfg("transformer", "random")
    hp, fr = hl.init(jax.random.key(0), params)
    assert fr == {}
    a1 = hl.generate(params, hp, fr, key=jax.random.key(1))
    a1b = hl.generate(params, hp, fr, key=jax.random.key(1))
    a2 = hl.generate(params, hp, fr, key=jax.random.key(2))
    for p in SHAPE:
        np.testing.assert_array_equal(a1[p]["a"], a1b[p]["a"])
        assert not np.array_equal(a1[p]["a"], a2[p]["a"])
        np.testing.assert_array_equal(a1[p]["b"], a2[p]["b"])  # B does not depend on A (embedding input)
        assert np.abs(np.asarray(a1[p]["a"])).max() <= 1 / math.sqrt(R)


@pytest.mark.parametrize("kind,a_mode", [("mlp", "fixed"), ("transformer", "fixed")])
def test_noise_one_leaves_model_unchanged(kind, a_mode):
    params = _params()
    hl = _cfg(kind, a_mode, "add")
    hp, fr = hl.init(jax.random.key(0), params)
    ad = hl.generate(params, hp, fr, noise_alpha=1.0)
    for p in SHAPE:
        assert not np.any(np.asarray(ad[p]["b"]))
        np.testing.assert_array_equal(ad[p]["a"], fr[p]["a_init"])
    out = hl.materialize(params, hp, fr, noise_alpha=jnp.float32(1.0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, out, params)
    # lambda = 0 is the plain generator: the frozen A, and B from the network
    ad0 = hl.generate(params, hp, fr, noise_alpha=0.0)
    ref = np_generate(hl, hp, fr)
    for p in SHAPE:
        np.testing.assert_array_equal(ad0[p]["a"], fr[p]["a"])
        np.testing.assert_allclose(ad0[p]["b"], ref[p][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_grad_reaches_hypernet_not_frozen_and_jit(kind):
    params = _params()
    hl = _cfg(kind, "fixed", "add")
    hp, fr = hl.init(jax.random.key(0), params)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6)), jnp.float32)

    def loss(hp, fr, lam):
        p = hl.materialize(params, hp, fr, noise_alpha=lam)
        h = x @ p["l0"]["q"]["kernel"] @ p["l0"]["v"]["kernel"]
        h = jnp.einsum("bi,lij->bj", h, p["stack"]["kernel"])
        return jnp.sum(jnp.tanh(h @ p["out"]["kernel"]) ** 2)

    # under jit, with a traced lambda (a schedule value); one compiled value-and-grad
    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    lam = jnp.float32(0.4)
    l0, (g_hp, g_fr) = vg(hp, fr, lam)
    for path, g in _flat(g_hp).items():
        assert np.abs(np.asarray(g)).max() > 0, path
    for path, g in _flat(g_fr).items():
        assert not np.any(np.asarray(g)), path
    # the gradient is the true derivative: a central difference along the gradient direction
    g_np = jax.tree_util.tree_map(lambda g: np.asarray(g, np.float64), g_hp)
    gnorm = math.sqrt(sum(float(np.sum(g ** 2)) for g in jax.tree_util.tree_leaves(g_np)))
    step = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda p, g: (np.asarray(p, np.float64) + t * g).astype(np.float32), hp, g_np)
    eps = 1e-3
    fd = (vg(step(eps / gnorm), fr, lam)[0] - vg(step(-eps / gnorm), fr, lam)[0]) / (2 * eps)
    np.testing.assert_allclose(fd, gnorm, rtol=1e-2)
    # a plain gradient step on the trainable pytree alone lowers the loss
    assert float(vg(step(-1e-3 / gnorm), fr, lam)[0]) < float(l0)


def test_bfloat16_base_rounds_once():
    params = _params(jnp.bfloat16)
    hl = _cfg("mlp", "generated")
    hp, fr = hl.init(jax.random.key(0), params)
    ad = hl.generate(params, hp, fr)
    assert all(f["a"].dtype == jnp.float32 and f["b"].dtype == jnp.float32 for f in ad.values())
    out = hl.materialize(params, hp, fr)
    for p in SHAPE:
        w = _flat(params)[p]
        assert _flat(out)[p].dtype == jnp.bfloat16
        want = (w.astype(jnp.float32) + ALPHA / R * (ad[p]["a"] @ ad[p]["b"])).astype(jnp.bfloat16)
        np.testing.assert_array_equal(_flat(out)[p], want)
    # the adapters are ordinary LoRA adapters
    lora_out = LoRA(rank=R, alpha=ALPHA, targets="kernel").materialize(params, ad)
    jax.tree_util.tree_map(np.testing.assert_array_equal, lora_out, out)


def test_bad_inputs():
    params = _params()
    with pytest.raises(ValueError, match="a_mode"):
        HypeLoRA(a_mode="learned")
    with pytest.raises(ValueError, match="kind"):
        HypeLoRA(kind="lstm")
    with pytest.raises(ValueError, match="noise_type"):
        HypeLoRA(noise_type="multiply")
    with pytest.raises(TypeError, match="kind"):
        HypeLoRA(kind=1)
    with pytest.raises(ValueError, match="rank"):
        HypeLoRA(rank=0)
    with pytest.raises(ValueError, match="hidden"):
        HypeLoRA(kind="transformer", hidden=10, num_heads=4)
    with pytest.raises(ValueError, match=r"hidden\[1\]"):
        HypeLoRA(hidden=(4, 0))
    with pytest.raises(TypeError, match="hidden"):
        HypeLoRA(hidden="big")
    assert HypeLoRA(hidden=4).hidden == (4, 4, 4) and HypeLoRA().hidden == (2048, 2048, 2048)
    assert HypeLoRA(kind="transformer").embed_dim == 64 and HypeLoRA().embed_dim == 128
    with pytest.raises(ValueError, match="rank=5.*'out/kernel'"):
        HypeLoRA(rank=5, hidden=(4,), embed_dim=2).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="targets"):
        HypeLoRA(targets="nothing_here", hidden=(4,)).init(jax.random.key(0), params)
    with pytest.raises(TypeError, match="key"):
        _cfg().init(0, params)
    hl = _cfg("mlp", "fixed", "add")
    hp, fr = hl.init(jax.random.key(0), params)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="noise_alpha"):
            hl.generate(params, hp, fr, noise_alpha=bad)
    with pytest.raises(ValueError, match="noise_alpha"):
        hl.generate(params, hp, fr)
    with pytest.raises(ValueError, match="noise_alpha"):
        _cfg("mlp", "generated").generate(params, *_cfg("mlp", "generated").init(jax.random.key(0), params),
                                          noise_alpha=0.5)
    with pytest.raises(ValueError, match="key"):
        hl.generate(params, hp, fr, key=jax.random.key(1), noise_alpha=0.5)
    hr = _cfg("transformer", "random")
    hpr, frr = hr.init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="key"):
        hr.generate(params, hpr, frr)
    with pytest.raises(TypeError, match="key"):
        hr.generate(params, hpr, frr, key=3)
    # hyper_params / frozen that do not fit
    with pytest.raises(ValueError, match="hyper_params"):
        hl.generate({"out": params["out"]}, hp, {"out/kernel": fr["out/kernel"]}, noise_alpha=0.5)
    bad_hp = dict(hp, embed=hp["embed"][:2])
    with pytest.raises(ValueError, match="hyper_params.*embed"):
        hl.generate(params, bad_hp, fr, noise_alpha=0.5)
    with pytest.raises(ValueError, match="frozen"):
        hl.generate(params, hp, {}, noise_alpha=0.5)
    with pytest.raises(ValueError, match="frozen"):
        hl.generate(params, hp, dict(fr, extra={"a": fr["out/kernel"]["a"]}), noise_alpha=0.5)
    bad_fr = dict(fr, **{"out/kernel": {"a": fr["out/kernel"]["a"][:3], "a_init": fr["out/kernel"]["a_init"]}})
    with pytest.raises(ValueError, match="frozen.*out/kernel"):
        hl.generate(params, hp, bad_fr, noise_alpha=0.5)
    with pytest.raises(TypeError, match="hyper_params"):
        hl.generate(params, [1], fr, noise_alpha=0.5)
