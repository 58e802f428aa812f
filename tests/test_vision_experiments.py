"""Smoke runs (``--quick``) of the two CPU vision experiments: DSCLoRA x2 SR and LoLA-SpecViT."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _run(script, out, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--quick", "--out", str(out),
                           "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_dsclora_quick(tmp_path):
    out = tmp_path / "dsclora"
    proc = _run("dsclora_sr.py", out, tmp_path)
    assert "| model |" in proc.stdout
    res = json.loads((out / "dsclora.json").read_text())
    assert (out / "dsclora.png").stat().st_size > 0 and (out / "dsclora.md").stat().st_size > 0
    r = res["results"]
    for k in ("teacher", "bilinear", "students", "inference", "ad_gain_db"):
        assert k in r, k
    assert set(r["students"]) == {"without_ad", "with_ad"}
    for s in r["students"].values():
        assert s["trainable_params"] > 0
        for run in s["seeds"]:
            # merged model: the teacher's architecture and size, and the adapted model's outputs
            assert run["merged_params"] == r["teacher"]["params"]
            assert run["same_structure_as_teacher"] is True
            assert run["merged_vs_unmerged_max_abs_diff"] < 1e-5
            assert np.isfinite(run["psnr_db"]) and 0 < run["ssim"] <= 1
            hist = np.asarray(run["loss_history"])
            assert np.all(np.isfinite(hist))
    # L_AD (last column of the loss history) is computed only in the with_ad runs
    assert r["students"]["without_ad"]["lambda_ad"] == 0 and r["students"]["with_ad"]["lambda_ad"] > 0
    assert all(h[-1] == 0 for s in r["students"]["without_ad"]["seeds"] for h in s["loss_history"])
    for s in r["students"]["with_ad"]["seeds"]:
        # step 0: B = 0, the student is the teacher, so L_AD (and L1(S, T)) are exactly 0; later > 0
        assert s["loss_history"][0][-1] == 0 and s["loss_history"][0][-2] == 0
        assert s["loss_history"][-1][-1] > 0
    inf = r["inference"]
    assert inf["params"]["merged_student"] == inf["params"]["teacher"]
    assert inf["merged_same_hlo_as_teacher"] is True
    assert set(inf["methods"]) == {"teacher", "merged_student", "unmerged_adapted_student"}
    assert all(m["median_ms"] > 0 for m in inf["methods"].values())


def test_lola_specvit_quick(tmp_path):
    out = tmp_path / "lola"
    proc = _run("lola_specvit.py", out, tmp_path)
    assert "| method |" in proc.stdout
    res = json.loads((out / "lola_specvit.json").read_text())
    assert (out / "lola_specvit.png").stat().st_size > 0
    r = res["results"]
    assert set(r["methods"]) == {"full_cosine", "lora_cosine", "lora_sgdr", "enhanced_sgdr", "head_only"}
    for m, v in r["methods"].items():
        assert set(v["fractions"]) == {"0.01", "0.05"}
        for f in v["fractions"].values():
            for k in ("oa", "aa", "kappa"):
                assert np.isfinite(f[k]) and -1 <= f[k] <= 1, (m, k)
    n = {m: v["trainable_params"] for m, v in r["methods"].items()}
    # LoRA trains fewer parameters than full fine-tuning; the gated option's full-rank G, R make it larger
    assert n["head_only"] < n["lora_sgdr"] == n["lora_cosine"] < n["full_cosine"] < n["enhanced_sgdr"]
    eb = r["enhanced_param_breakdown"]
    assert eb["gate"] == eb["residual"] > eb["lora_a"]
    for mc in r["merge_check"].values():
        assert mc["max_abs_logit_diff"] < 1e-4 and mc["merged_params"] == mc["base_params"]
    assert r["factored_stats"]["fallback"] == [] and r["factored_stats"]["factored"] > 0
    assert set(r["timing"]["inference"]) == {"base_forward", "merged_lora_forward", "enhanced_forward"}
