"""GPU check of the 2D-RoPE kernels and the PyTorch baseline (run through scripts/gpu_check.sh).

Needs a CUDA GPU with a CUDA build of torch and its triton; transformers for the model baseline. No internet.

  1. correctness   the Triton kernel (JIT) on CUDA: every mvt_kernels/selftest.py case
  2. aot           the ahead-of-time PTX the TensorRT plugin embeds, loaded through the CUDA driver as TensorRT
                   loads it (cuModuleLoadData) and launched with exactly the arguments and launch parameters the
                   plugin computes; skipped with the reason where nothing here can load PTX (--ptx-loader)
  3. bench         Triton vs the eager torch rotation at RICE-L-560 (S=1601, H=16, D=64) and
                   bigG-448 (S=1025, H=16, D=104), batch 32, fp16: GB/s against the GPU's memory peak
                   targets: >= 70% of peak (no verdict for a GPU whose peak is unknown) and >= 3x the eager rotation
  4. models        images/s of randomly initialised RICE-L-560 and bigG-448, batch 32, SDPA, bf16 and
                   fp16 (the baseline an engine must beat), plus the same with RoPE through the
                   mvt::rope2d op backed by the Triton kernel

Prints PASS/FAIL/SKIP lines and the figures, writes them to --json. Exit status: 0 no FAIL (a SKIP never fails),
1 a FAIL, 2 cannot start (no CUDA GPU visible to torch).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
# The one script that runs where the project is not installed (a bare GPU machine: torch and triton only;
# gpu_check.sh sets PYTHONPATH too): the checkout's packages come from here.
sys.path.insert(0, str(ROOT))

from export.core.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, run_cli  # noqa: E402  (standard library only)
from export.core.gpus import gpu_peaks  # noqa: E402

GB = 1e9
RESULTS: dict = {"checks": [], "figures": {}}
# attention shapes (S, H, D) of the two 2D-RoPE zoo models; GFLOPs per image from shared/FACTS.md
SHAPES = {"rice-l-560": (1601, 16, 64), "mlcd-bigg-448": (1025, 16, 104)}
GFLOPS_PER_IMAGE = {"rice-l-560": 1221.0, "mlcd-bigg-448": 4110.0}
# PTX loaders, in order of preference (--ptx-loader auto). TensorRT loads the plugin's PTX with the CUDA driver
# (cuModuleLoadData, then cuLaunchKernel); so does this check, through the first of these that is here:
#   driver         libcuda.so.1 through ctypes, the library every CUDA torch loads (torch/cuda/_utils.py opens it
#                  the same way): nothing to install
#   cuda-bindings  cuda-python's cuda.bindings.driver (a dependency of torch's CUDA 13 wheels)
#   cupy           cupy.RawModule (a cupy-cudaNNx for the CUDA major of the driver)
PTX_LOADERS = ("driver", "cuda-bindings", "cupy")
# cuFuncSetAttribute's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (cuda.h), needed above 48 KiB of dynamic shared
# memory; Triton's own launcher sets it the same way (third_party/nvidia/backend/driver.c, loadBinary).
MAX_DYNAMIC_SHARED = 8
SHARED_DEFAULT_LIMIT = 48 * 1024


def report(status: str, what: str, detail: str = "") -> None:
    print(f"{status} {what}{': ' + detail if detail else ''}", flush=True)
    RESULTS["checks"].append({"status": status, "what": what, "detail": detail})


def figure(key: str, value) -> None:
    RESULTS["figures"][key] = value


# ------------------------------------------------------------------------------------------------


def check_environment(torch, ptx_loader: str | None) -> int | None:
    """Print the device line; the compute capability (e.g. 90), or None when no CUDA GPU can run the check."""
    if not torch.cuda.is_available():
        why = (f"torch {torch.__version__} is a CPU build: install a CUDA build over it, e.g. "
               f"TORCH_SPEC=torch=={torch.__version__.split('+')[0]} ./scripts/setup.sh (docs/development.md#gpu-check)"
               if torch.version.cuda is None else
               f"torch (CUDA {torch.version.cuda}) sees no GPU: check nvidia-smi and CUDA_VISIBLE_DEVICES, and that "
               f"the driver supports CUDA {torch.version.cuda} (torch warns above when it is too old)")
        print(f"cannot start: {why}", flush=True)
        return None
    import triton

    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    print(f"device: {name}, sm_{major}{minor}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {triton.__version__}, PTX loader {ptx_loader or 'none'}", flush=True)
    figure("device", name)
    figure("versions", {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                        "ptx_loader": ptx_loader})
    return major * 10 + minor


def memory_peak_tbs(name: str, given: float | None) -> float | None:
    """The memory bandwidth to judge against: --peak-tbs, else the datasheet figure for this exact GPU name
    (export.core.gpus), else None (the bandwidth is reported without a verdict)."""
    if given is not None:
        return given
    peaks = gpu_peaks(name)
    return None if peaks is None else peaks.memory_tbs


def check_correctness():
    from mvt_kernels.selftest import run_all

    results = run_all("cuda")
    for r in results:
        detail = r.get("error") or f"max|err| {r['max_abs_err']:.3g}, err/tol {r['worst_ratio']:.3f}"
        report("PASS" if r["ok"] else "FAIL", f"triton kernel {r['name']}", detail)


# ------------------------------------------------------------------------------------------------
# The plugin's PTX, loaded and launched as TensorRT does


def ptx_loader_problem(loader: str) -> str | None:
    """None when `loader` (PTX_LOADERS) can run here, else why not."""
    if loader == "driver":
        try:
            ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            return f"libcuda.so.1 does not load ({exc})"
        return None
    module = {"cuda-bindings": "cuda.bindings.driver", "cupy": "cupy"}[loader]
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a wheel for another CUDA that fails loading its libraries
        return f"{module} is not importable ({type(exc).__name__}: {exc})"
    return None


def choose_ptx_loader(requested: str, problem: Callable[[str], str | None] = ptx_loader_problem
                      ) -> tuple[str | None, str | None]:
    """(loader, None): what loads the plugin's PTX; (None, reason): nothing here can, and the aot check is skipped
    with that reason (a missing tool is never a FAIL). `requested`: "auto" (the first of PTX_LOADERS that can
    run) or one of PTX_LOADERS."""
    if requested != "auto" and requested not in PTX_LOADERS:
        raise ValueError(f"--ptx-loader {requested}: choose auto or one of {', '.join(PTX_LOADERS)}")
    reasons = []
    for loader in (PTX_LOADERS if requested == "auto" else (requested,)):
        why = problem(loader)
        if why is None:
            return loader, None
        reasons.append(f"{loader}: {why}")
    return None, ("nothing here loads PTX (" + "; ".join(reasons) + "); libcuda.so.1 comes with the NVIDIA "
                  "driver, cuda-bindings with torch's CUDA 13 wheels (or pip install cuda-bindings for the driver's "
                  "CUDA major)")


# PTX `.param` types of the kernel's arguments -> (ctypes type for cuLaunchKernel, numpy type for cupy)
_PARAM_TYPES = {".u64": (ctypes.c_uint64, "uint64"), ".b64": (ctypes.c_uint64, "uint64"),
                ".s64": (ctypes.c_int64, "int64"), ".u32": (ctypes.c_uint32, "uint32"),
                ".b32": (ctypes.c_uint32, "uint32"), ".s32": (ctypes.c_int32, "int32")}


def _check_param_types(types: Sequence[str], values: Sequence[int]) -> None:
    if len(types) != len(values):
        raise ValueError(f"the PTX declares {len(types)} parameters, the launcher passes {len(values)}")
    unknown = sorted({t for t in types if t not in _PARAM_TYPES})
    if unknown:
        raise ValueError(f"PTX parameter types {unknown} are not supported by this launcher")


def pack_kernel_params(types: Sequence[str], values: Sequence[int]) -> tuple[ctypes.Array, list]:
    """cuLaunchKernel's `kernelParams`: a void*[n] whose entry i points at argument i, stored as its PTX `.param`
    type (".u64" pointers, ".u32" the i32 scalars). Returns (array, storage); keep both alive until the launch."""
    _check_param_types(types, values)
    storage = [_PARAM_TYPES[t][0](v) for t, v in zip(types, values)]
    array = (ctypes.c_void_p * len(storage))(*(ctypes.addressof(s) for s in storage))
    return array, storage


class _PtxFunction:
    """One entry point of a PTX module, loaded into the current CUDA context by one of PTX_LOADERS."""

    def __init__(self, ptx: str, name: str, shared: int):
        raise NotImplementedError

    def launch(self, grid, block, shared: int, types: Sequence[str], values: Sequence[int], stream: int) -> None:
        """cuLaunchKernel on `stream` with the arguments `values`, each stored as its PTX `.param` type."""
        raise NotImplementedError


class _DriverFunction(_PtxFunction):
    """One PTX entry point through libcuda.so.1 (ctypes), in the context torch made current."""

    def __init__(self, ptx: str, name: str, shared: int):
        lib = ctypes.CDLL("libcuda.so.1")
        vp, u = ctypes.c_void_p, ctypes.c_uint
        for fn, args in (("cuCtxGetCurrent", [ctypes.POINTER(vp)]),
                         ("cuModuleLoadData", [ctypes.POINTER(vp), ctypes.c_char_p]),
                         ("cuModuleGetFunction", [ctypes.POINTER(vp), vp, ctypes.c_char_p]),
                         ("cuFuncSetAttribute", [vp, ctypes.c_int, ctypes.c_int]),
                         ("cuLaunchKernel", [vp, u, u, u, u, u, u, u, vp, vp, vp]),
                         ("cuGetErrorName", [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)])):
            getattr(lib, fn).argtypes = args
            getattr(lib, fn).restype = ctypes.c_int  # CUresult
        self._lib = lib
        context = vp()
        self._check(lib.cuCtxGetCurrent(ctypes.byref(context)), "cuCtxGetCurrent")
        if not context.value:
            raise RuntimeError("no current CUDA context (allocate a CUDA tensor with torch first)")
        self._module, self._function = vp(), vp()
        self._check(lib.cuModuleLoadData(ctypes.byref(self._module), ptx.encode() + b"\0"), "cuModuleLoadData")
        self._check(lib.cuModuleGetFunction(ctypes.byref(self._function), self._module, name.encode()),
                    "cuModuleGetFunction")
        if shared > SHARED_DEFAULT_LIMIT:
            self._check(lib.cuFuncSetAttribute(self._function, MAX_DYNAMIC_SHARED, shared), "cuFuncSetAttribute")

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError(f"{what}: {(name.value or b'CUresult').decode()} ({result})")

    def launch(self, grid, block, shared: int, types: Sequence[str], values: Sequence[int], stream: int) -> None:
        params, _storage = pack_kernel_params(types, values)  # alive until cuLaunchKernel has copied them
        self._check(self._lib.cuLaunchKernel(self._function, *grid, *block, shared, stream, params, None),
                    "cuLaunchKernel")


class _CudaBindingsFunction(_PtxFunction):
    """One PTX entry point through cuda-python's cuda.bindings.driver (cuda-bindings 12.9 driver.pyx: handles and
    streams as ints; `kernelParams` as the address of a void*[] array)."""

    def __init__(self, ptx: str, name: str, shared: int):
        from cuda.bindings import driver as cu

        self._cu = cu
        context = self._check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if not int(context):
            raise RuntimeError("no current CUDA context (allocate a CUDA tensor with torch first)")
        module = self._check(cu.cuModuleLoadData(ptx.encode() + b"\0"), "cuModuleLoadData")
        self._function = self._check(cu.cuModuleGetFunction(module, name.encode()), "cuModuleGetFunction")
        self._module = module
        if shared > SHARED_DEFAULT_LIMIT:
            attribute = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            self._check(cu.cuFuncSetAttribute(self._function, attribute, shared), "cuFuncSetAttribute")

    def _check(self, result: tuple, what: str):
        err, *out = result
        if err != self._cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"{what}: {err.name if hasattr(err, 'name') else err}")
        return out[0] if out else None

    def launch(self, grid, block, shared: int, types: Sequence[str], values: Sequence[int], stream: int) -> None:
        params, _storage = pack_kernel_params(types, values)
        self._check(self._cu.cuLaunchKernel(self._function, *grid, *block, shared, stream, ctypes.addressof(params),
                                            0), "cuLaunchKernel")


class _CupyFunction(_PtxFunction):
    """One PTX entry point through cupy.RawModule (cuModuleLoad of a file)."""

    def __init__(self, ptx: str, name: str, shared: int):
        import cupy

        with tempfile.TemporaryDirectory(prefix="mvt-rope-ptx-") as tmp:  # cuModuleLoad reads it while loading
            path = Path(tmp) / f"{name}.ptx"
            path.write_text(ptx)
            self._function = cupy.RawModule(path=str(path)).get_function(name)
        if shared > SHARED_DEFAULT_LIMIT:
            self._function.max_dynamic_shared_size_bytes = shared

    def launch(self, grid, block, shared: int, types: Sequence[str], values: Sequence[int], stream: int) -> None:
        import cupy
        import numpy as np

        _check_param_types(types, values)
        args = tuple(np.dtype(_PARAM_TYPES[t][1]).type(v) for t, v in zip(types, values))  # cupy packs numpy scalars
        with cupy.cuda.ExternalStream(stream):
            self._function(grid, block, args, shared_mem=shared)


_FUNCTIONS: dict[str, type[_PtxFunction]] = {"driver": _DriverFunction, "cuda-bindings": _CudaBindingsFunction,
                                              "cupy": _CupyFunction}


class _IntTrtp:
    """tensorrt.plugin's KernelLaunchParams and cdiv on ints: the plugin's own computation
    (mvt_kernels.trt_plugin.plugin_launch_params) evaluated for concrete sizes."""

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = block_y = block_z = 1
        shared_mem = 0

    @staticmethod
    def cdiv(a, b):
        from mvt_kernels.launch import cdiv

        return cdiv(a, b)


def plugin_kernel(cc: int, dtype: str, dim: int):
    """The AotKernel the plugin embeds for (dtype, D) on sm_<cc>, compiled as mvt_kernels.trt_plugin's aot_impl
    does."""
    from mvt_kernels import aot

    # The PTX ISA the driver accepts, as the plugin compiles it: a PTX newer than the driver fails
    # cuModuleLoadData with CUDA_ERROR_UNSUPPORTED_PTX_VERSION.
    return aot.compile_rope2d_ptx(dtype, dim, cc, ptx_version=aot.driver_ptx_version())


def _aot_launcher(torch, cc: int, dtype: str, dim: int, loader: str):
    """Load the plugin's PTX with `loader`; return (kernel, launch(x, cos, sin) -> y) using the plugin's
    geometry and arguments."""
    from mvt_kernels.launch import KERNEL_ARGS, scalar_args
    from mvt_kernels.trt_plugin import plugin_launch_params

    kernel = plugin_kernel(cc, dtype, dim)
    if len(kernel.params) != len(KERNEL_ARGS):
        raise RuntimeError(f"the PTX declares {len(kernel.params)} parameters, the plugin passes {len(KERNEL_ARGS)}")
    torch.empty(1, device="cuda")  # the primary context exists and is current before the driver is called
    function = _FUNCTIONS[loader](kernel.ptx, kernel.name, kernel.shared)

    def launch(x, cos, sin):
        batch, seq, heads, _ = x.shape
        y = torch.empty_like(x)  # (B, S, H, D)
        p = plugin_launch_params(_IntTrtp, kernel, batch, seq, heads)
        extras = scalar_args(seq, heads, seq * heads, heads)  # what the plugin passes as SymInt32s
        values = [t.data_ptr() for t in (x, cos, sin)] + list(extras) + [y.data_ptr()]  # KERNEL_ARGS order
        function.launch((int(p.grid_x), int(p.grid_y), int(p.grid_z)), (int(p.block_x), 1, 1), int(p.shared_mem),
                        kernel.params, values, torch.cuda.current_stream().cuda_stream)
        return y

    return kernel, launch


def check_aot(torch, cc: int, loader: str | None, skip_reason: str | None):
    if loader is None:
        report("SKIP", "aot ptx", skip_reason or "no PTX loader")
        return
    from mvt_kernels.reference import rope2d_reference
    from mvt_kernels.selftest import ATOL, RTOL

    torch_names = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    cases = [("fp16", (2, 1601, 16, 64)), ("fp16", (2, 1025, 16, 104)), ("bf16", (3, 1025, 16, 104)),
             ("fp32", (2, 1601, 16, 64)), ("fp16", (1, 37, 3, 104))]
    for dtype, shape in cases:
        what = f"aot ptx sm_{cc} {dtype} {shape} via {loader}"
        try:
            kernel, launch = _aot_launcher(torch, cc, dtype, shape[3], loader)
            tname = torch_names[dtype]
            x = torch.randn(shape, device="cuda").to(getattr(torch, tname))  # (B, S, H, D)
            angles = torch.rand(shape[1], shape[3] // 2, device="cuda") * 6.3  # (S, D/2)
            cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
            torch.cuda.synchronize()
            y = launch(x, cos, sin)
            torch.cuda.synchronize()
            ref = rope2d_reference(x, cos, sin)
            err = (y.float() - ref.float()).abs()
            ratio = (err / (RTOL[tname] * ref.float().abs() + ATOL[tname])).max().item()
            report("PASS" if ratio <= 1 else "FAIL", what,
                   f"PTX {kernel.ptx_version}, {len(kernel.params)} params, "
                   f"max|err| {err.max().item():.3g}, err/tol {ratio:.3f}")
        except Exception as exc:
            report("FAIL", what, f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------------


def _bench(fn, ms_budget: int = 100) -> float:
    """Steady-state time of one fn() call in ms: n calls back to back between two CUDA events.

    Back-to-back launches hide Python launch overhead behind the previous kernel, which is what a
    model sees; every tensor here is larger than L2, so the data comes from HBM each time.
    """
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    n = int(min(1000, max(5, ms_budget / once)))
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


BANDWIDTH_TARGET = 0.70  # of the memory peak: an elementwise kernel that streams x and y once


def pct_of_peak(gbps: float, peak_tbs: float | None) -> str:
    return f" ({100 * gbps * GB / (peak_tbs * 1e12):.1f}% of {peak_tbs} TB/s)" if peak_tbs else ""


def bandwidth_verdict(gbps: float, peak_tbs: float | None) -> tuple[str, str]:
    """(status, detail) of the bandwidth check: PASS/FAIL against BANDWIDTH_TARGET of the peak; SKIP with the
    measurement alone when the GPU's peak is unknown."""
    if not peak_tbs:
        return "SKIP", (f"{gbps:.0f} GB/s measured; no memory peak is known for this GPU (export/core/gpus.py), "
                        "give --peak-tbs to judge it")
    fraction = gbps * GB / (peak_tbs * 1e12)
    return ("PASS" if fraction >= BANDWIDTH_TARGET else "FAIL",
            f"{gbps:.0f} GB/s, {100 * fraction:.1f}% of {peak_tbs} TB/s (target >= {100 * BANDWIDTH_TARGET:.0f}%)")


