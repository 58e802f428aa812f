"""Issue 10: every kind of bad input, swept over every public function of lrjax.interop,
lrjax.checkpoint and lrjax.data.

Each public callable is listed in ``FUNCS`` with a good call and the kind of each argument; each
kind has a list of bad values with the exception type lrjax must raise (``TypeError`` for the
wrong kind, ``ValueError`` for a wrong value). Every (function, argument, bad value) triple is one
test asserting the exception TYPE and that the message names the argument. ``test_sweep_covers
_every_public_callable`` fails when a public function is added without being listed here, and
``test_good_calls_succeed`` checks that each baseline call itself works (so the errors come from
the bad argument, not from the baseline). No test accepts "any exception".
"""
from __future__ import annotations

import inspect
import json
import os
import re

import numpy as np
import pytest

import lrjax
from lrjax import checkpoint as ck
from lrjax import data
from lrjax import interop

# --------------------------------------------------------------------------- bad values per kind
FILE, UNDER_FILE, NAN_ADAPTER = "<a regular file>", "<a path under a regular file>", "<adapter dir with NaN>"

PATH = [(3, TypeError), (3.5, TypeError), (None, TypeError), (b"ckpt", TypeError), (["ckpt"], TypeError),
        (True, TypeError), ("", ValueError), (FILE, ValueError), (UNDER_FILE, ValueError)]
OPT_PATH = [v for v in PATH if v[0] is not None]  # None is the documented default
BOOL = [("no", TypeError), ("True", TypeError), (1, TypeError), (0, TypeError), (None, TypeError),
        (1.0, TypeError)]
STEP = [("4", TypeError), (4.0, TypeError), (True, TypeError), (float("nan"), TypeError), (-1, ValueError),
        ([4], TypeError)]
COUNT0 = [("3", TypeError), (2.5, TypeError), (True, TypeError), (-1, ValueError), (float("inf"), TypeError)]
COUNT1 = COUNT0 + [(0, ValueError)]
SEED = [("abc", TypeError), (-1, ValueError), (True, TypeError), (1.5, TypeError), (None, TypeError),
        (np.array([1.5]), TypeError), (np.array([-1]), ValueError)]
MAPPING = [([1, 2], TypeError), ("abc", TypeError), (None, TypeError), (3, TypeError)]
ADAPTERS = MAPPING + [({}, TypeError), ({"fc/kernel": [1, 2]}, TypeError), ({3: {"a": 1, "b": 2}}, TypeError)]


def _ad(nan=None):
    a = np.full((3, 2), 0.1, np.float32)
    b = np.full((2, 4), 0.2, np.float32)
    if nan == "a":
        a[1, 1] = np.nan
    if nan == "b":
        b[0, 3] = np.inf
    return {"fc/kernel": {"a": a, "b": b}}


