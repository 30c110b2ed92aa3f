"""The Triton kernel as the CUDA implementation of the torch custom op `mvt::rope2d`.

export/rope_op.py defines the op (its default implementation is the torch reference and runs on
every device). `register_cuda_impl()` adds a CUDA-only kernel on top, so CPU behaviour, fake
tensors and export tracing are unchanged:

    @torch.library.custom_op("mvt::rope2d", mutates_args=())
    def rope2d(x, cos, sin): ...
    kernels.register_cuda_impl()          # after the op exists

Triton itself is imported on the first CUDA call, not at registration.
"""

from __future__ import annotations

import importlib.util

import torch

_registered: set[str] = set()


def _rope2d_cuda(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from .rope_triton import rope2d_triton

    return rope2d_triton(x, cos, sin)


def register_cuda_impl(op: str = "mvt::rope2d") -> bool:
    """Register the Triton kernel for `op` on CUDA. Returns False (and changes nothing) without triton.

    Idempotent. Raises if `op` is not defined yet (import the module that defines it first).
    """
    if op in _registered:
        return True
    if importlib.util.find_spec("triton") is None:
        return False
    namespace, name = op.split("::")
    if not hasattr(getattr(torch.ops, namespace), name):
        raise RuntimeError(f"torch custom op {op} is not defined yet; import export.rope_op (which defines it) "
                           "before registering its CUDA kernel")
    torch.library.register_kernel(op, "cuda", _rope2d_cuda)
    _registered.add(op)
    return True


def has_cuda_kernel(op: str = "mvt::rope2d") -> bool:
    """Whether `op` has a kernel registered for the CUDA dispatch key (introspection for tests)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
