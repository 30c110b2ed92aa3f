"""Fused 2D-RoPE kernels behind the `mvt::rope2d` op, each beside the pure-torch reference.

    from mvt_kernels import rope2d, rope2d_qk
    y = rope2d(x, cos, sin)                 # x [B, S, H, D]; cos, sin [S, D/2] fp32
    q, k = rope2d_qk(q, k, cos, sin)        # both rotated in one launch

Implementations (`impl=`):
    torch    the reference (mvt_kernels/reference.py), any device
    triton   the Triton kernel (mvt_kernels/rope_triton.py) on the tensor's device; on a CPU only
             under TRITON_INTERPRET=1
    auto     triton on CUDA when triton is importable, torch elsewhere

Also here: the torch custom op `mvt::rope2d` with its fake and this kernel as its CUDA
implementation (mvt_kernels/torch_op.py), the ahead-of-time PTX of the same kernel (mvt_kernels/aot.py)
and the TensorRT plugin `mvt::RoPE2D` that carries it (mvt_kernels/trt_plugin.py); their names come
from mvt_kernels/names.py. torch and triton are imported on first use.
"""

from __future__ import annotations

from mvt_kernels.launch import triton_available

IMPLEMENTATIONS = ("auto", "torch", "triton")


def _resolve(impl: str, x) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"rope2d: impl={impl!r} is not available; choose one of {', '.join(IMPLEMENTATIONS)}")
    if impl == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if impl == "triton" and not triton_available():
        raise RuntimeError("rope2d(impl='triton') needs OpenAI Triton: pip install triton "
                           "(torch's CUDA wheels bring the matching version)")
    return impl


def rope2d(x, cos, sin, impl: str = "auto"):
    """Apply the non-interleaved 2D rotation to x [B, S, H, D] with half tables [S, D/2]."""
    from mvt_kernels.reference import check_rope2d_args, rope2d_reference

    impl = _resolve(impl, x)
    check_rope2d_args(x, cos, sin)
    if impl == "triton":
        from mvt_kernels.rope_triton import rope2d_triton

        return rope2d_triton(x, cos, sin)
    return rope2d_reference(x, cos, sin)


def rope2d_qk(q, k, cos, sin, impl: str = "auto"):
    """Rotate q and k [B, S, H, D] together (one launch with Triton); returns (q_rot, k_rot)."""
    from mvt_kernels.reference import check_rope2d_args, rope2d_reference

    impl = _resolve(impl, q)
    check_rope2d_args(q, cos, sin)
    check_rope2d_args(k, cos, sin)
    if impl == "triton":
        from mvt_kernels.rope_triton import rope2d_qk_triton

        return rope2d_qk_triton(q, k, cos, sin)
    return rope2d_reference(q, cos, sin), rope2d_reference(k, cos, sin)


def register_cuda_impl() -> bool:
    """Define the torch op `mvt::rope2d` (mvt_kernels/torch_op.py); True when its CUDA kernel is the Triton one.

    Defining the op registers the kernel (without triton, CUDA runs the reference); idempotent.
    """
    from mvt_kernels.torch_op import CUDA_KERNEL

    return CUDA_KERNEL


__all__ = ["rope2d", "rope2d_qk", "register_cuda_impl", "triton_available", "IMPLEMENTATIONS"]
