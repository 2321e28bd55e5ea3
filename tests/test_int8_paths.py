"""Every int8 path, forced on whatever machine runs the tests, against kernels/reference.py; the dispatcher's
plan, its cache and its refusals. A path this machine would never choose is still checked here."""
import json
import math

import pytest
import torch

from lora_core.kernels import cpu, cpu_info, dispatch, native
from lora_core.kernels import reference as ref
from lora_core.kernels.int8_linear import backward_product, forward_product, int8_linear
from lora_core.quant import Int8Linear

SHAPES = [(1, 37, 50), (5, 123, 77), (123, 64, 129), (16, 96, 33), (2, 576, 40)]  # (M, K, N): odd sizes
WEIGHT_ONLY = ("gemv", "weight_only", "dequant")  # activations stay in float
ACTIVATION_QUANTIZED = ("int_mm", "triton", "reference")
AVX2_ONLY = {"avx2": True, "fma3": True, "avx512_f": False, "avx512_vnni": False, "avx_vnni": False,
             "amx_int8": False}


def data(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2
    x[0, 0] = 0.0
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    return x, w, torch.randn(M, N, generator=g)


def runnable(path):
    """Skip (with the reason) a path this machine cannot run. torch._int_mm is tested where the dispatcher may
    choose it (VNNI/AMX): with oneDNN capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) its s8 x s8 products come out
    wrong by up to a quarter of their size, int16 saturation in the AVX2 kernel, one more reason the
    dispatcher never uses it without int8 dot-product units."""
    if path == "triton":
        pytest.importorskip("triton")
    if path == "gemv" and not native.available():
        pytest.skip(f"gemv: {native.library()[1]}")
    if path == "int_mm" and dispatch.why_unavailable("int_mm"):
        pytest.skip(f"int_mm: {dispatch.why_unavailable('int_mm')}")
    return path


@pytest.mark.parametrize("M,K", [(1, 1), (3, 7), (5, 8), (4, 9), (123, 64), (2, 576), (7, 1537)])
def test_native_quantize_and_scale_equal_torch_bit_for_bit(M, K):
    """Our fused C passes around torch._int_mm against kernels.reference (quantize) and torch (scales)."""
    if not native.available():
        pytest.skip(f"native kernels: {native.library()[1]}")
    x = torch.randn(M, K) * torch.logspace(-3, 2, M)[:, None]  # rows of very different sizes
    x[0, :] = 0.0  # an all-zero row: absmax floored at EPS
    if K > 3:
        x[-1, K // 2] = 1e4  # an outlier that owns its row's scale
    q, s = native.quantize_rows(x, ref.EPS)
    q_ref, s_ref = ref.quantize_rowwise(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    cs = torch.rand(K) * 3
    q, s = native.quantize_rows(x, ref.EPS, col_scale=cs)
    q_ref, s_ref = ref.quantize_rowwise(x * cs[None, :])
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    acc = torch.randint(-2**20, 2**20, (M, 33), dtype=torch.int32)
    sa, sw = torch.rand(M) + 1e-3, torch.rand(33) + 1e-3
    assert torch.equal(native.scale_int32(acc, sa, sw), acc.float().mul_(sa[:, None]).mul_(sw[None, :]))


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_quantize_error_bound(M, K, N):
    x, _, _ = data(M, K, N)
    q, s = ref.quantize_rowwise(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (ref.dequantize_rowwise(q, s) - x).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()  # at most half a step of the row's scale
    zeros = ref.quantize_rowwise(torch.zeros(3, K))
    assert torch.equal(zeros[0], torch.zeros(3, K, dtype=torch.int8))  # no NaN for an all-zero row
    assert torch.equal(cpu.quantize_rowwise(x)[0], q)  # the CPU path rounds exactly as the reference


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("path", WEIGHT_ONLY)
def test_weight_only_paths_equal_the_dequantized_product(path, M, K, N):
    runnable(path)
    x, w, _ = data(M, K, N)
    qw, sw = ref.quantize_rowwise(w)
    want = x @ ref.dequantize_rowwise(qw, sw).t()
    got = forward_product(x, qw, sw, path)  # weight_only falls back to dequant where K % 32 != 0
    tol = 1e-2 if path == "weight_only" and K % 32 == 0 else 1e-5  # bf16 activations in torch's kernel
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("path", ACTIVATION_QUANTIZED)
def test_activation_quantized_paths_equal_the_reference(path, M, K, N):
    runnable(path)
    x, w, _ = data(M, K, N)
    qw, sw = ref.quantize_rowwise(w)
    qx, sx = ref.quantize_rowwise(x)
    want = ref.int8_matmul(qx, sx, qw, sw)
    torch.testing.assert_close(forward_product(x, qw, sw, path, threshold=0.0), want, rtol=1e-5, atol=1e-5)
    # with outliers split off, still the exact int8 product of the rest plus the float product of the outliers
    x[:, 3] = 40.0
    out = (x.abs() > 6.0).any(0)  # feature columns with any |x| above the threshold
    qx, sx = ref.quantize_rowwise(x * ~out)
    want = ref.int8_matmul(qx, sx, qw, sw) + x[:, out] @ ref.dequantize_rowwise(qw, sw)[:, out].t()
    torch.testing.assert_close(forward_product(x, qw, sw, path, threshold=6.0), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("path", ["dequant", "triton", "reference"])
def test_exact_backward_paths_equal_the_reference(path, M, K, N):
    runnable(path)
    _, w, g = data(M, K, N)
    qw, sw = ref.quantize_rowwise(w)
    torch.testing.assert_close(backward_product(g, qw, sw, path), ref.grad_input(g, qw, sw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,K,N", SHAPES + [(256, 576, 1536)])
def test_int8_backward_error_is_bounded(M, K, N):
    """grad_out quantized per row: about 1% relative error on training-sized products, never more than 2%."""
    runnable("int_mm")
    _, w, g = data(M, K, N)
    qw, sw = ref.quantize_rowwise(w)
    exact = ref.grad_input(g, qw, sw)
    got = backward_product(g, qw, sw, "int_mm")
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < 0.02, rel
    # the error per row is at most half a quantization step of that row, summed over the weights it meets
    qg, sg = ref.quantize_rowwise(g * sw)
    bound = (sg[:, None] / 2) * qw.abs().float().sum(0)[None, :]
    assert ((got - exact).abs() <= bound + 1e-5).all()


def test_dequant_spans_several_row_blocks(monkeypatch):
    monkeypatch.setattr(cpu, "BLOCK_ELEMENTS", 7 * 11)  # 7 rows of K=11 per block, the last one short
    x, w, g = data(4, 11, 30)
    qw, sw = ref.quantize_rowwise(w)
    torch.testing.assert_close(forward_product(x, qw, sw, "dequant"), x @ ref.dequantize_rowwise(qw, sw).t(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu.grad_input(g, qw, sw), ref.grad_input(g, qw, sw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["dequant", "gemv", "weight_only", "int_mm", "reference", "triton",
                                  "forward=gemv,backward=dequant"])
@pytest.mark.parametrize("M", [1, 5, 123])
def test_forced_paths_through_the_layer_with_gradients(spec, M):
    """Through Int8Linear and autograd with the path forced: output close to the float layer on the int8
    weight, input gradient close to (or, exact paths, equal to) the float one."""
    for part in spec.split(","):
        why = dispatch.why_unavailable(runnable(part.rpartition("=")[2]))
        if why:
            pytest.skip(f"{spec}: {why}")
    x, w, _ = data(M, 64, 48, seed=M)
    layer = Int8Linear.from_float(w)
    with dispatch.forcing(spec) as plan:
        xq = x.view(1, M, 64).clone().requires_grad_()
        y = layer(xq)
        gy = torch.randn_like(y)
        y.backward(gy)
    xf = x.view(1, M, 64).clone().requires_grad_()
    yf = xf @ layer.dequantize().t()
    yf.backward(gy)
    rel = ((y - yf).norm() / yf.norm()).item()
    assert rel < (0.02 if plan.forward_path(M) in ACTIVATION_QUANTIZED else 5e-3), rel
    grad_rel = ((xq.grad - xf.grad).norm() / xf.grad.norm()).item()
    assert grad_rel < (0.02 if plan.backward == "int_mm" else 1e-5), grad_rel
    assert not layer.qweight.requires_grad


def test_probe_groups():
    assert [dispatch.probe_of(m) for m in (1, 2, 3, 8, 9, 32, 33, 128, 129, 5000)] == [1, 1, 4, 4, 16, 16, 64, 64,
                                                                                         256, 256]


def test_plan_is_measured_cached_and_reread(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CORE_CACHE", str(tmp_path))
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "_plan", None)
    monkeypatch.setattr(dispatch, "_forced", None)
    calls = []
    real, timer = dispatch.calibrate, dispatch._fastest_seconds
    monkeypatch.setattr(dispatch, "calibrate", lambda: calls.append(1) or real())
    monkeypatch.setattr(dispatch, "_fastest_seconds", lambda fns: (timer(fns)[0], 1.0))  # as on a quiet machine
    first = dispatch.plan(quiet=True)
    assert calls == [1] and set(first.forward) == set(dispatch.PROBE_M)
    assert all(why is None for why in map(dispatch.why_unavailable, [*first.forward.values(), first.backward]))
    saved = json.loads(next(tmp_path.glob("int8-dispatch-*.json")).read_text())
    assert saved["cpu"] == cpu_info.cpu_model() and saved["torch"] == torch.__version__
    monkeypatch.setattr(dispatch, "_plan", None)
    again = dispatch.plan(quiet=True)
    assert calls == [1] and again.forward == first.forward and "cached" in again.source


@pytest.mark.parametrize("damage", ["{not json", '{"version": 1}', "stale torch", "unknown path"])
def test_damaged_or_stale_cache_is_measured_again(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("LORA_CORE_CACHE", str(tmp_path))
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "_forced", None)
    good = dispatch.Plan({m: "dequant" for m in dispatch.PROBE_M}, "dequant", "measured")
    dispatch._write_cache(dispatch._cache_file(), good)
    f = dispatch._cache_file()
    d = json.loads(f.read_text())
    if damage == "stale torch":
        d["torch"] = "1.0.0"
        f.write_text(json.dumps(d))
    elif damage == "unknown path":
        d["forward"]["1"] = "magic"
        f.write_text(json.dumps(d))
    else:
        f.write_text(damage)
    fresh = dispatch.Plan({m: "gemv" if native.available() and m <= 16 else "dequant" for m in dispatch.PROBE_M},
                          "dequant", "measured now")
    monkeypatch.setattr(dispatch, "calibrate", lambda: fresh)
    monkeypatch.setattr(dispatch, "_plan", None)
    got = dispatch.plan()
    assert got.forward == fresh.forward  # never the damaged file's content
    assert "measuring again" in capsys.readouterr().err
    assert json.loads(f.read_text())["forward"] == {str(m): p for m, p in fresh.forward.items()}  # rewritten


def test_environment_forces_paths(monkeypatch, capsys):
    monkeypatch.setenv(dispatch.ENV, "dequant")
    monkeypatch.setattr(dispatch, "_plan", None)
    monkeypatch.setattr(dispatch, "_forced", None)
    p = dispatch.plan()
    assert set(p.forward.values()) == {"dequant"} and p.backward == "dequant"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"forced by {dispatch.ENV}" in err and "forward dequant at every M" in err
    assert dispatch.plan() is p and capsys.readouterr().err == ""  # said once
    monkeypatch.setattr(dispatch, "_plan", None)


def test_forcing_what_the_cpu_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_info, "capabilities", lambda: AVX2_ONLY)
    with pytest.raises(ValueError) as e:
        dispatch.parse_spec("int_mm")
    msg = str(e.value)
    assert "\n" not in msg and "'int_mm' cannot run here" in msg and "VNNI" in msg and "AVX2, FMA" in msg
    monkeypatch.setattr(native, "library", lambda: (None, "needs a C compiler (cc, gcc or clang on PATH)"))
    with pytest.raises(ValueError, match=r"'gemv' cannot run here: it needs a C compiler"):
        dispatch.parse_spec("forward=gemv")
    with pytest.raises(ValueError, match="computes forward products only"):
        dispatch.parse_spec("backward=gemv")
    with pytest.raises(ValueError, match="unknown; choose from"):
        dispatch.parse_spec("fast")
    assert dispatch.parse_spec("dequant") == {"forward": "dequant", "backward": "dequant"}
    assert dispatch.parse_spec("weight_only") == {"forward": "weight_only"}  # backward stays measured


def test_an_avx2_machine_never_times_or_picks_int_mm(monkeypatch):
    """On a CPU without VNNI/AMX the calibration leaves torch._int_mm out (a reference loop there)."""
    monkeypatch.setattr(cpu_info, "capabilities", lambda: AVX2_ONLY)
    monkeypatch.setattr(dispatch, "PROBE_SHAPES", ((64, 96),))
    p = dispatch.calibrate()
    assert "int_mm" not in p.forward.values() and p.backward == "dequant"
    assert all("int_mm" not in row for row in p.timings["forward"].values())


def test_int8_linear_outside_autograd_equals_inside():
    x, w, _ = data(6, 64, 40)
    layer = Int8Linear.from_float(w)
    with torch.no_grad():
        a = int8_linear(x, layer.qweight, layer.scale)
    b = int8_linear(x.clone().requires_grad_(), layer.qweight, layer.scale)
    assert torch.equal(a, b.detach())


def test_a_busy_machine_keeps_the_expected_plan_and_caches_nothing(tmp_path, monkeypatch, capsys):
    """Noisy timings would pick at random: when the fp32 yardstick itself wobbles, the flags decide."""
    monkeypatch.setenv("LORA_CORE_CACHE", str(tmp_path))
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "_forced", None)
    monkeypatch.setattr(dispatch, "_plan", None)
    monkeypatch.setattr(dispatch, "PROBE_SHAPES", ((64, 96),))
    real = dispatch._fastest_seconds
    monkeypatch.setattr(dispatch, "_fastest_seconds", lambda fns: (real(fns)[0], 2.0))
    got = dispatch.plan()
    assert got.forward == dispatch.expected_plan().forward and got.backward == dispatch.expected_plan().backward
    assert "busy" in capsys.readouterr().err and not list(tmp_path.glob("int8-dispatch-*"))
    monkeypatch.setattr(dispatch, "_plan", None)
