"""Cross-checks of lrjax's LoRA / rsLoRA / DoRA / PiSSA against Hugging Face PEFT, and the
PEFT adapter-format interop (lrjax.interop.peft). Skipped when torch/peft are absent."""
import copy
import json
import os

import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from torch import nn  # noqa: E402

import lrjax  # noqa: E402
from lrjax.interop import default_module_name, export_peft, import_peft, pissa_to_lora  # noqa: E402

pytestmark = pytest.mark.reference

RTOL, ATOL = 1e-5, 1e-6
R, ALPHA = 4, 8
MODULES = ["fc1", "fc2"]
VARIANTS = {
    "lora": dict(use_rslora=False, use_dora=False),
    "rslora": dict(use_rslora=True, use_dora=False),
    "dora": dict(use_rslora=False, use_dora=True),
    "dora_rslora": dict(use_rslora=True, use_dora=True),
}


@pytest.fixture(autouse=True)
def _f32():
    torch.set_default_dtype(torch.float32)
    with jax.default_matmul_precision("highest"):
        yield


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def jax_mlp(params, x):
    h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    return h @ params["fc2"]["kernel"] + params["fc2"]["bias"]


def t2n(t):
    return t.detach().cpu().numpy().astype(np.float32)


def make_base(seed=0):
    torch.manual_seed(seed)
    return MLP()


def jax_params(model, prefix=""):
    sd = {k[len(prefix):]: t2n(v) for k, v in model.state_dict().items() if k.startswith(prefix)}
    return {n: {"kernel": jnp.asarray(sd[f"{n}.weight"].T), "bias": jnp.asarray(sd[f"{n}.bias"])} for n in MODULES}


def rp_of(variant):
    v = VARIANTS[variant]
    if v["use_dora"]:
        return lrjax.DoRA(rank=R, alpha=ALPHA, rslora=v["use_rslora"])
    return (lrjax.RSLoRA if v["use_rslora"] else lrjax.LoRA)(rank=R, alpha=ALPHA)


def peft_of(base, variant, **kw):
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(MODULES), **VARIANTS.get(variant, {}), **kw)
    return get_peft_model(copy.deepcopy(base), cfg)


def layer(pm, name):
    return getattr(pm.base_model.model, name)


