"""Benchmark compute_delta against jsondiff and DeepDiff.

Run from the repository root: ``.venv/bin/python -m bench.delta``.

For each document size it checks that all three libraries find the same
added/removed/changed paths, then reports the median time per diff. It exits
non-zero if the answers disagree; missed speed goals are printed, not
failed, because timings on a shared machine are noisy.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import timeit
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import jsondiff
from deepdiff import DeepDiff

from server.twin.delta import JSONObject, compute_delta, escape_segment

SEED = 7386
JSONDIFF_GOAL = 5.0
DEEPDIFF_GOAL = 100.0

Entry = tuple[str, str]  # (kind, path) with kind in added/removed/changed

_WORDS = [
    "telemetry",
    "interval",
    "sensor",
    "network",
    "wifi",
    "mqtt",
    "broker",
    "firmware",
    "channel",
    "gain",
    "threshold",
    "schedule",
    "display",
    "led",
    "power",
    "battery",
]


@dataclass(frozen=True)
class Case:
    name: str
    desired: JSONObject
    reported: JSONObject


# --- documents -----------------------------------------------------------------


def _scalar(rng: random.Random) -> Any:
    pick = rng.random()
    if pick < 0.35:
        return rng.randint(0, 10_000)
    if pick < 0.55:
        return round(rng.uniform(-100, 100), 3)
    if pick < 0.8:
        return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 12)))
    if pick < 0.95:
        return rng.random() < 0.5
    return None


def _value(rng: random.Random, depth: int, max_depth: int) -> Any:
    pick = rng.random()
    if depth < max_depth and pick < 0.25:
        return _object(rng, rng.randint(2, 6), depth + 1, max_depth)
    if pick > 0.92:
        return [_scalar(rng) for _ in range(rng.randint(1, 5))]
    return _scalar(rng)


def _object(rng: random.Random, width: int, depth: int, max_depth: int) -> JSONObject:
    return {f"{rng.choice(_WORDS)}_{i}": _value(rng, depth, max_depth) for i in range(width)}


def make_document(rng: random.Random, size: int, max_depth: int) -> JSONObject:
    """Grow a document section by section until it serialises to ~size bytes."""
    doc: JSONObject = {}
    index = 0
    while len(json.dumps(doc)) < size:
        if max_depth == 0:
            doc[f"{rng.choice(_WORDS)}_{index}"] = _value(rng, 0, 0)
        else:
            doc[f"{rng.choice(_WORDS)}_{index}"] = _object(rng, rng.randint(3, 8), 1, max_depth)
        index += 1
    return doc


def _different(rng: random.Random, value: Any) -> Any:
    # Never bool<->number or int<->float-with-same-value: jsondiff and DeepDiff
    # disagree with our rules there by design, which is not what is measured.
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + rng.randint(1, 50)
    if isinstance(value, str):
        return value + "_v2"
    if isinstance(value, list):
        return [*value, _scalar(rng)] if rng.random() < 0.5 else [*value[1:], "x"]
    if isinstance(value, dict):
        return "replaced-object"
    return "was-null"


def make_reported(rng: random.Random, desired: JSONObject, share: float) -> JSONObject:
    """Copy desired, then change, drop or add about ``share`` of the entries at every depth."""
    reported: JSONObject = {}
    for key, value in desired.items():
        pick = rng.random()
        if pick < share * 0.25:
            continue  # device lacks it: "added"
        if isinstance(value, dict) and pick > share:
            reported[key] = make_reported(rng, value, share)
        elif pick < share:
            reported[key] = _different(rng, value)
        else:
            reported[key] = json.loads(json.dumps(value))
        if rng.random() < share * 0.25:
            reported[f"legacy_{key}"] = _scalar(rng)  # device-only: "removed"
    return reported


def make_cases() -> list[Case]:
    rng = random.Random(SEED)
    cases = []
    for name, size, depth in (
        ("1 KB flat", 1024, 0),
        ("8 KB nested", 8192, 4),
        ("32 KB nested", 32768, 5),
    ):
        desired = make_document(rng, size, depth)
        cases.append(Case(name, desired, make_reported(rng, desired, 0.12)))
    return cases


# --- answers in a common form --------------------------------------------------


def ours_entries(case: Case) -> set[Entry]:
    delta = compute_delta(case.desired, case.reported)
    return (
        {("added", p) for p in delta.added}
        | {("removed", p) for p in delta.removed}
        | {("changed", p) for p in delta.changed}
    )


def _join(prefix: str, key: str) -> str:
    return prefix + escape_segment(key)


def jsondiff_entries(diff: Any, desired: Any, reported: Any, prefix: str = "") -> Iterator[Entry]:
    """Read jsondiff's explicit syntax; arrays become one changed entry, as in ours."""
    for key in diff.get(jsondiff.insert, {}):
        yield "added", _join(prefix, key)
    for key in diff.get(jsondiff.delete, []):
        yield "removed", _join(prefix, key)
    for key, sub in diff.get(jsondiff.update, {}).items():
        new, old = desired[key], reported[key]
        if isinstance(new, dict) and isinstance(old, dict):
            yield from jsondiff_entries(sub, new, old, _join(prefix, key) + "/")
        else:
            yield "changed", _join(prefix, key)


