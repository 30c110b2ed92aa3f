"""Correctness cases of the Triton kernels against the torch reference, runnable on any device.

    TRITON_INTERPRET=1 python -m mvt_kernels.selftest --device cpu --json   # CPU, the interpreter
    python -m mvt_kernels.selftest --device cuda                           # a GPU

tests/mvt_kernels/test_kernels_interpret.py runs the CPU form in a child process (interpreter mode and
ahead-of-time compilation do not mix in one process) and asserts per case; scripts/gpu_check.py
runs the same cases on CUDA. CASES is plain data, importable without torch or triton.

Tolerance: the kernel computes in fp32 like the reference, so fp32 and fp16 agree to rounding and
bf16 to one unit in the last place (different rounding of the fp32 -> bf16 cast on some paths):
|y - ref| <= rtol * |ref| + atol with rtol = one ulp of the dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

DTYPES = ("float32", "float16", "bfloat16")
RTOL = {"float32": 2.0**-20, "float16": 2.0**-10, "bfloat16": 2.0**-7}  # ~1 ulp (fp32: a few, FMA on GPU)
ATOL = {"float32": 1e-6, "float16": 1e-4, "bfloat16": 1e-3}


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, int, int, int]  # (B, S, H, D)
    dtype: str
    kind: str = "single"  # single | qk | qkv_view (q and k strided views of a fused [B, S, 3, H, D])
    block_rows: int | None = None  # override the tile height to force several programs per image


def _cases() -> tuple[Case, ...]:
    shapes = [
        ("bigG-head", (2, 5, 3, 104), None),  # D = 104: D/2 = 52 is not a power of two (masked lanes)
        ("odd-seq", (2, 17, 2, 64), 4),  # S*H = 34 rows over tiles of 4: last tile partial
        ("tiny", (1, 7, 1, 8), 2),  # H = 1, D = 8
        ("rice-head", (3, 9, 4, 64), None),  # one program per image (batch on grid axis 1)
        ("D6", (2, 3, 5, 6), 2),  # D/2 = 3
    ]
    out = [Case(f"{name}-{dt}", shape, dt, "single", br) for dt in DTYPES for name, shape, br in shapes]
    out += [Case(f"qk-{dt}", (2, 11, 3, 104), dt, "qk", 8) for dt in DTYPES]
    out += [Case(f"qkv-view-{dt}", (2, 13, 2, 64), dt, "qkv_view", 4) for dt in DTYPES]
    return tuple(out)


CASES = _cases()


def run_case(case: Case, device: str = "cpu", seed: int = 0) -> dict:
    """Run one case; return {name, ok, max_abs_err, worst_ratio} (worst_ratio <= 1 passes)."""
    import torch

    from mvt_kernels.reference import rope2d_reference
    from mvt_kernels.rope_triton import rope2d_qk_triton, rope2d_triton

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    batch, seq, heads, dim = case.shape
    angles = torch.rand(seq, dim // 2, generator=gen) * 6.3  # (S, D/2)
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    if case.kind == "single":
        x = torch.randn(case.shape, generator=gen).to(device=device, dtype=dtype)  # (B, S, H, D)
        pairs = [(rope2d_triton(x, cos, sin, block_rows=case.block_rows), rope2d_reference(x, cos, sin))]
    else:
        if case.kind == "qkv_view":
            qkv = torch.randn(batch, seq, 3, heads, dim, generator=gen).to(device=device, dtype=dtype)
            q, k = qkv[:, :, 0], qkv[:, :, 1]  # (B, S, H, D) each, token stride 3*H*D
        else:
            q = torch.randn(case.shape, generator=gen).to(device=device, dtype=dtype)
            k = torch.randn(case.shape, generator=gen).to(device=device, dtype=dtype)
        qo, ko = rope2d_qk_triton(q, k, cos, sin, block_rows=case.block_rows)
        pairs = [(qo, rope2d_reference(q, cos, sin)), (ko, rope2d_reference(k, cos, sin))]
    max_err, worst, shape_ok = 0.0, 0.0, True
    for got, ref in pairs:
        shape_ok &= got.shape == ref.shape and got.dtype == ref.dtype
        err = (got.float() - ref.float()).abs()
        bound = RTOL[case.dtype] * ref.float().abs() + ATOL[case.dtype]
        max_err = max(max_err, err.max().item())
        worst = max(worst, (err / bound).max().item())
    return {"name": case.name, "ok": bool(shape_ok and worst <= 1.0), "max_abs_err": max_err, "worst_ratio": worst}


def run_all(device: str = "cpu") -> list[dict]:
    results = []
    for case in CASES:
        try:
            results.append(run_case(case, device))
        except Exception as exc:  # report per case; the caller asserts
            results.append({"name": case.name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a checklist")
    args = parser.parse_args(argv)
    results = run_all(args.device)
    if args.json:
        print(json.dumps({"results": results, "cases": [asdict(c) for c in CASES]}))
    else:
        for r in results:
            detail = r.get("error") or f"max|err| {r['max_abs_err']:.3g}, err/tol {r['worst_ratio']:.3f}"
            print(f"{'PASS' if r['ok'] else 'FAIL'} kernel {r['name']}: {detail}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
