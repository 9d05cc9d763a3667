"""What each sandbox protection costs: starting a sandbox and one cell's round trip, against the audit hook alone.

Usage: .venv/bin/python bench/sandbox_start.py [--starts 10] [--cells 20]
The audit-hook sandbox (a plain child Python) is the peer; protections this kernel refuses are left out.
Prints one JSON line: medians in ms and ratios over the peer's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from chatglm.sandbox import Sandbox, refusal
from chatglm.sandbox_jail import PROTECTIONS


def measure(protection: str, starts: int, cells: int) -> tuple[float, float]:
    """Median milliseconds to start a sandbox and to run `1 + 1` in it."""
    start_times, cell_times = [], []
    for _ in range(starts):
        begin = time.perf_counter()
        box = Sandbox(timeout=10, protection=protection)
        start_times.append(time.perf_counter() - begin)
        for _ in range(cells):
            begin = time.perf_counter()
            box.run("1 + 1")
            cell_times.append(time.perf_counter() - begin)
        box.close()
    return statistics.median(start_times) * 1e3, statistics.median(cell_times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--cells", type=int, default=20)
    args = parser.parse_args()
    kinds = [kind for kind in PROTECTIONS if refusal(kind) is None]  # probes run once, outside the timing
    peer_start, peer_cell = measure("audit-hook", args.starts, args.cells)
    report = {"audit-hook": {"start_ms": round(peer_start, 1), "cell_ms": round(peer_cell, 3)}}
    for kind in kinds:
        if kind != "audit-hook":
            start, cell = measure(kind, args.starts, args.cells)
            report[kind] = {"start_ms": round(start, 1), "cell_ms": round(cell, 3),
                            "start_ratio": round(start / peer_start, 2), "cell_ratio": round(cell / peer_cell, 2)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
