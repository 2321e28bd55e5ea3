"""Child process: our train.py on the same records, settings and step count as alpaca_hf_child.py; prints one
JSON line: seconds per step, real (non-pad) tokens, losses, peak RSS."""
import json
import random
import sys
import tempfile
from pathlib import Path

data_file, cutoff, targets, steps, base_dtype, *extra = sys.argv[1:]
BATCH, SEED = 128, 42

from lora_core.cli.train import main  # noqa: E402

rows = json.loads(open(data_file, encoding="utf-8").read())
random.Random(SEED).shuffle(rows)
work = Path(tempfile.mkdtemp())
(work / "data.json").write_text(json.dumps(rows[:BATCH * int(steps)], ensure_ascii=False), encoding="utf-8")
code = main(["--data", str(work / "data.json"), "--output", str(work / "out"), "--base-dtype", base_dtype,
             "--cutoff-len", cutoff, "--targets", targets, "--max-steps", steps, "--batch-size", str(BATCH),
             "--micro-batch-size", "4", "--lr", "3e-4", "--warmup-steps", "0", "--schedule", "constant",
             "--val-size", "0", "--save-every", "1000", "--seed", str(SEED), *extra])
assert code == 0
metrics = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
with open("/proc/self/status") as f:
    peak = int(next(x for x in f if x.startswith("VmHWM:")).split()[1]) / 2**20
print(json.dumps({"seconds": [m["seconds"] for m in metrics], "tokens": [m["tokens"] for m in metrics],
                  "losses": [m["loss"] for m in metrics], "peak_gib": peak}))
