"""Our C kernels (int8_gemv.c; decode_step.c for lora_core.native_decode), compiled on first use with the
machine's C compiler and called via ctypes.

Built once per source, compiler and flags into the user cache directory (written to a temporary name,
renamed when complete). Unavailable, with the reason, off x86-64, without AVX2/FMA or without a compiler:
the dispatcher then chooses among torch's own paths.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from . import cpu_info

SOURCE = Path(__file__).with_name("int8_gemv.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fPIC", "-shared"]  # no contraction: reference rounding


def _torch_uses_gnu_openmp() -> bool:
    """Is torch's libgomp loaded in this process? Then our -fopenmp build shares that runtime (same soname)
    instead of starting a second thread pool that would fight torch's for the cores."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str, flags: list[str], source: Path, out: Path):
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        r = subprocess.run([cc, *flags, str(source), "-o", str(tmp)], capture_output=True, text=True, timeout=300)
        if r.returncode:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{cc} could not build {source.name}: {last}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@functools.cache
def load(source: Path) -> tuple[ctypes.CDLL | None, str]:
    """(the library built from one of our C sources, "") or (None, why it is unavailable)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not (cpu_info.has("avx2") and cpu_info.has("fma3")):
        return None, "needs an x86-64 CPU with AVX2 and FMA"
    cc = _compiler()
    if cc is None:
        return None, "needs a C compiler (cc, gcc or clang on PATH, or $CC); install one, e.g. apt install gcc"
    flags = FLAGS + (["-fopenmp"] if _torch_uses_gnu_openmp() else [])
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the C compiler {cc} does not run ({e})"
    key = hashlib.sha256(source.read_bytes() + " ".join([cc, version, *flags]).encode()).hexdigest()[:16]
    for folder in (cpu_info.user_cache_dir() / "native", Path(tempfile.gettempdir()) / f"lora-core-{os.getuid()}"):
        so = folder / f"{source.stem}-{key}.so"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not so.is_file():
                _build(cc, flags, source, so)
            return ctypes.CDLL(str(so)), ""
        except RuntimeError as e:
            return None, str(e)
        except (OSError, subprocess.SubprocessError):
            continue  # an unwritable cache directory, or a damaged build: try the next place
    return None, f"could not build or load {source.name} in {cpu_info.user_cache_dir() / 'native'}"


@functools.lru_cache(maxsize=1)
def library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded int8_gemv library, "") or (None, why it is unavailable)."""
    lib, why = load(SOURCE)
    if lib is None:
        return None, why
    lib.int8_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.int8_gemv.restype = None
    lib.quantize_rows.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    lib.quantize_rows.restype = None
    lib.scale_int32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
    lib.scale_int32.restype = None
    return lib, ""


ISA_AVX2, ISA_VNNI = 1, 2  # decode_step.c's dot-product kernels


def dot_isa() -> int:
    """The kernel this CPU runs: AVX-512 VNNI where present, else AVX2 (every library here needs AVX2)."""
    vnni = all(cpu_info.has(f) for f in ("avx512_vnni", "avx512_bw", "avx512_vl"))
    return ISA_VNNI if vnni else ISA_AVX2


@functools.lru_cache(maxsize=1)
def decode_library() -> tuple[ctypes.CDLL | None, str]:
    """(the decode_step.c library: the int8/int4 decode step and the int4 product, "") or (None, why not)."""
    lib, why = load(SOURCE.with_name("decode_step.c"))
    if lib is None:
        return None, why
    lib.decode_step.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_float] * 3
    lib.decode_step.restype = ctypes.c_int
    lib.int4_product.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3
                                 + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int64])
    lib.int4_product.restype = ctypes.c_int
    return lib, ""


def available() -> bool:
    return library()[0] is not None


def gemv(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """x (M, K) float @ (qw (N, K) int8 * sw (N,)[:, None])^T -> (M, N) fp32, weights widened in registers."""
    lib, why = library()
    if lib is None:
        raise RuntimeError(f"the gemv int8 kernel is unavailable: {why}")
    M, K = x.shape
    N, K2 = qw.shape
    if K != K2 or qw.dtype != torch.int8 or sw.shape != (N,) or x.device.type != "cpu":
        raise ValueError(f"gemv needs CPU x (M, K), int8 qw (N, K) and sw (N,); got {tuple(x.shape)}, "
                         f"{qw.dtype}{tuple(qw.shape)}, {tuple(sw.shape)} on {x.device}")
    x = x.float().contiguous()
    qw, sw = qw.contiguous(), sw.float().contiguous()
    y = torch.empty((M, N), dtype=torch.float32)
    lib.int8_gemv(x.data_ptr(), qw.data_ptr(), sw.data_ptr(), y.data_ptr(), M, K, N)
    return y


def quantize_rows(x: torch.Tensor, eps: float, col_scale: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) fp32 on the CPU (times col_scale (K,) per column, if given) -> (q int8 (M, K), scale fp32
    (M,)), kernels.reference's rounding, one pass for the row absmax and one to quantize."""
    lib = library()[0]
    x = x.contiguous()
    M, K = x.shape
    cs = None if col_scale is None else col_scale.float().contiguous()
    q = torch.empty((M, K), dtype=torch.int8)
    scale = torch.empty(M, dtype=torch.float32)
    lib.quantize_rows(x.data_ptr(), None if cs is None else cs.data_ptr(), q.data_ptr(), scale.data_ptr(), M, K, eps)
    return q, scale


def scale_int32(acc: torch.Tensor, sa: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """acc (M, N) int32 -> acc * sa[:, None] * sw[None, :] fp32 in one pass (torch: three)."""
    lib = library()[0]
    acc, sa, sw = acc.contiguous(), sa.float().contiguous(), sw.float().contiguous()
    y = torch.empty(acc.shape, dtype=torch.float32)
    lib.scale_int32(acc.data_ptr(), sa.data_ptr(), sw.data_ptr(), y.data_ptr(), *acc.shape)
    return y