def randomize(pm, seed=1, magnitude=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in MODULES:
            lay = layer(pm, n)
            for p in (lay.lora_A["default"].weight, lay.lora_B["default"].weight):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if magnitude:
                m = lay.lora_magnitude_vector["default"].weight
                m.mul_(1.0 + 0.2 * torch.rand(m.shape, generator=g))


def adapters_from_peft(pm, dora):
    out = {}
    for n in MODULES:
        lay = layer(pm, n)
        f = {"a": jnp.asarray(t2n(lay.lora_A["default"].weight).T), "b": jnp.asarray(t2n(lay.lora_B["default"].weight).T)}
        if dora:
            f["m"] = jnp.asarray(t2n(lay.lora_magnitude_vector["default"].weight))
        out[f"{n}/kernel"] = f
    return out


def random_adapters(rp, params, seed=3):
    """Random non-zero factors (numpy RNG, no per-shape jit) for every leaf ``rp`` targets."""
    rng = np.random.default_rng(seed)
    flat = lrjax.tree.flatten(params)
    out = {}
    for p in rp._targets(params):
        ax = rp.leaf_axes(p, flat[p].shape)
        bs, m, n = lrjax.axes.matrix_shape(flat[p].shape, ax)
        f = {"a": 0.3 * rng.standard_normal((*bs, m, rp.rank), np.float32),
             "b": 0.3 * rng.standard_normal((*bs, rp.rank, n), np.float32)}
        if isinstance(rp, lrjax.DoRA):
            w = np.asarray(lrjax.axes.to_matrix(flat[p], ax))
            f["m"] = np.linalg.norm(w, axis=-2) * (1.0 + 0.2 * rng.random((*bs, n), np.float32))
        out[p] = {k: jnp.asarray(v, jnp.float32) for k, v in f.items()}
    return out


def xin(n=5, d=16, seed=7):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def torch_out(model, x):
    model.eval()
    with torch.no_grad():
        return t2n(model(torch.from_numpy(x)))


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def close_grad(a, b):
    """rtol 1e-5 elementwise, with an absolute floor of 1e-5 * max|b| for entries that cancel."""
    b = np.asarray(b)
    close(a, b, rtol=RTOL, atol=RTOL * float(np.max(np.abs(b))))


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_grads_match_peft(variant):
    dora = VARIANTS[variant]["use_dora"]
    base = make_base()
    params = jax_params(base)
    rp = rp_of(variant)
    pm = peft_of(base, variant)
    if dora:  # magnitude init = ||W||_c per output, PEFT vs lrjax
        _, ad0 = rp.init(jax.random.key(0), params)
        for n in MODULES:
            close(ad0[f"{n}/kernel"]["m"], t2n(layer(pm, n).lora_magnitude_vector["default"].weight), rtol=1e-6, atol=0)
    randomize(pm, magnitude=dora)
    adapters = adapters_from_peft(pm, dora)
    x = xin()
    close(jax_mlp(rp.materialize(params, adapters), x), torch_out(pm, x))

    # gradients of a random linear functional of the output
    g = np.random.default_rng(11).standard_normal((5, 8)).astype(np.float32)
    pm.train()
    pm.zero_grad()
    (pm(torch.from_numpy(x)) * torch.from_numpy(g)).sum().backward()
    grads = jax.grad(lambda ad: jnp.sum(jax_mlp(rp.materialize(params, ad), x) * g))(adapters)
    for n in MODULES:
        lay, gj = layer(pm, n), grads[f"{n}/kernel"]
        close_grad(gj["a"].T, t2n(lay.lora_A["default"].weight.grad))
        close_grad(gj["b"].T, t2n(lay.lora_B["default"].weight.grad))
        if dora:
            close_grad(gj["m"], t2n(lay.lora_magnitude_vector["default"].weight.grad))


def test_pissa_matches_peft():
    base = make_base()
    params = jax_params(base)
    pm = peft_of(base, "lora", init_lora_weights="pissa")
    rp = lrjax.PiSSA(rank=R, alpha=ALPHA, targets=[f"{n}/kernel" for n in MODULES])
    res, ad = rp.init(jax.random.key(0), params)
    delta = random_adapters(lrjax.LoRA(rank=R, alpha=ALPHA), params, seed=5)
    for n in MODULES:
        lay, p = layer(pm, n), f"{n}/kernel"
        close(res[n]["kernel"], t2n(lay.base_layer.weight).T, rtol=1e-5, atol=1e-5)
        at, bt = t2n(lay.lora_A["default"].weight).T, t2n(lay.lora_B["default"].weight).T  # [in, r], [r, out]
        a, b = np.asarray(ad[p]["a"]), np.asarray(ad[p]["b"])
        sign = np.sign(np.sum(a * at, axis=0))
        assert np.all(sign != 0)
        close(a, at * sign, rtol=1e-4, atol=1e-5)
        close(b, bt * sign[:, None], rtol=1e-4, atol=1e-5)
        # a common perturbation (after aligning PEFT's signs to lrjax's)
        ad[p] = {"a": ad[p]["a"] + delta[p]["a"], "b": ad[p]["b"] + delta[p]["b"]}
        with torch.no_grad():
            lay.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(ad[p]["a"]).T.copy()))
            lay.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(ad[p]["b"]).T.copy()))
    x = xin()
    close(jax_mlp(rp.materialize(res, ad), x), torch_out(pm, x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "dora_rslora"])
