"""Execute every notebook in colab/ top to bottom (CPU), as a user would."""
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "colab").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LRJAX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The notebooks train real models (compute-bound), so their kernels get XLA's default backend
    # optimizations back (conftest turns them off for the compile-bound rest): notebook 05 took
    # 117.6 s of CPU without them, 63.7 s with them.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", ""))
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
