"""Timing helpers shared by the experiment scripts (``experiments/``).

``time_round_robin`` interleaves the methods under test repeat by repeat, so load from other
processes, thermal drift or a noisy neighbour hits every method alike, and each call must block
until its result is ready (wrap jitted functions with :func:`blocking`).
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

__all__ = ["blocking", "time_round_robin", "summarize"]


def blocking(fn: Callable, *args) -> Callable[[], object]:
    """A zero-argument call of ``fn(*args)`` that waits with ``jax.block_until_ready``."""
    return lambda: jax.block_until_ready(fn(*args))


def time_round_robin(calls: dict, repeats: int, warmup: int = 2, desc: str = "", progress: bool = True):
    """Call each ``calls[name]()`` ``warmup`` times (compilation included), then ``repeats`` times
    interleaved across names; returns ``{name: [milliseconds, ...]}``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
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
    """Median, quartiles and IQR (ms) of a list of timings."""
    q25, q50, q75 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(q50), "p25_ms": float(q25), "p75_ms": float(q75),
            "iqr_ms": float(q75 - q25), "times_ms": [float(x) for x in ms]}