def test_peft_save_then_import(tmp_path, variant):
    dora = VARIANTS[variant]["use_dora"]
    base = make_base()
    params = jax_params(base)
    pm = peft_of(base, variant)
    randomize(pm, magnitude=dora)
    pm.save_pretrained(tmp_path)
    rp, ad = import_peft(tmp_path, params)
    assert type(rp) is type(rp_of(variant)) and rp.rank == R and rp.scale == rp_of(variant).scale
    if dora:
        assert rp.rslora == VARIANTS[variant]["use_rslora"]
    assert set(ad) == {"fc1/kernel", "fc2/kernel"}
    assert lrjax.tree.select(params, rp.targets) == ["fc1/kernel", "fc2/kernel"]
    x = xin()
    close(jax_mlp(rp.materialize(params, ad), x), torch_out(pm, x))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_then_peft_load(tmp_path, variant):
    base = make_base()
    params = jax_params(base)
    rp = rp_of(variant)
    ad = random_adapters(rp, params)
    cfg = export_peft(tmp_path / "ours", rp, ad, params=params)
    assert cfg["target_modules"] == MODULES
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    x = xin()
    close(torch_out(loaded, x), jax_mlp(rp.materialize(params, ad), x))

    # key names, shapes, dtypes and metadata equal what PEFT itself writes for the same config
    pm = peft_of(base, variant)
    pm.save_pretrained(tmp_path / "peft")
    files = {}
    for which in ("ours", "peft"):
        with safe_open(str(tmp_path / which / "adapter_model.safetensors"), framework="numpy") as fh:
            files[which] = (fh.metadata(), {k: (fh.get_tensor(k).shape, fh.get_tensor(k).dtype) for k in fh.keys()})
    assert files["ours"] == files["peft"]
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for k in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "bias", "init_lora_weights"):
        assert ours[k] == theirs[k], k
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])

    # export -> import is exact
    rp2, ad2 = import_peft(tmp_path / "ours", params)
    assert type(rp2) is type(rp) and rp2.rank == rp.rank and rp2.scale == rp.scale
    assert jax.tree_util.tree_structure(ad2) == jax.tree_util.tree_structure(ad)
    for p in ad:
        for k in ad[p]:
            assert ad2[p][k].dtype == params[p.split("/")[0]]["kernel"].dtype
            np.testing.assert_array_equal(np.asarray(ad2[p][k]), np.asarray(ad[p][k]))


class Attn(nn.Module):
    """A torch Linear(E, H*D) query and Linear(H*D, E) output, as Flax's [E,H,D] / [H,D,E] kernels."""

    def __init__(self, e=8, h=2, d=4):
        super().__init__()
        self.attn = nn.Module()
        self.attn.query = nn.Linear(e, h * d)
        self.attn.out = nn.Linear(h * d, e)

    def forward(self, x):
        return self.attn.out(torch.tanh(self.attn.query(x)))


def test_attention_kernels_round_trip(tmp_path):
    torch.manual_seed(0)
    e, h, d = 8, 2, 4
    model = Attn(e, h, d)
    sd = {k: t2n(v) for k, v in model.state_dict().items()}
    params = {"attn": {
        "query": {"kernel": jnp.asarray(sd["attn.query.weight"].T.reshape(e, h, d)),
                  "bias": jnp.asarray(sd["attn.query.bias"].reshape(h, d))},
        "out": {"kernel": jnp.asarray(sd["attn.out.weight"].T.reshape(h, d, e)), "bias": jnp.asarray(sd["attn.out.bias"])}}}

    def fwd(p, x):
        q = jnp.tanh(jnp.einsum("be,ehd->bhd", x, p["attn"]["query"]["kernel"]) + p["attn"]["query"]["bias"])
        return jnp.einsum("bhd,hde->be", q, p["attn"]["out"]["kernel"]) + p["attn"]["out"]["bias"]

    x = xin(4, e)
    close(fwd(params, x), torch_out(model, x))
    rp = lrjax.DoRA(rank=R, alpha=ALPHA)
    ad = random_adapters(rp, params)
    assert ad["attn/query/kernel"]["a"].shape == (e, R) and ad["attn/query/kernel"]["b"].shape == (R, h * d)
    export_peft(tmp_path, rp, ad, params=params)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    close(torch_out(loaded, x), fwd(rp.materialize(params, ad), x))
    rp2, ad2 = import_peft(tmp_path, params)
    close(fwd(rp2.materialize(params, ad2), x), torch_out(loaded, x))


