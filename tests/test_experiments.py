"""Smoke tests of the experiment scripts (``--quick``) and unit tests of the CharTransformer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax.models import ADAPTER_TARGETS, CharTransformer, apply_fn, loss_fn, split
from lrjax.reparam import FactoredStats

ROOT = Path(__file__).resolve().parents[1]


def _run_script(script, out, tmp_path, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--quick",
                           "--out", str(out), "--no-progress", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_quickstart_quick(tmp_path):
    out = tmp_path / "res"
    proc = _run_script("quickstart.py", out, tmp_path)
    assert "| method |" in proc.stdout
    res = json.loads((out / "quickstart.json").read_text())
    assert (out / "quickstart_loss.png").stat().st_size > 0
    for k in ("command", "device", "config", "corpus", "model", "pretrain", "methods",
              "merge_check", "factored_stats", "table_markdown"):
        assert k in res, k
    assert set(res["methods"]) == {"full", "lora", "dora", "lora_ga", "nola", "galore", "eggroll", "galore_lora",
                                   "eggroll_lora"}
    assert res["merge_check"]["eggroll_lora"]["base_unchanged"] is True
    for m, r in res["methods"].items():
        for k in ("trainable_params", "trainable_pct", "median_step_ms", "initial_eval_loss",
                  "final_eval_loss", "history"):
            assert k in r, (m, k)
        assert np.isfinite(r["final_eval_loss"]) and r["median_step_ms"] > 0
    assert res["methods"]["lora"]["trainable_params"] < res["methods"]["full"]["trainable_params"]
    for m in ("lora", "dora", "lora_ga", "nola", "galore_lora"):
        assert res["merge_check"][m]["abs_diff"] < 1e-4
        st = res["factored_stats"][m]
        assert st["fallback"] == [] and st["factored"] == st["adapted_leaves"] > 0


def test_bench_lora_quick(tmp_path):
    out = tmp_path / "res"
    proc = _run_script("bench_lora.py", out, tmp_path)
    assert "reproduce:" in proc.stdout
    res = json.loads((out / "bench_lora.json").read_text())
    assert (out / "bench_lora.png").stat().st_size > 0
    for k in ("command", "device", "config", "workloads", "torch", "table_markdown"):
        assert k in res, k
    for k in ("platform", "device_kind", "cpu_count", "jax"):
        assert k in res["device"], k
    assert set(res["workloads"]) == {"mlp", "char_transformer"}
    for wk, w in res["workloads"].items():
        assert set(w["methods"]) == {"full", "lora_factored", "lora_materialized", "dora_factored", "limit"}
        for m, r in w["methods"].items():
            for k in ("median_ms", "iqr_ms", "ratio_to_full", "ratio_to_limit", "memory", "flops",
                      "trainable_params"):
                assert k in r, (wk, m, k)
            assert r["median_ms"] > 0 and r["memory"]["total_bytes"] > 0
        assert set(w["inference"]["methods"]) == {"base_forward", "merged_lora_forward",
                                                  "factored_lora_forward"}
        assert w["inference"]["merged_vs_factored_max_abs_diff"] < 1e-4
        for m in ("lora", "dora"):
            assert w["factored_stats"][m]["fallback"] == []
    t = res["torch"]
    assert "available" in t
    if t["available"]:
        assert set(t["methods"]) == {"torch_full", "peft_lora", "peft_dora", "torch_limit"}
        assert all(r["median_ms"] > 0 for r in t["methods"].values())
    else:
        assert t["note"]


# ----------------------------------------------------------------------- CharTransformer
@pytest.fixture(scope="module")
def small_model():
    model = CharTransformer(96, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16,
                            rngs=nnx.Rngs(0))
    return split(model)


def test_output_shape_and_loss(small_model):
    _, state, apply = small_model
    ids = jax.random.randint(jax.random.key(0), (3, 16), 0, 96)
    logits = apply(state, ids)
    assert logits.shape == (3, 16, 96) and logits.dtype == jnp.float32
    # near-uniform predictions at init: loss close to log(96)
    assert abs(float(loss_fn(logits, ids)) - np.log(96)) < 0.1
    with pytest.raises(ValueError, match="max_len"):
        apply(state, jnp.zeros((1, 17), jnp.int32))


def test_causal_masking(small_model):
    _, state, apply = small_model
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 96)
    t = 9
    changed = ids.at[:, t:].set((ids[:, t:] + 7) % 96)
    a, b = apply(state, ids), apply(state, changed)
    np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert float(jnp.max(jnp.abs(a[:, t:] - b[:, t:]))) > 1e-4


@pytest.mark.parametrize("cls", [lrjax.LoRA, lrjax.DoRA])
def test_factored_equals_materialized(small_model, cls):
    _, state, apply = small_model
    rp = cls(rank=4, alpha=8, targets=ADAPTER_TARGETS)
    base, ad = rp.init(jax.random.key(2), state)
    assert len(ad) == 12 and all("kernel" in p and ("attn" in p or "mlp" in p) for p in ad)
    # make B non-zero so the adapter changes the model
    ad = {p: {k: v + 0.05 * jax.random.normal(jax.random.key(i), v.shape) for k, v in f.items()}
          for i, (p, f) in enumerate(ad.items())}
    ids = jax.random.randint(jax.random.key(3), (2, 16), 0, 96)
    st = FactoredStats()
    g = lrjax.factored(apply, rp, stats=st)
    y_f = jax.jit(g)(base, ad, ids)
    y_m = apply(rp.materialize(base, ad), ids)
    assert st.factored == 12 and st.fallback == []
    np.testing.assert_allclose(y_f, y_m, atol=2e-5)
    assert float(jnp.max(jnp.abs(y_m - apply(state, ids)))) > 1e-3
    np.testing.assert_allclose(apply(rp.merge(base, ad), ids), y_m, atol=2e-5)
    # gradients w.r.t. the adapters agree as well
    tgt = jnp.roll(ids, -1, axis=1)
    gf = jax.grad(lambda a: loss_fn(g(base, a, ids), tgt))(ad)
    gm = jax.grad(lambda a: loss_fn(apply(rp.materialize(base, a), ids), tgt))(ad)
    for x, y in zip(jax.tree.leaves(gf), jax.tree.leaves(gm)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)


def test_apply_fn_matches_module(small_model):
    graphdef, state, apply = small_model
    ids = jnp.arange(16)[None] % 96
    np.testing.assert_allclose(apply_fn(graphdef)(state, ids), nnx.merge(graphdef, state)(ids))


def test_bench_adapter_speed_quick(tmp_path):
    out = tmp_path / "res"
    proc = _run_script("bench_adapter_speed.py", out, tmp_path, "--no-torch")
    assert "| method |" in proc.stdout
    res = json.loads((out / "bench_adapter_speed.json").read_text())
    ms = res["steps"]["methods"]
    assert {"lora", "nola", "lora_pro", "lora_pro_full", "limit"} <= set(ms)
    assert all(r["median_ms"] > 0 and r["ratio_to_lora"] > 0 for r in ms.values())
    assert set(res["init"]["methods"]) == {"lora_ga", "lora_ga_rsvd", "lora_ga_peft_semantics", "lora_sb"}
    assert (out / "bench_adapter_speed.png").stat().st_size > 0
