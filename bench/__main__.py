"""`make bench`: every benchmark in turn."""

from __future__ import annotations

import runpy
import sys

SUITES = [
    "bench.registry",
    "bench.scope",
    "bench.delta",
    "bench.groups",
    "bench.sweep",
    "bench.watch",
    "bench.membership",
    "bench.twin",
    "bench.ingest",
    "bench.device_access",
    "bench.gateway",
    "bench.rollouts",
    "bench.observability",
    "bench.workers",
]

if __name__ == "__main__":
    for name in sys.argv[1:] or SUITES:
        print(f"\n### {name}")
        runpy.run_module(name, run_name="__main__")