def test_module_names_override(tmp_path):
    base = make_base()
    p0 = jax_params(base)
    params = {"Dense_0": p0["fc1"], "Dense_1": p0["fc2"]}
    rename = {"Dense_0/kernel": "fc1", "Dense_1/kernel": "fc2"}
    rp = lrjax.LoRA(rank=R, alpha=ALPHA)
    ad = random_adapters(rp, params)
    export_peft(tmp_path, rp, ad, module_names=lambda p: rename.get(p))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = xin()
    fwd = lambda p, x: jax_mlp({"fc1": p["Dense_0"], "fc2": p["Dense_1"]}, x)  # noqa: E731
    close(torch_out(loaded, x), fwd(rp.materialize(params, ad), x))
    rp2, ad2 = import_peft(tmp_path, params, module_names=rename)
    close(fwd(rp2.materialize(params, ad2), x), torch_out(loaded, x))
    with pytest.raises(ValueError, match="module_names: leaf 'Dense_2/kernel' is not in params"):
        import_peft(tmp_path, params, module_names={"Dense_2/kernel": "fc1"})
    with pytest.raises(ValueError, match="drop the 'base_model.model.' prefix"):
        import_peft(tmp_path, params, module_names=lambda p: "base_model.model." + rename.get(p, "x"))
    assert default_module_name("layers/0/kernel") == "layers.0"
    assert default_module_name("model/layers/3/mlp/up_proj/weight") == "model.layers.3.mlp.up_proj"


def test_import_selects_exact_paths_under_suffix_ambiguity(tmp_path):
    base = make_base()
    p0 = jax_params(base)
    params = {"fc1": p0["fc1"], "fc2": p0["fc2"], "enc": {"fc1": {"kernel": jnp.ones((16, 12))}}}
    rp = lrjax.LoRA(rank=R, alpha=ALPHA, targets=lambda p, leaf: p in ("fc1/kernel", "fc2/kernel"))
    ad = random_adapters(rp, params)
    export_peft(tmp_path, rp, ad)
    rp2, ad2 = import_peft(tmp_path, params)
    assert lrjax.tree.select(params, rp2.targets) == ["fc1/kernel", "fc2/kernel"]
    rp2.materialize(params, ad2)


# --------------------------------------------------------------------------- PiSSA interop
def _trained_pissa(seed=9):
    base = make_base()
    params = jax_params(base)
    rp = lrjax.PiSSA(rank=R, alpha=ALPHA)
    res, ad0 = rp.init(jax.random.key(0), params)
    delta = random_adapters(lrjax.LoRA(rank=R, alpha=ALPHA), params, seed=seed)
    ad = {p: {"a": ad0[p]["a"] + delta[p]["a"], "b": ad0[p]["b"] + delta[p]["b"]} for p in ad0}
    return base, params, rp, res, ad0, ad


