"""Child process for the load-memory benchmark: prints JSON with peak RSS before and after loading."""
import json
import sys
import time

from bench_util import peak_mib, status_mib

base, dtype = sys.argv[1], sys.argv[2]

import lora_core  # noqa: E402

before = peak_mib()
start = time.perf_counter()
model, tok = lora_core.load(base, dtype=dtype)
seconds = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"before": before, "after": peak_mib(), "weights": weights, "seconds": seconds,
                  # after loading: anonymous memory vs pages of memory-mapped weight files (reclaimable)
                  "anon": status_mib("RssAnon"), "file": status_mib("RssFile")}))
