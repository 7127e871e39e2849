"""Where a device idled in a torch.profiler Chrome trace (benchmarks/site/sitecustomize.py's
VLMSERVE_ENGINE_TRACE): the busy fraction of the traced window, the idle gaps by size, and for the largest
gaps the host-side ranges (vlmserve functions, torch ops) that ran while the device waited.

    python benchmarks/trace_gaps.py TRACE.json [--top 10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace", type=Path)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    events = json.loads(args.trace.read_text())["traceEvents"]
    kernels = sorted(
        (e["ts"], e["ts"] + e.get("dur", 0))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )
    if not kernels:
        raise SystemExit("no device events in the trace")
    busy: list[list[float]] = []
    for start, end in kernels:
        if busy and start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    window = busy[-1][1] - busy[0][0]
    busy_us = sum(e - s for s, e in busy)
    gaps = sorted(((busy[i + 1][0] - busy[i][1], busy[i][1]) for i in range(len(busy) - 1)), reverse=True)
    print(f"window {window / 1e3:.1f} ms, device busy {busy_us / 1e3:.1f} ms ({100 * busy_us / window:.1f}%)")
    for lo, hi in ((1000, 1e12), (100, 1000), (10, 100), (0, 10)):
        sel = [g for g, _ in gaps if lo <= g < hi]
        print(f"  gaps {lo}-{hi if hi < 1e12 else 'inf'} us: {len(sel)}, {sum(sel) / 1e3:.2f} ms")
    host = [
        e
        for e in events
        if e.get("ph") == "X"
        and (e.get("cat") in ("cpu_op", "user_annotation") or "vlmserve/" in e.get("name", ""))
    ]
    for size, at in gaps[: args.top]:
        during = [
            e for e in host if e["ts"] < at + size and e["ts"] + e.get("dur", 0) > at and e.get("dur", 0) > 50
        ]
        names = sorted({e["name"].split("vlmserve/")[-1][:60] for e in during})[:16]
        print(f"gap {size / 1e3:.2f} ms at +{(at - busy[0][0]) / 1e3:.1f} ms; host meanwhile: {names}")


if __name__ == "__main__":
    main()
