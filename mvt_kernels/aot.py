"""Ahead-of-time PTX of `rope2d_kernel` for a GPU target, runnable on a machine without a GPU.

    k = compile_rope2d_ptx("fp16", head_dim=104, cc=90, ptx_version=driver_ptx_version())
    k.name, k.ptx, k.num_warps, k.shared, k.params   # what a launcher needs

PTX ISA version. Triton writes `.version` from the ptxas it bundles (8.7-9.1 across Triton 3.3-3.7),
not from the driver that will load the PTX; a driver older than that ptxas refuses it with
CUDA_ERROR_UNSUPPORTED_PTX_VERSION (R535 is CUDA 12.2, PTX 8.2; R550 is CUDA 12.4, PTX 8.4).
driver_ptx_version() asks libcuda which CUDA the installed driver supports and maps it with Triton's
own table (`ptx_get_version`), and compile_rope2d_ptx lowers `.version` to it.

The PTX serves launchers that pass exactly the kernel's arguments (KERNEL_ARGS in launch.py:
inputs, scalars, outputs) and nothing else: TensorRT's AOT plugin and the GPU check's driver launch.

Scratch parameters. Triton 3.3+ appends `global_scratch` and (3.5+) `profile_scratch` pointer
parameters to every kernel; Triton's own launcher passes them (driver.py `launch(...,
global_scratch, profile_scratch, ...)`, tools/compile.py `"&global_scratch", "&profile_scratch"`).
TensorRT's AOT launcher passes inputs, extra scalars and outputs only, so a kernel declaring two
more parameters would have cuLaunchKernel read past the argument array. This kernel needs no
scratch (metadata sizes are 0; checked below), so the two unused trailing parameters are removed
from the PTX `.entry` after checking that the body never loads them; `params` then equals
KERNEL_ARGS exactly and `tests/mvt_kernels/test_kernels_aot.py` asserts it.

Triton cannot compile while TRITON_INTERPRET=1 is set in the process; run interpreter work and
AOT compilation in separate processes.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

from mvt_kernels.launch import KERNEL_ARGS, POINTER_INPUTS, POINTER_OUTPUTS, BlockConfig, block_config

DTYPES = ("fp32", "fp16", "bf16")  # Triton's names; the plugin maps TensorRT types onto them


@dataclass(frozen=True)
class AotKernel:
    name: str  # PTX entry point
    ptx: str  # PTX text, scratch parameters removed
    params: tuple[str, ...]  # PTX parameter types in order, e.g. (".u64", ".u64", ..., ".u32", ...)
    num_warps: int
    shared: int  # dynamic shared memory bytes
    config: BlockConfig
    dtype: str
    cc: int
    triton_version: str
    ptx_version: str  # the PTX ISA `.version` of `ptx`, e.g. "8.4"

    @property
    def block_x(self) -> int:
        return self.num_warps * 32


def _signature(dtype: str) -> dict[str, str]:
    sig = {"x_ptr": f"*{dtype}", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
           "seq": "i32", "heads": "i32", "row_stride_b": "i32", "row_stride_s": "i32",
           "y_ptr": f"*{dtype}",
           "HALF": "constexpr", "BLOCK_R": "constexpr", "BLOCK_HALF": "constexpr"}
    assert tuple(k for k, v in sig.items() if v != "constexpr") == KERNEL_ARGS
    return sig


def _divisibility_attrs(fn) -> dict:
    # Tensor pointers are 16-byte aligned (TensorRT allocates activations 256-byte aligned; cupy and
    # torch allocate at >= 256 bytes). Telling the compiler lets it emit vector loads/stores.
    # The scalars get no hint: S and H are arbitrary (S = 1025, 1601, ...).
    names = POINTER_INPUTS + POINTER_OUTPUTS
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


@functools.lru_cache(maxsize=None)
def compile_rope2d_ptx(dtype: str, head_dim: int, cc: int = 90, block_rows: int | None = None,
                       num_warps: int | None = None, ptx_version: int | None = None) -> AotKernel:
    """Compile `rope2d_kernel` for x dtype `dtype` ("fp32"|"fp16"|"bf16"), head dim D, sm_<cc>.

    ptx_version: the PTX ISA as Triton spells it (84 = 8.4), at most what the loading driver supports
    (driver_ptx_version()); None: the bundled ptxas' newest, which only a driver as new loads."""
    if dtype not in DTYPES:
        raise ValueError(f"rope2d AOT: dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("rope2d AOT: triton.compile does not work while TRITON_INTERPRET=1 is set in this "
                           "process; compile PTX in a process without it")
    import triton
    from triton.backends.compiler import GPUTarget

    from mvt_kernels.rope_triton import rope2d_kernel

    cfg = block_config(head_dim, block_rows, num_warps)
    src = triton.compiler.ASTSource(fn=rope2d_kernel, signature=_signature(dtype), constexprs=cfg.constexprs(),
                                    attrs=_divisibility_attrs(rope2d_kernel))
    options: dict = {"num_warps": cfg.num_warps}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    meta = compiled.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, field, 0):
            raise RuntimeError(f"rope2d AOT: the kernel needs {field}={getattr(meta, field)} bytes; the TensorRT AOT "
                               "plugin cannot pass scratch buffers")
    ptx = strip_unused_trailing_params(compiled.asm["ptx"], meta.name, len(KERNEL_ARGS))
    return AotKernel(name=meta.name, ptx=ptx, params=tuple(entry_params(ptx, meta.name)),
                     num_warps=meta.num_warps, shared=meta.shared, config=cfg, dtype=dtype, cc=cc,
                     triton_version=triton.__version__, ptx_version=ptx_isa(ptx))


