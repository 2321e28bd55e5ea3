"""Helpers for the benchmarks: medians of repeated runs after a warm-up; a process's own memory figures."""
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


def status_mib(key: str) -> float:
    """A field of /proc/self/status (VmHWM, RssAnon, RssFile...) in MiB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def peak_mib() -> float:
    """VmHWM: this process's peak resident set (ru_maxrss would carry the parent's peak across fork+exec)."""
    return status_mib("VmHWM")
