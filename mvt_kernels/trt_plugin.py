"""TensorRT plugin `mvt::RoPE2D`: a quickly-deployable plugin whose ahead-of-time implementation is
the PTX of the Triton kernel (mvt_kernels/aot.py), so a built engine carries the kernel and runs in
C++ runtimes (trtexec, Triton Inference Server's TensorRT backend) without Python.

    from mvt_kernels.trt_plugin import register_trt_plugin
    register_trt_plugin()        # before parsing an ONNX file from `--rope plugin`

ONNX side (export/graph/lowering.py `plugin`): node op_type "RoPE2D" (= the plugin name), attributes
plugin_namespace="mvt" and aot=1 (consumed by TensorRT's parser; every name comes from
mvt_kernels/names.py), inputs x [B, S, H, D] (float/float16/bfloat16),
cos/sin [S, D/2] float; output y like x. The plugin registers no attributes of its own, so the
AOT function receives (x, cos, sin, outputs, tactic) (tensorrt/plugin/_validate.py
`_validate_aot_impl`, TensorRT 10.9+).

Launch contract (tensorrt/plugin/_plugin_class.py `_TemplateAOTPlugin.get_launch_params`): the
kernel is called with input pointers, the extra scalar arguments (SymInt32 each), then output
pointers. `aot.compile_rope2d_ptx` removes Triton's unused trailing scratch parameters so the PTX
declares exactly those arguments. Grid and block are symbolic in the input shape, so dynamic
batch works with one PTX.

No `from __future__ import annotations` here: tensorrt.plugin reads the annotations of the
registered functions as classes (`issubclass(param.annotation, TensorDesc)`).
"""

import os
from typing import List, Tuple, Union

from mvt_kernels.launch import KERNEL_ARGS, launch_grid, scalar_args
from mvt_kernels.names import PLUGIN_ID

DEFAULT_CC = 80  # sm_80 PTX is forward compatible (the driver JIT-compiles it for sm_90 and later)

_registered: Union[dict, None] = None  # what the registered plugin compiles for (register_trt_plugin's return)


def tensorrt_skip_reason() -> Union[str, None]:
    """None when `tensorrt.plugin` with AOT support is importable, else why the plugin cannot register."""
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin as trtp
    except Exception as exc:  # ImportError, or a broken install that fails loading its libraries
        return (f"TensorRT is not importable ({type(exc).__name__}: {exc}); install mvt-deploy[tensorrt] "
                "(TensorRT >= 10.9) on a machine with an NVIDIA GPU")
    if not hasattr(trtp, "aot_impl"):
        return f"TensorRT {tensorrt.__version__} has no tensorrt.plugin.aot_impl; ahead-of-time plugins need >= 10.9"
    return None


def target_cc(cc: Union[int, None] = None) -> int:
    """Compute capability to compile for: argument, $MVT_ROPE_CC, the current CUDA GPU, else 80.

    Triton emits `.target sm_90a` for cc 90, which only sm_90 runs; engines are built per GPU
    anyway, and the GPU TensorRT builds on is the one torch sees first.
    """
    if cc is not None:
        return int(cc)
    if os.environ.get("MVT_ROPE_CC"):
        return int(os.environ["MVT_ROPE_CC"])
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return major * 10 + minor
    except Exception:
        pass
    return DEFAULT_CC


def trt_dtype_name(trt, dtype) -> str:
    """TensorRT DataType -> the Triton dtype name the kernel is compiled for."""
    names = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    if dtype not in names:
        raise ValueError(f"{PLUGIN_ID}: x has type {dtype}; the plugin supports float32, float16 and bfloat16")
    return names[dtype]


def register_trt_plugin(cc: Union[int, None] = None) -> dict:
    """Register PLUGIN_ID (`mvt::RoPE2D`) with TensorRT's plugin registry (once per process); return what
    the engine will embed: {"plugin", "code": "ptx", "cc", "ptx_version", "driver_cuda"} (the manifest
    records it). The PTX ISA version is the driver's (mvt_kernels.aot.driver_ptx_version), so the plan
    loads on the driver that built it and on newer ones.

    Raises RuntimeError with the reason when TensorRT (>= 10.9) is not importable.
    """
    global _registered
    if _registered is not None:
        return dict(_registered)
    reason = tensorrt_skip_reason()
    if reason is not None:
        raise RuntimeError(reason)
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from mvt_kernels.aot import compile_rope2d_ptx, driver_cuda_version, driver_ptx_version

    cc = target_cc(cc)
    ptx_version = driver_ptx_version()
    cuda = driver_cuda_version()

    @trtp.register(PLUGIN_ID)
    def _rope2d_desc(x: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc) -> trtp.TensorDesc:
        return x.like()  # y: shape and type of x

    @trtp.autotune(PLUGIN_ID)
    def _rope2d_autotune(x: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc,
                         outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        # x and y share one of three types ('|' = dependent); the tables are always float32.
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32, FP32, FP32|FP16|BF16", "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def _rope2d_aot(x: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc,
                    outputs: Tuple[trtp.TensorDesc], tactic: int
                    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        batch, seq, heads, dim = (x.shape_expr[i] for i in range(4))  # (B, S, H, D) symbolic
        if not dim.is_constant:
            raise ValueError(f"{PLUGIN_ID}: the head dim (axis 3 of x) must be static; the kernel is compiled per D")
        kernel = compile_rope2d_ptx(trt_dtype_name(trt, x.dtype), dim.constant_value(), cc,
                                    ptx_version=ptx_version)
        extras = scalar_args(seq, heads, seq * heads, heads)  # contiguous x: row strides S*H and H
        launch = plugin_launch_params(trtp, kernel, batch, seq, heads)
        args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extras])
        return kernel.name, kernel.ptx, launch, args

    _registered = {"plugin": PLUGIN_ID, "code": "ptx", "cc": cc,
                   "ptx_version": None if ptx_version is None else f"{ptx_version // 10}.{ptx_version % 10}",
                   "driver_cuda": None if cuda is None else f"{cuda[0]}.{cuda[1]}"}
    return dict(_registered)


def plugin_launch_params(trtp, kernel, batch, seq, heads):
    """KernelLaunchParams from symbolic sizes (one place, so tests and the GPU check agree)."""
    grid_x, grid_y, grid_z = launch_grid(batch, seq, heads, kernel.config.block_rows, ceil_div=trtp.cdiv)
    params = trtp.KernelLaunchParams()
    params.grid_x = grid_x
    params.grid_y = grid_y
    params.grid_z = grid_z
    params.block_x = kernel.block_x
    params.shared_mem = kernel.shared
    return params


def launch_args_count() -> int:
    """How many arguments TensorRT passes to the kernel: inputs + extra scalars + outputs."""
    return len(KERNEL_ARGS)