def test_pissa_export_and_conversion(tmp_path):
    base, params, rp, res, ad0, ad = _trained_pissa()
    x = xin()
    want = jax_mlp(rp.materialize(res, ad), x)

    # default: the rank-2r LoRA conversion, which PEFT applies to the ORIGINAL model
    with pytest.raises(ValueError, match="init_adapters"):
        export_peft(tmp_path / "missing", rp, ad)
    cfg = export_peft(tmp_path / "default", rp, ad, init_adapters=ad0)
    assert cfg["r"] == 2 * R and cfg["lora_alpha"] == 2 * ALPHA and cfg["init_lora_weights"] is True
    close(torch_out(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "default"), x), want,
          rtol=1e-5, atol=1e-5)

    # PEFT's own PiSSA form: PEFT re-runs the SVD on the original model when it loads it
    cfg = export_peft(tmp_path / "native", rp, ad, pissa="pissa")
    assert cfg["r"] == R and cfg["init_lora_weights"] == "pissa"
    close(torch_out(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "native"), x), want,
          rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="randomized SVD"):
        export_peft(tmp_path / "x", lrjax.PiSSA(rank=R, alpha=ALPHA, n_iter=2), ad, pissa="pissa")

    # the bare factors: correct on the residual base only (warned)
    with pytest.warns(UserWarning, match="residual"):
        export_peft(tmp_path / "pissa", rp, ad, pissa="residual")
    res_torch = copy.deepcopy(base)
    with torch.no_grad():
        for n in MODULES:
            getattr(res_torch, n).weight.copy_(torch.from_numpy(np.asarray(res[n]["kernel"]).T.copy()))
    close(torch_out(PeftModel.from_pretrained(res_torch, tmp_path / "pissa"), x), want)

    # converted by hand: a rank-2r LoRA on the original weights
    rp_l, ad_l = pissa_to_lora(rp, ad, ad0)
    assert type(rp_l) is lrjax.LoRA and rp_l.rank == 2 * R and rp_l.scale == rp.scale
    close(jax_mlp(rp_l.materialize(params, ad_l), x), want, rtol=1e-5, atol=1e-5)
    export_peft(tmp_path / "lora", rp_l, ad_l)
    close(torch_out(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora"), x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="init_adapters is only used"):
        export_peft(tmp_path / "lora2", rp_l, ad_l, init_adapters=ad0)


def test_import_peft_pissa_adapter(tmp_path):
    base = make_base()
    params = jax_params(base)
    pm = peft_of(base, "lora", init_lora_weights="pissa")
    randomize(pm)  # "trained" factors on PEFT's residual base
    pm.save_pretrained(tmp_path)
    x = xin()
    loaded = torch_out(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), x)  # PEFT on the original
    close(loaded, torch_out(pm, x), rtol=1e-6, atol=1e-6)

    # default: one call gives PEFT's outputs on the ORIGINAL params (the issue: 1.48 off before)
    rp, ad = import_peft(tmp_path, params)
    assert type(rp) is lrjax.LoRA and rp.rank == 2 * R and rp.scale == ALPHA / R
    close(jax_mlp(rp.materialize(params, ad), x), loaded, rtol=1e-5, atol=1e-5)

    # residual mode: the PiSSA config, its factors and the residual base PEFT uses
    rp, ad, res = import_peft(tmp_path, params, pissa="residual")
    assert isinstance(rp, lrjax.PiSSA) and rp.rank == R
    close(jax_mlp(rp.materialize(res, ad), x), loaded, rtol=1e-5, atol=1e-5)
    for n in MODULES:
        close(res[n]["kernel"], t2n(layer(pm, n).base_layer.weight).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pissa must be one of"):
        import_peft(tmp_path, params, pissa="pissa")


# --------------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path):
    base = make_base()
    params = jax_params(base)
    pm = peft_of(base, "dora")
    randomize(pm, magnitude=True)
    pm.save_pretrained(tmp_path)
    return tmp_path, params


def _edit_config(d, **kw):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(kw)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def test_error_truncated_and_garbage(saved):
    d, params = saved
    f = d / "adapter_model.safetensors"
    good = f.read_bytes()
    f.write_bytes(good[:-10])
    with pytest.raises(ValueError, match="adapter_model.safetensors.*not a valid safetensors"):
        import_peft(d, params)
    f.write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        import_peft(d, params)
    f.write_bytes(b"this is not a safetensors file at all" * 4)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        import_peft(d, params)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        import_peft(d, params)


def test_error_config(saved):
    d, params = saved
    _edit_config(d, peft_type="IA3")
    with pytest.raises(ValueError, match="peft_type 'IA3'"):
        import_peft(d, params)
    _edit_config(d, peft_type="LORA", rank_pattern={"fc1": 8})
    with pytest.raises(ValueError, match="rank_pattern"):
        import_peft(d, params)
    _edit_config(d, rank_pattern={}, init_lora_weights="olora")
    with pytest.raises(ValueError, match="olora"):
        import_peft(d, params)
    _edit_config(d, init_lora_weights=True, lora_dropout=0.1)
    with pytest.warns(UserWarning, match="lora_dropout"):
        import_peft(d, params)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        import_peft(d, params)
    (d / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft(d, params)


def test_error_unknown_module_and_shape(saved):
    d, params = saved
    renamed = {"fc_1": params["fc1"], "fc2": params["fc2"]}
    with pytest.raises(ValueError, match=r"module 'fc1'.*Nearest paths: \['fc_1/kernel'"):
        import_peft(d, renamed)
    bad = {"fc1": {"kernel": jnp.zeros((17, 12)), "bias": params["fc1"]["bias"]}, "fc2": params["fc2"]}
    with pytest.raises(ValueError, match=r"module 'fc1' has lora_A \(4, 16\).*do not fit leaf 'fc1/kernel'"):
        import_peft(d, bad)


def test_error_dora_without_magnitude(saved):
    d, params = saved
    f = str(d / "adapter_model.safetensors")
    with safe_open(f, framework="numpy") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if "magnitude" not in k}
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="use_dora=true but modules \\['fc1', 'fc2'\\] have no lora_magnitude_vector"):
        import_peft(d, params)
    save_file({("x." + k): v for k, v in tensors.items()}, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected keys"):
        import_peft(d, params)


def test_export_rejects_stacked_and_conv(tmp_path):
    rp = lrjax.LoRA(rank=R)
    stacked = {"layers": {"kernel": np.ones((3, 16, 12), np.float32)}}
    ad = random_adapters(rp, stacked)
    with pytest.raises(ValueError, match="'layers/kernel'.*batch axes"):
        export_peft(tmp_path, rp, ad)
    with pytest.raises(ValueError, match="'layers/kernel'.*batch axes"):
        export_peft(tmp_path, rp, ad, params=stacked)
    conv = {"conv": {"kernel": np.ones((3, 3, 4, 8), np.float32)}}
    ad = random_adapters(rp, conv)
    with pytest.raises(ValueError, match="'conv/kernel'.*convolution"):
        export_peft(tmp_path, rp, ad)  # conv leaves need params= (the window shape)
    conv1d = {"Conv_0": {"kernel": np.ones((3, 4, 8), np.float32)}}  # 1-D conv: [w, in, out], no batch axes
    ad = random_adapters(rp, conv1d)
    with pytest.raises(ValueError, match="'Conv_0/kernel'.*convolution"):
        export_peft(tmp_path, rp, ad)
    assert not os.path.exists(tmp_path / "adapter_config.json")
    with pytest.raises(TypeError, match="lrjax reparam"):
        export_peft(tmp_path, object(), ad)
    with pytest.raises(ValueError, match="rank 4/4 but rp.rank = 2"):
        export_peft(tmp_path, lrjax.LoRA(rank=2), random_adapters(rp, jax_params(make_base())))
    with pytest.raises(ValueError, match="entries \\['m'\\]"):
        export_peft(tmp_path, rp, random_adapters(lrjax.DoRA(rank=R), jax_params(make_base())))


# --------------------------------------------------------------------------- file checks (issue 10)
def _tensors(d):
    with safe_open(str(d / "adapter_model.safetensors"), framework="numpy") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _write_tensors(d, tensors):
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_refused_both_ways(saved, tmp_path, bad):
    d, params = saved
    t = _tensors(d)
    key = "base_model.model.fc2.lora_B.weight"
    t[key] = t[key].copy()
    t[key][1, 2] = bad
    _write_tensors(d, t)
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.fc2\.lora_B\.weight' contains 1 NaN/Inf"):
        import_peft(d, params)
    rp = lrjax.DoRA(rank=R, alpha=ALPHA)
    ad = random_adapters(rp, params)
    ad["fc1/kernel"]["m"] = ad["fc1/kernel"]["m"].at[0].set(bad)
    with pytest.raises(ValueError, match=r"adapters\['fc1/kernel'\]\['m'\] contains 1 NaN/Inf"):
        export_peft(tmp_path / "out", rp, ad)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target_modules, exclude, match", [
    (["fc1"], None, r"modules \['fc2'\] have tensors but are not matched by target_modules"),
    ("fc1", None, r"target_modules='fc1' disagrees.*\['fc2'\]"),
    (["fc1", "fc2"], ["fc2"], r"exclude_modules=\['fc2'\] excludes modules \['fc2'\]"),
])
def test_target_modules_must_agree_with_tensors(saved, target_modules, exclude, match):
    d, params = saved
    _edit_config(d, target_modules=target_modules, exclude_modules=exclude)
    with pytest.raises(ValueError, match=match):
        import_peft(d, params)