def check_bench(torch, cc: int, peak_tbs: float | None, sweep: bool, loader: str | None):
    from mvt_kernels import rope2d_qk
    from mvt_kernels.launch import block_config
    from mvt_kernels.reference import rope2d_reference
    from mvt_kernels.rope_triton import rope2d_triton

    batch = 32
    try:
        import export.models.rope_op  # noqa: F401  defines mvt::rope2d
        from mvt_kernels import register_cuda_impl

        register_cuda_impl()
        have_op = True
    except Exception as exc:
        print(f"note: mvt::rope2d op not benchmarked ({type(exc).__name__}: {exc})")
        have_op = False
    hf_rope: Callable | None
    try:
        from transformers.models.mlcd.modeling_mlcd import apply_rotary_pos_emb_vision as hf_rope
    except Exception:
        hf_rope = None

    for name, (seq, heads, dim) in SHAPES.items():
        x = torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.float16)  # (B, S, H, D)
        k = torch.randn_like(x)
        angles = torch.rand(seq, dim // 2, device="cuda") * 6.3  # (S, D/2)
        cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
        moved = 2 * x.numel() * x.element_size() + 2 * cos.numel() * 4  # read x, write y, read tables

        t_tri = _bench(lambda: rope2d_triton(x, cos, sin))
        t_eager = _bench(lambda: rope2d_reference(x, cos, sin))
        gbs_tri, gbs_eager = moved / (t_tri * 1e-3) / GB, moved / (t_eager * 1e-3) / GB
        figs = {"triton_ms": t_tri, "triton_GBps": gbs_tri, "eager_ms": t_eager, "eager_GBps": gbs_eager,
                "speedup_vs_eager": t_eager / t_tri}
        if peak_tbs:
            figs["triton_pct_peak"] = 100 * gbs_tri * GB / (peak_tbs * 1e12)
        print(f"bench {name} B={batch} fp16: triton {t_tri * 1e3:.1f} us = {gbs_tri:.0f} GB/s"
              f"{pct_of_peak(gbs_tri, peak_tbs)}; "
              f"eager {t_eager * 1e3:.1f} us = {gbs_eager:.0f} GB/s; "
              f"speedup {figs['speedup_vs_eager']:.2f}x", flush=True)

        if loader is None:
            print("note: plugin PTX not benchmarked (no PTX loader; see the aot check)", flush=True)
        else:
            try:
                _, aot_launch = _aot_launcher(torch, cc, "fp16", dim, loader)
                t_aot = _bench(lambda: aot_launch(x, cos, sin))
                figs.update(aot_ms=t_aot, aot_GBps=moved / (t_aot * 1e-3) / GB)
                print(f"bench {name}: plugin PTX via {loader} {t_aot * 1e3:.1f} us = {figs['aot_GBps']:.0f} GB/s"
                      f"{pct_of_peak(figs['aot_GBps'], peak_tbs)}", flush=True)
            except Exception as exc:
                print(f"note: plugin PTX not benchmarked ({type(exc).__name__}: {exc})", flush=True)

        t_qk = _bench(lambda: rope2d_qk(x, k, cos, sin, impl="triton"))
        t_qk_eager = _bench(lambda: (rope2d_reference(x, cos, sin), rope2d_reference(k, cos, sin)))
        figs.update(qk_ms=t_qk, qk_GBps=2 * moved / (t_qk * 1e-3) / GB, qk_eager_ms=t_qk_eager)
        print(f"bench {name}: fused q+k {t_qk * 1e3:.1f} us = {figs['qk_GBps']:.0f} GB/s; "
              f"eager q+k {t_qk_eager * 1e3:.1f} us", flush=True)
        if hf_rope is not None:
            full_cos = torch.cat([cos, cos], -1)  # (S, D) transformers' full table [f_h, f_w, f_h, f_w]
            full_sin = torch.cat([sin, sin], -1)
            t_hf = _bench(lambda: hf_rope(x, k, full_cos, full_sin))
            figs["transformers_qk_ms"] = t_hf
            print(f"bench {name}: transformers apply_rotary_pos_emb_vision (q+k) {t_hf * 1e3:.1f} us", flush=True)
        if have_op:
            t_op = _bench(lambda: torch.ops.mvt.rope2d(x, cos, sin))
            figs["mvt_op_ms"] = t_op
            print(f"bench {name}: torch.ops.mvt.rope2d (Triton CUDA kernel) {t_op * 1e3:.1f} us", flush=True)
        if sweep:
            best = None
            half = block_config(dim).block_half
            for rows in sorted({max(1, n // half) for n in (512, 1024, 2048, 4096, 8192)}):
                for warps in (2, 4, 8):
                    try:
                        t = _bench(lambda: rope2d_triton(x, cos, sin, block_rows=rows, num_warps=warps), 50)
                    except Exception as exc:
                        print(f"sweep {name} rows={rows} warps={warps}: {type(exc).__name__}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, rows, warps)
            if best:
                figs["sweep_best"] = {"ms": best[0], "block_rows": best[1], "num_warps": best[2],
                                      "GBps": moved / (best[0] * 1e-3) / GB}
                print(f"sweep {name}: best block_rows={best[1]} num_warps={best[2]}: "
                      f"{figs['sweep_best']['GBps']:.0f} GB/s (default {gbs_tri:.0f})", flush=True)
        figure(f"bench/{name}", figs)

        status, detail = bandwidth_verdict(gbs_tri, peak_tbs)
        report(status, f"bandwidth {name}", detail)
        report("PASS" if figs["speedup_vs_eager"] >= 3 else "FAIL", f"speedup {name}",
               f"{figs['speedup_vs_eager']:.2f}x the eager rotation (target >= 3x)")
        x = k = None  # free both before empty_cache (not `del`: the lambdas above refer to them)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------


def check_models(torch, iters: int):
    try:
        from transformers import MLCDVisionConfig, MLCDVisionModel
    except Exception as exc:
        report("SKIP", "model throughput", f"transformers is not importable ({type(exc).__name__}); "
               "carry its wheels: scripts/gpu_wheels.sh, then MVT_WHEELS=<dir> scripts/gpu_check.sh")
        return
    from export.models.rope_op import mlcd_rope_through_custom_op
    from export.models.zoo import zoo_entry
    from mvt_kernels import register_cuda_impl

    register_cuda_impl()
    batch = 32
    for alias in SHAPES:
        entry = zoo_entry(alias)
        assert entry is not None, f"{alias} is not in export.models.zoo"
        for dtype in (torch.bfloat16, torch.float16):
            dname = str(dtype).removeprefix("torch.")
            model = None
            try:
                config = MLCDVisionConfig(**entry.config)
                with torch.device("cuda"):
                    model = MLCDVisionModel._from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
                pixels = torch.randn(batch, 3, entry.image_size, entry.image_size, device="cuda", dtype=dtype)
                n = max(2, iters if alias == "rice-l-560" else iters // 2)
                for variant, ctx in (("eager-rope", None), ("triton-rope", mlcd_rope_through_custom_op)):
                    with torch.inference_mode(), (ctx() if ctx else _null()):
                        for _ in range(2):
                            model(pixel_values=pixels)
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        for _ in range(n):
                            model(pixel_values=pixels)
                        torch.cuda.synchronize()
                        dt = (time.perf_counter() - t0) / n
                    ips = batch / dt
                    tflops = GFLOPS_PER_IMAGE[alias] * ips / 1e3
                    figure(f"model/{alias}/{dname}/{variant}", {"images_per_s": ips, "ms_per_batch": dt * 1e3,
                                                                "TFLOPS": tflops})
                    report("PASS", f"model {alias} {dname} {variant} batch {batch} sdpa",
                           f"{ips:.1f} images/s ({dt * 1e3:.1f} ms/batch, {tflops:.0f} TFLOPS)")
            except Exception as exc:
                report("FAIL", f"model {alias} {dname}", f"{type(exc).__name__}: {exc}")
            finally:
                del model
                gc.collect()
                torch.cuda.empty_cache()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------


SECTIONS = ("correctness", "aot", "bench", "models")


def verdict(statuses: Sequence[str]) -> tuple[str, int]:
    """The closing word and exit status: FAILED (1) on any FAIL; a SKIP (a missing tool, an unknown peak) never
    fails the check."""
    failed = statuses.count("FAIL")
    return ("PASSED", EXIT_OK) if failed == 0 else ("FAILED", EXIT_FAILED)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    parser.add_argument("--peak-tbs", type=float, default=None,
                        help="memory bandwidth peak in TB/s to judge the kernel against (default: the datasheet "
                             "figure for this exact GPU name, export/core/gpus.py; unknown: no verdict)")
    parser.add_argument("--ptx-loader", default=os.environ.get("MVT_PTX_LOADER", "auto"),
                        choices=("auto",) + PTX_LOADERS,
                        help="what loads the plugin's PTX (default auto: the first of driver, cuda-bindings, cupy "
                             "that is here; none: the aot check is skipped)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile-size sweep in the benchmark")
    parser.add_argument("--iters", type=int, default=10, help="timed batches per model (bigG: half)")
    parser.add_argument("--json", default=os.environ.get("MVT_GPU_CHECK_JSON", "gpu_check.json"),
                        help="where to write the figures (default: ./gpu_check.json)")
    args = parser.parse_args(argv)
    sections = set(args.only.split(","))
    if not sections <= set(SECTIONS):
        print(f"error: --only {args.only}: unknown sections {', '.join(sorted(sections - set(SECTIONS)))}; choose "
              f"from {', '.join(SECTIONS)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("cannot start: TRITON_INTERPRET is set; unset it (the check runs compiled kernels)")
        return EXIT_BAD_INPUT

    import torch

    started = time.time()
    loader, loader_problem = choose_ptx_loader(args.ptx_loader)
    cc = check_environment(torch, loader)
    if cc is None:
        return EXIT_BAD_INPUT  # gpu_check.sh: 2, cannot start
    from mvt_kernels.trt_plugin import target_cc

    ptx_cc = target_cc()  # what the plugin compiles for: $MVT_ROPE_CC, else this GPU's (cc)
    peak = memory_peak_tbs(torch.cuda.get_device_name(), args.peak_tbs)
    figure("peak_TBps", peak)
    steps = [("correctness", lambda: check_correctness()),
             ("aot", lambda: check_aot(torch, ptx_cc, loader, loader_problem)),
             ("bench", lambda: check_bench(torch, ptx_cc, peak, not args.no_sweep, loader)),
             ("models", lambda: check_models(torch, args.iters))]
    for name, step in steps:
        if name not in sections:
            continue
        t0 = time.time()
        try:
            step()
        except Exception as exc:
            report("FAIL", f"section {name}", f"{type(exc).__name__}: {exc}")
        print(f"-- {name}: {time.time() - t0:.1f} s", flush=True)
    figure("seconds", time.time() - started)
    Path(args.json).write_text(json.dumps(RESULTS, indent=2))
    statuses = [c["status"] for c in RESULTS["checks"]]
    word, status = verdict(statuses)
    print(f"{word}: {statuses.count('PASS')} passed, {statuses.count('FAIL')} failed, {statuses.count('SKIP')} "
          f"skipped in {time.time() - started:.0f} s; figures in {args.json}", flush=True)
    return status


if __name__ == "__main__":
    run_cli(main)