def ptx_isa(ptx: str) -> str:
    """The `.version` directive of a PTX text, e.g. "8.4"."""
    m = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, flags=re.MULTILINE)
    if m is None:
        raise ValueError("PTX has no .version directive")
    return m.group(1)


def driver_cuda_version() -> tuple[int, int] | None:
    """(major, minor) of the CUDA the installed driver supports (cuDriverGetVersion), None without one.

    Through ctypes and libcuda.so.1, so it works where torch is absent (the serving image's rebuild)."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000, (version.value % 1000) // 10  # 12040 -> (12, 4)


def ptx_version_for_cuda(cuda: tuple[int, int]) -> int:
    """The newest PTX ISA (Triton's spelling, 84 = 8.4) a driver supporting CUDA `cuda` loads, by Triton's
    own table (backends/nvidia/compiler.py ptx_get_version)."""
    from triton.backends.nvidia.compiler import ptx_get_version

    return ptx_get_version(f"{cuda[0]}.{cuda[1]}")


def bundled_ptx_version(cc: int = 80) -> int:
    """The newest PTX ISA the ptxas bundled with Triton assembles (Triton's default `.version`)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return ptx_version_for_cuda(tuple(int(v) for v in get_ptxas(cc).version.split(".")[:2]))  # type: ignore[arg-type]


def driver_ptx_version() -> int | None:
    """The PTX ISA to emit: the driver's (ptx_version_for_cuda of cuDriverGetVersion), capped at what the bundled
    ptxas assembles (a CUDA 13 driver with Triton's CUDA 12.8 ptxas: 8.7); None without a driver (Triton's
    default). $MVT_PTX_VERSION (e.g. 84) overrides it: a plan built for a fleet whose oldest driver is known."""
    if os.environ.get("MVT_PTX_VERSION"):
        return int(os.environ["MVT_PTX_VERSION"])
    cuda = driver_cuda_version()
    return None if cuda is None else min(ptx_version_for_cuda(cuda), bundled_ptx_version())


# ----------------------------------------------------------------------------------------------
# PTX parameter lists


def _entry_span(ptx: str, name: str) -> tuple[int, int]:
    """Character span of the parameter list inside `.entry name( ... )`."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\(", ptx)
    if m is None:
        raise ValueError(f"PTX has no entry point {name!r}")
    end = ptx.index(")", m.end())
    return m.end(), end


def _entry_decls(ptx: str, name: str) -> list[tuple[str, str]]:
    """[(type, name)] of entry `name`'s parameters, e.g. ".param .u64 .ptr .global .align 1 k_param_0"."""
    start, end = _entry_span(ptx, name)
    decls = []
    for decl in ptx[start:end].split(","):
        tokens = decl.split()
        if not tokens:
            continue
        if tokens[0] != ".param" or len(tokens) < 3:
            raise ValueError(f"PTX entry {name}: unexpected parameter declaration {decl.strip()!r}")
        decls.append((tokens[1], tokens[-1]))
    return decls


def entry_params(ptx: str, name: str) -> list[str]:
    """Types of the `.param`s of entry `name`, in order (".u64" for pointers, ".u32" for i32)."""
    return [t for t, _ in _entry_decls(ptx, name)]


def strip_unused_trailing_params(ptx: str, name: str, keep: int) -> str:
    """Remove the parameters after the first `keep` of entry `name`, which must all be unused.

    Raises if there are fewer than `keep` parameters, or if the body references a removed one.
    A kernel that already has exactly `keep` parameters (a Triton without scratch arguments) is
    returned unchanged.
    """
    names = [n for _, n in _entry_decls(ptx, name)]
    if len(names) < keep:
        raise ValueError(f"PTX entry {name} has {len(names)} parameters, fewer than the {keep} the launcher passes")
    extra = names[keep:]
    if not extra:
        return ptx
    start, end = _entry_span(ptx, name)
    body = ptx[end:]
    used = [n for n in extra if re.search(r"\b" + re.escape(n) + r"\b", body)]
    if used:
        raise ValueError(f"PTX entry {name}: trailing parameters {used} are used by the kernel body; they cannot "
                         "be dropped, and TensorRT's AOT launcher cannot pass them")
    decls = [d.strip() for d in ptx[start:end].split(",") if d.strip()]
    kept = ",\n\t".join(decls[:keep])
    return ptx[:start] + "\n\t" + kept + "\n" + ptx[end:]


def assemble_check(ptx: str, cc: int, ptxas: str | None = None) -> str:
    """Assemble `ptx` for sm_<cc> with ptxas (Triton's bundled one by default); return ptxas' stderr.

    Proves the edited PTX is still valid on a machine without a GPU. Raises CalledProcessError.
    """
    import subprocess
    import tempfile

    if ptxas is None:
        ptxas = bundled_ptxas()
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    return proc.stderr


def bundled_ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
