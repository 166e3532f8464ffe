"""Shared benchmark plumbing: interleaved A/B timing with medians, and the machine's load."""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def interleaved(runs, rounds):
    """Run each named callable once per round, alternating, so a busy neighbour hits all of them alike.

    Returns {name: {"median_s", "times_s", "load"}} and the last result of each callable.
    """
    times = {name: [] for name in runs}
    loads = {name: [] for name in runs}
    results = {}
    for _ in range(rounds):
        for name, fn in runs.items():
            loads[name].append(load_average())
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    summary = {name: {"median_s": statistics.median(ts), "times_s": [round(t, 4) for t in ts],
                      "load_1min": loads[name]} for name, ts in times.items()}
    return summary, results
