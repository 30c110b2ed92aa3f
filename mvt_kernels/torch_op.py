"""The torch custom op `mvt::rope2d`: definition, fake, and the Triton kernel as its CUDA implementation.

Op: ``mvt::rope2d(Tensor x, Tensor cos, Tensor sin) -> Tensor``
  x    [B, S, H, D]  fp32/fp16/bf16, the layout MLCD's attention holds q and k in
  cos  [S, D/2]      fp32, half table (row 0 is the class token, rows 1.. the patches)
  sin  [S, D/2]      fp32
  out  [B, S, H, D]  x.dtype, computed in fp32 (as transformers does)

One module, as torchao lays out its ops: the default implementation is the torch reference (every
device, export tracing), the fake gives the output's metadata, and on CUDA the fused Triton kernel
takes over when triton is installed. Triton itself is imported on the first CUDA call, so importing
this module costs torch only. export/models/rope_op.py routes MLCD's rotation through the op and
export/graph/rope_node.py translates it to the ONNX node `mvt.RoPE2D` (names: mvt_kernels/names.py).
"""

from __future__ import annotations

import torch

from mvt_kernels.launch import triton_available
from mvt_kernels.names import TORCH_NAME, TORCH_NAMESPACE, TORCH_OP
from mvt_kernels.reference import rope2d_reference


@torch.library.custom_op(TORCH_OP, mutates_args=())
def rope2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rope2d_reference(x, cos, sin)


@rope2d.register_fake
def _rope2d_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)  # (B, S, H, D), dtype of x


def _rope2d_cuda(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from mvt_kernels.rope_triton import rope2d_triton  # imports triton: first CUDA call only

    return rope2d_triton(x, cos, sin)


# Without triton the CUDA dispatch falls through to the reference above (slower, same numbers).
CUDA_KERNEL = triton_available()
if CUDA_KERNEL:
    rope2d.register_kernel("cuda")(_rope2d_cuda)


def op_overload() -> torch._ops.OpOverload:
    """`torch.ops.mvt.rope2d.default`: the key of the exporter's custom_translation_table."""
    return getattr(getattr(torch.ops, TORCH_NAMESPACE), TORCH_NAME).default


def has_cuda_kernel(op: str = TORCH_OP) -> bool:
    """Whether `op` has a kernel registered for the CUDA dispatch key (introspection for tests)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