_DEEPDIFF_KINDS = {
    "dictionary_item_added": "added",
    "dictionary_item_removed": "removed",
    "values_changed": "changed",
    "type_changes": "changed",
}


def deepdiff_entries(diff: DeepDiff) -> set[Entry]:
    entries = set()
    for report, levels in diff.tree.items():
        for level in levels:
            steps = level.path(output_format="list")
            # DeepDiff goes into arrays; ours treats an array as one value.
            cut = next((i for i, s in enumerate(steps) if isinstance(s, int)), None)
            if cut is not None:
                entries.add(("changed", "/".join(escape_segment(s) for s in steps[:cut])))
                continue
            kind = _DEEPDIFF_KINDS.get(report)
            if kind is None:
                raise AssertionError(f"unexpected DeepDiff report {report!r}")
            entries.add((kind, "/".join(escape_segment(s) for s in steps)))
    return entries


# --- timing --------------------------------------------------------------------


def median_us(contenders: dict[str, Callable[[], object]], rounds: int = 21) -> dict[str, float]:
    """Median microseconds per call of each contender.

    Contenders take turns within every round, so load from other processes
    on the machine hits all of them alike and the ratios stay meaningful.
    """
    timers = {name: timeit.Timer(fn) for name, fn in contenders.items()}
    # autorange aims at 0.2 s per sample; a tenth of that keeps the run short.
    numbers = {name: max(1, timer.autorange()[0] // 10) for name, timer in timers.items()}
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer.timeit(numbers[name]) / numbers[name] * 1e6)
    return {name: statistics.median(runs) for name, runs in samples.items()}


def disagreements(case: Case, differ: jsondiff.JsonDiffer) -> list[str]:
    d, r = case.desired, case.reported
    ours = ours_entries(case)
    theirs = {
        "jsondiff": set(jsondiff_entries(differ.diff(r, d), d, r)),
        "DeepDiff": deepdiff_entries(DeepDiff(r, d)),
    }
    return [
        f"{case.name}: {lib} disagrees; only ours: {sorted(ours - entries)}, "
        f"only {lib}: {sorted(entries - ours)}"
        for lib, entries in theirs.items()
        if entries != ours
    ]


def main() -> int:
    differ = jsondiff.JsonDiffer(syntax="explicit")
    cases = make_cases()
    # Timing answers that differ would be meaningless, so check first.
    failures = [failure for case in cases for failure in disagreements(case, differ)]
    if failures:
        for failure in failures:
            print("MISMATCH", failure, file=sys.stderr)
        return 1

    header = (
        f"{'document':<13}{'bytes':>7}{'entries':>8}{'ours us':>10}{'jsondiff us':>13}"
        f"{'DeepDiff us':>13}{'x jsondiff':>12}{'x DeepDiff':>12}"
    )
    print(header)
    print("-" * len(header))
    goals_met = True
    for case in cases:
        d, r = case.desired, case.reported
        us = median_us(
            {
                "ours": partial(compute_delta, d, r),
                "jsondiff": partial(differ.diff, r, d),
                "DeepDiff": partial(DeepDiff, r, d),
            }
        )
        jd_ratio, dd_ratio = us["jsondiff"] / us["ours"], us["DeepDiff"] / us["ours"]
        goals_met &= jd_ratio >= JSONDIFF_GOAL and dd_ratio >= DEEPDIFF_GOAL
        print(
            f"{case.name:<13}{len(json.dumps(d)):>7}{len(ours_entries(case)):>8}"
            f"{us['ours']:>10.1f}{us['jsondiff']:>13.1f}{us['DeepDiff']:>13.1f}"
            f"{jd_ratio:>11.1f}x{dd_ratio:>11.1f}x"
        )
    print(
        f"goals (>= {JSONDIFF_GOAL:g}x jsondiff, >= {DEEPDIFF_GOAL:g}x DeepDiff): "
        f"{'met' if goals_met else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