def test_target_modules_entries_without_tensors_warn(saved):
    d, params = saved
    _edit_config(d, target_modules=["fc1", "fc2", "query"])
    with pytest.warns(UserWarning, match=r"target_modules entries \['query'\] match no module with tensors"):
        import_peft(d, params)


def test_target_modules_forms_that_agree(saved):
    d, params = saved
    for tm in (["fc2", "fc1"], "fc[12]", "all-linear"):
        _edit_config(d, target_modules=tm)
        import_peft(d, params)


def test_keys_with_adapter_name_are_accepted(saved):
    d, params = saved
    x = xin()
    rp0, ad0 = import_peft(d, params)
    want = jax_mlp(rp0.materialize(params, ad0), x)
    t = _tensors(d)

    def named(k, name="default"):
        for suf in (".lora_A.weight", ".lora_B.weight"):
            if k.endswith(suf):
                return k[: -len(".weight")] + f".{name}.weight"
        return k + f".{name}.weight" if k.endswith("lora_magnitude_vector") else k

    _write_tensors(d, {named(k): v for k, v in t.items()})
    rp, ad = import_peft(d, params)
    close(jax_mlp(rp.materialize(params, ad), x), want, rtol=0, atol=0)
    # PEFT loads the same file with the same outputs
    close(torch_out(PeftModel.from_pretrained(make_base(), d), x), want)
    _write_tensors(d, {named(k, "other"): v for k, v in t.items()})
    with pytest.raises(ValueError, match=r"adapter name 'other'.*adapter_name='other'"):
        import_peft(d, params)
    rp, ad = import_peft(d, params, adapter_name="other")
    close(jax_mlp(rp.materialize(params, ad), x), want, rtol=0, atol=0)
    _write_tensors(d, {**t, named("base_model.model.fc1.lora_A.weight"): t["base_model.model.fc1.lora_A.weight"]})
    with pytest.raises(ValueError, match="same tensor"):
        import_peft(d, params)


