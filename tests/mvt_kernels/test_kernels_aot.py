"""Ahead-of-time PTX of the RoPE kernel, compiled on the CPU for sm_80 and sm_90, and the launch
geometry every launcher shares (torch, cupy, the TensorRT plugin)."""

from __future__ import annotations

import importlib.util
import os
import re
import types

import pytest

from mvt_kernels.launch import KERNEL_ARGS, block_config, cdiv, launch_grid, scalar_args

needs_compiler = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="needs OpenAI Triton in a process without TRITON_INTERPRET=1 (triton.compile fails under it)")

# Model-zoo attention shapes (S, H, D): RICE-ViT-L-14-560, MLCD-ViT-bigG-14-448, the demo model.
ZOO = {"rice-l-560": (1601, 16, 64), "mlcd-bigg-448": (1025, 16, 104), "demo-224": (257, 6, 64)}


# ------------------------------------------------------------------------------------------------
# launch geometry (plain Python)


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("batch", [1, 32])
def test_grid_covers_every_row_exactly_once(name, batch):
    seq, heads, dim = ZOO[name]
    cfg = block_config(dim)
    gx, gy, gz = launch_grid(batch, seq, heads, cfg.block_rows)
    rows = seq * heads
    assert (gy, gz) == (batch, 1)
    assert (gx - 1) * cfg.block_rows < rows <= gx * cfg.block_rows
    assert cfg.block_half >= dim // 2 and cfg.block_half & (cfg.block_half - 1) == 0


def test_zoo_grids():
    assert launch_grid(32, 1601, 16, block_config(64).block_rows) == (401, 32, 1)  # 25616 rows / 64
    assert launch_grid(32, 1025, 16, block_config(104).block_rows) == (513, 32, 1)  # 16400 rows / 32
    assert block_config(104).block_half == 64 and block_config(104).half == 52


def test_scalar_args_of_contiguous_and_strided_inputs():
    assert scalar_args(1601, 16) == (1601, 16, 1601 * 16, 16)
    assert scalar_args(1025, 16, 3 * 1025 * 16, 3 * 16) == (1025, 16, 49200, 48)  # q view of qkv
    assert KERNEL_ARGS == ("x_ptr", "cos_ptr", "sin_ptr", "seq", "heads", "row_stride_b", "row_stride_s", "y_ptr")


def test_bad_head_dim_is_explained():
    with pytest.raises(ValueError, match="even"):
        block_config(105)
    with pytest.raises(ValueError, match="power of two"):
        block_config(64, block_rows=48)


def test_plugin_launch_params_follow_the_shared_grid():
    """The plugin's KernelLaunchParams, computed with int sizes through the same code path
    (a stand-in namespace supplies KernelLaunchParams and cdiv; TensorRT itself is not needed)."""
    from mvt_kernels.trt_plugin import plugin_launch_params

    class Params:
        grid_x = grid_y = grid_z = block_x = 1
        shared_mem = 0

    ns = types.SimpleNamespace(KernelLaunchParams=Params, cdiv=cdiv)
    kernel = types.SimpleNamespace(config=block_config(104), block_x=128, shared=4096)
    p = plugin_launch_params(ns, kernel, 32, 1025, 16)
    assert (p.grid_x, p.grid_y, p.grid_z, p.block_x, p.shared_mem) == (513, 32, 1, 128, 4096)


# ------------------------------------------------------------------------------------------------
# PTX


@needs_compiler
@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dim", [64, 104])
def test_ptx_compiles_with_exactly_the_launch_arguments(cc, dtype, dim):
    from mvt_kernels.aot import compile_rope2d_ptx, entry_params

    k = compile_rope2d_ptx(dtype, dim, cc)
    assert k.name == "rope2d_kernel"
    assert re.search(rf"\.visible\s+\.entry\s+{k.name}\s*\(", k.ptx)
    assert f".target sm_{cc}" in k.ptx
    # What TensorRT and the GPU check's launcher pass: 3 input pointers, 4 i32 scalars, 1 output pointer.
    assert len(k.params) == len(KERNEL_ARGS)
    assert k.params == (".u64",) * 3 + (".u32",) * 4 + (".u64",)
    assert entry_params(k.ptx, k.name) == list(k.params)
    assert k.block_x == k.num_warps * 32 and f".reqntid {k.block_x}" in k.ptx
    assert k.shared >= 0


