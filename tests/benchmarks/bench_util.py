"""Timing helper for the benchmarks: medians of repeated runs after a warm-up."""
import time


def median_seconds(fn, min_runs: int = 5, budget: float = 1.0) -> float:
    fn()  # warm-up (oneDNN picks and caches its kernels on the first call)
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]
