"""Child process for the load-memory benchmark: prints JSON with peak RSS before and after loading."""
import json
import sys
import time


def status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def peak_mib() -> float:
    """VmHWM: this process's peak resident set (ru_maxrss would carry the parent's peak across fork+exec)."""
    return status_mib("VmHWM")


base, dtype = sys.argv[1], sys.argv[2]
import torch  # noqa: E402

import lora_core  # noqa: E402

before = peak_mib()
start = time.perf_counter()
model, tok = lora_core.load(base, dtype=dtype)
seconds = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"before": before, "after": peak_mib(), "weights": weights, "seconds": seconds,
                  # after loading: anonymous memory vs pages of memory-mapped weight files (reclaimable)
                  "anon": status_mib("RssAnon"), "file": status_mib("RssFile")}))
