"""PEFT export of the adapter zoo (issue 11): LoRA-GA as the rank-2r LoRA on the original weights;
LoRA-SB/XS, NOLA, Block-LoRA and CoDyRA as their exact equivalent LoRA. Each file is loaded by
PEFT on a torch model with the original weights and must reproduce lrjax's outputs."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax import reparam as R
from lrjax.interop import export_peft


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _params():
    k = jax.random.split(jax.random.key(0), 2)
    return {"fc1": {"kernel": jax.random.normal(k[0], (8, 6)) / 3, "bias": jnp.linspace(-1, 1, 6)},
            "fc2": {"kernel": jax.random.normal(k[1], (6, 5)) / 3, "bias": jnp.zeros(5)}}


def _apply(p, x):
    return jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"]


class Net(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 6), torch.nn.Linear(6, 5)
        with torch.no_grad():
            for n in ("fc1", "fc2"):
                getattr(self, n).weight.copy_(torch.from_numpy(np.asarray(p[n]["kernel"]).T.copy()))
                getattr(self, n).bias.copy_(torch.from_numpy(np.asarray(p[n]["bias"]).copy()))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _grads(p):
    x = _randn(5, (16, 8))
    y = _randn(6, (16, 5))
    return R.estimate_grads(lambda q, b: jnp.mean((_apply(q, b[0]) - b[1]) ** 2), p, [(x, y)], "kernel")


def _trained(rp, ad):
    """A deterministic 'trained' adapter: every trainable factor moved off its init."""
    tr, fr = rp.split(ad)
    tr = jax.tree.map(lambda v: v + 0.05 * jnp.cos(jnp.arange(v.size, dtype=v.dtype).reshape(v.shape)), tr)
    return rp.join(tr, fr)


CASES = {
    "LoRASB": lambda: R.LoRASB(rank=2, alpha=4),
    "LoRAXS": lambda: R.LoRAXS(rank=2),
    "NOLA": lambda: R.NOLA(rank=2, alpha=4, num_basis=6),
    "NOLA-vit": lambda: R.NOLA(rank=2, num_basis=6, convention="vit"),
    "BlockLoRA": lambda: R.BlockLoRA(rank=2, alpha=4, blocks=2),
    "CoDyRA": lambda: R.CoDyRA(rank=3),
    "LoRAGA": lambda: R.LoRAGA(rank=2, alpha=4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_exports_load_in_peft_with_lrjax_outputs(name, tmp_path):
    p = _params()
    rp = CASES[name]()
    kw = {"grads": _grads(p)} if rp.needs_grads else {}
    base, ad0 = rp.init(jax.random.key(1), p, **kw)
    ad = _trained(rp, ad0)
    if name == "CoDyRA":  # a pruned rank: per-leaf ranks differ, export pads with zeros
        ad = {k: {**v, "g": v["g"].at[..., 0].set(0.0)} for k, v in ad.items()}
        ad = rp.prune({**ad, "fc2/kernel": {**ad["fc2/kernel"], "g": ad["fc2/kernel"]["g"].at[..., 1].set(0.0)}})
    x = np.array(_randn(2, (4, 8)))
    want = np.asarray(_apply(rp.materialize(base, ad), x))
    extra = {"init_adapters": ad0} if rp.rewrites_base else {}
    cfg = export_peft(tmp_path / "ad", rp, ad, params=p, **extra)
    assert cfg["peft_type"] == "LORA"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(Net(p), str(tmp_path / "ad"))
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_zoo_export_needs_params_and_loraga_needs_init_adapters(tmp_path):
    p = _params()
    rp = R.NOLA(rank=2, num_basis=6)
    base, ad = rp.init(jax.random.key(1), p)
    with pytest.raises(ValueError, match="params: exporting a NOLA adapter"):
        export_peft(tmp_path / "a", rp, ad)
    ga = R.LoRAGA(rank=2)
    base, ad = ga.init(jax.random.key(1), p, grads=_grads(p))
    with pytest.raises(ValueError, match="init_adapters: exporting a LoRAGA adapter"):
        export_peft(tmp_path / "b", ga, ad)
    with pytest.raises(ValueError, match="pissa='pissa' writes PEFT's own PiSSA form; LoRAGA"):
        export_peft(tmp_path / "c", ga, ad, pissa="pissa")
    with pytest.raises(TypeError, match="ConvLoRA"):
        export_peft(tmp_path / "d", R.ConvLoRA(rank=1), ad)