@needs_compiler
@pytest.mark.parametrize("cc", [80, 90])
def test_edited_ptx_assembles(cc):
    from mvt_kernels.aot import assemble_check, bundled_ptxas, compile_rope2d_ptx

    if not os.path.exists(bundled_ptxas()):
        pytest.skip("triton's bundled ptxas is missing")
    for dtype, dim in (("fp16", 104), ("bf16", 64)):
        assemble_check(compile_rope2d_ptx(dtype, dim, cc).ptx, cc)  # raises on invalid PTX


@needs_compiler
def test_triton_appends_scratch_parameters_that_we_remove():
    """The known risk: Triton 3.6/3.7 declares trailing scratch pointers TensorRT would not pass."""
    import triton
    from triton.backends.compiler import GPUTarget

    from mvt_kernels.aot import _divisibility_attrs, _signature, entry_params
    from mvt_kernels.rope_triton import rope2d_kernel

    src = triton.compiler.ASTSource(fn=rope2d_kernel, signature=_signature("fp16"),
                                    constexprs=block_config(64).constexprs(), attrs=_divisibility_attrs(rope2d_kernel))
    raw = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    raw_params = entry_params(raw.asm["ptx"], raw.metadata.name)
    assert len(raw_params) >= len(KERNEL_ARGS)
    extra = raw_params[len(KERNEL_ARGS):]
    assert all(t == ".u64" for t in extra), extra  # pointers only
    assert raw.metadata.global_scratch_size == 0 and raw.metadata.profile_scratch_size == 0


def test_strip_refuses_a_used_parameter():
    from mvt_kernels.aot import strip_unused_trailing_params

    ptx = (".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n"
           "\t.param .u64 .ptr .global .align 1 k_param_1\n)\n{\n\tld.param.b64 %rd1, [k_param_1];\n}\n")
    with pytest.raises(ValueError, match="used by the kernel body"):
        strip_unused_trailing_params(ptx, "k", 1)
    unused = ptx.replace("[k_param_1]", "[k_param_0]")
    stripped = strip_unused_trailing_params(unused, "k", 1)
    assert "k_param_1" not in stripped and "k_param_0" in stripped
    assert strip_unused_trailing_params(stripped, "k", 1) == stripped  # nothing left to strip
    with pytest.raises(ValueError, match="fewer than"):
        strip_unused_trailing_params(stripped, "k", 2)


@needs_compiler
def test_unknown_dtype_is_explained():
    from mvt_kernels.aot import compile_rope2d_ptx

    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        compile_rope2d_ptx("fp8", 64, 90)


# ------------------------------------------------------------------------------------------------
# PTX ISA version: the driver's, not the bundled ptxas' (R535 = CUDA 12.2 loads PTX <= 8.2)


@needs_compiler
@pytest.mark.parametrize(("cuda", "isa"), [((12, 2), "8.2"), ((12, 4), "8.4"), ((12, 8), "8.7")])
def test_ptx_version_follows_the_driver(cuda, isa):
    from mvt_kernels.aot import (
        assemble_check,
        bundled_ptx_version,
        bundled_ptxas,
        compile_rope2d_ptx,
        ptx_isa,
        ptx_version_for_cuda,
    )

    assert ptx_version_for_cuda((13, 0)) == 90  # a CUDA 13 driver loads 9.0; the bundled ptxas caps what we emit
    version = min(ptx_version_for_cuda(cuda), bundled_ptx_version())
    if version != ptx_version_for_cuda(cuda):
        pytest.skip(f"this Triton's ptxas stops at {version}")
    assert f"{version // 10}.{version % 10}" == isa
    k = compile_rope2d_ptx("fp16", 64, 90, ptx_version=version)
    assert ptx_isa(k.ptx) == k.ptx_version == isa
    if os.path.exists(bundled_ptxas()):
        assemble_check(k.ptx, 90)  # still valid PTX at the lower ISA


@needs_compiler
def test_default_ptx_version_is_the_bundled_ptxas_one_and_the_override_wins(monkeypatch):
    from mvt_kernels.aot import compile_rope2d_ptx, driver_cuda_version, driver_ptx_version

    assert compile_rope2d_ptx("fp32", 64, 80).ptx_version >= "8.0"
    monkeypatch.setenv("MVT_PTX_VERSION", "83")
    assert driver_ptx_version() == 83
    monkeypatch.delenv("MVT_PTX_VERSION")
    cuda = driver_cuda_version()  # None on a machine without libcuda (this CI), else (major, minor)
    assert cuda is None or (cuda[0] >= 11 and 0 <= cuda[1] < 10)
    assert (driver_ptx_version() is None) == (cuda is None)
