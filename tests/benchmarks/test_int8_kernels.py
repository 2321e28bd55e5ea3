"""Every int8 path against fp32 matmul on this CPU, on SmolLM2 and LLaMA-7B shapes, in one run, and the path
the dispatcher chose for each product.

Forward: x (M, K) @ dequant(W)^T through each path (activation quantization, outlier check and scales
included); backward: grad_out (M, N) @ dequant(W). fp32 is the yardstick: it is what a user would run
instead (bf16 matmul runs several times slower than fp32 on CPUs without AMX, so bf16 is no yardstick).
Cells are GOP/s (2*M*K*N / median seconds) and the ratio to fp32 on the same shape; paths this CPU cannot
run well are not timed (torch._int_mm without VNNI/AMX is a reference loop) and shown as "-".

    pytest -m benchmark -s tests/benchmarks/test_int8_kernels.py
"""
import pytest
import torch

from lora_core.kernels import cpu_info, dispatch
from lora_core.kernels.int8_linear import backward_product, forward_product
from lora_core.kernels.reference import quantize_rowwise

from bench_util import median_seconds

pytestmark = pytest.mark.benchmark

SHAPES = {"SmolLM2": [(576, 576), (576, 1536), (1536, 576)], "LLaMA-7B": [(4096, 4096), (4096, 11008), (11008, 4096)]}
MS = (1, 4, 16, 64, 256, 1024)
BACKWARD = ("int_mm", "dequant")


def test_int8_paths_against_fp32():
    torch.manual_seed(0)
    dispatch._cache_file().unlink(missing_ok=True)  # the dispatcher's choice measured now, beside this table
    dispatch.force(None)
    plan = dispatch.plan()
    forward = [p for p in dispatch.FORWARD_PATHS]
    usable = {p: dispatch.why_unavailable(p) is None for p in (*forward, *BACKWARD)}
    print(f"\nint8 products on {cpu_info.describe()}")
    print(f"dispatcher: {plan.summary()} ({plan.source})")
    print("GOP/s, median; (x) = ratio to fp32 on the same shape; * = the path the dispatcher runs; - = not timed")
    head = f"{'model':<9}{'K x N':>11}{'M':>6} |{'fp32':>7} " + "".join(f"{p:>19}" for p in forward)
    head += f" |{'bwd fp32':>9} " + "".join(f"{'bwd ' + p:>19}" for p in BACKWARD)
    print(head)
    print("-" * len(head))
    for model, shapes in SHAPES.items():
        for K, N in shapes:
            w = torch.randn(N, K) / K ** 0.5
            qw, sw = quantize_rowwise(w)
            for M in MS:
                x, g = torch.randn(M, K), torch.randn(M, N)
                gops = 2 * M * K * N / 1e9
                fp32 = gops / median_seconds(lambda: x @ w.t())
                cells = []
                for p in forward:
                    if not usable[p] or (p == "gemv" and M > 64):
                        cells.append(f"{'-':>19}")
                        continue
                    r = gops / median_seconds(lambda: forward_product(x, qw, sw, p))
                    mark = "*" if plan.forward_path(M) == p else " "
                    cells.append(f"{r:>8.0f} ({r / fp32:>5.2f}x){mark}")
                bfp32 = gops / median_seconds(lambda: g @ w)
                bcells = []
                for p in BACKWARD:
                    if not usable[p] or M < 16:  # training backward products have hundreds of rows
                        bcells.append(f"{'-':>19}")
                        continue
                    r = gops / median_seconds(lambda: backward_product(g, qw, sw, p))
                    mark = "*" if plan.backward == p else " "
                    bcells.append(f"{r:>8.0f} ({r / bfp32:>5.2f}x){mark}")
                print(f"{model:<9}{f'{K}x{N}':>11}{M:>6} |{fp32:>7.0f} " + "".join(cells)
                      + f" |{bfp32:>9.0f} " + "".join(bcells))
