"""Which int8 path runs each product on this CPU: chosen from what the CPU can do, confirmed by measurement.

Forward products are grouped by their number of rows M (decoding: a few; prefill and training: hundreds),
each group timed at one probe M; the backward product is timed at training size. Candidates a CPU cannot
run well are never timed (torch._int_mm without VNNI/AMX is a reference loop; our C kernel needs AVX2 and
a compiler). The plan is measured once (a few seconds), cached per CPU model, torch version and thread
count in the user cache directory, rebuilt when unreadable or stale, and printed once on stderr.

LORA_CORE_INT8_PATH (or train.py / generate.py --int8-path) forces paths: "dequant" forces every product
a path can compute, "forward=gemv,backward=dequant" each direction; a path the CPU cannot run is refused.

    python -m lora_core.kernels [--recalibrate]     # the plan and the timings behind it
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import cpu, cpu_info, native

FORWARD_PATHS = ("gemv", "weight_only", "int_mm", "dequant")
BACKWARD_PATHS = ("int_mm", "dequant")
SPECIAL_PATHS = ("reference", "triton")  # forced only: the plain-torch reference, the Triton kernels
PROBE_M = (1, 4, 16, 64, 256)  # forward groups: M <= 2, <= 8, <= 32, <= 128, above (nearest probe in log2)
BACKWARD_M = 256
GEMV_MAX_M = 16  # the C kernel is a few-rows kernel: never timed (or chosen) above this group
# (K, N) probes: SmolLM2's MLP shape (per-call overheads matter) and a LLaMA-scale one (bandwidth matters)
PROBE_SHAPES = ((576, 1536), (2048, 5632))
ENV = "LORA_CORE_INT8_PATH"
CACHE_VERSION = 1


def why_unavailable(path: str) -> str | None:
    """None if this machine can run the path well, else what it lacks (for one-line errors)."""
    if path == "int_mm" and not cpu_info.has_int8_dot():
        return (f"needs int8 dot-product units (AVX-512 VNNI, AVX-VNNI or AMX) and this CPU ({cpu_info.cpu_model()}: "
                f"{cpu_info.flags_summary()}) has none, so torch._int_mm would run a reference loop")
    if path == "gemv" and not native.available():
        return native.library()[1]
    if path == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return "needs a CUDA device (Triton kernels)"
    return None


def probe_of(M: int) -> int:
    """The probe M whose group M falls in: 1..2 -> 1, 3..8 -> 4, 9..32 -> 16, 33..128 -> 64, else 256."""
    return next((p for p in PROBE_M[:-1] if M <= 2 * p), PROBE_M[-1])


def parse_spec(spec: str) -> dict[str, str]:
    """'dequant' or 'forward=gemv,backward=dequant' -> {'forward': ..., 'backward': ...}; refuses what this
    CPU cannot run, in one line."""
    known = FORWARD_PATHS + SPECIAL_PATHS
    out = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        direction, _, name = part.rpartition("=")
        directions = [direction] if direction else ["forward", "backward"]
        for d in directions:
            if d not in ("forward", "backward"):
                raise ValueError(f"int8 path {part!r}: write NAME, forward=NAME or backward=NAME")
            allowed = known if d == "forward" else BACKWARD_PATHS + SPECIAL_PATHS
            if name not in known:
                raise ValueError(f"int8 path {name!r} is unknown; choose from {', '.join(known)}")
            if name not in allowed:
                if direction:
                    raise ValueError(f"int8 path {name!r} computes forward products only; backward paths: "
                                     f"{', '.join(BACKWARD_PATHS + SPECIAL_PATHS)}")
                continue  # a forward-only path named alone: the backward stays measured
            why = why_unavailable(name)
            if why:
                raise ValueError(f"int8 path {name!r} cannot run here: it {why}; choose another with {ENV} "
                                 f"or --int8-path, or leave it unset to measure")
            out[d] = name
    if not out:
        raise ValueError(f"int8 path spec {spec!r} names no path")
    return out


@dataclass
class Plan:
    forward: dict[int, str]  # probe M -> path
    backward: str
    source: str  # how the plan came about (measured now, read from cache, forced)
    timings: dict = field(default_factory=dict)  # {"forward": {M: {path: s}}, "backward": {path: s}}
    busy: bool = False  # other work disturbed the measurement: not cached, measured again next time

    def forward_path(self, M: int) -> str:
        return self.forward[probe_of(M)]

    def groups(self) -> dict[str, str]:
        """{'M<=2': 'gemv', ..., 'M>128': 'int_mm'} (for training_args.json)."""
        labels = [f"M<={2 * p}" for p in PROBE_M[:-1]] + [f"M>{2 * PROBE_M[-2]}"]
        return {label: self.forward[p] for label, p in zip(labels, PROBE_M)}

    def summary(self) -> str:
        """'forward gemv for M<=8, int_mm above; backward int_mm'."""
        runs, prev = [], None
        for label, path in self.groups().items():
            if path != prev:
                runs.append([path, label])
                prev = path
            else:
                runs[-1][1] = label
        parts = [f"{path} for {label}" for path, label in runs[:-1]] + [f"{runs[-1][0]}" + (" above" if len(runs) > 1
                                                                                              else " at every M")]
        return f"forward {', '.join(parts)}; backward {self.backward}"

    def to_dict(self) -> dict:
        return {"forward": self.groups(), "backward": self.backward, "source": self.source,
                "cpu": cpu_info.describe()}


_lock = threading.RLock()
_plan: Plan | None = None
_forced: dict[str, str] | None = None


def force(spec: str | None):
    """Force paths for this process (--int8-path); None goes back to the environment / measurement."""
    global _forced, _plan
    with _lock:
        _forced = parse_spec(spec) if spec else None
        _plan = None


@contextlib.contextmanager
def forcing(spec: str):
    """Force paths inside a with-block (tests and benchmarks), restoring the previous plan after."""
    global _forced, _plan
    with _lock:
        saved = _forced, _plan
        force(spec)
    try:
        yield plan(quiet=True)
    finally:
        with _lock:
            _forced, _plan = saved


def expected_plan() -> Plan:
    """What the CPU's capabilities predict (what measurement found on the machines seen so far): int8 units
    -> torch._int_mm beyond a few rows; AVX2 without them -> our C kernel for few rows, dequant above."""
    small = "gemv" if why_unavailable("gemv") is None else "weight_only" if cpu_info.has("avx512_f") else "dequant"
    if why_unavailable("int_mm") is None:
        forward = {m: (small if m == 1 else "weight_only" if m <= 4 else "int_mm") for m in PROBE_M}
        return Plan(forward, "int_mm", "expected from the CPU's int8 units")
    forward = {m: (small if m <= GEMV_MAX_M else "dequant") for m in PROBE_M}
    return Plan(forward, "dequant", "expected from the CPU's flags")


def _cache_file() -> Path:
    key = f"{cpu_info.cpu_model()}|{cpu_info.flags_summary()}|{torch.__version__}|{torch.get_num_threads()}"
    return cpu_info.user_cache_dir() / f"int8-dispatch-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"


def _read_cache(path: Path) -> tuple[Plan | None, str]:
    """(plan, "") from a valid cache file, or (None, why it was not used)."""
    if not path.is_file():
        return None, ""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if (d["version"], d["cpu"], d["torch"], d["threads"]) != (CACHE_VERSION, cpu_info.cpu_model(),
                                                                  torch.__version__, torch.get_num_threads()):
            return None, "it was measured for another CPU, torch or thread count"
        forward = {int(m): d["forward"][str(m)] for m in PROBE_M}
        backward = d["backward"]
        if not all(p in FORWARD_PATHS for p in forward.values()) or backward not in BACKWARD_PATHS:
            return None, "it names unknown paths"
        if any(why_unavailable(p) for p in [*forward.values(), backward]):
            return None, "a path it names cannot run here now"
        return Plan(forward, backward, f"measured earlier, cached in {path}", d.get("timings", {})), ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"it is unreadable ({type(e).__name__})"


def _write_cache(path: Path, p: Plan):
    d = {"version": CACHE_VERSION, "cpu": cpu_info.cpu_model(), "torch": torch.__version__,
         "threads": torch.get_num_threads(), "forward": {str(m): p.forward[m] for m in PROBE_M},
         "backward": p.backward, "timings": p.timings}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(d, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        print(f"lora-core: could not cache the int8 plan in {path} ({e.strerror}); it will be measured again",
              file=sys.stderr)


BUSY_SPREAD = 1.3  # median / best time of the fp32 yardstick above which the machine was busy measuring


def _fastest_seconds(fns: dict, rounds: int = 5, budget: float = 1.0) -> tuple[dict[str, float], float]:
    """Each function's best time over interleaved rounds (every candidate once per round), so a burst of other
    work on the machine slows all candidates alike instead of deciding the winner; the minimum, because
    interference only ever adds time. Also the spread (median / best) of the first function's times."""
    for fn in fns.values():
        fn()  # warm-up: oneDNN and MKL pick their kernels on the first call
    times = {name: [] for name in fns}
    start, done = time.perf_counter(), 0
    while done < rounds or (done < 4 * rounds and time.perf_counter() - start < budget):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        done += 1
    first = sorted(next(iter(times.values())))
    return {name: min(ts) for name, ts in times.items()}, first[len(first) // 2] / first[0]


def _forward_fn(path: str, xs, weights):
    from .int8_linear import forward_product

    return lambda: [forward_product(x, qw, sw, path) for x, (_, qw, sw) in zip(xs, weights)]


def _backward_fn(path: str, gs, weights):
    from .int8_linear import backward_product

    return lambda: [backward_product(g, qw, sw, path) for g, (_, qw, sw) in zip(gs, weights)]


@torch.no_grad()
def calibrate() -> Plan:
    """Time every candidate this CPU can run on the probe shapes; the fastest per group wins."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    weights = []
    for K, N in PROBE_SHAPES:
        w = torch.randn(N, K, generator=gen) / math.sqrt(K)
        weights.append((w, *cpu.quantize_rowwise(w)))
    fwd_candidates = [p for p in FORWARD_PATHS if why_unavailable(p) is None]
    timings: dict = {"forward": {}, "backward": {}}
    forward, busy = {}, 1.0
    for M in PROBE_M:
        xs = [torch.randn(M, w.shape[1], generator=gen) for w, _, _ in weights]
        fns = {"fp32": lambda xs=xs: [x @ w.t() for x, (w, _, _) in zip(xs, weights)]}
        fns |= {p: _forward_fn(p, xs, weights) for p in fwd_candidates if not (p == "gemv" and M > GEMV_MAX_M)}
        row, spread = _fastest_seconds(fns)
        timings["forward"][M], busy = row, max(busy, spread)
        forward[M] = min((p for p in row if p != "fp32"), key=row.get)
    gs = [torch.randn(BACKWARD_M, w.shape[0], generator=gen) for w, _, _ in weights]
    fns = {"fp32": lambda: [g @ w for g, (w, _, _) in zip(gs, weights)]}
    fns |= {p: _backward_fn(p, gs, weights) for p in BACKWARD_PATHS if why_unavailable(p) is None}
    bwd, spread = _fastest_seconds(fns)
    timings["backward"], busy = bwd, max(busy, spread)
    backward = min((p for p in bwd if p != "fp32"), key=bwd.get)
    plan = Plan(forward, backward, f"measured in {time.perf_counter() - t0:.1f} s", timings)
    plan.busy = busy > BUSY_SPREAD
    return plan


def _forced_paths() -> dict[str, str]:
    """The paths --int8-path or the environment names ({} when none); call under _lock."""
    return _forced if _forced is not None else (parse_spec(os.environ[ENV]) if os.environ.get(ENV) else {})


def plan(quiet: bool = False) -> Plan:
    """This process's plan: forced paths, else the cached measurement, else a new one (printed once)."""
    global _plan
    with _lock:
        if _plan is not None:
            return _plan
        forced = _forced_paths()
        measured = None
        if set(forced) != {"forward", "backward"}:
            path = _cache_file()
            measured, why = _read_cache(path)
            if measured is None:
                if why and not quiet:
                    print(f"lora-core: int8 plan cache {path}: {why}; measuring again", file=sys.stderr)
                measured = calibrate()
                if measured.busy:  # noisy numbers would pick at random: keep what the flags predict this time
                    expected = expected_plan()
                    expected.timings = measured.timings
                    expected.source += (f"; the machine was busy while measuring ({measured.source}), so this is "
                                        f"not cached and is measured again next time (or force one with {ENV})")
                    measured = expected
                else:
                    _write_cache(path, measured)
                    measured.source += f", cached in {path}"
        forward = {m: forced["forward"] for m in PROBE_M} if "forward" in forced else measured.forward
        backward = forced.get("backward") or measured.backward
        source = (f"forced by {'--int8-path' if _forced is not None else ENV}" if forced else measured.source)
        _plan = Plan(forward, backward, source, measured.timings if measured else {})
        if not quiet:
            print(f"lora-core: int8 paths on {cpu_info.describe()}: {_plan.summary()} ({_plan.source})",
                  file=sys.stderr)
        return _plan


def forward_path(M: int) -> str:
    return plan().forward_path(M)


def forward_forced() -> bool:
    """Did --int8-path or the environment name the forward path (rather than measurement choosing it)?"""
    with _lock:
        return "forward" in _forced_paths()


def backward_path() -> str:
    return plan().backward


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Show (or measure again) which int8 path runs each product here.")
    p.add_argument("--recalibrate", action="store_true", help="measure again and replace the cached plan")
    a = p.parse_args(argv)
    if a.recalibrate:
        _cache_file().unlink(missing_ok=True)
    try:
        current = plan()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for direction, rows in current.timings.items():
        rows = rows if direction == "forward" else {BACKWARD_M: rows}
        for M, row in rows.items():
            fp32 = row["fp32"]
            cells = "  ".join(f"{k} {v * 1e3:.2f} ms ({fp32 / v:.2f}x fp32)" for k, v in row.items() if k != "fp32")
            print(f"{direction:<8} M={M:<4} fp32 {fp32 * 1e3:.2f} ms  {cells}")
    return 0

