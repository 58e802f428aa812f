import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Most --quick experiment runs (subprocesses) spend their time in XLA:CPU compiles of small programs, and
# LLVM's backend optimizations are most of each compile: without them a --quick run takes ~25% less CPU
# (mtlora_digits 29.3 -> 20.8 s, bench_adapters 51.5 -> 42.7 s, quickstart 52.1 -> 39.0 s). But they can
# change the last bits of results (FMA contraction etc.; tests/test_errors_optim.py's exact bfloat16 ==
# rounded float32 check fails without them), and compute-bound code runs slower (notebook 05: 63.7 ->
# 117.6 s). So THIS process (the pytest worker, where the unit tests run) initialises its XLA backend
# with the default flags first, and only then adds the flag to the environment that subprocesses inherit
# (experiment --quick runs, 8-device ES children; test_notebooks removes it again for the kernels).
# Set LRJAX_TEST_XLA_OPT=1 to give subprocesses the default optimizations too.
_O0 = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("LRJAX_TEST_CHILD_XLA_O0") == "1":     # inherited from the pytest controller process
    _flags = _flags.replace(_O0, "").strip()
os.environ["XLA_FLAGS"] = _flags
import jax  # noqa: E402

jax.devices()  # XLA reads XLA_FLAGS once per process, here
if os.environ.get("LRJAX_TEST_XLA_OPT") != "1" and _O0 not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " " + _O0).strip()
    os.environ["LRJAX_TEST_CHILD_XLA_O0"] = "1"

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("lrjax", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("lrjax")


# The long tests (notebooks, experiment smoke runs, 8-device subprocesses) first, longest first, handed
# out one at a time (pytest_configure below) so both workers share them and end together instead of
# leaving one long test running alone on one core while the other idles.
_LONG = ("04_fields", "06_adapter", "05_separable", "test_bench_adapters_quick", "test_bench_pvd_quick",
         "10_compression", "test_bench_compress_quick", "test_quickstart_quick", "03_eggroll",
         "test_bench_optim_quick", "test_bench_adapter_speed_quick", "01_lora", "test_bench_lora_quick",
         "test_bench_attention_quick", "test_es_sharding.py", "02_galore", "test_bench_es_quick", "test_mqar_quick",
         "test_hybrid_stack", "08_low_rank", "test_sharded_training.py", "11_tracks4d", "09_pretraining",
         "test_tracks4d_quick", "test_kv_cache_quick", "test_es_int8_quick", "test_lama_keyword_quick",
         "test_drrl_rank_quick")


def _rank(item) -> int:
    for i, s in enumerate(_LONG):
        if s in item.nodeid:
            return i
    # then the long tests not named above (another experiment's --quick smoke run, a new notebook), then
    # tests marked slow, then the rest
    if "_quick" in item.name or item.nodeid.startswith("tests/test_notebooks.py"):
        return len(_LONG)
    return len(_LONG) + (1 if item.get_closest_marker("slow") else 2)


def _long(item) -> bool:
    """The notebooks and the experiments' ``--quick`` smoke runs: about a third of the suite's CPU
    time, so they are marked ``slow`` and left out of the default run (``pyproject.toml`` adds
    ``-m 'not slow'``), which has to fit in 15 minutes on 2 cores. ``pytest -n auto -m slow`` runs
    them; ``-m ''`` runs everything. The multi-device and multi-process tests are not long here:
    they stay in the default run."""
    return item.nodeid.startswith("tests/test_notebooks.py") or "_quick" in item.name


@pytest.hookimpl(tryfirst=True)   # before pytest's own -m deselection sees the markers
def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if _long(item):
            item.add_marker(pytest.mark.slow)
    items.sort(key=_rank)


def pytest_configure(config):
    # pytest-xdist's default `--dist load` first gives each worker a run of CONSECUTIVE tests (a quarter of
    # its share: ~900 here), so every long test sorted first above went to worker gw0, one after another,
    # while gw1 ran the short ones. One test at a time per send is longest-first greedy scheduling over
    # both workers; the extra messages cost ~ms per test. An explicit --maxschedchunk wins.
    if getattr(config.option, "maxschedchunk", "absent") is None:
        config.option.maxschedchunk = 1