@pytest.mark.parametrize("which, match", [
    ("lora_A", r"lora_A\.weight has shape \(16, 4\) = \[in, r\], the transposed orientation; PEFT stores "
               r"lora_A\.weight as \[r, in\] = \(4, 16\)"),
    ("lora_B", r"lora_B\.weight has shape \(4, 12\) = \[r, out\], the transposed orientation; PEFT stores "
               r"lora_B\.weight as \[out, r\] = \(12, 4\)"),
])
def test_transposed_factor_named(saved, which, match):
    d, params = saved
    t = _tensors(d)
    key = f"base_model.model.fc1.{which}.weight"
    t[key] = np.ascontiguousarray(t[key].T)
    _write_tensors(d, t)
    with pytest.raises(ValueError, match=match):
        import_peft(d, params)


def test_wrong_rank_names_axes(saved):
    d, params = saved
    _edit_config(d, r=5)
    with pytest.raises(ValueError, match=r"lora_A\.weight \(4, 16\) \(expected \[r, in\] = \(5, 16\)\).*r=5"):
        import_peft(d, params)


# --------------------------------------------------------------------------- params_from_torch
class Tiny(nn.Module):
    """Embedding -> LayerNorm -> single-head attention (q/k/v/o Linear) -> MLP, all torch.nn."""

    def __init__(self, vocab=11, d=8, hidden=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.attn, n, nn.Linear(d, d))
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        a = self.attn
        q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
        w = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1]), dim=-1)
        h = h + a.o_proj(w @ v)
        return h + self.mlp(h)


def tiny_jax(p, ids):
    h = p["embed"]["embedding"][ids]
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / jnp.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
    lin = lambda q, x: x @ q["kernel"] + q["bias"]  # noqa: E731
    a = p["attn"]
    q, k, v = lin(a["q_proj"], h), lin(a["k_proj"], h), lin(a["v_proj"], h)
    w = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), axis=-1)
    h = h + lin(a["o_proj"], w @ v)
    return h + lin(p["mlp"]["2"], jnp.tanh(lin(p["mlp"]["0"], h)))