PARAMS = {"fc": {"kernel": np.ones((3, 4), np.float32), "bias": np.zeros(4, np.float32)}}
TOY = {"x": np.arange(20).reshape(10, 2), "y": np.arange(10)}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors_io")
    f = root / "a_file.txt"
    f.write_text("not a directory")
    interop.export_peft(root / "adapter", lrjax.LoRA(rank=2), _ad())
    # an adapter file holding a NaN (written by hand: export_peft refuses NaN)
    from safetensors.numpy import save_file

    nan_dir = root / "nan_adapter"
    nan_dir.mkdir()
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    (nan_dir / "adapter_config.json").write_text(json.dumps(cfg))
    a = np.full((2, 3), 0.1, np.float32)
    a[0, 0] = np.nan
    save_file({"base_model.model.fc.lora_A.weight": a,
               "base_model.model.fc.lora_B.weight": np.zeros((4, 2), np.float32)},
              str(nan_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    ck.save_state(root / "run", 0, {"w": np.ones(2, np.float32)})
    ck.save_adapters(root / "ckpt_ad", _ad())
    return {"root": root, FILE: str(f), UNDER_FILE: str(f / "sub"), NAN_ADAPTER: str(nan_dir)}


def _resolve(value, c):
    return c[value] if isinstance(value, str) and value in (FILE, UNDER_FILE, NAN_ADAPTER) else value


# --------------------------------------------------------------------------- the public API
# name -> (callable, good kwargs (from ctx), {argument: [(bad value, exception type), ...]})
def _funcs():
    lora = lrjax.LoRA(rank=2)
    pissa = lrjax.PiSSA(rank=2)
    return {
        # lrjax.interop
        "interop.export_peft": (interop.export_peft,
                                lambda c: dict(path_dir=c["root"] / "out", rp=lora, adapters=_ad()),
                                {"path_dir": PATH,
                                 "rp": [("lora", TypeError), (None, TypeError), (3, TypeError)],
                                 "adapters": ADAPTERS + [(_ad("a"), ValueError), (_ad("b"), ValueError)],
                                 "module_names": [(3, TypeError), ("fc", TypeError)],
                                 "base_model_name_or_path": [(3, TypeError), (["x"], TypeError)],
                                 "params": [([1], TypeError), ("p", TypeError), ({}, ValueError)],
                                 "init_adapters": [(_ad(), ValueError)],  # only for PiSSA
                                 "pissa": [("bad", ValueError), (3, TypeError)]}),
        "interop.export_peft[pissa]": (interop.export_peft,
                                       lambda c: dict(path_dir=c["root"] / "out_pissa", rp=pissa, adapters=_ad(),
                                                      init_adapters=_ad()),
                                       {"init_adapters": [(None, ValueError), ([1], TypeError), ({}, TypeError),
                                                          (_ad("a"), ValueError)]}),
        "interop.import_peft": (interop.import_peft,
                                lambda c: dict(path_dir=c["root"] / "adapter", params=PARAMS),
                                {"path_dir": PATH + [(NAN_ADAPTER, ValueError)],
                                 "params": MAPPING + [({}, ValueError)],
                                 "module_names": [(3, TypeError), ("fc", TypeError)],
                                 "pissa": [("bad", ValueError), ("pissa", ValueError), (3, TypeError)],
                                 "adapter_name": [(3, TypeError), (None, TypeError), ("", ValueError),
                                                  ("a.b", ValueError)]}),
        "interop.pissa_to_lora": (interop.pissa_to_lora,
                                  lambda c: dict(rp=pissa, adapters=_ad(), init_adapters=_ad()),
                                  {"rp": [("pissa", TypeError), (None, TypeError), (lrjax.DoRA(rank=2), TypeError)],
                                   "adapters": ADAPTERS + [(_ad("a"), ValueError)],
                                   "init_adapters": ADAPTERS + [(_ad("b"), ValueError)]}),
        "interop.default_module_name": (interop.default_module_name, lambda c: dict(leaf_path="fc/kernel"),
                                        {"leaf_path": [(3, TypeError), (None, TypeError), ("", ValueError)]}),
        "interop.params_from_torch": (interop.params_from_torch,
                                      lambda c: dict(model_or_state_dict={"fc.weight": np.ones((4, 3), np.float32)}),
                                      {"model_or_state_dict": MAPPING + [
                                          ({}, ValueError), ({"fc.weight": np.full((2, 2), np.nan)}, ValueError),
                                          ({"fc.weight": "w"}, TypeError), ({3: np.ones(2)}, TypeError)],
                                       "embeddings": [("bad", ValueError), (3, TypeError), ([1], TypeError)],
                                       "skip_lora": BOOL,
                                       "prefix": [(3, TypeError), (None, TypeError)]}),
        # lrjax.checkpoint
        "checkpoint.save_adapters": (ck.save_adapters,
                                     lambda c: dict(directory=c["root"] / "ad_new", adapters=_ad(), overwrite=True),
                                     {"directory": PATH, "adapters": ADAPTERS, "overwrite": BOOL,
                                      "rp": [("lora", TypeError), (3, TypeError)],
                                      "metadata": [(3, TypeError), ({"f": print}, TypeError), ("m", TypeError)]}),
        "checkpoint.load_adapters": (ck.load_adapters, lambda c: dict(directory=c["root"] / "ckpt_ad"),
                                     {"directory": PATH, "with_metadata": BOOL}),
        "checkpoint.save_state": (ck.save_state,
                                  lambda c: dict(directory=c["root"] / "run2", step=0, state={"w": np.ones(2)},
                                                 overwrite=True),
                                  {"directory": PATH, "step": STEP, "max_to_keep": COUNT1, "overwrite": BOOL,
                                   "state": [("hello", TypeError), (None, ValueError), ({"s": "x"}, TypeError)]}),
        "checkpoint.restore_state": (ck.restore_state, lambda c: dict(directory=c["root"] / "run"),
                                     {"directory": PATH, "step": STEP, "fallback": BOOL}),
        "checkpoint.latest_step": (ck.latest_step, lambda c: dict(directory=c["root"] / "run"),
                                   {"directory": PATH}),
        "checkpoint.latest_intact_step": (ck.latest_intact_step, lambda c: dict(directory=c["root"] / "run"),
                                          {"directory": PATH}),
        "checkpoint.all_steps": (ck.all_steps, lambda c: dict(directory=c["root"] / "run"), {"directory": PATH}),
        "checkpoint.reparam_to_json": (ck.reparam_to_json, lambda c: dict(rp=lora),
                                       {"rp": [("lora", TypeError), (None, TypeError), ({}, TypeError)]}),
        "checkpoint.reparam_from_json": (ck.reparam_from_json, lambda c: dict(cfg=ck.reparam_to_json(lora)),
                                         {"cfg": [("x", TypeError), (None, TypeError), ({"class": "LoRA"}, TypeError)]}),
        # lrjax.data
        "data.load": (data.load,
                      lambda c: dict(name="stdlib_chars", seq_len=8, max_chars=1000, data_dir=c["root"] / "tfds"),
                      {"name": [(3, TypeError), (None, TypeError), ("", ValueError)],
                       "split": [(3, TypeError), (1.5, TypeError), (True, TypeError), (["train", 3], TypeError),
                                 ("", ValueError), ({"train": 1}, TypeError)],
                       "data_dir": OPT_PATH,
                       "seq_len": COUNT1, "max_chars": COUNT1,
                       "config": [(3, TypeError)],
                       "bogus_option": [(1, TypeError)]}),
        "data.as_arrays": (data.as_arrays, lambda c: dict(source=TOY),
                           {"source": [(42, TypeError), (None, TypeError), ("abc", TypeError), (3.5, TypeError)],
                            "keys": [(3, TypeError), ([1], TypeError), ({"x": 1}, TypeError), (["nope"], ValueError)]}),
        "data.batches": (data.batches, lambda c: dict(data=TOY, batch_size=2),
                         {"data": [(42, TypeError), (None, TypeError), ("abc", TypeError)],
                          "batch_size": COUNT1, "epochs": COUNT0, "num_steps": COUNT0, "seed": SEED,
                          "shuffle": BOOL, "drop_remainder": BOOL}),
        "data.encode": (data.encode, lambda c: dict(text="abc"),
                        {"text": [(3, TypeError), (None, TypeError), (b"abc", TypeError)],
                         "errors": [("replace", ValueError), (3, TypeError), (None, TypeError)]}),
        "data.decode": (data.decode, lambda c: dict(ids=[1, 2]),
                        {"ids": [("abc", TypeError), (None, TypeError), (3, TypeError), ([1.5], TypeError),
                                 ([float("nan")], TypeError), ([[1]], ValueError), ([96], ValueError),
                                 ([-1], ValueError)]}),
        "data.stdlib_text": (data.stdlib_text, lambda c: dict(max_chars=100), {"max_chars": COUNT1}),
        "data.StdlibCharsConfig": (data.StdlibCharsConfig,
                                   lambda c: dict(name="t", seq_len=8, max_chars=1000),
                                   {"seq_len": COUNT1, "max_chars": COUNT1}),
    }


FUNCS = _funcs()
# Public callables not swept, with the reason.
EXEMPT = {
    "checkpoint.CheckpointCorruptError": "an exception class",
    "data.default_data_dir": "takes no arguments",
    "data.Digits": "a TFDS builder class; its constructor arguments are TFDS's (use data.load)",
    "data.StdlibChars": "a TFDS builder class; its constructor arguments are TFDS's (use data.load)",
}
MODULES = {"interop": interop, "checkpoint": ck, "data": data}

CASES = [pytest.param(fid, arg, i, id=f"{fid}-{arg}-{i}")
         for fid, (_, _, kinds) in FUNCS.items() for arg, bads in kinds.items() for i in range(len(bads))]


def _arg_pattern(fid, arg, exc_value):
    """The message must name the argument (the NaN cases name the offending tensor key/entry)."""
    if arg in ("path_dir",) and exc_value == NAN_ADAPTER:
        return r"tensor 'base_model\.model\.fc\.lora_A\.weight' contains 1 NaN/Inf"
    return re.escape(arg)


@pytest.mark.parametrize("fid, arg, i", CASES)
def test_bad_input_raises_clear_error(ctx, fid, arg, i):
    fn, good, kinds = FUNCS[fid]
    bad, exc = kinds[arg][i]
    kwargs = good(ctx)
    kwargs[arg] = _resolve(bad, ctx)
    with pytest.raises(exc, match=_arg_pattern(fid, arg, bad)) as info:
        fn(**kwargs)
    assert type(info.value) is exc or issubclass(type(info.value), exc)


@pytest.mark.parametrize("fid", list(FUNCS))
def test_good_calls_succeed(ctx, fid):
    fn, good, _ = FUNCS[fid]
    out = fn(**good(ctx))
    if inspect.isgenerator(out):
        next(out)


def test_sweep_covers_every_public_callable():
    listed = {fid.split("[")[0] for fid in FUNCS}
    missing = []
    for mname, mod in MODULES.items():
        for name in mod.__all__:
            obj = getattr(mod, name)
            if callable(obj) and f"{mname}.{name}" not in listed and f"{mname}.{name}" not in EXEMPT:
                missing.append(f"{mname}.{name}")
    assert not missing, f"public callables without a bad-input sweep: {missing}"
    # every argument of every swept function is either swept or has a documented reason to be skipped
    for fid, (fn, _, kinds) in FUNCS.items():
        params = inspect.signature(fn).parameters
        for arg in kinds:
            assert arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values()), (fid, arg)


def test_sweep_counts():
    """Per module: bad inputs tried (every one must raise lrjax's TypeError/ValueError naming the arg)."""
    counts = {}
    for fid, (_, _, kinds) in FUNCS.items():
        mod = fid.split(".")[0]
        counts[mod] = counts.get(mod, 0) + sum(len(v) for v in kinds.values())
    assert counts["interop"] >= 80 and counts["checkpoint"] >= 80 and counts["data"] >= 80, counts


def test_save_state_names_a_zero_size_leaf(tmp_path):
    import jax.numpy as jnp
    from lrjax import checkpoint
    with pytest.raises(ValueError, match=r"state leaf 'a' has zero size \(shape \(0,\)\)"):
        checkpoint.save_state(tmp_path / "ck", 0, {"a": jnp.zeros((0,)), "b": jnp.ones(2)})


def test_export_peft_names_a_transposed_factor_without_params(tmp_path):
    import jax.numpy as jnp
    import lrjax
    from lrjax.interop import export_peft
    rp = lrjax.LoRA(rank=2)
    with pytest.raises(ValueError, match=r"\['a'\] has shape \(2, 8\), the transposed orientation"):
        export_peft(tmp_path / "o", rp, {"fc/kernel": {"a": jnp.ones((2, 8)), "b": jnp.ones((2, 5))}})
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(5, 2\), the transposed orientation"):
        export_peft(tmp_path / "o", rp, {"fc/kernel": {"a": jnp.ones((8, 2)), "b": jnp.ones((5, 2))}})
