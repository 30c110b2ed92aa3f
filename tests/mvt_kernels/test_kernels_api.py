"""Public API of mvt_kernels/: implementation choice, the fused q/k form, the custom op's CUDA kernel."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mvt_kernels import IMPLEMENTATIONS, rope2d, rope2d_qk  # noqa: E402
from mvt_kernels.reference import rope2d_reference  # noqa: E402


def _inputs(shape=(2, 5, 3, 104), dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(shape[1], shape[3] // 2, generator=gen) * 6.3  # (S, D/2)
    return torch.randn(shape, generator=gen).to(dtype), angles.cos(), angles.sin()


def test_implementations():
    assert IMPLEMENTATIONS == ("auto", "torch", "triton")


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_cpu_paths_are_the_reference(impl):
    x, c, s = _inputs()
    torch.testing.assert_close(rope2d(x, c, s, impl=impl), rope2d_reference(x, c, s), rtol=0, atol=0)


def test_qk_torch_path():
    q, c, s = _inputs()
    k = q.flip(0)
    qo, ko = rope2d_qk(q, k, c, s, impl="auto")
    torch.testing.assert_close(qo, rope2d_reference(q, c, s), rtol=0, atol=0)
    torch.testing.assert_close(ko, rope2d_reference(k, c, s), rtol=0, atol=0)


def test_unknown_impl_lists_the_choices():
    x, c, s = _inputs()
    with pytest.raises(ValueError, match="auto, torch, triton"):
        rope2d(x, c, s, impl="cuda")


def test_bad_table_shape_is_explained():
    x, c, s = _inputs()
    with pytest.raises(ValueError, match=r"cos must be \[S, D/2\]"):
        rope2d(x, c[:, :10], s, impl="auto")


def test_custom_op_gets_a_cuda_kernel_and_keeps_cpu_behaviour():
    pytest.importorskip("triton")
    from mvt_kernels import register_cuda_impl
    from mvt_kernels.names import TORCH_OP
    from mvt_kernels.torch_op import has_cuda_kernel, rope2d

    assert register_cuda_impl() is True
    assert register_cuda_impl() is True  # idempotent
    assert has_cuda_kernel(TORCH_OP)
    x, c, s = _inputs(dtype=torch.float16)
    torch.testing.assert_close(rope2d(x, c, s), rope2d_reference(x, c, s), rtol=0, atol=0)


def test_the_op_is_defined_once_and_reachable_through_export():
    """export.models.rope_op re-exports the op mvt_kernels/torch_op.py defines; torch.ops resolves its identity."""
    from export.models import rope_op
    from mvt_kernels import torch_op
    from mvt_kernels.names import TORCH_NAME, TORCH_NAMESPACE

    assert rope_op.rope2d is torch_op.rope2d
    assert torch_op.op_overload() is getattr(getattr(torch.ops, TORCH_NAMESPACE), TORCH_NAME).default


@pytest.mark.gpu
def test_triton_matches_reference_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    pytest.importorskip("triton")
    from mvt_kernels.selftest import CASES, run_case

    failed = [r for r in (run_case(c, "cuda") for c in CASES) if not r["ok"]]
    assert not failed, failed
