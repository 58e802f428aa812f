"""Timing helpers shared by the experiment scripts (``experiments/``).

``time_round_robin`` interleaves the methods under test repeat by repeat, so load from other
processes, thermal drift or a noisy neighbour hits every method alike, and each call must block
until its result is ready (wrap jitted functions with :func:`blocking`).
"""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from lrjax._validation import check_bool, check_int

__all__ = ["blocking", "time_round_robin", "summarize", "usable_cpus", "device_info", "describe"]


def blocking(fn: Callable, *args) -> Callable[[], object]:
    """A zero-argument call of ``fn(*args)`` that waits with ``jax.block_until_ready``."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    return lambda: jax.block_until_ready(fn(*args))


def time_round_robin(calls: dict, repeats: int, warmup: int = 2, desc: str = "", progress: bool = True):
    """Call each ``calls[name]()`` ``warmup`` times (compilation included), then ``repeats`` times
    interleaved across names; returns ``{name: [milliseconds, ...]}``."""
    if not isinstance(calls, dict) or not calls:
        raise TypeError(f"calls must be a non-empty dict {{name: zero-argument callable}}, got "
                        f"{type(calls).__name__}" + (" (empty)" if isinstance(calls, dict) else ""))
    for k, f in calls.items():
        if not callable(f):
            raise TypeError(f"calls[{k!r}] must be a zero-argument callable, got {type(f).__name__}")
    repeats = check_int(repeats, "repeats", low=1)
    warmup = check_int(warmup, "warmup", low=0)
    if not isinstance(desc, str):
        raise TypeError(f"desc must be a str, got {type(desc).__name__}")
    progress = check_bool(progress, "progress")
    for f in calls.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in calls}
    for _ in tqdm(range(repeats), desc=desc, leave=False, disable=not progress, file=sys.stdout,
                  dynamic_ncols=True):
        for k, f in calls.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return times


def summarize(ms) -> dict:
    """Median, quartiles and IQR (ms) of a non-empty list of finite, non-negative timings."""
    if isinstance(ms, (str, bytes, dict)) or not isinstance(ms, (list, tuple, np.ndarray)):
        raise TypeError(f"ms must be a list of timings in milliseconds, got {type(ms).__name__}")
    try:
        arr = np.asarray(ms, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"ms must be a list of numbers (milliseconds), got {ms!r:.80}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"ms must be a non-empty 1-D list of timings, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("ms must contain finite, non-negative timings (got NaN, Inf or a negative value)")
    q25, q50, q75 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(q50), "p25_ms": float(q25), "p75_ms": float(q75),
            "iqr_ms": float(q75 - q25), "times_ms": [float(x) for x in ms]}


def usable_cpus() -> int:
    """CPUs this process may run on (``sched_getaffinity``; ``os.cpu_count()`` where unsupported)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def device_info() -> dict:
    """What a benchmark ran on: device, CPU counts, the load average at the time, versions."""
    import flax
    import jaxlib
    import optax
    d = jax.devices()[0]
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(), "load_avg": load,
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "python": platform.python_version(), "machine": platform.machine()}


def describe(info: dict) -> str:
    """One line: ``platform / kind, N CPUs, load L, jax V`` of a :func:`device_info` dict."""
    if not isinstance(info, dict):
        raise TypeError(f"info must be the dict returned by device_info(), got {type(info).__name__}")
    missing = [k for k in ("platform", "device_kind", "usable_cpus", "jax") if k not in info]
    if missing:
        raise ValueError(f"info is missing keys {missing}; pass the dict returned by device_info()")
    load = "" if info.get("load_avg") is None else f", load {info['load_avg'][0]}"
    return (f"{info['platform']} / {info['device_kind']}, {info['usable_cpus']} CPUs{load}, "
            f"jax {info['jax']}")