def test_params_from_torch_then_import_peft(tmp_path):
    from lrjax.interop import params_from_torch

    torch.manual_seed(0)
    model = Tiny()
    ids = np.array([[1, 4, 7, 2, 9], [0, 3, 3, 10, 5]])
    want = t2n(model(torch.from_numpy(ids)))
    params = params_from_torch(model)
    assert params["attn"]["q_proj"]["kernel"].shape == (8, 8) and params["embed"]["embedding"].shape == (11, 8)
    assert set(params["norm"]) == {"scale", "bias"} and params["mlp"]["0"]["kernel"].shape == (8, 12)
    close(tiny_jax(params, ids), want)
    # a plain state dict (torch tensors or numpy) converts the same way ("embed" is an embedding by name)
    for sd in (model.state_dict(), {k: t2n(v) for k, v in model.state_dict().items()}):
        p2 = params_from_torch(sd)
        assert jax.tree.structure(p2) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # a PEFT adapter on q/v/mlp.0, loaded with no glue
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "mlp.0"])
    pm = get_peft_model(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, prm in pm.named_parameters():
            if "lora_" in n:
                prm.copy_(0.3 * torch.randn(prm.shape, generator=g))
    pm.save_pretrained(tmp_path)
    pm.eval()
    with torch.no_grad():
        peft_out = t2n(pm(torch.from_numpy(ids)))
    rp, ad = import_peft(tmp_path, params)
    assert set(ad) == {"attn/q_proj/kernel", "attn/v_proj/kernel", "mlp/0/kernel"}
    close(tiny_jax(rp.materialize(params, ad), ids), peft_out)
    # the PEFT model's own state dict gives the base params back (LoRA tensors refused unless skipped)
    with pytest.raises(ValueError, match="LoRA tensors.*skip_lora=True"):
        params_from_torch(pm)
    p3 = params_from_torch(pm, skip_lora=True)
    assert jax.tree.structure(p3) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(p3), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_params_from_torch_errors():
    from lrjax.interop import params_from_torch

    with pytest.raises(TypeError, match="model_or_state_dict"):
        params_from_torch([1, 2])
    with pytest.raises(ValueError, match="no tensors"):
        params_from_torch({})
    with pytest.raises(ValueError, match=r"model_or_state_dict\['fc\.weight'\] contains NaN"):
        params_from_torch({"fc.weight": np.full((2, 3), np.nan, np.float32)})
    with pytest.raises(TypeError, match="embeddings"):
        params_from_torch({"fc.weight": np.ones((2, 3), np.float32)}, embeddings=3)
    with pytest.raises(TypeError, match="skip_lora must be True or False"):
        params_from_torch({"fc.weight": np.ones((2, 3), np.float32)}, skip_lora="yes")
    p = params_from_torch({"tok.weight": np.ones((5, 3), np.float32), "fc.weight": np.ones((2, 3), np.float32)},
                          embeddings=["tok"])
    assert p["tok"]["embedding"].shape == (5, 3) and p["fc"]["kernel"].shape == (3, 2)


def test_layers_to_transform_checked_like_peft(tmp_path):
    """A 2-layer model adapted only in layer 1: the file agrees; claiming layer 0 only does not."""
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(6, 6)) for _ in range(2)])

        def forward(self, x):
            for lay in self.layers:
                x = torch.tanh(lay(x))
            return x

    from lrjax.interop import params_from_torch

    torch.manual_seed(0)
    model = Stack()
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                         layers_to_transform=[1], layers_pattern="layers"))
    randomize_all = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, prm in pm.named_parameters():
            if "lora_" in n:
                prm.copy_(0.3 * torch.randn(prm.shape, generator=randomize_all))
    pm.save_pretrained(tmp_path)
    params = params_from_torch(model)
    rp, ad = import_peft(tmp_path, params)
    assert list(ad) == ["layers/1/0/kernel"]
    _edit_config(tmp_path, layers_to_transform=[0])
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\].*excludes modules \['layers\.1\.0'\]"):
        import_peft(tmp_path, params)
