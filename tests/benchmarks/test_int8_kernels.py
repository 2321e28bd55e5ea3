"""int8 linear on this CPU against torch's fp32 and bf16 matmul on the same shapes, in one run.

Forward: our full int8 path (per-token quantization, outlier check, torch._int_mm, scales) vs x @ W^T.
Backward: our grad_out @ dequant(W) (row blocks dequantized on the fly) vs grad_out @ W.
GOP/s count 2*M*K*N. Peak assumed, from the flags /proc/cpuinfo shows and its clock:
- amx_int8: 2048 int8 ops per cycle per core (a 16x64 by 64x16 TDPBSSD tile product, 16384 multiply-adds,
  every 16 cycles; Intel's optimization reference manual, AMX chapter);
- otherwise avx512_vnni: 256 int8 ops per cycle per core (two 512-bit VPDPBUSD per cycle, 64 multiply-adds
  each, on the two FMA ports).
The machine this was written on is a Sapphire Rapids guest that does not expose AMX (no amx_* flags), so
oneDNN runs VNNI. A peak, not a promise: turbo and memory bandwidth move real numbers.
"""
import pytest
import torch

from bench_util import median_seconds
from lora_core.kernels import cpu
from lora_core.kernels.int8_linear import int8_linear
from lora_core.kernels.reference import quantize_rowwise

pytestmark = pytest.mark.benchmark



def int8_peak() -> tuple[float, str]:
    """(ops/s, which instruction set) for this machine's cores, from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        info = f.read()
    flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
    ghz = float(next(line for line in info.splitlines() if line.startswith("cpu MHz")).split(":")[1]) / 1e3
    per_cycle, isa = (2048, "AMX int8") if "amx_int8" in flags else (256, "AVX-512 VNNI")
    return per_cycle * torch.get_num_threads() * ghz * 1e9, f"{isa}, {per_cycle} ops/cycle/core x {ghz:.1f} GHz"


SHAPES = {"SmolLM2": [(576, 576), (576, 1536), (1536, 576)], "LLaMA-7B": [(4096, 4096), (4096, 11008), (11008, 4096)]}
MS = (1, 16, 256, 1024)


def test_int8_forward_backward_table():
    torch.manual_seed(0)
    peak, how = int8_peak()
    print(f"\nint8 linear vs torch matmul, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"GOP/s (median); x bf16 = ratio to bf16 matmul; %peak = share of {peak / 1e12:.2f} TOP/s ({how})")
    header = (f"{'model':<9}{'K x N':>12}{'M':>6} | {'fp32':>7}{'bf16':>7}{'int8 fwd':>9}{'x bf16':>7}{'%peak':>7}"
              f" | {'bwd fp32':>9}{'bwd bf16':>9}{'int8 bwd':>9}{'x bf16':>7}")
    print(header)
    print("-" * len(header))
    for model, shapes in SHAPES.items():
        for K, N in shapes:
            w = torch.randn(N, K) / K ** 0.5
            wb = w.bfloat16()
            qw, sw = quantize_rowwise(w)
            for M in MS:
                x = torch.randn(M, K)
                g = torch.randn(M, N)
                xb, gb = x.bfloat16(), g.bfloat16()
                gops = 2 * M * K * N / 1e9
                t = {
                    "fp32": median_seconds(lambda: x @ w.t()),
                    "bf16": median_seconds(lambda: xb @ wb.t()),
                    "int8": median_seconds(lambda: int8_linear(x, qw, sw)),
                    "bfp32": median_seconds(lambda: g @ w),
                    "bbf16": median_seconds(lambda: gb @ wb),
                    "bint8": median_seconds(lambda: cpu.grad_input(g, qw, sw)),
                }
                r = {k: gops / v for k, v in t.items()}
                print(f"{model:<9}{f'{K}x{N}':>12}{M:>6} | {r['fp32']:>7.0f}{r['bf16']:>7.0f}{r['int8']:>9.0f}"
                      f"{r['int8'] / r['bf16']:>7.2f}{r['int8'] * 1e9 / peak:>7.1%}"
                      f" | {r['bfp32']:>9.0f}{r['bbf16']:>9.0f}{r['bint8']:>9.0f}{r['bint8'] / r['bbf16']:>7.2f}")
