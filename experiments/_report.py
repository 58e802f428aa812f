"""What every experiment script records and writes: the run record (command, device, config, load
average) and the three outputs ``<out>/<name>.{json,md,png}`` with a reproduce line."""
from __future__ import annotations

import json
import os
import sys
import time

from lrjax.benchmark import describe, device_info


def start(script_file: str, argv, args) -> dict:
    """Create ``args.out`` and return the run record of ``python <script> <argv>``."""
    os.makedirs(args.out, exist_ok=True)
    cmd = [os.path.relpath(script_file)] + (sys.argv[1:] if argv is None else list(argv))
    out = {"command": "python " + " ".join(cmd), "device": device_info(), "config": vars(args),
           "load_avg_before": list(os.getloadavg())}
    out["_t0"] = time.perf_counter()
    return out


def finish(out: dict, args, name: str, tables, plot=None) -> dict:
    """Close the record (``load_avg_after``, ``total_s``), print ``tables(out)`` and write
    ``<out>/<name>.json``, ``<name>.md`` (the tables plus how to reproduce them) and, given
    ``plot(out, path)``, ``<name>.png``."""
    out["load_avg_after"] = list(os.getloadavg())
    out["total_s"] = time.perf_counter() - out.pop("_t0")
    md = tables(out)
    print(md)
    print(f"reproduce: {out['command']}")
    base = os.path.join(args.out, name)
    with open(base + ".json", "w") as f:
        json.dump(out, f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(md + f"\n\nReproduce: `{out['command']}` ({out['total_s']:.0f} s on {describe(out['device'])}); "
                f"load average before/after {out['load_avg_before']} / {out['load_avg_after']}.\n")
    if plot is not None:
        plot(out, base + ".png")
    print(f"wrote {base}.{{json,md{',png' if plot is not None else ''}}} ({out['total_s']:.0f}s)")
    return out
