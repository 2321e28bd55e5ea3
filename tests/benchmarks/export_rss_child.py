"""Child process for the export-memory benchmark: exports SmolLM2 (+ adapter) and prints JSON with the
peak RSS after imports and after exporting, and the anonymous part of the resident set at the end."""
import json
import sys
import time

from bench_util import peak_mib, status_mib

base, adapter, fmt, dtype, out = sys.argv[1:6]
import torch  # noqa: E402,F401

from lora_core.export import export  # noqa: E402

before = peak_mib()
start = time.perf_counter()
export(base, adapter if adapter != "-" else None, fmt, out, dtype)
print(json.dumps({"before": before, "after": peak_mib(), "seconds": time.perf_counter() - start,
                  "anon": status_mib("RssAnon"), "file": status_mib("RssFile")}))
