"""GPU check of the 2D-RoPE kernels and the PyTorch baseline (run through scripts/gpu_check.sh).

Needs a CUDA GPU with torch, triton and cupy; transformers for the model baseline. No internet.

  1. correctness   the Triton kernel (JIT) on CUDA: every mvt_kernels/selftest.py case
  2. aot           the ahead-of-time PTX the TensorRT plugin embeds, loaded with cupy and launched
                   with exactly the arguments and launch parameters the plugin computes
  3. bench         Triton vs the eager torch rotation at RICE-L-560 (S=1601, H=16, D=64) and
                   bigG-448 (S=1025, H=16, D=104), batch 32, fp16: GB/s against HBM peak
                   targets: >= 70% of peak and >= 3x the eager rotation
  4. models        images/s of randomly initialised RICE-L-560 and bigG-448, batch 32, SDPA, bf16 and
                   fp16 (the baseline an engine must beat), plus the same with RoPE through the
                   mvt::rope2d op backed by the Triton kernel

Prints PASS/FAIL/SKIP lines and the figures, writes them to --json, exits 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
# The one script that runs where the project is not installed (a bare GPU machine: torch, triton and cupy
# only; gpu_check.sh sets PYTHONPATH too): the checkout's packages come from here.
sys.path.insert(0, str(ROOT))

GB = 1e9
RESULTS: dict = {"checks": [], "figures": {}}
# attention shapes (S, H, D) of the two 2D-RoPE zoo models; GFLOPs per image from shared/FACTS.md
SHAPES = {"rice-l-560": (1601, 16, 64), "mlcd-bigg-448": (1025, 16, 104)}
GFLOPS_PER_IMAGE = {"rice-l-560": 1221.0, "mlcd-bigg-448": 4110.0}
PEAK_TBS = {"H200": 4.8, "H100": 3.35, "H800": 3.35, "A100": 2.0, "GH200": 4.0, "B200": 8.0}


def report(status: str, what: str, detail: str = "") -> None:
    print(f"{status} {what}{': ' + detail if detail else ''}", flush=True)
    RESULTS["checks"].append({"status": status, "what": what, "detail": detail})


def figure(key: str, value) -> None:
    RESULTS["figures"][key] = value


# ------------------------------------------------------------------------------------------------


def check_environment(torch):
    if not torch.cuda.is_available():
        report("FAIL", "environment", "no CUDA GPU visible to torch")
        return None
    import triton

    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    try:
        import cupy

        cupy_version = cupy.__version__
    except Exception as exc:
        cupy_version = f"not importable ({type(exc).__name__})"
    print(f"device: {name}, sm_{major}{minor}; torch {torch.__version__}, triton {triton.__version__}, "
          f"cupy {cupy_version}", flush=True)
    figure("device", name)
    figure("versions", {"torch": torch.__version__, "triton": triton.__version__, "cupy": cupy_version})
    return major * 10 + minor


def check_correctness():
    from mvt_kernels.selftest import run_all

    results = run_all("cuda")
    for r in results:
        detail = r.get("error") or f"max|err| {r['max_abs_err']:.3g}, err/tol {r['worst_ratio']:.3f}"
        report("PASS" if r["ok"] else "FAIL", f"triton kernel {r['name']}", detail)


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


def _aot_launcher(torch, cc: int, dtype: str, dim: int):
    """Load the plugin's PTX with cupy; return launch(x, cos, sin) -> y using the plugin's geometry."""
    import cupy
    import numpy as np

    from mvt_kernels.aot import compile_rope2d_ptx
    from mvt_kernels.launch import KERNEL_ARGS, scalar_args
    from mvt_kernels.trt_plugin import plugin_launch_params

    kernel = compile_rope2d_ptx(dtype, dim, cc)
    tmp = tempfile.mkdtemp(prefix="mvt-rope-ptx-")
    ptx_path = os.path.join(tmp, f"{kernel.name}_{dtype}_{dim}.ptx")
    Path(ptx_path).write_text(kernel.ptx)
    fn = cupy.RawModule(path=ptx_path).get_function(kernel.name)

    def launch(x, cos, sin):
        batch, seq, heads, _ = x.shape
        y = torch.empty_like(x)  # (B, S, H, D)
        p = plugin_launch_params(_IntTrtp, kernel, batch, seq, heads)
        extras = scalar_args(seq, heads, seq * heads, heads)  # what the plugin passes as SymInt32s
        args = ([np.uint64(t.data_ptr()) for t in (x, cos, sin)] + [np.int32(v) for v in extras]
                + [np.uint64(y.data_ptr())])
        if len(args) != len(kernel.params) or len(args) != len(KERNEL_ARGS):
            raise RuntimeError(f"launcher passes {len(args)} arguments, PTX declares {len(kernel.params)}")
        fn((int(p.grid_x), int(p.grid_y), int(p.grid_z)), (int(p.block_x), 1, 1), tuple(args),
           shared_mem=int(p.shared_mem))
        return y

    return kernel, launch


def check_aot(torch, cc: int):
    try:
        import cupy  # noqa: F401
    except Exception as exc:
        report("FAIL", "aot ptx through cupy", f"cupy is not importable ({type(exc).__name__}: {exc})")
        return
    from mvt_kernels.reference import rope2d_reference
    from mvt_kernels.selftest import ATOL, RTOL

    torch_names = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    cases = [("fp16", (2, 1601, 16, 64)), ("fp16", (2, 1025, 16, 104)), ("bf16", (3, 1025, 16, 104)),
             ("fp32", (2, 1601, 16, 64)), ("fp16", (1, 37, 3, 104))]
    for dtype, shape in cases:
        what = f"aot ptx sm_{cc} {dtype} {shape} via cupy"
        try:
            kernel, launch = _aot_launcher(torch, cc, dtype, shape[3])
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
                   f"{len(kernel.params)} params, max|err| {err.max().item():.3g}, err/tol {ratio:.3f}")
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


def check_bench(torch, cc: int, peak_tbs: float, sweep: bool):
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
        peak = peak_tbs * 1e12

        t_tri = _bench(lambda: rope2d_triton(x, cos, sin))
        t_eager = _bench(lambda: rope2d_reference(x, cos, sin))
        gbs_tri, gbs_eager = moved / (t_tri * 1e-3) / GB, moved / (t_eager * 1e-3) / GB
        figs = {"triton_ms": t_tri, "triton_GBps": gbs_tri, "triton_pct_peak": 100 * gbs_tri * GB / peak,
                "eager_ms": t_eager, "eager_GBps": gbs_eager, "speedup_vs_eager": t_eager / t_tri}
        print(f"bench {name} B={batch} fp16: triton {t_tri * 1e3:.1f} us = {gbs_tri:.0f} GB/s "
              f"({figs['triton_pct_peak']:.1f}% of {peak_tbs} TB/s); "
              f"eager {t_eager * 1e3:.1f} us = {gbs_eager:.0f} GB/s; "
              f"speedup {figs['speedup_vs_eager']:.2f}x", flush=True)

        try:
            _, aot_launch = _aot_launcher(torch, cc, "fp16", dim)
            t_aot = _bench(lambda: aot_launch(x, cos, sin))
            figs.update(aot_ms=t_aot, aot_GBps=moved / (t_aot * 1e-3) / GB)
            print(f"bench {name}: plugin PTX via cupy {t_aot * 1e3:.1f} us = {figs['aot_GBps']:.0f} GB/s "
                  f"({100 * figs['aot_GBps'] * GB / peak:.1f}% of peak)", flush=True)
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

        pct = figs["triton_pct_peak"]
        report("PASS" if pct >= 70 else "FAIL", f"bandwidth {name}", f"{pct:.1f}% of HBM peak (target >= 70%)")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="correctness,aot,bench,models",
                        help="comma-separated sections to run (default: all)")
    parser.add_argument("--peak-tbs", type=float, default=None,
                        help="HBM peak in TB/s (default: by GPU name, H200 4.8, H100 3.35; else 4.8)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile-size sweep in the benchmark")
    parser.add_argument("--iters", type=int, default=10, help="timed batches per model (bigG: half)")
    parser.add_argument("--json", default=os.environ.get("MVT_GPU_CHECK_JSON", "gpu_check.json"),
                        help="where to write the figures (default: ./gpu_check.json)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("FAIL environment: TRITON_INTERPRET is set; unset it (the check runs compiled kernels)")
        return 1

    import torch

    started = time.time()
    cc = check_environment(torch)
    sections = set(args.only.split(","))
    if cc is not None:
        peak = args.peak_tbs or next((v for k, v in PEAK_TBS.items() if k in torch.cuda.get_device_name()), 4.8)
        figure("peak_TBps", peak)
        steps = [("correctness", lambda: check_correctness()), ("aot", lambda: check_aot(torch, cc)),
                 ("bench", lambda: check_bench(torch, cc, peak, not args.no_sweep)),
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
    failed = statuses.count("FAIL")
    verdict = "PASSED" if failed == 0 else "FAILED"
    print(f"{verdict}: {statuses.count('PASS')} passed, {failed} failed, {statuses.count('SKIP')} skipped "
          f"in {time.time() - started:.0f} s; figures in {args.json}", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    from export.core.cli import run_cli

    run_cli(main)
